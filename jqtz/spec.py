"""`QuantSpec`: how to quantize one array (format, granularity, range choice, scale dtype).

A spec is data: a frozen, keyword-only, hashable dataclass, so it can be a static argument under
`jax.jit` and can sit in rule lists. It is validated when built.

Granularity is given relative to the *contraction axis* `axis` (the axis a matrix product sums
over; flax `Dense` kernels are `[in, out]`, so weights use `axis=0`, activations `axis=-1`):

- `"tensor"`: one scale for the whole array.
- `"channel"`: one scale per slice along every other axis (weights: per output channel;
  activations with `axis=-1`: per token).
- `"group"`: like channel, with the contraction axis cut into groups of `group_size`.
- `"block"`: 2-D tiles `block_shape` over the last two axes (e.g. 128x128 FP8 weight blocks).

Example:
  >>> import jqtz
  >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=128)
  >>> spec.block_shape_for((576, 1536))  # the last group along axis 0 is 64 wide
  (128, 1)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Literal

import jax.numpy as jnp
import numpy as np

from jqtz import formats

Granularity = Literal["tensor", "channel", "group", "block"]
Clipping = Literal["max", "percentile", "mse"]

_SCALE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize an array.

    Attributes:
      format: a name from `jqtz.formats.names()` without the `u` prefix: `int8`, `int4`, `int3`,
        `int2`, `fp8_e4m3`, `fp8_e5m2`, `nf4`.
      granularity: `"tensor"`, `"channel"`, `"group"` or `"block"` (see the module docstring).
      axis: the contraction axis (or axes, for `"channel"`), negative values count from the end.
      group_size: the group length along `axis`, for `"group"`.
      block_shape: the tile over the last two axes, for `"block"`.
      symmetric: symmetric range around zero (signed codes) or min/max with integer zero points
        (unsigned codes; integer formats only). Asymmetric ranges always contain 0, as in GPTQ.
      clipping: how the range is chosen: `"max"` (absmax, or min/max when asymmetric),
        `"percentile"` (the `percentile`-th percentile of |x|, or of x at both ends), or `"mse"`
        (grid search of a shrink factor minimising sum |x - q(x)|^mse_norm per block, as GPTQ).
      scale_dtype: `"float32"`, `"bfloat16"` or `"float16"`. Scales are rounded *up* into it so
        no value leaves the code range.
      double_quant: quantize the scales themselves to 8 bits in groups of 256 (QLoRA's double
        quantization; meant for `nf4`).
      allow_partial_groups: allow a shorter last group/block when a dimension is not a multiple of
        the group size (the original GPTQ behaviour); if False that raises a `ValueError`.
      activation: for weights, how the input of their matrix products is quantized at run time
        (e.g. int8 per token for W8A8: `QuantSpec(format="int8", axis=-1)`); None: weight-only.
      outlier_threshold: on an int8 activation spec only: LLM.int8()'s mixed-precision
        decomposition. Input features (columns along the contraction) where any |x| of the call
        exceeds it are multiplied in floating point with the dequantized weight rows, the rest
        in int8 (Dettmers et al. use 6.0). None: every feature is quantized.
    """

    format: str = "int8"
    granularity: Granularity = "channel"
    axis: int | tuple[int, ...] = 0
    group_size: int | None = None
    block_shape: tuple[int, int] | None = None
    symmetric: bool = True
    clipping: Clipping = "max"
    percentile: float = 99.9
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    scale_dtype: str = "float32"
    double_quant: bool = False
    allow_partial_groups: bool = True
    activation: QuantSpec | None = None
    outlier_threshold: float | None = None

    def __post_init__(self):
        if isinstance(self.format, formats.Format):
            object.__setattr__(self, "format", self.format.name)
        if self.format.startswith("uint"):
            raise ValueError(
                f"`format`={self.format!r}: name the signed format ({self.format[1:]!r}) and set "
                "`symmetric=False` for unsigned codes with zero points"
            )
        fmt = formats.get(self.format)
        if self.granularity not in ("tensor", "channel", "group", "block"):
            raise ValueError(
                f"`granularity` must be 'tensor', 'channel', 'group' or 'block', "
                f"got {self.granularity!r}"
            )
        if isinstance(self.axis, list):
            object.__setattr__(self, "axis", tuple(self.axis))
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"`group_size` must be a positive int for granularity='group', "
                    f"got {self.group_size!r}"
                )
            if isinstance(self.axis, tuple) and len(self.axis) != 1:
                raise NotImplementedError(
                    f"granularity='group' over several contraction axes {self.axis}; "
                    "reshape the array to one contraction axis first"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"`group_size`={self.group_size} only applies to granularity='group', "
                f"not {self.granularity!r}"
            )
        if self.granularity == "block":
            bs = self.block_shape
            if not (isinstance(bs, tuple) and len(bs) == 2 and all(int(b) > 0 for b in bs)):
                raise ValueError(
                    f"`block_shape` must be a pair of positive ints for granularity='block', "
                    f"got {bs!r}"
                )
        elif self.block_shape is not None:
            raise ValueError("`block_shape` only applies to granularity='block'")
        if not self.symmetric and not isinstance(fmt, formats.IntFormat):
            raise NotImplementedError(
                f"asymmetric (zero-point) quantization of format {self.format!r}; "
                "use symmetric=True (only integer formats take zero points)"
            )
        if self.clipping not in ("max", "percentile", "mse"):
            raise ValueError(
                f"`clipping` must be 'max', 'percentile' or 'mse', got {self.clipping!r}"
            )
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"`percentile` must be in (0, 100], got {self.percentile}")
        if self.mse_grid < 1 or not 0.0 <= self.mse_max_shrink < 1.0 or self.mse_norm <= 0:
            raise ValueError(
                "`mse_grid` >= 1, 0 <= `mse_max_shrink` < 1 and `mse_norm` > 0 are required, got "
                f"{self.mse_grid}, {self.mse_max_shrink}, {self.mse_norm}"
            )
        dt = np.dtype(jnp.dtype(self.scale_dtype)).name
        if dt not in _SCALE_DTYPES:
            raise NotImplementedError(
                f"`scale_dtype`={dt!r}; supported scale dtypes are {', '.join(_SCALE_DTYPES)}"
            )
        object.__setattr__(self, "scale_dtype", dt)
        act = self.activation
        if act is not None:
            if not isinstance(act, QuantSpec):
                raise TypeError(f"`activation` must be a QuantSpec or None, got {act!r}")
            if act.activation is not None or act.double_quant or act.clipping != "max":
                raise NotImplementedError(
                    "activation specs take a format, granularity and axis only (clipping='max', "
                    "no double_quant, no nested activation)"
                )
        self._check_outlier_threshold()

    def _check_outlier_threshold(self):
        t = self.outlier_threshold
        if t is None:
            return
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 < t < float("inf"):
            raise ValueError(f"`outlier_threshold` must be a positive finite number, got {t!r}")
        object.__setattr__(self, "outlier_threshold", float(t))
        if self.activation is not None:
            raise ValueError(
                "`outlier_threshold` belongs on the activation spec, not on the weight spec: "
                "use `activation=QuantSpec(format='int8', axis=-1, outlier_threshold=...)`"
            )
        if self.format != "int8" or not self.symmetric:
            raise NotImplementedError(
                f"`outlier_threshold` with format={self.format!r}, symmetric={self.symmetric}: "
                "LLM.int8() decomposition needs symmetric int8 activations"
            )

    @property
    def storage_format(self) -> formats.Format:
        """The format of the stored codes: `int4` when symmetric, `uint4` with zero points."""
        fmt = formats.get(self.format)
        return fmt if self.symmetric else formats.unsigned_of(fmt)

    def _axes(self, rank: int) -> tuple[int, ...]:
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        out = []
        for a in axes:
            if not -rank <= a < rank:
                raise ValueError(f"`axis`={self.axis} is out of range for an array of rank {rank}")
            out.append(a % rank)
        return tuple(out)

    def block_shape_for(self, shape: tuple[int, ...], *, path: str = "array") -> tuple[int, ...]:
        """The block shape this spec gives an array of `shape` (see `jqtz._blocks`).

        Raises:
          ValueError: naming `path`, when the array's rank does not fit the spec, or when a
            dimension is not a multiple of the group size and `allow_partial_groups` is False.
        """
        shape = tuple(int(s) for s in shape)
        rank = len(shape)
        if self.granularity == "tensor":
            return shape if rank else ()
        if rank == 0:
            raise ValueError(
                f"{path}: granularity {self.granularity!r} needs an array, got a scalar"
            )
        if self.granularity == "block":
            if rank < 2:
                raise ValueError(f"{path}: 2-D blocks need rank >= 2, got shape {shape}")
            tile = tuple(min(b, s) for b, s in zip(self.block_shape, shape[-2:], strict=True))
            self._check_partial(shape[-2:], tile, path)
            return (1,) * (rank - 2) + tile
        axes = self._axes(rank)
        block = [1] * rank
        for a in axes:
            block[a] = shape[a]
        if self.granularity == "group":
            (a,) = axes
            block[a] = min(self.group_size, shape[a])
            self._check_partial((shape[a],), (block[a],), path)
        return tuple(block)

    def _check_partial(self, dims, sizes, path):
        if self.allow_partial_groups:
            return
        for d, g in zip(dims, sizes, strict=True):
            if d % g:
                raise ValueError(
                    f"{path}: dimension {d} is not a multiple of the group/block size {g}; "
                    "choose a size that divides it or set allow_partial_groups=True "
                    "(a shorter last group)"
                )

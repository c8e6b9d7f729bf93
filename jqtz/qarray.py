"""`QArray`: a quantized array as a JAX pytree.

Invariants (checked by `QArray.validate`), for logical shape `shape` and block shape `block`:

- `qvalue` holds the codes in `format.storage_dtype`, with trailing shape `shape`, except that
  sub-byte formats are packed along the last axis to `_packing.packed_length(shape[-1], bits)`.
- `scale` has trailing shape `num_blocks(shape, block)`: one scale per block. It is an array of
  float32/bfloat16/float16, or itself a `QArray` (double quantization).
- `zero_point` is present exactly when the format is unsigned; same shape as `scale`, in the
  format's container dtype. Dequantized value = (code - zero_point) * scale.
- Leaves may carry extra *leading* dimensions beyond `shape` (a batch of QArrays, as `vmap`
  or stacked layers produce); every operation applies per batch element.
- `transposed` (a serving layout, `with_transposed_codes`; 2-D arrays of 8-bit or 4-bit integer
  codes): `qvalue` holds the codes of a `[K, N]` array as `[N, K]`, the layout the H100's
  tensor-core products read for a weight (`jqtz.nn.serving_layout`). 4-bit codes are then
  packed along K (two per byte, even k in the low nibble) in two's complement: unsigned codes
  are stored as `code - 8` (their top bit flipped), which the kernels convert to 16 bits
  without a subtraction. `codes()` and `dequantize()` return the logical layout and codes.

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> w = jax.random.normal(jax.random.key(0), (256, 64))
  >>> q = jqtz.quantize(w, jqtz.QuantSpec(format="int4", granularity="group", group_size=128))
  >>> q.qvalue.shape, q.scale.shape, q.nbytes
  ((256, 32), (2, 64), 8704)
  >>> bool(jnp.abs(q.dequantize() - w).max() <= q.scale.max() / 2 + 1e-6)
  True
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jqtz import _blocks, _packing, formats
from jqtz.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class QArray:
    """Quantized values, per-block scales, optional zero points and static metadata.

    Attributes:
      qvalue: stored codes (packed along the last axis for sub-byte formats).
      scale: per-block scales, or a `QArray` of them (double quantization).
      zero_point: per-block integer zero points for unsigned formats, else None.
      format: the `jqtz.formats.Format` of the codes (static).
      shape: logical shape of one array, without leading batch dimensions (static).
      block_shape: elements per block along each dimension of `shape` (static).
      dtype: the dtype `dequantize` returns (static).
      act: how the other operand of a matrix product with this array is quantized (a
        `QuantSpec`; None: weight-only), from `QuantSpec.activation` (static).
      act_scale: static (calibrated) activation scales; None means dynamic ranges.
      perm: int32 `[shape[0]]` or None. When set (GPTQ's act-order), the codes hold the rows
        `perm` of the logical array, in that order, so that groups along axis 0 are contiguous
        in processing order; `dequantize` puts the rows back (`g_idx[perm[j]] = j // group`).
      transposed: the codes of this `[K, N]` array are stored `[N, K]` (static; scales, zero
        points and `shape` keep the logical layout; 4-bit codes packed along K in two's
        complement). See `with_transposed_codes`.
    """

    qvalue: jax.Array
    scale: jax.Array | QArray
    zero_point: jax.Array | None
    format: formats.Format
    shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    dtype: np.dtype
    act: QuantSpec | None = None
    act_scale: jax.Array | None = None
    perm: jax.Array | None = None
    transposed: bool = False

    # -- derived -------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading dimensions beyond the logical shape (from vmap or stacked layers).

        Raises:
          ValueError: the codes have fewer axes than the logical shape: a leaf quantized whole
            was sliced (as `nn.scan` slices stacked layers); quantize such leaves with
            `Rule(..., batch_dims=1)`.
        """
        if self.qvalue.ndim < self.ndim:
            raise ValueError(
                f"a QArray of shape {self.shape} holds codes of shape {self.qvalue.shape}: it "
                "was quantized as one array and then sliced, as nn.scan / nnx.vmap slice "
                "stacked layers. Quantize stacked layers per layer: "
                "jqtz.Rule(pattern, spec, batch_dims=1)"
            )
        return tuple(self.qvalue.shape[: self.qvalue.ndim - self.ndim])

    @property
    def size(self) -> int:
        """Number of logical elements, batch dimensions included."""
        return math.prod(self.batch_shape) * math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes, scales (recursively) and zero points."""
        n = self.qvalue.size * self.qvalue.dtype.itemsize
        n += (
            self.scale.nbytes
            if isinstance(self.scale, QArray)
            else self.scale.size * (self.scale.dtype.itemsize)
        )
        for extra in (self.zero_point, self.perm):
            if extra is not None:
                n += extra.size * extra.dtype.itemsize
        return int(n)

    @property
    def bits_per_value(self) -> float:
        """Stored bits per logical element, overheads included (int4 g128 bf16: 4.125)."""
        return 8.0 * self.nbytes / max(self.size, 1)

    @property
    def granularity(self) -> str:
        """A short name for the block structure: `tensor`, `channel`, `g128`, `128x128`."""
        return _blocks.describe(self.shape, self.block_shape)

    def __repr__(self):
        scale = self.scale
        sdt = "q" + scale.format.name if isinstance(scale, QArray) else scale.dtype.name
        batch = f"batch={self.batch_shape}, " if self.batch_shape else ""
        layout = ", transposed" if self.transposed else ""
        return (
            f"QArray({self.format.name}, shape={self.shape}, {batch}{self.granularity}, "
            f"scale={sdt}, dtype={np.dtype(self.dtype).name}{layout})"
        )

    # -- behaviour -----------------------------------------------------------------------------
    def __jax_array__(self):
        # Any consumer that converts with jnp.asarray (flax's promote_dtype, jnp.take, ...) gets
        # the dequantized array at its point of use: unmodified models run on quantized trees.
        return self.dequantize()

    def astype(self, dtype) -> QArray:
        """The same codes, dequantizing to `dtype`: metadata only, nothing is copied.

        What casting a weight to a module's compute dtype means for a quantized one (flax's
        `promote_dtype`), so that a product with it returns that dtype.

        Example:
          >>> import jax.numpy as jnp, jqtz
          >>> q = jqtz.quantize(jnp.ones((4, 8)), jqtz.QuantSpec(format="int8"))
          >>> q.astype(jnp.bfloat16).dequantize().dtype, q.astype(jnp.bfloat16).qvalue is q.qvalue
          (dtype(bfloat16), True)
        """
        dtype = np.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"QArray.astype: a quantized array dequantizes to floats, got {dtype}")
        return self if dtype == self.dtype else dataclasses.replace(self, dtype=dtype)

    def __getitem__(self, key):
        if key is Ellipsis:  # nnx reads `variable[...]`; keep the QArray for the product seam
            return self
        return self.dequantize()[key]

    def with_transposed_codes(self, transposed: bool = True) -> QArray:
        """This array with its codes stored `[N, K]` (`transposed=True`) or `[K, N]`: the same
        values, one copy of the codes (none when the layout already matches).

        `[N, K]` is what the H100's tensor-core instructions read for the weight of a product:
        8-bit codes as they are, 4-bit codes packed along K in two's complement (unsigned codes
        stored as `code - 8`). `jqtz.nn.serving_layout` applies it to a tree's weights, once;
        every path reads either layout.

        Raises:
          ValueError: for a logical shape that is not 2-D, or packed codes other than 4-bit
            integers (int4, uint4).

        Example:
          >>> import jax.numpy as jnp, jqtz
          >>> q = jqtz.quantize(jnp.ones((64, 32)), jqtz.QuantSpec(format="int8"))
          >>> t = q.with_transposed_codes()
          >>> t.qvalue.shape, t.shape, bool((t.dequantize() == q.dequantize()).all())
          ((32, 64), (64, 32), True)
          >>> q4 = jqtz.quantize(jnp.ones((64, 32)), jqtz.QuantSpec(format="int4", symmetric=False))
          >>> q4.qvalue.shape, q4.with_transposed_codes().qvalue.shape  # packed along K
          ((64, 16), (32, 32))
        """
        if transposed == self.transposed:
            return self
        if transposed:
            self._check_transposable()
        if not self.format.packed:
            qvalue = jnp.swapaxes(self.qvalue, -1, -2)
        elif transposed:  # [N, K] packed along K, two's complement
            qvalue = _packing.pack(
                jnp.swapaxes(self.codes(), -1, -2) ^ self._flip, self.format.bits
            )
        else:
            qvalue = _packing.pack(self.codes(), self.format.bits)
        return dataclasses.replace(self, qvalue=qvalue, transposed=transposed)

    @property
    def _flip(self) -> int:
        """What stored transposed 4-bit codes are XORed with: 8 for unsigned (two's complement
        of `code - 8`), 0 for signed codes."""
        return 0 if getattr(self.format, "signed", True) else 2 ** (self.format.bits - 1)

    def _check_transposable(self) -> None:
        fmt = self.format
        four_bit_int = isinstance(fmt, formats.IntFormat) and fmt.bits == 4
        if self.ndim != 2 or (fmt.packed and not four_bit_int):
            raise ValueError(
                f"QArray.transposed: only 2-D arrays of 8-bit or 4-bit integer codes can store "
                f"their codes transposed; this one is {fmt.name} with shape {self.shape}"
            )

    def codes(self) -> jax.Array:
        """Unpacked codes in the format's container dtype, logical trailing shape."""
        fmt = self.format
        signed = isinstance(fmt, formats.IntFormat) and fmt.signed
        if self.transposed and fmt.packed:  # [N, K] packed along K, two's complement
            values = _packing.unpack(self.qvalue, fmt.bits, self.shape[0], signed=signed)
            return jnp.swapaxes(values if signed else values ^ jnp.uint8(self._flip), -1, -2)
        if self.transposed:
            return jnp.swapaxes(self.qvalue, -1, -2)
        if fmt.packed:
            return _packing.unpack(self.qvalue, fmt.bits, self.shape[-1], signed=signed)
        return self.qvalue

    def _transposed_rows(self, rows: jax.Array) -> jax.Array:
        """Codes of the logical rows `rows` (1-D) of a transposed 2-D array, `[len(rows), N]`
        in the untransposed storage (packed along N for 4-bit codes), read from the stored
        bytes of those rows alone: a gather of rows without unpacking the rest."""
        fmt = self.format
        if not fmt.packed:
            return self.qvalue[:, rows].T
        signed = fmt.signed
        pairs = _packing.unpack(self.qvalue[:, rows // 2, None], fmt.bits, 2, signed=signed)
        codes = jnp.take_along_axis(pairs, (rows % 2)[None, :, None], axis=2)[..., 0]  # [N, F]
        codes = codes if signed else codes ^ jnp.uint8(self._flip)
        return _packing.pack(codes.T, fmt.bits)

    def scale_values(self) -> jax.Array:
        """Per-block scales as float32 (dequantizing nested scales)."""
        s = self.scale
        return (
            s.dequantize().astype(jnp.float32) if isinstance(s, QArray) else s.astype(jnp.float32)
        )

    def dequantize(self, dtype=None) -> jax.Array:
        """The real values: (code - zero_point) * scale, in `dtype` (default `self.dtype`)."""
        self.batch_shape  # noqa: B018 (raises, naming the fix, on a sliced QArray)
        values = self.format.decode(self.codes())
        rank = self.ndim
        vb = _blocks.to_blocks(values, self.block_shape, fill=0)
        if self.zero_point is not None:
            vb = vb - _blocks.expand(self.zero_point.astype(jnp.float32), rank)
        xb = vb * _blocks.expand(self.scale_values(), rank)
        x = _blocks.from_blocks(xb, self.shape)
        if self.perm is not None:  # stored row j is logical row perm[j]
            axis = x.ndim - rank
            x = jnp.take(x, jnp.argsort(self.perm), axis=axis)
        return x.astype(dtype or self.dtype)

    def validate(self) -> QArray:
        """Check the invariants in the module docstring; returns self.

        Raises:
          ValueError: naming the field, the expected and the actual value.
        """
        fmt = self.format
        if len(self.block_shape) != self.ndim or any(b < 1 for b in self.block_shape):
            raise ValueError(
                f"QArray.block_shape {self.block_shape} must have one positive entry per "
                f"dimension of shape {self.shape}"
            )
        if self.qvalue.dtype != fmt.storage_dtype:
            raise ValueError(
                f"QArray.qvalue dtype must be {fmt.storage_dtype} for format {fmt.name!r}, "
                f"got {self.qvalue.dtype}"
            )
        want = self.shape
        if self.transposed:
            self._check_transposable()
            want = want[::-1]
        if fmt.packed and self.ndim:
            want = (*want[:-1], _packing.packed_length(want[-1], fmt.bits))
        if tuple(self.qvalue.shape[self.qvalue.ndim - self.ndim :]) != want:
            raise ValueError(
                f"QArray.qvalue trailing shape must be {want} for logical shape {self.shape} "
                f"({fmt.name}), got {self.qvalue.shape}"
            )
        n = _blocks.num_blocks(self.shape, self.block_shape)
        sshape = (
            self.scale.batch_shape + self.scale.shape
            if isinstance(self.scale, QArray)
            else self.scale.shape
        )
        if tuple(sshape[len(sshape) - self.ndim :]) != n or len(sshape) < self.ndim:
            raise ValueError(
                f"QArray.scale trailing shape must be {n} (blocks per dimension), got {sshape}"
            )
        if fmt.has_zero_point != (self.zero_point is not None):
            raise ValueError(
                f"format {fmt.name!r} {'needs' if fmt.has_zero_point else 'takes no'} zero_point"
            )
        if self.zero_point is not None and self.zero_point.shape != tuple(sshape):
            raise ValueError(
                f"QArray.zero_point shape must equal the scale shape {sshape}, "
                f"got {self.zero_point.shape}"
            )
        if self.perm is not None:
            if self.ndim < 1 or tuple(self.perm.shape[-1:]) != self.shape[:1]:
                raise ValueError(
                    f"QArray.perm must have shape ({self.shape[0] if self.shape else 0},), "
                    f"got {self.perm.shape}"
                )
            if not jnp.issubdtype(self.perm.dtype, jnp.integer):
                raise ValueError(f"QArray.perm must be integer, got {self.perm.dtype}")
        if isinstance(self.scale, QArray):
            self.scale.validate()
        return self


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["qvalue", "scale", "zero_point", "act_scale", "perm"],
    meta_fields=["format", "shape", "block_shape", "dtype", "act", "transposed"],
)


def is_qarray(x) -> bool:
    """Whether `x` is a `QArray` (use as `is_leaf` in tree maps)."""
    return isinstance(x, QArray)

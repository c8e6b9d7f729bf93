"""FP8 recipes: weight and activation specs for the three common FP8 layouts, and calibration.

| mode                  | weights                     | activations                              |
|-----------------------|-----------------------------|------------------------------------------|
| `"static-per-tensor"` | one scale per tensor        | one static scale per tensor (calibrated) |
| `"dynamic-per-token"` | one scale per output channel| one scale per token, chosen at run time  |
| `"block128"`          | 128x128 blocks              | 1x128 groups per token (DeepSeek-V3)     |

Scales are amax / 448 for e4m3 (amax / 57344 for e5m2); values are clipped to the format's
range before the cast, since a plain cast of an out-of-range value gives NaN. Per-tensor and
per-token/per-channel products run on the FP8 codes (FP8 x FP8 -> float32, both scales applied
to the result); block-wise ones are simulated in float32 (`jqtz.nn.dot_general`).

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> from flax import linen as nn
  >>> model = nn.Dense(8)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 16)))
  >>> q = jqtz.quantize_params(params, fp8_spec("static-per-tensor"))
  >>> batches = [jax.random.normal(jax.random.key(i), (4, 16)) for i in range(2)]
  >>> q = calibrate_fp8(model.apply, q, batches)
  >>> amax = max(float(jnp.abs(b).max()) for b in batches)
  >>> bool(jnp.isclose(q["params"]["kernel"].act_scale.squeeze(), amax / 448))
  True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import jax

from jqtz.nn.calibrate import calibrate_activations
from jqtz.qarray import QArray, is_qarray
from jqtz.rules import path_str
from jqtz.spec import QuantSpec

Mode = Literal["static-per-tensor", "dynamic-per-token", "block128"]
MODES: tuple[str, ...] = ("static-per-tensor", "dynamic-per-token", "block128")
_FORMATS = ("fp8_e4m3", "fp8_e5m2")


def fp8_spec(
    mode: Mode = "dynamic-per-token", *, format: str = "fp8_e4m3", block: int = 128
) -> QuantSpec:
    """The weight `QuantSpec` (with its `activation` spec) of an FP8 mode.

    Args:
      mode: `"static-per-tensor"`, `"dynamic-per-token"` or `"block128"` (see the module
        docstring). Static activation scales are set afterwards by `calibrate_fp8`.
      format: `"fp8_e4m3"` (max 448, the usual choice for both operands) or `"fp8_e5m2"`.
      block: the weight tile and activation group size of `"block128"`.

    Returns:
      A `QuantSpec` for `[in, out]` kernels, float32 scales.

    Raises:
      ValueError: an unknown mode or format, or a block size below 1.

    Example:
      >>> spec = fp8_spec("block128")
      >>> spec.block_shape, spec.activation.granularity, spec.activation.group_size
      ((128, 128), 'group', 128)
    """
    if format not in _FORMATS:
        raise ValueError(f"`format` must be one of {', '.join(_FORMATS)}, got {format!r}")
    if mode == "static-per-tensor":
        act = QuantSpec(format=format, granularity="tensor", axis=-1)
        return QuantSpec(format=format, granularity="tensor", activation=act)
    if mode == "dynamic-per-token":
        act = QuantSpec(format=format, granularity="channel", axis=-1)
        return QuantSpec(format=format, granularity="channel", axis=0, activation=act)
    if mode == "block128":
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"`block` must be a positive int, got {block!r}")
        act = QuantSpec(format=format, granularity="group", group_size=block, axis=-1)
        return QuantSpec(
            format=format, granularity="block", block_shape=(block, block), activation=act
        )
    raise ValueError(f"`mode` must be one of {', '.join(map(repr, MODES))}, got {mode!r}")


def calibrate_fp8(apply_fn: Callable, qparams, batches: Iterable, *, progress=None):
    """Static per-tensor activation scales (amax / 448 over `batches`) for FP8 weights.

    A thin wrapper of `jqtz.nn.calibrate_activations` that first checks the tree: every weight
    with an activation spec must have per-tensor activations (dynamic ranges need no
    calibration, and a calibrated per-token scale would be wrong), and at least one is FP8.

    Args:
      apply_fn: `apply_fn(qparams, batch)`, e.g. `model.apply` of a linen model (run eagerly).
      qparams: a tree quantized with `fp8_spec("static-per-tensor")` (other layers may be kept
        in full precision, or quantized weight-only).
      batches: calibration inputs for `apply_fn`.
      progress: optional callback `(i)` after each batch.

    Returns:
      `qparams` with `act_scale` set on those weights.

    Raises:
      ValueError: a weight with dynamic (not per-tensor) activations, naming its path; no FP8
        activation spec in the tree; or `calibrate_activations`' errors (no batches, layers that
        saw no input).
    """
    n_fp8 = 0
    for kp, leaf in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_qarray)[0]:
        if not isinstance(leaf, QArray) or leaf.act is None:
            continue
        if leaf.act.granularity != "tensor":
            raise ValueError(
                f"{path_str(kp)}: activations are {leaf.act.granularity!r}-wise, set at run "
                "time; only per-tensor activation ranges are calibrated (quantize with "
                "fp8_spec('static-per-tensor'), or skip calibration for dynamic modes)"
            )
        n_fp8 += leaf.act.format.startswith("fp8")
    if not n_fp8:
        raise ValueError(
            "`qparams` holds no weight with FP8 activations: quantize it with "
            "fp8_spec('static-per-tensor') first"
        )
    return calibrate_activations(apply_fn, qparams, batches, progress=progress)

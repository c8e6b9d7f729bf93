"""Choosing quantization ranges: per-block scales and zero points (round-to-nearest).

Everything here is a pure array function, jittable, working on blocked views (`jqtz._blocks`).

- `"max"`: symmetric scale = absmax / max_abs; asymmetric scale = (max - min) / (2^b - 1) with
  the range widened to contain 0 and zero = round(-min / scale) (GPTQ's quantizer).
- `"percentile"`: the same from the `p`-th percentile of |x| (or the `100-p`/`p` percentiles).
- `"mse"`: GPTQ's grid search: shrink the range by `1 - i/grid` for `i < max_shrink * grid` and
  keep, per block, the candidate with the least sum |x - q(x)|^norm.

Guards: a block whose values are all equal (all zero included) gets scale |c| (1 for zero), so it
round-trips exactly; scales are rounded *up* into the scale dtype, so no value leaves the code
range because of the cast.

Static activation ranges: accumulate `RangeStats` over calibration batches with `observe` and
`RangeStats.merge`, then turn them into scales with `qparams_from_stats`.

Example:
  >>> import jax.numpy as jnp, jqtz
  >>> spec = jqtz.QuantSpec(format="int8", granularity="tensor", axis=-1)
  >>> stats = jqtz.ranges.observe(jnp.array([[-1.0, 2.0]]), spec)
  >>> stats = stats.merge(jqtz.ranges.observe(jnp.array([[4.0, 0.5]]), spec))
  >>> scale, zero = jqtz.ranges.qparams_from_stats(stats, spec)
  >>> round(float(scale.squeeze()) * 127, 5)  # absmax over both batches / 127
  4.0
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jqtz import _blocks, formats
from jqtz.spec import QuantSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RangeStats:
    """Observed per-block minimum and maximum (float32, shape = blocks per dimension)."""

    lo: jax.Array
    hi: jax.Array

    def merge(self, other: RangeStats) -> RangeStats:
        """The running range over both observations."""
        return RangeStats(jnp.minimum(self.lo, other.lo), jnp.maximum(self.hi, other.hi))


def observe(x: jax.Array, spec: QuantSpec) -> RangeStats:
    """Per-block min/max of `x` for the blocks `spec` gives its shape."""
    block = spec.block_shape_for(x.shape)
    xb = _blocks.to_blocks(x.astype(jnp.float32), block)
    axes = _blocks.block_axes(xb.ndim, len(block))
    return RangeStats(jnp.nanmin(xb, axis=axes), jnp.nanmax(xb, axis=axes))


def _round_up(s: jax.Array, dtype) -> jax.Array:
    """Cast positive float32 scales to `dtype`, never rounding down (and never to zero)."""
    c = s.astype(dtype)
    up = jnp.nextafter(c, jnp.asarray(jnp.inf, dtype))
    c = jnp.where(c.astype(jnp.float32) < s, up, c)
    return jnp.where(c == 0, jnp.asarray(jnp.finfo(dtype).tiny, dtype), c)


def _scale_zero(lo, hi, fmt: formats.Format, scale_dtype):
    """(scale in scale_dtype, zero point in the container dtype or None) from a range."""
    if fmt.has_zero_point:
        lo = jnp.minimum(lo, 0.0)
        hi = jnp.maximum(hi, 0.0)
        s = (hi - lo) / fmt.max_abs
    else:
        s = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / fmt.max_abs
    s = _round_up(jnp.where(s > 0, s, 1.0), scale_dtype)
    if not fmt.has_zero_point:
        return s, None
    z = jnp.clip(jnp.round(-lo / s.astype(jnp.float32)), 0, fmt.max_abs)
    return s, z.astype(fmt.container_dtype)


def qparams_from_stats(stats: RangeStats, spec: QuantSpec):
    """Scales (and zero points) of an observed range, for `quantize(..., scale=, zero_point=)`."""
    return _scale_zero(stats.lo, stats.hi, spec.storage_format, spec.scale_dtype)


def _fake_quant_blocks(xb, s, z, fmt, rank):
    """Quantize-dequantize a blocked view with per-block scale/zero (both float32)."""
    se = _blocks.expand(s, rank)
    ze = 0.0 if z is None else _blocks.expand(z, rank)
    return (fmt.decode(fmt.encode(xb / se + ze)) - ze) * se


def choose_qparams(x: jax.Array, spec: QuantSpec, block: tuple[int, ...]):
    """Per-block (scale, zero_point) of float32 `x` for `spec` and its `block` shape.

    Returns:
      scale in `spec.scale_dtype` and zero points in the container dtype (or None), both of
      shape `num_blocks(x.shape, block)`.
    """
    fmt = spec.storage_format
    rank = len(block)
    xb = _blocks.to_blocks(x, block)  # NaN-padded where blocks are ragged
    axes = _blocks.block_axes(xb.ndim, rank)
    raw_lo, raw_hi = jnp.nanmin(xb, axis=axes), jnp.nanmax(xb, axis=axes)

    if spec.clipping == "percentile":
        if fmt.has_zero_point:
            lo = jnp.nanpercentile(xb, 100.0 - spec.percentile, axis=axes)
            hi = jnp.nanpercentile(xb, spec.percentile, axis=axes)
        else:
            hi = jnp.nanpercentile(jnp.abs(xb), spec.percentile, axis=axes)
            lo = -hi
    else:
        lo, hi = raw_lo, raw_hi
    scale, zero = _scale_zero(lo, hi, fmt, spec.scale_dtype)

    if spec.clipping == "mse":
        scale, zero = _mse_search(xb, lo, hi, scale, zero, spec, fmt, rank, axes)

    # A constant block (all zero included) round-trips exactly with scale |c| and code ±1.
    const = raw_lo == raw_hi
    c = jnp.abs(raw_lo)
    scale = jnp.where(const, _round_up(jnp.where(c > 0, c, 1.0), scale.dtype), scale)
    if zero is not None:
        zero = jnp.where(const, (raw_lo < 0).astype(zero.dtype), zero)
    return scale, zero


def _mse_search(xb, lo, hi, scale, zero, spec, fmt, rank, axes):
    x0 = jnp.nan_to_num(xb)  # ragged padding contributes no error (0 is exactly representable)

    def err_of(s, z):
        zf = None if z is None else z.astype(jnp.float32)
        q = _fake_quant_blocks(x0, s.astype(jnp.float32), zf, fmt, rank)
        return jnp.sum(jnp.abs(q - x0) ** spec.mse_norm, axis=axes)

    def body(i, carry):
        best_err, best_s, best_z = carry
        p = 1.0 - i / spec.mse_grid
        s, z = _scale_zero(lo * p, hi * p, fmt, spec.scale_dtype)
        err = err_of(s, z)
        better = err < best_err
        best_s = jnp.where(better, s, best_s)
        if best_z is not None:
            best_z = jnp.where(better, z, best_z)
        return jnp.where(better, err, best_err), best_s, best_z

    steps = max(int(spec.mse_max_shrink * spec.mse_grid), 1)
    init = (err_of(scale, zero), scale, zero)
    _, scale, zero = jax.lax.fori_loop(1, steps, body, init)
    return scale, zero

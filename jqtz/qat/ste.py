"""Fake quantization of one array: the PTQ forward pass, surrogate gradients backward.

`fake_quant(x, spec)` returns `quantize(x, spec).dequantize()` bit for bit (same range choice,
same arithmetic, no packing), with gradients from a straight-through estimator (STE):

    forward   q(x) = (Q(u) - z) * s,   u = x / s + z,   Q = decode . encode (round and clip)
    backward  dq/dx = 1                       (STE)
              dq/dx = 1[lo <= u <= hi]        (clipped STE: zero outside the code range)

`[lo, hi]` is the code range of the storage format (int4: [-8, 7]; uint4: [0, 15]; e4m3:
[-448, 448]; nf4: [-1, 1]), so "outside" means the value was clipped, not merely rounded.

Ranges chosen from `x` (as PTQ chooses them) are constants for the gradient. Given ranges
(`scale=`, `zero_point=`) are *learned step sizes* (LSQ, Esser et al. 2020) and offsets
(LSQ+, Bhalgat et al. 2020); their gradients, per element, before the sum over each block:

    dq/ds = Q(u) - u        inside,     Q(u) - z  outside
    dq/dz = 0               inside,     -s        outside
    both scaled by g = 1 / sqrt(n * qmax),  n = values per block, qmax = the format's `max_abs`

The zero point is learned as a float in code units; the forward pass uses
`clip(round(z), 0, qmax)` (the integer that storage keeps) and the gradient goes straight
through the rounding. Learned scales are used as `max(s, tiny)` rounded to `spec.scale_dtype`,
again straight through, so the forward pass uses exactly the scale that `convert` stores.

All functions are pure and work under `jit`, `grad`, `vmap` and sharding.

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> from jqtz.qat import fake_quant
  >>> spec = jqtz.QuantSpec(format="int4")
  >>> w = jax.random.normal(jax.random.key(0), (16, 8))
  >>> bool(jnp.array_equal(fake_quant(w, spec), jqtz.quantize(w, spec).dequantize()))
  True
  >>> g = jax.grad(lambda w: fake_quant(w, spec).sum())(w)  # STE: identity inside the range
  >>> bool(jnp.all(g == 1.0))
  True
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jqtz import _blocks, formats
from jqtz.quantize import SCALE_SPEC, quantize_unchecked
from jqtz.ranges import choose_qparams
from jqtz.spec import QuantSpec

__all__ = ["effective_scale", "effective_zero_point", "fake_quant", "lsq_grad_scale"]


def lsq_grad_scale(spec: QuantSpec, shape: tuple[int, ...]) -> float:
    """LSQ's gradient scale `1 / sqrt(n * qmax)` for an array of `shape` quantized by `spec`.

    `n` is the number of values that share one step size (the block size: the whole layer for
    `"tensor"`, one output channel's inputs for `"channel"`), `qmax` the format's `max_abs`
    (7 for int4, 15 for uint4, 448 for e4m3, 1 for nf4).

    Example:
      >>> import jqtz
      >>> round(lsq_grad_scale(jqtz.QuantSpec(format="int4"), (64, 32)), 6)  # 1/sqrt(64*7)
      0.047246
    """
    n = math.prod(spec.block_shape_for(tuple(shape)))
    return 1.0 / math.sqrt(n * spec.storage_format.max_abs)


def effective_scale(scale: jax.Array, scale_dtype: str) -> jax.Array:
    """The float32 value of a learned scale as used and stored: `max(s, tiny)` in `scale_dtype`.

    Not differentiable by itself (the rounding); `fake_quant` passes gradients straight through.
    """
    dt = jnp.dtype(scale_dtype)
    s = jnp.maximum(jnp.asarray(scale, jnp.float32), float(jnp.finfo(dt).tiny))
    return s.astype(dt).astype(jnp.float32)


def effective_zero_point(zero_point: jax.Array, fmt: formats.Format) -> jax.Array:
    """The integer (as float32) that a learned float zero point stands for: clip(round(z))."""
    return jnp.clip(jnp.round(jnp.asarray(zero_point, jnp.float32)), 0, fmt.max_abs)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one fake-quantization call (hashable: a `custom_vjp` static)."""

    fmt: formats.Format
    block: tuple[int, ...]
    clipped: bool
    grad_scale: float | None  # None: the ranges are constants (PTQ ranges), no LSQ gradients
    scale_dtype: str | None  # learned scales: round into this dtype in the forward pass

    @property
    def code_range(self) -> tuple[float, float]:
        levels = self.fmt.levels()
        return float(levels.min()), float(levels.max())


def _parts(cfg: _Config, x, s, s_dec, z):
    """Blocked u = x/s + z, Q(u), and the per-block scales/zero points actually used."""
    if cfg.scale_dtype is not None:
        s = s_dec = effective_scale(s, cfg.scale_dtype)
        if z is not None:
            z = effective_zero_point(z, cfg.fmt)
    rank = len(cfg.block)
    xb = _blocks.to_blocks(x.astype(jnp.float32), cfg.block, fill=0)
    # The same operations, in the same order, as `jqtz.quantize.quantize_unchecked` and
    # `QArray.dequantize`: this is what makes the forward pass bitwise equal to PTQ's.
    u = xb / _blocks.expand(s, rank)
    ze = None if z is None else _blocks.expand(z, rank)
    if ze is not None:
        u = u + ze
    q = cfg.fmt.decode(cfg.fmt.encode(u))
    return u, q, ze, s_dec


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fake_quant(cfg: _Config, x, s, s_dec, z):
    _, q, ze, s_dec = _parts(cfg, x, s, s_dec, z)
    v = q if ze is None else q - ze
    out = v * _blocks.expand(s_dec, len(cfg.block))
    return _blocks.from_blocks(out, x.shape[x.ndim - len(cfg.block) :]).astype(x.dtype)


def _fake_quant_fwd(cfg, x, s, s_dec, z):
    return _fake_quant(cfg, x, s, s_dec, z), (x, s, s_dec, z)


def _fake_quant_bwd(cfg, res, g):
    x, s, s_dec, z = res
    rank = len(cfg.block)
    shape = x.shape[x.ndim - rank :]
    u, q, ze, s_used = _parts(cfg, x, s, s_dec, z)
    gb = _blocks.to_blocks(g.astype(jnp.float32), cfg.block, fill=0)
    lo, hi = cfg.code_range
    inside = (u >= lo) & (u <= hi)
    dx = jnp.where(inside, gb, 0.0) if cfg.clipped else gb
    dx = _blocks.from_blocks(dx, shape).astype(x.dtype)
    zero_s = jnp.zeros_like(s_dec)
    if cfg.grad_scale is None:
        return dx, jnp.zeros_like(s), zero_s, None if z is None else jnp.zeros_like(z)
    axes = _blocks.block_axes(gb.ndim, rank)
    zq = 0.0 if ze is None else ze
    ds = jnp.sum(gb * jnp.where(inside, q - u, q - zq), axis=axes) * cfg.grad_scale
    dz = None
    if z is not None:
        se = _blocks.expand(s_used, rank)
        dz = jnp.sum(gb * jnp.where(inside, 0.0, -se), axis=axes) * cfg.grad_scale
        dz = dz.astype(z.dtype)
    return dx, ds.astype(s.dtype), zero_s, dz


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)
# Always compiled, even when called eagerly: XLA turns `x / broadcast(s)` into
# `x * broadcast(1 / s)`, as it does inside the (jitted) `jqtz.quantize`, and the codes must
# come out of the same arithmetic.
_fake_quant_jit = jax.jit(_fake_quant, static_argnums=0)


def ptq_qparams(x: jax.Array, spec: QuantSpec, block: tuple[int, ...]):
    """The float32 (encode scale, decode scale, zero point or None) that `quantize` would use.

    They differ only with `double_quant`, where values are encoded against the 8-bit scales
    (guarded away from 0) and decoded with them as stored.
    """
    scale, zero = choose_qparams(x.astype(jnp.float32), spec, block)
    s = s_dec = scale.astype(jnp.float32)
    if spec.double_quant:
        sblock = SCALE_SPEC.block_shape_for(s.shape)
        stored = quantize_unchecked(s, SCALE_SPEC, sblock, None, None, np.dtype(np.float32))
        s_dec = stored.dequantize()
        s = jnp.where(s_dec > 0, s_dec, 1.0)
    return s, s_dec, None if zero is None else zero.astype(jnp.float32)


def fake_quant(
    x: jax.Array,
    spec: QuantSpec,
    *,
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
    clipped_ste: bool = False,
    grad_scale: float | None = None,
) -> jax.Array:
    """Quantize-dequantize `x` as `spec` says, with straight-through gradients.

    Args:
      x: a floating-point array.
      spec: the `QuantSpec` (format, granularity, range choice, scale dtype).
      scale: learned or static step sizes, broadcastable to the blocks `spec` gives `x`;
        None chooses them from `x` as `jqtz.quantize` does (constants for the gradient).
      zero_point: learned float zero points (code units) for asymmetric specs, with `scale`.
      clipped_ste: zero gradient for values outside the code range (clipped values).
      grad_scale: the factor on the gradients of `scale` and `zero_point`; default LSQ's
        `1 / sqrt(n * qmax)` (`lsq_grad_scale`).

    Returns:
      An array of `x`'s shape and dtype. Without `scale` it equals
      `jqtz.quantize(x, spec).dequantize()` bit for bit; with `scale` it equals
      `jqtz.quantize(x, spec, scale=s, zero_point=z).dequantize()` for the stored
      `s = effective_scale(scale)` and `z = effective_zero_point(zero_point)`.

    Raises:
      TypeError: `x` is not floating point.
      ValueError: `zero_point` without `scale`, a missing or superfluous `zero_point`, or a
        `scale` that does not broadcast to the blocks.
      NotImplementedError: learned scales with `double_quant`.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`x` must be floating point to fake-quantize, got dtype {x.dtype}")
    block = spec.block_shape_for(x.shape)
    fmt = spec.storage_format
    cfg = dict(fmt=fmt, block=block, clipped=bool(clipped_ste))
    if scale is None:
        if zero_point is not None:
            raise ValueError("`zero_point` given without `scale`")
        s, s_dec, z = ptq_qparams(jax.lax.stop_gradient(x), spec, block)
        return _fake_quant_jit(_Config(**cfg, grad_scale=None, scale_dtype=None), x, s, s_dec, z)
    if spec.double_quant:
        raise NotImplementedError(
            "learned scales with double_quant=True; learn full-precision scales and quantize "
            "them after training, or set double_quant=False"
        )
    if fmt.has_zero_point != (zero_point is not None):
        raise ValueError(
            f"`zero_point` is {'required' if fmt.has_zero_point else 'not accepted'} with a "
            f"{'asymmetric' if fmt.has_zero_point else 'symmetric'} spec ({fmt.name})"
        )
    n = _blocks.num_blocks(x.shape, block)
    try:
        s = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), n)
        z = (
            None
            if zero_point is None
            else jnp.broadcast_to(jnp.asarray(zero_point, jnp.float32), n)
        )
    except ValueError:
        raise ValueError(
            f"`scale` of shape {jnp.shape(scale)} does not broadcast to the {n} blocks that "
            f"{spec.granularity!r} gives an array of shape {x.shape}"
        ) from None
    if grad_scale is None:
        grad_scale = lsq_grad_scale(spec, x.shape)
    c = _Config(**cfg, grad_scale=float(grad_scale), scale_dtype=spec.scale_dtype)
    return _fake_quant_jit(c, x, s, s, z)

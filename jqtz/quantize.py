"""`quantize`: one array to a `QArray` with round-to-nearest, for weights and activations.

Weights: `quantize(w, spec)` chooses per-block ranges with `spec.clipping`. Activations: the same
call inside the model gives dynamic ranges (per token with `granularity="channel", axis=-1`);
static ranges pass `scale=` (and `zero_point=`) from `jqtz.ranges.qparams_from_stats`.

Example:
  >>> import jax.numpy as jnp, jqtz
  >>> x = jnp.array([[0.5, -2.0, 1.0], [3.0, 0.0, -1.5]])
  >>> q = jqtz.quantize(x, jqtz.QuantSpec(format="int8", granularity="channel", axis=-1))
  >>> q.scale.shape  # one scale per row ("per token")
  (2, 1)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jqtz import _blocks, _packing
from jqtz.qarray import QArray
from jqtz.ranges import choose_qparams
from jqtz.spec import QuantSpec

#: QLoRA-style double quantization: 8-bit codes for the scales, in groups of 256.
SCALE_SPEC = QuantSpec(format="int8", granularity="group", axis=-1, group_size=256, symmetric=False)


def quantize(
    x: jax.Array,
    spec: QuantSpec,
    *,
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
    dtype=None,
    batch_dims: int = 0,
) -> QArray:
    """Quantize `x` with round-to-nearest as `spec` says.

    Args:
      x: a floating-point array.
      spec: the `QuantSpec`.
      scale: optional static scales (shape broadcastable to the blocks); chosen from `x` if None.
      zero_point: static zero points, required with `scale` for asymmetric specs.
      dtype: the dtype `dequantize` returns; defaults to `x.dtype`.
      batch_dims: leading axes of stacked arrays (layers stacked by `nn.scan` or `nnx.vmap`):
        each slice is quantized as an array of its own (`spec` applies to `x.shape[batch_dims:]`),
        and the QArray's `batch_shape` is `x.shape[:batch_dims]`; indexing it (as `scan` does)
        gives each slice's QArray.

    Returns:
      A `QArray`. Non-finite inputs are rejected when `x` is concrete (outside `jit`).

    Raises:
      TypeError: `x` is not floating point.
      ValueError: `x` holds NaN or Inf, or the shape does not fit the spec.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`x` must be floating point to quantize, got dtype {x.dtype}")
    if not isinstance(x, jax.core.Tracer):
        bad = int(jnp.size(x) - jnp.count_nonzero(jnp.isfinite(x)))
        if bad:
            raise ValueError(f"`x` has {bad} non-finite values (NaN or Inf); cannot quantize")
    if batch_dims:
        if (
            not isinstance(batch_dims, int)
            or isinstance(batch_dims, bool)
            or not 0 < batch_dims < x.ndim
        ):
            raise ValueError(
                f"`batch_dims`={batch_dims!r} must be an int from 0 to x.ndim - 1 = {x.ndim - 1}"
            )
        if scale is not None or zero_point is not None:
            raise NotImplementedError("static `scale`/`zero_point` with `batch_dims`")
        one = functools.partial(quantize, spec=spec, dtype=dtype, batch_dims=batch_dims - 1)
        return jax.vmap(one)(x)
    block = spec.block_shape_for(x.shape)
    if scale is None:
        if zero_point is not None:
            raise ValueError("`zero_point` given without `scale`")
    else:
        n = _blocks.num_blocks(x.shape, block)
        scale = jnp.broadcast_to(jnp.asarray(scale), n).astype(spec.scale_dtype)
        if spec.storage_format.has_zero_point:
            if zero_point is None:
                raise ValueError("asymmetric spec with a static `scale` needs `zero_point` too")
            zero_point = jnp.broadcast_to(jnp.asarray(zero_point), n)
    return quantize_unchecked(x, spec, block, scale, zero_point, np.dtype(dtype or x.dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 5))
def quantize_unchecked(x, spec, block, scale, zero_point, dtype):
    """`quantize` without the argument checks, for jqtz's own algorithms (jit-compiled).

    The internal entry point that GPTQ, activation quantization and fake quantization share, so
    their codes equal `quantize`'s bit for bit. Nothing is validated: `block` must be
    `spec.block_shape_for(x.shape)` or a block shape of the same rank, `scale`/`zero_point`
    either None (chosen from `x`) or already of the blocks' shape, `dtype` a numpy dtype.
    """
    fmt = spec.storage_format
    xf = x.astype(jnp.float32)
    if scale is None:
        scale, zero_point = choose_qparams(xf, spec, block)
    if zero_point is not None:
        zero_point = zero_point.astype(fmt.container_dtype)

    stored_scale = scale
    s = scale.astype(jnp.float32)
    if spec.double_quant:
        stored_scale = quantize_unchecked(
            s, SCALE_SPEC, SCALE_SPEC.block_shape_for(s.shape), None, None, np.dtype(np.float32)
        )
        # Encode against the scales that will actually be stored.
        s = stored_scale.dequantize(jnp.float32)
        s = jnp.where(s > 0, s, 1.0)

    rank = x.ndim
    xb = _blocks.to_blocks(xf, block, fill=0)
    scaled = xb / _blocks.expand(s, rank)
    if zero_point is not None:
        scaled = scaled + _blocks.expand(zero_point.astype(jnp.float32), rank)
    codes = _blocks.from_blocks(fmt.encode(scaled), x.shape)
    qvalue = _packing.pack(codes, fmt.bits) if fmt.packed else codes
    return QArray(
        qvalue, stored_scale, zero_point, fmt, tuple(x.shape), block, dtype, act=spec.activation
    )

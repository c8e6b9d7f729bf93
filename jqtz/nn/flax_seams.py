"""Running unmodified Flax models on quantized trees.

Three layers, from always-on to opt-in:

1. **Any model, no setup.** A `QArray` converts to its dequantized array wherever JAX or Flax
   calls `jnp.asarray` on it (`__jax_array__`): `nnx.merge(graphdef, qstate)(x)` and
   `model.apply({"params": qparams}, x)` just work, weight by weight at the point of use, under
   `jit`, `vmap`, `grad` and `shard_map` (the weight-only path). Exception: linen checks a stored
   parameter's shape against its initializer, and the packed codes of sub-byte formats fail that
   check, so linen models with int4/int3/int2/nf4 leaves run under `quantized_ops()`.
2. **linen: `with jqtz.nn.quantized_ops():`** a scoped `flax.linen.intercept_methods` that routes
   `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum` and `nn.Embed` whose parameters are `QArray`s
   through `jqtz.nn.dot_general` / `take_rows` (Einsum dequantizes its kernel at use):
   quantized activations (W8A8 int8, FP8) and, on GPUs, the Pallas kernels. It intercepts only
   linen module methods inside the `with` block; JAX itself is never patched, so nothing leaks
   into other code (Pallas kernels included).
3. **NNX: `jqtz.nn.use_quantized_ops(model)`** sets the `dot_general` / `promote_dtype` seam that
   `nnx.Linear` exposes, on the modules whose kernels are `QArray`s (no weights are copied or
   cloned). Models that build their layers with `dot_general=jqtz.nn.dot_general,
   promote_dtype=jqtz.nn.promote_dtype` get the same without this call.

In 2 and 3 a product returns the module's compute dtype, as flax's does: the `QArray` is
re-typed to it (`QArray.astype`, metadata only) where flax would cast a float kernel.

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> from flax import linen as nn
  >>> model = nn.Dense(8)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 16)))
  >>> act = jqtz.QuantSpec(format="int8", granularity="channel", axis=-1)
  >>> qparams = jqtz.quantize_params(params, jqtz.QuantSpec(format="int8", activation=act))
  >>> with jqtz.nn.quantized_ops():
  ...     y = jax.jit(model.apply)(qparams, jnp.ones((2, 16)))
  >>> y.shape
  (2, 8)
"""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jqtz.nn.ops import dot_general, fake_quantized_input, promote_dtype, take_rows
from jqtz.qarray import QArray


def _compute_dtype(module, *xs):
    if module.dtype is not None:
        return module.dtype
    return jnp.result_type(*(x.dtype for x in xs if x is not None))


def _dense(module: nn.Dense, params, x):
    kernel, bias = params["kernel"], params.get("bias")
    dtype = _compute_dtype(module, x, kernel, bias)
    x, kernel = jnp.asarray(x, dtype), kernel.astype(dtype)  # as flax's promote_dtype
    y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
    if bias is not None:
        y = y + jnp.asarray(bias, y.dtype)
    return y


def _dense_general(module: nn.DenseGeneral, params, x):
    if module.batch_dims:
        return _FALLBACK  # rare; the __jax_array__ path handles it
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axis = tuple(a % x.ndim for a in axis)
    kernel, bias = params["kernel"], params.get("bias")
    dtype = _compute_dtype(module, x, kernel, bias)
    x, kernel = jnp.asarray(x, dtype), kernel.astype(dtype)
    dn = ((axis, tuple(range(len(axis)))), ((), ()))
    y = dot_general(x, kernel, dn, precision=module.precision)
    if bias is not None:
        y = y + jnp.asarray(bias, y.dtype)
    return y


def _einsum_contracted_axes(einsum_str: str, ndim: int) -> tuple[int, ...]:
    """Axes of the input (the first operand of `einsum_str`, of rank `ndim`) summed over with
    the kernel: its letters that the kernel has and the output has not."""
    inputs, out = einsum_str.split("->")
    x_sub, k_sub = inputs.split(",")
    head, _, tail = x_sub.partition("...")
    axes = [i for i, c in enumerate(head) if c in k_sub and c not in out]
    axes += [ndim - len(tail) + i for i, c in enumerate(tail) if c in k_sub and c not in out]
    return tuple(axes)


def _einsum(module: nn.Einsum, params, x, einsum_str=None):
    einsum_str = (einsum_str or module.einsum_str).replace(" ", "")
    kernel, bias = params["kernel"], params.get("bias")
    dtype = _compute_dtype(module, x, kernel, bias)
    x = jnp.asarray(x, dtype)
    if kernel.act is not None:  # no einsum on codes: simulate the activation quantization
        x = fake_quantized_input(x, kernel, _einsum_contracted_axes(einsum_str, x.ndim))
    w = kernel.dequantize(dtype)
    y = jnp.einsum(
        einsum_str,
        x,
        w,
        precision=module.precision,
        preferred_element_type=module.preferred_element_type,
    )
    if bias is not None:
        _, broadcast_shape = module._get_bias_shape(einsum_str, x, w)
        y = y + jnp.reshape(jnp.asarray(bias, y.dtype), broadcast_shape)
    return y


def _embed_call(module: nn.Embed, params, ids):
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"nn.Embed input must be integers, got {ids.dtype}")
    table = params["embedding"]
    return take_rows(table, ids, module.dtype or table.dtype)


def _embed_attend(module: nn.Embed, params, query):
    table = params["embedding"]
    dtype = _compute_dtype(module, query, table)
    query, table = jnp.asarray(query, dtype), table.astype(dtype)
    return dot_general(query, table, (((query.ndim - 1,), (1,)), ((), ())))


def _skip_setup(module, params, *args):
    # Embed.setup would re-create `embedding` and check its shape against the packed codes.
    return None


_FALLBACK = object()
_HANDLERS = {
    (nn.Dense, "__call__"): ("kernel", _dense),
    (nn.Embed, "setup"): ("embedding", _skip_setup),
    (nn.DenseGeneral, "__call__"): ("kernel", _dense_general),
    (nn.Einsum, "__call__"): ("kernel", _einsum),
    (nn.Embed, "__call__"): ("embedding", _embed_call),
    (nn.Embed, "attend"): ("embedding", _embed_attend),
}


_OBSERVERS: list = []  # callbacks (param path, input) of `observe_inputs`, innermost last


def _interceptor(next_fun, args, kwargs, context):
    entry = _HANDLERS.get((type(context.module), context.method_name))
    if entry is not None and not kwargs:
        name, handler = entry
        params = context.module.variables.get("params", {})
        if isinstance(params.get(name), QArray):
            if _OBSERVERS and handler in (_dense, _dense_general, _embed_attend):
                path = "/".join((*context.module.scope.path, name))
                for observer in _OBSERVERS:
                    observer(path, args[0])
            out = handler(context.module, params, *args)
            if out is not _FALLBACK:
                return out
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def quantized_ops():
    """Within this block, linen `Dense`/`DenseGeneral`/`Embed` on `QArray` params use jqtz's
    quantized products (see the module docstring)."""
    with nn.intercept_methods(_interceptor):
        yield


@contextlib.contextmanager
def observe_inputs(callback):
    """Within this block (and `quantized_ops()`), call `callback(path, x)` with the input `x` of
    every intercepted product on a `QArray` weight; `path` is the weight's module path, e.g.
    `layers_0/mlp/up_proj/kernel`. Used to calibrate static activation ranges."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


def use_quantized_ops(model: nnx.Module) -> nnx.Module:
    """Point the `dot_general`/`promote_dtype` seam of every `nnx.Linear` whose kernel is a
    `QArray` at jqtz's quantized product. Modifies `model` in place and returns it."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear) and isinstance(node.kernel.get_value(), QArray):
            node.dot_general = dot_general
            node.promote_dtype = promote_dtype
    return model

"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights before W8A8.

A per-input-channel scale `s` divides the activations and multiplies the weight rows, so the
product is unchanged, `(x / s) @ (s[:, None] * W) == x @ W`, while the activation channels that
carry outliers shrink and the weights absorb them:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),   clamped to >= 1e-5,

where max|W_j| runs over every weight fed by input channel j (q, k and v together; gate and up
together). The division by `s` is folded into the norm that produces the input (its scale and
bias), never into a linear's input at run time. `alpha` is the migration strength: 0.5 for OPT,
0.85 for Llama-2/3, 0.8 for Mistral.

Pure array functions (`smoothing_scales`, `apply_smoothing`) and `collect_act_absmax`, which
gathers the per-channel max|X| of a linen model's `nn.Dense` inputs on calibration batches.
Which norm feeds which linears is the model layout's business (`jqtz.ptq.layout`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jax.random.normal(jax.random.key(0), (8, 16)).at[:, 3].multiply(30.0)  # (T, in)
  >>> w = jax.random.normal(jax.random.key(1), (16, 4))  # (in, out)
  >>> s = smoothing_scales(jnp.abs(x).max(axis=0), [w], alpha=0.5)
  >>> norm, _, (w_s,) = apply_smoothing(jnp.ones(16), None, [w], s)
  >>> bool(jnp.allclose((x * norm) @ w_s, x @ w, rtol=1e-4, atol=1e-4))
  True
  >>> bool(jnp.abs(x * norm).max(axis=0)[3] < jnp.abs(x).max(axis=0)[3] / 2)  # outlier shrunk
  True

References:
  Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
  Language Models", 2022; mit-han-lab/smoothquant `smoothquant/smooth.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

_MIN_SCALE = 1e-5


def smoothing_scales(act_absmax: jax.Array, weights: Sequence[jax.Array], alpha: float = 0.5):
    """Per-input-channel smoothing scales `s = max|X|^alpha / max|W|^(1-alpha)`.

    Args:
      act_absmax: `[in]`, max |x| of each input channel over the calibration tokens.
      weights: the `[in, out_k]` kernels that read this input (flax `Dense` layout); max|W_j|
        is taken over all of them (over `sum_k out_k` columns).
      alpha: migration strength in [0, 1]: 0 leaves activations' ranges out (s = 1 / max|W|),
        1 moves all of it into the weights (s = max|X|).

    Returns:
      float32 `[in]`, clamped to >= 1e-5 (max|W_j| is clamped likewise, as the reference does).

    Raises:
      ValueError: `alpha` outside [0, 1], no weights, or shapes that do not agree.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}")
    act_absmax = jnp.asarray(act_absmax, jnp.float32)
    if act_absmax.ndim != 1:
        raise ValueError(f"`act_absmax` must be 1-D `[in]`, got shape {act_absmax.shape}")
    w_absmax = _weights_absmax(weights, act_absmax.shape[0])
    w_absmax = jnp.maximum(w_absmax, _MIN_SCALE)
    s = act_absmax**alpha / w_absmax ** (1.0 - alpha)
    return jnp.maximum(s, _MIN_SCALE)


def _weights_absmax(weights, n_in: int) -> jax.Array:
    if isinstance(weights, jax.Array) or not len(weights):
        raise ValueError(
            "`weights` must be a non-empty list of `[in, out]` kernels (wrap a single kernel "
            "in a list)"
        )
    per = []
    for i, w in enumerate(weights):
        w = jnp.asarray(w)
        if w.ndim != 2 or w.shape[0] != n_in:
            raise ValueError(
                f"`weights[{i}]` must be `[in, out]` with in = {n_in} (the length of "
                f"`act_absmax`), got shape {w.shape}"
            )
        per.append(jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1))  # (in,)
    return jnp.max(jnp.stack(per), axis=0)


def apply_smoothing(norm_scale, norm_bias, weights: Sequence[jax.Array], s: jax.Array):
    """Fold `s` into a norm and the linears it feeds: the model's function is unchanged.

    Args:
      norm_scale: `[in]`, the LayerNorm/RMSNorm weight whose output the linears read.
      norm_bias: `[in]` or None (RMSNorm).
      weights: the `[in, out_k]` kernels reading that output.
      s: `[in]` smoothing scales (`smoothing_scales`).

    Returns:
      `(norm_scale / s, norm_bias / s or None, [W * s[:, None] for W in weights])`, each in its
      input's dtype (computed in float32).

    Raises:
      ValueError: a shape does not match `s`.
    """
    s = jnp.asarray(s, jnp.float32)
    if s.ndim != 1:
        raise ValueError(f"`s` must be 1-D `[in]`, got shape {s.shape}")
    _weights_absmax(weights, s.shape[0])  # shape checks only

    def divide(name, v):
        v = jnp.asarray(v)
        if v.shape != s.shape:
            raise ValueError(f"`{name}` must have shape {s.shape} like `s`, got {v.shape}")
        return (v.astype(jnp.float32) / s).astype(v.dtype)

    scale = divide("norm_scale", norm_scale)
    bias = None if norm_bias is None else divide("norm_bias", norm_bias)
    scaled = [
        (w.astype(jnp.float32) * s[:, None]).astype(w.dtype) for w in map(jnp.asarray, weights)
    ]
    return scale, bias, scaled


def collect_act_absmax(
    apply_fn: Callable, params, batches: Iterable, paths: Sequence[str] | None = None
) -> dict[str, jax.Array]:
    """Per-input-channel max |x| of the inputs of a linen model's `nn.Dense` layers.

    Runs `apply_fn(params, batch)` eagerly for every batch under a `flax.linen` method
    interceptor that records each `nn.Dense` input (max over all but the last axis) and calls
    the layer unchanged.

    Args:
      apply_fn: `apply_fn(params, batch)`, e.g. `model.apply`; must not be jitted (the
        recorded inputs have to be concrete).
      params: the model's variables (full precision or quantized).
      batches: calibration inputs for `apply_fn`.
      paths: the `Dense` modules to record, by module path (`"layers_0/self_attn/q_proj"`;
        a leading `params/` and a trailing `/kernel` are accepted). None: every `Dense`.

    Returns:
      `{path: float32 [in]}`, keyed by the strings in `paths` (by module path when None).

    Raises:
      ValueError: no batch, a path that no batch reached, or `apply_fn` traced under `jit`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> batches = [jnp.array([[1.0, -5.0, 2.0]]), jnp.array([[-3.0, 1.0, 0.5]])]
      >>> absmax = collect_act_absmax(model.apply, params, batches)
      >>> sorted(absmax), absmax["layers_0"]
      (['layers_0', 'layers_2'], Array([3., 5., 2.], dtype=float32))
    """
    wanted = None if paths is None else {_module_path(p): p for p in paths}
    absmax: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__" and args:
            module_path = "/".join(context.module.scope.path)
            key = module_path if wanted is None else wanted.get(module_path)
            if key is not None:
                x = args[0]
                if isinstance(x, jax.core.Tracer):
                    raise ValueError(
                        f"the input of {module_path!r} is traced: call `collect_act_absmax` "
                        "with an `apply_fn` that is not wrapped in `jax.jit`"
                    )
                x = jnp.abs(jnp.asarray(x, jnp.float32))
                m = jnp.max(x.reshape(-1, x.shape[-1]), axis=0)  # (in,)
                absmax[key] = m if key not in absmax else jnp.maximum(absmax[key], m)
        return next_fun(*args, **kwargs)

    n = 0
    with nn.intercept_methods(interceptor):
        for batch in batches:
            apply_fn(params, batch)
            n += 1
    if n == 0:
        raise ValueError("`batches` is empty: activation ranges need calibration data")
    if wanted is not None:
        missing = [p for p in wanted.values() if p not in absmax]
        if missing:
            raise ValueError(
                f"{len(missing)} path(s) in `paths` saw no input, e.g. {missing[0]!r}: no "
                "`nn.Dense` with that module path ran on these batches (module paths look "
                "like 'layers_0/self_attn/q_proj')"
            )
    return absmax


def _module_path(path: str) -> str:
    path = path.strip("/")
    path = path.removeprefix("params/")
    return path.removesuffix("/kernel")

"""Perplexity through a model's incremental decode path, so a KV cache's error is measured.

`decode_perplexity` scores the same windows, with the same protocol, as
`jqtz.eval.perplexity.perplexity`, but feeds tokens one at a time through the model's cache
(a jitted `lax.scan` over positions): every prediction attends over the keys and values as the
cache stored them (quantized, for `jqtz.models.quantized_kv_cache`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqtz.eval.perplexity import (
    PerplexityResult,
    _batches,
    _check_int,
    _check_vocab,
    _make_windows,
)
from jqtz.models.kv_cache import LayerCache
from jqtz.nn import quantized_ops


def decode_perplexity(
    model: Any,
    params: Any,
    tokens: Sequence[int] | np.ndarray,
    cache_factory: Any = None,
    *,
    ctx: int = 512,
    stride: int | None = None,
    windows: int | None = None,
    batch_size: int = 8,
    prefix: int = 0,
) -> PerplexityResult:
    """Perplexity through the incremental decode path: every token goes through the cache.

    Windows and scoring follow :func:`jqtz.eval.perplexity.perplexity` (no BOS); only the way
    logits are computed differs: each window's first ``prefix`` tokens are prefilled in one call
    (none by default), then the others are fed one at a time in a jitted ``lax.scan``, each
    attending over the keys and values the cache stored. With the full-precision cache this
    equals the full-forward perplexity up to float rounding; with a quantized one, the
    difference is the cache's quantization error.

    Args:
        model: a :class:`~jqtz.models.llama.Llama` (hashable: a static argument of ``jit``).
        params: ``{"params": ...}``, possibly with quantized weights.
        tokens: the whole text's token ids, 1-D.
        cache_factory: ``(config, batch, max_len) -> per-layer caches``; default
            :func:`~jqtz.models.llama.init_cache` (full precision).
        ctx: tokens per window.
        stride: text tokens between window starts; default non-overlapping.
        windows: evaluate only the first this many windows.
        batch_size: windows decoded together.
        prefix: tokens of each window prefilled at once, ``0 <= prefix < ctx - 1``.

    Returns:
        A :class:`~jqtz.eval.perplexity.PerplexityResult`.

    Example:
        >>> r = decode_perplexity(model, params, tokens, quantized_cache_factory("int8"),
        ...                       ctx=512, windows=8)  # doctest: +SKIP
    """
    if cache_factory is None:
        from jqtz.models.llama import init_cache

        cache_factory = init_cache
    try:
        hash(cache_factory), hash(model)
    except TypeError as err:
        raise TypeError(
            "`model` and `cache_factory` must be hashable (static arguments of jit): pass a "
            "module, and a function or a factory from `quantized_cache_factory`."
        ) from err
    batch_size = _check_int("batch_size", batch_size, 1)
    w = _make_windows(tokens, ctx=ctx, stride=stride, windows=windows, bos=False, bos_id=None)
    prefix = _check_int("prefix", prefix, 0)
    if prefix >= w.ctx - 1:
        raise ValueError(f"`prefix` must be < ctx - 1 = {w.ctx - 1}, got {prefix}.")
    _check_vocab(w, model.config.vocab_size)
    params = jax.device_put(params)
    total, count = 0.0, 0
    for offset, real, inputs, first in _batches(w, batch_size):
        sums, counts, ok = jax.device_get(
            _decode_nll(model, params, inputs, first, cache_factory=cache_factory, prefix=prefix)
        )
        bad = np.flatnonzero(~ok[:real])
        if bad.size:
            raise ValueError(
                f"Non-finite logits or NLL in window {offset + int(bad[0])} of the decode path: "
                "check the parameters and the cache's scales."
            )
        total += float(np.sum(sums[:real], dtype=np.float64))
        count += int(np.sum(counts[:real]))
    return PerplexityResult.from_sums(total, count, w)


def _next_token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 NLL and a bad flag (NaN or +inf logit), both shaped like ``targets``."""
    logits = logits.astype(jnp.float32)  # (..., V)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    bad = jnp.any(jnp.isnan(logits) | jnp.isposinf(logits), axis=-1) | ~jnp.isfinite(nll)
    return nll, bad


@functools.partial(jax.jit, static_argnames=("model", "cache_factory", "prefix"))
def _decode_nll(model, params, inputs, first, *, cache_factory, prefix):
    """Per window (B,): sum of scored NLL, scored count, ok, decoding ``inputs`` (B, T)."""
    b, t = inputs.shape
    with quantized_ops():
        cache = cache_factory(model.config, b, t)
        nll, bad = jnp.zeros((b, 0)), jnp.zeros((b, 0), bool)
        if prefix:
            logits, cache = model.apply(params, inputs[:, :prefix], cache=cache)  # (B, P, V)
            nll, bad = _next_token_nll(logits, inputs[:, 1 : prefix + 1])  # (B, P)

        def step(cache: Sequence[LayerCache], xs):
            token, target = xs  # (B,), (B,)
            logits, cache = model.apply(params, token[:, None], cache=cache)
            return cache, _next_token_nll(logits[:, 0], target)

        xs = (inputs[:, prefix : t - 1].T, inputs[:, prefix + 1 :].T)  # (T-1-P, B) each
        _, (step_nll, step_bad) = jax.lax.scan(step, cache, xs)
    nll = jnp.concatenate([nll, step_nll.T], axis=1)  # (B, T-1): target t+1 of position t
    bad = jnp.concatenate([bad, step_bad.T], axis=1)
    scored = jnp.arange(1, t)[None, :] >= first[:, None]
    ok = ~jnp.any(bad & scored, axis=1)
    return jnp.where(scored, nll, 0.0).sum(axis=1), scored.sum(axis=1), ok

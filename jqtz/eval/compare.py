"""Compare a quantized model's next-token distributions with its full-precision baseline.

Perplexity can hide damage (errors that cancel on average); the per-token distance between the
two models' predictions does not. Over the windows and scored tokens of the perplexity protocol
(:mod:`jqtz.eval.perplexity`, same `ctx`, `stride`, `windows`, `bos`), for each scored position

    KL(base || quant) = sum_v p_base(v) * (log p_base(v) - log p_quant(v))

in float32 from log-softmaxed logits, and top-1 agreement = [argmax base == argmax quant]. Both are
averaged over scored tokens. Both models run on the same window batch inside one jitted call, one
batch at a time: the logits of all windows never exist at once. The perplexities of both models
on the same tokens come with it for free.

Example:
    >>> import jax.numpy as jnp
    >>> apply = lambda p, t: p * jax.nn.one_hot(t + 1, 64)  # params: a temperature
    >>> c = compare_logits(apply, jnp.float32(4.0), jnp.float32(4.0), jnp.arange(60), ctx=16)
    >>> c.kl, c.top1_agreement, c.n_tokens
    (0.0, 1.0, 45)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqtz.eval.perplexity import (
    ApplyFn,
    _bad_logits,
    _batches,
    _check_apply_fn,
    _check_int,
    _check_vocab,
    _logits,
    _make_windows,
    _scored_mask,
    _token_nll,
    _window_label,
)

__all__ = ["LogitComparison", "compare_logits"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogitComparison:
    """How far a model's next-token distributions are from a baseline's.

    Attributes:
        kl: mean KL(base || quantized) per scored token, in nats.
        max_kl: the largest KL at any scored token.
        top1_agreement: fraction of scored tokens where both models' argmax agree.
        n_tokens: number of scored tokens.
        base_ppl: perplexity of the baseline on the same tokens.
        ppl: perplexity of the compared model on the same tokens.
        n_windows, ctx, stride, bos: the windows, as in :class:`~jqtz.eval.PerplexityResult`.
    """

    kl: float
    max_kl: float
    top1_agreement: float
    n_tokens: int
    base_ppl: float
    ppl: float
    n_windows: int
    ctx: int
    stride: int
    bos: bool

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnums=0)
def _compare_batch(
    apply_fn: ApplyFn, base_params: Any, params: Any, inputs: jax.Array, first: jax.Array
) -> dict[str, jax.Array]:
    """Per window (B,): sums of KL, agreements, both NLLs; max KL; count; ok flags."""
    base = _logits(apply_fn, base_params, inputs)  # (B, T, V)
    quant = _logits(apply_fn, params, inputs)  # (B, T, V)
    if base.shape != quant.shape:
        raise ValueError(
            f"`base_params` give logits {base.shape} but `params` give {quant.shape}; the two "
            "trees must describe the same model."
        )
    mask = _scored_mask(inputs, first)  # (B, T-1)
    log_p = jax.nn.log_softmax(base[:, :-1], axis=-1)  # (B, T-1, V)
    log_q = jax.nn.log_softmax(quant[:, :-1], axis=-1)
    # p * (log p - log q) with the convention 0 * log 0 = 0 (p = 0 where a logit is -inf).
    p = jnp.exp(log_p)
    kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)  # (B, T-1)
    agree = jnp.argmax(base[:, :-1], axis=-1) == jnp.argmax(quant[:, :-1], axis=-1)
    base_nll = _token_nll(base, inputs)  # (B, T-1)
    nll = _token_nll(quant, inputs)
    finite = jnp.isfinite(kl) & jnp.isfinite(base_nll) & jnp.isfinite(nll)
    return {
        "kl": jnp.where(mask, kl, 0.0).sum(axis=1),
        "max_kl": jnp.where(mask, kl, -jnp.inf).max(axis=1),
        "agree": (agree & mask).sum(axis=1),
        "base_nll": jnp.where(mask, base_nll, 0.0).sum(axis=1),
        "nll": jnp.where(mask, nll, 0.0).sum(axis=1),
        "count": mask.sum(axis=1),
        "base_ok": ~_bad_logits(base),
        "ok": ~_bad_logits(quant) & jnp.all(finite | ~mask, axis=1),
        "vocab": base.shape[-1],
    }


def compare_logits(
    apply_fn: ApplyFn,
    base_params: Any,
    params: Any,
    tokens: Sequence[int] | np.ndarray,
    *,
    ctx: int = 512,
    stride: int | None = None,
    windows: int | None = None,
    batch_size: int = 8,
    bos: bool = False,
    bos_id: int | None = None,
) -> LogitComparison:
    """KL divergence and top-1 agreement of `params` against `base_params`, per scored token.

    Args:
        apply_fn: `apply_fn(params, tokens (B, T)) -> logits (B, T, V)`, the same model for
            both trees; hashable (a static argument of `jax.jit`).
        base_params: the reference tree (e.g. full precision).
        params: the tree to judge (e.g. holding `jqtz.QArray` leaves).
        tokens, ctx, stride, windows, batch_size, bos, bos_id: as in
            :func:`~jqtz.eval.perplexity`; the same windows and scored tokens.

    Returns:
        A :class:`LogitComparison`.

    Raises:
        ValueError: as :func:`~jqtz.eval.perplexity`; non-finite values name the window and
            which model produced them.

    Example:
        >>> import jax.numpy as jnp
        >>> apply = lambda p, t: p * jax.nn.one_hot(t + 1, 64)
        >>> c = compare_logits(apply, jnp.float32(4.0), jnp.float32(2.0), jnp.arange(60), ctx=16)
        >>> c.kl > 0, c.top1_agreement, c.ppl > c.base_ppl
        (True, 1.0, True)
    """
    _check_apply_fn(apply_fn)
    batch_size = _check_int("batch_size", batch_size, 1)
    w = _make_windows(tokens, ctx=ctx, stride=stride, windows=windows, bos=bos, bos_id=bos_id)
    base_params, params = jax.device_put((base_params, params))
    totals = {"kl": 0.0, "agree": 0, "base_nll": 0.0, "nll": 0.0, "count": 0}
    max_kl = -math.inf
    for offset, real, inputs, first in _batches(w, batch_size):
        out = jax.device_get(_compare_batch(apply_fn, base_params, params, inputs, first))
        if offset == 0:
            _check_vocab(w, int(out["vocab"]))
        for key, which in (("base_ok", "baseline `base_params`"), ("ok", "`params`")):
            bad = np.flatnonzero(~out[key][:real])
            if bad.size:
                raise ValueError(
                    f"Non-finite logits, NLL or KL from the {which} model in "
                    f"{_window_label(w, offset + int(bad[0]))}; check that tree's values."
                )
        for key in totals:
            totals[key] += np.sum(out[key][:real], dtype=np.float64).item()
        max_kl = max(max_kl, float(np.max(out["max_kl"][:real])))
    count = int(totals["count"])
    return LogitComparison(
        kl=totals["kl"] / count,
        max_kl=max_kl,
        top1_agreement=totals["agree"] / count,
        n_tokens=count,
        base_ppl=math.exp(totals["base_nll"] / count),
        ppl=math.exp(totals["nll"] / count),
        n_windows=len(w.inputs),
        ctx=w.ctx,
        stride=w.stride,
        bos=w.bos,
    )

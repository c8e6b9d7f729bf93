"""Full-precision key/value cache for incremental decoding, and the attention over it.

A model holds one cache object per decoder layer and talks to it through two methods, so a
quantized cache (keys and values stored as int8/fp8/int4 when appended) can replace this one
without touching the model:

``cache.update(k_new, v_new) -> cache``
    Append ``T`` new tokens, ``k_new`` and ``v_new`` of shape ``(B, T, Hkv, D)`` (after RoPE), at
    positions ``[cache.length, cache.length + T)``; return the new cache (caches are immutable
    pytrees, so this works under ``jax.jit`` and ``jax.lax`` loops).
``cache.attend(q) -> out``
    Causal attention of the queries of the ``T`` tokens appended last, ``q`` of shape
    ``(B, T, H, D)`` with ``H`` a multiple of ``Hkv`` (grouped-query attention), over every key
    in the cache; returns ``(B, T, H, D)`` in the dtype of ``q``.

plus a ``length`` attribute (int32 scalar: how many positions are filled), which the model reads
to place the RoPE positions of new tokens. Position ``s`` of the buffers holds the token at
absolute position ``s``; all sequences of a batch share one length.

Example:
    >>> cache = KVCache.init(batch=1, max_len=16, n_kv_heads=2, head_dim=4)
    >>> k = v = jnp.ones((1, 3, 2, 4))
    >>> cache = cache.update(k, v)
    >>> cache.attend(jnp.ones((1, 3, 4, 4))).shape
    (1, 3, 4, 4)
    >>> int(cache.length)
    3
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Self

import jax
import jax.numpy as jnp

__all__ = [
    "KVCache",
    "LayerCache",
    "causal_attention",
    "dot_product_attention",
    "masked_attention",
    "streamed_attention",
]

#: Largest score tensor (``B * H * T * S`` float32 elements, 256 MiB) that `causal_attention`
#: materializes; above it (a long prompt prefilled into a long cache) it streams key blocks.
SCORE_BUDGET = 1 << 26
#: Keys per block of the streamed path.
KEY_BLOCK = 512


class LayerCache(Protocol):
    """The interface a decoder layer needs from its cache (see the module docstring)."""

    length: jax.Array

    def update(self, k_new: jax.Array, v_new: jax.Array) -> Self: ...

    def attend(self, q: jax.Array) -> jax.Array: ...


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
) -> jax.Array:
    """Grouped-query softmax attention, softmax in float32.

    ``out[b, t, h] = sum_s softmax_s(q[b, t, h] . k[b, s, h // G] / sqrt(D)) v[b, s, h // G]``
    over the keys ``s`` where ``mask[b, t, s]`` holds, with ``G = H // Hkv`` query heads per key
    head (the grouping of Hugging Face's ``repeat_kv`` and llama2.c).

    Args:
        q: queries ``(B, T, H, D)``.
        k: keys ``(B, S, Hkv, D)``.
        v: values ``(B, S, Hkv, D)``.
        mask: booleans ``(B, T, S)``: which keys each query may see.

    Returns:
        ``(B, T, H, D)`` in the dtype of ``q``.

    Example:
        >>> q = jnp.ones((1, 2, 4, 8)); k = v = jnp.ones((1, 2, 2, 8))
        >>> dot_product_attention(q, k, v, jnp.tril(jnp.ones((1, 2, 2), bool))).shape
        (1, 2, 4, 8)
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, h // hkv, d)  # (B, T, Hkv, G, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)  # (B, Hkv, G, T, S)
    # A finite minimum rather than -inf: a fully masked row gives uniform weights, not NaN.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # (B, T, Hkv, G, D)
    return out.reshape(b, t, h, d).astype(q.dtype)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, length, *, score_budget: int | None = None
) -> jax.Array:
    """Causal attention of the queries of the last ``T`` of ``length`` positions over a cache.

    ``q (B, T, H, D)`` holds the queries of positions ``[length - T, length)``; ``k`` and ``v``
    ``(B, S, Hkv, D)`` hold position ``s`` at index ``s`` (slots at or past ``length`` are
    never read into the result). Small problems (``B * H * T * S`` up to ``score_budget``
    float32 scores, default `SCORE_BUDGET`) run `dot_product_attention` with a causal mask.
    Larger ones (a long prompt into a long cache, where the scores alone would take gigabytes)
    stream blocks of `KEY_BLOCK` keys with an online softmax in float32, for chunks of queries
    sized to the same budget, and read only the blocks that some query of the chunk sees: memory
    stays within the budget and work follows ``length``, not ``S``.

    Args:
        q: queries ``(B, T, H, D)``.
        k: keys ``(B, S, Hkv, D)``.
        v: values ``(B, S, Hkv, D)``.
        length: the filled positions, ``T <= length <= S``: an int32 scalar array (a cache's;
            the streamed path's loops then stop at the last block it needs, and are not
            reverse-differentiable) or a Python int (static loops, differentiable).
        score_budget: override `SCORE_BUDGET` (tests use a small one).

    Returns:
        ``(B, T, H, D)`` in the dtype of ``q``.

    Example:
        >>> q = jnp.ones((1, 3, 4, 8)); k = v = jnp.ones((1, 16, 2, 8))
        >>> causal_attention(q, k, v, 5).shape
        (1, 3, 4, 8)
    """
    t, s = q.shape[1], k.shape[1]
    q_pos = length - t + jnp.arange(t)  # (T,)
    return masked_attention(q, k, v, q_pos, jnp.arange(s), length=length, score_budget=score_budget)


def masked_attention(q, k, v, q_pos, k_pos, *, length=None, score_budget=None) -> jax.Array:
    """Attention under the mask ``k_pos[s] <= q_pos[t]``: `dot_product_attention` while the
    ``B * H * T * S`` float32 scores fit ``score_budget`` (default `SCORE_BUDGET`), else
    `streamed_attention` (same arguments). The one place that switch is made.

    Example:
        >>> q = jnp.ones((1, 3, 4, 8)); k = v = jnp.ones((1, 3, 2, 8)); pos = jnp.arange(3)
        >>> masked_attention(q, k, v, pos, pos).shape
        (1, 3, 4, 8)
    """
    b, t, h, _ = q.shape
    s = k.shape[1]
    if b * h * t * s <= (SCORE_BUDGET if score_budget is None else score_budget):
        mask = jnp.broadcast_to(k_pos[..., None, :] <= q_pos[..., :, None], (b, t, s))
        return dot_product_attention(q, k, v, mask)
    return streamed_attention(q, k, v, q_pos, k_pos, length=length, score_budget=score_budget)


def streamed_attention(q, k, v, q_pos, k_pos, *, length=None, score_budget=None) -> jax.Array:
    """`dot_product_attention` with the mask ``k_pos[s] <= q_pos[t]``, streaming blocks of
    `KEY_BLOCK` keys with an online softmax (flash attention's, in XLA, float32), for chunks of
    queries that keep each block's scores within ``score_budget`` (default `SCORE_BUDGET`).

    Args:
        q, k, v: as `dot_product_attention`.
        q_pos: positions of the queries, ``(T,)`` or ``(B, T)``.
        k_pos: positions of the keys, ``(S,)`` or ``(B, S)``.
        length: None: any positions; static loops (which reverse-mode AD goes through) over
            every key block, skipping, by a `lax.cond`, the blocks that no query of the chunk
            sees (about half of a causal forward's). Or the filled positions of a cache whose
            keys sit at their positions (``k_pos = arange(S)``) and whose queries are the last
            ``T`` of them: each query chunk then visits only the blocks up to its last query (a
            while loop when ``length`` is traced).

    Example:
        >>> q = jnp.ones((1, 3, 4, 8)); k = v = jnp.ones((1, 5, 2, 8))
        >>> pos = jnp.arange(3)
        >>> streamed_attention(q, k[:, :3], v[:, :3], pos, pos).shape
        (1, 3, 4, 8)
    """
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    budget = SCORE_BUDGET if score_budget is None else score_budget
    bk = min(KEY_BLOCK, s)
    block_q = max(16, budget // (b * h * bk))
    block_q = min(1 << (block_q.bit_length() - 1), t)  # a power of two, or all of T
    nq, nk = -(-t // block_q), -(-s // bk)
    pad_t, pad_s = nq * block_q - t, nk * bk - s
    # Padded query rows are sliced off at the end; padded key slots get a position past every
    # query, so no row sees them.
    q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
    k, v = (jnp.pad(a, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for a in (k, v))
    q_pos = jnp.pad(jnp.asarray(q_pos, jnp.int32), [(0, 0)] * (jnp.ndim(q_pos) - 1) + [(0, pad_t)])
    never = jnp.iinfo(jnp.int32).max
    k_pos = jnp.asarray(k_pos, jnp.int32)
    k_pos = jnp.pad(k_pos, [(0, 0)] * (k_pos.ndim - 1) + [(0, pad_s)], constant_values=never)
    chunks = q.reshape(b, nq, block_q, hkv, g, d).transpose(1, 0, 2, 3, 4, 5)
    static = length is None or isinstance(length, int)  # static block counts
    low = jnp.finfo(jnp.float32).min

    def blocks_for(i):
        """Key blocks query chunk `i` visits."""
        if length is None:
            return nk
        smaller = min if static else jnp.minimum
        last = smaller(length - t + (i + 1) * block_q, length) - 1  # its last real query
        return last // bk + 1

    def chunk(args):
        i, qc = args  # qc: (B, Tq, Hkv, G, D)
        qp = jax.lax.dynamic_slice_in_dim(q_pos, i * block_q, block_q, axis=-1)

        def step(j, carry):
            kp = jax.lax.dynamic_slice_in_dim(k_pos, j * bk, bk, axis=-1)
            if length is not None:  # the blocks visited are the ones the chunk sees
                return update(j, kp, carry)
            # Any positions: a block no query of the chunk sees (above the diagonal of a causal
            # forward) is skipped; its update would leave the carry as it is.
            return jax.lax.cond(kp.min() <= qp.max(), update, lambda j, kp, c: c, j, kp, carry)

        def update(j, kp, carry):
            m, total, acc = carry
            kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
            vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
            sc = jnp.einsum("bqkgd,bskd->bkgqs", qc, kb, preferred_element_type=jnp.float32)
            sc = sc * d**-0.5  # (B, Hkv, G, Tq, Bk)
            seen = kp[..., None, :] <= qp[..., :, None]  # (Tq, Bk) or (B, Tq, Bk)
            if seen.ndim == 3:
                seen = seen[:, None, None]
            sc = jnp.where(seen, sc, low)
            m_new = jnp.maximum(m, sc.max(axis=-1))
            p = jnp.where(seen, jnp.exp(sc - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "bkgqs,bskd->bkgqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
            )
            return m_new, total * alpha + p.sum(axis=-1), acc * alpha[..., None] + pv

        init = (
            jnp.full((b, hkv, g, block_q), low, jnp.float32),
            jnp.zeros((b, hkv, g, block_q), jnp.float32),
            jnp.zeros((b, hkv, g, block_q, d), jnp.float32),
        )
        _, total, acc = jax.lax.fori_loop(0, blocks_for(i), step, init)
        return acc / jnp.where(total > 0, total, 1.0)[..., None]  # (B, Hkv, G, Tq, D)

    if static:  # static trip counts: a scan per chunk, which reverse-mode AD goes through
        out = jnp.stack([chunk((i, chunks[i])) for i in range(nq)])
    else:  # trip counts follow the traced length (a while loop per chunk)
        out = jax.lax.map(chunk, (jnp.arange(nq), chunks))  # (nq, B, Hkv, G, Tq, D)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * block_q, h, d)
    return out[:, :t].astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of one decoder layer, in full precision.

    Attributes:
        keys: ``(B, max_len, Hkv, D)``; positions at or past ``length`` are unused.
        values: ``(B, max_len, Hkv, D)``.
        length: int32 scalar, the number of filled positions.

    Example:
        >>> cache = KVCache.init(batch=2, max_len=8, n_kv_heads=1, head_dim=4)
        >>> cache.keys.shape
        (2, 8, 1, 4)
    """

    keys: jax.Array
    values: jax.Array
    length: jax.Array

    @classmethod
    def init(
        cls,
        *,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype = jnp.float32,
    ) -> KVCache:
        """An empty cache with room for ``max_len`` positions."""
        shape = (batch, max_len, n_kv_heads, head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.keys.shape[1]

    def update(self, k_new: jax.Array, v_new: jax.Array) -> KVCache:
        """Appends ``k_new``, ``v_new`` ``(B, T, Hkv, D)`` at ``[length, length + T)``.

        Writing past ``max_len`` is not checked inside ``jit`` (``dynamic_update_slice`` would
        clamp the start index); callers size the cache for the whole generation.
        """
        start = (0, self.length, 0, 0)
        return KVCache(
            keys=jax.lax.dynamic_update_slice(self.keys, k_new.astype(self.keys.dtype), start),
            values=jax.lax.dynamic_update_slice(
                self.values, v_new.astype(self.values.dtype), start
            ),
            length=self.length + k_new.shape[1],
        )

    def attend(self, q: jax.Array) -> jax.Array:
        """Attention of the last ``T`` appended tokens' queries ``(B, T, H, D)`` over the cache
        (`causal_attention`: a query sees the keys up to its own position; unfilled slots lie
        beyond it)."""
        return causal_attention(q, self.keys, self.values, self.length)

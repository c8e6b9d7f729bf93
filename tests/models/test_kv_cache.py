"""The full-precision cache's attention: `causal_attention`, materialized and streamed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqtz.models.kv_cache import KVCache, causal_attention, dot_product_attention
from jqtz.models.quantized_kv_cache import KVQuantSpec, QuantizedKVCache


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _qkv(b, t, h, hkv, s, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, 64), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, 64), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, 64), dtype)
    return q, k, v


def _masked(q, k, v, length):
    """The definition: softmax over the keys at or before each query's position."""
    b, t = q.shape[:2]
    q_pos = length - t + jnp.arange(t)
    mask = jnp.arange(k.shape[1])[None, :] <= q_pos[:, None]
    return dot_product_attention(q, k, v, jnp.broadcast_to(mask, (b, t, k.shape[1])))


# (B, T, H, Hkv, S, length): one decode token, prompts filling part or all of the cache, a
# query chunk and key block that end mid-way (T, S not multiples of either), GQA and MHA.
CASES = [
    (1, 1, 8, 8, 2000, 1999),
    (1, 7, 4, 2, 1300, 1000),
    (2, 300, 6, 2, 1100, 1024),
    (2, 33, 4, 4, 513, 40),
    (1, 600, 4, 1, 600, 600),
]


@pytest.mark.parametrize("b, t, h, hkv, s, length", CASES)
def test_streamed_path_matches_the_materialized_one(b, t, h, hkv, s, length):
    q, k, v = _qkv(b, t, h, hkv, s, seed=t)
    # Slots past `length` hold garbage that a wrong mask would let in.
    k = k.at[:, length:].set(1e4)
    v = v.at[:, length:].set(-1e4)
    want = _masked(q, k.at[:, length:].set(0), v.at[:, length:].set(0), length)
    streamed = causal_attention(q, k, v, length, score_budget=1024)  # tiny chunks
    assert streamed.shape == want.shape and bool(jnp.isfinite(streamed).all())
    assert _rel(streamed, want) < 2e-6
    # Inside jit with a traced length: the key loop's trip count follows it.
    run = jax.jit(lambda q, k, v, n: causal_attention(q, k, v, n, score_budget=1 << 16))
    assert _rel(run(q, k, v, jnp.int32(length)), want) < 2e-6


def test_small_problems_keep_the_materialized_path():
    q, k, v = _qkv(1, 5, 4, 2, 64)
    assert (causal_attention(q, k, v, 20) == _masked(q, k, v, 20)).all()


def test_bf16_streamed_path_rounds_like_the_materialized_one():
    q, k, v = _qkv(1, 600, 4, 1, 600, jnp.bfloat16)
    exact = _masked(*(a.astype(jnp.float32) for a in (q, k, v)), 600)
    streamed = causal_attention(q, k, v, 600, score_budget=1024)
    assert streamed.dtype == jnp.bfloat16
    # Probabilities go to the tensor cores in bf16 on both paths (2^-9 relative each).
    assert _rel(streamed, exact) <= 1.5 * _rel(_masked(q, k, v, 600), exact) + 1e-3


@pytest.mark.parametrize("kind", [None, "int8"])
def test_long_prompt_prefill_fits_in_memory(kind):
    """A 16k-token prompt into a 16k cache, 32 query heads: the scores alone would be 32 GiB
    in float32 (64 GiB of temporaries before this path existed); XLA's plan for the streamed
    path stays under 1 GiB. Compiled only, not run."""
    b, t, h, hkv, d = 1, 16384, 32, 8, 64
    kw = dict(batch=b, max_len=t, n_kv_heads=hkv, head_dim=d, dtype=jnp.bfloat16)
    if kind is None:
        cache = KVCache.init(**kw)
    else:
        cache = QuantizedKVCache.init(KVQuantSpec(kind=kind), **kw)
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    prefill = jax.jit(lambda c, q, k, v: c.update(k, v).attend(q))
    memory = prefill.lower(cache, q, kv, kv).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 1 << 30


@pytest.mark.parametrize("batched", [False, True], ids=["positions_T", "positions_BT"])
def test_streamed_attention_masks_by_position_and_differentiates(batched):
    """No cache (a full forward): key blocks are visited under the positions' mask, in static
    loops (blocks no query of a chunk sees are skipped), so training can take gradients
    through it."""
    from jqtz.models.kv_cache import streamed_attention

    b, t, h, hkv = 2, 700, 4, 2
    q, k, v = _qkv(b, t, h, hkv, t, seed=5)
    pos = jnp.arange(t) + 3
    if batched:
        pos = jnp.stack([pos, pos + 100])
    mask = jnp.broadcast_to(pos[..., None, :] <= pos[..., :, None], (b, t, t))

    def loss(fn, q):
        return jnp.sum(jnp.tanh(fn(q)))

    dense = lambda q: dot_product_attention(q, k, v, mask)
    streamed = lambda q: streamed_attention(q, k, v, pos, pos, score_budget=1 << 20)
    assert _rel(streamed(q), dense(q)) < 2e-6
    g_dense, g_streamed = (jax.grad(functools.partial(loss, f))(q) for f in (dense, streamed))
    assert _rel(g_streamed, g_dense) < 1e-5


def test_streamed_attention_skips_blocks_no_query_of_the_chunk_sees():
    """Causal positions, 512-query chunks over 512-key blocks: the first chunk never reads the
    second block. NaN values there (which a visited block would spread: 0 * NaN) stay out of
    the first chunk's rows, and the rest matches the definition."""
    from jqtz.models.kv_cache import streamed_attention

    b, t, h, hkv = 1, 1024, 4, 2
    q, k, v = _qkv(b, t, h, hkv, t, seed=6)
    pos = jnp.arange(t)
    poisoned = v.at[:, 512:].set(jnp.nan)
    out = streamed_attention(q, k, poisoned, pos, pos, score_budget=1 << 20)
    mask = jnp.broadcast_to(pos[None, :] <= pos[:, None], (b, t, t))
    want = dot_product_attention(q, k, v, mask)
    assert bool(jnp.isfinite(out[:, :512]).all())
    assert _rel(out[:, :512], want[:, :512]) < 2e-6
    # Shuffled positions: blocks are seen in part, by some chunks; the result is unchanged.
    perm = jax.random.permutation(jax.random.key(7), t)
    mask = jnp.broadcast_to(perm[None, :] <= perm[:, None], (b, t, t))
    got = streamed_attention(q, k, v, perm, perm, score_budget=1 << 20)
    assert _rel(got, dot_product_attention(q, k, v, mask)) < 2e-6


def test_long_sequence_forward_without_a_cache_streams(monkeypatch):
    """`Llama` without a cache (perplexity, training) takes the streamed path above the budget
    and gives the same logits."""
    import jqtz.models.kv_cache as kv_cache
    from jqtz.models.llama import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         hidden_dim=128, max_seq_len=1024, tie_embeddings=True)  # fmt: skip
    tokens = jax.random.randint(jax.random.key(0), (1, 600), 0, 64)
    params = Llama(config).init(jax.random.key(1), tokens)
    want = Llama(config).apply(params, tokens)
    monkeypatch.setattr(kv_cache, "SCORE_BUDGET", 1 << 20)
    jaxpr = str(jax.make_jaxpr(Llama(config).apply)(params, tokens))
    assert "while" in jaxpr or "scan" in jaxpr  # the key-block loop
    assert _rel(Llama(config).apply(params, tokens), want) < 1e-5

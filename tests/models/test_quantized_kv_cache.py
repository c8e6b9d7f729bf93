"""Tests for jqtz.models.quantized_kv_cache: storage, flushing, attention, decode perplexity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqtz import formats
from jqtz.eval.decode import decode_perplexity
from jqtz.eval.perplexity import perplexity
from jqtz.models.kv_cache import KVCache, dot_product_attention
from jqtz.models.llama import Llama, LlamaConfig, generate, init_cache
from jqtz.models.quantized_kv_cache import (
    KVQuantSpec,
    QuantizedCacheFactory,
    QuantizedKVCache,
    dequantize_blocks,
    kv_cache_memory,
    quantize_blocks,
    quantized_cache_factory,
)

B, HKV, D = 2, 2, 16

# Named storage configurations; int4 ones use small groups so that short tests flush often.
SPECS = {
    "int8": dict(kind="int8"),
    "fp8": dict(kind="fp8"),
    "int4_r8g4": dict(kind="int4", residual=8, group_size=4),
    "int4_r0g4": dict(kind="int4", residual=0, group_size=4),
    "int4_tokenkeys_r4g4": dict(kind="int4", key_granularity="token", residual=4, group_size=4),
    "int8_r4g4_vg8": dict(kind="int8", residual=4, group_size=4, value_group_size=8),
}


def spec_of(name: str, **extra) -> KVQuantSpec:
    return KVQuantSpec(**SPECS[name], **extra)


def kv(length: int, seed: int = 0, heads: int = HKV):
    """Keys and values (B, length, heads, D) with a key outlier channel, as real keys have."""
    k = jax.random.normal(jax.random.key(seed), (B, length, heads, D))
    k = k.at[..., 3].multiply(8.0)
    v = jax.random.normal(jax.random.key(seed + 1), (B, length, heads, D))
    return k, v


@functools.cache
def _update_fn():
    return jax.jit(lambda cache, k, v: cache.update(k, v))


def fill(spec: KVQuantSpec, k, v, split, *, max_len: int = 48, jit: bool = True):
    cache = QuantizedKVCache.init(spec, batch=B, max_len=max_len, n_kv_heads=k.shape[2], head_dim=D)
    update = _update_fn() if jit else (lambda c, a, b: c.update(a, b))
    pos = 0
    for t in split:
        cache = update(cache, k[:, pos : pos + t], v[:, pos : pos + t])
        pos += t
    assert pos == k.shape[1]
    return cache


# ---------------------------------------------------------------------------------------------
# Spec


def test_spec_defaults_by_kind():
    int4, int8, fp8 = (KVQuantSpec(kind=k) for k in ("int4", "int8", "fp8"))
    assert (int4.key_granularity, int4.residual, int4.group_size, int4.window) == (
        "channel",
        128,
        32,
        159,
    )
    assert (int8.key_granularity, int8.residual, int8.group_size, int8.window) == ("token", 0, 1, 0)
    assert fp8.format.name == "fp8_e4m3" and int4.format.name == "uint4"
    assert KVQuantSpec(kind="int8", residual=16).group_size == 32
    # Resolved defaults make equal specs equal, so they share compiled functions.
    assert KVQuantSpec(kind="int4") == KVQuantSpec(kind="int4", residual=128, group_size=32)
    assert hash(KVQuantSpec(kind="fp8", scale_dtype="float32")) == hash(
        KVQuantSpec(kind="fp8", scale_dtype=jnp.float32)
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="int2"), "`kind`"),
        (dict(kind="int4", key_granularity="head"), "`key_granularity`"),
        (dict(kind="int4", residual=-1), "`residual`"),
        (dict(kind="int4", group_size=0), "`group_size`"),
        (dict(kind="int4", key_group_size=8), "`key_group_size`"),
        (dict(kind="int8", scale_dtype=jnp.int8), "`scale_dtype`"),
    ],
    ids=["kind", "granularity", "residual", "group", "key_group_channel", "scale_dtype"],
)
def test_spec_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVQuantSpec(**kwargs)


def test_init_rejects_group_not_dividing_head_dim():
    spec = KVQuantSpec(kind="int8", value_group_size=5)
    with pytest.raises(ValueError, match="`value_group_size`"):
        QuantizedKVCache.init(spec, batch=1, max_len=8, n_kv_heads=1, head_dim=D)
    with pytest.raises(TypeError, match="`spec`"):
        QuantizedKVCache.init("int8", batch=1, max_len=8, n_kv_heads=1, head_dim=D)


def test_update_rejects_mismatched_shapes():
    cache = QuantizedKVCache.init(spec_of("int8"), batch=B, max_len=8, n_kv_heads=HKV, head_dim=D)
    k, v = kv(3)
    with pytest.raises(ValueError, match="`k_new` and `v_new`"):
        cache.update(k, v[:, :2])


# ---------------------------------------------------------------------------------------------
# Block quantization: error bounds of each format


def _block_stats(x, block):
    b, s, h, d = x.shape
    xb = np.asarray(x, np.float64).reshape(b, s // block[0], block[0], h, d // block[1], block[1])
    expand = lambda a: np.broadcast_to(a[:, :, None, :, :, None], xb.shape).reshape(x.shape)
    return (
        expand(np.abs(xb).max(axis=(2, 5))),
        expand(xb.min(axis=(2, 5))),
        expand(xb.max(axis=(2, 5))),
    )


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "fmt_name, block",
    [("int8", (1, D)), ("fp8_e4m3", (1, D)), ("uint4", (4, 1)), ("uint4", (1, 8))],
    ids=["int8_token", "fp8_token", "uint4_channel_g4", "uint4_token_c8"],
)
def test_block_roundtrip_error_bound(fmt_name, block, scale_dtype):
    fmt = formats.get(fmt_name)
    x, _ = kv(16, seed=3)
    x = x.at[0, :4].set(0.0)  # all-zero blocks: zero codes, no division by zero
    codes, scale, offset = quantize_blocks(x, fmt, block, jnp.dtype(scale_dtype))
    assert scale.dtype == jnp.dtype(scale_dtype)
    stored_dtype = jnp.uint8 if fmt.kind == "float" else fmt.storage_dtype  # fp8: bit patterns
    assert codes.dtype == stored_dtype and codes.shape[-1] == (D // 2 if fmt.packed else D)
    y = dequantize_blocks(codes, scale, offset, fmt, block, D)
    assert np.all(np.isfinite(y)) and np.all(np.asarray(y)[0, :4] == 0.0)
    err = np.abs(np.asarray(y, np.float64) - np.asarray(x, np.float64))
    amax, lo, hi = _block_stats(x, block)
    if fmt_name == "int8":
        bound = amax / 127 / 2 * (1 + 1e-3)
    elif fmt_name == "fp8_e4m3":  # 3 mantissa bits: half an ulp is 2^-4 relative; subnormals
        bound = np.maximum(2.0**-4 * np.abs(np.asarray(x)), 2.0**-10 * amax / 448) * (1 + 1e-3)
    else:  # asymmetric: half a step, plus the rounding of the offset to the scale dtype
        bound = (hi - lo) / 15 / 2 * (1 + 1e-3) + 2.0**-10 * np.maximum(np.abs(lo), np.abs(hi))
    assert np.all(err <= bound + 1e-7), float((err - bound).max())


# ---------------------------------------------------------------------------------------------
# Appending: storage is independent of how tokens arrive


SPLITS = {"prefill": [29], "token_by_token": [1] * 29, "chunks": [13, 1, 1, 13, 1]}


@pytest.mark.parametrize("name", SPECS)
def test_append_equals_one_shot_quantization(name):
    """Prefill, token by token or in chunks: the same storage, bit-exact with quantizing the
    flushed prefix at once, and the window holding the appended values themselves."""
    spec = spec_of(name)
    k, v = kv(29)
    kb, vb = spec.blocks(D)
    g, r = spec.group_size, spec.residual
    for split in SPLITS.values():
        cache = fill(spec, k, v, split)
        length, flushed = int(cache.length), int(cache.flushed)
        assert length == 29 and flushed == g * (max(length - r, 0) // g)
        keys, values = (np.asarray(a[:, :length]) for a in cache.dequantize())
        for got, x, block in ((keys, k, kb), (values, v, vb)):
            stored = quantize_blocks(x[:, :flushed], spec.format, block, spec.scale_dtype)
            ref = dequantize_blocks(*stored, spec.format, block, D)
            np.testing.assert_array_equal(got[:, :flushed], np.asarray(ref))
            np.testing.assert_array_equal(got[:, flushed:], np.asarray(x[:, flushed:]))


def test_kivi_channel_keys_beat_token_keys():
    """KIVI's reason for per-channel key scales: a few key channels carry a large, nearly
    constant value, which inflates every per-token range; per-channel int4 keys follow it."""
    k, v = kv(32, seed=9)
    k = k.at[..., 3].set(10.0 + 0.5 * k[..., 3] / 8).at[..., 7].add(-6.0)
    errors = {}
    for granularity in ("channel", "token"):
        spec = KVQuantSpec(kind="int4", key_granularity=granularity, residual=0, group_size=8)
        keys = fill(spec, k, v, [32], max_len=32).dequantize()[0][:, :32]
        errors[granularity] = float(jnp.linalg.norm(keys - k) / jnp.linalg.norm(k))
    assert errors["channel"] < errors["token"] / 3, errors


@pytest.mark.parametrize("name", ["int4_r8g4", "int4_r0g4"])
def test_int4_window_flushes_group_by_group(name):
    spec = spec_of(name)
    g, r = spec.group_size, spec.residual
    k, v = kv(30, seed=7)
    cache = QuantizedKVCache.init(spec, batch=B, max_len=32, n_kv_heads=HKV, head_dim=D)
    update = _update_fn()
    for length in range(1, 31):
        before = int(cache.flushed)
        cache = update(cache, k[:, length - 1 : length], v[:, length - 1 : length])
        flushed = int(cache.flushed)
        n = length - flushed
        # At least `residual` recent tokens stay full precision, at most residual + g - 1.
        assert flushed % g == 0 and flushed - before in (0, g)
        assert (r <= n < r + g) if length >= r else n == length
        np.testing.assert_array_equal(cache.k_recent[:, :n], k[:, flushed:length])
        np.testing.assert_array_equal(cache.v_recent[:, :n], v[:, flushed:length])
        if flushed > before:  # the group just flushed is quantized on its own, then packed
            codes, scale, offset = quantize_blocks(
                k[:, before:flushed], spec.format, (g, 1), spec.scale_dtype
            )
            np.testing.assert_array_equal(cache.k_codes[:, before:flushed], codes)
            np.testing.assert_array_equal(cache.k_scale[:, before // g], scale[:, 0])
            np.testing.assert_array_equal(cache.k_offset[:, before // g], offset[:, 0])
    # Capacity: max_len rounded up to 64 tokens (pages of the decode-attention kernel).
    assert cache.k_codes.dtype == jnp.uint8 and cache.k_codes.shape == (B, 64, HKV, D // 2)


def test_jit_scan_matches_eager():
    spec = spec_of("int4_r0g4")
    k, v = kv(9)
    q = jax.random.normal(jax.random.key(5), (B, 9, 3 * HKV, D))
    eager = fill(spec, k[:, :5], v[:, :5], [5], max_len=12, jit=False)
    outs = []
    for t in range(5, 9):  # the last step flushes the group [4, 8)
        eager = eager.update(k[:, t : t + 1], v[:, t : t + 1])
        outs.append(eager.attend(q[:, t : t + 1]))

    @jax.jit
    def scanned(cache, ks, vs, qs):
        def step(c, x):
            c = c.update(x[0][:, None], x[1][:, None])
            return c, c.attend(x[2][:, None])

        xs = tuple(a.swapaxes(0, 1) for a in (ks, vs, qs))
        return jax.lax.scan(step, cache, xs)

    start = fill(spec, k[:, :5], v[:, :5], [5], max_len=12)
    final, scan_outs = scanned(start, k[:, 5:], v[:, 5:], q[:, 5:])
    np.testing.assert_allclose(
        scan_outs[:, :, 0].swapaxes(0, 1), jnp.concatenate(outs, axis=1), rtol=1e-5, atol=1e-6
    )
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(eager), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Attention


def _fp_cache(k, v, max_len):
    cache = KVCache.init(batch=B, max_len=max_len, n_kv_heads=k.shape[2], head_dim=D)
    return cache.update(k, v)


@pytest.mark.parametrize("name", ["int8", "fp8", "int4_r8g4", "int4_r0g4"])
def test_attend_is_attention_over_stored_values_gqa(name):
    """Prefill 13 + decode 1 with 6 query heads on 2 KV heads: `attend` equals full-precision
    attention over exactly the values the cache holds, and is close to it over the originals."""
    spec = spec_of(name)
    k, v = kv(14, seed=11)
    q = jax.random.normal(jax.random.key(12), (B, 14, 3 * HKV, D))
    cache = fill(spec, k[:, :13], v[:, :13], [13], max_len=16)
    prefill_out = cache.attend(q[:, :13])
    cache = _update_fn()(cache, k[:, 13:], v[:, 13:])
    decode_out = cache.attend(q[:, 13:])
    keys, values = (a[:, :14] for a in cache.dequantize())
    stored = _fp_cache(keys, values, 16)
    np.testing.assert_allclose(decode_out, stored.attend(q[:, 13:]), rtol=1e-5, atol=1e-6)
    # The prefill queries saw the 13 tokens as stored after that update.
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((13, 13), bool)), (B, 13, 13))
    k13, v13 = (a[:, :13] for a in fill(spec, k[:, :13], v[:, :13], [13], max_len=16).dequantize())
    np.testing.assert_allclose(
        prefill_out, dot_product_attention(q[:, :13], k13, v13, causal), rtol=1e-5, atol=1e-6
    )
    exact = _fp_cache(k, v, 16).attend(q[:, 13:])
    rel = float(jnp.linalg.norm(decode_out - exact) / jnp.linalg.norm(exact))
    # Measured 0.011-0.021 (int8), 0.022-0.032 (fp8), 0.026-0.066 (int4) over query seeds:
    # per-token key scales pay for the outlier channel.
    assert rel < {"int8": 0.04, "fp8": 0.06}.get(name, 0.12), rel
    assert rel > 0  # the quantization is really there


def test_int4_window_covering_everything_is_exact():
    spec = KVQuantSpec(kind="int4", residual=16, group_size=4)
    k, v = kv(16, seed=2)
    q = jax.random.normal(jax.random.key(3), (B, 1, 2 * HKV, D))
    cache = fill(spec, k, v, [12, 1, 1, 1, 1], max_len=16)
    assert int(cache.flushed) == 0
    np.testing.assert_allclose(cache.attend(q), _fp_cache(k, v, 16).attend(q), rtol=1e-5, atol=1e-6)


def test_bfloat16_window_and_output():
    factory = quantized_cache_factory("int4", residual=4, group_size=4, dtype=jnp.bfloat16)
    cache = factory(make_config(), B, 16)[0]
    k, v = (a[..., :8].astype(jnp.bfloat16) for a in kv(9))  # head_dim 8
    cache = _update_fn()(cache, k, v)
    out = jax.jit(lambda c, q: c.attend(q))(cache, jnp.ones((B, 1, 6, 8), jnp.bfloat16))
    assert cache.k_recent.dtype == jnp.bfloat16 and out.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out, np.float32)))


# ---------------------------------------------------------------------------------------------
# In the model


def make_config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=61, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=80)
    return LlamaConfig(**{**base, "max_seq_len": 64, "tie_embeddings": False, **overrides})


@functools.cache
def model_and_params():
    config = make_config()
    model = Llama(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    # Norm scales start at one: perturb every vector so that every parameter matters.
    params = jax.tree.map(
        lambda x: (
            x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape) if x.ndim == 1 else x
        ),
        params,
    )
    return model, params


def _tokens(n, seed=1):
    return np.asarray(jax.random.randint(jax.random.key(seed), (n,), 0, 61), np.int32)


@pytest.mark.parametrize(
    "kind, opts, tol",
    [("int8", {}, 0.01), ("fp8", {}, 0.05), ("int4", dict(residual=4, group_size=4), 0.1)],
    ids=["int8", "fp8", "int4_r4g4"],
)
def test_model_logits_close_to_full_precision(kind, opts, tol):
    model, params = model_and_params()
    tokens = jnp.asarray(_tokens(2 * 24).reshape(2, 24))
    apply = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))

    def run(factory):
        cache = factory(model.config, 2, 24)
        logits, cache = apply(params, tokens[:, :16], cache)
        steps = [logits]
        for t in range(16, 24):
            logits, cache = apply(params, tokens[:, t : t + 1], cache)
            steps.append(logits)
        return jnp.concatenate(steps, axis=1)

    fp, quant = run(init_cache), run(quantized_cache_factory(kind, **opts))
    rel = float(jnp.linalg.norm(quant - fp) / jnp.linalg.norm(fp))
    assert 0 < rel < tol, rel


def test_generate_with_quantized_cache_factory():
    model, params = model_and_params()
    prompt = jnp.asarray(_tokens(10).reshape(2, 5))
    fp = generate(model, params, prompt, 8)
    # A window wider than the generation keeps everything exact: same tokens.
    wide = quantized_cache_factory("int4", residual=16, group_size=4)
    np.testing.assert_array_equal(generate(model, params, prompt, 8, cache_factory=wide), fp)


def test_factory_is_hashable_value():
    a, b = (
        quantized_cache_factory("int4", residual=32),
        quantized_cache_factory("int4", residual=32),
    )
    assert a == b and hash(a) == hash(b) and isinstance(a, QuantizedCacheFactory)
    assert a != quantized_cache_factory("int4", residual=0)
    with pytest.raises(ValueError, match="`kind`"):
        quantized_cache_factory("int3")


# ---------------------------------------------------------------------------------------------
# Decode-path perplexity


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(prefix=5), dict(stride=10, windows=4)],
    ids=["no_prefix", "prefix5", "stride10"],
)
def test_decode_perplexity_equals_full_forward_with_fp_cache(kwargs):
    model, params = model_and_params()
    tokens = _tokens(100, seed=4)
    windows = kwargs.pop("windows", 5)
    prefix = kwargs.pop("prefix", 0)
    full = perplexity(model.apply, params, tokens, ctx=16, windows=windows, batch_size=2, **kwargs)
    dec = decode_perplexity(
        model, params, tokens, init_cache, ctx=16, windows=windows, batch_size=2, prefix=prefix,
        **kwargs,
    )  # fmt: skip
    assert (dec.n_tokens, dec.n_windows, dec.stride) == (full.n_tokens, full.n_windows, full.stride)
    assert abs(dec.nll - full.nll) < 1e-5 * full.nll, (dec.nll, full.nll)


def test_decode_perplexity_measures_cache_error():
    model, params = model_and_params()
    tokens = _tokens(100, seed=4)
    run = functools.partial(decode_perplexity, model, params, tokens, ctx=16, windows=4)
    fp = run(init_cache).ppl
    int8 = run(quantized_cache_factory("int8")).ppl
    int4 = run(quantized_cache_factory("int4", residual=0, group_size=4)).ppl
    assert int8 != fp and abs(int8 / fp - 1) < 0.005
    assert abs(int4 / fp - 1) > abs(int8 / fp - 1)  # 4 bits lose more than 8
    with pytest.raises(ValueError, match="`prefix`"):
        run(init_cache, prefix=15)


# ---------------------------------------------------------------------------------------------
# Memory report


def test_memory_report_smollm2_shapes():
    config = make_config(n_layers=30, n_heads=9, n_kv_heads=3, dim=576, max_seq_len=8192)
    bf16 = kv_cache_memory(config, 8192, "float")
    assert bf16.bytes_per_token == 2 * 30 * 3 * 64 * 2 and bf16.ratio == 1.0
    int8 = kv_cache_memory(config, 8192, "int8")
    assert int8.bytes_per_token == 2 * 30 * 3 * (64 + 2)  # codes + float16 scale per head
    int4 = kv_cache_memory(config, 32768, "int4", batch=2)
    # K: 32 code bytes + float16 scale and offset per channel per 32 tokens; V: 32 + 2 x 2.
    assert int4.bytes_per_token == 30 * 3 * (32 + 64 * 4 / 32 + 32 + 4)
    window = 2 * 30 * 2 * 159 * 3 * 64 * 2  # batch 2, K and V, 159 bf16 slots
    assert int4.total_bytes == 2 * 32768 * int4.bytes_per_token + window + 30 * 8
    assert 0.29 < int4.ratio < 0.31 and 0.51 < int8.ratio < 0.52

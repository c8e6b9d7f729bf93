"""Tests for jqtz.models.llama and jqtz.models.kv_cache on small random models."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqtz.models.kv_cache import KVCache, dot_product_attention
from jqtz.models.llama import (
    Llama,
    LlamaBlock,
    LlamaConfig,
    _generate,
    apply_rope,
    block_name,
    decode_paths,
    generate,
    init_cache,
    interleaved_to_half_rotary,
)

BASE = dict(
    vocab_size=61, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=80, max_seq_len=64
)


def make_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**BASE, "tie_embeddings": False, **overrides})


@functools.cache
def _init_params(config: LlamaConfig, seed: int):
    init = jax.jit(Llama(config).init)
    params = init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    # Norm scales start at one and biases at zero: perturb them so that every parameter matters.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [
        x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def init_params(config: LlamaConfig, seed: int = 0):
    """Random parameters; a fresh tree of dicts each call, so tests may edit it."""
    return jax.tree.map(lambda x: x, _init_params(config, seed))


def random_tokens(config: LlamaConfig, batch: int, length: int, seed: int = 1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_heads=6, n_kv_heads=4), "n_kv_heads"),
        (dict(dim=50), "dim"),
        (dict(dim=48, n_heads=8, n_kv_heads=2, head_dim=5), "head_dim"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(norm_eps=-1.0), "norm_eps"),
        (dict(dtype=jnp.int32), "dtype"),
    ],
    ids=[
        "gqa_ratio",
        "dim_heads",
        "odd_head_dim",
        "zero_layers",
        "neg_vocab",
        "theta",
        "eps",
        "int_dtype",
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        make_config(**overrides)


def test_config_is_frozen_keyword_only_and_hashable():
    a = make_config(dtype=jnp.bfloat16)
    b = make_config(dtype="bfloat16")
    assert a == b and hash(a) == hash(b)
    assert a.head_dim == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dim = 3
    with pytest.raises(TypeError):
        LlamaConfig(61, 48, 3, 6, 2, 80, 64, False)


# ---------------------------------------------------------------------------------------------
# Parameter layout


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_param_tree_layout(tie, bias):
    c = make_config(tie_embeddings=tie, attention_bias=bias)
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.tree.map(
        lambda x: x.shape, jax.eval_shape(Llama(c).init, jax.random.key(0), tokens)
    )["params"]
    hd = c.head_dim
    expected = {
        "embed_tokens": {"embedding": (c.vocab_size, c.dim)},
        "norm": {"scale": (c.dim,)},
    }
    proj = {
        "q_proj": (c.dim, c.n_heads * hd),
        "k_proj": (c.dim, c.n_kv_heads * hd),
        "v_proj": (c.dim, c.n_kv_heads * hd),
        "o_proj": (c.n_heads * hd, c.dim),
    }
    for i in range(c.n_layers):
        expected[block_name(i)] = {
            "input_layernorm": {"scale": (c.dim,)},
            "post_attention_layernorm": {"scale": (c.dim,)},
            "self_attn": {
                k: {"kernel": s, **({"bias": (s[1],)} if bias else {})} for k, s in proj.items()
            },
            "mlp": {
                "gate_proj": {"kernel": (c.dim, c.hidden_dim)},
                "up_proj": {"kernel": (c.dim, c.hidden_dim)},
                "down_proj": {"kernel": (c.hidden_dim, c.dim)},
            },
        }
    if not tie:
        expected["lm_head"] = {"kernel": (c.dim, c.vocab_size)}
    assert shapes == expected


def test_tied_head_equals_untied_head_with_embedding_transpose():
    untied = make_config()
    tied = make_config(tie_embeddings=True)
    params = init_params(untied)
    embedding = params["params"]["embed_tokens"]["embedding"]
    params["params"]["lm_head"]["kernel"] = embedding.T
    tied_params = {"params": {k: v for k, v in params["params"].items() if k != "lm_head"}}
    tokens = random_tokens(untied, 2, 7)
    np.testing.assert_allclose(
        Llama(tied).apply(tied_params, tokens),
        Llama(untied).apply(params, tokens),
        rtol=1e-6,
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# Pieces against plain numpy


def test_rmsnorm_matches_hf_formula():
    c = make_config()
    params = init_params(c)
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, c.dim)) * 3.0)
    scale = np.asarray(params["params"]["norm"]["scale"])
    expected = scale * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.norm_eps))
    logits = Llama(c).apply(params, jnp.asarray(x), method=Llama.head)
    np.testing.assert_allclose(
        logits, expected @ np.asarray(params["params"]["lm_head"]["kernel"]), rtol=1e-5, atol=1e-5
    )


def test_attention_matches_numpy_with_repeated_kv_heads():
    rng = np.random.default_rng(0)
    b, t, h, hkv, d = 2, 5, 6, 2, 4
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, t, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, t, hkv, d)).astype(np.float32)
    mask = np.tril(np.ones((t, t), bool))
    k_rep, v_rep = np.repeat(k, h // hkv, axis=2), np.repeat(v, h // hkv, axis=2)  # repeat_kv
    scores = np.einsum("bthd,bshd->bhts", q, k_rep) / np.sqrt(d)
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bhts,bshd->bthd", probs, v_rep)
    got = dot_product_attention(q, k, v, jnp.broadcast_to(mask, (b, t, t)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(m, n):
        qm = apply_rope(q, jnp.array([m]), 10000.0)
        kn = apply_rope(k, jnp.array([n]), 10000.0)
        return float(jnp.sum(qm * kn))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(3, 7), rel=1e-2)


def _interleaved_rope(x, pos, theta):
    """Meta/llama2.c RoPE: rotate the pairs (2i, 2i+1) as complex numbers; x (T, D)."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (np.arange(0, d, 2) / d)
    z = (x[:, 0::2] + 1j * x[:, 1::2]) * np.exp(1j * pos[:, None] * freqs)
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def test_interleaved_to_half_rotary_preserves_attention_scores():
    rng = np.random.default_rng(0)
    n_heads, d, dim, t = 3, 8, 10, 6
    wq = rng.normal(size=(dim, n_heads * d))
    wk = rng.normal(size=(dim, n_heads * d))
    x = rng.normal(size=(t, dim))
    pos = np.arange(t) + 5.0
    q_perm = interleaved_to_half_rotary(wq, n_heads, d)
    k_perm = interleaved_to_half_rotary(wk, n_heads, d)
    for h in range(n_heads):
        cols = slice(h * d, (h + 1) * d)
        ref = (
            _interleaved_rope((x @ wq)[:, cols], pos, 1e4)
            @ _interleaved_rope((x @ wk)[:, cols], pos, 1e4).T
        )
        qh = apply_rope(jnp.asarray((x @ q_perm)[None, :, None, cols]), pos, 1e4)[0, :, 0]
        kh = apply_rope(jnp.asarray((x @ k_perm)[None, :, None, cols]), pos, 1e4)[0, :, 0]
        np.testing.assert_allclose(qh @ kh.T, ref, rtol=1e-4, atol=1e-4)


def test_interleaved_to_half_rotary_works_on_bias_and_rejects_bad_shapes():
    np.testing.assert_array_equal(
        interleaved_to_half_rotary(np.arange(8), 2, 4), [0, 2, 1, 3, 4, 6, 5, 7]
    )
    with pytest.raises(ValueError, match="n_heads \\* head_dim"):
        interleaved_to_half_rotary(np.zeros((3, 10)), 2, 4)


def test_gqa_equals_mha_with_duplicated_kv_heads():
    gqa = make_config(n_kv_heads=2)
    mha = make_config(n_kv_heads=6)
    params = init_params(gqa)
    mha_params = jax.tree.map(lambda x: x, params)
    d, group = gqa.head_dim, gqa.n_heads // gqa.n_kv_heads
    for i in range(gqa.n_layers):
        attn = mha_params["params"][block_name(i)]["self_attn"]
        for name in ("k_proj", "v_proj"):
            kernel = attn[name]["kernel"].reshape(gqa.dim, gqa.n_kv_heads, 1, d)
            attn[name] = {"kernel": jnp.repeat(kernel, group, axis=2).reshape(gqa.dim, -1)}
    tokens = random_tokens(gqa, 2, 9)
    np.testing.assert_allclose(
        Llama(gqa).apply(params, tokens),
        Llama(mha).apply(mha_params, tokens),
        rtol=1e-5,
        atol=1e-5,
    )


# ---------------------------------------------------------------------------------------------
# Block-wise execution and the KV cache


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_blockwise_run_equals_full_forward(tie):
    c = make_config(tie_embeddings=tie)
    params = init_params(c)
    tokens = random_tokens(c, 2, 11)
    model = Llama(c)
    x = model.apply(params, tokens, method=Llama.embed)
    assert x.shape == (2, 11, c.dim)
    positions = jnp.arange(11)
    for i in range(c.n_layers):
        x = LlamaBlock(c).apply({"params": params["params"][block_name(i)]}, x, positions)
    logits = model.apply(params, x, method=Llama.head)
    np.testing.assert_allclose(logits, model.apply(params, tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "prompt_len, jit",
    [(1, True), (7, True), (15, True), (13, False)],
    ids=["p1-jit", "p7-jit", "p15-jit", "p13-eager"],
)
def test_prefill_then_decode_equals_full_forward(prompt_len, jit):
    c = make_config()
    params = init_params(c)
    model = Llama(c)
    tokens = random_tokens(c, 2, 16)
    maybe_jit = jax.jit if jit else lambda f: f
    full = maybe_jit(model.apply)(params, tokens)
    step = maybe_jit(lambda p, t, cache: model.apply(p, t, cache=cache))

    cache = init_cache(c, batch=2, max_len=c.max_seq_len)
    prefill, cache = step(params, tokens[:, :prompt_len], cache)
    decoded = [prefill]
    for t in range(prompt_len, 16):
        logits, cache = step(params, tokens[:, t : t + 1], cache)
        decoded.append(logits)
    assert int(cache[0].length) == 16
    scale = float(jnp.abs(full).max())
    np.testing.assert_allclose(jnp.concatenate(decoded, axis=1), full, atol=2e-6 * scale, rtol=0)


def test_kv_cache_update_writes_at_length_and_masks_the_rest():
    cache = KVCache.init(batch=1, max_len=6, n_kv_heads=1, head_dim=2)
    k1 = jnp.ones((1, 2, 1, 2))
    cache = cache.update(k1, 2 * k1)
    cache = cache.update(3 * k1[:, :1], 4 * k1[:, :1])
    np.testing.assert_array_equal(cache.keys[0, :, 0, 0], [1, 1, 3, 0, 0, 0])
    np.testing.assert_array_equal(cache.values[0, :, 0, 0], [2, 2, 4, 0, 0, 0])
    # The last query (position 2) averages values weighted by its scores; the unfilled slots
    # (keys 0, values 0) would pull the result toward 0 if they were not masked.
    out = cache.attend(jnp.zeros((1, 1, 1, 2)))  # equal scores for every visible key
    np.testing.assert_allclose(out[0, 0, 0], [8 / 3, 8 / 3], rtol=1e-6)


def test_cache_must_have_one_entry_per_layer():
    c = make_config()
    params = init_params(c)
    with pytest.raises(ValueError, match="`cache`"):
        Llama(c).apply(params, random_tokens(c, 1, 3), cache=init_cache(c, 1, 8)[:1])


def test_bfloat16_compute_stays_close_to_float32():
    c32 = make_config()
    c16 = make_config(dtype=jnp.bfloat16)
    params = init_params(c32)
    tokens = random_tokens(c32, 2, 12)
    ref = Llama(c32).apply(params, tokens)
    got = Llama(c16).apply(params, tokens)
    assert got.dtype == jnp.float32
    err = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
    assert 0 < err < 0.05


# ---------------------------------------------------------------------------------------------
# Generation


def _greedy_loop(model, params, prompt, n):
    """A Python loop over tokens, one jitted model call per step."""
    step = jax.jit(lambda tokens, cache: model.apply(params, tokens, cache=cache))
    logits, cache = step(prompt, init_cache(model.config, prompt.shape[0], prompt.shape[1] + n))
    out = []
    for _ in range(n):
        token = jnp.argmax(logits[:, -1], axis=-1)
        out.append(token)
        logits, cache = step(token[:, None], cache)
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_jitted_greedy_generate_equals_step_by_step_loop(tie):
    c = make_config(tie_embeddings=tie)
    params = init_params(c)
    prompt = random_tokens(c, 3, 5)
    expected = _greedy_loop(Llama(c), params, prompt, 12)
    got = generate(c, params, prompt, 12)
    assert got.shape == (3, 12) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, expected)
    # Greedy output is not constant, so the comparison above has something to compare.
    assert len(np.unique(np.asarray(got))) > 1


def test_generate_compiles_once_per_shape():
    c = make_config()
    prompt = random_tokens(c, 1, 4)
    generate(c, init_params(c, seed=0), prompt, 6)
    before = _generate._cache_size()
    generate(Llama(c), init_params(c, seed=1), prompt + 1, 6)
    assert _generate._cache_size() == before


def test_sampling_is_reproducible_and_low_temperature_is_greedy():
    c = make_config()
    params = init_params(c)
    prompt = random_tokens(c, 2, 4)
    a = generate(c, params, prompt, 10, temperature=1.0, rng=jax.random.key(5))
    b = generate(c, params, prompt, 10, temperature=1.0, rng=jax.random.key(5))
    others = [
        generate(c, params, prompt, 10, temperature=1.0, rng=jax.random.key(seed))
        for seed in range(3)
    ]
    np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, o) for o in others)
    cold = generate(c, params, prompt, 10, temperature=1e-4, rng=jax.random.key(5))
    np.testing.assert_array_equal(cold, generate(c, params, prompt, 10))


def test_generate_pads_with_eos_after_eos():
    c = make_config()
    params = init_params(c)
    prompt = random_tokens(c, 2, 4)
    free = np.asarray(generate(c, params, prompt, 10))
    eos = int(free[0, 3])  # a token the first sequence emits at step 3
    got = np.asarray(generate(c, params, prompt, 10, eos_id=eos))
    for row_free, row in zip(free, got, strict=True):
        hits = np.flatnonzero(row_free == eos)
        stop = hits[0] if hits.size else len(row)
        np.testing.assert_array_equal(row[:stop], row_free[:stop])
        assert (row[stop:] == eos).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=100), "max_seq_len"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.7), "`rng`"),
        (dict(temperature=-1.0), "`temperature`"),
    ],
    ids=["too_long", "zero_tokens", "no_rng", "negative_temperature"],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    c = make_config()
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(c, init_params(c), random_tokens(c, 1, 3), **args)


def test_decode_paths_name_the_kernel_or_xla_for_each_product_and_the_attention():
    """What one decode step would run on an H100, asked from this CPU: W4A16 products on the
    kernel with 16-bit activations, XLA with float32 ones (the kernels take 16-bit inputs),
    the int8 cache's attention on the kernel, the full-precision cache's on XLA; the untied
    output head (not quantized by default) is not a quantized product."""
    import jqtz
    from jqtz.models.quantized_kv_cache import quantized_cache_factory

    config = make_config(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128)
    spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=32)
    qparams = jqtz.quantize_params(_init_params(config, 0), [jqtz.Rule(r".*/kernel", spec)])
    h100 = dict(backend="gpu", compute_capability=(9, 0))
    bf16 = dataclasses.replace(config, dtype=jnp.bfloat16)
    paths = decode_paths(bf16, qparams, cache_factory=quantized_cache_factory("int8"), **h100)
    assert paths.pop("attention") == "kernel"
    assert len(paths) == 7 * config.n_layers and set(paths.values()) == {"w4a16"}
    assert all(p.endswith("kernel") and "lm_head" not in p for p in paths)
    paths = decode_paths(config, qparams, **h100)  # float32 activations, float cache
    assert set(paths.values()) == {"xla"}
    assert set(decode_paths(bf16, qparams).values()) == {"xla"}  # this CPU

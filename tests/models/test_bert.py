"""Tests of jqtz.models.bert on small random models (the real MiniLM is in tests/io)."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqtz.models import bert
from jqtz.models.bert import BertConfig, BertEmbeddings, BertLayer, BertModel, mean_pool

TINY = dict(vocab_size=50, hidden=16, n_layers=2, n_heads=4, intermediate=32, max_position=24)


def random_params(config: BertConfig, seed: int = 0) -> dict:
    """Params with every leaf random (flax's init leaves biases 0 and LayerNorm scales 1)."""
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(BertModel(config).init, jax.random.key(0), ids, ids)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(
            rng.normal(size=s.shape) * (0.3 if s.ndim == 2 else 0.1) + (s.ndim == 1), jnp.float32
        ),
        shapes,
    )


@pytest.fixture(scope="module")
def tiny():
    config = BertConfig(**TINY)
    return config, random_params(config)


def eager_embeddings(config, params, ids, mask):
    return mean_pool(BertModel(config).apply({"params": params}, ids, mask), mask)


embeddings = jax.jit(eager_embeddings, static_argnums=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("hidden", -16),
        ("n_layers", 1.5),
        ("n_heads", True),
        ("intermediate", None),
        ("max_position", 0),
        ("type_vocab_size", 0),
        ("layer_norm_eps", 0.0),
        ("layer_norm_eps", 2.0),
        ("dtype", jnp.int32),
        ("dtype", "no-such-dtype"),
        ("hidden", 18),  # not a multiple of n_heads=4
    ],
    ids=lambda v: str(v),
)
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        BertConfig(**{**TINY, field: value})


def test_config_is_frozen_keyword_only_and_hashable():
    config = BertConfig(**TINY, dtype="bfloat16")
    assert config.dtype == jnp.bfloat16
    assert hash(config) == hash(BertConfig(**TINY, dtype=jnp.bfloat16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden = 32
    with pytest.raises(TypeError):
        BertConfig(*TINY.values())


def test_parameter_paths_follow_hf_names(tiny):
    config, params = tiny
    paths = {
        "/".join(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    d, f = config.hidden, config.intermediate
    expected = {
        "embeddings/word_embeddings/embedding": (config.vocab_size, d),
        "embeddings/position_embeddings/embedding": (config.max_position, d),
        "embeddings/token_type_embeddings/embedding": (config.type_vocab_size, d),
        "embeddings/LayerNorm/scale": (d,),
        "embeddings/LayerNorm/bias": (d,),
    }
    for i in range(config.n_layers):
        for name, shape in [("query", (d, d)), ("key", (d, d)), ("value", (d, d)),
                            ("output", (d, d))]:  # fmt: skip
            expected[f"layer_{i}/attention/{name}/kernel"] = shape
            expected[f"layer_{i}/attention/{name}/bias"] = shape[1:]
        for name, shape in [("intermediate", (d, f)), ("output", (f, d))]:  # [in, out]
            expected[f"layer_{i}/{name}/kernel"] = shape
            expected[f"layer_{i}/{name}/bias"] = shape[1:]
        for norm in ("attention_norm", "output_norm"):
            expected[f"layer_{i}/{norm}/scale"] = (d,)
            expected[f"layer_{i}/{norm}/bias"] = (d,)
    assert paths == expected


def test_model_is_embeddings_then_standalone_layers(tiny):
    config, params = tiny
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    x = BertEmbeddings(config).apply({"params": params["embeddings"]}, ids, jnp.zeros_like(ids))
    for i in range(config.n_layers):
        x = BertLayer(config).apply({"params": params[f"layer_{i}"]}, x, mask)
    np.testing.assert_array_equal(x, BertModel(config).apply({"params": params}, ids, mask))


def test_padding_invariance(tiny):
    """A sentence alone and padded beside a longer one (garbage ids in the padding)."""
    config, params = tiny
    short = jnp.array([[2, 11, 12, 13, 3]])
    long = jax.random.randint(jax.random.key(3), (1, 12), 0, config.vocab_size)
    garbage = jax.random.randint(jax.random.key(4), (1, 7), 0, config.vocab_size)
    batch = jnp.concatenate([jnp.concatenate([short, garbage], axis=1), long])
    mask = jnp.array([[1] * 5 + [0] * 7, [1] * 12])
    alone = embeddings(config, params, short, jnp.ones_like(short))
    padded = embeddings(config, params, batch, mask)
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-6)
    # The same batch without the mask attends to the garbage: the mask is what makes it pass.
    unmasked = embeddings(config, params, batch, jnp.ones_like(mask))
    assert np.abs(unmasked[0] - alone[0]).max() > 1e-2


def test_jit_matches_eager(tiny):
    config, params = tiny
    ids = jax.random.randint(jax.random.key(5), (3, 9), 0, config.vocab_size)
    mask = (jnp.arange(9)[None, :] < jnp.array([[9], [5], [2]])).astype(jnp.int32)
    eager = eager_embeddings(config, params, ids, mask)
    jitted = embeddings(config, params, ids, mask)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


def test_token_type_ids_are_used(tiny):
    config, params = tiny
    ids = jnp.array([[2, 11, 12, 3, 13, 3]])
    types = jnp.array([[0, 0, 0, 0, 1, 1]])
    model = BertModel(config)
    one_segment = model.apply({"params": params}, ids)
    two_segments = model.apply({"params": params}, ids, None, types)
    assert np.abs(two_segments - one_segment).max() > 1e-2


def test_mean_pool_masks_normalises_and_survives_empty_rows():
    hidden = jax.random.normal(jax.random.key(6), (3, 5, 8))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    pooled = mean_pool(hidden, mask)
    np.testing.assert_allclose(np.linalg.norm(pooled[:2], axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(pooled[2], 0.0)  # an all-padding row: zeros, not NaN
    changed_padding = hidden.at[0, 3:].set(100.0)
    np.testing.assert_array_equal(mean_pool(changed_padding, mask)[0], pooled[0])
    raw = mean_pool(hidden, mask, normalize=False)
    np.testing.assert_allclose(raw[0], hidden[0, :3].mean(axis=0), rtol=1e-6)


def test_bfloat16_compute_stays_close_to_float32(tiny):
    config, params = tiny
    ids = jax.random.randint(jax.random.key(7), (2, 10), 0, config.vocab_size)
    mask = jnp.ones_like(ids)
    bf16 = dataclasses.replace(config, dtype=jnp.bfloat16)
    hidden = BertModel(bf16).apply({"params": params}, ids, mask)
    assert hidden.dtype == jnp.bfloat16
    cosine = np.sum(embeddings(bf16, params, ids, mask) * embeddings(config, params, ids, mask), -1)
    assert cosine.min() > 0.99


@pytest.mark.parametrize(
    "ids, mask, match",
    [
        (jnp.zeros((25,), jnp.int32), None, "`input_ids` must be"),
        (jnp.zeros((1, 25), jnp.int32), None, "max_position"),
        (jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4)), "`attention_mask`"),
    ],
    ids=["1d", "too_long", "mask_shape"],
)
def test_model_rejects_bad_inputs(tiny, ids, mask, match):
    config, params = tiny
    with pytest.raises(ValueError, match=match):
        BertModel(config).apply({"params": params}, ids, mask)


def test_docstring_examples_run():
    result = doctest.testmod(bert, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

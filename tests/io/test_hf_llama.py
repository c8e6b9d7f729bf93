"""Tests of `jqtz.io.hf_llama` on small random HF Llama folders written in tmp_path."""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import save_file

from jqtz.io.hf_llama import load_hf_llama
from jqtz.models.llama import Llama

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 300,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def hf_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF Llama names, torch layout ([out, in])."""
    rng = np.random.default_rng(seed)
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or dim // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def randn(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    weights = {"model.embed_tokens.weight": randn(config["vocab_size"], dim)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": 1 + randn(dim),
            p + "self_attn.q_proj.weight": randn(q_out, dim),
            p + "self_attn.k_proj.weight": randn(kv_out, dim),
            p + "self_attn.v_proj.weight": randn(kv_out, dim),
            p + "self_attn.o_proj.weight": randn(dim, q_out),
            p + "post_attention_layernorm.weight": 1 + randn(dim),
            p + "mlp.gate_proj.weight": randn(hidden, dim),
            p + "mlp.up_proj.weight": randn(hidden, dim),
            p + "mlp.down_proj.weight": randn(dim, hidden),
        }
        if config.get("attention_bias"):
            weights |= {
                p + "self_attn.q_proj.bias": randn(q_out),
                p + "self_attn.k_proj.bias": randn(kv_out),
                p + "self_attn.v_proj.bias": randn(kv_out),
                p + "self_attn.o_proj.bias": randn(dim),
            }
    weights["model.norm.weight"] = 1 + randn(dim)
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = randn(config["vocab_size"], dim)
    return weights


def write_tokenizer(folder: pathlib.Path) -> None:
    """A byte-level BPE with at most 300 tokens, ids 0 and 1 being <s> and </s>."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )


def write_folder(
    folder: pathlib.Path,
    config: dict,
    weights: dict[str, np.ndarray],
    *,
    shards: int = 1,
) -> pathlib.Path:
    """Writes config.json, the weights (one file or `shards` files + index) and a tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(weights, str(folder / "model.safetensors"))
    else:
        names = sorted(weights)
        weight_map = {}
        for k in range(shards):
            shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = names[k::shards]
            save_file({n: weights[n] for n in part}, str(folder / shard))
            weight_map |= dict.fromkeys(part, shard)
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    write_tokenizer(folder)
    return folder


def jqtz_path(hf_name: str) -> tuple[str, ...]:
    """`model.layers.1.mlp.up_proj.weight` -> ('layers_1', 'mlp', 'up_proj', 'kernel')."""
    if hf_name == "lm_head.weight":
        return ("lm_head", "kernel")
    parts = hf_name.removeprefix("model.").split(".")
    if parts[0] == "layers":
        parts = [f"layers_{parts[1]}", *parts[2:]]
    if parts[0] == "embed_tokens":
        return ("embed_tokens", "embedding")
    leaf = parts[-1]
    if leaf == "weight":
        leaf = "scale" if parts[-2].endswith("norm") else "kernel"
    return (*parts[:-1], leaf)


def lookup(params: dict, path: tuple[str, ...]) -> np.ndarray:
    node = params["params"]
    for name in path:
        node = node[name]
    return node


CASES = {
    "single_f32": ({}, 1, np.float32),
    "sharded3_f32": ({}, 3, np.float32),
    "single_bf16": ({}, 1, ml_dtypes.bfloat16),
    "sharded2_f16": ({}, 2, np.float16),
    "tied": ({"tie_word_embeddings": True}, 1, np.float32),
    "attention_bias": ({"attention_bias": True}, 2, np.float32),
    "gqa_head_dim": ({"head_dim": 32, "num_key_value_heads": 1}, 1, np.float32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    overrides, shards, dtype = CASES[case]
    config = HF_CONFIG | overrides
    stored = {n: w.astype(dtype) for n, w in hf_weights(config).items()}
    folder = write_folder(tmp_path / case, config, stored, shards=shards)

    cfg, params, _ = load_hf_llama(folder)

    assert (cfg.dim, cfg.n_layers, cfg.n_heads) == (64, 2, 4)
    assert cfg.n_kv_heads == config["num_key_value_heads"]
    assert cfg.tie_embeddings == config["tie_word_embeddings"]
    assert cfg.attention_bias == config["attention_bias"]
    n_loaded = len(jax.tree_util.tree_leaves(params))
    assert n_loaded == len(stored)
    for name, array in stored.items():
        path = jqtz_path(name)
        loaded = lookup(params, path)
        expected = array.astype(np.float32)  # bf16 and f16 widen exactly
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(loaded, expected.T if path[-1] == "kernel" else expected)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_params_fit_the_model(tmp_path, tied):
    config = HF_CONFIG | {"tie_word_embeddings": tied}
    cfg, params, tok = load_hf_llama(write_folder(tmp_path, config, hf_weights(config)))
    tokens = jnp.array([tok.encode("the lazy fox", bos=True)])
    model = Llama(cfg)
    expected = jax.eval_shape(model.init, jax.random.key(0), tokens)
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, expected)
    logits = model.apply(params, tokens)
    assert logits.shape == (1, tokens.shape[1], cfg.vocab_size)
    assert bool(jnp.isfinite(logits).all())


def test_matches_transformers(tmp_path):
    """Logits of the loaded model equal those of transformers' LlamaForCausalLM."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = write_folder(tmp_path, HF_CONFIG, hf_weights(HF_CONFIG))
    cfg, params, tok = load_hf_llama(folder)
    ids = tok.encode("the quick brown fox jumps", bos=True)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0].numpy()
    actual = np.asarray(Llama(cfg).apply(params, jnp.array([ids]))[0])
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)


def test_tokenizer(tmp_path):
    _, _, tok = load_hf_llama(write_folder(tmp_path, HF_CONFIG, hf_weights(HF_CONFIG)))
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.vocab_size <= HF_CONFIG["vocab_size"]
    for text in [
        "the lazy dog",
        "  spaces\t\ttabs\n\nnewlines  ",
        "ünïcödé 🤖 中文 1234",
        "<s>x</s>",
    ]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("the", bos=True)[0] == 0
    assert tok.encode("<s></s>") == [0, 1]


def test_special_ids_fall_back_to_config_json(tmp_path):
    config = HF_CONFIG | {"bos_token_id": 1, "eos_token_id": [0, 1]}
    folder = write_folder(tmp_path, config, hf_weights(config))
    (folder / "tokenizer_config.json").unlink()
    _, _, tok = load_hf_llama(folder)
    assert (tok.bos_id, tok.eos_id) == (1, 0)


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_tensor(tmp_path):
    weights = hf_weights(HF_CONFIG)
    del weights["model.layers.1.mlp.up_proj.weight"]
    folder = write_folder(tmp_path, HF_CONFIG, weights)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf_llama(folder)


@pytest.mark.parametrize(
    "name",
    ["model.layers.0.self_attn.k_proj.weight", "model.embed_tokens.weight", "model.norm.weight"],
)
def test_shape_mismatch(tmp_path, name):
    weights = hf_weights(HF_CONFIG)
    weights[name] = np.concatenate([weights[name], weights[name][:1]])
    folder = write_folder(tmp_path, HF_CONFIG, weights)
    with pytest.raises(
        ValueError, match=rf"model\.safetensors: tensor `{name}`: shape .* expected"
    ):
        load_hf_llama(folder)


def test_transposed_weight_is_a_shape_mismatch(tmp_path):
    weights = hf_weights(HF_CONFIG)
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = np.ascontiguousarray(weights[name].T)
    folder = write_folder(tmp_path, HF_CONFIG, weights)
    with pytest.raises(
        ValueError, match=r"shape \(96, 64\) does not match the expected \(64, 96\)"
    ):
        load_hf_llama(folder)


def test_unexpected_tensor(tmp_path):
    weights = hf_weights(HF_CONFIG)
    weights["model.layers.0.mlp.down_proj.qweight"] = np.zeros((4, 4), np.int32)
    with pytest.raises(ValueError, match=r"no place .*down_proj\.qweight"):
        load_hf_llama(write_folder(tmp_path, HF_CONFIG, weights))


def test_integer_tensor(tmp_path):
    weights = hf_weights(HF_CONFIG)
    name = "model.layers.0.input_layernorm.weight"
    weights[name] = weights[name].astype(np.int32)
    with pytest.raises(ValueError, match=rf"`{name}`: dtype I32 is not a float"):
        load_hf_llama(write_folder(tmp_path, HF_CONFIG, weights))


def test_non_finite_tensor(tmp_path):
    weights = hf_weights(HF_CONFIG)
    weights["model.norm.weight"][3] = np.nan
    with pytest.raises(ValueError, match=r"`model\.norm\.weight`: 1 of 64 values are NaN"):
        load_hf_llama(write_folder(tmp_path, HF_CONFIG, weights))


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999], ids=["empty", "header", "half", "tail"])
def test_truncated_file(tmp_path, keep):
    folder = write_folder(tmp_path, HF_CONFIG, hf_weights(HF_CONFIG))
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_hf_llama(folder)


def test_missing_shard(tmp_path):
    folder = write_folder(tmp_path, HF_CONFIG, hf_weights(HF_CONFIG), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"lists the shard model-00002-of-00002\.safetensors"):
        load_hf_llama(folder)


def test_index_disagrees_with_shards(tmp_path):
    folder = write_folder(tmp_path, HF_CONFIG, hf_weights(HF_CONFIG), shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.norm.weight"
    other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors"}
    index["weight_map"][name] = other.get(
        index["weight_map"][name], "model-00001-of-00002.safetensors"
    )
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"`model\.norm\.weight`: missing from this shard"):
        load_hf_llama(folder)


def test_no_weights(tmp_path):
    folder = write_folder(tmp_path, HF_CONFIG, hf_weights(HF_CONFIG))
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"neither model\.safetensors .*pytorch_model\.bin"):
        load_hf_llama(folder)


def test_not_a_llama(tmp_path):
    config = HF_CONFIG | {"model_type": "qwen2"}
    with pytest.raises(ValueError, match=r"config\.json: `model_type` is 'qwen2'"):
        load_hf_llama(write_folder(tmp_path, config, hf_weights(config)))


def test_missing_config_key(tmp_path):
    config = {k: v for k, v in HF_CONFIG.items() if k != "intermediate_size"}
    folder = write_folder(tmp_path, config, hf_weights(HF_CONFIG))
    with pytest.raises(ValueError, match=r"`intermediate_size` is missing"):
        load_hf_llama(folder)


@pytest.mark.parametrize(
    "overrides",
    [
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
        {"mlp_bias": True},
        {"hidden_act": "gelu"},
    ],
    ids=["rope_scaling", "rope_parameters", "mlp_bias", "gelu"],
)
def test_unsupported_variants(tmp_path, overrides):
    config = HF_CONFIG | overrides
    with pytest.raises(NotImplementedError):
        load_hf_llama(write_folder(tmp_path, config, hf_weights(config)))


def test_rope_parameters_theta(tmp_path):
    config = HF_CONFIG | {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    del config["rope_theta"]
    cfg, _, _ = load_hf_llama(write_folder(tmp_path, config, hf_weights(config)))
    assert cfg.rope_theta == 5e5


def test_missing_tokenizer(tmp_path):
    folder = write_folder(tmp_path, HF_CONFIG, hf_weights(HF_CONFIG))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer\.json is missing"):
        load_hf_llama(folder)


def test_tokenizer_larger_than_embedding(tmp_path):
    config = HF_CONFIG | {"vocab_size": 200}
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model embeds only"):
        load_hf_llama(write_folder(tmp_path, config, hf_weights(config)))

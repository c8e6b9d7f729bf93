"""Tests for jqtz.io.folder: bit-exact round trips, tokenizers, corrupt folders."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jqtz
from jqtz.io.folder import MANIFEST, PARAMS, load_quantized, save_quantized
from jqtz.models.bert import BertConfig
from jqtz.models.llama import LlamaConfig

CONFIG = LlamaConfig(
    vocab_size=32,
    dim=16,
    n_layers=1,
    n_heads=4,
    n_kv_heads=2,
    hidden_dim=32,
    max_seq_len=64,
    tie_embeddings=True,
)

SPECS = {
    "int8": jqtz.QuantSpec(format="int8"),
    "int4_asym_g128_bf16": jqtz.QuantSpec(
        format="int4",
        granularity="group",
        group_size=128,
        symmetric=False,
        scale_dtype="bfloat16",
    ),
    "int4_g96_partial": jqtz.QuantSpec(format="int4", granularity="group", group_size=96),
    "nf4_g64_double_quant": jqtz.QuantSpec(
        format="nf4", granularity="group", group_size=64, double_quant=True
    ),
    "fp8_e4m3_bf16": jqtz.QuantSpec(format="fp8_e4m3", scale_dtype="bfloat16"),
    "fp8_e5m2_block": jqtz.QuantSpec(format="fp8_e5m2", granularity="block", block_shape=(128, 32)),
    "w8a8": jqtz.QuantSpec(format="int8", activation=jqtz.QuantSpec(format="int8", axis=-1)),
}


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype.itemsize == 1 else x.view(f"u{x.dtype.itemsize}")


def assert_bit_exact(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b  # includes every QArray's static metadata
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


def quantized_tree():
    w = jax.random.normal(jax.random.key(0), (256, 64), jnp.float32)
    layers = {name: {"kernel": jqtz.quantize(w, spec)} for name, spec in SPECS.items()}
    return {
        "params": {
            **layers,
            "embed_tokens": {"embedding": w.astype(jnp.bfloat16)},
            "norm": {"scale": jnp.ones((64,), jnp.float16)},
            "steps": {"count": jnp.arange(3, dtype=jnp.int32)},
        }
    }


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_is_bit_exact(tmp_path, name):
    params = {"params": {"layer": {"kernel": quantized_tree()["params"][name]["kernel"]}}}
    save_quantized(tmp_path / "out", kind="llama", config=CONFIG, params=params, tokenizer=None)
    kind, config, loaded, tokenizer = load_quantized(tmp_path / "out")
    assert (kind, config, tokenizer) == ("llama", CONFIG, None)
    assert_bit_exact(params, loaded)
    q = loaded["params"]["layer"]["kernel"]
    assert isinstance(q, jqtz.QArray)
    np.testing.assert_array_equal(q.dequantize(), params["params"]["layer"]["kernel"].dequantize())


def test_round_trip_mixed_tree_and_report(tmp_path):
    params = quantized_tree()
    config = dataclass_replace_dtype(CONFIG, jnp.bfloat16)
    report = {"bytes_before": 1, "bytes_after": 2}
    save_quantized(
        tmp_path, kind="llama", config=config, params=params, tokenizer=None, report=report
    )
    _, loaded_config, loaded, _ = load_quantized(tmp_path)
    assert loaded_config == config and loaded_config.dtype == jnp.bfloat16
    assert_bit_exact(params, loaded)
    assert json.loads((tmp_path / MANIFEST).read_text())["report"] == report
    # bfloat16 is stored as its raw bits, named in the manifest.
    raw = safetensors.numpy.load_file(tmp_path / PARAMS)
    assert raw["params/embed_tokens/embedding"].dtype == np.uint16


def dataclass_replace_dtype(config, dtype):
    return dataclasses.replace(config, dtype=dtype)


def test_bert_config_round_trip(tmp_path):
    config = BertConfig(
        vocab_size=40, hidden=16, n_layers=1, n_heads=2, intermediate=32, max_position=20
    )
    params = {"params": {"layer_0": {"output": {"kernel": jnp.ones((32, 16))}}}}
    save_quantized(tmp_path, kind="bert", config=config, params=params, tokenizer=None)
    assert list(safetensors.numpy.load_file(tmp_path / PARAMS)) == ["params/layer_0/output/kernel"]
    kind, loaded_config, loaded, _ = load_quantized(tmp_path)
    assert kind == "bert" and loaded_config == config
    assert_bit_exact(params, loaded)


def test_sentencepiece_tokenizer_round_trip(tmp_path, shared_data):
    from jqtz.io.llama2c import SentencePieceTokenizer

    tok = SentencePieceTokenizer(shared_data / "tok512.model")
    params = {"params": {"w": jnp.zeros((2, 2))}}
    save_quantized(tmp_path, kind="llama", config=CONFIG, params=params, tokenizer=tok)
    *_, loaded = load_quantized(tmp_path)
    text = "Once upon a time, there was a little cat."
    assert loaded.encode(text, bos=True) == tok.encode(text, bos=True)
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (
        tok.bos_id,
        tok.eos_id,
        tok.vocab_size,
    )


def test_tokenizers_tokenizer_round_trip(tmp_path):
    import tokenizers

    from jqtz.io._common import Tokenizer

    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"<s>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, bos_id=0, eos_id=None)
    save_quantized(tmp_path, kind="llama", config=CONFIG, params={"w": jnp.zeros(2)}, tokenizer=tok)
    *_, loaded = load_quantized(tmp_path)
    assert (loaded.bos_id, loaded.eos_id) == (0, None)
    assert loaded.encode("a b c", bos=True) == [0, 1, 2, 3]


# -- errors ------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    params = {"params": {"a": {"kernel": jqtz.quantize(jnp.ones((8, 4)), SPECS["int8"])}}}
    save_quantized(tmp_path, kind="llama", config=CONFIG, params=params, tokenizer=None)
    return tmp_path


def edit_manifest(folder, fn):
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def test_missing_manifest(tmp_path):
    with pytest.raises(ValueError, match=r"jqtz\.json: missing"):
        load_quantized(tmp_path)


def test_corrupt_manifest(saved):
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=r"jqtz\.json: not valid JSON"):
        load_quantized(saved)


def test_missing_params_file(saved):
    (saved / PARAMS).unlink()
    with pytest.raises(ValueError, match=r"params\.safetensors: missing"):
        load_quantized(saved)


def test_truncated_params_file(saved):
    data = (saved / PARAMS).read_bytes()
    (saved / PARAMS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"params\.safetensors: not a readable safetensors"):
        load_quantized(saved)


def test_manifest_names_missing_array(saved):
    edit_manifest(
        saved, lambda m: m["arrays"].__setitem__("params/b", m["arrays"]["params/a/kernel::scale"])
    )
    with pytest.raises(ValueError, match=r"key `params/b` is in jqtz\.json but not in"):
        load_quantized(saved)


def test_manifest_shape_mismatch_names_key(saved):
    edit_manifest(saved, lambda m: m["qarrays"]["params/a/kernel"].__setitem__("shape", [8, 5]))
    with pytest.raises(ValueError, match=r"QArray `params/a/kernel` is inconsistent"):
        load_quantized(saved)


def test_manifest_dtype_mismatch_names_key(saved):
    edit_manifest(
        saved, lambda m: m["arrays"]["params/a/kernel::scale"].__setitem__("dtype", "float16")
    )
    with pytest.raises(ValueError, match=r"key `params/a/kernel::scale` is float32"):
        load_quantized(saved)


def test_manifest_unknown_format(saved):
    edit_manifest(saved, lambda m: m["qarrays"]["params/a/kernel"].__setitem__("format", "int5"))
    with pytest.raises(ValueError, match=r"qarrays/params/a/kernel/format"):
        load_quantized(saved)


def test_manifest_wrong_version(saved):
    edit_manifest(saved, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(ValueError, match="format_version"):
        load_quantized(saved)


def test_refuses_to_write_into_a_foreign_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not empty"):
        save_quantized(
            tmp_path, kind="llama", config=CONFIG, params={"w": jnp.zeros(2)}, tokenizer=None
        )


def test_rejects_bad_keys_and_kinds(tmp_path):
    with pytest.raises(ValueError, match="keys must be"):
        save_quantized(
            tmp_path, kind="llama", config=CONFIG, params={"a/b": jnp.zeros(2)}, tokenizer=None
        )
    with pytest.raises(ValueError, match="`kind`"):
        save_quantized(tmp_path, kind="gpt", config=CONFIG, params={}, tokenizer=None)


def test_serving_layout_is_saved_in_the_logical_one(tmp_path):
    """W8A8 codes stored `[N, K]` for serving (`jqtz.nn.serving_layout`) are written `[K, N]`:
    a saved folder does not depend on how the tree was last served."""
    act = jqtz.QuantSpec(format="int8", granularity="channel", axis=-1)
    w = jax.random.normal(jax.random.key(0), (256, 64))
    q = jqtz.quantize(w, jqtz.QuantSpec(format="int8", activation=act))
    served = jqtz.nn.serving_layout({"params": {"layer": {"kernel": q}}})
    save_quantized(tmp_path / "out", kind="llama", config=CONFIG, params=served, tokenizer=None)
    _, _, loaded, _ = load_quantized(tmp_path / "out")
    got = loaded["params"]["layer"]["kernel"]
    assert not got.transposed and got.qvalue.shape == (256, 64)
    assert_bit_exact({"params": {"layer": {"kernel": q}}}, loaded)

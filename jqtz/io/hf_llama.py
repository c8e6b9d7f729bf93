"""Load a Hugging Face Llama checkpoint folder into the jqtz Llama layout.

The folder is what `LlamaForCausalLM.save_pretrained` writes: `config.json`, the weights as
`model.safetensors` or as shards listed in `model.safetensors.index.json`, and the tokenizer as
`tokenizer.json` (plus `tokenizer_config.json` naming the BOS and EOS tokens). Weights may be
float32, float16 or bfloat16; they come back as float32 with linear kernels transposed from
torch's `[out, in]` to jqtz's `[in, out]`. HF Llama already uses the rotate-half RoPE layout of
`jqtz.models.llama`, so q and k need no permutation.

Example:
    >>> config, params, tokenizer = load_hf_llama("SmolLM2-135M-Instruct/")  # doctest: +SKIP
    >>> params["params"]["layers_0"]["mlp"]["down_proj"]["kernel"].shape  # doctest: +SKIP
    (1536, 576)
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import numpy as np
import safetensors
import tokenizers

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
from jqtz.models.llama import LlamaConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})
# Buffers that old transformers versions saved beside the weights; recomputed by the model.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def load_hf_llama(folder: os.PathLike | str) -> tuple[LlamaConfig, dict, Tokenizer]:
    """Loads a HF Llama folder: its config, float32 params (jqtz layout) and tokenizer.

    Args:
        folder: a directory with `config.json` (`model_type` "llama"), `model.safetensors` or
            `model.safetensors.index.json` with its shards, and `tokenizer.json`.

    Returns:
        `(config, params, tokenizer)`: `params` is `{'params': {...}}` of float32 numpy arrays
        with kernels [in, out].

    Raises:
        ValueError: a file is missing, unreadable or truncated; the config is not a Llama's;
            a tensor is missing, misshapen, not floating point or not finite; or the folder
            holds tensors the Llama layout has no place for.
        NotImplementedError: the config asks for a Llama variant jqtz does not implement
            (RoPE scaling, MLP biases, an activation other than SiLU).

    Example:
        >>> config, params, tok = load_hf_llama("my-llama/")  # doctest: +SKIP
        >>> params["params"]["embed_tokens"]["embedding"].shape  # doctest: +SKIP
        (49152, 576)
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"`folder` must be a checkpoint directory, got {folder}")
    raw = _read_json(folder / "config.json")
    config = _config(raw, folder / "config.json")
    params = _params(folder, config)
    return config, params, _tokenizer(folder, raw, config)


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} is missing: save the checkpoint with `save_pretrained`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); the file is corrupt") from err


def _config(raw: dict, path: pathlib.Path) -> LlamaConfig:
    if raw.get("model_type") != "llama":
        raise ValueError(
            f"{path}: `model_type` is {raw.get('model_type')!r}, but this loader reads only "
            "'llama' checkpoints"
        )

    def get(key: str, default: Any = None) -> Any:
        value = raw.get(key, default)
        if value is None and default is None:
            raise ValueError(f"{path}: `{key}` is missing; a Llama config.json defines it")
        return value

    # transformers >= 5 writes `rope_parameters`; older versions `rope_theta` + `rope_scaling`.
    rope = raw.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    scaling = raw.get("rope_scaling")
    if rope_type != "default" or (scaling and scaling.get("rope_type", "default") != "default"):
        raise NotImplementedError(
            f"{path}: RoPE scaling ({scaling or rope}) is not implemented by jqtz.models.llama"
        )
    if raw.get("mlp_bias"):
        raise NotImplementedError(f"{path}: `mlp_bias: true` is not implemented")
    if raw.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(
            f"{path}: `hidden_act` {raw['hidden_act']!r} is not implemented (only 'silu')"
        )
    n_heads = int(get("num_attention_heads"))
    return LlamaConfig(
        vocab_size=int(get("vocab_size")),
        dim=int(get("hidden_size")),
        n_layers=int(get("num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(get("num_key_value_heads", n_heads)),
        hidden_dim=int(get("intermediate_size")),
        head_dim=raw.get("head_dim"),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        norm_eps=float(get("rms_norm_eps", 1e-6)),
        max_seq_len=int(get("max_position_embeddings", 2048)),
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        attention_bias=bool(get("attention_bias", False)),
    )


def _hf_name(jqtz_path: str) -> str:
    """`layers_3/self_attn/q_proj/kernel` -> `model.layers.3.self_attn.q_proj.weight`."""
    if jqtz_path == "lm_head/kernel":
        return "lm_head.weight"
    *parts, leaf = jqtz_path.split("/")
    parts[0] = parts[0].replace("layers_", "layers.")
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join(["model", *parts, leaf])


def _shard_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> file holding it, from the index (sharded) or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no `weight_map`; the index is corrupt")
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ValueError(
                    f"{index} lists the shard {shard.name}, which is missing from {folder}: "
                    "copy or download the whole checkpoint again"
                )
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        others = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {others}: convert them to safetensors)" if others else ""
        raise ValueError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} is present{hint}")
    return dict.fromkeys(_open(single).keys(), single)


def _open(path: pathlib.Path) -> Any:
    try:
        return safetensors.safe_open(path, framework="np")
    except safetensors.SafetensorError as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({path.stat().st_size} bytes): {err}. "
            "It is truncated or corrupt: copy or download it again"
        ) from err


def _params(folder: pathlib.Path, config: LlamaConfig) -> dict:
    files = _shard_files(folder)
    shapes = llama_param_shapes(config)
    names = {jqtz_path: _hf_name(jqtz_path) for jqtz_path in shapes}
    missing = [name for name in names.values() if name not in files]
    if missing:
        raise tensor_error(
            folder,
            missing[0],
            f"missing ({len(missing)} of the {len(names)} tensors the config.json implies are "
            f"absent: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})",
            "The checkpoint is incomplete or its config.json does not belong to it",
        )
    # A tied checkpoint may still store lm_head.weight, a copy of the embedding.
    unused = set(files) - set(names.values())
    if config.tie_embeddings:
        unused.discard("lm_head.weight")
    report_unused(folder, {n for n in unused if not _IGNORED.fullmatch(n)}, "jqtz Llama")

    handles = {path: _open(path) for path in sorted({files[n] for n in names.values()})}
    held = {path: set(handle.keys()) for path, handle in handles.items()}
    flat = {}
    for jqtz_path, shape in shapes.items():
        name = names[jqtz_path]
        handle = handles[files[name]]
        if name not in held[files[name]]:
            raise tensor_error(
                files[name],
                name,
                f"missing from this shard although {INDEX_FILE} says it is here",
                "The index and the shards disagree: copy or download the checkpoint again",
            )
        stored = handle.get_slice(name)
        expected = shape[::-1] if is_transposed(jqtz_path) else shape
        check_shape(files[name], name, stored.get_shape(), expected, config)
        if stored.get_dtype() not in _FLOAT_DTYPES:
            raise tensor_error(
                files[name],
                name,
                f"dtype {stored.get_dtype()} is not a float (F32, F16, BF16)",
                "Already quantized checkpoints are not plain Llama weights: load the "
                "unquantized model",
            )
        array = finite_float32(files[name], name, handle.get_tensor(name))
        flat[jqtz_path] = np.ascontiguousarray(array.T if is_transposed(jqtz_path) else array)
    return nest(flat)


def _special_id(
    backend: tokenizers.Tokenizer, token_config: dict, raw: dict, role: str
) -> int | None:
    """The id of the BOS or EOS token: tokenizer_config.json first, then config.json."""
    token = token_config.get(f"{role}_token")
    if isinstance(token, dict):  # AddedToken serialised as {"content": ..., ...}
        token = token.get("content")
    if isinstance(token, str) and backend.token_to_id(token) is not None:
        return backend.token_to_id(token)
    value = raw.get(f"{role}_token_id")
    if isinstance(value, list):  # Llama 3 lists several EOS ids; the first is the main one
        value = value[0] if value else None
    return None if value is None else int(value)


def _tokenizer(folder: pathlib.Path, raw: dict, config: LlamaConfig) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: save a fast tokenizer beside the weights "
            "(`AutoTokenizer.from_pretrained(...).save_pretrained(folder)`)"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(os.fspath(path))
    except Exception as err:  # tokenizers raises plain Exception on malformed files
        raise ValueError(f"{path}: not a readable tokenizer.json ({err})") from err
    token_config_path = folder / "tokenizer_config.json"
    token_config = _read_json(token_config_path) if token_config_path.is_file() else {}
    tokenizer = Tokenizer(
        backend,
        bos_id=_special_id(backend, token_config, raw, "bos"),
        eos_id=_special_id(backend, token_config, raw, "eos"),
    )
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only "
            f"`vocab_size` = {config.vocab_size}; the tokenizer belongs to another model"
        )
    return tokenizer

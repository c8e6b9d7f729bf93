"""Shared pieces of the checkpoint loaders: the Llama parameter layout, checks and the tokenizer.

Both loaders (`jqtz.io.gguf`, `jqtz.io.hf_llama`) fill the same layout, the one of
`jqtz.models.llama`: a nested dict `{'params': {...}}` of float32 numpy arrays with linear
kernels stored [in, out]. They differ only in where each array comes from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import tokenizers

from jqtz.models.llama import LlamaConfig


def llama_param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The path and shape of every parameter of a jqtz Llama model.

    Example:
        >>> config = LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=4, n_kv_heads=2,
        ...                      hidden_dim=32, max_seq_len=64, tie_embeddings=True)
        >>> llama_param_shapes(config)["layers_0/self_attn/k_proj/kernel"]
        (16, 8)
    """
    c = config
    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens/embedding": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        block = {
            "input_layernorm/scale": (c.dim,),
            "self_attn/q_proj/kernel": (c.dim, q_out),
            "self_attn/k_proj/kernel": (c.dim, kv_out),
            "self_attn/v_proj/kernel": (c.dim, kv_out),
            "self_attn/o_proj/kernel": (q_out, c.dim),
            "post_attention_layernorm/scale": (c.dim,),
            "mlp/gate_proj/kernel": (c.dim, c.hidden_dim),
            "mlp/up_proj/kernel": (c.dim, c.hidden_dim),
            "mlp/down_proj/kernel": (c.hidden_dim, c.dim),
        }
        if c.attention_bias:
            block |= {
                "self_attn/q_proj/bias": (q_out,),
                "self_attn/k_proj/bias": (kv_out,),
                "self_attn/v_proj/bias": (kv_out,),
                "self_attn/o_proj/bias": (c.dim,),
            }
        shapes |= {f"layers_{i}/{name}": shape for name, shape in block.items()}
    shapes["norm/scale"] = (c.dim,)
    if not c.tie_embeddings:
        shapes["lm_head/kernel"] = (c.dim, c.vocab_size)
    return shapes


def is_transposed(path: str) -> bool:
    """Whether `path` names a linear kernel, which torch and llama.cpp store [out, in]."""
    return path.endswith("/kernel")


def nest(flat: Mapping[str, np.ndarray]) -> dict:
    """`{'a/b': x}` -> `{'params': {'a': {'b': x}}}`."""
    root: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = root
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return {"params": root}


def tensor_error(file: os.PathLike | str, tensor: str, problem: str, fix: str) -> ValueError:
    """A `ValueError` that names the checkpoint file, the tensor, the problem and the fix."""
    return ValueError(f"{os.fspath(file)}: tensor `{tensor}`: {problem}. {fix}")


def check_shape(
    file: os.PathLike | str,
    tensor: str,
    actual: Iterable[int],
    expected: tuple[int, ...],
    config: LlamaConfig,
) -> None:
    """Raises a `tensor_error` when a stored tensor's shape is not the one the config implies."""
    actual = tuple(int(d) for d in actual)
    if actual != expected:
        raise tensor_error(
            file,
            tensor,
            f"shape {actual} does not match the expected {expected} (from dim={config.dim}, "
            f"n_heads={config.n_heads}, n_kv_heads={config.n_kv_heads}, "
            f"head_dim={config.head_dim}, hidden_dim={config.hidden_dim}, "
            f"vocab_size={config.vocab_size})",
            "The weights and the configuration disagree: the file is corrupt or its "
            "configuration was edited; use the configuration the weights were saved with",
        )


def finite_float32(file: os.PathLike | str, tensor: str, array: np.ndarray) -> np.ndarray:
    """`array` as float32, raising a `tensor_error` if it holds NaN or infinity."""
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise tensor_error(
            file,
            tensor,
            f"{bad} of {array.size} values are NaN or infinite",
            "The file is corrupt; copy or download it again",
        )
    return array


def report_unused(file: os.PathLike | str, unused: Iterable[str], what: str) -> None:
    """Raises `ValueError` when the checkpoint holds tensors the Llama layout has no place for."""
    unused = sorted(unused)
    if unused:
        shown = ", ".join(f"`{name}`" for name in unused[:8])
        more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
        raise ValueError(
            f"{os.fspath(file)}: {len(unused)} tensors have no place in a {what}: {shown}{more}. "
            "The checkpoint is a variant jqtz does not model (extra norms or heads, already "
            "quantized weights, ...): load a plain Llama checkpoint"
        )


class Tokenizer:
    """Text to token ids and back, around a `tokenizers.Tokenizer`.

    `encode` never adds special tokens by itself; `bos=True` puts `bos_id` first. `decode`
    keeps special tokens, so `decode(encode(text)) == text` for any text the vocabulary covers
    (every text, for a byte-level BPE).

    Example:
        >>> _, _, tok = load_gguf(smollm2_path())  # doctest: +SKIP
        >>> tok.encode("Hi 42")  # doctest: +SKIP
        [26843, 216, 36, 34]
        >>> tok.decode([26843, 216, 36, 34])  # doctest: +SKIP
        'Hi 42'
    """

    def __init__(
        self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Token ids of `text`, with `bos_id` first when `bos` is true."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if not bos:
            return ids
        if self.bos_id is None:
            raise ValueError(
                "`bos=True` but this tokenizer has no BOS token; call `encode(text)` without it"
            )
        return [self.bos_id, *ids]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens included."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"
        )

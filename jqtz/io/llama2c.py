"""Loader for llama2.c ``.bin`` checkpoints (format v0) and a SentencePiece tokenizer wrapper.

The v0 ("legacy") file written by llama2.c's ``export.py`` and read by ``run.c`` is a header of
7 little-endian int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``
followed by float32 tensors, each stacked over layers, PyTorch ``[out, in]`` weights row-major::

    token_embedding (vocab, dim)    rms_att (L, dim)           wq (L, H*D, dim)
    wk (L, Hkv*D, dim)              wv (L, Hkv*D, dim)         wo (L, dim, H*D)
    rms_ffn (L, dim)                w1 (L, hidden, dim)        w2 (L, dim, hidden)
    w3 (L, hidden, dim)             rms_final (dim,)           freq_cis_real (seq_len, D/2)
    freq_cis_imag (seq_len, D/2)    [wcls (vocab, dim)]

with ``D = dim // n_heads``. A negative ``vocab_size`` means an unshared classifier ``wcls``
follows. ``w1`` is the gate, ``w3`` the up and ``w2`` the down projection. The RoPE tables are
skipped (the model recomputes them, base 10000) and q/k columns are moved from llama2.c's
interleaved RoPE layout to the "rotate half" layout of :mod:`jqtz.models.llama`.

Example:
    >>> config, params = load_llama2c("stories260K.bin")  # doctest: +SKIP
    >>> tokenizer = SentencePieceTokenizer("tok512.model")  # doctest: +SKIP
    >>> logits = Llama(config).apply(params, jnp.array([tokenizer.encode("Hi", bos=True)]))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import sentencepiece

from jqtz.models.llama import LlamaConfig, block_name, interleaved_to_half_rotary

__all__ = ["SentencePieceTokenizer", "load_llama2c"]

_HEADER = np.dtype("<i4")
_HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# llama2.c's export.py writes format v1 and v2 with this magic ("ak42") in place of the header.
_MAGIC = 0x616B3432


def _tensor_shapes(h: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a v0 file in file order, with their shapes."""
    dim, hidden, n_layers = h["dim"], h["hidden_dim"], h["n_layers"]
    head_dim = dim // h["n_heads"]
    q_out, kv_out = h["n_heads"] * head_dim, h["n_kv_heads"] * head_dim
    vocab = abs(h["vocab_size"])
    shapes = [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, q_out, dim)),
        ("wk", (n_layers, kv_out, dim)),
        ("wv", (n_layers, kv_out, dim)),
        ("wo", (n_layers, dim, q_out)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (h["seq_len"], head_dim // 2)),
        ("freq_cis_imag", (h["seq_len"], head_dim // 2)),
    ]
    if h["vocab_size"] < 0:
        shapes.append(("wcls", (vocab, dim)))
    return shapes


def _read_header(path: pathlib.Path, data: bytes) -> dict[str, int]:
    if len(data) < 7 * _HEADER.itemsize:
        raise ValueError(
            f"{path}: {len(data)} bytes is shorter than the 28-byte llama2.c header "
            f"({', '.join(_HEADER_FIELDS)})."
        )
    values = np.frombuffer(data, _HEADER, count=7)
    if int(values[0]) == _MAGIC:
        raise ValueError(
            f"{path}: this is a llama2.c v1/v2 file (magic 'ak42'); only the legacy v0 format "
            "is supported. Re-export it with llama2.c's `export.py --version 0`."
        )
    h = dict(zip(_HEADER_FIELDS, (int(v) for v in values), strict=True))
    for name, value in h.items():
        if value <= 0 and not (name == "vocab_size" and value < 0):
            raise ValueError(f"{path}: bad llama2.c header: `{name}` = {value}, expected > 0.")
    if h["dim"] % h["n_heads"] or h["n_heads"] % h["n_kv_heads"]:
        raise ValueError(
            f"{path}: bad llama2.c header: dim={h['dim']} must be a multiple of "
            f"n_heads={h['n_heads']}, itself a multiple of n_kv_heads={h['n_kv_heads']}."
        )
    if (h["dim"] // h["n_heads"]) % 2:
        raise ValueError(
            f"{path}: bad llama2.c header: head size dim / n_heads = {h['dim'] // h['n_heads']} "
            "must be even for RoPE."
        )
    return h


def _read_tensors(path: pathlib.Path, data: bytes, h: dict[str, int]) -> dict[str, np.ndarray]:
    """Reads and checks every tensor; the shapes are those of :func:`_tensor_shapes`."""
    offset = 7 * _HEADER.itemsize
    tensors = {}
    for name, shape in _tensor_shapes(h):
        nbytes = 4 * int(np.prod(shape))
        if offset + nbytes > len(data):
            raise ValueError(
                f"{path}: truncated: tensor `{name}` {shape} needs bytes [{offset}, "
                f"{offset + nbytes}) but the file has {len(data)} bytes."
            )
        array = np.frombuffer(data, "<f4", count=nbytes // 4, offset=offset).reshape(shape)
        if not np.isfinite(array).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
            raise ValueError(
                f"{path}: tensor `{name}` has non-finite values, first at index {bad}: "
                f"{array[bad]}."
            )
        tensors[name] = array
        offset += nbytes
    if offset != len(data):
        raise ValueError(
            f"{path}: {len(data) - offset} trailing bytes after the last tensor "
            f"(expected {offset} bytes for header {h}); not a v0 llama2.c file of this shape."
        )
    return tensors


def load_llama2c(path: str | os.PathLike) -> tuple[LlamaConfig, dict]:
    """Reads a llama2.c v0 checkpoint into a :class:`LlamaConfig` and a float32 parameter tree.

    Args:
        path: the ``.bin`` file.

    Returns:
        ``(config, {"params": ...})`` in the layout of :mod:`jqtz.models.llama`, numpy float32
        arrays. ``config.max_seq_len`` is the file's ``seq_len``.

    Raises:
        ValueError: a bad header, a truncated file, trailing bytes or non-finite values, naming
            the file and the tensor.

    Example:
        >>> config, params = load_llama2c("stories260K.bin")  # doctest: +SKIP
        >>> params["params"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape  # doctest: +SKIP
        (64, 32)
    """
    path = pathlib.Path(path)
    data = path.read_bytes()
    h = _read_header(path, data)
    t = _read_tensors(path, data, h)
    config = LlamaConfig(
        vocab_size=abs(h["vocab_size"]),
        dim=h["dim"],
        n_layers=h["n_layers"],
        n_heads=h["n_heads"],
        n_kv_heads=h["n_kv_heads"],
        hidden_dim=h["hidden_dim"],
        max_seq_len=h["seq_len"],
        tie_embeddings=h["vocab_size"] > 0,
        rope_theta=10000.0,
        norm_eps=1e-5,
    )

    def kernel(w: np.ndarray) -> dict[str, np.ndarray]:  # PyTorch [out, in] -> Dense [in, out]
        return {"kernel": np.ascontiguousarray(w.T)}

    def rotary(w: np.ndarray, n_heads: int) -> dict[str, np.ndarray]:  # q, k: also permute
        permuted = interleaved_to_half_rotary(w.T, n_heads, config.head_dim)
        return {"kernel": np.ascontiguousarray(permuted)}

    params = {
        "embed_tokens": {"embedding": t["token_embedding"].copy()},
        "norm": {"scale": t["rms_final"].copy()},
    }
    for i in range(config.n_layers):
        params[block_name(i)] = {
            "input_layernorm": {"scale": t["rms_att"][i].copy()},
            "self_attn": {
                "q_proj": rotary(t["wq"][i], config.n_heads),
                "k_proj": rotary(t["wk"][i], config.n_kv_heads),
                "v_proj": kernel(t["wv"][i]),
                "o_proj": kernel(t["wo"][i]),
            },
            "post_attention_layernorm": {"scale": t["rms_ffn"][i].copy()},
            "mlp": {
                "gate_proj": kernel(t["w1"][i]),
                "up_proj": kernel(t["w3"][i]),
                "down_proj": kernel(t["w2"][i]),
            },
        }
    if not config.tie_embeddings:
        params["lm_head"] = kernel(t["wcls"])
    return config, {"params": params}


class SentencePieceTokenizer:
    """A SentencePiece model (e.g. llama2.c's ``tok512.model``) with Llama-style BOS handling.

    Attributes:
        bos_id: id of the beginning-of-sequence token.
        eos_id: id of the end-of-sequence token.
        vocab_size: number of pieces.

    Example:
        >>> tok = SentencePieceTokenizer("tok512.model")  # doctest: +SKIP
        >>> tok.decode(tok.encode("Once upon a time", bos=True))  # doctest: +SKIP
        'Once upon a time'
    """

    def __init__(self, path: str | os.PathLike):
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model `{path}` does not exist.")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.vocab_size: int = self._sp.vocab_size()

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Token ids of ``text``, preceded by ``bos_id`` when ``bos``."""
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids) -> str:
        """Text of ``ids`` (a sequence of ints or a 1-D array); BOS/EOS ids are dropped."""
        return self._sp.decode([int(i) for i in ids])

    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (what a ``.model`` file holds)."""
        return self._sp.serialized_model_proto()

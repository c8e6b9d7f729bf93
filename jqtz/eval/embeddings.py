"""Embedding fidelity: cosine similarity of a quantized encoder's sentence embeddings to a baseline.

For N texts, each embedded by both functions, cosine_i = <a_i, b_i> / (|a_i| |b_i|), computed in
float64 whether or not the embeddings are already unit vectors. The mean says how much the model
drifted on average, the minimum (and its text) where it drifted most. With no texts given, the
default set is :func:`jqtz.eval.corpus.default_sentences` (256 sentences of Python's
documentation, the same on every machine for one Python version).

Example:
    >>> import numpy as np
    >>> base = lambda texts: np.array([[len(t), 1.0] for t in texts])
    >>> noisy = lambda texts: np.array([[len(t), 1.5] for t in texts])
    >>> f = embedding_fidelity(base, noisy, ["a b c", "d"])
    >>> f.n, f.min_cosine < f.mean_cosine < 1.0, f.worst_text
    (2, True, 'd')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jqtz.eval.corpus import default_sentences

__all__ = ["EmbeddingFidelity", "embedding_fidelity"]

EmbedFn = Callable[[list[str]], Any]

DEFAULT_SENTENCES = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddingFidelity:
    """Cosine similarity between two encoders' embeddings of the same texts.

    Attributes:
        mean_cosine: mean over texts.
        min_cosine: the smallest.
        n: number of texts.
        worst_text: the text with the smallest cosine.
    """

    mean_cosine: float
    min_cosine: float
    n: int
    worst_text: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _embeddings(embed_fn: EmbedFn, texts: list[str], which: str) -> np.ndarray:
    out = np.asarray(embed_fn(texts), np.float64)
    if out.ndim != 2 or out.shape[0] != len(texts):
        raise ValueError(
            f"`{which}` must return embeddings (N, D) for N={len(texts)} texts, got shape "
            f"{out.shape}."
        )
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if bad.size:
        raise ValueError(
            f"`{which}` returned non-finite values for text {int(bad[0])}: {texts[int(bad[0])]!r}."
        )
    zero = np.flatnonzero(np.linalg.norm(out, axis=1) == 0)
    if zero.size:
        raise ValueError(
            f"`{which}` returned a zero vector for text {int(zero[0])} "
            f"({texts[int(zero[0])]!r}); its cosine similarity is undefined."
        )
    return out


def embedding_fidelity(
    embed_fn_base: EmbedFn,
    embed_fn_quant: EmbedFn,
    texts: Sequence[str] | None = None,
) -> EmbeddingFidelity:
    """Mean and minimum cosine similarity of `embed_fn_quant`'s embeddings to `embed_fn_base`'s.

    Args:
        embed_fn_base: texts (a list of N str) -> embeddings (N, D), the reference.
        embed_fn_quant: the same for the model to judge; D must match.
        texts: the texts; default: 256 sentences from the default corpus.

    Returns:
        An :class:`EmbeddingFidelity`.

    Raises:
        TypeError: `texts` is a single str or holds a non-str.
        ValueError: `texts` is empty, or an embedding function returned the wrong shape,
            non-finite values or a zero vector (the message names the text).

    Example:
        >>> from functools import partial  # doctest: +SKIP
        >>> from jqtz.io.hf_bert import embed, load_hf_bert, minilm_path  # doctest: +SKIP
        >>> config, variables, tokenizer = load_hf_bert(minilm_path())  # doctest: +SKIP
        >>> qvars = jqtz.quantize_params(variables, jqtz.QuantSpec(format="int8"))  # doctest: +SKIP
        >>> embedding_fidelity(partial(embed, config, variables, tokenizer),
        ...                    partial(embed, config, qvars, tokenizer))  # doctest: +SKIP
    """
    if texts is None:
        texts = default_sentences(DEFAULT_SENTENCES)
    if isinstance(texts, str):
        raise TypeError("`texts` must be a sequence of strings, got one str; wrap it: [text].")
    texts = list(texts)
    if not texts:
        raise ValueError("`texts` is empty; pass at least one text, or None for the default set.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"`texts[{i}]` must be a str, got {type(text).__name__}.")
    a = _embeddings(embed_fn_base, texts, "embed_fn_base")
    b = _embeddings(embed_fn_quant, texts, "embed_fn_quant")
    if a.shape != b.shape:
        raise ValueError(
            f"`embed_fn_base` returned {a.shape} but `embed_fn_quant` returned {b.shape}; both "
            "must embed the texts in the same dimension."
        )
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    worst = int(np.argmin(cosine))
    return EmbeddingFidelity(
        mean_cosine=float(np.mean(cosine)),
        min_cosine=float(cosine[worst]),
        n=len(texts),
        worst_text=texts[worst],
    )

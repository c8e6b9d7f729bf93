"""Quality of a quantized model: perplexity, logit divergence from a baseline, embedding fidelity.

Every number comes with the protocol that produced it (window length, stride, number of windows,
BOS handling: see :mod:`jqtz.eval.perplexity`), and the text sources are fixed
(:mod:`jqtz.eval.corpus`: a file, or Python's own documentation as a default corpus).

Example:
    >>> import jax.numpy as jnp
    >>> uniform = lambda params, tokens: jnp.zeros(tokens.shape + (32,))
    >>> round(perplexity(uniform, None, [7, 3, 9, 1] * 25, ctx=10).ppl, 3)
    32.0
"""

from jqtz.eval.compare import LogitComparison, compare_logits
from jqtz.eval.corpus import default_corpus, default_sentences, load_text
from jqtz.eval.embeddings import EmbeddingFidelity, embedding_fidelity
from jqtz.eval.perplexity import PerplexityResult, perplexity, text_perplexity, tokenize

__all__ = [
    "EmbeddingFidelity",
    "LogitComparison",
    "PerplexityResult",
    "compare_logits",
    "default_corpus",
    "default_sentences",
    "embedding_fidelity",
    "load_text",
    "perplexity",
    "text_perplexity",
    "tokenize",
]

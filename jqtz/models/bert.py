"""A BERT encoder in flax.linen, for sentence embeddings such as all-MiniLM-L6-v2.

Inference only (no dropout), post-LayerNorm as in the original BERT, exact (erf) GELU.
Every matrix product with a weight goes through `nn.Dense` and every lookup through
`nn.Embed`, so quantization can intercept those calls; attention scores and the weighted
sum of values are products of activations and stay plain `jnp.einsum`.

Parameter paths (left) and the Hugging Face `BertModel` tensors they come from (right, without
any `bert.` prefix; `L` = `encoder.layer.{i}`). A Dense `kernel`/`bias` is an HF Linear
`weight`/`bias`, transposed (T) from torch's [out, in] to [in, out]; a LayerNorm `scale`/`bias`
is the HF `weight`/`bias`. `jqtz.io.hf_bert.load_hf_bert` does this mapping.

    embeddings/word_embeddings/embedding        embeddings.word_embeddings.weight
    embeddings/position_embeddings/embedding    embeddings.position_embeddings.weight
    embeddings/token_type_embeddings/embedding  embeddings.token_type_embeddings.weight
    embeddings/LayerNorm/{scale,bias}           embeddings.LayerNorm.{weight,bias}
    layer_{i}/attention/{query,key,value}/*     L.attention.self.{query,key,value}.*   (T)
    layer_{i}/attention/output/*                L.attention.output.dense.*             (T)
    layer_{i}/attention_norm/*                  L.attention.output.LayerNorm.*
    layer_{i}/intermediate/*                    L.intermediate.dense.*                 (T)
    layer_{i}/output/*                          L.output.dense.*                       (T)
    layer_{i}/output_norm/*                     L.output.LayerNorm.*

Shapes: B batch, T tokens, D = `hidden`, H = `n_heads`, K = D // H (head size),
F = `intermediate`.

Example (sentence embeddings from token ids):
    >>> import jax, jax.numpy as jnp
    >>> config = BertConfig(vocab_size=100, hidden=32, n_layers=2, n_heads=4,
    ...                     intermediate=64, max_position=16)
    >>> ids = jnp.array([[101, 7, 8, 102], [101, 9, 102, 0]])
    >>> mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    >>> model = BertModel(config)
    >>> params = model.init(jax.random.key(0), ids, mask)["params"]
    >>> mean_pool(model.apply({"params": params}, ids, mask), mask).shape
    (2, 32)
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.typing import DTypeLike

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertLayer",
    "BertModel",
    "BertSelfAttention",
    "mean_pool",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Architecture of a BERT encoder; frozen and hashable, so it can be static under `jax.jit`.

    Attributes:
        vocab_size: rows of the word embedding table.
        hidden: model width D; a multiple of `n_heads`.
        n_layers: number of encoder layers.
        n_heads: attention heads per layer.
        intermediate: width F of the feed-forward layer.
        max_position: rows of the position embedding table, the longest input in tokens.
        type_vocab_size: rows of the token-type (segment) embedding table.
        layer_norm_eps: epsilon of every LayerNorm (1e-12 in BERT).
        dtype: compute dtype of activations (parameters stay float32); normalised to a
            `numpy.dtype`. Softmax and pooling always run in float32.

    Example:
        >>> BertConfig(vocab_size=30522, hidden=384, n_layers=6, n_heads=12,
        ...            intermediate=1536, max_position=512).head_dim
        32
    """

    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    intermediate: int
    max_position: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: DTypeLike = jnp.float32

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden",
            "n_layers",
            "n_heads",
            "intermediate",
            "max_position",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.hidden % self.n_heads:
            raise ValueError(
                f"`hidden` ({self.hidden}) must be a multiple of `n_heads` ({self.n_heads}): "
                "each head gets hidden // n_heads features."
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
            raise ValueError(f"`layer_norm_eps` must be a float in (0, 1), got {eps!r}.")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError as err:
            raise ValueError(
                f"`dtype` must be a floating dtype such as jnp.float32, got {self.dtype!r}."
            ) from err
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"`dtype` must be a floating dtype such as jnp.float32 or jnp.bfloat16, "
                f"got {dtype}."
            )
        object.__setattr__(self, "dtype", dtype)

    @property
    def head_dim(self) -> int:
        """Features per attention head, K = hidden // n_heads."""
        return self.hidden // self.n_heads


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm: (B, T) ids -> (B, T, D)."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        positions = jnp.arange(input_ids.shape[1])[None, :]  # (1, T)
        embed = functools.partial(nn.Embed, features=c.hidden, dtype=c.dtype)
        x = embed(c.vocab_size, name="word_embeddings")(input_ids)  # (B, T, D)
        x = x + embed(c.max_position, name="position_embeddings")(positions)
        x = x + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, name="LayerNorm")(x)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with its output projection: (B, T, D) -> (B, T, D).

    `attention_mask` (B, T) is 1 (or True) for real tokens and 0 for padding; padded keys get
    no attention weight, so real tokens never see padding. Rows of padded queries are computed
    but meaningless, and `mean_pool` drops them.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config

        def project(name: str) -> jax.Array:  # (B, T, D) -> (B, T, H, K)
            y = nn.Dense(c.hidden, dtype=c.dtype, name=name)(x)
            return y.reshape(*y.shape[:-1], c.n_heads, c.head_dim)

        q, k, v = project("query"), project("key"), project("value")
        scores = jnp.einsum("bqhk,bthk->bhqt", q, k).astype(jnp.float32)  # (B, H, T, T)
        scores = scores / np.sqrt(c.head_dim)
        keep = attention_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, T) over keys
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
        context = jnp.einsum("bhqt,bthk->bqhk", probs, v).reshape(x.shape)  # (B, T, D)
        return nn.Dense(c.hidden, dtype=c.dtype, name="output")(context)


class BertLayer(nn.Module):
    """One post-LN encoder layer: (B, T, D), mask (B, T) -> (B, T, D).

    x = LN(x + Attention(x)); x = LN(x + W2 gelu(W1 x)). Usable on its own, for example to
    calibrate block by block with the params of one layer:

        >>> import jax, jax.numpy as jnp
        >>> config = BertConfig(vocab_size=100, hidden=32, n_layers=2, n_heads=4,
        ...                     intermediate=64, max_position=16)
        >>> x, mask = jnp.ones((1, 5, 32)), jnp.ones((1, 5), jnp.int32)
        >>> layer_params = BertLayer(config).init(jax.random.key(0), x, mask)["params"]
        >>> BertLayer(config).apply({"params": layer_params}, x, mask).shape
        (1, 5, 32)
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=c.dtype)
        x = norm(name="attention_norm")(
            x + BertSelfAttention(c, name="attention")(x, attention_mask)
        )
        h = nn.Dense(c.intermediate, dtype=c.dtype, name="intermediate")(x)  # (B, T, F)
        h = nn.gelu(h, approximate=False)
        return norm(name="output_norm")(x + nn.Dense(c.hidden, dtype=c.dtype, name="output")(h))


class BertModel(nn.Module):
    """The BERT encoder without pooler: token ids (B, T) -> last hidden states (B, T, D).

    Args (of `__call__`):
        input_ids: (B, T) integer token ids, T <= `config.max_position`.
        attention_mask: (B, T), 1 for tokens and 0 for padding; all ones when omitted.
        token_type_ids: (B, T) segment ids; all zeros (one segment) when omitted.

    Example: see the module docstring; `mean_pool` turns the output into sentence embeddings.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be (batch, tokens), got shape {input_ids.shape}.")
        if input_ids.shape[1] > c.max_position:
            raise ValueError(
                f"`input_ids` has {input_ids.shape[1]} tokens but the model has only "
                f"{c.max_position} positions (`max_position`); truncate the input."
            )
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if arr.shape != input_ids.shape:
                raise ValueError(
                    f"`{name}` must have the shape of `input_ids` {input_ids.shape}, "
                    f"got {arr.shape}."
                )
        x = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids)
        for i in range(c.n_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, attention_mask)
        return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array, *, normalize: bool = True) -> jax.Array:
    """Sentence embeddings: the mean of the unpadded token states, then L2-normalised.

    As sentence-transformers' `Pooling(mean)` + `Normalize`: sum(h * m) / max(sum(m), 1e-9),
    then e / max(||e||, 1e-12). Computed in float32.

    Args:
        hidden: (B, T, D) token states.
        attention_mask: (B, T), 1 for tokens and 0 for padding.
        normalize: divide by the L2 norm (all-MiniLM-L6-v2 does).

    Returns:
        (B, D) float32 embeddings, of unit norm when `normalize`.

    Example:
        >>> h = jnp.array([[[3.0, 0.0], [1.0, 0.0], [9.0, 9.0]]])  # the last token is padding
        >>> mean_pool(h, jnp.array([[1, 1, 0]]), normalize=False)
        Array([[2., 0.]], dtype=float32)
    """
    mask = attention_mask.astype(jnp.float32)[..., None]  # (B, T, 1)
    summed = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)  # (B, D)
    pooled = summed / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled

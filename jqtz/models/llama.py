"""A Llama-family decoder in flax.linen: config, modules, KV-cached decoding and generation.

The parameter tree follows Hugging Face's Llama names, with kernels stored ``[in, out]`` as
``nn.Dense`` keeps them::

    embed_tokens/embedding                      (vocab, dim)
    layers_{i}/input_layernorm/scale            (dim,)
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel  q: (dim, H*D), k, v: (dim, Hkv*D), o: (H*D, dim)
    layers_{i}/post_attention_layernorm/scale   (dim,)
    layers_{i}/mlp/{gate,up}_proj/kernel        (dim, hidden)
    layers_{i}/mlp/down_proj/kernel             (hidden, dim)
    norm/scale                                  (dim,)
    lm_head/kernel                              (dim, vocab), absent with tied embeddings

Every matrix product with a weight and the embedding lookup go through ``nn.Dense`` and
``nn.Embed`` (``Embed.attend`` for a tied head), so that quantized versions can intercept them.
RoPE uses the Hugging Face "rotate half" layout: checkpoints in Meta's interleaved layout
(llama2.c, GGUF) permute their q/k columns with :func:`interleaved_to_half_rotary` on loading.

Running the model a block at a time (for calibration)::

    model = Llama(config)
    x = model.apply(params, tokens, method=Llama.embed)                  # (B, T, dim)
    positions = jnp.arange(tokens.shape[1])                               # (T,)
    for i in range(config.n_layers):
        block_params = {"params": params["params"][block_name(i)]}
        x = LlamaBlock(config).apply(block_params, x, positions)         # (B, T, dim)
    logits = model.apply(params, x, method=Llama.head)                   # (B, T, vocab)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jqtz.models.kv_cache import KVCache, LayerCache, masked_attention
from jqtz.nn import quantized_ops

__all__ = [
    "Llama",
    "LlamaAttention",
    "LlamaBlock",
    "LlamaConfig",
    "LlamaMLP",
    "apply_rope",
    "block_name",
    "decode_paths",
    "generate",
    "init_cache",
    "interleaved_to_half_rotary",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder; hashable, so it can be static under jit.

    Attributes:
        vocab_size: number of tokens.
        dim: width of the residual stream.
        n_layers: number of decoder blocks.
        n_heads: query heads ``H``.
        n_kv_heads: key/value heads ``Hkv`` (grouped-query attention); divides ``n_heads``.
        hidden_dim: width of the SwiGLU MLP.
        max_seq_len: longest sequence :func:`generate` accepts (the trained context).
        tie_embeddings: the output head reuses the embedding matrix (no ``lm_head``).
        head_dim: ``D``, per-head width; defaults to ``dim // n_heads``.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        attention_bias: q, k, v and o projections have biases (as Hugging Face's
            ``LlamaConfig.attention_bias``).
        dtype: compute dtype; parameters stay float32 and logits are returned as float32.

    Example:
        >>> LlamaConfig(vocab_size=512, dim=64, n_layers=5, n_heads=8, n_kv_heads=4,
        ...             hidden_dim=172, max_seq_len=512, tie_embeddings=True).head_dim
        8
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    max_seq_len: int
    tie_embeddings: bool
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention_bias: bool = False
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("max_seq_len", self.max_seq_len)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"`n_heads` ({self.n_heads}) must be a multiple of `n_kv_heads` "
                f"({self.n_kv_heads}) for grouped-query attention."
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"`dim` ({self.dim}) is not a multiple of `n_heads` ({self.n_heads}); "
                    "pass `head_dim` explicitly."
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        _check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for RoPE, got {self.head_dim}.")
        if not self.rope_theta > 0:
            raise ValueError(f"`rope_theta` must be positive, got {self.rope_theta}.")
        if not self.norm_eps > 0:
            raise ValueError(f"`norm_eps` must be positive, got {self.norm_eps}.")
        dtype = jnp.dtype(self.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"`dtype` must be a floating dtype, got {dtype}.")
        # Canonical dtype, so that equal configs hash equal (jnp.bfloat16 vs "bfloat16").
        object.__setattr__(self, "dtype", dtype)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def block_name(i: int) -> str:
    """The parameter-tree name of decoder block ``i``: ``block_name(3) == "layers_3"``."""
    return f"layers_{i}"


def interleaved_to_half_rotary(kernel: Any, n_heads: int, head_dim: int) -> Any:
    """Permutes q/k output columns from Meta's interleaved RoPE layout to "rotate half".

    Meta's checkpoints (and llama2.c, GGUF) rotate the pairs of columns ``(2i, 2i + 1)`` of each
    head; Hugging Face's layout, used here, rotates ``(i, i + D/2)``. Column ``h*D + j*D/2 + i``
    of the result is column ``h*D + 2i + j`` of the input (``j`` in {0, 1}), which is what
    ``permute`` in Hugging Face's ``convert_llama_weights_to_hf.py`` does to a ``[out, in]``
    weight. Attention scores are unchanged because q and k get the same permutation.

    Args:
        kernel: numpy or jax array whose last axis is ``n_heads * head_dim`` output features:
            an ``[in, out]`` kernel or an ``[out]`` bias.
        n_heads: heads in the last axis (``n_kv_heads`` for k).
        head_dim: ``D``, even.

    Returns:
        The permuted array, same shape and type.

    Example:
        >>> interleaved_to_half_rotary(np.arange(4)[None], n_heads=1, head_dim=4)
        array([[0, 2, 1, 3]])
    """
    if head_dim % 2 or kernel.shape[-1] != n_heads * head_dim:
        raise ValueError(
            f"`kernel` last axis must be n_heads * head_dim = {n_heads} * {head_dim} with even "
            f"head_dim, got shape {tuple(kernel.shape)}."
        )
    lead = kernel.shape[:-1]
    split = kernel.reshape(*lead, n_heads, head_dim // 2, 2)  # (..., H, D/2, 2)
    return split.swapaxes(-1, -2).reshape(*lead, n_heads * head_dim)  # (..., H * [2, D/2])


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, Hugging Face "rotate half" convention, computed in float32.

    ``out = x * cos(p f) + rotate_half(x) * sin(p f)`` with ``f_i = theta^(-2i/D)`` repeated
    over both halves and ``rotate_half([x1, x2]) = [-x2, x1]``.

    Args:
        x: ``(B, T, H, D)``.
        positions: absolute positions, ``(T,)`` or ``(B, T)``.
        theta: RoPE base.

    Returns:
        ``(B, T, H, D)`` in the dtype of ``x``.

    Example:
        >>> apply_rope(jnp.ones((1, 3, 2, 4)), jnp.arange(3), 10000.0).shape
        (1, 3, 2, 4)
    """
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # (D/2,)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (..., T, D/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # (..., T, 1, D)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE; causal, or through a per-layer KV cache."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None
    ) -> tuple[jax.Array, LayerCache | None]:
        c = self.config
        b, t, _ = x.shape
        dense = functools.partial(nn.Dense, use_bias=c.attention_bias, dtype=c.dtype)
        q = dense(c.n_heads * c.head_dim, name="q_proj")(x)
        k = dense(c.n_kv_heads * c.head_dim, name="k_proj")(x)
        v = dense(c.n_kv_heads * c.head_dim, name="v_proj")(x)
        q = apply_rope(q.reshape(b, t, c.n_heads, c.head_dim), positions, c.rope_theta)
        k = apply_rope(k.reshape(b, t, c.n_kv_heads, c.head_dim), positions, c.rope_theta)
        v = v.reshape(b, t, c.n_kv_heads, c.head_dim)  # (B, T, Hkv, D)
        if cache is None:  # causal by position; long sequences stream key blocks
            out = masked_attention(q, k, v, positions, positions)
        else:
            cache = cache.update(k, v)
            out = cache.attend(q)  # (B, T, H, D)
        out = dense(c.dim, name="o_proj")(out.reshape(b, t, c.n_heads * c.head_dim))
        return out, cache


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dense = functools.partial(nn.Dense, use_bias=False, dtype=c.dtype)
        gate = dense(c.hidden_dim, name="gate_proj")(x)  # (B, T, hidden)
        up = dense(c.hidden_dim, name="up_proj")(x)
        return dense(c.dim, name="down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """One pre-norm decoder layer; usable on its own with one layer's parameters.

    ``__call__(x, positions, cache=None)``: ``x`` ``(B, T, dim)``, ``positions`` ``(T,)`` or
    ``(B, T)``. Returns the new ``x``, or ``(x, cache)`` when a cache is given; then ``positions``
    must be ``cache.length + arange(T)``, the positions the cache gives the new tokens.

    Example:
        >>> config = LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=4, n_kv_heads=2,
        ...                      hidden_dim=32, max_seq_len=64, tie_embeddings=True)
        >>> x = jnp.ones((1, 5, 16))
        >>> params = LlamaBlock(config).init(jax.random.key(0), x, jnp.arange(5))
        >>> LlamaBlock(config).apply(params, x, jnp.arange(5)).shape
        (1, 5, 16)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None
    ) -> jax.Array | tuple[jax.Array, LayerCache]:
        c = self.config
        norm = functools.partial(nn.RMSNorm, epsilon=c.norm_eps, dtype=c.dtype)
        h, new_cache = LlamaAttention(c, name="self_attn")(
            norm(name="input_layernorm")(x), positions, cache
        )
        x = x + h
        x = x + LlamaMLP(c, name="mlp")(norm(name="post_attention_layernorm")(x))
        return x if cache is None else (x, new_cache)


class Llama(nn.Module):
    """The decoder: embedding, ``n_layers`` :class:`LlamaBlock`, final RMSNorm and head.

    ``model.apply(params, tokens)`` with ``tokens`` int ``(B, T)`` returns float32 logits
    ``(B, T, vocab)``. ``model.apply(params, tokens, cache=cache)`` appends the tokens to a cache
    (one :class:`~jqtz.models.kv_cache.LayerCache` per layer, see :func:`init_cache`) and returns
    ``(logits, cache)``: prefill a prompt, then feed one token at a time. ``embed`` and ``head``
    (``method=Llama.embed`` / ``Llama.head``) run the ends of the model alone, for block-wise
    calibration (see the module docstring).

    Example:
        >>> config = LlamaConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2,
        ...                      hidden_dim=32, max_seq_len=64, tie_embeddings=False)
        >>> model = Llama(config)
        >>> tokens = jnp.zeros((1, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), tokens)
        >>> model.apply(params, tokens).shape
        (1, 5, 32)
        >>> logits, cache = model.apply(params, tokens, cache=init_cache(config, 1, 8))
        >>> int(cache[0].length)
        5
    """

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.dim, dtype=c.dtype)
        self.layers = [LlamaBlock(c) for _ in range(c.n_layers)]  # named layers_0, layers_1, ...
        self.norm = nn.RMSNorm(epsilon=c.norm_eps, dtype=c.dtype)
        if not c.tie_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids ``(B, T)`` -> residual stream ``(B, T, dim)``."""
        return self.embed_tokens(tokens)

    def head(self, x: jax.Array) -> jax.Array:
        """Residual stream ``(B, T, dim)`` -> final norm -> float32 logits ``(B, T, vocab)``."""
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.config.tie_embeddings else self.lm_head(x)
        return logits.astype(jnp.float32)

    def __call__(
        self, tokens: jax.Array, *, cache: Sequence[LayerCache] | None = None
    ) -> jax.Array | tuple[jax.Array, tuple[LayerCache, ...]]:
        if tokens.ndim != 2:
            raise ValueError(f"`tokens` must be (batch, seq_len), got shape {tokens.shape}.")
        if cache is not None and len(cache) != self.config.n_layers:
            raise ValueError(
                f"`cache` must hold one entry per layer ({self.config.n_layers}), got {len(cache)}."
            )
        start = 0 if cache is None else cache[0].length
        positions = start + jnp.arange(tokens.shape[1])  # (T,)
        x = self.embed(tokens)  # (B, T, dim)
        if cache is None:
            for layer in self.layers:
                x = layer(x, positions)
            return self.head(x)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, layer_cache = layer(x, positions, layer_cache)
            new_cache.append(layer_cache)
        return self.head(x), tuple(new_cache)


def init_cache(
    config: LlamaConfig, batch: int, max_len: int, *, dtype: Any = None
) -> tuple[KVCache, ...]:
    """An empty full-precision cache, one :class:`KVCache` per layer, ``max_len`` positions each.

    ``dtype`` defaults to the model's compute dtype.

    Example:
        >>> config = LlamaConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2,
        ...                      hidden_dim=32, max_seq_len=64, tie_embeddings=True)
        >>> init_cache(config, batch=1, max_len=8)[1].keys.shape
        (1, 8, 2, 4)
    """
    layer = KVCache.init(
        batch=batch,
        max_len=max_len,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        dtype=config.dtype if dtype is None else dtype,
    )
    return (layer,) * config.n_layers


def generate(
    model: Llama | LlamaConfig,
    params: Any,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    cache_factory: Callable[[LlamaConfig, int, int], Sequence[LayerCache]] = init_cache,
) -> jax.Array:
    """Greedy (``temperature == 0``) or sampled continuation of a batch of prompts, jitted.

    The prompt is prefilled into a cache in one call, then tokens are decoded one at a time in
    a ``jax.lax.scan``; it compiles once per model, prompt shape and static option.

    Args:
        model: a :class:`Llama` (or another module with its call signature) or its config.
        params: ``{"params": ...}`` for the model.
        prompt_tokens: int ``(B, P)``, all prompts of the same length ``P >= 1``.
        max_new_tokens: tokens to generate; ``P + max_new_tokens <= config.max_seq_len``.
        temperature: 0 for argmax, else sample from ``softmax(logits / temperature)``.
        rng: PRNG key, required when ``temperature > 0``.
        eos_id: once a sequence emits it, the rest of that sequence is ``eos_id``.
        cache_factory: ``(config, batch, max_len) -> per-layer caches``, e.g. a quantized cache.

    Returns:
        int32 ``(B, max_new_tokens)``: the generated tokens only.

    Example:
        >>> config = LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=4, n_kv_heads=2,
        ...                      hidden_dim=32, max_seq_len=64, tie_embeddings=True)
        >>> prompt = jnp.array([[1, 2, 3]])
        >>> params = Llama(config).init(jax.random.key(0), prompt)
        >>> generate(config, params, prompt, 4).shape
        (1, 4)
    """
    if isinstance(model, LlamaConfig):
        model = Llama(model)
    prompt_tokens = jnp.asarray(prompt_tokens)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
        raise ValueError(
            f"`prompt_tokens` must be (batch, prompt_len >= 1), got {prompt_tokens.shape}."
        )
    _check_positive_int("max_new_tokens", max_new_tokens)
    total = prompt_tokens.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt length + `max_new_tokens` = {total} exceeds the model's "
            f"`max_seq_len` ({model.config.max_seq_len})."
        )
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}.")
    if temperature > 0 and rng is None:
        raise ValueError("`rng` is required when `temperature` > 0.")
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding
    return _generate(
        model,
        params,
        prompt_tokens,
        rng,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        eos_id=eos_id,
        cache_factory=cache_factory,
    )


def decode_paths(
    config: LlamaConfig,
    params: Any,
    *,
    batch: int = 1,
    cache_factory: Callable[[LlamaConfig, int, int], Sequence[LayerCache]] = init_cache,
    backend: str | None = None,
    compute_capability: tuple[int, int] | None = None,
) -> dict[str, str]:
    """Which path each product and the attention of one decode step take (nothing is run).

    Returns ``{param path: path}`` for every quantized ``Dense`` kernel (``jqtz.nn.matmul_path`` for
    ``batch`` rows in the model's dtype: a Pallas kernel's name, or ``"xla"``) and
    ``"attention"`` for the cache's (``"kernel"``, ``"kernel-mosaic"`` or ``"xla"``; the
    full-precision cache is always ``"xla"``). ``backend`` and ``compute_capability`` default
    to this machine's: pass them to ask about a GPU from a CPU.

    Example:
        >>> import jqtz
        >>> config = LlamaConfig(vocab_size=32, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
        ...                      hidden_dim=128, max_seq_len=64, tie_embeddings=True,
        ...                      dtype=jnp.bfloat16)
        >>> params = Llama(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
        >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=32)
        >>> qparams = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", spec)])
        >>> paths = decode_paths(config, qparams, backend="gpu", compute_capability=(9, 0))
        >>> paths["params/layers_0/mlp/down_proj/kernel"], paths["attention"]
        ('w4a16', 'xla')
    """
    from jqtz.nn import matmul_path
    from jqtz.qarray import QArray, is_qarray
    from jqtz.rules import path_str

    kw = dict(backend=backend, compute_capability=compute_capability)
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
        path = path_str(keypath)
        if isinstance(leaf, QArray) and leaf.ndim == 2 and path.endswith("kernel"):
            x = jax.ShapeDtypeStruct((batch, leaf.shape[0]), config.dtype)
            out[path] = matmul_path(x, leaf, **kw)
    cache = cache_factory(config, batch, config.max_seq_len)[0]
    attention_path = getattr(cache, "attention_path", None)
    q = jnp.zeros((batch, 1, config.n_heads, config.head_dim), config.dtype)
    out["attention"] = "xla" if attention_path is None else attention_path(q, **kw)
    return out


def describe_paths(paths: dict[str, str]) -> str:
    """`decode_paths`'s answer in one line: how many products take each path, and the
    attention's.

    Example:
        >>> describe_paths({"a/kernel": "w4a16", "b/kernel": "w4a16", "attention": "kernel"})
        'quantized products: 2 on w4a16; attention: kernel'
    """
    products = collections.Counter(v for k, v in paths.items() if k != "attention")
    used = ", ".join(f"{n} on {p}" for p, n in sorted(products.items())) or "none"
    return f"quantized products: {used}; attention: {paths['attention']}"


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "eos_id", "cache_factory")
)
def _generate(model, params, prompt_tokens, rng, **kwargs):
    # The interception is entered inside the traced function, so every compiled version of
    # `generate` runs quantized parameters through jqtz's products, whatever the caller's context.
    with quantized_ops():
        return _generate_traced(model, params, prompt_tokens, rng, **kwargs)


def _generate_traced(
    model, params, prompt_tokens, rng, *, max_new_tokens, temperature, eos_id, cache_factory
):
    batch, prompt_len = prompt_tokens.shape

    def pick(logits, key):  # (B, vocab) -> (B,)
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    def finish(token, done):  # keep emitting eos after the first one
        if eos_id is None:
            return token, done
        token = jnp.where(done, eos_id, token)
        return token, done | (token == eos_id)

    keys = jax.random.split(rng, max_new_tokens)
    cache = cache_factory(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = model.apply(params, prompt_tokens, cache=cache)
    first, done = finish(pick(logits[:, -1], keys[0]), jnp.zeros((batch,), bool))

    def step(carry, key):
        token, cache, done = carry
        logits, cache = model.apply(params, token[:, None], cache=cache)
        token, done = finish(pick(logits[:, -1], key), done)
        return (token, cache, done), token

    _, rest = jax.lax.scan(step, (first, cache, done), keys[1:])  # rest: (N - 1, B)
    return jnp.concatenate([first[:, None], rest.T], axis=1)  # (B, N)

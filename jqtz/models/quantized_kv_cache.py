"""A key/value cache stored quantized as it is appended (int8, fp8 e4m3, KIVI-style int4).

:class:`QuantizedKVCache` is a drop-in :class:`~jqtz.models.kv_cache.LayerCache`: the model calls
``cache.update(k_new, v_new)`` then ``cache.attend(q)``, inside ``jit`` and ``lax.scan``, exactly
as with the full-precision :class:`~jqtz.models.kv_cache.KVCache`. What it stores is set by a
:class:`KVQuantSpec`:

``int8`` / ``fp8``
    Symmetric codes with one scale per token and KV head (``absmax / 127`` or ``absmax / 448``),
    written at the moment a token is appended; nothing is kept in full precision.
``int4`` (KIVI, Liu et al. 2024)
    Asymmetric 4-bit codes (``x ~ code * scale + offset``, code in 0..15) packed two per byte along
    the head dimension. Keys get one scale and offset per *channel* over a group of
    ``group_size`` tokens (key outliers live in fixed channels); values one per *token* (over
    ``value_group_size`` channels). A group's key scales need all its tokens, and the most recent
    tokens matter most, so the newest tokens stay in a full-precision *residual window*: after
    each update it holds between ``residual`` and ``residual + group_size - 1`` tokens (fewer
    while the sequence is shorter), and whole groups of ``group_size`` tokens, the oldest first,
    are quantized and moved to the packed store whenever the window overflows.

The flush schedule depends only on the total length, never on how the tokens were split into
calls: a prompt prefilled at once and the same tokens fed one by one give identical storage.
Attention of one new token per sequence (decode) runs the Pallas kernel
``pallas_kernels.decode_attention`` on NVIDIA GPUs: it reads the codes, scales and offsets in
place as pages (the store's capacity is a multiple of 64 tokens for that), and the
full-precision window is merged in by log-sum-exp. Elsewhere (CPU, prefill) the cache is
dequantized in XLA.

Example:
    >>> from jqtz.models.llama import LlamaConfig, generate, Llama
    >>> config = LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=4, n_kv_heads=2,
    ...                      hidden_dim=32, max_seq_len=64, tie_embeddings=True)
    >>> prompt = jnp.array([[1, 2, 3]])
    >>> params = Llama(config).init(jax.random.key(0), prompt)
    >>> generate(config, params, prompt, 4, cache_factory=quantized_cache_factory("int4")).shape
    (1, 4)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqtz import _packing, formats
from jqtz.models.kv_cache import KVCache, causal_attention
from jqtz.nn.ops import kernel_target, pallas_kernels_enabled, pallas_lowering

__all__ = [
    "KINDS",
    "KVCacheMemory",
    "KVQuantSpec",
    "QuantizedCacheFactory",
    "QuantizedKVCache",
    "dequantize_blocks",
    "kv_cache_memory",
    "quantize_blocks",
    "quantized_cache_factory",
]

# kind -> (storage format, default key granularity, default residual window)
_KINDS = {
    "int8": ("int8", "token", 0),
    "fp8": ("fp8_e4m3", "token", 0),
    "int4": ("uint4", "channel", 128),
}
KINDS = tuple(_KINDS)
_SCALE_DTYPES = ("float16", "bfloat16", "float32")
#: The store's capacity is a multiple of this many tokens (and of the group size): the largest
#: page the decode-attention kernel reads a contiguous per-token store in.
_CAPACITY_ALIGN = 64


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVQuantSpec:
    """How a :class:`QuantizedKVCache` stores keys and values; frozen and hashable (jit-static).

    Attributes:
        kind: ``"int8"``, ``"fp8"`` (e4m3, saturating) or ``"int4"`` (asymmetric, packed).
        key_granularity: ``"token"`` (one scale per token and head, over ``key_group_size``
            channels) or ``"channel"`` (one scale per channel over ``group_size`` tokens, KIVI).
            Default: ``"channel"`` for int4, ``"token"`` otherwise.
        residual: tokens always kept in full precision (the window holds ``residual`` to
            ``residual + group_size - 1``). Default: 128 for int4 (KIVI's R), 0 otherwise.
        group_size: tokens per key-scale group with ``"channel"`` keys, and tokens moved to the
            quantized store at a time. Default: 32 with channel keys or a residual window, else 1
            (every token is quantized as it arrives).
        key_group_size: channels per key scale with ``"token"`` keys; ``None``: the whole head.
        value_group_size: channels per value scale; ``None``: the whole head.
        scale_dtype: dtype of stored scales and offsets (float16, bfloat16 or float32). Codes
            are computed with the rounded scale, so a narrow scale dtype adds no rounding error.
        int8_queries: round each query head's ``q / sqrt(D)`` (in the query dtype) to int8
            codes with one scale, ``max|q| / 127``, before its scores with the keys
            (SageAttention's int8 ``q kᵀ``). int8 keys with one scale per token and head and
            no residual window only. The decode-attention kernel then multiplies the key codes
            as stored, in int32 on the tensor cores, instead of converting each to 16 bits
            (``pallas_kernels.decode_attention.TuningConfig.int8_queries``); the XLA path
            rounds the queries the same way, so both compute the same attention.

    Example:
        >>> KVQuantSpec(kind="int4").residual, KVQuantSpec(kind="int8").group_size
        (128, 1)
    """

    kind: str
    key_granularity: str | None = None
    residual: int | None = None
    group_size: int | None = None
    key_group_size: int | None = None
    value_group_size: int | None = None
    scale_dtype: Any = jnp.float16
    int8_queries: bool = False

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {self.kind!r}.")
        _, key_default, residual_default = _KINDS[self.kind]
        set_ = functools.partial(object.__setattr__, self)
        if self.key_granularity is None:
            set_("key_granularity", key_default)
        if self.key_granularity not in ("token", "channel"):
            raise ValueError(
                f"`key_granularity` must be 'token' or 'channel', got {self.key_granularity!r}."
            )
        residual = residual_default if self.residual is None else self.residual
        set_("residual", _check_int("residual", residual, 0))
        if self.group_size is None:
            grouped = self.key_granularity == "channel" or self.residual > 0
            set_("group_size", 32 if grouped else 1)
        set_("group_size", _check_int("group_size", self.group_size, 1))
        for name in ("key_group_size", "value_group_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.key_granularity == "channel" and self.key_group_size is not None:
            raise ValueError(
                "`key_group_size` (channels per key scale) applies to per-token keys only; with "
                "`key_granularity='channel'` every channel has its own scale. Drop it."
            )
        dtype = jnp.dtype(self.scale_dtype)
        if dtype.name not in _SCALE_DTYPES:
            raise ValueError(f"`scale_dtype` must be one of {_SCALE_DTYPES}, got {dtype.name}.")
        set_("scale_dtype", dtype)
        if self.int8_queries:
            token_keys = self.key_granularity == "token" and self.key_group_size is None
            if self.kind != "int8" or not token_keys or self.residual:
                raise ValueError(
                    "`int8_queries` needs int8 keys with one scale per token and head and no "
                    f"residual window; got kind={self.kind!r}, key_granularity="
                    f"{self.key_granularity!r}, key_group_size={self.key_group_size}, "
                    f"residual={self.residual}. Drop `int8_queries` or use such keys."
                )

    @property
    def format(self) -> formats.Format:
        """The storage format of codes (``uint4`` with offsets for int4)."""
        return formats.get(_KINDS[self.kind][0])

    @property
    def window(self) -> int:
        """Slots of the full-precision residual window: ``residual + group_size - 1``."""
        return self.residual + self.group_size - 1

    def blocks(self, head_dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(tokens, channels) covered by one key scale and by one value scale."""
        if self.key_granularity == "channel":
            key = (self.group_size, 1)
        else:
            key = (1, self.key_group_size or head_dim)
        value = (1, self.value_group_size or head_dim)
        for name, (_, channels) in (("key_group_size", key), ("value_group_size", value)):
            if head_dim % channels:
                raise ValueError(
                    f"`{name}` ({channels}) must divide the head dimension ({head_dim})."
                )
        return key, value


def _scale_limits(dtype: np.dtype) -> tuple[float, float]:
    info = jnp.finfo(dtype)
    return float(info.tiny), float(info.max)


def quantize_blocks(
    x: jax.Array, fmt: formats.Format, block: tuple[int, int], scale_dtype: np.dtype
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Block-wise quantization of keys or values, one scale per (tokens, channels) block.

    Symmetric formats: ``scale = absmax / max_abs``; unsigned ones: ``scale = (max - min) /
    max_abs`` and ``offset = min``. Scales are floored at the smallest normal of
    ``scale_dtype`` (an all-zero block gives zero codes, never a division by zero).

    Args:
        x: ``(B, S, Hkv, D)``, ``S`` a multiple of ``block[0]``, ``D`` of ``block[1]``.
        fmt: the code format (int8, fp8_e4m3, uint4, ...).
        block: ``(tokens, channels)`` per scale.
        scale_dtype: dtype of the returned scale and offset.

    Float8 codes come as their uint8 bit patterns (as vLLM stores its fp8 cache): XLA on CPU
    upcasts ops on float8 buffers, so writing one token into a float8 array converted the whole
    cache at every step (SmolLM2 decode 4x slower than int8); uint8 moves the bytes as they are.

    Returns:
        ``codes`` ``(B, S, Hkv, D)`` (uint8 ``(B, S, Hkv, ceil(D/2))`` when packed; uint8 bit
        patterns for float8),
        ``scale`` ``(B, S / tokens, Hkv, D / channels)`` and ``offset`` (same, or None).

    Example:
        >>> x = jnp.arange(8.0).reshape(1, 2, 1, 4)  # (B, S, Hkv, D)
        >>> codes, scale, offset = quantize_blocks(x, formats.get("int8"), (1, 4), jnp.float32)
        >>> codes.tolist(), scale.shape
        ([[[[0, 42, 85, 127]], [[73, 91, 109, 127]]]], (1, 2, 1, 1))
    """
    b, s, h, d = x.shape
    bt, bc = block
    xb = x.astype(jnp.float32).reshape(b, s // bt, bt, h, d // bc, bc)
    tiny, big = _scale_limits(scale_dtype)

    def stored(v):  # round to the storage dtype, compute on with the rounded value
        return jnp.clip(v, -big, big).astype(scale_dtype)

    if fmt.has_zero_point:
        lo, hi = xb.min(axis=(2, 5)), xb.max(axis=(2, 5))  # (B, S/bt, Hkv, D/bc)
        offset = stored(lo)
        scale = stored(jnp.maximum((hi - lo) / fmt.max_abs, tiny))
        scaled = (xb - _expand(offset)) / _expand(scale)
    else:
        offset = None
        scale = stored(jnp.maximum(jnp.abs(xb).max(axis=(2, 5)) / fmt.max_abs, tiny))
        scaled = xb / _expand(scale)
    codes = fmt.encode(scaled).reshape(b, s, h, d)
    if fmt.packed:
        codes = _packing.pack(codes, fmt.bits)
    elif fmt.kind == "float":
        codes = jax.lax.bitcast_convert_type(codes, jnp.uint8)
    return codes, scale, offset


def dequantize_blocks(
    codes: jax.Array,
    scale: jax.Array,
    offset: jax.Array | None,
    fmt: formats.Format,
    block: tuple[int, int],
    head_dim: int,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Inverse of :func:`quantize_blocks`: ``codes * scale (+ offset)``, ``(B, S, Hkv, D)``.

    Example:
        >>> fmt = formats.get("uint4")
        >>> x = jnp.linspace(-1.0, 2.0, 16).reshape(1, 4, 1, 4)
        >>> y = dequantize_blocks(*quantize_blocks(x, fmt, (4, 1), jnp.float16), fmt, (4, 1), 4)
        >>> bool(jnp.abs(y - x).max() < 0.4 / 15)  # half a step of a 0.6-wide range, + rounding
        True
    """
    if fmt.packed:
        codes = _packing.unpack(codes, fmt.bits, head_dim, signed=not fmt.has_zero_point)
    elif fmt.kind == "float":
        codes = jax.lax.bitcast_convert_type(codes, fmt.container_dtype)
    b, s, h, d = codes.shape
    bt, bc = block
    vals = fmt.decode(codes).reshape(b, s // bt, bt, h, d // bc, bc)
    vals = vals * _expand(scale)
    if offset is not None:
        vals = vals + _expand(offset)
    return vals.reshape(b, s, h, d).astype(dtype)


def _expand(a: jax.Array) -> jax.Array:
    """(B, S/bt, Hkv, D/bc) -> (B, S/bt, 1, Hkv, D/bc, 1), float32."""
    return a.astype(jnp.float32)[:, :, None, :, :, None]


def _empty_store(shape, fmt, block, scale_dtype):
    """Zero codes, scales and offsets of the shapes :func:`quantize_blocks` gives for ``shape``
    (found abstractly, so that no quantization of zeros is constant-folded at compile time)."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    out = jax.eval_shape(lambda x: quantize_blocks(x, fmt, block, scale_dtype), x)
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKVCache:
    """Keys and values of one decoder layer, quantized as they are appended.

    Positions ``[0, flushed)`` live in the quantized store, ``[flushed, length)`` in the
    full-precision window (empty unless ``spec.window > 0``). The store has room for
    ``capacity`` positions, ``max_len`` rounded up to a multiple of ``spec.group_size`` and of
    64 tokens (so the decode-attention kernel can read the store as pages; at most 63 unused
    positions).

    Attributes:
        k_codes, v_codes: int8 ``(B, capacity, Hkv, D)``; for fp8 the same shape in uint8
            holding float8_e4m3fn bit patterns; for int4 uint8 ``(B, capacity, Hkv, D/2)``, two
            codes a byte along ``D``, low nibble first.
        k_scale, v_scale: ``(B, capacity / tokens, Hkv, D / channels)`` in ``spec.scale_dtype``,
            blocks from ``spec.blocks(D)``: ``(group_size, 1)`` for KIVI keys, ``(1, D)`` per token.
        k_offset, v_offset: same shapes as the scales for int4 (``x ~ code * scale + offset``);
            None for the symmetric formats.
        k_recent, v_recent: ``(B, spec.window, Hkv, D)``: slot ``i`` holds position
            ``flushed + i``, for ``i < length - flushed``.
        length: int32 scalar, positions filled.
        flushed: int32 scalar, positions in the quantized store (a multiple of
            ``spec.group_size``).
        spec: the :class:`KVQuantSpec` (static).

    Example:
        >>> cache = QuantizedKVCache.init(KVQuantSpec(kind="int4", residual=4, group_size=4),
        ...                               batch=1, max_len=16, n_kv_heads=2, head_dim=8)
        >>> cache = cache.update(jnp.ones((1, 9, 2, 8)), jnp.ones((1, 9, 2, 8)))
        >>> int(cache.length), int(cache.flushed), cache.k_codes.shape
        (9, 4, (1, 64, 2, 4))
    """

    k_codes: jax.Array
    k_scale: jax.Array
    k_offset: jax.Array | None
    v_codes: jax.Array
    v_scale: jax.Array
    v_offset: jax.Array | None
    k_recent: jax.Array
    v_recent: jax.Array
    length: jax.Array
    flushed: jax.Array
    spec: KVQuantSpec = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def init(
        cls,
        spec: KVQuantSpec,
        *,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: Any = jnp.float32,
    ) -> QuantizedKVCache:
        """An empty cache for ``max_len`` positions; ``dtype`` is that of the residual window
        and of dequantized keys and values (the model's compute dtype)."""
        if not isinstance(spec, KVQuantSpec):
            raise TypeError(f"`spec` must be a KVQuantSpec, got {type(spec).__name__}.")
        for name, value in (("batch", batch), ("max_len", max_len), ("n_kv_heads", n_kv_heads)):
            _check_int(name, value, 1)
        _check_int("head_dim", head_dim, 1)
        fmt, g = spec.format, spec.group_size
        align = math.lcm(g, _CAPACITY_ALIGN)
        capacity = -(-max_len // align) * align
        shape = (batch, capacity, n_kv_heads, head_dim)
        kb, vb = spec.blocks(head_dim)
        k_codes, k_scale, k_offset = _empty_store(shape, fmt, kb, spec.scale_dtype)
        v_codes, v_scale, v_offset = _empty_store(shape, fmt, vb, spec.scale_dtype)
        recent = jnp.zeros((batch, spec.window, n_kv_heads, head_dim), dtype)
        return cls(
            k_codes, k_scale, k_offset, v_codes, v_scale, v_offset, recent, recent,
            length=jnp.zeros((), jnp.int32),
            flushed=jnp.zeros((), jnp.int32),
            spec=spec,
        )  # fmt: skip

    @property
    def max_len(self) -> int:
        """Positions the quantized store has room for (``max_len`` rounded up to a group)."""
        return self.k_codes.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_recent.shape[-1]

    @property
    def dtype(self) -> np.dtype:
        return self.k_recent.dtype

    def update(self, k_new: jax.Array, v_new: jax.Array) -> QuantizedKVCache:
        """Appends ``k_new``, ``v_new`` ``(B, T, Hkv, D)`` at ``[length, length + T)``.

        As for :class:`~jqtz.models.kv_cache.KVCache`, writing past ``max_len`` is not checked
        inside ``jit`` (quantized groups past the end are dropped); size the cache for the
        whole generation.
        """
        if k_new.shape != v_new.shape or k_new.ndim != 4:
            raise ValueError(
                f"`k_new` and `v_new` must both be (B, T, Hkv, D), got {k_new.shape} and "
                f"{v_new.shape}."
            )
        if self.spec.window == 0:
            return self._append_quantized(k_new, v_new)
        return self._append_with_window(k_new, v_new)

    def _quantize(self, k: jax.Array, v: jax.Array):
        kb, vb = self.spec.blocks(self.head_dim)
        fmt, sd = self.spec.format, self.spec.scale_dtype
        return quantize_blocks(k, fmt, kb, sd), quantize_blocks(v, fmt, vb, sd)

    def _append_quantized(self, k_new, v_new):
        # Per-token blocks and no window: every token is quantized and written where it belongs.
        (kc, ks, ko), (vc, vs, vo) = self._quantize(k_new, v_new)
        write = lambda store, new: (
            None if store is None
            else jax.lax.dynamic_update_slice(store, new, (0, self.length, 0, 0))
        )  # fmt: skip
        t = k_new.shape[1]
        return dataclasses.replace(
            self,
            k_codes=write(self.k_codes, kc), k_scale=write(self.k_scale, ks),
            k_offset=write(self.k_offset, ko), v_codes=write(self.v_codes, vc),
            v_scale=write(self.v_scale, vs), v_offset=write(self.v_offset, vo),
            length=self.length + t, flushed=self.flushed + t,
        )  # fmt: skip

    def _append_with_window(self, k_new, v_new):
        spec, g, w = self.spec, self.spec.group_size, self.spec.window
        t = k_new.shape[1]
        n = self.length - self.flushed  # tokens in the window, at most w
        chunks = -(-t // g)  # the most groups one update can flush
        # Window followed by the new tokens, with room to slice a whole window at any offset.
        k_all, v_all = (
            jax.lax.dynamic_update_slice(
                jnp.pad(recent, ((0, 0), (0, t + g), (0, 0), (0, 0))),
                new.astype(recent.dtype),
                (0, n, 0, 0),
            )
            for recent, new in ((self.k_recent, k_new), (self.v_recent, v_new))
        )  # (B, w + t + g, Hkv, D)
        flush = jnp.maximum(n + t - spec.residual, 0) // g  # whole groups leaving the window
        # Quantize every group that could leave; scatter those that do, drop the others.
        (kc, ks, ko), (vc, vs, vo) = self._quantize(k_all[:, : chunks * g], v_all[:, : chunks * g])
        first = self.flushed // g
        index = jnp.where(jnp.arange(chunks) < flush, first + jnp.arange(chunks), self.max_len)

        def scatter(store, new):  # store (B, capacity/x, ...), new (B, chunks*g/x, ...)
            if store is None:
                return None
            per_group = new.shape[1] // chunks
            grouped = store.reshape(store.shape[0], -1, per_group, *store.shape[2:])
            new = new.reshape(new.shape[0], chunks, per_group, *new.shape[2:])
            return grouped.at[:, index].set(new, mode="drop").reshape(store.shape)

        shift = flush * g
        window = lambda x: jax.lax.dynamic_slice_in_dim(x, shift, w, axis=1)
        return dataclasses.replace(
            self,
            k_codes=scatter(self.k_codes, kc), k_scale=scatter(self.k_scale, ks),
            k_offset=scatter(self.k_offset, ko), v_codes=scatter(self.v_codes, vc),
            v_scale=scatter(self.v_scale, vs), v_offset=scatter(self.v_offset, vo),
            k_recent=window(k_all), v_recent=window(v_all),
            length=self.length + t, flushed=self.flushed + shift,
        )  # fmt: skip

    def dequantize(self) -> tuple[jax.Array, jax.Array]:
        """Keys and values by position, ``(B, max_len + window, Hkv, D)`` in ``dtype``.

        Position ``s < length`` holds the stored (dequantized, or full-precision window) value
        of the token at ``s``; later positions are unused.
        """
        kb, vb = self.spec.blocks(self.head_dim)
        fmt, w = self.spec.format, self.spec.window

        def read(codes, scale, offset, block, recent):
            x = dequantize_blocks(codes, scale, offset, fmt, block, self.head_dim, self.dtype)
            if w == 0:
                return x
            x = jnp.pad(x, ((0, 0), (0, w), (0, 0), (0, 0)))
            return jax.lax.dynamic_update_slice(x, recent, (0, self.flushed, 0, 0))

        return (
            read(self.k_codes, self.k_scale, self.k_offset, kb, self.k_recent),
            read(self.v_codes, self.v_scale, self.v_offset, vb, self.v_recent),
        )

    def attend(self, q: jax.Array) -> jax.Array:
        """Attention of the last ``T`` appended tokens' queries ``(B, T, H, D)`` over the cache.

        One token per sequence (decode) on an NVIDIA GPU goes through the Pallas kernel
        ``pallas_kernels.decode_attention``, which reads the codes in place (unless kernels are
        off: ``jqtz.nn.use_pallas_kernels``); everything else dequantizes in XLA
        (:meth:`attention_path` says which).
        """
        path = self.attention_path(q)
        if path != "xla":
            interpret = kernel_target()[2]
            return self._attend_kernel(q, mosaic=path == "kernel-mosaic", interpret=interpret)
        return self._attend_xla(q)

    def attention_path(self, q: jax.Array, *, backend=None, compute_capability=None) -> str:
        """``"kernel"`` when :meth:`attend` would use the decode-attention kernel for ``q``
        on ``backend`` (default: the current one), ``"kernel-mosaic"`` for its Mosaic GPU
        version (``jqtz.nn.use_pallas_kernels(lowering="mosaic")`` on a Hopper GPU, with
        pages it reads), else ``"xla"``.

        Example:
            >>> cache = QuantizedKVCache.init(KVQuantSpec(kind="int8"), batch=1, max_len=64,
            ...                               n_kv_heads=2, head_dim=64)
            >>> q = jnp.ones((1, 1, 8, 64), jnp.bfloat16)
            >>> cache.attention_path(q), cache.attention_path(q, backend="gpu",
            ...                                               compute_capability=(9, 0))
            ('xla', 'kernel')
        """
        if q.ndim != 4 or q.shape[1] != 1 or not pallas_kernels_enabled():
            return "xla"
        pages = self._kernel_pages()
        from pallas_kernels import common
        from pallas_kernels import decode_attention as da

        backend, compute_capability, _ = kernel_target(backend, compute_capability)
        kw = dict(backend=backend, compute_capability=compute_capability)
        if not da.can_use(q[:, 0], *pages[:2], **kw):
            return "xla"
        mosaic = pallas_lowering() == "mosaic" and common.is_hopper(**kw)
        mosaic = mosaic and not self.spec.int8_queries  # int8 scores: Triton only
        if mosaic and not da.mosaic_unsupported(q[:, 0], *pages[:2]):
            return "kernel-mosaic"
        return "kernel"

    def _kernel_pages(self):
        """``(k Pages, v Pages, block_tables)`` viewing the store as kernel pages (reshapes
        and a bitcast, no copy). Per-token scales keep their channel groups, ``(B, S, Hkv,
        G)``; the kernel's ``can_use`` says whether it reads that group size."""
        from pallas_kernels import decode_attention as da

        spec = self.spec
        channel = spec.key_granularity == "channel"
        capacity = self.max_len
        page = spec.group_size if channel else math.gcd(capacity, _CAPACITY_ALIGN)
        codes = lambda c: (
            jax.lax.bitcast_convert_type(c, jnp.float8_e4m3fn) if spec.kind == "fp8" else c
        )  # fmt: skip
        k, tables = da.contiguous_tables(
            codes(self.k_codes), self.k_scale, self.k_offset, spec.kind, page=page,
            per_channel=channel,
        )  # fmt: skip
        v, _ = da.contiguous_tables(
            codes(self.v_codes), self.v_scale, self.v_offset, spec.kind, page=page
        )
        return k, v, tables

    def _attend_kernel(
        self, q: jax.Array, *, mosaic: bool = False, interpret: bool = False
    ) -> jax.Array:
        """Decode attention (``T = 1``): the kernel (Triton, or Mosaic GPU with ``mosaic``)
        over the quantized store, merged by log-sum-exp with XLA attention over the
        full-precision window."""
        from pallas_kernels import decode_attention as da

        k, v, tables = self._kernel_pages()
        b = q.shape[0]
        lengths = jnp.broadcast_to(self.flushed, (b,))
        config = da.MosaicConfig() if mosaic else None
        if self.spec.int8_queries:  # the Triton kernel's int8 scores (Mosaic GPU has none)
            config = da.TuningConfig(int8_queries=True)
        out, lse = da.decode_attention(
            q[:, 0], k, v, lengths, tables, config=config, interpret=interpret
        )
        if self.spec.window == 0:
            return out[:, None]
        # The window: slot i holds position flushed + i, valid for i < length - flushed.
        w = self.spec.window
        d, hkv, h = self.head_dim, self.k_recent.shape[2], q.shape[2]
        qg = q[:, 0].astype(jnp.float32).reshape(b, hkv, h // hkv, d)
        hi = jax.lax.Precision.HIGHEST  # float32 products (no TF32 on GPUs)
        s = jnp.einsum("bkgd,bskd->bkgs", qg, self.k_recent.astype(jnp.float32), precision=hi)
        s = s * d**-0.5
        valid = jnp.arange(w) < self.length - self.flushed
        s = jnp.where(valid, s, da.MASK_VALUE)
        w_lse = jax.nn.logsumexp(s, axis=-1)
        probs = jnp.exp(s - w_lse[..., None])
        w_out = jnp.einsum(
            "bkgs,bskd->bkgd", probs, self.v_recent.astype(jnp.float32), precision=hi
        )
        merged, _ = da.merge([out, w_out.reshape(b, h, d)], [lse, w_lse.reshape(b, h)])
        return merged[:, None].astype(q.dtype)

    def _attend_xla(self, q: jax.Array) -> jax.Array:
        keys, values = self.dequantize()  # (B, S, Hkv, D)
        if self.spec.int8_queries:  # float32 attention with the kernel's rounded queries
            from pallas_kernels import decode_attention as da

            rounded = da.rounded_queries(q)
            f32 = lambda x: x.astype(jnp.float32)
            return causal_attention(rounded, f32(keys), f32(values), self.length).astype(q.dtype)
        # Causal: positions at or past `length` lie beyond every query.
        return causal_attention(q, keys, values, self.length)


@dataclasses.dataclass(frozen=True)
class QuantizedCacheFactory:
    """``(config, batch, max_len) -> per-layer caches`` for ``generate(cache_factory=...)``.

    Hashable and compared by value, so equal factories share compiled functions.

    Attributes:
        spec: the :class:`KVQuantSpec` of every layer.
        dtype: dtype of the residual window and dequantized values; None: the model's.

    Example:
        >>> QuantizedCacheFactory(KVQuantSpec(kind="fp8")) == quantized_cache_factory("fp8")
        True
    """

    spec: KVQuantSpec
    dtype: Any = None

    def __call__(self, config: Any, batch: int, max_len: int) -> tuple[QuantizedKVCache, ...]:
        layer = QuantizedKVCache.init(
            self.spec,
            batch=batch,
            max_len=max_len,
            n_kv_heads=config.n_kv_heads,
            head_dim=config.head_dim,
            dtype=config.dtype if self.dtype is None else self.dtype,
        )
        return (layer,) * config.n_layers


def quantized_cache_factory(kind: str = "int8", *, dtype: Any = None, **options: Any):
    """A cache factory for ``generate`` and ``jqtz.eval.decode.decode_perplexity``: ``kind`` codes.

    Args:
        kind: ``"int8"``, ``"fp8"`` or ``"int4"`` (KIVI-style).
        dtype: dtype of the full-precision window; default the model's compute dtype.
        **options: the other fields of :class:`KVQuantSpec` (``residual``, ``group_size``, ...).

    Example:
        >>> from jqtz.models.llama import LlamaConfig
        >>> config = LlamaConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2,
        ...                      hidden_dim=32, max_seq_len=64, tie_embeddings=True)
        >>> caches = quantized_cache_factory("int4", residual=32)(config, 1, 64)
        >>> len(caches), caches[0].k_codes.dtype, caches[0].k_recent.shape
        (2, dtype('uint8'), (1, 63, 2, 4))
    """
    spec = KVQuantSpec(kind=kind, **options)
    return QuantizedCacheFactory(spec, None if dtype is None else jnp.dtype(dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCacheMemory:
    """Bytes a KV cache takes for one configuration and context length.

    Attributes:
        kind: ``"bf16"``/``"float32"``-style full precision, or a quantized kind.
        context_len: positions per sequence.
        batch: sequences.
        total_bytes: every array of every layer's cache (window and scales included).
        bytes_per_token: bytes one more position of one sequence adds, all layers.
        baseline_bytes: ``total_bytes`` of the full-precision cache in ``dtype``.

    Example:
        >>> m = KVCacheMemory(kind="int8", context_len=8, batch=1, total_bytes=52,
        ...                   bytes_per_token=6.5, baseline_bytes=100)
        >>> m.ratio
        0.52
    """

    kind: str
    context_len: int
    batch: int
    total_bytes: int
    bytes_per_token: float
    baseline_bytes: int

    @property
    def ratio(self) -> float:
        """``total_bytes / baseline_bytes``."""
        return self.total_bytes / self.baseline_bytes


def _tree_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def kv_cache_memory(
    config: Any,
    context_len: int,
    kind: str = "int8",
    *,
    batch: int = 1,
    dtype: Any = jnp.bfloat16,
    **options: Any,
) -> KVCacheMemory:
    """Bytes of the KV cache of a model ``config`` at ``context_len`` (computed from the shapes
    the cache factory builds, without allocating).

    Args:
        config: a :class:`~jqtz.models.llama.LlamaConfig` (``n_layers``, ``n_kv_heads``,
            ``head_dim``).
        context_len: positions per sequence.
        kind: ``"float"`` for the full-precision :class:`KVCache`, or a quantized kind.
        batch: sequences.
        dtype: dtype of full-precision storage (the baseline cache and the residual window).
        **options: :class:`KVQuantSpec` fields for a quantized kind.

    Example:
        >>> from jqtz.models.llama import LlamaConfig
        >>> config = LlamaConfig(vocab_size=32, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
        ...                      hidden_dim=32, max_seq_len=8192, tie_embeddings=True)
        >>> m = kv_cache_memory(config, 8192, "int8")
        >>> m.bytes_per_token, round(m.ratio, 3)  # 2 x 30 x 3 x (64 codes + 2 scale bytes)
        (11880.0, 0.516)
    """
    context_len = _check_int("context_len", context_len, 1)
    batch = _check_int("batch", batch, 1)
    dtype = jnp.dtype(dtype)

    def fp(cfg, b, n):
        layer = KVCache.init(
            batch=b, max_len=n, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, dtype=dtype
        )
        return (layer,) * cfg.n_layers

    if kind == "float":
        factory, step = fp, 1
    else:
        factory = quantized_cache_factory(kind, dtype=dtype, **options)
        step = math.lcm(factory.spec.group_size, _CAPACITY_ALIGN)  # capacity grows in steps

    def size(n):
        return _tree_bytes(jax.eval_shape(lambda: factory(config, batch, n)))

    total = size(context_len)
    return KVCacheMemory(
        kind=kind,
        context_len=context_len,
        batch=batch,
        total_bytes=total,
        bytes_per_token=(size(context_len + step) - total) / step / batch,
        baseline_bytes=_tree_bytes(jax.eval_shape(lambda: fp(config, batch, context_len))),
    )

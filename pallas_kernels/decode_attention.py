"""Decode attention over a quantized KV cache: int8, fp8 e4m3 and packed int4 (KIVI) pages.

One query token per sequence attends to its cached keys and values:

    out[b, h] = sum_{s < lengths[b]} softmax_s(q[b, h] . k[b, s, h // G] / sqrt(D)) v[b, s, h // G]

with ``G = H / Hkv`` query heads per key/value head (grouped-query attention; all ``G`` heads of
a KV head are one tile of rows, so each page is read once per KV head, not once per query head).

**Storage is paged.** Keys and values live in pages of ``page`` tokens, ``codes (P, page, Hkv,
Dc)``, and ``block_tables (B, pages_per_seq)`` lists the pages of each sequence in order. A
contiguous cache ``(B, S, Hkv, Dc)`` is the case ``P = B * S / page``, which
:func:`contiguous_tables` builds with a free reshape, so one kernel serves both (vLLM-style
paged caches and jqtz's :class:`~jqtz.models.quantized_kv_cache.QuantizedKVCache`).

**Codes and scales** (:class:`Pages`), all read in place:

- ``int8`` / ``fp8`` (float8_e4m3fn codes) with one scale per token and head, ``scale (P, page,
  Hkv)``: the key scale multiplies the scores ``q . codes`` and the value scale the probabilities,
  so the codes go to the tensor cores as they are (cast to the query dtype, exact).
- ``int4``: unsigned codes packed two per byte along ``D`` (low nibble = even channel) with an
  offset, ``x ~ code * scale + offset``; per token like int8, or (KIVI keys) per channel with one
  scale row per page, ``scale (P, Hkv, D)``, a page being one KIVI group of tokens. The even and
  odd channels are two half-width products; the query is split into its even and odd channels
  once, and the output is interleaved back by XLA.
- ``float``: unquantized pages (bf16/f16/f32), no scales: the same kernel over a full-precision
  cache, the fair baseline for the benchmark.

**Split-K.** The grid is ``(B, Hkv, splits)``; each program runs an online softmax over its run
of pages and writes its unnormalised output with the running max and sum; XLA merges the splits
(:func:`merge`, by log-sum-exp). Programs whose pages lie past ``lengths[b]`` stop at once. The
result comes with its log-sum-exp, so attention over a further set of keys (jqtz's
full-precision residual window) merges in exactly.

**Two lowerings**, chosen by the config's type:

- :class:`TuningConfig`: Pallas Triton (the default), every kind and scale layout above.
- :class:`MosaicConfig`: Pallas Mosaic GPU, Hopper only (``pallas_kernels.decode_attention_mosaic``,
  whose config and predicate this module re-exports): TMA-loaded steps of 64-256 tokens, both
  products on ``wgmma``; int8, fp8 and 16-bit pages with one scale per token and head (int4 and
  channel groups stay on Triton). The benchmark sweeps both; jqtz's cache keeps Triton unless
  ``jqtz.nn.use_pallas_kernels(lowering="mosaic")`` asks for Mosaic GPU (docs/kernels.md).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from pallas_kernels import decode_attention as da
  >>> q = jax.random.normal(jax.random.key(0), (2, 8, 64))           # (B, H, D)
  >>> kv = jax.random.normal(jax.random.key(1), (2, 2, 128, 2, 64))  # (k|v, B, S, Hkv, D)
  >>> k, tables = da.contiguous_tables(*da.quantize_tokens(kv[0], "int8"), page=32)
  >>> v, _ = da.contiguous_tables(*da.quantize_tokens(kv[1], "int8"), page=32)
  >>> lengths = jnp.array([100, 7])
  >>> out, lse = da.decode_attention(q, k, v, lengths, tables, interpret=True)
  >>> ref, _ = da.reference(q, k, v, lengths, tables)
  >>> out.shape, bool(jnp.abs(out - ref).max() < 1e-4)
  ((2, 8, 64), True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common, decode_attention_mosaic

# The Mosaic GPU lowering's config and predicate, re-exported: one decode-attention entry point.
from pallas_kernels.decode_attention_mosaic import MosaicConfig, mosaic_unsupported  # noqa: F401

KINDS = ("int8", "fp8", "int4", "float")
_Q_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16), np.dtype(jnp.float32))
_CODE_DTYPES = {
    "int8": (np.dtype(jnp.int8),),
    "fp8": (np.dtype(jnp.float8_e4m3fn),),
    "int4": (np.dtype(jnp.uint8),),
    "float": _Q_DTYPES,
}
MASK_VALUE = common.MASK_VALUE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pages:
    """Keys or values in pages, as the kernel reads them.

    Attributes:
      codes: ``(P, page, Hkv, Dc)``: int8; float8_e4m3fn; uint8 holding two unsigned 4-bit
        codes along ``D`` (``Dc = D / 2``, low nibble = even channel); or float (unquantized).
      scale: ``(P, page, Hkv)`` one per token (``per_channel=False``), or ``(P, page, Hkv, G)``
        one per token and group of ``D / G`` channels (as llama.cpp's ``q8_0`` cache, ``G = D /
        32``); ``(P, Hkv, D)`` one per channel and page (``per_channel=True``); or None for
        ``kind="float"``.
      offset: same shape as ``scale`` for int4 (``x ~ code * scale + offset``), else None.
      kind: ``"int8"``, ``"fp8"``, ``"int4"`` or ``"float"`` (static).
      per_channel: whether ``scale`` is per channel (static; KIVI keys).
    """

    codes: jax.Array
    scale: jax.Array | None
    offset: jax.Array | None
    kind: str = dataclasses.field(metadata=dict(static=True))
    per_channel: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def page(self) -> int:
        return self.codes.shape[1]

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * (2 if self.kind == "int4" else 1)

    @property
    def groups(self) -> int:
        """Channel groups of the per-token scales (1: one scale for the whole head)."""
        if self.scale is None or self.per_channel or self.scale.ndim == 3:
            return 1
        return self.scale.shape[-1]

    def check(self, name: str) -> None:
        """Raises ValueError naming ``name`` when shapes, dtypes and ``kind`` disagree."""
        if self.kind not in KINDS:
            raise ValueError(f"`{name}.kind` must be one of {KINDS}, got {self.kind!r}")
        if self.codes.ndim != 4:
            raise ValueError(f"`{name}.codes` must be (P, page, Hkv, Dc), got {self.codes.shape}")
        if np.dtype(self.codes.dtype) not in _CODE_DTYPES[self.kind]:
            raise ValueError(
                f"`{name}.codes` of kind {self.kind!r} must be "
                f"{' or '.join(d.name for d in _CODE_DTYPES[self.kind])}, got {self.codes.dtype}"
            )
        p, page, hkv, _ = self.codes.shape
        d = self.head_dim
        if self.kind == "float":
            want = None
        elif self.per_channel:
            want = (p, hkv, d)
        else:
            want = (p, page, hkv)
            if self.scale is not None and self.scale.ndim == 4:
                ng = self.scale.shape[-1]
                gs = d // ng if ng and d % ng == 0 else 0
                if not gs or (self.kind == "int4" and gs % 2):
                    raise ValueError(
                        f"`{name}.scale` {self.scale.shape}: {ng} channel groups must divide the "
                        f"head dimension {d} (into groups of an even size for int4)"
                    )
                want = (p, page, hkv, ng)
        got = None if self.scale is None else self.scale.shape
        if got != want:
            raise ValueError(f"`{name}.scale` must have shape {want}, got {got}")
        got = None if self.offset is None else self.offset.shape
        if (self.kind == "int4") != (self.offset is not None) or (got not in (None, want)):
            raise ValueError(
                f"`{name}.offset` must be {want} for int4 and None otherwise, got {got}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
    """Launch parameters (static under jit). The defaults were the fastest or within timing
    noise of it in an H100 sweep at 16k tokens (docs/benchmarks.md, 2026-11-23).

    Attributes:
      num_splits: programs per (sequence, KV head) along the sequence; None: enough to give
        the 132 SMs of an H100 about two programs each (at most one loop step per split).
      num_warps, num_stages: Triton launch parameters.
      pages_per_step: pages one loop step reads (independent loads in flight, one online-
        softmax update); None: enough pages for 64 tokens (four of vLLM's 16-token pages).
      int8_via_f16: int8 codes become float16 by an integer add and a bit cast (the float16
        `1152 + code`, less 1152: exact, no integer-to-float conversion, which runs at a
        quarter of the rate of other arithmetic on an H100), and their products run in
        float16 (queries and probabilities rounded to float16 instead of the query dtype:
        3 more mantissa bits than bfloat16). bf16/f16 queries only; other pages ignore it.
      int8_queries: over int8 keys with one scale per token and head, the scores are int8
        products (SageAttention's quantized `q kᵀ`, Zhang et al. 2025): each query head's
        row `q / sqrt(D)` is quantized symmetrically to int8 (one float32 scale per head, in
        XLA before the call) and multiplied with the key codes as they are stored, exactly
        in int32, then scaled by both scales. The key codes reach the tensor cores with no
        conversion; the queries' rounding (at most half a step of `max|q| / 127` per channel)
        is the price. Other keys ignore it. ``jqtz``'s cache sets it from
        ``KVQuantSpec(int8_queries=True)``, whose XLA path rounds the queries the same way.
    """

    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    pages_per_step: int | None = None
    int8_via_f16: bool = False
    int8_queries: bool = False

    def __post_init__(self):
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"TuningConfig.num_splits must be >= 1, got {self.num_splits}")
        if self.pages_per_step is not None and self.pages_per_step < 1:
            raise ValueError(f"TuningConfig.pages_per_step must be >= 1, got {self.pages_per_step}")

    def pages_per_loop_step(self, page: int) -> int:
        """Pages each loop step reads (the default: enough for 64 tokens)."""
        return self.pages_per_step or max(1, 64 // page)


def _splits(cfg: TuningConfig | MosaicConfig, batch: int, hkv: int, pages: int) -> int:
    if cfg.num_splits is not None:
        return min(cfg.num_splits, pages)
    return max(1, min(pages, common.cdiv(2 * 132, batch * hkv)))


# -- the kernel ------------------------------------------------------------------------------
def _channel_parts(x, packed: bool):
    """Even and odd channels of a packed int4 row or tile (last axis), or the whole of it."""
    if not packed:
        return [x]
    c = x.astype(jnp.int32)
    return [(c & 15).astype(jnp.float32), (c >> 4).astype(jnp.float32)]


def _row_parts(ref, page_index, d: int, packed: bool):
    """A per-channel scale row ``ref[page_index] (D,)`` as ``[(1, D/2) even, odd]`` or
    ``[(1, D)]``, float32 (strided loads: the row stays interleaved in memory)."""
    if packed:
        return [
            ref[page_index, pl.ds(j, d // 2, stride=2)].astype(jnp.float32)[None, :] for j in (0, 1)
        ]
    return [ref[page_index, :].astype(jnp.float32)[None, :]]


def _group_slices(d: int, groups: int, packed: bool):
    """Per channel group: the ``(start, size)`` of each of its parts in the kernel's channel
    order (packed int4: all even channels, then all odd ones), and of its code bytes."""
    gs = d // groups
    if packed:
        return [
            ([(gi * gs // 2, gs // 2), (d // 2 + gi * gs // 2, gs // 2)], (gi * gs // 2, gs // 2))
            for gi in range(groups)
        ]
    return [([(gi * gs, gs)], (gi * gs, gs)) for gi in range(groups)]


def _int8_as_f16(codes):
    """int8 codes as exact float16: the bits of `1152 + code` (`0x6480 + code`: exponent of
    1024, the biased code in the mantissa) less 1152; integer arithmetic and a bit cast."""
    bits = codes.astype(jnp.int16) + jnp.int16(0x6480)
    return jax.lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(1152)


def _kernel(
    *refs, layout, page, per_step, steps_per_split, head_dim, compute_dtype, precision, via_f16,
    int8_q
):  # fmt: skip
    k_kind, k_channel, k_off, v_kind, v_off, k_groups, v_groups = layout
    refs = list(refs)
    lengths_ref, tables_ref, q_ref = refs[:3]
    del refs[:3]
    qs_ref = refs.pop(0) if int8_q else None  # (bh,) float32 scales of int8 query rows
    kc_ref = refs.pop(0)
    ks_ref = refs.pop(0) if k_kind != "float" else None
    ko_ref = refs.pop(0) if k_off else None
    vc_ref = refs.pop(0)
    vs_ref = refs.pop(0) if v_kind != "float" else None
    vo_ref = refs.pop(0) if v_off else None
    o_ref, m_ref, l_ref = refs
    k_packed, v_packed = k_kind == "int4", v_kind == "int4"
    k_token_scales = k_kind != "float" and not k_channel
    d = head_dim

    length = lengths_ref[0]
    first = pl.program_id(2) * steps_per_split  # this program's first loop step
    n = jnp.clip(pl.cdiv(length, page * per_step) - first, 0, steps_per_split)
    # The last page of the sequence, counted from this program's first: a step's pages past it
    # read it again (masked), so table entries past the sequence are never read.
    last = jnp.maximum(pl.cdiv(length, page) - 1 - first * per_step, 0)
    k_slices = _group_slices(d, k_groups, k_packed)
    v_slices = _group_slices(d, v_groups, v_packed)
    # The query's parts per key group, and their sums (for int4 key offsets).
    q_groups = [[q_ref[:, pl.ds(st, sz)] for st, sz in parts] for parts, _ in k_slices]
    q_sums = [sum(jnp.sum(qp.astype(jnp.float32), axis=1) for qp in qg) for qg in q_groups]
    bh = q_groups[0][0].shape[0]
    q_scale = qs_ref[...][:, None] if int8_q else None

    def dot(a, b, contract_b):  # a (bh, c) with b (page, c) or (c, page) -> float32
        dtype = compute_dtype
        if via_f16 and b.dtype == jnp.int8:  # `TuningConfig.int8_via_f16`
            b, dtype = _int8_as_f16(b), jnp.float16
        return jax.lax.dot_general(
            a.astype(dtype),
            b.astype(dtype),
            (((1,), (contract_b,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    def token_row(ref, p, gi):  # one scale/offset per token of page p, group gi: (1, page)
        return ref[p, :, gi].astype(jnp.float32)[None, :]

    def scores(i, u, p):  # (bh, page): one product per key channel group and part
        s = 0.0
        for gi, (_, (bst, bsz)) in enumerate(k_slices):
            k_parts = _channel_parts(kc_ref[p, :, pl.ds(bst, bsz)], k_packed)
            if k_channel:  # dequantize with this page's scale row (one group: the whole head)
                scales = _row_parts(ks_ref, p, d, k_packed)
                offs = _row_parts(ko_ref, p, d, k_packed) if k_off else [0.0] * len(scales)
                k_parts = [
                    kp.astype(jnp.float32) * sc + o
                    for kp, sc, o in zip(k_parts, scales, offs, strict=True)
                ]
            if int8_q:  # `TuningConfig.int8_queries`: exact int32 products of the codes
                dims = (((1,), (1,)), ((), ()))
                sg = jax.lax.dot_general(q_groups[gi][0], k_parts[0], dims,
                                         preferred_element_type=jnp.int32)  # fmt: skip
                sg = sg.astype(jnp.float32) * q_scale
            else:
                sg = sum(dot(qp, kp, 1) for qp, kp in zip(q_groups[gi], k_parts, strict=True))
            if k_token_scales:  # per token (and group): scale the group's scores
                sg = sg * token_row(ks_ref, p, gi)
                if k_off:
                    sg = sg + q_sums[gi][:, None] * token_row(ko_ref, p, gi)
            s = s + sg
        start = ((first + i) * per_step + u) * page
        pos = start + jax.lax.broadcasted_iota(jnp.int32, (bh, page), 1)
        return jnp.where(pos < length, s, MASK_VALUE)

    def values(probs, p):  # per-token (and group) scales fold into the probabilities, offsets
        outs = []  # into one extra term per group
        for gi, (_, (bst, bsz)) in enumerate(v_slices):
            probs_v = probs if v_kind == "float" else probs * token_row(vs_ref, p, gi)
            v_parts = _channel_parts(vc_ref[p, :, pl.ds(bst, bsz)], v_packed)
            og = [dot(probs_v, vp, 0) for vp in v_parts]
            if v_off:
                bias = jnp.sum(probs * token_row(vo_ref, p, gi), axis=1)
                og = [o + bias[:, None] for o in og]
            outs += og
        return outs

    def body(i, carry):  # the step's pages, then one online-softmax update over all of them
        acc, m_prev, l_prev = carry
        pages = [tables_ref[jnp.minimum(i * per_step + u, last)] for u in range(per_step)]
        s = [scores(i, u, p) for u, p in enumerate(pages)]
        m_next = functools.reduce(jnp.maximum, [jnp.max(su, axis=1) for su in s], m_prev)
        correction = jnp.exp(m_prev - m_next)
        probs = [jnp.exp(su - m_next[:, None]) for su in s]
        l_next = l_prev * correction + sum(jnp.sum(pu, axis=1) for pu in probs)
        outs = [values(pu, p) for pu, p in zip(probs, pages, strict=True)]
        acc = [a * correction[:, None] + sum(parts) for a, *parts in zip(acc, *outs, strict=True)]
        return acc, m_next, l_next

    out_slices = [sl for parts, _ in v_slices for sl in parts]
    init = (
        [jnp.zeros((bh, sz), jnp.float32) for _, sz in out_slices],
        jnp.full((bh,), MASK_VALUE, jnp.float32),
        jnp.zeros((bh,), jnp.float32),
    )
    acc, m, total = jax.lax.fori_loop(0, n, body, init)
    for (st, sz), a in zip(out_slices, acc, strict=True):
        o_ref[:, pl.ds(st, sz)] = a
    m_ref[...] = m
    l_ref[...] = total


def _deinterleave(x):
    """Last axis ``[x0, x1, x2, ...]`` -> ``[x0, x2, ..., x1, x3, ...]``."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _interleave(x):
    """Inverse of :func:`_deinterleave`."""
    d = x.shape[-1]
    return jnp.stack([x[..., : d // 2], x[..., d // 2 :]], axis=-1).reshape(x.shape)


def merge(outs, lses):
    """Attention over the union of disjoint key sets from each set's normalised output
    ``(..., D)`` and log-sum-exp ``(...)``; returns ``(out float32, lse)``.

    A set with no keys has ``lse = MASK_VALUE`` (or lower) and weight zero.
    """
    lses = jnp.stack([jnp.asarray(x, jnp.float32) for x in lses])
    top = jnp.max(lses, axis=0)
    w = jnp.exp(lses - top)  # (n, ...)
    total = jnp.sum(w, axis=0)
    out = sum(wi[..., None] * o.astype(jnp.float32) for wi, o in zip(w, outs, strict=True))
    return out / total[..., None], top + jnp.log(total)


def _finish(o, m, sums):
    """Merge the splits: ``o (..., splits, bh, D)``, ``m``/``sums (..., splits, bh)``."""
    top = jnp.max(m, axis=-2)
    w = jnp.exp(m - top[..., None, :])
    total = jnp.sum(sums * w, axis=-2)
    out = jnp.sum(o * w[..., None], axis=-3)
    empty = total <= 0
    out = out / jnp.where(empty, 1.0, total)[..., None]
    lse = jnp.where(empty, MASK_VALUE, top + jnp.log(jnp.where(empty, 1.0, total)))
    return out, lse


def _mosaic_attention(q, k: Pages, v: Pages, lengths, block_tables, cfg: MosaicConfig, interpret):
    """The Mosaic GPU path (`decode_attention_mosaic`), merged by :func:`_finish`."""
    page, hkv = k.codes.shape[1:3]
    per_step = cfg.block(page) // page
    splits, per_split, tables = _split_tables(cfg, block_tables, hkv, per_step)
    qs = _scaled_queries(q, hkv, decode_attention_mosaic.ROWS)
    o, m, sums = decode_attention_mosaic.partials(
        q, qs, k, v, lengths, tables, splits=splits, per_split=per_split, cfg=cfg,
        interpret=interpret,
    )  # fmt: skip
    return _finish(o, m, sums)


def _split_tables(cfg: TuningConfig | MosaicConfig, block_tables, hkv: int, per_step: int = 1):
    """``(splits, steps per split, tables (B, splits * steps per split * per_step))``: splits
    over steps of ``per_step`` pages, and the block tables padded so that every split has the
    same number of entries (padding is never read)."""
    b, pps_all = block_tables.shape
    steps_all = common.cdiv(pps_all, per_step)
    splits = _splits(cfg, b, hkv, steps_all)
    per_split = common.cdiv(steps_all, splits)
    size = splits * per_split * per_step
    return splits, per_split, common.pad_axis(block_tables.astype(jnp.int32), 1, size)


def _scaled_queries(q, hkv: int, rows: int, *, deinterleave: bool = False):
    """``q (B, H, D) / sqrt(D)`` as ``(B, Hkv, rows, D)``: the ``G`` heads of each KV head
    zero-padded to ``rows`` (one tile), channels even-then-odd for packed int4 keys."""
    b, h, d = q.shape
    qs = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    if deinterleave:
        qs = _deinterleave(qs)
    return common.pad_axis(qs.reshape(b, hkv, h // hkv, d), 2, rows)


def quantize_queries(qs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows of ``qs (..., D)`` as symmetric int8 codes with one float32 scale per row,
    ``max|row| / 127`` (1 for a zero row): ``(codes (..., D) int8, scales (...))``, for
    :class:`TuningConfig`'s ``int8_queries``.

    Example:
      >>> import jax.numpy as jnp
      >>> codes, scale = quantize_queries(jnp.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]]))
      >>> codes.tolist(), scale.tolist()
      ([[64, -127, 32], [0, 0, 0]], [0.007874015718698502, 1.0])
    """
    x = qs.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127
    scale = jnp.where(scale == 0, 1.0, scale)
    codes = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return codes, scale


def rounded_queries(q: jax.Array) -> jax.Array:
    """The float32 queries ``q (..., D)`` whose attention ``int8_queries`` computes: each
    row's ``q / sqrt(D)`` in ``q``'s dtype, rounded by :func:`quantize_queries`, times
    ``sqrt(D)``. Attention over them is what the kernel's int8 scores give (the XLA path of
    ``KVQuantSpec(int8_queries=True)``, and the kernel's benchmark reference).

    Example (steps of 4 / 127: -2 is 63.5 steps and rounds to 64, 0.01 to none):
      >>> import jax.numpy as jnp
      >>> [round(v, 4) for v in rounded_queries(jnp.array([4.0, -2.0, 0.01, 0.0])).tolist()]
      [4.0, -2.0157, 0.0, 0.0]
    """
    d = q.shape[-1]
    codes, scale = quantize_queries((q.astype(jnp.float32) * d**-0.5).astype(q.dtype))
    return codes.astype(jnp.float32) * (scale[..., None] * d**0.5)


def _triton_attention(q, k: Pages, v: Pages, lengths, block_tables, cfg: TuningConfig, interpret):
    """The Triton kernel: per-program partial outputs ``(B, Hkv, splits, rows, D)`` (rows: the
    ``G`` query heads padded to 16 or a power of two) with their running max and sum, merged by
    :func:`_finish`. Packed int4 outputs come in the kernel's channel order (even, then odd)."""
    b, h, d = q.shape
    n_pages, page, hkv, _ = k.codes.shape
    bh = max(16, 1 << (h // hkv - 1).bit_length())
    per_step = cfg.pages_per_loop_step(page)
    splits, per_split, tables = _split_tables(cfg, block_tables, hkv, per_step)
    pps = per_split * per_step  # table entries per program
    tables = tables.reshape(b, splits, pps)
    compute = np.dtype(q.dtype)
    qs = _scaled_queries(q, hkv, bh, deinterleave=k.kind == "int4")
    int8_q = cfg.int8_queries and k.kind == "int8" and not k.per_channel and k.groups == 1
    q_scale = None
    if int8_q:
        qs, q_scale = quantize_queries(qs)

    layout = (k.kind, k.per_channel, k.offset is not None, v.kind, v.offset is not None,
              k.groups, v.groups)  # fmt: skip
    per_token = lambda ng: pl.BlockSpec((n_pages, page, None, ng), lambda i, j, s: (0, 0, j, 0))
    grouped = lambda a: a if a.ndim == 4 else a[..., None]  # (P, page, Hkv, G): a free reshape
    per_channel = lambda: pl.BlockSpec((n_pages, None, d), lambda i, j, s: (0, j, 0))
    codes_spec = lambda c: pl.BlockSpec((n_pages, page, None, c.shape[-1]),
                                        lambda i, j, s: (0, 0, j, 0))  # fmt: skip
    args = [lengths.astype(jnp.int32), tables, qs]
    specs = [
        pl.BlockSpec((1,), lambda i, j, s: (i,)),
        pl.BlockSpec((None, None, pps), lambda i, j, s: (i, s, 0)),
        pl.BlockSpec((None, None, bh, d), lambda i, j, s: (i, j, 0, 0)),
    ]
    if int8_q:
        args.append(q_scale)
        specs.append(pl.BlockSpec((None, None, bh), lambda i, j, s: (i, j, 0)))
    args.append(k.codes)
    specs.append(codes_spec(k.codes))
    for arr in (k.scale, k.offset):
        if arr is not None:
            args.append(arr if k.per_channel else grouped(arr))
            specs.append(per_channel() if k.per_channel else per_token(k.groups))
    args.append(v.codes)
    specs.append(codes_spec(v.codes))
    for arr in (v.scale, v.offset):
        if arr is not None:
            args.append(grouped(arr))
            specs.append(per_token(v.groups))
    precision = jax.lax.Precision.HIGHEST if compute == np.dtype(jnp.float32) else None
    o, m, sums = pl.pallas_call(
        functools.partial(
            _kernel,
            layout=layout,
            page=page,
            per_step=per_step,
            steps_per_split=per_split,
            head_dim=d,
            compute_dtype=compute,
            precision=precision,
            via_f16=cfg.int8_via_f16 and compute != np.dtype(jnp.float32),
            int8_q=int8_q,
        ),
        grid=(b, hkv, splits),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, None, None, bh, d), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((None, None, None, bh), lambda i, j, s: (i, j, s, 0)),
            pl.BlockSpec((None, None, None, bh), lambda i, j, s: (i, j, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, splits, bh, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, bh), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, bh), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"decode_attention_{k.kind}",
    )(*args)
    return _finish(o, m, sums)


def _check_inputs(q, k: Pages, v: Pages, lengths, block_tables):
    if q.ndim != 3 or np.dtype(q.dtype) not in _Q_DTYPES:
        raise ValueError(f"`q` must be (B, H, D) bf16, f16 or f32, got {q.shape} {q.dtype}")
    k.check("k")
    v.check("v")
    if v.per_channel:
        raise ValueError("`v` must have per-token scales (per_channel=False)")
    b, h, d = q.shape
    if k.codes.shape[:3] != v.codes.shape[:3] or k.head_dim != d or v.head_dim != d:
        raise ValueError(
            f"`k` {k.codes.shape} and `v` {v.codes.shape} pages must match each other and the "
            f"head dimension {d} of `q` (int4 codes hold D/2 bytes)"
        )
    hkv = k.codes.shape[2]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({hkv})")
    if lengths.shape != (b,) or block_tables.ndim != 2 or block_tables.shape[0] != b:
        raise ValueError(
            f"`lengths` must be ({b},) and `block_tables` ({b}, pages_per_seq), got "
            f"{lengths.shape} and {block_tables.shape}"
        )


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decode_attention(
    q: jax.Array,
    k: Pages,
    v: Pages,
    lengths: jax.Array,
    block_tables: jax.Array,
    *,
    config: TuningConfig | MosaicConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention of one query token per sequence over paged, quantized keys and values.

    Args:
      q: ``(B, H, D)`` bf16/f16/f32 (RoPE applied; not yet scaled by ``1/sqrt(D)``).
      k, v: :class:`Pages` of keys and values (values per token).
      lengths: int32 ``(B,)``: positions ``[0, lengths[b])`` of sequence ``b`` are attended;
        at most ``pages_per_seq * page`` (values are not checked under ``jit``: positions past
        the table read page 0, as an overfull ``KVCache`` would read clamped slots).
      block_tables: int32 ``(B, pages_per_seq)``: page ``j`` of sequence ``b`` is
        ``block_tables[b, j]``; entries past ``ceil(lengths[b] / page)`` are not read.
      config: a :class:`TuningConfig` (Triton; the default :class:`TuningConfig()`) or a
        :class:`MosaicConfig` (Mosaic GPU, Hopper; int8/fp8/16-bit pages with per-token scales).
      interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.

    Returns:
      ``(out (B, H, D) in q.dtype, lse (B, H) float32)``; a sequence of length 0 gives zeros
      and ``lse = MASK_VALUE``.
    """
    _check_inputs(q, k, v, lengths, block_tables)
    cfg = config or TuningConfig()
    run = _mosaic_attention if isinstance(cfg, MosaicConfig) else _triton_attention
    out, lse = run(q, k, v, lengths, block_tables, cfg, interpret)  # (B, Hkv, rows, D)
    b, h, d = q.shape
    g = h // k.codes.shape[2]
    out, lse = out[:, :, :g].reshape(b, h, d), lse[:, :, :g].reshape(b, h)
    if v.kind == "int4":
        out = _interleave(out)
    return out.astype(q.dtype), lse


# -- layouts, reference, predicate -----------------------------------------------------------
def contiguous_tables(codes, scale, offset, kind, *, page: int, per_channel: bool = False):
    """:class:`Pages` and ``block_tables`` for a contiguous cache ``codes (B, S, Hkv, Dc)``.

    ``scale``/``offset``: ``(B, S, Hkv)`` per token, ``(B, S, Hkv, G)`` per token and channel
    group, or ``(B, S / page, Hkv, D)`` per channel (one row per page). Reshapes only (no copy);
    ``S`` must be a multiple of ``page``.
    """
    b, s, hkv, dc = codes.shape
    if s % page:
        raise ValueError(f"the cache length {s} must be a multiple of `page` ({page})")
    n = s // page

    def paged(x):
        if x is None:
            return None
        if per_channel:
            return x.reshape(b * n, hkv, x.shape[-1])
        return x.reshape(b * n, page, hkv, *x.shape[3:])

    pages = Pages(codes.reshape(b * n, page, hkv, dc), paged(scale), paged(offset), kind,
                  per_channel)  # fmt: skip
    tables = jnp.arange(b, dtype=jnp.int32)[:, None] * n + jnp.arange(n, dtype=jnp.int32)
    return pages, tables


def quantize_tokens(x, kind: str, group_size: int | None = None):
    """Per-token codes of ``x (B, S, Hkv, D)``: ``(codes, scale, offset, kind)`` for
    :func:`contiguous_tables` (int8, fp8 symmetric; int4 asymmetric with offsets), one scale per
    token, or per token and group of ``group_size`` channels (scales ``(B, S, Hkv, D /
    group_size)``). For tests and benchmarks; jqtz's cache quantizes the same way when tokens
    are appended."""
    x = x.astype(jnp.float32)
    if kind == "float":
        return x, None, None, kind
    d = x.shape[-1]
    xg = x.reshape(*x.shape[:-1], -1, group_size or d)  # (..., G, group)
    squeeze = (lambda a: a[..., 0]) if group_size is None else (lambda a: a)
    if kind == "int4":
        lo, hi = xg.min(axis=-1), xg.max(axis=-1)
        scale = jnp.maximum((hi - lo) / 15, 1e-8)
        codes = jnp.clip(jnp.round((xg - lo[..., None]) / scale[..., None]), 0, 15)
        codes = codes.astype(jnp.uint8).reshape(x.shape)
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return packed, squeeze(scale), squeeze(lo), kind
    qmax = 127.0 if kind == "int8" else 448.0
    scale = jnp.maximum(jnp.abs(xg).max(axis=-1) / qmax, 1e-8)
    v = jnp.clip(xg / scale[..., None], -qmax, qmax).reshape(x.shape)
    codes = jnp.round(v).astype(jnp.int8) if kind == "int8" else v.astype(jnp.float8_e4m3fn)
    return codes, squeeze(scale), None, kind


def dequantize(pages: Pages) -> jax.Array:
    """The float32 values of every page, ``(P, page, Hkv, D)``."""
    c = pages.codes
    if pages.kind == "int4":
        c = c.astype(jnp.int32)
        c = jnp.stack([c & 15, c >> 4], axis=-1).reshape(*c.shape[:-1], -1)
    x = c.astype(jnp.float32)
    if pages.scale is None:
        return x
    if pages.per_channel:
        expand = lambda a: a.astype(jnp.float32)[:, None]  # (P, 1, Hkv, D)
    else:  # (P, page, Hkv, G, 1) against the channels in G groups
        ng = pages.groups
        x = x.reshape(*x.shape[:-1], ng, -1)
        expand = lambda a: a.astype(jnp.float32).reshape(*x.shape[:-1], 1)
    x = x * expand(pages.scale)
    if pages.offset is not None:
        x = x + expand(pages.offset)
    return x.reshape(*x.shape[:3], -1)


def reference(q, k: Pages, v: Pages, lengths, block_tables):
    """Pure-jnp reference: dequantize, gather each sequence's pages, softmax in float32.

    Returns ``(out (B, H, D) in q.dtype, lse (B, H) float32)``, like :func:`decode_attention`.
    """
    _check_inputs(q, k, v, lengths, block_tables)
    b, h, d = q.shape
    hkv = k.codes.shape[2]
    keys, values = (dequantize(p)[block_tables] for p in (k, v))  # (B, n, page, Hkv, D)
    keys, values = (x.reshape(b, -1, hkv, d) for x in (keys, values))
    qg = q.astype(jnp.float32).reshape(b, hkv, h // hkv, d)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, keys, precision=jax.lax.Precision.HIGHEST) * d**-0.5
    valid = jnp.arange(keys.shape[1])[None, :] < lengths[:, None]  # (B, S)
    s = jnp.where(valid[:, None, None], s, MASK_VALUE)
    lse = jax.nn.logsumexp(s, axis=-1)
    probs = jnp.exp(s - lse[..., None])
    out = jnp.einsum("bkgs,bskd->bkgd", probs, values, precision=jax.lax.Precision.HIGHEST)
    empty = (lengths == 0)[:, None]
    out = jnp.where(empty[..., None], 0.0, out.reshape(b, h, d))
    lse = jnp.where(empty, MASK_VALUE, lse.reshape(b, h))
    return out.astype(q.dtype), lse


def can_use(q, k: Pages, v: Pages, *, backend: str | None = None, compute_capability=None):
    """Whether :func:`decode_attention` should run on the GPU for these operands.

    Needs an NVIDIA GPU with compute capability >= 8.0 (8.9 for fp8 codes), ``q (B, H, D)``
    bf16/f16/f32 with ``D`` a power of two >= 16 (>= 32 for int4), pages of a power-of-two
    number of tokens >= 16, at most 64 query heads per KV head and per-token value scales;
    channel groups of per-token scales of a power-of-two size >= 16 (>= 32 for int4).
    """
    cc = common.gpu_capability(backend, compute_capability)
    if cc is None:
        return False
    if "fp8" in (k.kind, v.kind) and cc < (8, 9):
        return False
    if q.ndim != 3 or np.dtype(q.dtype) not in _Q_DTYPES or v.per_channel:
        return False
    d, page = q.shape[-1], k.codes.shape[1]
    min_d = 32 if "int4" in (k.kind, v.kind) else 16
    g = q.shape[1] // k.codes.shape[2]
    for pages in (k, v):  # channel groups: power-of-two products of >= 16 channels per part
        gs = d // pages.groups
        if pages.groups > 1 and not (
            common.is_pow2(gs) and gs >= (32 if pages.kind == "int4" else 16)
        ):
            return False
    return common.is_pow2(d) and d >= min_d and common.is_pow2(page) and page >= 16 and g <= 64


# -- benchmark -------------------------------------------------------------------------------


def __getattr__(name):
    """The benchmark's names (`decode_attention_bench.__all__`), imported on first use."""
    from pallas_kernels import decode_attention_bench

    if name in decode_attention_bench.__all__:
        return getattr(decode_attention_bench, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from pallas_kernels.decode_attention_bench import main

    raise SystemExit(main())

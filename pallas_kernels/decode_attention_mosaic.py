"""The Mosaic GPU (Hopper) lowering of decode attention: ``decode_attention(...,
config=MosaicConfig())``.

Steps of 64-256 tokens (one page, or several small pages gathered in table order) are
TMA-loaded through a ring of barriers, 8-bit codes are widened to 16 bits in shared memory, and
both products run on ``wgmma`` (the ``G`` query heads padded to its 64 rows). int8, fp8 and
16-bit pages with one scale per token and head; int4 and channel groups stay on Triton. The
per-token scales are transposed per call (1/D of the codes' bytes), since one head's scales of
a page are strided in ``(P, page, Hkv)`` and a TMA row needs 16 contiguous bytes.

``decode_attention`` re-exports :class:`MosaicConfig` and :func:`mosaic_unsupported`; its
reference, ``can_use``, split merging and benchmark cover both lowerings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common

if TYPE_CHECKING:
    from pallas_kernels.decode_attention import Pages

_Q_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicConfig:
    """Launch parameters of the Mosaic GPU path (Hopper ``wgmma``; static under jit).

    Selecting it runs the attention through Mosaic GPU instead of Triton, for int8, fp8 and
    16-bit pages with one scale per token and head (:func:`mosaic_unsupported` says what else it
    needs); int4 pages and channel-grouped scales stay on the Triton kernel.

    Attributes:
      num_splits: programs per (sequence, KV head) along the sequence, as in
        :class:`TuningConfig` (counted in steps of ``block_tokens``).
      max_concurrent_steps: steps whose TMA loads are in flight per program, at least 2.
      block_tokens: tokens per step: 64, 128 or 256, a multiple of the page size (a step
        gathers that many pages, in table order); None: the page size, or 64 for smaller
        pages (vLLM's 16-token pages make four pages a step).

    Example (the Mosaic GPU interpreter on a CPU; on an H100, interpret=False):
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels import decode_attention as da
      >>> q = jax.random.normal(jax.random.key(0), (2, 8, 64), jnp.bfloat16)
      >>> kv = jax.random.normal(jax.random.key(1), (2, 2, 128, 2, 64))
      >>> k, tables = da.contiguous_tables(*da.quantize_tokens(kv[0], "int8"), page=64)
      >>> v, _ = da.contiguous_tables(*da.quantize_tokens(kv[1], "int8"), page=64)
      >>> lengths = jnp.array([100, 7])
      >>> out, _ = da.decode_attention(q, k, v, lengths, tables, config=da.MosaicConfig(),
      ...                              interpret=True)
      >>> ref, _ = da.reference(q, k, v, lengths, tables)
      >>> bool(jnp.abs(out.astype(float) - ref.astype(float)).max() < 2e-2)
      True
    """

    num_splits: int | None = None
    max_concurrent_steps: int = 2
    block_tokens: int | None = None

    def __post_init__(self):
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"MosaicConfig.num_splits must be >= 1, got {self.num_splits}")
        if self.max_concurrent_steps < 2:
            raise ValueError(
                f"MosaicConfig.max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}"
            )
        if self.block_tokens not in (None, 64, 128, 256):
            raise ValueError(
                f"MosaicConfig.block_tokens must be 64, 128, 256 or None, got {self.block_tokens}"
            )

    def block(self, page: int) -> int:
        """Tokens per step for pages of ``page`` tokens."""
        return self.block_tokens or max(64, page)


#: Query rows per program on the Mosaic GPU path: the ``wgmma`` M (the ``G`` heads of a KV head,
#: zero-padded).
ROWS = 64


#: Shared memory of one H100 block (opt-in maximum).
SMEM_BYTES = 232_448


def _smem_bytes(q, k: Pages, v: Pages, steps: int, block: int) -> int:
    """Shared memory of the Mosaic GPU kernel's pipeline phase (the output store reuses it)."""
    d = q.shape[-1]
    half = np.dtype(q.dtype).itemsize
    total = ROWS * d * half + ROWS * block * half  # queries, probabilities
    for pages in (k, v):
        total += steps * block * d * np.dtype(pages.codes.dtype).itemsize  # the TMA stages
        if pages.scale is not None:
            total += steps * block * np.dtype(pages.scale.dtype).itemsize + block * d * half
    return total + 4096  # barriers and alignment (about 2 KiB measured), rounded up


def mosaic_unsupported(q, k: Pages, v: Pages, config: MosaicConfig | None = None) -> str | None:
    """Why ``config`` (default :class:`MosaicConfig()`) cannot run these operands (None: it can).

    The Mosaic GPU path needs bf16/f16 queries, int8, fp8 or 16-bit pages of the query's dtype
    with one scale per token and head (no channel groups), a head dimension that is a multiple
    of 64 up to 256, pages of a power-of-two number of tokens >= 16 that divides the step
    (``block_tokens``) or is a multiple of 64 up to 256, a two-step pipeline that fits in shared
    memory (int8 steps of 128 tokens with D = 128 do; 256 tokens with D = 128 do not), and at
    most 64 query heads per KV head.
    """
    config = config or MosaicConfig()
    d, page = q.shape[-1], k.codes.shape[1]
    g = q.shape[1] // k.codes.shape[2]
    if np.dtype(q.dtype) not in _Q_DTYPES:
        return f"queries must be bf16 or f16, got {q.dtype}"
    for name, pages in (("k", k), ("v", v)):
        if pages.kind == "int4" or pages.per_channel or pages.groups > 1:
            return f"`{name}` must be int8, fp8 or float pages with one scale per token and head"
        if pages.kind == "float" and pages.codes.dtype != q.dtype:
            return f"`{name}` float pages must have the query's dtype {q.dtype}"
    if d % 64 or d > 256:
        return f"the head dimension must be a multiple of 64 up to 256, got {d}"
    block = config.block(page)
    if not (common.is_pow2(page) and 16 <= page <= 256 and block % page == 0 and block <= 256):
        return (f"pages must hold a power of two >= 16 tokens dividing the step of {block} "
                f"tokens (block_tokens), up to 256; got {page}")  # fmt: skip
    if g > ROWS:
        return f"at most {ROWS} query heads per KV head, got {g}"
    if (smem := _smem_bytes(q, k, v, 2, block)) > SMEM_BYTES:
        return (f"steps of {block} tokens x {d} channels need {smem} bytes of shared memory "
                f"with two pipeline steps; a block has {SMEM_BYTES}")  # fmt: skip
    return None


def _kernel(lengths_g, tables_g, q_g, kc_g, *refs, layout, page, block, per_split, hkv, d, steps):
    """One warpgroup per (sequence, KV head, split). Each step waits for one ``block`` of
    tokens (``block / page`` pages of key and value codes and scales, TMA-loaded into one slot
    in table order), widens 8-bit codes to 16 bits in shared memory (exact), refills the slot
    with the block ``steps`` ahead, and runs the two products on ``wgmma``: scores ``q k^T``
    (64 x block), scaled by the key scales in float32, and, after the online softmax, ``p v``
    (64 x D) with the value scales folded into ``p``, as the Triton kernel does. Programs past
    the sequence's length load nothing; pages of a block past it reload the last page (masked),
    so table entries past ``ceil(length / page)`` are never read."""
    k_quant, v_quant = layout
    refs = list(refs)
    ks_g = refs.pop(0) if k_quant else None
    vc_g = refs.pop(0)
    vs_g = refs.pop(0) if v_quant else None
    o_g, m_g, l_g = refs
    dtype = q_g.dtype
    rows = ROWS
    b, j, split = (jax.lax.axis_index(a) for a in ("b", "h", "s"))
    length = lengths_g[b]
    first = split * per_split  # this program's first block
    n = jnp.clip(pl.cdiv(length, block) - first, 0, per_split)
    last_page = jnp.maximum(pl.cdiv(length, page) - 1, 0)
    col = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile

    def main(q_s, q_bar, stage, bars, k16, v16, p_s):
        kc_s, ks_s, vc_s, vs_s = stage

        def fetch(i, slot):  # block i of this program's run into slot `slot`
            for u in range(block // page):
                p = tables_g[b, jnp.minimum((first + i) * (block // page) + u, last_page)]
                tile, rows_u = (pl.ds(p * page, page), pl.ds(j * d, d)), pl.ds(u * page, page)
                plgpu.copy_gmem_to_smem(kc_g.at[tile], kc_s.at[slot, rows_u], bars.at[slot])
                plgpu.copy_gmem_to_smem(vc_g.at[tile], vc_s.at[slot, rows_u], bars.at[slot])
                for sc_g, sc_s in ((ks_g, ks_s), (vs_g, vs_s)):
                    if sc_g is not None:
                        plgpu.copy_gmem_to_smem(
                            sc_g.at[p * hkv + j], sc_s.at[slot, rows_u], bars.at[slot]
                        )

        plgpu.copy_gmem_to_smem(q_g.at[b, j], q_s, q_bar)
        for i in range(steps):
            pl.when(i < n)(functools.partial(fetch, i, i))
        plgpu.barrier_wait(q_bar)

        def widen(c_s, slot, out):  # 8-bit codes -> 16 bits, exact
            c = plgpu.load(c_s.at[slot], layout=plgpu.Layout.WGMMA)
            if c.dtype == jnp.float8_e4m3fn and dtype == jnp.bfloat16:  # sm_90: e4m3 -> f16 only
                c = c.astype(jnp.float32)
            out[...] = c.astype(dtype)

        def scale_row(sc_s, slot, shape):  # per-token scales along the columns of a tile
            sc = plgpu.load(sc_s.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            return jax.lax.broadcast_in_dim(sc.astype(jnp.float32), shape, [1])

        def product(a, b_, shape):
            def run(acc_ref):
                plgpu.wgmma(acc_ref, a, b_)
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

        def body(i, carry):
            acc, m_prev, l_prev = carry
            slot = jax.lax.rem(i, steps)
            plgpu.barrier_wait(bars.at[slot])
            keys = kc_s.at[slot] if not k_quant else k16
            values = vc_s.at[slot] if not v_quant else v16
            if k_quant:
                widen(kc_s, slot, k16)
                k_scale = scale_row(ks_s, slot, (rows, block))
            if v_quant:
                widen(vc_s, slot, v16)
                v_scale = scale_row(vs_s, slot, (rows, block))
            plgpu.commit_smem()
            s = product(q_s, keys.T, (rows, block))
            if k_quant:  # per-token key scales multiply the scores
                s = s * k_scale
            if k_quant and v_quant:  # the slot's codes are in registers: refill it now
                pl.when(i + steps < n)(functools.partial(fetch, i + steps, slot))
            pos = (first + i) * block + plgpu.broadcasted_iota(
                jnp.int32, (rows, block), 1, layout=plgpu.Layout.WGMMA
            )
            s = jnp.where(pos < length, s, common.MASK_VALUE)
            m_next = jnp.maximum(m_prev, s.max(axis=1))
            correction = jnp.exp(m_prev - m_next)
            probs = jnp.exp(s - jax.lax.broadcast_in_dim(m_next, s.shape, [0]))
            l_next = l_prev * correction + probs.sum(axis=1)
            # per-token value scales fold into the probabilities
            p_s[...] = (probs * v_scale if v_quant else probs).astype(dtype)
            plgpu.commit_smem()
            pv = product(p_s, values, (rows, d))
            if not (k_quant and v_quant):  # a 16-bit slot was read by wgmma: refill after it
                pl.when(i + steps < n)(functools.partial(fetch, i + steps, slot))
            acc = acc * jax.lax.broadcast_in_dim(correction, acc.shape, [0]) + pv
            return acc, m_next, l_next

        init = (
            plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((rows,), common.MASK_VALUE, jnp.float32), col),
            plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), col),
        )
        return jax.lax.fori_loop(0, n, body, init)

    stage = (
        plgpu.SMEM((steps, block, d), kc_g.dtype),
        plgpu.SMEM((steps, block), ks_g.dtype) if k_quant else None,
        plgpu.SMEM((steps, block, d), vc_g.dtype),
        plgpu.SMEM((steps, block), vs_g.dtype) if v_quant else None,
    )
    arrivals = (2 + k_quant + v_quant) * (block // page)  # one per TMA copy of a step
    acc, m, total = pl.run_scoped(
        main,
        plgpu.SMEM((rows, d), dtype),
        plgpu.Barrier(num_barriers=1),
        stage,
        plgpu.Barrier(num_arrivals=arrivals, num_barriers=steps),
        plgpu.SMEM((block, d), dtype) if k_quant else None,
        plgpu.SMEM((block, d), dtype) if v_quant else None,
        plgpu.SMEM((rows, block), dtype),
    )

    def store(o_s, ml_s):  # the pipeline's buffers are free again: reuse their space
        o_s[...] = acc
        ml_s[0] = m
        ml_s[1] = total
        plgpu.commit_smem()
        out = o_g.shape[-2]  # only the rows of real query heads (rounded up to 8) are written
        plgpu.copy_smem_to_gmem(o_s.at[pl.ds(0, out)], o_g.at[b, j, split])
        plgpu.copy_smem_to_gmem(ml_s.at[0, pl.ds(0, out)], m_g.at[b, j, split])
        plgpu.copy_smem_to_gmem(ml_s.at[1, pl.ds(0, out)], l_g.at[b, j, split])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM((rows, d), jnp.float32), plgpu.SMEM((2, rows), jnp.float32))


def partials(
    q,
    qs,
    k: Pages,
    v: Pages,
    lengths,
    tables,
    *,
    splits: int,
    per_split: int,
    cfg: MosaicConfig,
    interpret: bool,
):
    """Per-program partial outputs ``(B, Hkv, splits, rows, D)`` (rows: the ``G`` query heads
    rounded up to 8) with their running max and sum, which ``decode_attention`` merges as the
    Triton kernel's. ``qs``: the scaled queries ``(B, Hkv, ROWS, D)``; ``tables``: the block
    tables padded to ``splits * per_split`` steps of ``cfg.block(page) / page`` pages."""
    reason = mosaic_unsupported(q, k, v, cfg)
    if reason:
        raise ValueError(
            f"decode_attention with a MosaicConfig: {reason}. Use a TuningConfig (Triton) for "
            "these pages."
        )
    common.require_hopper_for_mosaic(interpret)
    b, h, d = q.shape
    n_pages, page, hkv, _ = k.codes.shape
    block = cfg.block(page)
    steps = min(cfg.max_concurrent_steps, per_split)
    smem = _smem_bytes(q, k, v, steps, block)
    if smem > SMEM_BYTES:
        raise ValueError(
            f"MosaicConfig.max_concurrent_steps={cfg.max_concurrent_steps} needs {smem} bytes of "
            f"shared memory for steps of {block} tokens x {d} channels; an H100 block has "
            f"{SMEM_BYTES}. Use fewer steps (at least 2) or a smaller block_tokens."
        )
    # Codes as 2-D (tokens, heads x D) for TMA tiles; per-token scales transposed so one KV
    # head's scales of a page are contiguous (a TMA row needs >= 16 bytes): a copy of 1/D of
    # the codes' size per call.
    codes = lambda c: c.reshape(n_pages * page, hkv * d)
    scales = lambda sc: jnp.swapaxes(sc, 1, 2).reshape(n_pages * hkv, page)
    args = [lengths.astype(jnp.int32), tables, qs, codes(k.codes)]
    args += [scales(k.scale)] if k.scale is not None else []
    args += [codes(v.codes)] + ([scales(v.scale)] if v.scale is not None else [])
    body = functools.partial(
        _kernel,
        layout=(k.scale is not None, v.scale is not None),
        page=page,
        block=block,
        per_split=per_split,
        hkv=hkv,
        d=d,
        steps=steps,
    )
    # Partial results for the G real query heads only (8-row granules of shared memory).
    out_rows = common.round_up(h // hkv, 8)
    partial = lambda *shape: jax.ShapeDtypeStruct((b, hkv, splits, *shape), jnp.float32)
    o, m, sums = plgpu.kernel(
        body,
        out_type=[partial(out_rows, d), partial(out_rows), partial(out_rows)],
        grid=(b, hkv, splits),
        grid_names=("b", "h", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
        kernel_name=f"decode_attention_mgpu_{k.kind}",
    )(*args)
    return o, m, sums

"""W8A8 matrix products on the codes: INT8 x INT8 -> INT32 and FP8 e4m3 x e4m3 -> FP32.

`y[m, n] = sum_kb sx[m, kb] * sw[kb, n] * sum_{k in block kb} xq[m, k] * wq[k, n]`

- `kb` runs over K blocks of `scale_block` rows: one block (`scale_block = K`) for per-token
  activation x per-channel weight scales (and per-tensor scales, broadcast), where both scales
  are applied once in the epilogue; 128 for DeepSeek-V3-style 1x128 activation groups and
  128x128 weight blocks, where each block's partial product is scaled as it is accumulated.
- The codes are multiplied on the tensor cores and scaled in float32. int8 products sum
  exactly in int32 (with one scale along K, over the whole of K: converted once). e4m3
  products are exact, but Hopper's fp8 `wgmma` sums them inside the tensor core with fewer
  bits than float32 (about 14, DeepSeek-V3 §3.3.2): the Triton kernel adds each 128
  products' partial sum to float32 (`common.fp8_dot`, DeepSeek's interval), as does the
  Mosaic GPU kernel with block scales; with one scale along K the Mosaic GPU kernel sums the
  whole of K in `wgmma`'s accumulator (cuBLAS's "fast accumulation").

Activations are quantized by XLA before the call (`quantize_rows`, per token, symmetric, which
XLA can fuse into the producer of `x`).

Two lowerings, chosen by the config's type:
- `TuningConfig`: Pallas Triton (`matmul`'s default). Reads the weight `[K, N]` as flax stores it,
  or `[N, K]` (`w_k_major`) in place, with all scale layouts above.
- `MosaicConfig`: Pallas Mosaic GPU, Hopper only: a TMA pipeline feeding `wgmma` from shared
  memory, scales in the epilogue. 8-bit `wgmma` reads B K-major only, so the weight must be
  `[N, K]` (`to_k_major`; a tree's W8A8 codes are stored so once by `jqtz.nn.serving_layout`).
  Every scale layout above: with 128-row blocks each step's product is scaled and summed in
  float32 registers (`BLOCK_MOSAIC_CONFIG`).

The serving path (`dispatch`) runs Mosaic GPU from `K_MAJOR_ROWS` rows where it applies, on a
Hopper GPU: on an H100 it ran int8 1.9x and fp8 2.4x faster than Triton at 4096 x 8192 x 8192
(docs/benchmarks.md). Triton serves the rest (1x128 block scales unless the lowering is
"mosaic", fewer rows, other GPUs).
Codes stored `[N, K]` are read in place at every M; `[K, N]` codes are transposed per call
from `K_MAJOR_ROWS` rows.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from pallas_kernels import w8a8
  >>> x = jax.random.normal(jax.random.key(0), (4, 256))
  >>> w = jax.random.normal(jax.random.key(1), (256, 128))
  >>> wq, sw = w8a8.quantize_cols(w, jnp.int8)
  >>> xq, sx = w8a8.quantize_rows(x, jnp.int8)
  >>> y = w8a8.matmul(xq, sx, wq, sw, interpret=True)
  >>> bool(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w) < 0.02)
  True
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common

_CODE_DTYPES = {np.dtype(jnp.int8): 127.0, np.dtype(jnp.float8_e4m3fn): 448.0}
#: K rows per scale block when scales vary along K (1x128 activation groups, 128x128 weight
#: blocks).
SCALE_BLOCK = 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
    """Block sizes and launch parameters (static under jit); H100 defaults for M >= 128."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not common.is_pow2(v) or v < 16:
                raise ValueError(f"TuningConfig.{name} must be a power of two >= 16, got {v}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicConfig:
    """Tiles for the Mosaic GPU path (TMA pipeline feeding Hopper `wgmma`; static under jit).

    Selecting it runs the product through Mosaic GPU instead of Triton. 8-bit `wgmma` reads its
    B operand K-major only, so this path takes the weight as `[N, K]` (`w_k_major=True`).

    Attributes:
      tile_m: rows per output tile, a multiple of 64 (the `wgmma` M).
      tile_n: columns per output tile, a multiple of 8 and at most 256.
      tile_k: K per pipeline step, a multiple of 64.
      max_concurrent_steps: pipeline depth (TMA loads in flight), at least 2.
      grid_tile_width: width of the snake order over output tiles (L2 reuse of operands).

    Example (the Mosaic GPU interpreter on a CPU; on an H100, interpret=False):
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels import w8a8
      >>> xq, sx = w8a8.quantize_rows(jax.random.normal(jax.random.key(0), (64, 256)), jnp.int8)
      >>> wq, sw = w8a8.quantize_cols(jax.random.normal(jax.random.key(1), (256, 128)), jnp.int8)
      >>> wt = w8a8.to_k_major(wq)  # once, at load time
      >>> y = w8a8.matmul(xq, sx, wt, sw, config=w8a8.MosaicConfig(tile_m=64), w_k_major=True,
      ...                 interpret=True)
      >>> ref = w8a8.reference(xq, sx, wq, sw)
      >>> bool(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref) < 1e-2)
      True
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    max_concurrent_steps: int = 4
    grid_tile_width: int = 4

    def __post_init__(self):
        common.check_mosaic_config(self, tile_k=self.tile_k % 64 == 0 and self.tile_k > 0)


#: Most output elements per tile with 1x128 block scales: two accumulators (the step's product
#: and the float32 sum) share one warpgroup's registers.
BLOCK_TILE_ELEMS = 64 * 128
#: The Mosaic GPU config for 1x128 block scales (`use_pallas_kernels(lowering="mosaic")`):
#: one scale block per step, 64 x 128 tiles. Not yet timed on a GPU.
BLOCK_MOSAIC_CONFIG = MosaicConfig(tile_m=64, tile_n=128, tile_k=128, max_concurrent_steps=4)


def default_config(m: int) -> TuningConfig:
    """Triton defaults: 16-row tiles for decode. From `K_MAJOR_ROWS` rows the serving path
    runs `MosaicConfig()` on a Hopper GPU instead; this default (on the K-major weight) was
    Triton's fastest there on an H100 (docs/benchmarks.md)."""
    if m <= 16:
        return TuningConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    if m <= 64:
        return TuningConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)
    return TuningConfig()


def quantize_rows(x: jax.Array, dtype, block: int | None = None):
    """Symmetric per-row (per-token) codes of `x [M, K]`, or per `1 x block` group.

    Returns `(codes [M, K], scales float32 [M, K/block])` (`[M, 1]` when `block` is None).
    """
    m, k = x.shape
    block = block or k
    xb = x.astype(jnp.float32).reshape(m, -1, block)
    qmax = _CODE_DTYPES[np.dtype(dtype)]
    scale = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) / qmax
    scale = jnp.where(scale == 0, 1.0, scale)
    v = jnp.clip(xb / scale, -qmax, qmax)
    v = jnp.round(v) if np.dtype(dtype) == np.dtype(jnp.int8) else v
    return v.astype(dtype).reshape(m, k), scale[..., 0]


def quantize_cols(w: jax.Array, dtype, block: int | None = None):
    """Symmetric per-column codes of `w [K, N]`, or per `block x block` tile.

    Returns `(codes [K, N], scales float32 [K/block, N])` (`[1, N]` when `block` is None); block
    scales are repeated along N so the kernel reads one row of scales per K block.
    """
    k, n = w.shape
    if block is None:
        qmax = _CODE_DTYPES[np.dtype(dtype)]
        scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0, keepdims=True) / qmax
        scale = jnp.where(scale == 0, 1.0, scale)
        v = jnp.clip(w / scale, -qmax, qmax)
        v = jnp.round(v) if np.dtype(dtype) == np.dtype(jnp.int8) else v
        return v.astype(dtype), scale
    t = w.astype(jnp.float32).reshape(k // block, block, n // block, block)
    qmax = _CODE_DTYPES[np.dtype(dtype)]
    scale = jnp.max(jnp.abs(t), axis=(1, 3), keepdims=True) / qmax
    scale = jnp.where(scale == 0, 1.0, scale)
    v = jnp.clip(t / scale, -qmax, qmax)
    v = jnp.round(v) if np.dtype(dtype) == np.dtype(jnp.int8) else v
    codes = v.astype(dtype).reshape(k, n)
    return codes, jnp.repeat(scale[:, 0, :, 0], block, axis=1)


def _kernel(x_ref, sx_ref, w_ref, sw_ref, o_ref, *, m, n, k, bk, k_per_scale, acc_dtype, k_major):
    """One `[bm, bn]` output tile: a loop over K in steps of `bk`. The operands are not padded:
    rows of `x` past M, a last step past K and weight columns past N are masked loads of zeros
    (masks only where the shapes have such tails); the output is padded and sliced by XLA."""
    bm, bn = o_ref.shape
    num_k = -(-k // bk)
    per_block = k_per_scale > 0  # scales change along K: apply them every step
    # int8 with one scale along K: the int32 products sum in place (exact, converted once),
    # while no sum of K products of 8-bit codes (at most 128² each) can overflow int32.
    exact = acc_dtype == jnp.int32 and not per_block and k * 128**2 < 2**31
    sum_dtype = jnp.int32 if exact else jnp.float32
    w_axis = 1 if k_major else 0  # the weight block's K axis: [bn, K] or [K, bn]
    iota = functools.partial(jax.lax.broadcasted_iota, jnp.int32)
    x_live = (pl.program_id(0) * bm + iota((bm, 1), 0) < m) if m % bm else None
    w_live = None
    if n % bn:
        w_live = pl.program_id(1) * bn + iota((bn, 1) if k_major else (1, bn), 1 - w_axis) < n

    def both(a, b):
        return b if a is None else a if b is None else a & b

    def load(ref, mask):
        zero = jnp.zeros((), ref.dtype)  # `other=0` would need an int -> fp8 cast
        return ref[...] if mask is None else pltriton.load(ref, mask=mask, other=zero)

    def scale_rows(ki):  # the step's scale block: sx (bm, 1) and sw (1, bn)
        kb = ki // k_per_scale
        return sx_ref[:, pl.ds(kb, 1)], sw_ref[pl.ds(kb, 1), :]

    def body(ki, acc, scales):
        x_mask, w_mask = x_live, w_live
        if k % bk:
            x_mask = both(x_mask, ki * bk + iota((1, bk), 1) < k)
            w_mask = both(w_mask, ki * bk + iota((1, bk) if k_major else (bk, 1), w_axis) < k)
        xq = load(x_ref.at[:, pl.ds(ki * bk, bk)], x_mask)
        w_block = w_ref.at[:, pl.ds(ki * bk, bk)] if k_major else w_ref.at[pl.ds(ki * bk, bk), :]
        wq = load(w_block, w_mask)
        if acc_dtype == jnp.int32 or bm < 64:  # decode tiles: `mma.sync` either way
            dims = (((1,), (w_axis,)), ((), ()))
            part = jax.lax.dot_general(xq, wq, dims, preferred_element_type=acc_dtype)
            part = part.astype(sum_dtype)
        else:  # fp8 `wgmma`, promoted to float32 every 128 products (or once a shorter step)
            part = common.fp8_dot(xq, wq, contract_b=w_axis, promote_every=min(bk, 128))
        if per_block:
            sx, sw = scales
            part = part * sx * sw
        return acc + part

    init = jnp.zeros((bm, bn), sum_dtype)
    if per_block:  # the scales a step ahead: Triton does not pipeline loads outside products
        acc = common.fori_loop_rows_ahead(0, num_k, body, init, scale_rows)
    else:
        acc = jax.lax.fori_loop(0, num_k, lambda ki, acc: body(ki, acc, None), init)
        acc = acc.astype(jnp.float32) * sx_ref[...] * sw_ref[...]
    o_ref[...] = acc.astype(o_ref.dtype)


def _k_step(k: int, block_k: int) -> int:
    """K per step for one scale block along K: the largest power of two from `block_k` down to
    32 (the K of 8-bit tensor-core products) that divides K, so that no step is masked; else
    `block_k` capped at K's next power of two."""
    for bk in (block_k >> i for i in range(block_k.bit_length())):
        if bk < 32:
            break
        if k % bk == 0:
            return bk
    return min(block_k, max(32, 1 << (k - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "interpret", "w_k_major"))
def matmul(
    xq: jax.Array,
    sx: jax.Array,
    wq: jax.Array,
    sw: jax.Array,
    *,
    config: TuningConfig | MosaicConfig | None = None,
    out_dtype=jnp.bfloat16,
    interpret: bool = False,
    w_k_major: bool = False,
) -> jax.Array:
    """`(xq * sx) @ (wq * sw)` on the codes; see the module docstring for the scale shapes.

    Args:
      xq: int8 or float8_e4m3fn `[M, K]`.
      sx: float32 `[M, 1]` (per token) or `[M, K/128]` (1x128 groups); `[1, 1]` per tensor.
      wq: the same code dtype, `[K, N]`; `[N, K]` with `w_k_major` (see `to_k_major`).
      sw: float32 `[1, N]` (per channel) or `[K/128, N]` (128x128 blocks, repeated along N).
      config: a `TuningConfig` (Triton, either weight layout) or a `MosaicConfig` (Mosaic GPU:
        per-token/per-channel or per-tensor scales and a K-major weight only).
    """
    m, k = xq.shape
    n, k2 = wq.shape if w_k_major else wq.shape[::-1]
    if k != k2 or xq.dtype != wq.dtype or np.dtype(xq.dtype) not in _CODE_DTYPES:
        layout = "[N, K]" if w_k_major else "[K, N]"
        raise ValueError(
            f"`xq` {xq.shape} {xq.dtype} and `wq` {layout} {wq.shape} {wq.dtype} must share K "
            "and a code dtype (int8 or float8_e4m3fn)"
        )
    kb = sx.shape[1]
    if sw.shape[0] != kb or k % kb or (kb > 1 and k // kb != SCALE_BLOCK):
        raise ValueError(
            f"scales `sx` {sx.shape} and `sw` {sw.shape} must both have 1 or K/128 blocks along K"
        )
    cfg = config or default_config(m)
    sx = jnp.broadcast_to(sx.astype(jnp.float32), (m, kb))
    sw = jnp.broadcast_to(sw.astype(jnp.float32), (kb, n))
    if isinstance(cfg, MosaicConfig):
        if not w_k_major:
            raise ValueError(
                "a MosaicConfig needs a K-major weight (`w_k_major=True`, `wq = to_k_major(wq)`)"
            )
        if kb > 1 and (cfg.tile_k != SCALE_BLOCK or cfg.tile_m * cfg.tile_n > BLOCK_TILE_ELEMS):
            raise ValueError(
                f"1x128 block scales need MosaicConfig.tile_k = {SCALE_BLOCK} (one scale block "
                f"per step) and tile_m * tile_n <= {BLOCK_TILE_ELEMS} (a step's product and the "
                f"float32 sum both live in registers); got {cfg}. `BLOCK_MOSAIC_CONFIG` fits."
            )
        common.require_hopper_for_mosaic(interpret)
        return _mosaic_matmul(xq, sx, wq, sw, cfg, out_dtype, interpret)
    bk = _k_step(k, cfg.block_k) if kb == 1 else SCALE_BLOCK
    kp = common.round_up(k, bk)
    mp, np_ = common.round_up(m, cfg.block_m), common.round_up(n, cfg.block_n)
    # Only the scales (M + N values per block) are padded; the codes are read in place.
    sx = common.pad_axis(sx, 0, mp, 1.0)
    sw = common.pad_axis(sw, 1, np_, 1.0)
    acc_dtype = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
    w_spec = (
        pl.BlockSpec((cfg.block_n, kp), lambda i, j: (j, 0))
        if w_k_major
        else pl.BlockSpec((kp, cfg.block_n), lambda i, j: (0, j))
    )
    out = pl.pallas_call(
        functools.partial(
            _kernel,
            m=m,
            n=n,
            k=k,
            bk=bk,
            k_per_scale=(SCALE_BLOCK // bk if kb > 1 else 0),
            acc_dtype=acc_dtype,
            k_major=w_k_major,
        ),
        grid=(mp // cfg.block_m, np_ // cfg.block_n),
        in_specs=[
            pl.BlockSpec((cfg.block_m, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((cfg.block_m, kb), lambda i, j: (i, 0)),
            w_spec,
            pl.BlockSpec((kb, cfg.block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((cfg.block_m, cfg.block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"w8a8_{np.dtype(xq.dtype).name}",
    )(xq, sx, wq, sw)
    return out[:m, :n]


#: Rows of `x` from which the serving path (`pallas_kernels.dispatch`) gives the kernel the
#: K-major weight when the tree stores `[K, N]` codes. 8-bit `wgmma` reads B K-major only: on an
#: H100 (2026-11-23, docs/benchmarks.md) Triton's int8 product at M = 1024..4096 ran 3.4 to 5.3x
#: faster on `[N, K]` than on `[K, N]` codes (fp8 1.2 to 1.4x). Such codes are transposed per
#: call (2x the weight's bytes; with the activations' quantization, 137 of the 576 us of a
#: served int8 product at 4096 x 8192 x 8192); below this many rows the product is memory-bound
#: and reads `[K, N]` in place. Codes stored `[N, K]` (`jqtz.nn.serving_layout`) are read in
#: place at every M.
K_MAJOR_ROWS = 128


def serving_config(m: int, *, mosaic: bool, block: bool = False) -> TuningConfig | MosaicConfig:
    """The config the serving path (`dispatch`) runs for `m` rows: from `K_MAJOR_ROWS` rows
    where `mosaic` (a Hopper GPU, and the lowering asks for Mosaic GPU: `dispatch.kernel_for`)
    `MosaicConfig()`, or `BLOCK_MOSAIC_CONFIG` for 1x128 block scales (`block`); else
    `default_config(m)`."""
    if mosaic and m >= K_MAJOR_ROWS:
        return BLOCK_MOSAIC_CONFIG if block else MosaicConfig()
    return default_config(m)


def reads_k_major(m: int, config: TuningConfig | MosaicConfig) -> bool:
    """Whether the served product of `m` rows with `config` takes the `[N, K]` codes when the
    tree stores `[K, N]` ones (codes stored `[N, K]` are always read so)."""
    return isinstance(config, MosaicConfig) or m >= K_MAJOR_ROWS


def to_k_major(wq: jax.Array) -> jax.Array:
    """The `[N, K]` copy of weight codes `wq [K, N]` that a `MosaicConfig` reads (and Triton
    reads faster: `K_MAJOR_ROWS`).

    Best made once at load time (`jqtz.nn.serving_layout` does it for a tree): transposing on
    every call moves the weight twice more.
    """
    return jnp.asarray(wq).T.copy()


def _mosaic_kernel(
    x_g, w_g, sx_g, sw_g, o_g, *, cfg: MosaicConfig, tiles_mn, num_k, acc_dtype, block: bool
):
    """One warpgroup per output tile: a TMA pipeline over K feeds `wgmma` (A and B from shared
    memory, B K-major); tiles are walked persistently in snake order (`cfg.grid_tile_width`)
    so neighbouring blocks share operand tiles in L2.

    One scale block along K: the products accumulate in place and the epilogue scales the
    accumulator by the row and column scales. 128-row scale blocks (`block`, `tile_k` = 128):
    each step's product goes to a fresh accumulator, which is scaled by the step's row and
    column scales (TMA-loaded with the codes) and added to a float32 sum in registers
    (DeepSeek-V3's promotion of FP8 partial sums to CUDA-core float32 every 128 K)."""
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    gm, gn = tiles_mn
    rows_layout, cols_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def scaled(y, rows, cols):
        y = y * jax.lax.broadcast_in_dim(rows, (tm, tn), [0])
        return y * jax.lax.broadcast_in_dim(cols, (tm, tn), [1])

    @plgpu.nd_loop((gm * gn,), collective_axes="sm")
    def _tile(info):
        mi, ni = plgpu.planar_snake(info.index[0], (gm, gn), 1, cfg.grid_tile_width)
        x_spec = plgpu.BlockSpec((tm, tk), lambda kk: (mi, kk), delay_release=1)
        w_spec = plgpu.BlockSpec((tn, tk), lambda kk: (ni, kk), delay_release=1)

        def acc_scope(acc_ref):
            def step(_, x_s, w_s):
                plgpu.wgmma(acc_ref, x_s, w_s.T)
                # One product stays in flight; the previous one is done before the pipeline
                # refills its buffers (`delay_release=1`).
                plgpu.wgmma_wait(1)

            plgpu.emit_pipeline(
                step,
                grid=(num_k,),
                in_specs=[x_spec, w_spec],
                max_concurrent_steps=cfg.max_concurrent_steps,
            )(x_g, w_g)
            return acc_ref[...]

        def block_step(_, x_s, w_s, sx_s, sw_s, total):
            def product(part_ref):  # a fresh (zeroed) accumulator per scale block
                plgpu.wgmma(part_ref, x_s, w_s.T)
                plgpu.wgmma_wait(0)
                return part_ref[...]

            part = pl.run_scoped(product, plgpu.ACC((tm, tn), acc_dtype))
            rows = plgpu.load(sx_s.at[0], layout=rows_layout)
            cols = plgpu.load(sw_s.at[0], layout=cols_layout)
            return total + scaled(part.astype(jnp.float32), rows, cols)

        if block:
            y = plgpu.emit_pipeline(
                block_step,
                grid=(num_k,),
                in_specs=[
                    plgpu.BlockSpec((tm, tk), lambda kk: (mi, kk)),
                    plgpu.BlockSpec((tn, tk), lambda kk: (ni, kk)),
                    plgpu.BlockSpec((1, tm), lambda kk: (kk, mi)),
                    plgpu.BlockSpec((1, tn), lambda kk: (kk, ni)),
                ],
                max_concurrent_steps=cfg.max_concurrent_steps,
                init_carry=plgpu.layout_cast(jnp.zeros((tm, tn), jnp.float32), plgpu.Layout.WGMMA),
            )(x_g, w_g, sx_g, sw_g)
            pl.run_scoped(
                lambda o_s: common.store_tile(
                    y, o_s, o_g.at[pl.ds(mi * tm, tm), pl.ds(ni * tn, tn)]
                ),
                plgpu.SMEM((tm, tn), o_g.dtype),
            )
            return
        acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, tn), acc_dtype))

        def epilogue(o_s, sx_s, sw_s, bar):
            plgpu.copy_gmem_to_smem(sx_g.at[0, pl.ds(mi * tm, tm)], sx_s, bar)
            plgpu.barrier_wait(bar)
            plgpu.copy_gmem_to_smem(sw_g.at[0, pl.ds(ni * tn, tn)], sw_s, bar)
            plgpu.barrier_wait(bar)
            rows = plgpu.load(sx_s, layout=rows_layout)
            cols = plgpu.load(sw_s, layout=cols_layout)
            y = scaled(acc.astype(jnp.float32), rows, cols)
            common.store_tile(y, o_s, o_g.at[pl.ds(mi * tm, tm), pl.ds(ni * tn, tn)])

        pl.run_scoped(
            epilogue,
            plgpu.SMEM((tm, tn), o_g.dtype),
            plgpu.SMEM((tm,), jnp.float32),
            plgpu.SMEM((tn,), jnp.float32),
            plgpu.Barrier(num_barriers=1),
        )


def _mosaic_matmul(xq, sx, wq, sw, cfg: MosaicConfig, out_dtype, interpret):
    """The Mosaic GPU product of `xq [M, K]` and K-major `wq [N, K]` with scales `sx [M, kb]`
    and `sw [kb, N]` (`kb` = 1, or K/128 scale blocks), padded to whole tiles."""
    m, k = xq.shape
    n = wq.shape[0]
    kb = sx.shape[1]
    mp, np_, kp = (
        common.round_up(m, cfg.tile_m),
        common.round_up(n, cfg.tile_n),
        common.round_up(k, cfg.tile_k),
    )
    xq = common.pad_axis(common.pad_axis(xq, 1, kp), 0, mp)
    wq = common.pad_axis(common.pad_axis(wq, 1, kp), 0, np_)
    # Scales as rows per K block, `[kb, M]` and `[kb, N]`: one contiguous TMA row per step.
    sx = common.pad_axis(sx.T, 1, mp, 1.0)
    sw = common.pad_axis(sw, 1, np_, 1.0)
    tiles = (mp // cfg.tile_m, np_ // cfg.tile_n)
    body = functools.partial(
        _mosaic_kernel,
        cfg=cfg,
        tiles_mn=tiles,
        num_k=kp // cfg.tile_k,
        acc_dtype=jnp.int32 if xq.dtype == jnp.int8 else jnp.float32,
        block=kb > 1,
    )
    out = common.persistent_mosaic_kernel(
        body,
        jax.ShapeDtypeStruct((mp, np_), out_dtype),
        tiles[0] * tiles[1],
        interpret=interpret,
        name=f"w8a8_mgpu_{np.dtype(xq.dtype).name}" + ("_b128" if kb > 1 else ""),
    )(xq, wq, sx, sw)
    return out[:m, :n]


def reference(xq, sx, wq, sw, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """Pure-jnp reference: dequantize both operands in float32 and multiply."""
    m, k = xq.shape
    kb = sx.shape[1]
    x = xq.astype(jnp.float32) * jnp.repeat(jnp.broadcast_to(sx, (m, kb)), k // kb, axis=1)
    w = wq.astype(jnp.float32) * jnp.repeat(sw, k // sw.shape[0], axis=0)
    return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def can_use(xq, wq, *, backend: str | None = None, compute_capability=None) -> bool:
    """Whether `matmul` should run on the GPU: int8 needs sm_80+, e4m3 needs sm_89+."""
    dt = np.dtype(xq.dtype)
    if dt != np.dtype(wq.dtype) or dt not in _CODE_DTYPES or xq.shape[-1] != wq.shape[0]:
        return False
    need = (8, 9) if dt == np.dtype(jnp.float8_e4m3fn) else (8, 0)
    return common.gpu_capability(backend, compute_capability, need=need) is not None


#: Mosaic GPU configs `--tune` tries for 1x128 block scales (`BLOCK_TILE_ELEMS`, `tile_k` 128).
BLOCK_MOSAIC_CANDIDATES = (
    BLOCK_MOSAIC_CONFIG,
    MosaicConfig(tile_m=128, tile_n=64, tile_k=128, max_concurrent_steps=4),
    MosaicConfig(tile_m=64, tile_n=128, tile_k=128, max_concurrent_steps=6),
    MosaicConfig(tile_m=64, tile_n=128, tile_k=128, max_concurrent_steps=4, grid_tile_width=8),
)


#: Configs `--tune` tries for M >= 128 (the default first), after Triton's usual GEMM sweep.
TUNE_CANDIDATES = (
    TuningConfig(),
    TuningConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    TuningConfig(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3),
    TuningConfig(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3),
    TuningConfig(block_m=256, block_n=128, block_k=128, num_warps=8, num_stages=3),
    TuningConfig(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4),
    TuningConfig(block_m=128, block_n=128, block_k=128, num_warps=4, num_stages=4),
    TuningConfig(block_m=64, block_n=256, block_k=128, num_warps=4, num_stages=4),
    TuningConfig(block_m=128, block_n=64, block_k=128, num_warps=4, num_stages=4),
)


#: Mosaic GPU configs `--tune` tries (per-token x per-channel scales), within the H100's shared
#: memory: stages x (tile_m + tile_n) x tile_k bytes + the output tile.
MOSAIC_TUNE_CANDIDATES = (
    MosaicConfig(),
    MosaicConfig(tile_m=64, tile_n=256, tile_k=128, max_concurrent_steps=4),
    MosaicConfig(tile_m=128, tile_n=128, tile_k=256, max_concurrent_steps=3),
    MosaicConfig(tile_m=128, tile_n=64, tile_k=128, max_concurrent_steps=6),
    MosaicConfig(grid_tile_width=8),
    MosaicConfig(grid_tile_width=16),
)


def tune_candidates(*, smoke: bool = False, block_scales: bool = False) -> list:
    """The configs `--tune` sweeps: Triton and Mosaic GPU alternately, so that a sweep cut short
    by its time budget has still tried both lowerings. 1x128 block scales: Triton with
    `block_k` 128 (the kernel steps K by the scale block) and `BLOCK_MOSAIC_CANDIDATES`."""
    if block_scales:
        triton = [dataclasses.replace(c, block_k=128) for c in TUNE_CANDIDATES]
        mosaic = BLOCK_MOSAIC_CANDIDATES
    else:
        triton, mosaic = TUNE_CANDIDATES, MOSAIC_TUNE_CANDIDATES
    triton, mosaic = (triton[:1], mosaic[:1]) if smoke else (triton, mosaic)
    n = min(len(triton), len(mosaic))
    mixed = [c for pair in zip(triton[:n], mosaic[:n], strict=True) for c in pair]
    return mixed + list(triton[n:]) + list(mosaic[n:])


def check_ragged(report, *, smoke=False) -> list[dict]:
    """Correctness only, no timing: the default configs on `common.RAGGED_SHAPES`, M = 1 and 64,
    int8 and fp8 e4m3 codes with per-token x per-channel scales, against `reference`. On a GPU
    this is where the masked M, K and N tails are compiled and run; `smoke` runs the first
    shape in the interpreter. Returns one dict per case."""
    rows = []
    for si, (k, n) in enumerate(common.RAGGED_SHAPES[: 1 if smoke else None]):
        w = jax.random.normal(jax.random.key(si), (k, n), jnp.float32)
        for name, dtype in (("int8", jnp.int8), ("fp8", jnp.float8_e4m3fn)):
            wq, sw = quantize_cols(w, dtype)
            for m in (1, 64):
                x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32)
                xq, sx = quantize_rows(x, dtype)
                y = matmul(xq, sx, wq, sw, out_dtype=jnp.float32, interpret=smoke)
                err = common.relative_error(y, reference(xq, sx, wq, sw, out_dtype=jnp.float32))
                rows.append(dict(kernel="w8a8", case=name, m=m, n=n, k=k, rel_err=err))
                report(f"w8a8 {name} M={m} N={n} K={k}: rel err {err:.1e}")
    return rows


def benchmark(report, *, smoke=False, tune=False, deadline=float("inf"), first_only=False):
    """Time int8 and fp8 e4m3 products (per-token x per-channel scales; fp8 also with 1x128 x
    128x128 block scales) against the bf16 XLA product; with `tune`, sweep `tune_candidates()`,
    Triton and Mosaic GPU (all on the first shape at the largest M, the three fastest
    elsewhere; `first_only`: the first shape alone; M = 16, on the first shape only, is not
    tuned). The default timed is
    the config the serving path runs (`dispatch`; Mosaic GPU on a Hopper GPU from
    `K_MAJOR_ROWS` rows with one scale block along K); on a Hopper GPU the block-scaled case
    also tries `BLOCK_MOSAIC_CONFIG` without `tune`. Every config reads the K-major weight
    `[N, K]` that `jqtz.nn.serving_layout` stores; below `K_MAJOR_ROWS` rows the default is
    also timed on `[K, N]` (a tree served without `serving_layout`) and reported. The kernel's
    time excludes the activations' quantization; `served` (`served_us`) includes it, as
    `dispatch` runs the product on the serving layout; `xla us` is XLA's own path for the same
    QArray (jqtz's product with the kernels off, what `dispatch` falls back to). `smoke`: tiny
    shapes in the interpreter. Returns one dict per case for `pallas_kernels.bench`."""
    interpret = smoke
    iters = 1 if smoke else 10
    shapes = [(128, 256)] if smoke else [(8192, 8192), (14336, 4096), (4096, 14336)]
    shapes = shapes[:1] if first_only else shapes
    ms = (128, 16) if smoke else (4096, 1024, 16)
    rate = common.measure_matmul_rate(256 if smoke else 8192)
    report(f"w8a8; bf16 {rate / 1e12:.0f} TFLOP/s measured (8192^3 XLA product)")
    report(f"{'case':>9} {'M':>5} {'N':>6} {'K':>6} {'default us':>10} {'best us':>8} "
           f"{'bf16 us':>8} {'xla us':>8} {'speedup':>7} {'TFLOP/s':>7} {'of bf16':>7} "
           f"{'served':>8} {'rel err':>8}  best config")  # fmt: skip
    hopper = common.is_hopper()
    import jqtz
    from jqtz.ptq import default_spec
    from jqtz.ptq.fp8 import fp8_spec

    cases = [("int8", jnp.int8, None), ("fp8", jnp.float8_e4m3fn, None)]
    cases.append(("fp8-b128", jnp.float8_e4m3fn, 128))
    # The same products as jqtz serves them, for XLA's own path (`xla us`).
    specs = {"int8": default_spec("smoothquant"), "fp8": fp8_spec("dynamic-per-token"),
             "fp8-b128": fp8_spec("block128")}  # fmt: skip
    rows, winners = [], {}
    for si, (n, k) in enumerate(shapes):
        w = jax.random.normal(jax.random.key(si), (k, n), jnp.float32)
        wb = w.astype(jnp.bfloat16)
        wbs = [wb] + [jnp.copy(wb) for _ in range(common.copies_to_miss_cache(wb.nbytes) - 1)]
        for m in ms if si == 0 else [m for m in ms if m >= K_MAJOR_ROWS]:  # decode: shape 1
            calls = 2 if smoke else 8  # a long program: host timing noise shrinks per call
            x = jax.random.normal(jax.random.key(100 + m), (calls, m, k), jnp.bfloat16)
            t_bf16 = common.time_per_call(
                jnp.dot, [(x[i], wbs[i % len(wbs)]) for i in range(calls)], iters=iters
            )
            for name, dtype, block in cases:
                wq, sw = quantize_cols(w, dtype, block)
                ws = [(wq, sw)] + [
                    (jnp.copy(wq), sw) for _ in range(common.copies_to_miss_cache(wq.nbytes) - 1)
                ]
                # The serving layout (`jqtz.nn.serving_layout`): the K-major copy.
                ws_t = [(to_k_major(q), s) for q, s in ws]
                xqs = [quantize_rows(x[i], dtype, block) for i in range(calls)]
                sets = [(*xqs[i], *ws[i % len(ws)]) for i in range(calls)]
                sets_t = [(*xqs[i], *ws_t[i % len(ws_t)]) for i in range(calls)]
                ref = reference(*sets[0], out_dtype=jnp.float32)

                def measure(cfg, sets=sets_t, ref=ref, k_major=True):
                    fn = functools.partial(
                        matmul, config=cfg, interpret=interpret, w_k_major=k_major
                    )
                    err = common.relative_error(fn(*sets[0]), ref)
                    return common.time_per_call(fn, sets, iters=iters), err

                cands = []
                if block and hopper and not tune and m >= K_MAJOR_ROWS:  # `lowering="mosaic"`
                    cands = [BLOCK_MOSAIC_CONFIG]
                if tune and m >= K_MAJOR_ROWS:
                    cands = tune_candidates(smoke=smoke, block_scales=block is not None)
                    if (si, m) != (0, ms[0]):
                        cands = winners.get(name, cands)
                t_base, best, tried = common.best_config(
                    report, f"{name} M={m} N={n} K={k}",
                    serving_config(m, mosaic=hopper and block is None), cands, measure,
                    deadline=deadline,
                )  # fmt: skip
                if (si, m) == (0, ms[0]):
                    winners[name] = [c for _, c, _ in tried[:3]]
                t, cfg, err = best
                if m < K_MAJOR_ROWS:  # the same config on the [K, N] codes, for comparison
                    t_kn, _ = measure(cfg, sets=sets, k_major=False)
                    report(f"  {name} M={m} N={n} K={k} {cfg} on the [K, N] weight: "
                           f"{t_kn * 1e6:.1f} us")  # fmt: skip

                def served(x, wq, sw, cfg=cfg, block=block, dtype=dtype):
                    """As `dispatch` serves the K-major codes: XLA quantizes `x`."""
                    xq, sx = quantize_rows(x, dtype, block)
                    return matmul(xq, sx, wq, sw, config=cfg, interpret=interpret,
                                  w_k_major=True)  # fmt: skip

                t_q = common.time_per_call(
                    served, [(x[i], *ws_t[i % len(ws_t)]) for i in range(calls)], iters=iters
                )
                qw = jqtz.nn.serving_layout(jqtz.quantize(w, specs[name]))
                qws = [qw] + [jax.tree.map(jnp.copy, qw) for _ in ws[1:]]
                with jqtz.nn.use_pallas_kernels(False):  # XLA's path for the same QArray
                    t_xla = common.time_per_call(
                        lambda x, q: jqtz.nn.dot_general(x, q, (((1,), (0,)), ((), ()))),
                        [(x[i], qws[i % len(qws)]) for i in range(calls)],
                        iters=iters,
                    )
                flops = 2 * m * n * k / t
                rows.append(dict(kernel=f"w8a8 {name}", m=m, n=n, k=k, us=t * 1e6,
                                 default_us=t_base * 1e6, baseline_us=t_bf16 * 1e6,
                                 speedup=t_bf16 / t, roofline=flops / rate, rel_err=err,
                                 config=cfg, served_us=t_q * 1e6,
                                 xla_us=t_xla * 1e6))  # fmt: skip
                report(f"{name:>9} {m:5d} {n:6d} {k:6d} {t_base * 1e6:10.1f} {t * 1e6:8.1f} "
                       f"{t_bf16 * 1e6:8.1f} {t_xla * 1e6:8.1f} {t_bf16 / t:7.2f} "
                       f"{flops / 1e12:7.0f} "
                       f"{flops / rate:7.2f} {t_q * 1e6:8.1f} {err:8.1e}  {cfg}")  # fmt: skip
    return rows


def main(argv=None) -> int:
    """`python -m pallas_kernels.w8a8 --bench [--tune]`: INT8/FP8 vs bf16 XLA on a GPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="time the kernel on the GPU")
    parser.add_argument("--tune", action="store_true", help="also sweep tune_candidates()")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 0
    return common.run_benchmark("w8a8", benchmark, tune=args.tune)


if __name__ == "__main__":
    raise SystemExit(main())

"""The W4A16 product over 4-bit codes stored K-major: `w4a16.matmul(x, w)` for a weight whose
`QArray` is in its serving layout (`QArray.with_transposed_codes`, `jqtz.nn.serving_layout(tree,
k_major_4bit=True)`).

The codes of `W [K, N]` are stored as `[N, ceil(K/2)]` bytes, packed along K (even k in the low
nibble) in two's complement (unsigned codes as `code - 8`). The kernel's view: a nibble `t`
XORed with 8 is the code (unsigned) or the code plus 8 (signed), so one bit operation per pair
of codes, `(t ^ 8) | 0x4300`, makes the bf16 value `128 + (t ^ 8)` (f16: `1024 + ...` with
0x6400), and `(128 + zero) * sum(x)` (signed: `(128 + 8) * sum(x)`) is subtracted once per
group and column, as `w4a16`'s `fold_zero`.

Against the `[K, N]` layout (codes packed along N), one step of K reads each output column's
codes as one contiguous run of `kg / 2` bytes, and its scale and zero point as one value per
column (not a strided row); the low and high nibbles multiply the even and odd entries of
`x`, so no output interleaving is needed. For decode (a 16-row tile) the weight is the
product's first operand and `x` the second (swap-AB): `[block_n, kg/2] x [kg/2, 16]`, the
shape Hopper's `wgmma` takes with the weight in registers. Compiled for sm_90 with the triton
package (`python -m pallas_kernels.sass w4a16 --m 1 --k-major`), a decode step issues about a
fifth fewer instructions than the `[K, N]` kernel's (docs/kernels.md); whether that is faster
on an H100 is what `python -m pallas_kernels.bench --only w4a16` measures (the `k-major` rows).

K and N need not be multiples of the tiles: the last step's K entries and the last tile's rows
are masked loads. `w4a16` dispatches here on `PackedWeight.k_major`; its `reference`,
`can_use` and benchmark cover both layouts.

`MosaicDecodeConfig` runs the decode product (M <= 16) through Mosaic GPU instead: TMA brings
each step's `[tile_n, tile_k]` int4 tile (the codes read as XLA's int4, a bitcast) and `x`'s
`[8 or 16, tile_k]` rows into shared memory; the block's warpgroup loads the codes into
registers (`ldmatrix`), converts them to 16 bits (the signed int4 fast path),
adds `8 - zero` (unsigned codes) and multiplies by the group's scale (one rounding per weight,
as XLA's path), and `wgmma` takes that tile from registers with `x`'s rows, transposed in
shared memory, as the second operand. Nothing goes back to shared memory, which the Triton
kernel's `wgmma` needs for its dequantized tile. K is split across blocks so that several run
per SM; XLA adds the float32 partial sums. The Mosaic GPU interpreter's `wgmma` reads shared
memory only, so interpreted, the dequantized tile is staged there first (the one difference).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common

if TYPE_CHECKING:
    from pallas_kernels.w4a16 import PackedWeight, TuningConfig


def _kernel(x_ref, c_ref, s_ref, *rest, m, k, n, kg, qgroup, num_groups, groups_per_split, swap):
    z_ref = rest[0] if len(rest) == 2 else None
    o_ref = rest[-1]
    bm, bn, half = x_ref.shape[0], c_ref.shape[0], kg // 2  # x_ref: (bm, K/2, 2)
    iota = functools.partial(jax.lax.broadcasted_iota, jnp.int32)
    rows = pl.program_id(0) * bm + iota((bm, 1), 0)
    live = rows < m
    cols_ok = pl.program_id(1) * bn + iota((bn, 1), 0) < n  # the last tile's rows past N
    start = pl.program_id(2) * groups_per_split
    stop = jnp.minimum(start + groups_per_split, num_groups)
    act = x_ref.dtype
    magic, base = (0x4300, 128.0) if act == jnp.bfloat16 else (0x6400, 1024.0)
    flip = magic | 8  # (t ^ 8) | magic in one bit operation: t has no bit above the nibble
    # (t ^ 8) is the code for unsigned formats, the code + 8 for signed ones.
    offset_signed = jnp.full((1, 1), base + 8.0, jnp.float32)

    def group_rows(gi):  # step gi's (1, bn) rows of the scales and zero points, as stored
        srow = gi * kg // qgroup
        return tuple(None if r is None else r[pl.ds(srow, 1), :] for r in (s_ref, z_ref))

    def body(gi, acc, group):
        scale_row, zero_row = group  # loaded a step ahead (`common.fori_loop_rows_ahead`)
        # (1, bn) float32: base + zero point per column
        offset = offset_signed if z_ref is None else base + zero_row.astype(jnp.float32)
        c_mask = cols_ok
        if k % kg:  # the last step reaches past K
            c_mask = cols_ok & (gi * half + iota((1, half), 1) < -(-k // 2))
        pair = pl.ds(gi * half, half)  # bytes of codes, and pairs of x entries, of this step
        c = pltriton.load(c_ref.at[:, pair], mask=c_mask, other=0)

        def x_mask(shape, entry):  # (rows, pairs[, 2]): rows past M, past K in the last step
            rows_ok = live if len(shape) == 2 else live[:, :, None]
            if not k % kg:
                return rows_ok
            return rows_ok & (gi * kg + 2 * iota(shape, 1) + entry < k)

        if swap:  # decode: two strided loads of x's even and odd entries (a few per thread)
            xe, xo = (
                pltriton.load(x_ref.at[:, pair, jnp.int32(t)], mask=x_mask((1, half), t), other=0)
                for t in (0, 1)
            )
        else:
            # Larger tiles: x's pairs in one contiguous load (pipelined with the codes), split
            # in registers; per-entry strided loads were 96 loads per thread that each step
            # waited for (`python -m pallas_kernels.sass w4a16 --m 100 --k-major`). Decode keeps
            # the strided loads: there the split costs Triton a layout that spills.
            mask = x_mask((1, half, 2), iota((1, half, 2), 2))
            xe, xo = jnp.unstack(pltriton.load(x_ref.at[:, pair, :], mask=mask, other=0), axis=-1)
        lo = jax.lax.bitcast_convert_type((c & 15).astype(jnp.uint16) ^ flip, act)
        hi = jax.lax.bitcast_convert_type((c >> 4).astype(jnp.uint16) ^ flip, act)
        xsum = jnp.sum(xe.astype(jnp.float32) + xo.astype(jnp.float32), axis=1, keepdims=True)
        scale = scale_row.astype(jnp.float32)  # (1, bn)
        dn = (((1,), (1,)), ((), ()))
        if swap:  # the weight first: (bn, kg/2) x (bm, kg/2)^T -> (bn, bm)
            p = jax.lax.dot_general(lo, xe, dn, preferred_element_type=jnp.float32)
            p = p + jax.lax.dot_general(hi, xo, dn, preferred_element_type=jnp.float32)
            return acc + (p - offset.T * xsum.T) * scale.T
        p = jax.lax.dot_general(xe, lo, dn, preferred_element_type=jnp.float32)
        p = p + jax.lax.dot_general(xo, hi, dn, preferred_element_type=jnp.float32)
        return acc + (p - xsum * offset) * scale

    init = jnp.zeros((bn, bm) if swap else (bm, bn), jnp.float32)
    # Ahead for decode tiles; larger ones are at the register limit (spills in the SASS).
    acc = common.fori_loop_rows_ahead(start, stop, body, init, group_rows, ahead=swap)
    pltriton.store(o_ref, (acc.T if swap else acc).astype(o_ref.dtype), mask=live)


def matmul_rows(x2, w: PackedWeight, cfg: TuningConfig, *, out_dtype, interpret: bool):
    """`x2 [M, K] @ W` for a K-major 4-bit `PackedWeight` (`w.k_major`), with a Triton
    `TuningConfig` (its `block_m`, `block_n`, `split_k`, warps and stages; codes are always
    folded as `fold_zero`; `tensor_cores=False` and `dequant_first` are refused)."""
    for name in ("tensor_cores", "dequant_first"):
        if getattr(cfg, name) != (name == "tensor_cores"):
            raise ValueError(
                f"TuningConfig({name}={getattr(cfg, name)}) reads codes packed along N; this "
                f"weight's codes are stored K-major (QArray.transposed): leave {name} at its "
                f"default"
            )
    m = x2.shape[0]
    split, per_split = common.split_steps(cfg.split_k, w.num_groups)
    n_tiles = common.cdiv(w.n, cfg.block_n)
    n_out = n_tiles * cfg.block_n
    srows = w.scale.shape[0]
    # x as [M, K/2, 2]: the entries that meet the low and the high nibbles are [:, :, 0] and
    # [:, :, 1] (a free reshape; an odd K gets one zero column).
    x3 = common.pad_axis(x2, 1, common.round_up(w.k, 2)).reshape(m, -1, 2)
    in_specs = [
        pl.BlockSpec((cfg.block_m, w.k_padded // 2, 2), lambda i, j, s: (i, 0, 0)),
        pl.BlockSpec((cfg.block_n, w.k_padded // 2), lambda i, j, s: (j, 0)),
        pl.BlockSpec((srows, cfg.block_n), lambda i, j, s: (0, j)),
    ]
    # Scales and zero points of a ragged N are padded (a copy of [ceil(K/g), N] values).
    args = [x3, w.codes, common.pad_axis(w.scale, 1, n_out)]
    if w.zero is not None:
        in_specs.append(pl.BlockSpec((srows, cfg.block_n), lambda i, j, s: (0, j)))
        args.append(common.pad_axis(w.zero, 1, n_out))
    # Split-K partial sums go to float32 rows of exactly M (masked stores), added by XLA.
    f32 = split > 1
    out = pl.pallas_call(
        functools.partial(
            _kernel,
            m=m,
            k=w.k,
            n=w.n,
            kg=w.group,
            qgroup=w.qgroup,
            num_groups=w.num_groups,
            groups_per_split=per_split,
            swap=cfg.block_m == 16,
        ),
        grid=(common.cdiv(m, cfg.block_m), n_tiles, split),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, cfg.block_m, cfg.block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((split, m, n_out), jnp.float32 if f32 else out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"w4a16_kmajor_g{w.qgroup}",
    )(*args)
    y = out.sum(axis=0) if f32 else out[0]
    return y[:, : w.n].astype(out_dtype)


# -- Mosaic GPU decode ------------------------------------------------------------------------

#: Rows of `x` the Mosaic decode product takes: padded to 8 or 16, the `wgmma` N.
MOSAIC_DECODE_ROWS = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicDecodeConfig:
    """The Mosaic GPU (Hopper) decode product over K-major 4-bit codes, `w4a16.matmul(x, w,
    config=MosaicDecodeConfig())`: up to `MOSAIC_DECODE_ROWS` rows of `x` (padded to 8 or 16,
    the `wgmma` N), groups of a multiple of 64, K a multiple of the step (128, or 64 for groups of
    64) and N of `tile_n`.

    Attributes:
      tile_n: output columns (weight rows) per block, the `wgmma` M: 64 or 128.
      split_k: blocks along K per output tile, at least this many (each block takes the same
        number of steps: the smallest divisor of the step count from here); None: enough for
        about four blocks per SM.
      max_concurrent_steps: pipeline depth (TMA loads in flight per block), at least 2.

    Example (the Mosaic GPU interpreter on a CPU; on an H100, interpret=False):
      >>> import jax, jax.numpy as jnp, jqtz
      >>> from pallas_kernels import w4a16
      >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=128,
      ...                       symmetric=False)
      >>> q = jqtz.quantize(jax.random.normal(jax.random.key(0), (256, 128)), spec)
      >>> w = w4a16.prepare(q.with_transposed_codes())
      >>> x = jax.random.normal(jax.random.key(1), (2, 256), jnp.bfloat16)
      >>> y = w4a16.matmul(x, w, config=w4a16.MosaicDecodeConfig(), interpret=True)
      >>> ref = w4a16.reference(x, w)
      >>> bool(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref) < 1e-2)
      True
    """

    tile_n: int = 64
    split_k: int | None = None
    max_concurrent_steps: int = 4

    def __post_init__(self):
        if (
            self.tile_n not in (64, 128)
            or self.max_concurrent_steps < 2
            or (self.split_k is not None and self.split_k < 1)
        ):
            raise ValueError(
                f"{self}: tile_n must be 64 or 128 (one or two `wgmma` M tiles), "
                "max_concurrent_steps at least 2, split_k None or at least 1"
            )


def _mosaic_tile_k(w: PackedWeight) -> int | None:
    """K per Mosaic step: 128 or 64, dividing the group (one scale per weight row a step)."""
    return next((tk for tk in (128, 64) if w.qgroup % tk == 0), None)


def mosaic_decode_unsupported(w: PackedWeight, m: int, cfg: MosaicDecodeConfig) -> str | None:
    """Why `MosaicDecodeConfig` cannot multiply `m` rows by `w` (None: it can)."""
    tile_k = _mosaic_tile_k(w)
    if not w.k_major or w.perm is not None or tile_k is None:
        return (
            "a w4a16.MosaicDecodeConfig reads 4-bit codes stored K-major "
            "(QArray.with_transposed_codes) without an act-order permutation, in groups of a "
            f"multiple of 64; got k_major={w.k_major}, "
            f"perm={'yes' if w.perm is not None else 'no'}, group={w.qgroup}"
        )
    if m > MOSAIC_DECODE_ROWS or w.k % tile_k or w.n % cfg.tile_n:
        return (
            f"a w4a16.MosaicDecodeConfig takes at most {MOSAIC_DECODE_ROWS} rows, K a multiple of "
            f"{tile_k} and N of tile_n={cfg.tile_n} (TMA moves whole tiles); got M={m}, "
            f"K={w.k}, N={w.n}"
        )
    return None


def _mosaic_kernel(x_g, w_g, s_g, *refs, tile_n, tile_k, steps, qgroup, depth, has_zero, stage):
    """Block (n, s): output columns `n * tile_n...` over K steps `s * steps...`. Each step
    dequantizes the code tile in registers and issues `wgmma(acc, tile, x_tile.T)`."""
    z_g, o_g = refs if has_zero else (None, *refs)
    mp, dtype = x_g.shape[0], x_g.dtype
    ni, si = jax.lax.axis_index("n"), jax.lax.axis_index("s")
    k0 = si * steps
    column = plgpu.Layout.WGMMA.reduce(1)  # a [tile_n] vector, broadcast along K

    def per_row(v):
        return jax.lax.broadcast_in_dim(v, (tile_n, tile_k), [0])

    def scoped(acc_ref, staged):
        def step(_, x_s, w_s, s_s, *z_s):
            codes = plgpu.load(w_s, layout=plgpu.Layout.WGMMA_UPCAST_4X)
            tile = plgpu.layout_cast(codes, plgpu.Layout.WGMMA).astype(dtype)
            if has_zero:  # stored code - 8: add 8 - zero (exact in 16 bits)
                zero = plgpu.load(z_s[0].at[0], layout=column).astype(jnp.float32)
                tile = tile + per_row((8.0 - zero).astype(dtype))
            tile = tile * per_row(plgpu.load(s_s.at[0], layout=column).astype(dtype))
            if staged is None:
                plgpu.wgmma(acc_ref, tile, x_s.T)
            else:
                staged[...] = tile
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, staged, x_s.T)
            plgpu.wgmma_wait(0)

        srow = lambda kk: ((k0 + kk) * tile_k // qgroup, ni)
        specs = [
            plgpu.BlockSpec((mp, tile_k), lambda kk: (0, k0 + kk)),
            plgpu.BlockSpec((tile_n, tile_k), lambda kk: (ni, k0 + kk)),
            plgpu.BlockSpec((1, tile_n), srow),
        ]
        operands = [x_g, w_g, s_g]
        if has_zero:
            specs.append(plgpu.BlockSpec((1, tile_n), srow))
            operands.append(z_g)
        plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs, max_concurrent_steps=depth)(
            *operands
        )
        return acc_ref[...]

    acc_type = plgpu.ACC((tile_n, mp), jnp.float32)
    if stage:
        acc = pl.run_scoped(
            lambda t: pl.run_scoped(lambda a: scoped(a, t), acc_type),
            plgpu.SMEM((tile_n, tile_k), dtype),
        )
    else:
        acc = pl.run_scoped(lambda a: scoped(a, None), acc_type)
    pl.run_scoped(
        lambda o_s: common.store_tile(acc, o_s, o_g.at[si, pl.ds(ni * tile_n, tile_n)]),
        plgpu.SMEM((tile_n, mp), jnp.float32),
    )


def mosaic_matmul_rows(x2, w: PackedWeight, cfg: MosaicDecodeConfig, *, out_dtype, interpret):
    """`x2 [M, K] @ W` for a K-major 4-bit `PackedWeight` through Mosaic GPU (M <= 16)."""
    m = x2.shape[0]
    reason = mosaic_decode_unsupported(w, m, cfg)
    if reason:
        raise ValueError(f"{reason}. Use a TuningConfig (Triton) for this product.")
    tile_k = _mosaic_tile_k(w)
    mp = 8 if m <= 8 else 16  # the wgmma N
    x2 = common.pad_axis(x2, 0, mp)
    n_tiles, num_steps = w.n // cfg.tile_n, w.k // tile_k
    want = min(cfg.split_k or common.cdiv(4 * common.num_sms(), n_tiles), num_steps)
    # Every block runs the same steps (the pipeline's grid is static): a divisor of the count.
    split = next(d for d in range(want, num_steps + 1) if num_steps % d == 0)
    steps = num_steps // split
    # The stored bytes read as XLA's int4 (low nibble first, as the QArray packs them).
    codes = jax.lax.bitcast_convert_type(w.codes, jnp.int4).reshape(w.n, w.k)
    body = functools.partial(
        _mosaic_kernel,
        tile_n=cfg.tile_n,
        tile_k=tile_k,
        steps=steps,
        qgroup=w.qgroup,
        depth=cfg.max_concurrent_steps,
        has_zero=w.zero is not None,
        stage=interpret,
    )
    args = [x2, codes, w.scale] + ([w.zero] if w.zero is not None else [])
    partial = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((split, w.n, mp), jnp.float32),
        grid=(n_tiles, split),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
        kernel_name=f"w4a16_kmajor_mgpu_g{w.qgroup}",
    )(*args)
    return partial.sum(axis=0)[:, :m].T.astype(out_dtype)

"""The Mosaic GPU (Hopper) lowering of the W4A16 product: `w4a16.matmul(x, w,
config=MosaicConfig())`.

For larger M (rows padded to its 64-row tiles; the serving path takes it above 16 rows under
`use_pallas_kernels(lowering="mosaic")`) and 4-bit integer codes in groups of a multiple of 64:
TMA brings `x` and the codes (the packed bytes read as XLA's int4/uint4 arrays, same nibble
order) into shared memory, each step dequantizes a code tile to 16 bits in registers (zero
point, then the group's scale: one rounding per weight, as XLA's path) into one of two
shared-memory buffers, and `wgmma` multiplies from shared memory while the next tile is
dequantized. It needs K and N in whole tiles and pads other weights on every call
(`mosaic_pads`), so the serving path sends those to Triton.

`w4a16` re-exports `MosaicConfig`, `mosaic_unsupported`, `mosaic_pads` and
`MOSAIC_TUNE_CANDIDATES`; its reference, `can_use` and benchmark cover both lowerings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common

if TYPE_CHECKING:
    from pallas_kernels.w4a16 import PackedWeight


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicConfig:
    """Tiles for the Mosaic GPU path (Hopper; 4-bit integer codes; rows padded to `tile_m`;
    static under jit).

    Selecting it runs the product through Mosaic GPU instead of Triton: a TMA pipeline brings
    `x` and int4 code tiles into shared memory; each step dequantizes a `[tile_k, tile_n]` code
    tile to 16 bits (one scale row: `tile_k` is 128 or 64, dividing the QArray's group) into
    one of two shared-memory buffers, and `wgmma` multiplies from shared memory while the next
    tile is dequantized.

    Attributes:
      tile_m: rows per output tile, a multiple of 64 (the `wgmma` M).
      tile_n: columns per output tile, a multiple of 8 up to 256 (`mosaic_pads`: N is padded
        to it on every call when it does not divide N).
      max_concurrent_steps: pipeline depth (TMA loads in flight), at least 2.
      grid_tile_width: width of the snake order over output tiles (L2 reuse of operands).

    Example (the Mosaic GPU interpreter on a CPU; on an H100, interpret=False):
      >>> import jax, jax.numpy as jnp, jqtz
      >>> from pallas_kernels import w4a16
      >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=128)
      >>> w = w4a16.prepare(jqtz.quantize(jax.random.normal(jax.random.key(0), (256, 128)), spec))
      >>> x = jax.random.normal(jax.random.key(1), (64, 256), jnp.bfloat16)
      >>> y = w4a16.matmul(x, w, config=w4a16.MosaicConfig(), interpret=True)
      >>> ref = w4a16.reference(x, w)
      >>> bool(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref) < 1e-2)
      True
    """

    tile_m: int = 64
    tile_n: int = 128
    max_concurrent_steps: int = 4
    grid_tile_width: int = 4

    def __post_init__(self):
        common.check_mosaic_config(self)
        if self.tile_m != 64 or self.tile_n < 128:
            raise ValueError(
                f"MosaicConfig(tile_m={self.tile_m}, tile_n={self.tile_n}): the W4A16 Mosaic GPU "
                "kernel takes tile_m=64 and tile_n >= 128, the tiles seen to run on an H100 "
                "(2026-11-23): tile_m=128 with tile_n=64 failed with "
                "CUDA_ERROR_MISALIGNED_ADDRESS, which breaks every later GPU call of the "
                "process, and tile_m=128 with tile_n=128 needs 32 bytes more shared memory "
                "than a block has"
            )


#: Mosaic GPU configs `--tune` tries for M > 16, within the H100's shared memory (pipeline
#: stages of x and code tiles, two dequantized tiles, the output tile).
MOSAIC_TUNE_CANDIDATES = (
    MosaicConfig(),
    MosaicConfig(tile_n=256, max_concurrent_steps=2),
    MosaicConfig(max_concurrent_steps=6),
    MosaicConfig(grid_tile_width=8),
)


def _tile_k(w: PackedWeight) -> int | None:
    """K per Mosaic GPU step: 128 or 64, dividing the group (one scale row per step)."""
    return next((tk for tk in (128, 64) if w.qgroup % tk == 0), None)


def _kernel(x_g, w_g, s_g, *refs, cfg, tiles_mn, num_k, tile_k, qgroup, has_zero, dtype):
    """One warpgroup per output tile (tiles walked persistently in snake order). Step `kk` of the
    K pipeline loads the code tile into registers, subtracts the zero point, scales by the
    group's scale row, stores the 16-bit tile into buffer `kk % 2` and issues `wgmma` on it;
    `wgmma_wait(1)` keeps one product in flight, so the next step's dequantization overlaps it
    and never overwrites a buffer still being read."""
    z_g, o_g = refs if has_zero else (None, *refs)
    tm, tn = cfg.tile_m, cfg.tile_n
    gm, gn = tiles_mn
    row = plgpu.Layout.WGMMA.reduce(0)  # a [tile_n] vector, broadcast along K

    @plgpu.nd_loop((gm * gn,), collective_axes="sm")
    def _tile(info):
        mi, ni = plgpu.planar_snake(info.index[0], (gm, gn), 1, cfg.grid_tile_width)

        def scoped(acc_ref, buf):
            def step(idxs, x_s, w_s, s_s, *z_s):
                slot = idxs[0] % 2
                codes = plgpu.load(w_s, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                if has_zero:
                    zero = plgpu.load(z_s[0].at[0], layout=row).astype(jnp.float32)
                    codes = codes - jax.lax.broadcast_in_dim(zero, (tile_k, tn), [1])
                scale = plgpu.load(s_s.at[0], layout=row).astype(jnp.float32)
                wdq = codes * jax.lax.broadcast_in_dim(scale, (tile_k, tn), [1])
                buf[slot] = wdq.astype(dtype)
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, x_s, buf.at[slot])
                plgpu.wgmma_wait(1)

            srow = lambda kk: (kk * tile_k // qgroup, ni)
            specs = [
                plgpu.BlockSpec((tm, tile_k), lambda kk: (mi, kk), delay_release=1),
                plgpu.BlockSpec((tile_k, tn), lambda kk: (kk, ni)),
                plgpu.BlockSpec((1, tn), srow),
            ]
            operands = [x_g, w_g, s_g]
            if has_zero:
                specs.append(plgpu.BlockSpec((1, tn), srow))
                operands.append(z_g)
            plgpu.emit_pipeline(
                step, grid=(num_k,), in_specs=specs, max_concurrent_steps=cfg.max_concurrent_steps
            )(*operands)
            return acc_ref[...]

        acc = pl.run_scoped(
            lambda b: pl.run_scoped(lambda a: scoped(a, b), plgpu.ACC((tm, tn), jnp.float32)),
            plgpu.SMEM((2, tile_k, tn), dtype),
        )

        pl.run_scoped(
            lambda o_s: common.store_tile(acc, o_s, o_g.at[pl.ds(mi * tm, tm), pl.ds(ni * tn, tn)]),
            plgpu.SMEM((tm, tn), o_g.dtype),
        )


def mosaic_unsupported(w: PackedWeight) -> str | None:
    """Why the Mosaic GPU path cannot multiply by `w` (None: it can).

    It needs 4-bit codes, no act-order permutation and a group size that is a multiple of 64.
    """
    if w.k_major:
        return (
            "a w4a16.MosaicConfig reads codes packed along N; this weight's are stored K-major "
            "(QArray.transposed)"
        )
    if w.bits != 4 or w.levels or w.perm is not None or _tile_k(w) is None:
        return (
            "a w4a16.MosaicConfig needs 4-bit integer codes (not NF4), no act-order permutation "
            f"and a group size that is a multiple of 64; got bits={w.bits}, "
            f"nf4={'yes' if w.levels else 'no'}, "
            f"perm={'yes' if w.perm is not None else 'no'}, group={w.qgroup}"
        )
    return None


def mosaic_pads(w: PackedWeight, cfg: MosaicConfig | None = None) -> bool:
    """Whether the Mosaic GPU path (`cfg`, default `MosaicConfig()`) copies `w` on every call:
    TMA moves whole tiles, so K must be a multiple of the K step and N of `cfg.tile_n`, or the
    codes are padded to them (the Triton path reads every shape in place)."""
    cfg = cfg or MosaicConfig()
    return bool(w.k % (_tile_k(w) or 64) or w.n % cfg.tile_n)


def matmul_rows(x2, w: PackedWeight, cfg: MosaicConfig, *, out_dtype, interpret: bool):
    """The Mosaic GPU product of `x2 [M, K]` with a 4-bit `PackedWeight`, padded to tiles."""
    reason = mosaic_unsupported(w)
    if reason:
        raise ValueError(f"{reason}. Use a TuningConfig (Triton) for this weight.")
    tile_k = _tile_k(w)
    m = x2.shape[0]
    mp, kp, np_ = (
        common.round_up(m, cfg.tile_m),
        common.round_up(w.k, tile_k),
        common.round_up(w.n, cfg.tile_n),
    )
    x2 = common.pad_axis(common.pad_axis(x2, 1, kp), 0, mp)
    # Padded codes are zeros with zero scales (a copy of the weight: see `mosaic_pads`). Padded
    # K rows stay inside the last group: the group size is a multiple of the K step.
    codes = common.pad_axis(common.pad_axis(w.codes, 0, kp), 1, np_ // 2)
    scale = common.pad_axis(w.scale, 1, np_)
    zero = None if w.zero is None else common.pad_axis(w.zero, 1, np_)
    # The packed bytes read as XLA's 4-bit arrays (low nibble first, as the QArray packs them).
    codes = jax.lax.bitcast_convert_type(codes, jnp.int4 if w.signed else jnp.uint4)
    codes = codes.reshape(kp, np_)
    tiles = (mp // cfg.tile_m, np_ // cfg.tile_n)
    body = functools.partial(
        _kernel,
        cfg=cfg,
        tiles_mn=tiles,
        num_k=kp // tile_k,
        tile_k=tile_k,
        qgroup=w.qgroup,
        has_zero=zero is not None,
        dtype=x2.dtype,
    )
    args = [x2, codes, scale] + ([zero] if zero is not None else [])
    out = common.persistent_mosaic_kernel(
        body,
        jax.ShapeDtypeStruct((mp, np_), out_dtype),
        tiles[0] * tiles[1],
        interpret=interpret,
        name=f"w4a16_mgpu_g{w.qgroup}",
    )(*args)
    return out[:m, : w.n]

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
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
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

    def offset(srow):  # (1, bn) float32: base + zero point per column
        if z_ref is None:
            return offset_signed
        return base + z_ref[pl.ds(srow, 1), :].astype(jnp.float32)

    def body(gi, acc):
        srow = gi * kg // qgroup
        j = iota((1, half), 1)
        k_even = gi * kg + 2 * j  # logical k of the even entries of this step
        x_mask_e, x_mask_o, c_mask = live, live, cols_ok
        if k % kg:  # the last step reaches past K
            x_mask_e = live & (k_even < k)
            x_mask_o = live & (k_even + 1 < k)
            c_mask = cols_ok & (gi * half + j < -(-k // 2))
        pair = pl.ds(gi * half, half)  # bytes of codes, and pairs of x entries, of this step
        c = pltriton.load(c_ref.at[:, pair], mask=c_mask, other=0)
        xe = pltriton.load(x_ref.at[:, pair, jnp.int32(0)], mask=x_mask_e, other=0)
        xo = pltriton.load(x_ref.at[:, pair, jnp.int32(1)], mask=x_mask_o, other=0)
        lo = jax.lax.bitcast_convert_type((c & 15).astype(jnp.uint16) ^ flip, act)
        hi = jax.lax.bitcast_convert_type((c >> 4).astype(jnp.uint16) ^ flip, act)
        xsum = jnp.sum(xe.astype(jnp.float32) + xo.astype(jnp.float32), axis=1, keepdims=True)
        scale = s_ref[pl.ds(srow, 1), :].astype(jnp.float32)  # (1, bn)
        dn = (((1,), (1,)), ((), ()))
        if swap:  # the weight first: (bn, kg/2) x (bm, kg/2)^T -> (bn, bm)
            p = jax.lax.dot_general(lo, xe, dn, preferred_element_type=jnp.float32)
            p = p + jax.lax.dot_general(hi, xo, dn, preferred_element_type=jnp.float32)
            return acc + (p - offset(srow).T * xsum.T) * scale.T
        p = jax.lax.dot_general(xe, lo, dn, preferred_element_type=jnp.float32)
        p = p + jax.lax.dot_general(xo, hi, dn, preferred_element_type=jnp.float32)
        return acc + (p - xsum * offset(srow)) * scale

    init = jnp.zeros((bn, bm) if swap else (bm, bn), jnp.float32)
    acc = jax.lax.fori_loop(start, stop, body, init)
    pltriton.store(o_ref, (acc.T if swap else acc).astype(o_ref.dtype), mask=live)


def matmul_rows(x2, w: PackedWeight, cfg: TuningConfig, *, out_dtype, interpret: bool):
    """`x2 [M, K] @ W` for a K-major 4-bit `PackedWeight` (`w.k_major`), with a Triton
    `TuningConfig` (its `block_m`, `block_n`, `split_k`, warps and stages; codes are always
    folded as `fold_zero`, and `tensor_cores=False` is refused)."""
    if not cfg.tensor_cores:
        raise ValueError(
            "TuningConfig(tensor_cores=False) reads codes packed along N; this weight's codes "
            "are stored K-major (QArray.transposed): use tensor_cores=True"
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

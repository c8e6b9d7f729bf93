"""Blocked views of arrays: the one mechanism behind every granularity.

A granularity is a block shape over the trailing dimensions of an array: per-tensor is the whole
shape, per-channel is 1 on every kept axis and the full size on the contraction axis, per-group is
`g` on the contraction axis, 2-D blocks are `(bh, bw)`. Every block shares one scale (and zero
point). A dimension that is not a multiple of its block size ends in a shorter last block.

Arrays may carry extra *leading* batch dimensions (from `vmap` or stacked layers); blocks only
ever span the trailing `len(block)` dimensions.
"""

from __future__ import annotations

import jax.numpy as jnp


def num_blocks(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """Number of blocks along each dimension (a shorter last block counts)."""
    return tuple(-(-s // b) for s, b in zip(shape, block, strict=True))


def is_ragged(shape: tuple[int, ...], block: tuple[int, ...]) -> bool:
    return any(s % b for s, b in zip(shape, block, strict=True))


def to_blocks(x: jnp.ndarray, block: tuple[int, ...], fill=jnp.nan) -> jnp.ndarray:
    """`[*batch, s0, s1, ...]` -> `[*batch, n0, b0, n1, b1, ...]`, padding ragged blocks.

    The pad value `fill` (NaN by default) must be ignored by whatever reduces over the blocks.
    """
    nb = x.ndim - len(block)
    shape = x.shape[nb:]
    n = num_blocks(shape, block)
    pads = [(0, 0)] * nb + [(0, ni * bi - si) for si, bi, ni in zip(shape, block, n, strict=True)]
    if any(p for _, p in pads):
        x = jnp.pad(x, pads, constant_values=fill)
    # One axis per reshape: jax can shard a single split axis, not a multi-axis reshape.
    for i, (ni, bi) in enumerate(zip(n, block, strict=True)):
        at = nb + 2 * i
        x = x.reshape(*x.shape[:at], ni, bi, *x.shape[at + 1 :])
    return x


def block_axes(ndim_blocked: int, rank: int) -> tuple[int, ...]:
    """Axes of a blocked view that run *within* blocks (the ones reductions go over)."""
    nb = ndim_blocked - 2 * rank
    return tuple(nb + 2 * i + 1 for i in range(rank))


def from_blocks(xb: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
    """Inverse of `to_blocks`: merge block axes and drop the padding."""
    rank = len(shape)
    nb = xb.ndim - 2 * rank
    merged = [xb.shape[nb + 2 * i] * xb.shape[nb + 2 * i + 1] for i in range(rank)]
    x = xb
    for i in range(rank):
        at = nb + i
        x = x.reshape(*x.shape[:at], x.shape[at] * x.shape[at + 1], *x.shape[at + 2 :])
    if tuple(merged) != tuple(shape):
        x = x[(Ellipsis, *(slice(0, s) for s in shape))]
    return x


def expand(per_block: jnp.ndarray, rank: int) -> jnp.ndarray:
    """`[*batch, n0, n1, ...]` -> `[*batch, n0, 1, n1, 1, ...]`, to broadcast against blocks."""
    nb = per_block.ndim - rank
    inter = [d for ni in per_block.shape[nb:] for d in (ni, 1)]
    return per_block.reshape(*per_block.shape[:nb], *inter)


def describe(shape: tuple[int, ...], block: tuple[int, ...]) -> str:
    """A short human name for a granularity, for reports: `tensor`, `channel`, `g128`, `128x128`."""
    if all(b >= s for s, b in zip(shape, block, strict=True)):
        return "tensor"
    partial = [b for s, b in zip(shape, block, strict=True) if 1 < b < s]
    if not partial:
        return "channel"
    spans_full_axis = any(b >= s > 1 for s, b in zip(shape, block, strict=True))
    if len(partial) == 1 and not spans_full_axis:
        return f"g{partial[0]}"
    return "x".join(str(b) for b in block)

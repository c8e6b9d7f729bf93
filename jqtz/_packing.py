"""Packing of sub-byte codes into bytes along the last axis (the layout of docs/formats.md).

`bits` codes are packed into the smallest whole number of bytes that holds a whole number of
codes: 2 int4 per byte, 4 int2 per byte, 8 int3 per 3 bytes. Within such a word, code k sits at
bits [k*bits, (k+1)*bits) of the little-endian word (lowest bits first). Signed codes are stored
in two's complement; a last partial word is padded with zero codes.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

_SUPPORTED_BITS = (2, 3, 4)


def word_layout(bits: int) -> tuple[int, int]:
    """(codes per word, bytes per word) for `bits`-bit codes."""
    if bits not in _SUPPORTED_BITS:
        raise NotImplementedError(f"packing of {bits}-bit codes (supported: {_SUPPORTED_BITS})")
    word_bits = math.lcm(bits, 8)
    return word_bits // bits, word_bits // 8


def packed_length(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits take along the packed axis."""
    per_word, word_bytes = word_layout(bits)
    return -(-n // per_word) * word_bytes


def pack(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Pack int8/uint8 codes `[..., n]` into uint8 `[..., packed_length(n, bits)]`."""
    per_word, word_bytes = word_layout(bits)
    n = codes.shape[-1]
    pad = -n % per_word
    u = codes.astype(jnp.int32).astype(jnp.uint32) & jnp.uint32(2**bits - 1)
    if pad:
        u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
    u = u.reshape(*u.shape[:-1], -1, per_word)  # (..., words, per_word)
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
    word = jnp.sum(u << shifts, axis=-1, dtype=jnp.uint32)  # disjoint bits: sum == or
    byte_shifts = jnp.arange(word_bytes, dtype=jnp.uint32) * 8
    out = (word[..., None] >> byte_shifts) & jnp.uint32(0xFF)  # (..., words, word_bytes)
    return out.reshape(*out.shape[:-2], -1).astype(jnp.uint8)


def unpack(packed: jnp.ndarray, bits: int, n: int, *, signed: bool) -> jnp.ndarray:
    """Inverse of `pack`: uint8 `[..., packed_length(n, bits)]` -> int8/uint8 codes `[..., n]`."""
    per_word, word_bytes = word_layout(bits)
    b = packed.astype(jnp.uint32).reshape(*packed.shape[:-1], -1, word_bytes)
    byte_shifts = jnp.arange(word_bytes, dtype=jnp.uint32) * 8
    word = jnp.sum(b << byte_shifts, axis=-1, dtype=jnp.uint32)
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
    codes = (word[..., None] >> shifts) & jnp.uint32(2**bits - 1)
    codes = codes.reshape(*codes.shape[:-2], -1)[..., :n].astype(jnp.int32)
    if signed:
        codes = jnp.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes)
        return codes.astype(jnp.int8)
    return codes.astype(jnp.uint8)

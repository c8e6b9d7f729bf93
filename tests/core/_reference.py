"""Plain numpy references for the core tests, written from the documented rules, not from jqtz.

The tests compare jqtz against these: the packing layout of `jqtz/_packing.py`'s docstring, and
dequantization as `(code - zero_point) * scale` with one scale per block.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

# The 16 NormalFloat-4 levels of QLoRA, copied from /work/shared/REFERENCE.md §4.
QLORA_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

FP8_DTYPES = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}


def word_layout(bits: int) -> tuple[int, int]:
    """(codes per word, bytes per word): the smallest whole bytes holding whole codes."""
    word_bits = math.lcm(bits, 8)
    return word_bits // bits, word_bits // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Code k of a word at bits [k*bits, (k+1)*bits) of the little-endian word; zero padding."""
    per_word, word_bytes = word_layout(bits)
    codes = np.asarray(codes)
    n = codes.shape[-1]
    rows = codes.reshape(-1, n)
    out = []
    for row in rows:
        data = bytearray()
        for start in range(0, n, per_word):
            word = 0
            for k, c in enumerate(row[start : start + per_word]):
                word |= (int(c) & (2**bits - 1)) << (k * bits)
            data += word.to_bytes(word_bytes, "little")
        out.append(np.frombuffer(bytes(data), np.uint8))
    return np.stack(out).reshape(*codes.shape[:-1], -1)


def unpack(packed: np.ndarray, bits: int, n: int, *, signed: bool) -> np.ndarray:
    """Inverse of `pack` (two's complement when `signed`)."""
    per_word, word_bytes = word_layout(bits)
    packed = np.asarray(packed, np.uint8)
    rows = packed.reshape(-1, packed.shape[-1])
    out = []
    for row in rows:
        codes = []
        for start in range(0, row.size, word_bytes):
            word = int.from_bytes(row[start : start + word_bytes].tobytes(), "little")
            for k in range(per_word):
                c = (word >> (k * bits)) & (2**bits - 1)
                codes.append(c - 2**bits if signed and c >= 2 ** (bits - 1) else c)
        out.append(codes[:n])
    return np.asarray(out, np.int64).reshape(*packed.shape[:-1], n)


def per_element(per_block: np.ndarray, shape, block) -> np.ndarray:
    """Broadcast one value per block to every element of `shape` (ragged last blocks allowed);
    leading batch dimensions of `per_block` are kept."""
    idx = np.ix_(*[np.arange(s) // b for s, b in zip(shape, block, strict=True)])
    return np.asarray(per_block)[(Ellipsis, *idx)]


def codes_of(q) -> np.ndarray:
    """The logical codes of a `QArray`, unpacked with `unpack` above."""
    fmt = q.format
    if fmt.bits < 8:
        signed = fmt.name.startswith("int")
        return unpack(np.asarray(q.qvalue), fmt.bits, q.shape[-1], signed=signed)
    return np.asarray(q.qvalue)


def scale_of(q) -> np.ndarray:
    """Per-block scales as float32; nested (double-quantized) scales are dequantized first."""
    s = q.scale
    return dequantize(s) if hasattr(s, "qvalue") else np.asarray(s).astype(np.float32)


def dequantize(q) -> np.ndarray:
    """(code - zero_point) * scale per element, in float32 (one rounding per operation)."""
    codes = codes_of(q)
    if q.format.name == "nf4":
        values = np.asarray(QLORA_NF4, np.float32)[codes.astype(np.int64)]
    else:
        values = codes.astype(np.float32)
    if q.zero_point is not None:
        zero = np.asarray(q.zero_point).astype(np.float32)
        values = values - per_element(zero, q.shape, q.block_shape)
    return values * per_element(scale_of(q), q.shape, q.block_shape)


def real_nbytes(tree) -> int:
    """Bytes of every array leaf of a pytree (QArrays flatten to their arrays)."""
    import jax

    return sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree))

"""Weight-only quantized matrix product (W4A16 / W8A16, and 2/3-bit) with group-wise scales and
zero points.

`y[m, n] = sum_k x[m, k] * (code[k, n] - zero[k // g, n]) * scale[k // g, n]` for a flax kernel
`W [K, N]` stored as a `jqtz.QArray` (int2/3/4/8 or uint2/3/4/8, or fp8 e4m3/e5m2 codes, which
are exact in 16 bits; groups of `g` along K, or one scale per output channel), and bf16/f16
activations `x [M, K]`. NF4 weights (QLoRA's 16
levels) take the same path with `level[code]` in place of `code - zero`: a tree of 15 selects on
the code's bits with the levels as constants, rounded once to the activation dtype.

The kernel works group by group: it unpacks one group of codes to 16 bits in registers, takes
the exact integer-valued product with `x` on the tensor cores (float32 accumulation) and applies
the group's scale to the `[bm, bn]` partial result, so the scale multiply costs `M*N*K/g`
instead of `N*K`. Small M (decode, M <= 16) takes one 16-row tile (rows past M masked, not
padded) and splits K across programs so that a GEMV fills the GPU; the partial sums, M rows of
them, are added by XLA.

Layout: the kernel reads the `QArray`'s own storage in place, for every shape (sub-byte codes
packed along N in words of `per_word` codes, `word_layout`: two 4-bit codes per byte, four
2-bit codes per byte, eight 3-bit codes per 3 bytes; two's complement or with uint8 zero
points; scales `[ceil(K/g), N]`): each step unpacks a word's fields into `per_word` narrow
products that land on the output columns `p (mod per_word)` (4-bit: the low and high nibbles
on the even and odd columns; 3-bit: the word's three bytes are three loads of `[K, words, 3]`,
a free reshape, combined into one 32-bit word). K need not be a multiple of the kernel group
`kg` (128, 64 or 32, dividing `g`) nor N of the tile: the last step's rows and the last tile's
columns are masked loads, so `prepare` never copies the codes. Act-order permutations are
applied to `x` (a gather of the activations) instead of the weight.

Two lowerings, chosen by the config's type: `TuningConfig` runs the kernel above through Pallas
Triton (the default, every format); `MosaicConfig` runs a Hopper Mosaic GPU version for larger
M and 4-bit integer codes in groups of a multiple of 64 (`pallas_kernels.w4a16_mosaic`, whose
config and predicates this module re-exports). The benchmark suite sweeps both.

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> from pallas_kernels import w4a16
  >>> w = jax.random.normal(jax.random.key(0), (256, 128))
  >>> q = jqtz.quantize(w, jqtz.QuantSpec(format="int4", granularity="group", group_size=64))
  >>> x = jax.random.normal(jax.random.key(1), (3, 256), jnp.bfloat16)
  >>> lw = w4a16.prepare(q)
  >>> y = w4a16.matmul(x, lw, interpret=True)  # on a GPU: interpret=False (the default)
  >>> ref = w4a16.reference(x, lw)
  >>> bool(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref) < 1e-2)
  True
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jqtz import _packing
from pallas_kernels import common, w4a16_kmajor, w4a16_mosaic

# The Mosaic GPU lowerings' configs and predicates, re-exported: one W4A16 entry point.
from pallas_kernels.w4a16_kmajor import (
    MOSAIC_DECODE_ROWS,
    MosaicDecodeConfig,
    mosaic_decode_unsupported,
)
from pallas_kernels.w4a16_mosaic import (
    MOSAIC_TUNE_CANDIDATES,
    MosaicConfig,
    mosaic_pads,
    mosaic_unsupported,
)

__all__ = [
    "H100_SMS",
    "MAX_FMA_ROWS",
    "MOSAIC_DECODE_ROWS",
    "MOSAIC_TUNE_CANDIDATES",
    "SMALL_M",
    "MosaicConfig",
    "MosaicDecodeConfig",
    "PackedWeight",
    "TuningConfig",
    "can_use",
    "default_config",
    "dequantize",
    "kernel_group",
    "matmul",
    "min_block_n",
    "mosaic_config",
    "mosaic_decode_unsupported",
    "mosaic_pads",
    "mosaic_unsupported",
    "prepare",
    "reference",
    "supports_qarray",
    "word_layout",
]

_KERNEL_GROUPS = (128, 64, 32)
_FORMATS = (
    "int2", "uint2", "int3", "uint3", "int4", "uint4", "int8", "uint8", "nf4", "fp8_e4m3",
    "fp8_e5m2",
)  # fmt: skip
_ACT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
_SCALE_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
#: Largest M that takes the decode (split-K, 16-row tile) path.
SMALL_M = 16
#: Most rows `TuningConfig(tensor_cores=False)` takes (one CUDA-core pass over the codes each).
MAX_FMA_ROWS = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
    """Block sizes and launch parameters (static under jit).

    Attributes:
      block_m: rows of `x` per program (16 for decode; 64 or 128 for prefill).
      block_n: output columns per program (64, 128 or 256; a last tile past N is masked).
      split_k: programs that share one output tile along K (partial sums added by XLA).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth.
      fold_zero: integer codes below 8 bits enter the product as the 16-bit float `B + code`
        made by bit operations alone (`B` = 128 for bf16, 1024 for f16: exact), and
        `(B + zero) * sum(x)` is subtracted once per group and column, instead of converting
        each code to float and subtracting its zero point (fewer instructions per weight).
        Other codes ignore it.
      tensor_cores: False multiplies on the CUDA cores instead, for decode with at most
        `MAX_FMA_ROWS` rows: each live row of `x` times the step's codes (converted to float32,
        zero points subtracted after the sum), summed over the step's K rows; no 16-row tile
        and no layout change of the weight through shared memory.
      dequant_first: each step's codes become the weight itself, `(code - zero) * scale` in
        float32 rounded once to the activation dtype (as XLA's dequantize-then-dot rounds), and
        the products accumulate in place: no per-group work on the `[bm, bn]` partial product
        (two float ops per output element and group), one multiply per weight instead. For
        larger M (per weight, the work is shared by `block_m` rows); `fold_zero` is ignored.
    """

    block_m: int = 16
    block_n: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    fold_zero: bool = False
    tensor_cores: bool = True
    dequant_first: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if not common.is_pow2(v) or v < 16:
                raise ValueError(f"TuningConfig.{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1:
            raise ValueError(f"TuningConfig.split_k must be >= 1, got {self.split_k}")
        if self.dequant_first and not self.tensor_cores:
            raise ValueError(
                "TuningConfig(dequant_first=True) feeds the tensor cores; it cannot go with "
                "tensor_cores=False: set one of them"
            )


#: Number of SMs on an H100 SXM; decode splits K until about two waves of programs exist.
H100_SMS = 132


def default_config(m: int, n: int, num_groups: int, *, bits: int = 4) -> TuningConfig:
    """H100 defaults for `m` rows, `n` output columns, `num_groups` kernel groups along K and
    `bits`-bit codes, from the tuning runs of 2026-11-23 (docs/benchmarks.md):

    - `fold_zero` always (M = 1: 47 against 58 us at best without it; M = 64: 168 against
      268 us);
    - decode (M <= 16): 256-column tiles with 8 warps where N is a multiple of 256 and at
      least 2048 (the fastest at N = 8192); else 128 columns, or 64 where that covers N
      exactly and 128 would not (no masked last tile) and the codes allow it
      (`min_block_n`), with 4 warps; K split until about two programs per SM exist;
    - larger M: 64-row tiles with 4 warps up to 64 rows, 128-row tiles with 8 warps above,
      K split as for decode while there are fewer than two tiles per SM (`auto_split`).
    """
    narrow = n % 128 and n % 64 == 0 and min_block_n(bits) <= 64
    block_n = 64 if narrow else 128
    if m <= SMALL_M:
        wide = n % 256 == 0 and n >= 2048
        block_m, block_n, warps = (16, 256, 8) if wide else (16, block_n, 4)
    else:
        block_m, warps = (64, 4) if m <= 64 else (128, 8)
    split = auto_split(m, n, num_groups, block_m, block_n)
    return TuningConfig(block_m=block_m, block_n=block_n, split_k=split, num_warps=warps,
                        num_stages=3, fold_zero=True)  # fmt: skip


def auto_split(m: int, n: int, num_groups: int, block_m: int, block_n: int) -> int:
    """Programs along K per output tile so that about two programs per SM exist (a 64-row
    product over 8192 columns has only 64 tiles of 64 x 128 for 132 SMs)."""
    tiles = common.cdiv(m, block_m) * common.cdiv(n, block_n)
    return max(1, min(num_groups, common.cdiv(2 * H100_SMS, tiles)))


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight-only `QArray [K, N]` as the kernel reads it: the QArray's own arrays, unpadded.

    Attributes:
      codes: sub-byte: uint8 `[K, packed_length(N, bits)]` packed along N as in `QArray` (for
        4-bit, column 2j in the low nibble, 2j+1 in the high one; `word_layout` in general;
        two's complement when `signed`); 8-bit: int8/uint8 `[K, N]`.
      scale: `[ceil(K/g), N]` float32/bfloat16/float16: the QArray's scales.
      zero: uint8 `[ceil(K/g), N]` zero points, or None for symmetric (signed) codes.
      perm: int32 `[K]` act-order permutation (stored row j is logical row perm[j]) or None.
      bits: 2, 3, 4 or 8.  signed: codes are two's complement (no zero points).
      levels: for lookup formats (NF4), the 16 values the 4-bit codes index; None for integers.
      qgroup: the QArray's group size along K (`K` for one scale per column).
      group: the kernel group `kg`: rows per inner step, a power of two that divides `qgroup`.
      k, n: logical shape.
      dtype: the QArray's dequantized dtype.
      k_major: the codes are 4-bit, stored `[N, ceil(K/2)]` packed along K in two's complement
        (a transposed `QArray`; unsigned codes as `code - 8`), read by
        `pallas_kernels.w4a16_kmajor`.
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    perm: jax.Array | None
    bits: int
    signed: bool
    qgroup: int
    group: int
    k: int
    n: int
    dtype: np.dtype
    levels: tuple[float, ...] | None = None
    k_major: bool = False

    @property
    def k_padded(self) -> int:
        """K rounded up to the kernel group: the rows the kernel's steps cover (masked past K;
        nothing is padded)."""
        return common.round_up(self.k, self.group)

    @property
    def num_groups(self) -> int:
        return self.k_padded // self.group


jax.tree_util.register_dataclass(
    PackedWeight,
    data_fields=["codes", "scale", "zero", "perm"],
    meta_fields=["bits", "signed", "qgroup", "group", "k", "n", "dtype", "levels", "k_major"],
)


def kernel_group(shape, block_shape) -> int | None:
    """Rows per inner step for a `[K, N]` QArray with `block_shape`, or None when unsupported.

    The largest of 128, 64, 32 that divides the QArray's group (so that an inner step never
    straddles two scales) and, where possible, K (so that no step needs masked loads).
    """
    k, g = shape[0], block_shape[0]
    if g >= k:  # one scale per column: every kernel group works
        return next((kg for kg in _KERNEL_GROUPS if k % kg == 0), 32)
    return next((kg for kg in _KERNEL_GROUPS if g % kg == 0), None)


def supports_qarray(qarray) -> str | None:
    """None when `prepare(qarray)` works, else the reason why not."""
    from jqtz.qarray import QArray

    if not isinstance(qarray, QArray):
        return f"not a QArray: {type(qarray).__name__}"
    fmt = qarray.format
    if fmt.name not in _FORMATS:
        return f"format {fmt.name!r} (supported: {', '.join(_FORMATS)})"
    if qarray.ndim != 2 or qarray.batch_shape:
        return f"shape {qarray.shape} with batch {qarray.batch_shape} (need one 2-D [K, N])"
    if qarray.act is not None:
        return "quantized activations (use the w8a8 kernel)"
    if qarray.transposed and fmt.bits != 4:
        return "8-bit codes stored transposed, [N, K] (the kernel reads them [K, N])"
    if qarray.block_shape[1] != 1:
        return f"block_shape {qarray.block_shape}: groups must run along K only"
    if kernel_group(qarray.shape, qarray.block_shape) is None:
        return f"group size {qarray.block_shape[0]} is not a multiple of 32"
    return None


def prepare(qarray) -> PackedWeight:
    """The kernel's view of a weight-only `QArray [K, N]`: its own arrays, never copied.

    Only scales that the kernel cannot read as they are (double-quantized, or a dtype other than
    float32/bfloat16/float16) are expanded: `[ceil(K/g), N]` values, a small fraction of the
    codes, so this is cheap enough to run inside every jitted call.

    Raises:
      NotImplementedError: for formats or block shapes the kernel does not cover
        (`supports_qarray` says which).
    """
    from jqtz.qarray import QArray

    why = supports_qarray(qarray)
    if why is not None:
        raise NotImplementedError(f"w4a16.prepare: unsupported QArray: {why}")
    k, n = qarray.shape
    scale = qarray.scale
    if isinstance(scale, QArray) or scale.dtype not in _SCALE_DTYPES:
        scale = qarray.scale_values()  # double-quantized scales are expanded here
    zero = qarray.zero_point
    if zero is not None:
        zero = zero.astype(jnp.uint8)
    perm = None if qarray.perm is None else qarray.perm.astype(jnp.int32)
    fmt = qarray.format
    return PackedWeight(
        qarray.qvalue,
        scale,
        zero,
        perm,
        fmt.bits,
        getattr(fmt, "signed", False),
        min(qarray.block_shape[0], k),
        kernel_group(qarray.shape, qarray.block_shape),
        k,
        n,
        np.dtype(qarray.dtype),
        getattr(fmt, "table", None),
        qarray.transposed,
    )


def word_layout(bits: int) -> tuple[int, int]:
    """(codes per word, bytes per word) of the packed codes: (4, 1) for 2-bit, (8, 3) for 3-bit,
    (2, 1) for 4-bit (the QArray's packing, docs/formats.md), (1, 1) for 8-bit."""
    return (1, 1) if bits == 8 else _packing.word_layout(bits)


def min_block_n(bits: int) -> int:
    """Narrowest tile for `bits`-bit codes: each of a word's `per_word` products is at least 16
    columns wide (the tensor cores' smallest operand)."""
    return 16 * word_layout(bits)[0]


def _lookup(codes, levels: tuple[float, ...]):
    """`levels[codes]` (float32) for 4-bit codes: a tree of 15 selects on the code bits, one
    level of the tree per bit, with the levels as constants (no gather, no table in memory)."""
    vals = [float(v) for v in levels]
    for bit in range(4):
        on = ((codes >> bit) & 1) == 1
        vals = [jnp.where(on, hi, lo) for lo, hi in zip(vals[::2], vals[1::2], strict=True)]
    return vals[0].astype(jnp.float32)


def _interleave(parts):
    """The `(rows, per_word * w)` tensor whose columns `per_word * j + p` are `parts[p][:, j]`
    (a word's fields back in column order), by pairwise joins along a new last axis."""
    if len(parts) == 1:
        return parts[0]
    pairs = jnp.stack([_interleave(parts[0::2]), _interleave(parts[1::2])], axis=-1)
    return pairs.reshape(pairs.shape[0], -1)


def _deinterleave(v, ways: int):
    """`_interleave`'s inverse: `ways` (a power of two) tensors `(rows, w)` whose p-th holds
    columns `ways * j + p` of `v (rows, ways * w)`, by pairwise splits of a last axis of 2."""
    if ways == 1:
        return [v]
    even, odd = jnp.unstack(v.reshape(v.shape[0], -1, 2), axis=-1)
    pairs = zip(_deinterleave(even, ways // 2), _deinterleave(odd, ways // 2), strict=True)
    return [part for pair in pairs for part in pair]


def _load(ref, mask):
    """`ref[...]`, through a masked load (zeros where `mask` is False) when there is a mask."""
    zero = jnp.zeros((), ref.dtype)  # typed: Triton has no int -> fp8 cast for `other=0`
    return ref[...] if mask is None else pltriton.load(ref, mask=mask, other=zero)


def _kernel(
    x_ref,
    codes_ref,
    scale_ref,
    *rest,
    m,
    k,
    n,
    planes,
    bits,
    signed,
    levels,
    qgroup,
    kg,
    num_groups,
    groups_per_split,
    fold_zero,
    tensor_cores,
    dequant_first,
):
    zero_ref = rest[0] if len(rest) == 2 else None
    o_ref = rest[-1]
    bm = x_ref.shape[0]
    per_word, word_bytes = word_layout(bits)
    wn = codes_ref.shape[1]  # words (of `per_word` columns) per tile
    iota = functools.partial(jax.lax.broadcasted_iota, jnp.int32)
    # Rows of `x` past M (a decode tile has 16 rows for one token) are not read: a masked load
    # instead of padding `x` in XLA, and, with `planes`, not written either.
    rows = pl.program_id(0) * bm + iota((bm, 1), 0)
    live = rows < m
    start = pl.program_id(2) * groups_per_split
    stop = jnp.minimum(start + groups_per_split, num_groups)
    act_dtype = x_ref.dtype
    # Sub-byte codes of columns `per_word*j + p` share word j: `per_word` narrow products per
    # step, whose results land on the columns p (mod per_word) (strided stores, once per tile).
    # `dequant_first` interleaves the words' fields back into column order in registers
    # instead: one product over the whole tile.
    natural = dequant_first or bits == 8
    cols = [slice(None)] if natural else [pl.ds(p, wn, stride=per_word) for p in range(per_word)]
    # The last tile may reach past N: its words there are masked loads of zeros (the codes are
    # not padded; scales and zero points are, in XLA), and those output columns are sliced off
    # by XLA.
    code_cols = None
    if -(-n // (wn * per_word)) * wn * per_word != n:
        code_cols = pl.program_id(1) * wn + iota((1, wn), 1) < -(-n // per_word)
    half = 2 ** (bits - 1)
    # `fold_zero`: the bit pattern `magic | code` is the 16-bit float `base + code` (codes below
    # 128 sit in the mantissa's low bits), so a product over it is `x @ (base + code)`.
    fold = fold_zero and levels is None and 1 < bits < 8
    magic, base = (0x4300, 128.0) if act_dtype == jnp.bfloat16 else (0x6400, 1024.0)

    def group_rows(gi):
        """Step `gi`'s rows of the scales and zero points (None without), as stored."""
        srow = gi * kg // qgroup
        return tuple(None if r is None else r[pl.ds(srow, 1), :] for r in (scale_ref, zero_ref))

    def per_plane(row):
        """A row of scales or zero points as float32 `(1, width)` values for each plane's
        columns: the tile's whole row, loaded contiguously a step ahead, and split in
        registers, instead of a strided load per plane that each step would wait for."""
        v = row.astype(jnp.float32)
        return [v] if natural else _deinterleave(v, per_word)

    def dequant(codes, off, scale=None):
        """Codes of one step (kg, width) -> (code - off) in the activation dtype (exact), or
        the NF4 level (rounded once to the activation dtype); times `scale` (1, width) before
        that rounding when given."""
        v = _lookup(codes, levels) if levels is not None else codes.astype(jnp.float32)
        if off is not None:
            v = v - off
        return (v if scale is None else v * scale).astype(act_dtype)

    def body(gi, accs, group):
        scale_row, zero_row = group  # loaded a step ahead (`common.fori_loop_rows_ahead`)
        x_mask, c_mask = live, code_cols
        if k % kg:  # the last step reaches past K: its rows of x and of the codes are zeros
            x_mask = live & (gi * kg + iota((1, kg), 1) < k)
            k_rows = gi * kg + iota((kg, 1), 0) < k
            c_mask = k_rows if c_mask is None else k_rows & c_mask
        step = pl.ds(gi * kg, kg)
        if tensor_cores:
            xg = pltriton.load(x_ref.at[:, step], mask=x_mask, other=0)  # (bm, kg)
        if bits == 8:
            parts = (_load(codes_ref.at[step], c_mask),)  # (kg, bn) int8/uint8/fp8
        else:
            if word_bytes == 1:
                word = _load(codes_ref.at[step], c_mask)  # (kg, wn) uint8
            else:  # (kg, wn, word_bytes) little-endian bytes -> one int32 word per `per_word` codes
                word = sum(
                    _load(codes_ref.at[step, :, jnp.int32(i)], c_mask).astype(jnp.int32) << (8 * i)
                    for i in range(word_bytes)
                )
            parts = tuple((word >> (bits * p)) & (2**bits - 1) for p in range(per_word))
            if signed:
                parts = tuple(f ^ half for f in parts)
        if natural:
            parts = (_interleave(parts),)  # (kg, bn): the tile's columns in order
        scales = per_plane(scale_row)
        # What each column's codes are offset by: the zero point, or 2**(bits-1) for two's
        # complement (sign bit flipped above); NF4 levels and signed 8-bit codes have none.
        offsets = [None] * len(parts)
        if zero_ref is not None:
            offsets = per_plane(zero_row)
        elif levels is None and bits < 8:
            offsets = [jnp.full((1, 1), float(half), jnp.float32)] * len(parts)
        if dequant_first:  # acc + x @ ((code - zero) * scale), the product accumulated in place
            w = dequant(parts[0], offsets[0], scales[0])
            return (accs[0] + jnp.dot(xg, w, preferred_element_type=jnp.float32),)
        out = []
        if not tensor_cores:  # the live rows of x as (kg, 1) float32 columns, and their sums
            k_live = None if not k % kg else gi * kg + iota((kg,), 0) < k
            xcols = [
                _load(x_ref.at[jnp.int32(r), step], k_live).astype(jnp.float32)[:, None]
                for r in range(m)
            ]
            xsums = [jnp.sum(xc, axis=0, keepdims=True) for xc in xcols]  # (1, 1)
            row = iota((bm, 1), 0)
        elif fold:
            xsum = jnp.sum(xg.astype(jnp.float32), axis=1, keepdims=True)  # (bm, 1)
        for acc, codes, scale, off in zip(accs, parts, scales, offsets, strict=True):
            if not tensor_cores:  # per row: sum_k x[k] * code[k, :], then - sum(x) * offset
                w = _lookup(codes, levels) if levels is not None else codes.astype(jnp.float32)
                p = jnp.zeros((bm, w.shape[1]), jnp.float32)
                for r, (xc, xs) in enumerate(zip(xcols, xsums, strict=True)):
                    pr = jnp.sum(xc * w, axis=0, keepdims=True)  # (1, width)
                    p = jnp.where(row == r, pr if off is None else pr - xs * off, p)
            elif fold:  # x @ (base + code) - (base + zero) * sum(x)
                w16 = jax.lax.bitcast_convert_type(codes.astype(jnp.uint16) | magic, act_dtype)
                p = jnp.dot(xg, w16, preferred_element_type=jnp.float32)
                p = p - xsum * (base + off)
            else:
                p = jnp.dot(xg, dequant(codes, off), preferred_element_type=jnp.float32)
            out.append(acc + p * scale)
        return tuple(out)

    init = tuple(jnp.zeros((bm, wn * per_word // len(cols)), jnp.float32) for _ in cols)
    # Ahead for decode tiles; larger ones are at the register limit (spills in the SASS).
    accs = common.fori_loop_rows_ahead(start, stop, body, init, group_rows, ahead=bm <= 16)
    for plane, (acc, c) in enumerate(zip(accs, cols, strict=True)):
        if planes:  # columns p (mod per_word) in plane p: contiguous rows
            dst = o_ref.at[pl.ds(plane, 1)]
            pltriton.store(dst, acc.astype(o_ref.dtype)[None], mask=live[None])
        else:
            o_ref[:, c] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def matmul(
    x: jax.Array,
    w: PackedWeight,
    *,
    config: TuningConfig | MosaicConfig | MosaicDecodeConfig | None = None,
    out_dtype=None,
    interpret: bool = False,
) -> jax.Array:
    """`x [..., K] @ W [K, N]` for a `PackedWeight` W; returns `[..., N]` in `out_dtype`.

    Args:
      x: bf16 or f16 activations.
      w: the weight from `prepare`.
      config: a `TuningConfig` (Triton), a `MosaicConfig` (Mosaic GPU: 4-bit codes, groups
        of a multiple of 64, no act-order) or, for up to 16 rows and codes stored K-major, a
        `MosaicDecodeConfig` (Mosaic GPU); None picks `default_config` for the shapes.
      out_dtype: default `result_type(x.dtype, w.dtype)` (what `jqtz.nn.dot_general` returns).
      interpret: run the Pallas interpreter (CPU tests) instead of compiling for the GPU.
    """
    if x.shape[-1] != w.k:
        raise ValueError(f"`x` has {x.shape[-1]} input features, the weight expects {w.k}")
    if np.dtype(x.dtype) not in _ACT_DTYPES:
        raise TypeError(f"`x` must be bfloat16 or float16, got {x.dtype}")
    out_dtype = np.dtype(out_dtype or jnp.result_type(x.dtype, w.dtype))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if w.perm is not None:
        x2 = jnp.take(x2, w.perm, axis=1)
    m = x2.shape[0]
    cfg = config or default_config(m, w.n, w.num_groups, bits=w.bits)
    if isinstance(cfg, MosaicConfig | MosaicDecodeConfig):
        common.require_hopper_for_mosaic(interpret)
        rows = (
            w4a16_mosaic.matmul_rows
            if isinstance(cfg, MosaicConfig)
            else w4a16_kmajor.mosaic_matmul_rows
        )
        y = rows(x2, w, cfg, out_dtype=out_dtype, interpret=interpret)
        return y.reshape(*lead, w.n)
    if w.k_major:
        y = w4a16_kmajor.matmul_rows(x2, w, cfg, out_dtype=out_dtype, interpret=interpret)
        return y.reshape(*lead, w.n)
    if not cfg.tensor_cores and m > MAX_FMA_ROWS:
        raise ValueError(
            f"TuningConfig(tensor_cores=False) takes at most {MAX_FMA_ROWS} rows of `x` (one "
            f"CUDA-core pass each), got {m}; use tensor_cores=True"
        )
    if cfg.block_n < min_block_n(w.bits):
        raise ValueError(
            f"TuningConfig.block_n={cfg.block_n} is too narrow for {w.bits}-bit codes: each of a "
            f"word's {word_layout(w.bits)[0]} products needs 16 columns; use block_n >= "
            f"{min_block_n(w.bits)}"
        )
    split, per_split = common.split_steps(cfg.split_k, w.num_groups)
    n_tiles = common.cdiv(w.n, cfg.block_n)
    n_out = n_tiles * cfg.block_n  # output columns past N are computed as zeros, sliced off
    grid = (common.cdiv(m, cfg.block_m), n_tiles, split)
    per_word, word_bytes = word_layout(w.bits)
    codes = w.codes
    code_spec = pl.BlockSpec((w.k_padded, cfg.block_n // per_word), lambda i, j, s: (0, j))
    if word_bytes > 1:  # 3-bit words span 3 bytes: [K, words, 3], a free reshape
        codes = codes.reshape(w.k, -1, word_bytes)
        code_spec = pl.BlockSpec(
            (w.k_padded, cfg.block_n // per_word, word_bytes), lambda i, j, s: (0, j, 0)
        )
    srows = w.scale.shape[0]
    in_specs = [
        pl.BlockSpec((cfg.block_m, w.k_padded), lambda i, j, s: (i, 0)),
        code_spec,
        pl.BlockSpec((srows, cfg.block_n), lambda i, j, s: (0, j)),
    ]
    # Scales and zero points of a ragged N are padded (a copy of [ceil(K/g), N] values, not of
    # the codes): the kernel reads each step's row of the tile whole, unmasked.
    args = [x2, codes, common.pad_axis(w.scale, 1, n_out)]
    if w.zero is not None:
        in_specs.append(pl.BlockSpec((srows, cfg.block_n), lambda i, j, s: (0, j)))
        args.append(common.pad_axis(w.zero, 1, n_out))
    # Split-K partial sums (decode) go to float32 planes of exactly M rows, one per column
    # residue mod `per_word` (even and odd columns for 4-bit codes) so that the masked stores
    # are contiguous; XLA adds the splits and interleaves the planes in one fusion. A single
    # split writes the tile in place (rows past M are zeros, sliced off).
    planes = split > 1
    n_planes = 1 if cfg.dequant_first else per_word
    if planes:
        width = cfg.block_n // n_planes
        out_spec = pl.BlockSpec((None, n_planes, cfg.block_m, width), lambda i, j, s: (s, 0, i, j))
        out_shape = (split, n_planes, m, n_out // n_planes)
    else:
        out_spec = pl.BlockSpec((None, cfg.block_m, cfg.block_n), lambda i, j, s: (s, i, j))
        out_shape = (split, common.round_up(m, cfg.block_m), n_out)
    out = pl.pallas_call(
        functools.partial(
            _kernel,
            m=m,
            k=w.k,
            n=w.n,
            planes=planes,
            bits=w.bits,
            signed=w.signed,
            levels=w.levels,
            qgroup=w.qgroup,
            kg=w.group,
            num_groups=w.num_groups,
            groups_per_split=per_split,
            fold_zero=cfg.fold_zero,
            tensor_cores=cfg.tensor_cores,
            dequant_first=cfg.dequant_first,
        ),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32 if planes else out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"{_code_name(w)}a16_g{w.qgroup}",
    )(*args)
    # Planes: add the splits and interleave the planes, [plane, M, N/planes] -> [M, N].
    y = jnp.moveaxis(out.sum(axis=0), 0, -1).reshape(m, n_out) if planes else out[0, :m]
    return y[:, : w.n].astype(out_dtype).reshape(*lead, w.n)


def _code_name(w: PackedWeight) -> str:
    if w.levels:
        return "nf4"
    return "fp8" if jnp.issubdtype(w.codes.dtype, jnp.floating) else f"w{w.bits}"


def dequantize(w: PackedWeight) -> jax.Array:
    """The float32 weight `[K, N]` in stored row order (before undoing `perm`)."""
    codes = w.codes
    if w.k_major:  # [N, K] two's complement (unsigned codes - 8), packed along K
        twos = _packing.unpack(codes, w.bits, w.k, signed=True).astype(jnp.int32)
        codes = (twos if w.signed else twos + 2 ** (w.bits - 1)).T
    elif w.bits < 8:  # jqtz's own unpacking: the reference does not share the kernel's
        codes = _packing.unpack(codes, w.bits, w.n, signed=w.signed).astype(jnp.int32)
    rows = jnp.arange(w.k) // w.qgroup
    vals = codes.astype(jnp.float32)
    if w.levels is not None:
        vals = jnp.asarray(w.levels, jnp.float32)[codes]
    if w.zero is not None:
        vals = vals - w.zero.astype(jnp.float32)[rows]
    return vals * w.scale.astype(jnp.float32)[rows]


def reference(x: jax.Array, w: PackedWeight) -> jax.Array:
    """Pure-jnp reference: float32 product of `x` with the dequantized weight."""
    xf = x.reshape(-1, w.k).astype(jnp.float32)
    if w.perm is not None:
        xf = jnp.take(xf, w.perm, axis=1)
    y = jnp.dot(xf, dequantize(w), precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*x.shape[:-1], w.n)


def can_use(x, w, *, backend: str | None = None, compute_capability=None) -> bool:
    """Whether `matmul(x, w)` should run on the GPU for these operands.

    Args:
      x: activations (array or ShapeDtypeStruct): bf16/f16, last axis K.
      w: a `PackedWeight` or a QArray (checked with `supports_qarray`).
      backend: default `jax.default_backend()`.
      compute_capability: (major, minor); default the first device's. Needs >= 8.0 (Ampere):
        bf16 tensor-core dots in Triton; >= 8.9 for fp8 codes (Triton's fp8 conversions).
    """
    if not isinstance(w, PackedWeight) and supports_qarray(w) is not None:
        return False
    codes = w.codes if isinstance(w, PackedWeight) else w.qvalue
    need = (8, 9) if jnp.issubdtype(codes.dtype, jnp.floating) else (8, 0)
    if common.gpu_capability(backend, compute_capability, need=need) is None:
        return False
    k = w.k if isinstance(w, PackedWeight) else w.shape[0]
    return np.dtype(x.dtype) in _ACT_DTYPES and x.ndim >= 1 and x.shape[-1] == k


def mosaic_config(w: PackedWeight, m: int) -> MosaicConfig | MosaicDecodeConfig | None:
    """The Mosaic GPU config `jqtz.nn.use_pallas_kernels(lowering="mosaic")` takes for `m` rows
    of `x` times `w`, or None (Triton): `MosaicConfig` above `SMALL_M` rows for codes it reads
    in place (no act-order, no copy per call: `mosaic_pads`); `MosaicDecodeConfig` up to
    `SMALL_M` rows for codes stored K-major that it covers."""
    if m > SMALL_M:
        ok = mosaic_unsupported(w) is None and not mosaic_pads(w)
        return MosaicConfig() if ok else None
    cfg = MosaicDecodeConfig()
    return cfg if mosaic_decode_unsupported(w, m, cfg) is None else None


def __getattr__(name):
    """The benchmark's names (`w4a16_bench.__all__`), imported on first use."""
    from pallas_kernels import w4a16_bench

    if name in w4a16_bench.__all__:
        return getattr(w4a16_bench, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from pallas_kernels.w4a16_bench import main

    raise SystemExit(main())

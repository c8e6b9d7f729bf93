"""W4A16 / W8A16 kernel: interpret mode vs the reference, CUDA lowering, can_use and dispatch."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqtz
from pallas_kernels import common, dispatch, w4a16

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _qweight(k, n, fmt="int4", group=128, symmetric=True, seed=0, **spec):
    w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32)
    gran = (
        dict(granularity="channel")
        if group is None
        else dict(granularity="group", group_size=group)
    )
    return jqtz.quantize(w, jqtz.QuantSpec(format=fmt, symmetric=symmetric, **gran, **spec))


# name: (M, K, N, format, group, symmetric, extra QuantSpec fields)
CASES = {
    "int4_g128_m1": (1, 256, 128, "int4", 128, True, {}),
    "int4_g64_m4_asym": (4, 256, 256, "int4", 64, False, {}),
    "int4_g32_m16": (16, 128, 128, "int4", 32, True, {}),
    "int4_single_group": (3, 64, 128, "int4", 64, True, {}),
    "int4_partial_group_k300": (2, 300, 128, "int4", 128, False, {}),
    "int4_n200_ragged": (5, 128, 200, "int4", 64, True, {}),
    "int4_odd_n129": (1, 64, 129, "int4", 32, False, {}),
    "int4_smollm2_k576_n192": (1, 576, 192, "int4", 128, False, {}),
    "int4_k_and_n_ragged_m20": (20, 200, 72, "int4", 64, True, {}),
    "int8_k_and_n_ragged": (3, 100, 50, "int8", 32, False, {}),
    "int4_channel": (2, 192, 128, "int4", None, True, {}),
    "int4_double_quant": (2, 256, 128, "int4", 64, True, {"double_quant": True}),
    "int4_large_m": (80, 128, 256, "int4", 64, False, {}),
    "int8_g32_asym": (9, 96, 128, "int8", 32, False, {}),
    "nf4_g64_double_quant": (3, 256, 128, "nf4", 64, True, {"double_quant": True}),
    "nf4_ragged_m20": (20, 200, 72, "nf4", 64, True, {}),
    "int8_channel_large_m": (65, 128, 128, "int8", None, True, {}),
    # 3-bit words (8 codes in 3 bytes) and 2-bit bytes (4 codes), off the tiles in K and N.
    "int3_g128_m1": (1, 256, 128, "int3", 128, True, {}),
    "uint3_smollm2_k576_n192_m20": (20, 576, 192, "int3", 128, False, {}),
    "int3_g32_odd_n129": (1, 64, 129, "int3", 32, True, {}),
    "uint3_channel_large_m": (70, 192, 256, "int3", None, False, {}),
    "int2_g64_ragged": (5, 300, 200, "int2", 64, True, {}),
    "uint2_g128_m16": (16, 256, 128, "int2", 128, False, {}),
    "uint2_odd_n129_k200": (3, 200, 129, "int2", 32, False, {}),
    # FP8 weight-only (W8A16: e4m3/e5m2 codes are exact in bf16), ragged and per channel.
    "fp8_e4m3_g128_ragged": (5, 300, 200, "fp8_e4m3", 128, True, {}),
    "fp8_e4m3_channel_m1": (1, 576, 192, "fp8_e4m3", None, True, {}),
    "fp8_e5m2_g64_large_m": (70, 256, 128, "fp8_e5m2", 64, True, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    m, k, n, fmt, group, sym, extra = CASES[name]
    qw = _qweight(k, n, fmt, group, sym, seed=len(name), **extra)
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    pw = w4a16.prepare(qw)
    y = w4a16.matmul(x, pw, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    # Exact integer-valued bf16 products with float32 accumulation: only summation order
    # differs from the float32 reference. NF4 levels are rounded once to bf16 (2^-9).
    ref = w4a16.reference(x, pw)
    assert _rel(y, ref) < (8e-3 if fmt == "nf4" else 1e-5)
    # The reference itself is the QArray's own dequantization.
    direct = x.astype(jnp.float32) @ qw.dequantize(jnp.float32)
    assert _rel(ref, direct) < 1e-6


@pytest.mark.parametrize("act", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", list(CASES))
def test_fold_zero_matches_reference(name, act):
    """`fold_zero`: codes enter the product as the 16-bit float `base + code` (bit operations
    only) and `(base + zero) * sum(x)` is subtracted per group: the same function. The base's
    share of the float32 sums cancels, costing about `2^-24 * base * |sum x| / |y|` relative
    error: base 128 for bf16, 1024 for f16 (whose 10-bit mantissa needs it; at most about one
    f16 rounding, 2^-11, for 2-bit codes). Formats it does not cover take the usual path."""
    m, k, n, fmt, group, sym, extra = CASES[name]
    qw = _qweight(k, n, fmt, group, sym, seed=len(name), **extra)
    x = jax.random.normal(jax.random.key(m + 1), (m, k), act)
    pw = w4a16.prepare(qw)
    cfg = dataclasses.replace(w4a16.default_config(m, n, pw.num_groups, bits=pw.bits),
                              fold_zero=True)  # fmt: skip
    y = w4a16.matmul(x, pw, config=cfg, interpret=True)
    bound = {"nf4": 8e-3}.get(fmt, 1e-5 if pw.bits == 8 else 3e-5 if act == jnp.bfloat16 else 1e-3)
    assert _rel(y, w4a16.reference(x, pw)) < bound


@pytest.mark.parametrize("act", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[0] <= w4a16.MAX_FMA_ROWS])
def test_cuda_core_path_matches_reference(name, act):
    """`tensor_cores=False` (decode on the CUDA cores): float32 products of each live row
    with the codes, the zero points subtracted after each step's sum, so every format
    (NF4's levels too, unrounded) matches the float32 reference to summation order."""
    m, k, n, fmt, group, sym, extra = CASES[name]
    qw = _qweight(k, n, fmt, group, sym, seed=len(name), **extra)
    x = jax.random.normal(jax.random.key(m + 3), (m, k), act)
    pw = w4a16.prepare(qw)
    for cfg in (w4a16.TuningConfig(block_n=128, split_k=3, tensor_cores=False),
                w4a16.TuningConfig(block_n=256, tensor_cores=False)):  # fmt: skip
        y = w4a16.matmul(x, pw, config=cfg, interpret=True)
        assert _rel(y, w4a16.reference(x, pw)) < 1e-5, cfg
    with pytest.raises(ValueError, match="at most 4 rows"):
        x5 = jnp.ones((w4a16.MAX_FMA_ROWS + 1, k), act)
        w4a16.matmul(x5, pw, config=w4a16.TuningConfig(tensor_cores=False), interpret=True)


@pytest.mark.parametrize("act", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", list(CASES))
def test_dequant_first_is_the_rounded_weight_times_x(name, act):
    """`dequant_first`: each weight is `(code - zero) * scale` in float32, rounded once to the
    activation dtype (what XLA's dequantize-then-dot multiplies), and the products accumulate
    in float32: against `x @ that rounded weight`, only the summation order differs; against
    the float32 reference, one rounding per weight (2^-9 bf16, 2^-12 f16, relative)."""
    m, k, n, fmt, group, sym, extra = CASES[name]
    qw = _qweight(k, n, fmt, group, sym, seed=len(name), **extra)
    x = jax.random.normal(jax.random.key(m + 5), (m, k), act)
    pw = w4a16.prepare(qw)
    rounded = w4a16.dequantize(pw).astype(act).astype(jnp.float32)
    ref = x.astype(jnp.float32)[:, pw.perm] if pw.perm is not None else x.astype(jnp.float32)
    ref = jnp.dot(ref, rounded, precision=jax.lax.Precision.HIGHEST)
    bm = 16 if m <= w4a16.SMALL_M else 64
    for split in (1, 3):
        cfg = w4a16.TuningConfig(block_m=bm, block_n=128, split_k=split, dequant_first=True)
        y = w4a16.matmul(x, pw, config=cfg, interpret=True)
        assert _rel(y, ref) < 1e-5, cfg
        assert _rel(y, w4a16.reference(x, pw)) < (8e-3 if act == jnp.bfloat16 else 1e-3)


def test_dequant_first_needs_the_tensor_cores():
    with pytest.raises(ValueError, match=r"dequant_first=True.*tensor_cores=False"):
        w4a16.TuningConfig(tensor_cores=False, dequant_first=True)


def test_bf16_output_and_batch_dims():
    qw = _qweight(256, 128, "int4", 64, False)
    x = jax.random.normal(jax.random.key(3), (2, 3, 256), jnp.bfloat16)
    pw = w4a16.prepare(qw)
    y = w4a16.matmul(x, pw, out_dtype=jnp.bfloat16, interpret=True)
    assert y.shape == (2, 3, 128) and y.dtype == jnp.bfloat16
    assert _rel(y, w4a16.reference(x, pw)) < 8e-3  # one bf16 rounding of the output


def test_matches_xla_dot_general():
    """Against jqtz's XLA path, which rounds the dequantized weight to bf16 first."""
    qw = _qweight(512, 256, "int4", 128, True, scale_dtype="bfloat16")
    x = jax.random.normal(jax.random.key(4), (4, 512), jnp.bfloat16)
    y = w4a16.matmul(x, w4a16.prepare(qw), interpret=True)
    xla = jqtz.nn.dot_general(x, qw, (((1,), (0,)), ((), ())))
    assert _rel(y, xla) < 1e-2


def test_split_k_and_f16_activations():
    qw = _qweight(512, 128, "int4", 32, False)
    x = jax.random.normal(jax.random.key(5), (1, 512), jnp.float16)
    pw = w4a16.prepare(qw)
    ref = w4a16.reference(x, pw)
    for split in (1, 3, 16):
        cfg = w4a16.TuningConfig(block_m=16, block_n=64, split_k=split)
        y = w4a16.matmul(x, pw, config=cfg, interpret=True)
        assert _rel(y, ref) < 1e-5, split


# name: (M, K, N, group, symmetric, scale dtype, activation dtype, MosaicConfig)
MOSAIC_CASES = {
    "g128_sym_m70": (70, 256, 256, 128, True, "float32", jnp.bfloat16,
                     w4a16.MosaicConfig(tile_n=128, max_concurrent_steps=2)),
    "g64_asym_ragged_k320_n136": (64, 320, 136, 64, False, "bfloat16", jnp.bfloat16,
                                  w4a16.MosaicConfig(tile_n=128, max_concurrent_steps=3)),
    "channel_m130_f16": (130, 256, 128, None, True, "float16", jnp.float16,
                         w4a16.MosaicConfig(grid_tile_width=2)),
    "g128_partial_group_k300_m1": (1, 300, 128, 128, False, "float32", jnp.bfloat16,
                                   w4a16.MosaicConfig()),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MOSAIC_CASES))
def test_mosaic_interpret_matches_reference(name):
    """The Mosaic GPU path in the Mosaic GPU interpreter: TMA pipeline, double-buffered
    dequantized tiles, wgmma from shared memory."""
    m, k, n, group, sym, scale_dtype, act, cfg = MOSAIC_CASES[name]
    pw = w4a16.prepare(_qweight(k, n, "int4", group, sym, seed=m, scale_dtype=scale_dtype))
    x = jax.random.normal(jax.random.key(m), (m, k), act)
    y = w4a16.matmul(x, pw, config=cfg, out_dtype=jnp.float32, interpret=True)
    assert y.shape == (m, n)
    # Each dequantized weight is rounded once to 16 bits before the product (as XLA's path
    # does): about 2^-9 relative per element for bf16, 2^-12 for f16.
    assert _rel(y, w4a16.reference(x, pw)) < (8e-3 if act == jnp.bfloat16 else 1e-3)


def test_mosaic_persistent_blocks_cover_every_tile(monkeypatch):
    monkeypatch.setattr(common, "num_sms", lambda: 3)
    pw = w4a16.prepare(_qweight(256, 256, "int4", 64, False))
    x = jax.random.normal(jax.random.key(1), (128, 256), jnp.bfloat16)
    cfg = w4a16.MosaicConfig(max_concurrent_steps=2)  # 2 x 2 tiles on 3 blocks
    y = w4a16.matmul(x, pw, config=cfg, out_dtype=jnp.float32, interpret=True)
    assert _rel(y, w4a16.reference(x, pw)) < 8e-3


def test_mosaic_config_on_a_gpu_that_is_not_a_hopper_is_refused(monkeypatch):
    monkeypatch.setattr(common, "gpu_compute_capability", lambda: (8, 9))
    pw = w4a16.prepare(_qweight(128, 128))
    with pytest.raises(ValueError, match="Hopper"):
        w4a16.matmul(jnp.ones((64, 128), jnp.bfloat16), pw, config=w4a16.MosaicConfig())


def test_mosaic_rejects_weights_it_does_not_cover():
    x = jnp.ones((64, 128), jnp.bfloat16)
    cfg = w4a16.MosaicConfig()
    for qw in (_qweight(128, 128, "int8", 64), _qweight(128, 128, "int4", 32),
               _qweight(128, 128, "nf4", 64)):  # fmt: skip
        with pytest.raises(ValueError, match="TuningConfig"):
            w4a16.matmul(x, w4a16.prepare(qw), config=cfg, interpret=True)
    for bad in (dict(tile_m=32), dict(tile_n=264), dict(tile_m=128, tile_n=256),
                dict(max_concurrent_steps=1), dict(tile_n=64), dict(tile_m=128)):  # fmt: skip
        with pytest.raises(ValueError, match="MosaicConfig"):
            w4a16.MosaicConfig(**bad)


def test_act_order_perm():
    k, n = 256, 128
    qw = _qweight(k, n, "int4", 64, True)
    perm = jax.random.permutation(jax.random.key(6), k).astype(jnp.int32)
    qp = jqtz.QArray(
        qw.qvalue,
        qw.scale,
        qw.zero_point,
        qw.format,
        qw.shape,
        qw.block_shape,
        qw.dtype,
        perm=perm,
    ).validate()
    x = jax.random.normal(jax.random.key(7), (3, k), jnp.bfloat16)
    y = w4a16.matmul(x, w4a16.prepare(qp), interpret=True)
    assert _rel(y, x.astype(jnp.float32) @ qp.dequantize(jnp.float32)) < 1e-5


@pytest.mark.parametrize("k, n", [(256, 256), (576, 192), (300, 129)])
def test_prepare_never_copies_the_codes(k, n):
    qw = _qweight(k, n, "int4", 128, False, scale_dtype="bfloat16")
    pw = w4a16.prepare(qw)
    assert pw.codes is qw.qvalue and pw.scale is qw.scale and pw.zero is qw.zero_point


@pytest.mark.parametrize("fmt, bits", [("int3", 3), ("int2", 2)])
def test_low_bit_split_k_reads_every_column_residue(fmt, bits):
    """Split-K writes one float32 plane per column residue mod the codes per word (8 for
    3-bit, 4 for 2-bit), which XLA adds and interleaves; every split count gives the same."""
    qw = _qweight(512, 256, fmt, 64, False)
    x = jax.random.normal(jax.random.key(6), (2, 512), jnp.bfloat16)
    pw = w4a16.prepare(qw)
    assert pw.codes is qw.qvalue and pw.bits == bits
    ref = w4a16.reference(x, pw)
    for split in (1, 3):
        cfg = w4a16.TuningConfig(block_m=16, block_n=w4a16.min_block_n(bits), split_k=split)
        assert _rel(w4a16.matmul(x, pw, config=cfg, interpret=True), ref) < 1e-5, split
    with pytest.raises(ValueError, match="too narrow"):
        w4a16.matmul(x, pw, config=w4a16.TuningConfig(block_n=16), interpret=True)


def test_unsupported_formats_raise():
    act = jqtz.QuantSpec(format="int8", granularity="channel", axis=-1)
    qw = _qweight(128, 128, "int8", None, True, activation=act)  # W8A8: the w8a8 kernel's
    assert "activations" in w4a16.supports_qarray(qw)
    with pytest.raises(NotImplementedError, match="activations"):
        w4a16.prepare(qw)
    qw = _qweight(144, 128, "int4", 48, True)  # group 48: not a multiple of 32
    assert "48" in w4a16.supports_qarray(qw)


def test_bad_inputs():
    pw = w4a16.prepare(_qweight(128, 128))
    with pytest.raises(ValueError, match="input features"):
        w4a16.matmul(jnp.ones((1, 64), jnp.bfloat16), pw, interpret=True)
    with pytest.raises(TypeError, match="bfloat16"):
        w4a16.matmul(jnp.ones((1, 128), jnp.float32), pw, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        w4a16.TuningConfig(block_n=96)


# -- CUDA lowering (no GPU needed) -------------------------------------------------------------

LOWER_CASES = {
    "int4_g128_m1_decode": (1, 4096, 1024, "int4", 128, True),
    "int4_g32_asym_m16": (16, 256, 256, "int4", 32, False),
    "int4_ragged_m100": (100, 300, 200, "int4", 64, False),
    "int8_g128_m256": (256, 512, 256, "int8", 128, True),
    "uint8_channel_m8": (8, 256, 128, "int8", None, False),
    "nf4_g64_m1": (1, 2048, 512, "nf4", 64, True),
    "int3_g128_m1": (1, 4096, 1024, "int3", 128, True),
    "uint3_ragged_m100": (100, 300, 200, "int3", 64, False),
    "uint2_g64_m16": (16, 576, 192, "int2", 64, False),
    "fp8_e4m3_g128_m1": (1, 576, 192, "fp8_e4m3", 128, True),
    "fp8_e5m2_channel_m64": (64, 256, 256, "fp8_e5m2", None, True),
}


@pytest.mark.parametrize("name", list(LOWER_CASES))
def test_lowers_for_cuda(name):
    m, k, n, fmt, group, sym = LOWER_CASES[name]
    pw = w4a16.prepare(_qweight(k, n, fmt, group, sym, scale_dtype="bfloat16"))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    text = common.lower_for_cuda(functools.partial(w4a16.matmul, out_dtype=jnp.bfloat16), x, pw)
    assert common.TRITON_CUSTOM_CALL in text
    assert "mosaic_gpu" not in text
    if m <= w4a16.MAX_FMA_ROWS:  # and the CUDA-core decode path
        cfg = w4a16.TuningConfig(block_n=128, split_k=2, tensor_cores=False)
        fn = functools.partial(w4a16.matmul, config=cfg, out_dtype=jnp.bfloat16)
        assert common.lower_for_cuda(fn, x, pw).count(common.TRITON_CUSTOM_CALL) == 1
    # `dequant_first` (one product over the tile's columns in order, accumulated in place).
    cfg = w4a16.TuningConfig(block_m=16 if m <= 16 else 64, block_n=128, split_k=2,
                             dequant_first=True)  # fmt: skip
    fn = functools.partial(w4a16.matmul, config=cfg, out_dtype=jnp.bfloat16)
    assert common.lower_for_cuda(fn, x, pw).count(common.TRITON_CUSTOM_CALL) == 1


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "zero_points"])
def test_decode_touches_only_the_real_rows(sym):
    """One token (M = 1) on a 16-row tile: `x` is not padded in XLA (masked loads), and the
    split-K partial sums have one row, not 16 (masked stores); XLA then only adds them."""
    pw = w4a16.prepare(_qweight(2048, 1024, "int4", 128, sym, scale_dtype="bfloat16"))
    x = jax.ShapeDtypeStruct((1, 2048), jnp.bfloat16)
    cfg = w4a16.TuningConfig(block_m=16, block_n=128, split_k=4)
    text = common.lower_for_cuda(functools.partial(w4a16.matmul, config=cfg), x, pw)
    assert "stablehlo.pad" not in text
    assert "tensor<4x2x1x512xf32>" in text  # (splits, even/odd planes, M, N / 2)


def test_larger_m_splits_k_while_tiles_are_few():
    """Above 16 rows K is split too while there are fewer than two output tiles per SM (a
    64-row product over 8192 columns has 64 tiles for 132 SMs); a prefill's rows fill the GPU
    alone. The split-K planes hold all 64 rows and add up to the reference."""
    cfg = w4a16.default_config(64, 8192, 64)
    assert (cfg.block_m, cfg.block_n, cfg.split_k, cfg.fold_zero) == (64, 128, 5, True)
    assert w4a16.default_config(4096, 8192, 64).split_k == 1
    pw = w4a16.prepare(_qweight(512, 256, "int4", 64, False))
    x = jax.random.normal(jax.random.key(7), (64, 512), jnp.bfloat16)
    cfg = w4a16.default_config(64, 256, pw.num_groups)
    assert cfg.split_k == pw.num_groups  # 2 tiles: one split per group
    y = w4a16.matmul(x, pw, interpret=True)
    assert _rel(y, w4a16.reference(x, pw)) < 3e-5


def test_ragged_weights_are_read_in_place():
    """SmolLM2-135M's k/v projection (K = 576 = 4.5 groups of 128, N = 192): the codes are read
    where they lie, with masked loads past K and N; only the small scale and zero-point arrays
    are padded to the 128-column tile."""
    pw = w4a16.prepare(_qweight(576, 192, "int4", 128, False, scale_dtype="bfloat16"))
    x = jax.ShapeDtypeStruct((1, 576), jnp.bfloat16)
    cfg = w4a16.TuningConfig(block_m=16, block_n=128, split_k=2)
    text = common.lower_for_cuda(functools.partial(w4a16.matmul, config=cfg), x, pw)
    pads = [line for line in text.splitlines() if "stablehlo.pad" in line]
    assert len(pads) == 2 and all("(tensor<5x192x" in line for line in pads), pads
    # The default tiles are 64 columns wide where that covers N exactly: nothing is padded.
    assert w4a16.default_config(1, 192, 5).block_n == 64
    text = common.lower_for_cuda(w4a16.matmul, x, pw)
    assert "stablehlo.pad" not in text
    # 3-bit codes ([576, 72] bytes: 24 words of 3 bytes) are read in place too, through
    # [576, 24, 3] (a reshape, no copy); 128-column tiles at least, so the scales are padded.
    pw3 = w4a16.prepare(_qweight(576, 192, "int3", 128, False, scale_dtype="bfloat16"))
    assert w4a16.default_config(1, 192, 5, bits=3).block_n == 128
    text = common.lower_for_cuda(w4a16.matmul, x, pw3)
    pads = [line for line in text.splitlines() if "stablehlo.pad" in line]
    assert len(pads) == 2 and all("(tensor<5x192x" in line for line in pads), pads
    assert "tensor<576x24x3xui8>" in text


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "zero_points"])
def test_mosaic_lowers_for_cuda(sym):
    pw = w4a16.prepare(_qweight(4096, 1024, "int4", 128, sym, scale_dtype="bfloat16"))
    x = jax.ShapeDtypeStruct((256, 4096), jnp.bfloat16)
    f = functools.partial(w4a16.matmul, config=w4a16.MosaicConfig(), out_dtype=jnp.bfloat16)
    text = common.lower_for_cuda(f, x, pw)
    assert common.MOSAIC_GPU_CUSTOM_CALL in text and common.TRITON_CUSTOM_CALL not in text


# -- can_use and dispatch ----------------------------------------------------------------------


def test_can_use():
    qw = _qweight(256, 128, "int4", 128, True)
    x = jax.ShapeDtypeStruct((1, 256), jnp.bfloat16)
    h100 = dict(backend="gpu", compute_capability=(9, 0))
    assert w4a16.can_use(x, qw, **h100)
    assert w4a16.can_use(x, w4a16.prepare(qw), **h100)
    assert not w4a16.can_use(x, qw)  # the CPU backend of this test run
    assert not w4a16.can_use(x, qw, backend="cpu")
    assert not w4a16.can_use(x, qw, backend="gpu", compute_capability=(7, 5))
    assert not w4a16.can_use(jax.ShapeDtypeStruct((1, 256), jnp.float32), qw, **h100)
    assert not w4a16.can_use(jax.ShapeDtypeStruct((1, 128), jnp.bfloat16), qw, **h100)
    assert w4a16.can_use(x, _qweight(256, 128, "nf4", 64), **h100)
    assert w4a16.can_use(x, _qweight(256, 128, "int3", 64), **h100)
    fp8 = _qweight(256, 128, "fp8_e4m3", 64)  # Triton converts fp8 codes on sm_89+ only
    assert w4a16.can_use(x, fp8, **h100)
    assert not w4a16.can_use(x, fp8, backend="gpu", compute_capability=(8, 0))
    assert w4a16.can_use(
        x, _qweight(256, 128, "int4", 64), backend="gpu", compute_capability=(8, 0)
    )


def test_dispatch_choice_and_fallback():
    aligned = _qweight(256, 128, "int4", 128, True)
    ragged = _qweight(576, 192, "int4", 128, False)  # SmolLM2-135M's k/v projections
    x = jnp.ones((2, 256), jnp.bfloat16)
    xr = jax.ShapeDtypeStruct((2, 576), jnp.bfloat16)
    h100 = dict(backend="gpu", compute_capability=(9, 0))
    assert dispatch.kernel_for(x, aligned, **h100) == "w4a16"
    assert dispatch.kernel_for(xr, ragged, **h100) == "w4a16"  # read in place, masked tails
    # Mosaic GPU would pad a ragged weight on every call: those stay on Triton.
    prefill = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16)
    assert dispatch.kernel_for(prefill, aligned, lowering="mosaic", **h100) == "w4a16-mosaic"
    prefill_r = jax.ShapeDtypeStruct((64, 576), jnp.bfloat16)
    assert dispatch.kernel_for(prefill_r, ragged, lowering="mosaic", **h100) == "w4a16"
    # NF4 (jqtz's nf4 method: groups of 64, double-quantized scales): Triton only.
    nf4 = _qweight(256, 128, "nf4", 64, True, double_quant=True)
    assert dispatch.kernel_for(x, nf4, **h100) == "w4a16"
    assert dispatch.kernel_for(prefill, nf4, lowering="mosaic", **h100) == "w4a16"
    # 2- and 3-bit codes (GPTQ's low-bit grids) and FP8 weight-only codes: Triton only.
    for fmt in ("int3", "int2", "fp8_e4m3"):
        low = _qweight(256, 128, fmt, 128, fmt.startswith("fp8"))
        assert dispatch.kernel_for(x, low, **h100) == "w4a16"
        assert dispatch.kernel_for(prefill, low, lowering="mosaic", **h100) == "w4a16"
    assert dispatch.kernel_for(x, aligned, backend="cpu") is None
    # On this CPU machine the XLA path is always kept.
    assert dispatch.maybe_matmul(x, aligned) is None
    assert dispatch.maybe_matmul(jnp.ones((2, 576), jnp.bfloat16), ragged) is None


def test_bench_entry_point_without_gpu(capsys):
    assert w4a16.main(["--bench"]) == 0
    assert "no GPU" in capsys.readouterr().out


def test_mosaic_decode_check_entry_point(capsys):
    """`--mosaic-decode` (a GPU session's first, short call) checks the four decode products
    against the reference at M = 1, 4, 16 (here interpreted on small shapes, M = 1 and 16);
    without a GPU
    the command says so and exits 0."""
    lines = []
    rows = w4a16.check_mosaic_decode(lines.append, n=256, k=256, smoke=True)
    assert [(r["m"], r["case"]) for r in rows[:4]] == [
        (1, "[K, N] default"), (1, "K-major Triton"), (1, "K-major Mosaic tile 64"),
        (1, "K-major Mosaic tile 128"),
    ]  # fmt: skip
    assert len(rows) == len(lines) == 8 and all(r["rel_err"] < 1e-2 for r in rows)
    assert w4a16.main(["--mosaic-decode"]) == 0
    assert "no GPU" in capsys.readouterr().out


def test_profile_entry_point(capsys):
    """`--profile M` runs the default product for a profiler (here in the interpreter on small
    shapes); without a GPU the command says so and exits 0."""
    cfg = w4a16.profile_once(1, n=256, k=256, interpret=True)
    assert cfg == w4a16.default_config(1, 256, 2)
    assert w4a16.main(["--profile", "1"]) == 0
    assert "no GPU" in capsys.readouterr().out


# -- 4-bit codes stored K-major (QArray.transposed, w4a16_kmajor) -----------------------------

# name: (M, K, N, group, symmetric, config or None)
K_MAJOR_CASES = {
    "m1_g128_zero_points": (1, 256, 128, 128, False, None),
    "m4_g64_sym_split3": (4, 256, 256, 64, True, dict(block_n=64, split_k=3)),
    "m16_g32_zero_points": (16, 128, 128, 32, False, None),
    "m1_odd_k201_n100": (1, 201, 100, 64, False, None),
    "m5_k200_n48_split2": (5, 200, 48, 32, True, dict(block_n=32, split_k=2)),
    "m20_two_row_tiles": (20, 200, 72, 64, False, dict(block_m=16, block_n=64)),
    "m64_wide_tiles": (64, 256, 256, 128, False, None),
    "m70_channel": (70, 192, 128, None, True, dict(block_m=32, block_n=32, split_k=2)),
    "m3_smollm2_k576_n192": (3, 576, 192, 128, False, None),
}


@pytest.mark.parametrize("act", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", list(K_MAJOR_CASES))
def test_k_major_interpret_matches_reference(name, act):
    """The same weight stored K-major gives the product of its `[K, N]` layout: decode tiles
    (the weight as the first operand), larger tiles, split K, K and N off the tiles, an odd
    K (a padded last byte), signed and zero-point codes, bf16 and f16 (other magic). The
    bounds are `fold_zero`'s (test_fold_zero_matches_reference): the base's share of the sums
    cancels."""
    m, k, n, group, sym, cfg = K_MAJOR_CASES[name]
    qw = _qweight(k, n, "int4", group, sym, seed=m)
    pw = w4a16.prepare(qw.with_transposed_codes())
    assert pw.k_major and pw.codes.shape == (n, (k + 1) // 2)
    x = jax.random.normal(jax.random.key(k), (m, k), act)
    y = w4a16.matmul(x, pw, config=cfg and w4a16.TuningConfig(**cfg, fold_zero=True),
                     interpret=True)  # fmt: skip
    ref = w4a16.reference(x, w4a16.prepare(qw))  # the reference on the [K, N] layout
    np.testing.assert_array_equal(w4a16.dequantize(pw), w4a16.dequantize(w4a16.prepare(qw)))
    assert y.shape == (m, n) and _rel(y, ref) < (3e-5 if act == jnp.bfloat16 else 1e-3)


def test_k_major_act_order_and_refusals():
    """Act-order permutations gather `x` as on `[K, N]` codes; the CUDA-core path and the
    Mosaic GPU lowering read codes packed along N and say so."""
    k, n = 256, 128
    qw = _qweight(k, n, "int4", 64, False)
    perm = jax.random.permutation(jax.random.key(6), k).astype(jnp.int32)
    qp = dataclasses.replace(qw, perm=perm).validate().with_transposed_codes()
    x = jax.random.normal(jax.random.key(7), (3, k), jnp.bfloat16)
    y = w4a16.matmul(x, w4a16.prepare(qp), interpret=True)
    assert _rel(y, x.astype(jnp.float32) @ qp.dequantize(jnp.float32)) < 1e-5
    pw = w4a16.prepare(qw.with_transposed_codes())
    for cfg in (w4a16.TuningConfig(tensor_cores=False), w4a16.TuningConfig(dequant_first=True)):
        with pytest.raises(ValueError, match="K-major"):
            w4a16.matmul(x, pw, config=cfg, interpret=True)
    assert "K-major" in w4a16.mosaic_unsupported(pw)


@pytest.mark.parametrize("m", [1, 16, 100])
def test_k_major_lowers_for_cuda(m):
    qw = _qweight(300, 200, "int4", 64, False, scale_dtype="bfloat16").with_transposed_codes()
    x = jax.ShapeDtypeStruct((m, 300), jnp.bfloat16)
    fn = functools.partial(w4a16.matmul, out_dtype=jnp.bfloat16)
    text = common.lower_for_cuda(fn, x, w4a16.prepare(qw))
    assert text.count(common.TRITON_CUSTOM_CALL) == 1


# name: (M, K, N, group, symmetric, activation dtype, MosaicDecodeConfig fields)
K_MAJOR_MOSAIC_CASES = {
    "m1_g128_zero_points": (1, 512, 256, 128, False, jnp.bfloat16, {}),
    "m3_g128_sym_tile128": (3, 512, 256, 128, True, jnp.bfloat16, dict(tile_n=128)),
    "m9_g64_f16_sixteen_rows": (9, 256, 128, 64, False, jnp.float16, {}),
    "m16_g256_split3_takes_4": (16, 1024, 128, 256, False, jnp.bfloat16, dict(split_k=3)),
    "m1_one_step": (1, 128, 64, 128, False, jnp.bfloat16, dict(max_concurrent_steps=2)),
}


@pytest.mark.parametrize("name", list(K_MAJOR_MOSAIC_CASES))
def test_k_major_mosaic_decode_interpret_matches_reference(name):
    """`MosaicDecodeConfig` in the Mosaic GPU interpreter: the TMA pipeline over int4 tiles,
    16-bit dequantization with the zero point and the scale, `wgmma` with `x` transposed in
    shared memory (8 or 16 rows), split K (3 blocks asked for over 8 steps: 4 of 2 steps)."""
    m, k, n, group, sym, act, fields = K_MAJOR_MOSAIC_CASES[name]
    qw = _qweight(k, n, "int4", group, sym, seed=m)
    pw = w4a16.prepare(qw.with_transposed_codes())
    x = jax.random.normal(jax.random.key(k), (m, k), act)
    cfg = w4a16.MosaicDecodeConfig(**fields)
    y = w4a16.matmul(x, pw, config=cfg, out_dtype=jnp.float32, interpret=True)
    assert y.shape == (m, n)
    # Each weight is rounded to 16 bits once (its scale to 16 bits first): about 2^-9
    # relative per element for bf16, 2^-12 for f16.
    ref = w4a16.reference(x, w4a16.prepare(qw))
    assert _rel(y, ref) < (8e-3 if act == jnp.bfloat16 else 1e-3)


@pytest.mark.parametrize("m", [1, 16])
def test_k_major_mosaic_decode_lowers_for_cuda(m):
    """Compiled, the dequantized tile is `wgmma`'s operand from registers (the interpreter
    stages it in shared memory); both lower for CUDA, with one Mosaic GPU call."""
    qw = _qweight(1024, 512, "int4", 128, False, scale_dtype="bfloat16").with_transposed_codes()
    x = jax.ShapeDtypeStruct((m, 1024), jnp.bfloat16)
    for tile_n in (64, 128):
        cfg = w4a16.MosaicDecodeConfig(tile_n=tile_n)
        fn = functools.partial(w4a16.matmul, config=cfg, out_dtype=jnp.bfloat16)
        text = common.lower_for_cuda(fn, x, w4a16.prepare(qw))
        assert text.count(common.MOSAIC_GPU_CUSTOM_CALL) == 1
        assert common.TRITON_CUSTOM_CALL not in text


def test_k_major_mosaic_decode_refusals():
    """Weights or rows it does not cover get a ValueError naming what is needed and the
    Triton config to use; bad configs are refused when made."""
    qw = _qweight(256, 128, "int4", 128, False)
    pw = w4a16.prepare(qw.with_transposed_codes())
    cfg = w4a16.MosaicDecodeConfig()
    x = jnp.ones((2, 256), jnp.bfloat16)
    cases = [
        (x, w4a16.prepare(qw), "stored K-major"),  # codes packed along N
        (x[:, :200], w4a16.prepare(_qweight(200, 128, "int4", 64).with_transposed_codes()),
         "K a multiple of 64"),
        (x[:, :128], w4a16.prepare(_qweight(128, 128, "int4", 32).with_transposed_codes()),
         "groups of a multiple of 64"),
        (jnp.ones((17, 256), jnp.bfloat16), pw, "at most 16 rows"),
    ]  # fmt: skip
    for xx, ww, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            w4a16.matmul(xx, ww, config=cfg, interpret=True)
        assert "TuningConfig" in str(err.value)
    pw192 = w4a16.prepare(_qweight(256, 192, "int4", 128).with_transposed_codes())
    w4a16.matmul(x, pw192, config=cfg, interpret=True)  # 64-column tiles cover N = 192
    with pytest.raises(ValueError, match="N of tile_n=128"):
        w4a16.matmul(x, pw192, config=w4a16.MosaicDecodeConfig(tile_n=128), interpret=True)
    for bad in (dict(tile_n=96), dict(max_concurrent_steps=1), dict(split_k=0)):
        with pytest.raises(ValueError, match="tile_n must be 64 or 128"):
            w4a16.MosaicDecodeConfig(**bad)


def test_k_major_weight_takes_the_kernel_and_xla_agrees():
    """A served K-major weight goes to the W4A16 kernel on a GPU (and to XLA elsewhere, where
    `dequantize` reads the same codes)."""
    qw = _qweight(256, 128, "int4", 128, False).with_transposed_codes()
    x = jax.random.normal(jax.random.key(2), (2, 256), jnp.bfloat16)
    gpu = dict(backend="gpu", compute_capability=(9, 0))
    assert dispatch.kernel_for(x, qw, **gpu) == "w4a16"
    assert dispatch.kernel_for(x[:1].repeat(64, 0), qw, lowering="mosaic", **gpu) == "w4a16"
    # Under lowering="mosaic", decode products on K-major codes take MosaicDecodeConfig.
    assert dispatch.kernel_for(x, qw, lowering="mosaic", **gpu) == "w4a16-mosaic"
    assert w4a16.mosaic_config(w4a16.prepare(qw), 2) == w4a16.MosaicDecodeConfig()
    assert w4a16.mosaic_config(w4a16.prepare(qw), 64) is None  # MosaicConfig reads [K, N]
    mosaic = dispatch.maybe_matmul(x, qw, lowering="mosaic", interpret=True, **gpu)
    assert _rel(mosaic, x.astype(jnp.float32) @ qw.dequantize(jnp.float32)) < 1e-2
    y = dispatch.maybe_matmul(x, qw, interpret=True, **gpu)
    xla = x.astype(jnp.float32) @ qw.dequantize(jnp.float32)
    assert _rel(y, xla) < 1e-2

"""W8A8 INT8 / FP8 kernel: interpret mode vs the reference, CUDA lowering, can_use, dispatch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqtz
from jqtz.ptq import SmoothQuantOptions, default_spec
from jqtz.ptq.fp8 import fp8_spec
from pallas_kernels import common, dispatch, w8a8

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FP8 = jnp.float8_e4m3fn


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# name: (code dtype, M, K, N, scale block along K (None: per token / per channel))
CASES = {
    "int8_token_channel_m1": (jnp.int8, 1, 256, 128, None),
    "int8_ragged_m33_k200_n96": (jnp.int8, 33, 200, 96, None),
    "int8_block128": (jnp.int8, 20, 256, 256, 128),
    "fp8_token_channel_m1": (FP8, 1, 256, 128, None),
    "fp8_ragged_m5_k200_n72": (FP8, 5, 200, 72, None),
    "fp8_block128": (FP8, 20, 256, 256, 128),
    "fp8_ragged_m70_k200_n72": (FP8, 70, 200, 72, None),  # 128-row tiles: fp8 `wgmma`
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    dtype, m, k, n, block = CASES[name]
    x = jax.random.normal(jax.random.key(m), (m, k))
    w = jax.random.normal(jax.random.key(k), (k, n))
    xq, sx = w8a8.quantize_rows(x, dtype, block)
    wq, sw = w8a8.quantize_cols(w, dtype, block)
    y = w8a8.matmul(xq, sx, wq, sw, out_dtype=jnp.float32, interpret=True)
    assert y.shape == (m, n)
    # Exact products of the codes (int32, or float32 for e4m3 products of 4-bit mantissas);
    # only the order of the float32 scale/accumulate steps differs from the reference.
    assert _rel(y, w8a8.reference(xq, sx, wq, sw, out_dtype=jnp.float32)) < 1e-5
    # Against the unquantized product: int8 ~1%, e4m3 (3 mantissa bits) ~4%.
    assert _rel(y, x @ w) < (0.02 if dtype == jnp.int8 else 0.06)


# name: (code dtype, M, K, N, config): several tiles, several pipeline steps, ragged edges
MOSAIC_CASES = {
    "int8_m1": (jnp.int8, 1, 256, 128, w8a8.MosaicConfig(tile_n=64)),
    "int8_ragged_m130_k200_n72": (
        jnp.int8, 130, 200, 72, w8a8.MosaicConfig(tile_m=64, tile_n=32, tile_k=64,
                                                  max_concurrent_steps=3)
    ),
    "fp8_m1": (FP8, 1, 256, 128, w8a8.MosaicConfig(tile_n=64)),
    "fp8_ragged_m70_k320_n200": (
        FP8, 70, 320, 200, w8a8.MosaicConfig(tile_m=64, tile_n=64, tile_k=64,
                                             max_concurrent_steps=2, grid_tile_width=2)
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MOSAIC_CASES))
def test_mosaic_interpret_matches_reference(name):
    """The Mosaic GPU path (Mosaic GPU interpreter: TMA, barriers, wgmma from shared memory)."""
    dtype, m, k, n, cfg = MOSAIC_CASES[name]
    x = jax.random.normal(jax.random.key(m), (m, k))
    w = jax.random.normal(jax.random.key(k), (k, n))
    xq, sx = w8a8.quantize_rows(x, dtype)
    wq, sw = w8a8.quantize_cols(w, dtype)
    y = w8a8.matmul(
        xq, sx, w8a8.to_k_major(wq), sw, config=cfg, w_k_major=True, out_dtype=jnp.float32,
        interpret=True,
    )  # fmt: skip
    assert y.shape == (m, n)
    assert _rel(y, w8a8.reference(xq, sx, wq, sw, out_dtype=jnp.float32)) < 1e-5
    assert _rel(y, x @ w) < (0.02 if dtype == jnp.int8 else 0.06)


def test_mosaic_persistent_blocks_cover_every_tile(monkeypatch):
    """Fewer blocks than tiles: each block walks several tiles in snake order (as on a GPU
    whose SMs are fewer than the tiles); every output tile is written once, none is missed."""
    monkeypatch.setattr(common, "num_sms", lambda: 2)
    x = jax.random.normal(jax.random.key(0), (192, 128))
    w = jax.random.normal(jax.random.key(1), (128, 96))
    xq, sx = w8a8.quantize_rows(x, jnp.int8)
    wq, sw = w8a8.quantize_cols(w, jnp.int8)
    cfg = w8a8.MosaicConfig(tile_m=64, tile_n=32, tile_k=64, max_concurrent_steps=2)
    y = w8a8.matmul(
        xq, sx, w8a8.to_k_major(wq), sw, config=cfg, w_k_major=True, out_dtype=jnp.float32,
        interpret=True,
    )  # fmt: skip
    assert _rel(y, w8a8.reference(xq, sx, wq, sw, out_dtype=jnp.float32)) < 1e-5


def test_mosaic_config_on_a_gpu_that_is_not_a_hopper_is_refused(monkeypatch):
    monkeypatch.setattr(common, "gpu_compute_capability", lambda: (8, 0))
    xq, wq = jnp.zeros((64, 128), jnp.int8), jnp.zeros((64, 128), jnp.int8)
    with pytest.raises(ValueError, match="Hopper"):
        w8a8.matmul(xq, jnp.ones((64, 1)), wq, jnp.ones((1, 64)), config=w8a8.MosaicConfig(),
                    w_k_major=True)  # fmt: skip


@pytest.mark.parametrize(
    "dtype, block, n", [(jnp.int8, None, 200), (FP8, 128, 256)], ids=["int8_n200", "fp8_b128"]
)
def test_triton_reads_a_k_major_weight(dtype, block, n):
    """One K-major weight serves both lowerings: Triton reads `[N, K]` blocks in place."""
    x = jax.random.normal(jax.random.key(0), (20, 256))
    w = jax.random.normal(jax.random.key(1), (256, n))
    xq, sx = w8a8.quantize_rows(x, dtype, block)
    wq, sw = w8a8.quantize_cols(w, dtype, block)
    y = w8a8.matmul(
        xq, sx, w8a8.to_k_major(wq), sw, w_k_major=True, out_dtype=jnp.float32, interpret=True
    )
    assert _rel(y, w8a8.reference(xq, sx, wq, sw, out_dtype=jnp.float32)) < 1e-5
    args = (xq, sx, w8a8.to_k_major(wq), sw)
    text = common.lower_for_cuda(lambda *a: w8a8.matmul(*a, w_k_major=True), *args)
    assert common.TRITON_CUSTOM_CALL in text and "transpose" not in text.split("custom_call")[0]


def test_per_tensor_scales():
    x = jax.random.normal(jax.random.key(0), (16, 128))
    w = jax.random.normal(jax.random.key(1), (128, 64))
    sx, sw = jnp.max(jnp.abs(x)) / 448, jnp.max(jnp.abs(w)) / 448
    xq, wq = (x / sx).astype(FP8), (w / sw).astype(FP8)
    y = w8a8.matmul(
        xq, sx.reshape(1, 1), wq, sw.reshape(1, 1), out_dtype=jnp.float32, interpret=True
    )
    ref = w8a8.reference(
        xq, jnp.full((16, 1), sx), wq, jnp.full((1, 64), sw), out_dtype=jnp.float32
    )
    assert _rel(y, ref) < 1e-5


def test_bad_inputs():
    xq = jnp.zeros((4, 128), jnp.int8)
    with pytest.raises(ValueError, match="code"):
        w8a8.matmul(xq, jnp.ones((4, 1)), jnp.zeros((128, 64), FP8), jnp.ones((1, 64)))
    with pytest.raises(ValueError, match="blocks"):
        w8a8.matmul(xq, jnp.ones((4, 2)), jnp.zeros((128, 64), jnp.int8), jnp.ones((1, 64)))
    mosaic = w8a8.MosaicConfig()
    with pytest.raises(ValueError, match="K-major"):  # the [K, N] weight: says to_k_major
        w8a8.matmul(xq, jnp.ones((4, 1)), jnp.zeros((128, 64), jnp.int8), jnp.ones((1, 64)),
                    config=mosaic)  # fmt: skip
    xq256 = jnp.zeros((4, 256), jnp.int8)
    for tiles in (mosaic, w8a8.MosaicConfig(tile_m=64, tile_n=128, tile_k=64)):
        with pytest.raises(ValueError, match="block scales need"):  # 128 x 128 tiles, K steps
            w8a8.matmul(xq256, jnp.ones((4, 2)), jnp.zeros((64, 256), jnp.int8),
                        jnp.ones((2, 64)), config=tiles, w_k_major=True)  # fmt: skip
    with pytest.raises(ValueError, match="K"):  # K-major weight with the wrong K
        w8a8.matmul(xq, jnp.ones((4, 1)), jnp.zeros((64, 100), jnp.int8), jnp.ones((1, 64)),
                    w_k_major=True)  # fmt: skip
    for bad in (dict(tile_m=96), dict(tile_n=512), dict(tile_m=128, tile_n=256),
                dict(tile_k=32), dict(max_concurrent_steps=1)):  # fmt: skip
        with pytest.raises(ValueError, match="MosaicConfig"):
            w8a8.MosaicConfig(**bad)


@pytest.mark.parametrize("dtype", [jnp.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("m", [1, 1024], ids=["m1", "m1024"])
def test_lowers_for_cuda(dtype, m):
    k, n = 512, 256
    args = (
        jax.ShapeDtypeStruct((m, k), dtype),
        jax.ShapeDtypeStruct((m, 1), jnp.float32),
        jax.ShapeDtypeStruct((k, n), dtype),
        jax.ShapeDtypeStruct((1, n), jnp.float32),
    )
    assert common.TRITON_CUSTOM_CALL in common.lower_for_cuda(w8a8.matmul, *args)


@pytest.mark.parametrize("block", [None, 128], ids=["channel", "block128"])
@pytest.mark.parametrize("k_major", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("m", [1, 64, 1024])
def test_fp8_products_ask_for_fp8_tensor_cores(m, k_major, block):
    """From 64-row tiles the fp8 product tells Triton to promote its partial sums to float32
    every 128 products (`maxNumImpreciseAcc`), without which Triton converts the codes to
    float16 for `mma.sync`; decode tiles (16 rows) and int8 products are plain products."""
    from pallas_kernels import sass

    k, n = 512, 256
    kb = k // w8a8.SCALE_BLOCK if block else 1

    def dots(dtype):
        args = (
            jax.ShapeDtypeStruct((m, k), dtype),
            jax.ShapeDtypeStruct((m, kb), jnp.float32),
            jax.ShapeDtypeStruct((n, k) if k_major else (k, n), dtype),
            jax.ShapeDtypeStruct((kb, n), jnp.float32),
        )
        fn = lambda *a: w8a8.matmul(*a, w_k_major=k_major)
        [(ir, _, _)] = sass.triton_modules(fn, *args)
        return [line for line in ir.splitlines() if "tt.dot" in line]

    fp8, int8 = dots(FP8), dots(jnp.int8)
    assert len(fp8) == 1 and len(int8) == 1
    assert ("maxNumImpreciseAcc = 128" in fp8[0]) == (m >= 64), fp8
    assert "maxNumImpreciseAcc" not in int8[0]


@pytest.mark.parametrize(
    "k, block, carried",
    [(512, None, "i32"), (2**17, None, "f32"), (512, 128, "f32")],
    ids=["int32-sum", "k-could-overflow", "block-scales"],
)
def test_int8_products_sum_in_int32_while_they_cannot_overflow(k, block, carried):
    """With one scale along K the loop carries the int32 sum (IGMMA accumulates in place, one
    conversion in the epilogue); past 2**31 / 128**2 products, and with block scales, float32."""
    from pallas_kernels import sass

    kb = k // w8a8.SCALE_BLOCK if block else 1
    args = (
        jax.ShapeDtypeStruct((1, k), jnp.int8),
        jax.ShapeDtypeStruct((1, kb), jnp.float32),
        jax.ShapeDtypeStruct((k, 64), jnp.int8),
        jax.ShapeDtypeStruct((kb, 64), jnp.float32),
    )
    [(ir, _, _)] = sass.triton_modules(w8a8.matmul, *args)
    loops = [line for line in ir.splitlines() if "scf.for" in line]
    assert len(loops) == 1 and f"-> (tensor<16x64x{carried}>" in loops[0], loops


@pytest.mark.parametrize("dtype", [jnp.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("m, k, n", [(1, 576, 192), (100, 200, 72)], ids=["smollm2", "ragged"])
def test_codes_are_read_in_place(dtype, m, k, n):
    """Shapes off the tiles (SmolLM2-135M's K = 576, N = 192): masked loads, not padded codes;
    only the scales (M + N floats) may be padded."""
    args = (
        jax.ShapeDtypeStruct((m, k), dtype),
        jax.ShapeDtypeStruct((m, 1), jnp.float32),
        jax.ShapeDtypeStruct((k, n), dtype),
        jax.ShapeDtypeStruct((1, n), jnp.float32),
    )
    text = common.lower_for_cuda(w8a8.matmul, *args)
    pads = [line for line in text.splitlines() if "stablehlo.pad" in line]
    assert pads and all("xf32>" in line.split("->")[-1] for line in pads), pads


@pytest.mark.parametrize("dtype", [jnp.int8, FP8], ids=["int8", "fp8"])
def test_mosaic_lowers_for_cuda(dtype):
    m, k, n = 1024, 512, 256
    args = (
        jax.ShapeDtypeStruct((m, k), dtype),
        jax.ShapeDtypeStruct((m, 1), jnp.float32),
        jax.ShapeDtypeStruct((n, k), dtype),
        jax.ShapeDtypeStruct((1, n), jnp.float32),
    )

    def f(*a, cfg=None):
        return w8a8.matmul(*a, config=cfg or w8a8.MosaicConfig(), w_k_major=True)

    text = common.lower_for_cuda(f, *args)
    assert common.MOSAIC_GPU_CUSTOM_CALL in text and common.TRITON_CUSTOM_CALL not in text
    # Mosaic GPU checks the shared-memory budget while lowering: a config over the H100's
    # 227 KiB per block is an error here, not a failure on the GPU. (The pipeline keeps
    # min(max_concurrent_steps, K / tile_k) stages: 4 here, 4 x 80 KiB.)
    big = w8a8.MosaicConfig(tile_m=64, tile_n=256, tile_k=256, max_concurrent_steps=4)
    long_k = (jax.ShapeDtypeStruct((m, 4096), dtype), args[1],
              jax.ShapeDtypeStruct((n, 4096), dtype), args[3])  # fmt: skip
    with pytest.raises(ValueError, match="shared memory"):
        common.lower_for_cuda(lambda *a: f(*a, cfg=big), *long_k)


def test_can_use():
    i8 = jax.ShapeDtypeStruct((4, 128), jnp.int8)
    w8 = jax.ShapeDtypeStruct((128, 64), jnp.int8)
    f8 = jax.ShapeDtypeStruct((4, 128), FP8)
    wf8 = jax.ShapeDtypeStruct((128, 64), FP8)
    assert w8a8.can_use(i8, w8, backend="gpu", compute_capability=(8, 0))
    assert w8a8.can_use(f8, wf8, backend="gpu", compute_capability=(9, 0))
    assert not w8a8.can_use(f8, wf8, backend="gpu", compute_capability=(8, 0))  # no fp8 MMA
    assert not w8a8.can_use(i8, wf8, backend="gpu", compute_capability=(9, 0))
    assert not w8a8.can_use(i8, w8)  # CPU


def test_dispatch_w8a8():
    act = jqtz.QuantSpec(format="int8", granularity="channel", axis=-1)
    w = jax.random.normal(jax.random.key(0), (128, 64))
    qw = jqtz.quantize(w, jqtz.QuantSpec(format="int8", activation=act))
    x = jnp.ones((2, 128), jnp.bfloat16)
    h100 = dict(backend="gpu", compute_capability=(9, 0))
    assert dispatch.kernel_for(x, qw, **h100) == "w8a8"
    assert dispatch.kernel_for(x, qw, backend="cpu") is None
    assert dispatch.maybe_matmul(x, qw) is None  # CPU: XLA path
    group = jqtz.quantize(
        w, jqtz.QuantSpec(format="int8", granularity="group", group_size=32, activation=act)
    )
    assert dispatch.kernel_for(x, group, **h100) is None  # scales vary along K


H100 = dict(backend="gpu", compute_capability=(9, 0))


def _w8a8_qarray(spec, k=256, n=192, seed=0):
    w = jax.random.normal(jax.random.key(seed), (k, n))
    return jqtz.quantize(w, spec)


def _calibrated(qw, amax):
    """`qw` with the static per-tensor activation scale `calibrate_fp8` would store."""
    qmax = 448.0 if qw.format.name == "fp8_e4m3" else 127.0
    return dataclasses.replace(qw, act_scale=jnp.full((1, 1), amax / qmax, jnp.float32))


#: W8A8 layouts jqtz makes (PTQ methods' specs) -> whether the w8a8 kernel serves them.
W8A8_SPECS = {
    "smoothquant": (default_spec("smoothquant"), True),
    "smoothquant-static": (default_spec("smoothquant", options=SmoothQuantOptions(
        static_activations=True)), True),
    "fp8-per-token": (fp8_spec("dynamic-per-token"), True),
    "fp8-per-tensor": (fp8_spec("static-per-tensor"), True),
    "fp8-block128": (fp8_spec("block128"), True),
    "int8-group128-act-group128": (jqtz.QuantSpec(
        format="int8", granularity="group", group_size=128,
        activation=jqtz.QuantSpec(format="int8", granularity="group", group_size=128, axis=-1)),
        True),
    "llm_int8": (default_spec("llm_int8"), False),  # jqtz.nn sends its inliers (test_llm_int8)
    "fp8-block64": (fp8_spec("block128", block=64), False),  # the kernel's blocks are 128
    "int8-group32": (jqtz.QuantSpec(format="int8", granularity="group", group_size=32,
        activation=jqtz.QuantSpec(format="int8", granularity="channel", axis=-1)), False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(W8A8_SPECS))
def test_dispatch_serves_every_w8a8_layout_the_kernel_covers(name):
    spec, served = W8A8_SPECS[name]
    qw = _w8a8_qarray(spec)
    if name == "fp8-per-tensor" or name == "smoothquant-static":
        qw = _calibrated(qw, 4.0)
    x = jax.random.normal(jax.random.key(1), (2, 3, 256), jnp.bfloat16)
    assert dispatch.kernel_for(x, qw, **H100) == ("w8a8" if served else None)
    y = dispatch.maybe_matmul(x, qw, interpret=True, **H100)
    if not served:
        assert y is None
        return
    # The kernel gets the XLA path's own activation codes (jqtz's `quantize_input`): the two
    # differ only in float32 summation order and where the scales are applied.
    xla = jqtz.nn.dot_general(x, qw, (((2,), (0,)), ((), ())))
    assert y.shape == xla.shape == (2, 3, 192) and y.dtype == xla.dtype
    assert _rel(y, xla) < 1e-5


@pytest.mark.parametrize("name", [n for n, (_, served) in W8A8_SPECS.items() if served])
def test_every_served_w8a8_layout_lowers_for_cuda(name):
    """The whole serving call (activation quantization by jqtz, the kernel) for each layout,
    lowered for an H100 from this CPU: one Triton launch, no dequantized weight."""
    qw = _w8a8_qarray(W8A8_SPECS[name][0])
    if name in ("fp8-per-tensor", "smoothquant-static"):
        qw = _calibrated(qw, 4.0)
    x = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16)
    text = common.lower_for_cuda(lambda x, w: dispatch.maybe_matmul(x, w, **H100), x, qw)
    assert text.count(common.TRITON_CUSTOM_CALL) == 1
    assert "tensor<256x192xf32>" not in text and "tensor<256x192xbf16>" not in text


@pytest.mark.parametrize("name", ["smoothquant", "fp8-per-token", "fp8-block128"])
def test_dispatch_gives_large_m_the_k_major_weight(name):
    """From `K_MAJOR_ROWS` rows the kernel reads the transposed codes `[N, K]` (8-bit `wgmma`
    reads B K-major only), through Mosaic GPU where the weight has one scale along K (the
    default lowering, "auto") and Triton for block scales or under `lowering="triton"`, with
    the same result as XLA's path; below, Triton reads `[K, N]` in place."""
    qw = _w8a8_qarray(W8A8_SPECS[name][0])
    rows, block = w8a8.K_MAJOR_ROWS, name == "fp8-block128"
    assert dispatch.kernel_for(jnp.ones((rows, 256)), qw, **H100) == (
        "w8a8" if block else "w8a8-mosaic"
    )
    assert dispatch.kernel_for(jnp.ones((rows, 256)), qw, lowering="triton", **H100) == "w8a8"
    assert dispatch.kernel_for(jnp.ones((rows - 1, 256)), qw, **H100) == "w8a8"
    x = jax.random.normal(jax.random.key(2), (rows, 256), jnp.bfloat16)
    xla = jqtz.nn.dot_general(x, qw, (((1,), (0,)), ((), ())))
    for lowering in ("auto", "triton"):
        y = dispatch.maybe_matmul(x, qw, lowering=lowering, interpret=True, **H100)
        assert _rel(y, xla) < 1e-5, lowering
    code = "i8" if name == "smoothquant" else "f8E4M3FN"
    for m, lowering, k_major in ((rows, "triton", True), (rows - 1, "auto", False)):
        xs = jax.ShapeDtypeStruct((m, 256), jnp.bfloat16)
        fn = lambda x, w, lowering=lowering: dispatch.maybe_matmul(x, w, lowering=lowering, **H100)
        call = next(
            ln for ln in common.lower_for_cuda(fn, xs, qw).splitlines()
            if common.TRITON_CUSTOM_CALL in ln
        )  # fmt: skip
        assert (f"tensor<192x256x{code}>" in call) == k_major, call[:300]
    if not block:  # the default at `rows`: one Mosaic GPU launch, no dequantized weight
        text = common.lower_for_cuda(
            lambda x, w: dispatch.maybe_matmul(x, w, **H100),
            jax.ShapeDtypeStruct((rows, 256), jnp.bfloat16), qw,
        )  # fmt: skip
        assert text.count(common.MOSAIC_GPU_CUSTOM_CALL) == 1
        assert common.TRITON_CUSTOM_CALL not in text and "tensor<256x192xf32>" not in text


def test_block_scaled_dispatch_needs_whole_blocks_along_k():
    qw = _w8a8_qarray(fp8_spec("block128"), k=320)  # K = 2.5 blocks
    x = jax.ShapeDtypeStruct((4, 320), jnp.bfloat16)
    assert dispatch.kernel_for(x, qw, **H100) is None


def test_bench_entry_point_without_gpu(capsys):
    assert w8a8.main(["--bench"]) == 0
    assert "no GPU" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["smoothquant", "fp8-per-token", "fp8-block128"])
def test_serving_layout_spares_the_per_call_transposition(name):
    """After `jqtz.nn.serving_layout` the codes are stored `[N, K]`: every M reads them in
    place (no transpose in the served call; Triton below `K_MAJOR_ROWS`, as before), with the
    results of the `[K, N]` weight's paths."""
    qw = _w8a8_qarray(W8A8_SPECS[name][0])
    served = jqtz.nn.serving_layout({"w": qw})["w"]
    assert served.transposed and served.qvalue.shape == (192, 256)
    rows = w8a8.K_MAJOR_ROWS
    for m in (1, rows):
        x = jax.random.normal(jax.random.key(m), (m, 256), jnp.bfloat16)
        assert dispatch.kernel_for(x, served, **H100) == dispatch.kernel_for(x, qw, **H100)
        y = dispatch.maybe_matmul(x, served, interpret=True, **H100)
        assert _rel(y, dispatch.maybe_matmul(x, qw, interpret=True, **H100)) < 1e-6, m
        assert _rel(y, jqtz.nn.dot_general(x, qw, (((1,), (0,)), ((), ())))) < 1e-5, m

        def fn(x, w):
            return dispatch.maybe_matmul(x, w, **H100)

        xs = jax.ShapeDtypeStruct((m, 256), jnp.bfloat16)

        def weight_transposes(w, xs=xs):  # transposes that produce the codes' [N, K]
            eqns = str(jax.make_jaxpr(fn)(xs, w)).splitlines()
            return sum("transpose[" in e and "[192,256]=" in e.replace(" ", "") for e in eqns)

        transposes = [weight_transposes(w) for w in (qw, served)]
        assert transposes[1] == 0, transposes
        assert transposes[0] == (1 if m >= rows else 0), transposes


@pytest.mark.parametrize("dtype", [jnp.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("m, k, n", [(64, 256, 128), (100, 384, 256)], ids=["tiles", "ragged_m"])
def test_mosaic_block_scales(dtype, m, k, n):
    """1x128 x 128x128 block scales on Mosaic GPU: each K step's product is scaled by its
    blocks' scales and summed in float32, as the reference dequantizes."""
    x = jax.random.normal(jax.random.key(0), (m, k))
    w = jax.random.normal(jax.random.key(1), (k, n))
    xq, sx = w8a8.quantize_rows(x, dtype, 128)
    wq, sw = w8a8.quantize_cols(w, dtype, 128)
    for cfg in w8a8.BLOCK_MOSAIC_CANDIDATES[:2]:  # 64 x 128 and 128 x 64 tiles
        y = w8a8.matmul(xq, sx, w8a8.to_k_major(wq), sw, config=cfg, w_k_major=True,
                        out_dtype=jnp.float32, interpret=True)  # fmt: skip
        assert _rel(y, w8a8.reference(xq, sx, wq, sw, out_dtype=jnp.float32)) < 1e-5, cfg
    sds = jax.ShapeDtypeStruct
    f32 = jnp.float32
    args = (sds((256, 4096), dtype), sds((256, 32), f32), sds((1024, 4096), dtype),
            sds((32, 1024), f32))  # fmt: skip
    for cfg in w8a8.BLOCK_MOSAIC_CANDIDATES:  # each fits the H100's shared memory and registers
        fn = lambda *a, cfg=cfg: w8a8.matmul(*a, config=cfg, w_k_major=True)
        assert common.MOSAIC_GPU_CUSTOM_CALL in common.lower_for_cuda(fn, *args)


def test_block_scales_take_mosaic_gpu_when_asked():
    """DeepSeek-style FP8 weights (served `[N, K]`): Triton under "auto" (measured), Mosaic GPU
    under "mosaic" from `K_MAJOR_ROWS` rows, with XLA's result; N off the tiles (192)."""
    qw = jqtz.nn.serving_layout({"w": _w8a8_qarray(fp8_spec("block128"))})["w"]
    rows = w8a8.K_MAJOR_ROWS
    x = jax.random.normal(jax.random.key(3), (rows, 256), jnp.bfloat16)
    assert dispatch.kernel_for(x, qw, **H100) == "w8a8"
    assert dispatch.kernel_for(x, qw, lowering="mosaic", **H100) == "w8a8-mosaic"
    assert dispatch.kernel_for(x[:-1], qw, lowering="mosaic", **H100) == "w8a8"
    y = dispatch.maybe_matmul(x, qw, lowering="mosaic", interpret=True, **H100)
    assert _rel(y, jqtz.nn.dot_general(x, qw, (((1,), (0,)), ((), ())))) < 1e-5

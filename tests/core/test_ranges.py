"""Range choice (`jqtz.ranges`): max / percentile / MSE clipping, guards, static ranges."""

import doctest

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jqtz
from jqtz import ranges
from jqtz.spec import QuantSpec

from . import _reference as ref

dequantize = jax.jit(lambda q: q.dequantize())


def test_docstring_examples():
    assert doctest.testmod(ranges).failed == 0


def _rel_err(w, q):
    return float(np.linalg.norm(np.asarray(dequantize(q)) - w) / np.linalg.norm(w))


# --- max: the documented formulas ------------------------------------------------------------


def test_symmetric_max_scale_is_absmax_over_qmax():
    w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    q = jqtz.quantize(w, QuantSpec(format="int4", granularity="group", group_size=16))
    want = np.abs(w).reshape(4, 16, 8).max(1) / 7
    np.testing.assert_allclose(np.asarray(q.scale), want, rtol=1e-6)


def test_asymmetric_range_contains_zero_and_zero_point_is_rounded():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(32, 6)).astype(np.float32)
    w[:, 0] = np.abs(w[:, 0]) + 1.0  # all positive: the range is widened down to 0
    w[:, 1] = -np.abs(w[:, 1]) - 1.0  # all negative: widened up to 0
    q = jqtz.quantize(w, QuantSpec(format="int4", symmetric=False))
    lo, hi = np.minimum(w.min(0), 0), np.maximum(w.max(0), 0)
    scale = np.asarray(q.scale)[0]
    np.testing.assert_allclose(scale, (hi - lo) / 15, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.zero_point)[0], np.round(-lo / scale))
    assert np.asarray(q.zero_point)[0, 0] == 0 and np.asarray(q.zero_point)[0, 1] == 15


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16"])
def test_scales_are_rounded_up_to_the_next_representable_value(scale_dtype):
    w = np.random.default_rng(2).normal(size=(32, 256)).astype(np.float32)
    q = jqtz.quantize(w, QuantSpec(format="int4", scale_dtype=scale_dtype))
    stored = np.asarray(q.scale)[0]
    assert stored.dtype == np.dtype(scale_dtype)
    exact = np.abs(w).max(0).astype(np.float64) / 7
    dt = getattr(ml_dtypes, scale_dtype) if scale_dtype == "bfloat16" else np.float16
    below = np.nextafter(stored, np.asarray(-np.inf, dt)).astype(np.float64)
    assert (stored.astype(np.float64) >= exact * (1 - 2**-23)).all()  # never rounded down
    assert (below < exact * (1 + 2**-23)).all()  # the smallest such value
    assert (stored.astype(np.float64) > exact).mean() > 0.9  # really rounded (not exact)


def test_constant_blocks_get_scale_abs_c_and_zero_blocks_scale_one():
    w = np.zeros((8, 4), np.float32)
    w[:, 1], w[:, 2], w[:, 3] = 0.3, -2.5, 1e-30
    for sym in (True, False):
        q = jqtz.quantize(w, QuantSpec(format="int4", symmetric=sym))
        np.testing.assert_array_equal(np.asarray(q.scale)[0], np.float32([1.0, 0.3, 2.5, 1e-30]))
        np.testing.assert_array_equal(np.asarray(dequantize(q)), w)


def test_tiny_constant_block_never_gets_a_zero_float16_scale():
    # Scales are documented as rounded up into the scale dtype and never to zero; a constant
    # block below float16's smallest subnormal must not get scale 0 (0 * code loses the value
    # and breaks the half-step bound).
    w = np.full((4, 3), 1e-8, np.float32)
    w[:, 1] = -3e-9
    q = jqtz.quantize(w, QuantSpec(format="int8", scale_dtype="float16"))
    scale = np.asarray(q.scale, np.float32)[0]
    assert (scale > 0).all(), scale
    err = np.abs(np.asarray(dequantize(q)) - w)
    assert (err <= 0.5 * scale).all()


# --- percentile and MSE beat max on heavy tails ---------------------------------------------


@pytest.fixture(scope="module")
def heavy_tailed():
    # Student-t with 3 degrees of freedom: a few large outliers per 1024-value channel.
    return np.random.default_rng(0).standard_t(df=3, size=(1024, 16)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["int4", "int3"])
@pytest.mark.parametrize("clipping", ["percentile", "mse"])
def test_clipping_beats_max_on_heavy_tails(heavy_tailed, fmt, clipping):
    w = heavy_tailed
    err_max = _rel_err(w, jqtz.quantize(w, QuantSpec(format=fmt, clipping="max")))
    spec = QuantSpec(format=fmt, clipping=clipping, percentile=99.0)
    err = _rel_err(w, jqtz.quantize(w, spec))
    assert err < 0.85 * err_max, (err, err_max)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(format="int4", granularity="group", group_size=32, clipping="mse"),
        QuantSpec(format="int3", symmetric=False, clipping="mse", scale_dtype="bfloat16"),
        QuantSpec(format="int2", granularity="block", block_shape=(16, 4), clipping="mse"),
    ],
    ids=["int4-g32", "int3-channel-asym-bf16", "int2-block16x4"],
)
def test_mse_never_worse_than_max_in_its_own_objective(heavy_tailed, spec):
    w = heavy_tailed[:200]  # 200 rows: ragged last groups and blocks
    q_mse = jqtz.quantize(w, spec)
    q_max = jqtz.quantize(w, QuantSpec(**{**vars(spec), "clipping": "max"}))
    assert q_mse.block_shape == q_max.block_shape

    def objective(q):
        d = np.abs(np.asarray(dequantize(q), np.float64) - w) ** spec.mse_norm
        rows, cols = (np.arange(s) // b for s, b in zip(w.shape, q.block_shape, strict=True))
        out = np.zeros((rows[-1] + 1, cols[-1] + 1))
        np.add.at(out, (rows[:, None], cols[None, :]), d)
        return out

    e_mse, e_max = objective(q_mse), objective(q_max)
    assert (e_mse <= e_max * (1 + 1e-5)).all()
    assert (e_mse < 0.95 * e_max).any()  # and the search did move somewhere


def test_percentile_scale_is_the_percentile_of_abs_values():
    w = np.random.default_rng(3).standard_t(df=3, size=(300, 5)).astype(np.float32)
    q = jqtz.quantize(w, QuantSpec(format="int8", clipping="percentile", percentile=99.0))
    want = np.percentile(np.abs(w), 99.0, axis=0) / 127
    np.testing.assert_allclose(np.asarray(q.scale)[0], want, rtol=1e-5)


# --- static ranges: observe / merge / qparams_from_stats ------------------------------------

STATIC_SPECS = {
    "int8-tensor": QuantSpec(format="int8", granularity="tensor", axis=-1),
    "int8-per-feature-asym": QuantSpec(
        format="int8", granularity="channel", axis=0, symmetric=False
    ),
    "int4-per-feature-bf16": QuantSpec(
        format="int4", granularity="channel", axis=0, scale_dtype="bfloat16"
    ),
    "fp8_e4m3-tensor": QuantSpec(format="fp8_e4m3", granularity="tensor", axis=-1),
}


@pytest.mark.parametrize("spec", STATIC_SPECS.values(), ids=STATIC_SPECS.keys())
def test_static_ranges_equal_the_range_of_the_concatenated_batches(spec):
    rng = np.random.default_rng(4)
    batches = [
        (rng.normal(size=(n, 12)) * rng.uniform(0.5, 4.0, size=12) + m).astype(np.float32)
        for n, m in [(16, 0.0), (7, 2.0), (33, -1.0)]
    ]
    stats = ranges.observe(jnp.asarray(batches[0]), spec)
    for b in batches[1:]:
        stats = stats.merge(ranges.observe(jnp.asarray(b), spec))
    full = np.concatenate(batches)
    block = spec.block_shape_for(full.shape)
    per_tensor = block == full.shape
    lo, hi = (full.min(), full.max()) if per_tensor else (full.min(0), full.max(0))
    np.testing.assert_array_equal(np.asarray(stats.lo).ravel(), lo)
    np.testing.assert_array_equal(np.asarray(stats.hi).ravel(), hi)

    # Under jit, as inside `quantize`, the scales are the dynamic ones bit for bit. (Eagerly they
    # may differ by an ulp: XLA turns x / const into x * (1 / const) only when compiling.)
    scale, zero = jax.jit(ranges.qparams_from_stats, static_argnums=1)(stats, spec)
    direct = jqtz.quantize(full, spec)  # dynamic range of the whole data
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(direct.scale))
    eager_scale, _ = ranges.qparams_from_stats(stats, spec)
    np.testing.assert_allclose(
        np.asarray(eager_scale, np.float32), np.asarray(scale, np.float32), rtol=2**-23
    )
    if zero is None:
        assert direct.zero_point is None
    else:
        np.testing.assert_array_equal(np.asarray(zero), np.asarray(direct.zero_point))
    # Static quantization of the full data with these scales is the dynamic one.
    static = jqtz.quantize(full, spec, scale=scale, zero_point=zero)
    np.testing.assert_array_equal(np.asarray(static.qvalue), np.asarray(direct.qvalue))
    np.testing.assert_array_equal(ref.dequantize(static), ref.dequantize(direct))

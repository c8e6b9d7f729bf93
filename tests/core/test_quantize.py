"""`quantize`: the half-step error bound, jit/vmap/determinism, bad input, double quantization."""

import doctest
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jqtz
from jqtz import formats
from jqtz.spec import QuantSpec

from . import _reference as ref

# One fused compilation per QArray structure: much quicker than eager op-by-op dispatch.
dequantize = jax.jit(lambda q: q.dequantize())


def test_docstring_examples():
    assert doctest.testmod(importlib.import_module("jqtz.quantize")).failed == 0


# --- property: |x - dequantize(quantize(x))| <= scale / 2 ------------------------------------

INT_FORMATS = ("int8", "int4", "int3", "int2")
SCALE_DTYPES = ("float32", "bfloat16", "float16")
# name: (spec fields, array shape, block shape the spec must give that shape)
GRANULARITIES = {
    "tensor": (dict(granularity="tensor"), (5, 7), (5, 7)),
    "channel": (dict(granularity="channel", axis=0), (6, 5), (6, 1)),
    "g4": (dict(granularity="group", group_size=4), (8, 3), (4, 1)),
    "g4-ragged": (dict(granularity="group", group_size=4), (10, 3), (4, 1)),
    "block3x4-ragged": (dict(granularity="block", block_shape=(3, 4)), (7, 9), (3, 4)),
}


def _property_cases():
    # Every format x symmetry x granularity; scale dtypes rotate so that every scale dtype
    # meets every format, every granularity and both symmetries (one compilation per case).
    for (i, fmt), (j, sym), (k, gran) in itertools.product(
        enumerate(INT_FORMATS), enumerate((True, False)), enumerate(GRANULARITIES)
    ):
        sdt = SCALE_DTYPES[(i + j + k) % 3]
        fields, shape, block = GRANULARITIES[gran]
        spec = QuantSpec(format=fmt, symmetric=sym, clipping="max", scale_dtype=sdt, **fields)
        name = f"{fmt}-{gran}-{'sym' if sym else 'asym'}-{sdt}"
        yield pytest.param(spec, shape, block, id=name)


def _half_step_violations(x, q, block):
    s = ref.per_element(np.asarray(q.scale).astype(np.float64), x.shape, block)
    err = np.abs(x.astype(np.float64) - np.asarray(dequantize(q), np.float64))
    bound = 0.5 * s * (1 + 2**-20) + 2**-22 * np.abs(x)
    return err > bound


@pytest.mark.parametrize("spec, shape, block", list(_property_cases()))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_error_within_half_a_step(spec, shape, block, data):
    # Values in [-1, 1] at magnitudes from tiny to large; constant arrays now and then (and
    # repeated values) exercise the constant-block guard.
    unit = st.floats(-1, 1, width=32, allow_subnormal=False)
    varied = hnp.arrays(np.float32, shape, elements=unit, fill=unit)
    constant = unit.map(lambda v: np.full(shape, v, np.float32))
    base = data.draw(st.one_of(varied, varied, varied, constant), label="base")
    magnitude = data.draw(st.sampled_from([1e-30, 1e-9, 1e-3, 1.0, 1e3]), label="magnitude")
    x = base * np.float32(magnitude)
    q = jqtz.quantize(x, spec)
    fmt = spec.storage_format
    assert q.block_shape == block
    assert q.scale.dtype == np.dtype(spec.scale_dtype)
    assert q.scale.shape == tuple(-(-s // b) for s, b in zip(shape, block, strict=True))
    codes = ref.codes_of(q)
    assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    if q.zero_point is not None:
        assert np.asarray(q.zero_point).min() >= 0
        assert np.asarray(q.zero_point).max() <= fmt.qmax
    bad = _half_step_violations(x, q, block)
    assert not bad.any(), (x[bad], np.asarray(dequantize(q))[bad], np.asarray(q.scale))


# --- jit and eager agree bit for bit; the same input gives the same bytes -------------------

SPECS = {
    "int8-channel": QuantSpec(format="int8"),
    "int8-tokens-asym-percentile": QuantSpec(
        format="int8", axis=-1, symmetric=False, clipping="percentile", percentile=99.0
    ),
    "int4-g16-ragged-asym-bf16": QuantSpec(
        format="int4", granularity="group", group_size=16, symmetric=False, scale_dtype="bfloat16"
    ),
    "int4-g16-mse": QuantSpec(format="int4", granularity="group", group_size=16, clipping="mse"),
    "int3-tensor-f16": QuantSpec(format="int3", granularity="tensor", scale_dtype="float16"),
    "int2-block8x8": QuantSpec(format="int2", granularity="block", block_shape=(8, 8)),
    "nf4-g16-dq": QuantSpec(format="nf4", granularity="group", group_size=16, double_quant=True),
    "fp8_e4m3-block16x16": QuantSpec(format="fp8_e4m3", granularity="block", block_shape=(16, 16)),
    "fp8_e5m2-tokens": QuantSpec(format="fp8_e5m2", axis=-1),
}


def _weight(shape=(40, 24), seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * jnp.linspace(0.1, 3.0, shape[-1])


def _assert_same_bytes(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb  # formats, shapes, block shapes and dtypes agree
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_jit_and_eager_agree_bit_for_bit(spec):
    w = _weight()
    eager = jqtz.quantize(w, spec)
    jitted = jax.jit(lambda x: jqtz.quantize(x, spec))(w)
    _assert_same_bytes(eager, jitted)
    deq_eager = eager.dequantize()
    deq_jit = dequantize(eager)
    assert np.asarray(deq_eager).tobytes() == np.asarray(deq_jit).tobytes()
    # And both agree with the numpy reference: (code - zero) * scale per block.
    np.testing.assert_array_equal(np.asarray(deq_eager), ref.dequantize(eager))


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_deterministic(spec):
    w = _weight(seed=1)
    _assert_same_bytes(jqtz.quantize(w, spec), jqtz.quantize(jnp.array(np.asarray(w)), spec))


# --- vmap ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["int8-channel", "int4-g16-ragged-asym-bf16", "nf4-g16-dq", "int3-tensor-f16"]
)
def test_vmap_quantize_adds_a_batch_dim_equal_to_per_slice(name):
    spec = SPECS[name]
    stacked = jnp.stack([_weight(seed=s) for s in range(3)])
    qb = jax.vmap(lambda w: jqtz.quantize(w, spec))(stacked)
    assert qb.shape == stacked.shape[1:] and qb.batch_shape == (3,)
    per_slice = [jqtz.quantize(w, spec) for w in stacked]
    for i, q in enumerate(per_slice):
        _assert_same_bytes(jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], qb), q)
    want = np.stack([np.asarray(dequantize(q)) for q in per_slice])
    np.testing.assert_array_equal(np.asarray(qb.dequantize()), want)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda q: q.dequantize())(qb)), want)


# --- bad input ----------------------------------------------------------------------------


def test_non_finite_input_is_refused_with_the_count():
    w = np.ones((8, 4), np.float32)
    w[0, 0], w[3, 2], w[5, 1] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match="3 non-finite"):
        jqtz.quantize(w, QuantSpec())


def test_integer_input_is_refused():
    with pytest.raises(TypeError, match=r"floating point.*int32"):
        jqtz.quantize(jnp.ones((4, 4), jnp.int32), QuantSpec())


def test_static_zero_point_needs_scale_and_vice_versa():
    x = jnp.ones((4, 4))
    with pytest.raises(ValueError, match="`zero_point` given without `scale`"):
        jqtz.quantize(x, QuantSpec(symmetric=False), zero_point=jnp.zeros(4))
    with pytest.raises(ValueError, match="needs `zero_point`"):
        jqtz.quantize(x, QuantSpec(symmetric=False), scale=jnp.ones(4))


def _constant_cases():
    # Every format and symmetry with float32 scales; the 16-bit scale dtypes on a few of them.
    for fmt in (f for f in formats.names() if not f.startswith("uint")):
        for sym in (True, False) if fmt.startswith("int") else (True,):
            name = f"{fmt}-{'sym' if sym else 'asym'}"
            yield pytest.param(fmt, sym, "float32", id=f"{name}-float32")
            if name in ("int8-asym", "int4-sym", "nf4-sym", "fp8_e4m3-sym"):
                for sdt in ("bfloat16", "float16"):
                    yield pytest.param(fmt, sym, sdt, id=f"{name}-{sdt}")


@pytest.mark.parametrize("fmt, symmetric, scale_dtype", list(_constant_cases()))
def test_constant_and_zero_rows_round_trip_exactly(fmt, symmetric, scale_dtype):
    # Constants representable in every scale dtype (small dyadic numbers).
    x = np.zeros((5, 6), np.float32)
    x[1], x[2], x[3], x[4, :3], x[4, 3:] = 3.25, -0.75, 1024.0, 0.0, 2.0
    spec = QuantSpec(
        format=fmt,
        granularity="group",
        group_size=3,
        axis=-1,
        symmetric=symmetric,
        scale_dtype=scale_dtype,
    )
    q = jqtz.quantize(x, spec)
    assert np.isfinite(np.asarray(q.scale, np.float32)).all()
    assert (np.asarray(q.scale, np.float32) > 0).all()
    np.testing.assert_array_equal(np.asarray(dequantize(q)), x)


def test_ragged_last_group_gets_its_own_range():
    # 576 rows in groups of 128: the last group is 64 rows (SmolLM2's hidden size).
    w = np.array(_weight((576, 8), seed=3))
    w[512:] *= 10.0
    spec = QuantSpec(format="int4", granularity="group", group_size=128)
    q = jqtz.quantize(w, spec)
    assert q.scale.shape == (5, 8)
    absmax = np.stack([np.abs(w[i : i + 128]).max(0) for i in range(0, 576, 128)])
    np.testing.assert_allclose(np.asarray(q.scale), absmax / 7, rtol=1e-6)
    half_step = 0.5 * ref.per_element(np.asarray(q.scale), w.shape, (128, 1))
    assert (np.abs(np.asarray(dequantize(q)) - w) <= half_step * (1 + 1e-6)).all()


def test_static_scale_is_used_as_given_and_codes_saturate():
    x = jnp.array([[0.26, -1.0, 5.0, -9.0, 9.0]])
    spec = QuantSpec(format="int4", granularity="tensor")
    q = jqtz.quantize(x, spec, scale=0.5)
    assert q.scale.shape == (1, 1) and float(q.scale[0, 0]) == 0.5
    fmt = spec.storage_format  # codes saturate at the ends of the code range, -8..7
    want = np.clip(np.round(np.asarray(x) / 0.5), fmt.qmin, fmt.qmax) * 0.5
    np.testing.assert_array_equal(np.asarray(dequantize(q)), want)


def test_dequantize_dtype_follows_input_or_argument():
    w = _weight().astype(jnp.bfloat16)
    assert jqtz.quantize(w, QuantSpec()).dequantize().dtype == jnp.bfloat16
    assert jqtz.quantize(w, QuantSpec(), dtype=jnp.float32).dequantize().dtype == jnp.float32
    assert jqtz.quantize(w, QuantSpec()).dequantize(jnp.float16).dtype == jnp.float16


# --- NF4 through quantize, and double quantization ----------------------------------------


def test_nf4_codes_are_the_nearest_level_of_x_over_absmax():
    w = np.asarray(_weight((128, 16), seed=4))
    q = jqtz.quantize(w, QuantSpec(format="nf4", granularity="group", group_size=64))
    absmax = ref.per_element(np.abs(w).reshape(2, 64, 16).max(1), w.shape, (64, 1))
    np.testing.assert_array_equal(ref.per_element(np.asarray(q.scale), w.shape, (64, 1)), absmax)
    levels = np.asarray(ref.QLORA_NF4)
    dist = np.abs((w / absmax)[..., None] - levels)
    codes = ref.codes_of(q)
    np.testing.assert_allclose(
        np.take_along_axis(dist, codes[..., None].astype(np.int64), -1)[..., 0],
        dist.min(-1),
        atol=1e-6,
    )


def test_nf4_double_quant_bits_and_error():
    group, dq_group = 64, 256  # QLoRA: absmax per 64 values, 8-bit absmax codes per 256
    w = jax.random.normal(jax.random.key(5), (256, 512)) * 0.02
    single = jqtz.quantize(w, QuantSpec(format="nf4", granularity="group", group_size=group))
    double = jqtz.quantize(
        w, QuantSpec(format="nf4", granularity="group", group_size=group, double_quant=True)
    )
    # 4-bit codes, an 8-bit scale code per group, a float32 scale and 8-bit zero per 256 scales.
    want_bits = 4 + 8 / group + (32 + 8) / (group * dq_group)
    assert double.bits_per_value == pytest.approx(want_bits)
    assert double.bits_per_value == pytest.approx(4.127, abs=1e-3)
    assert single.bits_per_value == 4 + 32 / group
    assert double.nbytes == ref.real_nbytes(double)

    def rel(q):
        return float(jnp.linalg.norm(dequantize(q) - w) / jnp.linalg.norm(w))

    assert rel(double) == pytest.approx(rel(single), rel=0.02)
    assert rel(double) < 0.12  # NF4 on Gaussian weights: about 0.09

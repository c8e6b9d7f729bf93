"""Numeric formats: integer code ranges, saturating FP8, the NF4 table."""

import doctest

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jqtz
from jqtz import formats

from . import _reference as ref

INT_BITS = (2, 3, 4, 8)


def test_docstring_examples():
    assert doctest.testmod(formats).failed == 0


@pytest.mark.parametrize("bits", INT_BITS, ids=lambda b: f"int{b}")
def test_integer_code_ranges(bits):
    signed, unsigned = formats.get(f"int{bits}"), formats.get(f"uint{bits}")
    assert (signed.qmin, signed.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (unsigned.qmin, unsigned.qmax) == (0, 2**bits - 1)
    # Symmetric ranges map onto ±qmax; unsigned ones span all 2^b - 1 steps.
    assert signed.max_abs == 2 ** (bits - 1) - 1
    assert unsigned.max_abs == 2**bits - 1
    assert not signed.has_zero_point and unsigned.has_zero_point
    np.testing.assert_array_equal(signed.levels(), np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    assert signed.packed == unsigned.packed == (bits < 8)
    assert signed.storage_dtype == (np.uint8 if bits < 8 else np.int8)


@pytest.mark.parametrize("name", ["int2", "int3", "int4", "int8", "uint2", "uint4", "uint8"])
def test_integer_encode_rounds_to_nearest_and_clips(name):
    fmt = formats.get(name)
    levels = fmt.levels()
    offsets = np.array([-0.49, -0.2, 0.0, 0.3, 0.49], np.float32)
    scaled = (levels[:, None] + offsets[None, :]).ravel()
    codes = np.asarray(fmt.encode(jnp.asarray(scaled)))
    assert codes.dtype == fmt.container_dtype
    np.testing.assert_array_equal(codes, np.repeat(levels, offsets.size))
    far = np.asarray(fmt.encode(jnp.array([-1e9, fmt.qmin - 3.0, fmt.qmax + 3.0, 1e9])))
    np.testing.assert_array_equal(far, [fmt.qmin, fmt.qmin, fmt.qmax, fmt.qmax])
    np.testing.assert_array_equal(np.asarray(fmt.decode(jnp.asarray(codes))), codes)


# --- FP8: saturating, never NaN ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_saturates_instead_of_overflowing(name):
    fmt = formats.get(name)
    dtype = ref.FP8_DTYPES[name]
    fmax = float(ml_dtypes.finfo(dtype).max)
    assert fmt.max_abs == fmax
    f32max = float(np.finfo(np.float32).max)
    over = [
        np.nextafter(np.float32(fmax), np.float32(np.inf)),  # just above max
        fmax * 1.04,
        fmax * 1.1,
        fmax * 2,
        1e30,
        f32max,
    ]
    x = np.array([fmax, -fmax, *over, *(-v for v in over)], np.float32)
    out = np.asarray(fmt.decode(fmt.encode(jnp.asarray(x))))
    assert np.isfinite(out).all(), out
    np.testing.assert_array_equal(out, np.sign(x) * fmax)
    # The test means something: a plain cast of the same values overflows.
    plain = np.asarray(jnp.asarray(x).astype(fmt.container_dtype)).astype(np.float32)
    assert not np.isfinite(plain).all()
    if name == "fp8_e4m3":  # float8_e4m3fn has no infinity: overflow is NaN
        assert np.isnan(plain).sum() >= len(over)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_quantize_with_static_scale_never_gives_nan(name):
    fmax = formats.get(name).max_abs
    x = jnp.array([[1e30, -1e30, 3 * fmax, fmax, -fmax, 0.5]], jnp.float32)
    spec = jqtz.QuantSpec(format=name, granularity="tensor")
    q = jqtz.quantize(x, spec, scale=1.0)
    out = np.asarray(q.dequantize())
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, np.clip(np.asarray(x), -fmax, fmax))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_levels_are_every_finite_value_and_round_trip(name):
    fmt = formats.get(name)
    every = np.arange(256, dtype=np.uint8).view(ref.FP8_DTYPES[name]).astype(np.float32)
    want = np.unique(every[np.isfinite(every)])
    levels = fmt.levels()
    np.testing.assert_array_equal(levels, want)
    np.testing.assert_array_equal(np.asarray(fmt.decode(fmt.encode(jnp.asarray(levels)))), levels)


# --- NF4 ----------------------------------------------------------------------------------------


def test_nf4_table_is_the_qlora_table():
    fmt = formats.get("nf4")
    assert len(formats.NF4_LEVELS) == 16
    np.testing.assert_array_equal(np.asarray(formats.NF4_LEVELS), np.asarray(ref.QLORA_NF4))
    np.testing.assert_array_equal(fmt.levels(), np.asarray(ref.QLORA_NF4, np.float32))
    assert fmt.max_abs == 1.0 and fmt.bits == 4 and fmt.packed


def test_nf4_encode_picks_the_nearest_level():
    fmt = formats.get("nf4")
    levels = np.asarray(ref.QLORA_NF4, np.float32)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 4000), levels, levels + 1e-4, levels - 1e-4]).astype(
        np.float32
    )
    codes = np.asarray(fmt.encode(jnp.asarray(x)))
    dist = np.abs(x[:, None].astype(np.float64) - levels[None, :].astype(np.float64))
    chosen = dist[np.arange(x.size), codes]
    np.testing.assert_array_equal(chosen, dist.min(axis=1))
    np.testing.assert_array_equal(codes[4000:4016], np.arange(16))
    np.testing.assert_array_equal(np.asarray(fmt.decode(jnp.arange(16))), levels)


def test_nf4_midpoint_goes_to_the_upper_level():
    fmt = formats.get("nf4")
    levels = np.asarray(ref.QLORA_NF4, np.float32)
    mids = (levels[1:] + levels[:-1]) / 2
    np.testing.assert_array_equal(np.asarray(fmt.encode(jnp.asarray(mids))), np.arange(1, 16))


# --- registry -----------------------------------------------------------------------------------


def test_get_unknown_name_lists_known_formats():
    with pytest.raises(ValueError, match=r"'int5'.*int8.*nf4"):
        formats.get("int5")


def test_get_passes_formats_through_and_names_are_complete():
    fmt = formats.get("int4")
    assert formats.get(fmt) is fmt
    assert set(formats.names()) >= {"int8", "int4", "int3", "int2", "fp8_e4m3", "fp8_e5m2", "nf4"}
    for name in formats.names():
        assert formats.get(name).name == name
        hash(formats.get(name))  # static under jit


@pytest.mark.parametrize("name", ["fp8_e4m3", "nf4", "uint4"])
def test_unsigned_twin_only_for_signed_integers(name):
    with pytest.raises(NotImplementedError, match=name):
        formats.unsigned_of(formats.get(name))
    assert formats.unsigned_of(formats.get("int3")).name == "uint3"

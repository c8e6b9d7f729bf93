"""`QArray`: a pytree with checked invariants; dequantize is (code - zero) * scale per block."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqtz
from jqtz import qarray as qarray_lib
from jqtz.spec import QuantSpec

from . import _reference as ref

SPECS = {
    "int8-channel": QuantSpec(format="int8"),
    "int4-g8-ragged-asym-bf16": QuantSpec(
        format="int4", granularity="group", group_size=8, symmetric=False, scale_dtype="bfloat16"
    ),
    "int3-block4x4-f16": QuantSpec(
        format="int3", granularity="block", block_shape=(4, 4), scale_dtype="float16"
    ),
    "int2-tokens-asym": QuantSpec(format="int2", axis=-1, symmetric=False),
    "nf4-g8-dq": QuantSpec(format="nf4", granularity="group", group_size=8, double_quant=True),
    "fp8_e5m2-tensor": QuantSpec(format="fp8_e5m2", granularity="tensor"),
}
SHAPE = (20, 13)  # odd sizes: ragged groups and blocks, a partial packing word

dequantize = jax.jit(lambda q: q.dequantize())


def _quantized(name, seed=0):
    w = jax.random.normal(jax.random.key(seed), SHAPE) * jnp.linspace(0.2, 2.0, SHAPE[1])
    return w, jqtz.quantize(w, SPECS[name])


def test_docstring_examples():
    assert doctest.testmod(qarray_lib).failed == 0


@pytest.mark.parametrize("name", SPECS)
def test_dequantize_matches_numpy_reference(name):
    _, q = _quantized(name)
    q.validate()
    np.testing.assert_array_equal(np.asarray(dequantize(q)), ref.dequantize(q))
    np.testing.assert_array_equal(np.asarray(q.codes()).astype(np.int64), ref.codes_of(q))
    np.testing.assert_array_equal(np.asarray(q.scale_values()), ref.scale_of(q))


@pytest.mark.parametrize("name", SPECS)
def test_pytree_round_trip_keeps_static_metadata(name):
    _, q = _quantized(name)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, jqtz.QArray)
    assert (back.format, back.shape, back.block_shape, back.dtype) == (
        q.format,
        q.shape,
        q.block_shape,
        q.dtype,
    )
    # Static fields are static: a jitted function sees them as Python values.
    assert jax.jit(lambda q: q.dequantize().shape[0] + len(q.shape))(q) == SHAPE[0] + 2


def test_derived_properties():
    _, q = _quantized("int4-g8-ragged-asym-bf16")
    assert q.ndim == 2 and q.size == SHAPE[0] * SHAPE[1] and q.batch_shape == ()
    assert q.granularity == "g8"
    assert repr(q) == "QArray(uint4, shape=(20, 13), g8, scale=bfloat16, dtype=float32)"
    assert jqtz.is_qarray(q) and not jqtz.is_qarray(jnp.ones(2))
    _, dq = _quantized("nf4-g8-dq")
    assert "scale=quint8" in repr(dq)


def test_granularity_names():
    w = jnp.ones((16, 8))
    names = {
        "tensor": QuantSpec(granularity="tensor"),
        "channel": QuantSpec(),
        "g4": QuantSpec(granularity="group", group_size=4),
        "4x4": QuantSpec(granularity="block", block_shape=(4, 4)),
    }
    for want, spec in names.items():
        assert jqtz.quantize(w, spec).granularity == want


def test_batched_qarray_dequantizes_each_element():
    _, q0 = _quantized("int4-g8-ragged-asym-bf16", seed=0)
    _, q1 = _quantized("int4-g8-ragged-asym-bf16", seed=1)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), q0, q1)
    assert stacked.batch_shape == (2,) and stacked.shape == SHAPE
    assert stacked.size == 2 * q0.size and stacked.nbytes == 2 * q0.nbytes
    stacked.validate()
    np.testing.assert_array_equal(
        np.asarray(stacked.dequantize()), np.stack([ref.dequantize(q0), ref.dequantize(q1)])
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q: dict(qvalue=q.qvalue.astype(jnp.int8)), "qvalue dtype"),
        (lambda q: dict(qvalue=q.qvalue[:, :-1]), "qvalue trailing shape"),
        (lambda q: dict(scale=q.scale[:-1]), "scale trailing shape"),
        (lambda q: dict(zero_point=None), "needs zero_point"),
        (lambda q: dict(zero_point=q.zero_point[:, :1]), "zero_point shape"),
        (lambda q: dict(block_shape=(8,)), "block_shape"),
    ],
    ids=["qvalue-dtype", "qvalue-shape", "scale-shape", "missing-zero", "zero-shape", "block"],
)
def test_validate_names_the_broken_invariant(change, message):
    _, q = _quantized("int4-g8-ragged-asym-bf16")
    broken = dataclasses.replace(q, **change(q))
    with pytest.raises(ValueError, match=message):
        broken.validate()


def test_validate_refuses_zero_point_for_signed_format():
    _, q = _quantized("int8-channel")
    with pytest.raises(ValueError, match="takes no zero_point"):
        dataclasses.replace(q, zero_point=jnp.zeros_like(q.scale, jnp.int8)).validate()


def test_astype_retypes_without_copying():
    _, q = _quantized("int4-g8-ragged-asym-bf16")
    half = q.astype(jnp.float16)
    assert half.qvalue is q.qvalue and half.scale is q.scale and half.zero_point is q.zero_point
    assert half.dtype == np.dtype(jnp.float16) and half.dequantize().dtype == jnp.float16
    np.testing.assert_allclose(half.dequantize(jnp.float32), q.dequantize(jnp.float32))
    assert q.astype(q.dtype) is q
    with pytest.raises(TypeError, match="dequantizes to floats"):
        q.astype(jnp.int8)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "int4", "uint4"])
def test_transposed_codes_keep_the_values(fmt):
    """Codes stored `[N, K]`: same values, codes and metadata; the flag survives pytree
    round trips and jit; converting back restores the original codes."""
    w = jax.random.normal(jax.random.key(0), (3, 40, 24))  # a stack of 3 layers
    unsigned = fmt == "uint4"
    fmt = "int4" if unsigned else fmt
    spec = QuantSpec(format=fmt, symmetric=not unsigned, granularity="group", group_size=8)
    spec = spec if fmt.endswith("int4") else QuantSpec(format=fmt)
    q = jqtz.quantize(w[0], spec)
    t = q.with_transposed_codes()
    stored = (24, 20) if fmt.endswith("int4") else (24, 40)  # 4-bit: packed along K
    assert t.transposed and t.qvalue.shape == stored and t.shape == (40, 24)
    assert t.with_transposed_codes() is t and "transposed" in repr(t)
    np.testing.assert_array_equal(np.asarray(t.codes()), np.asarray(q.codes()))
    np.testing.assert_array_equal(t.dequantize(), q.dequantize())
    back = t.with_transposed_codes(False)
    assert not back.transposed and (back.qvalue == q.qvalue).all()
    leaves, treedef = jax.tree.flatten(t)
    assert jax.tree.unflatten(treedef, leaves).transposed
    np.testing.assert_array_equal(jax.jit(lambda a: a.dequantize())(t), q.dequantize())
    stacked = jax.vmap(lambda a: jqtz.quantize(a, spec))(w)
    st = stacked.with_transposed_codes().validate()
    assert st.batch_shape == (3,) and st.qvalue.shape == (3, *stored)
    np.testing.assert_array_equal(st.dequantize(), stacked.dequantize())


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
def test_transposed_4bit_codes_are_packed_along_k_in_twos_complement(fmt):
    """The stored bytes of a transposed 4-bit array: row n holds column n of the codes, even k
    in the low nibble, as two's complement (unsigned codes minus 8); an odd K pads the last
    byte's high nibble."""
    w = jax.random.normal(jax.random.key(1), (7, 3))
    q = jqtz.quantize(w, QuantSpec(format="int4", symmetric=fmt == "int4"))
    t = q.with_transposed_codes().validate()
    codes = np.asarray(q.codes()).astype(np.int32)  # [7, 3]
    twos = (codes - (0 if fmt == "int4" else 8)) & 15
    stored = np.asarray(t.qvalue)  # [3, 4]
    assert stored.shape == (3, 4)
    np.testing.assert_array_equal(stored[:, :3] & 15, twos[0:6:2].T)
    np.testing.assert_array_equal(stored[:, :3] >> 4, twos[1:7:2].T)
    np.testing.assert_array_equal(stored[:, 3] & 15, twos[6])


def test_transposed_codes_are_refused_where_undefined():
    with pytest.raises(ValueError, match="4-bit integer"):  # 2-bit and NF4 codes: no layout
        jqtz.quantize(jnp.ones((16, 8)), QuantSpec(format="int2")).with_transposed_codes()
    with pytest.raises(ValueError, match="4-bit integer"):
        jqtz.quantize(jnp.ones((16, 8)), QuantSpec(format="nf4")).with_transposed_codes()
    with pytest.raises(ValueError, match="2-D"):
        jqtz.quantize(jnp.ones((4, 4, 4)), QuantSpec(format="int8")).with_transposed_codes()
    q = jqtz.quantize(jnp.ones((16, 8)), QuantSpec(format="int8"))
    with pytest.raises(ValueError, match=r"trailing shape must be \(8, 16\)"):
        dataclasses.replace(q, transposed=True).validate()

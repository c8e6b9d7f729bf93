"""`jqtz.qat.fake_quant`: the forward pass is PTQ's bit for bit; STE, clipped STE and LSQ/LSQ+
gradients match their formulas (checked against numpy); finite everywhere; jit == eager."""

import doctest
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqtz
from jqtz.qat import effective_scale, effective_zero_point, fake_quant, lsq_grad_scale

Q = jqtz.QuantSpec


@pytest.mark.parametrize("module", ["jqtz.qat.ste", "jqtz.qat.lsq", "jqtz.qat.fp8"])
def test_docstring_examples(module):
    assert doctest.testmod(importlib.import_module(module)).failed == 0


def _weights(shape=(24, 10), seed=0):
    w = jax.random.normal(jax.random.key(seed), shape) * jnp.linspace(0.1, 3.0, shape[-1])
    return w.at[:, 0].set(0.0).at[:, 1].set(-0.5)  # an all-zero and a constant channel


# name: spec. Every format, granularity, range choice and scale dtype that PTQ supports.
FORWARD_CASES = {
    "int8-channel": Q(format="int8"),
    "int4-channel": Q(format="int4"),
    "int3-g8": Q(format="int3", granularity="group", group_size=8),
    "int2-g8-asym": Q(format="int2", granularity="group", group_size=8, symmetric=False),
    "int4-g7-ragged-asym": Q(format="int4", granularity="group", group_size=7, symmetric=False),
    "int4-tensor-bf16": Q(format="int4", granularity="tensor", scale_dtype="bfloat16"),
    "int4-block5x4-f16": Q(
        format="int4", granularity="block", block_shape=(5, 4), scale_dtype="float16"
    ),
    "int4-mse": Q(format="int4", clipping="mse", mse_grid=20),
    "int8-percentile-asym": Q(
        format="int8", clipping="percentile", percentile=90.0, symmetric=False
    ),
    "nf4-g8-doublequant": Q(format="nf4", granularity="group", group_size=8, double_quant=True),
    "fp8_e4m3-tensor": Q(format="fp8_e4m3", granularity="tensor"),
    "fp8_e5m2-channel": Q(format="fp8_e5m2"),
}


@pytest.mark.parametrize("spec", FORWARD_CASES.values(), ids=FORWARD_CASES.keys())
def test_forward_is_ptq_bit_for_bit(spec):
    w = _weights()
    got = jax.jit(lambda w: fake_quant(w, spec))(w)
    want = jax.jit(lambda w: jqtz.quantize(w, spec).dequantize())(w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_forward_keeps_dtype_bfloat16():
    w = _weights().astype(jnp.bfloat16)
    spec = Q(format="int4", granularity="group", group_size=8)
    got = fake_quant(w, spec)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jqtz.quantize(w, spec).dequantize()))


@pytest.mark.parametrize(
    "spec",
    [Q(format="int4", scale_dtype="bfloat16"), Q(format="int4", symmetric=False)],
    ids=["int4-sym-bf16", "int4-asym"],
)
def test_learned_forward_is_quantize_with_stored_scales(spec):
    w = _weights()
    learned = jqtz.qat.init_learned_scales({"w": w}, [("w", spec)])["w"]
    s = learned["scale"] * 0.8 + 0.0013  # not representable in bf16: rounded on use
    z = learned.get("zero_point")
    z = None if z is None else z + 0.4  # rounds back
    got = fake_quant(w, spec, scale=s, zero_point=z)
    stored_s = effective_scale(s, spec.scale_dtype).astype(spec.scale_dtype)
    stored_z = None if z is None else effective_zero_point(z, spec.storage_format)
    want = jqtz.quantize(w, spec, scale=stored_s, zero_point=stored_z).dequantize()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --- gradients ---------------------------------------------------------------------------------


def _cotangent(shape):
    return jax.random.normal(jax.random.key(7), shape)


def _vjp(f, *args):
    out, pullback = jax.vjp(f, *args)
    return pullback(_cotangent(out.shape))


def test_ste_is_identity():
    w = _weights()
    spec = Q(format="int4", clipping="mse", mse_grid=20)  # mse ranges clip some weights...
    (g,) = _vjp(lambda w: fake_quant(w, spec), w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(_cotangent(w.shape)))  # ...still 1


def test_clipped_ste_is_zero_outside_the_code_range_only():
    w = _weights()
    spec = Q(format="int4")  # codes -8..7
    s = jnp.full((1, w.shape[1]), 0.25)
    (g,) = _vjp(lambda w: fake_quant(w, spec, scale=s, clipped_ste=True), w)
    u = np.asarray(w) / 0.25
    inside = (u >= -8) & (u <= 7)
    assert 0 < inside.mean() < 1  # both cases occur
    np.testing.assert_array_equal(
        np.asarray(g), np.where(inside, np.asarray(_cotangent(w.shape)), 0.0)
    )
    # and the PTQ ("max") range clips nothing, so the clipped STE is the identity there
    (g,) = _vjp(lambda w: fake_quant(w, spec, clipped_ste=True), w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(_cotangent(w.shape)))


def _lsq_reference(w, c, s, z, qmin, qmax, gscale):
    """LSQ (Esser et al.) and LSQ+ (Bhalgat et al.) gradients, derived by hand, in numpy:
    q = (clip(round(w/s + z)) - z) * s; dq/ds = Q - u inside, Q - z outside; dq/dz = -s outside."""
    w, c, s = (np.asarray(a, np.float32) for a in (w, c, s))
    z = np.zeros_like(s) if z is None else np.clip(np.round(np.asarray(z, np.float32)), 0, qmax)
    u = (w / s + z).astype(np.float32)
    q = np.clip(np.round(u), qmin, qmax)
    inside = (u >= qmin) & (u <= qmax)
    ds = (c * np.where(inside, q - u, q - z)).sum(axis=0, keepdims=True) * gscale
    dz = (c * np.where(inside, 0.0, -s)).sum(axis=0, keepdims=True) * gscale
    return ds, dz, np.where(inside, c, 0.0), inside


@pytest.mark.parametrize("symmetric", [True, False], ids=["lsq-int4", "lsqplus-uint4"])
def test_lsq_gradient_matches_formula(symmetric):
    w = _weights()
    spec = Q(format="int4", symmetric=symmetric)
    learned = jqtz.qat.init_learned_scales({"w": w}, [("w", spec)])["w"]
    s = learned["scale"] * 0.6  # smaller than the range: some weights clip
    z = None if symmetric else learned["zero_point"] + 1.3

    def f(w, s, z):
        return fake_quant(w, spec, scale=s, zero_point=z, clipped_ste=True)

    gw, gs, gz = _vjp(f, w, s, z)
    c = _cotangent(w.shape)
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    gscale = 1 / np.sqrt(w.shape[0] * (7 if symmetric else 15))
    assert lsq_grad_scale(spec, w.shape) == pytest.approx(gscale)
    ds, dz, dx, inside = _lsq_reference(w, c, s, z, qmin, qmax, gscale)
    assert 0 < inside.mean() < 1
    np.testing.assert_allclose(np.asarray(gs), ds, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(gw), dx)
    if symmetric:
        assert gz is None
    else:
        np.testing.assert_allclose(np.asarray(gz), dz, rtol=1e-5, atol=1e-6)


FINITE_SPECS = {
    "int4": Q(format="int4"),
    "int2-asym": Q(format="int2", symmetric=False),
    "fp8_e4m3": Q(format="fp8_e4m3"),
    "nf4": Q(format="nf4"),
}


@pytest.mark.parametrize("spec", FINITE_SPECS.values(), ids=FINITE_SPECS.keys())
def test_gradients_finite_everywhere(spec):
    x = jnp.array([[0.0, 0.0, 1e-30, -1e30], [0.0, 3.0, -2.0, 1e30], [0.0, -1e-38, 5.0, 0.0]])
    n = jqtz.quantize(x, spec).scale.shape
    for s in (None, jnp.zeros(n), -jnp.ones(n), jnp.full(n, 1e-30), jnp.full(n, 1e30)):
        z = None if s is None or spec.symmetric else jnp.full(n, -3.0)
        for clipped in (False, True):
            f = functools.partial(_fq, spec=spec, clipped_ste=clipped)
            for a in (f(x, s, z), *jax.tree.leaves(_vjp(f, x, s, z))):
                assert bool(jnp.all(jnp.isfinite(a))), (s, clipped)


def _fq(x, s, z, *, spec, clipped_ste):
    return fake_quant(x, spec, scale=s, zero_point=z, clipped_ste=clipped_ste)


def test_jit_equals_eager():
    w = _weights()
    spec = Q(format="int3", granularity="group", group_size=8, symmetric=False)
    learned = jqtz.qat.init_learned_scales({"w": w}, [("w", spec)])["w"]
    s, z = learned["scale"] * 0.7, learned["zero_point"]

    def f(w, s, z):
        out, pullback = jax.vjp(functools.partial(_fq, spec=spec, clipped_ste=True), w, s, z)
        return out, pullback(_cotangent(out.shape))

    (out, (gw, gs, gz)), (out_j, (gw_j, gs_j, gz_j)) = f(w, s, z), jax.jit(f)(w, s, z)
    # Elementwise results agree bit for bit; the scale gradients are sums over each block, which
    # XLA orders differently once fused: they agree to float32 rounding.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_j))
    np.testing.assert_array_equal(np.asarray(gw), np.asarray(gw_j))
    np.testing.assert_allclose(np.asarray(gs), np.asarray(gs_j), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gz), np.asarray(gz_j), rtol=1e-6, atol=1e-7)


def test_bad_input():
    w = _weights()
    with pytest.raises(TypeError, match="floating point"):
        fake_quant(jnp.ones((4, 4), jnp.int32), Q(format="int8"))
    with pytest.raises(ValueError, match="without `scale`"):
        fake_quant(w, Q(format="int8", symmetric=False), zero_point=jnp.zeros((1, 10)))
    with pytest.raises(ValueError, match="required"):
        fake_quant(w, Q(format="int8", symmetric=False), scale=jnp.ones((1, 10)))
    with pytest.raises(ValueError, match="does not broadcast"):
        fake_quant(w, Q(format="int8"), scale=jnp.ones((3, 10)))
    with pytest.raises(NotImplementedError, match="double_quant"):
        fake_quant(w, Q(format="nf4", double_quant=True), scale=jnp.ones((1, 10)))

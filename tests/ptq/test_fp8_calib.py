"""FP8 recipes: the three modes on a small linen model, and static calibration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jqtz
from jqtz.ptq.fp8 import MODES, calibrate_fp8, fp8_spec


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, T, 256)
        x = jax.nn.gelu(nn.Dense(384, name="up")(x))
        return nn.Dense(256, name="down")(x)


@pytest.fixture(scope="module")
def setup():
    model = MLP()
    batches = [jax.random.normal(jax.random.key(i), (2, 8, 256)) * (1.0 + i) for i in range(3)]
    params = model.init(jax.random.key(0), batches[0])
    test_x = jax.random.normal(jax.random.key(9), (2, 8, 256)) * 2.0
    return model, params, batches, test_x


def _rel(y, ref):
    return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


@pytest.fixture(scope="module")
def quantized(setup):
    """`{mode: qparams}`, calibrated on `batches` for the static mode."""
    model, params, batches, _ = setup
    out = {}
    for mode in MODES:
        q = jqtz.quantize_params(params, [(r".*/kernel", fp8_spec(mode))])
        out[mode] = calibrate_fp8(model.apply, q, batches) if mode == "static-per-tensor" else q
    return out


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_runs_with_small_error(setup, quantized, mode, jit):
    model, params, _, x = setup
    q = quantized[mode]
    apply = jax.jit(model.apply) if jit else model.apply
    with jqtz.nn.quantized_ops():
        y = apply(q, x)
    assert _rel(y, model.apply(params, x)) < 0.06


def test_static_scales_are_amax_over_the_calibration_batches(setup, quantized):
    _, params, batches, _ = setup
    q = quantized["static-per-tensor"]["params"]
    amax = max(float(jnp.abs(b).max()) for b in batches)
    assert q["up"]["kernel"].act_scale.size == 1
    np.testing.assert_allclose(float(q["up"]["kernel"].act_scale.squeeze()), amax / 448, rtol=1e-6)
    # `down` saw gelu(up(x)) through the quantized `up`: close to the float range.
    h_amax = max(
        float(
            jnp.abs(jax.nn.gelu(nn.Dense(384).apply({"params": params["params"]["up"]}, b))).max()
        )
        for b in batches
    )
    np.testing.assert_allclose(
        float(q["down"]["kernel"].act_scale.squeeze()) * 448, h_amax, rtol=0.1
    )


def test_static_scale_clips_beyond_the_calibrated_range(setup, quantized):
    model, _, _, x = setup
    q = quantized["static-per-tensor"]
    big = 10.0 * x  # 10x past the calibrated range: saturates at 448 * scale, no NaN
    with jqtz.nn.quantized_ops():
        y = model.apply(q, big)
    assert bool(jnp.all(jnp.isfinite(y)))
    dyn = quantized["dynamic-per-token"]
    with jqtz.nn.quantized_ops():
        y_dyn = model.apply(dyn, big)
    assert _rel(y, y_dyn) > 0.1


def test_static_scale_serves_inputs_of_another_rank(setup, quantized):
    model, params, _, x = setup
    q = quantized["static-per-tensor"]  # calibrated on (B, T, D)
    x2 = x.reshape(16, 256)
    with jqtz.nn.quantized_ops():
        y = model.apply(q, x2)
    assert _rel(y, model.apply(params, x2)) < 0.06


@pytest.mark.parametrize(
    "mode,codes_product",
    [("static-per-tensor", True), ("dynamic-per-token", True), ("block128", False)],
)
def test_products_on_codes_or_simulated(setup, quantized, mode, codes_product):
    x = setup[3]
    q = quantized[mode]["params"]["up"]["kernel"]
    f = lambda x, q: jqtz.nn.dot_general(x, q, (((2,), (0,)), ((), ())))
    dots = [e for e in jax.make_jaxpr(f)(x, q).eqns if e.primitive.name == "dot_general"]
    operands = {str(v.aval.dtype) for e in dots for v in e.invars}
    assert operands == ({"float8_e4m3fn"} if codes_product else {"float32"})
    # Either way: the input quantized as the activation spec says, times the dequantized weight.
    scale = q.act_scale
    xq = jqtz.quantize(x, q.act, scale=scale).dequantize()
    want = jnp.einsum("btd,dn->btn", xq, q.dequantize())
    np.testing.assert_allclose(f(x, q), want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_block128_specs():
    spec = fp8_spec("block128")
    assert spec.block_shape == (128, 128) and spec.format == "fp8_e4m3"
    assert spec.activation == jqtz.QuantSpec(
        format="fp8_e4m3", granularity="group", group_size=128, axis=-1
    )
    w = jax.random.normal(jax.random.key(0), (256, 384))
    assert jqtz.quantize(w, spec).scale.shape == (2, 3)
    assert fp8_spec("dynamic-per-token", format="fp8_e5m2").activation.format == "fp8_e5m2"


def test_errors_name_the_problem(setup):
    model, params, batches, _ = setup
    with pytest.raises(ValueError, match="mode"):
        fp8_spec("per-token")
    with pytest.raises(ValueError, match="format"):
        fp8_spec(format="int8")
    with pytest.raises(ValueError, match="block"):
        fp8_spec("block128", block=0)
    dyn = jqtz.quantize_params(params, fp8_spec("dynamic-per-token"))
    with pytest.raises(ValueError, match="params/down/kernel"):
        calibrate_fp8(model.apply, dyn, batches)
    weight_only = jqtz.quantize_params(params, jqtz.QuantSpec(format="fp8_e4m3"))
    with pytest.raises(ValueError, match="no weight with FP8 activations"):
        calibrate_fp8(model.apply, weight_only, batches)

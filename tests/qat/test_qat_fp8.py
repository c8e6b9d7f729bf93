"""FP8 (e4m3) fake quantization with current and delayed scaling, in a jitted training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jqtz
import jqtz.qat as qat

F8 = jqtz.QuantSpec(format="fp8_e4m3", granularity="tensor", axis=-1)
SPEC = jqtz.QuantSpec(format="fp8_e4m3", granularity="tensor", activation=F8)
RULES = ((r".*kernel", SPEC),)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(jax.nn.gelu(nn.Dense(32, name="hidden")(x)))


@pytest.fixture(scope="module")
def net():
    x = jax.random.normal(jax.random.key(1), (16, 8)) * 3.0
    model = Net()
    return model, jax.jit(model.init)(jax.random.key(0), x), x


def test_delayed_equals_current_when_the_history_holds_the_current_amax(net):
    _, params, _ = net
    w = params["params"]["hidden"]["kernel"]
    history = qat.init_amax_history(params, RULES, length=3)
    history = qat.update_amax_history(history, params)
    assert float(history["params"]["hidden"]["kernel"]["weight"][0]) == float(jnp.abs(w).max())
    current = qat.fake_quant_params(params, RULES)
    delayed = qat.fake_quant_params(params, RULES, amax_history=history)
    for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(delayed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_delayed_scale_saturates_and_clipped_ste_masks(net):
    _, params, _ = net
    w = params["params"]["hidden"]["kernel"]
    amax = float(jnp.abs(w).max())
    history = qat.init_amax_history(params, RULES, length=2)
    history["params"]["hidden"]["kernel"]["weight"] = jnp.array([0.5 * amax, 0.1])
    fq, vjp = jax.vjp(
        lambda p: qat.fake_quant_params(p, RULES, amax_history=history, clipped_ste=True), params
    )
    got = fq["params"]["hidden"]["kernel"]
    big = jnp.abs(w) > 0.5 * amax
    assert bool(big.any()) and bool(jnp.all(jnp.abs(got[big]) == jnp.abs(got).max()))
    assert float(jnp.abs(got).max()) == pytest.approx(0.5 * amax, rel=1e-6)
    (g,) = vjp(jax.tree.map(jnp.ones_like, fq))
    np.testing.assert_array_equal(np.asarray(g["params"]["hidden"]["kernel"]), np.where(big, 0, 1))


def test_history_rolls_newest_first():
    h = jnp.array([3.0, 2.0, 1.0])
    params = {"d": {"kernel": jnp.full((2, 2), -5.0)}}
    rules = [(".*", jqtz.QuantSpec(format="fp8_e4m3", granularity="tensor"))]
    history = {"d": {"kernel": {"weight": h}}}
    new = qat.update_amax_history(history, params)
    assert new["d"]["kernel"]["weight"].tolist() == [5.0, 3.0, 2.0]
    s = qat.delayed_scale(new["d"]["kernel"]["weight"], 0.0, rules[0][1])
    assert float(s) == pytest.approx(5.0 / 448)


def test_delayed_scaling_training_loop_under_jit(net):
    model, params, x = net
    y = jnp.sin(x[:, :4])
    history = qat.init_amax_history(params, RULES, length=4)
    tx = optax.adam(1e-2)

    def loss_fn(params, history):
        fq = qat.fake_quant_params(params, RULES, amax_history=history)
        with qat.fake_quant_activations(RULES, amax_history=history) as acts:
            loss = jnp.mean((model.apply(fq, x) - y) ** 2)
        return loss, acts.input_amax

    @jax.jit
    def step(params, opt_state, history):
        (loss, input_amax), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, history)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, qat.update_amax_history(history, params, input_amax), loss

    opt_state, losses = tx.init(params), []
    for _ in range(6):
        params, opt_state, history, loss = step(params, opt_state, history)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    inputs = history["params"]["hidden"]["kernel"]["input"]
    assert bool(jnp.all(inputs > 0))
    np.testing.assert_allclose(float(inputs[0]), float(jnp.abs(x).max()), rtol=1e-6)


def test_fp8_errors(net):
    _, params, _ = net
    with pytest.raises(ValueError, match="no parameter selected"):
        qat.init_amax_history(params, [(".*kernel", jqtz.QuantSpec(format="int8"))])
    with pytest.raises(ValueError, match="positive int"):
        qat.init_amax_history(params, RULES, length=0)
    history = qat.init_amax_history(params, RULES)
    with pytest.raises(ValueError, match="no input amax recorded"):
        qat.update_amax_history(history, params, {})

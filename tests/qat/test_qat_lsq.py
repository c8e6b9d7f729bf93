"""Learned scale trees: initialisation as PTQ, calibrated static activation scales, optax labels,
LSQ gradients reaching weight and activation step sizes through a model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jqtz
import jqtz.qat as qat

Q = jqtz.QuantSpec
A8_STATIC = Q(format="int8", granularity="tensor", axis=-1)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(32, name="hidden")(x))
        return nn.Dense(4, name="out", use_bias=False)(nn.LayerNorm(name="norm")(x))


@pytest.fixture(scope="module")
def net():
    x = jax.random.normal(jax.random.key(1), (16, 8))
    model = Net()
    return model, jax.jit(model.init)(jax.random.key(0), x), x


def test_init_is_ptq_and_skips_kept_parameters(net):
    _, params, _ = net
    rules = [(r".*kernel", Q(format="int4", granularity="group", group_size=4, symmetric=False))]
    learned = qat.init_learned_scales(params, rules)
    assert set(learned["params"]) == {"hidden", "out"}  # not the norm, not biases
    q = jqtz.quantize_params(params, rules)["params"]["hidden"]["kernel"]
    entry = learned["params"]["hidden"]["kernel"]
    np.testing.assert_array_equal(entry["scale"], q.scale)
    np.testing.assert_array_equal(entry["zero_point"], q.zero_point.astype(np.float32))
    # Step 0 of QAT is RTN, bit for bit.
    fq = qat.fake_quant_params(params, rules, learned=learned)
    ptq = qat.fake_quant_params(params, rules)
    for a, b in zip(jax.tree.leaves(fq), jax.tree.leaves(ptq), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_calibrated_activation_scales_are_learned(net):
    model, params, x = net
    rules = [(r".*kernel", Q(format="int8", activation=A8_STATIC))]
    calibrated = jqtz.nn.calibrate_activations(
        model.apply, jqtz.quantize_params(params, rules), [x]
    )
    learned = qat.init_learned_scales(params, rules, act_scales=calibrated)
    act = learned["params"]["hidden"]["kernel"]["act_scale"]
    assert act.shape == () and float(act) == pytest.approx(float(jnp.abs(x).max()) / 127)

    def loss(learned):
        with qat.fake_quant_activations(rules, learned):
            out = model.apply(qat.fake_quant_params(params, rules, learned=learned), x)
        return jnp.mean(out**2)

    grads = jax.jit(jax.grad(loss))(learned)
    for layer in ("hidden", "out"):
        entry = grads["params"][layer]["kernel"]
        assert float(jnp.abs(entry["act_scale"])) > 0, layer
        assert float(jnp.abs(entry["scale"]).max()) > 0, layer


def test_partition_labels(net):
    _, params, _ = net
    rules = [(r".*kernel", Q(format="int4", symmetric=False))]
    learned = qat.init_learned_scales(params, rules)
    p_labels, l_labels = qat.partition_labels(params, learned, zero_point_label="zeros")
    assert set(jax.tree.leaves(p_labels)) == {"params"}
    assert l_labels["params"]["out"]["kernel"] == {"scale": "scales", "zero_point": "zeros"}
    tx = optax.multi_transform(
        {"params": optax.sgd(0.1), "scales": optax.sgd(0.1), "zeros": optax.set_to_zero()},
        (p_labels, l_labels),
    )
    grads = jax.tree.map(jnp.ones_like, (params, learned))
    updates, _ = tx.update(grads, tx.init((params, learned)), (params, learned))
    out = updates[1]["params"]["out"]["kernel"]
    assert float(jnp.abs(out["scale"]).min()) > 0 and float(jnp.abs(out["zero_point"]).max()) == 0


def test_errors(net):
    _, params, _ = net
    with pytest.raises(NotImplementedError, match="double_quant"):
        qat.init_learned_scales(params, [(r".*kernel", Q(format="nf4", double_quant=True))])
    with pytest.raises(TypeError, match="parameter paths"):
        qat.fake_quant_params(params, Q(format="int8"), learned={"scale": jnp.ones(())})
    learned = {"params": {"out": {"kernel": {"bogus": jnp.ones(())}}}}
    with pytest.raises(ValueError, match="bogus"):
        qat.partition_labels(params, learned)

"""QAT of stacked layers (Rule `batch_dims`, as `nn.scan` stores them): each layer is fake-
quantized, given learned scales and converted on its own, as `quantize_params` quantizes it."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jqtz
import jqtz.qat as qat

SPEC = jqtz.QuantSpec(format="int4", granularity="group", group_size=32, symmetric=False)
LAYERS = 3
RULES = [jqtz.Rule(r"layers/kernel", SPEC, batch_dims=1), jqtz.Rule(r"out/kernel", SPEC)]


def _stacked():
    """Three 64 x 64 layers of different ranges, and an unstacked 64 x 8 one."""
    ks = jax.random.split(jax.random.key(0), 2)
    w = jax.random.normal(ks[0], (LAYERS, 64, 64)) / 8 * jnp.arange(1, LAYERS + 1)[:, None, None]
    return {"layers": {"kernel": w}, "out": {"kernel": jax.random.normal(ks[1], (64, 8)) / 8}}


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(32)(x)), None


class Scanned(nn.Module):
    """Four `Layer`s under `nn.scan`: kernels `[4, 32, 32]`."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=4)  # fmt: skip
        return stack()(x, None)[0]


def _per_layer(fn, params):
    """`fn(params, rules)` for each layer alone (an unstacked rule), stacked back."""
    rules = [jqtz.Rule(r"layers/kernel", SPEC), RULES[1]]
    layer = lambda i: {"layers": {"kernel": params["layers"]["kernel"][i]}, "out": params["out"]}
    outs = [fn(layer(i), rules) for i in range(LAYERS)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def test_fake_quant_is_per_layer_and_matches_ptq():
    params = _stacked()
    fq = qat.fake_quant_params(params, RULES)
    want = _per_layer(lambda p, r: qat.fake_quant_params(p, r), params)
    np.testing.assert_array_equal(fq["layers"]["kernel"], want["layers"]["kernel"])
    ptq = jqtz.dequantize_params(jqtz.quantize_params(params, RULES))
    np.testing.assert_array_equal(fq["layers"]["kernel"], ptq["layers"]["kernel"])


def test_learned_scales_train_and_convert_per_layer():
    params = _stacked()
    learned = qat.init_learned_scales(params, RULES)
    entry = learned["layers"]["kernel"]
    want = _per_layer(lambda p, r: qat.init_learned_scales(p, r), params)["layers"]["kernel"]
    assert entry["scale"].shape == (LAYERS, 2, 64)
    np.testing.assert_array_equal(entry["scale"], want["scale"])
    np.testing.assert_array_equal(entry["zero_point"], want["zero_point"])
    # A few optax steps on a loss through the fake-quantized stack: each layer's scales move.
    x = jax.random.normal(jax.random.key(2), (16, 64))

    def loss(params, learned):
        fq = qat.fake_quant_params(params, RULES, learned=learned)
        h = x
        for i in range(LAYERS):
            h = jnp.tanh(h @ fq["layers"]["kernel"][i])
        return jnp.mean((h @ fq["out"]["kernel"] - 1.0) ** 2)

    opt = optax.adam(1e-2)
    state = opt.init((params, learned))
    trained = (params, learned)
    for _ in range(3):
        grads = jax.grad(lambda pl: loss(*pl))(trained)
        updates, state = opt.update(grads, state)
        trained = optax.apply_updates(trained, updates)
    params2, learned2 = trained
    moved = jnp.abs(learned2["layers"]["kernel"]["scale"] - entry["scale"]).max(axis=(1, 2))
    assert bool((moved > 0).all()), moved
    # Serving parity: the converted stack dequantizes to the trained fake-quantized weights.
    q = qat.convert(params2, RULES, learned2)
    served = q["layers"]["kernel"]
    assert isinstance(served, jqtz.QArray) and served.batch_shape == (LAYERS,)
    fq = qat.fake_quant_params(params2, RULES, learned=learned2)
    np.testing.assert_array_equal(served.dequantize(), fq["layers"]["kernel"])


def test_scanned_linen_model_trains_under_jit():
    """`nn.scan` over 4 Dense layers: one jitted QAT step through the fake-quantized stack."""

    x = jax.random.normal(jax.random.key(0), (8, 32))
    params = Scanned().init(jax.random.key(1), x)
    rules = [jqtz.Rule(r".*/kernel", SPEC, batch_dims=1)]
    learned = qat.init_learned_scales(params, rules)

    @jax.jit
    def step(params, learned):
        def loss(params, learned):
            fq = qat.fake_quant_params(params, rules, learned=learned)
            return jnp.mean(Scanned().apply(fq, x) ** 2)

        return jax.value_and_grad(loss, argnums=(0, 1))(params, learned)

    value, (_, gl) = step(params, learned)
    assert bool(jnp.isfinite(value))
    g = jax.tree.leaves(gl)[0]
    assert g.shape[0] == 4 and bool((jnp.abs(g).sum(axis=tuple(range(1, g.ndim))) > 0).all())
    with jqtz.nn.quantized_ops():
        served = Scanned().apply(qat.convert(params, rules, learned), x)
    trained = Scanned().apply(qat.fake_quant_params(params, rules, learned=learned), x)
    np.testing.assert_allclose(served, trained, rtol=1e-5, atol=1e-5)


def test_scanned_w8a8_activations_serve_what_they_trained():
    """Dynamic activation fake quantization inside `nn.scan` (W8A8, per-layer weights): the
    converted stack served with `quantized_ops` gives the training forward's outputs."""
    from jqtz.ptq import default_spec

    x = jax.random.normal(jax.random.key(0), (8, 32))
    params = Scanned().init(jax.random.key(1), x)
    rules = [jqtz.Rule(r".*/kernel", default_spec("smoothquant"), batch_dims=1)]
    with qat.fake_quant_activations(rules):
        trained = Scanned().apply(qat.fake_quant_params(params, rules), x)
    with jqtz.nn.quantized_ops():
        served = Scanned().apply(qat.convert(params, rules), x)
    np.testing.assert_allclose(served, trained, rtol=1e-5, atol=1e-5)
    plain = Scanned().apply(params, x)
    assert float(jnp.abs(trained - plain).max()) > 1e-4  # the activations were quantized


def test_unsupported_stacked_state_is_refused_by_name():
    params = _stacked()
    fp8 = jqtz.QuantSpec(format="fp8_e4m3", granularity="tensor")
    with pytest.raises(ValueError, match=r"FP8 delayed scaling.*'layers/kernel' is stacked"):
        qat.init_amax_history(params, [jqtz.Rule(r"layers/kernel", fp8, batch_dims=1)])
    learned = qat.init_learned_scales(params, RULES)
    learned["layers"]["kernel"]["act_scale"] = jnp.ones(())
    with pytest.raises(ValueError, match=r"activation range.*'layers/kernel' is stacked"):
        qat.fake_quant_params(params, RULES, learned=learned)


def test_calibrated_ranges_of_stacked_layers_are_refused_by_name():
    from jqtz.ptq import default_spec

    params = _stacked()
    rules = [jqtz.Rule(r"layers/kernel", default_spec("smoothquant"), batch_dims=1)]
    q = jqtz.quantize_params(params, rules)
    q["layers"]["kernel"] = dataclasses.replace(q["layers"]["kernel"], act_scale=jnp.ones(()))
    with pytest.raises(ValueError, match=r"activation range.*'layers/kernel' is stacked"):
        qat.init_learned_scales(params, rules, act_scales=q)

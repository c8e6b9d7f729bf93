"""Static activation ranges from calibration batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jqtz

STATIC = jqtz.QuantSpec(format="int8", granularity="tensor", axis=-1)


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x, use_second=True):
        x = jax.nn.relu(nn.Dense(32, name="first")(x))
        return nn.Dense(8, name="second")(x) if use_second else x


@pytest.fixture(scope="module")
def setup():
    model = TwoLayer()
    params = model.init(jax.random.key(0), jnp.ones((1, 16)))
    q = jqtz.quantize_params(params, jqtz.QuantSpec(format="int8", activation=STATIC))
    batches = [3.0 * jax.random.normal(jax.random.key(i), (4, 16)) for i in range(3)]
    return model, params, q, batches


def test_scales_cover_the_range_of_all_batches(setup):
    model, params, q, batches = setup
    cq = jqtz.nn.calibrate_activations(model.apply, q, batches)
    amax = max(float(jnp.abs(b).max()) for b in batches)
    first = cq["params"]["first"]["kernel"].act_scale
    np.testing.assert_allclose(float(first.squeeze()), amax / 127, rtol=1e-6)
    # The second layer saw the relu outputs of the first: non-negative, a different range.
    assert float(cq["params"]["second"]["kernel"].act_scale.squeeze()) != pytest.approx(amax / 127)
    with jqtz.nn.quantized_ops():
        y = jax.jit(model.apply)(cq, batches[0])
    ref = model.apply(params, batches[0])
    assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 0.03


def test_layers_that_see_no_input_are_named(setup):
    model, _, q, batches = setup
    with pytest.raises(ValueError, match="second/kernel"):
        jqtz.nn.calibrate_activations(lambda p, x: model.apply(p, x, use_second=False), q, batches)


def test_no_batches_is_an_error(setup):
    model, _, q, _ = setup
    with pytest.raises(ValueError, match="empty"):
        jqtz.nn.calibrate_activations(model.apply, q, [])

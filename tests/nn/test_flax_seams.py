"""Unmodified linen and NNX models on quantized trees: the interceptor, the NNX seam, the
`__jax_array__` fallback, and the transformations they must survive."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.errors import ScopeParamShapeError
from jax.sharding import Mesh, PartitionSpec

import jqtz


class Tiny(nn.Module):
    """Embed -> Dense -> DenseGeneral -> tied head: every module jqtz intercepts."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(50, 64, name="embed_tokens")
        x = embed(ids)
        x = jax.nn.silu(nn.Dense(128, name="up")(x))
        x = nn.DenseGeneral((4, 16), name="proj")(x).reshape(*ids.shape, 64)
        return embed.attend(x)


IDS = jnp.arange(12).reshape(2, 6) % 50
W8A8 = jqtz.QuantSpec(format="int8", activation=jqtz.QuantSpec(format="int8", axis=-1))
W4 = jqtz.QuantSpec(format="int4", granularity="group", group_size=32)


@pytest.fixture(scope="module")
def tiny():
    model = Tiny()
    return model, model.init(jax.random.key(0), IDS)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_weight_only_model_equals_model_on_dequantized_params(tiny):
    model, params = tiny
    q = jqtz.quantize_params(params, [jqtz.Rule(".*", W4, force=True)])
    with jqtz.nn.quantized_ops():
        got = jax.jit(model.apply)(q, IDS)
    want = model.apply(jqtz.dequantize_params(q), IDS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert 0 < _rel(got, model.apply(params, IDS)) < 0.5


@pytest.mark.parametrize("spec", [W4, W8A8], ids=["w4-g32", "w8a8"])
def test_compute_dtype_is_flax_s(spec):
    """Modules with `dtype=bfloat16` return bfloat16 on quantized params, as flax does on float
    ones (its `promote_dtype` casts the kernel to the compute dtype; jqtz re-types the QArray),
    so activations stay 16-bit between layers, linen and NNX alike."""
    bf16 = nn.Dense(128, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (2, 64))
    params = bf16.init(jax.random.key(0), x)
    q = jqtz.quantize_params(params, [jqtz.Rule(".*kernel", spec)])
    want = bf16.apply(jqtz.dequantize_params(q), x)
    with jqtz.nn.quantized_ops():
        got = bf16.apply(q, x)
        embed = nn.Embed(50, 64, dtype=jnp.bfloat16)
        table = jqtz.quantize_params(
            embed.init(jax.random.key(2), IDS), [jqtz.Rule(".*", W4, force=True)]
        )
        logits = embed.apply(table, x[:, None, :].astype(jnp.bfloat16), method=nn.Embed.attend)
    assert got.dtype == want.dtype == jnp.bfloat16 and logits.dtype == jnp.bfloat16
    assert _rel(got.astype(jnp.float32), want.astype(jnp.float32)) < 0.03
    linear = nnx.Linear(64, 128, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(linear)
    qstate = jqtz.quantize_params(state, [jqtz.Rule(".*kernel", spec)])
    qlinear = jqtz.nn.use_quantized_ops(nnx.merge(graphdef, qstate))
    assert qlinear(x).dtype == linear(x).dtype == jnp.bfloat16


def test_w8a8_model_uses_int8_products(tiny):
    model, params = tiny
    q = jqtz.quantize_params(params, W8A8)
    with jqtz.nn.quantized_ops():
        jaxpr = str(jax.make_jaxpr(model.apply)(q, IDS))
        got = jax.jit(model.apply)(q, IDS)
    assert jaxpr.count("preferred_element_type=int32") == 2  # up and proj; embed stays fp
    assert _rel(got, model.apply(params, IDS)) < 0.03


def test_interception_is_scoped(tiny):
    model, params = tiny
    q = jqtz.quantize_params(params, W8A8)
    with jqtz.nn.quantized_ops():
        pass
    # Outside the block the model runs on the __jax_array__ fallback: float products only.
    jaxpr = str(jax.make_jaxpr(model.apply)(q, IDS))
    assert "int32" not in jaxpr
    # ... and packed formats hit linen's parameter shape check, as documented.
    q4 = jqtz.quantize_params(params, W4)
    with pytest.raises(ScopeParamShapeError):
        model.apply(q4, IDS)


def test_transformations(tiny):
    model, params = tiny
    q = jqtz.quantize_params(params, W4)
    with jqtz.nn.quantized_ops():
        base = model.apply(q, IDS)
        batched = jax.vmap(lambda i: model.apply(q, i))(IDS[:, None, :])[:, 0]
        grad = jax.grad(lambda p: model.apply(p, IDS).sum(), allow_int=True)(q)
        mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
        sharded = jax.shard_map(
            lambda i: model.apply(q, i),
            mesh=mesh,
            in_specs=PartitionSpec("x"),
            out_specs=PartitionSpec("x"),
        )(IDS)
    np.testing.assert_allclose(batched, base, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded, base, rtol=1e-5, atol=1e-5)
    # Gradients reach the full-precision leaves (the embedding) and are finite.
    g = grad["params"]["embed_tokens"]["embedding"]
    assert g.shape == (50, 64) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


class TinyNNX(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.l2 = nnx.Linear(128, 8, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def test_nnx_fallback_and_seam():
    model = TinyNNX(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 64))
    want = model(x)
    graphdef, state = nnx.split(model)
    qstate = jqtz.quantize_params(state, W8A8)
    qmodel = nnx.merge(graphdef, qstate)
    fallback = qmodel(x)  # __jax_array__: dequantized weights, float products
    assert _rel(fallback, want) < 0.02
    jqtz.nn.use_quantized_ops(qmodel)
    f = nnx.jit(lambda m, x: m(x))
    got = f(qmodel, x)
    assert "preferred_element_type=int32" in str(jax.make_jaxpr(lambda x: qmodel(x))(x))
    assert _rel(got, want) < 0.03
    # The quantized state was not copied: the module holds the very same buffers.
    assert qmodel.l1.kernel.get_value().qvalue is qstate["l1"]["kernel"].get_value().qvalue


class EinsumModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((4, 16, 8), "btd,dhk->bthk", name="heads")(x)


@pytest.mark.parametrize("spec", [W4, W8A8], ids=["w4-g32", "w8a8"])
def test_linen_einsum(spec):
    model = EinsumModel()
    x = jax.random.normal(jax.random.key(1), (2, 3, 4))
    params = model.init(jax.random.key(0), x)
    q = jqtz.quantize_params(
        params, jqtz.QuantSpec(**{**spec.__dict__, "group_size": None, "granularity": "channel"})
    )
    with jqtz.nn.quantized_ops():
        got = jax.jit(model.apply)(q, x)
    assert got.shape == (2, 3, 16, 8)
    assert _rel(got, model.apply(params, x)) < 0.2


class NNXZoo(nnx.Module):
    """Every NNX layer the issue names, on the __jax_array__ fallback."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(50, 32, rngs=rngs)
        self.general = nnx.LinearGeneral(32, (4, 8), rngs=rngs)
        self.einsum = nnx.Einsum("btd,dk->btk", (32, 16), rngs=rngs)
        self.linear = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = self.general(x).reshape(*ids.shape, 32)
        return self.linear(self.einsum(x))


def test_nnx_layers_run_on_packed_quantized_state():
    model = NNXZoo(nnx.Rngs(0))
    want = model(IDS)
    graphdef, state = nnx.split(model)
    qstate = jqtz.quantize_params(
        state,
        [jqtz.Rule(".*(kernel|embedding)", jqtz.QuantSpec(format="int4", axis=0), force=True)],
    )
    assert (
        sum(isinstance(x, jqtz.QArray) for x in jax.tree.leaves(qstate, is_leaf=jqtz.is_qarray))
        == 4
    )
    got = nnx.jit(lambda m, i: m(i))(nnx.merge(graphdef, qstate), IDS)
    assert got.shape == want.shape
    assert 0 < _rel(got, want) < 0.5


@pytest.mark.parametrize(
    "einsum_str,ndim,axes",
    [("btd,dhk->bthk", 3, (2,)), ("...d,dk->...k", 4, (3,)), ("bhd,hdk->bk", 3, (1, 2)),
     ("bhd,bdk->bhk", 3, (2,)), ("d...,dk->...k", 3, (0,))],
)  # fmt: skip
def test_einsum_contracted_axes(einsum_str, ndim, axes):
    from jqtz.nn.flax_seams import _einsum_contracted_axes

    assert _einsum_contracted_axes(einsum_str, ndim) == axes

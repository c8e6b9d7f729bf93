"""`quantize_params` / `dequantize_params` on dicts, NNX states and a real checkpoint."""

import doctest
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jqtz
from jqtz.spec import QuantSpec

from . import _reference as ref

INT8 = QuantSpec(format="int8")
INT4 = QuantSpec(format="int4", granularity="group", group_size=16, scale_dtype="bfloat16")


def _params(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return {
        "params": {
            "dense_0": {"kernel": jax.random.normal(keys[0], (32, 24)), "bias": jnp.zeros(24)},
            "dense_1": {"kernel": jax.random.normal(keys[1], (24, 40)), "bias": jnp.ones(40)},
            "norm": {"scale": jnp.ones((24,))},
            "embedding": jax.random.normal(keys[2], (50, 32)),
        }
    }


def test_docstring_examples():
    assert doctest.testmod(importlib.import_module("jqtz.tree")).failed == 0


def test_quantize_params_replaces_selected_leaves_only():
    params = _params()
    q = jqtz.quantize_params(params, [(r".*/dense_0/kernel", INT8), (r".*/kernel", INT4)])
    assert jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda _: 0, q, is_leaf=jqtz.is_qarray)
    ) == jax.tree_util.tree_structure(params)
    p, qp = params["params"], q["params"]
    assert qp["dense_0"]["kernel"].format.name == "int8"
    assert qp["dense_1"]["kernel"].format.name == "int4"
    for kept in (("dense_0", "bias"), ("norm", "scale")):
        assert qp[kept[0]][kept[1]] is p[kept[0]][kept[1]]
    assert qp["embedding"] is p["embedding"]
    # Each quantized leaf is exactly what quantize gives it alone.
    want = jqtz.quantize(p["dense_1"]["kernel"], INT4)
    for a, b in zip(
        jax.tree_util.tree_leaves(qp["dense_1"]["kernel"]),
        jax.tree_util.tree_leaves(want),
        strict=True,
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_dequantize_params_inverts_up_to_half_a_step():
    params = _params()
    q = jqtz.quantize_params(params, [(r".*/kernel", INT4)])
    back = jqtz.dequantize_params(q)
    w, qw = params["params"]["dense_1"]["kernel"], q["params"]["dense_1"]["kernel"]
    half = 0.5 * ref.per_element(np.asarray(qw.scale, np.float32), w.shape, qw.block_shape)
    assert (np.abs(np.asarray(back["params"]["dense_1"]["kernel"]) - w) <= half * 1.0001).all()
    assert back["params"]["dense_0"]["bias"] is params["params"]["dense_0"]["bias"]
    halves = jqtz.dequantize_params(q, jnp.bfloat16)
    assert halves["params"]["dense_1"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.filterwarnings("ignore:rule 0")  # the rule only meets already quantized leaves
def test_already_quantized_leaves_pass_through():
    q = jqtz.quantize_params(_params(), [(r".*/kernel", INT4)])
    again = jqtz.quantize_params(q, [(r".*/kernel", INT8)])
    assert again["params"]["dense_1"]["kernel"] is q["params"]["dense_1"]["kernel"]


def test_quantize_params_under_jit_matches_eager():
    params = _params()
    rules = [(r".*/kernel", INT4)]
    eager = jqtz.quantize_params(params, rules)
    jitted = jax.jit(lambda p: jqtz.quantize_params(p, rules))(params)
    for a, b in zip(
        jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted), strict=True
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# --- bad input names the parameter -------------------------------------------------------


def test_non_finite_weight_names_path_and_count():
    params = _params()
    w = np.array(params["params"]["dense_1"]["kernel"])
    w[0, :3] = np.nan
    w[5, 7] = -np.inf
    params["params"]["dense_1"]["kernel"] = jnp.asarray(w)
    with pytest.raises(ValueError, match=r"'params/dense_1/kernel' has 4 non-finite values"):
        jqtz.quantize_params(params, [(r".*/kernel", INT8)])
    # Keeping it in full precision is the documented way out.
    q = jqtz.quantize_params(params, [(r".*/dense_1/kernel", None), (r".*/kernel", INT8)])
    assert q["params"]["dense_1"]["kernel"] is params["params"]["dense_1"]["kernel"]


def test_float16_scale_overflow_names_path():
    params = {"big": {"kernel": jnp.full((8, 4), 1e6).at[0, 0].set(2e6)}}
    spec = QuantSpec(format="int4", scale_dtype="float16")  # 2e6 / 7 > 65504
    with pytest.raises(ValueError, match=r"'big/kernel'.*overflow float16"):
        jqtz.quantize_params(params, spec)
    q = jqtz.quantize_params(params, QuantSpec(format="int4", scale_dtype="bfloat16"))
    assert np.isfinite(np.asarray(q["big"]["kernel"].scale, np.float32)).all()


def test_partial_groups_refused_names_path_and_sizes():
    params = {"mlp": {"kernel": jnp.ones((10, 4))}}
    spec = QuantSpec(format="int4", granularity="group", group_size=4, allow_partial_groups=False)
    with pytest.raises(ValueError, match=r"mlp/kernel.*dimension 10.*group/block size 4"):
        jqtz.quantize_params(params, spec)


def test_ragged_groups_allowed_by_default():
    w = jax.random.normal(jax.random.key(3), (10, 4))
    q = jqtz.quantize_params(
        {"mlp": {"kernel": w}}, QuantSpec(format="int4", granularity="group", group_size=4)
    )
    qw = q["mlp"]["kernel"]
    assert qw.scale.shape == (3, 4)
    half = 0.5 * ref.per_element(np.asarray(qw.scale), w.shape, qw.block_shape)
    assert (np.abs(ref.dequantize(qw) - np.asarray(w)) <= half * 1.0001).all()


# --- NNX ----------------------------------------------------------------------------------


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(32, 16, rngs=rngs)
        self.up = nnx.Linear(16, 48, rngs=rngs)
        self.down = nnx.Linear(48, 16, rngs=rngs)
        self.norm = nnx.RMSNorm(16, rngs=rngs)


def test_nnx_split_quantize_merge_keeps_param_wrappers():
    graphdef, state = nnx.split(_Block(nnx.Rngs(0)))
    qstate = jqtz.quantize_params(state, [(r".*/kernel", INT4)])
    model = nnx.merge(graphdef, qstate)
    for lin in (model.up, model.down):
        assert isinstance(lin.kernel, nnx.Param)
        assert isinstance(lin.kernel.get_value(), jqtz.QArray)
        assert isinstance(lin.bias.get_value(), jax.Array)
    assert isinstance(model.embed.embedding.get_value(), jax.Array)
    want = jqtz.quantize(nnx.merge(graphdef, state).up.kernel.get_value(), INT4)
    np.testing.assert_array_equal(
        np.asarray(model.up.kernel.get_value().qvalue), np.asarray(want.qvalue)
    )
    # And back: dequantized params merge into a model that runs.
    back = nnx.merge(graphdef, jqtz.dequantize_params(qstate))
    y = back.down(back.up(jnp.ones((2, 16))))
    assert y.shape == (2, 16) and bool(jnp.isfinite(y).all())


# --- real weights: stories260K (llama2.c) ---------------------------------------------------


def _read_llama2c(path):
    """The wq and w1 matrices ([out, in] per layer) of a llama2.c "v0" checkpoint."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.fromfile(path, np.int32, 7).tolist()
    data = np.fromfile(path, np.float32, offset=7 * 4)
    kv_dim = dim * n_kv // n_heads
    layout = [
        ("token_embedding", (abs(vocab), dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis", (2, seq_len, dim // n_heads // 2)),
    ]
    tensors, offset = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        tensors[name] = data[offset : offset + n].reshape(shape)
        offset += n
    assert offset == data.size, "the header does not describe this file"
    return {
        f"layers_{i}": {"wq": {"kernel": tensors["wq"][i]}, "w1": {"kernel": tensors["w1"][i]}}
        for i in range(n_layers)
    }


def test_real_llama2c_layers_error_ordering_and_bounds(shared_data):
    path = shared_data / "stories260K.bin"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    params = _read_llama2c(path)
    # Weights are [out, in]: the contraction axis is the last one.
    specs = {
        "int8-channel": QuantSpec(format="int8", axis=-1),
        "int4-g32": QuantSpec(format="int4", granularity="group", group_size=32, axis=-1),
        "nf4-g32": QuantSpec(format="nf4", granularity="group", group_size=32, axis=-1),
    }
    nf4_half_gap = float(np.diff(np.asarray(ref.QLORA_NF4)).max() / 2)
    dequantize = jax.jit(lambda q: q.dequantize())
    errors = {}
    for name, spec in specs.items():
        q = jqtz.quantize_params(params, [(r".*/kernel", spec)])
        for (path_, w), qw in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree_util.tree_leaves(q, is_leaf=jqtz.is_qarray),
            strict=True,
        ):
            w = np.asarray(w, np.float64)
            err = np.asarray(dequantize(qw), np.float64) - w
            rel = np.linalg.norm(err) / np.linalg.norm(w)
            assert np.isfinite(rel)
            s = ref.per_element(np.asarray(qw.scale, np.float64), w.shape, qw.block_shape)
            if name == "nf4-g32":
                worst = nf4_half_gap * s  # scale = absmax; half the widest gap between levels
            else:
                worst = 0.5 * s
                # Round-to-nearest error is about uniform over a step: rms = step / sqrt(12).
                uniform = np.sqrt(np.sum(s**2) / 12) / np.linalg.norm(w)
                assert 0.5 * uniform < rel < 1.5 * uniform, (name, path_, rel, uniform)
            assert (np.abs(err) <= worst * (1 + 1e-5)).all()
            errors[name, jax.tree_util.keystr(path_)] = rel
    layers = {p for _, p in errors}
    assert len(layers) == 10
    for p in layers:
        assert errors["int8-channel", p] < 0.02
        assert errors["int8-channel", p] < errors["int4-g32", p] < 0.2
        assert errors["int8-channel", p] < errors["nf4-g32", p] < 0.2


# -- stacked layers (nn.scan / nnx.vmap over layers) --------------------------------------------


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(64)(x), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack()(x, None)[0]


def test_stacked_layers_are_quantized_per_layer_and_served_under_scan():
    x = jax.random.normal(jax.random.key(0), (2, 64))
    model = _Scanned()
    params = model.init(jax.random.key(1), x)
    stacked = params["params"]["Scan_Layer_0"]["Dense_0"]["kernel"]  # (layers, K, N)
    assert stacked.shape[0] == 3
    spec = QuantSpec(format="int4", granularity="group", group_size=32)
    q = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", spec, batch_dims=1)])
    qk = q["params"]["Scan_Layer_0"]["Dense_0"]["kernel"]
    assert qk.batch_shape == (3,) and qk.shape == stacked.shape[1:] and qk.block_shape == (32, 1)
    # Each layer's QArray is what quantizing that layer alone gives.
    for i in range(3):
        alone = jqtz.quantize(stacked[i], spec)
        layer = jax.tree.map(lambda a, i=i: a[i], qk)
        np.testing.assert_array_equal(np.asarray(layer.qvalue), np.asarray(alone.qvalue))
        np.testing.assert_array_equal(np.asarray(layer.scale), np.asarray(alone.scale))
    plan = jqtz.plan(params, [jqtz.Rule(r".*/kernel", spec, batch_dims=1)])
    assert "int4 g32, 3 stacked" in [d.action for d in plan.decisions]
    # The unmodified model runs on the tree: scan hands each layer its own QArray.
    with jqtz.nn.quantized_ops():
        y = model.apply(q, x)
    want = model.apply(jqtz.dequantize_params(q), x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_stacked_layers_without_batch_dims_warn_then_fail_clearly():
    x = jnp.ones((2, 64))
    model = _Scanned()
    params = model.init(jax.random.key(1), x)
    spec = QuantSpec(format="int4", granularity="group", group_size=32)
    with pytest.warns(UserWarning, match="batch_dims=1"):
        q = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", spec)])
    with pytest.raises(ValueError, match="batch_dims=1"), jqtz.nn.quantized_ops():
        model.apply(q, x)


class _NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(64, 64, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.lin(x))


class _NNXScanned(nnx.Module):
    def __init__(self):
        make = nnx.vmap(lambda key: _NNXBlock(nnx.Rngs(key)), in_axes=0, out_axes=0)
        self.blocks = make(jax.random.split(jax.random.key(0), 3))

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def test_stacked_nnx_layers_run_under_nnx_scan():
    graphdef, state = nnx.split(_NNXScanned())
    q = jqtz.quantize_params(state, [jqtz.Rule(r".*kernel", INT8, batch_dims=1)])
    (kernel,) = [
        leaf for leaf in jax.tree.leaves(q, is_leaf=jqtz.is_qarray) if jqtz.is_qarray(leaf)
    ]
    assert kernel.batch_shape == (3,) and kernel.shape == (64, 64)
    x = jax.random.normal(jax.random.key(1), (2, 64))
    y = jqtz.nn.use_quantized_ops(nnx.merge(graphdef, q))(x)
    want = nnx.merge(graphdef, jqtz.dequantize_params(q))(x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_batch_dims_errors_name_the_problem():
    with pytest.raises(ValueError, match="batch_dims must be an int >= 0"):
        jqtz.Rule(".*", INT8, batch_dims=-1)
    with pytest.raises(ValueError, match="no axes left"):
        jqtz.quantize_params({"w": jnp.ones((3, 4))}, [jqtz.Rule("w", INT8, batch_dims=2)])
    with pytest.raises(ValueError, match="batch_dims"):
        jqtz.quantize(jnp.ones((3, 4)), INT8, batch_dims=2)
    # QAT's refusals for stacked layers: tests/qat/test_qat_stacked.py

"""QAT -> convert -> serve parity on the reference Llama: the served model (`quantized_ops`)
computes what the fake-quantized training forward pass computed."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqtz
import jqtz.qat as qat
from jqtz.models.llama import Llama, LlamaConfig

Q = jqtz.QuantSpec
A8 = Q(format="int8", axis=-1)  # per-token dynamic
A8_STATIC = Q(format="int8", granularity="tensor", axis=-1)
F8 = Q(format="fp8_e4m3", granularity="tensor", axis=-1)
CONFIG = LlamaConfig(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
    max_seq_len=64, tie_embeddings=True,
)  # fmt: skip
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)


@pytest.mark.parametrize("module", ["jqtz.qat.convert", "jqtz.qat.fake_quant"])
def test_docstring_examples(module):
    assert doctest.testmod(importlib.import_module(module)).failed == 0


@pytest.fixture(scope="module")
def llama():
    model = Llama(CONFIG)
    return model, jax.jit(model.init)(jax.random.key(0), TOKENS)


def _served(model, qparams):
    with jqtz.nn.quantized_ops():
        return model.apply(qparams, TOKENS)


def _trained(model, params, rules, learned, history):
    fq = qat.fake_quant_params(params, rules, learned=learned, amax_history=history)
    with qat.fake_quant_activations(rules, learned, amax_history=history):
        return model.apply(fq, TOKENS)


# name: (weight spec, learned scales?, bitwise?). Bitwise wherever serving multiplies dequantized
# values; where it multiplies codes (int8 x int8 -> int32, fp8 x fp8) only summation differs.
CASES = {
    "w4-channel-ptq": (Q(format="int4"), False, True),
    "w4-channel-lsq": (Q(format="int4"), True, True),
    "w3-g16-asym-lsqplus": (
        Q(format="int3", granularity="group", group_size=16, symmetric=False),
        True,
        True,
    ),
    "w4g16-a8-dynamic": (Q(format="int4", granularity="group", group_size=16, activation=A8),
                         True, True),
    "w8a8-dynamic-int32": (Q(format="int8", activation=A8), True, False),
    "w8a8-static-learned": (Q(format="int8", activation=A8_STATIC), True, False),
    "fp8-delayed": (Q(format="fp8_e4m3", granularity="tensor", activation=F8), False, False),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_qat_convert_serve_parity(llama, case):
    model, params = llama
    spec, lsq, bitwise = case
    rules = ((r".*/kernel", spec),)  # hashable: a static argument of jit
    learned = history = None
    if lsq:
        calibrated = None
        if spec.activation is A8_STATIC:
            q = jqtz.quantize_params(params, rules)
            calibrated = jqtz.nn.calibrate_activations(model.apply, q, [TOKENS])
        learned = qat.init_learned_scales(params, rules, act_scales=calibrated)
        # As if trained: scales moved off their PTQ values, zero points off integers.
        learned = jax.tree.map(lambda s: s * 0.93 + 0.3 * (s.ndim == 0), learned)
    if spec.format == "fp8_e4m3":
        history = qat.init_amax_history(params, rules, length=4)
        with qat.fake_quant_activations(rules, amax_history=history) as recorder:
            model.apply(qat.fake_quant_params(params, rules, amax_history=history), TOKENS)
        history = qat.update_amax_history(history, params, recorder.input_amax)
        history = jax.tree.map(lambda h: h * 0.8, history)  # inputs above it saturate
    trained = jax.jit(_trained, static_argnums=(0, 2))(model, params, rules, learned, history)
    qparams = qat.convert(params, rules, learned, amax_history=history)
    served = jax.jit(_served, static_argnums=0)(model, qparams)
    if bitwise:
        np.testing.assert_array_equal(np.asarray(served), np.asarray(trained))
    else:
        rel = jnp.max(jnp.abs(served - trained)) / jnp.max(jnp.abs(trained))
        assert float(rel) < 1e-5
    # ... and quantization did something.
    assert float(jnp.max(jnp.abs(trained - model.apply(params, TOKENS)))) > 1e-3


def test_convert_stores_the_learned_scales(llama):
    _, params = llama
    spec = Q(format="int4", symmetric=False, scale_dtype="bfloat16", activation=A8_STATIC)
    rules = ((r".*/kernel", spec),)  # hashable: a static argument of jit
    learned = qat.init_learned_scales(params, rules)
    path = ("params", "layers_0", "mlp", "up_proj", "kernel")
    entry = learned
    for k in path:
        entry = entry[k]
    entry["scale"] = entry["scale"] * 0.5 + 1e-4
    entry["zero_point"] = entry["zero_point"] + 0.6
    entry["act_scale"] = jnp.float32(0.01)
    q = qat.convert(params, rules, learned)
    for k in path:
        q = q[k]
    np.testing.assert_array_equal(
        np.asarray(q.scale), np.asarray((entry["scale"]).astype(jnp.bfloat16))
    )
    np.testing.assert_array_equal(
        np.asarray(q.zero_point), np.clip(np.round(np.asarray(entry["zero_point"])), 0, 15)
    )
    assert q.zero_point.dtype == np.uint8
    assert q.act_scale.dtype == jnp.float32 and float(q.act_scale) == np.float32(0.01)


def test_convert_and_fake_quant_reject_unknown_side_entries(llama):
    _, params = llama
    rules = [(r".*/mlp/.*/kernel", Q(format="int4"))]
    learned = qat.init_learned_scales(params, [(r".*/kernel", Q(format="int4"))])
    with pytest.raises(ValueError, match=r"self_attn.*do not quantize"):
        qat.convert(params, rules, learned)
    with pytest.raises(ValueError, match=r"self_attn.*do not quantize"):
        qat.fake_quant_params(params, rules, learned=learned)
    bad = {"params": {"nope": {"kernel": {"scale": jnp.ones(())}}}}
    with pytest.raises(ValueError, match="not a parameter path"):
        qat.fake_quant_params(params, rules, learned=bad)


def test_convert_rejects_an_empty_fp8_input_history(llama):
    _, params = llama
    rules = [(r".*/kernel", Q(format="fp8_e4m3", granularity="tensor", activation=F8))]
    history = qat.init_amax_history(params, rules)
    with pytest.raises(ValueError, match="all zero"):
        qat.convert(params, rules, amax_history=history)

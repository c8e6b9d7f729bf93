"""LLM.int8(): outlier input features in floating point, the rest int8 x int8 -> int32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jqtz
from jqtz.nn import dot_general

DN = (((1,), (0,)), ((), ()))
THRESHOLD = 6.0
PER_TOKEN = jqtz.QuantSpec(format="int8", axis=-1)
LLM_INT8 = jqtz.QuantSpec(format="int8", axis=-1, outlier_threshold=THRESHOLD)
OUTLIER_COLS = (3, 50, 128, 200)


def _xw(outliers=True, k=256, n=64, m=16):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, k))
    if outliers:  # a few features 20x larger than the rest, as in LLM activations
        x = x.at[:, OUTLIER_COLS].multiply(20.0)
    return x, jax.random.normal(kw, (k, n)) / 16


def _weights(w, act, granularity="channel", group_size=None):
    return jqtz.quantize(
        w,
        jqtz.QuantSpec(
            format="int8", granularity=granularity, group_size=group_size, activation=act
        ),
    )


def _rel(y, ref):
    return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def _reference(x, q, threshold):
    """Gather-based LLM.int8(): fp product on the outlier columns, simulated int8 on the rest."""
    x, w = np.asarray(x), np.asarray(q.dequantize())
    cols = np.abs(x).max(axis=0) > threshold
    inliers = np.where(cols, 0.0, x)
    qx = jqtz.quantize(jnp.asarray(inliers), PER_TOKEN).dequantize()
    return x[:, cols] @ w[cols] + np.asarray(qx) @ w


@pytest.mark.parametrize(
    "granularity,group_size", [("channel", None), ("group", 64)], ids=["native", "g64-simulated"]
)
def test_outliers_error_far_below_w8a8_close_to_weight_only(granularity, group_size):
    x, w = _xw()
    ref = x @ w
    y = {
        name: dot_general(x, _weights(w, act, granularity, group_size), DN)
        for name, act in [("weight-only", None), ("w8a8", PER_TOKEN), ("llm.int8", LLM_INT8)]
    }
    # The error from quantizing activations, against the product with the same int8 weights.
    x_wq = y["weight-only"]
    assert _rel(y["llm.int8"], x_wq) < 0.15 * _rel(y["w8a8"], x_wq)
    # End to end, LLM.int8() costs little beyond weight-only int8; plain W8A8 costs a lot.
    weight_only, w8a8, llm = (_rel(y[k], ref) for k in ("weight-only", "w8a8", "llm.int8"))
    assert llm < 1.15 * weight_only, (llm, weight_only)
    assert w8a8 > 3 * llm, (w8a8, llm)


def test_matches_gather_reference():
    x, w = _xw()
    q = _weights(w, LLM_INT8)
    got = dot_general(x, q, DN)
    np.testing.assert_allclose(got, _reference(x, q, THRESHOLD), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", ["no-outliers", "threshold-above-all"])
def test_without_outliers_equals_plain_w8a8(case):
    x, w = _xw(outliers=case != "no-outliers")
    threshold = THRESHOLD if case == "no-outliers" else 1e3
    act = dataclasses.replace(LLM_INT8, outlier_threshold=threshold)
    got = dot_general(x, _weights(w, act), DN)
    want = dot_general(x, _weights(w, PER_TOKEN), DN)
    np.testing.assert_array_equal(got, want)


def test_jit_keeps_the_int8_product():
    x, w = _xw()
    q = _weights(w, LLM_INT8)
    f = jax.jit(lambda x, q: dot_general(x, q, DN))
    jaxpr = str(jax.make_jaxpr(f)(x, q))
    assert "preferred_element_type=int32" in jaxpr
    assert "i8[16,256]" in jaxpr
    np.testing.assert_allclose(f(x, q), dot_general(x, q, DN), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_threshold_boundary_is_strict(sign):
    x, w = _xw(outliers=False)
    q = _weights(w, LLM_INT8)
    plain = dot_general(x, _weights(w, PER_TOKEN), DN)
    at = x.at[5, 7].set(sign * THRESHOLD)  # |x| == threshold: not an outlier
    np.testing.assert_array_equal(
        dot_general(at, q, DN), dot_general(at, _weights(w, PER_TOKEN), DN)
    )
    above = x.at[5, 7].set(sign * float(np.nextafter(np.float32(THRESHOLD), np.float32(np.inf))))
    got = dot_general(above, q, DN)
    np.testing.assert_allclose(got, _reference(above, q, THRESHOLD), rtol=1e-5, atol=1e-4)
    # Column 7 went to the float product, so the rows' int8 scales changed too.
    assert not np.array_equal(np.asarray(got), np.asarray(plain))


def test_linen_dense_detects_outliers_over_all_tokens_of_the_call():
    model = nn.Dense(64, use_bias=False)
    x, w = _xw()
    x3 = x.reshape(2, 8, 256)  # (B, T, D)
    params = {"params": {"kernel": w}}
    q = jqtz.quantize_params(params, jqtz.QuantSpec(format="int8", activation=LLM_INT8))
    with jqtz.nn.quantized_ops():
        y = jax.jit(model.apply)(q, x3)
    np.testing.assert_allclose(
        y.reshape(16, 64), _reference(x, q["params"]["kernel"], THRESHOLD), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_more_outliers_than_gathered_take_the_masked_product(monkeypatch, dtype):
    """A `Dense` product multiplies its outlier features by their own rows of the weight, up
    to `_outlier_capacity` of them; with more (4 here, capacity 2) it multiplies the masked
    input by the whole dequantized weight. Both give the gather reference."""
    from jqtz.nn import ops

    x, w = _xw()
    q = _weights(w, LLM_INT8)
    x = x.astype(dtype)
    gathered = dot_general(x, q, DN)
    monkeypatch.setattr(ops, "_outlier_capacity", lambda k: 2)
    masked = jax.jit(lambda x, q: dot_general(x, q, DN))(x, q)
    ref = _reference(x.astype(jnp.float32), q, THRESHOLD)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(gathered, ref, **tol)
    np.testing.assert_allclose(masked, ref, **tol)
    np.testing.assert_allclose(gathered, masked, rtol=1e-5, atol=1e-4)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_inliers_take_the_w8a8_kernel_on_a_gpu(monkeypatch):
    """Kernels chosen as on an H100 (`use_pallas_kernels(interpret=True)`): the inlier
    features' product runs on the W8A8 kernel (interpreted), the outliers' in XLA, and the
    sum is the gather reference; lowered for CUDA, one kernel launch."""
    from pallas_kernels import common

    x, w = _xw()
    q = _weights(w, LLM_INT8)
    with jqtz.nn.use_pallas_kernels(interpret=True):
        assert jqtz.nn.matmul_path(x, q) == "w8a8+outliers"
        y = dot_general(x, q, DN)
    np.testing.assert_allclose(y, _reference(x, q, THRESHOLD), rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # an H100, to lower for
    monkeypatch.setattr(common, "gpu_compute_capability", lambda: (9, 0))
    assert jqtz.nn.matmul_path(x, q) == "w8a8+outliers"
    text = common.lower_for_cuda(lambda x, q: dot_general(x, q, DN), x, q)
    assert text.count(common.TRITON_CUSTOM_CALL) == 1


def test_bfloat16_inputs():
    x, w = _xw()
    q = _weights(w, LLM_INT8)
    y = dot_general(x.astype(jnp.bfloat16), q, DN)  # outlier part: bf16 x bf16, f32 sums
    assert _rel(y, x @ w) < 0.02


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"format": "fp8_e4m3", "axis": -1, "outlier_threshold": 6.0}, NotImplementedError, "int8"),
        (
            {"format": "int8", "axis": -1, "symmetric": False, "outlier_threshold": 6.0},
            NotImplementedError,
            "symmetric",
        ),
        ({"format": "int8", "axis": -1, "outlier_threshold": 0.0}, ValueError, "positive"),
        ({"format": "int8", "axis": -1, "outlier_threshold": float("inf")}, ValueError, "finite"),
        ({"format": "int8", "axis": -1, "outlier_threshold": "6"}, ValueError, "number"),
        (
            {"format": "int8", "activation": PER_TOKEN, "outlier_threshold": 6.0},
            ValueError,
            "activation spec",
        ),
    ],
    ids=["fp8", "asymmetric", "zero", "inf", "string", "on-weight-spec"],
)
def test_invalid_thresholds_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        jqtz.QuantSpec(**kwargs)


def test_threshold_is_static_and_hashable():
    a = jqtz.QuantSpec(format="int8", activation=LLM_INT8)
    b = jqtz.QuantSpec(format="int8", activation=dataclasses.replace(LLM_INT8))
    assert a == b and hash(a) == hash(b)
    assert jqtz.QuantSpec(format="int8", axis=-1, outlier_threshold=6).outlier_threshold == 6.0


@pytest.mark.parametrize("einsum_str", ["btd,dk->btk", "...d,dk->...k"])
def test_linen_einsum_keeps_outliers_in_float(einsum_str):
    # nn.Einsum cannot multiply codes; it simulates the product, and must still keep LLM.int8()'s
    # outlier features in floating point (with the inliers' per-token scales over inliers only).
    model = nn.Einsum((256, 64), einsum_str, use_bias=False)
    x, w = _xw()
    params = {"params": {"kernel": w}}
    q = jqtz.quantize_params(params, jqtz.QuantSpec(format="int8", activation=LLM_INT8))
    with jqtz.nn.quantized_ops():
        y = jax.jit(model.apply)(q, x.reshape(2, 8, 256))
    want = _reference(x, q["params"]["kernel"], THRESHOLD)
    np.testing.assert_allclose(y.reshape(16, 64), want, rtol=1e-5, atol=1e-4)
    plain = jqtz.quantize_params(params, jqtz.QuantSpec(format="int8", activation=PER_TOKEN))
    with jqtz.nn.quantized_ops():
        y_plain = model.apply(plain, x.reshape(2, 8, 256))
    assert _rel(y_plain.reshape(16, 64), x @ w) > 3 * _rel(y.reshape(16, 64), x @ w)

"""The quantized matrix product: weight-only, W8A8 int8, FP8, fallbacks, embedding rows."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqtz
from jqtz.nn import dot_general, take_rows

DN = (((1,), (0,)), ((), ()))
ACT_INT8 = jqtz.QuantSpec(format="int8", granularity="channel", axis=-1)
ACT_FP8 = jqtz.QuantSpec(format="fp8_e4m3", granularity="channel", axis=-1)


def _xw(k=96, n=40, m=5):
    kx, kw = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, (m, k)), jax.random.normal(kw, (k, n))


WEIGHT_ONLY = {
    "int8-channel": jqtz.QuantSpec(format="int8"),
    "int4-g32-asym": jqtz.QuantSpec(
        format="int4", granularity="group", group_size=32, symmetric=False
    ),
    "int3-g64-ragged": jqtz.QuantSpec(format="int3", granularity="group", group_size=64),
    "nf4-g32-dq": jqtz.QuantSpec(
        format="nf4", granularity="group", group_size=32, double_quant=True
    ),
    "fp8-block": jqtz.QuantSpec(format="fp8_e4m3", granularity="block", block_shape=(32, 8)),
}


@pytest.mark.parametrize("name", list(WEIGHT_ONLY))
def test_weight_only_equals_dequantize_then_multiply(name):
    x, w = _xw()
    q = jqtz.quantize(w, WEIGHT_ONLY[name])
    want = jnp.dot(x, q.dequantize(), preferred_element_type=jnp.float32)
    got = jax.jit(lambda x, q: dot_general(x, q, DN))(x, q)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _simulated(x, q):
    qx = jqtz.quantize(x, q.act)
    return qx.dequantize() @ q.dequantize()


@pytest.mark.parametrize(
    "wfmt,act,acc", [("int8", ACT_INT8, "int32"), ("fp8_e4m3", ACT_FP8, "float32")]
)
def test_quantized_activations_multiply_the_codes(wfmt, act, acc):
    x, w = _xw()
    q = jqtz.quantize(w, jqtz.QuantSpec(format=wfmt, activation=act))
    f = jax.jit(lambda x, q: dot_general(x, q, DN))
    jaxpr = str(jax.make_jaxpr(f)(x, q))
    # The product runs on the codes, with the accumulator of the native instruction.
    assert f"preferred_element_type={acc}" in jaxpr
    codes_dtype = "i8" if wfmt == "int8" else "f8_e4m3fn"
    assert f"{codes_dtype}[5,96]" in jaxpr
    got = f(x, q)
    want = _simulated(x, q)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    rel = jnp.linalg.norm(got - x @ w) / jnp.linalg.norm(x @ w)
    assert rel < (0.02 if wfmt == "int8" else 0.08)


@pytest.mark.parametrize("wfmt,act", [("int8", ACT_INT8), ("fp8_e4m3", ACT_FP8)])
def test_serving_layout_gives_the_same_products(wfmt, act):
    """`serving_layout` stores W8A8 codes `[N, K]`: XLA's product contracts their other axis
    (still on the codes), with the same result; weight-only and other leaves stay as they
    are; a flax Dense runs on the converted tree."""
    import flax.linen as nn

    x, w = _xw()
    q = jqtz.quantize(w, jqtz.QuantSpec(format=wfmt, activation=act))
    tree = {"w8a8": q, "w4": jqtz.quantize(w, WEIGHT_ONLY["int4-g32-asym"]), "b": jnp.ones(3)}
    served = jqtz.nn.serving_layout(tree)
    t = served["w8a8"]
    assert t.transposed and not served["w4"].transposed and served["b"] is tree["b"]
    jaxpr = str(jax.make_jaxpr(lambda x, q: dot_general(x, q, DN))(x, t))
    codes_dtype = "i8" if wfmt == "int8" else "f8_e4m3fn"
    assert f"{codes_dtype}[40,96]" in jaxpr and "transpose[" not in jaxpr
    same = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-5)  # sum order
    same(dot_general(x, t, DN), dot_general(x, q, DN))
    x3 = jnp.stack([x, -x])  # (2, 5, 96): two leading axes
    same(dot_general(x3, t, (((2,), (0,)), ((), ()))), dot_general(x3, q, (((2,), (0,)), ((), ()))))
    dense = nn.Dense(40, use_bias=False)
    with jqtz.nn.quantized_ops():
        got = dense.apply({"params": {"kernel": t}}, x)
        want = dense.apply({"params": {"kernel": q}}, x)
    same(got, want)
    rows = jnp.array([3, 0])
    np.testing.assert_array_equal(take_rows(t, rows), q.dequantize()[rows])


def test_serving_layout_stores_4bit_weights_k_major_on_request():
    """`k_major_4bit=True` also stores weight-only int4/uint4 codes K-major (packed along K):
    the same products on XLA's path; NF4 and 3-bit weights stay as they are."""
    x, w = _xw()
    tree = {
        "asym": jqtz.quantize(w, WEIGHT_ONLY["int4-g32-asym"]),
        "sym": jqtz.quantize(w, jqtz.QuantSpec(format="int4", granularity="group", group_size=32)),
        "nf4": jqtz.quantize(w, jqtz.QuantSpec(format="nf4", granularity="group", group_size=32)),
    }
    assert not any(q.transposed for q in jqtz.nn.serving_layout(tree).values())
    served = jqtz.nn.serving_layout(tree, k_major_4bit=True)
    assert served["asym"].transposed and served["sym"].transposed and not served["nf4"].transposed
    assert served["asym"].qvalue.shape == (40, 48)  # [N, K/2]
    ids = jnp.array([[3, 0], [95, 50]])  # gathers of rows read the stored bytes of those rows
    for name in tree:
        np.testing.assert_array_equal(take_rows(served[name], ids), tree[name].dequantize()[ids])
        np.testing.assert_allclose(dot_general(x, served[name], DN), dot_general(x, tree[name], DN),
                                   rtol=1e-6, atol=1e-5)  # fmt: skip


def test_static_activation_scale():
    x, w = _xw()
    static = jqtz.QuantSpec(format="int8", granularity="tensor", axis=-1)
    q = jqtz.quantize(w, jqtz.QuantSpec(format="int8", activation=static))
    stats = jqtz.ranges.observe(x, static)
    scale, _ = jqtz.ranges.qparams_from_stats(stats, static)
    q = q.__class__(**{**q.__dict__, "act_scale": scale})
    got = dot_general(x, q, DN)
    want = jqtz.quantize(x, static, scale=scale).dequantize() @ q.dequantize()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # A static scale that is too small clips: the result differs from the dynamic one.
    q_small = q.__class__(**{**q.__dict__, "act_scale": scale / 4})
    assert float(jnp.abs(dot_general(x, q_small, DN) - got).max()) > 1e-2


def test_group_wise_weights_with_activations_fall_back_to_simulation():
    x, w = _xw()
    spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=32, activation=ACT_INT8)
    q = jqtz.quantize(w, spec)
    jaxpr = str(jax.make_jaxpr(lambda x, q: dot_general(x, q, DN))(x, q))
    assert "preferred_element_type=int32" not in jaxpr
    np.testing.assert_allclose(dot_general(x, q, DN), _simulated(x, q), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k, n", [(64, 172), (96, 300), (256, 200)])
def test_column_blocks_with_one_block_along_k_scale_each_column(k, n):
    """fp8 128 x 128 weight blocks on a weight with K <= 128 (one block along K, so the codes
    are multiplied directly): each output column takes its block's scale."""
    from jqtz.ptq.fp8 import fp8_spec

    w = jax.random.normal(jax.random.key(0), (k, n))
    qw = jqtz.quantize(w, fp8_spec("block128"))
    x = jax.random.normal(jax.random.key(1), (2, 3, k))
    y = dot_general(x, qw, (((2,), (0,)), ((), ())))
    xq = jqtz.nn.ops.quantize_input(x, qw).dequantize(jnp.float32)
    want = jnp.einsum("btk,kn->btn", xq, qw.dequantize(jnp.float32), precision="highest")
    assert y.shape == (2, 3, n)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)


def test_plain_operands_are_lax_dot_general():
    x, w = _xw()
    np.testing.assert_array_equal(dot_general(x, w, DN), jax.lax.dot_general(x, w, DN))


@pytest.mark.parametrize("act", [None, "int8"], ids=["weight_only_bf16", "w8a8_int8"])
def test_single_row_products_on_a_cpu_take_two_rows(act):
    """XLA's CPU runtime multiplies one row of bf16 or int8 operands on a slow path, so the
    XLA path multiplies two (a zero row beside it) and keeps the first: the same values as
    the float32 product of the same operands; several rows are left as they are."""
    aspec = None if act is None else jqtz.QuantSpec(format=act, axis=-1)
    spec = jqtz.QuantSpec(format="int8", activation=aspec)
    qw = jqtz.quantize(jax.random.normal(jax.random.key(0), (256, 64)), spec)
    dn = (((2,), (0,)), ((), ()))
    for rows, padded in ((1, True), (3, False)):
        x = jax.random.normal(jax.random.key(1), (1, rows, 256)).astype(jnp.bfloat16)
        jaxpr = str(jax.make_jaxpr(lambda x, q: dot_general(x, q, dn))(x, qw))
        dtype = "bf16" if act is None else "i8"
        assert (f"{dtype}[2,1,1,256]" in jaxpr) == padded
        y = dot_general(x, qw, dn)
        if act is None:
            want = x.astype(jnp.float32) @ qw.dequantize(jnp.bfloat16).astype(jnp.float32)
        else:
            qx = jqtz.nn.ops.quantize_input(x, qw)
            want = (qx.dequantize(jnp.float32) @ qw.dequantize(jnp.float32)).astype(y.dtype)
        assert y.shape == (1, rows, 64)
        np.testing.assert_allclose(np.float32(y), np.float32(want), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "spec",
    [
        jqtz.QuantSpec(format="int8", axis=1),
        jqtz.QuantSpec(format="int4", granularity="group", group_size=16, axis=1),
        jqtz.QuantSpec(format="nf4", granularity="tensor"),
        jqtz.QuantSpec(format="int4", granularity="block", block_shape=(4, 16), symmetric=False),
    ],
    ids=["int8-row", "int4-g16", "nf4-tensor", "int4-block-asym"],
)
def test_take_rows_matches_dequantize_then_gather(spec):
    table = jax.random.normal(jax.random.key(3), (50, 48))
    q = jqtz.quantize(table, spec)
    ids = jnp.array([[0, 49, 7], [7, 3, 22]])
    np.testing.assert_array_equal(take_rows(q, ids), q.dequantize()[ids])


def test_gpu_products_go_through_the_kernel_dispatch(monkeypatch):
    """On a GPU backend the entry point asks `pallas_kernels.dispatch` first and uses its
    result; where dispatch declines (None) the XLA path runs. On CPU dispatch is never asked."""
    from pallas_kernels import dispatch

    x, w = _xw()
    q = jqtz.quantize(w, jqtz.QuantSpec(format="int4", granularity="group", group_size=32))
    asked = []
    monkeypatch.setattr(dispatch, "maybe_matmul", lambda x, w, **kw: asked.append(w) or None)
    np.testing.assert_allclose(dot_general(x, q, DN), x @ q.dequantize(), rtol=1e-5, atol=1e-5)
    assert asked == []  # CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    dot_general(x, q, DN)
    assert asked == [q]  # asked, declined: the XLA result above is what ran
    monkeypatch.setattr(
        dispatch, "maybe_matmul", lambda x, w, **kw: jnp.full((x.shape[0], 40), 7.0)
    )
    assert float(dot_general(x, q, DN)[0, 0]) == 7.0
    # A contraction other than x[..., K] @ w[K, N] never reaches the kernels.
    y = dot_general(x.T, q, (((0,), (0,)), ((), ())))
    np.testing.assert_allclose(y, x @ q.dequantize(), rtol=1e-5, atol=1e-5)


def test_use_pallas_kernels_switches_every_product_and_the_cache_to_xla(monkeypatch):
    from jqtz.models.quantized_kv_cache import KVQuantSpec, QuantizedKVCache
    from pallas_kernels import dispatch

    x, w = _xw()
    q = jqtz.quantize(w, jqtz.QuantSpec(format="int4", granularity="group", group_size=32))
    h100 = dict(backend="gpu", compute_capability=(9, 0))
    xb = jnp.ones((2, 64), jnp.bfloat16)
    wk = jqtz.quantize(
        jnp.ones((256, 128)), jqtz.QuantSpec(format="int4", granularity="group", group_size=128)
    )
    cache = QuantizedKVCache.init(KVQuantSpec(kind="int8"), batch=1, max_len=64, n_kv_heads=2,
                                  head_dim=64)  # fmt: skip
    q1 = jnp.ones((1, 1, 8, 64), jnp.bfloat16)
    assert jqtz.nn.pallas_kernels_enabled()
    assert jqtz.nn.matmul_path(jnp.ones((2, 256), jnp.bfloat16), wk, **h100) == "w4a16"
    assert jqtz.nn.matmul_path(xb, jnp.ones((64, 8)), **h100) == "xla"  # not a QArray
    assert jqtz.nn.matmul_path(jnp.ones((2, 256), jnp.bfloat16), wk) == "xla"  # this CPU
    assert cache.attention_path(q1, **h100) == "kernel"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(
        dispatch, "maybe_matmul", lambda x, w, **kw: jnp.full((x.shape[0], 40), 7.0)
    )
    assert float(dot_general(x, q, DN)[0, 0]) == 7.0  # the (pretend) kernel ran
    with jqtz.nn.use_pallas_kernels(False):
        assert not jqtz.nn.pallas_kernels_enabled()
        np.testing.assert_allclose(dot_general(x, q, DN), x @ q.dequantize(), rtol=1e-5, atol=1e-5)
        assert jqtz.nn.matmul_path(jnp.ones((2, 256), jnp.bfloat16), wk, **h100) == "xla"
        assert cache.attention_path(q1, **h100) == "xla"
        with jqtz.nn.use_pallas_kernels(True):  # nests
            assert cache.attention_path(q1, **h100) == "kernel"
        assert cache.attention_path(q1, **h100) == "xla"
    assert jqtz.nn.pallas_kernels_enabled()
    assert float(dot_general(x, q, DN)[0, 0]) == 7.0


def test_use_pallas_kernels_retraces_jitted_functions(monkeypatch):
    """The kernel choice is made at trace time; the switch clears the caches so that a function
    jitted before is traced again instead of replaying the other path."""
    from pallas_kernels import dispatch

    x, w = _xw()
    q = jqtz.quantize(w, jqtz.QuantSpec(format="int4", granularity="group", group_size=32))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(
        dispatch, "maybe_matmul", lambda x, w, **kw: jnp.full((x.shape[0], 40), 7.0)
    )
    f = jax.jit(lambda x, q: dot_general(x, q, DN))
    assert float(f(x, q)[0, 0]) == 7.0
    with jqtz.nn.use_pallas_kernels(False):
        np.testing.assert_allclose(f(x, q), x @ q.dequantize(), rtol=1e-5, atol=1e-5)
    assert float(f(x, q)[0, 0]) == 7.0


@pytest.mark.parametrize("k, n", [(576, 576), (576, 192), (576, 1536), (1536, 576)])
def test_default_w4_weights_of_a_small_model_take_the_kernel(k, n):
    """SmolLM2-135M's projections (dims 576, 192 and 1536, not all multiples of the tiles),
    quantized with the default W4 g128 spec (zero points), run on the W4A16 kernel on a GPU:
    the kernel reads unaligned weights in place, so no layer falls back to XLA."""
    from jqtz.ptq import default_spec

    spec = default_spec("rtn", bits=4)
    w = jqtz.quantize(jax.random.normal(jax.random.key(k + n), (k, n)), spec)
    h100 = dict(backend="gpu", compute_capability=(9, 0))
    for rows in (1, 7, 64):
        assert jqtz.nn.matmul_path(jnp.ones((rows, k), jnp.bfloat16), w, **h100) == "w4a16"


def test_mosaic_lowering_is_chosen_where_a_mosaic_path_exists():
    """`use_pallas_kernels(lowering="mosaic")`: W4A16 with more than 16 rows and decode
    attention over an int8 cache take their Mosaic GPU versions on a Hopper GPU; decode-sized
    products, other GPUs and operands without a Mosaic path keep Triton."""
    from jqtz.models.quantized_kv_cache import KVQuantSpec, QuantizedKVCache

    h100 = dict(backend="gpu", compute_capability=(9, 0))
    spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=128)
    wk = jqtz.quantize(jnp.ones((256, 128)), spec)
    w8 = jqtz.quantize(jnp.ones((256, 128)), dataclasses.replace(spec, format="int8"))
    x64, x1 = jnp.ones((64, 256), jnp.bfloat16), jnp.ones((1, 256), jnp.bfloat16)
    int8 = QuantizedKVCache.init(KVQuantSpec(kind="int8"), batch=1, max_len=64, n_kv_heads=2,
                                 head_dim=64)  # fmt: skip
    int4 = QuantizedKVCache.init(KVQuantSpec(kind="int4"), batch=1, max_len=64, n_kv_heads=2,
                                 head_dim=64)  # fmt: skip
    q1 = jnp.ones((1, 1, 8, 64), jnp.bfloat16)
    assert jqtz.nn.pallas_lowering() == "auto"
    assert jqtz.nn.matmul_path(x64, wk, **h100) == "w4a16"
    with jqtz.nn.use_pallas_kernels(lowering="mosaic"):
        assert jqtz.nn.pallas_lowering() == "mosaic"
        assert jqtz.nn.matmul_path(x64, wk, **h100) == "w4a16-mosaic"
        assert jqtz.nn.matmul_path(x1, wk, **h100) == "w4a16"  # decode: Triton's GEMV
        assert jqtz.nn.matmul_path(x64, w8, **h100) == "w4a16"  # 8-bit codes: no Mosaic path
        assert jqtz.nn.matmul_path(x64, wk, backend="gpu", compute_capability=(8, 9)) == "w4a16"
        assert int8.attention_path(q1, **h100) == "kernel-mosaic"
        assert int4.attention_path(q1, **h100) == "kernel"  # int4 pages: Triton
        assert int8.attention_path(q1, backend="gpu", compute_capability=(8, 9)) == "kernel"
        assert int8.attention_path(q1) == "xla"  # this machine: CPU
    assert int8.attention_path(q1, **h100) == "kernel"
    with pytest.raises(ValueError, match="`lowering` must be one of"):
        jqtz.nn.use_pallas_kernels(lowering="cuda").__enter__()


@pytest.mark.parametrize(
    "value,enabled,lowering,interpret",
    [("0", False, "auto", False), ("off", False, "auto", False),
     ("False", False, "auto", False), ("1", True, "auto", False),
     (" on ", True, "auto", False), ("Mosaic", True, "mosaic", False),
     ("triton", True, "triton", False), ("interpret", True, "auto", True)],
)  # fmt: skip
def test_jqtz_pallas_environment_variable(value, enabled, lowering, interpret, monkeypatch):
    from jqtz.nn import ops

    monkeypatch.setenv("JQTZ_PALLAS", value)
    assert ops._pallas_from_env() == (enabled, lowering, interpret)


def test_jqtz_pallas_rejects_unclear_values(monkeypatch):
    from jqtz.nn import ops

    monkeypatch.setenv("JQTZ_PALLAS", "no")
    with pytest.raises(ValueError, match="JQTZ_PALLAS='no': expected 0"):
        ops._pallas_from_env()

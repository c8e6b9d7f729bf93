"""Tests for jqtz.ptq.gptq: RTN bit for bit when H = I, lower output error than RTN on
correlated inputs and on a real stories260K layer, agreement with a plain transcription of the
reference algorithm, act-order and g_idx, dead inputs, damping retries and errors, jit.

Shapes and specs repeat on purpose: each distinct (shape, spec, options) compiles once."""

import dataclasses
import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqtz
from jqtz.ptq.gptq import GPTQResult, gptq

# One fused compilation per QArray structure: quicker than eager op-by-op dispatch.
deq = jax.jit(lambda q: q.dequantize())

N_IN, N_OUT = 200, 32  # 200 rows: ragged last group for g32 and g64, two lazy blocks of 128


def spec_of(fmt="int4", group=None, sym=True, **kw):
    gran = dict(granularity="group", group_size=group) if group else dict(granularity="channel")
    return jqtz.QuantSpec(format=fmt, symmetric=sym, **gran, **kw)


def normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def correlated_inputs(n_tokens, n_in, seed=0):
    """X = Z A with an anisotropic mixing A: strongly correlated input channels."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_in, n_in)) * np.exp(-np.arange(n_in) / (n_in / 8))[:, None]
    a += np.diag(rng.uniform(0.05, 0.3, n_in))
    return jnp.asarray(rng.normal(size=(n_tokens, n_in)) @ a, jnp.float32)


def hessian_of(x):
    return 2.0 / x.shape[0] * (x.T @ x)


def rtn(w, spec):
    return deq(jqtz.quantize(w, spec))


def out_err(x, w, q):
    return float(jnp.linalg.norm(x @ (w - q)))


@pytest.fixture(scope="module")
def layer():
    x = correlated_inputs(1024, N_IN)
    return x, hessian_of(x), normal(1, (N_IN, N_OUT), 0.05)


def test_docstring_examples():
    assert doctest.testmod(importlib.import_module("jqtz.ptq.gptq")).failed == 0


# ---------------------------------------------------------------------------------------------
# H = I: no error to spread, so GPTQ is round-to-nearest, scales and codes bit for bit

IDENTITY_CASES = {
    "int4-g32-ragged": (spec_of("int4", 32), (N_IN, N_OUT)),
    "int4-g128-asym-576": (spec_of("int4", 128, sym=False), (576, 16)),
    "int3-channel-asym": (spec_of("int3", sym=False), (N_IN, N_OUT)),
    "int2-g64-asym-mse": (spec_of("int2", 64, sym=False, clipping="mse"), (N_IN, N_OUT)),
    "int8-tensor-bf16scale-bf16w": (
        jqtz.QuantSpec(format="int8", granularity="tensor", scale_dtype="bfloat16"),
        (N_IN, N_OUT),
    ),
    "nf4-g64-f16scale": (spec_of("nf4", 64, scale_dtype="float16"), (N_IN, N_OUT)),
}


@pytest.mark.parametrize("spec,shape", IDENTITY_CASES.values(), ids=IDENTITY_CASES.keys())
def test_identity_hessian_is_rtn_bit_for_bit(spec, shape):
    w = normal(0, shape, 0.05)
    if shape == (N_IN, N_OUT) and spec.granularity == "tensor":
        w = w.astype(jnp.bfloat16)  # as real checkpoints ship; the codes come from float32 math
    # The constant-block guard is shared with RTN: an all-zero row, and a constant column in a
    # ragged last group (its padding must not count as values).
    w = w.at[3].set(0.0)
    g = spec.group_size
    if g and shape[0] % g:
        w = w.at[shape[0] - shape[0] % g :, 0].set(0.03)
    res = gptq(w, jnp.eye(shape[0]), spec)
    want = jqtz.quantize(w, spec)
    got = res.qarray.validate()
    assert got.block_shape == want.block_shape and got.perm is None
    np.testing.assert_array_equal(got.qvalue, want.qvalue)
    np.testing.assert_array_equal(got.scale, want.scale)
    if want.zero_point is not None:
        np.testing.assert_array_equal(got.zero_point, want.zero_point)
    assert got.dtype == want.dtype == w.dtype
    np.testing.assert_array_equal(deq(got), deq(want))
    assert int(res.tries) == 1 and float(res.damp) == pytest.approx(0.01)
    # tr(D^T I D) = ||W - Q||^2, here the RTN error (Q in float32, before the cast to w.dtype).
    q32 = jax.jit(lambda q: q.dequantize(jnp.float32))(want)
    rtn_err = float(jnp.sum((w.astype(jnp.float32) - q32) ** 2))
    assert float(res.output_error) == pytest.approx(rtn_err, rel=1e-4)


def test_ragged_last_group_576_g128():
    spec, (n, out) = IDENTITY_CASES["int4-g128-asym-576"]
    q = gptq(normal(2, (n, out)), jnp.eye(n), spec).qarray
    assert q.scale.shape == (5, out)  # 4 full groups of 128 and one of 64
    assert q.zero_point.shape == (5, out)


# ---------------------------------------------------------------------------------------------
# Correlated inputs: GPTQ's output error is well below RTN's

BEATS_CASES = {
    # name: (spec, act_order, static_groups, at most this fraction of RTN's output error)
    "int4-g32": (spec_of("int4", 32), False, False, 0.6),
    "int4-g32-actorder": (spec_of("int4", 32), True, False, 0.6),
    "int4-g32-static-actorder": (spec_of("int4", 32), True, True, 0.6),
    "int3-g64-asym-actorder": (spec_of("int3", 64, sym=False), True, False, 0.6),
    "int3-channel-asym": (spec_of("int3", sym=False), False, False, 0.6),
    "int2-g64-asym-mse": (spec_of("int2", 64, sym=False, clipping="mse"), False, False, 0.7),
}


@pytest.mark.parametrize(
    "spec,act_order,static_groups,ratio", BEATS_CASES.values(), ids=BEATS_CASES.keys()
)
def test_beats_rtn_on_correlated_inputs(layer, spec, act_order, static_groups, ratio):
    x, h, w = layer
    res = gptq(w, h, spec, act_order=act_order, static_groups=static_groups)
    q = deq(res.qarray.validate())
    got, base = out_err(x, w, q), out_err(x, w, rtn(w, spec))
    assert got < ratio * base, (got, base)
    # output_error is tr(D^T H D) = 2/n ||X D||^2, derived from the loss without a product.
    direct = 2.0 / x.shape[0] * got**2
    assert float(res.output_error) == pytest.approx(direct, rel=2e-3)
    lam = float(res.damp) * float(jnp.mean(jnp.diagonal(h)))
    damped = direct + lam * float(jnp.sum((w - q) ** 2))
    assert 2 * float(res.loss) == pytest.approx(damped, rel=2e-3)


# ---------------------------------------------------------------------------------------------
# A plain transcription of the reference (IST-DASLab/gptq `fasterquant`), float64, one column
# at a time, with the explicit Hinv = upper Cholesky factor of (H + damp I)^-1.


def _np_qparams(x, spec):
    """RTN range of the columns of `x` [rows, out] as jqtz's `max` clipping chooses it."""
    qmax = 2 ** (int(spec.format[3:]) - 1) - 1
    lo, hi = np.minimum(x.min(0), 0), np.maximum(x.max(0), 0)
    if spec.symmetric:
        s = np.maximum(-lo, hi) / qmax
        # Codes span [-qmax - 1, qmax] (as in the reference's maxq + 1 levels); RTN never
        # reaches -qmax - 1, GPTQ's updated weights can.
        return np.where(s > 0, s, 1.0), None, -qmax - 1, qmax
    s = (hi - lo) / (2 * qmax + 1)
    s = np.where(s > 0, s, 1.0)
    return s, np.clip(np.round(-lo / s), 0, 2 * qmax + 1), 0, 2 * qmax + 1


def _np_quant(x, s, z, qmin, qmax):
    z = 0.0 if z is None else z
    return (np.clip(np.round(x / s + z), qmin, qmax) - z) * s


def reference_gptq(w, h, spec, act_order=False, static_groups=False, percdamp=0.01):
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    n = w.shape[0]
    g = spec.group_size or n
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    groups = [_np_qparams(w[i : i + g], spec) for i in range(0, n, g)]  # static / channel
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, h = w[perm], h[perm][:, perm]
    h += percdamp * np.mean(np.diag(h)) * np.eye(n)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, U^T U = H^-1
    q = np.zeros_like(w)
    loss = 0.0
    dynamic = spec.group_size is not None and g < n and not static_groups
    for i in range(n):
        if dynamic:
            if i % g == 0:
                params = _np_qparams(w[i : i + g], spec)
        else:
            params = groups[perm[i] // g]
        q[i] = _np_quant(w[i], *params)
        err = (w[i] - q[i]) / hinv[i, i]
        loss += np.sum(err**2) / 2
        w[i:] -= np.outer(hinv[i, i:], err)
    return q[np.argsort(perm)], loss


_SHARED = ("int4-g32", "int4-g32-actorder", "int4-g32-static-actorder", "int3-g64-asym-actorder")
REFERENCE_CASES = {
    # name: (spec, act_order, static_groups, block_size)
    **{name: (*BEATS_CASES[name][:3], 128) for name in (*_SHARED, "int3-channel-asym")},
    # Blocks of one 48-row group, chunks of 16, five blocks, a ragged last group of 8.
    "int4-g48-b64-actorder": (spec_of("int4", 48), True, False, 64),
}


@pytest.mark.parametrize(
    "spec,act_order,static_groups,block_size", REFERENCE_CASES.values(), ids=REFERENCE_CASES.keys()
)
def test_matches_reference_transcription(layer, spec, act_order, static_groups, block_size):
    x, h, w = layer
    res = gptq(w, h, spec, act_order=act_order, static_groups=static_groups, block_size=block_size)
    want_q, want_loss = reference_gptq(w, h, spec, act_order, static_groups)
    got_q = np.asarray(deq(res.qarray), np.float64)
    # float32 against float64: a value within rounding noise of a code boundary could go the
    # other way (and nudge the later rows); none does here.
    same = np.mean(np.isclose(got_q, want_q, rtol=1e-5, atol=1e-7))
    assert same > 0.995, same
    assert float(res.loss) == pytest.approx(want_loss, rel=1e-4)
    assert out_err(x, w, got_q) == pytest.approx(out_err(x, w, want_q), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# act-order


def test_act_order_permutation_and_g_idx(layer):
    x, h, w = layer
    spec = spec_of("int4", 32)
    res = gptq(w, h, spec, act_order=True)
    q = res.qarray.validate()
    perm = np.asarray(q.perm)
    np.testing.assert_array_equal(perm, np.argsort(-np.diag(np.asarray(h)), kind="stable"))
    assert not np.array_equal(perm, np.arange(N_IN))
    # Stored row j is logical row perm[j]; groups are contiguous in that order.
    g_idx = np.asarray(res.g_idx)
    np.testing.assert_array_equal(g_idx[perm], np.arange(N_IN) // 32)
    stored = deq(dataclasses.replace(q, perm=None))  # rows in processing order
    logical = deq(q)
    np.testing.assert_array_equal(logical[perm], stored)
    # Each row lies on its group's grid: re-quantizing with the stored scales is exact.
    s = np.asarray(q.scale)[g_idx]  # [in, out], scale of each logical row
    np.testing.assert_allclose(
        np.round(np.asarray(logical) / s), np.asarray(logical) / s, atol=1e-4
    )
    # Different from processing in the natural order, and still better than RTN.
    plain = deq(gptq(w, h, spec).qarray)
    assert not np.array_equal(np.asarray(plain), np.asarray(logical))
    assert out_err(x, w, logical) < 0.6 * out_err(x, w, rtn(w, spec))


def test_static_groups_with_act_order_keep_the_natural_groups(layer):
    _, h, w = layer
    res = gptq(w, h, spec_of("int4", 32), act_order=True, static_groups=True)
    assert res.qarray.perm is None
    np.testing.assert_array_equal(res.g_idx, np.arange(N_IN) // 32)
    # Static group scales are RTN's scales of the original weights.
    np.testing.assert_array_equal(res.qarray.scale, jqtz.quantize(w, spec_of("int4", 32)).scale)


# ---------------------------------------------------------------------------------------------
# Dead inputs, damping, errors


def test_dead_inputs_are_zeroed_and_counted(layer):
    x, _, w = layer
    dead = np.array([0, 7, 64, 199])
    x = x.at[:, dead].set(0.0)
    res = gptq(w, hessian_of(x), spec_of("int4", 32))
    q = deq(res.qarray)
    assert int(res.dead) == len(dead)
    np.testing.assert_array_equal(q[dead], 0.0)
    assert bool(jnp.isfinite(q).all())
    assert out_err(x, w, q) < 0.6 * out_err(x, w, rtn(w, spec_of("int4", 32)))


def _indefinite_hessian(n, c, seed=0):
    """A symmetric H whose smallest eigenvalue is -c * mean(diag H)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = rng.uniform(0.5, 1.5, n)
    lam[0] = -c * lam[1:].sum() / (n + c)  # then lam[0] = -c * mean(lam) = -c * mean(diag)
    return jnp.asarray((basis * lam) @ basis.T, jnp.float32)


def test_indefinite_hessian_raises_damping(layer):
    _, _, w = layer
    h = _indefinite_hessian(N_IN, 0.015)
    res = gptq(w, h, spec_of("int4", 32))
    assert int(res.tries) == 2
    assert float(res.damp) == pytest.approx(0.02)
    assert bool(jnp.isfinite(deq(res.qarray)).all())
    with pytest.raises(ValueError, match="stays singular"):
        gptq(w, h, spec_of("int4", 32), max_damp_tries=1)


def test_hopeless_hessian_raises(layer):
    _, _, w = layer
    h = jnp.eye(N_IN).at[0, 1].set(10.0).at[1, 0].set(10.0)  # eigenvalue -9
    with pytest.raises(ValueError, match=r"stays singular.*more tokens") as e:
        gptq(w, h, spec_of("int4", 32))
    assert "5 times" in str(e.value)
    with pytest.raises(ValueError, match="`hessian` has 1 non-finite"):
        gptq(w, h.at[2, 2].set(jnp.nan), spec_of("int4", 32))


def test_bad_input_raises(layer):
    _, h, w = layer
    spec = spec_of("int4", 32)
    with pytest.raises(ValueError, match="`w` has 1 non-finite"):
        gptq(w.at[0, 0].set(jnp.nan), h, spec)
    with pytest.raises(ValueError, match=r"`hessian` must be \[in, in\]"):
        gptq(w, h[:-1, :-1], spec)
    with pytest.raises(ValueError, match="2-D kernel"):
        gptq(w[None], h, spec)
    with pytest.raises(TypeError, match="floating point"):
        gptq(w.astype(jnp.int32), h, spec)
    with pytest.raises(NotImplementedError, match="block"):
        gptq(w, h, jqtz.QuantSpec(format="int8", granularity="block", block_shape=(8, 8)))
    with pytest.raises(NotImplementedError, match="double_quant"):
        gptq(w, h, spec_of("nf4", 64, double_quant=True))
    with pytest.raises(NotImplementedError, match="axis=0"):
        gptq(w, h, jqtz.QuantSpec(format="int4", granularity="channel", axis=1))
    with pytest.raises(ValueError, match="max_damp_tries"):
        gptq(w, h, spec, max_damp_tries=0)


# ---------------------------------------------------------------------------------------------
# jit, determinism


def test_jit_matches_eager_and_is_deterministic(layer):
    _, h, w = layer
    spec = spec_of("int4", 32)
    eager = gptq(w, h, spec, act_order=True)
    jitted = jax.jit(lambda w, h: gptq(w, h, spec, act_order=True))
    for res in (jitted(w, h), gptq(w, h, spec, act_order=True)):
        assert isinstance(res, GPTQResult)
        for a, b in zip(jax.tree.leaves(res), jax.tree.leaves(eager), strict=True):
            np.testing.assert_array_equal(a, b)
    # Under jit a hopeless Hessian cannot raise: damp comes back NaN.
    bad = jnp.eye(N_IN).at[0, 1].set(10.0).at[1, 0].set(10.0)
    assert np.isnan(float(jitted(w, bad).damp))


# ---------------------------------------------------------------------------------------------
# Real data: stories260K, inputs from a forward pass over TinyStories text


def test_beats_rtn_on_stories260k_down_proj(stories260k):
    """layers_2 down_proj (172 inputs: int3 g64 leaves a ragged group of 44), its inputs from a
    forward pass of the model over 2048 tokens of TinyStories."""
    from jqtz.models.llama import Llama

    config, params, ids = stories260k
    tokens = jnp.asarray(ids, jnp.int32).reshape(16, 128)
    _, state = Llama(config).apply(params, tokens, capture_intermediates=True)
    mlp = state["intermediates"]["layers_2"]["mlp"]
    gate, up = mlp["gate_proj"]["__call__"][0], mlp["up_proj"]["__call__"][0]
    x = (jax.nn.silu(gate) * up).reshape(-1, config.hidden_dim)  # (2048, 172)
    w = jnp.asarray(params["params"]["layers_2"]["mlp"]["down_proj"]["kernel"])  # (172, 64)
    spec = spec_of("int3", 64, sym=False)

    calib, held_out = x[:1024], x[1024:]  # calibrate on 8 sequences, also score the other 8
    res = gptq(w, hessian_of(calib), spec, act_order=True)
    q, r = deq(res.qarray), rtn(w, spec)
    # Measured: 0.73 of RTN's output error on the calibration tokens, 0.92 on the others.
    assert out_err(calib, w, q) < 0.8 * out_err(calib, w, r)
    assert out_err(held_out, w, q) < out_err(held_out, w, r)

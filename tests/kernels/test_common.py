"""Kernel helpers in `pallas_kernels.common` that are not about timing (those are in
test_bench.py)."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import common


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("start,stop", [(0, 5), (3, 4), (2, 7), (6, 6)])
def test_fori_loop_rows_ahead_gives_each_step_its_own_rows(ahead, start, stop):
    """Loaded a step ahead or in the step, step i sees rows(i): the weighted sum is the same
    as a plain loop's, for one step, several, and none."""
    table = jnp.arange(1.0, 9.0)[:, None] * jnp.ones((1, 3))  # row i holds i + 1

    def body(i, acc, row):
        return acc + i * row

    got = jax.jit(
        lambda s, e: common.fori_loop_rows_ahead(
            s, e, body, jnp.zeros((1, 3)), lambda i: table[i][None], ahead=ahead
        )
    )(start, stop)
    want = sum(i * (i + 1.0) for i in range(start, stop))
    assert jnp.allclose(got, want)


def _fp8_kernel(contract_b, promote_every):
    """A Pallas Triton kernel whose one product is `common.fp8_dot`."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    def kernel(a_ref, b_ref, o_ref):
        o_ref[...] = common.fp8_dot(
            a_ref[...], b_ref[...], contract_b=contract_b, promote_every=promote_every
        )

    def run(a, b, interpret=False):
        n = b.shape[1 - contract_b]
        return pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((a.shape[0], n), jnp.float32),
            compiler_params=pltriton.CompilerParams(num_warps=4), interpret=interpret,
        )(a, b)  # fmt: skip

    return run


@pytest.mark.parametrize("contract_b", [0, 1])
def test_fp8_dot_is_the_exact_product_in_the_interpreter(contract_b):
    """e4m3 codes have 4-bit mantissas: their products and float32 sums of 64 of them are
    exact, so the interpreter's result equals XLA's float32 product of the same codes."""
    a = jax.random.normal(jax.random.key(0), (64, 64)).astype(jnp.float8_e4m3fn)
    b = jax.random.normal(jax.random.key(1), (64, 32)).astype(jnp.float8_e4m3fn)
    b = b.T if contract_b else b
    got = _fp8_kernel(contract_b, 64)(a, b, interpret=True)
    dims = (((1,), (contract_b,)), ((), ()))
    want = jax.lax.dot_general(
        a.astype(jnp.float32), b.astype(jnp.float32), dims, precision="highest"
    )
    assert got.shape == (64, 32) and bool(jnp.all(got == want))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the Pallas Triton lowering
def test_fp8_dot_tells_triton_when_to_promote():
    """The Triton IR's product carries `maxNumImpreciseAcc` (without it Triton refuses fp8
    `wgmma` for a float32 result); `lax.dot_general` in the same kernel would not."""
    from pallas_kernels import sass

    a = jax.ShapeDtypeStruct((64, 128), jnp.float8_e4m3fn)
    b = jax.ShapeDtypeStruct((32, 128), jnp.float8_e4m3fn)
    [(ir, _, _)] = sass.triton_modules(_fp8_kernel(1, 128), a, b)
    dots = [line for line in ir.splitlines() if "tt.dot" in line]
    assert len(dots) == 1 and "maxNumImpreciseAcc = 128" in dots[0], dots


@pytest.mark.parametrize(
    "shapes, kwargs, match",
    [
        (((4, 64), (64, 8)), dict(promote_every=0), "promote_every"),
        (((4, 64), (64, 8)), dict(promote_every=128), "promote_every"),
        (((4, 64), (32, 8)), dict(promote_every=32), "K must agree"),
        (((4, 64), (64, 8)), dict(contract_b=2, promote_every=32), "contract_b"),
    ],
)
def test_fp8_dot_refuses_bad_arguments(shapes, kwargs, match):
    a, b = (jnp.zeros(s, jnp.float8_e4m3fn) for s in shapes)
    with pytest.raises(ValueError, match=match):
        common.fp8_dot(a, b, **kwargs)

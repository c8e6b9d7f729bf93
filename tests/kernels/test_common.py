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

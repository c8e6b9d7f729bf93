"""Toy language models whose logits the eval tests control."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

VOCAB = 23


def causal_mean_model(params, tokens):
    """A tiny causal LM: logits at t = mean(embed[tokens[:t + 1]]) @ head. (B, T) -> (B, T, V)."""
    x = params["embed"][tokens]  # (B, T, D)
    counts = jnp.arange(1, tokens.shape[1] + 1, dtype=x.dtype)[None, :, None]
    h = jnp.tanh(jnp.cumsum(x, axis=1) / counts)  # (B, T, D)
    return h @ params["head"]  # (B, T, V)


def causal_mean_numpy(params, tokens):
    """The same model in float64 numpy, for reference computations."""
    embed = np.asarray(params["embed"], np.float64)
    head = np.asarray(params["head"], np.float64)
    x = embed[np.asarray(tokens)]
    h = np.tanh(np.cumsum(x, axis=1) / np.arange(1, x.shape[1] + 1)[None, :, None])
    return h @ head


@pytest.fixture(scope="session")
def toy_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "embed": 2.0 * jax.random.normal(k1, (VOCAB, 16)),
        "head": 1.5 * jax.random.normal(k2, (16, VOCAB)),
    }


@pytest.fixture(scope="session")
def toy_tokens():
    return np.asarray(jax.random.randint(jax.random.key(1), (400,), 0, VOCAB), np.int32)


@pytest.fixture(scope="session")
def toy_apply():
    """`causal_mean_model`, one object for the whole session (it is a static jit argument)."""
    return causal_mean_model


@pytest.fixture(scope="session")
def toy_numpy():
    return causal_mean_numpy

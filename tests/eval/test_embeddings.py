"""Tests for jqtz.eval.embeddings."""

import math

import numpy as np
import pytest

from jqtz.eval import default_sentences, embedding_fidelity


def _hash_embed(texts):
    """A deterministic embedding: character counts over 64 buckets."""
    out = np.zeros((len(texts), 64))
    for i, text in enumerate(texts):
        for ch in text:
            out[i, ord(ch) % 64] += 1.0
    return out


def _rotated(theta):
    """`_hash_embed` rotated by `theta` in the plane of its first two buckets and a new axis."""

    def embed(texts):
        e = _hash_embed(texts)
        e = np.concatenate([e, np.zeros((len(texts), 1))], axis=1)
        norm = np.linalg.norm(e, axis=1, keepdims=True)
        # a unit vector orthogonal to every embedding (the new axis), mixed in by theta
        return np.cos(theta) * e + np.sin(theta) * norm * np.eye(65)[64][None]

    return embed


def test_self_fidelity_is_one_on_the_default_sentences():
    f = embedding_fidelity(_hash_embed, _hash_embed)
    assert f.n == 256
    assert f.mean_cosine == pytest.approx(1.0, abs=1e-12)
    assert f.min_cosine == pytest.approx(1.0, abs=1e-12)
    assert f.worst_text in default_sentences(256)


def test_cosine_ignores_scale():
    f = embedding_fidelity(_hash_embed, lambda texts: 3.5 * _hash_embed(texts), ["ab", "xyz"])
    assert f.min_cosine == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("theta", [0.1, 0.7, math.pi / 2, 2.5])
def test_known_angle(theta):
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    base = lambda t: np.concatenate([_hash_embed(t), np.zeros((len(t), 1))], axis=1)
    f = embedding_fidelity(base, _rotated(theta), texts)
    assert f.mean_cosine == pytest.approx(math.cos(theta), abs=1e-12)
    assert f.min_cosine == pytest.approx(math.cos(theta), abs=1e-12)
    assert f.n == 3


def test_min_finds_the_worst_text():
    texts = ["aaaa", "bbbb", "cccc"]

    def damaged(t):
        e = _hash_embed(t)
        e[1] += 2.0  # only "bbbb" moves
        return e

    f = embedding_fidelity(_hash_embed, damaged, texts)
    assert f.worst_text == "bbbb"
    assert f.min_cosine < f.mean_cosine < 1.0
    assert f.mean_cosine == pytest.approx((2 + f.min_cosine) / 3, rel=1e-12)
    assert set(f.to_dict()) == {"mean_cosine", "min_cosine", "n", "worst_text"}


def test_bad_inputs():
    with pytest.raises(TypeError, match="one str"):
        embedding_fidelity(_hash_embed, _hash_embed, "a text")
    with pytest.raises(ValueError, match="empty"):
        embedding_fidelity(_hash_embed, _hash_embed, [])
    with pytest.raises(ValueError, match=r"`embed_fn_quant` must return embeddings \(N, D\)"):
        embedding_fidelity(_hash_embed, lambda t: _hash_embed(t)[:1], ["a", "b"])
    with pytest.raises(ValueError, match="same dimension"):
        embedding_fidelity(_hash_embed, lambda t: _hash_embed(t)[:, :8], ["AB", "CD"])
    with pytest.raises(ValueError, match="zero vector for text 1"):
        embedding_fidelity(_hash_embed, _hash_embed, ["a", ""])
    with pytest.raises(ValueError, match="non-finite values for text 0"):
        embedding_fidelity(_hash_embed, lambda t: _hash_embed(t) * np.nan, ["a"])

"""Tests for jqtz.eval.compare: KL and top-1 agreement against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqtz.eval import compare_logits, perplexity


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _perturbed(params, scale, seed=7):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def test_identical_params_give_zero_kl_and_full_agreement(toy_apply, toy_params, toy_tokens):
    copy = jax.tree.map(jnp.array, toy_params)
    c = compare_logits(toy_apply, toy_params, copy, toy_tokens, ctx=32, batch_size=5)
    assert c.kl == 0.0 and c.max_kl == 0.0
    assert c.top1_agreement == 1.0
    assert c.n_tokens == 12 * 31
    assert c.ppl == c.base_ppl


@pytest.mark.parametrize("scale", [0.05, 0.5])
def test_perturbed_params_match_numpy_reference(
    toy_apply, toy_numpy, toy_params, toy_tokens, scale
):
    noisy = _perturbed(toy_params, scale)
    ctx, stride, n_windows = 24, 16, 6
    c = compare_logits(
        toy_apply, toy_params, noisy, toy_tokens, ctx=ctx, stride=stride, windows=n_windows
    )
    kls, agree = [], []
    for w in range(n_windows):
        window = toy_tokens[None, w * stride : w * stride + ctx]
        log_p = _log_softmax(toy_numpy(toy_params, window)[0, :-1])  # (T-1, V)
        log_q = _log_softmax(toy_numpy(noisy, window)[0, :-1])
        first = 0 if w == 0 else ctx - 1 - stride  # prediction positions of scored targets
        kls.append((np.exp(log_p) * (log_p - log_q)).sum(axis=-1)[first:])
        agree.append((log_p.argmax(-1) == log_q.argmax(-1))[first:])
    kls, agree = np.concatenate(kls), np.concatenate(agree)
    assert c.n_tokens == len(kls) == 23 + 5 * 16
    assert c.kl > 0
    assert c.kl == pytest.approx(kls.mean(), rel=1e-3, abs=1e-7)
    assert c.max_kl == pytest.approx(kls.max(), rel=1e-3, abs=1e-7)
    assert c.top1_agreement == pytest.approx(agree.mean(), abs=1.5 / len(agree))


def test_larger_perturbation_diverges_more(toy_apply, toy_params, toy_tokens):
    small = compare_logits(toy_apply, toy_params, _perturbed(toy_params, 0.05), toy_tokens, ctx=32)
    large = compare_logits(toy_apply, toy_params, _perturbed(toy_params, 0.5), toy_tokens, ctx=32)
    assert 0 < small.kl < large.kl
    assert large.top1_agreement < small.top1_agreement <= 1.0


def test_perplexities_agree_with_perplexity(toy_apply, toy_params, toy_tokens):
    noisy = _perturbed(toy_params, 0.3)
    kw = dict(ctx=40, stride=25, windows=9, bos=True, bos_id=0)
    c = compare_logits(toy_apply, toy_params, noisy, toy_tokens, batch_size=4, **kw)
    base = perplexity(toy_apply, toy_params, toy_tokens, **kw)
    quant = perplexity(toy_apply, noisy, toy_tokens, **kw)
    assert (c.n_tokens, c.n_windows, c.bos) == (base.n_tokens, base.n_windows, True)
    assert c.base_ppl == pytest.approx(base.ppl, rel=1e-6)
    assert c.ppl == pytest.approx(quant.ppl, rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batch_size_does_not_change_the_result(toy_apply, toy_params, toy_tokens, batch_size):
    noisy = _perturbed(toy_params, 0.2)
    ref = compare_logits(toy_apply, toy_params, noisy, toy_tokens, ctx=48, batch_size=1)
    c = compare_logits(toy_apply, toy_params, noisy, toy_tokens, ctx=48, batch_size=batch_size)
    assert c.n_tokens == ref.n_tokens
    assert c.kl == pytest.approx(ref.kl, rel=1e-5)
    assert c.top1_agreement == ref.top1_agreement


def test_compiles_once_and_runs_both_models_per_batch(toy_params, toy_tokens):
    traces = []

    def apply(params, tokens):
        traces.append(tokens.shape)
        return params["embed"][tokens] @ params["head"]

    c = compare_logits(apply, toy_params, toy_params, toy_tokens, ctx=16, batch_size=4)
    assert c.n_windows == 25
    assert traces == [(4, 16), (4, 16)]  # one trace per model, one compilation


def test_non_finite_logits_name_the_model_and_window(toy_apply, toy_params, toy_tokens):
    broken = dict(toy_params, head=toy_params["head"].at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"from the `params` model in window 0"):
        compare_logits(toy_apply, toy_params, broken, toy_tokens, ctx=32)
    with pytest.raises(ValueError, match=r"baseline `base_params` model in window 0"):
        compare_logits(toy_apply, broken, toy_params, toy_tokens, ctx=32)


def test_mismatched_models_are_an_error(toy_params, toy_tokens):
    def apply(params, tokens):
        return params[tokens]

    with pytest.raises(ValueError, match="same model"):
        compare_logits(apply, jnp.zeros((23, 23)), jnp.zeros((23, 30)), toy_tokens, ctx=16)


def test_result_to_dict(toy_apply, toy_params, toy_tokens):
    c = compare_logits(toy_apply, toy_params, toy_params, toy_tokens, ctx=100)
    d = c.to_dict()
    assert set(d) >= {"kl", "top1_agreement", "n_tokens"}
    assert d["n_windows"] == 4 and d["ctx"] == 100 and d["stride"] == 100

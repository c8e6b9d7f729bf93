"""Tests for jqtz.eval.perplexity: analytic models, the windowing protocol, batching, errors."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqtz.eval import PerplexityResult, perplexity, text_perplexity, tokenize


def _uniform_apply(vocab):
    def apply(params, tokens):
        return jnp.zeros((*tokens.shape, vocab))

    return apply


def _next_token(params, tokens):
    """Always right on the stream 0, 1, 2, ... (mod 64): puts a large logit on t + 1."""
    return 40.0 * jax.nn.one_hot((tokens + 1) % 64, 64)


def _position_confidence(params, tokens):
    """Right on t -> t + 1 (mod 64) with logit p at window position p: NLL depends on context."""
    position = jnp.arange(tokens.shape[1], dtype=jnp.float32)[None, :, None]
    return position * jax.nn.one_hot((tokens + 1) % 64, 64)


def _window_nll(logits, window):
    """float64 next-token NLL (T-1,) of one window from its logits (T, V)."""
    logits = np.asarray(logits, np.float64)[:-1]
    top = logits.max(axis=-1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
    return lse - logits[np.arange(len(logits)), np.asarray(window)[1:]]


def _hf_sliding_window(logits_fn, tokens, max_length, stride):
    """Hugging Face's "perplexity of fixed-length models" loop, transcribed: (mean NLL, count)."""
    seq_len, prev_end, total, count = len(tokens), 0, 0.0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        ids = tokens[begin:end]
        labels = ids.copy()
        labels[:-trg_len] = -100
        valid = labels[1:] != -100
        nll = _window_nll(logits_fn(ids[None])[0], ids)
        total, count = total + nll[valid].sum(), count + int(valid.sum())
        prev_end = end
        if end == seq_len:
            break
    return total / count, count


@pytest.mark.parametrize("vocab", [2, 17, 512])
def test_uniform_logits_give_vocab_size(vocab):
    r = perplexity(_uniform_apply(vocab), None, np.zeros(100, np.int32), ctx=16)
    assert r.ppl == pytest.approx(vocab, rel=1e-5)
    assert r.nll == pytest.approx(math.log(vocab), rel=1e-5)


def test_perfect_model_gives_one():
    r = perplexity(_next_token, None, np.arange(300) % 64, ctx=32, batch_size=4)
    assert r.ppl == pytest.approx(1.0, abs=1e-6)
    assert r.n_tokens == 9 * 31


@pytest.mark.parametrize("stride", [32, 16, 5, 1])
def test_matches_hugging_face_sliding_window(toy_apply, toy_numpy, toy_params, toy_tokens, stride):
    ctx, n_windows = 32, 9
    tokens = toy_tokens[: (n_windows - 1) * stride + ctx]  # whole windows only, as HF ends them
    expected, count = _hf_sliding_window(
        lambda ids: toy_numpy(toy_params, ids), tokens, ctx, stride
    )
    r = perplexity(toy_apply, toy_params, tokens, ctx=ctx, stride=stride, batch_size=4)
    assert (r.n_windows, r.n_tokens, r.stride) == (n_windows, count, stride)
    assert r.nll == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("stride", [24, 10, 1])
def test_stride_scores_each_token_once_with_stated_context(stride):
    # With logits p at position p, NLL at position p is f(p) = log(1 + 63 exp(-p)): the score of
    # a window's prediction depends only on where in the window it is made.
    ctx, n_windows = 24, 6
    tokens = np.arange((n_windows - 1) * stride + ctx) % 64
    r = perplexity(_position_confidence, None, tokens, ctx=ctx, stride=stride, batch_size=4)
    f = [math.log1p(63 * math.exp(-p)) for p in range(ctx - 1)]
    first_window = sum(f)  # positions 0 .. ctx-2 predict targets 1 .. ctx-1
    later = sum(f[max(0, ctx - stride - 1) :])  # the last `stride` targets (ctx-1 at most)
    count = ctx - 1 + (n_windows - 1) * min(stride, ctx - 1)
    assert r.n_tokens == count
    assert r.n_tokens == len(tokens) - 1 - (n_windows - 1) * (stride == ctx)
    assert r.nll == pytest.approx((first_window + (n_windows - 1) * later) / count, rel=1e-6)


def test_smaller_stride_gives_more_context():
    tokens = np.arange(400) % 64
    wide = perplexity(_position_confidence, None, tokens, ctx=32)
    narrow = perplexity(_position_confidence, None, tokens, ctx=32, stride=8)
    assert narrow.nll < wide.nll


def test_bos_prepends_one_token_per_window(toy_apply, toy_numpy, toy_params, toy_tokens):
    ctx, bos_id = 20, 22
    r = perplexity(toy_apply, toy_params, toy_tokens, ctx=ctx, bos=True, bos_id=bos_id)
    span = ctx - 1
    n_windows = len(toy_tokens) // span
    expected = []
    for w in range(n_windows):
        window = np.concatenate([[bos_id], toy_tokens[w * span : (w + 1) * span]])
        expected.append(_window_nll(toy_numpy(toy_params, window[None])[0], window))
    expected = np.concatenate(expected)
    assert (r.bos, r.stride, r.n_windows, r.n_tokens) == (True, span, n_windows, len(expected))
    assert r.nll == pytest.approx(expected.mean(), rel=1e-5)
    plain = perplexity(toy_apply, toy_params, toy_tokens, ctx=ctx)
    assert (plain.bos, plain.stride, plain.n_tokens) == (False, ctx, plain.n_windows * (ctx - 1))
    assert plain.nll != pytest.approx(r.nll, rel=1e-3)


def test_bos_scores_the_first_text_token():
    # ctx - 1 text tokens: not one window without BOS, exactly one with it, every token scored.
    tokens = np.arange(15) % 64
    with pytest.raises(ValueError, match="15 tokens"):
        perplexity(_next_token, None, tokens, ctx=16)
    r = perplexity(_next_token, None, tokens, ctx=16, bos=True, bos_id=63)
    assert (r.n_windows, r.n_tokens) == (1, 15)
    assert r.ppl < 1.0 + 1e-6  # the BOS 63 predicts 0 = (63 + 1) % 64


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 50])
def test_batch_size_and_padding_do_not_change_the_result(
    toy_apply, toy_params, toy_tokens, batch_size
):
    # 7 windows: batch sizes 3, 4 and 50 pad the last batch.
    kw = dict(ctx=40, stride=30, windows=7)
    ref = perplexity(toy_apply, toy_params, toy_tokens, batch_size=1, **kw)
    r = perplexity(toy_apply, toy_params, toy_tokens, batch_size=batch_size, **kw)
    assert r.n_windows == ref.n_windows == 7
    assert r.n_tokens == ref.n_tokens
    assert r.nll == pytest.approx(ref.nll, rel=1e-6)


def test_windows_keeps_the_first_windows(toy_apply, toy_numpy, toy_params, toy_tokens):
    r = perplexity(toy_apply, toy_params, toy_tokens, ctx=32, windows=3, batch_size=2)
    expected = np.concatenate(
        [
            _window_nll(toy_numpy(toy_params, toy_tokens[None, s : s + 32])[0], toy_tokens[s:][:32])
            for s in (0, 32, 64)
        ]
    )
    assert (r.n_windows, r.n_tokens) == (3, 93)
    assert r.nll == pytest.approx(expected.mean(), rel=1e-5)


def test_compiles_once_for_all_batches(toy_params, toy_tokens):
    traces = []

    def apply(params, tokens):
        traces.append(tokens.shape)
        return params["embed"][tokens] @ params["head"]

    r = perplexity(apply, toy_params, toy_tokens, ctx=16, batch_size=3)
    assert r.n_windows == 25  # 9 batches, the last padded
    assert traces == [(3, 16)]


def test_is_deterministic(toy_apply, toy_params, toy_tokens):
    a = perplexity(toy_apply, toy_params, toy_tokens, ctx=24, batch_size=5)
    b = perplexity(toy_apply, toy_params, toy_tokens, ctx=24, batch_size=5)
    assert a == b


def test_result_states_the_protocol(toy_apply, toy_params, toy_tokens):
    r = perplexity(toy_apply, toy_params, toy_tokens, ctx=50, stride=25, windows=4)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["ppl"] == r.ppl and d["n_text_tokens"] == len(toy_tokens)
    for fragment in ("4 windows", "50 tokens", "stride 25", f"{r.n_tokens} of 400 tokens"):
        assert fragment in d["protocol"]
    assert isinstance(r, PerplexityResult)


class _ByteTokenizer:
    bos_id = 256

    def encode(self, text, *, bos=False):
        return [self.bos_id] * bos + list(text.encode())


def test_text_perplexity_tokenizes_once_without_bos():
    text = "the quick brown fox jumps over the lazy dog. " * 8
    tok = _ByteTokenizer()
    tokens = tokenize(text, tok)
    assert tokens.tolist() == list(text.encode())
    uniform = _uniform_apply(257)
    r = text_perplexity(uniform, None, text, tok, ctx=64, bos=True)
    assert r == perplexity(uniform, None, tokens, ctx=64, bos=True, bos_id=256)
    assert r.ppl == pytest.approx(257, rel=1e-5)


def test_too_short_text_says_how_many_tokens():
    with pytest.raises(ValueError, match=r"has 10 tokens.*ctx=512"):
        perplexity(_uniform_apply(8), None, np.zeros(10, np.int32))
    with pytest.raises(ValueError, match=r"has 0 tokens.*ctx=4"):
        perplexity(_uniform_apply(8), None, [], ctx=4)


def test_nan_logits_name_the_window():
    def nan_in_third_window(params, tokens):  # the third window of arange starts at 2 * 16
        bad = (tokens[:, :1] == 32)[..., None]
        return jnp.where(bad, jnp.nan, jnp.zeros((*tokens.shape, 64)))

    with pytest.raises(ValueError, match=r"window 2 \(text tokens \[32, 48\)\)"):
        perplexity(nan_in_third_window, None, np.arange(64), ctx=16, batch_size=2)


def test_inf_nll_is_an_error_but_masked_logits_are_not():
    def mask_token_5(params, tokens):  # -inf on a token that never occurs is legal
        return jnp.zeros((*tokens.shape, 8)).at[..., 5].set(-jnp.inf)

    r = perplexity(mask_token_5, None, np.arange(40) % 4, ctx=8)
    assert r.ppl == pytest.approx(7.0, rel=1e-5)
    with pytest.raises(ValueError, match="window 0"):
        perplexity(mask_token_5, None, np.arange(40) % 8, ctx=8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(ctx=1), "`ctx` must be an integer >= 2"),
        (dict(ctx=16, stride=17), "`stride` must be at most the 16"),
        (dict(ctx=16, stride=16, bos=True, bos_id=0), "`stride` must be at most the 15"),
        (dict(ctx=16, stride=0), "`stride` must be an integer >= 1"),
        (dict(ctx=16, windows=7), r"`windows`=7 but the text's 100 tokens hold only 6"),
        (dict(ctx=16, bos=True), "`bos=True` needs `bos_id`"),
        (dict(ctx=16, batch_size=0), "`batch_size` must be an integer >= 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        perplexity(_uniform_apply(8), None, np.zeros(100, np.int32), **kwargs)


def test_bad_tokens_and_logits():
    with pytest.raises(ValueError, match="1-D"):
        perplexity(_uniform_apply(8), None, np.zeros((2, 50), np.int32), ctx=8)
    with pytest.raises(TypeError, match="integer ids"):
        perplexity(_uniform_apply(8), None, np.zeros(50), ctx=8)
    with pytest.raises(ValueError, match="id 15 but `apply_fn` returns logits over 8"):
        perplexity(_uniform_apply(8), None, np.arange(16), ctx=8)
    with pytest.raises(ValueError, match=r"must return logits \(batch, seq_len, vocab\)"):
        perplexity(lambda p, t: jnp.zeros(t.shape), None, np.zeros(50, np.int32), ctx=8)

    class Unhashable:
        __eq__ = object.__eq__
        __hash__ = None

        def __call__(self, params, tokens):
            return jnp.zeros((*tokens.shape, 8))

    with pytest.raises(TypeError, match="hashable"):
        perplexity(Unhashable(), None, np.zeros(50, np.int32), ctx=8)

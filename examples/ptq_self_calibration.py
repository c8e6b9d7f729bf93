"""GPTQ or AWQ calibrated on the model's own samples, scored on three unrelated texts.

Calibration text that matches the text a model will serve is the remedy for GPTQ's
calibration-domain fit (docs/ptq.md, "Choosing calibration text"); when there is none, the model
can write its own. This draws `--samples` sequences of `--seq-len` tokens from SmolLM2-135M
(temperature 1, each started from `<|endoftext|>`, the model's document separator, with seeded
keys), quantizes with them, and reports perplexity on held-out Shakespeare, TinyStories and
Python's documentation (32 x 512 tokens each, no BOS), the protocol of `examples/ptq_results.py`.

Usage:
  python examples/ptq_self_calibration.py --method gptq
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import jqtz
from jqtz.eval.corpus import default_corpus
from jqtz.eval.perplexity import perplexity, tokenize
from jqtz.io.gguf import load_gguf, smollm2_path
from jqtz.models.llama import Llama, generate
from jqtz.ptq import Recipe, llama_layout, quantize_model

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
SEPARATOR = 0  # SmolLM2's <|endoftext|>


def sample_tokens(config, params, n: int, length: int, batch: int = 32) -> jax.Array:
    """`n` sampled sequences of `length` tokens, `batch` at a time (key = the batch's start)."""
    out = []
    for i in range(0, n, batch):
        start = jnp.full((min(batch, n - i), 1), SEPARATOR, jnp.int32)
        out.append(np.asarray(generate(config, params, start, length, temperature=1.0,
                                       rng=jax.random.key(i))))  # fmt: skip
    return jnp.asarray(np.concatenate(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="gptq", choices=("gptq", "awq"))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    config, params, tok = load_gguf(smollm2_path())
    t0 = time.perf_counter()
    tokens = sample_tokens(config, params, args.samples, args.seq_len)
    sampled = time.perf_counter() - t0
    print(f"sampled {tokens.shape} in {sampled:.0f} s; the first begins "
          f"{tok.decode(list(np.asarray(tokens[0, :40])))!r}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    qparams, _ = quantize_model(params, llama_layout(config), tokens, Recipe(method=args.method))
    seconds = time.perf_counter() - t0
    model = Llama(config)

    def apply(p, t):
        with jqtz.nn.quantized_ops():
            return model.apply(p, t)

    texts = {
        "tinyshakespeare[900000:]": (DATA / "tinyshakespeare.txt").read_text()[900_000:],
        "tinystories_train_head": (DATA / "tinystories_train_head.txt").read_text(),
        "default corpus (Python docs)": default_corpus(),
    }
    ppl = {
        name: perplexity(apply, qparams, tokenize(text, tok), ctx=512, windows=32).ppl
        for name, text in texts.items()
    }
    print(json.dumps({"method": args.method, "calibration": f"{args.samples} x {args.seq_len} "
                      "sampled tokens", "sample_seconds": sampled, "quantize_seconds": seconds,
                      "ppl": ppl}))  # fmt: skip


if __name__ == "__main__":
    main()

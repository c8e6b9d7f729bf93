"""stories260K perplexity with llama2.c's protocol, to compare with its published figure (~3.66).

llama2.c trains on TinyStories with a BOS token before every story and evaluates non-overlapping
windows of 512 tokens. This script does the same on `../shared/data/tinystories_sample.txt`
(stories separated by `<|endoftext|>`): each story is stripped and encoded with a BOS, the token
streams are concatenated, and `jqtz.eval.perplexity` scores windows of `--ctx` tokens.

Usage:
  python examples/stories260k_perplexity.py [--ctx 512] [--bits 8]
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

import jqtz
from jqtz.eval.perplexity import perplexity
from jqtz.io.llama2c import SentencePieceTokenizer, load_llama2c
from jqtz.models.llama import Llama

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--bits", type=int, choices=(4, 8), help="RTN-quantize the kernels first")
    args = ap.parse_args()
    config, params = load_llama2c(DATA / "stories260K.bin")
    tok = SentencePieceTokenizer(DATA / "tok512.model")
    stories = [
        s.strip() for s in (DATA / "tinystories_sample.txt").read_text().split("<|endoftext|>")
    ]
    tokens = np.concatenate([tok.encode(s, bos=True) for s in stories if s])
    if args.bits:
        spec = jqtz.QuantSpec(format=f"int{args.bits}")
        params = jqtz.quantize_params(params, [(r".*/kernel", spec)])
    model = Llama(config)

    def apply(p, t):
        with jqtz.nn.quantized_ops():
            return model.apply(p, t)

    r = perplexity(apply, params, tokens, ctx=min(args.ctx, len(tokens)))
    print(f"stories260K perplexity {r.ppl:.3f} ({r.protocol}; {len(stories)} stories, BOS each)")


if __name__ == "__main__":
    main()

"""PTQ on a real encoder: all-MiniLM-L6-v2 sentence embeddings after RTN, GPTQ and AWQ.

The calibration set is `--samples` paragraphs of TinyStories (`tinystories_train_head.txt`,
the first paragraphs; each tokenized with [CLS]/[SEP], at most `--seq-len` tokens, padded and
masked). Fidelity is the cosine similarity of each quantized model's embeddings to the float32
model's on two held-out sets: 256 more TinyStories paragraphs (the calibration domain) and 256
sentences of the default corpus (Python's documentation: another domain, REFERENCE §6).

Usage:
  python examples/ptq_minilm.py                      # W4 g128: rtn gptq awq
  python examples/ptq_minilm.py --bits 3 --group-size 64
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax.numpy as jnp

import jqtz
from jqtz.eval.corpus import default_sentences
from jqtz.eval.embeddings import embedding_fidelity
from jqtz.io.hf_bert import embed, load_hf_bert, minilm_path
from jqtz.ptq import Recipe, bert_layout, default_spec, quantize_model

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def paragraphs() -> list[str]:
    text = (DATA / "tinystories_train_head.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if len(p.split()) >= 8]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="0: per channel")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args(argv)

    config, variables, tok = load_hf_bert(minilm_path())
    paras = paragraphs()
    calib, held_out = paras[: args.samples], paras[args.samples : args.samples + 256]
    ids, mask = tok.encode_batch(calib)
    ids, mask = ids[:, : args.seq_len], mask[:, : args.seq_len]
    sets = {"tinystories (held out)": held_out, "default corpus": default_sentences(256)}

    def embed_fn(v):
        def f(texts):
            with jqtz.nn.quantized_ops():
                return embed(config, v, tok, texts)

        return f

    base = embed_fn(variables)
    rows = []
    for method in args.methods:
        spec = default_spec(method, bits=args.bits, group_size=args.group_size or None)
        t0 = time.perf_counter()
        q, _ = quantize_model(
            variables,
            bert_layout(config),
            (jnp.asarray(ids), jnp.asarray(mask)),
            Recipe(method=method, spec=spec),
        )
        seconds = time.perf_counter() - t0
        row = {"method": method, "bits": args.bits, "seconds": seconds}
        for name, texts in sets.items():
            fid = embedding_fidelity(base, embed_fn(q), texts)
            row[name] = {"mean_cosine": fid.mean_cosine, "min_cosine": fid.min_cosine}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(
        f"\nall-MiniLM-L6-v2, W{args.bits} group {args.group_size or 'per channel'}; calibration "
        f"{args.samples} TinyStories paragraphs (<= {args.seq_len} tokens, {int(mask.sum())} "
        "tokens in all)\n"
    )
    names = list(sets)
    print("| method | " + " | ".join(f"{n}: mean / min cosine" for n in names) + " | time |")
    print("|---|" + "---|" * len(names) + "---|")
    for r in rows:
        cells = " | ".join(f"{r[n]['mean_cosine']:.5f} / {r[n]['min_cosine']:.4f}" for n in names)
        print(f"| {r['method']} | {cells} | {r['seconds']:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

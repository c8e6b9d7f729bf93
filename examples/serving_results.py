"""Quality, size and CPU decode speed of round-to-nearest configurations on the real models.

For SmolLM2-135M (dequantized Q4_1 GGUF: its "full precision" is already 4-bit at the source),
stories260K (llama2.c) and all-MiniLM-L6-v2, each configuration is quantized with
`jqtz.quantize_params` (rule `.*/kernel`; embeddings, head and norms stay float32) and served
through `jqtz.nn.quantized_ops()`:

- perplexity (causal LMs; protocol printed with each table) or the cosine similarity of sentence
  embeddings to the float32 model (MiniLM, 256 default-corpus sentences);
- weight bytes: the whole parameter tree as stored;
- CPU tokens/s of jitted greedy decode (batch 1, 64 new tokens after an 8-token prompt, the
  second call, so compilation is excluded); sentences/s for MiniLM.

Usage:
  python examples/serving_results.py                  # all three models (about 20 minutes)
  python examples/serving_results.py --models stories260k --windows 4
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jqtz
from jqtz.eval.corpus import default_sentences
from jqtz.eval.embeddings import embedding_fidelity
from jqtz.eval.perplexity import perplexity, tokenize
from jqtz.models.llama import Llama, generate

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"

PER_TOKEN = dict(granularity="channel", axis=-1)
CONFIGS = {
    "float32": None,
    "W8 channel (RTN)": jqtz.QuantSpec(format="int8"),
    "W4 g128 (RTN)": jqtz.QuantSpec(format="int4", granularity="group", group_size=128),
    "NF4 g64 + double quant": jqtz.QuantSpec(
        format="nf4", granularity="group", group_size=64, double_quant=True
    ),
    "W8A8 int8 dynamic": jqtz.QuantSpec(
        format="int8", activation=jqtz.QuantSpec(format="int8", **PER_TOKEN)
    ),
    "FP8 e4m3 per-tensor": jqtz.QuantSpec(
        format="fp8_e4m3",
        granularity="tensor",
        activation=jqtz.QuantSpec(format="fp8_e4m3", granularity="tensor", axis=-1),
    ),
    "FP8 e4m3 per-channel": jqtz.QuantSpec(
        format="fp8_e4m3", activation=jqtz.QuantSpec(format="fp8_e4m3", **PER_TOKEN)
    ),
}


def quantized(params, spec):
    return params if spec is None else jqtz.quantize_params(params, [(r".*/kernel", spec)])


def llama_rows(name, config, params, tokens, *, ctx, windows, speed_only=False):
    model = Llama(config)

    def apply(p, t):
        with jqtz.nn.quantized_ops():
            return model.apply(p, t)

    prompt = jnp.asarray(tokens[None, :8])
    rows = []
    for label, spec in CONFIGS.items():
        q = quantized(params, spec)
        r = (
            None
            if speed_only
            else perplexity(apply, q, tokens, ctx=ctx, windows=windows, batch_size=4)
        )
        generate(config, q, prompt, 64).block_until_ready()
        t0 = time.perf_counter()
        generate(config, q, prompt, 64).block_until_ready()
        tps = 64 / (time.perf_counter() - t0)
        rows.append(
            dict(
                model=name,
                config=label,
                perplexity=r and r.ppl,
                protocol=r and r.protocol,
                weight_bytes=jqtz.memory_report(q).total_bytes,
                tokens_per_s=tps,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def minilm_rows(speed_only=False):
    from jqtz.io.hf_bert import embed, load_hf_bert, minilm_path

    config, variables, tok = load_hf_bert(minilm_path())
    variables = jax.device_put(variables)  # numpy leaves: on the device once, outside the timing
    texts = default_sentences(256)

    def embed_fn(v):
        def f(batch):
            with jqtz.nn.quantized_ops():
                return embed(config, v, tok, batch)

        return f

    base = embed_fn(variables)
    rows = []
    for label, spec in CONFIGS.items():
        q = quantized(variables, spec)
        fid = None if speed_only else embedding_fidelity(base, embed_fn(q), texts)
        embed_fn(q)(texts)  # compile every padded shape outside the timing
        t0 = time.perf_counter()
        embed_fn(q)(texts)
        sps = len(texts) / (time.perf_counter() - t0)
        rows.append(
            dict(
                model="all-MiniLM-L6-v2",
                config=label,
                mean_cosine=fid and fid.mean_cosine,
                min_cosine=fid and fid.min_cosine,
                weight_bytes=jqtz.memory_report(q).total_bytes,
                sentences_per_s=sps,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "stories260k", "minilm"])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--speed-only", action="store_true", help="only the CPU speed columns")
    args = ap.parse_args()
    print(f"# jax {jax.__version__}, {platform.machine()}, {__import__('os').cpu_count()} cores")
    rows = []
    if "stories260k" in args.models:
        from jqtz.io.llama2c import SentencePieceTokenizer, load_llama2c

        config, params = load_llama2c(SHARED / "stories260K.bin")
        tok = SentencePieceTokenizer(SHARED / "tok512.model")
        text = (SHARED / "tinystories_train_head.txt").read_text()[:40000]
        tokens = tokenize(text, tok)
        rows += llama_rows(
            "stories260K", config, params, tokens, ctx=256, windows=None, speed_only=args.speed_only
        )
    if "smollm2" in args.models:
        from jqtz.io.gguf import load_gguf, smollm2_path

        config, params, tok = load_gguf(smollm2_path())
        text = (SHARED / "tinyshakespeare.txt").read_text()[900000:]
        tokens = tokenize(text, tok)
        rows += llama_rows(
            "SmolLM2-135M",
            config,
            params,
            tokens,
            ctx=512,
            windows=args.windows,
            speed_only=args.speed_only,
        )
    if "minilm" in args.models:
        rows += minilm_rows(args.speed_only)

    mib = 2**20
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        print(f"\n### {model}\n")
        if args.speed_only:
            key = "tokens_per_s" if "tokens_per_s" in sub[0] else "sentences_per_s"
            print(f"| config | {key} |\n|---|---|")
            for r in sub:
                print(f"| {r['config']} | {r[key]:.1f} |")
        elif "perplexity" in sub[0]:
            print(f"Protocol: {sub[0]['protocol']}.\n")
            print("| config | perplexity | weight bytes | decode tokens/s (CPU) |")
            print("|---|---|---|---|")
            for r in sub:
                mb = r["weight_bytes"] / mib
                print(
                    f"| {r['config']} | {r['perplexity']:.3f} | {mb:.2f} MiB "
                    f"| {r['tokens_per_s']:.1f} |"
                )
        else:
            print("| config | mean cosine | min cosine | weight bytes | sentences/s (CPU) |")
            print("|---|---|---|---|---|")
            for r in sub:
                print(
                    f"| {r['config']} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} "
                    f"| {r['weight_bytes'] / mib:.2f} MiB | {r['sentences_per_s']:.1f} |"
                )
    print("\n" + json.dumps(rows, default=float))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()

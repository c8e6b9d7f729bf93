"""SmolLM2-135M perplexity through the incremental decode path with quantized KV caches.

Every token of every window is fed one at a time (`jqtz.models.quantized_kv_cache.
decode_perplexity`, a jitted `lax.scan`), so each prediction attends over the keys and values as
the cache stored them: the difference from the full-precision cache is the cache's quantization
error alone. Caches: full precision (float32, the model's compute dtype), int8 and fp8 e4m3
(per-token, per-head scales; int8 also with its queries rounded to int8 per head for the
scores, `KVQuantSpec(int8_queries=True)`, the decode kernel's int8 `q kᵀ`), int4 KIVI
(per-channel key scales over 32-token groups, per-token value scales, a full-precision window
of the R most recent tokens; R = 128 is KIVI's default and R = 32 quantizes much more of a
512-token window). The weights are SmolLM2's dequantized Q4_1 GGUF, unchanged in every row.

Held-out text: tinyshakespeare.txt[900000:]; windows of 512 tokens, no BOS, non-overlapping,
511 scored tokens each (the protocol line is printed). Also prints the full-forward perplexity
of the same windows (which must equal the full-precision decode row), the cache memory at
long contexts, and the temporaries XLA plans for prefilling a long prompt into one layer's
cache (compiled, not run), with the attention streaming key blocks (`causal_attention`) and,
for comparison, materializing every score.

Usage:
  python examples/kv_cache_results.py                 # N = 12 windows, about 10 minutes, 2 cores
  python examples/kv_cache_results.py --windows 32 --int4-residuals 128 32 0
  python examples/kv_cache_results.py --memory-only   # the two memory tables, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp

from jqtz.eval.decode import decode_perplexity
from jqtz.eval.perplexity import perplexity, tokenize
from jqtz.io.gguf import load_gguf, smollm2_path
from jqtz.models import kv_cache
from jqtz.models.llama import Llama, init_cache
from jqtz.models.quantized_kv_cache import (
    kv_cache_memory,
    quantized_cache_factory,
)

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
TARGETS = {"int8": 0.5, "fp8": 0.5, "int4": 3.0}  # % perplexity increase allowed (issue 6)


def caches(int4_residuals):
    int8_queries = quantized_cache_factory("int8", int8_queries=True)
    rows = [
        ("full precision (float32)", None, init_cache),
        ("int8 per-token", "int8", quantized_cache_factory("int8")),
        ("int8 per-token, int8 queries", "int8", int8_queries),
        ("fp8 e4m3 per-token", "fp8", quantized_cache_factory("fp8")),
    ]
    for r in int4_residuals:
        label = f"int4 KIVI g32, R={r}"
        rows.append((label, "int4", quantized_cache_factory("int4", residual=r, group_size=32)))
    return rows


def prefill_temp_bytes(config, factory, ctx: int, *, materialize: bool) -> int:
    """XLA's planned temporaries for appending a `ctx`-token prompt to one layer's empty cache
    of `ctx` slots and attending over it (bf16 activations; compiled, not run)."""
    cfg = dataclasses.replace(config, dtype=jnp.bfloat16)
    cache = factory(cfg, 1, ctx)[0]
    q = jax.ShapeDtypeStruct((1, ctx, cfg.n_heads, cfg.head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, ctx, cfg.n_kv_heads, cfg.head_dim), jnp.bfloat16)
    budget = kv_cache.SCORE_BUDGET
    kv_cache.SCORE_BUDGET = 1 << 62 if materialize else budget  # read when traced
    try:
        prefill = jax.jit(lambda c, q, k, v: c.update(k, v).attend(q))
        return prefill.lower(cache, q, kv, kv).compile().memory_analysis().temp_size_in_bytes
    finally:
        kv_cache.SCORE_BUDGET = budget


def memory_tables(config):
    mib = 2**20
    print("\nKV cache memory, SmolLM2-135M (30 layers x 3 KV heads x 64), batch 1, bf16 baseline")
    print("and bf16 residual window, float16 scales:\n")
    print("| cache | bytes/token | 8k context | 32k context | vs bf16 |")
    print("|---|---|---|---|---|")
    for label, kind, options in [
        ("bf16", "float", {}),
        ("int8 per-token", "int8", {}),
        ("fp8 e4m3 per-token", "fp8", {}),
        ("int4 KIVI g32, R=128", "int4", {}),
    ]:
        m8, m32 = (kv_cache_memory(config, c, kind, **options) for c in (8192, 32768))
        print(
            f"| {label} | {m32.bytes_per_token:.0f} | {m8.total_bytes / mib:.1f} MiB "
            f"| {m32.total_bytes / mib:.1f} MiB | {m32.ratio:.3f} |"
        )
    gib = 2**30
    print(f"\nPrefill of a whole-context prompt into one layer's cache, SmolLM2-135M "
          f"({config.n_heads} query heads), batch 1, bf16: XLA's planned temporaries "
          f"(compiled on {jax.default_backend()}, not run):\n")  # fmt: skip
    print("| cache | 8k streamed | 8k materialized | 32k streamed | 32k materialized |")
    print("|---|---|---|---|---|")
    factories = [("bf16", init_cache), ("int8 per-token", quantized_cache_factory("int8"))]
    for label, factory in factories:
        cells = [
            prefill_temp_bytes(config, factory, ctx, materialize=m) / gib
            for ctx in (8192, 32768)
            for m in (False, True)
        ]
        print(f"| {label} | " + " | ".join(f"{c:.2f} GiB" for c in cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=12, help="512-token windows (N)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--int4-residuals", type=int, nargs="+", default=[128, 32])
    ap.add_argument("--memory-only", action="store_true", help="only the memory tables")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, jax {jax.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    start = time.perf_counter()
    config, params, tok = load_gguf(smollm2_path())
    if args.memory_only:
        memory_tables(config)
        return
    tokens = tokenize((SHARED / "tinyshakespeare.txt").read_text()[900000:], tok)
    model = Llama(config)
    n = args.windows
    print(f"N = {n} windows of {args.ctx} tokens, all decoded together (batch {n})", flush=True)

    t0 = time.perf_counter()
    full = perplexity(model.apply, params, tokens, ctx=args.ctx, windows=n, batch_size=n)
    print(f"full forward: ppl {full.ppl:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows = []
    for label, kind, factory in caches(args.int4_residuals):
        t0 = time.perf_counter()
        r = decode_perplexity(model, params, tokens, factory, ctx=args.ctx, windows=n, batch_size=n)
        rows.append((label, kind, r, time.perf_counter() - t0))
        print(f"{label}: ppl {r.ppl:.4f} ({rows[-1][3]:.0f} s)", flush=True)

    fp = rows[0][2]
    print(f"\nProtocol: {fp.protocol}; SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32).")
    print(f"Full-forward perplexity of the same windows: {full.ppl:.4f}.\n")
    print("| KV cache (decode path) | perplexity | vs full precision | target | met |")
    print("|---|---|---|---|---|")
    for label, kind, r, _ in rows:
        if kind is None:
            print(f"| {label} | {r.ppl:.4f} | - | - | - |")
            continue
        rise = 100 * (r.ppl / fp.ppl - 1)
        ok = "yes" if rise <= TARGETS[kind] else "**no**"
        print(f"| {label} | {r.ppl:.4f} | {rise:+.3f}% | <= {TARGETS[kind]}% | {ok} |")

    memory_tables(config)
    print(f"\nTotal time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()

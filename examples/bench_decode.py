"""End-to-end decode speed of the reference Llama: bf16 vs W4A16 weights, bf16 vs quantized cache.

A synthetic Llama with Llama-3.2-1B shapes (dim 2048, 16 layers, FFN 8192, 32 query / 8 KV heads
of 64, vocab 128256, tied embeddings; random bf16 weights: speed does not depend on the values)
generates `--new` tokens after a `--prompt`-token prompt with `jqtz.models.llama.generate`
(prefill, then a jitted `lax.scan` of one-token steps). Reported per configuration: decode
tokens/s (batch x new tokens / time of the whole generate call minus a prefill-only call), the
weight bytes, and which path the matrix products and the attention took (Pallas kernel or XLA).
W4A16 weights come symmetric (`w4a16`) and with zero points (`w4a16-zp`, jqtz's PTQ default
below 8 bits), and the latter also stored K-major (`w4a16-zp-km`: `jqtz.nn.serving_layout(tree,
k_major_4bit=True)`, read by `pallas_kernels.w4a16_kmajor`). Quantized cases run with jqtz's
Pallas kernels on and off (`jqtz.nn.use_pallas_kernels`), so the XLA path on the same weights
and cache is measured in the same run, and the int8-cache cases also with the Mosaic GPU
lowering preferred (`lowering="mosaic"`), as does the K-major case last (its one-token products
on the Mosaic GPU decode product, `MosaicDecodeConfig`; last, since a Mosaic GPU fault ends
the process's GPU work).

On an NVIDIA GPU the W4A16 products go through `pallas_kernels.w4a16` and the int8 cache's
attention through `pallas_kernels.decode_attention`; elsewhere everything is XLA, and the
numbers say nothing about GPU speed (`--tiny` is a smoke run for such machines).

Usage:
  python examples/bench_decode.py                 # on a GPU
  python examples/bench_decode.py --tiny --new 8  # a quick CPU check of the code path
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

import jqtz
from jqtz.models.llama import Llama, LlamaConfig, decode_paths, describe_paths, generate
from jqtz.models.quantized_kv_cache import quantized_cache_factory
from pallas_kernels import common


def config(tiny: bool, max_len: int) -> LlamaConfig:
    if tiny:
        return LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2,
                           hidden_dim=512, max_seq_len=max_len, tie_embeddings=True,
                           dtype=jnp.bfloat16)  # fmt: skip
    return LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                       hidden_dim=8192, max_seq_len=max_len, tie_embeddings=True,
                       rope_theta=500000.0, dtype=jnp.bfloat16)  # fmt: skip


def _bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke run)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument(
        "--skip",
        default="",
        help="comma-separated cases to leave out, as WEIGHTS/CACHE/KERNELS (e.g. bf16/int8/mosaic)",
    )
    args = ap.parse_args(argv)
    # Each quantized case where a kernel could apply: Pallas kernels on ("on": the default
    # lowering, "auto"), off (the XLA path on the same weights and cache: what the kernels must
    # beat), and for the int8 cache with the Mosaic GPU lowering preferred ("mosaic": its
    # decode attention on a Hopper GPU; the batch-1 products stay on Triton's GEMV), and the
    # K-major weights with Mosaic GPU preferred (their batch-1 products on Mosaic GPU too).
    cases = [("bf16", "bf16", "on"), ("w4a16", "bf16", "on"), ("w4a16", "bf16", "off")]
    cases += [("w4a16-zp", "bf16", "on"), ("w4a16-zp-km", "bf16", "on")]
    cases += [(w, "int8", k) for w in ("bf16", "w4a16") for k in ("on", "mosaic", "off")]
    cases += [("w4a16-zp-km", "bf16", "mosaic")]
    skip = {tuple(c.split("/")) for c in args.skip.split(",") if c}
    if skip - set(cases):
        known = ", ".join("/".join(c) for c in cases)
        ap.error(f"--skip: unknown case(s) {sorted(skip - set(cases))}; cases: {known}")
    cfg = config(args.tiny, args.prompt + args.new)
    model = Llama(cfg)
    prompt = jax.random.randint(jax.random.key(0), (args.batch, args.prompt), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), prompt[:, :1])
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    spec = jqtz.QuantSpec(
        format="int4", granularity="group", group_size=128, scale_dtype="bfloat16"
    )
    zp = jqtz.quantize_params(
        params, [jqtz.Rule(r".*", dataclasses.replace(spec, symmetric=False))]
    )
    weights = {  # symmetric codes, and with zero points (jqtz's PTQ default below 8 bits)
        "bf16": params,
        "w4a16": jqtz.quantize_params(params, [jqtz.Rule(r".*", spec)]),
        "w4a16-zp": zp,
        "w4a16-zp-km": jqtz.nn.serving_layout(zp, k_major_4bit=True),
    }
    print(common.bench_header(f"batch {args.batch}, prompt {args.prompt}, new {args.new}"))
    print(f"{'weights':>11} {'cache':>6} {'kernels':>7} {'weight MiB':>11} {'tokens/s':>9}  paths")
    failed = 0
    for name, cache, kernels in (c for c in cases if c not in skip):
        p = weights[name]
        factory = {} if cache == "bf16" else {"cache_factory": quantized_cache_factory(cache)}

        def run(n, p=p, factory=factory):
            return jax.block_until_ready(generate(model, p, prompt, n, **factory))

        lowering = "mosaic" if kernels == "mosaic" else "auto"
        row = f"{name:>11} {cache:>6} {kernels:>7} {_bytes(p) / 2**20:11.1f}"
        try:
            with jqtz.nn.use_pallas_kernels(kernels != "off", lowering=lowering):
                run(1), run(args.new)  # compile both
                t0 = time.perf_counter()
                run(1)
                t_prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
                run(args.new)
                t = time.perf_counter() - t0 - t_prefill
                paths = describe_paths(decode_paths(cfg, p, batch=args.batch, **factory))
        except Exception as err:  # keep the other cases: one failed compile loses nothing else
            failed += 1
            message = " ".join(str(err).split())[:300]
            print(f"{row} {'FAILED':>9}  {type(err).__name__}: {message}", flush=True)
            continue
        # nan where the decode steps took no measurable time beyond prefill (tiny CPU runs)
        rate = args.batch * (args.new - 1) / t if t > 0 else float("nan")
        print(f"{row} {rate:9.1f}  {paths}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""SmolLM2-135M through the serving kernels, in the Pallas interpreter: the same quality as XLA.

The kernels never ran on a GPU in the sessions that wrote them. This runs the real model's
serving path through them on a CPU (`jqtz.nn.use_pallas_kernels(interpret=True)`: the kernels
chosen as on an H100, run by the Pallas interpreter) and compares the decode-path perplexity
with the XLA path on the same weights and cache. Weights: W4 RTN with jqtz's defaults (uint4,
groups of 128: SmolLM2's dims 576, 192 and 1536 are not multiples of the kernels' tiles, so the
masked tails run), NF4 with `--method nf4`, RTN on the 3- or 2-bit grid with `--bits 3`
(codes in words of 3 bytes) or `--bits 2`, or FP8 e4m3 W8A8 with `--method fp8` (per-channel
weights, dynamic per-token activations: the w8a8 kernel). Cache: int8 per token (every decode step's
attention on the decode-attention kernel, head dim 64).

Rows:
- float32, XLA: the reference (float32 activations; the kernels take 16-bit ones);
- bfloat16, XLA: the dequantized weight is rounded to bf16 before each product;
- bfloat16, kernels: every product on the W4A16 kernel (exact integer products, the scale
  applied in float32; the W8A8 kernel for fp8) and the attention on the decode kernel.

Held-out text: tinyshakespeare.txt[900000:]; windows of `--ctx` tokens, no BOS, decoded one
token at a time (`jqtz.eval.decode.decode_perplexity`). The interpreter is slow (the kernel row
took 74 s for 2 windows of 128 tokens on the 2-core dev machine, docs/results.md) and says
nothing about speed.

Usage:
  python examples/kernel_path_check.py                  # 2 windows of 128 tokens
  python examples/kernel_path_check.py --method nf4
  python examples/kernel_path_check.py --bits 3
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

import jqtz
from jqtz.eval.decode import decode_perplexity
from jqtz.eval.perplexity import tokenize
from jqtz.io.gguf import load_gguf, smollm2_path
from jqtz.models.llama import Llama, decode_paths, describe_paths
from jqtz.models.quantized_kv_cache import quantized_cache_factory
from jqtz.ptq import default_spec

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("rtn", "nf4", "fp8"), default="rtn")
    ap.add_argument("--bits", type=int, choices=(2, 3, 4), default=4, help="RTN's grid")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=128)
    args = ap.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d')}, jax {jax.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    config, params, tok = load_gguf(smollm2_path())
    if args.method != "rtn" and args.bits != 4:
        ap.error(f"--bits: only RTN takes a grid width (`--method {args.method}` has its own)")
    spec = default_spec(args.method, bits=args.bits)
    qparams = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", spec)])
    tokens = tokenize((SHARED / "tinyshakespeare.txt").read_text()[900000:], tok)
    cache = quantized_cache_factory("int8")
    bf16 = dataclasses.replace(config, dtype=jnp.bfloat16)
    rows = [
        ("float32, XLA", config, dict(enabled=False)),
        ("bfloat16, XLA", bf16, dict(enabled=False)),
        ("bfloat16, kernels (interpreted)", bf16, dict(interpret=True)),
    ]
    print(f"weights: {spec}; int8 KV cache", flush=True)
    results = []
    for label, cfg, setting in rows:
        with jqtz.nn.use_pallas_kernels(**setting):
            paths = decode_paths(cfg, qparams, cache_factory=cache)
            t0 = time.perf_counter()
            r = decode_perplexity(
                Llama(cfg), qparams, tokens, cache, ctx=args.ctx, windows=args.windows
            )
        results.append((label, r, describe_paths(paths)))
        print(f"{label}: nll {r.nll:.5f}, ppl {r.ppl:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)  # fmt: skip
    # One full forward of the first window (prefill-sized products: the kernels' large-M path):
    # the logits' relative error against float32.
    window = jnp.asarray(tokens[None, : args.ctx])
    logits = {}
    for label, cfg, setting in rows:
        with jqtz.nn.use_pallas_kernels(**setting), jqtz.nn.quantized_ops():
            logits[label] = jax.jit(Llama(cfg).apply)(qparams, window).astype(jnp.float32)
    ref_logits = logits[rows[0][0]]
    ref = results[0][1]
    print(f"\nProtocol: {ref.protocol}\n")
    print("| compute | paths (decode step) | decode NLL (nats) | vs float32 | perplexity | "
          f"forward logits, rel err vs float32 ({args.ctx} tokens) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for label, r, paths in results:
        err = float(jnp.linalg.norm(logits[label] - ref_logits) / jnp.linalg.norm(ref_logits))
        print(f"| {label} | {paths} | {r.nll:.5f} | {r.nll - ref.nll:+.5f} | {r.ppl:.3f} "
              f"| {err:.2e} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

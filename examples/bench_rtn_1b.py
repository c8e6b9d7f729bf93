"""Benchmark: round-to-nearest quantization of a Llama-shaped ~1B-parameter random tree.

Each configuration runs in a fresh subprocess. Reports quantize time, the process's peak resident
memory while quantizing (the kernel's high-water mark, reset after the random tree is built; it
includes the input tree, the output and the JAX runtime), and the storage ratio against bf16.
The tree is bf16 (how 1B checkpoints ship) with Llama-3.2-1B shapes: dim 2048, 16 layers,
FFN 8192, 32 heads / 8 KV heads of 64, vocab 128256, tied embeddings.

Usage:
  python examples/bench_rtn_1b.py            # int8 per-channel and int4 g128, bf16 scales
  python examples/bench_rtn_1b.py --layers 2 # a quick, smaller run
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

CONFIGS = {
    "int8-channel": dict(format="int8", granularity="channel", scale_dtype="bfloat16"),
    "int4-g128": dict(format="int4", granularity="group", group_size=128, scale_dtype="bfloat16"),
}


def llama_1b_shapes(layers: int) -> dict:
    dim, ffn, hd, nh, nkv, vocab = 2048, 8192, 64, 32, 8, 128256
    block = {
        "input_layernorm": {"scale": (dim,)},
        "self_attn": {
            "q_proj": {"kernel": (dim, nh * hd)},
            "k_proj": {"kernel": (dim, nkv * hd)},
            "v_proj": {"kernel": (dim, nkv * hd)},
            "o_proj": {"kernel": (nh * hd, dim)},
        },
        "post_attention_layernorm": {"scale": (dim,)},
        "mlp": {
            "gate_proj": {"kernel": (dim, ffn)},
            "up_proj": {"kernel": (dim, ffn)},
            "down_proj": {"kernel": (ffn, dim)},
        },
    }
    tree = {f"layers_{i}": block for i in range(layers)}
    tree["embed_tokens"] = {"embedding": (vocab, dim)}
    tree["norm"] = {"scale": (dim,)}
    return {"params": tree}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM), so the peak measured is this phase's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(name: str, layers: int) -> dict:
    import jax
    import jax.numpy as jnp

    import jqtz

    shapes = llama_1b_shapes(layers)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = treedef.unflatten(
        [
            (0.02 * jax.random.normal(k, s, jnp.bfloat16)).block_until_ready()
            for k, s in zip(keys, leaves, strict=True)
        ]
    )
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    input_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    rss_before = _status_bytes("VmRSS")
    reset_peak_rss()

    spec = jqtz.QuantSpec(**CONFIGS[name])
    t0 = time.perf_counter()
    q = jqtz.quantize_params(params, [(r".*/kernel", spec)])
    jax.block_until_ready(q)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")

    mem = jqtz.memory_report(q)
    quantized = [
        x
        for x in jax.tree_util.tree_leaves(q, is_leaf=jqtz.is_qarray)
        if isinstance(x, jqtz.QArray)
    ]
    q_bytes = sum(x.nbytes for x in quantized)
    q_elems = sum(x.size for x in quantized)
    return {
        "config": name,
        "params": n_params,
        "quantized_params": q_elems,
        "input_bytes": input_bytes,
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "rss_before_bytes": rss_before,
        "peak_over_input": round(peak / input_bytes, 3),
        "bits_per_quantized_weight": round(8 * q_bytes / q_elems, 4),
        "quantized_leaves_vs_bf16": round(q_bytes / (2 * q_elems), 4),
        "tree_vs_bf16": round(mem.ratio_vs_bf16, 4),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--config", choices=sorted(CONFIGS), help="run one config in this process")
    args = ap.parse_args()
    if args.config:
        print(json.dumps(run_one(args.config, args.layers)))
        return
    import jax

    print(
        f"# jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores, python {platform.python_version()}"
    )
    rows = []
    for name in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--config", name, "--layers", str(args.layers)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gib = 2**30
    print(
        "| config | params | quantize time | peak RSS | input tree | peak / input "
        "| bits per quantized weight | quantized leaves vs bf16 | whole tree vs bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['params'] / 1e9:.3f} B | {r['seconds']:.1f} s "
            f"| {r['peak_rss_bytes'] / gib:.2f} GiB | {r['input_bytes'] / gib:.2f} GiB "
            f"| {r['peak_over_input']:.2f}x | {r['bits_per_quantized_weight']} "
            f"| {r['quantized_leaves_vs_bf16']} | {r['tree_vs_bf16']} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

"""Benchmark: GPTQ of one 4096x4096 linear layer (int4, groups of 128, act-order by default).

The Hessian is a random symmetric positive definite matrix with a decaying spectrum,
`H = Z Z^T / m + diag(d)` with `Z` `[in, m]` (cheap to build, correlated like real inputs). The
first call includes compilation; the second is the steady-state cost. `--breakdown` also times
the damped inverse-Hessian factorisation alone (a Cholesky factorisation and a triangular solve).

Usage:
  python examples/bench_gptq_layer.py                   # 4096x4096, int4 g128, act-order
  python examples/bench_gptq_layer.py --n 1024 --no-act-order --breakdown
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp

import jqtz
from jqtz.ptq import gptq as gptq_mod


def random_hessian(n: int, rank: int, key) -> jax.Array:
    kz, kd = jax.random.split(key)
    decay = jnp.exp(-jnp.arange(rank) / (rank / 4))  # an anisotropic input distribution
    z = jax.random.normal(kz, (n, rank)) * decay
    d = 0.05 + 0.1 * jax.random.uniform(kd, (n,))
    return z @ z.T / rank + jnp.diag(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096, help="inputs (rows of the [in, out] kernel)")
    p.add_argument("--out", type=int, default=4096, help="outputs")
    p.add_argument("--format", default="int4")
    p.add_argument("--group", type=int, default=128, help="group size; 0 for per-channel")
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--repeat", type=int, default=1, help="steady-state calls to time (min shown)")
    p.add_argument("--breakdown", action="store_true", help="also time the factorisation")
    args = p.parse_args()

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}"
    )
    gran = dict(granularity="group", group_size=args.group) if args.group else {}
    spec = jqtz.QuantSpec(format=args.format, **gran)
    kw, kh = jax.random.split(jax.random.key(0))
    w = jax.random.normal(kw, (args.n, args.out), jnp.float32) * 0.02
    h = jax.block_until_ready(random_hessian(args.n, 512, kh))
    print(
        f"layer [{args.n}, {args.out}], {spec.format} {gran or 'per-channel'}, "
        f"act_order={args.act_order}, block_size={args.block_size}"
    )

    def run():
        t0, c0 = time.perf_counter(), time.process_time()
        res = gptq_mod.gptq(w, h, spec, act_order=args.act_order, block_size=args.block_size)
        jax.block_until_ready(res)
        return res, time.perf_counter() - t0, time.process_time() - c0

    # Wall time is what a user waits; CPU time (all threads) shows how much of the wait is
    # other processes' load on a shared machine.
    res, first, first_cpu = run()
    runs = [run() for _ in range(max(args.repeat, 1))]
    res = runs[-1][0]
    second, second_cpu = min(r[1] for r in runs), min(r[2] for r in runs)
    print(f"{'first call (compile + run):':<28}{first:7.2f} s wall, {first_cpu:7.2f} s CPU")
    label = "second call" if len(runs) == 1 else f"best of {len(runs)} more calls"
    print(f"{label + ':':<28}{second:7.2f} s wall, {second_cpu:7.2f} s CPU")
    print(
        f"loss {float(res.loss):.4g}, output error tr(D^T H D) {float(res.output_error):.4g}, "
        f"damp {float(res.damp):.3g} ({int(res.tries)} tries), dead {int(res.dead)}"
    )
    if args.breakdown:
        factor = jax.jit(lambda m, *damping: gptq_mod._factor(m, *damping)[0])
        damping = (jnp.float32(0.01), jnp.float32(0.01), jnp.int32(5))
        jax.block_until_ready(factor(h, *damping))
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(factor(h, *damping))
        print(
            f"  of which the factorisation: {time.perf_counter() - t0:7.2f} s wall, "
            f"{time.process_time() - c0:7.2f} s CPU"
        )


if __name__ == "__main__":
    main()

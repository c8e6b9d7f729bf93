"""The W4A16 benchmark, tuning candidates and checks on a GPU: `python -m pallas_kernels.w4a16
--bench [--tune]`, `--profile M`, and the `w4a16` part of `python -m pallas_kernels.bench`.

`w4a16` re-exports `benchmark`, `tune_candidates`, `k_major_candidates`, `check_ragged`,
`profile_once` and `main` (imported on first use, so that importing the kernel does not import
the benchmark).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common, w4a16

__all__ = [
    "benchmark",
    "check_mosaic_decode",
    "check_ragged",
    "k_major_candidates",
    "main",
    "profile_once",
    "tune_candidates",
]


def tune_candidates(m: int, n: int, num_groups: int, *, bits: int = 4) -> list:
    """The configs `--tune` tries for `m` rows and `bits`-bit codes, the default first.

    Decode: block_n, split-K and launch parameters around the default, with `fold_zero` on and
    off (on first); up to `w4a16.MAX_FMA_ROWS` rows the CUDA-core configs
    (`tensor_cores=False`) come first. Larger M: the default's tiles with `dequant_first`
    second (not yet timed on a GPU: like against like first), then Triton block sizes and
    launch parameters with `dequant_first` and with `fold_zero` (it won there by 1.6x), and
    from 256 rows a 256-row tile (two stages: three do not fit in shared memory), alternating
    with `w4a16.MOSAIC_TUNE_CANDIDATES` (4-bit only) so that a sweep cut short by its time
    budget has tried both lowerings.
    """
    out = [w4a16.default_config(m, n, num_groups, bits=bits)]
    if m > w4a16.SMALL_M:  # the default's tiles with `dequant_first` next: like against like
        out.append(dataclasses.replace(out[0], dequant_first=True, fold_zero=False))
    fma = []
    if m <= w4a16.SMALL_M:
        triton = []
        for bn in (64, 128, 256):
            auto = w4a16.auto_split(m, n, num_groups, 16, bn)
            for split in sorted({auto, min(num_groups, 2 * auto)}):
                for warps, stages in ((4, 4), (8, 3), (4, 3)):
                    triton.append(w4a16.TuningConfig(block_m=16, block_n=bn, split_k=split,
                                               num_warps=warps, num_stages=stages))  # fmt: skip
        if m <= w4a16.MAX_FMA_ROWS:
            fma = [dataclasses.replace(c, tensor_cores=False) for c in triton]
        mosaic = []
        variants = [dict(fold_zero=True), dict(fold_zero=False)]
    else:
        tiles = [(bm, bn, warps, 3) for bm in (64, 128) for bn in (128, 256)
                 for warps in (4, 8)]  # fmt: skip
        if m >= 256:
            tiles.append((256, 128, 8, 2))
        triton = [
            w4a16.TuningConfig(
                block_m=bm, block_n=bn, split_k=split, num_warps=warps, num_stages=st
            )
            for bm, bn, warps, st in tiles
            for split in dict.fromkeys((w4a16.auto_split(m, n, num_groups, bm, bn), 1))
        ]
        mosaic = list(w4a16.MOSAIC_TUNE_CANDIDATES) if bits == 4 else []
        variants = [dict(dequant_first=True), dict(fold_zero=True)]  # fold: 168 vs 268 us, M 64
    triton = fma + [dataclasses.replace(c, **v) for c in triton for v in variants]
    while triton or mosaic:
        out += [c.pop(0) for c in (triton, mosaic) if c]

    def fits(c):  # Mosaic tiles that would pad the weight on every call are not tried
        if isinstance(c, w4a16.MosaicConfig):
            return n % c.tile_n == 0
        return c.block_n >= w4a16.min_block_n(bits)

    return list(dict.fromkeys(c for c in out if fits(c)))


def k_major_candidates(m: int, n: int, num_groups: int) -> list:
    """The configs the benchmark tries on K-major codes (`w4a16.PackedWeight.k_major`), the
    default first: for decode, Triton with 256, 128 and 64 columns and 8 or 4 warps (K split
    as the default does), then `w4a16.MosaicDecodeConfig`s (64 or 128 columns, 4 or 8 TMA
    loads in flight, and K unsplit with 8; last, so that a Mosaic GPU fault on a first GPU
    run cannot cost the Triton timings); above, the default and 128 x 128 tiles."""
    out = [w4a16.default_config(m, n, num_groups)]
    if m <= w4a16.SMALL_M:
        for bn, warps in ((256, 8), (128, 8), (128, 4), (64, 4)):
            split = w4a16.auto_split(m, n, num_groups, 16, bn)
            cfg = w4a16.TuningConfig(block_n=bn, split_k=split, num_warps=warps, fold_zero=True)
            out.append(cfg)
        mosaic = [
            w4a16.MosaicDecodeConfig(tile_n=tn, max_concurrent_steps=depth)
            for tn in (64, 128)
            for depth in (4, 8)
        ]
        # K unsplit: no partial sums for XLA to add, a deeper pipeline per block instead.
        mosaic.append(w4a16.MosaicDecodeConfig(split_k=1, max_concurrent_steps=8))
        out += [c for c in mosaic if n % c.tile_n == 0 and m <= w4a16.MOSAIC_DECODE_ROWS]
    else:
        split = w4a16.auto_split(m, n, num_groups, 128, 128)
        out.append(w4a16.TuningConfig(block_m=128, block_n=128, split_k=split, num_warps=8,
                                      fold_zero=True))  # fmt: skip
    return list(dict.fromkeys(out))


def check_ragged(report, *, smoke=False) -> list[dict]:
    """Correctness only, no timing: the default configs on `common.RAGGED_SHAPES`, M = 1 and 64,
    with zero-point int4 (groups of 128), NF4 (groups of 64, double-quantized), zero-point
    3-bit (groups of 128: words of 3 bytes), symmetric 2-bit (groups of 64), FP8 e4m3
    weight-only (groups of 128) and zero-point int4 stored K-major (`QArray.transposed`)
    weights, against `w4a16.reference`. On a GPU this is where the
    masked K and N tails are compiled and run; `smoke` runs the first shape in the
    interpreter. Returns one dict per case."""
    import jqtz

    specs = {
        "uint4 g128": jqtz.QuantSpec(
            format="int4", granularity="group", group_size=128, symmetric=False
        ),
        "nf4 g64": jqtz.QuantSpec(
            format="nf4", granularity="group", group_size=64, double_quant=True
        ),
        "uint3 g128": jqtz.QuantSpec(
            format="int3", granularity="group", group_size=128, symmetric=False
        ),
        "int2 g64": jqtz.QuantSpec(format="int2", granularity="group", group_size=64),
        "fp8_e4m3 g128": jqtz.QuantSpec(format="fp8_e4m3", granularity="group", group_size=128),
    }
    rows = []
    for si, (k, n) in enumerate(common.RAGGED_SHAPES[: 1 if smoke else None]):
        w = jax.random.normal(jax.random.key(si), (k, n), jnp.float32)
        for name, spec in [*specs.items(), ("uint4 g128 k-major", specs["uint4 g128"])]:
            q = jqtz.quantize(w, spec)
            pw = w4a16.prepare(q.with_transposed_codes() if name.endswith("k-major") else q)
            for m in (1, 64):
                x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
                y = w4a16.matmul(x, pw, interpret=smoke)
                err = common.relative_error(y, w4a16.reference(x, pw))
                rows.append(dict(kernel="w4a16", case=name, m=m, n=n, k=k, rel_err=err))
                report(f"w4a16 {name} M={m} N={n} K={k}: rel err {err:.1e}")
    return rows


def check_mosaic_decode(report, *, n=8192, k=8192, smoke=False) -> list[dict]:
    """A first, short look at `w4a16.MosaicDecodeConfig` on a GPU (`python -m
    pallas_kernels.w4a16 --mosaic-decode`), before a long sweep: a Mosaic GPU fault ends the
    process's GPU work. For M = 1, 4 and 16 on a zero-point int4 `[k, n]` weight (groups of
    128): the error against `w4a16.reference` and the time per call of the default product on
    the `[K, N]` codes, Triton's on the same codes stored K-major, and the Mosaic decode
    product with 64- and 128-column tiles. `smoke` runs the interpreter at M = 1 and 16 (no
    timing worth reading). Returns one dict per (M, product)."""
    import jqtz

    spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=128, symmetric=False)
    q = jax.block_until_ready(jqtz.quantize(jax.random.normal(jax.random.key(0), (k, n)), spec))
    pw = w4a16.prepare(q)
    km = w4a16.prepare(q.with_transposed_codes())
    copies = 1 if smoke else common.copies_to_miss_cache(sum(a.nbytes for a in jax.tree.leaves(pw)))

    def rotated(w):  # copies enough that the calls read device memory, not the L2
        return [w] + [jax.tree.map(jnp.copy, w) for _ in range(copies - 1)]

    pws, kms = rotated(pw), rotated(km)
    products = [
        ("[K, N] default", pws, None),
        ("K-major Triton", kms, None),
        ("K-major Mosaic tile 64", kms, w4a16.MosaicDecodeConfig()),
        ("K-major Mosaic tile 128", kms, w4a16.MosaicDecodeConfig(tile_n=128)),
    ]
    rows = []
    for m in (1, 16) if smoke else (1, 4, 16):
        calls = 2 if smoke else 32
        xs = jax.random.normal(jax.random.key(m), (calls, m, k), jnp.bfloat16)
        ref = w4a16.reference(xs[0], pw)
        for name, weights, cfg in products:
            fn = functools.partial(w4a16.matmul, config=cfg, interpret=smoke)
            err = common.relative_error(fn(xs[0], weights[0]), ref)
            sets = [(xs[i], weights[i % len(weights)]) for i in range(calls)]
            t = common.time_per_call(fn, sets, iters=1 if smoke else 20)
            rows.append(dict(kernel="w4a16", case=name, m=m, n=n, k=k, us=t * 1e6, rel_err=err))
            report(f"w4a16 M={m} N={n} K={k} {name}: {t * 1e6:.1f} us, rel err {err:.1e}")
    return rows


def benchmark(
    report,
    *,
    smoke=False,
    tune=False,
    deadline=float("inf"),
    first_only=False,
    bits=4,
    group=128,
    symmetric=False,
):
    """Time the kernel against the bf16 XLA product and against XLA's own product on the same
    QArray (`xla us`: jqtz's weight-only path with the kernels off, what `dispatch` falls back
    to); with `tune`, sweep `tune_candidates`. For 4-bit codes, `k-major us` times the same
    weight stored K-major (`QArray.with_transposed_codes`, `w4a16_kmajor`): its default
    config, or with `tune` the best of `k_major_candidates`.

    The weights have zero points (uint4/uint8 codes, jqtz's PTQ default below 8 bits) unless
    `symmetric`.

    The sweep is full on the first shape; on the others only the three fastest configs of the
    first shape (for the same M) and the default are tried (`first_only`: the first shape
    alone). `smoke` runs tiny shapes in the
    Pallas interpreter on any machine (a check of this code, no timing worth reading). Returns
    one dict per (shape, M) for the suite's summary (`pallas_kernels.bench`).
    """
    import jqtz

    interpret = smoke
    iters = 1 if smoke else 20
    shapes = [(256, 256)] if smoke else [(8192, 8192), (14336, 4096), (4096, 14336)]
    shapes = shapes[:1] if first_only else shapes
    ms = (1, 64) if smoke else (1, 4, 16, 64, 256)
    tune_ms = (1, 64) if smoke else (1, 64, 256)
    bw = common.measure_copy_bandwidth(1 << 20 if smoke else 1 << 30)
    fmt = f"int{bits}"
    grid = "symmetric" if symmetric else "zero points"
    report(f"w{bits}a16, groups of {group}, {grid}; copy {bw / 1e9:.0f} GB/s")
    report(f"{'M':>5} {'N':>6} {'K':>6} {'default us':>10} {'best us':>8} {'bf16 us':>8} "
           f"{'xla us':>8} {'k-major us':>10} {'speedup':>7} {'GB/s':>6} {'of copy':>7} "
           f"{'rel err':>8}  best config")  # fmt: skip
    rows, winners = [], {}
    for si, (n, k) in enumerate(shapes):
        w = jax.random.normal(jax.random.key(si), (k, n), jnp.float32)
        spec = jqtz.QuantSpec(
            format=fmt, granularity="group", group_size=group, symmetric=symmetric
        )
        q = jax.block_until_ready(jqtz.quantize(w, spec))
        pw = w4a16.prepare(q)
        wb = w.astype(jnp.bfloat16)
        del w
        nbytes = sum(a.nbytes for a in jax.tree.leaves(pw))
        pws = [pw] + [
            jax.tree.map(jnp.copy, pw) for _ in range(common.copies_to_miss_cache(nbytes) - 1)
        ]
        wbs = [wb] + [jnp.copy(wb) for _ in range(common.copies_to_miss_cache(wb.nbytes) - 1)]
        qs = [jax.tree.map(jnp.copy, q) for _ in pws] if not smoke else [q]
        kms = [w4a16.prepare(a.with_transposed_codes()) for a in qs] if bits == 4 else []
        shape_best = {}
        for m in ms:
            # many calls per program for short products: host timing noise shrinks per call
            calls = 2 if smoke else max(32 if m <= w4a16.SMALL_M else 8, len(pws))
            xs = jax.random.normal(jax.random.key(100 + m), (calls, m, k), jnp.bfloat16)
            sets = [(xs[i], pws[i % len(pws)]) for i in range(calls)]
            ref = w4a16.reference(xs[0], pw)

            def measure(cfg, sets=sets, ref=ref):
                fn = functools.partial(w4a16.matmul, config=cfg, interpret=interpret)
                err = common.relative_error(fn(*sets[0]), ref)
                return common.time_per_call(fn, sets, iters=iters), err

            base_cfg = w4a16.default_config(m, pw.n, pw.num_groups, bits=bits)
            cands = []
            if tune and m in tune_ms:
                cands = tune_candidates(m, pw.n, pw.num_groups, bits=bits)
                if si:  # the first shape's three fastest for this M
                    cands = [c for c in winners.get(m, []) if c in cands]
                cands = cands[:3] if smoke else cands
            elif tune:  # the best config of the nearest smaller tuned M on this shape
                cands = [shape_best[max(t for t in shape_best if t < m)]]
            label = f"w{bits}a16 M={m} N={n} K={k}"
            t_base, best, tried = common.best_config(
                report, label, base_cfg, cands, measure, deadline=deadline
            )
            if si == 0 and m in tune_ms:
                winners[m] = [c for _, c, _ in tried[:3]]
            shape_best[m] = best[1]
            t_bf16 = common.time_per_call(
                jnp.dot, [(xs[i], wbs[i % len(wbs)]) for i in range(calls)], iters=iters
            )
            t, cfg, err = best
            t_km = km_cfg = km_err = None
            if kms:  # the same weight stored K-major
                km_sets = [(xs[i], kms[i % len(kms)]) for i in range(calls)]
                km_cands = k_major_candidates(m, pw.n, pw.num_groups)
                _, (t_km, km_cfg, km_err), _ = common.best_config(
                    report, label + " k-major", km_cands[0],
                    km_cands[1:] if tune and m in tune_ms else [],
                    lambda c, sets=km_sets, ref=ref: measure(c, sets, ref), deadline=deadline,
                )  # fmt: skip
            with jqtz.nn.use_pallas_kernels(False):  # XLA's own path for the same QArray
                t_xla = common.time_per_call(
                    lambda x, q: jqtz.nn.dot_general(x, q, (((1,), (0,)), ((), ()))),
                    [(xs[i], qs[i % len(qs)]) for i in range(calls)],
                    iters=iters,
                )
            moved = nbytes + 2 * (m * k + m * n)
            row = dict(kernel=f"w{bits}a16", symmetric=symmetric, m=m, n=n, k=k, us=t * 1e6,
                       default_us=t_base * 1e6,
                       baseline_us=t_bf16 * 1e6, xla_us=t_xla * 1e6, speedup=t_bf16 / t,
                       roofline=moved / t / bw, rel_err=err, config=cfg,
                       k_major_us=None if t_km is None else t_km * 1e6,
                       k_major_config=km_cfg, k_major_rel_err=km_err)  # fmt: skip
            rows.append(row)
            km = "-" if t_km is None else f"{t_km * 1e6:.1f}"
            if km_err is not None and not km_err <= common.ERROR_BOUND:
                report(f"  {label} k-major {km_cfg}: rel err {km_err:.1e} over the bound")
                km, t_km = "wrong", None
            report(f"{m:5d} {n:6d} {k:6d} {t_base * 1e6:10.1f} {t * 1e6:8.1f} {t_bf16 * 1e6:8.1f} "
                   f"{t_xla * 1e6:8.1f} {km:>10} {t_bf16 / t:7.2f} {moved / t / 1e9:6.0f} "
                   f"{moved / t / bw:7.2f} {err:8.1e}  {cfg}"
                   + ("" if km_cfg is None else f"; k-major: {km_cfg}"))  # fmt: skip
    return rows


def profile_once(m: int, *, n: int = 8192, k: int = 8192, bits: int = 4, group: int = 128,
                 interpret: bool = False) -> w4a16.TuningConfig | w4a16.MosaicConfig:  # fmt: skip
    """Run the default product for `m` rows on an `[k, n]` zero-point weight three times, for a
    profiler to catch (`ncu -k regex:a16 --launch-count 1 python -m pallas_kernels.w4a16
    --profile 1`); no timing. Returns the config run."""
    import jqtz

    spec = jqtz.QuantSpec(format=f"int{bits}", granularity="group", group_size=group,
                          symmetric=False)  # fmt: skip
    pw = w4a16.prepare(jqtz.quantize(jax.random.normal(jax.random.key(0), (k, n)), spec))
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    for _ in range(3):
        jax.block_until_ready(w4a16.matmul(x, pw, interpret=interpret))
    return w4a16.default_config(m, n, pw.num_groups, bits=bits)


def main(argv=None) -> int:
    """`python -m pallas_kernels.w4a16 --bench [--tune]`: the kernel vs bf16 XLA on a GPU;
    `--profile M`: `profile_once(M)`, for a profiler; `--mosaic-decode`:
    `check_mosaic_decode`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="time the kernel on the GPU")
    parser.add_argument(
        "--profile", type=int, metavar="M", help="run the default product for M rows 3 times"
    )
    parser.add_argument(
        "--mosaic-decode",
        action="store_true",
        help="check and time MosaicDecodeConfig (a short first call on a GPU)",
    )
    parser.add_argument("--tune", action="store_true", help="also sweep tune_candidates")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument(
        "--symmetric", action="store_true", help="codes without zero points (default: with)"
    )
    args = parser.parse_args(argv)
    if args.profile is not None:
        if not common.require_gpu_or_exit("w4a16"):
            return 0
        print(profile_once(args.profile, bits=args.bits, group=args.group))
        return 0
    if args.mosaic_decode:
        if not common.require_gpu_or_exit("w4a16"):
            return 0
        rows = check_mosaic_decode(print)
        return 0 if all(r["rel_err"] <= common.ERROR_BOUND for r in rows) else 1
    if not args.bench:
        parser.print_help()
        return 0
    return common.run_benchmark(
        "w4a16",
        benchmark,
        tune=args.tune,
        bits=args.bits,
        group=args.group,
        symmetric=args.symmetric,
    )

"""All kernel benchmarks in one run on a GPU: check, time, tune, summarise.

    python -m pallas_kernels.bench --only w8a8 --out DIR  # on a GPU: one kernel's defaults
    python -m pallas_kernels.bench --only w4a16 --first-shape --no-checks --tune --budget-s 200
                                                         # a tuning call for one kernel
    python -m pallas_kernels.bench --smoke --tune        # anywhere: tiny shapes, interpreter

On an H100 (2026-11-23) the whole suite without tuning took more than 280 s, so a tuning sweep
belongs in a call of its own (`--first-shape` keeps the untuned remainder short). The suite has
timed more since (XLA's quantized paths, W8A8 decode rows): give each kernel its own call
(`--only`).

For each kernel (`w4a16`, `w8a8`, `decode_attention`) it measures the roofline of this run
(device-to-device copy rate; bf16 XLA product rate), checks every timed config's output against
the kernel's float32 reference on random data, times the kernel and its XLA baseline, and with
`--tune` sweeps each kernel's candidate configs within the time budget. Output:

- `DIR/log.txt`: every line as it is measured (a run stopped part-way keeps what it measured);
- `DIR/results.json`: one record per case (times, speedup, fraction of roofline, error, the
  fastest config), the input for freezing tuned defaults into the kernel files;
- `DIR/checks.json`: correctness checks of the W4A16 and W8A8 kernels on weights whose K and N
  are not multiples of the tiles (`common.RAGGED_SHAPES`, SmolLM2-135M's), where the masked
  tails run;
- `DIR/summary.md` (also printed last): the issue's speed targets, met or missed.

Timing (`common.time_per_call`): one jitted program per measurement calls the kernel on several
argument sets, rotating weights and caches through enough copies to overflow the L2, and the
per-call time is the slope against a one-call program, so host dispatch is not counted.

Exit status: 0 when every kernel and check ran and every error is within `ERROR_BOUND`, else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
import traceback
import warnings

import jax

from pallas_kernels import common, decode_attention, w4a16, w8a8

#: Bound on `||y - ref|| / ||ref||` for every timed config (see `common.ERROR_BOUND`).
ERROR_BOUND = common.ERROR_BOUND

#: Share of the tuning budget for each kernel (of the selected kernels' total; unused time passes
#: on to the next).
_SHARES = (("w4a16", w4a16.benchmark, 0.45), ("w8a8", w8a8.benchmark, 0.25),
           ("decode_attention", decode_attention.benchmark, 0.30))  # fmt: skip


def _k_major_rows(rows) -> list[dict]:
    """The W4A16 rows again for the same weights stored K-major (`k-major us`, where it ran
    within the error bound), judged as well: `serving_layout(tree, k_major_4bit=True)` serves
    that layout. The same bytes move, so the fraction of the copy rate scales with the time."""
    out = []
    for r in rows:
        t = r.get("k_major_us")
        if r["kernel"] == "w4a16" and t and r.get("k_major_rel_err", 1.0) <= ERROR_BOUND:
            out.append(dict(r, us=t, speedup=r["baseline_us"] / t,
                            roofline=r["roofline"] * r["us"] / t, layout=" (K-major)"))  # fmt: skip
    return out


def _targets(rows) -> list[tuple[str, str, float, str, bool]]:
    """(target, case, measured, wanted, met) for each row the issue sets a target for."""
    out = []
    bf16_pages = {r["n"]: r["us"] for r in rows if r["kernel"] == "decode float"}
    for r in rows + _k_major_rows(rows):
        kernel, m = r["kernel"], r["m"]
        case = f"{kernel} M={m} N={r['n']} K={r['k']}{r.get('layout', '')}"
        if kernel == "w4a16" and m <= w4a16.SMALL_M:
            out.append(("W4A16 decode speedup vs bf16", case, r["speedup"], ">= 3.0",
                        r["speedup"] >= 3.0))  # fmt: skip
            out.append(("W4A16 decode, fraction of copy rate", case, r["roofline"], ">= 0.70",
                        r["roofline"] >= 0.70))  # fmt: skip
        elif kernel == "w4a16":
            out.append(("W4A16 M 64-256 speedup vs bf16", case, r["speedup"], ">= 1.0",
                        r["speedup"] >= 1.0))  # fmt: skip
        elif kernel.startswith("w8a8") and m >= 1024:  # int8, fp8, fp8 with 128-blocks
            out.append((f"{kernel} speedup vs bf16", case, r["speedup"], ">= 1.6",
                        r["speedup"] >= 1.6))  # fmt: skip
        elif kernel in ("decode int8", "decode fp8"):
            # The fair bf16 baseline is the faster of XLA and the kernel over bf16 pages.
            base = min(r["baseline_us"], bf16_pages.get(r["n"], float("inf")))
            gain = base / r["us"]
            case = f"{kernel} B={m} context={r['n']}"
            out.append((f"{kernel} speedup vs best bf16 cache", case, gain, ">= 1.7", gain >= 1.7))
    return out


def summary(rows, failures, *, judge: bool = True, checks=()) -> str:
    """The targets table in markdown, plus errors over `ERROR_BOUND` (benchmarked configs and
    the correctness `checks` on weights off the tiles) and kernels that failed.

    With `judge=False` (smoke runs: interpreter timings) no target is called met or missed.
    """
    lines = ["| target | case | measured | wanted | |", "|---|---|---|---|---|"]
    for target, case, value, wanted, met in _targets(rows):
        verdict = ("met" if met else "MISSED") if judge else "not judged (smoke run)"
        lines.append(f"| {target} | {case} | {value:.2f} | {wanted} | {verdict} |")
    bad = [r for r in rows if not r["rel_err"] <= ERROR_BOUND]
    for r in bad:
        lines.append(f"\nERROR {r['kernel']} M={r['m']} N={r['n']} K={r['k']}: rel err "
                     f"{r['rel_err']:.1e} > {ERROR_BOUND}")  # fmt: skip
    if checks:
        worst = max(c["rel_err"] for c in checks)
        lines.append(f"\nWeights off the tiles: {len(checks)} products checked, largest rel err "
                     f"{worst:.1e} (bound {ERROR_BOUND})")  # fmt: skip
    for c in checks:
        if not c["rel_err"] <= ERROR_BOUND:
            lines.append(f"\nERROR {c['kernel']} {c['case']} M={c['m']} N={c['n']} K={c['k']}: "
                         f"rel err {c['rel_err']:.1e} > {ERROR_BOUND}")  # fmt: skip
    for name in failures:
        lines.append(f"\nFAILED: {name} (traceback in log.txt)")
    return "\n".join(lines)


#: Result fields that hold a config dataclass (written to results.json as dicts).
_CONFIG_KEYS = ("config", "k_major_config")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=None, help="folder for the outputs")
    ap.add_argument("--tune", action="store_true", help="sweep each kernel's candidate configs")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="seconds for the tuning sweeps in all (default 360)")  # fmt: skip
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes in the Pallas interpreter (any machine; no real timing)",
    )
    ap.add_argument("--only", default="", help="comma-separated kernels (default: all)")
    ap.add_argument(
        "--first-shape",
        action="store_true",
        help="each kernel's first shape alone (where its sweep runs): a tuning run",
    )
    ap.add_argument("--no-checks", action="store_true",
                    help="skip the correctness checks on weights off the tiles")  # fmt: skip
    args = ap.parse_args(argv)
    if not args.smoke and not common.require_gpu_or_exit("pallas_kernels.bench"):
        return 0
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the Triton lowering's
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    report = common.Report(None if args.out is None else args.out / "log.txt")
    report(common.bench_header("smoke run: interpreter, not GPU timing" if args.smoke else ""))
    only = {s for s in args.only.split(",") if s}
    known = [name for name, _, _ in _SHARES]
    if only - set(known):
        ap.error(f"--only: unknown kernel(s) {sorted(only - set(known))}; choose from {known}")
    rows, failures, checks = [], [], []
    # Correctness on weights off the tiles first: quick, and within the budget that the tuning
    # sweeps' deadlines (counted from `start`) then share.
    start = time.monotonic()
    report("\n## checks: weights off the tiles (correctness only)")
    for name, module in (("w4a16", w4a16), ("w8a8", w8a8)):
        if (only and name not in only) or args.no_checks:
            continue
        try:
            checks += module.check_ragged(report, smoke=args.smoke)
        except Exception:  # keep going: the benchmarks still run
            failures.append(f"{name} checks")
            report(traceback.format_exc())
    if args.out is not None:
        (args.out / "checks.json").write_text(json.dumps(checks, indent=1))
    selected = [(name, bench, share) for name, bench, share in _SHARES if not only or name in only]
    total, used = sum(share for *_, share in selected), 0.0
    for name, bench, share in selected:
        used += share
        deadline = start + used / total * args.budget_s
        report(f"\n## {name}")
        try:
            rows += bench(report, smoke=args.smoke, tune=args.tune, deadline=deadline,
                          first_only=args.first_shape)  # fmt: skip
        except Exception:  # keep the other kernels' results
            failures.append(name)
            report(traceback.format_exc())
        if args.out is not None:
            records = [
                {**r, **{key: dataclasses.asdict(r[key]) for key in _CONFIG_KEYS if r.get(key)},
                 "config_type": type(r["config"]).__name__}  # TuningConfig, MosaicConfig
                for r in rows
            ]  # fmt: skip
            (args.out / "results.json").write_text(json.dumps(records, indent=1))
    text = summary(rows, failures, judge=not args.smoke, checks=checks)
    if args.out is not None:
        (args.out / "summary.md").write_text(text + "\n")
    report(f"\n## summary ({time.monotonic() - start:.0f} s, jax {jax.__version__})\n{text}")
    ok = not failures and all(r["rel_err"] <= ERROR_BOUND for r in rows + checks)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

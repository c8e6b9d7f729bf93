"""The decode-attention benchmark and tuning candidates: `python -m
pallas_kernels.decode_attention --bench [--tune]` and the `decode_attention` part of
`python -m pallas_kernels.bench`.

`decode_attention` re-exports `benchmark`, `tune_candidates` and `main` (imported on first use,
so that importing the kernel does not import the benchmark).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.decode_attention import (
    MosaicConfig,
    TuningConfig,
    _splits,
    contiguous_tables,
    mosaic_unsupported,
    quantize_tokens,
    reference,
    rounded_queries,
)
from pallas_kernels.decode_attention import decode_attention as attention

__all__ = ["benchmark", "main", "tune_candidates"]


def tune_candidates(batch: int, hkv: int, pages: int) -> list[TuningConfig | MosaicConfig]:
    """Configs `--tune` tries (the default first, the Mosaic GPU default second, so a spent
    time budget still compares the two lowerings): split counts around the default's, Triton
    launch parameters and pages per step, and Mosaic GPU pipeline depths and step sizes. The
    benchmark drops Mosaic GPU configs for pages that path does not read
    (:func:`mosaic_unsupported`), `int8_via_f16` configs for pages other than int8, and
    `int8_queries` configs for keys other than int8 with one scale per token and head."""
    auto = _splits(TuningConfig(), batch, hkv, pages)
    # the default's split count first: a sweep cut short by its time budget has tried it
    splits = [sp for sp in dict.fromkeys((auto, 2 * auto, max(1, auto // 2), 4 * auto))
              if sp <= pages]  # fmt: skip
    out = [TuningConfig(), MosaicConfig(), TuningConfig(int8_via_f16=True)]
    out.append(TuningConfig(int8_queries=True, int8_via_f16=True))
    out.append(MosaicConfig(block_tokens=128))
    out.append(TuningConfig(int8_queries=True))
    for sp in splits:
        out += [
            TuningConfig(num_splits=sp, num_warps=w, num_stages=st) for w, st in ((4, 2), (8, 3))
        ]
        out.append(TuningConfig(num_splits=sp, pages_per_step=2))
        out.append(TuningConfig(num_splits=sp, int8_via_f16=True))
        out.append(TuningConfig(num_splits=sp, int8_queries=True, int8_via_f16=True))
        out.append(MosaicConfig(num_splits=sp, max_concurrent_steps=4))
    return list(dict.fromkeys(out))


def benchmark(report, *, smoke=False, tune=False, deadline=float("inf"), first_only=False,
              batch=8, heads=32, kv_heads=8, head_dim=128, page=64):  # fmt: skip
    """Time the kernel over int8, fp8 and int4 caches (int4 per token, KIVI per-channel keys,
    and int8 with per-token scales over 32-channel groups) and over bf16 pages, against XLA
    attention over a bf16 cache; with `tune`, sweep `tune_candidates` at the middle context
    (the three fastest per cache kind at the others; `first_only`: the middle context alone).
    `smoke`: tiny shapes in the interpreter.
    Returns one dict per case for `pallas_kernels.bench`."""
    interpret = smoke
    iters = 1 if smoke else 20
    b, h, hkv, d = (2, 8, 2, 64) if smoke else (batch, heads, kv_heads, head_dim)
    page = 64 if smoke else page  # 64: the smallest page the Mosaic GPU path reads
    contexts = (128,) if smoke else (16384, 8192, 32768)[: 1 if first_only else None]
    bw = common.measure_copy_bandwidth(1 << 20 if smoke else 1 << 30)
    report(f"decode attention B={b} H={h} Hkv={hkv} D={d} page={page}; copy {bw / 1e9:.0f} GB/s")
    report(f"{'cache':>9} {'context':>7} {'default us':>10} {'best us':>8} {'xla bf16':>8} "
           f"{'speedup':>7} {'GB/s':>6} {'of copy':>7} {'rel err':>8}  best config")  # fmt: skip
    calls = 2 if smoke else 12  # a long program: host timing noise shrinks per call
    rows, winners = [], {}
    for ci, s in enumerate(contexts):
        qs = jax.random.normal(jax.random.key(0), (calls, b, h, d), jnp.bfloat16)
        kv = jax.random.normal(jax.random.key(1), (2, b, s, hkv, d), jnp.bfloat16)
        lengths = jnp.full((b,), s, jnp.int32)

        def xla(q, k, v):
            qg = q.reshape(b, hkv, h // hkv, d)
            sc = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32)
            p = jax.nn.softmax(sc * d**-0.5, axis=-1).astype(v.dtype)
            return jnp.einsum("bkgs,bskd->bkgd", p, v).reshape(b, h, d)

        t_xla = common.time_per_call(xla, [(qs[i], kv[0], kv[1]) for i in range(calls)],
                                     iters=iters)  # fmt: skip
        for name in ("float", "int8", "fp8", "int4", "int4-kivi", "int8-g32"):
            kind = name.split("-")[0]
            group = 32 if name.endswith("-g32") else None  # llama.cpp q8_0-style scales
            if name == "int4-kivi":
                k, tables = contiguous_tables(*_kivi_keys(kv[0], page), page=page,
                                              per_channel=True)  # fmt: skip
            else:
                k, tables = contiguous_tables(*quantize_tokens(kv[0], kind, group), page=page)
            v, _ = contiguous_tables(*quantize_tokens(kv[1], kind, group), page=page)
            if kind == "float":
                k = dataclasses.replace(k, codes=k.codes.astype(jnp.bfloat16))
                v = dataclasses.replace(v, codes=v.codes.astype(jnp.bfloat16))
            sets = [(qs[i], k, v, lengths, tables) for i in range(calls)]
            ref = reference(*sets[0])[0]
            # `int8_queries` is held to the reference over the queries it multiplies.
            ref_q8 = ref
            if name == "int8":
                ref_q8 = reference(rounded_queries(sets[0][0]), *sets[0][1:])[0]

            def measure(cfg, sets=sets, ref=ref, ref_q8=ref_q8):
                fn = lambda *a: attention(*a, config=cfg, interpret=interpret)[0]
                want = ref_q8 if getattr(cfg, "int8_queries", False) else ref
                err = common.relative_error(fn(*sets[0]), want)
                return common.time_per_call(fn, sets, iters=iters), err

            cands = []
            if name == "int8" and not tune:  # the int8 options, also in untuned runs
                cands = [TuningConfig(int8_via_f16=True),
                         TuningConfig(int8_queries=True, int8_via_f16=True)]  # fmt: skip
            if tune:
                cands = tune_candidates(b, hkv, tables.shape[1])
                cands = [c for c in cands if not isinstance(c, MosaicConfig)
                         or mosaic_unsupported(qs[0], k, v, c) is None]  # fmt: skip
                cands = [c for c in cands if kind == "int8" or not getattr(c, "int8_via_f16", 0)]
                cands = [c for c in cands if name == "int8" or not getattr(c, "int8_queries", 0)]
                cands = cands[:3] if smoke else cands
                if ci:
                    cands = winners.get(name, [])
            t_base, best, tried = common.best_config(
                report, f"{name} S={s}", TuningConfig(), cands, measure, deadline=deadline
            )
            if ci == 0:
                winners[name] = [c for _, c, _ in tried[:3]]
            t, cfg, err = best
            nbytes = sum(x.nbytes for x in jax.tree.leaves((k, v)))
            rows.append(dict(kernel=f"decode {name}", m=b, n=s, k=d, us=t * 1e6,
                             default_us=t_base * 1e6, baseline_us=t_xla * 1e6,
                             speedup=t_xla / t, roofline=nbytes / t / bw, rel_err=err,
                             config=cfg))  # fmt: skip
            report(f"{name:>9} {s:7d} {t_base * 1e6:10.1f} {t * 1e6:8.1f} {t_xla * 1e6:8.1f} "
                   f"{t_xla / t:7.2f} {nbytes / t / 1e9:6.0f} {nbytes / t / bw:7.2f} "
                   f"{err:8.1e}  {cfg}")  # fmt: skip
    return rows


def _kivi_keys(x, page: int):
    """KIVI keys: int4 codes per token, with one scale and offset per channel and page."""
    b, s, hkv, d = x.shape
    xg = x.astype(jnp.float32).reshape(b, s // page, page, hkv, d)
    lo, hi = xg.min(axis=2), xg.max(axis=2)  # (B, S/page, Hkv, D)
    scale = jnp.maximum((hi - lo) / 15, 1e-8)
    codes = jnp.clip(jnp.round((xg - lo[:, :, None]) / scale[:, :, None]), 0, 15)
    codes = codes.astype(jnp.uint8).reshape(b, s, hkv, d)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale, lo, "int4"


def main(argv=None) -> int:
    """``python -m pallas_kernels.decode_attention --bench [--tune]``: the kernel over
    int8/fp8/int4 caches vs XLA attention over a bf16 cache (and the kernel over bf16 pages)."""
    parser = argparse.ArgumentParser(description="Time decode attention over quantized KV pages.")
    parser.add_argument("--bench", action="store_true", help="time the kernel on the GPU")
    parser.add_argument("--tune", action="store_true", help="also sweep tune_candidates")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page", type=int, default=64)
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 0
    sizes = dict(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                 head_dim=args.head_dim, page=args.page)  # fmt: skip
    return common.run_benchmark("decode_attention", benchmark, tune=args.tune, **sizes)

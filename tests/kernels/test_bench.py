"""The benchmark suite (`pallas_kernels.bench`) and its timing helpers in `common`.

The smoke run executes every line of the GPU benchmark code (checks, timing, tuning, summary)
in the Pallas interpreter, so the first call on a lent GPU does not fail on a bug here.
"""

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import bench, common, w4a16, w8a8

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_smoke_run_writes_every_output(tmp_path):
    assert bench.main(["--smoke", "--tune", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    kernels = {r["kernel"] for r in records}
    assert {"w4a16", "w8a8 int8", "w8a8 fp8", "w8a8 fp8-b128"} <= kernels
    decode = ("float", "int8", "fp8", "int4", "int4-kivi", "int8-g32")
    assert {f"decode {k}" for k in decode} <= kernels
    for r in records:
        assert 0 < r["rel_err"] <= bench.ERROR_BOUND, r
        assert r["us"] > 0 and r["baseline_us"] > 0
        assert isinstance(r["config"], dict)
        assert r["config_type"] in ("TuningConfig", "MosaicConfig")  # which lowering won
    w4 = [r for r in records if r["kernel"] == "w4a16"]  # and the same weights stored K-major
    assert all(r["k_major_us"] > 0 and r["k_major_config"]["block_n"] for r in w4)
    w8 = [r for r in records if r["kernel"].startswith("w8a8")]
    assert all(r["served_us"] > 0 for r in w8)
    # Decode rows too: the serving layout's [N, K] codes below K_MAJOR_ROWS rows.
    assert {r["m"] < w8a8.K_MAJOR_ROWS for r in w8} == {True, False}
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert {(c["kernel"], c["case"]) for c in checks} == {
        ("w4a16", "uint4 g128"), ("w4a16", "nf4 g64"), ("w4a16", "uint3 g128"),
        ("w4a16", "int2 g64"), ("w4a16", "fp8_e4m3 g128"), ("w4a16", "uint4 g128 k-major"),
        ("w8a8", "int8"), ("w8a8", "fp8")
    }  # fmt: skip
    assert all((c["k"], c["n"]) == common.RAGGED_SHAPES[0] for c in checks)
    assert all(0 < c["rel_err"] <= bench.ERROR_BOUND for c in checks)
    summary = (tmp_path / "summary.md").read_text()
    assert "not judged (smoke run)" in summary and "met" not in summary.replace("wanted", "")
    assert f"Weights off the tiles: {len(checks)} products checked" in summary
    log = (tmp_path / "log.txt").read_text()
    assert all(f"## {k}" in log for k in ("w4a16", "w8a8", "decode_attention"))
    assert "rel err" in log  # the tuning sweep reported candidates
    assert log.count("MosaicConfig(") >= 3  # w4a16 and w8a8 ran Mosaic GPU in its interpreter
    decode_log = log[log.index("## decode_attention") :]
    assert "int8 S=128 MosaicConfig(" in decode_log  # and so did decode attention


def test_without_gpu_exits_cleanly(capsys):
    assert bench.main([]) == 0
    assert "no GPU" in capsys.readouterr().out


def _row(kernel, m, speedup, roofline=0.5, us=10.0, baseline_us=20.0, n=8192):
    return dict(kernel=kernel, m=m, n=n, k=8192, us=us, baseline_us=baseline_us,
                speedup=speedup, roofline=roofline, rel_err=1e-3)  # fmt: skip


def test_targets_follow_the_issue():
    rows = [
        _row("w4a16", 1, 3.2, roofline=0.75),
        _row("w4a16", 16, 2.9, roofline=0.71),
        _row("w4a16", 256, 0.9),
        _row("w8a8 int8", 4096, 1.7),
        _row("w8a8 fp8-b128", 4096, 1.0),  # FP8 with 128-block scales: judged too
        _row("w8a8 int8", 16, 1.0),  # decode rows: the target is for M >= 1024
        # decode: compared with the faster bf16 path, here the kernel over bf16 pages (15 us)
        _row("decode float", 8, 1.0, us=15.0, baseline_us=20.0, n=8192),
        _row("decode int8", 8, 2.5, us=8.0, baseline_us=20.0, n=8192),
    ]
    got = {(t, c): met for t, c, _, _, met in bench._targets(rows)}
    assert got[("W4A16 decode speedup vs bf16", "w4a16 M=1 N=8192 K=8192")]
    assert got[("W4A16 decode, fraction of copy rate", "w4a16 M=1 N=8192 K=8192")]
    assert not got[("W4A16 decode speedup vs bf16", "w4a16 M=16 N=8192 K=8192")]
    assert not got[("W4A16 M 64-256 speedup vs bf16", "w4a16 M=256 N=8192 K=8192")]
    assert got[("w8a8 int8 speedup vs bf16", "w8a8 int8 M=4096 N=8192 K=8192")]
    assert not got[("w8a8 fp8-b128 speedup vs bf16", "w8a8 fp8-b128 M=4096 N=8192 K=8192")]
    assert not any(c.startswith("w8a8") and "M=16 " in c for _, c in got)
    decode = [(v, met) for t, c, v, _, met in bench._targets(rows) if "decode int8" in c]
    assert decode == [(15.0 / 8.0, True)]


def test_targets_judge_the_k_major_layout_too():
    """The same weights stored K-major are judged as their own case (the served layout under
    `serving_layout(tree, k_major_4bit=True)`); a K-major time over the error bound is not."""
    fast = dict(_row("w4a16", 1, 1.0, roofline=0.25, us=40.0, baseline_us=40.0),
                k_major_us=12.0, k_major_rel_err=1e-3)  # fmt: skip
    wrong = dict(_row("w4a16", 4, 1.0), k_major_us=1.0, k_major_rel_err=0.5)
    got = {(t, c): (v, met) for t, c, v, _, met in bench._targets([fast, wrong])}
    speed = got[("W4A16 decode speedup vs bf16", "w4a16 M=1 N=8192 K=8192 (K-major)")]
    assert speed == (40.0 / 12.0, True)
    share = got[("W4A16 decode, fraction of copy rate", "w4a16 M=1 N=8192 K=8192 (K-major)")]
    assert share == (0.25 * 40.0 / 12.0, True)
    assert not got[("W4A16 decode speedup vs bf16", "w4a16 M=1 N=8192 K=8192")][1]
    assert not any("M=4" in c and "K-major" in c for _, c in got)


def test_summary_flags_checks_over_the_bound():
    checks = [dict(kernel="w4a16", case="nf4 g64", m=64, n=192, k=576, rel_err=0.5)]
    text = bench.summary([], [], checks=checks)
    assert "ERROR w4a16 nf4 g64 M=64 N=192 K=576: rel err 5.0e-01" in text


def test_summary_flags_errors_and_failures():
    rows = [_row("w4a16", 1, 3.5, roofline=0.8)]
    rows[0]["rel_err"] = float("nan")
    text = bench.summary(rows, ["w8a8"])
    assert "| met |" in text and "ERROR w4a16" in text and "FAILED: w8a8" in text


def test_tune_reports_failures_and_respects_the_deadline():
    lines = []

    def measure(cfg):
        if cfg == "bad":
            raise ValueError("shared memory exceeded\nmore detail")
        return {"slow": 2.0, "fast": 1.0}[cfg], 1e-4

    tried = common.tune(lines.append, "k", ["slow", "bad", "fast"], measure, deadline=float("inf"))
    assert [c for _, c, _ in tried] == ["fast", "slow"]
    assert any("bad: failed: ValueError: shared memory exceeded" in s for s in lines)
    lines.clear()
    assert common.tune(lines.append, "k", ["slow"], measure, deadline=time.monotonic() - 1) == []
    assert "1 candidates not tried" in lines[0]


def test_best_config_keeps_the_default_when_nothing_beats_it():
    times = {"default": 1.0, "a": 2.0, "b": 3.0}
    t0, best, tried = common.best_config(
        lambda s: None, "k", "default", ["a", "default", "b"], lambda c: (times[c], 0.0),
        deadline=float("inf"),
    )  # fmt: skip
    assert t0 == 1.0 and best == (1.0, "default", 0.0)
    assert [c for _, c, _ in tried] == ["a", "b"]  # the default is not timed twice


def test_best_config_never_chooses_a_wrong_result():
    lines = []
    results = {"default": (2.0, 1e-3), "racy": (0.5, 0.3), "nan": (0.4, float("inf")),
               "ok": (1.5, 2e-3)}  # fmt: skip
    _, best, tried = common.best_config(
        lines.append, "k", "default", list(results), results.__getitem__, deadline=float("inf")
    )
    assert best == (1.5, "ok", 2e-3) and [c for _, c, _ in tried] == ["ok"]
    assert sum("not chosen" in s for s in lines) == 2


def test_copies_overflow_the_cache():
    assert common.copies_to_miss_cache(34_600_000) * 34_600_000 > 2 * common.L2_BYTES
    assert common.copies_to_miss_cache(2 * 10**9) == 1
    assert common.copies_to_miss_cache(1000) == 8  # capped


def test_time_per_call_is_positive_and_finite():
    xs = [(jnp.full((64, 64), float(i)),) for i in range(3)]
    t = common.time_per_call(lambda a: a @ a, xs, iters=3)
    assert 0 < t < 1.0


def test_relative_error_flags_non_finite_output():
    ref = jnp.ones(4)
    assert common.relative_error(ref, ref) == 0.0
    assert common.relative_error(ref.at[0].set(jnp.nan), ref) == float("inf")


def test_tune_candidates_are_valid_and_start_with_the_default():
    for m in (1, 64):
        cands = w4a16.tune_candidates(m, 8192, 64)
        assert cands[0] == w4a16.default_config(m, 8192, 64)
        assert len(set(cands)) == len(cands)
        for c in cands:
            assert 8192 % (c.tile_n if isinstance(c, w4a16.MosaicConfig) else c.block_n) == 0
    assert not any(isinstance(c, w4a16.MosaicConfig) for c in w4a16.tune_candidates(16, 8192, 64))
    large = w4a16.tune_candidates(256, 8192, 64)  # both lowerings, alternating early on
    assert large[1] == dataclasses.replace(large[0], dequant_first=True, fold_zero=False)
    assert isinstance(large[3], w4a16.MosaicConfig) and isinstance(large[4], w4a16.TuningConfig)
    assert any(c.block_m == 256 and c.dequant_first for c in large[2:] if hasattr(c, "block_m"))
    assert set(w4a16.MOSAIC_TUNE_CANDIDATES) <= set(large)


@pytest.mark.parametrize("n,k", [(8192, 8192), (14336, 4096), (4096, 14336)])
def test_k_major_candidates_cover_both_lowerings_at_decode(n, k):
    """Decode tries Triton first and the Mosaic GPU decode configs last, each of which takes
    the benchmark's K-major weights; larger M tries Triton only."""
    # The benchmark's weight stored K-major, as shapes (what the predicate reads).
    spec = jax.ShapeDtypeStruct
    groups = spec((k // 128, n), jnp.uint8)
    pw = w4a16.PackedWeight(codes=spec((n, k // 2), jnp.uint8), scale=groups, zero=groups,
                            perm=None, bits=4, signed=False, qgroup=128, group=128, k=k, n=n,
                            dtype=jnp.dtype(jnp.float32), k_major=True)  # fmt: skip
    for m in (1, 16):
        cands = w4a16.k_major_candidates(m, n, k // 128)
        kinds = [isinstance(c, w4a16.MosaicDecodeConfig) for c in cands]
        assert cands[0] == w4a16.default_config(m, n, k // 128) and not kinds[0]
        assert sum(kinds) == 5 and kinds == sorted(kinds)  # Mosaic GPU last
        for c in cands[kinds.index(True) :]:
            assert w4a16.mosaic_decode_unsupported(pw, m, c) is None
    assert not any(
        isinstance(c, w4a16.MosaicDecodeConfig) for c in w4a16.k_major_candidates(64, n, k // 128)
    )


@pytest.mark.parametrize("n,k", [(8192, 8192), (14336, 4096), (4096, 14336)])
def test_w4a16_mosaic_candidates_fit_the_h100(n, k):
    """Every Mosaic GPU config of the W4A16 sweep lowers for an H100 at each benchmark shape
    (shared memory is checked while lowering): no device minute goes to one that cannot."""
    import jqtz

    spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=128)
    pw = jax.eval_shape(
        lambda w: w4a16.prepare(jqtz.quantize(w, spec)), jax.ShapeDtypeStruct((k, n), jnp.float32)
    )
    x = jax.ShapeDtypeStruct((256, k), jnp.bfloat16)
    for cfg in w4a16.MOSAIC_TUNE_CANDIDATES:
        f = functools.partial(w4a16.matmul, config=cfg)
        assert common.MOSAIC_GPU_CUSTOM_CALL in common.lower_for_cuda(f, x, pw)


def test_w8a8_tune_candidates_alternate_lowerings():
    cands = w8a8.tune_candidates()
    assert cands[0] == w8a8.default_config(4096) and isinstance(cands[1], w8a8.MosaicConfig)
    assert set(cands) == set(w8a8.TUNE_CANDIDATES) | set(w8a8.MOSAIC_TUNE_CANDIDATES)
    blocks = w8a8.tune_candidates(block_scales=True)  # steps of one 128-row scale block
    assert isinstance(blocks[0], w8a8.TuningConfig) and blocks[1] == w8a8.BLOCK_MOSAIC_CONFIG
    assert all(c.block_k == 128 for c in blocks if isinstance(c, w8a8.TuningConfig))
    assert {c for c in blocks if isinstance(c, w8a8.MosaicConfig)} == set(
        w8a8.BLOCK_MOSAIC_CANDIDATES
    )


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_w8a8_mosaic_candidates_fit_the_h100(dtype):
    """Every Mosaic GPU config the GPU session will sweep lowers for an H100 at the largest
    benchmark shape (Mosaic GPU checks shared memory while lowering), so no device minute is
    spent on a config that cannot compile."""
    m, n, k = 4096, 8192, 8192
    args = (
        jax.ShapeDtypeStruct((m, k), dtype),
        jax.ShapeDtypeStruct((m, 1), jnp.float32),
        jax.ShapeDtypeStruct((n, k), dtype),
        jax.ShapeDtypeStruct((1, n), jnp.float32),
    )
    for cfg in w8a8.MOSAIC_TUNE_CANDIDATES:
        f = functools.partial(w8a8.matmul, config=cfg, w_k_major=True)
        assert common.MOSAIC_GPU_CUSTOM_CALL in common.lower_for_cuda(f, *args)


def test_end_to_end_decode_bench_smoke(capsys):
    """examples/bench_decode.py (the GPU session's second command) on a 2-layer model: every
    case runs, with kernels on (Triton, and Mosaic GPU preferred) and off, and names its paths."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--new", "4", "--prompt", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if "quantized products" in line]
    assert [r[:3] for r in rows] == [
        ["bf16", "bf16", "on"], ["w4a16", "bf16", "on"], ["w4a16", "bf16", "off"],
        ["w4a16-zp", "bf16", "on"], ["w4a16-zp-km", "bf16", "on"],
        ["bf16", "int8", "on"], ["bf16", "int8", "mosaic"], ["bf16", "int8", "off"],
        ["w4a16", "int8", "on"], ["w4a16", "int8", "mosaic"], ["w4a16", "int8", "off"],
        ["w4a16-zp-km", "bf16", "mosaic"],
    ]  # fmt: skip
    assert all(not float(r[4]) <= 0 for r in rows)  # a rate, or nan when too fast to time


def test_end_to_end_decode_bench_skips_cases_and_refuses_unknown_ones(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--tiny", "--skip", "w4a16/int4/on"])
    assert "--skip: unknown case(s) [('w4a16', 'int4', 'on')]" in capsys.readouterr().err
    others = ["bf16/bf16/on", "w4a16/bf16/off", "w4a16-zp/bf16/on", "w4a16-zp-km/bf16/on"]
    others += [f"{w}/int8/{k}" for w in ("bf16", "w4a16") for k in ("on", "mosaic", "off")]
    others += ["w4a16-zp-km/bf16/mosaic"]
    argv = ["--tiny", "--new", "4", "--prompt", "8", "--skip", ",".join(others)]
    assert module.main(argv) == 0  # only w4a16/bf16/on is left
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()
            if "quantized products" in line]  # fmt: skip
    assert rows == [["w4a16", "bf16", "on"]]


def test_end_to_end_decode_bench_keeps_the_other_cases_when_one_fails(capsys, monkeypatch):
    import importlib.util
    import pathlib

    import jqtz

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real = module.generate

    def generate(*args, **kwargs):
        if jqtz.nn.pallas_lowering() == "mosaic":
            raise RuntimeError("pretend compile failure\nsecond line")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "generate", generate)
    assert module.main(["--tiny", "--new", "2", "--prompt", "4"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 3 and all("mosaic" in line for line in failed)
    assert "RuntimeError: pretend compile failure second line" in failed[0]
    assert sum("quantized products" in line for line in out.splitlines()) == 9  # the others ran


@pytest.mark.parametrize("name", ["w4a16", "w8a8", "decode_attention"])
def test_kernel_bench_entry_points_pass_valid_arguments(name, monkeypatch):
    """`python -m pallas_kernels.<kernel> --bench --tune` on a GPU calls its `benchmark` with
    arguments it accepts (checked against the real signature; no GPU needed)."""
    import importlib
    import inspect

    module = importlib.import_module(f"pallas_kernels.{name}")
    module = importlib.import_module(module.main.__module__)  # w4a16's lives in w4a16_bench
    real = inspect.signature(module.benchmark)
    calls = []
    monkeypatch.setattr(common, "require_gpu_or_exit", lambda n: True)
    monkeypatch.setattr(module, "benchmark", lambda *a, **k: calls.append(real.bind(*a, **k)))
    assert module.main(["--bench", "--tune"]) == 0
    assert len(calls) == 1 and calls[0].arguments["tune"] is True


def test_only_rejects_unknown_kernels(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--smoke", "--only", "w4a16,w8a16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--only: unknown kernel(s) ['w8a16']" in err and "decode_attention" in err


@pytest.mark.parametrize("name", ["w4a16", "decode_attention"])
def test_kernels_reexport_their_benchmark_lazily(name):
    """`w4a16.benchmark` and friends are `w4a16_bench`'s (imported on first use), as
    `decode_attention`'s are `decode_attention_bench`'s; other missing names still raise
    AttributeError."""
    import importlib

    kernel = importlib.import_module(f"pallas_kernels.{name}")
    bench_module = importlib.import_module(f"pallas_kernels.{name}_bench")
    for attr in bench_module.__all__:
        assert getattr(kernel, attr) is getattr(bench_module, attr)
    with pytest.raises(AttributeError, match="no attribute 'benchmarks'"):
        kernel.benchmarks  # noqa: B018

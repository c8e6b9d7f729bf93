"""Helpers shared by the kernel files: backend checks, padding, CUDA lowering on a CPU, timing.

The kernels use the Pallas **Triton** lowering (`pl.pallas_call` with
`jax.experimental.pallas.triton.CompilerParams`); W8A8 also has a **Mosaic GPU** path
(`w8a8.MosaicConfig`). docs/kernels.md says why and what moving the rest to Mosaic GPU takes.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

# Private: the Pallas Triton lowering table and Triton's MLIR dialect, for `fp8_dot` (jax is
# pinned in pyproject.toml; the CUDA lowering tests fail if these move).
from jax._src.lib.mlir import ir as _ir
from jax._src.lib.triton import dialect as _tt
from jax._src.pallas.triton import lowering as _triton_lowering
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.interpreters import mlir

#: Custom-call target that the Pallas Triton lowering emits (checked by the lowering tests).
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"

#: Custom-call target that the Pallas Mosaic GPU lowering emits.
MOSAIC_GPU_CUSTOM_CALL = "mosaic_gpu_v2"

#: The device the CUDA lowering tests pretend to compile for.
H100_DEVICE_KIND = "NVIDIA H100 80GB HBM3"


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def split_steps(splits: int, steps: int) -> tuple[int, int]:
    """`(splits, steps per split)` for `steps` loop steps shared by at most `splits` programs:
    every program but the last takes the same number, and none is left empty.

    Example:
      >>> split_steps(9, 64)  # 8 steps each: 8 programs suffice
      (8, 8)
    """
    per_split = cdiv(steps, min(splits, steps))
    return cdiv(steps, per_split), per_split


def fori_loop_rows_ahead(start, stop, body, init, rows, *, ahead: bool = True):
    """`lax.fori_loop(start, stop, ...)` inside a kernel whose step `i` also reads small rows
    `rows(i)` (a group's scales and zero points), given to `body(i, carry, rows_i)`.

    With `ahead`, each step's rows are loaded one step earlier and carried through the loop, so
    the load's latency hides behind a step's work instead of stalling it (Triton pipelines only
    loads that feed a product); the last step reloads its own rows, and `rows` is never called
    past `stop - 1`. It costs the carried registers: kernels at the register limit load in
    the step instead (`ahead=False`).
    """
    if not ahead:
        return jax.lax.fori_loop(start, stop, lambda i, acc: body(i, acc, rows(i)), init)

    def step(i, carry):
        acc, current = carry
        following = rows(jnp.minimum(i + 1, stop - 1))  # issued first: a whole step to land
        return body(i, acc, current), following

    first = rows(jnp.minimum(start, stop - 1))
    return jax.lax.fori_loop(start, stop, step, (init, first))[0]


def fp8_dot(a: jax.Array, b: jax.Array, *, contract_b: int = 0, promote_every: int) -> jax.Array:
    """`a [m, k] @ b` in float32 for float8 operands inside a Pallas Triton kernel, on Hopper's
    fp8 tensor cores (`wgmma`, QGMMA in the SASS).

    `b` is `[k, n]` (`contract_b=0`) or `[n, k]` (`contract_b=1`). Hopper's fp8 products
    accumulate at reduced precision inside the tensor core (about 14 bits, DeepSeek-V3 report
    §3.3.2), so Triton asks how many products of `k` may sum there before the partial sum is
    added to a float32 accumulator: `promote_every` (at most `k`; 128 is DeepSeek's interval).
    `jax.lax.dot_general` cannot say it, and Triton then refuses `wgmma` for float8 with a
    float32 result: the codes are converted to float16 per element and multiplied at the 16-bit
    rate (`mma.sync`, HMMA), less than half of the fp8 rate. Elsewhere (the Pallas interpreter,
    XLA) this is the exact `lax.dot_general`.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.full((2, 64), 0.5, jnp.float8_e4m3fn)
      >>> b = jnp.full((4, 64), 2.0, jnp.float8_e4m3fn)
      >>> fp8_dot(a, b, contract_b=1, promote_every=64)
      Array([[64., 64., 64., 64.],
             [64., 64., 64., 64.]], dtype=float32)
    """
    if a.ndim != 2 or b.ndim != 2 or contract_b not in (0, 1):
        raise ValueError(f"fp8_dot takes 2-D operands and contract_b 0 or 1, got {a.shape}, "
                         f"{b.shape}, contract_b={contract_b}")  # fmt: skip
    k = a.shape[1]
    if b.shape[contract_b] != k or not 0 < promote_every <= k:
        raise ValueError(f"fp8_dot: {a.shape} @ {b.shape} (contract_b={contract_b}) with "
                         f"promote_every={promote_every}: K must agree and 0 < promote_every "
                         "<= K")  # fmt: skip
    return _fp8_dot_p.bind(a, b, contract_b=contract_b, promote_every=promote_every)


def _fp8_dot_exact(a, b, *, contract_b, promote_every):
    del promote_every  # a hint for the tensor cores only
    dims = (((1,), (contract_b,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _fp8_dot_abstract(a, b, *, contract_b, promote_every):
    del promote_every
    return jax.core.ShapedArray((a.shape[0], b.shape[1 - contract_b]), jnp.float32)


def _fp8_dot_triton(ctx, a, b, *, contract_b, promote_every):
    del ctx
    if contract_b == 1:
        b = _tt.trans(b, (1, 0))
    m, n = _ir.RankedTensorType(a.type).shape[0], _ir.RankedTensorType(b.type).shape[1]
    acc = _triton_lowering._zeros(_ir.RankedTensorType.get([m, n], _ir.F32Type.get()))
    return _tt.dot(a, b, acc, max_num_imprecise_acc=promote_every)


_fp8_dot_p = jex.core.Primitive("pallas_kernels_fp8_dot")
_fp8_dot_p.def_impl(_fp8_dot_exact)
_fp8_dot_p.def_abstract_eval(_fp8_dot_abstract)
mlir.register_lowering(_fp8_dot_p, mlir.lower_fun(_fp8_dot_exact, multiple_results=False))
_triton_lowering.register_lowering(_fp8_dot_p)(_fp8_dot_triton)


def round_up(a: int, b: int) -> int:
    """The smallest multiple of `b` that is >= `a`."""
    return cdiv(a, b) * b


def is_pow2(n: int) -> bool:
    """Whether `n` is a positive power of two (Triton block shapes must be)."""
    return n > 0 and n & (n - 1) == 0


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """`x` padded at the end of `axis` up to `size` (unchanged when already that long)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the default backend's first device when it is an NVIDIA GPU, else None."""
    try:
        if jax.default_backend() != "gpu":
            return None
        dev = jax.devices()[0]
    except RuntimeError:
        return None
    cc = getattr(dev, "compute_capability", None)
    if not cc:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def num_sms() -> int:
    """Streaming multiprocessors of the device compiled for (132 on an H100 SXM)."""
    mesh = jax.sharding.get_abstract_mesh()
    cores = getattr(getattr(mesh, "abstract_device", None), "num_cores", None)
    if cores:
        return cores
    if gpu_compute_capability() is not None:
        return getattr(jax.devices()[0], "core_count", None) or 132
    return 132


def check_mosaic_config(cfg, **extra: bool) -> None:
    """Validate the tile fields every Mosaic GPU config shares (`tile_m`, `tile_n`,
    `max_concurrent_steps`, `grid_tile_width`) and the kernel's own `extra` checks
    (name -> holds); raise a ValueError naming the first that fails."""
    checks = {
        "tile_m": cfg.tile_m % 64 == 0 and cfg.tile_m > 0,  # the wgmma M
        "tile_n": cfg.tile_n % 8 == 0 and 0 < cfg.tile_n <= 256,
        # the accumulator lives in one warpgroup's registers: tile_m * tile_n / 128 each
        "tile_m * tile_n": cfg.tile_m * cfg.tile_n <= 128 * 128,
        "max_concurrent_steps": cfg.max_concurrent_steps >= 2,
        "grid_tile_width": cfg.grid_tile_width >= 1,
        **extra,
    }
    for name, ok in checks.items():
        if not ok:
            raise ValueError(
                f"{type(cfg).__name__}.{name} is invalid in {cfg}: tile_m a multiple of 64, "
                "tile_n a multiple of 8 up to 256, tile_m * tile_n at most 128 * 128 "
                "(registers), tile_k (where set) a multiple of 64, max_concurrent_steps >= 2, "
                "grid_tile_width >= 1"
            )


def persistent_mosaic_kernel(body, out_type, num_tiles: int, *, interpret: bool, name: str):
    """A Mosaic GPU kernel (warpgroup semantics) of `min(SMs, num_tiles)` blocks on the grid
    axis "sm"; `body` walks the output tiles with `plgpu.nd_loop(..., collective_axes="sm")`.
    `interpret` runs the Mosaic GPU interpreter instead of compiling."""
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(min(num_sms(), num_tiles),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
        kernel_name=name,
    )


def store_tile(tile, o_smem, o_gmem) -> None:
    """Write a register tile to the global-memory window `o_gmem` through shared memory `o_smem`
    with TMA, and wait until the copy has read `o_smem` (so the buffer can be reused)."""
    o_smem[...] = tile.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def require_hopper_for_mosaic(interpret: bool) -> None:
    """Raise when a Mosaic GPU config would run on a GPU that is not a Hopper (`wgmma` is sm_90
    only). Interpreting, or lowering on a machine without a GPU, is always allowed."""
    cc = None if interpret else gpu_compute_capability()
    if cc is not None and cc[0] != 9:
        raise ValueError(
            f"a MosaicConfig runs Hopper `wgmma` (compute capability 9.x); this GPU is "
            f"{cc[0]}.{cc[1]}. Use the kernel's TuningConfig (Triton) instead."
        )


def gpu_capability(backend=None, compute_capability=None, *, need=(8, 0)):
    """`(major, minor)` when `backend` (default: the current one) is an NVIDIA GPU of compute
    capability `compute_capability` (default: the first device's) at least `need`; else None.
    The first check of every kernel's `can_use`."""
    if (backend or jax.default_backend()) != "gpu":
        return None
    cc = compute_capability or gpu_compute_capability()
    return None if cc is None or tuple(cc) < tuple(need) else tuple(cc)


def is_hopper(backend=None, compute_capability=None) -> bool:
    """Whether `backend` (default: the current one) is a Hopper GPU (compute capability 9.x),
    where the Mosaic GPU paths (`wgmma`) run."""
    cc = gpu_capability(backend, compute_capability)
    return cc is not None and cc[0] == 9


@contextlib.contextmanager
def abstract_cuda_device(device_kind: str = H100_DEVICE_KIND):
    """Context in which `jit(f).trace(...).lower(lowering_platforms=("cuda",))` works on a CPU.

    jax 0.11.2 asks the current device for GPU properties while lowering a Pallas GPU kernel; an
    abstract mesh over one abstract CUDA device answers instead of a real GPU.
    """
    mesh = jax.sharding.AbstractMesh(
        (1,),
        ("x",),
        abstract_device=jax.sharding.AbstractDevice(
            device_kind=device_kind, num_cores=None, platform="cuda"
        ),
    )
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def lower_for_cuda(fn, *args, **kwargs) -> str:
    """StableHLO text of `jax.jit(fn)` lowered for CUDA (works without a GPU)."""
    with abstract_cuda_device():
        lowered = jax.jit(fn, **kwargs).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


#: The larger L2 of the H100 (50 MB) and the H200 (60 MB). Benchmarks rotate through enough
#: distinct copies of their inputs that a pass over them overflows it: no timing reads the cache.
L2_BYTES = 60 * 10**6


def copies_to_miss_cache(nbytes: int, *, most: int = 8) -> int:
    """How many distinct copies of an input of `nbytes` make one cyclic pass exceed 2x the L2."""
    return max(1, min(most, cdiv(2 * L2_BYTES, max(nbytes, 1))))


def _median_seconds(fn, arg, iters: int) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(arg))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_per_call(fn, arg_sets, *, iters: int = 20) -> float:
    """Device seconds per call of `fn(*args)` for the argument tuples in `arg_sets`.

    Two jitted programs are timed (median of `iters` runs each): one call on `arg_sets[0]`, and
    one call per set, in order, in a single program. The slope `(t_all - t_one) / (n - 1)` is
    the time per call without the host's fixed dispatch cost, which can be as long as a decode
    GEMV. Give each set its own small inputs (activations) so that XLA cannot merge
    or deduplicate the calls, and rotate the large ones (weights, caches) among
    `copies_to_miss_cache(...)` copies so that the calls read device memory, not the L2.
    """
    sets = [tuple(a) for a in arg_sets]
    one = _median_seconds(jax.jit(lambda a: fn(*a)), sets[0], iters)
    if len(sets) == 1:
        return one
    many = _median_seconds(jax.jit(lambda ss: [fn(*a) for a in ss]), sets, iters)
    slope = (many - one) / (len(sets) - 1)
    return slope if slope > 0 else many / len(sets)


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s (read + write), the memory roofline of this run."""
    xs = [jnp.full((nbytes // 4,), float(i), jnp.float32) for i in range(2)]
    return 2 * nbytes / time_per_call(lambda a: a + 1.0, [(x,) for x in xs], iters=10)


def measure_matmul_rate(n: int = 8192) -> float:
    """bf16 `n x n x n` product rate of XLA in FLOP/s on random data, the compute roofline."""
    keys = jax.random.split(jax.random.key(0), 4)
    a, b, c, d = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    return 2 * n**3 / time_per_call(jnp.dot, [(a, b), (c, d)], iters=10)


def relative_error(y, ref) -> float:
    """`||y - ref|| / ||ref||` in float32 (inf when y has a NaN or an inf)."""
    y, ref = jnp.asarray(y, jnp.float32), jnp.asarray(ref, jnp.float32)
    if not bool(jnp.isfinite(y).all()):
        return float("inf")
    return float(jnp.linalg.norm(y - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


class Report:
    """Benchmark output: each line printed and, with a `path`, appended to that file at once
    (a run stopped part-way keeps what it measured)."""

    def __init__(self, path=None):
        self.path = path
        if path is not None:
            open(path, "w").close()

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def tune(report, label: str, candidates, measure, *, deadline: float) -> list:
    """Time each candidate config with `measure(config) -> (seconds, rel_error)`.

    Prints one line per candidate. A candidate that fails to compile or run is reported and
    skipped; candidates left when `time.monotonic()` passes `deadline` are reported as not
    tried. Returns `[(seconds, config, rel_error), ...]` of the ones that ran, fastest first.
    """
    done = []
    for i, cfg in enumerate(candidates):
        if time.monotonic() > deadline:
            report(f"  {label}: time budget spent, {len(candidates) - i} candidates not tried")
            break
        try:
            seconds, err = measure(cfg)
        except Exception as e:  # a config the compiler rejects is a result
            report(f"  {label} {cfg}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        report(f"  {label} {cfg}: {seconds * 1e6:.1f} us, rel err {err:.1e}")
        done.append((seconds, cfg, err))
    return sorted(done, key=lambda r: r[0])


def bench_header(extra: str = "") -> str:
    """The first line of a benchmark's output: date, device, jax version (and `extra`)."""
    import datetime

    line = f"{datetime.date.today()}  device {jax.devices()[0].device_kind}, jax {jax.__version__}"
    return f"{line}; {extra}" if extra else line


def run_benchmark(name: str, benchmark, **kwargs) -> int:
    """A kernel file's `--bench`: `benchmark(Report(), **kwargs)` after the header line, on an
    NVIDIA GPU; elsewhere it says that no GPU is present. Returns the exit status (0)."""
    if require_gpu_or_exit(name):
        report = Report()
        report(bench_header())
        benchmark(report, **kwargs)
    return 0


def require_gpu_or_exit(name: str) -> bool:
    """True on an NVIDIA GPU; otherwise prints that no GPU is present (the caller exits 0)."""
    if gpu_compute_capability() is None:
        print(f"{name}: no GPU present (backend {jax.default_backend()!r}); nothing to benchmark.")
        sys.stdout.flush()
        return False
    return True


#: `[K, N]` weights off the kernels' tiles (SmolLM2-135M's projections) whose products the
#: benchmark suite checks for correctness on the GPU (`check_ragged` in the kernel files).
RAGGED_SHAPES = ((576, 192), (576, 1536), (1536, 576))

#: Bound on `||y - ref|| / ||ref||` for a benchmarked config: bf16 outputs round once (2^-9
#: relative); float32 accumulation order is far below that.
ERROR_BOUND = 1e-2

#: Masked attention scores: finite, so an empty split gives zero weights rather than NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def best_config(report, label: str, default, candidates, measure, *, deadline: float):
    """Time `default`, then (through `tune`) the other `candidates`.

    Returns `(default_seconds, (seconds, config, rel_error) of the fastest, tried)`, with
    `tried` the candidates that ran within `ERROR_BOUND`, fastest first: a config that computes
    the wrong result (a race, a bad index) is reported and never chosen.
    """
    t0, err0 = measure(default)
    others = [c for c in candidates if c != default]
    tried = tune(report, label, others, measure, deadline=deadline) if others else []
    for _, cfg, err in tried:
        if not err <= ERROR_BOUND:
            report(f"  {label} {cfg}: rel err {err:.1e} over {ERROR_BOUND}: not chosen")
    tried = [r for r in tried if r[2] <= ERROR_BOUND]
    best = min([(t0, default, err0), *tried[:1]], key=lambda r: r[0])
    return t0, best, tried

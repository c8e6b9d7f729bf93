"""Helpers shared by the kernel files: backend checks, padding, CUDA lowering on a CPU, timing.

Every kernel in this package uses the Pallas **Triton** lowering (`pl.pallas_call` with
`jax.experimental.pallas.triton.CompilerParams`); docs/kernels.md says why and what moving to
Mosaic GPU would take.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

#: Custom-call target that the Pallas Triton lowering emits (checked by the lowering tests).
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"

#: The device the CUDA lowering tests pretend to compile for.
H100_DEVICE_KIND = "NVIDIA H100 80GB HBM3"


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


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


def time_fn(fn, *args, iters: int = 50, warmup: int = 5) -> float:
    """Median wall time of `fn(*args)` in seconds, synchronised with `block_until_ready`."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s (read + write), the memory roofline of this run."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    return 2 * nbytes / time_fn(copy, x, iters=20)


def bench_header(extra: str = "") -> str:
    """The first line of a benchmark's output: date, device, jax version (and `extra`)."""
    import datetime

    line = f"{datetime.date.today()}  device {jax.devices()[0].device_kind}, jax {jax.__version__}"
    return f"{line}; {extra}" if extra else line


def require_gpu_or_exit(name: str) -> bool:
    """True on an NVIDIA GPU; otherwise prints that no GPU is present (the caller exits 0)."""
    if gpu_compute_capability() is None:
        print(f"{name}: no GPU present (backend {jax.default_backend()!r}); nothing to benchmark.")
        sys.stdout.flush()
        return False
    return True

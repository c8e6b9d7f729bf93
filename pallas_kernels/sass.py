"""What a Triton kernel compiles to for an H100, on a machine without a GPU.

    pip install triton       # its compiler, ptxas and cuobjdump (not a jqtz dependency)
    python -m pallas_kernels.sass w4a16 --m 1                      # the decode GEMV, N = K = 8192
    python -m pallas_kernels.sass w4a16 --m 1 --config "TuningConfig(block_n=128, split_k=16)"
    python -m pallas_kernels.sass w4a16 --m 1 --k-major            # codes stored [N, K/2]
    python -m pallas_kernels.sass decode_attention --kind int8     # B 8, 32/8 heads, D 128, 16k
    python -m pallas_kernels.sass w8a8 --m 1024 --kind fp8 --block-scales --k-major

The kernel is lowered for an H100 as CI lowers it (`common.lower_for_cuda`), the Triton IR
that Pallas hands to XLA is taken from the lowering, and the `triton` package compiles it for
sm_90 with the config's warps and stages. Printed: registers per thread and shared memory per
block (which bound the blocks per SM), and the instruction mix of the innermost loop's body (one
step of the kernel's loop) by opcode. XLA compiles the same IR with its own Triton build, so
the numbers approximate what runs on the GPU; they are a reading of the code, not a timing.

Example (needs the `triton` package; prints "triton is not installed" otherwise):
  >>> from pallas_kernels import sass
  >>> sass.loop_mix("  /*0010*/  @P0 LDG.E R1, desc[UR4][R2.64] ;\\n"
  ...               "  /*0020*/  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\\n"
  ...               "  /*0030*/  @P1 BRA 0x10 ;")
  (3, {'LDG': 1, 'HMMA': 1, 'BRA': 1})
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from pallas_kernels import common

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def triton_modules(fn, *args) -> list[tuple[str, int, int]]:
    """`(Triton IR text, num_warps, num_stages)` of each Pallas Triton kernel in `fn(*args)`,
    lowered for an H100 on this machine."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module
    modules = []

    def capture(*a, **k):
        result = lower(*a, **k)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        text = common.lower_for_cuda(fn, *args)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    warps = [int(w) for w in re.findall(r"num_warps = (\d+) : i32", text)]
    stages = [int(s) for s in re.findall(r"num_stages = (\d+) : i32", text)]
    return list(zip(modules, warps, stages, strict=True))


def compile_sm90(ir: str, num_warps: int, num_stages: int) -> tuple[int, str, str]:
    """`(shared memory bytes, resource usage, SASS)` of Triton IR compiled for sm_90 by the
    `triton` package."""
    import triton
    from triton._C.libtriton import ir as tir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "kernel.ttir"
        src.write_text(ir)
        # `triton.compile` skips the first stage's passes for IR given as a file; XLA runs them
        # (its `MakeTTIR`: canonicalization, dot-add combining, ...), so run them here first.
        backend, context = make_backend(target), tir.context()
        tir.load_dialects(context)
        backend.load_dialects(context)
        module = tir.parse_mlir_module(str(src), context)
        module.context = context
        backend.make_ttir(module, {}, backend.parse_options({"num_warps": num_warps}), 90)
        src.write_text(str(module))
        kernel = triton.compile(
            str(src), target=target, options={"num_warps": num_warps, "num_stages": num_stages}
        )
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        run = lambda *a: subprocess.run([str(tool), *a, str(cubin)], capture_output=True,
                                        text=True, check=True).stdout  # fmt: skip
        return kernel.metadata.shared, run("--dump-resource-usage"), run("--dump-sass")


def loop_mix(sass: str) -> tuple[int, dict[str, int]]:
    """`(instructions, {opcode: count})` of the innermost loop's body: the instructions from a
    backward branch's target to the branch, the last such loop in the code."""
    instrs = _instructions(sass)
    loop = None
    for addr, text in instrs:
        target = re.search(r"\bBRA (0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loop = (int(target.group(1), 16), addr)
    if loop is None:
        return 0, {}
    return _mix([t for a, t in instrs if loop[0] <= a <= loop[1]])


def _instructions(sass: str) -> list[tuple[int, str]]:
    return [(int(m.group(1), 16), m.group(2)) for m in _INSTR.finditer(sass)]


def _mix(body: list[str]) -> tuple[int, dict[str, int]]:
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body]
    return len(body), dict(collections.Counter(ops).most_common())


def _w4a16(args):
    import jqtz
    from pallas_kernels import w4a16
    from pallas_kernels.w4a16 import TuningConfig  # noqa: F401 (for --config)

    spec = jqtz.QuantSpec(format=f"int{args.bits}", granularity="group", group_size=args.group,
                          symmetric=False)  # fmt: skip
    weight = jax.ShapeDtypeStruct((args.k, args.n), jnp.float32)
    q = jax.eval_shape(lambda w: jqtz.quantize(w, spec), weight)
    if args.k_major:
        q = jax.eval_shape(lambda q: q.with_transposed_codes(), q)
    packed = jax.eval_shape(w4a16.prepare, q)
    cfg = eval(args.config) if args.config else None
    x = jax.ShapeDtypeStruct((args.m, args.k), jnp.bfloat16)
    shown = cfg or w4a16.default_config(args.m, args.n, packed.num_groups, bits=args.bits)
    return shown, lambda x, w: w4a16.matmul(x, w, config=cfg), (x, packed)


def _w8a8(args):
    from pallas_kernels import w8a8
    from pallas_kernels.w8a8 import TuningConfig  # noqa: F401 (for --config)

    dtype = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[args.kind]
    kb = args.k // w8a8.SCALE_BLOCK if args.block_scales else 1
    xq = jax.ShapeDtypeStruct((args.m, args.k), dtype)
    wq = jax.ShapeDtypeStruct((args.n, args.k) if args.k_major else (args.k, args.n), dtype)
    sx = jax.ShapeDtypeStruct((args.m, kb), jnp.float32)
    sw = jax.ShapeDtypeStruct((kb, args.n), jnp.float32)
    cfg = eval(args.config) if args.config else None
    shown = cfg or w8a8.default_config(args.m)
    fn = lambda *a: w8a8.matmul(*a, config=cfg, w_k_major=args.k_major)
    return shown, fn, (xq, sx, wq, sw)


def _decode_attention(args):
    from pallas_kernels import decode_attention as da
    from pallas_kernels.decode_attention import TuningConfig  # noqa: F401 (for --config)

    b, h, hkv, d, page, s = 8, 32, 8, 128, 64, args.context
    dtype = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "float": jnp.bfloat16}[args.kind]
    codes = jax.ShapeDtypeStruct((b * s // page, page, hkv, d), dtype)
    scale = None if args.kind == "float" else jax.ShapeDtypeStruct(codes.shape[:3], jnp.float32)
    pages = da.Pages(codes, scale, None, args.kind)
    cfg = eval(args.config) if args.config else da.TuningConfig()
    q = jax.ShapeDtypeStruct((b, h, d), jnp.bfloat16)
    tables = jax.ShapeDtypeStruct((b, s // page), jnp.int32)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    fn = lambda *a: da.decode_attention(*a, config=cfg)
    return cfg, fn, (q, pages, pages, lengths, tables)


def main(argv=None) -> int:
    """`python -m pallas_kernels.sass KERNEL [options]`; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=("w4a16", "w8a8", "decode_attention"))
    parser.add_argument("--m", type=int, default=1, help="w4a16: rows of x")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--k-major", action="store_true", help="w4a16, w8a8: codes stored K-major")
    parser.add_argument(
        "--kind",
        default="int8",
        choices=("int8", "fp8", "float"),
        help="decode_attention: the pages; w8a8: the codes (int8 or fp8)",
    )
    parser.add_argument(
        "--block-scales",
        action="store_true",
        help="w8a8: 1x128 activation and 128x128 weight scale blocks",
    )
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--config", help="a TuningConfig(...) expression (default: the kernel's)")
    parser.add_argument("--dump", metavar="PATH", help="also write the full SASS to PATH")
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed: `pip install triton` (its compiler and cuobjdump)")
        return 0
    if args.kernel == "w8a8" and args.kind == "float":
        parser.error("w8a8 --kind must be int8 or fp8")
    build = {"w4a16": _w4a16, "w8a8": _w8a8, "decode_attention": _decode_attention}
    cfg, fn, fn_args = build[args.kernel](args)
    print(f"{args.kernel}: {cfg}")
    for ir, warps, stages in triton_modules(fn, *fn_args):
        shared, usage, sass = compile_sm90(ir, warps, stages)
        if args.dump:
            pathlib.Path(args.dump).write_text(sass)
        regs = int(re.search(r"REG:(\d+)", usage).group(1))
        blocks = min(65536 // (regs * 32 * warps), 232_448 // max(shared, 1), 64 // warps)
        print(f"  {warps} warps, {stages} stages: {regs} registers per thread, {shared} bytes "
              f"of shared memory per block: {blocks} blocks per SM at most")  # fmt: skip
        count, mix = loop_mix(sass)
        if count:
            print(f"  innermost loop body: {count} instructions per warp")
        else:  # a static trip count short enough for ptxas to unroll the loop
            count, mix = _mix([t for _, t in _instructions(sass)])
            print(f"  no loop (unrolled, or no steps): whole kernel {count} instructions per warp")
        print("   " + ", ".join(f"{op} {n}" for op, n in mix.items()))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

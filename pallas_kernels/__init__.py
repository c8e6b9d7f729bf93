"""Pallas GPU kernels for quantized matrix products and attention.

One file per kernel (kernel, pure-jnp `reference`, frozen `TuningConfig` with H100 defaults,
`can_use`, and a `main()` benchmark: `python -m pallas_kernels.w4a16 --bench`):

- `w4a16`: weight-only int4/uint4/int8/uint8/NF4 x bf16/f16, group-wise scales and zero points.
- `w8a8`: int8 x int8 -> int32 and fp8 e4m3 x e4m3 -> f32 with per-token/per-channel or
  128-block scales.
- `decode_attention`: one query token per sequence over paged int8/fp8/int4 (KIVI) KV pages.

`w4a16_mosaic` and `decode_attention_mosaic` hold those kernels' Mosaic GPU (Hopper) lowerings,
chosen by passing their `MosaicConfig` (re-exported by `w4a16` and `decode_attention`).

`python -m pallas_kernels.bench --tune --out DIR` runs every benchmark, with tuning, in one go
(docs/benchmarks.md); `--smoke` runs the same code in the interpreter on any machine.

`dispatch.maybe_matmul(x, w)` is the entry point for `jqtz.nn.ops`: a kernel result where
`can_use` holds, None (keep the XLA path) otherwise. docs/kernels.md explains the lowering
choice (Pallas Triton), the error bounds the tests use, and what is not done yet.
"""

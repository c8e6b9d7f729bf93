"""Where `jqtz.nn.ops.dot_general` meets the kernels: use one when it applies, else say None.

`maybe_matmul(x, w)` returns `x @ w` computed by a Pallas kernel when that kernel's `can_use`
holds (an NVIDIA GPU backend, supported format, shapes and dtypes), and None otherwise, so that
the caller keeps its XLA path:

    y = dispatch.maybe_matmul(x, qw)
    if y is None:
        y = <the XLA product>

Only contractions of the last axis of `x` with axis 0 of a 2-D weight `[K, N]` are offered
(what flax `Dense`/`nnx.Linear` do). The kernels read the `QArray`'s arrays in place, whatever
K and N are, so a quantized tree needs no conversion before serving; `jqtz.nn.serving_layout`
stores W8A8 codes `[N, K]` once, which spares the W8A8 kernels a transposition per call from
`w8a8.K_MAJOR_ROWS` rows.

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> from pallas_kernels import dispatch
  >>> qw = jqtz.quantize(jnp.ones((128, 128)), jqtz.QuantSpec(format="int4", group_size=64,
  ...                                                        granularity="group"))
  >>> dispatch.maybe_matmul(jnp.ones((1, 128), jnp.bfloat16), qw) is None  # on a CPU
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common, w4a16, w8a8

_W8A8_CODES = {"int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn}
#: K rows per scale block of the w8a8 kernel's block-scaled mode (1x128 / 128x128).
_W8A8_BLOCK = w8a8.SCALE_BLOCK


def _w8a8_mode(w) -> str | None:
    """How the w8a8 kernel reads a W8A8 `QArray`, or None when it cannot.

    Covered (symmetric int8 or fp8_e4m3 weights and activations of the same format, no
    LLM.int8() outliers):
    - `"channel"`: weight scales constant along K (per output channel, per tensor, or per
      group of columns), with per-token or per-tensor (dynamic, or static calibrated:
      `act_scale`) activation scales; both are applied in the epilogue;
    - `"block"`: weight scales per 128 rows of K (128 x 128 blocks, or groups of 128 along K)
      with 1 x 128 activation groups (DeepSeek-V3's FP8 layout, `jqtz.ptq.fp8_spec("block128")`);
      each K block's partial product is scaled. K must be a multiple of 128.
    """
    from jqtz.qarray import QArray

    if not isinstance(w, QArray) or w.act is None or w.ndim != 2 or w.batch_shape:
        return None
    act = w.act
    if (
        w.format.name not in _W8A8_CODES
        or act.format != w.format.name
        or not act.symmetric
        or act.outlier_threshold is not None
        or w.zero_point is not None
        or w.perm is not None
        or act.axis not in (-1, 1)
    ):
        return None
    k = w.shape[0]
    if w.block_shape[0] == k and act.granularity in ("channel", "tensor"):
        # (A calibrated per-token scale would be wrong; jqtz never makes one.)
        return "channel" if act.granularity == "tensor" or w.act_scale is None else None
    if (
        w.block_shape[0] == _W8A8_BLOCK
        and k % _W8A8_BLOCK == 0
        and act.granularity == "group"
        and act.group_size == _W8A8_BLOCK
        and w.act_scale is None
    ):
        return "block"
    return None


def _w8a8_mosaic(mode: str, lowering: str, **device) -> bool:
    """Whether a W8A8 product in `mode` may take Mosaic GPU under `lowering` on `device`: a
    Hopper GPU, and "auto" for one scale block along K (measured faster) or "mosaic"."""
    wanted = lowering == "mosaic" or (lowering == "auto" and mode == "channel")
    return wanted and common.is_hopper(**device)


def _w8a8_operands(x2, w):
    """`(xq, sx, wq, sw)` for `w8a8.matmul`: `x2 [M, K]` quantized by jqtz exactly as its XLA
    path quantizes it (`jqtz.nn.ops.quantize_input`: the same codes), and the weight's codes
    (`[N, K]` where `w.transposed`) and scales in place (block scales repeated along N,
    `[K/128, N]`: 1/128 of the codes)."""
    from jqtz.nn.ops import quantize_input, scales_per_index

    qx = quantize_input(x2, w)
    sx = qx.scale_values()  # [M, 1], [1, 1] or [M, K/128]
    sw = scales_per_index(w, axes=(1,))  # [1 or K/128, 1 or N]: column blocks per column
    return qx.qvalue, sx, w.qvalue, sw


def kernel_for(
    x, w, *, backend: str | None = None, compute_capability=None, lowering: str = "auto"
) -> str | None:
    """Name of the kernel `maybe_matmul(x, w, lowering=lowering)` runs ("w4a16", "w8a8", or
    "w4a16-mosaic" / "w8a8-mosaic" for their Mosaic GPU versions), or None for XLA.

    `lowering` (`jqtz.nn.use_pallas_kernels`): "auto" takes the lowering measured faster on an
    H100: Mosaic GPU for W8A8 products of at least `w8a8.K_MAJOR_ROWS` rows with one weight
    scale along K (1.9x Triton's int8 and 2.4x its fp8 at 4096 x 8192 x 8192, docs/
    benchmarks.md), Triton elsewhere; "mosaic" also takes Mosaic GPU for W4A16 above 16 rows
    and, for codes stored K-major, up to 16 rows (`w4a16.mosaic_config`), and for W8A8 with
    1x128 block scales from `w8a8.K_MAJOR_ROWS` rows (not yet timed on a GPU); "triton" never
    takes Mosaic GPU."""
    backend = backend or jax.default_backend()
    kw = dict(backend=backend, compute_capability=compute_capability)
    rows = x.size // max(x.shape[-1], 1)
    if w4a16.can_use(x, w, **kw):
        if lowering == "mosaic" and common.is_hopper(**kw):
            packed = w if isinstance(w, w4a16.PackedWeight) else w4a16.prepare(w)
            if w4a16.mosaic_config(packed, rows) is not None:
                return "w4a16-mosaic"
        return "w4a16"
    mode = _w8a8_mode(w)
    if mode and x.ndim >= 1 and jnp.issubdtype(x.dtype, jnp.floating):
        probe = jax.ShapeDtypeStruct(x.shape, _W8A8_CODES[w.format.name])
        if w8a8.can_use(probe, jax.ShapeDtypeStruct(w.shape, w.qvalue.dtype), **kw):
            config = w8a8.serving_config(
                rows, mosaic=_w8a8_mosaic(mode, lowering, **kw), block=mode == "block"
            )
            return "w8a8-mosaic" if isinstance(config, w8a8.MosaicConfig) else "w8a8"
    return None


def maybe_matmul(
    x: jax.Array,
    w,
    *,
    lowering: str = "auto",
    interpret: bool = False,
    backend: str | None = None,
    compute_capability=None,
) -> jax.Array | None:
    """`x [..., K] @ w [K, N]` through a kernel when one applies, else None (use XLA).

    Args:
      x: activations, contracted over their last axis.
      w: a `jqtz.QArray` (weight-only int2/3/4/8, uint2/3/4/8, nf4 or fp8; or W8A8 int8/fp8_e4m3
        with per-channel or per-tensor weight scales and per-token or per-tensor activation
        scales, dynamic or calibrated, or with 128 x 128 weight blocks and 1 x 128 activation
        groups) or a `w4a16.PackedWeight`.
      lowering: "auto" (the default), "triton" or "mosaic": which Pallas lowering to take
        where a kernel has both (`kernel_for`).
      interpret: run the kernel in the Pallas interpreter (any machine; pass a GPU `backend`
        and `compute_capability` to choose it as on that GPU).
      backend, compute_capability: the device to choose for (default: this one).

    Returns:
      `[..., N]` in `result_type(x.dtype, w.dtype)` (as `jqtz.nn.dot_general`), or None.
    """
    if w4a16.supports_qarray(w) is None:  # the W4A16 view, once (kernel_for reads it too)
        w = w4a16.prepare(w)
    name = kernel_for(
        x, w, backend=backend, compute_capability=compute_capability, lowering=lowering
    )
    if name is None:
        return None
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    if name in ("w8a8", "w8a8-mosaic"):
        xq, sx, wq, sw = _w8a8_operands(x.reshape(-1, x.shape[-1]), w)
        m = xq.shape[0]
        config = w8a8.serving_config(
            m, mosaic=name == "w8a8-mosaic", block=_w8a8_mode(w) == "block"
        )
        # Codes stored [N, K] (`jqtz.nn.serving_layout`) are read as they are; [K, N] codes
        # are transposed per call where the config reads K-major (see K_MAJOR_ROWS).
        k_major = w.transposed or w8a8.reads_k_major(m, config)
        wq = w8a8.to_k_major(wq) if k_major and not w.transposed else wq
        y = w8a8.matmul(xq, sx, wq, sw, config=config, out_dtype=out_dtype, interpret=interpret,
                        w_k_major=k_major)  # fmt: skip
        return y.reshape(*x.shape[:-1], w.shape[1])
    rows = x.size // x.shape[-1]
    config = w4a16.mosaic_config(w, rows) if name == "w4a16-mosaic" else None
    return w4a16.matmul(x, w, config=config, interpret=interpret)

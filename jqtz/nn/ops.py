"""The quantized matrix product: one entry point for everything that multiplies by a `QArray`.

`dot_general(lhs, rhs, dimension_numbers)` is a drop-in for `jax.lax.dot_general` whose right
operand may be a `QArray`:

- weight-only (`rhs.act is None`): the weight is dequantized to the input's dtype at the point of
  use and multiplied with float32 accumulation. Every format and granularity (int8/4/3/2 with or
  without zero points, NF4, FP8, groups, blocks).
- quantized activations (`rhs.act` set, e.g. W8A8): the input is quantized as `rhs.act` says
  (dynamic ranges, or the static `rhs.act_scale`). When the weight is int8 (or FP8) with one scale
  per output channel and the input has one scale per token, the product runs on the codes:
  int8 x int8 -> int32 (FP8 x FP8 -> float32) and both scales are applied to the result. Other
  combinations (group-wise weights, asymmetric ranges) quantize-dequantize both operands and
  multiply in float32, with the same numerics up to summation order.
- LLM.int8() (`rhs.act.outlier_threshold` set): input features with an |x| above the threshold
  are multiplied in floating point with their rows of the dequantized weight, the rest as
  above (on a GPU, through the W8A8 kernel where it applies); summed.

This is the seam that GPU kernels plug into: on a GPU, `pallas_kernels.dispatch` runs the Pallas
kernel where its `can_use` holds (weight-only int4/int8/NF4 groups, W8A8 int8/FP8 per
channel); everywhere else, and always on CPU, the XLA path here runs.

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> w = jax.random.normal(jax.random.key(0), (64, 32))
  >>> act = jqtz.QuantSpec(format="int8", granularity="channel", axis=-1)
  >>> qw = jqtz.quantize(w, jqtz.QuantSpec(format="int8", activation=act))
  >>> x = jax.random.normal(jax.random.key(1), (4, 64))
  >>> y = jqtz.nn.dot_general(x, qw, (((1,), (0,)), ((), ())))
  >>> err = jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w)
  >>> bool(err < 0.01)  # int8 x int8 -> int32, both scales applied to the result
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jqtz import formats
from jqtz.qarray import QArray
from jqtz.quantize import quantize_unchecked

_DN = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


def dot_general(
    lhs,
    rhs,
    dimension_numbers: _DN,
    precision=None,
    preferred_element_type=None,
    **kwargs,
):
    """`jax.lax.dot_general` where `rhs` (or `lhs`) may be a `QArray`; see the module docstring."""
    if isinstance(lhs, QArray):
        lhs = lhs.dequantize()
    if not isinstance(rhs, QArray):
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs
        )
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    if _is_dense(lhs, rhs, dimension_numbers):
        y = _kernel_matmul(lhs, rhs)
        if y is not None:
            return y.astype(out_dtype)
    if rhs.act is None:
        w = rhs.dequantize(lhs.dtype)
        y = _xla_dot(
            lhs, w, dimension_numbers, precision, preferred_element_type=jnp.float32, **kwargs
        )
        return y.astype(out_dtype)
    return _with_quantized_activations(lhs, rhs, dimension_numbers, out_dtype, kwargs)


_LOWERINGS = ("auto", "triton", "mosaic")


def _pallas_from_env() -> tuple[bool, str, bool]:
    """`(enabled, lowering, interpret)` from the environment variable `JQTZ_PALLAS`."""
    value = os.environ.get("JQTZ_PALLAS", "1").strip().lower()
    if value in ("mosaic", "triton"):
        return True, value, False
    if value == "interpret":
        return True, "auto", True
    if value not in ("0", "1", "off", "on", "false", "true"):
        raise ValueError(
            f"environment variable JQTZ_PALLAS={value!r}: expected 0 (Pallas kernels off), 1 "
            "(on, the default: each kernel's faster lowering), triton or mosaic (on, that "
            "lowering wherever a kernel has it) or interpret (on, chosen as on an H100 and run "
            "in the Pallas interpreter on any machine); also accepted: off/on, false/true"
        )
    return value in ("1", "on", "true"), "auto", False


@dataclasses.dataclass(frozen=True)
class _PallasSetting:
    enabled: bool
    lowering: str = "auto"
    interpret: bool = False


#: The Pallas kernels' setting (`use_pallas_kernels`; `JQTZ_PALLAS`), innermost block last.
_PALLAS = [_PallasSetting(*_pallas_from_env())]

#: The device the kernels are chosen for under `use_pallas_kernels(interpret=True)`.
_INTERPRET_TARGET = ("gpu", (9, 0))


def pallas_kernels_enabled() -> bool:
    """Whether jqtz may use its Pallas GPU kernels (matrix products, decode attention)."""
    return _PALLAS[-1].enabled


def pallas_lowering() -> str:
    """The Pallas GPU lowering jqtz's kernels prefer: ``"auto"`` (the default: each kernel's
    faster one), ``"triton"`` or ``"mosaic"`` (see :func:`use_pallas_kernels`)."""
    return _PALLAS[-1].lowering


def kernel_target(backend=None, compute_capability=None) -> tuple[str, tuple | None, bool]:
    """`(backend, compute_capability, interpret)` that the kernels are chosen and run for: the
    arguments, defaulting to this machine's; under `use_pallas_kernels(interpret=True)`, an
    H100 (compute capability 9.0) whose kernels run in the Pallas interpreter."""
    if _PALLAS[-1].interpret:
        return backend or _INTERPRET_TARGET[0], compute_capability or _INTERPRET_TARGET[1], True
    return backend or jax.default_backend(), compute_capability, False


@contextlib.contextmanager
def use_pallas_kernels(enabled: bool = True, *, lowering: str = "auto", interpret: bool = False):
    """Turn jqtz's Pallas GPU kernels on or off inside the block (they are on by default;
    `JQTZ_PALLAS=0` in the environment turns them off for the whole process; `mosaic` and
    `interpret` there set the options below).

    With kernels off, every product and attention takes the XLA path: to compare the two, or
    to rule a kernel out when something looks wrong. The choice is made when a function is
    traced, so entering and leaving the block clears JAX's caches of traced and compiled
    functions (`jax.clear_caches()`): jitted functions are traced again for the new setting.

    `lowering` picks between a kernel's two Pallas lowerings on a Hopper GPU (docs/kernels.md):
    - `"auto"` (the default): the one measured faster on an H100 (docs/benchmarks.md): Mosaic
      GPU for W8A8 products from `pallas_kernels.w8a8.K_MAJOR_ROWS` rows (per-channel or
      per-tensor scales), Pallas Triton (deprecated in jax 0.11) for everything else;
    - `"mosaic"` (or `JQTZ_PALLAS=mosaic`): Mosaic GPU wherever a kernel has it for the
      operands: W8A8 as above and with 1x128 block scales (from 128 rows), W4A16 products
      with more than 16 rows, or up to 16 on 4-bit codes stored K-major (`serving_layout`'s
      `k_major_4bit`), and decode attention over int8/fp8 caches with one scale per token;
    - `"triton"` (or `JQTZ_PALLAS=triton`): Pallas Triton everywhere.

    `interpret=True` chooses the kernels as on an H100 and runs them in the Pallas interpreter
    on any machine, a CPU included: to check a model's kernel path where no GPU is. It is slow
    and says nothing about speed.

    Example:
      >>> import jax.numpy as jnp, jqtz
      >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=128)
      >>> w = jqtz.quantize(jnp.ones((256, 128)), spec)
      >>> x = jnp.ones((1, 256), jnp.bfloat16)
      >>> with jqtz.nn.use_pallas_kernels(False):
      ...     jqtz.nn.matmul_path(x, w, backend="gpu", compute_capability=(9, 0))
      'xla'
      >>> jqtz.nn.matmul_path(x, w, backend="gpu", compute_capability=(9, 0))
      'w4a16'
      >>> with jqtz.nn.use_pallas_kernels(lowering="mosaic"):  # 64 rows: a prefill chunk
      ...     jqtz.nn.matmul_path(jnp.ones((64, 256), jnp.bfloat16), w, backend="gpu",
      ...                         compute_capability=(9, 0))
      'w4a16-mosaic'
      >>> with jqtz.nn.use_pallas_kernels(interpret=True):  # on this CPU, in the interpreter
      ...     y = jqtz.nn.dot_general(x, w, (((1,), (0,)), ((), ())))
      ...     jqtz.nn.matmul_path(x, w), y.shape
      ('w4a16', (1, 128))
    """
    if lowering not in _LOWERINGS:
        raise ValueError(f"`lowering` must be one of {_LOWERINGS}, got {lowering!r}")
    jax.clear_caches()
    _PALLAS.append(_PallasSetting(bool(enabled), lowering, bool(interpret)))
    try:
        yield
    finally:
        _PALLAS.pop()
        jax.clear_caches()


def serving_layout(tree, *, k_major_4bit: bool = False):
    """`tree` with the codes of its W8A8 weights stored `[N, K]` (`QArray.with_transposed_codes`),
    the layout NVIDIA's 8-bit tensor-core products read: call it once after loading or
    quantizing, before serving.

    The W8A8 kernels (`pallas_kernels.w8a8`) then read the codes in place at every M, where a
    `[K, N]` weight is transposed on every call from `pallas_kernels.w8a8.K_MAJOR_ROWS` rows
    (twice the weight's bytes moved per call). Results are the same on every path, XLA's
    included; `jqtz.io.save_quantized` stores the logical layout. Other leaves are returned as
    they are.

    W8A8 weights here: 2-D `QArray`s of 8-bit codes with quantized activations (`act`).

    Args:
      tree: a parameter tree with `QArray` leaves.
      k_major_4bit: also store 2-D weight-only int4/uint4 weights K-major (packed along K, read
        by `pallas_kernels.w4a16_kmajor`). Off by default until an H100 run shows it faster
        than the `[K, N]` kernel (`python -m pallas_kernels.bench --only w4a16`, the
        `k-major us` column).

    Example:
      >>> import jax.numpy as jnp, jqtz
      >>> act = jqtz.QuantSpec(format="int8", granularity="channel", axis=-1)
      >>> q = jqtz.quantize(jnp.ones((64, 32)), jqtz.QuantSpec(format="int8", activation=act))
      >>> served = jqtz.nn.serving_layout({"dense": {"kernel": q}})
      >>> served["dense"]["kernel"].qvalue.shape
      (32, 64)
    """

    def convert(leaf):
        if not isinstance(leaf, QArray) or leaf.ndim != 2:
            return leaf
        w8a8 = leaf.act is not None and not leaf.format.packed
        w4 = (
            k_major_4bit
            and leaf.act is None
            and isinstance(leaf.format, formats.IntFormat)
            and leaf.format.bits == 4
        )
        return leaf.with_transposed_codes() if w8a8 or w4 else leaf

    return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, QArray))


def matmul_path(x, w, *, backend=None, compute_capability=None) -> str:
    """Which path `dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))` takes: the name of the
    Pallas kernel (`"w4a16"`, `"w8a8"`; `"w4a16-mosaic"`, `"w8a8-mosaic"` for their Mosaic GPU
    versions: `use_pallas_kernels`) or `"xla"`. For an LLM.int8() weight, the kernel of its
    inlier features with `"+outliers"` (the outlier features' product runs in XLA), e.g.
    `"w8a8+outliers"`. `backend` and `compute_capability` default to the current device's
    (pass them to ask about a GPU from a CPU machine)."""
    backend, compute_capability, _ = kernel_target(backend, compute_capability)
    if backend != "gpu" or not pallas_kernels_enabled() or not isinstance(w, QArray):
        return "xla"
    from pallas_kernels import dispatch  # imported only where a kernel can run

    llm_int8 = w.act is not None and w.act.outlier_threshold is not None
    name = dispatch.kernel_for(
        x,
        _without_outliers(w) if llm_int8 else w,
        backend=backend,
        compute_capability=compute_capability,
        lowering=pallas_lowering(),
    )
    return "xla" if name is None else name + ("+outliers" if llm_int8 else "")


def _kernel_matmul(x, w: QArray):
    """The Pallas kernel's product where `pallas_kernels.dispatch` has one for this backend,
    shape and format (`matmul_path`); None elsewhere (always on CPU unless interpreting), and
    the XLA path runs."""
    backend, compute_capability, interpret = kernel_target()
    if backend != "gpu" or not pallas_kernels_enabled():
        return None
    from pallas_kernels import dispatch  # imported only where a kernel can run

    return dispatch.maybe_matmul(
        x,
        w,
        lowering=pallas_lowering(),
        interpret=interpret,
        backend=backend,
        compute_capability=compute_capability,
    )


def quantize_input(x, rhs: QArray) -> QArray:
    """`x` quantized as `rhs.act` says (dynamic, or with the static `rhs.act_scale`)."""
    spec = rhs.act
    block = spec.block_shape_for(x.shape)
    scale = zero = None
    if rhs.act_scale is not None:
        from jqtz import _blocks

        scale = rhs.act_scale
        if scale.size == 1:  # per tensor: calibrated on inputs of any rank, e.g. (1, 1, 1)
            scale = scale.reshape(())
        scale = jnp.broadcast_to(scale, _blocks.num_blocks(x.shape, block)).astype(spec.scale_dtype)
        if spec.storage_format.has_zero_point:
            raise NotImplementedError("static activation ranges with zero points")
    return quantize_unchecked(x, spec, block, scale, zero, np.dtype(jnp.float32))


def _xla_dot(lhs, rhs, dn, *args, **kwargs):
    """`jax.lax.dot_general` for the XLA path. On a CPU, a product of one row of bfloat16 or
    int8 operands gets a row of zeros beside it: XLA's CPU runtime (jax 0.11.2) multiplies a
    single row of those dtypes on a slow path (at 4096 x 4096 about 15x slower than two rows
    on a 2-core machine, 2026-11-23; float16 is slow either way, float32 fast either way)."""
    (lc, _), (lb, _) = dn
    single = all(d == 1 for i, d in enumerate(lhs.shape) if i not in lc)
    if (
        single
        and not lb
        and lhs.dtype in (jnp.bfloat16, jnp.int8)
        and jax.default_backend() == "cpu"
    ):
        pair = jnp.stack([lhs, jnp.zeros_like(lhs)])  # a new leading free axis
        dn2 = ((tuple(d + 1 for d in lc), dn[0][1]), dn[1])
        return jax.lax.dot_general(pair, rhs, dn2, *args, **kwargs)[0]
    return jax.lax.dot_general(lhs, rhs, dn, *args, **kwargs)


def _native_pair(a: formats.Format, w: formats.Format):
    """Accumulator dtype when the codes of `a` and `w` can be multiplied directly, else None."""
    int8 = formats.get("int8")
    if a == int8 and w == int8:
        return jnp.int32
    if isinstance(a, formats.FloatFormat) and isinstance(w, formats.FloatFormat):
        return jnp.float32
    return None


def _with_quantized_activations(lhs, rhs: QArray, dn, out_dtype, kwargs):
    if rhs.act.outlier_threshold is not None:
        return _llm_int8(lhs, rhs, dn, out_dtype, kwargs)
    return _quantized_product(lhs, rhs, dn, kwargs).astype(out_dtype)


def _quantized_product(lhs, rhs: QArray, dn, kwargs):
    """float32 product of `lhs` quantized as `rhs.act` says with the quantized `rhs`."""
    (lc, rc), (lb, rb) = dn
    qx = quantize_input(lhs, rhs)
    acc_dtype = _native_pair(qx.format, rhs.format)
    # Scales must be constant along the contraction, so they factor out of the sum.
    x_ok = all(qx.block_shape[d] == lhs.shape[d] for d in lc)
    w_ok = all(rhs.block_shape[d] == rhs.shape[d] for d in rc)
    unary = not isinstance(rhs.scale, QArray) and rhs.zero_point is None and rhs.perm is None
    if acc_dtype is None or lb or rb or not (x_ok and w_ok and unary) or rhs.batch_shape:
        return _xla_dot(
            qx.dequantize(jnp.float32),
            rhs.dequantize(jnp.float32),
            dn,
            preferred_element_type=jnp.float32,
            **kwargs,
        )
    if rhs.transposed:  # codes stored [N, K]: contract their other axis (2-D, no batch axes)
        dn = ((lc, tuple(1 - d for d in rc)), (lb, rb))
    acc = _xla_dot(qx.qvalue, rhs.qvalue, dn, preferred_element_type=acc_dtype, **kwargs)
    acc = acc.astype(jnp.float32)
    sx = jnp.squeeze(scales_per_index(qx), axis=lc)  # (lhs free dims)
    sw = jnp.squeeze(scales_per_index(rhs), axis=rc)  # (rhs free dims)
    return acc * sx.reshape(sx.shape + (1,) * sw.ndim) * sw


def scales_per_index(q: QArray, axes=None) -> jax.Array:
    """`q`'s scales (float32) with each of `axes` (default: all) either 1 (one block) or as
    long as `q` along it (blocks repeated, a last partial one cropped), so that they broadcast
    against a product: e.g. 128 x 128 weight blocks on a weight with a single block along K
    give one scale per output column, not one per block of 128 columns. Other axes keep one
    scale per block."""
    s = q.scale_values()
    axes = range(s.ndim) if axes is None else [a % s.ndim for a in axes]
    for axis in axes:
        blocks, size, block = s.shape[axis], q.shape[axis], q.block_shape[axis]
        if blocks not in (1, size):
            s = jnp.repeat(s, block, axis=axis, total_repeat_length=blocks * block)
            s = jax.lax.slice_in_dim(s, 0, size, axis=axis)
    return s


def _llm_int8(lhs, rhs: QArray, dn, out_dtype, kwargs):
    """LLM.int8(): outlier input features in floating point, the rest quantized; summed.

    A feature (an index along the contraction axes) is an outlier when any |x| over the other
    axes of this call exceeds `rhs.act.outlier_threshold`. Shapes stay static: the quantized
    part runs over all features with the outliers' columns zeroed (a mask, not a gather), so
    its per-token scales see the inlier features only.

    For a flax `Dense` product (`x [..., K] @ W [K, N]`) the quantized part takes the W8A8
    kernel where one applies (`_kernel_matmul`), and the floating-point part multiplies the
    outlier features by their own rows of W, dequantized alone (`take_rows`), up to
    `_outlier_capacity(K)` of them (LLM.int8()'s systematic outliers are a handful of
    features); a call with more runs the masked product over the whole dequantized weight
    instead (`lax.cond`: same result).
    """
    (lc, _), _ = dn
    outlier = _outlier_features(lhs, lc, rhs.act.outlier_threshold)
    zero = jnp.zeros((), lhs.dtype)
    inliers = jnp.where(outlier, zero, lhs)

    def masked_outliers():
        return _xla_dot(
            jnp.where(outlier, lhs, zero),
            rhs.dequantize(lhs.dtype),
            dn,
            preferred_element_type=jnp.float32,
            **kwargs,
        )

    if not (_is_dense(lhs, rhs, dn) and rhs.perm is None):
        y = _quantized_product(inliers, rhs, dn, kwargs) + masked_outliers()
        return y.astype(out_dtype)
    y = _kernel_matmul(inliers, _without_outliers(rhs))
    y = _quantized_product(inliers, rhs, dn, kwargs) if y is None else y.astype(jnp.float32)
    flags = outlier.reshape(-1).astype(jnp.int32)  # [K]
    found, idx = jax.lax.top_k(flags, _outlier_capacity(flags.shape[0]))  # outliers first

    def gathered_outliers():
        # In float32: the weight's rows rounded to `lhs.dtype` as the masked product does; a
        # few rows, and XLA's CPU runtime has no bf16 x bf16 -> f32 dot outside its fusions.
        x_o = jnp.where(found > 0, jnp.take(lhs, idx, axis=-1), zero).astype(jnp.float32)
        rows = take_rows(rhs, idx, lhs.dtype).astype(jnp.float32)
        return jnp.dot(x_o, rows, precision=jax.lax.Precision.HIGHEST)

    many = jnp.sum(flags) > idx.shape[0]
    return (y + jax.lax.cond(many, masked_outliers, gathered_outliers)).astype(out_dtype)


def _without_outliers(rhs: QArray) -> QArray:
    """An LLM.int8() weight as plain W8A8 (the product its inlier features take)."""
    return dataclasses.replace(rhs, act=dataclasses.replace(rhs.act, outlier_threshold=None))


def _outlier_capacity(k: int) -> int:
    """Outlier features an LLM.int8() product over `k` features gathers (more take the masked
    product): 1/64 of them, at least 16 (64 for K = 4096; models of 6.7B parameters and more
    have about 7 systematic outlier features, Dettmers et al. 2022)."""
    return min(k, max(16, k // 64))


def _is_dense(lhs, rhs, dn) -> bool:
    """Whether `dn` is a flax `Dense` product: `lhs`'s last axis with axis 0 of a 2-D `rhs`."""
    return dn == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2 and not rhs.batch_shape


def _outlier_features(lhs, contracting, threshold):
    """Mask of LLM.int8() outlier features: |x| above `threshold` anywhere along the axes of
    `lhs` that are not contracted (broadcasts against `lhs`)."""
    others = tuple(d for d in range(lhs.ndim) if d not in contracting)
    return jnp.max(jnp.abs(lhs), axis=others, keepdims=True) > threshold


def fake_quantized_input(lhs, rhs: QArray, contracting) -> jax.Array:
    """`lhs` as a product with `rhs` sees it: quantized as `rhs.act` says and dequantized, with
    LLM.int8()'s outlier features (`rhs.act.outlier_threshold`; features are indices along the
    `contracting` axes of `lhs`) kept in floating point. For products that cannot run on the
    codes (`nn.Einsum`); same numerics as `dot_general` up to summation order.
    """
    threshold = rhs.act.outlier_threshold
    if threshold is None:
        return quantize_input(lhs, rhs).dequantize(lhs.dtype)
    outlier = _outlier_features(lhs, tuple(contracting), threshold)
    zero = jnp.zeros((), lhs.dtype)
    inliers = quantize_input(jnp.where(outlier, zero, lhs), rhs).dequantize(lhs.dtype)
    return jnp.where(outlier, lhs, inliers)


def promote_dtype(args, /, *, dtype=None, inexact=True):
    """flax's `promote_dtype` that keeps `QArray`s quantized (for the NNX seam): they are
    re-typed (`QArray.astype`, metadata only), so products return the compute dtype as
    flax's do."""
    dtypes = [x.dtype for x in args if x is not None]
    if dtype is None:
        dtype = jnp.result_type(*dtypes)
        if inexact and not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)

    def promote(x):
        if x is None:
            return None
        return x.astype(dtype) if isinstance(x, QArray) else jnp.asarray(x, dtype)

    return tuple(promote(x) for x in args)


def take_rows(table: QArray, ids: jax.Array, dtype=None) -> jax.Array:
    """`table[ids]` for a quantized `[rows, features]` table, dequantizing only those rows."""
    if table.ndim != 2 or table.batch_shape or table.perm is not None:
        return jnp.take(table.dequantize(dtype), ids, axis=0)
    flat = ids.reshape(-1)
    # A table stored transposed (`serving_layout`) gives the rows' codes from their bytes alone.
    codes = table._transposed_rows(flat) if table.transposed else table.qvalue[flat]
    srow = flat // table.block_shape[0]
    scale = table.scale_values()[srow]
    zp = None if table.zero_point is None else table.zero_point[srow]
    rows = QArray(
        codes,
        scale,
        zp,
        table.format,
        (flat.shape[0], table.shape[1]),
        (1, table.block_shape[1]),
        table.dtype,
    )
    return rows.dequantize(dtype).reshape(*ids.shape, table.shape[1])

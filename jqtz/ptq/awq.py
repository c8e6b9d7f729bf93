"""AWQ (activation-aware weight quantization) as pure array functions.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"; the semantics follow mit-han-lab/llm-awq and AutoAWQ (`quantizer.py`).

Weights are flax kernels `[in, out]`; an AWQ scale `s` is one value per *input* channel. The
linears fed by one input (q, k, v; gate, up) are scaled together, `W -> W * s[:, None]`, and the
scale is folded into whatever produces that input (a norm, or the previous linear's output
columns), so the full-precision function is unchanged while the quantizer sees rows of salient
inputs magnified.

- `search_scales`: the grid search over the ratio `r`, scored on a whole block's output.
- `search_clip`: per-group clipping of the weight range, scored on each group's output.
- `fold_into_norm`, `fold_into_linear`, `scale_weights`, `apply_clip`: applying the results.
- `weight_mean`, `candidate_scales`: the pieces of the scale formula, for runners and tests.

The calibration runner (which walks the model block by block, by parameter path) calls these;
nothing here knows about Flax trees. As in the reference code, clipping is usually skipped for
q and k (their error passes through the q k^T product, which a per-layer score does not see).

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> from jqtz.ptq import awq
  >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=32, symmetric=False)
  >>> x = jax.random.normal(jax.random.key(0), (64, 32)) * jnp.linspace(0.1, 4.0, 32)
  >>> w = jax.random.normal(jax.random.key(1), (32, 16))
  >>> found = awq.search_scales(x, [w], lambda ws: x @ ws[0], spec, n_grid=4)
  >>> found.scales.shape, found.losses.shape
  ((32,), (4,))
  >>> clip = awq.search_clip(awq.scale_weights(w, found.scales), x / found.scales, spec)
  >>> clip.max_val.shape, clip.weight.shape  # one clip value per group and output channel
  ((1, 16), (32, 16))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jqtz import _blocks
from jqtz.quantize import quantize
from jqtz.spec import QuantSpec

BlockOutput = Callable[..., jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleSearch:
    """The result of `search_scales`.

    Attributes:
      scales: float32 `[in]`, the best per-input-channel scale `s` (weights are multiplied by
        it, the producer of the input divided by it).
      ratio: float32 scalar, the best `r` in `{0, 1/n_grid, ..., (n_grid-1)/n_grid}`.
      losses: float32 `[n_grid]`, the block-output MSE of every candidate `r`, in grid order.
    """

    scales: jax.Array
    ratio: jax.Array
    losses: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClipSearch:
    """The result of `search_clip`.

    Attributes:
      max_val: float32 `[n_groups, out]`, the clip value of every quantization group (the
        weight is clamped to `[-max_val, max_val]` in each group).
      weight: `apply_clip(w, max_val, spec)`, `[in, out]` in the dtype of `w`.
    """

    max_val: jax.Array
    weight: jax.Array


def _fake_quant(w: jax.Array, spec: QuantSpec) -> jax.Array:
    return quantize(w, spec).dequantize()


def _check_kernel_spec(spec: QuantSpec, name: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"`spec` must be a QuantSpec, got {type(spec).__name__}")
    axes = spec.axis if isinstance(spec.axis, tuple) else (spec.axis,)
    if spec.granularity != "tensor" and tuple(a % 2 for a in axes) != (0,):
        raise ValueError(
            f"`spec.axis`={spec.axis}: {name} works on flax kernels [in, out] contracted over "
            "axis 0; use a spec with axis=0"
        )


def _check_kernel(w, name: str, n_in: int | None = None) -> jax.Array:
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D kernel [in, out], got shape {tuple(w.shape)}")
    if n_in is not None and w.shape[0] != n_in:
        raise ValueError(
            f"`{name}` has {w.shape[0]} input rows but the input `x` has {n_in} channels; "
            "every kernel must be [in, out] with the same `in` as x's last axis"
        )
    return w


def _per_element(per_block: jax.Array, shape: tuple[int, ...], block: tuple[int, ...]):
    """Broadcast per-block values `num_blocks(shape, block)` to every element of `shape`."""
    n = _blocks.num_blocks(shape, block)
    blocked = tuple(d for ni, bi in zip(n, block, strict=True) for d in (ni, bi))
    return _blocks.from_blocks(
        jnp.broadcast_to(_blocks.expand(per_block, len(shape)), blocked), shape
    )


def weight_mean(weights: Sequence[jax.Array], spec: QuantSpec) -> jax.Array:
    """AWQ's weight statistic: per input channel, the mean of |W| normalised by its block max.

    Args:
      weights: kernels `[in, out_k]` sharing one input; they are concatenated along `out`.
      spec: the weight quantizer; its blocks (groups along `in`) set the normalisation.

    Returns:
      float32 `[in]`: `mean_j |W[i, j]| / (max of |W| over the block holding (i, j) + 1e-6)`.

    Example:
      >>> import jax.numpy as jnp, jqtz
      >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=2)
      >>> weight_mean([jnp.array([[1.0, -2.0], [0.5, 4.0]])], spec).round(4)
      Array([0.75, 0.75], dtype=float32)
    """
    w = jnp.abs(jnp.concatenate([jnp.asarray(wk, jnp.float32) for wk in weights], axis=1))
    block = spec.block_shape_for(w.shape)
    wb = _blocks.to_blocks(w, block)  # NaN-padded where the last group is short
    bmax = jnp.nanmax(wb, axis=_blocks.block_axes(wb.ndim, 2), keepdims=True)
    return jnp.mean(_blocks.from_blocks(wb / (bmax + 1e-6), w.shape), axis=1)


def candidate_scales(
    x_mean: jax.Array, w_mean: jax.Array, ratio: jax.Array, *, duo_scaling: bool = True
) -> jax.Array:
    """The AWQ scale of one grid point `ratio`, normalised to a geometric mean range of 1.

    `s = x_mean^r / (w_mean^(1-r) + 1e-4)` (`duo_scaling`) or `s = x_mean^r`, then
    `s = max(s, 1e-4)` and `s /= sqrt(max(s) * min(s))`.

    Args:
      x_mean: float32 `[in]`, mean |x| per input channel.
      w_mean: float32 `[in]`, from `weight_mean` (unused without `duo_scaling`).
      ratio: a scalar in [0, 1).
      duo_scaling: AutoAWQ's default; llm-awq uses `x_mean^r` alone.

    Returns:
      float32 `[in]`.

    Example:
      >>> import jax.numpy as jnp
      >>> candidate_scales(jnp.array([1.0, 4.0]), jnp.ones(2), 0.5, duo_scaling=False)
      Array([0.70710677, 1.4142135 ], dtype=float32)
    """
    s = x_mean**ratio
    if duo_scaling:
        s = s / (w_mean ** (1.0 - ratio) + 1e-4)
    s = jnp.maximum(s, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def search_scales(
    x: jax.Array,
    weights: Sequence[jax.Array],
    block_output: BlockOutput,
    spec: QuantSpec,
    *,
    fp_output: jax.Array | None = None,
    n_grid: int = 20,
    duo_scaling: bool = True,
    grid_chunk: int | None = 4,
    operands=(),
) -> ScaleSearch:
    """Grid-search AWQ's per-input-channel scale for the linears that share the input `x`.

    For each `r` in `{0, 1/n_grid, ..., (n_grid-1)/n_grid}`: `s = candidate_scales(x_mean,
    w_mean, r)`, every kernel becomes `W' = Q(W * s[:, None]) / s[:, None]`, and the candidate
    scores `mean((block_output(W') - fp_output)^2)`. The least loss wins (the first on ties).
    The grid is evaluated with `jax.lax.map(..., batch_size=grid_chunk)`: `grid_chunk`
    candidates at once under `vmap`, one trace for the whole grid.

    Args:
      x: `[n_tokens, in]` (or `[..., in]`), the input the kernels share, for the statistic
        `x_mean = mean |x|` per channel; or that statistic itself, `[in]` (a single row is its
        own mean |x|), when a runner accumulates it over batches.
      weights: kernels `[in, out_k]` fed by `x` (q, k, v; gate, up; or one kernel).
      block_output: a pure, traceable function `(scaled_weights, *operands) -> array`.
        `scaled_weights` is a list like `weights` holding `Q(W * s) / s` (already divided by
        `s`, in each kernel's dtype). It returns the output the search scores: the whole
        attention or MLP block computed on the calibration input, with these kernels in place
        of the originals (the block's other weights unquantized). The grid is one jitted
        program, compiled once per `block_output` (by identity) and shapes: pass the block's
        parameters and inputs as `operands` rather than closing over them, and reuse the same
        function for every block, so that a model's blocks share one compilation. It runs
        under `vmap`, so it must not convert arrays to Python values.
      fp_output: the full-precision block output; None: `block_output(weights, *operands)`.
      spec: the weight quantizer (AWQ: int4, group 128, asymmetric), contraction axis 0.
      n_grid: grid points.
      duo_scaling: divide by `w_mean^(1-r)` as AutoAWQ does (see `candidate_scales`).
      operands: arrays (a pytree) passed on to `block_output`.
      grid_chunk: candidates evaluated together; None: all at once. Peak memory is about
        `grid_chunk` forward passes of the block (for a 7B MLP on 64k tokens, ~9 GB each in
        float32); on a large block 1 loses little, as its matrix products fill the device.

    Returns:
      A `ScaleSearch` with the best scales `[in]`, the best ratio and the losses `[n_grid]`.

    Raises:
      ValueError: shapes that do not fit (naming the argument), a bad `n_grid`/`grid_chunk`,
        or a spec whose contraction axis is not 0.
    """
    _check_kernel_spec(spec, "search_scales")
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"`n_grid` must be a positive int, got {n_grid!r}")
    if grid_chunk is not None and (not isinstance(grid_chunk, int) or grid_chunk < 1):
        raise ValueError(f"`grid_chunk` must be a positive int or None, got {grid_chunk!r}")
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("`x` must be an array [..., in], got a scalar")
    n_in = x.shape[-1]
    weights = list(weights)
    if not weights:
        raise ValueError("`weights` is empty; pass the kernels [in, out] that share `x`")
    weights = [_check_kernel(w, f"weights[{i}]", n_in) for i, w in enumerate(weights)]

    x_mean = jnp.mean(jnp.abs(x.reshape(-1, n_in).astype(jnp.float32)), axis=0)
    w_mean = weight_mean(weights, spec)
    operands = tuple(operands)
    if fp_output is None:
        fp_output = block_output(weights, *operands)
    reference = jnp.asarray(fp_output, jnp.float32)
    out = jax.eval_shape(block_output, weights, *operands)
    if out.shape != reference.shape:
        raise ValueError(
            f"`block_output` returned shape {out.shape} for candidate weights but "
            f"`fp_output` has shape {reference.shape}; they must match"
        )
    losses = _grid_losses(
        block_output, spec, n_grid, duo_scaling, grid_chunk or n_grid,
        x_mean, w_mean, weights, reference, operands,
    )  # fmt: skip
    ratios = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    best = jnp.argmin(jnp.where(jnp.isnan(losses), jnp.inf, losses))
    ratio = ratios[best]
    scales = candidate_scales(x_mean, w_mean, ratio, duo_scaling=duo_scaling)
    return ScaleSearch(scales=scales, ratio=ratio, losses=losses)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _grid_losses(
    block_output, spec, n_grid, duo_scaling, chunk, x_mean, w_mean, weights, reference, operands
):
    """The block-output MSE of every grid point, `chunk` candidates at a time (one program)."""

    def loss_of(ratio):
        s = candidate_scales(x_mean, w_mean, ratio, duo_scaling=duo_scaling)
        col = s[:, None]
        scaled = [
            (_fake_quant(w.astype(jnp.float32) * col, spec) / col).astype(w.dtype) for w in weights
        ]
        out = jnp.asarray(block_output(scaled, *operands), jnp.float32)
        return jnp.mean((out - reference) ** 2)

    ratios = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    return jax.lax.map(loss_of, ratios, batch_size=chunk)


def apply_clip(w: jax.Array, max_val: jax.Array, spec: QuantSpec) -> jax.Array:
    """Clamp every block of `w` to `[-max_val, max_val]` of that block.

    Args:
      w: a kernel `[in, out]`.
      max_val: per-block clip values, shape `num_blocks(w.shape, spec.block_shape_for(w.shape))`
        (`[n_groups, out]` for group-wise specs).
      spec: the quantizer whose blocks `max_val` refers to.

    Returns:
      The clamped kernel, same shape and dtype as `w`.

    Example:
      >>> import jax.numpy as jnp, jqtz
      >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=2)
      >>> apply_clip(jnp.array([[3.0], [-1.0]]), jnp.array([[2.0]]), spec)
      Array([[ 2.],
             [-1.]], dtype=float32)
    """
    w = jnp.asarray(w)
    block = spec.block_shape_for(w.shape)
    want = _blocks.num_blocks(w.shape, block)
    if tuple(max_val.shape) != want:
        raise ValueError(
            f"`max_val` has shape {tuple(max_val.shape)}; for a kernel {tuple(w.shape)} and "
            f"blocks {block} it must be {want}"
        )
    bound = _per_element(jnp.asarray(max_val, jnp.float32), w.shape, block)
    return jnp.clip(w.astype(jnp.float32), -bound, bound).astype(w.dtype)


def search_clip(
    w: jax.Array,
    x: jax.Array,
    spec: QuantSpec,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int | None = 512,
    seed: int = 0,
    oc_chunk: int = 256,
) -> ClipSearch:
    """Search, per quantization group, the clip value that least disturbs the group's output.

    For group `g` (input rows) and output channel `c`, with `m = max |w_gc|`, the candidates are
    `m * (1 - i / n_grid)` for `i < max(int(n_grid * max_shrink), 1)`; each scores
    `mean_t (x_tg . (w_gc - Q(clip(w, m_i))_gc))^2` on sampled tokens and the least wins (the
    first on ties, so `i = 0`, no clipping, is kept unless a clip is strictly better). As in
    llm-awq, the clamp is symmetric `[-m_i, m_i]` whatever the quantizer.

    Output channels are processed `oc_chunk` at a time (under `jax.lax.map`) to bound memory;
    the candidates of one chunk are evaluated together, `O(n_grid * max_shrink * tokens *
    n_groups * oc_chunk)` floats.

    Args:
      w: kernel `[in, out]` (already AWQ-scaled, if scales were applied).
      x: its input `[n_tokens, in]` (or `[..., in]`; already divided by the AWQ scales).
      spec: the weight quantizer; `"group"` or `"channel"` granularity over axis 0.
      n_grid: grid resolution.
      max_shrink: the largest fraction of the range removed, in [0, 1).
      n_sample_tokens: tokens drawn at random (without replacement) to score on; None: all.
      seed: the sampling seed.
      oc_chunk: output channels per chunk.

    Returns:
      A `ClipSearch`: `max_val` `[n_groups, out]` and the clipped kernel.

    Raises:
      ValueError: bad shapes or arguments, naming them.
      NotImplementedError: a granularity other than per group/channel along axis 0.
    """
    _check_kernel_spec(spec, "search_clip")
    if spec.granularity not in ("group", "channel"):
        raise NotImplementedError(
            f"search_clip with granularity={spec.granularity!r}; it clips per group or per "
            "output channel along axis 0 ('group' or 'channel')"
        )
    x = jnp.asarray(x)
    w = _check_kernel(w, "w", x.shape[-1] if x.ndim else None)
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"`n_grid` must be a positive int, got {n_grid!r}")
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"`max_shrink` must be in [0, 1), got {max_shrink}")
    if not isinstance(oc_chunk, int) or oc_chunk < 1:
        raise ValueError(f"`oc_chunk` must be a positive int, got {oc_chunk!r}")
    if n_sample_tokens is not None and n_sample_tokens < 1:
        raise ValueError(f"`n_sample_tokens` must be positive or None, got {n_sample_tokens}")

    xs = x.reshape(-1, w.shape[0]).astype(jnp.float32)
    if n_sample_tokens is not None and xs.shape[0] > n_sample_tokens:
        pick = jax.random.choice(
            jax.random.key(seed), xs.shape[0], (n_sample_tokens,), replace=False
        )
        xs = xs[jnp.sort(pick)]
    n_cand = max(int(n_grid * max_shrink), 1)
    max_val = _clip_search(w, xs, spec, n_grid, n_cand, min(oc_chunk, w.shape[1]))
    return ClipSearch(max_val=max_val, weight=apply_clip(w, max_val, spec))


# Module-level and jitted so that a runner clipping every layer of every block compiles once
# per kernel shape.
@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _clip_search(w, xs, spec, n_grid, n_cand, chunk):
    """`max_val` `[n_groups, out]` for kernel `w` `[in, out]` scored on tokens `xs` `[T, in]`."""
    n_in, n_out = w.shape
    gs = spec.block_shape_for(w.shape)[0]
    n_groups = -(-n_in // gs)
    pad_in = n_groups * gs - n_in
    xg = jnp.pad(xs, ((0, 0), (0, pad_in))).reshape(xs.shape[0], n_groups, gs)  # (T, G, gs)
    shrink = 1.0 - jnp.arange(n_cand, dtype=jnp.float32) / n_grid

    n_chunks = -(-n_out // chunk)
    wf = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, n_chunks * chunk - n_out)))
    w_chunks = wf.reshape(n_in, n_chunks, chunk).transpose(1, 0, 2)  # (n_chunks, in, chunk)
    chunk_block = spec.block_shape_for((n_in, chunk))

    def group_error(wc, wq):  # (in, chunk) x2 -> (G, chunk)
        dw = jnp.pad(wc - wq, ((0, pad_in), (0, 0))).reshape(n_groups, gs, chunk)
        return jnp.mean(jnp.einsum("tgk,gkc->tgc", xg, dw) ** 2, axis=0)

    def best_clip(wc):  # (in, chunk) -> (G, chunk)
        wb = _blocks.to_blocks(jnp.abs(wc), chunk_block)
        org_max = jnp.nanmax(wb, axis=_blocks.block_axes(wb.ndim, 2))  # (G, chunk)

        def candidate(p):
            mv = org_max * p
            bound = _per_element(mv, wc.shape, chunk_block)
            wq = _fake_quant(jnp.clip(wc, -bound, bound), spec)
            return group_error(wc, wq), mv

        errs, mvs = jax.vmap(candidate)(shrink)  # (n_cand, G, chunk) each
        best = jnp.argmin(jnp.where(jnp.isnan(errs), jnp.inf, errs), axis=0)
        return jnp.take_along_axis(mvs, best[None], axis=0)[0]

    max_val = jax.lax.map(best_clip, w_chunks)  # (n_chunks, G, chunk)
    return max_val.transpose(1, 0, 2).reshape(n_groups, n_chunks * chunk)[:, :n_out]


def scale_weights(w: jax.Array, s: jax.Array) -> jax.Array:
    """`w * s[:, None]`: scale the input rows of a kernel `[in, out]` by `s` `[in]`.

    Example:
      >>> import jax.numpy as jnp
      >>> scale_weights(jnp.ones((2, 3)), jnp.array([2.0, 0.5]))[:, 0]
      Array([2. , 0.5], dtype=float32)
    """
    w = jnp.asarray(w)
    _check_scale(s, w.shape[0], "w", "input rows")
    return (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)


def fold_into_norm(
    norm_scale: jax.Array, norm_bias: jax.Array | None, s: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Divide a norm's affine parameters by `s`, so the norm outputs `x / s`.

    Pair with `scale_weights(w, s)` on every kernel the norm feeds: `(x / s) @ (w * s) = x @ w`.

    Args:
      norm_scale: `[in]`, the RMSNorm/LayerNorm weight.
      norm_bias: `[in]` or None.
      s: `[in]`.

    Returns:
      `(norm_scale / s, norm_bias / s or None)`, in the parameters' dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> fold_into_norm(jnp.array([1.0, 1.0]), None, jnp.array([2.0, 4.0]))
      (Array([0.5 , 0.25], dtype=float32), None)
    """
    norm_scale = jnp.asarray(norm_scale)
    _check_scale(s, norm_scale.shape[-1], "norm_scale", "channels")
    scale = (norm_scale.astype(jnp.float32) / s).astype(norm_scale.dtype)
    if norm_bias is None:
        return scale, None
    norm_bias = jnp.asarray(norm_bias)
    _check_scale(s, norm_bias.shape[-1], "norm_bias", "channels")
    return scale, (norm_bias.astype(jnp.float32) / s).astype(norm_bias.dtype)


def fold_into_linear(
    prev_w: jax.Array, prev_b: jax.Array | None, s: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Divide the *output* columns (and bias) of the linear that produces the input by `s`.

    For the v -> o and up -> down mappings: `prev_w` `[in_prev, in]` computes the input of the
    kernels scaled by `scale_weights(w, s)`. Valid when what lies between the two linears is
    linear in each channel of the previous output: attention's probability-weighted sum of v,
    or `silu(gate) * up` for up.

    Args:
      prev_w: kernel `[in_prev, in]`.
      prev_b: bias `[in]` or None.
      s: `[in]`.

    Returns:
      `(prev_w / s[None, :], prev_b / s or None)`, in the parameters' dtypes.

    Raises:
      ValueError: `prev_w`'s output width is not `len(s)` (e.g. v -> o under grouped-query
        attention, which AWQ skips).

    Example:
      >>> import jax.numpy as jnp
      >>> fold_into_linear(jnp.ones((3, 2)), None, jnp.array([2.0, 4.0]))[0][0]
      Array([0.5 , 0.25], dtype=float32)
    """
    prev_w = _check_kernel(prev_w, "prev_w")
    _check_scale(s, prev_w.shape[1], "prev_w", "output columns")
    w = (prev_w.astype(jnp.float32) / s[None, :]).astype(prev_w.dtype)
    if prev_b is None:
        return w, None
    prev_b = jnp.asarray(prev_b)
    _check_scale(s, prev_b.shape[-1], "prev_b", "entries")
    return w, (prev_b.astype(jnp.float32) / s).astype(prev_b.dtype)


def _check_scale(s, n: int, name: str, what: str) -> None:
    if jnp.ndim(s) != 1 or jnp.shape(s)[0] != n:
        raise ValueError(
            f"`s` has shape {tuple(jnp.shape(s))} but `{name}` has {n} {what}; pass a 1-D "
            f"AWQ scale of length {n}"
        )


__all__ = [
    "ClipSearch",
    "ScaleSearch",
    "apply_clip",
    "candidate_scales",
    "fold_into_linear",
    "fold_into_norm",
    "scale_weights",
    "search_clip",
    "search_scales",
    "weight_mean",
]

"""GPTQ (Frantar et al. 2022) for one linear layer: a pure, jitted array function.

`gptq(w, hessian, spec)` quantizes a flax kernel `w` `[in, out]` (contraction axis 0) given the
layer's input Hessian `H = 2/n * sum_t x_t^T x_t` `[in, in]`, so as to keep the layer's output
`x @ w` close on the calibration inputs, not `w` itself. It follows IST-DASLab/gptq
(`gptq.py`, `quant.py`), with the rows of `w` playing the part of the reference's columns:

1. Dead inputs (`H[i, i] == 0`): `H[i, i] = 1` and row `i` of `w` is zeroed.
2. act-order: rows are processed by descending `diag(H)` (`w` and `H` permuted alike).
3. Damping `H += percdamp * mean(diag H) * I`; when the Cholesky factorisation fails (NaN in
   the factor) it is retried with `percdamp + damp_step`, `+ 2 damp_step`, ... (as GPTQModel
   does), at most `max_damp_tries` times in all, then a `ValueError`.
4. `U` = the upper Cholesky factor of `H^-1`. Row `i` is rounded to `q_i`, its error
   `e_i = (w_i - q_i) / U[i, i]` is spread over the rows not yet quantized,
   `w_j -= U[i, j] e_i` for `j > i`, lazily: within a block of `block_size` rows, and in one
   matrix product for the rest of the matrix once the block is done.
5. Group scales: by default computed when the loop reaches each group, from the error-updated
   rows (`static_groups=True`: from the original rows, up front). Scales and zero points come from
   `jqtz.ranges.choose_qparams`, so with `H = I` GPTQ reproduces `jqtz.quantize` bit for bit,
   `clipping="mse"` included, and a ragged last group is as short as in RTN.

Implementation notes (why it looks the way it does):

- `U` is computed as `J L^-1 J` with `L = chol(J H J)` and `J` the reversal: one Cholesky
  factorisation and one triangular solve, where the reference factors, inverts and factors
  again. It is the same unique factor, and `H^-1` is never formed.
- Lazy updates run on three levels (per row within a chunk of 32 rows, per chunk within a block
  of `block_size` rows, per block for the rest of the matrix) so that the per-row rank-1 updates
  touch a cache-sized slab only; the block-level update covers the shortest of 8 static tails
  that holds the rows still to come. All loops are `lax.fori_loop`s.
- With groups, the block is a whole number of groups, so a group never straddles two blocks
  and all its rows have received every earlier row's update when its scale is chosen. (The
  reference reads a group that starts inside a block from its stale full matrix; with the
  default 128/128 the two agree.)
- Per-channel scales are chosen from the original rows, as in the reference, but after the dead
  rows are zeroed (the reference chooses them before).
- Symmetric codes span `[-2^(b-1), 2^(b-1) - 1]` as in the reference: RTN never reaches the
  lowest code, GPTQ's updated weights may.
- `loss` is the reference's objective `sum (w - q)^2 / (2 U[i, i]^2)`, which equals
  `tr(D^T H_damped D) / 2` with `D = Q - W`; `output_error = tr(D^T H D)` follows from it for the
  cost of one subtraction (`= 2/n ||x W - x Q||_F^2` for `H = 2/n x^T x`).

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> from jqtz.ptq.gptq import gptq
  >>> x = jax.random.normal(jax.random.key(0), (512, 64))  # calibration inputs [n, in]
  >>> w = jax.random.normal(jax.random.key(1), (64, 32))  # flax kernel [in, out]
  >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=32)
  >>> res = gptq(w, 2.0 / 512 * x.T @ x, spec)
  >>> res.qarray
  QArray(int4, shape=(64, 32), g32, scale=float32, dtype=float32)
  >>> rtn = jqtz.quantize(w, spec).dequantize()
  >>> bool(jnp.linalg.norm(x @ (w - res.qarray.dequantize())) < jnp.linalg.norm(x @ (w - rtn)))
  True

References:
  Frantar, Ashkboos, Hoefler, Alistarh. GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers. ICLR 2023. https://arxiv.org/abs/2210.17323
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jqtz import _blocks
from jqtz.qarray import QArray
from jqtz.quantize import quantize_unchecked
from jqtz.ranges import choose_qparams
from jqtz.spec import QuantSpec

# Rows per innermost chunk: the rank-1 updates of one row touch `chunk x out` floats only.
_CHUNK = 32
# Tail lengths the lazy matrix-level update chooses from (more: fewer wasted flops, more code).
_TAILS = 8
_HIGHEST = lax.Precision.HIGHEST  # float32 products on GPUs too (no TF32), as the reference


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GPTQResult:
    """What `gptq` returns (a pytree: it can come out of `jax.jit`).

    Attributes:
      qarray: the quantized kernel; `qarray.dequantize()` is GPTQ's quantized weight, in the
        dtype of `w`. With act-order and dynamic groups it carries `perm` (see `g_idx`).
      loss: float32, the reference's objective `sum_i ||w_i - q_i||^2 / (2 U[i, i]^2)`
        (`= tr((Q - W)^T H_damped (Q - W)) / 2`), the number GPTQ prints as `error`.
      output_error: float32, `tr((Q - W)^T H (Q - W))` with the undamped Hessian: for
        `H = 2/n x^T x` this is `2/n ||x W - x Q||_F^2`, the layer's output error (with `Q` in
        float32, before `dequantize` casts it to the dtype of `w`).
      damp: float32, the damping fraction finally used (NaN under `jit` if every try failed).
      tries: int32, Cholesky factorisations attempted (1 unless damping had to be raised).
      dead: int32, inputs with `H[i, i] == 0` (their rows are quantized as zeros).
    """

    qarray: QArray
    loss: jax.Array
    output_error: jax.Array
    damp: jax.Array
    tries: jax.Array
    dead: jax.Array

    @property
    def g_idx(self) -> jax.Array:
        """int32 `[in]`: the scale group of each input row, in the logical row order.

        Groups are contiguous in processing order, so with act-order and dynamic groups
        `g_idx[perm[j]] = j // group_size` (AutoGPTQ's `g_idx`); otherwise `i // group_size`.
        """
        q = self.qarray
        rows = jnp.arange(q.shape[0], dtype=jnp.int32)
        if q.perm is not None:
            rows = jnp.argsort(q.perm).astype(jnp.int32)
        return rows // q.block_shape[0]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static layout of one run (hashable: a static argument of the jitted core)."""

    spec: QuantSpec
    block: tuple[int, int]  # the QArray's block shape
    dynamic: bool  # group scales chosen as the loop reaches each group
    act_order: bool
    rows: int  # block_size, rounded to whole groups
    chunk: int
    n_pad: int
    dtype: np.dtype


def gptq(
    w: jax.Array,
    hessian: jax.Array,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    damp_step: float = 0.01,
    max_damp_tries: int = 5,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQResult:
    """Quantize the kernel `w` with GPTQ against the input Hessian `hessian`.

    Args:
      w: float kernel `[in, out]` (flax `Dense` layout: the product sums over axis 0).
      hessian: `[in, in]` `2/n * sum x^T x` over the calibration inputs `x` of this layer
        (float32; a running average over batches is fine).
      spec: a `QuantSpec` with `granularity` `"channel"` or `"group"` over `axis=0`, or
        `"tensor"`; any format and symmetry `jqtz.quantize` takes (not `double_quant`).
      block_size: rows per lazy batch update (rounded to whole groups).
      percdamp: damping as a fraction of the mean diagonal of the Hessian.
      damp_step: how much the fraction grows after each failed Cholesky factorisation.
      max_damp_tries: factorisations to try before giving up.
      act_order: process inputs by descending `H[i, i]` (`desc_act`).
      static_groups: choose group scales from the original weights up front, not from the
        error-updated ones; with act-order the groups then stay contiguous in the original order
        and no permutation is stored.

    Returns:
      A `GPTQResult`.

    Raises:
      TypeError: `w` or `hessian` is not floating point, or `spec` is not a `QuantSpec`.
      ValueError: shapes that do not fit, non-finite values in `w` or `hessian`, bad options, or
        a Hessian that stays singular after `max_damp_tries` dampings.
      NotImplementedError: 2-D block granularity, double quantization, or groups over axis 1.

    Example:
      >>> import jax.numpy as jnp, jqtz
      >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=32)
      >>> w = jnp.linspace(-1.0, 1.0, 64 * 32).reshape(64, 32)
      >>> res = gptq(w, jnp.eye(64), spec)  # H = I: plain round-to-nearest
      >>> bool((res.qarray.dequantize() == jqtz.quantize(w, spec).dequantize()).all())
      True
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"`spec` must be a jqtz.QuantSpec, got {type(spec).__name__}")
    w = jnp.asarray(w)
    hessian = jnp.asarray(hessian)
    for name, a in (("w", w), ("hessian", hessian)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"`{name}` must be floating point, got dtype {a.dtype}")
    if w.ndim != 2:
        raise ValueError(f"`w` must be a 2-D kernel [in, out], got shape {w.shape}")
    n = w.shape[0]
    if hessian.shape != (n, n):
        raise ValueError(
            f"`hessian` must be [in, in] = ({n}, {n}) for `w` of shape {w.shape}, "
            f"got {hessian.shape}"
        )
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}")
    if not (percdamp >= 0 and damp_step >= 0):
        raise ValueError(
            f"`percdamp` and `damp_step` must be >= 0, got {percdamp!r} and {damp_step!r}"
        )
    if not isinstance(max_damp_tries, int) or max_damp_tries < 1:
        raise ValueError(f"`max_damp_tries` must be a positive int, got {max_damp_tries!r}")
    for name, a in (("w", w), ("hessian", hessian)):
        if not isinstance(a, jax.core.Tracer):
            bad = int(a.size - jnp.count_nonzero(jnp.isfinite(a)))
            if bad:
                raise ValueError(
                    f"`{name}` has {bad} non-finite values (NaN or Inf); GPTQ needs finite "
                    + ("weights" if name == "w" else "calibration statistics")
                )
    plan = _make_plan(w, spec, block_size, act_order, static_groups)
    res, ok = _run(
        w,
        hessian,
        jnp.float32(percdamp),
        jnp.float32(damp_step),
        jnp.int32(max_damp_tries),
        plan,
    )
    if not isinstance(ok, jax.core.Tracer) and not bool(ok):
        last = percdamp + (max_damp_tries - 1) * damp_step
        raise ValueError(
            f"`hessian` stays singular or indefinite: the Cholesky factorisation failed "
            f"{max_damp_tries} times, with damping {percdamp:g} up to {last:g} of its mean "
            "diagonal. Calibrate on more tokens (well more than the layer's "
            f"{n} inputs) or on more varied text, or raise `percdamp`/`damp_step`/"
            "`max_damp_tries`."
        )
    return res


def _make_plan(w, spec, block_size, act_order, static_groups) -> _Plan:
    n = w.shape[0]
    if spec.double_quant:
        raise NotImplementedError("GPTQ with `double_quant=True`; quantize the scales separately")
    if spec.granularity == "block":
        raise NotImplementedError(
            "GPTQ with granularity='block' (2-D tiles); use 'channel' or 'group' over axis 0"
        )
    block = spec.block_shape_for(w.shape, path="w")
    if spec.granularity in ("channel", "group") and spec._axes(2) != (0,):
        raise NotImplementedError(
            f"GPTQ quantizes along the contraction axis 0 of a [in, out] kernel; `spec.axis` "
            f"is {spec.axis!r}: use axis=0"
        )
    g = block[0]
    dynamic = spec.granularity == "group" and g < n and not static_groups
    if dynamic:
        rows = min(g * max(block_size // g, 1), -(-n // g) * g)
        chunk = math.gcd(g, _CHUNK)
    else:
        rows = min(block_size, -(-n // _CHUNK) * _CHUNK)
        chunk = math.gcd(rows, _CHUNK)
    n_pad = -(-n // rows) * rows
    return _Plan(
        spec=spec,
        block=block,
        dynamic=dynamic,
        act_order=bool(act_order),
        rows=rows,
        chunk=chunk,
        n_pad=n_pad,
        dtype=np.dtype(w.dtype),
    )


def _fake_quant(x, s, z, fmt):
    """Quantize-dequantize with the float32 operations of `quantize_unchecked`, `dequantize`."""
    scaled = x / s
    if z is not None:
        scaled = scaled + z
    v = fmt.decode(fmt.encode(scaled))
    if z is not None:
        v = v - z
    return v * s


def _factor(h, percdamp, damp_step, max_tries):
    """GPTQ's `Hinv`, raising the damping while the Cholesky factorisation fails.

    Returns:
      (u, fraction, mean_diag, tries, ok): `u` upper triangular with
      `u^T u = (h + fraction * mean_diag * I)^-1`.
    """
    n = h.shape[0]
    eye = jnp.eye(n, dtype=jnp.float32)
    mean_diag = jnp.mean(jnp.diagonal(h))
    flipped = h[::-1, ::-1]  # J H J, with J the reversal

    def attempt(k):
        frac = percdamp + k.astype(jnp.float32) * damp_step
        # J H J = L L^T gives H = V V^T with V = J L J upper, so H^-1 = U^T U with U = V^-1 =
        # J L^-1 J: the upper Cholesky factor of H^-1 without forming H^-1. NaN when the
        # factorisation fails; only the lower triangle is read (H is symmetric by construction).
        low = lax.linalg.cholesky(flipped + (frac * mean_diag) * eye, symmetrize_input=False)
        inv = lax.linalg.triangular_solve(low, eye, left_side=True, lower=True)
        u = jnp.triu(inv[::-1, ::-1])
        return k + 1, jnp.all(jnp.isfinite(u)), u

    def failing(state):
        k, ok, _ = state
        return ~ok & (k < max_tries)

    # The first try outside the loop: it nearly always succeeds, and XLA runs it faster there.
    first = attempt(jnp.int32(0))
    tries, ok, u = lax.while_loop(failing, lambda state: attempt(state[0]), first)
    frac = percdamp + (tries - 1).astype(jnp.float32) * damp_step
    return u, frac, mean_diag, tries, ok


@functools.partial(jax.jit, static_argnums=(5,))
def _run(w, hessian, percdamp, damp_step, max_tries, plan: _Plan):
    spec, fmt = plan.spec, plan.spec.storage_format
    n, out = w.shape
    h = hessian.astype(jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag == 0
    idx = jnp.arange(n)
    h = h.at[idx, idx].set(jnp.where(dead, 1.0, diag))
    w0 = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))  # [in, out]

    perm = jnp.argsort(-jnp.diagonal(h), stable=True) if plan.act_order else idx
    if plan.act_order:
        h = h[perm][:, perm]
    u, frac, mean_diag, tries, ok = _factor(h, percdamp, damp_step, max_tries)

    # Padding rows: zero weights with an identity Hessian block after every real row, so that
    # they neither receive nor send updates and quantize to exactly 0.
    pad = plan.n_pad - n
    wp = jnp.pad(w0[perm], ((0, pad), (0, 0)))  # [n_pad, out], processing order
    u = jnp.pad(u, ((0, pad), (0, pad)))
    u = u.at[jnp.arange(n, plan.n_pad), jnp.arange(n, plan.n_pad)].set(1.0)

    g = plan.block[0]
    if plan.dynamic:
        groups = plan.n_pad // g
        s_tab = jnp.ones((groups, out), spec.scale_dtype)
        z_tab = None if not fmt.has_zero_point else jnp.zeros((groups, out), fmt.container_dtype)
        gidx = None
    else:
        # Scales from the original (dead-zeroed) weights, in the original row order.
        s_tab, z_tab = choose_qparams(w0, spec, plan.block)  # [groups, out or 1]
        gidx = jnp.pad(perm // g, (0, pad))  # group of each processed row
    q, s_tab, z_tab, loss = _sweep(wp, u, s_tab, z_tab, gidx, n, plan)

    loss = 0.5 * loss
    q = q[:n]  # processing order
    delta = q - w0[perm]
    out_err = jnp.maximum(2.0 * loss - frac * mean_diag * jnp.sum(delta * delta), 0.0)
    # Encoding the quantized values against their own scales gives back their codes exactly.
    if plan.dynamic:  # codes stay in processing order, where the groups are contiguous
        ng = _blocks.num_blocks((n, out), plan.block)[0]
        z_tab = None if z_tab is None else z_tab[:ng]
        qarray = quantize_unchecked(q, spec, plan.block, s_tab[:ng], z_tab, plan.dtype)
        if plan.act_order:
            qarray = dataclasses.replace(qarray, perm=perm.astype(jnp.int32))
    else:
        unpermuted = q[jnp.argsort(perm)]
        qarray = quantize_unchecked(unpermuted, spec, plan.block, s_tab, z_tab, plan.dtype)
    res = GPTQResult(
        qarray=qarray,
        loss=loss,
        output_error=out_err,
        damp=jnp.where(ok, frac, jnp.nan),
        tries=tries,
        dead=jnp.sum(dead, dtype=jnp.int32),
    )
    return res, ok


def _sweep(w, u, s_tab, z_tab, gidx, n, plan: _Plan):
    """The column loop, on rows in processing order.

    Row `i` is rounded to `q_i`, then `e_i = (w_i - q_i) / U[i, i]` and `w_j -= U[i, j] e_i` for
    the later rows `j`, lazily: per row within a chunk, per chunk within a block, per block for
    the rest of the matrix. When a group starts, its rows have received every earlier row's
    update, so its scale is chosen from the values GPTQ's intermediate optimum holds there.

    Args:
      w: `[n_pad, out]` float32 weights; u: `[n_pad, n_pad]` GPTQ's `Hinv` (upper);
        s_tab / z_tab: `[groups, out or 1]` scales and zero points (filled in here when the
        plan is dynamic); gidx: `[n_pad]` row -> group (static plans only); n: real rows.

    Returns:
      (q `[n_pad, out]` quantized rows, s_tab, z_tab, sum of (w - q)^2 / U[i, i]^2).
    """
    spec, fmt = plan.spec, plan.spec.storage_format
    rows, chunk, g = plan.rows, plan.chunk, plan.block[0]
    out = w.shape[1]
    has_zero = z_tab is not None
    zeros_rows = jnp.zeros((rows, out), jnp.float32)
    zeros_chunk = jnp.zeros((chunk, out), jnp.float32)

    def group_qparams(slab, row0):
        # Ragged last group: pad rows are NaN, as in RTN's blocked view; a group made of
        # padding only gets zeros (scale 1).
        valid = row0 + jnp.arange(g) < n
        fill = jnp.where(row0 < n, jnp.nan, 0.0)
        s, z = choose_qparams(jnp.where(valid[:, None], slab, fill), spec, (g, 1))
        return s[0], (z[0] if has_zero else None)

    def chunk_body(k, carry):
        w1, q1, e1, loss, s_tab, z_tab, u1, i1 = carry
        r0 = k * chunk
        row0 = i1 + r0
        if plan.dynamic:

            def new_group(tabs):
                s_tab, z_tab = tabs
                s, z = group_qparams(lax.dynamic_slice_in_dim(w1, r0, g), row0)
                s_tab = s_tab.at[row0 // g].set(s)
                if has_zero:
                    z_tab = z_tab.at[row0 // g].set(z)
                return s_tab, z_tab

            s_tab, z_tab = lax.cond(row0 % g == 0, new_group, lambda t: t, (s_tab, z_tab))
        wc = lax.dynamic_slice_in_dim(w1, r0, chunk)  # [chunk, out]
        u_rows = lax.dynamic_slice_in_dim(u1, r0, chunk)  # [chunk, rows]
        uc = lax.dynamic_slice_in_dim(u_rows, r0, chunk, axis=1)  # [chunk, chunk]

        def row_body(i, c):
            wc, qc, ec, loss = c
            row = row0 + i
            grp = row // g if plan.dynamic else gidx[row]
            s = s_tab[grp].astype(jnp.float32)
            z = z_tab[grp].astype(jnp.float32) if has_zero else None
            x = wc[i]
            d = uc[i, i]
            qx = _fake_quant(x, s, z, fmt)
            err = (x - qx) / d
            # uc is upper triangular: rows above i are untouched, row i itself is done.
            wc = wc - uc[i][:, None] * err[None, :]
            loss = loss + jnp.sum(err * err)
            return wc, qc.at[i].set(qx), ec.at[i].set(err), loss

        _, qc, ec, loss = lax.fori_loop(0, chunk, row_body, (wc, zeros_chunk, zeros_chunk, loss))
        # The chunk's error, for the rest of the block (rows of earlier chunks get exact zeros).
        w1 = w1 - jnp.matmul(u_rows.T, ec, precision=_HIGHEST)
        q1 = lax.dynamic_update_slice_in_dim(q1, qc, r0, 0)
        e1 = lax.dynamic_update_slice_in_dim(e1, ec, r0, 0)
        return w1, q1, e1, loss, s_tab, z_tab, u1, i1

    def block_body(b, carry):
        w, q, loss, s_tab, z_tab = carry
        i1 = b * rows
        w1 = lax.dynamic_slice_in_dim(w, i1, rows)  # [rows, out]
        u_rows = lax.dynamic_slice_in_dim(u, i1, rows)  # [rows, n_pad]
        u1 = lax.dynamic_slice_in_dim(u_rows, i1, rows, axis=1)  # [rows, rows]
        init = (w1, zeros_rows, zeros_rows, loss, s_tab, z_tab, u1, i1)
        _, q1, e1, loss, s_tab, z_tab, *_ = lax.fori_loop(0, rows // chunk, chunk_body, init)
        # Lazy batch update of the later rows [i1 + rows, n_pad). Shapes must be static, so it
        # covers the shortest of a few tails [start, n_pad) that holds them; rows of the tail
        # before i1 + rows are done already (U is triangular: they get exact zeros or are not
        # read again). Compared with always the whole matrix, this halves the flops.
        w = lax.switch(
            jnp.sum(starts > i1 + rows),
            [functools.partial(tail_update, start=st) for st in starts_list],
            w,
            u_rows,
            e1,
        )
        q = lax.dynamic_update_slice_in_dim(q, q1, i1, 0)
        return w, q, loss, s_tab, z_tab

    def tail_update(w, u_rows, e1, *, start):
        upd = jnp.matmul(u_rows[:, start:].T, e1, precision=_HIGHEST)
        return w.at[start:].add(-upd)

    blocks = plan.n_pad // rows
    tails = min(_TAILS, blocks)
    starts_list = sorted({(blocks - -(-k * blocks // tails)) * rows for k in range(1, tails + 1)})
    starts_list = starts_list[::-1]  # descending: branch j is the j-th shortest tail
    starts = jnp.asarray(starts_list, jnp.int32)

    init = (w, jnp.zeros_like(w), jnp.float32(0.0), s_tab, z_tab)
    _, q, loss, s_tab, z_tab = lax.fori_loop(0, blocks, block_body, init)
    return q, s_tab, z_tab, loss

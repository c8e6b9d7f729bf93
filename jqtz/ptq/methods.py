"""Per-block procedures of the PTQ methods: the glue between the runner and the pure algorithms.

Each procedure takes a `BlockContext` (the block's parameters, capture of its inputs, scoring)
and returns the block's quantized parameters. The numerics live in the pure modules
(`gptq.py`, `awq.py`, `smoothquant.py`); this file only decides what to capture and where the
results go.
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp

from jqtz.ptq.runner import BlockContext
from jqtz.quantize import quantize


def block_procedure(recipe):
    """The per-block procedure for `recipe.method`."""
    return {
        "rtn": _rtn,
        "nf4": _rtn,
        "llm_int8": _rtn,
        "gptq": _gptq,
        "awq": _awq,
        "smoothquant": _smoothquant,
        "fp8": _fp8,
    }[recipe.method](recipe)


def _quantize_linears(ctx: BlockContext, linears, method: str):
    for name in linears:
        spec = ctx.spec(name)
        if spec is None:
            continue
        t0 = time.perf_counter()
        ctx.set(f"{name}/kernel", quantize(ctx.kernel(name), spec))
        ctx.record(name, method, time.perf_counter() - t0)


def _rtn(recipe):
    def run(ctx: BlockContext):
        for group in ctx.layout.groups:
            _quantize_linears(ctx, group.linears, recipe.method)
        return ctx.params

    return run


def _gptq(recipe):
    from jqtz.ptq.gptq import gptq

    opts = recipe.options

    def quantize_group(ctx, group, stats):
        h = stats[group.linears[0]].hessian
        for name in group.linears:
            spec = ctx.spec(name)
            if spec is None:
                continue
            t0 = time.perf_counter()
            res = gptq(
                ctx.kernel(name),
                h,
                spec,
                block_size=opts.block_size,
                percdamp=opts.percdamp,
                damp_step=opts.damp_step,
                max_damp_tries=opts.max_damp_tries,
                act_order=opts.act_order,
                static_groups=opts.static_groups,
            )
            ctx.set(f"{name}/kernel", res.qarray)
            note = f"damp {res.damp:.3g}" + (f" ({res.tries} tries)" if res.tries > 1 else "")
            if res.dead:
                note += f", {res.dead} dead inputs"
            ctx.record(name, "gptq", time.perf_counter() - t0, float(res.loss), note)

    def run(ctx: BlockContext):
        groups = ctx.layout.groups
        if opts.true_sequential:
            for group in groups:
                quantize_group(ctx, group, ctx.capture((group,), xtx=True))
        else:
            stats = ctx.capture(groups, xtx=True)
            for group in groups:
                quantize_group(ctx, group, stats)
        return ctx.params

    return run


def _absorb(ctx: BlockContext, group, s):
    """Divide the group's input by `s` where it is produced (norm or previous linear), and
    multiply the group's kernels' input rows by `s`: the full-precision function is unchanged."""
    if group.norm is not None:
        ctx.set(f"{group.norm}/scale", ctx.params_at(f"{group.norm}/scale") / s)
        if ctx.has(f"{group.norm}/bias"):
            ctx.set(f"{group.norm}/bias", ctx.params_at(f"{group.norm}/bias") / s)
    elif group.prev is not None:
        prev = ctx.kernel(group.prev)
        ctx.set(f"{group.prev}/kernel", prev / s[None, :])
        if ctx.has(f"{group.prev}/bias"):
            ctx.set(f"{group.prev}/bias", ctx.params_at(f"{group.prev}/bias") / s)
    else:
        raise ValueError(f"group {group.linears} has no norm or linear to absorb scales")
    for name in group.linears:
        ctx.set(f"{name}/kernel", ctx.kernel(name) * s[:, None])


def _smoothquant(recipe):
    from jqtz.ptq.smoothquant import smoothing_scales

    alpha = recipe.options.alpha
    into_linears = recipe.options.fold_into_linears

    def run(ctx: BlockContext):
        groups = [
            g
            for g in ctx.layout.groups
            if g.norm is not None or (into_linears and g.prev is not None)
        ]
        if groups:
            stats = ctx.capture(tuple(groups))
            for group in groups:
                weights = [ctx.kernel(n) for n in group.linears]
                s = smoothing_scales(stats[group.linears[0]].absmax, weights, alpha)
                _absorb(ctx, group, s)
        for group in ctx.layout.groups:
            _quantize_linears(ctx, group.linears, "smoothquant")
        if recipe.options.static_activations:
            _static_activation_scales(ctx)
        return ctx.params

    return run


def _static_activation_scales(ctx: BlockContext):
    """Set `act_scale` of the block's quantized linears from the inputs they see now (through
    the already quantized parts of the block), one group at a time."""
    from jqtz import ranges

    for group in ctx.layout.groups:
        stats = ctx.capture((group,))[group.linears[0]]
        for name in group.linears:
            q = ctx.kernel(name)
            if getattr(q, "act", None) is None or q.act.granularity != "tensor":
                continue
            amax = jnp.max(stats.absmax)
            obs = ranges.RangeStats(-amax.reshape(1, 1), amax.reshape(1, 1))
            scale, _ = ranges.qparams_from_stats(obs, q.act)
            ctx.set(f"{name}/kernel", dataclasses.replace(q, act_scale=scale))


def _fp8(recipe):
    def run(ctx: BlockContext):
        for group in ctx.layout.groups:
            _quantize_linears(ctx, group.linears, "fp8")
        if recipe.options.mode == "static-per-tensor":
            _static_activation_scales(ctx)
        return ctx.params

    return run


def _awq(recipe):
    from jqtz.ptq import awq

    opts = recipe.options
    scorers = {}  # one block-output function per group, shared by every block

    def scorer(ctx: BlockContext, names):
        if names not in scorers:

            def block_output(scaled, params, batches):
                for n, w in zip(names, scaled, strict=True):
                    params = ctx.with_leaf(params, f"{n}/kernel", w)
                outs = [ctx.run(params, x, aux) for x, aux in batches]
                return jnp.concatenate(outs)

            scorers[names] = block_output
        return scorers[names]

    def run(ctx: BlockContext):
        groups = ctx.layout.groups
        batches = ctx.score_batches()
        fp_out = jnp.concatenate([ctx.run(ctx.params, x, aux) for x, aux in batches])
        # 1. Scale search on the full-precision block, every group, then fold (AWQ applies all
        #    scales of a block before quantizing any of it).
        stats = ctx.capture(tuple(groups))
        for group in groups:
            specs = [ctx.spec(n) for n in group.linears]
            if (group.norm is None and group.prev is None) or any(s is None for s in specs):
                continue
            t0 = time.perf_counter()
            names = group.linears
            search = awq.search_scales(
                stats[names[0]].mean_abs,
                [ctx.kernel(n) for n in names],
                scorer(ctx, names),
                specs[0],
                fp_output=fp_out,
                n_grid=opts.n_grid,
                duo_scaling=opts.duo_scaling,
                grid_chunk=opts.grid_chunk,
                operands=(ctx.params, batches),
            )
            _absorb(ctx, group, search.scales)
            ctx.note(names, f"ratio {search.ratio:.2f}", time.perf_counter() - t0)
        # 2. Clip search on the scaled weights (not for q/k: their errors meet in the softmax),
        #    then round-to-nearest.
        stats = ctx.capture(tuple(groups), sample=opts.clip_tokens) if opts.clip else None
        for group in groups:
            for name in group.linears:
                spec = ctx.spec(name)
                if spec is None:
                    continue
                t0 = time.perf_counter()
                w = ctx.kernel(name)
                if stats is not None and not name.endswith(("q_proj", "k_proj", "query", "key")):
                    w = awq.search_clip(
                        w,
                        stats[group.linears[0]].sample,
                        spec,
                        n_grid=opts.clip_grid,
                        max_shrink=opts.clip_max_shrink,
                    ).weight
                ctx.set(f"{name}/kernel", quantize(w, spec))
                ctx.record(name, "awq", time.perf_counter() - t0, note=ctx.pop_note(name))
        return ctx.params

    return run

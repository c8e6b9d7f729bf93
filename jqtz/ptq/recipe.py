"""Recipes: one object that says how to quantize a model after training.

A `Recipe` names the method, the `QuantSpec` of the linear layers (each method has a default
faithful to its reference code), optional `rules` that come first (mixed precision per layer,
layers to keep), and the method's options. `quantize_model` runs it over a `ModelLayout` with
calibration data and returns the quantized parameters and a `PTQReport`.

| method        | default spec                                     | calibration        |
|---------------|--------------------------------------------------|--------------------|
| `rtn`         | int4, groups of 128, zero points, f16 scales     | none               |
| `nf4`         | NF4, groups of 64, double quantization           | none               |
| `gptq`        | int4, groups of 128, zero points, f16 scales     | X^T X per group    |
| `awq`         | int4, groups of 128, zero points, f16 scales     | scale + clip search|
| `smoothquant` | W8A8: int8 per channel, int8 per-token dynamic   | per-channel max |x||
| `llm_int8`    | int8 per channel, int8 activations, outliers >6.0 in float | none     |
| `fp8`         | e4m3 per channel, per-token dynamic e4m3         | static: max |x|    |

Integer weights below 8 bits get zero points (min/max ranges, `symmetric=False`), as the GPTQ
and AWQ reference code quantize by default: a 4-bit symmetric grid has 15 levels and spends half
of them on a side a skewed group does not reach. `examples/ptq_results.py` measures both
(`rtn-asym`, `gptq-asym` rows; docs/results.md). 8-bit weights stay symmetric (AWQ's always
have zero points); `default_spec(..., symmetric=True)` or a `Recipe(spec=...)` chooses.

Example:
  >>> import jqtz
  >>> from jqtz.ptq import GPTQOptions, Recipe
  >>> r = Recipe(method="gptq", options=GPTQOptions(act_order=True),
  ...            rules=((r".*/mlp/down_proj/kernel", jqtz.QuantSpec(format="int8")),))
  >>> r.spec.format, r.spec.group_size
  ('int4', 128)
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Literal

from jqtz import rules as rules_lib
from jqtz.ptq.layout import ModelLayout
from jqtz.spec import QuantSpec

Method = Literal["rtn", "nf4", "gptq", "awq", "smoothquant", "llm_int8", "fp8"]
METHODS = ("rtn", "nf4", "gptq", "awq", "smoothquant", "llm_int8", "fp8")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQOptions:
    """GPTQ (Frantar et al. 2022): lazy batch updates of `block_size` columns, damping
    `percdamp * mean(diag H)` raised by `damp_step` on a failed Cholesky, act-order, static
    groups, and the layer-wise true-sequential order."""

    block_size: int = 128
    percdamp: float = 0.01
    damp_step: float = 0.01
    max_damp_tries: int = 5
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQOptions:
    """AWQ (Lin et al. 2023): grid of scale exponents, duo scaling, clip search.

    `grid_chunk` candidates are scored together (under `vmap`); each costs one forward pass of
    the block on the scoring samples in memory, so 1 keeps the bound of one block's activations;
    raise it on an accelerator with memory to spare.
    """

    n_grid: int = 20
    grid_chunk: int = 1
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuantOptions:
    """SmoothQuant (Xiao et al. 2022): migration strength `alpha` (0.85 for Llama-2/3), and
    static per-tensor activation scales instead of per-token dynamic ones.

    The reference smooths the inputs that a norm produces (q/k/v, gate/up). With
    `fold_into_linears=True` the groups whose input a previous linear produces are smoothed too
    (Llama's down_proj through up_proj's output columns; o_proj through v_proj without GQA), an
    exact fold as well: on SmolLM2-135M it lowered in-domain W8A8 perplexity but raised it on
    another domain (docs/results.md), so it is off by default.
    """

    alpha: float = 0.85
    static_activations: bool = False
    fold_into_linears: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8Options:
    """FP8 (`jqtz.ptq.fp8.fp8_spec`): `"dynamic-per-token"` (per-channel weights, per-token
    activations), `"static-per-tensor"` (per-tensor weights and activations, activation scales
    from calibration) or `"block128"` (128x128 weight blocks, activation groups of 128)."""

    mode: Literal["dynamic-per-token", "static-per-tensor", "block128"] = "dynamic-per-token"


_OPTIONS = {
    "gptq": GPTQOptions,
    "awq": AWQOptions,
    "smoothquant": SmoothQuantOptions,
    "fp8": FP8Options,
}


def default_spec(
    method: str,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool | None = None,
    scale_dtype: str = "float16",
    options=None,
) -> QuantSpec:
    """The spec a method uses unless the recipe gives one.

    `symmetric=None`: zero points below 8 bits (and always for AWQ), symmetric at 8 bits.

    Example:
      >>> s = default_spec("gptq")
      >>> s.format, s.group_size, s.symmetric, default_spec("rtn", bits=8).symmetric
      ('int4', 128, False, True)
    """
    if method not in METHODS:
        raise ValueError(f"unknown PTQ method {method!r}; expected one of {', '.join(METHODS)}")
    per_token = QuantSpec(format="int8", granularity="channel", axis=-1)
    if method == "nf4":
        return QuantSpec(
            format="nf4",
            granularity="group",
            group_size=group_size or 64,
            double_quant=True,
            scale_dtype="float32",
        )
    if method == "smoothquant":
        act = per_token
        if options is not None and options.static_activations:
            act = QuantSpec(format="int8", granularity="tensor", axis=-1)
        return QuantSpec(format="int8", scale_dtype=scale_dtype, activation=act)
    if method == "llm_int8":
        act = QuantSpec(format="int8", granularity="channel", axis=-1, outlier_threshold=6.0)
        return QuantSpec(format="int8", scale_dtype=scale_dtype, activation=act)
    if method == "fp8":
        from jqtz.ptq.fp8 import fp8_spec

        return fp8_spec(options.mode if options is not None else "dynamic-per-token")
    if symmetric is None:
        symmetric = bits >= 8 and method != "awq"
    granularity = "group" if group_size else "channel"
    return QuantSpec(
        format=f"int{bits}",
        granularity=granularity,
        group_size=group_size,
        symmetric=symmetric,
        scale_dtype=scale_dtype,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """How to quantize a model after training.

    Attributes:
      method: one of `METHODS`.
      spec: the `QuantSpec` for the layout's linear layers; None: the method's default
        (`default_spec`).
      rules: rules tried before the recipe's own (first match wins): `Rule`s or
        `(regex, spec_or_None)` pairs on full paths (`params/layers_3/mlp/down_proj/kernel`),
        for mixed precision per layer or layers kept in full precision.
      options: the method's options dataclass (`GPTQOptions`, `AWQOptions`,
        `SmoothQuantOptions`, `FP8Options`); None: defaults.
      batch_size: calibration samples per forward pass.
      n_score: samples AWQ scores its candidates on.
      propagate: recompute each block's input through the quantized previous blocks.
    """

    method: Method = "rtn"
    spec: QuantSpec | None = None
    rules: tuple = ()
    options: object = None
    batch_size: int = 8
    n_score: int = 8
    propagate: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method`={self.method!r}; expected one of {', '.join(METHODS)}")
        want = _OPTIONS.get(self.method)
        if self.options is None and want is not None:
            object.__setattr__(self, "options", want())
        elif self.options is not None and (want is None or not isinstance(self.options, want)):
            raise TypeError(
                f"`options` for method {self.method!r} must be "
                f"{want.__name__ if want else 'None'}, got {type(self.options).__name__}"
            )
        if self.spec is None:
            object.__setattr__(self, "spec", default_spec(self.method, options=self.options))
        object.__setattr__(self, "rules", rules_lib.normalize_rules(list(self.rules)))
        if self.batch_size < 1 or self.n_score < 1:
            raise ValueError("`batch_size` and `n_score` must be >= 1")

    def all_rules(self, layout: ModelLayout) -> tuple:
        """The recipe's rules, then its spec on every linear the layout names."""
        linears = "|".join(re.escape(p) for p in layout.linear_paths())
        return (*self.rules, rules_lib.Rule(f"(?:{linears})", self.spec))


def quantize_model(
    params, layout: ModelLayout, data, recipe: Recipe, *, progress: Callable | None = None
):
    """Quantize `params` of the model `layout` describes, block by block, as `recipe` says.

    Args:
      params: `{"params": ...}`.
      layout: e.g. `llama_layout(config)`.
      data: calibration inputs for `layout.embed` (int tokens `(N, T)` for the Llama; see
        `jqtz.ptq.calibration_tokens`). Ignored by methods that need none, but still checked.
      recipe: the `Recipe`.
      progress: `progress(block_index, n_blocks, LayerRecord)` after each layer.

    Returns:
      (quantized params, `PTQReport`). Leaves outside the layout's linears that the recipe's
      rules select (e.g. `lm_head` with `force=True`) are quantized with round-to-nearest.
    """
    from jqtz.ptq import methods
    from jqtz.ptq.runner import LayerRecord, PTQReport, _get, _set, run_blocks
    from jqtz.quantize import quantize

    t0 = time.perf_counter()
    plan = rules_lib.plan(params, recipe.all_rules(layout))
    linear = set(layout.linear_paths())
    stacked = [d.path for d in plan.decisions if d.batch_dims and d.path in linear]
    if stacked:
        raise ValueError(
            f"the layout's linears are one array per layer; rules stack {', '.join(stacked[:3])} "
            "(batch_dims): drop batch_dims from the rules that match them"
        )
    specs = {d.path: d.spec for d in plan.decisions}
    block_fn = methods.block_procedure(recipe)
    qparams, records = run_blocks(
        params,
        layout,
        data,
        specs,
        block_fn,
        batch_size=recipe.batch_size,
        n_score=recipe.n_score,
        propagate=recipe.propagate,
        progress=progress,
    )
    extra = [d for d in plan.decisions if d.spec is not None and d.path not in linear]
    for d in extra:
        t1 = time.perf_counter()
        leaf = quantize(_get(params, d.path), d.spec, batch_dims=d.batch_dims)
        qparams = _set(qparams, d.path, leaf)
        records.append(
            LayerRecord(d.path, "rtn", f"{d.spec.storage_format.name}", time.perf_counter() - t1)
        )
    data_shape = getattr(data, "shape", None) or getattr(data[0], "shape", (0, 0))
    report = PTQReport(
        records,
        time.perf_counter() - t0,
        int(data_shape[0]),
        int(data_shape[1]) if len(data_shape) > 1 else 0,
    )
    return qparams, report

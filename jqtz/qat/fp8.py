"""FP8 training-style fake quantization: per-tensor e4m3 scales, current or delayed.

FP8 rules are ordinary specs, e.g. `QuantSpec(format="fp8_e4m3", granularity="tensor",
activation=QuantSpec(format="fp8_e4m3", granularity="tensor", axis=-1))`:

- **current scaling** (the default): each step's scale is `amax(x) / 448`, from the tensor
  being quantized; this is what `fake_quant` does without a history.
- **delayed scaling** (Transformer Engine's recipe): the scale comes from the largest amax of
  the last `length` steps, `max(history) / 448`, so it needs no reduction over the tensor before
  the product; values above it saturate. A history is an ordinary pytree (`init_amax_history`),
  passed as `amax_history=` to `fake_quant_params`, `fake_quant_activations` and `convert`, and
  rolled forward after each step by `update_amax_history` with the weights and the input amaxes
  that `fake_quant_activations` recorded. Until a history has seen a step (all zeros) the
  current amax is used.

`convert(..., amax_history=h)` stores the delayed scales (weights) and static activation scales
(inputs), so serving computes exactly what training's forward pass did with `h`.

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> params = {"dense": {"kernel": jnp.full((4, 2), 2.0)}}
  >>> rules = [(".*", jqtz.QuantSpec(format="fp8_e4m3", granularity="tensor"))]
  >>> h = jqtz.qat.init_amax_history(params, rules, length=4)
  >>> h = jqtz.qat.update_amax_history(h, params)
  >>> h["dense"]["kernel"]["weight"].tolist()
  [2.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqtz import formats
from jqtz import rules as rules_lib
from jqtz.qat import _tree
from jqtz.ranges import _scale_zero
from jqtz.spec import QuantSpec

__all__ = ["delayed_scale", "init_amax_history", "update_amax_history"]


def _is_fp8_tensor(spec: QuantSpec | None) -> bool:
    return (
        spec is not None
        and isinstance(spec.storage_format, formats.FloatFormat)
        and spec.granularity == "tensor"
    )


def init_amax_history(params, rules, *, length: int = 16) -> dict:
    """Zero amax histories for the FP8 per-tensor weights (`"weight"`) and inputs (`"input"`).

    Args:
      params: the parameter tree.
      rules: as for `jqtz.quantize_params`; weights with an FP8 `"tensor"` spec get a weight
        history, those whose `activation` is an FP8 `"tensor"` spec an input history.
      length: steps of history.

    Raises:
      ValueError: `length` < 1, or no selected parameter has an FP8 per-tensor spec.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"`length` must be a positive int, got {length!r}")
    out: dict[str, dict] = {}
    plan = rules_lib.plan(params, rules)
    decisions = plan.by_path()
    for d in plan.decisions:
        entry = {}
        if _is_fp8_tensor(d.spec):
            entry["weight"] = jnp.zeros((length,), jnp.float32)
        if d.spec is not None and _is_fp8_tensor(d.spec.activation):
            entry["input"] = jnp.zeros((length,), jnp.float32)
        if entry:
            _tree.refuse_stacked(decisions, [d.path], what="FP8 delayed scaling (amax_history)")
            out[d.path] = entry
    if not out:
        raise ValueError(
            "no parameter selected by `rules` has an FP8 per-tensor spec (format 'fp8_e4m3' or "
            "'fp8_e5m2', granularity='tensor', for the weight or its `activation`)"
        )
    return _tree.nest(out)


def delayed_scale(history: jax.Array, current_amax: jax.Array, spec: QuantSpec) -> jax.Array:
    """`max(history) / max_abs` in `spec.scale_dtype` (rounded up), or the current amax's scale
    while the history is all zero. The same guards as PTQ's `"max"` range."""
    past = jnp.max(history)
    amax = jnp.where(past > 0, past, jnp.asarray(current_amax, jnp.float32))
    scale, _ = _scale_zero(-amax, amax, spec.storage_format, spec.scale_dtype)
    return scale


def _roll(history: jax.Array, amax: jax.Array) -> jax.Array:
    return jnp.roll(history, 1).at[0].set(jnp.asarray(amax, history.dtype))


def update_amax_history(history, params=None, input_amax: dict | None = None) -> dict:
    """Roll each history one step, newest amax first.

    Args:
      history: from `init_amax_history`.
      params: the parameters after (or before) the step; their current amax feeds `"weight"`.
      input_amax: `{path: amax}` of the inputs, from `fake_quant_activations(...).input_amax`;
        None leaves the input histories as they are.

    Returns:
      The new history (same structure).

    Raises:
      ValueError: a weight history without `params`, or an input history whose path is not
        in `input_amax` (the layer was not run under `fake_quant_activations`).
    """
    leaves = _tree.leaves_by_path(params) if params is not None else {}
    new: dict[str, dict] = {}
    for path, entry in _tree.entries(history, name="history").items():
        out = {}
        for field, h in entry.items():
            if field == "weight":
                if path not in leaves:
                    raise ValueError(
                        f"`history` holds a weight amax for {path!r} but `params` "
                        f"{'is None' if params is None else 'has no such parameter'}"
                    )
                amax = jnp.max(jnp.abs(jnp.asarray(leaves[path], jnp.float32)))
            elif field == "input":
                if input_amax is None:
                    out[field] = h
                    continue
                if path not in input_amax:
                    raise ValueError(
                        f"no input amax recorded for {path!r}: run the model under "
                        "`jqtz.qat.fake_quant_activations(..., amax_history=history)` and pass "
                        "its `input_amax`"
                    )
                amax = input_amax[path]
            else:
                raise ValueError(f"`history` entry {path!r} has an unknown field {field!r}")
            out[field] = _roll(h, jax.lax.stop_gradient(amax))
        new[path] = out
    return _tree.nest(new)

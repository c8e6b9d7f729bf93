"""`convert`: trained parameters (and learned scales) to the quantized tree that serving uses.

`convert(params, rules, learned)` is `jqtz.quantize_params(params, rules)` except that
parameters with learned step sizes store them (`effective_scale`, `effective_zero_point`), FP8
weights with a delayed-scaling history store the delayed scale, and learned static activation
ranges (or FP8 input histories) become the `QArray`'s `act_scale`.

**Parity.** The served model computes what the fake-quantized training forward pass computed:

    with jqtz.nn.quantized_ops():
        served = model.apply(convert(params, rules, learned), x)
    with jqtz.qat.fake_quant_activations(rules, learned):
        trained = model.apply(jqtz.qat.fake_quant_params(params, rules, learned=learned), x)

Weights are equal bit for bit (`QArray.dequantize()` == `fake_quant`), and so are the logits
of float32 models wherever serving multiplies dequantized values (weight-only, group-wise or
asymmetric weights with quantized activations). Where serving multiplies the codes (int8 x int8
-> int32, FP8 x FP8 -> float32, both per-channel/per-token) the products are exact but summed in
another order and scaled after the sum: logits agree to float32 rounding (tested at a relative
error below 1e-5). Models computing in bfloat16 round differently in the two paths.

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (32, 8))}}
  >>> rules = [(".*kernel", jqtz.QuantSpec(format="int4"))]
  >>> learned = jqtz.qat.init_learned_scales(params, rules)
  >>> learned = jax.tree.map(lambda s: s * 0.9, learned)  # as if trained
  >>> q = jqtz.qat.convert(params, rules, learned)
  >>> fq = jqtz.qat.fake_quant_params(params, rules, learned=learned)
  >>> bool(jnp.array_equal(q["dense"]["kernel"].dequantize(), fq["dense"]["kernel"]))
  True
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jqtz import rules as rules_lib
from jqtz.qarray import is_qarray
from jqtz.qat import _tree
from jqtz.qat.fp8 import delayed_scale
from jqtz.qat.ste import effective_scale, effective_zero_point
from jqtz.quantize import quantize

__all__ = ["convert"]


def _learned(path, spec, entry) -> dict:
    """`scale=` and `zero_point=` for `quantize` from a learned entry, or none (PTQ ranges)."""
    if "scale" not in entry:
        return {}
    scale = effective_scale(entry["scale"], spec.scale_dtype).astype(spec.scale_dtype)
    zero = entry.get("zero_point")
    if spec.storage_format.has_zero_point:
        if zero is None:
            raise ValueError(f"`learned` entry {path!r} has a scale but no zero_point")
        zero = effective_zero_point(zero, spec.storage_format)
    return {"scale": scale, "zero_point": zero}


def _scales(path, leaf, spec, entry, history):
    """(scale, zero point) to store for one weight, or (None, None) to choose them as PTQ."""
    if "scale" in entry:
        learned = _learned(path, spec, entry)
        return learned["scale"], learned["zero_point"]
    if "weight" in history:
        amax = jnp.max(jnp.abs(jnp.asarray(leaf, jnp.float32)))
        return delayed_scale(history["weight"], amax, spec), None
    return None, None


def _act_scale(path, spec, entry, history):
    """The static input scale to store, or None (dynamic ranges)."""
    act = spec.activation
    if "act_scale" in entry or "input" in history:
        if act is None:
            raise ValueError(
                f"{path!r} has a learned or delayed input range but its spec has no `activation`"
            )
        if act.storage_format.has_zero_point:
            raise NotImplementedError(
                f"{path!r}: static activation ranges with zero points (asymmetric activation "
                "spec); serving supports symmetric static ranges only"
            )
    if "act_scale" in entry:
        return effective_scale(entry["act_scale"], act.scale_dtype).astype(act.scale_dtype)
    if "input" in history:
        h = history["input"]
        if not isinstance(h, jax.core.Tracer) and not bool(jnp.any(h > 0)):
            raise ValueError(
                f"the FP8 input history of {path!r} is all zero: run at least one step and "
                "`update_amax_history` before converting"
            )
        return delayed_scale(h, 0.0, act)
    return None


def convert(params, rules, learned=None, *, amax_history=None, strict: bool = False):
    """The quantized tree for serving: `QArray`s with the trained (or delayed) scales.

    Args:
      params: the trained full-precision parameters.
      rules: the rules used in training.
      learned: the learned scales used in training (`init_learned_scales`), or None.
      amax_history: the FP8 delayed-scaling history used in training, or None.
      strict: raise instead of warning when a rule matches nothing.

    Returns:
      A tree shaped like `params` whose selected leaves are `QArray`s (see the module
      docstring for the parity with `fake_quant_params`).

    Raises:
      ValueError: a side tree names a parameter that the rules do not quantize, a parameter
        holds NaN/Inf, or an FP8 input history is still empty.
    """
    decisions, learned_by_path, history_by_path = _tree.plan_with_state(
        params, rules, learned, amax_history, strict=strict
    )

    def one(keypath, leaf):
        path = rules_lib.path_str(keypath)
        spec, batch_dims = decisions[path].spec, decisions[path].batch_dims
        if spec is None:
            return leaf
        entry = learned_by_path.get(path, {})
        history = history_by_path.get(path, {})
        try:
            if batch_dims:  # stacked layers: learned weight scales only (`plan_with_state`)
                layer = lambda x, e: quantize(x, spec, **_learned(path, spec, e))
                return _tree.per_layer(layer, batch_dims)(leaf, entry)
            scale, zero = _scales(path, leaf, spec, entry, history)
            q = quantize(leaf, spec, scale=scale, zero_point=zero)
            act_scale = _act_scale(path, spec, entry, history)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise type(e)(f"parameter {path!r}: {e}") from None
        return q if act_scale is None else dataclasses.replace(q, act_scale=act_scale)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_qarray)

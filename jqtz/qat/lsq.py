"""Learned step sizes (LSQ) and offsets (LSQ+) as an ordinary pytree that optax trains.

`init_learned_scales(params, rules)` returns, for every parameter the rules quantize, the ranges
PTQ would choose (so step 0 of QAT is exactly RTN): `{"scale": (blocks), "zero_point": (blocks)}`
(float32; zero points only for asymmetric specs, in code units). Static activation step sizes
come from a calibrated tree (`jqtz.nn.calibrate_activations`) as `"act_scale"` (a scalar: static
activation ranges are per tensor). The tree is nested by parameter path (see `jqtz.qat._tree`)
and is passed as `learned=` to `fake_quant_params`, `fake_quant_activations` and `convert`.

Gradients follow LSQ: `fake_quant` scales them by `1 / sqrt(n * qmax)`. `partition_labels` gives
the labels for `optax.multi_transform`, so that scales get their own learning rate, or are
frozen with `optax.set_to_zero()`.

Example:
  >>> import jax, jax.numpy as jnp, optax, jqtz
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (32, 8))}}
  >>> rules = [(".*kernel", jqtz.QuantSpec(format="int4"))]
  >>> learned = jqtz.qat.init_learned_scales(params, rules)
  >>> learned["dense"]["kernel"]["scale"].shape  # one step size per output channel
  (1, 8)
  >>> tx = optax.multi_transform(
  ...     {"params": optax.adam(1e-3), "scales": optax.adam(1e-4)},
  ...     jqtz.qat.partition_labels(params, learned))
  >>> opt_state = tx.init((params, learned))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqtz import rules as rules_lib
from jqtz.qarray import QArray, is_qarray
from jqtz.qat import _tree
from jqtz.ranges import choose_qparams

__all__ = ["init_learned_scales", "partition_labels"]

_choose_qparams = jax.jit(choose_qparams, static_argnums=(1, 2))


def init_learned_scales(params, rules, *, act_scales=None) -> dict:
    """Learned step sizes for every parameter that `rules` quantize, initialised as PTQ.

    Args:
      params: the full-precision parameter tree (linen variables, NNX `State`, any pytree).
      rules: as for `jqtz.quantize_params`.
      act_scales: optional tree from `jqtz.nn.calibrate_activations` (`QArray`s with
        `act_scale`): their static activation scales become learned `"act_scale"` entries.

    Returns:
      Nested dicts by parameter path, each quantized parameter holding `"scale"` (float32,
      one per block; stacked layers, Rule `batch_dims`, with their leading axes),
      `"zero_point"` (asymmetric specs; float32 code units) and, when calibrated,
      `"act_scale"` (float32 scalar).

    Raises:
      NotImplementedError: a selected spec uses `double_quant`, or a calibrated activation
        range is not per tensor.
      ValueError: `act_scales` holds a path that the rules do not quantize.
    """
    plan = rules_lib.plan(params, rules)
    leaves = _tree.leaves_by_path(params)
    out: dict[str, dict] = {}
    for d in plan.decisions:
        if d.spec is None:
            continue
        if d.spec.double_quant:
            raise NotImplementedError(
                f"parameter {d.path!r}: learned scales with double_quant=True; add a rule "
                "without double quantization for it"
            )
        x = jnp.asarray(leaves[d.path], jnp.float32)
        block = d.spec.block_shape_for(x.shape[d.batch_dims :], path=d.path)
        choose = _tree.per_layer(lambda a, d=d, block=block: _choose_qparams(a, d.spec, block),
                                 d.batch_dims)  # fmt: skip
        scale, zero = choose(x)
        entry = {"scale": scale.astype(jnp.float32)}
        if zero is not None:
            entry["zero_point"] = zero.astype(jnp.float32)
        out[d.path] = entry
    if act_scales is not None:
        decisions = plan.by_path()
        flat, _ = jax.tree_util.tree_flatten_with_path(act_scales, is_leaf=is_qarray)
        for kp, leaf in flat:
            if not isinstance(leaf, QArray) or leaf.act_scale is None:
                continue
            path = rules_lib.path_str(kp)
            if path not in out:
                raise ValueError(
                    f"`act_scales` has a calibrated range for {path!r}, which `rules` do not "
                    "quantize in `params`"
                )
            if leaf.act_scale.size != 1:
                raise NotImplementedError(
                    f"{path!r}: static activation ranges of shape {leaf.act_scale.shape}; "
                    "only per-tensor static ranges are learned (granularity='tensor')"
                )
            _tree.refuse_stacked(decisions, [path], what="a learned activation range")
            out[path]["act_scale"] = leaf.act_scale.astype(jnp.float32).reshape(())
    return _tree.nest(out)


def partition_labels(
    params,
    learned,
    *,
    param_label: str = "params",
    scale_label: str = "scales",
    zero_point_label: str | None = None,
    act_scale_label: str | None = None,
):
    """Labels for `optax.multi_transform` over the pair `(params, learned)`.

    Args:
      params: the parameter tree; every leaf gets `param_label`.
      learned: the tree from `init_learned_scales`; `"scale"` leaves get `scale_label`,
        `"zero_point"` leaves `zero_point_label` and `"act_scale"` leaves `act_scale_label`
        (both default to `scale_label`).

    Returns:
      `(param_labels, learned_labels)`, trees of strings shaped like `(params, learned)`.
      Map a label to `optax.set_to_zero()` to freeze those leaves.
    """
    by_field = {
        "scale": scale_label,
        "zero_point": zero_point_label or scale_label,
        "act_scale": act_scale_label or scale_label,
    }

    def learned_label(kp, _):
        field = rules_lib.path_str(kp).rsplit("/", 1)[-1]
        if field not in by_field:
            raise ValueError(
                f"`learned` has a leaf named {field!r}; expected one of {', '.join(by_field)}"
            )
        return by_field[field]

    param_labels = jax.tree_util.tree_map(lambda _: param_label, params)
    return param_labels, jax.tree_util.tree_map_with_path(learned_label, learned)

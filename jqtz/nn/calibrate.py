"""Static activation ranges: observe the inputs of quantized products on calibration batches.

`calibrate_activations(apply_fn, qparams, batches)` runs `apply_fn(qparams, batch)` eagerly
under `quantized_ops()`, records the range of every input that meets a `QArray` weight whose
`act` spec asks for quantized activations, and returns `qparams` with `act_scale` set from the
observed ranges (`jqtz.ranges`), so serving uses static instead of per-token dynamic ranges.

Static ranges are per tensor: give the weights `activation=QuantSpec(format=..., granularity=
"tensor", axis=-1)` (SmoothQuant's static W8A8, FP8 with static scales).

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> from flax import linen as nn
  >>> model = nn.Dense(8)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 16)))
  >>> act = jqtz.QuantSpec(format="int8", granularity="tensor", axis=-1)
  >>> q = jqtz.quantize_params(params, jqtz.QuantSpec(format="int8", activation=act))
  >>> batches = [jax.random.normal(jax.random.key(i), (4, 16)) for i in range(3)]
  >>> q = jqtz.nn.calibrate_activations(model.apply, q, batches)
  >>> q["params"]["kernel"].act_scale.shape
  (1, 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax

from jqtz import ranges
from jqtz.nn.flax_seams import observe_inputs, quantized_ops
from jqtz.qarray import QArray, is_qarray
from jqtz.rules import path_str


def calibrate_activations(apply_fn: Callable, qparams, batches: Iterable, *, progress=None):
    """Set `act_scale` on every `QArray` with an activation spec from observed input ranges.

    Args:
      apply_fn: `apply_fn(qparams, batch)`, e.g. `model.apply` (a linen model; run eagerly).
      qparams: the quantized tree (weights with `QuantSpec.activation` set).
      batches: calibration inputs for `apply_fn`.
      progress: optional callback `(i)` after each batch.

    Returns:
      `qparams` with `act_scale` filled in.

    Raises:
      ValueError: no batch was given, or a weight with an activation spec saw no input (the
        path is named: the layer is not reached by these batches, or not intercepted).
    """
    wanted = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_qarray)[0]:
        if isinstance(leaf, QArray) and leaf.act is not None:
            wanted[path_str(kp)] = leaf.act
    stats: dict[str, ranges.RangeStats] = {}

    def record(module_path, x):
        key = next((p for p in wanted if p == module_path or p.endswith("/" + module_path)), None)
        if key is None:
            return
        s = ranges.observe(x, wanted[key])
        stats[key] = s if key not in stats else stats[key].merge(s)

    n = 0
    with quantized_ops(), observe_inputs(record):
        for i, batch in enumerate(batches):
            apply_fn(qparams, batch)
            n += 1
            if progress is not None:
                progress(i)
    if n == 0:
        raise ValueError("`batches` is empty: static activation ranges need calibration data")
    missing = sorted(set(wanted) - set(stats))
    if missing:
        raise ValueError(
            f"{len(missing)} quantized layer(s) saw no calibration input, e.g. {missing[0]!r}: "
            "they are not reached by these batches or not run through jqtz.nn.quantized_ops()"
        )

    def set_scale(kp, leaf):
        if not isinstance(leaf, QArray) or leaf.act is None:
            return leaf
        scale, _ = ranges.qparams_from_stats(stats[path_str(kp)], leaf.act)
        return dataclasses.replace(leaf, act_scale=scale)

    return jax.tree_util.tree_map_with_path(set_scale, qparams, is_leaf=is_qarray)

"""Tree transforms: `quantize_params` and `dequantize_params` over any pytree of arrays.

They work on a flax linen variable dict, on an NNX `State` (from `nnx.split`/`nnx.state`: the
`Variable` wrappers are kept and hold `QArray`s), or on any pytree, without running or cloning a
model. Leaves are processed one at a time, so peak memory is the input tree, the output tree and
one leaf's temporaries.

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> params = {"params": {"dense": {"kernel": jnp.ones((256, 64)), "bias": jnp.zeros(64)}}}
  >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=128)
  >>> q = jqtz.quantize_params(params, [(r".*/kernel", spec)])
  >>> q["params"]["dense"]["kernel"]
  QArray(int4, shape=(256, 64), g128, scale=float32, dtype=float32)
  >>> jqtz.dequantize_params(q)["params"]["dense"]["kernel"].shape
  (256, 64)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqtz import rules as rules_lib
from jqtz.qarray import QArray, is_qarray
from jqtz.quantize import quantize


def quantize_params(params, rules, *, strict: bool = False):
    """Quantize the leaves of `params` that `rules` select; the rest pass through unchanged.

    Args:
      params: a pytree of arrays (linen variables, an NNX `State`, a plain dict, ...).
      rules: a `QuantSpec`, a `Rule`, or an ordered list of `Rule`s / `(regex, spec)` pairs;
        see `jqtz.rules`.
      strict: raise instead of warning when a rule matches nothing.

    Returns:
      A tree of the same structure whose selected leaves are `QArray`s.

    Raises:
      ValueError: a selected leaf holds NaN/Inf (the path and count are named), its shape does
        not fit its spec, or (with `strict`) a rule matched nothing.
    """
    plan = rules_lib.plan(params, rules)
    plan.check(strict=strict)
    decisions = plan.by_path()

    def one(keypath, leaf):
        path = rules_lib.path_str(keypath)
        spec, batch_dims = decisions[path].spec, decisions[path].batch_dims
        if spec is None:
            return leaf
        if not isinstance(leaf, jax.core.Tracer):
            x = jnp.asarray(leaf)
            bad = int(x.size - jnp.count_nonzero(jnp.isfinite(x)))
            if bad:
                raise ValueError(
                    f"parameter {path!r} has {bad} non-finite values (NaN or Inf) out of "
                    f"{x.size}; fix the checkpoint or keep it in full precision with "
                    f"Rule({path!r}, None)"
                )
        try:
            q = quantize(leaf, spec, batch_dims=batch_dims)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise type(e)(f"parameter {path!r}: {e}") from None
        if not isinstance(leaf, jax.core.Tracer):
            scale = q.scale_values()
            if not bool(jnp.all(jnp.isfinite(scale))):
                raise ValueError(
                    f"parameter {path!r}: scales overflow {spec.scale_dtype} (largest weight "
                    f"{float(jnp.max(jnp.abs(leaf)))}); use scale_dtype='float32' or 'bfloat16'"
                )
        return q

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_qarray)


def dequantize_params(tree, dtype=None):
    """Replace every `QArray` in `tree` by its dequantized array (in `dtype`, default its own)."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if isinstance(x, QArray) else x, tree, is_leaf=is_qarray
    )

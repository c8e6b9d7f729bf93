"""`fake_quant_params`: the QAT weight transform, used inside the loss function.

    def loss_fn(params, learned, batch):
        fq = jqtz.qat.fake_quant_params(params, rules, learned=learned)
        return loss(model.apply(fq, batch.x), batch.y)

Every parameter that `rules` quantize (the same rules, formats, granularities and range choices
as `jqtz.quantize_params`) is replaced by its quantize-dequantize (`jqtz.qat.fake_quant`), in
the parameter's dtype, so the model runs unmodified; the others pass through. Gradients reach
the full-precision parameters through the straight-through estimator, and the learned scales
(`learned=`) through LSQ. Works on linen variables, NNX `State`s and any pytree, under `jit`,
`grad` and sharding; stacked layers (Rule `batch_dims`, as `nn.scan` stores them) are fake-
quantized layer by layer, as `quantize_params` quantizes them.

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (32, 8))}}
  >>> rules = [(".*kernel", jqtz.QuantSpec(format="int4"))]
  >>> fq = jqtz.qat.fake_quant_params(params, rules)
  >>> want = jqtz.dequantize_params(jqtz.quantize_params(params, rules))
  >>> bool(jnp.array_equal(fq["dense"]["kernel"], want["dense"]["kernel"]))
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqtz import rules as rules_lib
from jqtz.qarray import is_qarray
from jqtz.qat import _tree
from jqtz.qat.fp8 import delayed_scale
from jqtz.qat.ste import fake_quant

__all__ = ["fake_quant_params"]


def fake_quant_params(params, rules, *, learned=None, clipped_ste: bool = False, amax_history=None):
    """Quantize-dequantize the parameters that `rules` select, with STE/LSQ gradients.

    Args:
      params: the full-precision parameter tree.
      rules: a `QuantSpec`, `Rule` or list of rules, as for `jqtz.quantize_params`.
      learned: optional learned step sizes (`init_learned_scales`); parameters with an entry
        use its `"scale"` (and `"zero_point"`) instead of ranges chosen from the weights.
      clipped_ste: zero gradient for weights outside the code range.
      amax_history: optional FP8 delayed-scaling history (`init_amax_history`); FP8 per-tensor
        weights with a `"weight"` history use its delayed scale.

    Returns:
      A tree shaped like `params`, in the same dtypes, with fake-quantized leaves.

    Raises:
      ValueError: `learned` or `amax_history` has entries for parameters that the rules do not
        quantize, or shapes that do not fit; a rule matched nothing is only a warning.
    """
    decisions, learned_by_path, history_by_path = _tree.plan_with_state(
        params, rules, learned, amax_history
    )

    def one(keypath, leaf):
        path = rules_lib.path_str(keypath)
        spec, batch_dims = decisions[path].spec, decisions[path].batch_dims
        if spec is None:
            return leaf
        entry = learned_by_path.get(path, {})
        try:
            if "scale" in entry:
                learned_fq = _tree.per_layer(
                    lambda x, s, z: fake_quant(
                        x, spec, scale=s, zero_point=z, clipped_ste=clipped_ste
                    ),
                    batch_dims,
                )
                return learned_fq(leaf, entry["scale"], entry.get("zero_point"))
            history = history_by_path.get(path, {}).get("weight")
            if history is not None:
                amax = jnp.max(jnp.abs(jax.lax.stop_gradient(leaf).astype(jnp.float32)))
                scale = jax.lax.stop_gradient(delayed_scale(history, amax, spec))
                return fake_quant(leaf, spec, scale=scale, clipped_ste=clipped_ste, grad_scale=0.0)
            current = _tree.per_layer(
                lambda x: fake_quant(x, spec, clipped_ste=clipped_ste), batch_dims
            )
            return current(leaf)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise type(e)(f"parameter {path!r}: {e}") from None

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_qarray)

"""Activation fake quantization for unmodified Flax models (linen interceptor, NNX seam).

A weight whose spec has `activation=` (W8A8, W4A8, FP8) is served with its *input* quantized
(`jqtz.nn.dot_general`). For QAT the same happens to the input, as a fake quantization with a
straight-through gradient, at the same place and in the same dtype:

- dynamic ranges (the default): chosen from the input at each call, per token with
  `QuantSpec(format="int8", axis=-1)`, per tensor with `granularity="tensor"`;
- static ranges: a learned `"act_scale"` for the weight's path in `learned`
  (`init_learned_scales(..., act_scales=calibrated)`), with LSQ gradients; freeze it with
  `partition_labels` to keep calibrated static ranges;
- FP8 delayed scaling: an `"input"` history in `amax_history`; each input's amax is recorded in
  `input_amax` for `update_amax_history`.

**linen**: `with jqtz.qat.fake_quant_activations(rules, learned):` around `model.apply`, inside
the loss (a scoped `flax.linen.intercept_methods`, like `jqtz.nn.quantized_ops`; JAX is not
patched). It covers `nn.Dense`, `nn.DenseGeneral` (without `batch_dims`), `nn.Einsum` and
`nn.Embed.attend`. A module's weight path is matched against the rules both with the `params/`
collection prefix (`params/layers_0/mlp/up_proj/kernel`) and without it.

**NNX**: `jqtz.qat.fake_quant_nnx(model, rules, learned)` sets the `dot_general` seam of every
`nnx.Linear` whose kernel has an activation spec (in place, no copy). Call it on the model that
`nnx.merge` builds inside the loss, so learned scales are traced values of that call:

    def loss_fn(params, learned, x, y):
        model = nnx.merge(graphdef, jqtz.qat.fake_quant_params(params, rules, learned=learned))
        jqtz.qat.fake_quant_nnx(model, rules, learned)
        return jnp.mean((model(x) - y) ** 2)

Example:
  >>> import jax, jax.numpy as jnp, jqtz
  >>> from flax import linen as nn
  >>> model = nn.Dense(8)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 16)))
  >>> act = jqtz.QuantSpec(format="int8", granularity="channel", axis=-1)
  >>> rules = [(".*kernel", jqtz.QuantSpec(format="int8", activation=act))]
  >>> def loss(params, x):
  ...     with jqtz.qat.fake_quant_activations(rules):
  ...         return model.apply(jqtz.qat.fake_quant_params(params, rules), x).sum()
  >>> g = jax.jit(jax.grad(loss))(params, jnp.ones((2, 16)))
  >>> g["params"]["kernel"].shape
  (16, 8)
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jqtz import rules as rules_lib
from jqtz.qat import _tree
from jqtz.qat.fp8 import delayed_scale
from jqtz.qat.ste import fake_quant

__all__ = ["ActivationQuantizer", "fake_quant_activations", "fake_quant_nnx"]


def _nested(path: str, leaf) -> dict:
    tree = leaf
    for key in reversed(path.split("/")):
        tree = {key: tree}
    return tree


class ActivationQuantizer:
    """Fake-quantizes the inputs of products with weights whose spec has an activation spec.

    Attributes:
      input_amax: `{weight path: amax}` of the inputs seen by weights with an FP8 `"input"`
        history (traced values of the current call: return them from the loss as auxiliary
        output and pass them to `update_amax_history`).
    """

    def __init__(self, rules, learned=None, *, clipped_ste=False, amax_history=None):
        self.rules = rules_lib.normalize_rules(rules)
        self.learned = _tree.entries(learned, name="learned")
        self.history = _tree.entries(amax_history, name="amax_history")
        self.clipped_ste = bool(clipped_ste)
        self.input_amax: dict = {}
        self._decisions: dict = {}

    def decide(self, candidates: tuple[str, ...], weight) -> tuple[str, object] | None:
        """`(path, activation spec)` for the weight at the first candidate path a rule matches
        (the rules' default-keep logic included), or None: no activation quantization."""
        key = (candidates, tuple(weight.shape), str(weight.dtype))
        if key not in self._decisions:
            found = None
            for path in candidates:
                leaf = jax.ShapeDtypeStruct(weight.shape, weight.dtype)
                (d,) = rules_lib.plan(_nested(path, leaf), self.rules).decisions
                if d.rule is None:
                    continue
                if d.spec is not None and d.spec.activation is not None:
                    found = (path, d.spec.activation)
                break
            if found is not None:
                # Side trees may be keyed with or without the collection prefix.
                known = next(
                    (p for p in candidates if p in self.learned or p in self.history), None
                )
                found = (known or found[0], found[1])
            self._decisions[key] = found
        return self._decisions[key]

    def quantize_input(self, path: str, spec, x: jax.Array) -> jax.Array:
        """`x` fake-quantized as `spec` says, with this weight's static or delayed range."""
        scale = self.learned.get(path, {}).get("act_scale")
        history = self.history.get(path, {}).get("input")
        if scale is not None:
            return fake_quant(x, spec, scale=scale, clipped_ste=self.clipped_ste)
        if history is not None:
            amax = jnp.max(jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32)))
            self.input_amax[path] = amax
            scale = jax.lax.stop_gradient(delayed_scale(history, amax, spec))
            return fake_quant(x, spec, scale=scale, clipped_ste=self.clipped_ste, grad_scale=0.0)
        return fake_quant(x, spec, clipped_ste=self.clipped_ste)

    # -- linen ---------------------------------------------------------------------------------
    def _linen_candidates(self, module, name: str) -> tuple[str, ...]:
        path = "/".join((*module.scope.path, name))
        return (f"params/{path}", path)

    def intercept(self, next_fun, args, kwargs, context):
        """A `flax.linen.intercept_methods` interceptor (see the module docstring)."""
        entry = _LINEN.get((type(context.module), context.method_name))
        if entry is None or not args:
            return next_fun(*args, **kwargs)
        name, supported = entry
        module = context.module
        weight = module.variables.get("params", {}).get(name)
        if weight is None or not supported(module):
            return next_fun(*args, **kwargs)
        found = self.decide(self._linen_candidates(module, name), weight)
        if found is None:
            return next_fun(*args, **kwargs)
        path, spec = found
        x = args[0]
        bias = module.variables["params"].get("bias")
        dtype = module.dtype or jnp.result_type(
            *(a.dtype for a in (x, weight, bias) if a is not None)
        )
        x = self.quantize_input(path, spec, jnp.asarray(x, dtype))
        return next_fun(x, *args[1:], **kwargs)


# (module type, method) -> (weight name, whether this instance is supported)
_LINEN = {
    (nn.Dense, "__call__"): ("kernel", lambda m: True),
    (nn.DenseGeneral, "__call__"): ("kernel", lambda m: not m.batch_dims),
    (nn.Einsum, "__call__"): ("kernel", lambda m: True),
    (nn.Embed, "attend"): ("embedding", lambda m: True),
}


@contextlib.contextmanager
def fake_quant_activations(rules, learned=None, *, clipped_ste=False, amax_history=None):
    """Within this block, linen products with weights that `rules` give an activation spec
    fake-quantize their inputs (see the module docstring). Enter it inside the loss function.

    Args:
      rules: the same rules as for `fake_quant_params`.
      learned: optional learned scales; `"act_scale"` entries give static input ranges.
      clipped_ste: zero gradient for inputs outside the code range.
      amax_history: optional FP8 history; `"input"` entries give delayed input scales.

    Yields:
      The `ActivationQuantizer` (its `input_amax` feeds `update_amax_history`).
    """
    quantizer = ActivationQuantizer(
        rules, learned, clipped_ste=clipped_ste, amax_history=amax_history
    )
    with nn.intercept_methods(quantizer.intercept):
        yield quantizer


def _fake_quant_dot(quantizer, path, spec, base, lhs, rhs, *args, **kwargs):
    return base(quantizer.quantize_input(path, spec, lhs), rhs, *args, **kwargs)


def fake_quant_nnx(
    model: nnx.Module, rules, learned=None, *, clipped_ste=False, amax_history=None
) -> ActivationQuantizer:
    """Fake-quantize the inputs of the `nnx.Linear` layers of `model` whose kernel has an
    activation spec, by setting their `dot_general` seam (in place; see the module docstring).

    Returns:
      The `ActivationQuantizer` (its `input_amax` feeds `update_amax_history`).
    """
    quantizer = ActivationQuantizer(
        rules, learned, clipped_ste=clipped_ste, amax_history=amax_history
    )
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Linear):
            continue
        kernel = node.kernel.get_value()
        found = quantizer.decide(("/".join(map(str, (*path, "kernel"))),), kernel)
        if found is not None:
            base = node.dot_general
            if isinstance(base, functools.partial) and base.func is _fake_quant_dot:
                base = base.args[3]  # called again on the same model: replace, do not stack
            node.dot_general = functools.partial(_fake_quant_dot, quantizer, *found, base)
    return quantizer

"""Side trees keyed by parameter path: learned scales and FP8 amax histories.

A side tree holds, for some parameter paths (`"params/layers_0/mlp/up_proj/kernel"`), a small
dict of named arrays (`{"scale": ..., "zero_point": ...}`). It is stored as nested plain dicts,
one level per path component, so that optax and orbax see an ordinary pytree, whatever the
parameter tree is (linen dict, NNX `State`):

    {"params": {"layers_0": {"mlp": {"up_proj": {"kernel": {"scale": Array}}}}}}
"""

from __future__ import annotations

import jax

from jqtz import rules as rules_lib
from jqtz.qarray import is_qarray
from jqtz.rules import path_str


def nest(entries: dict[str, dict]) -> dict:
    """`{path: {field: array}}` -> nested dicts, one level per `/`-separated path component."""
    out: dict = {}
    for path, fields in entries.items():
        node = out
        for key in path.split("/"):
            node = node.setdefault(key, {})
        node.update(fields)
    return out


def entries(tree, *, name: str) -> dict[str, dict]:
    """Inverse of `nest`: `{path: {field: array}}`; `tree` None gives `{}`.

    Raises:
      TypeError: naming `name`, when `tree` is not a tree of arrays under parameter paths.
    """
    if tree is None:
        return {}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out: dict[str, dict] = {}
    for kp, leaf in flat:
        path = path_str(kp)
        if "/" not in path:
            raise TypeError(
                f"`{name}` must map parameter paths to dicts of arrays (as "
                f"`jqtz.qat.init_learned_scales` returns), got a leaf at {path!r}"
            )
        param, field = path.rsplit("/", 1)
        out.setdefault(param, {})[field] = leaf
    return out


def leaves_by_path(params) -> dict:
    """`{path: leaf}` of a parameter tree (QArrays are leaves)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)
    return {path_str(kp): leaf for kp, leaf in flat}


def check_known(side: dict[str, dict], decisions: dict, *, name: str) -> None:
    """Every path of a side tree must be a parameter that the rules quantize.

    Raises:
      ValueError: naming `name` and the path.
    """
    for path in side:
        d = decisions.get(path)
        if d is None:
            raise ValueError(
                f"`{name}` has an entry for {path!r}, which is not a parameter path of `params`"
            )
        if d.spec is None:
            raise ValueError(
                f"`{name}` has an entry for {path!r}, which the rules do not quantize "
                f"({d.reason}); drop the entry or add a rule for it"
            )


def per_layer(fn, batch_dims: int):
    """`fn` mapped over `batch_dims` leading axes of all its arguments (stacked layers, each
    quantized on its own as `jqtz.quantize(..., batch_dims=...)` does); `fn` itself for 0."""
    for _ in range(batch_dims):
        fn = jax.vmap(fn)
    return fn


def refuse_stacked(decisions, paths, *, what: str) -> None:
    """Raise ValueError when one of `paths` is a stacked parameter (Rule `batch_dims`), which
    `what` does not support yet; names the parameter and the fix."""
    for path in paths:
        d = decisions.get(path)
        if d is not None and d.spec is not None and d.batch_dims:
            raise ValueError(
                f"{what} for stacked layers (Rule batch_dims) is not supported yet: parameter "
                f"{path!r} is stacked. Train the weights with learned or current scales, or "
                "unstack the layers first"
            )


def plan_with_state(params, rules, learned, amax_history, *, strict: bool = False):
    """The rules' decisions per path, and the learned scales and FP8 histories per path, checked
    to belong to quantized parameters. Rules that match nothing warn (or raise with `strict`).
    Stacked parameters (Rule `batch_dims`) take learned weight scales with their leading axes;
    FP8 delayed-scaling histories and learned activation ranges are refused for them."""
    plan = rules_lib.plan(params, rules)
    plan.check(strict=strict, stacklevel=4)
    decisions = plan.by_path()
    learned_by_path = entries(learned, name="learned")
    history_by_path = entries(amax_history, name="amax_history")
    check_known(learned_by_path, decisions, name="learned")
    check_known(history_by_path, decisions, name="amax_history")
    refuse_stacked(decisions, history_by_path, what="FP8 delayed scaling (amax_history)")
    act = [p for p, e in learned_by_path.items() if "act_scale" in e]
    refuse_stacked(decisions, act, what="a learned activation range (act_scale)")
    return decisions, learned_by_path, history_by_path

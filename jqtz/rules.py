"""Rules: which parameters to quantize and how, as plain data matched on parameter paths.

A parameter's path is its keys joined by `/` (`"layers_3/mlp/down_proj/kernel"`); NNX states give
the same paths (the `Variable`'s `.value` is not part of it). Rules are an ordered list; the first
rule whose regex *fully* matches a path decides: quantize with its `QuantSpec`, or keep the
parameter in full precision when its spec is None.

Some parameters stay in full precision unless a rule sets `force=True` (what users expect):
embeddings, the output head (`lm_head`, `unembed`), norms, biases, leaves of fewer than two
dimensions, and anything not floating point. `plan` says what happens to every leaf and why, and
which rules matched nothing.

Example:
  >>> import jax.numpy as jnp, jqtz
  >>> params = {"embed": {"embedding": jnp.ones((10, 4))}, "mlp": {"kernel": jnp.ones((4, 8))}}
  >>> rules = [jqtz.Rule(r".*/kernel", jqtz.QuantSpec(format="int8"))]
  >>> [(d.path, d.action) for d in jqtz.plan(params, rules).decisions]
  [('embed/embedding', 'keep'), ('mlp/kernel', 'int8 channel')]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import numpy as np

from jqtz.qarray import QArray, is_qarray
from jqtz.spec import QuantSpec

# (kind, regex searched in the path): kept in full precision unless a rule says force=True.
DEFAULT_KEEP: tuple[tuple[str, str], ...] = (
    ("output head", r"(?i)(^|/)(lm_head|unembed\w*|output_head|head)(/|$)"),
    ("embedding", r"(?i)(^|/)[^/]*(embed|wte|wpe)[^/]*(/|$)"),
    ("norm", r"(?i)(^|/)([^/]*norm[^/]*|ln(_\w*|\d*))(/|$)"),
    ("bias", r"(?i)(^|/)bias$"),
)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Quantize parameters whose path fully matches `pattern` with `spec` (None: keep).

    Attributes:
      pattern: a regular expression, matched with `re.fullmatch` against the `/`-joined path.
      spec: the `QuantSpec`, or None to keep matching parameters in full precision.
      force: also quantize parameters kept by default (embeddings, heads, norms, biases, 1-D).
      batch_dims: leading axes of stacked layers (`nn.scan` / `nnx.vmap` over layers, e.g. a
        kernel `[layers, K, N]`): `spec` applies to each slice (`jqtz.quantize(...,
        batch_dims=...)`), so groups never span layers and `scan` hands each layer its own
        QArray. 0 (default): the leaf is one array.

    Example (layers stacked by `nn.scan`):
      >>> import jax.numpy as jnp, jqtz
      >>> params = {"layers": {"mlp": {"kernel": jnp.ones((4, 256, 64))}}}
      >>> spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=128)
      >>> q = jqtz.quantize_params(params, [jqtz.Rule(r".*/kernel", spec, batch_dims=1)])
      >>> k = q["layers"]["mlp"]["kernel"]
      >>> k.batch_shape, k.shape, k.block_shape
      ((4,), (256, 64), (128, 1))
    """

    pattern: str
    spec: QuantSpec | None
    force: bool = False
    batch_dims: int = 0

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule pattern must be a str, got {type(self.pattern).__name__}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regex: {e}") from None
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise TypeError(
                f"Rule {self.pattern!r}: spec must be a QuantSpec or None, "
                f"got {type(self.spec).__name__}"
            )
        b = self.batch_dims
        if not isinstance(b, int) or isinstance(b, bool) or b < 0:
            raise ValueError(f"Rule {self.pattern!r}: batch_dims must be an int >= 0, got {b!r}")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What happens to one leaf: its spec (None: kept) and the reason."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    spec: QuantSpec | None
    reason: str
    rule: int | None
    batch_dims: int = 0

    @property
    def action(self) -> str:
        if self.spec is None:
            return "keep"
        from jqtz import _blocks

        shape = self.shape[self.batch_dims :]
        block = self.spec.block_shape_for(shape, path=self.path)
        action = f"{self.spec.storage_format.name} {_blocks.describe(shape, block)}"
        if self.batch_dims:
            action += f", {'x'.join(map(str, self.shape[: self.batch_dims]))} stacked"
        return action


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every leaf's `Decision`, and the rules that matched no leaf or only protected ones."""

    decisions: tuple[Decision, ...]
    unmatched_rules: tuple[int, ...]
    protected_only_rules: tuple[int, ...]
    rules: tuple[Rule, ...]
    #: paths of leaves of rank >= 3 whose groups are cut short by a first axis smaller than the
    #: group: layers stacked by `scan` (groups would span layers) without `batch_dims`.
    maybe_stacked: tuple[str, ...] = ()

    def by_path(self) -> dict[str, Decision]:
        return {d.path: d for d in self.decisions}

    def check(self, *, strict: bool = False, stacklevel: int = 3) -> None:
        """Warn about rules that did nothing (`warnings()`); with `strict`, raise ValueError."""
        import warnings as _warnings

        for msg in self.warnings():
            if strict:
                raise ValueError(msg)
            _warnings.warn(msg, UserWarning, stacklevel=stacklevel)

    def warnings(self) -> list[str]:
        out = [
            f"rule {i} ({self.rules[i].pattern!r}) matched no parameter"
            for i in self.unmatched_rules
        ]
        out += [
            f"rule {i} ({self.rules[i].pattern!r}) matched only parameters kept by default "
            "(embeddings, heads, norms, biases, 1-D); set force=True to quantize them"
            for i in self.protected_only_rules
        ]
        if self.maybe_stacked:
            p = self.maybe_stacked[0]
            shape = self.by_path()[p].shape
            out.append(
                f"{len(self.maybe_stacked)} parameter(s) of rank >= 3 have a first axis shorter "
                f"than their group (e.g. {p!r}, shape {shape}), so each group holds only "
                f"{shape[0]} values along it. If these are layers stacked by nn.scan or "
                "nnx.vmap, quantize each layer on its own with Rule(..., batch_dims=1)"
            )
        return out


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(keypath) -> str:
    """`/`-joined names of a JAX key path, without the trailing `.value` of an NNX Variable."""
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_name(k) for k in keys)


def normalize_rules(rules) -> tuple[Rule, ...]:
    """Accept a `QuantSpec` (applies to every eligible leaf), a `Rule`, or a sequence of rules
    and `(pattern, spec)` pairs."""
    if isinstance(rules, QuantSpec):
        return (Rule(".*", rules),)
    if isinstance(rules, Rule):
        return (rules,)
    if isinstance(rules, str) or not isinstance(rules, Sequence):
        raise TypeError(
            "`rules` must be a QuantSpec, a Rule, or a list of Rule / (pattern, spec) pairs, "
            f"got {type(rules).__name__}"
        )
    out = []
    for i, r in enumerate(rules):
        if isinstance(r, Rule):
            out.append(r)
        elif isinstance(r, tuple) and len(r) == 2:
            try:
                out.append(Rule(*r))
            except (TypeError, ValueError) as e:
                raise type(e)(f"rules[{i}]: {e}") from None
        else:
            raise TypeError(f"rules[{i}] must be a Rule or a (pattern, spec) pair, got {r!r}")
    return tuple(out)


def default_keep_reason(path: str, shape, dtype) -> str | None:
    """Why a leaf stays in full precision by default, or None if it is eligible."""
    if not np.issubdtype(np.dtype(dtype), np.floating) and np.dtype(dtype).name not in (
        "bfloat16",
        "float16",
    ):
        return "not floating point"
    if len(shape) < 2:
        return "1-D leaf"
    for kind, regex in DEFAULT_KEEP:
        if re.search(regex, path):
            return kind
    return None


def _leaves_with_paths(params):
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)
    return [(path_str(kp), leaf) for kp, leaf in flat]


def plan(params, rules) -> Plan:
    """Decide, for every leaf of `params`, whether and how it is quantized (nothing is run)."""
    rules = normalize_rules(rules)
    decisions = []
    applied = [0] * len(rules)
    maybe_stacked: list[str] = []
    matched = [0] * len(rules)
    for path, leaf in _leaves_with_paths(params):
        shape, dtype = tuple(np.shape(leaf)), np.dtype(getattr(leaf, "dtype", np.float32))
        idx = next((i for i, r in enumerate(rules) if r.matches(path)), None)
        protected = default_keep_reason(path, shape, dtype)
        if idx is not None:
            matched[idx] += 1
        if isinstance(leaf, QArray):
            d = Decision(path, leaf.shape, np.dtype(leaf.dtype), None, "already quantized", idx)
        elif idx is None:
            reason = f"kept by default: {protected}" if protected else "no rule matched"
            d = Decision(path, shape, dtype, None, reason, None)
        else:
            rule = rules[idx]
            if rule.spec is None:
                d = Decision(path, shape, dtype, None, f"rule {idx}: keep", idx)
            elif protected and not (rule.force and protected != "not floating point"):
                d = Decision(path, shape, dtype, None, f"kept by default: {protected}", idx)
            else:
                b = rule.batch_dims
                if b and len(shape) <= b:
                    raise ValueError(
                        f"parameter {path!r} of shape {shape}: rule {idx} stacks batch_dims={b} "
                        "leading axes, but the leaf has no axes left to quantize"
                    )
                rule.spec.block_shape_for(shape[b:], path=path)  # shape errors name the path
                if not b and _groups_cut_short(rule.spec, shape):
                    maybe_stacked.append(path)
                applied[idx] += 1
                d = Decision(path, shape, dtype, rule.spec, f"rule {idx}", idx, b)
        decisions.append(d)
    unmatched = tuple(i for i, n in enumerate(matched) if n == 0)
    protected_only = tuple(
        i for i, r in enumerate(rules) if matched[i] and not applied[i] and r.spec is not None
    )
    return Plan(tuple(decisions), unmatched, protected_only, rules, tuple(maybe_stacked))


def _groups_cut_short(spec: QuantSpec, shape) -> bool:
    """A group along axis 0 of a rank >= 3 leaf that is longer than that axis (a `[layers, K,
    N]` kernel quantized whole: the groups would run across layers)."""
    if spec.granularity != "group" or len(shape) < 3:
        return False
    axes = spec.axis if isinstance(spec.axis, tuple) else (spec.axis,)
    return any(a % len(shape) == 0 for a in axes) and shape[0] < spec.group_size

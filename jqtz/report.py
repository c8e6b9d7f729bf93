"""Reports: what quantization did to each parameter, and where the bytes of a tree go.

`quantization_report(params, qparams, rules)` compares a full-precision tree with its quantized
counterpart (from any method: RTN, GPTQ, ...): per parameter the format, granularity, bytes
before and after, relative Frobenius error and max abs error. `memory_report(tree)` sums bytes
by dtype/format and compares the total with the same tree in bf16.

Both print as readable tables and convert to plain dicts (`to_dict()`) for JSON.

Example:
  >>> import jax.numpy as jnp, jqtz
  >>> params = {"mlp": {"kernel": jnp.ones((256, 64)), "bias": jnp.zeros(64)}}
  >>> q = jqtz.quantize_params(params, jqtz.QuantSpec(format="int8"))
  >>> jqtz.memory_report(q).total_bytes  # int8 codes + f32 channel scales + the f32 bias
  16896
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jqtz import rules as rules_lib
from jqtz.qarray import QArray, is_qarray


def _nbytes(x) -> int:
    if isinstance(x, QArray):
        return x.nbytes
    return int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A plain-text table: columns padded to width, those in `right` right-aligned."""
    header = [str(c) for c in header]
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


@jax.jit
def _errors(w, q: QArray):
    w = w.astype(jnp.float32)
    d = q.dequantize(jnp.float32) - w
    norm = jnp.linalg.norm(w.ravel())
    rel = jnp.where(norm > 0, jnp.linalg.norm(d.ravel()) / jnp.where(norm > 0, norm, 1.0), 0.0)
    return rel, jnp.max(jnp.abs(d))


@dataclasses.dataclass(frozen=True)
class ParamRow:
    path: str
    shape: tuple[int, ...]
    action: str  # "int4 g128" or "keep"
    reason: str
    bytes_before: int
    bytes_after: int
    rel_error: float | None
    max_abs_error: float | None


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """Per-parameter results of a quantization, and the rules that did nothing."""

    rows: tuple[ParamRow, ...]
    rule_warnings: tuple[str, ...] = ()

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "params": [dataclasses.asdict(r) for r in self.rows],
            "rule_warnings": list(self.rule_warnings),
        }

    def __str__(self):
        header = [
            "parameter",
            "shape",
            "quantized",
            "before",
            "after",
            "ratio",
            "rel err",
            "max abs err",
        ]
        rows = []
        for r in self.rows:
            rows.append(
                [
                    r.path,
                    "x".join(map(str, r.shape)) or "scalar",
                    r.action if r.action != "keep" else f"keep ({r.reason})",
                    _fmt_bytes(r.bytes_before),
                    _fmt_bytes(r.bytes_after),
                    f"{r.bytes_after / r.bytes_before:.3f}" if r.bytes_before else "-",
                    "-" if r.rel_error is None else f"{r.rel_error:.2e}",
                    "-" if r.max_abs_error is None else f"{r.max_abs_error:.2e}",
                ]
            )
        nq = sum(r.action != "keep" for r in self.rows)
        total = (
            f"{nq} of {len(self.rows)} parameters quantized; "
            f"{_fmt_bytes(self.bytes_before)} -> {_fmt_bytes(self.bytes_after)} "
            f"({self.bytes_after / max(self.bytes_before, 1):.3f}x)"
        )
        out = [format_table(header, rows, right={3, 4, 5, 6, 7}), "", total]
        out += [f"warning: {w}" for w in self.rule_warnings]
        return "\n".join(out)


def quantization_report(params, qparams, rules=None) -> QuantReport:
    """Compare `params` with `qparams = quantize(params, ...)`, leaf by leaf.

    Args:
      params: the full-precision tree.
      qparams: the same tree with some leaves replaced by `QArray`s.
      rules: the rules used, if known: the report then says why each kept leaf was kept and
        lists the rules that matched nothing.
    """
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    q_by_path = {
        rules_lib.path_str(kp): leaf
        for kp, leaf in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_qarray)[0]
    }
    reasons, rule_warnings = {}, ()
    if rules is not None:
        plan = rules_lib.plan(params, rules)
        reasons = {d.path: d.reason for d in plan.decisions}
        rule_warnings = tuple(plan.warnings())
    rows = []
    for kp, w in flat_p:
        path = rules_lib.path_str(kp)
        if path not in q_by_path:
            raise ValueError(f"`qparams` has no leaf at {path!r}: it is not a quantized `params`")
        q = q_by_path[path]
        if isinstance(q, QArray):
            rel, mx = (float(v) for v in _errors(jnp.asarray(w), q))
            action = f"{q.format.name} {q.granularity}"
            rows.append(
                ParamRow(path, tuple(np.shape(w)), action, "", _nbytes(w), q.nbytes, rel, mx)
            )
        else:
            rows.append(
                ParamRow(
                    path,
                    tuple(np.shape(w)),
                    "keep",
                    reasons.get(path, "full precision"),
                    _nbytes(w),
                    _nbytes(q),
                    None,
                    None,
                )
            )
    return QuantReport(tuple(rows), rule_warnings)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of a tree by storage kind (`int4 g128`, `float32`, ...) against the tree in bf16."""

    by_kind: dict[str, dict[str, int]]  # kind -> {"leaves", "elements", "bytes"}
    total_bytes: int
    bf16_bytes: int

    @property
    def ratio_vs_bf16(self) -> float:
        return self.total_bytes / max(self.bf16_bytes, 1)

    def to_dict(self) -> dict:
        return {
            "by_kind": self.by_kind,
            "total_bytes": self.total_bytes,
            "bf16_bytes": self.bf16_bytes,
            "ratio_vs_bf16": self.ratio_vs_bf16,
        }

    def __str__(self):
        rows = []
        for kind, v in sorted(self.by_kind.items(), key=lambda kv: -kv[1]["bytes"]):
            bits = 8 * v["bytes"] / max(v["elements"], 1)
            rows.append(
                [
                    kind,
                    str(v["leaves"]),
                    f"{v['elements']:,}",
                    _fmt_bytes(v["bytes"]),
                    f"{bits:.3f}",
                ]
            )
        table = format_table(
            ["storage", "leaves", "elements", "bytes", "bits/elem"], rows, right={1, 2, 3, 4}
        )
        return (
            f"{table}\n\ntotal {_fmt_bytes(self.total_bytes)}; the same tree in bf16: "
            f"{_fmt_bytes(self.bf16_bytes)} ({self.ratio_vs_bf16:.3f}x)"
        )


def memory_report(tree) -> MemoryReport:
    """Bytes by dtype / quantized format, and the total against the same tree stored in bf16.

    Non-floating leaves count at their own size in both totals.
    """
    by_kind: dict[str, dict[str, int]] = {}
    total = bf16 = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray):
        if isinstance(leaf, QArray):
            kind = f"{leaf.format.name} {leaf.granularity}"
            n = leaf.size
            floating = True
        else:
            kind = np.dtype(leaf.dtype).name
            n = math.prod(np.shape(leaf))
            floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        b = _nbytes(leaf)
        e = by_kind.setdefault(kind, {"leaves": 0, "elements": 0, "bytes": 0})
        e["leaves"] += 1
        e["elements"] += n
        e["bytes"] += b
        total += b
        bf16 += 2 * n if floating else b
    return MemoryReport(by_kind, total, bf16)

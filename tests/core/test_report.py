"""Reports: bytes, errors and tables of `quantization_report` and `memory_report`."""

import doctest
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqtz
from jqtz import report as report_lib
from jqtz.spec import QuantSpec

from . import _reference as ref

INT4_G128_BF16 = QuantSpec(
    format="int4", granularity="group", group_size=128, scale_dtype="bfloat16"
)
RULES = [
    (r"blocks_0/attn/kernel", QuantSpec(format="int8")),
    (
        r".*/mlp/kernel",
        QuantSpec(format="nf4", granularity="group", group_size=32, double_quant=True),
    ),
    (r".*/kernel", QuantSpec(format="int3", granularity="group", group_size=16, symmetric=False)),
    (r"blocks_0/.*", QuantSpec()),  # meets only leaves kept by default
    (r"missing/.*", QuantSpec()),
]


def _params():
    k = jax.random.split(jax.random.key(0), 5)
    return {
        "tok_embed": {"embedding": jax.random.normal(k[0], (64, 32))},
        "blocks_0": {
            "attn": {"kernel": jax.random.normal(k[1], (32, 48)), "bias": jnp.ones((48,))},
            "mlp": {"kernel": jax.random.normal(k[2], (48, 32)).astype(jnp.bfloat16)},
            "norm": {"scale": jnp.ones((32,))},
        },
        "blocks_1": {"attn": {"kernel": jax.random.normal(k[3], (40, 24)) * 0.1}},
    }


def _paths(tree):
    return [jqtz.rules.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.fixture(scope="module")
def quantized():
    params = _params()
    with pytest.warns(UserWarning) as record:
        q = jqtz.quantize_params(params, RULES)
    assert [str(w.message)[:7] for w in record] == ["rule 4 ", "rule 3 "]
    return params, q


def test_docstring_examples():
    assert doctest.testmod(report_lib).failed == 0


def test_quantization_report_bytes_are_the_real_bytes(quantized):
    params, q = quantized
    rep = jqtz.quantization_report(params, q, RULES)
    assert [r.path for r in rep.rows] == _paths(params)
    flat_q = dict(
        (jqtz.rules.path_str(kp), leaf)
        for kp, leaf in jax.tree_util.tree_flatten_with_path(q, is_leaf=jqtz.is_qarray)[0]
    )
    flat_p = dict(zip(_paths(params), jax.tree_util.tree_leaves(params), strict=True))
    for row in rep.rows:
        assert row.bytes_before == np.asarray(flat_p[row.path]).nbytes
        assert row.bytes_after == ref.real_nbytes(flat_q[row.path])
    assert rep.bytes_before == ref.real_nbytes(params)
    assert rep.bytes_after == ref.real_nbytes(q)


def test_quantization_report_errors_match_numpy(quantized):
    params, q = quantized
    rep = {r.path: r for r in jqtz.quantization_report(params, q, RULES).rows}
    checked = 0
    for kp, leaf in jax.tree_util.tree_flatten_with_path(q, is_leaf=jqtz.is_qarray)[0]:
        path = jqtz.rules.path_str(kp)
        row = rep[path]
        if not isinstance(leaf, jqtz.QArray):
            assert row.action == "keep" and row.rel_error is None and row.max_abs_error is None
            continue
        w = np.asarray(jax.tree_util.tree_leaves(params)[_paths(params).index(path)], np.float64)
        diff = ref.dequantize(leaf).astype(np.float64) - w
        assert row.rel_error == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(w), rel=1e-5)
        assert row.max_abs_error == pytest.approx(np.abs(diff).max(), rel=1e-5)
        assert row.action == f"{leaf.format.name} {leaf.granularity}"
        checked += 1
    assert checked == 3


def test_quantization_report_says_why_and_warns(quantized):
    params, q = quantized
    rep = jqtz.quantization_report(params, q, RULES)
    rows = {r.path: r for r in rep.rows}
    assert rows["tok_embed/embedding"].reason == "kept by default: embedding"
    assert rows["blocks_0/norm/scale"].reason == "kept by default: 1-D leaf"
    assert rows["blocks_0/attn/bias"].reason == "kept by default: 1-D leaf"
    assert [r.action for r in rep.rows if r.action != "keep"] == [
        "int8 channel",
        "nf4 g32",
        "uint3 g16",
    ]
    assert len(rep.rule_warnings) == 2
    assert "rule 4 ('missing/.*') matched no parameter" in rep.rule_warnings
    text = str(rep)
    for path in _paths(params):
        assert path in text
    assert "3 of 6 parameters quantized" in text and "warning: rule 4" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["bytes_after"] == rep.bytes_after and len(d["params"]) == 6


def test_quantization_report_refuses_unrelated_trees(quantized):
    params, _ = quantized
    with pytest.raises(ValueError, match="`qparams` has no leaf at 'blocks_0/attn/bias'"):
        jqtz.quantization_report(params, {"other": jnp.ones(2)})


def test_relative_error_of_an_all_zero_weight_is_zero():
    params = {"w": {"kernel": jnp.zeros((16, 8))}}
    q = jqtz.quantize_params(params, QuantSpec(format="int4"))
    (row,) = jqtz.quantization_report(params, q).rows
    assert row.rel_error == 0.0 and row.max_abs_error == 0.0


def test_memory_report_int4_g128_bf16_ratio():
    code_bits, scale_bits, group, bf16_bits = 4, 16, 128, 16
    shapes = {"a": (256, 128), "b": (512, 64), "c": (384, 32)}
    params = {name: {"kernel": jnp.ones(shape)} for name, shape in shapes.items()}
    q = jqtz.quantize_params(params, INT4_G128_BF16)
    rep = jqtz.memory_report(q)
    want_ratio = (code_bits + scale_bits / group) / bf16_bits
    assert rep.ratio_vs_bf16 == want_ratio == 4.125 / 16
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert rep.bf16_bytes == 2 * n
    assert rep.total_bytes == ref.real_nbytes(q)
    assert rep.by_kind == {"int4 g128": {"leaves": 3, "elements": n, "bytes": rep.total_bytes}}


def test_memory_report_mixed_tree_table(quantized):
    _, q = quantized
    rep = jqtz.memory_report(q)
    assert rep.total_bytes == ref.real_nbytes(q)
    kinds = {"int8 channel", "nf4 g32", "uint3 g16", "float32"}
    assert set(rep.by_kind) == kinds
    # Full-precision leaves count 2 bytes per element in the bf16 baseline, like quantized ones.
    n = sum(leaf.size for leaf in jax.tree_util.tree_leaves(q, is_leaf=jqtz.is_qarray))
    assert rep.bf16_bytes == 2 * n
    text = str(rep)
    for kind in kinds:
        assert kind in text
    assert f"{rep.ratio_vs_bf16:.3f}x" in text
    assert json.loads(json.dumps(rep.to_dict()))["total_bytes"] == rep.total_bytes


def test_memory_report_counts_integer_leaves_at_their_own_size():
    tree = {"steps": jnp.zeros((10,), jnp.int32), "w": jnp.ones((4, 4), jnp.float32)}
    rep = jqtz.memory_report(tree)
    assert rep.total_bytes == 40 + 64
    assert rep.bf16_bytes == 40 + 32

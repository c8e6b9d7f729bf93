"""Rules and `plan`: first full match wins, None keeps, protected leaves, reported rules."""

import doctest
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jqtz
from jqtz import rules as rules_lib
from jqtz.rules import Rule
from jqtz.spec import QuantSpec

INT8 = QuantSpec(format="int8")
INT4 = QuantSpec(format="int4", granularity="group", group_size=4)


def _params():
    return {
        "embed": {"embedding": jnp.ones((32, 8))},
        "layers_0": {
            "attn": {
                "q_proj": {"kernel": jnp.ones((8, 8))},
                "o_proj": {"kernel": jnp.ones((8, 8))},
            },
            "mlp": {
                "up": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros((16,))},
                "down": {"kernel": jnp.ones((16, 8))},
            },
            "input_norm": {"scale": jnp.ones((8, 1))},
        },
        "ln_f": {"scale": jnp.ones((8, 2))},
        "lm_head": {"kernel": jnp.ones((8, 32))},
        "step_table": jnp.zeros((4, 4), jnp.int32),
        "gate_vector": jnp.ones((8,)),
    }


def _actions(params, rules):
    return {d.path: d for d in jqtz.plan(params, rules).decisions}


def test_docstring_examples():
    assert doctest.testmod(rules_lib).failed == 0


def test_first_matching_rule_wins():
    rules = [Rule(r".*/q_proj/kernel", None), Rule(r".*/kernel", INT4), Rule(r".*q_proj.*", INT8)]
    d = _actions(_params(), rules)
    assert d["layers_0/attn/q_proj/kernel"].spec is None
    assert d["layers_0/attn/q_proj/kernel"].reason == "rule 0: keep"
    assert d["layers_0/attn/o_proj/kernel"].spec == INT4
    assert d["layers_0/attn/o_proj/kernel"].rule == 1
    assert d["layers_0/mlp/down/kernel"].action == "int4 g4"


def test_patterns_must_match_the_whole_path():
    d = _actions(_params(), [Rule("kernel", INT8), Rule("layers_0/mlp", INT8)])
    assert all(x.spec is None and x.rule is None for x in d.values())
    assert d["layers_0/mlp/up/kernel"].reason == "no rule matched"
    d = _actions(
        _params(), [Rule(r"layers_0/mlp/up/kern", INT8), Rule(r"layers_0/mlp/up/kernel", INT4)]
    )
    assert d["layers_0/mlp/up/kernel"].spec == INT4


def test_leaves_kept_by_default_and_why():
    d = _actions(_params(), [Rule(".*", INT8)])
    want = {
        "embed/embedding": "embedding",
        "lm_head/kernel": "output head",
        "layers_0/input_norm/scale": "norm",
        "ln_f/scale": "norm",
        "layers_0/mlp/up/bias": "1-D leaf",
        "gate_vector": "1-D leaf",
        "step_table": "not floating point",
    }
    for path, kind in want.items():
        assert d[path].spec is None, path
        assert d[path].reason == f"kept by default: {kind}", path
    quantized = {p for p, x in d.items() if x.spec is not None}
    assert quantized == {
        "layers_0/attn/q_proj/kernel",
        "layers_0/attn/o_proj/kernel",
        "layers_0/mlp/up/kernel",
        "layers_0/mlp/down/kernel",
    }


@pytest.mark.parametrize(
    "path, kind",
    [
        ("model/wte/kernel", "embedding"),
        ("tok_embeddings/weight", "embedding"),
        ("output_head/kernel", "output head"),
        ("head/kernel", "output head"),
        ("blocks_1/LayerNorm_0/scale", "norm"),
        ("ln_f/scale", "norm"),
        ("h/ln_2/scale", "norm"),
        ("dense/bias", "bias"),
    ],
)
def test_default_keep_patterns(path, kind):
    assert rules_lib.default_keep_reason(path, (8, 8), np.float32) == kind


def test_unembedding_is_kept():
    assert rules_lib.default_keep_reason("unembed/kernel", (8, 8), np.float32) is not None


@pytest.mark.parametrize(
    "path", ["mlp/down_proj/kernel", "attn/headless_proj/kernel", "lnx/kernel"]
)
def test_default_keep_does_not_catch_ordinary_weights(path):
    assert rules_lib.default_keep_reason(path, (8, 8), np.float32) is None


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, np.float32])
def test_half_precision_leaves_are_eligible(dtype):
    assert rules_lib.default_keep_reason("mlp/kernel", (8, 8), dtype) is None


def test_force_quantizes_a_protected_embedding_but_never_an_int_leaf():
    rules = [Rule("embed/embedding", INT8, force=True), Rule("step_table", INT8, force=True)]
    d = _actions(_params(), rules)
    assert d["embed/embedding"].spec == INT8
    assert d["step_table"].spec is None
    with pytest.warns(UserWarning, match=r"rule 1 \('step_table'\) matched only parameters kept"):
        q = jqtz.quantize_params(_params(), rules)
    assert isinstance(q["embed"]["embedding"], jqtz.QArray)
    assert q["step_table"].dtype == jnp.int32


def test_unmatched_and_protected_only_rules_are_reported():
    rules = [Rule(r"nothing/.*", INT8), Rule(r"embed/.*", INT8), Rule(r".*/kernel", INT8)]
    p = jqtz.plan(_params(), rules)
    assert p.unmatched_rules == (0,) and p.protected_only_rules == (1,)
    msgs = p.warnings()
    assert any("rule 0" in m and "'nothing/.*'" in m and "matched no parameter" in m for m in msgs)
    assert any("rule 1" in m and "force=True" in m for m in msgs)
    with pytest.warns(UserWarning) as record:
        jqtz.quantize_params(_params(), rules)
    assert [str(w.message) for w in record] == msgs
    with pytest.raises(ValueError, match="matched no parameter"):
        jqtz.quantize_params(_params(), rules, strict=True)


def test_no_warning_when_every_rule_matches():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jqtz.quantize_params(_params(), [Rule(r".*/kernel", INT8), Rule(r"embed/.*", None)])


def test_invalid_regex_names_the_rule():
    with pytest.raises(ValueError, match=r"'\(unclosed'.*not a valid regex"):
        Rule("(unclosed", INT8)
    with pytest.raises(ValueError, match=r"rules\[1\].*'\[a-'"):
        jqtz.plan(_params(), [(".*", None), ("[a-", INT8)])


def test_rule_type_errors():
    with pytest.raises(TypeError, match="pattern must be a str"):
        Rule(3, INT8)
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        Rule(".*", "int8")
    with pytest.raises(TypeError, match="rules"):
        jqtz.plan(_params(), "int8")
    with pytest.raises(TypeError, match=r"rules\[0\]"):
        jqtz.plan(_params(), [(".*",)])


def test_tuples_spec_and_single_rule_are_accepted():
    as_rules = jqtz.plan(_params(), [Rule(r".*/kernel", INT4), Rule(r".*", INT8)])
    as_tuples = jqtz.plan(_params(), [(r".*/kernel", INT4), (r".*", INT8)])
    assert as_rules.decisions == as_tuples.decisions
    one_spec = jqtz.plan(_params(), INT8)
    one_rule = jqtz.plan(_params(), Rule(".*", INT8))
    assert one_spec.decisions == one_rule.decisions


def test_shape_errors_name_the_path_at_plan_time():
    spec = QuantSpec(format="int4", granularity="group", group_size=3, allow_partial_groups=False)
    with pytest.raises(ValueError, match=r"layers_0/mlp/up/kernel: dimension 8 .* size 3"):
        jqtz.plan(_params(), [(r".*/up/kernel", spec)])


def test_nnx_state_paths_have_no_trailing_value():
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(16, 8, rngs=rngs)
            self.proj = nnx.Linear(8, 12, rngs=rngs)

    _, state = nnx.split(Tiny(nnx.Rngs(0)))
    paths = {d.path for d in jqtz.plan(state, INT8).decisions}
    assert paths == {"embed/embedding", "proj/kernel", "proj/bias"}

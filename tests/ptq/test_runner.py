"""The block-by-block calibration runner, recipes and layouts (method-independent parts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jqtz
from jqtz.models.llama import Llama, LlamaConfig
from jqtz.ptq import (
    FP8Options,
    GPTQOptions,
    LinearGroup,
    ModelLayout,
    Recipe,
    SmoothQuantOptions,
    calibration_tokens,
    llama_layout,
    quantize_model,
)
from jqtz.ptq.runner import run_blocks

CONFIG = LlamaConfig(
    vocab_size=64,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    hidden_dim=64,
    max_seq_len=64,
    tie_embeddings=False,
)


@pytest.fixture(scope="module")
def llama():
    params = Llama(CONFIG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    tokens = calibration_tokens(np.arange(4000) % 64, n_samples=6, seq_len=16)
    return params, tokens


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=jqtz.is_qarray)[0]


def test_rtn_through_the_runner_equals_quantize_params(llama):
    params, tokens = llama
    spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=16)
    q, report = quantize_model(
        params, llama_layout(CONFIG), tokens, Recipe(method="rtn", spec=spec)
    )
    want = jqtz.quantize_params(params, [(r".*layers_\d+/.*/kernel", spec)])
    for (kp, a), (_, b) in zip(_leaves(q), _leaves(want), strict=True):
        assert type(a) is type(b), kp
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    assert len(report.layers) == 2 * 7
    # The head and embedding are not in the layout: untouched.
    assert not isinstance(q["params"]["lm_head"]["kernel"], jqtz.QArray)


def test_recipe_rules_give_mixed_precision_and_keep_layers(llama):
    params, tokens = llama
    recipe = Recipe(
        method="rtn",
        rules=(
            (r".*/mlp/down_proj/kernel", None),
            (r".*/self_attn/o_proj/kernel", jqtz.QuantSpec(format="int8")),
            jqtz.Rule(r"params/lm_head/kernel", jqtz.QuantSpec(format="int8"), force=True),
        ),
    )
    q, report = quantize_model(params, llama_layout(CONFIG), tokens, recipe)
    block = q["params"]["layers_0"]
    assert not isinstance(block["mlp"]["down_proj"]["kernel"], jqtz.QArray)
    assert block["self_attn"]["o_proj"]["kernel"].format.name == "int8"
    # the recipe's default: 4-bit codes with zero points
    assert block["mlp"]["up_proj"]["kernel"].format.name == "uint4"
    assert q["params"]["lm_head"]["kernel"].format.name == "int8"
    assert any(r.path == "params/lm_head/kernel" for r in report.layers)


def test_capture_sees_the_quantized_previous_block_when_propagating(llama):
    params, tokens = llama
    layout = llama_layout(CONFIG)
    spec = jqtz.QuantSpec(format="int2", granularity="channel")
    specs = {p: spec for p in layout.linear_paths()}

    def run(propagate):
        seen = []

        def procedure(ctx):
            seen.append(ctx.capture(layout.groups[:1])["self_attn/q_proj"].absmax)
            for g in layout.groups:
                for n in g.linears:
                    ctx.set(f"{n}/kernel", jqtz.quantize(ctx.kernel(n), spec))
            return ctx.params

        run_blocks(params, layout, tokens, specs, procedure, batch_size=4, propagate=propagate)
        return seen

    with_q, without = run(True), run(False)
    np.testing.assert_array_equal(with_q[0], without[0])  # block 0 sees the same input
    assert float(jnp.abs(with_q[1] - without[1]).max()) > 1e-4  # block 1 does not


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(nn.Dense(48, name="up")(nn.LayerNorm(name="ln")(x)))
        return x + nn.Dense(16, name="down")(h)


def test_a_users_own_model_through_a_layout():
    block = TwoDense()
    x = jax.random.normal(jax.random.key(0), (6, 5, 16))
    params = {
        "params": {f"block_{i}": block.init(jax.random.key(i), x)["params"] for i in range(3)}
    }
    layout = ModelLayout(
        block_paths=("block_0", "block_1", "block_2"),
        groups=(LinearGroup(("up",), norm="ln"), LinearGroup(("down",), score="self")),
        embed=lambda p, batch: (batch, None),
        run_block=lambda bp, h, aux: block.apply({"params": bp}, h),
    )
    q, report = quantize_model(params, layout, x, Recipe(method="rtn"))
    assert [r.path for r in report.layers][:2] == [
        "params/block_0/up/kernel",
        "params/block_0/down/kernel",
    ]
    assert all(
        isinstance(q["params"][b][n]["kernel"], jqtz.QArray)
        for b in layout.block_paths
        for n in ("up", "down")
    )


def test_errors_name_what_is_wrong(llama):
    params, tokens = llama
    layout = llama_layout(CONFIG)
    with pytest.raises(ValueError, match="empty"):
        quantize_model(params, layout, tokens[:0], Recipe(method="rtn"))
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_tokens(np.arange(10), n_samples=2, seq_len=16)
    bad = ModelLayout(
        layout.block_paths, (LinearGroup(("self_attn/nope",)),), layout.embed, layout.run_block
    )
    with pytest.raises(ValueError, match="nope/kernel received no calibration tokens"):
        run_blocks(params, bad, tokens, {}, lambda ctx: ctx.capture(bad.groups) and ctx.params)
    nan = jax.tree.map(lambda a: a, params)
    nan["params"]["embed_tokens"]["embedding"] = (
        params["params"]["embed_tokens"]["embedding"].at[:, 0].set(jnp.nan)
    )
    with pytest.raises(ValueError, match=r"non-finite activations.*layers_0/self_attn/q_proj"):
        run_blocks(nan, layout, tokens, {}, lambda ctx: ctx.capture(layout.groups[:1]))


def test_calibration_tokens_are_deterministic():
    a = calibration_tokens(np.arange(5000), n_samples=8, seq_len=32, seed=3)
    b = calibration_tokens(np.arange(5000), n_samples=8, seq_len=32, seed=3)
    c = calibration_tokens(np.arange(5000), n_samples=8, seq_len=32, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert all(np.all(np.diff(row) == 1) for row in a)  # contiguous windows


RECIPES = {
    "rtn": Recipe(method="rtn"),
    "nf4": Recipe(method="nf4"),
    "gptq": Recipe(method="gptq"),
    "gptq-actorder-not-sequential": Recipe(
        method="gptq", options=GPTQOptions(act_order=True, true_sequential=False)
    ),
    "awq": Recipe(method="awq", n_score=4),
    "smoothquant": Recipe(method="smoothquant"),
    "smoothquant-static": Recipe(
        method="smoothquant", options=SmoothQuantOptions(static_activations=True)
    ),
    "smoothquant-linears": Recipe(
        method="smoothquant", options=SmoothQuantOptions(fold_into_linears=True)
    ),
    "llm_int8": Recipe(method="llm_int8"),
    "fp8-static": Recipe(method="fp8", options=FP8Options(mode="static-per-tensor")),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_method_runs_through_the_runner(llama, name):
    params, tokens = llama
    recipe = RECIPES[name]
    q, report = quantize_model(params, llama_layout(CONFIG), tokens, recipe)
    kernels = [_get_path(q, p) for p in llama_layout(CONFIG).linear_paths()]
    assert all(isinstance(k, jqtz.QArray) for k in kernels)
    assert {k.format.name for k in kernels} == {recipe.spec.storage_format.name}
    if name.endswith("static"):
        assert all(k.act_scale is not None for k in kernels)
    with jqtz.nn.quantized_ops():
        logits = Llama(CONFIG).apply(q, tokens[:2])
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert len(report.layers) == len(kernels)


def _get_path(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def test_smoothquant_folds_into_linears_only_when_asked(llama):
    """`fold_into_linears` also smooths down_proj's input through up_proj's output columns."""
    params, tokens = llama
    up = "params/layers_0/mlp/up_proj/kernel"
    out = {}
    for into in (False, True):
        recipe = Recipe(method="smoothquant", options=SmoothQuantOptions(fold_into_linears=into))
        q, _ = quantize_model(params, llama_layout(CONFIG), tokens, recipe)
        out[into] = _get_path(q, up).dequantize()
    # Without the fold, up_proj's columns keep their scale; with it they are divided by s.
    ratio = jnp.abs(out[True]).max(axis=0) / jnp.abs(out[False]).max(axis=0)
    assert float(jnp.std(ratio)) > 0.05


def test_gptq_beats_rtn_on_the_model_output(llama):
    params, tokens = llama
    spec = jqtz.QuantSpec(format="int3", granularity="group", group_size=16)
    ref = Llama(CONFIG).apply(params, tokens)

    def err(method):
        q, _ = quantize_model(
            params, llama_layout(CONFIG), tokens, Recipe(method=method, spec=spec)
        )
        with jqtz.nn.quantized_ops():
            out = Llama(CONFIG).apply(q, tokens)
        return float(jnp.linalg.norm(out - ref))

    assert err("gptq") < 0.9 * err("rtn")


def test_bert_layout_runs_gptq():
    from jqtz.models.bert import BertConfig, BertModel
    from jqtz.ptq import bert_layout

    config = BertConfig(
        vocab_size=50, hidden=32, n_layers=2, n_heads=4, intermediate=64, max_position=16
    )
    ids = jax.random.randint(jax.random.key(0), (6, 12), 0, 50)
    params = BertModel(config).init(jax.random.key(1), ids)
    data = (ids, jnp.ones_like(ids))
    spec = jqtz.QuantSpec(format="int4", granularity="group", group_size=16)
    q, report = quantize_model(params, bert_layout(config), data, Recipe(method="gptq", spec=spec))
    assert len(report.layers) == 2 * 6
    with jqtz.nn.quantized_ops():
        out = BertModel(config).apply(q, ids)
    ref = BertModel(config).apply(params, ids)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.2


def _mul(tree, path, factor):
    """`tree` with the leaf at `path` multiplied by `factor`."""
    key, _, rest = path.partition("/")
    return {**tree, key: _mul(tree[key], rest, factor) if rest else tree[key] * factor}


def _layouts():
    from jqtz.models.bert import BertConfig, BertModel
    from jqtz.ptq import bert_layout

    bert = BertConfig(
        vocab_size=50, hidden=32, n_layers=1, n_heads=4, intermediate=64, max_position=16
    )
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, 50)
    gqa = Llama(CONFIG).init(jax.random.key(0), ids)
    mha_config = LlamaConfig(**{**CONFIG.__dict__, "n_kv_heads": 4})
    mha = Llama(mha_config).init(jax.random.key(0), ids)
    return {
        "llama_gqa": (llama_layout(CONFIG), gqa, ids),
        "llama_mha": (llama_layout(mha_config), mha, ids),
        "bert": (bert_layout(bert), BertModel(bert).init(jax.random.key(1), ids),
                 (ids, jnp.ones_like(ids))),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["llama_gqa", "llama_mha", "bert"])
def test_every_foldable_group_absorbs_scales_exactly(name):
    """What a layout says may absorb a per-channel scale (norm or previous linear) does: with
    random scales folded in, every block computes the same function (AWQ and SmoothQuant rely
    on it). A post-LN norm, which also feeds the residual stream, would fail this."""
    layout, params, data = _layouts()[name]
    block = layout.block_paths[0]
    x, aux = layout.embed(params, data)
    bp = params["params"][block]
    ref = layout.run_block(bp, x, aux)
    folded = 0
    for i, group in enumerate(layout.groups):
        if group.norm is None and group.prev is None:
            continue
        w0 = _get_sub(bp, f"{group.linears[0]}/kernel")
        s = jax.random.uniform(jax.random.key(i), (w0.shape[0],), minval=0.25, maxval=4.0)
        producer = group.norm or group.prev
        p = _mul(bp, f"{producer}/{'scale' if group.norm else 'kernel'}", 1 / s)
        if "bias" in _get_sub(p, producer):
            p = _mul(p, f"{producer}/bias", 1 / s)
        for lin in group.linears:
            p = _mul(p, f"{lin}/kernel", s[:, None])
        got = layout.run_block(p, x, aux)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=str(group.linears))
        folded += 1
    assert folded >= 1


def _get_sub(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree

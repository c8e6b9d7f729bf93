"""QAT training loops: a linen Llama and an NNX model train with optax (weights and LSQ scales);
scales take their own learning rate or freeze; jit == eager; orbax checkpoints resume bit for
bit; data-parallel training on two (fake CPU) devices matches one device."""

import doctest
import importlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import nnx

import jqtz
import jqtz.qat as qat
from jqtz.models.llama import Llama, LlamaConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
Q = jqtz.QuantSpec
A8 = Q(format="int8", axis=-1)
RULES = ((r".*/kernel", Q(format="int4", granularity="group", group_size=16, activation=A8)),)
CONFIG = LlamaConfig(
    vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48,
    max_seq_len=32, tie_embeddings=True,
)  # fmt: skip
TOKENS = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)


def test_docstring_examples():
    assert doctest.testmod(importlib.import_module("jqtz.qat.activations")).failed == 0


def make_loss(model, rules):
    """The QAT loss a user writes: fake-quantized weights and inputs inside the loss."""

    def loss_fn(trainable, tokens):
        params, learned = trainable
        fq = qat.fake_quant_params(params, rules, learned=learned)
        with qat.fake_quant_activations(rules, learned):
            logits = model.apply(fq, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss_fn


def make_step(model, rules, tx):
    loss_fn = make_loss(model, rules)

    def step(trainable, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, tokens)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


@pytest.fixture(scope="module")
def setup():
    model = Llama(CONFIG)
    params = jax.jit(model.init)(jax.random.key(0), TOKENS[:, :-1])
    learned = qat.init_learned_scales(params, RULES)
    return model, params, learned


def _optimizer(params, learned, scales):
    labels = qat.partition_labels(params, learned)
    return optax.multi_transform({"params": optax.adam(3e-3), "scales": scales}, labels)


def _changed(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return any(not np.array_equal(x, y) for x, y in pairs)


def test_linen_qat_trains_weights_and_scales(setup):
    model, params, learned = setup
    tx = _optimizer(params, learned, optax.adam(1e-3))
    step = jax.jit(make_step(model, RULES, tx))
    trainable, opt_state = (params, learned), tx.init((params, learned))
    losses = []
    for _ in range(8):
        trainable, opt_state, loss = step(trainable, opt_state, TOKENS)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
    assert _changed(trainable[0], params) and _changed(trainable[1], learned)


def test_frozen_scales_stay_put(setup):
    model, params, learned = setup
    tx = _optimizer(params, learned, optax.set_to_zero())
    step = jax.jit(make_step(model, RULES, tx))
    (new_params, new_learned), _, _ = step((params, learned), tx.init((params, learned)), TOKENS)
    assert _changed(new_params, params)
    assert not _changed(new_learned, learned)


class TinyLM(nn.Module):
    """Embed -> Dense -> tied head: a model small enough to run op by op."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(64, 32, name="embed_tokens")
        return embed.attend(jax.nn.silu(nn.Dense(32, name="mlp")(embed(tokens))))


def test_jit_and_eager_steps_agree():
    model = TinyLM()
    params = jax.jit(model.init)(jax.random.key(0), TOKENS)
    learned = qat.init_learned_scales(params, RULES)
    tx = _optimizer(params, learned, optax.adam(1e-3))
    step = make_step(model, RULES, tx)
    state = ((params, learned), tx.init((params, learned)), TOKENS)
    eager, jitted = step(*state), jax.jit(step)(*state)
    # The same program; XLA fuses reductions differently when it sees the whole step.
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


def test_orbax_checkpoint_resumes_bit_identically(setup, tmp_path):
    model, params, learned = setup
    tx = _optimizer(params, learned, optax.adam(1e-3))
    step = jax.jit(make_step(model, RULES, tx))
    trainable, opt_state = (params, learned), tx.init((params, learned))
    for _ in range(2):
        trainable, opt_state, _ = step(trainable, opt_state, TOKENS)
    state = {"params": trainable[0], "learned": trainable[1], "opt_state": opt_state}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()

    def run(trainable, opt_state):
        losses = []
        for i in range(2):
            trainable, opt_state, loss = step(trainable, opt_state, jnp.roll(TOKENS, i, axis=1))
            losses.append(loss)
        return trainable, opt_state, losses

    want = run(trainable, opt_state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    got = run((restored["params"], restored["learned"]), restored["opt_state"])
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def test_nnx_qat_step_and_serving_parity():
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
    rules = [(r".*/kernel", Q(format="int4", granularity="group", group_size=8, activation=A8))]
    learned = qat.init_learned_scales(params, rules)
    x = jax.random.normal(jax.random.key(1), (8, 16))
    y = jax.random.normal(jax.random.key(2), (8, 4))

    def forward(params, learned, x):
        model = nnx.merge(graphdef, qat.fake_quant_params(params, rules, learned=learned))
        qat.fake_quant_nnx(model, rules, learned)
        return model(x)

    def loss_fn(trainable):
        return jnp.mean((forward(*trainable, x) - y) ** 2)

    tx = _optimizer(params, learned, optax.adam(1e-2))
    opt_state = tx.init((params, learned))

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    trainable, losses = (params, learned), []
    for _ in range(5):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] and _changed(trainable[1], learned)

    # The input really is fake-quantized: a float-only product differs.
    plain = nnx.merge(graphdef, qat.fake_quant_params(*trainable[:1], rules, learned=trainable[1]))
    trained = jax.jit(forward)(*trainable, x)
    assert not np.array_equal(np.asarray(plain(x)), np.asarray(trained))
    served_model = jqtz.nn.use_quantized_ops(
        nnx.merge(graphdef, qat.convert(*trainable[:1], rules, trainable[1]))
    )
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: served_model(x))(x)), trained)


DP_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jqtz.qat as qat
    from jqtz.models.llama import Llama
    t = __import__("test_qat_training")
    model = Llama(t.CONFIG)
    params = jax.jit(model.init)(jax.random.key(0), t.TOKENS[:, :-1])
    learned = qat.init_learned_scales(params, t.RULES)
    tx = optax.multi_transform(
        {"params": optax.adam(3e-3), "scales": optax.adam(1e-3)},
        qat.partition_labels(params, learned))
    step = jax.jit(t.make_step(model, t.RULES, tx))
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    replicated, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put(((params, learned), tx.init((params, learned))), replicated)
    batch = jax.device_put(t.TOKENS, by_batch)

    # One step, sharded over the batch and on one device: same loss and gradients.
    grad = jax.jit(jax.value_and_grad(t.make_loss(model, t.RULES)))
    (loss2, g2), (loss1, g1) = grad(state[0], batch), grad((params, learned), t.TOKENS)
    rel = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
              for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)))
    losses = []
    for i in range(4):
        *state, loss = step(*state, jax.device_put(jnp.roll(t.TOKENS, i, axis=1), by_batch))
        losses.append(float(loss))
    leaf = jax.tree.leaves(state[0])[0]
    print(json.dumps(dict(devices=jax.device_count(), grad_rel=rel,
                          loss=[float(loss2), float(loss1)], losses=losses,
                          replicated=leaf.sharding.is_fully_replicated,
                          input_devices=len(batch.sharding.device_set))))
    """
)


def test_data_parallel_on_two_devices_matches_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "tests" / "qat"), env.get("PYTHONPATH", "")]
    )
    out = subprocess.run(
        [sys.executable, "-c", DP_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 2 and r["input_devices"] == 2 and r["replicated"]
    # The gradient all-reduce sums in another order: agreement to float32 rounding. (Over many
    # steps the runs drift apart: a weight one ulp away can round to another code.)
    assert r["grad_rel"] < 1e-5, r
    assert abs(r["loss"][0] - r["loss"][1]) < 1e-5, r
    assert r["losses"][-1] < r["losses"][0], r

"""Where a model's blocks and linear layers are: the description the calibration runner needs.

The runner quantizes a model block by block, so it must know, by parameter path (never by
guessing from shapes): which subtrees are blocks, how to compute the input of the first block,
how to run one block, and which linear layers in a block share an input (quantized together, in
true-sequential order) and what precedes them (a norm or a linear whose output can absorb a
per-channel scale, for AWQ and SmoothQuant).

`llama_layout(config)` and `bert_layout(config)` describe the reference models. For your own
model, build a `ModelLayout` with its block paths, a `LinearGroup` per set of linears, and two
functions (`embed`, `run_block`); everything else is generic.

Example:
  >>> from jqtz.models.llama import LlamaConfig
  >>> config = LlamaConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2,
  ...                      hidden_dim=32, max_seq_len=64, tie_embeddings=True)
  >>> layout = llama_layout(config)
  >>> layout.block_paths
  ('layers_0', 'layers_1')
  >>> [g.linears for g in layout.groups][:2]
  [('self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj'), ('self_attn/o_proj',)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LinearGroup:
    """Linears of a block that read the same input (paths relative to the block, without
    `/kernel`), with what may absorb a per-input-channel scale `s` (x -> x / s):

    Attributes:
      linears: e.g. `("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj")`.
      norm: the norm whose output is their input and nothing else's (its `scale`, and `bias` if
        any, are divided by `s`), e.g. a pre-LN model's `"input_layernorm"`; or None. A post-LN
        model's norms (BERT) also feed the residual stream: they cannot absorb scales.
      prev: a linear whose output is their input (its output columns are divided by `s`), e.g.
        `"self_attn/v_proj"` for `o_proj` when heads are not shared (no GQA); or None.
      score: `"block"` to score AWQ's search on the whole block output (attention and MLP inputs),
        `"self"` to score it on the group's own outputs.
    """

    linears: tuple[str, ...]
    norm: str | None = None
    prev: str | None = None
    score: str = "block"


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """A model as the calibration runner sees it.

    Attributes:
      block_paths: the blocks' subtrees under `params["params"]`, in order (`"layers_0"`, ...).
      groups: the `LinearGroup`s of one block, in true-sequential order (every block alike).
      embed: `embed(params, tokens) -> (x, aux)`: the first block's input `(B, T, D)` and
        whatever else blocks need (positions, attention masks), from the whole `params`.
      run_block: `run_block(block_params, x, aux) -> x`, with `block_params` the block's subtree
        (it may hold `QArray`s; it runs under `jqtz.nn.quantized_ops()`).
    """

    block_paths: tuple[str, ...]
    groups: tuple[LinearGroup, ...]
    embed: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
    run_block: Callable[[Any, jax.Array, Any], jax.Array]

    def linear_paths(self) -> list[str]:
        """Every linear kernel path under `params`, e.g. `params/layers_0/mlp/up_proj/kernel`."""
        return [
            f"params/{b}/{name}/kernel"
            for b in self.block_paths
            for g in self.groups
            for name in g.linears
        ]


def llama_layout(config) -> ModelLayout:
    """The reference Llama (`jqtz.models.llama`): [q,k,v], [o], [gate,up], [down]."""
    from jqtz.models.llama import Llama, LlamaBlock

    model, block = Llama(config), LlamaBlock(config)

    def embed(params, tokens):
        x = model.apply(params, tokens, method=Llama.embed)
        return x.astype(jnp.float32), jnp.arange(tokens.shape[1])

    def run_block(block_params, x, positions):
        return block.apply({"params": block_params}, x, positions)

    gqa = config.n_kv_heads != config.n_heads
    return ModelLayout(
        block_paths=tuple(f"layers_{i}" for i in range(config.n_layers)),
        groups=(
            LinearGroup(
                ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), norm="input_layernorm"
            ),
            LinearGroup(
                ("self_attn/o_proj",), prev=None if gqa else "self_attn/v_proj", score="self"
            ),
            LinearGroup(("mlp/gate_proj", "mlp/up_proj"), norm="post_attention_layernorm"),
            LinearGroup(("mlp/down_proj",), prev="mlp/up_proj", score="self"),
        ),
        embed=embed,
        run_block=run_block,
    )


def bert_layout(config) -> ModelLayout:
    """The reference BERT (`jqtz.models.bert`). Post-LN: q/k/v read the previous block's output
    norm, and `output` reads gelu(intermediate), so only `intermediate` (after `attention_norm`)
    and `attention/output` (after `value`) can absorb scales."""
    from jqtz.models.bert import BertEmbeddings, BertLayer

    emb, layer = BertEmbeddings(config), BertLayer(config)

    def embed(params, batch):
        ids, mask = batch
        x = emb.apply({"params": params["params"]["embeddings"]}, ids, jnp.zeros_like(ids))
        return x.astype(jnp.float32), mask

    def run_block(block_params, x, mask):
        return layer.apply({"params": block_params}, x, mask)

    return ModelLayout(
        block_paths=tuple(f"layer_{i}" for i in range(config.n_layers)),
        groups=(
            LinearGroup(("attention/query", "attention/key", "attention/value")),
            LinearGroup(("attention/output",), prev="attention/value", score="self"),
            # Post-LN: attention_norm's output is also the residual stream, so scaling it
            # would change the block; the intermediate layer's input has no producer to fold
            # into (AWQ: clip + RTN; SmoothQuant: not smoothed).
            LinearGroup(("intermediate",)),
            LinearGroup(("output",), score="self"),
        ),
        embed=embed,
        run_block=run_block,
    )

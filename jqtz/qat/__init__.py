"""Quantization-aware training: fake quantization, learned scales, FP8 scaling, `convert`.

A QAT step is an ordinary optax step whose loss sees fake-quantized weights (and inputs):

    rules = [(r".*/kernel", jqtz.QuantSpec(format="int4"))]
    learned = jqtz.qat.init_learned_scales(params, rules)         # LSQ step sizes, as RTN
    tx = optax.multi_transform(
        {"params": optax.adam(1e-3), "scales": optax.adam(1e-4)},
        jqtz.qat.partition_labels(params, learned))
    opt_state = tx.init((params, learned))

    def loss_fn(trainable, batch):
        params, learned = trainable
        fq = jqtz.qat.fake_quant_params(params, rules, learned=learned)
        with jqtz.qat.fake_quant_activations(rules, learned):    # only for activation specs
            logits = model.apply(fq, batch["inputs"])
        return cross_entropy(logits, batch["targets"])

    qparams = jqtz.qat.convert(params, rules, learned)             # serve with quantized_ops()

Modules: `ste` (the array math: STE, clipped STE, LSQ/LSQ+ gradients), `fake_quant` (the
parameter-tree transform), `activations` (linen interceptor and NNX seam), `lsq` (learned scale
trees and optax labels), `fp8` (current and delayed scaling), `convert` (to the serving tree).
"""

from jqtz.qat.activations import ActivationQuantizer, fake_quant_activations, fake_quant_nnx
from jqtz.qat.convert import convert
from jqtz.qat.fake_quant import fake_quant_params
from jqtz.qat.fp8 import delayed_scale, init_amax_history, update_amax_history
from jqtz.qat.lsq import init_learned_scales, partition_labels
from jqtz.qat.ste import effective_scale, effective_zero_point, fake_quant, lsq_grad_scale

__all__ = [
    "ActivationQuantizer",
    "convert",
    "delayed_scale",
    "effective_scale",
    "effective_zero_point",
    "fake_quant",
    "fake_quant_activations",
    "fake_quant_nnx",
    "fake_quant_params",
    "init_amax_history",
    "init_learned_scales",
    "lsq_grad_scale",
    "partition_labels",
    "update_amax_history",
]

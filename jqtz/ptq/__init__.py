"""Post-training quantization: calibration runner, model layouts, recipes and algorithms."""

from jqtz.ptq.calibration import calibration_tokens
from jqtz.ptq.layout import LinearGroup, ModelLayout, bert_layout, llama_layout
from jqtz.ptq.recipe import (
    METHODS,
    AWQOptions,
    FP8Options,
    GPTQOptions,
    Recipe,
    SmoothQuantOptions,
    default_spec,
    quantize_model,
)
from jqtz.ptq.runner import BlockContext, InputStats, LayerRecord, PTQReport

__all__ = [
    "METHODS",
    "AWQOptions",
    "BlockContext",
    "FP8Options",
    "GPTQOptions",
    "InputStats",
    "LayerRecord",
    "LinearGroup",
    "ModelLayout",
    "PTQReport",
    "Recipe",
    "SmoothQuantOptions",
    "bert_layout",
    "calibration_tokens",
    "default_spec",
    "llama_layout",
    "quantize_model",
]

"""jqtz: quantization for Flax models.

Quantize a parameter tree with rules matched on parameter paths, inspect what happened, and get
the full-precision tree back:

  >>> import jax.numpy as jnp, jqtz
  >>> params = {"dense": {"kernel": jnp.ones((256, 64))}}
  >>> q = jqtz.quantize_params(params, jqtz.QuantSpec(format="int8"))
  >>> print(jqtz.memory_report(q).ratio_vs_bf16 < 0.6)
  True
"""

from jqtz import formats, nn, ranges
from jqtz.qarray import QArray, is_qarray
from jqtz.quantize import quantize
from jqtz.report import MemoryReport, QuantReport, memory_report, quantization_report
from jqtz.rules import DEFAULT_KEEP, Plan, Rule, plan
from jqtz.spec import QuantSpec
from jqtz.tree import dequantize_params, quantize_params

__all__ = [
    "DEFAULT_KEEP",
    "MemoryReport",
    "Plan",
    "QArray",
    "QuantReport",
    "QuantSpec",
    "Rule",
    "dequantize_params",
    "formats",
    "is_qarray",
    "memory_report",
    "nn",
    "plan",
    "quantization_report",
    "quantize",
    "quantize_params",
    "ranges",
]

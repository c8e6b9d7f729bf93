"""Model integration: the quantized matrix product and the seams into Flax."""

from jqtz.nn.calibrate import calibrate_activations
from jqtz.nn.flax_seams import observe_inputs, quantized_ops, use_quantized_ops
from jqtz.nn.ops import dot_general, promote_dtype, take_rows

__all__ = [
    "calibrate_activations",
    "dot_general",
    "observe_inputs",
    "promote_dtype",
    "quantized_ops",
    "take_rows",
    "use_quantized_ops",
]

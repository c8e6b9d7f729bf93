"""Model integration: the quantized matrix product and the seams into Flax."""

from jqtz.nn.calibrate import calibrate_activations
from jqtz.nn.flax_seams import observe_inputs, quantized_ops, use_quantized_ops
from jqtz.nn.ops import (
    dot_general,
    matmul_path,
    pallas_kernels_enabled,
    pallas_lowering,
    promote_dtype,
    serving_layout,
    take_rows,
    use_pallas_kernels,
)

__all__ = [
    "calibrate_activations",
    "dot_general",
    "matmul_path",
    "observe_inputs",
    "pallas_kernels_enabled",
    "pallas_lowering",
    "promote_dtype",
    "quantized_ops",
    "serving_layout",
    "take_rows",
    "use_pallas_kernels",
    "use_quantized_ops",
]

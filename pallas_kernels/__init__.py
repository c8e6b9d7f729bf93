"""Pallas GPU kernels for quantized matrix products and attention."""

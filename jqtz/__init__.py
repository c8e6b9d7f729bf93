"""jqtz: quantization for Flax models."""

"""Loaders for real checkpoints and their tokenizers."""

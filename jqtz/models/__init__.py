"""Reference models written with standard Flax modules."""

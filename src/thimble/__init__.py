"""Thimble: bit-faithful recording and lattice analysis of bfloat16 embedding training."""

__version__ = "0.1.0"

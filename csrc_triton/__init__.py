"""Triton kernels for powersample_fast (placeholder until the kernels land)."""

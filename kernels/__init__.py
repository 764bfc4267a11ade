"""Fused Triton kernels for QIN, each behind one entry point with a `backend=` argument.

backend="triton" runs the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1),
backend="torch" runs the plain-PyTorch reference of kernels/reference.py, and
backend="auto" picks Triton on CUDA and the reference elsewhere.
"""
from kernels.quadratic_projection import quadratic_projection
from kernels.sparse_target_attention import sparse_target_attention

__all__ = ["sparse_target_attention", "quadratic_projection"]

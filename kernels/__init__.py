"""Fused Triton kernels for QIN, each behind one entry point with a `backend=` argument.

backend="triton" runs the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1) through
the registered ops qin::sparse_target_attention and qin::quadratic_projection_dropout (eager
calls through autograd Functions running the same code, without the dispatcher's host cost),
backend="torch" runs the plain-PyTorch reference of kernels/reference.py, and backend="auto"
runs Triton only where it measured faster on the GPU at hand: a one-time timing of both paths
there (kernels.choice), or where nothing is timed, kernels.utils.MEASURED_FASTER (our benchmark
runs on GPUs of that name: today the fp32 attention on the H200).
"""
from kernels.compile_cache import keep_compile_caches_private

keep_compile_caches_private()  # before anything imports torch._dynamo, which fixes the folder

try:
    import triton
except ImportError:  # no triton wheel for this platform: the same entry points, PyTorch only
    triton = None
if triton is None:
    from kernels.torch_only import gathered_sparse_target_attention, quadratic_projection, sparse_target_attention
else:
    from kernels.quadratic_projection import quadratic_projection
    from kernels.sparse_target_attention import gathered_sparse_target_attention, sparse_target_attention

__all__ = ["sparse_target_attention", "gathered_sparse_target_attention", "quadratic_projection"]

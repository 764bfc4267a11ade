"""pytest-benchmark suite of the two fused ops, every backend that runs on the device.

    pytest bench/test_ops_benchmark.py [--benchmark-compare] [--benchmark-json out.json]
    QIN_BENCH_DEVICE=cuda QIN_BENCH_QUICK=1 pytest bench/test_ops_benchmark.py

`qin bench` runs it in a subprocess and puts its medians in the report. On the CPU only the
PyTorch reference is timed (the Triton kernels run there only through the interpreter).
Shapes are the paper's on a GPU (ASTA: B=8192, L=64, D=384; QNN: B=8192, D=1024, M=4).
"""
import os

import pytest
import torch

import kernels

DEVICE = torch.device(os.environ.get("QIN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
QUICK = os.environ.get("QIN_BENCH_QUICK") == "1"
ON_GPU = DEVICE.type == "cuda"
BACKENDS = ["torch", "triton"] if ON_GPU else ["torch"]
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
BATCH = 8192 if ON_GPU else (256 if QUICK else 1024)


def timed(benchmark, fn):
    """Median wall time of fn() with the device drained after each call (CUDA is asynchronous)."""
    def call():
        fn()
        if ON_GPU:
            torch.cuda.synchronize(DEVICE)

    call()  # compile / warm up outside the measurement
    benchmark.pedantic(call, rounds=20 if ON_GPU else 5, iterations=1, warmup_rounds=2)


def asta_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    history = torch.randn(BATCH, 64, 384, generator=g).to(DEVICE, dtype).requires_grad_()
    query = (torch.randn(BATCH, 384, generator=g) / 384**0.5).to(DEVICE, dtype).requires_grad_()
    lengths = torch.randint(1, 65, (BATCH, 1), generator=g)
    mask = (torch.arange(64) >= 64 - lengths).to(DEVICE)  # left-padded histories
    return history, query, mask


def qnn_inputs(dtype):
    dim = 1024 if ON_GPU else 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, dim, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(4 * dim, dim, generator=g) / dim**0.5).to(DEVICE, dtype).requires_grad_()
    bias = torch.zeros(4 * dim).to(DEVICE, dtype).requires_grad_()
    return x, weight, bias


CASES = pytest.mark.parametrize("mode", ["forward", "forward+backward"])
DTYPE_CASES = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
BACKEND_CASES = pytest.mark.parametrize("backend", BACKENDS)


def time_op(benchmark, op: str, backend: str, dtype, mode: str, forward, inputs) -> None:
    """Time forward() alone (no autograd graph) or with the gradients of all `inputs`."""
    benchmark.extra_info.update(op=op, backend=backend, dtype=str(dtype), mode=mode, batch=BATCH)
    if mode == "forward":
        def run():
            with torch.no_grad():
                forward()
    else:
        def run():
            out = forward()
            torch.autograd.grad(out, inputs, torch.ones_like(out))
    timed(benchmark, run)


@CASES
@DTYPE_CASES
@BACKEND_CASES
def test_asta(benchmark, backend, dtype, mode):
    history, query, mask = asta_inputs(dtype)
    time_op(benchmark, "asta", backend, dtype, mode,
            lambda: kernels.sparse_target_attention(history, query, mask, backend=backend), (history, query))


@CASES
@DTYPE_CASES
@BACKEND_CASES
def test_qnn(benchmark, backend, dtype, mode):
    x, weight, bias = qnn_inputs(dtype)
    time_op(benchmark, "qnn", backend, dtype, mode,
            lambda: kernels.quadratic_projection(x, weight, bias, 4, dropout_p=0.1, training=True, backend=backend),
            (x, weight, bias))

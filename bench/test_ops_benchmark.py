"""pytest-benchmark suite of the fused ops, every backend that runs on the device.

    pytest bench/test_ops_benchmark.py [--benchmark-json out.json]
    pytest bench/test_ops_benchmark.py --benchmark-autosave      # keep this run in .benchmarks/
    pytest bench/test_ops_benchmark.py --benchmark-compare       # ... and compare a later one with it
    QIN_BENCH_DEVICE=cpu QIN_BENCH_QUICK=1 pytest bench/test_ops_benchmark.py   # CPU at batch 256

`qin bench` runs it in a subprocess and puts its medians in the report. On the CPU only the
PyTorch reference is timed (the Triton kernels run there only through the interpreter).
Shapes are the paper's on a GPU (ASTA: B=8192, L=64, D=384, plain and as training runs it,
gathered from the batch's distinct items; QNN: B=8192, D=1024, M=4); on the CPU B=1024 (256
quick) and the QNN's D=256. Each (op, form, mode, dtype) is a pytest-benchmark group of its own,
so its relative columns compare backends of the same work.
"""
import os

import pytest
import torch

import kernels
from bench.common import device_argument


def _device() -> torch.device:
    text = os.environ.get("QIN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        return device_argument(text)
    except Exception as exc:  # noqa: BLE001 - argparse's ArgumentTypeError, named for the variable
        pytest.exit(f"QIN_BENCH_DEVICE={text}: {exc}", returncode=4)


DEVICE = _device()
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


def gathered_asta_inputs(dtype):
    """reps of the batch's distinct items and each history position's row of them, as the model
    with train-time item dedup calls it (about one distinct item per 4 positions, an assumption)."""
    g = torch.Generator().manual_seed(0)
    distinct = BATCH * 64 // 4
    reps = torch.randn(distinct, 384, generator=g).to(DEVICE, dtype).requires_grad_()
    index = torch.randint(0, distinct, (BATCH, 64), generator=g).to(DEVICE)
    _, query, mask = asta_inputs(dtype)
    return reps, index, query, mask


QNN_DIM = 1024 if ON_GPU else 256


def qnn_inputs(dtype):
    dim = QNN_DIM
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, dim, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(4 * dim, dim, generator=g) / dim**0.5).to(DEVICE, dtype).requires_grad_()
    bias = torch.zeros(4 * dim).to(DEVICE, dtype).requires_grad_()
    return x, weight, bias


CASES = pytest.mark.parametrize("mode", ["forward", "forward+backward"])
DTYPE_CASES = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
BACKEND_CASES = pytest.mark.parametrize("backend", BACKENDS)


def time_op(benchmark, op: str, shape: tuple[str, str], backend: str, dtype, mode: str, forward, inputs) -> None:
    """Time forward() alone (no autograd graph) or with the gradients of all `inputs`; `shape` is
    (names, sizes), e.g. ("B,L,D", "8192,64,384")."""
    benchmark.group = f"{op} {mode} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(op=op, backend=backend, dtype=str(dtype), mode=mode, batch=BATCH,
                                shape_names=shape[0], shape=shape[1])
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
    time_op(benchmark, "asta", ("B,L,D", f"{BATCH},64,384"), backend, dtype, mode,
            lambda: kernels.sparse_target_attention(history, query, mask, backend=backend), (history, query))


@CASES
@DTYPE_CASES
@BACKEND_CASES
def test_gathered_asta(benchmark, backend, dtype, mode):
    reps, index, query, mask = gathered_asta_inputs(dtype)
    time_op(benchmark, "asta gathered", ("B,L,D,U", f"{BATCH},64,384,{len(reps)}"), backend, dtype, mode,
            lambda: kernels.gathered_sparse_target_attention(reps, index, query, mask, backend=backend),
            (reps, query))


@CASES
@DTYPE_CASES
@BACKEND_CASES
def test_qnn(benchmark, backend, dtype, mode):
    x, weight, bias = qnn_inputs(dtype)
    time_op(benchmark, "qnn", ("B,D,M", f"{BATCH},{QNN_DIM},4"), backend, dtype, mode,
            lambda: kernels.quadratic_projection(x, weight, bias, 4, dropout_p=0.1, training=True, backend=backend),
            (x, weight, bias))

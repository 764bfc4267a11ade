"""Host time a forward+backward of each fused op's eager call, Triton kernels stubbed out (the
interpreter would dominate): what the Python and the dispatcher cost, tiny shapes, CPU."""
import os, sys, time, importlib, json
os.environ["TRITON_INTERPRET"] = "1"
import torch, torch.nn.functional as F
torch.set_num_threads(1)
import kernels
from kernels import reference
qp = importlib.import_module("kernels.quadratic_projection")
sta = importlib.import_module("kernels.sparse_target_attention")
class Stub:
    def __getitem__(self, grid): return lambda *a, **k: None
qp._qnn_dropout_sum_kernel = qp._qnn_masked_grad_kernel = Stub()
sta._asta_fwd_kernel = sta._asta_bwd_kernel = Stub()
g = torch.Generator().manual_seed(0)
B, D, M, L, U = 8, 16, 4, 8, 20
x = torch.randn(B, D, generator=g, requires_grad=True); w = torch.randn(M*D, D, generator=g, requires_grad=True)
b = torch.randn(M*D, generator=g, requires_grad=True); gy = torch.randn(B, D, generator=g)
reps = torch.randn(U, D, generator=g, requires_grad=True); q = torch.randn(B, D, generator=g, requires_grad=True)
index = torch.randint(0, U, (B, L), generator=g); mask = torch.ones(B, L)
hist = torch.randn(B, L, D, generator=g, requires_grad=True)


def fwd_bwd(op, *args, **kwargs):
    return lambda: op(*args, **kwargs).backward(gy)


calls = {
    "QNN, Triton": fwd_bwd(kernels.quadratic_projection, x, w, b, M, dropout_p=0.1, training=True, backend="triton"),
    "QNN, torch (its autograd Function)": fwd_bwd(kernels.quadratic_projection, x, w, b, M, dropout_p=0.1,
                                                  training=True, backend="torch"),
    "ASTA plain, Triton": fwd_bwd(kernels.sparse_target_attention, hist, q, mask, backend="triton"),
    "ASTA gathered, Triton": fwd_bwd(kernels.gathered_sparse_target_attention, reps, index, q, mask, backend="triton"),
    "ASTA gathered, torch (regathered op)": fwd_bwd(kernels.gathered_sparse_target_attention, reps, index, q, mask,
                                                    backend="torch"),
}


def t(f, n=1000):
    for _ in range(100): f()
    best = 1e9
    for _ in range(7):
        s = time.perf_counter()
        for _ in range(n): f()
        best = min(best, (time.perf_counter() - s) / n * 1e6)
    return best


print(json.dumps({k: round(t(f), 1) for k, f in calls.items()}))

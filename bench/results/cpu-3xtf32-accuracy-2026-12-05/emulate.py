"""How close 3xTF32 products come to fp32's, emulated on the CPU against float64.

TF32 rounding is emulated as the GPU's cvt.rna.tf32.f32 does it (round to nearest, ties away from
zero, 10 stored mantissa bits). A product of two TF32 numbers is exact in fp32 and the tensor
cores accumulate in fp32, modelled here as one fp32 rounding per 16-deep slice (kernels/fp32_gemm.py's
BLOCK_K), small terms first as Triton's split adds them. Each error is the largest of
|got - want| / (|a| @ |b|), the scale tests/test_qnn.py and kernels/tolerances.py hold the QNN to,
so the column "/ fp32 tol" is in units of the fp32 tolerance (below 1 passes).

    python bench/results/cpu-3xtf32-accuracy-2026-12-05/emulate.py
"""
import torch

RTOL = 1e-5  # kernels/tolerances.py, fp32
SLICE = 16


def tf32(x):
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def three_pass(a, b):
    a_big, b_big = tf32(a), tf32(b)
    a_small, b_small = tf32(a - a_big), tf32(b - b_big)
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for k in range(0, a.shape[1], SLICE):
        s = slice(k, k + SLICE)
        small = a_small[:, s].double() @ b_big[s].double() + a_big[:, s].double() @ b_small[s].double()
        acc = (acc + small).float().double()
        acc = (acc + a_big[:, s].double() @ b_big[s].double()).float().double()
    return acc


def one_pass(a, b):
    return (tf32(a).double() @ tf32(b).double()).float().double()


def worst(got, a, b):
    want, scale = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    return ((got - want).abs() / scale).max().item()


torch.manual_seed(0)
print(f"{'product (rows x K x cols, a slice of the QNN shape)':<48} {'fp32':>9} {'3xTF32':>9} {'TF32':>9}"
      f" {'3xTF32 / fp32 tol':>18}")
for m, k, n, what in [(512, 1024, 512, "forward x @ W.T, K = D = 1024"),
                      (512, 4096, 512, "grad_x G @ W, K = M*D = 4096"),
                      (256, 8192, 256, "grad_W G.T @ x, K = B = 8192")]:
    a, b = torch.randn(m, k), torch.randn(k, n) / k**0.5
    fp32, x3, x1 = worst((a @ b).double(), a, b), worst(three_pass(a, b), a, b), worst(one_pass(a, b), a, b)
    print(f"{what:<48} {fp32:9.2e} {x3:9.2e} {x1:9.2e} {x3 / RTOL:18.3f}")

"""fp32 matrix products on tensor cores: C = A @ B (+ bias) (+ addend) through the 3xTF32 split.

Why: with torch's TF32 switch off, cuBLAS multiplies fp32 on the CUDA cores (SIMT SGEMM). On an
H200 the QNN's twelve such products (four layers, forward and two backward each) took 17.3 of
the 23.3 ms of the default fp32 training step's kernels, each at the fp32 ceiling (51 TFLOP/s;
bench/results/gpu-h200-2026-12-04-3f11c2d). The tensor cores of a data-centre GPU multiply TF32
several times faster than its CUDA cores multiply fp32 (dense: A100 156 against 19.5 TFLOP/s,
H100 495 against 67). TF32 alone keeps 10 of fp32's 23 mantissa bits; 3xTF32 keeps nearly all:
a = a_big + a_small with a_big = tf32(a), and a @ b ~ a_big @ b_big + a_big @ b_small +
a_small @ b_big, three TF32 products accumulated in fp32 (Triton's input_precision="tf32x3";
the dropped a_small @ b_small is ~2^-22 of each term). Emulated on the CPU against float64 at
the QNN's shapes (K = 1024, 4096, 8192), its largest error, relative to the sum of |terms|, was
1.2-3.3x that of the CPU's fp32 product, 200-600x below TF32's, and 0.01 of the fp32 tolerance
of kernels/tolerances.py (bench/results/cpu-3xtf32-accuracy-2026-12-05). The CUDA tests hold it
to that tolerance at the paper's shape, as any fp32 path is, and bench_qnn measures its error
beside cuBLAS's on the GPU.

Where: only where tensor cores pay for three passes (`tensor_cores_pay`: sm_80 and sm_90 and
later data-centre parts, not the consumer GPUs, whose TF32 rate is about their fp32 rate: an RTX
4090 would run these products 3x slower), for fp32 operands, with TF32 off (TF32 on, cuBLAS's
single TF32 pass is the faster product and is what the user asked for). QIN's Triton QNN uses
these products there (kernels/quadratic_projection.py); whether that path trains is decided by
backend="auto"'s timing on the GPU at hand, against the torch path's cuBLAS products.
QIN_FP32_GEMM=vendor (read at import) keeps cuBLAS for every fp32 product.

Under Triton's interpreter tl.dot multiplies in IEEE fp32 whatever input_precision says: the CPU
tests check the kernel's indexing, masks, bias and addend; a GPU checks the split's accuracy.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from kernels.utils import INT32_LIMIT, INTERPRETING, constant_under_compile, forcing, launching_on

# Compute capabilities whose tensor cores multiply TF32 at 4x or more their CUDA cores' fp32
# rate (dense, vendor data sheets): A100 (8.0) 8x, H100/H200 (9.0) 7.4x, B200 (10.0) more. The
# consumer and workstation parts (8.6, 8.9, 12.x) run TF32 at 1-2x their fp32 rate: three
# passes lose there.
TENSOR_CORE_FP32_CAPABILITIES = {(8, 0), (9, 0), (10, 0)}

MODES = ("auto", "vendor", "3xtf32")


def mode_from_env(value: str | None) -> str:
    """QIN_FP32_GEMM's mode: unset or "auto" (3xTF32 where it applies), or "vendor" (cuBLAS always)."""
    if value in (None, "", "auto", "vendor"):
        return value or "auto"
    raise ValueError(f"QIN_FP32_GEMM must be 'auto' or 'vendor' (cuBLAS for every fp32 product), got {value!r}")


_mode = mode_from_env(os.environ.get("QIN_FP32_GEMM"))  # or "3xtf32" within products("3xtf32"): the tests'


@contextlib.contextmanager
def products(mode: str):
    """Within the block, fp32 products follow `mode`: "auto" (3xTF32 where `applies`), "vendor"
    (cuBLAS everywhere, as QIN_FP32_GEMM=vendor) or "3xtf32" (this kernel wherever Triton runs,
    the CPU interpreter included: the tests' way in). Not thread-safe: a process-wide setting."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"fp32 products mode must be one of {MODES}, got {mode!r}")
    before, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = before


def tensor_cores_pay(device: torch.device) -> bool:
    """Whether 3xTF32 can beat the CUDA cores' fp32 on this device (TENSOR_CORE_FP32_CAPABILITIES)."""
    if device.type != "cuda":
        return False
    return _capability_pays(device.index if device.index is not None else torch.cuda.current_device())


@constant_under_compile  # asked once while torch.compile traces the op's caller, then a constant
def _capability_pays(index: int) -> bool:
    return torch.cuda.get_device_capability(index) in TENSOR_CORE_FP32_CAPABILITIES


def applies(device: torch.device, *operands: torch.Tensor) -> bool:
    """Whether fp32 products of these operands run here (else the caller's torch product does):
    every operand fp32 and under 2**31 elements (int32 offsets), and the mode "3xtf32", or "auto"
    on a device where tensor cores pay with torch's TF32 switch off. Without operands: whether
    fp32 products would run here at all."""
    if _mode == "vendor" or not all(t.dtype == torch.float32 and t.numel() < INT32_LIMIT for t in operands):
        return False
    if _mode == "3xtf32":
        return device.type == "cuda" or INTERPRETING
    return not torch.backends.cuda.matmul.allow_tf32 and tensor_cores_pay(device)


@triton.jit
def _split_kernel(x_ptr, big_ptr, small_ptr, R, C, stride_xr, stride_xc, stride_or, stride_oc,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (BLOCK_R, BLOCK_C) tile of a 2-d x: big = x rounded to TF32 (nearest, ties away:
    cvt.rna's rounding, on the bits), small = x - big (exact in fp32; a TF32 product reads its top
    11 bits), both written with the output's strides, which may transpose x (Triton stages the tile
    through shared memory so that reads and writes both run along their contiguous dimension)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_c[None, :] * stride_xc, mask=inside, other=0.0)
    big = ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    out = offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    tl.store(big_ptr + out, big, mask=inside)
    tl.store(small_ptr + out, x - big, mask=inside)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, a_small_ptr, b_small_ptr, c_ptr, bias_ptr, addend_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_addend_m,
                   HAS_BIAS: tl.constexpr, HAS_ADDEND: tl.constexpr, EVEN_K: tl.constexpr, PRESPLIT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of C = A @ B (+ bias[n]) (+ addend[m, n]). Tiles are ordered in
    groups of GROUP_M rows, so consecutive programs share B's column tiles in L2. A and B take any
    strides: the QNN's backward reads G transposed (grad_W = G.T @ x) as a view.
    PRESPLIT: A and B hold the TF32 parts of the operands, a_small and b_small (same strides) the
    rest, split once in memory along K (_split_kernel), so that the tiles go from shared memory to the
    tensor cores as they are (Triton's tf32x3 splits each tile in registers and stores both parts
    back to shared memory, in every program that reads it). The two small products accumulate
    apart from the big one, so that the tensor cores' truncation of the large sum does not eat them."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows
    pid_n = (pid % (GROUP_M * tiles_n)) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past M and columns past N are masked, not clamped: clamped offsets (tl.where) lose
    # their contiguity to Triton's analysis, and an operand contiguous along M or N (G.T, W and x
    # in the backward) was then read 4 bytes at a time. Masks over M and N divisible by 16 keep
    # the 16-byte accesses (tests/test_codegen.py).
    a_offs = offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_offs = offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    a_inside = offs_m[:, None] < M
    b_inside = offs_n[None, :] < N
    a_ptrs, a_small_ptrs = a_ptr + a_offs, a_small_ptr + a_offs
    b_ptrs, b_small_ptrs = b_ptr + b_offs, b_small_ptr + b_offs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_small = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a_mask = a_inside
            b_mask = b_inside
        else:
            a_mask = a_inside & (offs_k[None, :] < K - k)
            b_mask = b_inside & (offs_k[:, None] < K - k)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if PRESPLIT:
            a_small = tl.load(a_small_ptrs, mask=a_mask, other=0.0)
            b_small = tl.load(b_small_ptrs, mask=b_mask, other=0.0)
            acc_small = tl.dot(a_small, b, acc_small, input_precision="tf32")
            acc_small = tl.dot(a, b_small, acc_small, input_precision="tf32")
            acc = tl.dot(a, b, acc, input_precision="tf32")
            a_small_ptrs += BLOCK_K * stride_ak
            b_small_ptrs += BLOCK_K * stride_bk
        else:
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if PRESPLIT:
        acc += acc_small

    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_ADDEND:
        acc += tl.load(addend_ptr + offs_m[:, None] * stride_addend_m + offs_n[None, :], mask=inside, other=0.0)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc, mask=inside)


# Where the operands are split: False, in the kernel (Triton's tf32x3); True, once in memory before
# it (_split_kernel, 12 bytes an element moved). Neither is timed on a GPU yet: bench_qnn's
# fp32_gemm rows time both beside cuBLAS.
PRESPLIT = False

_FORCED: dict = {}
FORCEABLE = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


@contextlib.contextmanager
def forced_config(**cfg):
    """Launch the kernel with `cfg` (any of FORCEABLE) in place of _config's within the block: for
    timing candidate configurations on a GPU (bench/tune_fp32_gemm.py). Blocks do not nest."""
    bad = {name: value for name, value in cfg.items() if type(value) is not int or value < 1}
    if bad:
        raise ValueError(f"forced_config takes positive integers; got {bad}")
    with forcing(_FORCED, cfg, FORCEABLE):
        yield


def _config(interpreting: bool = INTERPRETING, presplit: bool = False) -> dict:
    """One launch configuration (no autotuning). On a GPU 128 x 128 tiles over 16-deep slices, 8
    warps, 4 stages: 65 KB of shared memory and 175-186 registers a thread for sm_90, without
    spills, every operand read in 16-byte accesses (tests/test_codegen.py; Triton 3.3.1, 3.6, 3.9).
    Split first (PRESPLIT), where both parts of both tiles are staged and two accumulators live,
    3 stages: 97 KB and 168-224 registers (4 stages spilled 24 bytes in G.T @ x with 3.3.1). 32-deep slices spilled there (the split keeps both
    halves of A's and B's fragments live), as did 128 x 256 tiles. The interpreter runs each
    program in numpy: small tiles keep the tests' odd shapes cheap."""
    if interpreting:
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3 if presplit else 4)
    return cfg | _FORCED


def split(t: torch.Tensor, contiguous_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(big, small) of a 2-d fp32 t: its TF32 part and the rest, t = big + small exactly, both laid
    out with dimension `contiguous_dim` contiguous, whatever t's strides. matmul passes a product's
    K dimension: Hopper's tensor cores read 32-bit operands from shared memory only along K, so a
    tile copied there as loaded must already run along K (else Triton copies it 4 bytes at a time,
    transposing as it goes)."""
    rows, cols = t.shape
    shape = (rows, cols) if contiguous_dim == 1 else (cols, rows)
    big, small = (torch.empty(shape, device=t.device, dtype=torch.float32) for _ in range(2))
    if contiguous_dim == 0:
        big, small = big.t(), small.t()
    if t.numel():
        block = 16 if INTERPRETING else 64
        with launching_on(t.device):
            _split_kernel[(-(-rows // block), -(-cols // block))](
                t, big, small, rows, cols, t.stride(0), t.stride(1), big.stride(0), big.stride(1),
                BLOCK_R=block, BLOCK_C=block)
    return big, small


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
           addend: torch.Tensor | None = None, presplit: bool | None = None) -> torch.Tensor:
    """a @ b (+ bias, a row vector) (+ addend, an (M, N) tensor), all fp32, as a new contiguous
    (M, N) tensor. a and b may be any strided views (a transpose is not copied). presplit: split
    the operands in memory first (the kernel's PRESPLIT), or Triton's tf32x3 in the kernel; None
    follows PRESPLIT, the module's choice."""
    for name, t, ndim in (("a", a, 2), ("b", b, 2), ("bias", bias, 1), ("addend", addend, 2)):
        if t is not None and (t.dtype != torch.float32 or t.dim() != ndim or t.device != a.device):
            raise ValueError(f"{name} must be a {ndim}-d fp32 tensor on {a.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} cannot be multiplied")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if addend is not None and addend.shape != (m, n):
        raise ValueError(f"addend must have shape ({m}, {n}), got {tuple(addend.shape)}")
    if m * n >= INT32_LIMIT or a.numel() >= INT32_LIMIT or b.numel() >= INT32_LIMIT:
        raise ValueError(f"a {tuple(a.shape)} @ b {tuple(b.shape)}: 2**31 or more elements; the kernel's offsets are int32")
    c = torch.empty((m, n), device=a.device, dtype=torch.float32)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_().add_(bias if bias is not None else 0.0).add_(addend if addend is not None else 0.0)
    bias = bias.contiguous() if bias is not None else None
    if addend is not None and addend.stride(1) != 1:
        addend = addend.contiguous()
    presplit = PRESPLIT if presplit is None else presplit
    if presplit:
        (a, a_small), (b, b_small) = split(a, 1), split(b, 0)  # both along K
    else:
        a_small, b_small = a, b  # not read
    cfg = _config(presplit=presplit)
    grid = (-(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"]),)
    with launching_on(c.device):
        _matmul_kernel[grid](
            a, b, a_small, b_small, c, bias if bias is not None else c, addend if addend is not None else c, m, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
            addend.stride(0) if addend is not None else 0,
            HAS_BIAS=bias is not None, HAS_ADDEND=addend is not None, EVEN_K=k % cfg["BLOCK_K"] == 0,
            PRESPLIT=presplit, **cfg)
    return c


def codegen_cases(dtype: torch.dtype = torch.float32) -> list[dict]:
    """The three products of a QNN layer at the paper's shape (B=8192, D=1024, M=4), as
    kernels/quadratic_projection.py launches them in fp32: forward h = x @ W.T + b, grad_x = G @ W
    + gy * s, grad_W = G.T @ x; each with the operands split in the kernel (fp32_gemm_<product>)
    and split in memory first (fp32_gemm_presplit_<product>). fp32 only: no other dtype runs
    this kernel."""
    if dtype != torch.float32:
        return []
    batch, dim, hidden = 8192, 1024, 4 * 1024

    def case(name, m, n, k, strides, bias, addend, presplit):
        cfg = _config(interpreting=False, presplit=presplit)
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        # strides: (stride_am, stride_ak, stride_bk, stride_bn); the unit ones are what the JIT
        # specialises (an int equal to 1 becomes a constant), the others divisible by 16.
        values = dict(M=m, N=n, K=k, stride_am=strides[0], stride_ak=strides[1], stride_bk=strides[2],
                      stride_bn=strides[3], stride_cm=n, stride_addend_m=n if addend else 0)
        constexprs = dict(HAS_BIAS=bias, HAS_ADDEND=addend, EVEN_K=True, PRESPLIT=presplit, **cfg)
        constexprs.update({arg: 1 for arg, v in values.items() if v == 1})
        signature = {arg: "*fp32" for arg in _matmul_kernel.arg_names if arg.endswith("_ptr")}
        signature.update({arg: ("constexpr" if v == 1 else "i32") for arg, v in values.items()})
        signature.update({arg: "constexpr" for arg in constexprs})
        signature = {arg: signature[arg] for arg in _matmul_kernel.arg_names}
        aligned = [arg for arg in _matmul_kernel.arg_names if signature[arg] in ("*fp32", "i32")
                   and values.get(arg, 16) % 16 == 0]
        attrs = {(_matmul_kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
        return dict(name=name, fn=_matmul_kernel, signature=signature, constexprs=constexprs, attrs=attrs,
                    num_warps=num_warps, num_stages=num_stages)

    # Split first, both operands' parts are laid out along K (split(a, 1), split(b, 0)), whatever
    # the product's own layouts.
    along_k = lambda m, n, k, strides, *rest: (m, n, k, (k, 1, 1, k), *rest)  # noqa: E731
    return [case(f"fp32_gemm_{'presplit_' * presplit}{name}", *(along_k(*shape) if presplit else shape),
                 presplit=presplit)
            for presplit in (False, True) for name, *shape in (
                # x (B, D) row-major, W.T a view of W (M*D, D): both read along K.
                ("forward", batch, hidden, dim, (dim, 1, 1, dim), True, False),
                # G (B, M*D), W (M*D, D) row-major: B read across K.
                ("grad_x", batch, dim, hidden, (hidden, 1, dim, 1), False, True),
                # G.T a view of G, x (B, D): both read across K.
                ("grad_w", hidden, dim, batch, (1, hidden, dim, 1), False, False))]

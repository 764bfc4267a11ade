"""Fused Triton sparse target attention (ASTA): z[b] = sum_l relu(m_l * <x_l, q>) * x_l.

history x (B, L, D), query q (B, D), mask m (B, L) bool / int / float -> z (B, D).

forward   one program per row b: loop over L in (BLOCK_L, BLOCK_D) tiles of x, score
          s_l = m_l * <x_l, q>, a_l = relu(s_l), z += sum_l a_l * x_l, all in fp32 (fp64 for fp64
          inputs). x is read once; nothing of size B*L*D is written.
backward  one program per row, one more pass over x: with g = dz, u_l = <g, x_l> and
          gate_l = (s_l > 0) * m_l (relu's gradient is 0 at s = 0, like torch):
              dx_l = a_l * g + gate_l * u_l * q        (written once, tile by tile)
              dq   = sum_l gate_l * u_l * x_l
          s_l is recomputed from the tile, so only x, q and the mask are saved for backward.

Positions with m_l == 0 contribute nothing, so their history rows are not even loaded (the load
is predicated off): with short left-padded histories most of x is never read. Their gradient
rows are still written (as zeros).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.utils import INTERPRETING, check_tensor, next_power_of_2, resolve_backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# A whole row of D lives in registers (BLOCK_D = next power of two of D). Past this width the
# tile would spill; wider rows would need a D loop, i.e. a second pass over the history.
MAX_D = 8192


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _asta_fwd_kernel(
    x_ptr, q_ptr, m_ptr, z_ptr,
    L, D, stride_xb, stride_xl,
    ACC_DTYPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row b of z. x rows are strided (stride_xb, stride_xl, 1); q, m, z are contiguous."""
    row = tl.program_id(0).to(tl.int64)  # int64: B*L*D may pass 2**31 elements
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < D

    q = tl.load(q_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    acc = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + offs_l
        m = tl.load(m_ptr + row * L + ls, mask=ls < L, other=0).to(ACC_DTYPE)
        # Masked-off positions are not loaded at all: they read as 0 and so add 0.
        live = m != 0
        x = tl.load(x_ptr + row * stride_xb + ls[:, None] * stride_xl + offs_d[None, :],
                    mask=live[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
        s = tl.sum(x * q[None, :], axis=1) * m
        a = tl.maximum(s, 0.0)
        acc += tl.sum(a[:, None] * x, axis=0)
    tl.store(z_ptr + row * D + offs_d, acc.to(z_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _asta_bwd_kernel(
    x_ptr, q_ptr, m_ptr, g_ptr, dx_ptr, dq_ptr,
    L, D, stride_xb, stride_xl,
    ACC_DTYPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row b of dx (contiguous, B x L x D) and dq, from one pass over x; g = dz is contiguous."""
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < D

    q = tl.load(q_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    g = tl.load(g_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    dq = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + offs_l
        in_l = ls < L
        m = tl.load(m_ptr + row * L + ls, mask=in_l, other=0).to(ACC_DTYPE)
        live = m != 0
        x = tl.load(x_ptr + row * stride_xb + ls[:, None] * stride_xl + offs_d[None, :],
                    mask=live[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
        s = tl.sum(x * q[None, :], axis=1) * m  # recomputed, not saved
        a = tl.maximum(s, 0.0)
        u = tl.sum(x * g[None, :], axis=1)
        gu = tl.where(s > 0, m, 0.0) * u  # gate_l * u_l; strict > gives relu'(0) = 0 like torch
        dx = a[:, None] * g[None, :] + gu[:, None] * q[None, :]
        tl.store(dx_ptr + (row * L + ls[:, None]) * D + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=in_l[:, None] & mask_d[None, :])
        dq += tl.sum(gu[:, None] * x, axis=0)
    tl.store(dq_ptr + row * D + offs_d, dq.to(dq_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a fixed heuristic, no autotuning
# ----------------------------------------------------------------------------------------------

def _config(seq_len: int, dim: int, interpreting: bool = INTERPRETING) -> dict:
    """BLOCK_L, BLOCK_D and num_warps for a (L, D) problem.

    On a GPU a tile holds about 4096 elements (32 fp32 values per thread with 4 warps), which
    keeps the x tile and the backward's dx tile in registers without spills (D=384 checked on
    sm_89/sm_90 by tests/test_asta.py; D = 1, 200, 1024, 2048, 4096, 8192 checked by hand). The interpreter runs each program in numpy, where
    larger tiles are faster; 16 rows still make the small test histories (L <= 40) take several
    loop trips with a ragged last one, as real ones do on the GPU.
    """
    block_d = next_power_of_2(dim)
    if interpreting:
        block_l = min(next_power_of_2(seq_len), max(1, 16384 // block_d), 16)
        return dict(BLOCK_L=block_l, BLOCK_D=block_d, num_warps=1, num_stages=1)
    block_l = min(next_power_of_2(seq_len), max(1, 4096 // block_d), 16)
    num_warps = 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)  # wide rows: more threads, fewer values each
    # The L loop has no tl.dot for the pipeliner to feed; one stage, and latency is hidden by
    # the many resident programs (one per row) instead.
    return dict(BLOCK_L=block_l, BLOCK_D=block_d, num_warps=num_warps, num_stages=1)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------
# Launchers (inputs already checked and laid out by `_prepare`)
# ----------------------------------------------------------------------------------------------

def _forward(history, query, mask):
    batch, seq_len, dim = history.shape
    z = torch.zeros((batch, dim), device=history.device, dtype=history.dtype)
    if z.numel() == 0 or seq_len == 0:  # B=0, D=0 or empty histories: nothing to launch
        return z
    _asta_fwd_kernel[(batch,)](
        history, query, mask, z, seq_len, dim, history.stride(0), history.stride(1),
        ACC_DTYPE=_acc_dtype(history.dtype), **_config(seq_len, dim),
    )
    return z


def _backward(grad_z, history, query, mask):
    batch, seq_len, dim = history.shape
    grad_x = torch.empty((batch, seq_len, dim), device=history.device, dtype=history.dtype)
    grad_q = torch.zeros_like(query)
    if grad_x.numel() == 0:
        return grad_x, grad_q
    _asta_bwd_kernel[(batch,)](
        history, query, mask, grad_z, grad_x, grad_q, seq_len, dim, history.stride(0), history.stride(1),
        ACC_DTYPE=_acc_dtype(history.dtype), **_config(seq_len, dim),
    )
    return grad_x, grad_q


class _SparseTargetAttention(torch.autograd.Function):
    """Saves history, query and the mask: no B x L x D temporary besides grad_history itself."""

    @staticmethod
    def forward(ctx, history, query, mask):
        ctx.save_for_backward(history, query, mask)
        return _forward(history, query, mask)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        history, query, mask = ctx.saved_tensors
        grad_z = grad_z.to(history.dtype).contiguous()  # e.g. expanded (stride 0) grads of a sum
        grad_x, grad_q = _backward(grad_z, history, query, mask)
        need_x, need_q = ctx.needs_input_grad[:2]
        return (grad_x if need_x else None), (grad_q if need_q else None), None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check_args(history, query, mask) -> None:
    check_tensor("history", history, 3, FLOAT_DTYPES)
    batch, seq_len, dim = history.shape
    check_tensor("query", query, 2, device=history.device)
    if query.dtype != history.dtype:
        raise ValueError(f"query has dtype {query.dtype}, but history has {history.dtype}; they must match")
    if tuple(query.shape) != (batch, dim):
        raise ValueError(f"query must have shape (B, D) = {(batch, dim)} for history of shape "
                         f"{tuple(history.shape)}, got {tuple(query.shape)}")
    check_tensor("mask", mask, 2, device=history.device)
    if mask.is_complex():
        raise ValueError(f"mask must be bool, integer or real floating point, got {mask.dtype}")
    if tuple(mask.shape) != (batch, seq_len):
        raise ValueError(f"mask must have shape (B, L) = {(batch, seq_len)} for history of shape "
                         f"{tuple(history.shape)}, got {tuple(mask.shape)}")


def _prepare(history, query, mask):
    """Lay the inputs out for the kernels, copying only what must be copied.

    history keeps its strides; only a non-unit last stride (no vector loads) forces a copy.
    query and mask are small (B x D, B x L) and are made contiguous. A bool mask is reinterpreted
    as uint8 (no copy); a float mask of another dtype is rounded to history's dtype, as the
    reference does; integer masks are converted inside the kernel.
    """
    if history.stride(-1) != 1 and history.shape[-1] > 1:
        history = history.contiguous()
    query = query.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.contiguous().view(torch.uint8)
    elif mask.is_floating_point() and mask.dtype != history.dtype:
        mask = mask.to(history.dtype)
    return history, query, mask.contiguous()


def sparse_target_attention(history, query, mask, *, backend="auto"):
    """z[b] = sum_l relu(mask[b,l] * <history[b,l], query[b]>) * history[b,l]; see the module docstring.

    history (B, L, D), query (B, D) of the same float dtype, mask (B, L) bool or 0/1 numbers
    -> (B, D) in history's dtype. Differentiable in history and query (not in mask).
    """
    _check_args(history, query, mask)
    if resolve_backend(backend, history.device) == "torch":
        return reference.sparse_target_attention(history, query, mask)
    if history.shape[-1] > MAX_D:
        raise ValueError(f"history has D={history.shape[-1]} features; the Triton kernel keeps a row in "
                         f"registers and supports D <= {MAX_D} (use backend='torch')")
    history, query, mask = _prepare(history, query, mask)
    if torch.is_grad_enabled() and (history.requires_grad or query.requires_grad):
        return _SparseTargetAttention.apply(history, query, mask)
    return _forward(history, query, mask)


# ----------------------------------------------------------------------------------------------
# Code generation cases: what the wrapper launches on a GPU at the paper's shape
# ----------------------------------------------------------------------------------------------

def codegen_cases(dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One dict per kernel launched in training at B=8192, L=64, D=384 (mask in history's dtype,
    as the model passes it).

    Each has name, fn, signature, constexprs, attrs, num_warps, num_stages, so that
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 89, 32),
    options=dict(num_warps=..., num_stages=...)) builds the kernel the wrapper would launch.
    attrs repeats the alignment facts the JIT derives from the real arguments (16-byte-aligned
    pointers, ints divisible by 16); without them the loads are not vectorised.
    """
    seq_len, dim = 64, 384  # the paper's shape; the batch only sets the grid, not the code
    t = f"*{_TL_DTYPE[dtype]}"
    cfg = _config(seq_len, dim, interpreting=False)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    constexprs = dict(ACC_DTYPE=_acc_dtype(dtype), **cfg)
    ints = dict(L=seq_len, D=dim, stride_xb=seq_len * dim, stride_xl=dim)

    def case(name, fn, pointers):
        types = {**{p: t for p in pointers}, **{k: "i32" for k in ints}, **{k: "constexpr" for k in constexprs}}
        signature = {arg: types[arg] for arg in fn.arg_names}  # in the kernel's argument order
        aligned = [*pointers, *(k for k, v in ints.items() if v % 16 == 0)]
        attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
        return dict(name=name, fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs,
                    num_warps=num_warps, num_stages=num_stages)

    return [
        case("asta_fwd", _asta_fwd_kernel, ("x_ptr", "q_ptr", "m_ptr", "z_ptr")),
        case("asta_bwd", _asta_bwd_kernel, ("x_ptr", "q_ptr", "m_ptr", "g_ptr", "dx_ptr", "dq_ptr")),
    ]

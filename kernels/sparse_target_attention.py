"""Fused Triton sparse target attention (ASTA): z[b] = sum_l relu(m_l * <x_l, q>) * x_l.

Two forms of the same op:
  sparse_target_attention(history, query, mask)                 history x (B, L, D)
  gathered_sparse_target_attention(reps, index, query, mask)    x_l = reps[index[b, l]], reps (U, D)
with query q (B, D), mask m (B, L) bool / int / float -> z (B, D). The gathered form reads the
history rows through the (B, L) index into the representations of a batch's distinct items, so
no (B, L, D) history exists in forward or backward.

forward   one program per row b: loop over L in (BLOCK_L, BLOCK_D) tiles of x, score
          s_l = m_l * <x_l, q>, a_l = relu(s_l), z += sum_l a_l * x_l, in fp32 (fp64 for fp64
          inputs). Positions with m_l == 0 are not even loaded, and a tile of padding alone
          does no more than read its mask: a left-padded history of 6 items in 64 positions is
          one or two tiles of work, not eight.
backward  one program per row, one more pass over x: with g = dz, u_l = <g, x_l> and
          gate_l = (s_l > 0) * m_l (relu's gradient is 0 at s = 0, like torch):
              dx_l = a_l * g + gate_l * u_l * q
              dq   = sum_l gate_l * u_l * x_l
          s_l is recomputed from the tile, so only x, q, the mask (and the index) are saved.
          Plain form: dx_l is stored row by row (zeros at masked positions; a tile of padding
          alone stores zeros and computes nothing). Gathered form:
          dx_l is atomically added into an fp32 (fp64) buffer of reps' shape: no sort, no
          (B, L, D) temporary; the order of the float additions varies from run to run on a GPU.

Both are registered as torch.library custom ops (qin::sparse_target_attention and its
backward), with fake implementations for tracing, autograd and autocast registered on them; what
torch.compile and torch.export trace calls them. An eager call of plain tensors runs the same
implementation, setup and backward through _DirectASTA, a plain autograd.Function, which skips the
dispatcher's host cost (kernels.utils.needs_registered_op).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import choice, reference
from kernels.utils import (INTERPRETING, alert_not_deterministic, call_op, cast, check_attention_args,
                           check_gathered_attention_args, compute_dtype, differentiable_backend, direct_autograd,
                           forcing, launching_on, next_power_of_2, register_autocast, resolve_backend,
                           triton_cannot_run, warn_reference_runs)

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# A whole row of D lives in registers (BLOCK_D = next power of two of D). Past this width the
# tile would spill; wider rows would need a D loop, i.e. a second pass over the history.
MAX_D = 8192


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _history_rows(x_ptr, idx_ptr, row, ls, live, L, stride_xb, stride_xl, GATHER: tl.constexpr,
                  WIDE: tl.constexpr):
    """Pointers to the BLOCK_L history rows of batch row `row`, and the item index of each
    (positions that are not live read index 0 and are never loaded or written)."""
    if GATHER:
        item = tl.load(idx_ptr + row * L + ls, mask=live, other=0).to(tl.int64)
        return x_ptr + item[:, None] * stride_xl, item
    if WIDE:  # (L-1) * stride_xl passes 2**31 (a time-major history: stride B*D): int64 offsets
        ls = ls.to(tl.int64)
    return x_ptr + row * stride_xb + ls[:, None] * stride_xl, ls.to(tl.int64)


@triton.jit
def _row_offsets(BLOCK_D: tl.constexpr, VEC: tl.constexpr):
    """0 .. BLOCK_D-1 along a row, read VEC values a thread at a time (VEC=0: as Triton chooses,
    16 bytes a thread). The thread layout of every tile follows: VEC=4 gives 16-bit rows the layout
    of fp32 ones (4 values a thread, the warps side by side along D, each thread holding all
    BLOCK_L rows of its columns, so the sum over L stays in the thread); 16 bytes of 16-bit
    values put half the warps on other rows, and that sum crosses warps, through shared memory
    and a barrier, every trip of the L loop."""
    offs = tl.arange(0, BLOCK_D)
    if VEC > 0:
        offs = tl.max_contiguous(offs, VEC)
    return offs


@triton.jit
def _asta_fwd_kernel(
    x_ptr, idx_ptr, q_ptr, m_ptr, z_ptr,
    L, D, stride_xb, stride_xl,
    GATHER: tl.constexpr, WIDE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, SKIP_EMPTY_TILES: tl.constexpr, VEC: tl.constexpr,
):
    """Row b of z. x rows are strided (unit stride along D); q, m, index and z are contiguous."""
    row = tl.program_id(0).to(tl.int64)  # int64: B*L*D may pass 2**31 elements
    offs_d = _row_offsets(BLOCK_D, VEC)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < D

    q = tl.load(q_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    acc = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + offs_l
        m = tl.load(m_ptr + row * L + ls, mask=ls < L, other=0).to(ACC_DTYPE)
        live = m != 0  # masked-off positions are not loaded at all: they read as 0 and add 0
        # A tile of padding alone has nothing to do (unless forced to, to time what skipping saves).
        if not SKIP_EMPTY_TILES or tl.max(live.to(tl.int32), axis=0) != 0:
            rows, _ = _history_rows(x_ptr, idx_ptr, row, ls, live, L, stride_xb, stride_xl, GATHER, WIDE)
            x = tl.load(rows + offs_d[None, :], mask=live[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
            s = tl.sum(x * q[None, :], axis=1) * m
            a = tl.maximum(s, 0.0)
            acc += tl.sum(a[:, None] * x, axis=0)
    tl.store(z_ptr + row * D + offs_d, acc.to(z_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _asta_bwd_kernel(
    x_ptr, idx_ptr, q_ptr, m_ptr, g_ptr, dx_ptr, dq_ptr,
    L, D, stride_xb, stride_xl,
    GATHER: tl.constexpr, WIDE: tl.constexpr, ACC_DTYPE: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, SKIP_EMPTY_TILES: tl.constexpr, VEC: tl.constexpr,
):
    """Row b of dq, and its share of dx (plain: rows b*L.. of a (B*L, D) buffer, stored;
    gathered: rows index[b, l] of a (U, D) fp32/fp64 buffer, atomically added), unless NEED_DX is
    off (x frozen: a fixed item table); g = dz."""
    row = tl.program_id(0).to(tl.int64)
    offs_d = _row_offsets(BLOCK_D, VEC)
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
        if not SKIP_EMPTY_TILES or tl.max(live.to(tl.int32), axis=0) != 0:
            rows, item = _history_rows(x_ptr, idx_ptr, row, ls, live, L, stride_xb, stride_xl, GATHER, WIDE)
            x = tl.load(rows + offs_d[None, :], mask=live[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
            s = tl.sum(x * q[None, :], axis=1) * m  # recomputed, not saved
            u = tl.sum(x * g[None, :], axis=1)
            gu = tl.where(s > 0, m, 0.0) * u  # gate_l * u_l; strict > gives relu'(0) = 0 like torch
            if NEED_DX:
                a = tl.maximum(s, 0.0)
                dx = a[:, None] * g[None, :] + gu[:, None] * q[None, :]
                if GATHER:
                    tl.atomic_add(dx_ptr + item[:, None] * D + offs_d[None, :], dx,
                                  mask=live[:, None] & mask_d[None, :], sem="relaxed")
                else:
                    tl.store(dx_ptr + (row * L + ls[:, None]) * D + offs_d[None, :],
                             dx.to(dx_ptr.dtype.element_ty), mask=in_l[:, None] & mask_d[None, :])
            dq += tl.sum(gu[:, None] * x, axis=0)
        else:  # a tile of padding alone: nothing to add to dq; the plain form's dx is zeros there
            if NEED_DX and not GATHER:
                tl.store(dx_ptr + (row * L + ls[:, None]) * D + offs_d[None, :],
                         tl.zeros((BLOCK_L, BLOCK_D), dtype=dx_ptr.dtype.element_ty),
                         mask=in_l[:, None] & mask_d[None, :])
    tl.store(dq_ptr + row * D + offs_d, dq.to(dq_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a fixed heuristic, no autotuning
# ----------------------------------------------------------------------------------------------

def _config(seq_len: int, dim: int, interpreting: bool = INTERPRETING) -> dict:
    """BLOCK_L, BLOCK_D, VEC and the launch options for a (L, D) problem (what forced_config sets,
    in its block).

    On a GPU a tile holds about 4096 elements (32 fp32 values per thread with 4 warps), which
    keeps the x tile and the backward's dx tile in registers without spills (checked on sm_89 and
    sm_90 by tests/test_codegen.py). The interpreter runs each program in numpy, where larger
    tiles are faster; 16 rows still make the small test histories (L <= 40) take several loop
    trips with a ragged last one, as real ones do on the GPU.
    """
    block_d = next_power_of_2(dim)
    if interpreting:
        block_l = min(next_power_of_2(seq_len), max(1, 16384 // block_d), 16)
        cfg = dict(BLOCK_L=block_l, BLOCK_D=block_d, SKIP_EMPTY_TILES=True, VEC=4, num_warps=1, num_stages=1)
    else:
        block_l = min(next_power_of_2(seq_len), max(1, 4096 // block_d), 16)
        num_warps = 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)  # wide rows: more threads, fewer values each
        # The L loop has no tl.dot for the pipeliner to feed (num_stages changes nothing in the
        # generated code); latency is hidden by the many resident programs (one per row).
        # SKIP_EMPTY_TILES: a tile with no live position computes nothing (a left-padded history of
        # median 6 items in 64 positions is mostly such tiles); bench/bench_asta.py times it against
        # reading every tile. VEC=4: every dtype gets the thread layout with which the fp32 kernels
        # read the history at the copy ceiling on an H200 (_row_offsets); 16-bit rows in Triton's own
        # layout (VEC=0) read half the bytes in more time than fp32 there. bench/bench_asta.py times
        # the two layouts against each other.
        cfg = dict(BLOCK_L=block_l, BLOCK_D=block_d, SKIP_EMPTY_TILES=True, VEC=4, num_warps=num_warps, num_stages=1)
    cfg.update({k: v for k, v in _FORCED.items() if k != "maxnreg"})  # that one is _register_cap's
    cfg["VEC"] = min(cfg["VEC"], block_d)  # a row narrower than the vector is one vector
    return cfg


# The register cap of the 16-bit forwards' launches on a GPU. ptxas, told the block size (Triton
# emits .reqntid) but no cap, spilled a register of the 16-bit plain forward inside its loop for
# sm_90 to reach a higher occupancy tier (56 registers and 8 bytes of stack, with the ptxas of
# Triton 3.3 and 3.6; not with 3.9's). With a cap of 72, what the fp32 forwards use, every forward
# keeps all in registers with each of those versions, for sm_89 and sm_90 (tests/test_codegen.py;
# a cap of 64 spilled for sm_89). fp32 launches keep ptxas's own choice, and so do configurations
# forced_config sets: the cap is checked for _config's alone (Triton's own 16-bit layout, VEC=0,
# spilled under it for sm_89, and larger tiles need more registers).
FORWARD_MAX_REGISTERS_16_BIT = 72


def _register_cap(x: torch.Tensor) -> dict:
    """The forward's launch option maxnreg, where it is set (see FORWARD_MAX_REGISTERS_16_BIT): a
    cap forced_config sets, in any dtype; else the 16-bit cap, unless other options are forced."""
    if INTERPRETING:
        return {}
    if "maxnreg" in _FORCED:
        return {"maxnreg": _FORCED["maxnreg"]}
    if x.element_size() != 2 or _FORCED:
        return {}
    return {"maxnreg": FORWARD_MAX_REGISTERS_16_BIT}


# A launch configuration in force instead of _config's (forced_config): empty in use.
_FORCED: dict = {}
FORCEABLE = ("BLOCK_L", "num_warps", "num_stages", "SKIP_EMPTY_TILES", "VEC", "maxnreg")


@contextlib.contextmanager
def forced_config(**cfg):
    """Launch the kernels with `cfg` (any of BLOCK_L, num_warps, num_stages, SKIP_EMPTY_TILES, VEC,
    and maxnreg, the forwards' register cap on a GPU) in place of _config's within the block: for
    timing candidate configurations on a GPU (bench/tune_asta.py), and in bench/bench_asta.py the
    kernels reading every tile against skipping those of padding alone, Triton's own thread layout
    (VEC=0) against _config's, and another register cap against FORWARD_MAX_REGISTERS_16_BIT.
    BLOCK_D stays the row's width: the kernels hold a whole row."""
    for name, value in cfg.items():
        if name == "SKIP_EMPTY_TILES":
            if type(value) is not bool:
                raise ValueError(f"forced_config: SKIP_EMPTY_TILES must be True or False; got {value!r}")
        elif name == "VEC":
            if type(value) is not int or value < 0 or value & (value - 1):
                raise ValueError(f"forced_config: VEC must be 0 (Triton's choice) or a power of two; got {value!r}")
        elif type(value) is not int or value < 1 or (name not in ("num_stages", "maxnreg") and value & (value - 1)):
            raise ValueError(f"forced_config: {name} must be a positive integer"
                             f"{'' if name in ('num_stages', 'maxnreg') else ', a power of two'}; got {value!r}")
    with forcing(_FORCED, cfg, FORCEABLE):
        yield


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------
# Launchers: x is the history (B, L, D) when index is None, else the representations (U, D)
# ----------------------------------------------------------------------------------------------

def _layout(x, index, query, mask):
    """Copy only what must be copied: x keeps its strides unless its last one is not 1; a bool
    mask is read as uint8; a float mask of another dtype is rounded to x's, as the reference does."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.contiguous().view(torch.uint8)
    elif mask.is_floating_point() and mask.dtype != x.dtype:
        mask = mask.to(x.dtype)
    index = index.contiguous() if index is not None else None
    return x, index, query.contiguous(), mask.contiguous()


def _wide(x, index, seq_len: int) -> bool:
    """Whether the plain form's history offsets need int64: the last position's offset within a
    row, (L-1) * stride(1), passes int32 (int32 keeps the usual case's registers: in int64 the
    forward spilled on sm_90 with Triton 3.3)."""
    return index is None and (seq_len - 1) * x.stride(1) >= 2**31


def _strides(x, index):
    if index is None:
        return x.stride(0), x.stride(1)
    return 0, x.stride(0)


def _forward(x, index, query, mask):
    batch, dim = query.shape
    seq_len = mask.shape[1]
    z = torch.zeros((batch, dim), device=query.device, dtype=x.dtype)
    if z.numel() == 0 or seq_len == 0 or x.numel() == 0:  # nothing to launch
        return z
    x, index, query, mask = _layout(x, index, query, mask)
    with launching_on(z.device):
        _asta_fwd_kernel[(batch,)](
            x, index if index is not None else mask, query, mask, z, seq_len, dim, *_strides(x, index),
            GATHER=index is not None, WIDE=_wide(x, index, seq_len), ACC_DTYPE=_acc_dtype(x.dtype),
            **_config(seq_len, dim), **_register_cap(x),
        )
    return z


def _backward(grad_z, x, index, query, mask, need_x=True):
    """(grad_x, grad_q); grad_x is empty (and nothing of it computed) where need_x is off."""
    batch, dim = query.shape
    seq_len = mask.shape[1]
    grad_q = torch.zeros_like(query, memory_format=torch.contiguous_format)
    if not need_x:
        grad_x = x.new_empty(0)
    elif index is None:  # the kernel stores every element (zeros at masked positions): no memset
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:  # accumulated by atomics: fp32 for 16-bit inputs (fp16 atomics are slow or missing)
        grad_x = torch.zeros(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    if grad_q.numel() == 0 or seq_len == 0 or x.numel() == 0:
        return grad_x.to(x.dtype), grad_q
    x, index, query, mask = _layout(x, index, query, mask)
    grad_z = grad_z.to(x.dtype).contiguous()  # e.g. expanded (stride 0) grads of a sum
    with launching_on(grad_q.device):
        _asta_bwd_kernel[(batch,)](
            x, index if index is not None else mask, query, mask, grad_z, grad_x if need_x else grad_q, grad_q,
            seq_len, dim, *_strides(x, index),
            GATHER=index is not None, WIDE=_wide(x, index, seq_len), ACC_DTYPE=_acc_dtype(x.dtype), NEED_DX=need_x,
            **_config(seq_len, dim),
        )
    return grad_x.to(x.dtype), grad_q


# ----------------------------------------------------------------------------------------------
# Registered ops: qin::sparse_target_attention(x, index, query, mask) and its backward
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("qin::sparse_target_attention", mutates_args=())
def _asta_op(x: torch.Tensor, index: torch.Tensor | None, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _op_forward(x, index, query, mask)


def _op_forward(x, index, query, mask):
    why = triton_cannot_run(x.device)
    if why:  # a program exported where the kernel ran (qin export on a GPU), run where it cannot
        warn_reference_runs("qin::sparse_target_attention", why)
        return _reference_attention(index)(x, query, mask).to(x.dtype)
    return _forward(x, index, query, mask)


def _reference_attention(index):
    """The op's function of (x, query, mask) through the plain reference, in fp32 (fp64 stays)."""
    def attention(x, query, mask):
        return reference.sparse_target_attention(x if index is None else F.embedding(index, x), query, mask)
    return reference.accurately(attention)


@_asta_op.register_fake
def _(x, index, query, mask):
    return query.new_empty(query.shape, dtype=x.dtype)


@torch.library.custom_op("qin::sparse_target_attention_backward", mutates_args=())
def _asta_backward_op(grad_z: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None, query: torch.Tensor,
                      mask: torch.Tensor, need_x: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    return _op_backward(grad_z, x, index, query, mask, need_x)


def _op_backward(grad_z, x, index, query, mask, need_x=True):
    why = triton_cannot_run(x.device)
    if why:  # as the forward op: the same gradients, from the torch path's backward, in fp32
        warn_reference_runs("qin::sparse_target_attention_backward", why)
        wide = torch.promote_types(x.dtype, torch.float32)
        reps = x.to(wide).reshape(-1, x.shape[-1])  # the plain form: reps row b * L + l is x[b, l]
        rows = index if index is not None else torch.arange(reps.shape[0], device=x.device).reshape(mask.shape)
        q = query.to(wide)
        scores = torch.einsum("bld,bd->bl", F.embedding(rows, reps), q)
        grad_reps, grad_q, _ = reference.regathered_attention_backward(grad_z.to(wide), reps, rows, q, mask, scores,
                                                                       [need_x, True, False])
        return (grad_reps.reshape(x.shape).to(x.dtype) if need_x else x.new_empty(0)), grad_q.to(query.dtype)
    return _backward(grad_z, x, index, query, mask, need_x)


@_asta_backward_op.register_fake
def _(grad_z, x, index, query, mask, need_x=True):
    contiguous = torch.contiguous_format
    grad_x = torch.empty_like(x, memory_format=contiguous) if need_x else x.new_empty(0)
    return grad_x, torch.empty_like(query, memory_format=contiguous)


def _setup_context(ctx, inputs, output):
    x, index, query, mask = inputs
    # A mask made under torch.inference_mode (a cached padding mask) cannot be saved as it is; the
    # torch path keeps only what it computes from it, so copy it rather than refuse.
    ctx.save_for_backward(x, index, query, mask.clone() if mask.is_inference() else mask)


def _autograd_backward(ctx, grad_z):
    x, index, query, mask = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable themselves
        grad_x, grad_q, _ = reference.differentiable_attention_gradients(
            index, x, query, mask, (ctx.needs_input_grad[0], ctx.needs_input_grad[2], False), grad_z)
        return grad_x, None, grad_q, None
    if index is not None and x.device.type == "cuda" and ctx.needs_input_grad[0]:
        # (The interpreter runs programs one after another: the same order every time.)
        alert_not_deterministic("The Triton backward of gathered_sparse_target_attention (the gradient into reps "
                                "is summed by atomic adds, in whatever order the GPU runs them)")
    # x frozen (a fixed item table): its gradient, the atomics of the gathered form, is not formed.
    need_x = ctx.needs_input_grad[0]
    grad_x, grad_q = call_op(_asta_backward_op, _op_backward, grad_z, x, index, query, mask, need_x)
    return grad_x if need_x else None, None, grad_q, None


_asta_op.register_autograd(_autograd_backward, setup_context=_setup_context)
register_autocast("qin::sparse_target_attention", _asta_op, float_args=(0, 2))
_DirectASTA = direct_autograd("_DirectASTA", _op_forward, _setup_context, _autograd_backward, autocast_free=True)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check_width(dim: int) -> None:
    if dim > MAX_D:
        raise ValueError(f"the history has D={dim} features; the Triton kernel keeps a row in registers and "
                         f"supports D <= {MAX_D} (use backend='torch')")


def sparse_target_attention(history, query, mask, *, backend="auto"):
    """z[b] = sum_l relu(mask[b,l] * <history[b,l], query[b]>) * history[b,l]; see the module docstring.

    history (B, L, D), query (B, D), mask (B, L) bool or 0/1 numbers -> (B, D). Floating inputs
    are read in one dtype: autocast's where it is on, else their promoted type, which is the
    output's dtype; sums run in fp32 (fp64 for fp64). Differentiable in history and query (and a
    floating mask, on the torch path: "auto" runs it where the mask requires grad).
    """
    check_attention_args(history, query, mask)
    seq_len, dim = history.shape[1:]
    dtype = compute_dtype(history.device, history, query)
    history, query = cast(dtype, history, query)
    backend = differentiable_backend(backend, "sparse_target_attention", mask)
    if backend == "auto" and dim > MAX_D:
        backend = "torch"  # wider than the kernel takes: whatever MEASURED_FASTER says
    trial = choice.trial(backend, history.device, "asta", dtype, ("plain", f"L={seq_len}", f"D={dim}"),
                         sparse_target_attention, (history, query, mask), {})
    if resolve_backend(backend, history.device, "asta", dtype, trial) == "torch":
        return reference.sparse_target_attention(history, query, mask)
    _check_width(dim)
    return call_op(_asta_op, _DirectASTA.apply, history, None, query, mask)


def gathered_sparse_target_attention(reps, index, query, mask, *, backend="auto"):
    """sparse_target_attention(reps[index], query, mask), without ever forming reps[index].

    reps (U, D) the representations of a batch's distinct items, index (B, L) integer row of reps
    for each history position, query (B, D), mask (B, L). Every index must be a row of reps, at
    masked positions too: the Triton kernel reads only live ones, but the torch path gathers all
    (checked on the CPU, for both). The gradient reaches reps through the index (summed over
    repeats), and query.
    """
    check_gathered_attention_args(reps, index, query, mask)
    batch, seq_len = index.shape
    dim = reps.shape[1]
    dtype = compute_dtype(reps.device, reps, query)
    reps, query = cast(dtype, reps, query)
    backend = differentiable_backend(backend, "gathered_sparse_target_attention", mask)
    if backend == "auto" and torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled() and reps.requires_grad:
        backend = "torch"  # the Triton backward sums into reps by atomic adds: not deterministic on a GPU
    if backend == "auto" and dim > MAX_D:
        backend = "torch"  # wider than the kernel takes: whatever MEASURED_FASTER says
    # The batch of the shape class is index's B (reps' U varies from batch to batch).
    trial = choice.trial(backend, reps.device, "asta", dtype, ("gathered", f"L={seq_len}", f"D={dim}"),
                         lambda index, reps, query, mask, backend: gathered_sparse_target_attention(
                             reps, index, query, mask, backend=backend), (index, reps, query, mask), {})
    if resolve_backend(backend, reps.device, "asta", dtype, trial) == "torch":
        return reference.regathered_sparse_target_attention(reps, index, query, mask)
    _check_width(dim)
    return call_op(_asta_op, _DirectASTA.apply, reps, index, query, mask)


# ----------------------------------------------------------------------------------------------
# Code generation cases: what the wrapper launches on a GPU at the paper's shape
# ----------------------------------------------------------------------------------------------

def codegen_cases(dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One dict per kernel launched in training at B=8192, L=64, D=384 (mask in x's dtype, as the
    model passes it): the plain and the gathered forms.

    Each has name, fn, signature, constexprs, attrs, num_warps, num_stages (and the 16-bit
    forwards maxnreg), so that triton.compile(ASTSource(fn, signature, constexprs, attrs),
    target=GPUTarget("cuda", 89, 32), options=dict(num_warps=..., num_stages=..., maxnreg=...))
    builds the kernel the wrapper would launch.
    attrs repeats the alignment facts the JIT derives from the real arguments (16-byte-aligned
    pointers, ints divisible by 16); without them the loads are not vectorised.
    """
    seq_len, dim = 64, 384  # the paper's shape; the batch only sets the grid, not the code
    t = f"*{_TL_DTYPE[dtype]}"
    cfg = _config(seq_len, dim, interpreting=False)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")

    def case(name, fn, pointers, gather):
        constexprs = dict(GATHER=gather, WIDE=False, ACC_DTYPE=_acc_dtype(dtype), **cfg)
        if "NEED_DX" in fn.arg_names:
            constexprs["NEED_DX"] = True  # what training the representations launches
        ints = dict(L=seq_len, D=dim, stride_xb=0 if gather else seq_len * dim, stride_xl=dim)
        types = {**{p: t for p in pointers}, "idx_ptr": "*i64" if gather else t,
                 **{k: "i32" for k in ints}, **{k: "constexpr" for k in constexprs}}
        if gather and "dx_ptr" in pointers:
            types["dx_ptr"] = "*fp32"  # the atomic accumulator
        signature = {arg: types[arg] for arg in fn.arg_names}  # in the kernel's argument order
        aligned = [*pointers, "idx_ptr", *(k for k, v in ints.items() if v % 16 == 0 and v)]
        attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
        launch = dict(num_warps=num_warps, num_stages=num_stages)
        if fn is _asta_fwd_kernel and torch.empty(0, dtype=dtype).element_size() == 2:
            launch["maxnreg"] = FORWARD_MAX_REGISTERS_16_BIT  # as _forward launches it (_register_cap)
        return dict(name=name, fn=fn, signature=signature, constexprs=constexprs, attrs=attrs, **launch)

    fwd = ("x_ptr", "q_ptr", "m_ptr", "z_ptr")
    bwd = ("x_ptr", "q_ptr", "m_ptr", "g_ptr", "dx_ptr", "dq_ptr")
    return [
        case("asta_fwd", _asta_fwd_kernel, fwd, False),
        case("asta_bwd", _asta_bwd_kernel, bwd, False),
        case("asta_gather_fwd", _asta_fwd_kernel, fwd, True),
        case("asta_gather_bwd", _asta_bwd_kernel, bwd, True),
    ]

"""Fused Triton quadratic projection of QNN: y = x * sum_r dropout(x @ W_r.T + b_r).

x (B, D), weight (M*D, D) laid out like nn.Linear(D, M*D) (row r*D + j is W_r[j]), bias (M*D,).

Training with dropout (p > 0):
  forward   one kernel: for each output tile, h_r = x @ W_r.T + b_r in fp32 for r = 0..M-1, dropout
            from a counter-based Philox stream, summed over r and multiplied by x. Only y (B, D) is
            written, plus s = sum_r dropout(h_r) (B, D) for the backward. The (B, M*D) hidden and
            its mask are never stored: the mask is a pure function of (seed, element offset).
  backward  gs = gy * x; grad_x = gy * s + sum_r (gs * mask_r / (1-p)) @ W_r and
            grad_W_r = (gs * mask_r / (1-p)).T @ x, grad_b_r = sum_b gs * mask_r / (1-p),
            two kernels that regenerate mask_r from the seed tile by tile.
Without dropout (eval, or p == 0) every mask is all ones, so sum_r (x @ W_r.T + b_r) =
x @ W_bar.T + b_bar with W_bar = sum_r W_r: the same kernels run with M = 1 on W_bar, an M times
smaller product; autograd carries the gradients back through the sum.

The dropout stream: element (b, r, j) of the hidden keeps iff tl.rand(seed, b*M*D + r*D + j) >= p
(int32 offsets). `dropout_keep_mask` regenerates exactly that mask, for tests and replays.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.utils import INTERPRETING, check_tensor, resolve_backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_INT32_LIMIT = 2**31


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _keep(seed, offsets, p):
    """The dropout decision shared by every kernel: one Philox draw per hidden element."""
    return tl.rand(seed, offsets) >= p


@triton.jit
def _qnn_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, s_ptr,
    B, D, M, seed, p, scale,
    HAS_DROPOUT: tl.constexpr, STORE_S: tl.constexpr, UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_B, BLOCK_N) tile of y and s; loops over the M row groups and over D in BLOCK_K."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_n = offs_n < D

    s = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
    for r in range(0, M):
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            a = tl.load(x_ptr + offs_b[:, None] * D + ks[None, :],
                        mask=mask_b[:, None] & (ks[None, :] < D), other=0.0)
            # W_r.T tile (BLOCK_K, BLOCK_N): element [k, n] is weight[r*D + n, k].
            w = tl.load(w_ptr + (r * D + offs_n)[None, :] * D + ks[:, None],
                        mask=mask_n[None, :] & (ks[:, None] < D), other=0.0)
            if UPCAST:  # the interpreter cannot multiply bf16/fp16 tiles correctly
                a = a.to(ACC_DTYPE)
                w = w.to(ACC_DTYPE)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        h = acc + tl.load(b_ptr + r * D + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
        if HAS_DROPOUT:
            hidden_offsets = offs_b[:, None] * (M * D) + r * D + offs_n[None, :]
            h = tl.where(_keep(seed, hidden_offsets, p), h * scale, 0.0)
        s += h

    tile = offs_b[:, None] * D + offs_n[None, :]
    tile_mask = mask_b[:, None] & mask_n[None, :]
    xo = tl.load(x_ptr + tile, mask=tile_mask, other=0.0).to(ACC_DTYPE)
    tl.store(y_ptr + tile, (xo * s).to(y_ptr.dtype.element_ty), mask=tile_mask)
    if STORE_S:
        tl.store(s_ptr + tile, s.to(s_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _qnn_bwd_dx_kernel(
    gy_ptr, x_ptr, s_ptr, w_ptr, dx_ptr,
    B, D, M, seed, p, scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x tile (BLOCK_B rows, BLOCK_N input columns) = gy*s + sum_r masked(gs) @ W_r.

    The reduction runs over r and the D output columns in chunks of BLOCK_K; the masked gs chunk
    (BLOCK_B, BLOCK_K) is rebuilt from gy, x and the seed each time, never read from memory.
    """
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input columns of x (columns of W_r)
    offs_k = tl.arange(0, BLOCK_K)  # output columns j (rows of W_r)
    mask_b = offs_b < B
    mask_n = offs_n < D

    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
    for r in range(0, M):
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            chunk = offs_b[:, None] * D + ks[None, :]
            chunk_mask = mask_b[:, None] & (ks[None, :] < D)
            gy = tl.load(gy_ptr + chunk, mask=chunk_mask, other=0.0)
            xv = tl.load(x_ptr + chunk, mask=chunk_mask, other=0.0)
            g = gy.to(ACC_DTYPE) * xv.to(ACC_DTYPE)
            if HAS_DROPOUT:
                hidden_offsets = offs_b[:, None] * (M * D) + r * D + ks[None, :]
                g = tl.where(_keep(seed, hidden_offsets, p), g * scale, 0.0)
            # W_r tile (BLOCK_K, BLOCK_N): rows r*D + j, columns i, in its natural layout.
            w = tl.load(w_ptr + (r * D + ks)[:, None] * D + offs_n[None, :],
                        mask=(ks[:, None] < D) & mask_n[None, :], other=0.0)
            if UPCAST:
                w = w.to(ACC_DTYPE)
            else:  # tensor cores take bf16/fp16 operands; accumulation stays in ACC_DTYPE
                g = g.to(w.dtype)
            acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)

    tile = offs_b[:, None] * D + offs_n[None, :]
    tile_mask = mask_b[:, None] & mask_n[None, :]
    gy = tl.load(gy_ptr + tile, mask=tile_mask, other=0.0).to(ACC_DTYPE)
    s = tl.load(s_ptr + tile, mask=tile_mask, other=0.0).to(ACC_DTYPE)
    tl.store(dx_ptr + tile, (gy * s + acc).to(dx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _qnn_bwd_dw_kernel(
    gy_ptr, x_ptr, dw_ptr, db_ptr,
    B, D, M, seed, p, scale,
    HAS_DROPOUT: tl.constexpr, STORE_DB: tl.constexpr, UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """grad_W tile (BLOCK_Q weight rows q = r*D + j, BLOCK_I columns) = masked(gs).T @ x over B.

    A weight row q is hidden column q, so its dropout offset is b*M*D + q and its gs column is
    j = q % D: row tiles may straddle two groups r. The programs of the first column tile also
    reduce grad_b, so no atomics and no second pass over gy are needed.
    """
    pid_q = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_bb = tl.arange(0, BLOCK_B)
    mask_q = offs_q < M * D
    mask_i = offs_i < D
    col_j = offs_q % D  # the gs column each weight row reads

    acc = tl.zeros((BLOCK_Q, BLOCK_I), dtype=ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_Q,), dtype=ACC_DTYPE)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + offs_bb
        mask_bs = bs < B
        g_mask = mask_bs[:, None] & mask_q[None, :]
        gy = tl.load(gy_ptr + bs[:, None] * D + col_j[None, :], mask=g_mask, other=0.0)
        xg = tl.load(x_ptr + bs[:, None] * D + col_j[None, :], mask=g_mask, other=0.0)
        g = gy.to(ACC_DTYPE) * xg.to(ACC_DTYPE)  # (BLOCK_B, BLOCK_Q)
        if HAS_DROPOUT:
            g = tl.where(_keep(seed, bs[:, None] * (M * D) + offs_q[None, :], p), g * scale, 0.0)
        if STORE_DB:
            acc_b += tl.sum(g, axis=0)
        xv = tl.load(x_ptr + bs[:, None] * D + offs_i[None, :],
                     mask=mask_bs[:, None] & mask_i[None, :], other=0.0)
        if UPCAST:
            xv = xv.to(ACC_DTYPE)
        else:
            g = g.to(xv.dtype)
        acc = tl.dot(tl.trans(g), xv, acc, input_precision=DOT_PRECISION)

    tile = offs_q[:, None] * D + offs_i[None, :]
    tl.store(dw_ptr + tile, acc.to(dw_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_i[None, :])
    if STORE_DB:
        if pid_i == 0:  # every column tile reduced the same grad_b; one of them writes it
            tl.store(db_ptr + offs_q, acc_b.to(db_ptr.dtype.element_ty), mask=mask_q)


@triton.jit
def _qnn_keep_mask_kernel(out_ptr, n, seed, p, BLOCK: tl.constexpr):
    """Element e of the flat (B, M*D) hidden: 1 if kept. Same offsets as the kernels above."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(seed, offs, p)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < n)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a fixed heuristic, no autotuning
# ----------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's TF32 switch so they match what torch.matmul would do."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"  # ignored for 16-bit


def _configs(dtype: torch.dtype, interpreting: bool = INTERPRETING) -> dict:
    """Block sizes, warps and stages of each kernel for a dtype.

    The interpreter runs every program in numpy: small blocks keep test shapes cheap. On a GPU,
    16-bit tiles feed the tensor cores with a 3-stage pipelined K loop.
    """
    if interpreting:
        small = dict(num_warps=1, num_stages=1)
        return {
            "fwd": dict(BLOCK_B=16, BLOCK_N=16, BLOCK_K=16, **small),
            "dx": dict(BLOCK_B=16, BLOCK_N=16, BLOCK_K=16, **small),
            "dw": dict(BLOCK_Q=16, BLOCK_I=16, BLOCK_B=16, **small),
        }
    if dtype in (torch.float16, torch.bfloat16):
        # Checked free of register spills on sm_89 and sm_90 (tests/test_codegen.py), shared memory
        # under sm_89's 99 KB. The forward keeps two fp32 tiles (the group sum and h_r) live next
        # to the Philox state, so its tile is half as tall; 128 x 128 spills there on sm_89.
        mm = dict(num_warps=8, num_stages=3)
        return {
            "fwd": dict(BLOCK_B=64, BLOCK_N=128, BLOCK_K=64, **mm),
            "dx": dict(BLOCK_B=128, BLOCK_N=128, BLOCK_K=32, **mm),
            "dw": dict(BLOCK_Q=128, BLOCK_I=128, BLOCK_B=32, **mm),
        }
    # fp32 (FMA products unless TF32 is allowed) and fp64: smaller tiles, 4 warps. The grad_W
    # tile gets 8 warps: with 4, sm_90 spilled 16 bytes a thread at 96 registers (codegen table).
    k = 16 if dtype == torch.float64 else 32
    mm = dict(num_warps=4, num_stages=2)
    return {
        "fwd": dict(BLOCK_B=32, BLOCK_N=64, BLOCK_K=k, **mm),
        "dx": dict(BLOCK_B=64, BLOCK_N=64, BLOCK_K=k, **mm),
        "dw": dict(BLOCK_Q=64, BLOCK_I=64, BLOCK_B=k, num_warps=8, num_stages=2),
    }


def _common_constexprs(dtype: torch.dtype, interpreting: bool = INTERPRETING) -> dict:
    return dict(
        UPCAST=interpreting,
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION=_dot_precision(dtype),
    )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _forward(x, weight, bias, num_row, p, seed, has_dropout, store_s):
    batch, dim = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if store_s else y  # s_ptr is never written when STORE_S is off
    cfg = _configs(x.dtype)["fwd"]
    grid = (triton.cdiv(batch, cfg["BLOCK_B"]), triton.cdiv(dim, cfg["BLOCK_N"]))
    _qnn_fwd_kernel[grid](
        x, weight, bias, y, s, batch, dim, num_row, seed, p, 1.0 / (1.0 - p),
        HAS_DROPOUT=has_dropout, STORE_S=store_s, **_common_constexprs(x.dtype), **cfg,
    )
    return y, (s if store_s else None)


def _grad_x(gy, x, s, weight, num_row, p, seed, has_dropout):
    batch, dim = x.shape
    dx = torch.empty_like(x)
    cfg = _configs(x.dtype)["dx"]
    grid = (triton.cdiv(batch, cfg["BLOCK_B"]), triton.cdiv(dim, cfg["BLOCK_N"]))
    _qnn_bwd_dx_kernel[grid](
        gy, x, s, weight, dx, batch, dim, num_row, seed, p, 1.0 / (1.0 - p),
        HAS_DROPOUT=has_dropout, **_common_constexprs(x.dtype), **cfg,
    )
    return dx


def _grad_weight_bias(gy, x, weight, bias, num_row, p, seed, has_dropout, need_bias):
    batch, dim = x.shape
    dw = torch.empty_like(weight)
    db = torch.empty_like(bias) if need_bias else dw  # db_ptr is never written when STORE_DB is off
    cfg = _configs(x.dtype)["dw"]
    grid = (triton.cdiv(num_row * dim, cfg["BLOCK_Q"]), triton.cdiv(dim, cfg["BLOCK_I"]))
    _qnn_bwd_dw_kernel[grid](
        gy, x, dw, db, batch, dim, num_row, seed, p, 1.0 / (1.0 - p),
        HAS_DROPOUT=has_dropout, STORE_DB=need_bias, **_common_constexprs(x.dtype), **cfg,
    )
    return dw, (db if need_bias else None)


class _QuadraticProjection(torch.autograd.Function):
    """Saves x, weight, s (B, D) and the seed: nothing of width M*D, no mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_row, p, seed, has_dropout):
        y, s = _forward(x, weight, bias, num_row, p, seed, has_dropout, store_s=True)
        ctx.save_for_backward(x, weight, bias, s)
        ctx.num_row, ctx.p, ctx.seed, ctx.has_dropout = num_row, p, seed, has_dropout
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, s = ctx.saved_tensors
        gy = gy.to(x.dtype).contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        args = (ctx.num_row, ctx.p, ctx.seed, ctx.has_dropout)
        dx = _grad_x(gy, x, s, weight, *args) if need_x else None
        dw = db = None
        if need_w or need_b:  # one kernel gives both; grad_W is computed even if only bias needs it
            dw, db = _grad_weight_bias(gy, x, weight, bias, *args, need_bias=need_b)
            dw = dw if need_w else None
        return dx, dw, db, None, None, None, None


def _run(x, weight, bias, num_row, p, seed, has_dropout):
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    if wants_grad:
        return _QuadraticProjection.apply(x, weight, bias, num_row, p, seed, has_dropout)
    return _forward(x, weight, bias, num_row, p, seed, has_dropout, store_s=False)[0]


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check_dropout_p(dropout_p) -> float:
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}") from None
    if not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a finite number in [0, 1), got {dropout_p!r}")
    return p


def _check_seed(seed) -> int:
    if isinstance(seed, torch.Tensor) and seed.numel() == 1:
        seed = seed.item()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _INT32_LIMIT:
        raise ValueError(f"seed must be None or an int in [0, 2**31), got {seed!r}")
    return seed


def _check_args(x, weight, bias, num_row):
    if isinstance(num_row, bool) or not isinstance(num_row, int) or num_row < 1:
        raise ValueError(f"num_row must be a positive int, got {num_row!r}")
    check_tensor("x", x, 2, FLOAT_DTYPES)
    batch, dim = x.shape
    if dim < 1:
        raise ValueError(f"x must have at least one column, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, 2, (x.dtype,), x.device)
    if tuple(weight.shape) != (num_row * dim, dim):
        raise ValueError(f"weight must have shape (num_row * D, D) = {(num_row * dim, dim)} for x of shape "
                         f"{tuple(x.shape)} and num_row={num_row}, got {tuple(weight.shape)}")
    check_tensor("bias", bias, 1, (x.dtype,), x.device)
    if tuple(bias.shape) != (num_row * dim,):
        raise ValueError(f"bias must have shape (num_row * D,) = {(num_row * dim,)}, got {tuple(bias.shape)}")


def quadratic_projection(x, weight, bias, num_row, *, dropout_p=0.0, training=False, seed=None, backend="auto"):
    """y = x * sum_r dropout(x @ W_r.T + b_r); see the module docstring.

    seed fixes the dropout stream of the Triton path (None: drawn from torch's CPU generator,
    so torch.manual_seed makes runs repeatable); the torch backend uses torch's own dropout.
    """
    _check_args(x, weight, bias, num_row)
    p = _check_dropout_p(dropout_p)
    if seed is not None:
        seed = _check_seed(seed)
    if resolve_backend(backend, x.device) == "torch":
        return reference.quadratic_projection(x, weight, bias, num_row, p, training)

    batch, dim = x.shape
    if batch == 0:  # nothing to launch; the reference gives the empty result with its autograd graph
        return reference.quadratic_projection(x, weight, bias, num_row, p, training)
    if batch * num_row * dim >= _INT32_LIMIT or num_row * dim * dim >= _INT32_LIMIT:
        raise ValueError(f"x of shape {tuple(x.shape)} with num_row={num_row} needs more than 2**31 hidden "
                         f"elements; the kernels index with int32")
    x = x.contiguous()

    if training and p > 0.0:
        if seed is None:
            seed = int(torch.randint(0, _INT32_LIMIT - 1, (1,)).item())
        return _run(x, weight.contiguous(), bias.contiguous(), num_row, p, seed, True)

    # No dropout: sum the M groups first (in fp32 or wider) and run one M = 1 product.
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    if num_row == 1:
        w_bar, b_bar = weight.contiguous(), bias.contiguous()
    else:
        w_bar = weight.view(num_row, dim, dim).sum(0, dtype=acc_dtype).to(x.dtype)
        b_bar = bias.view(num_row, dim).sum(0, dtype=acc_dtype).to(x.dtype)
    return _run(x, w_bar, b_bar, 1, 0.0, 0, False)


def dropout_keep_mask(seed: int, batch: int, num_row: int, dim: int, dropout_p: float,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep mask (batch, num_row * dim) bool that the kernels draw for this seed and p."""
    seed = _check_seed(seed)
    p = _check_dropout_p(dropout_p)
    device = torch.device(device)
    if resolve_backend("triton", device) != "triton":  # raises off CUDA without the interpreter
        raise ValueError(f"dropout_keep_mask needs Triton on {device}")
    n = batch * num_row * dim
    if n >= _INT32_LIMIT:
        raise ValueError(f"a mask of {n} elements does not fit the kernels' int32 offsets")
    out = torch.empty((batch, num_row * dim), dtype=torch.int8, device=device)
    if n:
        block = 256 if INTERPRETING else 1024
        _qnn_keep_mask_kernel[(triton.cdiv(n, block),)](out, n, seed, p, BLOCK=block)
    return out.bool()


# ----------------------------------------------------------------------------------------------
# Code generation cases: what the wrapper launches on a GPU at the paper's shape
# ----------------------------------------------------------------------------------------------

def codegen_cases(dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One dict per kernel launched in training with dropout at B=8192, D=1024, M=4 (plus eval).

    Each has name, fn, signature, constexprs, attrs, num_warps, num_stages, so that
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=..., options=dict(
    num_warps=..., num_stages=...)) builds the GPU kernel (not the interpreter configuration).
    attrs holds the alignment hints the JIT derives from the real arguments; leaving it out
    compiles a slower, unpipelined variant.
    """
    t = _TL_DTYPE[dtype]
    cfgs = _configs(dtype, interpreting=False)
    common = _common_constexprs(dtype, interpreting=False)
    scalars = dict(B="i32", D="i32", M="i32", seed="i32", p="fp32", scale="fp32")

    def case(name, fn, pointers, cfg, **flags):
        cfg = dict(cfg)
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        constexprs = {**flags, **common, **cfg}
        types = {**{ptr: f"*{t}" for ptr in pointers}, **scalars, **{k: "constexpr" for k in constexprs}}
        signature = {arg: types[arg] for arg in fn.arg_names}  # in the kernel's argument order
        # The JIT marks 16-byte-aligned pointers and ints divisible by 16 (B=8192, D=1024) as such;
        # without these hints loads are not vectorised and the K loop is not pipelined.
        aligned = (*pointers, "B", "D")
        attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
        return dict(name=name, fn=fn, signature=signature, constexprs=constexprs, attrs=attrs,
                    num_warps=num_warps, num_stages=num_stages)

    return [
        case("qnn_fwd", _qnn_fwd_kernel, ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "s_ptr"), cfgs["fwd"],
             HAS_DROPOUT=True, STORE_S=True),
        case("qnn_bwd_dx", _qnn_bwd_dx_kernel, ("gy_ptr", "x_ptr", "s_ptr", "w_ptr", "dx_ptr"), cfgs["dx"],
             HAS_DROPOUT=True),
        case("qnn_bwd_dw", _qnn_bwd_dw_kernel, ("gy_ptr", "x_ptr", "dw_ptr", "db_ptr"), cfgs["dw"],
             HAS_DROPOUT=True, STORE_DB=True),
        case("qnn_fwd_eval", _qnn_fwd_kernel, ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "s_ptr"), cfgs["fwd"],
             HAS_DROPOUT=False, STORE_S=False),
    ]

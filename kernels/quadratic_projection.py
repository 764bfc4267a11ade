"""QNN's quadratic projection with dropout: y = x * sum_r dropout(x @ W_r.T + b_r).

x (B, D), weight (M*D, D) laid out like nn.Linear(D, M*D) (row r*D + j is W_r[j]), bias (M*D,).

The matrix products run in the vendor GEMM (torch.addmm / mm: cuBLAS on a GPU, following torch's
TF32 switch in fp32), which a hand-written Triton GEMM only matched at 0.24-0.27x on an H200;
except fp32 with TF32 off on a data-centre GPU (sm_80, sm_90), where they run on the tensor cores
through the 3xTF32 split (kernels/fp32_gemm.py: cuBLAS multiplies on the CUDA cores there).
Triton fuses what surrounds them, so that no dropout mask is ever stored:
  forward   h = x @ W.T + b (one GEMM, B x M*D); one Triton pass draws the Philox keep mask,
            sums the M groups and multiplies by x: y (B, D) and s = sum_r dropout(h_r) (B, D in
            fp32, kept for backward) are written, h is freed.
  backward  one Triton pass forms G[b, r*D + j] = keep * gy[b,j] * x[b,j] / (1-p) (each mask
            element drawn once; x as the GEMMs read it, the one copy kept) and gy * s; then grad_x = gy * s + G @ W (one GEMM, with the
            addend where x has the weight's dtype), grad_W = G.T @ x, grad_b = sum_b G.
Dtypes: the GEMMs read x in the weight's dtype (autocast's, under autocast), and y has that
dtype, except that in fp16 y keeps a wider x's dtype (fp16's range overflowed there:
reference.product_dtype); the product y = x * s and the direct term gy * s of grad_x read x
as it is, which under autocast is the fp32 residual stream (reference.quadratic_product says
why). Rounding, in
bf16/fp16: the GEMMs round their outputs (h, G @ W) to their input dtype, as torch's own would;
every sum around them runs in fp32, so y carries two roundings (h, y), grad_x three (h, G,
G @ W) and grad_W and grad_b two.
Without dropout (eval, or p == 0) every mask is all ones, so sum_r (x @ W_r.T + b_r) =
x @ W_bar.T + b_bar with W_bar = sum_r W_r: one M times smaller GEMM, in plain torch, on every
backend in eval (and in training at p = 0 on the Triton backend); kernels/reference.py keeps the
literal M-group form as the oracle, and the torch backend trains with it (with dropout as
reference.training_quadratic_projection, which keeps what these kernels keep).

The dropout stream: the groups go in quads (r = 4q + i, i < 4); element (b, r, j) of the hidden
keeps iff the i-th number of tl.rand4x(seed, (b * ceil(M/4) + q) * D + j) is >= p (int32 counters):
one Philox call draws four groups' decisions. The seed is an int64 tensor input of the op (drawn
on the device from torch's generator when not given), so a compiled graph replays it;
`dropout_keep_mask` regenerates the mask, for tests and replays.

The op and its backward are registered (qin::quadratic_projection_dropout, ..._backward), which is
what torch.compile and torch.export trace; an eager call of plain tensors runs the same code
through _DirectQNN, a plain autograd.Function, skipping the dispatcher's host cost
(kernels.utils.needs_registered_op).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import choice, fp32_gemm, reference
from kernels.utils import (INT32_LIMIT, INTERPRETING, call_op, cast, check_dropout_p, check_projection_args,
                           check_seed, compute_dtype, differentiable_backend, direct_autograd, launching_on,
                           register_autocast, resolve_backend)

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


# ----------------------------------------------------------------------------------------------
# Kernels: elementwise passes over (B, D) tiles, each touching the M groups of the hidden
# ----------------------------------------------------------------------------------------------

@triton.jit
def _keep4(seed, draws, p):
    """The dropout decisions of four groups at once, shared by every kernel: one Philox call gives
    four independent numbers, one per group of the quad (a draw each would spend 4x the integer
    work, which bound these passes on an H200: bench/results/gpu-h200-2026-12-04-3f11c2d)."""
    u0, u1, u2, u3 = tl.rand4x(seed, draws)
    return u0 >= p, u1 >= p, u2 >= p, u3 >= p


@triton.jit
def _draws(offs_b, offs_d, quad, D, M):
    """The Philox counters of one quad of groups (r = 4*quad .. 4*quad + 3) for a (b, j) tile."""
    return (offs_b[:, None] * tl.cdiv(M, 4) + quad) * D + offs_d[None, :]


@triton.jit
def _kept_group(h_ptr, offs_b, offs_d, r, M, D, tile_mask, keep, scale, ACC_DTYPE: tl.constexpr):
    """keep * h_r / (1-p) for group r of the tile; zero for r >= M (the last quad's unused lanes)."""
    column = r * D + offs_d[None, :]  # past M * D exactly where r >= M
    hidden = offs_b[:, None] * (M * D) + column
    h = tl.load(h_ptr + hidden, mask=tile_mask & (column < M * D), other=0.0).to(ACC_DTYPE)
    return tl.where(keep, h * scale, 0.0)


@triton.jit
def _store_group(g_ptr, offs_b, offs_d, r, M, D, tile_mask, keep, gs):
    """G of group r for the tile: gs where kept, else 0; nothing for r >= M."""
    column = r * D + offs_d[None, :]  # past M * D exactly where r >= M
    hidden = offs_b[:, None] * (M * D) + column
    tl.store(g_ptr + hidden, tl.where(keep, gs, 0.0).to(g_ptr.dtype.element_ty), mask=tile_mask & (column < M * D))


@triton.jit
def _qnn_dropout_sum_kernel(
    h_ptr, x_ptr, seed_ptr, y_ptr, s_ptr,
    B, D, M, P: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y = x * s and s = sum_r keep * h_r / (1-p) for one (BLOCK_B, BLOCK_D) tile; h is (B, M*D)."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile_mask = (offs_b < B)[:, None] & (offs_d < D)[None, :]
    # P is a compile-time constant (one model has one p): the scale 1/(1-p) is exact in the
    # accumulation dtype (a float argument would reach the kernel rounded to fp32), and the keep
    # decision compares the fp32 draws with fp32(p), as the mask kernel does.
    scale = tl.full((), 1.0 / (1.0 - P), ACC_DTYPE)
    p = tl.full((), P, tl.float32)
    seed = tl.load(seed_ptr)
    s = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC_DTYPE)
    for quad in range(0, tl.cdiv(M, 4)):
        k0, k1, k2, k3 = _keep4(seed, _draws(offs_b, offs_d, quad, D, M), p)
        s += _kept_group(h_ptr, offs_b, offs_d, 4 * quad, M, D, tile_mask, k0, scale, ACC_DTYPE)
        s += _kept_group(h_ptr, offs_b, offs_d, 4 * quad + 1, M, D, tile_mask, k1, scale, ACC_DTYPE)
        s += _kept_group(h_ptr, offs_b, offs_d, 4 * quad + 2, M, D, tile_mask, k2, scale, ACC_DTYPE)
        s += _kept_group(h_ptr, offs_b, offs_d, 4 * quad + 3, M, D, tile_mask, k3, scale, ACC_DTYPE)
    tile = offs_b[:, None] * D + offs_d[None, :]
    x = tl.load(x_ptr + tile, mask=tile_mask, other=0.0).to(ACC_DTYPE)
    tl.store(y_ptr + tile, (x * s).to(y_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(s_ptr + tile, s.to(s_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _qnn_masked_grad_kernel(
    gy_ptr, x_ptr, s_ptr, seed_ptr, g_ptr, gys_ptr,
    B, D, M, P: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """G[b, r*D + j] = keep * gy * x / (1-p) (B, M*D) and gys = gy * s (B, D), for one tile."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile_mask = (offs_b < B)[:, None] & (offs_d < D)[None, :]
    scale = tl.full((), 1.0 / (1.0 - P), ACC_DTYPE)  # as in _qnn_dropout_sum_kernel
    p = tl.full((), P, tl.float32)
    seed = tl.load(seed_ptr)
    tile = offs_b[:, None] * D + offs_d[None, :]
    gy = tl.load(gy_ptr + tile, mask=tile_mask, other=0.0).to(ACC_DTYPE)
    x = tl.load(x_ptr + tile, mask=tile_mask, other=0.0).to(ACC_DTYPE)
    s = tl.load(s_ptr + tile, mask=tile_mask, other=0.0).to(ACC_DTYPE)
    gs = gy * x * scale
    for quad in range(0, tl.cdiv(M, 4)):
        k0, k1, k2, k3 = _keep4(seed, _draws(offs_b, offs_d, quad, D, M), p)
        _store_group(g_ptr, offs_b, offs_d, 4 * quad, M, D, tile_mask, k0, gs)
        _store_group(g_ptr, offs_b, offs_d, 4 * quad + 1, M, D, tile_mask, k1, gs)
        _store_group(g_ptr, offs_b, offs_d, 4 * quad + 2, M, D, tile_mask, k2, gs)
        _store_group(g_ptr, offs_b, offs_d, 4 * quad + 3, M, D, tile_mask, k3, gs)
    tl.store(gys_ptr + tile, (gy * s).to(gys_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _qnn_keep_mask_kernel(out_ptr, B, D, M, seed, p, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (B, M*D) keep mask as int8, 1 where kept: the kernels' draws, for one (b, j) tile."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile_mask = (offs_b < B)[:, None] & (offs_d < D)[None, :]
    one = tl.full((BLOCK_B, BLOCK_D), 1, tl.int8)
    for quad in range(0, tl.cdiv(M, 4)):
        k0, k1, k2, k3 = _keep4(seed, _draws(offs_b, offs_d, quad, D, M), tl.cast(p, tl.float32))
        _store_group(out_ptr, offs_b, offs_d, 4 * quad, M, D, tile_mask, k0, one)
        _store_group(out_ptr, offs_b, offs_d, 4 * quad + 1, M, D, tile_mask, k1, one)
        _store_group(out_ptr, offs_b, offs_d, 4 * quad + 2, M, D, tile_mask, k2, one)
        _store_group(out_ptr, offs_b, offs_d, 4 * quad + 3, M, D, tile_mask, k3, one)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a fixed heuristic, no autotuning
# ----------------------------------------------------------------------------------------------

def _config(dim: int, interpreting: bool = INTERPRETING) -> dict:
    """Tiles of the two elementwise passes (and of the mask kernel). On a GPU 8 x 128 = 1024 (b, j)
    positions per program with 4 warps: 8 values a thread, 128-bit accesses along D, and for a
    quad of groups 8 Philox states of four outputs each: 64-76 registers (Triton 3.9, sm_89/sm_90),
    0.44-0.67 of the SM's warps resident. 16 x 128 needed 112-168 registers (0.19-0.33), where
    one draw a group had needed 55-80. Checked by tests/test_codegen.py. The interpreter runs
    each program in numpy: fewer, larger programs are faster there."""
    if interpreting:
        return dict(BLOCK_B=16, BLOCK_D=64, num_warps=1, num_stages=1)
    return dict(BLOCK_B=8, BLOCK_D=128 if dim >= 128 else 64, num_warps=4, num_stages=1)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(batch: int, dim: int, cfg: dict):
    # Integer division, not triton.cdiv: in Triton 3.9 that is a ConstexprFunction, 4 us a call on
    # the host (our 2-core machine), two calls a launch.
    return (-(-batch // cfg["BLOCK_B"]), -(-dim // cfg["BLOCK_D"]))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _check_offsets_fit(x: torch.Tensor, num_row: int) -> None:
    """The kernels index the (B, M*D) hidden and its dropout stream with int32 offsets. Checked by
    the ops themselves (before any copy of x), so that a direct call of torch.ops.qin... is too."""
    batch, dim = x.shape
    if batch * num_row * dim >= INT32_LIMIT:
        raise ValueError(f"x of shape {tuple(x.shape)} with num_row={num_row} needs 2**31 or more hidden "
                         f"elements; the dropout offsets are int32")


def _forward(x, weight, bias, seed, num_row, p):
    """(y, s): one GEMM for every group's hidden, then the fused dropout / group-sum / product.
    The GEMM reads x in the weight's dtype, the product x as it is; y has
    reference.product_dtype(x, weight): the weight's dtype, or in fp16 a wider x's."""
    batch, dim = x.shape
    x_gemm = x.to(weight.dtype)
    if fp32_gemm.applies(x.device, x_gemm, weight, bias):  # fp32 on tensor cores (3xTF32), where it pays
        hidden = fp32_gemm.matmul(x_gemm, weight.t(), bias=bias)
    else:
        hidden = torch.addmm(bias, x_gemm, weight.t())  # (B, M*D)
    # s stays in fp32 (fp64): rounding it to a 16-bit dtype would add one more rounding to grad_x.
    y = torch.empty_like(x, dtype=reference.product_dtype(x.dtype, weight.dtype))
    s = torch.empty_like(x, dtype=torch.promote_types(weight.dtype, torch.float32))
    if batch == 0:
        return y, s
    cfg = _config(dim)
    acc = _acc_dtype(torch.promote_types(x.dtype, s.dtype))
    with launching_on(y.device):
        _qnn_dropout_sum_kernel[_grid(batch, dim, cfg)](
            hidden, x, seed, y, s, batch, dim, num_row, P=p, ACC_DTYPE=acc, **cfg)
    return y, s


def _masked_gradient(gy, x, s, seed, num_row, p, x_dtype):
    """(G, gy * s): the Triton pass of backward. G (B, M*D) in x's dtype (the weight's, as the
    GEMMs read it), gy * s in x_dtype."""
    batch, dim = x.shape
    gy = gy.contiguous()
    g = torch.empty((batch, num_row * dim), device=x.device, dtype=x.dtype)
    gys = torch.empty_like(x, dtype=x_dtype)
    if batch:
        cfg = _config(dim)
        acc = _acc_dtype(torch.promote_types(x_dtype, s.dtype))
        with launching_on(g.device):
            _qnn_masked_grad_kernel[_grid(batch, dim, cfg)](
                gy, x, s, seed, g, gys, batch, dim, num_row, P=p, ACC_DTYPE=acc, **cfg)
    return g, gys


def _backward(gy, x, weight, s, seed, num_row, p, x_dtype, needs=(True, True, True)):
    """(grad_x, grad_W, grad_b) from the masked gradient G, formed once, and three vendor products.
    x is the forward's x in the weight's dtype, as the GEMMs read it; x_dtype is the dtype the
    forward's x had, which grad_x takes. G is in the weight's dtype; the direct term gy * s of
    grad_x in x_dtype, as the product y = x * s read x. A gradient not in `needs` (a frozen
    weight) is left empty, its product not run."""
    g, gys = _masked_gradient(gy, x, s, seed, num_row, p, x_dtype)
    need_x, need_weight, need_bias = needs
    tensor_cores = fp32_gemm.applies(x.device, g, weight, x)  # fp32 products in 3xTF32, where they pay
    if not need_x:
        grad_x = gys.new_empty(0)
    elif x_dtype == weight.dtype:
        grad_x = fp32_gemm.matmul(g, weight, addend=gys) if tensor_cores else torch.addmm(gys, g, weight)
    else:
        grad_x = gys.add_(g @ weight)
    if not need_weight:
        grad_w = weight.new_empty(0)
    else:
        grad_w = fp32_gemm.matmul(g.t(), x) if tensor_cores else g.t() @ x
    grad_b = g.sum(0, dtype=s.dtype).to(weight.dtype) if need_bias else weight.new_empty(0)
    return grad_x, grad_w, grad_b


# ----------------------------------------------------------------------------------------------
# Registered ops: qin::quadratic_projection_dropout(x, W, b, seed, num_row, p, dtype) -> (y, s) and
# backward
# ----------------------------------------------------------------------------------------------

def _op_forward(x, weight, bias, seed, num_row, p, dtype):
    """What the op computes. The GEMM reads weight and bias in `dtype`, cast here: backward casts
    the weight again rather than autograd keeping the copy (under autocast 2 bytes a weight, 32 MB
    for QIN's four layers)."""
    _check_offsets_fit(x, num_row)
    return _forward(x.contiguous(), weight.to(dtype).contiguous(), bias.to(dtype).contiguous(), seed, num_row, p)


@torch.library.custom_op("qin::quadratic_projection_dropout", mutates_args=())
def _qnn_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seed: torch.Tensor, num_row: int,
            p: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _op_forward(x, weight, bias, seed, num_row, p, dtype)


@_qnn_op.register_fake
def _(x, weight, bias, seed, num_row, p, dtype):
    contiguous = torch.contiguous_format
    return (torch.empty_like(x, memory_format=contiguous, dtype=reference.product_dtype(x.dtype, dtype)),
            torch.empty_like(x, memory_format=contiguous, dtype=torch.promote_types(dtype, torch.float32)))


@torch.library.custom_op("qin::quadratic_projection_dropout_backward", mutates_args=())
def _qnn_backward_op(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, seed: torch.Tensor,
                     num_row: int, p: float, x_dtype: torch.dtype, need_x: bool = True, need_weight: bool = True,
                     need_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _op_backward(gy, x, weight, s, seed, num_row, p, x_dtype, need_x, need_weight, need_bias)


def _op_backward(gy, x, weight, s, seed, num_row, p, x_dtype, need_x=True, need_weight=True, need_bias=True):
    if x.dtype != weight.dtype:
        raise ValueError(f"x must have the weight's dtype {weight.dtype} (the forward's x as the GEMMs "
                         f"read it), got {x.dtype}")
    _check_offsets_fit(x, num_row)
    return _backward(gy, x.contiguous(), weight.contiguous(), s.contiguous(), seed, num_row, p, x_dtype,
                     (need_x, need_weight, need_bias))


@_qnn_backward_op.register_fake
def _(gy, x, weight, s, seed, num_row, p, x_dtype, need_x=True, need_weight=True, need_bias=True):
    contiguous = torch.contiguous_format
    return (torch.empty_like(x, memory_format=contiguous, dtype=x_dtype) if need_x else x.new_empty(0, dtype=x_dtype),
            torch.empty_like(weight, memory_format=contiguous) if need_weight else weight.new_empty(0),
            weight.new_empty(weight.shape[0] if need_bias else 0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, seed, num_row, p, dtype = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    # Backward reads x only through G = keep * gy * x / (1-p), which it rounds to `dtype`, and
    # grad_W = G.T @ x, whose GEMM reads x in it: x is kept in that dtype (under autocast 2 bytes
    # an element, not the residual stream's 4), as the torch backend keeps it. The weight is kept
    # as given (the parameter itself: nothing new) and cast again in backward.
    # The bias (the parameter itself, nothing new) only for higher-order gradients.
    ctx.save_for_backward(x if x.dtype == dtype else x.to(dtype), weight, bias, s,
                          seed.clone() if seed.is_inference() else seed)  # (a seed made under inference_mode)
    ctx.num_row, ctx.p, ctx.x_dtype, ctx.bias_dtype = num_row, p, x.dtype, bias.dtype


def _autograd_backward(ctx, gy, _grad_s):
    x, weight, bias, s, seed = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable themselves
        keep = dropout_keep_mask(int(seed), x.shape[0], ctx.num_row, x.shape[1], ctx.p, x.device)
        grad_x, grad_w, grad_b = reference.differentiable_projection_gradients(
            x, weight, bias, ctx.num_row, ctx.p, keep, ctx.needs_input_grad[:3], ctx.x_dtype, gy)
        return grad_x, grad_w, grad_b, None, None, None, None
    needs = ctx.needs_input_grad[:3]  # a frozen weight: its product with G is not run
    grad_x, grad_w, grad_b = call_op(_qnn_backward_op, _op_backward, gy, x, weight.to(x.dtype), s, seed, ctx.num_row,
                                     ctx.p, ctx.x_dtype, *needs)
    # Each gradient in its input's dtype, rounded to `dtype` first as autograd through a cast
    # outside the op would round it.
    return (grad_x if needs[0] else None, grad_w.to(weight.dtype) if needs[1] else None,
            grad_b.to(ctx.bias_dtype) if needs[2] else None, None, None, None, None)


_qnn_op.register_autograd(_autograd_backward, setup_context=_setup_context)
_DirectQNN = direct_autograd("_DirectQNN", _op_forward, _setup_context, _autograd_backward, autocast_free=True)
# Autocast sets the dtype the GEMM reads the weight and bias in (argument 6); x stays as it is
# (_forward reads it in that dtype for the GEMM, and as it is for the product).
register_autocast("qin::quadratic_projection_dropout", _qnn_op, dtype_arg=6)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The seed as the int64 tensor the kernels read. None draws one from torch's generator of
    the device (no host sync on a GPU; torch.manual_seed makes it repeatable)."""
    if seed is None:
        return torch.randint(0, INT32_LIMIT - 1, (1,), device=device, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def quadratic_projection(x, weight, bias, num_row, *, dropout_p=0.0, training=False, seed=None, backend="auto"):
    """y = x * sum_r dropout(x @ W_r.T + b_r); see the module docstring.

    The products with W read every floating input in one dtype (autocast's where it is on, else
    their promoted type), which is the output's dtype, except that in fp16 the output keeps a wider
    x's dtype (under fp16 autocast fp32: y grows with the square of x and overflowed fp16); the
    product with x reads x as it is (under autocast the fp32 residual stream) and rounds once.
    Sums run in fp32 (fp64 for fp64). seed fixes the dropout stream of the Triton path: an int,
    a one-element integer tensor, or None (drawn on x's device from torch's generator); the torch
    backend draws its own (kernels.dropout on the CPU, F.dropout's on CUDA).
    """
    check_projection_args(x, weight, bias, num_row)
    p = check_dropout_p(dropout_p)
    seed = check_seed(seed)
    dtype = compute_dtype(x.device, x, weight, bias)
    kernel_runs = training and p > 0.0  # the fused kernel is the dropout's: without it, torch computes the op
    if kernel_runs:
        backend = differentiable_backend(backend, "quadratic_projection")
    if (backend == "auto" and kernel_runs and not torch.compiler.is_compiling()
            and x.shape[0] * num_row * x.shape[1] >= INT32_LIMIT):
        backend = "torch"  # past the kernels' int32 offsets: whatever MEASURED_FASTER says
    # Only training with dropout has a Triton path to choose, and only there must Triton run:
    # elsewhere 'triton' means the fold below (so a model with dropout 0 trains on any device).
    # "auto" times the torch path's two forms in training (reference.QNN_TORCH_FORMS) beside Triton.
    # Where the Triton path's fp32 products run in 3xTF32 (kernels/fp32_gemm.py) the decision is
    # its own: one timed with cuBLAS's products (QIN_FP32_GEMM=vendor) does not stand for it.
    products = ("3xTF32",) if kernel_runs and dtype == torch.float32 and fp32_gemm.applies(x.device) else ()
    trial = choice.trial(backend, x.device, "qnn", dtype, (f"D={x.shape[1]}", f"M={num_row}", *products), _trial_call,
                         (x, weight, bias), dict(num_row=num_row, dropout_p=p, training=True, seed=0), train=True,
                         torch_forms=reference.QNN_TORCH_FORMS[1:]) if kernel_runs else None
    chosen = "triton" if backend == "triton" and not kernel_runs else \
        resolve_backend(backend, x.device, "qnn", dtype, trial)
    if training and chosen == "torch":  # by default keeping what the kernels keep (reference.py)
        form = choice.torch_form(trial, x.device) or reference.QNN_TORCH_FORMS[0]
        return reference.training_quadratic_projection(x, weight, bias, num_row, p, training, dtype, form)
    # x is not cast: the GEMM reads it in `dtype`, the product y = x * s as it is (the fp32
    # residual stream under autocast; reference.quadratic_product says why).
    if not kernel_runs:
        return reference.folded_quadratic_projection(x, *cast(dtype, weight, bias), num_row)
    return call_op(_qnn_op, _DirectQNN.apply, x, weight, bias, _seed_tensor(seed, x.device), num_row, p, dtype)[0]


def _trial_call(x, weight, bias, *, backend, num_row, dropout_p, training, seed):
    """quadratic_projection as backend="auto" times it: backend "torch" or "triton", or one of the
    torch path's forms (reference.QNN_TORCH_FORMS)."""
    if backend in reference.QNN_TORCH_FORMS:
        return reference.training_quadratic_projection(x, weight, bias, num_row, dropout_p, training,
                                                       compute_dtype(x.device, x, weight, bias), backend)
    return quadratic_projection(x, weight, bias, num_row, dropout_p=dropout_p, training=training, seed=seed,
                                backend=backend)


def dropout_keep_mask(seed: int, batch: int, num_row: int, dim: int, dropout_p: float,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep mask (batch, num_row * dim) bool that the kernels draw for this seed and p."""
    device = torch.device(device)
    seed = int(check_seed(seed))
    p = check_dropout_p(dropout_p)
    if resolve_backend("triton", device) != "triton":  # raises off CUDA without the interpreter
        raise ValueError(f"dropout_keep_mask needs Triton on {device}")
    n = batch * num_row * dim
    if n >= INT32_LIMIT:
        raise ValueError(f"a mask of {n} elements does not fit the kernels' int32 offsets")
    out = torch.empty((batch, num_row * dim), dtype=torch.int8, device=device)
    if n:
        cfg = _config(dim)
        with launching_on(device):
            _qnn_keep_mask_kernel[_grid(batch, dim, cfg)](out, batch, dim, num_row, seed, p, BLOCK_B=cfg["BLOCK_B"],
                                                          BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return out.bool()


# ----------------------------------------------------------------------------------------------
# Code generation cases: what the wrapper launches on a GPU at the paper's shape
# ----------------------------------------------------------------------------------------------

def codegen_cases(dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One dict per Triton kernel launched in training with dropout at B=8192, D=1024, M=4 (the
    GEMMs around them are cuBLAS's, or in fp32 on sm_80/sm_90 kernels.fp32_gemm's, whose own
    cases that module gives), in `dtype`, or for a 16-bit dtype as QIN launches them under
    autocast (the forward's x and gy * s in fp32, and in fp16 y and gy too).

    Each has name, fn, signature, constexprs, attrs, num_warps, num_stages, so that
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=..., options=dict(
    num_warps=..., num_stages=...)) builds the GPU kernel (not the interpreter configuration).
    attrs holds the alignment hints the JIT derives from the real arguments; leaving them out
    compiles narrower accesses.
    """
    t = _TL_DTYPE[dtype]
    cfg = _config(1024, interpreting=False)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    constexprs = dict(P=0.1, ACC_DTYPE=_acc_dtype(dtype), **cfg)  # the paper's dropout
    scalars = dict(B="i32", D="i32", M="i32")

    def case(name, fn, pointers):
        types = {**{ptr: f"*{t}" for ptr in pointers}, "seed_ptr": "*i64", **scalars,
                 **{k: "constexpr" for k in constexprs}}
        types["s_ptr"] = "*fp64" if dtype == torch.float64 else "*fp32"  # s is kept in fp32
        if dtype in (torch.float16, torch.bfloat16):  # under autocast the forward reads x as the fp32
            types.update(gys_ptr="*fp32")  # residual stream, and gy * s stays in its dtype
            if name == "qnn_dropout_sum":
                types.update(x_ptr="*fp32")
            if dtype == torch.float16:  # y keeps x's fp32 (reference.product_dtype), and so does gy
                types.update(y_ptr="*fp32", gy_ptr="*fp32")
        signature = {arg: types[arg] for arg in fn.arg_names}  # in the kernel's argument order
        # The JIT marks 16-byte-aligned pointers and ints divisible by 16 (B=8192, D=1024) as such.
        aligned = (*pointers, "seed_ptr", "B", "D")
        attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
        return dict(name=name, fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs,
                    num_warps=num_warps, num_stages=num_stages)

    return [
        case("qnn_dropout_sum", _qnn_dropout_sum_kernel, ("h_ptr", "x_ptr", "y_ptr", "s_ptr")),
        case("qnn_masked_grad", _qnn_masked_grad_kernel, ("gy_ptr", "x_ptr", "s_ptr", "g_ptr", "gys_ptr")),
    ]

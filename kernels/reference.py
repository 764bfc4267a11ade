"""Plain-PyTorch ops: the oracle every fused Triton kernel is tested against, and the torch
backend that `auto` runs wherever Triton has not measured faster (every CPU, and most GPU cases).

The oracle functions are the literal formulas of SPEC.md, written for readability. Beside them
sit the torch backend's memory-saving forms (the gathered attention op, the QNN in training that
keeps only x, the group sum and the mask, the folded eval product), each tested against its
oracle: a change here changes what trains, not only what tests compare with.
"""
import torch
import torch.nn.functional as F

from kernels.dropout import draw_seed, draws_from_lanes, dropout, keep_mask, keep_multiplier
from kernels.utils import autocast_off, call_op, direct_autograd, transforms_active


def sparse_target_attention(history: torch.Tensor, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z[b] = sum_l relu(mask[b,l] * <history[b,l], query[b]>) * history[b,l].

    history (B, L, D), query (B, D), mask (B, L) bool or 0/1 float -> (B, D).
    """
    scores = torch.einsum("bld,bd->bl", history, query) * mask.to(history.dtype)
    return torch.einsum("bl,bld->bd", torch.relu(scores), history)


def gathered_sparse_target_attention(reps: torch.Tensor, index: torch.Tensor, query: torch.Tensor,
                                     mask: torch.Tensor) -> torch.Tensor:
    """sparse_target_attention(reps[index], query, mask): reps (U, D), index (B, L) rows of reps.

    Masked positions may hold any index in range; F.embedding gathers (its CPU backward sums
    repeated rows in a fixed order, unlike reps[index]'s).
    """
    return sparse_target_attention(F.embedding(index, reps), query, mask)


def accurately(function):
    """function, run on its floating inputs in fp32 (fp64 stays): an attention op's recomputation
    for higher-order gradients. The gradient of the representations sums over a popular item's
    repeats, which in 16 bits loses the later terms (the fused backwards sum in fp32 too); the
    casts back are part of the graph, so each gradient returns in its input's dtype."""
    def wide(*tensors):
        return function(*(t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t
                          for t in tensors))
    return wide


def differentiable_gradients(function, inputs, needs, grad_output) -> list:
    """The gradients of function(*inputs) (a plain-PyTorch recomputation of an op) for the inputs
    with `needs`, by autograd with create_graph=True: what the fused ops' backwards return when a
    caller asks for higher-order gradients (backward with create_graph=True, torch.func.hessian).
    Their own backward kernels compute first-order gradients only, and an autograd rule on them
    would have to re-derive what autograd derives from the reference. The inputs must be the
    tensors the forward received (as ctx.saved_tensors returns them), so that the gradients stay
    connected to the caller's graph. Only under create_graph: it forms what the op exists to avoid.

    The function runs on an alias of each wanted input, and the gradients are taken at the aliases:
    taken at the inputs themselves, a path from one input to another (QIN's query is computed from
    the representations it attends over) would be followed here and again by the caller's engine,
    and counted twice."""
    with torch.enable_grad():
        aliases = [t.view_as(t) if need else t for t, need in zip(inputs, needs)]
        output = function(*aliases)
    wanted = [a for a, need in zip(aliases, needs) if need]
    grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in needs]


def differentiable_attention_gradients(index, x, query, mask, needs, grad_z) -> list:
    """(grad x, grad query, grad mask) of sparse_target_attention (index None) or its gathered form,
    differentiable in turn, through the reference in fp32: the attention ops' backwards under
    create_graph=True. `needs` says which are wanted (None for the others)."""
    def attention(x, query, mask):
        return sparse_target_attention(x if index is None else F.embedding(index, x), query, mask)
    return differentiable_gradients(accurately(attention), (x, query, mask), needs, grad_z)


# The torch backend's gathered ASTA in training: a registered op (qin::regathered_attention and
# its backward), so that eager autograd, torch.compile and torch.export all keep what it keeps
# (eager calls of plain tensors run the same code through _DirectRegathered: utils.call_op).
#
# Autograd through the reference would keep the gathered (B, L, D) history, the largest tensor of
# the training step (100 MB in fp32 at batch 1024 on MicroLens), and so would a compiler that sees
# its gather. The op keeps reps (U, D), the index, query, mask and the (B, L) scores, and its
# backward gathers the history again and applies the chain rule as the Triton kernel does, with
# z = sum_l w_l x_l, w = relu(s * m), s_l = <x_l, q>:
#     dw_l = <dz, x_l>,  ds_l = dw_l [s_l m_l > 0] m_l,  dx_l = w_l dz + ds_l q,
#     dq = sum_l ds_l x_l,  dm_l = dw_l [s_l m_l > 0] s_l,  d reps = sum over repeats of dx.

@torch.library.custom_op("qin::regathered_attention", mutates_args=())
def _regathered_op(reps: torch.Tensor, index: torch.Tensor, query: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _regathered_forward(reps, index, query, mask)


def _regathered_forward(reps, index, query, mask):
    """(z, scores) of gathered_sparse_target_attention."""
    history = F.embedding(index, reps)
    scores = torch.einsum("bld,bd->bl", history, query)
    return torch.einsum("bl,bld->bd", torch.relu(scores * mask.to(history.dtype)), history), scores


@_regathered_op.register_fake
def _(reps, index, query, mask):
    return query.new_empty(query.shape), query.new_empty(index.shape)


@torch.library.custom_op("qin::regathered_attention_backward", mutates_args=())
def _regathered_backward_op(grad_z: torch.Tensor, reps: torch.Tensor, index: torch.Tensor, query: torch.Tensor,
                            mask: torch.Tensor, scores: torch.Tensor,
                            needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad reps, grad query, grad mask); `needs` says which are wanted, the others are empty."""
    return _regathered_backward_autocast_off(grad_z, reps, index, query, mask, scores, needs)


def _regathered_backward_autocast_off(grad_z, reps, index, query, mask, scores, needs):
    # Autocast stays off: a backward run inside an autocast region (the trainer's is outside, a
    # user's or kernels.choice's timing may be inside) would run the sparse product below in
    # bf16, summing a popular item's terms in 16 bits on the CPU and failing on CUDA
    # ("addmm_sparse_cuda" not implemented for 'BFloat16': seen on an H200).
    with autocast_off(grad_z.device.type):
        return _regathered_backward(grad_z, reps, index, query, mask, scores, needs)


def _regathered_backward(grad_z, reps, index, query, mask, scores, needs):
    history = F.embedding(index, reps)
    mask_f = mask.to(history.dtype)
    masked = scores * mask_f
    grad_w = torch.einsum("bd,bld->bl", grad_z, history) * (masked > 0)
    grad_s = grad_w * mask_f
    # Each unwanted output its own empty tensor: a custom op may not return one tensor twice (a
    # frozen reps and a bool mask leave two unwanted).
    grad_reps, grad_query, grad_mask = (reps.new_empty(0) for _ in range(3))
    if needs[0]:
        # d reps[u] sums w_bl dz_b + ds_bl q_b over the positions (b, l) that read row u: one
        # sparse (U, 2B) @ [dz; q] product in fp32 (or wider), never forming the (B, L, D)
        # gradient of the history. The sum is fp32 as in the Triton kernel: a popular item is
        # read hundreds of times in a batch, and a 16-bit running sum loses the later terms
        # (13% off at 366 repeats in bf16, tests/test_asta.py). The index is in range: the
        # gather above has read through it.
        # Under CUDA graph capture the same sum is formed by atomic adds (see there).
        by = (_reps_gradient_by_scatter if index.is_cuda and torch.cuda.is_current_stream_capturing()
              else _reps_gradient_by_sparse_product)
        grad_reps = by(index, torch.relu(masked), grad_s, grad_z, query, reps.shape[0]).to(reps.dtype)
    if needs[1]:
        grad_query = torch.einsum("bl,bld->bd", grad_s, history)
    if needs[2]:
        grad_mask = (grad_w * scores).to(mask.dtype)
    return grad_reps, grad_query, grad_mask


regathered_attention_backward = _regathered_backward_op  # also the Triton op's backward where Triton cannot run


def _reps_gradient_by_sparse_product(index, weights, grad_s, grad_z, query, rows: int) -> torch.Tensor:
    """d reps (rows, D) in fp32 (or wider): the sum over the positions (b, l) that read row u of
    weights_bl dz_b + ds_bl q_b, as one sparse (rows, 2B) @ [dz; q] product."""
    batch, seq_len = index.shape
    acc = torch.promote_types(grad_z.dtype, torch.float32)
    readers = torch.arange(batch, device=index.device).repeat_interleave(seq_len)
    coefficients = torch.sparse_coo_tensor(
        torch.stack([index.reshape(-1).long().repeat(2), torch.cat([readers, readers + batch])]),
        torch.cat([weights.reshape(-1), grad_s.reshape(-1)]).to(acc), (rows, 2 * batch), check_invariants=False)
    return torch.sparse.mm(coefficients, torch.cat([grad_z, query]).to(acc))


# _reps_gradient_by_scatter forms at most this many elements of positions' gradient rows at once
# (64 MB in fp32).
SCATTER_ELEMENTS = 1 << 24


def _reps_gradient_by_scatter(index, weights, grad_s, grad_z, query, rows: int) -> torch.Tensor:
    """The same sum as _reps_gradient_by_sparse_product, by atomic adds (index_add_) of each
    position's gradient row, a block of history positions at a time: what a CUDA graph can hold.
    The sparse product coalesces its indices, sizing the result on the host, which no graph can."""
    batch, seq_len = index.shape
    dim = grad_z.shape[1]
    acc = torch.promote_types(grad_z.dtype, torch.float32)
    total = torch.zeros(rows, dim, device=grad_z.device, dtype=acc)
    grad_z, query = grad_z.to(acc)[:, None, :], query.to(acc)[:, None, :]
    block = max(1, SCATTER_ELEMENTS // max(1, batch * dim))
    for start in range(0, seq_len, block):
        part = slice(start, start + block)
        gradient_rows = weights[:, part, None].to(acc) * grad_z + grad_s[:, part, None].to(acc) * query
        total.index_add_(0, index[:, part].reshape(-1), gradient_rows.reshape(-1, dim))
    return total


@_regathered_backward_op.register_fake
def _(grad_z, reps, index, query, mask, scores, needs):
    return (torch.empty_like(reps) if needs[0] else reps.new_empty(0),
            torch.empty_like(query) if needs[1] else reps.new_empty(0),
            torch.empty_like(mask) if needs[2] else reps.new_empty(0))


def _regathered_setup_context(ctx, inputs, output):
    reps, index, query, mask = inputs
    ctx.save_for_backward(reps, index, query, mask, output[1])
    ctx.mark_non_differentiable(output[1])


def _regathered_autograd_backward(ctx, grad_z, _grad_scores):
    reps, index, query, mask, scores = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
    if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable themselves
        grad_reps, grad_query, grad_mask = differentiable_attention_gradients(index, reps, query, mask, needs, grad_z)
        return grad_reps, None, grad_query, grad_mask
    grads = call_op(_regathered_backward_op, _regathered_backward_autocast_off, grad_z, reps, index, query, mask,
                    scores, needs)
    grad_reps, grad_query, grad_mask = (g if need else None for g, need in zip(grads, needs))
    return grad_reps, None, grad_query, grad_mask


_regathered_op.register_autograd(_regathered_autograd_backward, setup_context=_regathered_setup_context)
_DirectRegathered = direct_autograd("_DirectRegathered", _regathered_forward, _regathered_setup_context,
                                    _regathered_autograd_backward, autocast_free=False)


def regathered_sparse_target_attention(reps: torch.Tensor, index: torch.Tensor, query: torch.Tensor,
                                       mask: torch.Tensor) -> torch.Tensor:
    """gathered_sparse_target_attention, re-gathering the history in backward instead of keeping it:
    what the torch backend trains with (the op above, in eager and compiled runs alike). With
    nothing to differentiate, and under forward-mode AD or a torch.func transform, it is the plain
    reference."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (reps, query, mask)) or transforms_active():
        return gathered_sparse_target_attention(reps, index, query, mask)
    return call_op(_regathered_op, _DirectRegathered.apply, reps, index, query, mask)[0]


def quadratic_projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_row: int,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x * sum_r dropout(x @ W_r.T + b_r), with weight laid out like nn.Linear(D, num_row * D).

    x (B, D), weight (num_row * D, D), bias (num_row * D,) -> (B, D), in the dtype the product
    with W runs in (the weight's), which reads x in that dtype, except that in fp16 y keeps a
    wider x's dtype (product_dtype); the elementwise product with x reads x as it is and rounds
    once (quadratic_product).
    `dropout_mask` (B, num_row * D, bool), if given, replaces the random draw: tests use it to
    replay the exact mask a fused kernel used.
    """
    batch, dim = x.shape
    hidden = F.linear(x.to(weight.dtype), weight, bias)  # (B, num_row * D)
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            hidden = dropout(hidden, dropout_p)  # F.dropout's, its CPU mask drawn cheaper
        else:
            hidden = hidden * dropout_mask.to(hidden.dtype) / (1.0 - dropout_p)
    return quadratic_product(x, hidden.view(batch, num_row, dim).sum(dim=1))


def product_dtype(x_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype of y = x * s when the products with W run in `dtype`: that dtype, except fp16,
    where y keeps x's dtype if x is wider (under fp16 autocast, the fp32 residual stream).

    Why: y grows with the square of x, and fp16's largest value is 65,504. The built-in run under
    fp16 autocast overflowed there, in the last QNN layer's y, at step 96 (from |x| <= 87.5;
    bench/results/cpu-xeon-amx-2026-12-01). The BatchNorm after it normalises y, so the next
    layer's fp16 product reads small numbers again. bf16 has fp32's range and keeps y in bf16
    (half the bytes the BatchNorm saves for backward)."""
    if dtype == torch.float16:
        return torch.promote_types(x_dtype, dtype)
    return dtype


def quadratic_product(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x * s in product_dtype(x, s), from x as it is: under autocast x is the fp32 residual stream
    and s the bf16 (or fp16) group sum, and the product is rounded once, not after x was rounded too.

    Why not x rounded first: QIN trained in bf16 with x rounded to bf16 here (and the direct term
    gy * s of grad_x rounded to bf16) ended 0.011 valid AUC below fp32 on the built-in data (best
    of 12 epochs, three seeds); with both read unrounded, 0.003 below (six seeds)
    (bench/results/auc-precision-builtin-cpu-2026-11-30-qnn-x).
    """
    y = x * s
    return y.to(product_dtype(x.dtype, s.dtype))


def differentiable_projection_gradients(x, weight, bias, num_row: int, p: float, keep: torch.Tensor,
                                       needs, x_dtype: torch.dtype, grad_y) -> list:
    """(grad x, grad weight, grad bias) of quadratic_projection in training with the keep mask
    `keep` (B, num_row * D), differentiable in turn, through the reference: the QNN ops' backwards
    under create_graph=True. x is the copy the op kept, in the compute dtype; x_dtype the dtype of
    the caller's x.

    Where that copy was made in forward (x read in another dtype: autocast's or the weight's), it
    is not connected to the caller's x, and second-order terms through x cannot be formed: refused,
    not silently dropped. (A backward cannot tell which inputs a torch.autograd.grad call asked for:
    an x that requires grad is refused even where only the weight's gradients were asked for.)"""
    if needs[0] and x_dtype != x.dtype:
        raise RuntimeError(f"quadratic_projection has no higher-order gradients (create_graph=True) where x "
                           f"requires grad and its products read it in another dtype ({x.dtype}, autocast's or "
                           f"the weight's, for x in {x_dtype}): it keeps only that copy of x for backward; take "
                           f"them with x in the compute dtype (outside autocast)")
    return differentiable_gradients(
        lambda x, weight, bias: quadratic_projection(x, weight.to(x.dtype), bias.to(x.dtype), num_row, p, True,
                                                     dropout_mask=keep),
        (x, weight, bias), needs, grad_y)


class _TrainingQuadraticProjection(torch.autograd.Function):
    """quadratic_projection in training with dropout, keeping for backward x in the compute dtype
    and s = sum_r dropout(h_r), both (B, D), as the Triton kernels do, and the mask: on the CPU
    its seed alone, elsewhere (and past the CPU lanes' rates) the (B, M * D) bool mask.

    Autograd through the reference would also keep, under autocast, the 16-bit copy of the weight
    (M * D * D elements, whatever the batch), and under CUDA autocast sum the (B, M * D) hidden in
    an fp32 copy (sum is on autocast's fp32 list there) and return y in fp32, where the CPU returns
    it in the compute dtype. On the CPU backward draws the same mask again (kernels.dropout's
    keep_multiplier: 2.5 ms for the paper's layer at batch 1024 on our 2-core test machine);
    elsewhere the mask is torch.native_dropout's, the draw F.dropout makes. Backward casts the
    weight to the compute dtype again. With G[b, r*D + j] = keep * gy[b, j] * x[b, j] / (1 - p):
        grad_x = gy * s + G @ W,  grad_W = G.T @ x,  grad_b = sum_b G.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_row, p, dtype):
        # Every cast is explicit: autocast stays off (on CUDA it would sum the hidden in fp32).
        with autocast_off(x.device.type):
            return _TrainingQuadraticProjection._forward(ctx, x, weight, bias, num_row, p, dtype)

    @staticmethod
    def _forward(ctx, x, weight, bias, num_row, p, dtype):
        batch, dim = x.shape
        ctx.input_dtypes = (x.dtype, weight.dtype, bias.dtype)
        x_c = x.to(dtype)
        hidden = torch.addmm(bias.to(dtype), x_c, weight.to(dtype).t())
        ctx.seed = draw_seed() if x.device.type == "cpu" and draws_from_lanes(p) else None
        if ctx.seed is not None:
            # The mask multiplies in place: cheaper than torch.where on the CPU (keep_multiplier).
            hidden.mul_(keep_multiplier(hidden.shape, p, ctx.seed, dtype))
            # torch's sums accumulate 16-bit floats in fp32 and round once (an fp32 `dtype=` would
            # first copy the whole (B, M * D) hidden to fp32).
            s = hidden.view(batch, num_row, dim).sum(1) * (1.0 / (1.0 - p))
            keep = None
        else:
            hidden, keep = torch.native_dropout(hidden, p, True)
            s = hidden.view(batch, num_row, dim).sum(1)
        # The bias (the parameter itself, nothing new) only for higher-order gradients.
        ctx.save_for_backward(x_c, weight, bias, s, keep)
        ctx.num_row, ctx.p = num_row, p
        return quadratic_product(x, s)

    @staticmethod
    def backward(ctx, grad_y):
        with autocast_off(grad_y.device.type):
            return _TrainingQuadraticProjection._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
        x, weight, bias, s, kept = ctx.saved_tensors  # x in the compute dtype
        batch, dim = x.shape
        shape = (batch, ctx.num_row * dim)
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable themselves
            keep = keep_mask(shape, ctx.p, ctx.seed) if kept is None else kept
            return (*differentiable_projection_gradients(x, weight, bias, ctx.num_row, ctx.p, keep,
                                                         ctx.needs_input_grad[:3], ctx.input_dtypes[0], grad_y),
                    None, None, None)
        keep = keep_multiplier(shape, ctx.p, ctx.seed, x.dtype) if kept is None else kept
        # gy * x rounded once to the compute dtype (gy is fp32 where y is: fp16 over a wider x).
        scaled = (grad_y * x * (1.0 / (1.0 - ctx.p))).to(x.dtype)[:, None, :]
        if kept is None:
            g = (keep.view(batch, ctx.num_row, dim) * scaled).view(shape)
        else:  # where, not a multiply: a dropped element stays 0 where fp16's gy * x / (1 - p) overflowed
            g = torch.where(keep.view(batch, ctx.num_row, dim), scaled, 0).view(shape)
        x_dtype, weight_dtype, bias_dtype = ctx.input_dtypes
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if x_dtype == x.dtype:
                grad_x = torch.addmm(grad_y.to(x.dtype) * s, g, weight.to(x.dtype))
            else:  # the direct term gy * s in x's own dtype, as y = x * s read x (quadratic_product)
                wide = torch.promote_types(x_dtype, x.dtype)
                grad_x = (grad_y.to(wide) * s).add_(g @ weight.to(x.dtype)).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (g.t() @ x).to(weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


# The forms the torch backend can train the QNN layer in: its autograd Function (the default), or
# plain autograd through the reference, which backend="auto" also times on a GPU (kernels.choice):
# on an H200 the op ran faster so in 16 bits (bf16 fwd+bwd 0.586 ms against the Function's 0.95).
QNN_TORCH_FORMS = ("function", "autograd")


def training_quadratic_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_row: int,
                                  dropout_p: float, training: bool, dtype: torch.dtype,
                                  form: str = "function") -> torch.Tensor:
    """quadratic_projection of x, weight and bias read in `dtype`: what the torch backend trains
    with. In training with dropout, with something to differentiate and outside torch.compile/
    export, forward-mode AD and torch.func transforms, it is _TrainingQuadraticProjection (above),
    unless `form` is "autograd"; elsewhere, and in that form, the reference, whose dropout is
    F.dropout's (CUDA, and under those transforms) or the same CPU draw, run with autocast off (its
    inputs are cast already): y in `dtype` on every device, the same function either way."""
    if form not in QNN_TORCH_FORMS:
        raise ValueError(f"form must be one of {QNN_TORCH_FORMS}, got {form!r}")
    if (form == "function" and training and dropout_p > 0.0 and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and any(t.requires_grad for t in (x, weight, bias))
            and not transforms_active()):
        return _TrainingQuadraticProjection.apply(x, weight, bias, num_row, dropout_p, dtype)
    with autocast_off(x.device.type):
        return quadratic_projection(x, weight.to(dtype), bias.to(dtype), num_row, dropout_p, training)


def folded_quadratic_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_row: int) -> torch.Tensor:
    """quadratic_projection without dropout, as one M times smaller product: every mask is all ones,
    so sum_r (x @ W_r.T + b_r) = x @ W_bar.T + b_bar with W_bar = sum_r W_r (summed in fp32 or wider).

    What every backend runs in eval; in training the torch backend keeps the literal M-group form
    above, whose gradients it defines.
    """
    dtype = weight.dtype
    if num_row > 1:
        dim = x.shape[1]
        acc_dtype = torch.promote_types(dtype, torch.float32)
        weight = weight.view(num_row, dim, dim).sum(0, dtype=acc_dtype).to(dtype)
        bias = bias.view(num_row, dim).sum(0, dtype=acc_dtype).to(dtype)
    return quadratic_product(x, torch.addmm(bias, x.to(dtype), weight.t()))

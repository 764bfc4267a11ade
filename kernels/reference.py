"""Plain-PyTorch reference ops: the oracle every fused Triton kernel is tested against.

Each function is the literal formula from SPEC.md, written for readability, not speed.
"""
import torch
import torch.nn.functional as F

from kernels.dropout import dropout


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



class _RegatheredAttention(torch.autograd.Function):
    """gathered_sparse_target_attention that keeps its inputs for backward, not the history.

    Autograd would keep the gathered (B, L, D) history, the largest tensor of the training step
    (100 MB in fp32 at batch 1024 on MicroLens); here backward gathers it again and runs the same
    forward under autograd, so the gradients are the reference's own, bit for bit, and what is
    kept is the (U, D) reps, the index, query and mask.
    """

    @staticmethod
    def forward(ctx, reps, index, query, mask):
        ctx.save_for_backward(reps, index, query, mask)
        with torch.no_grad():
            return gathered_sparse_target_attention(reps, index, query, mask)

    @staticmethod
    def backward(ctx, grad_z):
        reps, index, query, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        leaves = [t.detach().requires_grad_(need) for t, need in ((reps, needs[0]), (query, needs[2]), (mask, needs[3]))]
        with torch.enable_grad():
            z = gathered_sparse_target_attention(leaves[0], index, leaves[1], leaves[2])
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(z, wanted, grad_z) if wanted else ())
        reps_grad, query_grad, mask_grad = (next(grads) if t.requires_grad else None for t in leaves)
        return reps_grad, None, query_grad, mask_grad


def regathered_sparse_target_attention(reps: torch.Tensor, index: torch.Tensor, query: torch.Tensor,
                                       mask: torch.Tensor) -> torch.Tensor:
    """gathered_sparse_target_attention, re-gathering the history in backward instead of keeping it:
    what the torch backend trains with. Under torch.compile/export, or with nothing to differentiate,
    it is the plain reference (the compiler decides what to keep)."""
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or not any(t.requires_grad for t in (reps, query, mask))):
        return gathered_sparse_target_attention(reps, index, query, mask)
    return _RegatheredAttention.apply(reps, index, query, mask)


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

    x (B, D), weight (num_row * D, D), bias (num_row * D,) -> (B, D).
    `dropout_mask` (B, num_row * D, bool), if given, replaces the random draw: tests use it to
    replay the exact mask a fused kernel used.
    """
    batch, dim = x.shape
    hidden = F.linear(x, weight, bias)  # (B, num_row * D)
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            hidden = dropout(hidden, dropout_p)  # F.dropout's, its CPU mask drawn cheaper
        else:
            hidden = hidden * dropout_mask.to(hidden.dtype) / (1.0 - dropout_p)
    return x * hidden.view(batch, num_row, dim).sum(dim=1)


def folded_quadratic_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_row: int) -> torch.Tensor:
    """quadratic_projection without dropout, as one M times smaller product: every mask is all ones,
    so sum_r (x @ W_r.T + b_r) = x @ W_bar.T + b_bar with W_bar = sum_r W_r (summed in fp32 or wider).

    What every backend runs in eval; in training the torch backend keeps the literal M-group form
    above, whose gradients it defines.
    """
    if num_row > 1:
        dim = x.shape[1]
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        weight = weight.view(num_row, dim, dim).sum(0, dtype=acc_dtype).to(x.dtype)
        bias = bias.view(num_row, dim).sum(0, dtype=acc_dtype).to(x.dtype)
    return x * torch.addmm(bias, x, weight.t())

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

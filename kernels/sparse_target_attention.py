"""Placeholder until the fused kernel lands (issue 3): dispatches to the reference only."""
from kernels import reference
from kernels.utils import resolve_backend


def sparse_target_attention(history, query, mask, *, backend="auto"):
    if resolve_backend(backend, history.device) == "triton":
        raise NotImplementedError("the Triton ASTA kernel is not built yet")
    return reference.sparse_target_attention(history, query, mask)

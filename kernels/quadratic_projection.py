"""Placeholder until the fused kernel lands (issue 4): dispatches to the reference only."""
from kernels import reference
from kernels.utils import resolve_backend


def quadratic_projection(x, weight, bias, num_row, *, dropout_p=0.0, training=False, seed=None, backend="auto"):
    if resolve_backend(backend, x.device) == "triton":
        raise NotImplementedError("the Triton QNN kernel is not built yet")
    return reference.quadratic_projection(x, weight, bias, num_row, dropout_p, training)

"""The entry points where the triton package cannot be imported (PyPI has triton wheels for Linux
x86_64 and aarch64 only: macOS, Windows and other platforms install without it).

Same names and signatures as the fused modules; backend "auto" and "torch" run the plain-PyTorch
reference, with the same dtype rule (autocast's dtype where it is on, else the promoted type);
backend "triton" raises where a Triton kernel would run (the QNN op without dropout is
torch products on every backend). The Triton ops are not registered here (the torch backend's own
qin::regathered_attention is), so a model exported with the Triton ops cannot be loaded here.
"""
from __future__ import annotations

from kernels import reference
from kernels.utils import (BACKENDS, cast, check_attention_args, check_dropout_p, check_gathered_attention_args,
                           check_projection_args, check_seed, compute_dtype)

TRITON_MISSING = ("backend='triton' needs the triton package, which is not installed here (PyPI has triton "
                  "wheels for Linux x86_64 and aarch64 only); use backend='torch' or 'auto'")


def _check_backend(backend: str, kernel_runs: bool = True) -> None:
    """kernel_runs: whether the full package would run a Triton kernel for this call."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and kernel_runs:
        raise RuntimeError(TRITON_MISSING)


def sparse_target_attention(history, query, mask, *, backend="auto"):
    check_attention_args(history, query, mask)
    _check_backend(backend)
    history, query = cast(compute_dtype(history.device, history, query), history, query)
    return reference.sparse_target_attention(history, query, mask)


def gathered_sparse_target_attention(reps, index, query, mask, *, backend="auto"):
    check_gathered_attention_args(reps, index, query, mask)
    _check_backend(backend)
    reps, query = cast(compute_dtype(reps.device, reps, query), reps, query)
    return reference.regathered_sparse_target_attention(reps, index, query, mask)


def quadratic_projection(x, weight, bias, num_row, *, dropout_p=0.0, training=False, seed=None, backend="auto"):
    check_projection_args(x, weight, bias, num_row)
    p = check_dropout_p(dropout_p)
    check_seed(seed)  # it only fixes the Triton path's dropout stream; torch's dropout ignores it
    _check_backend(backend, kernel_runs=training and p > 0.0)  # without dropout: torch products on any backend
    dtype = compute_dtype(x.device, x, weight, bias)
    if training and backend != "triton":  # as the full package's torch backend does
        return reference.training_quadratic_projection(x, weight, bias, num_row, p, training, dtype)
    weight, bias = cast(dtype, weight, bias)  # x as it is, as the full package's backends read it
    return reference.folded_quadratic_projection(x, weight, bias, num_row)

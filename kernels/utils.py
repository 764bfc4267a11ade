"""Helpers shared by the Triton ops: interpreter detection, block sizes, argument checks."""
import os

import torch

# Read once: TRITON_INTERPRET must be set before triton is imported, so it cannot change mid-run.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map 'auto' to 'triton' on CUDA and 'torch' elsewhere; refuse Triton where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not INTERPRETING:
        raise ValueError(
            f"backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is "
            f"imported to run the kernels on the CPU; got a tensor on {device}"
        )
    return backend


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_tensor(name: str, t, ndim: int, dtypes=None, device=None) -> None:
    """Raise ValueError naming the argument if `t` is not a tensor of the expected rank/dtype/device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {tuple(dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the other inputs are on {device}")

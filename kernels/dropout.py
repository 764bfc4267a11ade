"""Dropout with a cheaper mask on the CPU; F.dropout everywhere else.

On the CPU, F.dropout draws its mask with bernoulli_ (about 6 ns an element on our 2-core test
machine) and keeps it for backward as a float tensor of the input's dtype. At the paper's shapes
the QNN hidden (B, M * D) makes that 12% of an fp32 training step and 18% of a bf16 one. Here
`keep_mask` draws 64 random bits for four elements from NumPy's SFC64 generator, seeded by one
draw from torch's default CPU generator (so torch.manual_seed repeats it, and a seed is all it
takes to draw the same mask again), and compares each 16 bits with a threshold: 0.7 ns an element,
against 1.3 for torch's own integer fill (mt19937). Backward draws the mask again from its seed,
so nothing of x's size is kept for it.

An element is dropped iff its 16 random bits, read as a signed integer, are below
-2**15 + round(p * 2**16): the drop rate is p rounded to a multiple of 2**-16 (0.1 drops
0.1000061), within 2**-17 of p. Kept elements are scaled by 1 / (1 - p), as F.dropout does, so the
expectation of the output is off by at most 2**-17 / (1 - p) of x's (8.5e-6 at p = 0.1). Above
MAX_ROUNDED_P that would pass 0.1% (and near 1 the rate stops at 1 - 2**-16), so there F.dropout
draws the mask.

On CUDA F.dropout is already one fused Philox kernel with a bool mask, and under torch.compile or
torch.export the compiler generates its own random numbers from F.dropout, so those use it unchanged;
so do forward-mode AD and torch.func transforms (vmap's randomness= follows F.dropout, not NumPy).
The draws differ from F.dropout's, not their distribution: a seeded run repeats itself either way.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from kernels.utils import transforms_active


MAX_ROUNDED_P = 1 - 2**-7  # the largest p drawn through 16-bit lanes: bias 2**-17 / 2**-7 < 0.1%


def draws_from_lanes(p: float) -> bool:
    """Whether a CPU dropout of rate p draws its mask here (else F.dropout does)."""
    return 0.0 < p <= MAX_ROUNDED_P


def draw_seed() -> int:
    """A seed for keep_mask, from torch's default CPU generator."""
    return int(torch.empty((), dtype=torch.int64).random_(0, None))


def _keep_bits(shape, p: float, seed: int | None) -> np.ndarray:
    numel = math.prod(shape)
    bits = np.random.SFC64(draw_seed() if seed is None else seed).random_raw((numel + 3) // 4)
    threshold = min(-2**15 + round(p * 2**16), 2**15 - 1)
    # Compared in NumPy: torch's int16 >= runs 6x slower on the CPU (1.2 ms for 4M elements).
    return bits.view(np.int16)[:numel].reshape(shape) >= threshold


def keep_mask(shape, p: float, seed: int | None = None) -> torch.Tensor:
    """A CPU keep mask of `shape`, bool, True with probability 1 - p (see the module docstring);
    the same seed draws the same mask, and None draws a seed."""
    return torch.from_numpy(_keep_bits(shape, p, seed))


# 1.0 in the 16-bit floats, as bits (NumPy has no bfloat16, and its float16 cast is slow), and
# the wider floats NumPy casts bool to quickly.
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}
_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


def keep_multiplier(shape, p: float, seed: int | None, dtype: torch.dtype) -> torch.Tensor:
    """keep_mask(shape, p, seed) as 1.0 (kept) and 0.0 (dropped) in `dtype`.

    Where the mask is not kept for backward, `x * keep_multiplier(...)` is the cheap form of
    `torch.where(keep_mask(...), x, 0.0)` on the CPU: torch's where over a bool mask, and its
    bool to 16-bit cast, run at a fifth of a multiply's speed (1024 x 4096 bf16: where 2.5 ms,
    multiply 0.4 ms; building the mask here in NumPy costs 0.3 ms more than keep_mask). The values
    are the same, except that a dropped negative element gives -0.0 and a dropped inf or NaN gives
    NaN, as F.dropout's multiply does."""
    keep = _keep_bits(shape, p, seed)
    if dtype in _ONE_BITS:
        bits = np.multiply(keep.view(np.uint8), np.uint16(_ONE_BITS[dtype]), dtype=np.uint16)
        return torch.from_numpy(bits.view(np.int16)).view(dtype)
    if dtype in _NUMPY_FLOATS:
        return torch.from_numpy(keep.astype(_NUMPY_FLOATS[dtype]))
    return torch.from_numpy(keep).to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) in distribution; see the module docstring for how it draws."""
    if not training or p == 0.0:
        return x
    if (x.device.type != "cpu" or not draws_from_lanes(p) or not x.is_floating_point()
            or torch.compiler.is_compiling() or transforms_active()):
        return F.dropout(x, p, training=True)  # also where p is out of range: its error names it
    return _RegeneratedDropout.apply(x, p)


class _RegeneratedDropout(torch.autograd.Function):
    """dropout on the CPU, keeping for backward only its mask's seed: backward draws the same mask
    again (keep_multiplier, about 1 ms for a (1024, 1024) mask here) where autograd through
    torch.where would keep it, 1 byte an element (6% of what a bf16 training step of QIN keeps).
    x * keep_multiplier is also cheaper than torch.where; its values are the same (see there)."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.seed, ctx.p = draw_seed(), p
        return (x * keep_multiplier(x.shape, p, ctx.seed, x.dtype)).mul_(1.0 / (1.0 - p))

    @staticmethod
    def backward(ctx, grad):
        keep = keep_multiplier(grad.shape, ctx.p, ctx.seed, grad.dtype)
        return (grad * keep).mul_(1.0 / (1.0 - ctx.p)), None


class Dropout(torch.nn.Dropout):
    """nn.Dropout drawing its mask through `dropout` above (same p, same state_dict: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

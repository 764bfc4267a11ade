"""Dropout with a cheaper mask on the CPU; F.dropout everywhere else.

On the CPU, F.dropout draws its mask with bernoulli_ (about 6 ns an element on our 2-core test
machine) and keeps it for backward as a float tensor of the input's dtype. At the paper's shapes
the QNN hidden (B, M * D) makes that 12% of an fp32 training step and 18% of a bf16 one. Here the
mask comes from the same generator's integer fill (random_, 64 bits a call, two elements from each)
compared with a threshold, about a third of the cost, and autograd keeps it as bool (1 byte an
element) through torch.where.

An element is dropped iff its 32 random bits, read as a signed integer, are below
-2**31 + round(p * 2**32): probability p to within 2**-33, finer than the 2**-24 steps of a
float32 uniform draw. Kept elements are scaled by 1 / (1 - p), as F.dropout does.

On CUDA F.dropout is already one fused Philox kernel with a bool mask, and under torch.compile or
torch.export the compiler generates its own random numbers from F.dropout, so those use it unchanged.
The draws differ from F.dropout's, not their distribution: a seeded run repeats itself either way.
"""
import torch
import torch.nn.functional as F


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) in distribution; see the module docstring for how it draws."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0 or not x.is_floating_point() or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)  # also where p is out of range: its error names it
    numel = x.numel()
    bits = torch.empty((numel + 1) // 2, dtype=torch.int64, device=x.device).random_(-2**63, None)
    threshold = min(-2**31 + round(p * 2**32), 2**31 - 1)
    keep = bits.view(torch.int32)[:numel].view(x.shape) >= threshold
    return torch.where(keep, x, 0.0) * (1.0 / (1.0 - p))


class Dropout(torch.nn.Dropout):
    """nn.Dropout drawing its mask through `dropout` above (same p, same state_dict: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

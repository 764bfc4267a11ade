"""The one table of numerical tolerances: what `qin parity` and the kernel tests accept, per dtype.

Every check compares a result in the dtype under test against the float64 evaluation of the
reference formulas (kernels/reference.py, or the model with model.double()) on the very same
inputs upcast, so only the rounding of the path under test is measured, never that of the oracle.

An element passes when

    |got - want| <= rtol * (scale + floor * max(scale)) + underflow

`scale` is chosen by the check, not by this table:
  - fused ops: the reference evaluated on the absolute values of its inputs (and of the output
    gradient, for gradients). That is the sum of |terms| every rounding error is proportional to,
    matrix-product and history reductions included, so `rtol` is a number of unit roundoffs
    whatever the cancellation in the result. `floor` is for elements whose scale is ~0 (fp16
    subnormals, exactly cancelling terms): a thousandth of the tensor's largest scale.
  - the whole model: max |want| of the tensor (a normwise relative error; floor 0). A network
    has no cheap |terms| evaluation, and BatchNorm and the loss mix every element with every
    other, so an elementwise bound would be meaningless.
`underflow` is what the roundings rtol counts may err by below the dtype's normal range (half
the subnormal spacing each): 1.2e-7 in fp16, under 1e-39 in the other dtypes.
The relative error reported is max(|got - want| / (the bound / rtol)); it passes when <= rtol. An
all-zero scale (e.g. a batch of all-padding rows) demands an exact zero, to within `underflow`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # allowed error, in units of each element's scale
    floor: float = 1e-3  # part of the tensor's largest scale added to every element's scale
    underflow: float = 0.0  # absolute error allowed on top: roundings below the normal range


# Unit roundoffs u: fp64 2^-53 (1.1e-16), fp32 2^-24 (6.0e-8), bf16 2^-8 (3.9e-3), fp16 2^-11 (4.9e-4).
# Inputs are exact in their dtype. A fused op accumulates in fp32 (fp64 for fp64 inputs) and rounds
# its result to the input dtype: one rounding (<= u of the element, so <= u of its scale), plus the
# accumulation error (~sqrt(n) fp32 units over n terms; n = L*D = 24,576 at the paper's ASTA shape,
# M*D = 4,096 for QNN). A 16-bit path may round a few more times on the way: an intermediate in
# the input dtype (the QNN hidden from a vendor GEMM, the masked gy*x fed to tensor cores), and
# Triton's interpreter rounds fp32 to bf16 toward zero (up to 2u, measured: `qin parity --quick`
# sees 1.9u in bf16 on the CPU). Four roundings of the scale bound all of these.
# A rounding below the dtype's normal range errs by up to half the subnormal spacing whatever the
# size of the result (fp16: 3.0e-8 under 6.1e-5), so each rounding the rtol counts may add that
# too: `underflow`. Hypothesis found an fp16 z of 6.6e-5 from terms of 1e-5 off by 1.8e-8.


def _op_tolerance(dtype: torch.dtype, rtol: float) -> Tolerance:
    info = torch.finfo(dtype)
    roundings = rtol / (info.eps / 2)
    return Tolerance(rtol=rtol, underflow=roundings * info.smallest_normal * info.eps / 2)


OPS = {
    # ~9,000 u: fp64 kernels reduce in another order than torch's einsum and matmul, and must
    # not touch fp32 anywhere (an fp32 constant alone costs 5e-8).
    torch.float64: _op_tolerance(torch.float64, 1e-12),
    # ~170 u: sqrt(24,576) = 157 covers the random-walk accumulation at the paper's shape.
    torch.float32: _op_tolerance(torch.float32, 1e-5),
    # 4 u each: the few roundings above.
    torch.bfloat16: _op_tolerance(torch.bfloat16, 4 * 2.0**-8),
    torch.float16: _op_tolerance(torch.float16, 4 * 2.0**-11),
}

# The whole model (logits and every parameter gradient), normwise per tensor, against
# model.double() at the same weights. Downstream of ASTA the model is ill-conditioned at the
# authors' initialisation: one fp32 rounding of ASTA's output alone moved some float64 gradients
# by 6e-4 (issue 17, 256 rows of a real dataset). So fp32 gets 2e-3, above that measured noise
# floor: a wrong kernel is off by O(1), rounding is not. A 16-bit model rounds every activation
# and is far from its float64 self whatever its kernels: on `qin parity --quick`'s model (its
# gradients held to the PReLU branches the 16-bit model took) the worst gradient is 5.4% off in
# bf16 and 1.4% in fp16 with the reference ops, 13% and 1.9% with the fused ones (Triton's
# interpreter rounds to bf16 toward zero: up to 2u where a GPU rounds to nearest). 0.25 bounds
# bf16's with room, and stays far below 1: a normwise error of 1 is a gradient with nothing right
# (all zeros), which must fail. fp16 has 3 more bits: its worst over setup seeds 0-2 was 3.9%
# (reference ops), so 0.1; a fused fp16 model 14x its reference's error passed at 0.25. The
# fused model is held to MODEL_VS_PLAIN x the plain model's own
# error in the same dtype where that is larger, at most MODEL_VS_PLAIN x the table's rtol (so a
# plain model that itself fails never lets the fused one pass at 1). `qin parity` measures each
# noise floor and prints it beside.
MODEL = {
    torch.float64: Tolerance(rtol=1e-10, floor=0.0),
    torch.float32: Tolerance(rtol=2e-3, floor=0.0),
    torch.bfloat16: Tolerance(rtol=0.25, floor=0.0),
    torch.float16: Tolerance(rtol=0.1, floor=0.0),
}
# The fused ops may add at most as much error again as the reference ops in the same dtype.
MODEL_VS_PLAIN = 2.0

# The loss after each of a few fp32 Adam steps (dropout masks replayed), relative, against the float64 model.
# Adam divides each step by the root of its own squared gradient, so rounding in a near-zero
# gradient becomes a full-sized step: losses drift apart faster than gradients differ.
STEPS = {
    torch.float32: Tolerance(rtol=1e-3, floor=0.0),
}


def error_bound(scale: torch.Tensor, tol: Tolerance) -> torch.Tensor:
    """The elementwise bound rtol * (scale + floor * max(scale)) + underflow, in float64."""
    scale = scale.double().abs()
    top = scale.max() if scale.numel() else scale.new_zeros(())
    return tol.rtol * (scale + tol.floor * top) + tol.underflow


def relative_error(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, tol: Tolerance) -> float:
    """max |got - want| / (scale + floor * max(scale)); 0/0 counts as 0, x/0 as infinity."""
    want = want.detach().double()  # computed where the result lives: paper-size tensors stay on the GPU
    err = (got.detach().to(want.device).double() - want).abs()
    denom = error_bound(scale.detach().to(want.device), tol) / tol.rtol
    ratio = torch.where(err == 0, torch.zeros_like(err), err / denom)  # err/0 -> inf, nan stays nan
    if ratio.numel() == 0:
        return 0.0
    if torch.isnan(ratio).any():
        return float("nan")
    return ratio.max().item()


def passes(rel_error: float, tol: Tolerance) -> bool:
    return rel_error <= tol.rtol  # NaN compares False: a NaN never passes

"""kernels.dropout: F.dropout's distribution and gradient, with its cheaper CPU mask."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels.dropout import Dropout, dropout, keep_mask, keep_multiplier


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (64, 129), (2, 3, 17)])
def test_kept_elements_are_scaled_dropped_ones_are_zero_and_the_gradient_follows(dtype, shape):
    torch.manual_seed(0)
    x = (torch.rand(shape, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()  # never 0
    y = dropout(x, 0.3)
    assert y.dtype == dtype and y.shape == x.shape
    keep = y != 0
    expected = (x.detach().double() / 0.7).to(dtype)  # F.dropout's scale; torch's dtype tolerances
    torch.testing.assert_close(y[keep], expected[keep])
    grad = torch.rand(shape, dtype=dtype)
    y.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(keep, (grad.double() / 0.7).to(dtype), 0))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_the_drop_rate_is_p(p):
    torch.manual_seed(1)
    n = 1 << 20
    dropped = (dropout(torch.ones(n), p) == 0).double().mean().item()
    assert abs(dropped - p) < 6 * math.sqrt(p * (1 - p) / n)  # six standard deviations of the rate


@pytest.mark.parametrize("p", [0.99, 0.999, 1 - 2**-18])
def test_the_expectation_is_kept_for_p_near_one(p):
    """Rounding p to 16 bits under a 1 / (1 - p) scale would bias the mean for p near 1 (by 10%
    at 0.9999): there F.dropout draws. The mean of x is kept within six standard deviations."""
    torch.manual_seed(3)
    n = 1 << 24
    mean = dropout(torch.ones(n), p).double().mean().item()
    assert abs(mean - 1) < 6 * math.sqrt(p / (1 - p) / n)


def test_every_lane_is_used_and_neighbours_are_independent():
    """Each 64-bit draw feeds four elements: each lane must drop at rate p, and not with its neighbour."""
    torch.manual_seed(2)
    n, p = 1 << 20, 0.5
    dropped = (dropout(torch.ones(n), p) == 0).double()
    lanes = [dropped[k::4] for k in range(4)]
    bound = 6 * math.sqrt(p * (1 - p) / (n // 4))
    assert all(abs(lane.mean().item() - p) < bound for lane in lanes)
    assert all(abs((a * b).mean().item() - p * p) < bound for a, b in zip(lanes, lanes[1:]))


def test_keep_mask_repeats_for_a_seed_and_p_is_rounded_to_sixteen_bits():
    a = keep_mask((3, 1000), 0.3, seed=7)
    assert a.shape == (3, 1000) and a.dtype == torch.bool
    assert torch.equal(a, keep_mask((3000,), 0.3, seed=7).view(3, 1000))
    assert not torch.equal(a, keep_mask((3, 1000), 0.3, seed=8))
    # p below 2**-17 rounds to 0 (keep all); just below 1 it rounds to 1 - 2**-16 (keep 1 in 65,536).
    assert keep_mask((1 << 16,), 2.0**-18, seed=1).all()
    assert keep_mask((1 << 20,), 1 - 2.0**-18, seed=1).sum().item() < 64


@pytest.mark.parametrize("p", [2.0**-16, 0.1, 0.5, 0.9])
def test_keep_mask_follows_the_documented_rule(p):
    """The module docstring's rule, applied here to the generator's raw stream: element e uses 16-bit
    lane e % 4 of 64-bit draw e // 4 and is dropped iff that signed integer is below
    -2**15 + round(p * 2**16). (A rate off by 2**-16 hides from any sampling test; a million
    elements hit each threshold exactly about 16 times.)"""
    numel = (1 << 20) + 3
    raw = np.random.SFC64(5).random_raw((numel + 3) // 4)
    lanes = ((raw[:, None] >> np.array([0, 16, 32, 48], dtype=np.uint64)) & np.uint64(0xFFFF)).astype(np.int64)
    signed = np.where(lanes >= 2**15, lanes - 2**16, lanes).reshape(-1)[:numel]  # little-endian lane order
    want = torch.from_numpy(signed >= -2**15 + round(p * 2**16))
    assert torch.equal(keep_mask((numel,), p, seed=5), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(0,), (5,), (3, 7), (2, 4, 33)])
def test_keep_multiplier_is_keep_mask_as_ones_and_zeros(dtype, shape):
    keep = keep_mask(shape, 0.3, seed=11)
    ones = keep_multiplier(shape, 0.3, 11, dtype)
    assert ones.dtype == dtype and ones.shape == keep.shape
    assert torch.equal(ones, keep.to(dtype))  # exactly 1.0 and 0.0, in every element
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    assert torch.equal(x * ones, torch.where(keep, x, 0.0))  # -0.0 == 0.0


def test_a_seed_repeats_the_mask_and_eval_or_p0_is_the_identity():
    x = torch.randn(33, 17)
    torch.manual_seed(3)
    a = dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.2))
    assert dropout(x, 0.2, training=False) is x and dropout(x, 0.0) is x
    layer = Dropout(0.2).eval()
    assert layer(x) is x and layer.train()(x).shape == x.shape


def test_p_one_and_bad_p_go_to_torch():
    x = torch.randn(4, 5)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.5)


def test_autograd_keeps_nothing_of_the_input_size_and_backward_draws_the_same_mask():
    x = torch.randn(256, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout(x, 0.1)
    assert saved == []
    torch.randn(1000)  # draws in between must not move backward's mask
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.9, rtol=0, atol=0)


def test_same_statistics_as_torch():
    """Mean and second moment of the output match F.dropout's (both unbiased for x)."""
    torch.manual_seed(4)
    x = torch.full((1 << 20,), 2.0)
    ours, theirs = dropout(x, 0.25), F.dropout(x, 0.25, training=True)
    assert abs(ours.mean().item() - theirs.mean().item()) < 0.01
    assert abs(ours.pow(2).mean().item() - theirs.pow(2).mean().item()) < 0.05

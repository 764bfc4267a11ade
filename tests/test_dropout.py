"""kernels.dropout: F.dropout's distribution and gradient, with its cheaper CPU mask."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels.dropout import Dropout, dropout


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


def test_every_bit_position_is_used_and_neighbours_are_independent():
    """Each int64 draw feeds two elements: both halves must drop at rate p, and not together."""
    torch.manual_seed(2)
    n, p = 1 << 20, 0.5
    dropped = (dropout(torch.ones(n), p) == 0).double()
    even, odd = dropped[0::2], dropped[1::2]
    bound = 6 * math.sqrt(p * (1 - p) / (n // 2))
    assert abs(even.mean().item() - p) < bound and abs(odd.mean().item() - p) < bound
    assert abs((even * odd).mean().item() - p * p) < bound


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


def test_autograd_keeps_a_bool_mask_not_a_float_one():
    x = torch.randn(256, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropout(x, 0.1)
    assert saved and all(t.dtype == torch.bool for t in saved)
    assert sum(t.untyped_storage().nbytes() for t in saved) == x.numel()


def test_same_statistics_as_torch():
    """Mean and second moment of the output match F.dropout's (both unbiased for x)."""
    torch.manual_seed(4)
    x = torch.full((1 << 20,), 2.0)
    ours, theirs = dropout(x, 0.25), F.dropout(x, 0.25, training=True)
    assert abs(ours.mean().item() - theirs.mean().item()) < 0.01
    assert abs(ours.pow(2).mean().item() - theirs.pow(2).mean().item()) < 0.05

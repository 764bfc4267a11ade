"""The registered ops (qin::sparse_target_attention, qin::quadratic_projection_dropout): torch.library's
own checks (schema, fake tensors, autograd registration, AOT dispatch) and their autocast behaviour.

The Triton implementations run under the interpreter on the CPU (tests/conftest.py)."""
import pytest
import torch

import kernels
from kernels import reference

ASTA = torch.ops.qin.sparse_target_attention.default
QNN = torch.ops.qin.quadratic_projection_dropout.default


def asta_args(dtype, gathered, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, seq_len, dim, num_unique = 3, 7, 12, 5
    mask = torch.rand(batch, seq_len, generator=g) < 0.6
    mask[0] = False  # a padding-only row
    query = torch.randn(batch, dim, generator=g).to(device, dtype)
    if gathered:
        reps = torch.randn(num_unique, dim, generator=g).to(device, dtype)
        index = torch.randint(0, num_unique, (batch, seq_len), generator=g).to(device)
        return reps.requires_grad_(), index, query.requires_grad_(), mask.to(device)
    history = torch.randn(batch, seq_len, dim, generator=g).to(device, dtype)
    return history.requires_grad_(), None, query.requires_grad_(), mask.to(device)


def qnn_args(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, dim, num_row = 5, 12, 3
    x = torch.randn(batch, dim, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(num_row * dim, dim, generator=g) / dim**0.5).to(device, dtype).requires_grad_()
    bias = torch.randn(num_row * dim, generator=g).to(device, dtype).requires_grad_()
    return x, weight, bias, torch.tensor([1234], device=device), num_row, 0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gathered", [False, True], ids=["plain", "gathered"])
def test_opcheck_asta(device, dtype, gathered):
    torch.library.opcheck(ASTA, asta_args(dtype, gathered, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_qnn(device, dtype):
    torch.library.opcheck(QNN, qnn_args(dtype, device))


def test_qnn_op_is_a_pure_function_of_its_seed(device):
    """Same inputs, same seed tensor: the same output, as a replayed compiled graph needs."""
    args = qnn_args(torch.float32, device)
    assert torch.equal(QNN(*args)[0], QNN(*args)[0])
    other = (*args[:3], torch.tensor([4321], device=device), *args[4:])
    assert not torch.equal(QNN(*args)[0], QNN(*other)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_asta_under_autocast_reads_the_autocast_dtype(device, backend, dtype):
    """fp32 history and a query from an autocast Linear (bf16/fp16): both read in the autocast
    dtype, output in it, gradients back in each input's own dtype."""
    history, _, query, mask = asta_args(torch.float32, False, device, seed=1)
    with torch.autocast(device.type, dtype=dtype):
        z = kernels.sparse_target_attention(history, query, mask, backend=backend)
    assert z.dtype == dtype
    z.float().sum().backward()
    assert history.grad.dtype == torch.float32 and query.grad.dtype == torch.float32
    want = reference.sparse_target_attention(history.detach().to(dtype).double(), query.detach().to(dtype).double(),
                                             mask.double())
    tol = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # one rounding of the fp32-accumulated result
    assert (z.double() - want).abs().max() <= 2 * tol * want.abs().max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qnn_under_autocast_reads_the_autocast_dtype(device, backend):
    x, weight, bias, _, num_row, p = qnn_args(torch.float32, device, seed=2)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = kernels.quadratic_projection(x, weight, bias, num_row, dropout_p=p, training=True, seed=7, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float32


def test_the_op_itself_casts_under_autocast(device):
    """Called directly (not through kernels.*), the registered op still follows autocast."""
    history, _, query, mask = asta_args(torch.float32, False, device, seed=3)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert ASTA(history, None, query, mask).dtype == torch.bfloat16
        assert QNN(*qnn_args(torch.float32, device))[0].dtype == torch.bfloat16

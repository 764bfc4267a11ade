"""The registered ops (qin::sparse_target_attention, qin::quadratic_projection_dropout, and the torch
backend's qin::regathered_attention): torch.library's own checks (schema, fake tensors, autograd
registration, AOT dispatch) and their autocast behaviour.

The Triton implementations run under the interpreter on the CPU (tests/conftest.py)."""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import reference
from kernels.utils import INTERPRETING, needs_registered_op

ASTA = torch.ops.qin.sparse_target_attention.default
QNN = torch.ops.qin.quadratic_projection_dropout.default
REGATHERED = torch.ops.qin.regathered_attention.default


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
    return x, weight, bias, torch.tensor([1234], device=device), num_row, 0.25, dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gathered", [False, True], ids=["plain", "gathered"])
def test_opcheck_asta(device, dtype, gathered):
    torch.library.opcheck(ASTA, asta_args(dtype, gathered, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_opcheck_regathered_attention(device, dtype, mask_kind):
    reps, index, query, mask = asta_args(dtype, True, device)
    if mask_kind == "float":
        mask = (mask * 1.5).to(dtype).requires_grad_()
    torch.library.opcheck(REGATHERED, (reps, index, query, mask))


def test_compiled_torch_backend_keeps_no_history():
    """Compiled, the torch backend's gathered ASTA keeps for backward what it keeps in eager (its
    inputs and the (B, L) scores), not the (B, L, D) history a compiler would keep for the
    reference's products; and it computes what eager computes."""
    reps, index, query, mask = asta_args(torch.float32, True, "cpu")
    batch, seq_len = index.shape

    def saved_numels(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = fn(reps, index, query, mask)
        return out, saved

    def op(*args):
        return kernels.gathered_sparse_target_attention(*args, backend="torch")

    torch._dynamo.reset()
    eager, _ = saved_numels(op)
    compiled, saved = saved_numels(torch.compile(op, fullgraph=True))
    torch.testing.assert_close(compiled, eager)
    assert batch * seq_len * reps.shape[1] not in saved and max(saved) <= reps.numel() + batch * seq_len
    grad = torch.randn_like(eager)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(compiled, (reps, query), grad),
                                                     torch.autograd.grad(eager, (reps, query), grad)))


class _SeenOps(TorchDispatchMode):
    """Passes every op through, noting the names of our registered ones."""

    def __init__(self):
        super().__init__()
        self.ours = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "qin":
            self.ours.append(func.name())
        return func(*args, **(kwargs or {}))


def _op_call(kind, dtype, device):
    """(a call of one of our ops through its public entry point on fresh leaves, its inputs that
    take gradients, the registered ops the call runs)."""
    if kind == "qnn":
        x, weight, bias, _, num_row, p, _ = qnn_args(dtype, device)
        return (lambda: kernels.quadratic_projection(x, weight, bias, num_row, dropout_p=p, training=True, seed=77,
                                                     backend="triton"),
                (x, weight, bias), ["qin::quadratic_projection_dropout", "qin::quadratic_projection_dropout_backward"])
    gathered = kind != "asta plain"
    x, index, query, mask = asta_args(dtype, gathered, device)
    mask = mask.to(dtype)  # as the model passes it
    if kind == "regathered":
        return (lambda: reference.regathered_sparse_target_attention(x, index, query, mask), (x, query),
                ["qin::regathered_attention", "qin::regathered_attention_backward"])
    entry = (lambda: kernels.gathered_sparse_target_attention(x, index, query, mask, backend="triton")) if gathered \
        else (lambda: kernels.sparse_target_attention(x, query, mask, backend="triton"))
    return entry, (x, query), ["qin::sparse_target_attention", "qin::sparse_target_attention_backward"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["qnn", "asta plain", "asta gathered", "regathered"])
def test_eager_calls_skip_the_dispatcher_and_compute_what_the_registered_op_does(device, kind, dtype):
    """An eager call of plain tensors runs the op's implementation through its direct autograd
    function (the dispatcher's path for a Python custom op costs host time: utils.needs_registered_op);
    under a dispatch mode the same call runs the registered ops, forward and backward. Values and
    gradients are the same to the bit: the same kernels on the same inputs and seed."""
    call, leaves, registered = _op_call(kind, dtype, device)
    results = []
    for mode in (contextlib.nullcontext(), _SeenOps()):
        with mode:
            out = call()
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append((out, grads))
        if isinstance(mode, _SeenOps):
            assert sorted(set(mode.ours)) == registered
            assert "GeneratedBackwardFor_qin" in type(out.grad_fn).__name__
        else:
            assert type(out.grad_fn).__name__.startswith("_Direct")
    (direct, direct_grads), (op, op_grads) = results
    assert torch.equal(direct, op)
    for a, b in zip(direct_grads, op_grads):
        assert torch.equal(a, b)


def test_only_eager_calls_of_plain_tensors_skip_the_registered_op():
    plain, parameter = torch.ones(2), torch.nn.Parameter(torch.ones(2))
    assert not needs_registered_op(plain, parameter, None, 3, 0.5, torch.float32)
    with _SeenOps():
        assert needs_registered_op(plain)
    with FakeTensorMode() as fake:
        fake_tensor = fake.from_tensor(plain)
    assert needs_registered_op(plain, fake_tensor)
    compiled = torch.compile(lambda t: t + needs_registered_op(t), fullgraph=True, backend="eager")
    assert compiled(plain).tolist() == [2, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_qnn(device, dtype):
    torch.library.opcheck(QNN, qnn_args(dtype, device))


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
def test_opcheck_qnn_as_autocast_calls_it(device, compute):
    """fp32 inputs read in a 16-bit dtype, as autocast calls the op; in fp16 y stays fp32, and the
    fake function must say so."""
    args = (*qnn_args(torch.float32, device)[:-1], compute)
    torch.library.opcheck(QNN, args)
    assert QNN(*args)[0].dtype == (torch.float32 if compute == torch.float16 else compute)


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
    x, weight, bias, _, num_row, p, _ = qnn_args(torch.float32, device, seed=2)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = kernels.quadratic_projection(x, weight, bias, num_row, dropout_p=p, training=True, seed=7, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qnn_under_autocast_multiplies_by_the_unrounded_x(device, backend, training):
    """Under autocast x is the fp32 residual stream: y = x * s rounds once, from the fp32 x, and the
    direct term gy * s of grad_x stays fp32 (rounding both to bf16 cost QIN 0.011 valid AUC).

    With W = 0 and biases on a coarse grid, s is exact in bf16 and equals y at x = 1 (same seed,
    same mask); grad_x is then exactly gy * s, the product of two bf16 numbers, exact in fp32."""
    g = torch.Generator().manual_seed(4)
    batch, dim, num_row = 48, 20, 4
    x = (1 + torch.rand(batch, dim, generator=g)).to(device).requires_grad_()  # not bf16 numbers
    weight = torch.zeros(num_row * dim, dim, device=device, requires_grad=True)
    bias = (torch.randint(-4, 5, (num_row * dim,), generator=g) / 4).to(device).requires_grad_()
    gy = torch.randn(batch, dim, generator=g).to(device, torch.bfloat16)

    def run(x_in):
        torch.manual_seed(9)  # the torch backend's mask comes from torch's generator
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return kernels.quadratic_projection(x_in, weight, bias, num_row, dropout_p=0.5, training=training,
                                                seed=9, backend=backend)

    def to_bf16(t):
        """fp32 to bf16 as the op stores it: to nearest, but Triton's interpreter truncates."""
        if backend == "triton" and training and INTERPRETING:
            return (t.view(torch.int32) & -65536).view(torch.float32).bfloat16()
        return t.bfloat16()

    s = run(torch.ones_like(x)).detach().float()
    y = run(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, to_bf16(x.detach() * s))
    assert not torch.equal(y, to_bf16(x.detach().bfloat16().float() * s))  # x rounded first, as before
    y.backward(gy)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, gy.float() * s)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qnn_under_fp16_autocast_returns_the_product_in_fp32(device, backend, training):
    """Under fp16 autocast y = x * s keeps x's fp32: it grows with the square of the input and the
    built-in run overflowed fp16 (65,504) there. Here |y| passes 65,504 in every case.

    With W = 0 and integer biases, s is an exact fp16 number and equals y at x = 1 (same seed, same
    mask), so y must equal the fp32 product x * s exactly, and grad_x the fp32 product gy * s."""
    g = torch.Generator().manual_seed(6)
    batch, dim, num_row = 40, 24, 4
    x = (500 + 200 * torch.rand(batch, dim, generator=g)).to(device).requires_grad_()
    weight = torch.zeros(num_row * dim, dim, device=device, requires_grad=True)
    bias = torch.randint(-64, 65, (num_row * dim,), generator=g).float().to(device).requires_grad_()
    gy = torch.randn(batch, dim, generator=g).half().float().to(device)

    def run(x_in):
        torch.manual_seed(3)  # the torch backend's mask comes from torch's generator
        with torch.autocast(device.type, dtype=torch.float16):
            return kernels.quadratic_projection(x_in, weight, bias, num_row, dropout_p=0.5, training=training,
                                                seed=3, backend=backend)

    s = run(torch.ones_like(x)).detach()
    y = run(x)
    assert y.dtype == torch.float32
    assert (x.detach() * s).abs().max() > torch.finfo(torch.float16).max
    assert torch.equal(y, x.detach() * s)
    y.backward(gy)
    assert x.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float32
    assert torch.equal(x.grad, gy * s)  # (grad_W's fp16 GEMM overflows here: the scaler's business)


def test_the_op_itself_casts_under_autocast(device):
    """Called directly (not through kernels.*), the registered op still follows autocast."""
    history, _, query, mask = asta_args(torch.float32, False, device, seed=3)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        z = ASTA(history, None, query, mask)
        y = QNN(*qnn_args(torch.float32, device))[0]
    # Every floating input is cast, the query too: bf16 history with an fp32 query would read
    # both in fp32 and return fp32 rounded to bf16, not bf16 arithmetic.
    assert z.dtype == y.dtype == torch.bfloat16
    assert torch.equal(z, ASTA(history.bfloat16(), None, query.bfloat16(), mask))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qnn_under_autocast_keeps_no_16bit_copy_of_the_weight(device, backend):
    """The weight autograd keeps is the parameter itself; backward casts it again (a kept bf16 copy
    would be 2 bytes a weight, 32 MB for QIN's four layers, whatever the batch)."""
    x, weight, bias, _, num_row, p, _ = qnn_args(torch.float32, device, seed=5)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = kernels.quadratic_projection(x, weight, bias, num_row, dropout_p=p, training=True, seed=3,
                                             backend=backend)
    assert any(t is weight or t.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr() for t in kept)
    assert not [t for t in kept if t.shape == weight.shape and t.dtype == torch.bfloat16]
    y.float().sum().backward()
    assert weight.grad.dtype == bias.grad.dtype == torch.float32


def test_autocast_off_turns_autocast_off_where_it_is_on(monkeypatch):
    """Inside autocast, autocast_off turns it off for its block and back on after; outside, it
    is no context at all (building an autocast object costs host time); for meta tensors (a device type autocast does not know) it is no context. A
    program exported outside autocast keeps the region, so run under autocast later it still
    computes in fp32. For the CPU and CUDA it never asks torch.amp.is_autocast_available, which
    dynamo in torch 2.11 cannot trace (a fullgraph compile of the model failed on an H200)."""
    from kernels.utils import autocast_off

    x = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast_off("cpu"):
            assert not torch.is_autocast_enabled("cpu") and (x @ x).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu") and (x @ x).dtype == torch.bfloat16
    assert isinstance(autocast_off("cpu"), contextlib.nullcontext)  # off already: no autocast object
    with autocast_off("meta"):
        assert (torch.empty(2, 2, device="meta") @ torch.empty(2, 2, device="meta")).shape == (2, 2)

    class Product(torch.nn.Module):
        def forward(self, x):
            with autocast_off("cpu"):
                return x @ x

    exported = torch.export.export(Product(), (x,)).module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert exported(x).dtype == torch.float32

    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda t: pytest.fail(f"asked about {t}"))
    for device_type in ("cpu", "cuda"):
        autocast_off(device_type)


def test_launching_on_names_the_tensors_gpu():
    """Triton launches on the current CUDA device; the guard makes it the tensors' one. (Entering
    it needs CUDA; what it will switch to does not.)"""
    guard = kernels.utils.launching_on(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with kernels.utils.launching_on(torch.device("cpu")):  # a no-op off CUDA
        pass


def test_every_triton_launch_runs_under_the_device_guard(device, monkeypatch):
    """Each kernel launch of both ops happens inside launching_on(the tensors' device)."""
    import importlib

    asta = importlib.import_module("kernels.sparse_target_attention")
    qnn = importlib.import_module("kernels.quadratic_projection")
    inside, launched = [], []

    class Guard:
        def __init__(self, where):
            assert torch.device(where).type == device.type  # (the fixture's "cuda" names no index)
        def __enter__(self):
            inside.append(True)
        def __exit__(self, *exc):
            inside.pop()

    class Watched:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel
        def __getitem__(self, grid):
            assert inside, f"{self.name} launched outside launching_on"
            launched.append(self.name)
            return self.kernel[grid]

    for module in (asta, qnn):
        monkeypatch.setattr(module, "launching_on", Guard)
    for module, name in ((asta, "_asta_fwd_kernel"), (asta, "_asta_bwd_kernel"), (qnn, "_qnn_dropout_sum_kernel"),
                         (qnn, "_qnn_masked_grad_kernel"), (qnn, "_qnn_keep_mask_kernel")):
        monkeypatch.setattr(module, name, Watched(name, getattr(module, name)))

    for gathered in (False, True):
        x, index, query, mask = asta_args(torch.float32, gathered, device)
        if gathered:
            z = kernels.gathered_sparse_target_attention(x, index, query, mask, backend="triton")
        else:
            z = kernels.sparse_target_attention(x, query, mask, backend="triton")
        z.sum().backward()
    x, weight, bias, _, num_row, p, _ = qnn_args(torch.float32, device)
    kernels.quadratic_projection(x, weight, bias, num_row, dropout_p=p, training=True, backend="triton").sum().backward()
    qnn.dropout_keep_mask(7, 2, num_row, 12, p, device)
    assert launched == ["_asta_fwd_kernel", "_asta_bwd_kernel"] * 2 + [
        "_qnn_dropout_sum_kernel", "_qnn_masked_grad_kernel", "_qnn_keep_mask_kernel"]

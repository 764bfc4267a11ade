"""kernels/fp32_gemm.py: fp32 products through the 3xTF32 split, and where the QNN uses them.

Under Triton's interpreter tl.dot multiplies in IEEE fp32 whatever its input_precision: these tests
hold the kernel's tiling, strides, masks, bias and addend to the float64 product at odd sizes. On
CUDA (QIN_TEST_CUDA=1) the same tests, and the paper's shapes below, hold the split itself to the
fp32 tolerance of kernels/tolerances.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from kernels import fp32_gemm, tolerances
from kernels.quadratic_projection import dropout_keep_mask
from test_qnn import assert_close, make_inputs, reference_and_magnitude

RTOL = tolerances.OPS[torch.float32].rtol


def assert_fp32_close(got, a, b, bias=None, addend=None):
    """Elementwise against float64, relative to the product of absolute values (the sum of |terms|
    every rounding error is proportional to), as tests/test_qnn.py holds the fused ops."""
    want = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    for extra in (bias, addend):
        if extra is not None:
            want, scale = want + extra.double(), scale + extra.double().abs()
    bound = RTOL * (scale + 1e-3 * scale.max()) if scale.numel() else scale
    err = (got.double() - want).abs()
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
    assert not (err > bound).any(), f"{int((err > bound).sum())} elements off, worst error {err.max().item():.3g}"


def _operand(rows, cols, transposed, device, generator):
    """A (rows, cols) fp32 tensor, or the transposed view of a (cols, rows) one (the QNN's W.T and G.T)."""
    if transposed:
        return torch.randn(cols, rows, generator=generator).to(device).t()
    return torch.randn(rows, cols, generator=generator).to(device)


fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@fixture_ok
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 50), a_t=st.booleans(), b_t=st.booleans(),
       with_bias=st.booleans(), with_addend=st.booleans(), presplit=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_float64_at_odd_sizes_and_strides(device, m, n, k, a_t, b_t, with_bias, with_addend, presplit, seed):
    """Both forms: the operands split in the kernel (tf32x3), or in memory first (PRESPLIT)."""
    g = torch.Generator().manual_seed(seed)
    a, b = _operand(m, k, a_t, device, g), _operand(k, n, b_t, device, g)
    bias = torch.randn(n, generator=g).to(device) if with_bias else None
    addend = torch.randn(m, n, generator=g).to(device) if with_addend else None
    assert_fp32_close(fp32_gemm.matmul(a, b, bias=bias, addend=addend, presplit=presplit), a, b, bias, addend)


@fixture_ok
@given(values=st.lists(st.floats(-2.0**100, 2.0**100, width=32), min_size=1, max_size=40),
       transposed=st.booleans(), contiguous_dim=st.sampled_from([0, 1]))
def test_the_split_is_exact_and_its_big_part_is_tf32(device, values, transposed, contiguous_dim):
    """split(t, dim): t == big + small exactly; big keeps TF32's 10 stored mantissa bits (its low 13
    bits zero), rounded to nearest, so |small| is at most half a TF32 unit of t; both parts laid
    out along `dim` (a product's K), whatever t's own strides (the QNN's G.T, W, x)."""
    t = torch.tensor(values, dtype=torch.float32, device=device)
    t = torch.stack([t, -t * 0.5, t * 3]).t() if transposed else torch.stack([t, t * 0.25])
    big, small = fp32_gemm.split(t, contiguous_dim)
    assert big.stride(contiguous_dim) == small.stride(contiguous_dim) == 1
    assert big.shape == small.shape == t.shape
    assert torch.equal(big + small, t)
    assert not (big.view(torch.int32) & 0x1FFF).any()
    assert (small.abs() <= t.abs() * 2.0**-11).all()


def test_tiles_across_groups_of_rows(device):
    """More row tiles than a group (GROUP_M) and a ragged last group, column tiles beyond one, K not
    a multiple of BLOCK_K: every tile written once, in its place."""
    cfg = fp32_gemm._config()
    m = cfg["BLOCK_M"] * (cfg["GROUP_M"] + 1) + 3
    n, k = cfg["BLOCK_N"] * 2 + 5, cfg["BLOCK_K"] * 2 + 7
    g = torch.Generator().manual_seed(1)
    a, b = _operand(m, k, False, device, g), _operand(k, n, True, device, g)
    for presplit in (False, True):
        assert_fp32_close(fp32_gemm.matmul(a, b, presplit=presplit), a, b)


def test_empty_dimensions(device):
    a, b = torch.ones(0, 3, device=device), torch.ones(3, 4, device=device)
    assert fp32_gemm.matmul(a, b).shape == (0, 4)
    assert fp32_gemm.matmul(b.t(), torch.ones(3, 0, device=device)).shape == (4, 0)
    # K = 0: an empty sum, so bias + addend alone
    bias, addend = torch.arange(4.0, device=device), torch.full((2, 4), 0.5, device=device)
    out = fp32_gemm.matmul(torch.ones(2, 0, device=device), torch.ones(0, 4, device=device), bias=bias, addend=addend)
    torch.testing.assert_close(out, (bias + addend).cpu().to(device), rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(a=torch.ones(2, 3, dtype=torch.float64)), "a must be a 2-d fp32 tensor"),
    (dict(b=torch.ones(3)), "b must be a 2-d fp32 tensor"),
    (dict(b=torch.ones(4, 5)), "cannot be multiplied"),
    (dict(bias=torch.ones(4)), r"bias must have shape \(5,\)"),
    (dict(bias=torch.ones(5, dtype=torch.float16)), "bias must be a 1-d fp32 tensor"),
    (dict(addend=torch.ones(5, 2)), r"addend must have shape \(2, 5\)"),
])
def test_errors_name_the_argument(change, message):
    args = dict(a=torch.ones(2, 3), b=torch.ones(3, 5), bias=None, addend=None) | change
    with pytest.raises(ValueError, match=message):
        fp32_gemm.matmul(args["a"], args["b"], bias=args["bias"], addend=args["addend"])


@pytest.fixture
def tf32_switch():
    """Sets torch's TF32 switch for matrix products (monkeypatch cannot: cuBLASModule keeps it
    outside its __dict__), restored after the test."""
    before = torch.backends.cuda.matmul.allow_tf32

    def set_to(value: bool):
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_to
    torch.backends.cuda.matmul.allow_tf32 = before


def test_where_the_split_applies(monkeypatch, tf32_switch):
    """3xTF32 only for fp32 with TF32 off on a device whose tensor cores pay (A100, H100/H200, B200),
    never on the consumer GPUs (RTX 4090: TF32 runs at its fp32 rate), and never on the CPU unless
    forced; QIN_FP32_GEMM=vendor's mode turns it off everywhere."""
    cuda = torch.device("cuda", 0)
    x = torch.empty(2, 2)
    capability = {"cc": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cc"])
    tf32_switch(False)
    assert fp32_gemm.applies(cuda, x, x)
    assert not fp32_gemm.applies(cuda, x, x.half())  # a 16-bit operand: cuBLAS's tensor cores already
    assert not fp32_gemm.applies(torch.device("cpu"), x, x)
    for cc, pays in (((8, 0), True), ((10, 0), True), ((8, 9), False), ((8, 6), False), ((12, 0), False)):
        capability["cc"] = cc
        assert fp32_gemm.applies(cuda, x, x) == pays, cc
    capability["cc"] = (9, 0)
    tf32_switch(True)  # one TF32 pass is faster, and is what the user asked for
    assert not fp32_gemm.applies(cuda, x, x)
    with fp32_gemm.products("3xtf32"):  # forced: wherever Triton runs, whatever the switch
        assert fp32_gemm.applies(cuda, x, x) and fp32_gemm.applies(torch.device("cpu"), x, x)
        assert not fp32_gemm.applies(cuda, x, x.double())
    tf32_switch(False)
    with fp32_gemm.products("vendor"):
        assert not fp32_gemm.applies(cuda, x, x)
    assert fp32_gemm.applies(cuda, x, x)  # the mode is restored after the block
    with pytest.raises(ValueError, match="must be one of"):
        with fp32_gemm.products("fast"):
            pass
    # QIN_FP32_GEMM, read at import: a value it does not know is refused, naming the variable.
    assert [fp32_gemm.mode_from_env(v) for v in (None, "", "auto", "vendor")] == ["auto", "auto", "auto", "vendor"]
    with pytest.raises(ValueError, match="QIN_FP32_GEMM must be 'auto' or 'vendor'.*'3xtf32'"):
        fp32_gemm.mode_from_env("3xtf32")


def test_where_it_applies_is_a_constant_under_torch_compile(monkeypatch, tf32_switch):
    """quadratic_projection asks `applies` in the code torch.compile traces (auto's decision key):
    on a GPU that must not break the graph (QIN compiles its step with fullgraph=True). The compute
    capability is asked once while tracing and kept as a constant (torch.compiler.assume_constant_result).
    Here a stand-in for torch.cuda.get_device_capability that dynamo cannot trace: traced, it breaks
    the graph, which fullgraph=True refuses."""
    def capability(device=None):
        torch._dynamo.graph_break()
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    tf32_switch(False)
    cuda = torch.device("cuda", 0)

    def step(x):
        return x * 2 if fp32_gemm.applies(cuda) else x

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))


def _count_products(monkeypatch) -> list:
    calls = []
    real = fp32_gemm.matmul

    def counted(a, b, bias=None, addend=None, presplit=None):
        calls.append((tuple(a.shape), tuple(b.shape), bias is not None, addend is not None))
        return real(a, b, bias=bias, addend=addend, presplit=presplit)

    monkeypatch.setattr(fp32_gemm, "matmul", counted)
    return calls


@pytest.mark.parametrize("frozen_weight", [False, True])
@pytest.mark.parametrize("presplit", [False, True])
def test_qnn_triton_backend_with_split_products_matches_float64(device, monkeypatch, frozen_weight, presplit):
    """The Triton QNN with its three fp32 products through this kernel (forced, as on an H200 with
    TF32 off), in either form: forward and every gradient against the float64 reference on the
    kernel's own mask, at the fp32 tolerance. A frozen weight skips the grad_W product."""
    monkeypatch.setattr(fp32_gemm, "PRESPLIT", presplit)
    calls = _count_products(monkeypatch)
    batch, dim, rows, p, seed = 21, 19, 3, 0.2, 5
    x, weight, bias, gy = make_inputs(batch, dim, rows, torch.float32, device, seed=3)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_(not frozen_weight), bias.clone().requires_grad_()]
    with fp32_gemm.products("3xtf32"):
        y = kernels.quadratic_projection(*leaves, rows, dropout_p=p, training=True, seed=seed, backend="triton")
        wanted = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(y, wanted, gy)
    hidden = rows * dim
    expected = [((batch, dim), (dim, hidden), True, False), ((batch, hidden), (hidden, dim), False, True)]
    if not frozen_weight:
        expected.append(((hidden, batch), (batch, dim), False, False))
    assert calls == expected
    mask = dropout_keep_mask(seed, batch, rows, dim, p, device)
    want, magnitude = reference_and_magnitude(x, weight, bias, gy, rows, p, True, mask)
    names = ("y", "grad_x", "grad_weight", "grad_bias")
    got = dict(zip([n for n, leaf in zip(names[1:], leaves) if leaf.requires_grad], grads), y=y)
    for i, name in enumerate(names):
        if name in got:
            assert_close(name, got[name], want[i], magnitude[i], torch.float32)
    assert ("grad_weight" in got) != frozen_weight


def test_qnn_keeps_vendor_products_where_the_split_does_not_pay(device, monkeypatch):
    """Not forced: on the CPU, and on a GPU whose tensor cores do not pay, the Triton QNN's products are torch's."""
    calls = _count_products(monkeypatch)
    monkeypatch.setattr(fp32_gemm, "tensor_cores_pay", lambda device: False)
    x, weight, bias, gy = (t.requires_grad_(i < 3) for i, t in enumerate(make_inputs(5, 6, 2, torch.float32, device)))
    y = kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.1, training=True, seed=1, backend="triton")
    y.backward(gy)
    assert calls == [] and weight.grad is not None


@pytest.mark.parametrize("presplit", [False, True])
@pytest.mark.parametrize("product", ["forward", "grad_x", "grad_w"])
def test_the_qnn_products_at_the_papers_shape(device, product, monkeypatch, presplit):
    """B=8192, D=1024, M=4 on a GPU (on the CPU a slice: the interpreter's time grows with the
    size), in the layouts the QNN passes them: x @ W.T + b, G @ W + gy * s, G.T @ x; in either form."""
    monkeypatch.setattr(fp32_gemm, "PRESPLIT", presplit)
    batch, dim, hidden = (8192, 1024, 4096) if device.type == "cuda" else (48, 64, 96)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, dim, generator=g).to(device)
    weight = (torch.randn(hidden, dim, generator=g) / dim**0.5).to(device)
    grad_hidden = torch.randn(batch, hidden, generator=g).to(device)
    with fp32_gemm.products("3xtf32"):
        if product == "forward":
            bias = torch.randn(hidden, generator=g).to(device)
            assert_fp32_close(fp32_gemm.matmul(x, weight.t(), bias=bias), x, weight.t(), bias=bias)
        elif product == "grad_x":
            addend = torch.randn(batch, dim, generator=g).to(device)
            assert_fp32_close(fp32_gemm.matmul(grad_hidden, weight, addend=addend), grad_hidden, weight, addend=addend)
        else:
            assert_fp32_close(fp32_gemm.matmul(grad_hidden.t(), x), grad_hidden.t(), x)

"""The fused sparse target attention (ASTA) kernels against the reference.

On the CPU the kernels run under Triton's interpreter (tests/conftest.py), so shapes stay small;
with QIN_TEST_CUDA=1 the same tests run on the GPU. Every comparison evaluates the reference in
float64 on the very same (possibly 16-bit) inputs, so only the kernel's own rounding is measured.
"""
import importlib
import os
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
import kernels.utils
from kernels import reference, tolerances

asta = importlib.import_module("kernels.sparse_target_attention")  # the module, not the function

REPO = Path(__file__).resolve().parent.parent
# kernels/tolerances.py, the table `qin parity` uses too (its comments say why each number).
TOL = {dtype: tol.rtol for dtype, tol in tolerances.OPS.items()}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASK_KINDS = ["bool", "float", "float32", "uint8", "int64", "scaled"]
MASK_STYLES = ["random", "left_padded", "span", "all_zero", "all_one"]
# The device fixture is a constant, so sharing it across examples is safe.
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------
# Inputs and the float64 oracle
# ---------------------------------------------------------------------------------------------

def make_mask(batch, seq_len, style, g):
    """(B, L) bool: random positions, left-padded histories of random length (0..L), or one run of
    live positions anywhere in the row (padding at both ends, in tiles the kernels skip)."""
    if style == "span":
        start = torch.randint(0, seq_len + 1, (batch,), generator=g)
        stop = start + (torch.rand(batch, generator=g) * (seq_len + 1 - start)).long()  # start..L
        positions = torch.arange(seq_len)[None, :]
        return (positions >= start[:, None]) & (positions < stop[:, None])
    if style == "random":
        keep = torch.rand(batch, seq_len, generator=g) < 0.6
        if batch > 1:
            keep[0] = False  # one all-padding row beside live ones (alone, the case would check zeros only)
        return keep
    if style == "left_padded":  # real data: padding first, the last `length` positions are items
        lengths = torch.randint(0, seq_len + 1, (batch,), generator=g)
        if batch > 1:
            lengths[0] = 0
        return torch.arange(seq_len)[None, :] >= (seq_len - lengths)[:, None]
    return torch.full((batch, seq_len), style == "all_one")


def cast_mask(keep, kind, dtype):
    """The same 0/1 mask in another dtype; 'scaled' is what attention dropout passes: 0 or 1/(1-p),
    at p=0.1 a weight no binary float holds exactly (1.25 would hide a mask read in too few bits)."""
    return {
        "bool": lambda: keep,
        "float": lambda: keep.to(dtype),
        "float32": lambda: keep.to(torch.float32),
        "uint8": lambda: keep.to(torch.uint8),
        "int64": lambda: keep.to(torch.int64),
        "scaled": lambda: keep.to(dtype) / 0.9,
    }[kind]()


def make_inputs(batch, seq_len, dim, dtype, device, style="random", kind="bool", seed=0):
    """history, query, mask and an output gradient, with no score within reach of the ReLU kink.

    A score |s| ~ 0 may round to either side in the kernel and in the oracle; such history rows are
    redrawn (a property of the inputs, not a loosened tolerance).
    """
    # Drawn on the CPU (the same numbers on any device), checked on the device: at the paper's
    # shape the float64 products are 1.6 GB, a minute a pass on a small host.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, dim, generator=g).to(device=device, dtype=dtype)
    q = (torch.randn(batch, dim, generator=g) / dim**0.5).to(device=device, dtype=dtype)  # scores O(1), like 1/sqrt(d_a)
    for _ in range(100):
        prod = x.double() * q.double()[:, None, :]
        near_kink = prod.sum(-1).abs() <= 1e-3 * prod.abs().sum(-1)
        del prod
        if not near_kink.any():
            break
        x[near_kink] = torch.randn(int(near_kink.sum()), dim, generator=g).to(device=device, dtype=dtype)
    keep = make_mask(batch, seq_len, style, g)
    gz = torch.randn(batch, dim, generator=g).to(dtype)
    mask = cast_mask(keep, kind, dtype)
    return x, q, mask.to(device), gz.to(device)


def oracle(history, query, mask, grad_z):
    """z, grad_history, grad_query of the reference in float64."""
    h = history.detach().double().requires_grad_()
    q = query.detach().double().requires_grad_()
    z = reference.sparse_target_attention(h, q, mask.double())
    gh, gq = torch.autograd.grad(z, (h, q), grad_z.double())
    return z.detach(), gh, gq


def leaf(t):
    """A trainable copy of t with t's strides: clone() makes a gapped view (a slice of wider rows)
    contiguous, and the kernels' strided reads would go untested."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t).requires_grad_()


def run_triton(history, query, mask, grad_z):
    h, q = leaf(history), leaf(query)
    z = kernels.sparse_target_attention(h, q, mask, backend="triton")
    gh, gq = torch.autograd.grad(z, (h, q), grad_z)
    return z, gh, gq


def assert_close(name, got, want, dtype, scale=None):
    """|got - want| <= tol * (|want| + max|want|): relative, with a floor at the result's scale.

    With `scale` (the reference on |inputs|, the sum of |terms| every rounding scales with), the
    bound of kernels/tolerances.py instead, as `qin parity` applies it: tol * (scale + floor *
    max(scale)) + underflow. Where terms cancel, a result far smaller than its terms errs by a part of the
    terms, not of the result: bf16 grad_reps of -0.0328 from terms of 1.31 (-0.0347 on the torch
    backend, which rounds scores to bf16 as plain PyTorch does, 0.4 u of the terms)."""
    tol = TOL[dtype]
    want = want.cpu()
    err = (got.detach().cpu().double() - want).abs()
    bound = (tolerances.error_bound(scale.cpu(), tolerances.OPS[dtype]) if scale is not None
             else tol * (want.abs() + want.abs().max()))
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements exceed the {dtype} tolerance, "
                           f"worst error {err.max().item():.3g}, max |ref| {want.abs().max().item():.3g}")


def check_against_oracle(history, query, mask, grad_z):
    dtype = history.dtype
    got = run_triton(history, query, mask, grad_z)
    want = oracle(history, query, mask, grad_z)
    scale = oracle(history.abs(), query.abs(), mask.double().abs(), grad_z.abs())
    for name, g, w, s, like in zip(("z", "grad_history", "grad_query"), got, want, scale, (query, history, query)):
        assert g.dtype == dtype and g.shape == like.shape and g.device == history.device, name
        assert_close(name, g, w, dtype, s)
    return got


# ---------------------------------------------------------------------------------------------
# Values and gradients
# ---------------------------------------------------------------------------------------------

@fixture_ok
@given(batch=st.integers(1, 6), seq_len=st.integers(1, 40), dim=st.integers(1, 70),
       dtype=st.sampled_from(DTYPES), style=st.sampled_from(MASK_STYLES), kind=st.sampled_from(MASK_KINDS),
       seed=st.integers(0, 2**16))
def test_matches_reference(device, batch, seq_len, dim, dtype, style, kind, seed):
    check_against_oracle(*make_inputs(batch, seq_len, dim, dtype, device, style, kind, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq_len,dim", [(2, 64, 384), (1, 512, 384), (2, 33, 200), (3, 1, 1), (1, 300, 1)])
def test_fixed_shapes(device, batch, seq_len, dim, dtype):
    """The model's shape (L=64, D=384), a long history, D not a power of two, L=1/D=1 edges."""
    check_against_oracle(*make_inputs(batch, seq_len, dim, dtype, device, "left_padded", "float"))


def test_gradcheck_float64(device):
    history, query, mask, _ = make_inputs(2, 5, 6, torch.float64, device, "random", "bool", seed=1)
    history.requires_grad_()
    query.requires_grad_()
    fn = lambda h, q: kernels.sparse_target_attention(h, q, mask, backend="triton")
    assert torch.autograd.gradcheck(fn, (history, query), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("form", ["plain", "gathered"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_order_gradients_float64(device, backend, form):
    """backward(create_graph=True) gives gradients that are differentiable in turn (a Hessian-vector
    product, a gradient penalty): the fused backward is first-order, so there the op differentiates
    its reference. One all-padding row, and an index that repeats rows of reps."""
    history, query, mask, _ = make_inputs(3, 5, 4, torch.float64, device, "random", "bool", seed=1)
    query.requires_grad_()
    if form == "plain":
        inputs = (history.requires_grad_(), query)
        fn = lambda h, q: kernels.sparse_target_attention(h, q, mask, backend=backend)
    else:
        index = torch.tensor([[0, 1, 2, 1, 0], [3, 3, 1, 2, 0], [2, 2, 2, 1, 3]], device=device)
        inputs = (history[0, :4].detach().clone().requires_grad_(), query)
        fn = lambda r, q: kernels.gathered_sparse_target_attention(r, index, q, mask, backend=backend)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_order_with_a_query_computed_from_reps(device, backend):
    """QIN's query is computed from the representations the op attends over. Under create_graph=True
    the recomputation once followed that path itself, and the caller's engine again: the first-order
    gradient of reps came out wrong (8.4 off in 1e0). Now it is the one without create_graph, and the
    second order checks out."""
    reps, index, _, mask, grad_z = make_gathered(4, 5, 6, 6, torch.float64, device, "random", seed=15)
    reps.requires_grad_()
    weight = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device) / 3
    fn = lambda r: kernels.gathered_sparse_target_attention(r, index, r[:4] @ weight, mask, backend=backend)
    first, = torch.autograd.grad(fn(reps), reps, grad_z)
    again, = torch.autograd.grad(fn(reps), reps, grad_z, create_graph=True)
    torch.testing.assert_close(again, first, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(fn, (reps,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_order_sums_a_popular_items_gradient_in_fp32(device, backend):
    """Under create_graph=True the recomputation runs in fp32: a bf16 gradient into an item read
    at 2048 positions keeps every term (summed in bf16 it was 64% off)."""
    reps, index, query, mask, grad_z = make_gathered(32, 64, 8, 2, torch.bfloat16, device, "all_one", seed=16)
    index.zero_()  # one item everywhere: 2048 repeats
    r = reps.clone().requires_grad_()
    got, = torch.autograd.grad(kernels.gathered_sparse_target_attention(r, index, query, mask, backend=backend),
                               r, grad_z, create_graph=True)
    _, want, _ = gathered_oracle(reps, index, query, mask, grad_z)
    _, scale, _ = gathered_oracle(reps.abs(), index, query.abs(), mask.double(), grad_z.abs())
    assert got.dtype == torch.bfloat16
    assert_close("grad_reps", got, want, torch.bfloat16, scale)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_backward_inside_autocast_sums_a_popular_items_gradient_in_fp32(device, backend):
    """Backward called inside the autocast region (the trainer's is outside; a user's, or
    kernels.choice's timing, may be inside) gives the gradient a backward outside gives: the torch
    backward summed a popular item's terms in bf16 on the CPU (its sparse product was autocast's)
    and failed on CUDA ("addmm_sparse_cuda" not implemented for 'BFloat16', on an H200)."""
    reps, index, query, mask, grad_z = make_gathered(32, 64, 8, 2, torch.bfloat16, device, "all_one", seed=16)
    index.zero_()  # one item everywhere: 2048 repeats
    grads = []
    for inside in (False, True):
        r = reps.clone().requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            z = kernels.gathered_sparse_target_attention(r, index, query, mask, backend=backend)
            if inside:
                grads.append(torch.autograd.grad(z, r, grad_z)[0])
        if not inside:
            grads.append(torch.autograd.grad(z, r, grad_z)[0])
    if backend == "torch":  # (Triton's atomic adds may sum in another order on a GPU)
        assert torch.equal(grads[1], grads[0])
    _, want, _ = gathered_oracle(reps, index, query, mask, grad_z)
    _, scale, _ = gathered_oracle(reps.abs(), index, query.abs(), mask.double(), grad_z.abs())
    assert_close("grad_reps", grads[1], want, torch.bfloat16, scale)


@pytest.mark.parametrize("form", ["plain", "gathered"])
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_forward_mode_and_func_transforms(device, backend, form):
    """A custom op has no forward-mode rule: the Triton op's tangent was silently zero under
    torch.func.jvp and dual tensors. Now "auto" runs torch there (its tangent and jacrev right),
    and "triton" refuses, naming what it does not support."""
    history, query, mask, _ = make_inputs(3, 5, 4, torch.float64, device, "random", "bool", seed=1)
    index = torch.tensor([[0, 1, 2, 1, 0], [3, 3, 1, 2, 0], [2, 2, 2, 1, 3]], device=device)
    x = history if form == "plain" else history[0, :4].clone()
    op = (lambda x, q: kernels.sparse_target_attention(x, q, mask, backend=backend)) if form == "plain" else \
        (lambda x, q: kernels.gathered_sparse_target_attention(x, index, q, mask, backend=backend))
    ref = (lambda x, q: reference.sparse_target_attention(x, q, mask)) if form == "plain" else \
        (lambda x, q: reference.gathered_sparse_target_attention(x, index, q, mask))
    tangents = (torch.randn_like(x), torch.randn_like(query))
    want = torch.func.jvp(ref, (x, query), tangents)
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="does not support forward-mode AD or torch.func"):
            torch.func.jvp(op, (x, query), tangents)
        return
    for got, w in zip(torch.func.jvp(op, (x, query), tangents), want):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(t, dt) for t, dt in zip((x, query), tangents)]
        tangent = torch.autograd.forward_ad.unpack_dual(op(*duals)).tangent
    torch.testing.assert_close(tangent, want[1], rtol=1e-12, atol=1e-12)
    for got, w in zip(torch.func.jacrev(op, argnums=(0, 1))(x, query), torch.func.jacrev(ref, argnums=(0, 1))(x, query)):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["plain", "gathered"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_a_mask_that_requires_grad(device, backend, form):
    """The Triton backward does not differentiate the mask (it returned None, silently): for a
    floating mask that requires grad "auto" runs the torch path, which does, and "triton" refuses."""
    history, query, keep, grad_z = make_inputs(3, 5, 4, torch.float64, device, "random", "bool", seed=2)
    weights = torch.rand(keep.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    mask = (keep * (0.5 + weights)).requires_grad_()  # soft weights, away from relu's kink at 0
    index = torch.arange(15, device=device).view(3, 5)
    op = (lambda m: kernels.sparse_target_attention(history, query, m, backend=backend)) if form == "plain" else \
        (lambda m: kernels.gathered_sparse_target_attention(history.view(15, 4), index, query, m, backend=backend))
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="does not support a gradient in the mask"):
            op(mask)
        return
    got, = torch.autograd.grad(op(mask), mask, grad_z)
    want, = torch.autograd.grad(reference.sparse_target_attention(history, query, mask), mask, grad_z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_float64_forward_is_exact_to_roundoff(device):
    check_against_oracle(*make_inputs(4, 37, 70, torch.float64, device, "random", "float", seed=2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_dtypes_give_identical_results(device, dtype):
    """A bool mask and the same 0/1 mask as float, uint8 or int64: bit-identical outputs and grads,
    in both forms (the gathered one through an index that reads each history row once)."""
    history, query, keep, grad_z = make_inputs(5, 23, 45, dtype, device, "left_padded", "bool", seed=3)
    batch, seq_len, dim = history.shape
    reps, index = history.reshape(-1, dim), torch.arange(batch * seq_len, device=device).view(batch, seq_len)
    forms = {"plain": lambda mask: run_triton(history, query, mask, grad_z),
             "gathered": lambda mask: run_gathered(reps, index, query, mask, grad_z)}
    for form, run in forms.items():
        base = run(keep)
        for kind in ("float", "float32", "uint8", "int64"):
            mask = cast_mask(keep.cpu(), kind, dtype).to(device)
            for name, a, b in zip(("z", "grad_history", "grad_query"), base, run(mask)):
                assert torch.equal(a, b), f"{form}: {name} differs for a {kind} mask"


def test_all_zero_mask_rows_give_exact_zeros(device):
    """Padding rows contribute nothing, even where the history holds huge or non-finite values."""
    history, query, keep, grad_z = make_inputs(4, 12, 20, torch.float32, device, "random", "bool", seed=4)
    keep[1] = False
    history[1] = 1e30
    history[1, 3] = float("nan")
    history[2][~keep[2]] = float("inf")  # padded positions of a live row
    z, gh, gq = run_triton(history, query, keep, grad_z)
    assert torch.equal(z[1], torch.zeros_like(z[1]))
    assert torch.equal(gh[1], torch.zeros_like(gh[1])) and torch.equal(gq[1], torch.zeros_like(gq[1]))
    assert torch.equal(gh[2][~keep[2]], torch.zeros_like(gh[2][~keep[2]]))
    assert torch.isfinite(z).all() and torch.isfinite(gh).all() and torch.isfinite(gq).all()
    rest = [0, 2, 3]
    want = oracle(history[rest].nan_to_num(posinf=0.0) * keep[rest, :, None], query[rest], keep[rest], grad_z[rest])
    assert_close("z", z[rest], want[0], torch.float32)
    assert_close("grad_query", gq[rest], want[2], torch.float32)


@pytest.mark.parametrize("form", ["plain", "gathered triton", "gathered torch"])
def test_a_score_of_exactly_zero_passes_no_gradient(device, form):
    """relu'(0) = 0, as torch's relu has it: a live position whose score is exactly 0 (every position
    of row 0, whose query is zero; position 0 of row 1, orthogonal to its query) adds nothing to
    the query's gradient, nor a score term to its own. Small integers: every sum is exact."""
    reps = torch.tensor([[1., 1., 3., -2.], [2., 0., 1., 1.], [-1., 2., 0., 1.]], device=device)
    index = torch.tensor([[0, 1, 2], [0, 1, 2]], device=device)
    query = torch.tensor([[0., 0., 0., 0.], [1., -1., 0., 0.]], device=device)  # row 1 scores 0, 2, -3
    mask = torch.ones(2, 3, dtype=torch.bool, device=device)
    grad_z = torch.tensor([[1., 2., -1., .5], [-1., 1., 2., 1.]], device=device)
    if form == "plain":
        got, want = (f(reps[index], query, mask, grad_z) for f in (run_triton, oracle))
    else:
        got = run_gathered(reps, index, query, mask, grad_z, backend=form.split()[1])
        want = gathered_oracle(reps, index, query, mask, grad_z)
    assert torch.equal(want[2][0], torch.zeros(4, dtype=torch.float64, device=device))  # the convention itself
    for name, g, w in zip(("z", "grad_x", "grad_query"), got, want):
        assert torch.equal(g, w.float()), f"{name}: {g} != {w}"


@pytest.mark.parametrize("form", ["plain", "gathered"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_wider_float_mask_is_rounded_to_the_history_dtype(device, form, backend):
    """As the reference does: an fp32 mask weight of 1 + 2^-8 is 1 in bf16 (a tie, to even). With
    rows (1, 1) and (1, -1) and scores of 1 each, z = (m0 + m1, m0 - m1) = (2, 0); unrounded, the
    second would be 2^-8, exact in bf16 (so neither the GPU's rounding to nearest nor the
    interpreter's toward zero can hide it)."""
    x = torch.tensor([[1., 1.], [1., -1.]], dtype=torch.bfloat16, device=device)
    query = torch.tensor([[1., 0.]], dtype=torch.bfloat16, device=device)
    mask = torch.tensor([[1 + 2.0**-8, 1.]], device=device)
    index = torch.tensor([[0, 1]], device=device)
    if form == "plain":
        z = kernels.sparse_target_attention(x[None], query, mask, backend=backend)
    else:
        z = kernels.gathered_sparse_target_attention(x, index, query, mask, backend=backend)
    assert z.dtype == torch.bfloat16 and z.tolist() == [[2.0, 0.0]], z


def test_non_contiguous_inputs(device):
    """Strided/sliced/transposed/expanded history, transposed query and mask: same as contiguous."""
    batch, seq_len, dim = 3, 10, 24
    history, query, mask, grad_z = make_inputs(batch, seq_len, dim, torch.float32, device, "random", "bool", seed=5)
    want = oracle(history, query, mask, grad_z)
    wide = torch.zeros(batch, 2 * seq_len, dim + 3, device=device)
    wide[:, ::2, 1:dim + 1] = history
    variants = {
        "sliced": wide[:, ::2, 1:dim + 1],  # unit last stride: read in place, no copy
        "transposed": history.transpose(1, 2).contiguous().transpose(1, 2),  # last stride L: copied
        "batch_major_last": history.permute(1, 0, 2).contiguous().permute(1, 0, 2),
    }
    q_t = query.t().contiguous().t()
    m_t = mask.t().contiguous().t()
    for name, h in variants.items():
        assert not h.is_contiguous(), name
        got = run_triton(h, q_t, m_t, grad_z)
        for what, g, w in zip(("z", "grad_history", "grad_query"), got, want):
            assert_close(f"{name} {what}", g, w, torch.float32)

    # A transposed float mask of the history's dtype (no cast on the way, so no copy either).
    weights = mask.float() / 0.9
    got = run_triton(history, query, weights.t().contiguous().t(), grad_z)
    for what, g, w in zip(("z", "grad_history", "grad_query"), got, oracle(history, query, weights, grad_z)):
        assert_close(f"transposed float mask {what}", g, w, torch.float32)

    # One history shared by every row (batch stride 0): its gradient is the sum over rows.
    one = history[:1].detach().clone().requires_grad_()
    q = query.detach().clone().requires_grad_()
    z = kernels.sparse_target_attention(one.expand(batch, -1, -1), q, mask, backend="triton")
    got = (z, *torch.autograd.grad(z, (one, q), grad_z))
    h64 = history[:1].double().requires_grad_()
    q64 = query.double().requires_grad_()
    z64 = reference.sparse_target_attention(h64.expand(batch, -1, -1), q64, mask)
    for what, g, w in zip(("z", "grad_history", "grad_query"), got,
                          (z64.detach(), *torch.autograd.grad(z64, (h64, q64), grad_z.double()))):
        assert_close(f"expanded {what}", g, w, torch.float32)


def test_history_offsets_past_2_31_elements(device, tmp_path):
    """A history whose rows lie 2**30 elements apart (a time-major (L, B, D) history seen as
    (B, L, D): stride(1) = B*D): position 2 starts 2**31 elements past position 0, an offset that
    wrapped in int32 and read 2**32 elements too low. On the CPU the 8 GB buffer is a sparse file,
    of which only the touched pages exist."""
    dim, stride = 16, 2**30
    size = 2**32 + dim
    if device.type == "cpu":
        base = torch.from_file(str(tmp_path / "sparse"), shared=True, size=size, dtype=torch.float16)
    else:
        base = torch.zeros(size, dtype=torch.float16, device=device)
    start = 2**31  # so that the wrapped address, start - 2**31, is inside the buffer too
    history = base.as_strided((1, 3, dim), (3 * stride, stride, 1), storage_offset=start)
    base[start + 2 * stride:][:dim] = 1.0  # position 2, the only live one
    base[start + 2 * stride - 2**32:][:dim] = 7.0  # where the wrapped offset pointed
    base[start:][:dim] = -3.0  # position 0, masked off
    query = torch.ones(1, dim, dtype=torch.float16, device=device, requires_grad=True)
    mask = torch.tensor([[False, False, True]], device=device)
    z = kernels.sparse_target_attention(history, query, mask, backend="triton")
    (grad_query,) = torch.autograd.grad(z, query, torch.ones_like(z))
    # z = relu(<q, x_2>) x_2 = 16 * ones; grad_q = (grad_z . x_2) x_2 = 16 * ones
    assert z.tolist() == [[16.0] * dim]
    assert grad_query.tolist() == [[16.0] * dim]


def test_grad_of_a_sum_and_single_input_grads(device):
    """An expanded (stride 0) output gradient, and asking for one input's gradient only."""
    history, query, mask, _ = make_inputs(2, 7, 9, torch.float32, device, "random", "bool", seed=6)
    h = history.clone().requires_grad_()
    z = kernels.sparse_target_attention(h, query, mask, backend="triton")
    z.sum().backward()
    want = oracle(history, query, mask, torch.ones(2, 9, device=device))
    assert_close("grad_history", h.grad, want[1], torch.float32)


def test_no_grad_path_matches(device):
    history, query, mask, grad_z = make_inputs(3, 17, 30, torch.bfloat16, device, "random", "float", seed=7)
    with torch.no_grad():
        z = kernels.sparse_target_attention(history, query, mask, backend="triton")
    assert torch.equal(z, run_triton(history, query, mask, grad_z)[0])


def test_saves_only_the_inputs(device):
    """Backward keeps history, query and the mask alive, nothing of size B*L*D besides history."""
    history, query, mask, _ = make_inputs(2, 8, 16, torch.float32, device, "random", "bool", seed=8)
    history.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.sparse_target_attention(history, query, mask, backend="triton")
    assert sorted(t.numel() for t in saved) == sorted([history.numel(), query.numel(), mask.numel()])
    assert any(t.data_ptr() == history.data_ptr() for t in saved)  # not a copy


def test_empty_inputs_launch_nothing(device, monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for an empty input")

    monkeypatch.setattr(asta, "_asta_fwd_kernel", NoLaunch())
    monkeypatch.setattr(asta, "_asta_bwd_kernel", NoLaunch())
    for batch, seq_len in ((0, 5), (3, 0), (0, 0)):
        h = torch.randn(batch, seq_len, 6, device=device, requires_grad=True)
        q = torch.randn(batch, 6, device=device, requires_grad=True)
        m = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        z = kernels.sparse_target_attention(h, q, m, backend="triton")
        assert z.shape == (batch, 6) and not z.any()
        gh, gq = torch.autograd.grad(z, (h, q), torch.ones_like(z))
        assert gh.shape == h.shape and gq.shape == q.shape and not gq.any()


def test_model_block_triton_matches_torch(device):
    """The model's hoisted ASTA with backend='triton' vs 'torch', including attention dropout folded into the mask."""
    from qin.config import QINConfig
    from qin.model import SparseTargetAttention

    out = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = QINConfig(embed_dim=8, attention_dim=16, asta_kernel=backend, asta_dropout=0.1)
        block = SparseTargetAttention(cfg).to(device)
        target = torch.randn(4, cfg.item_dim, device=device)
        history = torch.randn(4, 12, cfg.item_dim, device=device, requires_grad=True)
        mask = torch.arange(12, device=device)[None, :] >= torch.tensor([[2], [11], [12], [0]], device=device)
        y = block(target, history, mask)
        y.square().sum().backward()
        out[backend] = (y.detach(), history.grad, block.W_q.weight.grad)
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Argument checks and backends
# ---------------------------------------------------------------------------------------------

def _good(device, dtype=torch.float32):
    return (torch.randn(2, 5, 4, device=device, dtype=dtype), torch.randn(2, 4, device=device, dtype=dtype),
            torch.ones(2, 5, dtype=torch.bool, device=device))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,arg", [
    ("history_2d", "history"), ("history_int", "history"), ("query_int", "query"), ("query_shape", "query"),
    ("query_device", "query"), ("mask_shape", "mask"), ("mask_3d", "mask"), ("mask_complex", "mask"),
    ("mask_device", "mask"),
])
def test_bad_arguments_name_the_argument(device, backend, case, arg):
    h, q, m = _good(device)
    h, q, m = {
        "history_2d": lambda: (h[0], q, m),
        "history_int": lambda: (h.long(), q, m),
        "query_int": lambda: (h, q.long(), m),
        "query_shape": lambda: (h, q[:, :3], m),
        "query_device": lambda: (h, q.to("meta"), m),
        "mask_shape": lambda: (h, q, m[:, :4]),
        "mask_3d": lambda: (h, q, m[..., None]),
        "mask_complex": lambda: (h, q, m.to(torch.complex64)),
        "mask_device": lambda: (h, q, m.to("meta")),
    }[case]()
    with pytest.raises(ValueError, match=arg):
        kernels.sparse_target_attention(h, q, m, backend=backend)


def test_too_wide_rows_are_refused_clearly(device):
    h = torch.randn(1, 1, asta.MAX_D + 1, device=device)
    with pytest.raises(ValueError, match="D <= "):
        kernels.sparse_target_attention(h, h[:, 0], torch.ones(1, 1, device=device), backend="triton")


def test_unknown_backend(device):
    with pytest.raises(ValueError, match="backend"):
        kernels.sparse_target_attention(*_good(device), backend="cuda")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(kernels.utils, "INTERPRETING", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.sparse_target_attention(*_good(torch.device("cpu")), backend="triton")
    # "auto" falls back to the reference on the CPU, and "torch" is always available.
    for backend in ("auto", "torch"):
        h, q, m = _good(torch.device("cpu"))
        assert torch.equal(kernels.sparse_target_attention(h, q, m, backend=backend),
                           reference.sparse_target_attention(h, q, m))


@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_registered_op_where_triton_cannot_run_computes_the_reference(monkeypatch, gathered, dtype):
    """A program exported where the Triton op ran (`qin export` on a GPU) holds the op itself; run
    on a CPU without TRITON_INTERPRET it computes the same function, and its gradients, with the
    reference (it failed inside Triton: "0 active drivers"), warning once."""
    monkeypatch.setattr(kernels.utils, "INTERPRETING", False)
    monkeypatch.setattr(kernels.utils, "_WARNED", set())
    x, q, mask, gz = make_inputs(5, 9, 24, dtype, torch.device("cpu"), style="left_padded")
    want, scale = oracle(x, q, mask, gz), oracle(x.abs(), q.abs(), mask.double(), gz.abs())
    order = torch.randperm(45, generator=torch.Generator().manual_seed(1))
    index = torch.argsort(order).reshape(5, 9)  # the same history as rows of reps in another order
    x = (x.reshape(45, 24)[order] if gathered else x).requires_grad_()
    q = q.requires_grad_()
    with pytest.warns(UserWarning, match="computing it with the PyTorch reference"):
        z = torch.ops.qin.sparse_target_attention(x, index if gathered else None, q, mask)
    with pytest.warns(UserWarning, match="backward: the Triton kernel cannot run here"):
        gx, gq = torch.autograd.grad(z, (x, q), gz)
    if gathered:  # each history row's gradient is its reps row's: one reader each
        gx = gx[index]
    for name, got, w, s in zip(("z", "grad_history", "grad_query"), (z, gx, gq), want, scale):
        assert got.dtype == dtype
        assert_close(name, got, w, dtype, s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        torch.ops.qin.sparse_target_attention(x.detach(), index if gathered else None, q.detach(), mask)


def test_auto_backend_matches_reference(device):
    h, q, m = _good(device)
    torch.testing.assert_close(kernels.sparse_target_attention(h, q, m), reference.sparse_target_attention(h, q, m))



def test_mixed_dtypes_are_read_in_their_promoted_type(device):
    """A bf16 query with an fp32 history reads both in fp32 (torch's promotion), on both backends."""
    history, query, mask, _ = make_inputs(3, 9, 16, torch.float32, device, "random", "bool", seed=9)
    want = reference.sparse_target_attention(history, query.bfloat16().float(), mask)
    for backend in ("torch", "triton"):
        z = kernels.sparse_target_attention(history, query.bfloat16(), mask, backend=backend)
        assert z.dtype == torch.float32
        assert_close(backend, z, want.double(), torch.float32)


# ---------------------------------------------------------------------------------------------
# The gathered form: history rows read through an index into the distinct items' representations
# ---------------------------------------------------------------------------------------------

def make_gathered(batch, seq_len, dim, num_unique, dtype, device, style="left_padded", seed=0):
    """reps (U, D), index (B, L) with repeated ids and id U-1 present, query, mask, grad_z; no live
    score near the ReLU kink (query rows redrawn, as make_inputs redraws history rows)."""
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, checked on the device (make_inputs)
    reps = torch.randn(num_unique, dim, generator=g).to(device=device, dtype=dtype)
    index = torch.randint(0, num_unique, (batch, seq_len), generator=g)
    index.view(-1)[-1] = num_unique - 1
    keep = make_mask(batch, seq_len, style, g)
    keep.view(-1)[-1] = True
    index, keep = index.to(device), keep.to(device)
    query = (torch.randn(batch, dim, generator=g) / dim**0.5).to(device=device, dtype=dtype)
    for _ in range(100):
        prod = reps.double()[index] * query.double()[:, None, :]
        near_kink = (prod.sum(-1).abs() <= 1e-3 * prod.abs().sum(-1)) & keep
        del prod
        rows = near_kink.any(1)
        if not rows.any():
            break
        query[rows] = (torch.randn(int(rows.sum()), dim, generator=g) / dim**0.5).to(device=device, dtype=dtype)
    grad_z = torch.randn(batch, dim, generator=g).to(dtype)
    return reps, index, query, keep, grad_z.to(device)


def gathered_oracle(reps, index, query, mask, grad_z):
    r = reps.detach().double().requires_grad_()
    q = query.detach().double().requires_grad_()
    z = reference.gathered_sparse_target_attention(r, index, q, mask.double())
    return (z.detach(), *torch.autograd.grad(z, (r, q), grad_z.double()))


def run_gathered(reps, index, query, mask, grad_z, backend="triton"):
    r, q = leaf(reps), leaf(query)
    z = kernels.gathered_sparse_target_attention(r, index, q, mask, backend=backend)
    return (z, *torch.autograd.grad(z, (r, q), grad_z))


def check_gathered(reps, index, query, mask, grad_z, backend="triton"):
    got = run_gathered(reps, index, query, mask, grad_z, backend)
    want = gathered_oracle(reps, index, query, mask, grad_z)
    scale = gathered_oracle(reps.abs(), index, query.abs(), mask.double().abs(), grad_z.abs())
    for name, g, w, s, like in zip(("z", "grad_reps", "grad_query"), got, want, scale, (query, reps, query)):
        assert g.dtype == reps.dtype and g.shape == like.shape, name
        assert_close(name, g, w, reps.dtype, s)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@fixture_ok
@given(batch=st.integers(1, 6), seq_len=st.integers(1, 40), dim=st.integers(1, 70), num_unique=st.integers(1, 30),
       dtype=st.sampled_from(DTYPES), style=st.sampled_from(MASK_STYLES), seed=st.integers(0, 2**16))
def test_gathered_matches_reference(device, backend, batch, seq_len, dim, num_unique, dtype, style, seed):
    """Both backends' gathered op (the Triton kernel; the torch path's hand-written re-gathering
    backward) against autograd through the reference in float64."""
    check_gathered(*make_gathered(batch, seq_len, dim, num_unique, dtype, device, style, seed), backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq_len,dim,num_unique", [(4, 64, 384, 40), (3, 9, 200, 1), (5, 513, 16, 7)])
def test_gathered_fixed_shapes(device, batch, seq_len, dim, num_unique, dtype, backend):
    """The model's row width with many repeats, a single distinct item (U=1), a long history."""
    check_gathered(*make_gathered(batch, seq_len, dim, num_unique, dtype, device, "left_padded", seed=11),
                   backend=backend)


@pytest.mark.parametrize("form", ["plain", "gathered"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_bound_bites_where_nothing_cancels(device, dtype, form):
    """Non-negative inputs and output gradient: no term cancels, so the scale the 16-bit bound is
    relative to is the result itself, and 4 u of it is 4 u of the result. With random signs the
    terms' sum is ~100x the result at the model's shape, where a bf16 kernel that skipped a
    history item still passed. Here each row has ~10 live positions, its first and last among
    them, spread over several BLOCK_L tiles (each ~1/10 of the row's result), so a skipped
    position or tile, or a scaled gradient, fails in 16-bit alone: on a GPU the 16-bit code paths
    are checked by the 16-bit tests only. Row 0 is live throughout, 200 positive terms, where a
    sum kept in 16 bits errs by far more than 4 u. Scores are all positive (no ReLU kink to round
    across)."""
    batch, seq_len, dim, num_unique = 4, 200, 96, 30
    g = torch.Generator().manual_seed(21)
    keep = torch.zeros(batch, seq_len, dtype=torch.bool)
    keep[0] = True
    for row in keep[1:]:
        row[torch.randperm(seq_len, generator=g)[:8]] = True
        row[[0, -1]] = True
    positive = lambda *shape: (torch.rand(*shape, generator=g) + 0.1).to(dtype)
    query, grad_z = positive(batch, dim) / dim, positive(batch, dim)
    keep, query, grad_z = keep.to(device), query.to(device), grad_z.to(device)
    if form == "plain":
        check_against_oracle(positive(batch, seq_len, dim).to(device), query, keep, grad_z)
    else:
        index = torch.randint(0, num_unique, (batch, seq_len), generator=g).to(device)
        check_gathered(positive(num_unique, dim).to(device), index, query, keep, grad_z)


def test_gathered_float64_keeps_float64_sums(device):
    """float64 in, float64 sums: the gradient into reps (summed over repeated ids) included."""
    check_gathered(*make_gathered(4, 37, 70, 9, torch.float64, device, "random", seed=13))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gathered_gradient_of_one_input_alone(device, backend):
    """A frozen reps (a fixed item table) or a frozen query: the other's gradient as when both train
    (the torch path's backward op once returned one empty tensor for two unwanted gradients,
    which a custom op may not)."""
    reps, index, query, mask, grad_z = make_gathered(4, 9, 12, 5, torch.float64, device, "random", seed=14)
    _, want_reps, want_query = gathered_oracle(reps, index, query, mask, grad_z)
    _, scale_reps, scale_query = gathered_oracle(reps.abs(), index, query.abs(), mask.double(), grad_z.abs())
    for trains, want, scale in (("reps", want_reps, scale_reps), ("query", want_query, scale_query)):
        leaves = {"reps": reps.clone(), "query": query.clone()}
        leaves[trains].requires_grad_()
        z = kernels.gathered_sparse_target_attention(leaves["reps"], index, leaves["query"], mask, backend=backend)
        got, = torch.autograd.grad(z, leaves[trains], grad_z)
        assert_close(trains, got, want, torch.float64, scale)


@pytest.mark.parametrize("gathered", [False, True], ids=["plain", "gathered"])
def test_triton_backward_skips_the_gradient_of_a_frozen_history(device, gathered):
    """With x frozen (a fixed item table) the backward op forms no gradient of it (in the gathered
    form, no atomics at all) and the query's gradient is the same to the bit."""
    reps, index, query, mask, grad_z = make_gathered(4, 9, 12, 5, torch.float32, device, "random", seed=17)
    x, index = (reps, index) if gathered else (reps[index], None)
    full = torch.ops.qin.sparse_target_attention_backward(grad_z, x, index, query, mask)
    frozen = torch.ops.qin.sparse_target_attention_backward(grad_z, x, index, query, mask, False)
    assert full[0].shape == x.shape and frozen[0].numel() == 0
    assert torch.equal(frozen[1], full[1])


# (start, stop) of the one live run of each row, L = 23 in tiles of 4: the first and the last
# position alone, a run across a tile edge, one whole tile, none, all.
SPANS = [(0, 1), (22, 23), (5, 9), (8, 12), (0, 0), (0, 23)]


@pytest.mark.parametrize("gathered", [False, True], ids=["plain", "gathered"])
def test_tiles_of_padding_alone_are_skipped_and_the_plain_gradient_stores_zeros(device, gathered, monkeypatch):
    """The kernels skip the work of a tile with no live position: runs at either end of a row,
    across a tile edge, filling one tile, none, all give the oracle's result. The plain backward
    still stores every position of dx (zeros in the skipped tiles): its buffer comes from
    torch.empty_like, filled with NaN here so that a tile left unstored shows. Forced to read every
    tile (bench_asta times the two), the kernels give the same bits."""
    batch, seq_len, dim = len(SPANS), 23, 12
    positions = torch.arange(seq_len)
    keep = torch.stack([(positions >= a) & (positions < b) for a, b in SPANS])
    reps, index, query, _, grad_z = make_gathered(batch, seq_len, dim, 9, torch.float32, device, seed=23)
    keep = keep.to(device)
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: empty_like(*args, **kwargs).fill_(float("nan")))
    with asta.forced_config(BLOCK_L=4):
        if gathered:
            check_gathered(reps, index, query, keep, grad_z)
        else:
            got = check_against_oracle(reps[index], query, keep, grad_z)
            assert not got[1][~keep].any()  # exactly 0, not NaN, where no position is live
    # Reading every tile (what bench_asta times the skip against) gives the same bits: a skipped
    # tile would only have added zeros. All but the gathered gradient into reps, which on a GPU
    # atomic adds from several rows sum in an order of their own in each variant (the last bit
    # differed on an H200): that one against the oracle, as the skipping variant's is above.
    run = run_gathered if gathered else run_triton
    first = reps if gathered else reps[index]
    args = (first, index, query, keep, grad_z) if gathered else (first, query, keep, grad_z)
    with asta.forced_config(BLOCK_L=4):
        skipping = run(*args)
    with asta.forced_config(BLOCK_L=4, SKIP_EMPTY_TILES=False):
        every_tile = run(*args)
    assert torch.equal(skipping[0], every_tile[0]) and torch.equal(skipping[2], every_tile[2])
    if gathered and device.type == "cuda":
        want, scale = gathered_oracle(*args)[1], gathered_oracle(reps.abs(), index, query.abs(), keep.double(),
                                                                  grad_z.abs())[1]
        assert_close("every tile grad_reps", every_tile[1], want, torch.float32, scale)
    else:
        assert torch.equal(skipping[1], every_tile[1])


@pytest.mark.skipif(bool(os.environ.get("QIN_TEST_CUDA")),
                    reason="counts the loads of Triton's interpreter, which a CUDA run does not use")
@pytest.mark.parametrize("skip", [True, False], ids=["skipping", "every_tile"])
@pytest.mark.parametrize("gathered", [False, True], ids=["plain", "gathered"])
def test_a_tile_of_padding_alone_reads_no_history(gathered, skip, monkeypatch):
    """What the skip saves, counted in the interpreter: the forward and the backward each load the
    (BLOCK_L, BLOCK_D) history tile of a tile with a live position, and no other (forced to read
    every tile, all six tiles of every row)."""
    from triton.runtime import interpreter

    builder = type(interpreter.interpreter_builder)
    masked_load, tiles = builder.create_masked_load, []

    def counting(self, ptrs, *args, **kwargs):
        if ptrs.data.ndim == 2:  # the history tile; mask, index, query and gradient rows are 1-D
            tiles.append(ptrs.data.shape)
        return masked_load(self, ptrs, *args, **kwargs)

    monkeypatch.setattr(builder, "create_masked_load", counting)
    batch, seq_len, dim = len(SPANS), 23, 12
    positions = torch.arange(seq_len)
    keep = torch.stack([(positions >= a) & (positions < b) for a, b in SPANS])
    reps, index, query, _, grad_z = make_gathered(batch, seq_len, dim, 9, torch.float32, torch.device("cpu"), seed=23)
    with asta.forced_config(BLOCK_L=4, SKIP_EMPTY_TILES=skip):
        if gathered:
            run_gathered(reps, index, query, keep, grad_z)
        else:
            run_triton(reps[index], query, keep, grad_z)
    live_tiles = sum(len({int(l) // 4 for l in positions[row]}) for row in keep) if skip else batch * 6
    assert live_tiles == (11 if skip else 36)
    assert tiles == [(4, 16)] * (2 * live_tiles)  # forward and backward


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_mask_made_under_inference_mode(device, backend):
    """A mask cached under torch.inference_mode serves a training call on either backend (the Triton
    op saved it as it was, which autograd refuses for an inference tensor)."""
    history, query, keep, grad_z = make_inputs(3, 5, 4, torch.float32, device, "random", "bool", seed=4)
    with torch.inference_mode():
        cached = keep.clone()
    h = history.clone().requires_grad_()
    got = torch.autograd.grad(kernels.sparse_target_attention(h, query, cached, backend=backend), h, grad_z)
    want = torch.autograd.grad(kernels.sparse_target_attention(h, query, keep, backend=backend), h, grad_z)
    assert torch.equal(got[0], want[0])


def test_gathered_equals_the_plain_form(device):
    """Through an identity index the gathered op is the plain op on the same rows."""
    history, query, mask, grad_z = make_inputs(3, 11, 24, torch.float32, device, "random", "bool", seed=12)
    index = torch.arange(3 * 11, device=device).view(3, 11)
    plain = run_triton(history, query, mask, grad_z)
    gathered = run_gathered(history.reshape(33, 24), index, query, mask, grad_z)
    torch.testing.assert_close(gathered[0], plain[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gathered[1].view(3, 11, 24), plain[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gathered[2], plain[2], rtol=1e-6, atol=1e-6)


def test_gathered_non_contiguous_inputs(device):
    """Representations with wider rows (a slice of a table: row stride > D), transposed reps,
    index, query and float mask: the same as contiguous ones."""
    reps, index, query, keep, grad_z = make_gathered(4, 13, 24, 7, torch.float32, device, "random", seed=15)
    mask = keep.float() / 0.9
    want = gathered_oracle(reps, index, query, mask, grad_z)
    table = torch.randn(7, 24 + 5, device=device)
    table[:, :24] = reps
    flip = lambda t: t.t().contiguous().t()
    for name, r in {"row-sliced": table[:, :24], "transposed": flip(reps)}.items():
        args = (r, flip(index), flip(query), flip(mask))
        assert not any(a.is_contiguous() for a in args), name
        for what, g, w in zip(("z", "grad_reps", "grad_query"), run_gathered(*args, grad_z), want):
            assert_close(f"{name} {what}", g, w, torch.float32)


@pytest.mark.parametrize("form", ["plain", "gathered"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_mask_weight_of_either_sign_scales_the_score_inside_the_relu(device, form, backend):
    """The reference's relu(mask * score): a negative weight flips which scores pass, so a kernel
    that took only positive weights as live (or applied the weight after the ReLU) differs."""
    reps, index, query, keep, grad_z = make_gathered(4, 19, 16, 6, torch.float32, device, "random", seed=16)
    size = torch.rand(keep.shape, generator=torch.Generator().manual_seed(1)).to(device) + 0.5
    weights = torch.where(keep, size, -size)
    if form == "gathered":
        got = run_gathered(reps, index, query, weights, grad_z, backend)
        want = gathered_oracle(reps, index, query, weights, grad_z)
    else:
        history = reps[index]
        h, q = history.clone().requires_grad_(), query.clone().requires_grad_()
        z = kernels.sparse_target_attention(h, q, weights, backend=backend)
        got = (z, *torch.autograd.grad(z, (h, q), grad_z))
        want = oracle(history, query, weights, grad_z)
    assert want[0].abs().max() > 0
    for what, g, w in zip(("z", "grad_x", "grad_query"), got, want):
        assert_close(f"{form} {backend} {what}", g, w, torch.float32)


def test_gathered_padding_never_reads_its_index(device):
    """Masked positions may point anywhere in range: rows reached only through them get no gradient
    and do not change the output, even when they hold non-finite values."""
    reps, index, query, mask, grad_z = make_gathered(4, 10, 8, 6, torch.float32, device, "random", seed=13)
    mask[:, :] = True
    mask[:, :3] = False
    index[:, :3] = 5  # only padding points at row 5
    index[:, 3:] = index[:, 3:] % 5
    poisoned = reps.clone()
    poisoned[5] = float("nan")
    z, grad_reps, grad_q = run_gathered(poisoned, index, query, mask, grad_z)
    want = run_gathered(reps, index, query, mask, grad_z)
    assert torch.equal(z, want[0]) and torch.equal(grad_q, want[2])
    assert torch.equal(grad_reps[5], torch.zeros_like(grad_reps[5]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gathered_index_outside_reps_is_refused_by_both_backends(backend):
    """At a masked position too: the Triton kernel would never read it, but the torch path gathers
    it (an IndexError there), so both refuse it alike. The check runs on CPU tensors only (on a GPU
    it would cost a device sync per call), so this test uses them in a CUDA run too: the check comes
    before any backend runs, so no interpreter is needed."""
    cpu = torch.device("cpu")
    reps, index, query, mask, grad_z = make_gathered(3, 7, 8, 5, torch.float32, cpu, "left_padded", seed=2)
    assert (~mask).any() and mask.any()
    for bad, where in ((-1, "masked"), (5, "masked"), (5, "unmasked")):
        wrong = index.clone()
        wrong[mask if where == "unmasked" else ~mask] = bad
        with pytest.raises(ValueError, match=f"outside reps' 5 rows \\(at {where} positions"):
            run_gathered(reps, wrong, query, mask, grad_z, backend=backend)


def small_gathered_inputs(device):
    """reps (6, 16) and query requiring grad, index (3, 5), an all-live mask."""
    reps = torch.randn(6, 16, device=device, requires_grad=True)
    index = torch.randint(0, 6, (3, 5), device=device)
    query = torch.randn(3, 16, device=device, requires_grad=True)
    return reps, index, query, torch.ones(3, 5, dtype=torch.bool, device=device)


def test_gathered_triton_backward_follows_deterministic_algorithms(device, deterministic_algorithms):
    """Its gradient into reps is summed by atomic adds: on a GPU, in no fixed order, so under
    torch.use_deterministic_algorithms(True) it raises as torch's own such ops do. The
    interpreter runs the programs one after another (a fixed order): there it runs."""
    reps, index, query, mask = small_gathered_inputs(device)
    z = kernels.gathered_sparse_target_attention(reps, index, query, mask, backend="triton")
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="not deterministic"):
            z.sum().backward()
    else:
        z.sum().backward()
        assert reps.grad is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gathered_saves_no_history(device, backend):
    """Both backends keep the inputs for backward, never the (B, L, D) history: the torch one gathers
    it again in backward (and keeps the (B, L) scores besides)."""
    reps, index, query, mask, _ = make_gathered(3, 12, 16, 5, torch.float32, device, seed=14)
    reps.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.gathered_sparse_target_attention(reps, index, query, mask, backend=backend)
    scores = [mask.numel()] if backend == "torch" else []
    assert sorted(t.numel() for t in saved) == sorted([reps.numel(), index.numel(), query.numel(), mask.numel(),
                                                       *scores])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_torch_backend_backward_matches_autograd_of_the_reference(device, dtype, mask_kind):
    """The torch backend's hand-written backward against autograd through the reference in float64,
    a float mask's gradient included; without grad it is the reference itself."""
    reps, index, query, keep, grad_z = make_gathered(5, 23, 40, 9, dtype, device, "random", seed=16)
    mask = keep if mask_kind == "bool" else (keep * torch.rand(keep.shape, device=device) * 2).to(dtype)

    def run(op, wide, absolute=False):
        inputs = [t.abs() if absolute and t.is_floating_point() else t for t in (reps, query, mask, grad_z)]
        leaves = [(t.double() if wide and t.is_floating_point() else t).detach().clone()
                  .requires_grad_(t.is_floating_point()) for t in inputs[:3]]
        z = op(leaves[0], index, leaves[1], leaves[2])
        wanted = [t for t in leaves if t.requires_grad]
        return (z, *torch.autograd.grad(z, wanted, inputs[3].double() if wide else inputs[3]))

    got = run(lambda *a: kernels.gathered_sparse_target_attention(*a, backend="torch"), wide=False)
    want = run(reference.gathered_sparse_target_attention, wide=True)
    scale = run(reference.gathered_sparse_target_attention, wide=True, absolute=True)
    assert len(got) == len(want) == (4 if mask_kind == "float" else 3)
    for name, g, w, s in zip(("z", "grad_reps", "grad_query", "grad_mask"), got, want, scale):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert_close(name, g, w, dtype, s)
    with torch.no_grad():
        assert torch.equal(kernels.gathered_sparse_target_attention(reps, index, query, mask, backend="torch"),
                           reference.gathered_sparse_target_attention(reps, index, query, mask))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gathered_bad_arguments_name_the_argument(device, backend):
    reps, index, query, mask, _ = make_gathered(2, 5, 4, 3, torch.float32, device, seed=15)
    for args, name in (((reps[0], index, query, mask), "reps"), ((reps, index.float(), query, mask), "index"),
                       ((reps, index[:, :2], query, mask), "mask"), ((reps, index, query[:, :2], mask), "query")):
        with pytest.raises(ValueError, match=name):
            kernels.gathered_sparse_target_attention(*args, backend=backend)
    if device.type == "cpu":
        bad = index.clone()
        for row in (3, -1):  # one past the last row; one before the first
            bad[mask] = row
            with pytest.raises(ValueError, match="index"):
                kernels.gathered_sparse_target_attention(reps, bad, query, mask, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gathered", [False, True], ids=["plain", "gathered"])
def test_paper_shape_against_float64(device, dtype, gathered):
    """L=64, D=384 with every position live: B=8192 on a GPU, a slice of it under the interpreter."""
    batch = 8192 if device.type == "cuda" else 16
    if gathered:
        check_gathered(*make_gathered(batch, 64, 384, batch * 16, dtype, device, "all_one", seed=18))
    else:
        check_against_oracle(*make_inputs(batch, 64, 384, dtype, device, "all_one", "bool", seed=18))


def test_a_forced_launch_configuration_gives_the_ops_result(device):
    """forced_config (bench/tune_asta.py times candidate configurations with it): within its block
    the kernels launch with its BLOCK_L (here 2, ragged over L=7) and give the op's result, forward
    and backward, plain and gathered; after it, _config's own again. It refuses what no kernel
    can launch, and does not nest."""
    sta = importlib.import_module("kernels.sparse_target_attention")
    history, query, mask, grad_z = make_inputs(3, 7, 20, torch.float32, device, "random", "bool", seed=2)
    reps, index = history[0, :5].clone(), torch.randint(0, 5, (3, 7), device=device)
    own = sta._config(7, 20)["BLOCK_L"]
    assert sta._config(7, 20)["VEC"] == 4 and sta._config(7, 2)["VEC"] == 2  # capped at the row's BLOCK_D
    # VEC=0: Triton's own layout; maxnreg (a GPU launch option) stays out of _config's constexprs.
    with sta.forced_config(BLOCK_L=2, num_warps=2, num_stages=2, VEC=0, maxnreg=72):
        assert sta._config(7, 20)["BLOCK_L"] == 2 != own and sta._config(7, 20)["VEC"] == 0
        assert "maxnreg" not in sta._config(7, 20)
        got = run_triton(history, query, mask, grad_z)
        got_gathered = run_gathered(reps, index, query, mask, grad_z)
        with pytest.raises(RuntimeError, match="already in force"):
            with sta.forced_config(BLOCK_L=4):
                pass
    assert sta._config(7, 20)["BLOCK_L"] == own
    for what, g, w in zip(("z", "grad_history", "grad_query"), got, oracle(history, query, mask, grad_z)):
        assert_close(what, g, w, torch.float32)
    for what, g, w in zip(("z", "grad_reps", "grad_query"), got_gathered,
                          gathered_oracle(reps, index, query, mask, grad_z)):
        assert_close(what, g, w, torch.float32)
    for bad, match in ((dict(BLOCK_L=3), "power of two"), (dict(num_warps=0), "positive"), (dict(BLOCK_L=True), "integer"),
                       (dict(SKIP_EMPTY_TILES=0), "True or False; got 0"), (dict(VEC=3), "VEC must be 0 .* got 3"),
                       (dict(VEC=-4), "VEC must be 0"), (dict(VEC=4.0), "VEC must be 0"),
                       (dict(maxnreg=0), "maxnreg must be a positive integer; got 0"),
                       (dict(BLOCK_D=64), "takes BLOCK_L, num_warps, num_stages, SKIP_EMPTY_TILES, VEC, maxnreg; "
                                          "got BLOCK_D")):
        with pytest.raises(ValueError, match=match):
            with sta.forced_config(**bad):
                pass
    assert not sta._FORCED

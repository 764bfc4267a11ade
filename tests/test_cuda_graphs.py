"""The graph-safe model behind `train.cuda_graphs` (qin.model.make_graph_safe): each replacement
computes what it replaces, the graph-safe model computes what the default does, and its compiled
training step holds nothing a CUDA graph cannot (no size known only at run time, none of the ops
that wait for the device). A compiled step runs as CUDA graphs for real with QIN_TEST_CUDA=1
(on the CPU, inductor runs the same graphs without them)."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from kernels import reference, tolerances
from qin.model import compile_model, make_graph_safe, masked_mean_embedding, static_unique
from qin.train import loss_fn
from test_compile import step, tiny_batch, tiny_model


@given(positions=st.integers(1, 70), num_ids=st.integers(1, 90), seed=st.integers(0, 2**16))
def test_static_unique_is_torch_unique_in_a_fixed_size(positions, num_ids, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_ids, (positions,), generator=g)
    ids[0], ids[-1] = 0, num_ids - 1  # the padding id and the last id of the catalogue
    slots, inverse = static_unique(ids, num_ids)
    unique, want_inverse = torch.unique(ids, return_inverse=True)
    assert slots.shape == (min(positions, num_ids),)  # fixed by the shapes, whatever the ids
    assert torch.equal(slots[: len(unique)], unique)  # the distinct ids first, ascending
    assert torch.equal(inverse, want_inverse)
    assert torch.equal(slots[inverse], ids)
    assert bool(((slots >= 0) & (slots < num_ids)).all())  # the other slots name real items too


def test_masked_mean_embedding_is_embedding_bag_mean_with_padding():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 9, (40, 5), generator=g)
    values[:4] = 0  # all padding: zeros
    values[4:8, :3] = 0  # partly padding
    weight = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(40, 6, generator=g, dtype=torch.float64)
    got = masked_mean_embedding(values, weight)
    want = F.embedding_bag(values, weight, mode="mean", padding_idx=0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not got[:4].any()
    (got_grad,), (want_grad,) = (torch.autograd.grad(out, weight, grad_out) for out in (got, want))
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reps_gradient_by_scatter_is_the_sparse_product(monkeypatch, dtype):
    """The sum a CUDA graph runs (atomic adds, a block of positions at a time) equals the eager
    sparse product, in fp32 for 16-bit inputs, with one row read many times."""
    monkeypatch.setattr(reference, "SCATTER_ELEMENTS", 3 * 8 * 4)  # blocks of 4 positions
    g = torch.Generator().manual_seed(1)
    batch, seq_len, dim, rows = 8, 11, 3, 5
    index = torch.randint(0, rows, (batch, seq_len), generator=g)
    index[:, :6] = 2  # row 2 read 48+ times
    weights, grad_s = (torch.randn(batch, seq_len, generator=g).to(dtype) for _ in range(2))
    grad_z, query = (torch.randn(batch, dim, generator=g).to(dtype) for _ in range(2))
    by_scatter = reference._reps_gradient_by_scatter(index, weights, grad_s, grad_z, query, rows)
    by_product = reference._reps_gradient_by_sparse_product(index, weights, grad_s, grad_z, query, rows)
    assert by_scatter.dtype == by_product.dtype == torch.float32
    exact = torch.zeros(rows, dim, dtype=torch.float64).index_add_(
        0, index.reshape(-1), (weights.double()[..., None] * grad_z.double()[:, None]
                               + grad_s.double()[..., None] * query.double()[:, None]).reshape(-1, dim))
    for got in (by_scatter, by_product):
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


# How far the graph-safe model's gradients may be from the default's, normwise per tensor (the
# largest difference over the largest gradient). Both compute the same function (float64: equal to
# rounding). In fp32 they round differently: the item encoder multiplies min(positions, catalogue)
# rows, not the distinct ones, and a BLAS may order a product's sums by its row count. At 2 rows,
# where BatchNorm nearly cancels every gradient, that moves some by 2.4e-5 (seen on an AMX Xeon).
# One bf16 rounding of the tag mean moves them by 1.2e-3 or more, fp32 or autocast.
GRAPH_SAFE_TOLERANCE = {"fp64": tolerances.MODEL[torch.float64].rtol, "fp32": 1e-4, "bf16": 1e-4}


@pytest.mark.parametrize("precision", ["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_safe_model_computes_what_the_default_does(backend, precision):
    """Loss and every gradient, at a batch with more positions than items (the catalogue marked)
    and one with fewer (the positions sorted). In float64 the two agree to rounding; in fp32 and
    under autocast bf16 to fp32 rounding: nothing of the graph-safe model is rounded to 16 bits
    where the default's is not."""
    def step_in_precision(model, batch):
        loss = loss_fn(model, batch, 2e-4, precision="fp32" if precision == "fp64" else precision)
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    tol = tolerances.Tolerance(rtol=GRAPH_SAFE_TOLERANCE[precision], floor=0.0)
    for rows in (24, 2):
        model = tiny_model(dropout=0.0, asta_kernel=backend, qnn_kernel=backend)
        if precision == "fp64":
            model.double()
        batch = tiny_batch(rows=rows)
        want_loss, want_grads = step_in_precision(model, batch)
        make_graph_safe(model)
        got_loss, got_grads = step_in_precision(model, batch)
        assert got_loss.dtype == want_loss.dtype == (torch.float64 if precision == "fp64" else torch.float32)
        torch.testing.assert_close(got_loss, want_loss, rtol=min(tol.rtol, 1e-6), atol=0.0)
        for (name, _), got, want in zip(model.named_parameters(), got_grads, want_grads):
            normwise = want.abs().max().expand_as(want)
            error = tolerances.relative_error(got, want, normwise, tol)
            assert tolerances.passes(error, tol), (name, rows, error)


# aten ops whose CUDA kernels wait for the device (to size their output, or to read a number),
# which a CUDA graph cannot hold: torch.unique, embedding_bag's backward (issue pytorch#93807),
# nonzero and boolean indexing, .item().
WAITING_OPS = ("aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten._embedding_bag_backward",
               "aten._embedding_bag_dense_backward", "aten.nonzero", "aten.masked_select",
               "aten._local_scalar_dense", "aten.repeat_interleave.Tensor")


def traced_training_step(model) -> tuple[set, set]:
    """(the aten and qin ops, the sizes known only at run time) of the forward and backward graphs
    that torch.compile(fullgraph=True) traces for one training step of the model."""
    ops, unbacked = set(), set()

    def record(graph_module, _inputs):
        for node in graph_module.graph.nodes:
            if node.op == "call_function":
                ops.add(str(node.target))
            if isinstance(node.meta.get("val"), torch.Tensor):
                unbacked.update(free_unbacked_symbols(node.meta["val"]))
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    step(compiled, model, tiny_batch())
    torch._dynamo.reset()
    return ops, unbacked


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_safe_training_step_holds_nothing_a_cuda_graph_cannot(backend):
    model = tiny_model(dropout=0.1, asta_kernel=backend, qnn_kernel=backend)
    ops, unbacked = traced_training_step(model)
    # The check sees what the default model holds: torch.unique, embedding_bag.
    assert unbacked and {"aten._unique2.default", "aten._embedding_bag_backward.default"} <= ops
    make_graph_safe(model)
    ops, unbacked = traced_training_step(model)
    assert not unbacked
    assert not [op for op in ops if op.startswith(WAITING_OPS)], ops
    assert any(op.startswith("qin.") for op in ops)  # our registered ops are in the graph, opaque to this check


def test_cuda_graphs_setting_is_refused_off_cuda(tmp_path, capsys):
    from qin.cli import main
    from qin.synth import make_dataset

    data = make_dataset(tmp_path / "ds", rows=300, items=40, seed=3, valid_rows=100, test_rows=20)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "train.device=cpu", "train.cuda_graphs=true"]
    assert main(args) == 2
    assert "train.cuda_graphs=true needs one process on a CUDA device; this run is on cpu" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# On the CPU inductor compiles the same graphs and runs them without CUDA graphs.
GRAPH_BACKENDS = ["torch", "triton"] if os.environ.get("QIN_TEST_CUDA") else ["torch"]


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_compiled_training_step_runs_as_cuda_graphs(backend, device):
    """Steps of compile_model(cuda_graphs=True) give the eager graph-safe model's loss and
    gradients; on a GPU they replay CUDA graphs, none skipped."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(dropout=0.0, asta_kernel=backend, qnn_kernel=backend).to(device)
    make_graph_safe(model)
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    want_loss, want_grads = step(model, model, batch)
    compiled = compile_model(model, cuda_graphs=True)
    for _ in range(3):  # warm-up, recording, replay
        torch.compiler.cudagraph_mark_step_begin()
        loss, grads = step(compiled, model, batch)
        grads = [g.clone() for g in grads]  # a graph's outputs are overwritten by its next replay
    if device.type == "cuda":
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for (name, _), got, want in zip(model.named_parameters(), grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item() + 1e-12, msg=name)
    torch._dynamo.reset()

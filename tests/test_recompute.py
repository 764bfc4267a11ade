"""qin.recompute: backward computes ASTA's item representations again instead of autograd keeping
them, with the same gradients, and hooks around it still see every other saved tensor."""
import pytest
import torch

import qin.recompute
from qin.recompute import recomputed_in_backward
from qin.train import loss_fn
from test_precision import random_batch, small_qin


class _KeepsA(torch.autograd.Function):
    """(a * b).sum(), keeping both inputs."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return (a * b).sum()

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad * b, grad * a


def test_the_tensor_is_not_kept_backward_gets_it_again_and_the_rest_goes_to_the_outer_hooks():
    a, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    seen, calls = [], []

    def again():
        calls.append(1)
        return a.detach().clone()

    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or ("outer", t), lambda p: p[1]):
        with recomputed_in_backward(a, again):
            loss = _KeepsA.apply(a, b)
    assert len(seen) == 1 and seen[0] is b and calls == []
    loss.backward()
    assert calls == [1]
    torch.testing.assert_close(a.grad, b.detach(), rtol=0, atol=0)
    torch.testing.assert_close(b.grad, a.detach(), rtol=0, atol=0)


def test_a_recomputed_tensor_of_another_shape_or_dtype_is_an_error():
    a, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    with recomputed_in_backward(a, lambda: torch.zeros(5, dtype=torch.float64)):
        loss = _KeepsA.apply(a, b)
    with pytest.raises(RuntimeError, match="recomputed tensor has shape"):
        loss.backward()


def test_without_recompute_or_gradients_the_block_changes_nothing():
    a, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        with recomputed_in_backward(a, None):
            _KeepsA.apply(a, b)
    assert len(kept) == 2
    with torch.no_grad(), recomputed_in_backward(a, lambda: 1 / 0):
        _KeepsA.apply(a, b)


def _grads_and_saved(model, batch, precision):
    """The model's gradients for one loss, and the bytes autograd kept for them."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *batch.values()]}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in resident:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, batch, 2e-4, precision=precision)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("asta_precision", ["fp32", "autocast"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qin_gradients_are_the_same_bits_and_the_representations_are_not_kept(backend, asta_precision, precision,
                                                                             monkeypatch):
    model = small_qin(asta_kernel=backend, qnn_kernel=backend, asta_precision=asta_precision, dropout=0.1)
    batch = random_batch(batch=24, length=9)
    recomputed, saved = _grads_and_saved(model, batch, precision)
    monkeypatch.setattr(qin.recompute, "_top_hooks", None)  # as on a torch without it: nothing recomputed
    kept, saved_kept = _grads_and_saved(model, batch, precision)
    assert recomputed.keys() == kept.keys()
    for name in kept:
        torch.testing.assert_close(recomputed[name], kept[name], rtol=0, atol=0, msg=name)
    # What the op no longer keeps: the distinct items' representations, in the dtype it reads them.
    unique = torch.unique(torch.cat([batch["item_id"], batch["item_seq"].reshape(-1)])).numel()
    read_in = torch.bfloat16 if precision == "bf16" and asta_precision == "autocast" else torch.float32
    assert saved_kept - saved == unique * model.cfg.item_dim * read_in.itemsize


def test_backward_encodes_again_with_the_weights_forward_used():
    """Under torch.func.functional_call the weights put in for forward are gone when backward runs:
    the recomputed representations must still come from them."""
    model = small_qin(asta_kernel="torch", qnn_kernel="torch", dropout=0.0)
    batch = random_batch(batch=24, length=9)
    params = {name: (2 * p).detach().requires_grad_() for name, p in model.named_parameters()}

    def functional_grads():
        for p in params.values():
            p.grad = None
        logits = torch.func.functional_call(model, {**params, **dict(model.named_buffers())}, (batch,))
        torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].float()).backward()
        return {name: p.grad.clone() for name, p in params.items() if p.grad is not None}

    recomputed = functional_grads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qin.recompute, "_top_hooks", None)  # nothing recomputed: the representations kept
        kept = functional_grads()
    assert recomputed.keys() == kept.keys()
    for name in kept:
        torch.testing.assert_close(recomputed[name], kept[name], rtol=0, atol=0, msg=name)


def test_an_item_weight_changed_in_place_before_backward_is_an_error():
    model = small_qin(asta_kernel="torch", qnn_kernel="torch", dropout=0.0)
    batch = random_batch(batch=24, length=9)
    loss = loss_fn(model, batch, 0.0, precision="fp32")  # no L2 penalty: autograd then keeps no weight it checks
    with torch.no_grad():
        model.items.item_embedding.weight.mul_(2)
    with pytest.raises(RuntimeError, match="item_embedding.weight was modified in place"):
        loss.backward()


@pytest.mark.parametrize("change", ["noise hook on the encoder", "pre-hook on a submodule", "spectral norm",
                                    "global hook"])
def test_an_encoder_that_runs_more_than_its_weights_keeps_its_representations(change, monkeypatch):
    """A forward hook or a parametrization would run again in backward: with fresh random numbers
    (embedding noise), or a second step of spectral norm's power iteration. So such an encoder's
    representations are kept, and its gradients are those autograd gives without recompute."""
    model = small_qin(asta_kernel="torch", qnn_kernel="torch", dropout=0.0)
    calls = []

    def noise(module, args, out):
        calls.append(1)
        return out + 0.05 * torch.randn_like(out)

    if change == "noise hook on the encoder":
        model.items.register_forward_hook(noise)
    elif change == "pre-hook on a submodule":
        model.items.item_embedding.register_forward_pre_hook(lambda module, args: calls.append(1))
    elif change == "spectral norm":
        torch.nn.utils.parametrizations.spectral_norm(model.items.mm_projection)
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = random_batch(batch=24, length=9)
    try:
        recomputed, _ = _grads_and_saved(model, batch, "fp32")  # L2 > 0: reads the parametrized weight too
        forward_calls = len(calls)
        model.load_state_dict(state)  # spectral norm's vectors as they were
        monkeypatch.setattr(qin.recompute, "_top_hooks", None)
        kept, _ = _grads_and_saved(model, batch, "fp32")
    finally:
        if change == "global hook":
            handle.remove()
    assert recomputed.keys() == kept.keys()
    for name in kept:
        torch.testing.assert_close(recomputed[name], kept[name], rtol=0, atol=0, msg=name)
    if change != "spectral norm":
        assert forward_calls and len(calls) == 2 * forward_calls  # none in backward

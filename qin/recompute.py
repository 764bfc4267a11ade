"""Backward computes a tensor again instead of autograd keeping it.

ASTA's attention op keeps the (U, D) item representations it reads until backward: in fp32 even
in a bf16 run (the op reads them unrounded), 21% of the bytes a default bf16 training step keeps
(bench_train's saved bytes). Computing them again from the batch's distinct ids costs one small
product, so the model keeps the ids and a way to run the item encoder again instead.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from kernels.utils import transforms_active

# Chaining to the hooks already in force needs this (torch 2.2 and later); without it nothing is
# recomputed, so that hooks of the caller (torch.autograd.graph.save_on_cpu, a saved-bytes count)
# still see every saved tensor.
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _view_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


@contextlib.contextmanager
def recomputed_in_backward(tensor: torch.Tensor, recompute: Callable[[], torch.Tensor] | None):
    """Within the block, where autograd would keep `tensor` for backward it keeps `recompute` and
    calls it when backward needs the tensor; `recompute()` must return the same values.

    Every other saved tensor goes to the saved-tensor hooks in force around the block, if any.
    A plain block where there is nothing to differentiate, under torch.compile (whose partitioner
    decides itself what to keep), under torch.func transforms (whose wrapped tensors have no
    storage to recognise) or without `recompute`.
    Autograd's check that a saved tensor was not changed in place does not see `tensor` (it is not
    saved): the caller must not change it before backward (QIN's representations never leave
    its forward).
    """
    if (recompute is None or _top_hooks is None or not torch.is_grad_enabled()
            or torch.compiler.is_compiling() or transforms_active()):
        yield
        return
    outer = _top_hooks(False)
    key, shape, dtype = _view_key(tensor), tensor.shape, tensor.dtype

    def pack(saved: torch.Tensor):
        if saved.layout is torch.strided and _view_key(saved) == key:
            return True, None
        return False, outer[0](saved) if outer else saved

    def unpack(packed):
        is_recomputed, kept = packed
        if not is_recomputed:
            return outer[1](kept) if outer else kept
        again = recompute()
        if again.shape != shape or again.dtype != dtype:
            raise RuntimeError(f"recomputed tensor has shape {tuple(again.shape)} and dtype {again.dtype}, "
                               f"forward's had {tuple(shape)} and {dtype}")
        return again

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield

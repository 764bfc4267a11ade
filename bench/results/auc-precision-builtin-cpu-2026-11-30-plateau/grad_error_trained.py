"""Normwise relative error of QIN's loss gradient against float64, by part, at trained weights.

    python bench/results/auc-precision-builtin-cpu-2026-11-30-plateau/grad_error_trained.py RUN/best.pt [variants...]

(the README's figures: RUN from `qin train --out RUN train.seed=1 train.epochs=12`, fp32; its best
checkpoint is epoch 5's)

Variants: fp32, bf16 (the whole forward under autocast, as train.precision=bf16 runs it), and
bf16-X: bf16 with part X kept in fp32 (asta = the ASTA module, core = only the attention op of
ASTA, quad = the QNN's quadratic layers). Batches: the first 512-row batches of the run's train
split; dropout off, so every variant computes the same function.
"""
import dataclasses
import sys

import torch

import qin.model as M
from qin.cli import _model_from_checkpoint
from qin.data import assemble_batch
from qin.models import build_model
from qin.train import loss_fn

GROUPS = {"asta": ("asta.",), "qnn quadratic": ("qnn.quadratic",), "qnn norm/act": ("qnn.norms", "qnn.activations"),
          "items": ("items.",), "output": ("output.",), "context": ("likes", "views")}


def in_fp32(fn):
    def wrapped(*args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return wrapped


def gradients(state, cfg, dataset, variant, batch):
    model = build_model(dataclasses.replace(cfg.model, dropout=0.0))
    model.load_item_info(dataset.item_info.columns)
    model.load_state_dict(state)
    model.train()
    precision, _, part = variant.partition("-")
    if precision == "fp64":
        model.double()
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        precision = "fp32"
    saved = M.kernels.gathered_sparse_target_attention
    if part == "asta":
        model.asta.forward = in_fp32(model.asta.forward)
    elif part == "core":
        M.kernels.gathered_sparse_target_attention = in_fp32(saved)
    elif part == "quad":
        for layer in model.qnn.quadratic:
            layer.forward = in_fp32(layer.forward)
    try:
        loss_fn(model, batch, cfg.train.embedding_l2, precision=precision).backward()
    finally:
        M.kernels.gathered_sparse_target_attention = saved
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def main():
    path, *variants = sys.argv[1:]
    model, dataset, cfg, _, _ = _model_from_checkpoint(path, None, "cpu")
    state = model.state_dict()
    train = dataset.splits["train"] if hasattr(dataset, "splits") else dataset.train
    print("variant".ljust(12) + "".join(g.rjust(15) for g in GROUPS))
    for start in (0, 512):
        batch = assemble_batch(train, torch.arange(start, start + 512).numpy())
        exact = gradients(state, cfg, dataset, "fp64", batch)
        for variant in variants or ["fp32", "bf16", "bf16-asta", "bf16-core", "bf16-quad"]:
            got = gradients(state, cfg, dataset, variant, batch)
            cells = []
            for prefixes in GROUPS.values():
                names = [n for n in exact if n.startswith(prefixes)]
                err = sum(((got[n] - exact[n]).norm() ** 2).item() for n in names) ** 0.5
                cells.append(err / sum((exact[n].norm() ** 2).item() for n in names) ** 0.5)
            print(variant.ljust(12) + "".join(f"{c:15.2e}" for c in cells))


if __name__ == "__main__":
    main()

"""Normwise relative error of QIN's loss gradient against float64, by part of the model, at init.

    python bench/results/auc-precision-builtin-cpu-2026-11-30/grad_error_by_part.py fp32 bf16 fp16 fp32+asta

A variant is a precision (fp32, bf16, fp16: the whole forward under autocast, as train.precision
runs it), optionally followed by +part for parts run under bf16 autocast inside an fp32 model
(asta, quad = the QNN's quadratic layers, items, output). bench_train's synthetic batch of 512,
dropout off, so every variant sees the same function.
"""
import sys

import torch

from bench.bench_train import build, synthetic_batch
from qin.config import QINConfig
from qin.train import loss_fn

GROUPS = {"asta": ("asta.",), "qnn quadratic": ("qnn.quadratic",), "qnn norm/act": ("qnn.norms", "qnn.activations"),
          "items": ("items.",), "output": ("output.",), "context": ("likes", "views")}


def in_bf16(module):
    forward = module.forward

    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return tuple(o.float() if torch.is_tensor(o) and o.is_floating_point() else o for o in out) \
            if isinstance(out, tuple) else out.float()
    module.forward = wrapped


def gradients(variant, data):
    model = build(QINConfig(dropout=0.0), torch.device("cpu"))
    precision, *parts = variant.split("+")
    if precision == "fp64":
        model.double()
        data = {k: v.double() if v.is_floating_point() else v for k, v in data.items()}
        precision = "fp32"
    for part in parts:
        for module in (list(model.qnn.quadratic) if part == "quad" else [getattr(model, part)]):
            in_bf16(module)
    loss_fn(model, data, 2e-4, precision=precision).backward()
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def main():
    data = synthetic_batch(512, torch.device("cpu"))
    exact = gradients("fp64", data)
    print("variant".ljust(14) + "".join(g.rjust(15) for g in GROUPS))
    for variant in sys.argv[1:] or ["fp32", "bf16", "fp16"]:
        got = gradients(variant, data)
        cells = []
        for prefixes in GROUPS.values():
            names = [n for n in exact if n.startswith(prefixes)]
            err = sum(((got[n] - exact[n]).norm() ** 2).item() for n in names) ** 0.5
            cells.append(err / sum((exact[n].norm() ** 2).item() for n in names) ** 0.5)
        print(variant.ljust(14) + "".join(f"{c:15.2e}" for c in cells))


if __name__ == "__main__":
    main()

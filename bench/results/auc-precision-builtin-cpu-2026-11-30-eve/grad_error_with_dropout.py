"""Normwise error of QIN's loss gradient at init against the float64 model, dropout on, by part.

    python bench/results/auc-precision-builtin-cpu-2026-11-30-eve/grad_error_with_dropout.py

Each precision's model is built at the same weights, and torch.manual_seed(seed) before its
forward draws the same dropout masks in every dtype (the CPU masks depend on the seed, the shape
and p only), so the float64 model computes the same function. bench_train's synthetic batch of 512.
"""
import sys, torch
from bench.bench_train import build, synthetic_batch
from qin.config import QINConfig
from qin.train import loss_fn
GROUPS = {"asta": ("asta.",), "qnn quadratic": ("qnn.quadratic",), "qnn norm/act": ("qnn.norms", "qnn.activations"),
          "items": ("items.",), "output": ("output.",), "context": ("likes", "views")}
def grads(prec, data, seed):
    model = build(QINConfig(), torch.device("cpu"))
    if prec == "fp64":
        model.double(); data = {k: v.double() if v.is_floating_point() else v for k, v in data.items()}; prec = "fp32"
    torch.manual_seed(seed)
    loss = loss_fn(model, data, 2e-4, precision=prec)
    loss.backward()
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
data = synthetic_batch(512, torch.device("cpu"))
for seed in (0, 1):
    ref = grads("fp64", data, seed)
    for prec in ("fp32", "bf16"):
        g = grads(prec, data, seed)
        out = []
        for name, prefixes in GROUPS.items():
            keys = [k for k in ref if k.startswith(prefixes)]
            err = torch.cat([(g[k] - ref[k]).flatten() for k in keys]).norm() / torch.cat([ref[k].flatten() for k in keys]).norm()
            out.append(f"{name} {err:.2e}")
        tot = torch.cat([(g[k] - ref[k]).flatten() for k in ref]).norm() / torch.cat([ref[k].flatten() for k in ref]).norm()
        print(f"seed {seed} {prec}: all {tot:.2e} | " + ", ".join(out))

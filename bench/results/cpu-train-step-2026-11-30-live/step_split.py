"""How fast can bf16 make the default CPU training step? Splits the step's operator time into the
QNN's twelve GEMMs (forward, grad_x and grad_W of four (B, D) x (D, 4D) layers) and the rest,
in fp32 and under autocast bf16, and prints the ceiling of the bf16/fp32 step ratio that follows.

    PYTHONPATH=. python bench/results/cpu-train-step-2026-11-30-live/step_split.py [--batch 1024] [--steps 5]

Profiled self CPU times (torch.profiler, shapes recorded), averaged over `--steps` steps after three
warm-up steps; the step as the trainer runs it (bench.profile_step.training_step).
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.profile_step import training_step
from qin.config import QINConfig

GEMMS = ("aten::mm", "aten::addmm")


def split(precision: str, batch: int, steps: int, asta_precision: str) -> tuple[float, float]:
    """(ms a step in the QNN's GEMMs, ms a step in everything else), profiled self CPU time."""
    cfg = QINConfig(asta_precision=asta_precision)
    step = training_step(torch.device("cpu"), batch, precision, cfg)
    wide = cfg.qnn_rows * cfg.qnn_dim  # the QNN's hidden width: only its GEMMs have it
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    qnn = rest = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        is_qnn = event.key in GEMMS and any(wide in shape for shape in event.input_shapes if shape)
        if is_qnn:
            qnn += event.self_cpu_time_total
        else:
            rest += event.self_cpu_time_total
    return qnn / steps / 1e3, rest / steps / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    g32, r32 = split("fp32", args.batch, args.steps, "fp32")
    print(f"fp32: QNN GEMMs {g32:.0f} ms, rest {r32:.0f} ms, step {g32 + r32:.0f} ms")
    for asta_precision in ("fp32", "autocast"):
        g16, r16 = split("bf16", args.batch, args.steps, asta_precision)
        print(f"bf16 (model.asta_precision={asta_precision}): QNN GEMMs {g16:.0f} ms ({g32 / g16:.2f}x fp32's), "
              f"rest {r16:.0f} ms ({r32 / r16:.2f}x), step {g16 + r16:.0f} ms: {(g32 + r32) / (g16 + r16):.2f}x fp32")
        # The rest of the step runs as fast as in fp32 at best (the issue keeps it fp32: master
        # weights, Adam, BatchNorm, the residual stream, the embedding L2) -> with rest R in both,
        # (g32 + R) / (g16 + R) >= 2 needs R <= g32 - 2 g16.
        print(f"  ceiling with the rest at fp32's cost: {(g32 + r32) / (g16 + r32):.2f}x; "
              f"2x needs the rest at {max(g32 - 2 * g16, 0):.0f} ms or less in both precisions")


if __name__ == "__main__":
    main()

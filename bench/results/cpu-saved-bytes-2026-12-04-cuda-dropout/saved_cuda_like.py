"""Bytes kept for backward per sample by the default training step, fp32 and bf16, with the
CPU's dropout and with every dropout as CUDA runs it (aten.native_dropout, its 1-byte mask kept):
the CPU's estimate of the bf16/fp32 ratio a GPU would measure.

Run from the root of a checkout:
    PYTHONPATH=$PWD python bench/results/cpu-saved-bytes-2026-12-04-cuda-dropout/saved_cuda_like.py [--batch 1024]
"""
import argparse
import contextlib
import importlib.util
from pathlib import Path

import torch

from bench.bench_train import BF16, _forward_loss, build, saved_bytes, synthetic_batch
from qin.config import QINConfig

HERE = Path(__file__).resolve().parent
# The switch to CUDA's dropout lives beside the step-cost count, which checks that every dropout
# site then runs native_dropout.
spec = importlib.util.spec_from_file_location("step_cost", HERE.parent / "step-cost-2026-12-01" / "step_cost.py")
step_cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_cost)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device("cpu")
    data = synthetic_batch(args.batch, device)
    model = build(QINConfig(), device)
    resident = [*model.parameters(), *model.buffers(), *data.values()]
    print(f"default model, batch {args.batch}, bytes kept for backward per sample")
    print("| dropout | fp32 | bf16 | bf16/fp32 |\n|---|---|---|---|")
    for name, context in (("the CPU's (seeded, drawn again in backward)", contextlib.nullcontext),
                          ("as on CUDA (native_dropout, mask kept)", step_cost.cuda_dropout)):
        with context():
            fp32, bf16 = (saved_bytes(lambda: _forward_loss(model, data, amp), resident) / args.batch
                          for amp in (None, BF16))
        print(f"| {name} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.3f} |")


if __name__ == "__main__":
    main()

"""Training samples/s with 1 and with N processes (torchrun + DistributedDataParallel).

On the CPU, N = 2 gloo processes share the machine's cores: expect no gain; the line shows the
overhead of the gradient all-reduce and the synchronised BatchNorm. On a machine with several
GPUs, N is the GPU count and the line shows the scaling. Each run is a real `qin train` on a
generated dataset; samples/s is read from its metrics.jsonl (the epoch's training time only).

    python -m bench.bench_ddp [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import make_row, print_table
from qin.synth import make_dataset

REPO = Path(__file__).resolve().parents[1]


def train_samples_per_s(data: Path, out: Path, procs: int, device: torch.device, overrides: list[str]) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    command = [*(launcher if procs > 1 else [sys.executable]), "-m", "qin", "train", "--data", str(data),
               "--out", str(out), f"train.device={device.type}", *overrides]
    # TMPDIR: torchrun leaves a log folder per job in the temporary directory; here it goes into
    # the benchmark's own folder, deleted after it.
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TMPDIR": str(out.parent)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        # torchrun's own summary fills the tail; a rank's reason (an exception, "terminate called
        # ...") comes before it, so keep every line that looks like one as well.
        reasons = [line for line in result.stderr.splitlines()
                   if any(w in line for w in ("Error", "error:", "terminate", "what()", "Abort", "Exception"))]
        raise RuntimeError(f"{procs}-process training failed (exit {result.returncode}):\n"
                           + "\n".join(reasons[-30:]) + "\n...\n" + result.stderr[-2000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["samples_per_s"]


def run(device: torch.device, quick: bool = False) -> list[dict]:
    device = torch.device(device)
    counts = [1, torch.cuda.device_count()] if device.type == "cuda" else [1, 2]
    if counts[-1] < 2:
        print("one GPU only: the multi-GPU line needs several")
        counts = counts[:1]
    if device.type == "cuda":
        rows, batch, model = 200_000, 8192, []
    else:  # the paper's model is too slow for a quick CPU line; a narrow QIN shows the overhead
        rows, batch, model = (8_000, 1024, ["model.embed_dim=32", "model.attention_dim=64"])
    overrides = [f"train.batch_size={batch}", "train.epochs=1", *model] + (["train.max_steps_per_epoch=4"] if quick else [])
    results = []
    with tempfile.TemporaryDirectory() as folder:
        data = make_dataset(Path(folder) / "data", rows=rows, items=5_000, seed=0, valid_rows=2_000, test_rows=10)
        for procs in counts:
            label = f"{procs} process{'es' if procs > 1 else ''}"
            try:
                rate = train_samples_per_s(data, Path(folder) / f"run{procs}", procs, device, overrides)
            except RuntimeError as error:
                # A rank killed by a signal (a gloo teardown abort was seen about once in five full
                # test runs) gets one more try; the row says so, and a second failure is reported.
                if "Signal" not in str(error):
                    raise
                print(f"{label}: a rank was killed by a signal; trying once more. The first try:\n{error}")
                rate = train_samples_per_s(data, Path(folder) / f"run{procs}-again", procs, device, overrides)
                label += " (second try: a rank of the first was killed by a signal)"
            results.append(make_row("ddp", label, "train", "throughput", "samples/s", "batch", batch, rate,
                                    device, "fp32"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print_table(run(torch.device(args.device), args.quick), "DDP scaling")


if __name__ == "__main__":
    main()

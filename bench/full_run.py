"""`qin train` from start to end, eager against CUDA graphs (train.cuda_graphs=true), on one
generated dataset: what a training step's figure (bench_train) leaves out. The compile and
capture time, each epoch's samples/s with validation around it, the last partial batch, the peak
memory and the AUC both runs reach. On one H200 (bench/results/gpu-h200-2026-12-04-3f11c2d) the
step as CUDA graphs ran 2.57x the eager step at batch 8192 in bf16, but no whole run had used
them: this is the measurement that decides whether they should be the default on CUDA.

    python -m bench.full_run --device cuda [--rows 500000] [--epochs 3]

Each run is a `python -m qin train` process of its own (one compile cache, one CUDA context),
trained in bf16 at the paper's batch. Printed: one line per run and epoch, then a table. On the CPU
(the dry check of bench/gpu_run.sh) the eager run alone: CUDA graphs need a GPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import device_argument
from qin.cli import positive_int

COMPILE_LINE = "torch.compile: the first step took "  # qin/train.py's line


def train(data: Path, out: Path, device: str, graphs: bool, epochs: int, batch: int, precision: str) -> dict:
    """One `qin train` run; its wall seconds, the compile seconds it logged, its metrics.jsonl."""
    command = [sys.executable, "-m", "qin", "train", "--data", str(data), "--out", str(out),
               f"train.device={device}", f"train.epochs={epochs}", f"train.batch_size={batch}",
               f"train.precision={precision}", f"train.cuda_graphs={str(graphs).lower()}", "train.patience=100"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    print(proc.stdout[-3000:] + proc.stderr[-3000:], flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"qin train (cuda_graphs={graphs}) exited with {proc.returncode}")
    compile_s = compile_seconds(proc.stdout + proc.stderr)
    epochs_run = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_s": wall, "compile_s": compile_s, "epochs": epochs_run}


def compile_seconds(log: str) -> float | None:
    """The first step's seconds, compilation included, as qin.train logs them; None without compile."""
    for line in log.splitlines():
        if COMPILE_LINE in line:
            return float(line.split(COMPILE_LINE, 1)[1].split(" s", 1)[0])
    return None


def table(results: dict) -> str:
    lines = ["| run | wall s | first step s (compile) | epoch | samples/s | epoch s | valid AUC | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for e in r["epochs"]:
            sps = f"{e['samples_per_s']:,.0f}" if e.get("samples_per_s") else "-"
            peak = f"{e['peak_memory_mb']:,.0f}" if e.get("peak_memory_mb") is not None else "-"
            first = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
            lines.append(f"| {name} | {r['wall_s']:.1f} | {first} | {e['epoch']} | {sps} | "
                         f"{e['epoch_seconds']:.2f} | {e['valid_auc']:.4f} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_argument, default="cuda")
    parser.add_argument("--rows", type=positive_int, default=500_000)
    parser.add_argument("--items", type=positive_int, default=50_000)
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--batch", type=positive_int, default=8192)
    args = parser.parse_args(argv)
    runs = {"eager": False, "CUDA graphs": True} if args.device.type == "cuda" else {"eager": False}
    precision = "bf16" if args.device.type == "cuda" else "fp32"
    results = {}
    with tempfile.TemporaryDirectory(prefix="qin-full-run-") as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "qin", "make-data", str(data), "--rows", str(args.rows),
                        "--items", str(args.items)], check=True)
        for name, graphs in runs.items():
            try:
                results[name] = train(data, Path(tmp) / name.replace(" ", "-"), str(args.device), graphs, args.epochs,
                                      args.batch, precision)
            except RuntimeError as exc:  # the other run still says what it can
                print(f"{name}: {exc}", flush=True)
    print(f"\nqin train, {args.rows:,} generated rows, batch {args.batch}, {precision}, {args.epochs} epochs, "
          f"on {args.device.type}:\n\n{table(results)}", flush=True)
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())

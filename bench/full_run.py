"""`qin train` from start to end, eager against CUDA graphs (train.cuda_graphs=true), on one
generated dataset: what a training step's figure (bench_train) leaves out. The compile and
capture time, each epoch's samples/s with validation around it, the last partial batch, the peak
memory and the AUC both runs reach. On one H200 (bench/results/gpu-h200-2026-12-04-3f11c2d) the
step as CUDA graphs ran 2.57x the eager step at batch 8192 in bf16, but no whole run had used
them: this is the measurement that decides whether they should be the default on CUDA.

    python -m bench.full_run --device cuda [--rows 500000] [--epochs 3]

Each run is a `python -m qin train` process of its own (one CUDA context), trained in bf16 at the
paper's batch: eager, then CUDA graphs twice, the second finding what the first compiled in
torch.compile's disk cache (QIN_CACHE's inductor folder), as a user's second run does. Whether
graphs should be the default turns on the compile time against the run's length: on the H200
eager bf16 trains 3.6M rows (an epoch of MicroLens) in about 5 s. So the output ends with where
graphs pay back their first step. Printed: each run's log tail, the table after each run (a time
box keeps what finished; SIGTERM stops the run in progress), then the payback. On the CPU (the dry
check of bench/gpu_run.sh) the eager run alone: CUDA graphs need a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import device_argument, stop_on_sigterm
from qin.cli import positive_int

COMPILE_LINE = "torch.compile: the first step took "  # qin/train.py's line
MICROLENS_TRAIN_ROWS = 3_600_000  # SPEC.md: an epoch of the challenge's training data


GRAPHS, GRAPHS_WARM = "CUDA graphs", "CUDA graphs, compile cache warm"


def train(data: Path, out: Path, device: str, graphs: bool, epochs: int, batch: int, precision: str,
          env: dict | None = None) -> dict:
    """One `qin train` run (in the environment `env`, else this one's); its wall seconds, the compile
    seconds it logged, its metrics.jsonl."""
    command = [sys.executable, "-m", "qin", "train", "--data", str(data), "--out", str(out),
               f"train.device={device}", f"train.epochs={epochs}", f"train.batch_size={batch}",
               f"train.precision={precision}", f"train.cuda_graphs={str(graphs).lower()}", "train.patience=100"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
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


def steady_rate(run: dict) -> float | None:
    """A run's samples/s once started: its last epoch's (the first epoch's carries the compile)."""
    rates = [e["samples_per_s"] for e in run["epochs"] if e.get("samples_per_s")]
    return rates[-1] if rates else None


def payback(eager: dict, graphs: dict, rows: int) -> str | None:
    """Where a graphs run's first step (compile and capture) is paid back by its faster steps, against
    the eager run: a line, or None where a figure is missing."""
    fast, slow, first = steady_rate(graphs), steady_rate(eager), graphs.get("compile_s")
    if not fast or not slow or first is None:
        return None
    if fast <= slow:
        return (f"CUDA graphs ran no faster than eager once started ({fast:,.0f} against {slow:,.0f} samples/s): "
                f"their {first:.0f} s first step is never paid back")
    samples = first / (1 / slow - 1 / fast)
    return (f"CUDA graphs ({fast:,.0f} samples/s once started, {fast / slow:.2f}x eager's {slow:,.0f}) pay back "
            f"their {first:.0f} s first step after {samples:,.0f} samples: {samples / rows:.1f} epochs of this "
            f"data, {samples / MICROLENS_TRAIN_ROWS:.1f} of MicroLens' {MICROLENS_TRAIN_ROWS:,} training rows")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_argument, default="cuda")
    parser.add_argument("--rows", type=positive_int, default=500_000)
    parser.add_argument("--items", type=positive_int, default=50_000)
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--batch", type=positive_int, default=8192)
    args = parser.parse_args(argv)
    graphs = [GRAPHS, GRAPHS_WARM] if args.device.type == "cuda" else []
    runs = {"eager": False, **{name: True for name in graphs}}
    precision = "bf16" if args.device.type == "cuda" else "fp32"
    results = {}
    stop_on_sigterm()  # gpu_run.sh's time box: subprocess.run then kills the run in progress
    try:
        with tempfile.TemporaryDirectory(prefix="qin-full-run-") as tmp:
            data = Path(tmp) / "data"
            subprocess.run([sys.executable, "-m", "qin", "make-data", str(data), "--rows", str(args.rows),
                            "--items", str(args.items)], check=True)
            # A cache folder of their own, shared by the runs: the first graphs run compiles from nothing,
            # the second finds its work there (and all three use the decisions the eager run timed).
            env = {**os.environ, "QIN_CACHE": str(Path(tmp) / "cache")}
            env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # set from QIN_CACHE by the kernels' import
            for name, graphed in runs.items():
                try:
                    results[name] = train(data, Path(tmp) / name.replace(" ", "-").replace(",", ""), str(args.device),
                                          graphed, args.epochs, args.batch, precision, env)
                except RuntimeError as exc:  # the other runs still say what they can
                    print(f"{name}: {exc}", flush=True)
                print(f"\nqin train, {args.rows:,} generated rows, batch {args.batch}, {precision}, {args.epochs} "
                      f"epochs, on {args.device.type}:\n\n{table(results)}", flush=True)
    except KeyboardInterrupt:
        print("out of time: the runs after the last table were not finished", flush=True)
    for name in graphs:
        line = name in results and "eager" in results and payback(results["eager"], results[name], args.rows)
        if line:
            print(f"{name}: {line}", flush=True)
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())

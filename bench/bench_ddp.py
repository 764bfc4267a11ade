"""Training samples/s with 1 and with N processes (torchrun + DistributedDataParallel).

On the CPU, N = 2 gloo processes share the machine's cores: expect no gain; the line shows the
overhead of the gradient all-reduce and the synchronised BatchNorm. On a machine with several
GPUs, N is the GPU count and the line shows the scaling. Each run is a real `qin train` on a
generated dataset; samples/s is read from its metrics.jsonl (each epoch's training time only),
over the epochs after the first: the first holds the Triton compilation and backend="auto"'s
timing, which a longer run pays once. The row gives the median epoch with the 20th and 80th
percentiles, so a noisy machine shows as spread rather than as a speed-up. Both lines train the
same global batch: on CUDA the largest multiple of the GPU count up to 8192.

    python -m bench.bench_ddp [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from bench.common import device_argument, make_row, percentiles, print_table
from qin.errors import StoppedBySignal
from qin.synth import make_dataset

REPO = Path(__file__).resolve().parents[1]
WARMUP_EPOCHS = 1  # left out of the figure: compilation and backend="auto"'s timing
TIMEOUT_S = 1800


def train_samples_per_s(data: Path, out: Path, procs: int, device: torch.device, overrides: list[str]) -> list[float]:
    """samples/s of each epoch after the warm-up one, from a `qin train` in `procs` processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    command = [*(launcher if procs > 1 else [sys.executable]), "-m", "qin", "train", "--data", str(data),
               "--out", str(out), f"train.device={device}", *overrides]
    # TMPDIR: torchrun leaves a log folder per job in the temporary directory; here it goes into
    # the benchmark's own folder, deleted after it. QIN_CACHE: the backend="auto" decisions and
    # dataset caches of this benchmark alone, so neither line inherits the user's or the other's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TMPDIR": str(out.parent), "QIN_CACHE": str(out.parent / f"cache{procs}")}
    result = run_to_the_end(command, env, TIMEOUT_S)
    if result.returncode != 0:
        # torchrun's own summary fills the tail; a rank's reason (an exception, "terminate called
        # ...") comes before it, so keep every line that looks like one as well.
        reasons = [line for line in result.stderr.splitlines()
                   if any(w in line for w in ("Error", "error:", "terminate", "what()", "Abort", "Exception"))]
        raise RuntimeError(f"{procs}-process training failed (exit {result.returncode}):\n"
                           + "\n".join(reasons[-30:]) + "\n...\n" + result.stderr[-2000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records[WARMUP_EPOCHS:] if r["samples_per_s"] is not None]
    if not rates:
        raise RuntimeError(f"{procs}-process training measured no epoch after the warm-up in {out / 'metrics.jsonl'}")
    return rates


def run_to_the_end(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run, except that a timeout or an interrupt stops the job's workers too. torchrun
    starts its ranks in sessions of their own, so killing torchrun would orphan them (still
    training, on the GPUs, in a folder being deleted); SIGTERM has torchrun stop them first."""
    # A plain SIGTERM (`kill`) would end this process where it waits and leave torchrun running:
    # unless a handler is there already (bench.common.stop_on_sigterm), it becomes KeyboardInterrupt.
    sigterm_default = (threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if sigterm_default:
        signal.signal(signal.SIGTERM, _interrupt)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as exc:  # the timeout, Ctrl-C, or SIGTERM turned into KeyboardInterrupt
        proc.terminate()
        try:
            proc.communicate(timeout=60)  # torchrun gives its workers 30 s before it kills them
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()  # not communicate(): a rank torchrun left behind would hold its pipes open
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(f"{' '.join(command[:6])} ...: still running after {timeout:g} s; stopped") from None
        raise
    finally:
        if sigterm_default:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _interrupt(signum, frame):
    raise StoppedBySignal(f"received {signal.Signals(signum).name}: the DDP job was stopped", signum)


def global_batch(device: torch.device, procs: int) -> int:
    """The batch both lines train: 8192 rows on CUDA, cut to a multiple of the processes (each
    rank takes an equal share); 1024 on the CPU."""
    return 8192 // procs * procs if device.type == "cuda" else 1024


def run(device: torch.device, quick: bool = False) -> list[dict]:
    device = torch.device(device)
    counts = [1, torch.cuda.device_count()] if device.type == "cuda" else [1, 2]
    if counts[-1] < 2:
        print("one GPU only: the multi-GPU line needs several")
        counts = counts[:1]
    batch = global_batch(device, counts[-1])
    if device.type == "cuda":
        rows, model = 200_000, []
    else:  # the paper's model is too slow for a quick CPU line; a narrow QIN shows the overhead
        rows, model = 8_000, ["model.embed_dim=32", "model.attention_dim=64"]
    measured = 1 if quick else 3
    # fp32, as its rows say: train.precision=auto would train in bf16 on a GPU that has it.
    overrides = [f"train.batch_size={batch}", f"train.epochs={WARMUP_EPOCHS + measured}", "train.precision=fp32",
                 *model] + (["train.max_steps_per_epoch=4"] if quick else [])
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
            results.append(make_row("ddp", label, "train", "throughput", "samples/s", "batch", batch,
                                    percentiles(rate), device, "fp32"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_argument)
    parser.add_argument("--quick", action="store_true", help="4 steps an epoch, one measured epoch")
    args = parser.parse_args()
    print_table(run(args.device, args.quick), "DDP scaling")


if __name__ == "__main__":
    main()

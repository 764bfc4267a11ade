"""Where the default training step spends its time: torch.profiler over a few steps, top kernels.

The step is bench_train's (the default config, so the kernels' backend="auto", the trainer's
optimizer, a batch drawn like the real data), fp32 and/or under autocast bf16. On CUDA the table
lists the CUDA kernels by total device time; on the CPU the operators by self CPU time (a smoke
run: a CPU profile says little about a GPU step). --out is written again after each precision, so
a run stopped by SIGTERM (bench/gpu_run.sh's time box) keeps the precisions it finished.

    python -m bench.profile_step --device cuda [--batch 8192] [--precision fp32 bf16] [--out profile.md]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_train import build, synthetic_batch
from bench.common import device_argument, device_name, git_commit, stop_on_sigterm
from qin.checkpoint import atomic_write
from qin.commands_common import file_in_the_way
from qin.cli import positive_int
from qin.config import QINConfig
from qin.host_memory import bound_kept_memory, keep_freed_memory
from qin.train import loss_fn, make_optimizer

AMP = {"fp32": None, "bf16": torch.bfloat16}
MAX_WARMUP = 12  # steps at most before the profiled ones


def _device_time_us(event, self_only: bool) -> float:
    """An event's device time in us (the attribute was renamed from cuda_* to device_* in torch 2.4)."""
    names = ("self_device_time_total", "self_cuda_time_total") if self_only else ("device_time_total", "cuda_time_total")
    return float(next((getattr(event, n) for n in names if hasattr(event, n)), 0.0))


def training_step(device: torch.device, batch: int, precision: str, cfg: QINConfig | None = None):
    """One optimizer step of the model (default config unless `cfg`) on bench_train's synthetic
    batch, as the trainer runs it: autocast over the forward only, the loss and the L2 in fp32."""
    if device.type == "cpu":
        keep_freed_memory()  # as `qin train` does on the CPU
    model = build(cfg or QINConfig(), device)
    optimizer = make_optimizer(model, 2e-3)
    data = synthetic_batch(batch, device)

    def step():
        loss = loss_fn(model, data, 2e-4, precision=precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if device.type == "cpu":
            bound_kept_memory()  # as the trainer does after each step

    return step


def profile_step(device: torch.device, batch: int, precision: str, steps: int, top: int) -> list[str]:
    """Markdown lines: the top `top` kernels (CUDA) or operators (CPU) of `steps` profiled steps."""
    step = training_step(device, batch, precision)
    # Warm-up: compile the kernels (CUDA), allocate optimizer state, and on the CPU let the heap
    # that qin.host_memory keeps settle: its first steps fault fresh (huge) pages in, and the time
    # goes to whichever op touches them first, the history gather (in one run on our 2-core VM it
    # still took 21% of the fp32 step after three steps, in the next 1%). So at least 3 steps, and on
    # until a step is within 10% of the fastest so far.
    cuda = device.type == "cuda"
    warmup: list[float] = []
    while len(warmup) < 3 or (len(warmup) < MAX_WARMUP and warmup[-1] > 1.1 * min(warmup)):
        began = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        warmup.append(time.perf_counter() - began)
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.key_averages()
    if cuda:  # kernels only: a CPU-side op's device time would count its kernels a second time
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        time_of = lambda e: _device_time_us(e, self_only=True)  # noqa: E731
        what, kinds = "CUDA kernel", "CUDA kernels"
    else:
        time_of = lambda e: float(e.self_cpu_time_total)  # noqa: E731
        what, kinds = "operator (self CPU time)", "operators"
    total = sum(time_of(e) for e in events) or 1.0
    ranked = sorted(events, key=time_of, reverse=True)[:top]
    cfg = QINConfig()
    lines = [f"## {precision}{' (autocast over the forward)' if AMP[precision] else ''}, batch {batch}: {wall_ms:.2f} ms a step "
             f"({batch / wall_ms * 1e3:,.0f} samples/s under the profiler, after {len(warmup)} warm-up steps), "
             f"asta_kernel={cfg.asta_kernel}, qnn_kernel={cfg.qnn_kernel}", "",
             f"| {what} | calls a step | ms a step | share of the {'device' if cuda else 'CPU'} time |",
             "|---|---|---|---|"]
    for e in ranked:
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        lines.append(f"| `{name}` | {e.count / steps:g} | {time_of(e) / steps / 1e3:.3f} | {time_of(e) / total:.1%} |")
    lines += ["", f"All {len(events)} {kinds}: {total / steps / 1e3:.2f} ms a step.", ""]
    if cuda:
        launches = sum(e.count for e in events) / steps
        lines += [host_share(total / steps / 1e3, min(warmup) * 1e3, launches), ""]
    return lines


def host_share(kernel_ms: float, step_ms: float, launches: float) -> str:
    """Whether the host or the device bounds an eager step: its kernels' time against the fastest
    warm-up step, timed without the profiler (on the H200 at 3f11c2d the bf16 step's kernels took
    6.7 ms and the step 10.8: the device waited for the host a third of the time)."""
    return (f"Without the profiler the fastest warm-up step took {step_ms:.2f} ms: its {launches:g} kernel "
            f"launches a step fill {kernel_ms / step_ms:.0%} of it"
            + (", so the device waits for the host (CUDA graphs or torch.compile cut that)."
               if kernel_ms < 0.8 * step_ms else "."))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_argument)
    parser.add_argument("--batch", type=positive_int, help="default: 8192 on CUDA, 256 on the CPU")
    parser.add_argument("--precision", nargs="+", choices=list(AMP), default=["fp32"])
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--top", type=positive_int, default=15)
    parser.add_argument("--out", help="also write the Markdown here (replaced if it exists)")
    args = parser.parse_args(argv)
    blocking = args.out and (Path(args.out) if Path(args.out).is_dir() else file_in_the_way(Path(args.out).parent))
    if blocking:  # before the profiling, not after it
        parser.error(f"--out {args.out}: {blocking} is " + ("a folder" if blocking.is_dir() else "a file, not a folder"))
    stop_on_sigterm()  # as the benchmarks: SIGTERM raises KeyboardInterrupt, caught below
    device = args.device
    batch = args.batch if args.batch is not None else (8192 if device.type == "cuda" else 256)
    lines = [f"# Profile of the default training step: {device_name(device)}", "",
             f"torch {torch.__version__}, commit {git_commit()}; {args.steps} profiled steps after a warm-up (below).", ""]
    print("\n".join(lines))
    stopped = False
    for precision in args.precision:
        try:
            part = profile_step(device, batch, precision, args.steps, args.top)
        except KeyboardInterrupt:  # SIGTERM: this precision is lost, the file keeps the ones before it
            part, stopped = [f"## {precision}: not finished: out of time", ""], True
        except Exception as exc:  # one failed precision must not hide the other
            part = [f"## {precision}: failed: {type(exc).__name__}: {exc}", ""]
        lines += part
        print("\n".join(part))
        if args.out:  # after each precision, whole or not at all: a run stopped later keeps this one
            text = "\n".join(lines).encode()
            atomic_write(args.out, lambda fh: fh.write(text))
        if stopped:
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if stopped or any(line.startswith("## ") and ": failed: " in line for line in lines) else 0


if __name__ == "__main__":
    raise SystemExit(main())

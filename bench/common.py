"""Timing, memory and CSV helpers shared by every benchmark in bench/.

Times are the median with 20th/80th percentiles: a fixed number of calls timed with CUDA events
on CUDA, a perf_counter loop on the CPU. Inputs and output gradients are allocated by the caller,
outside the timed region. Every figure becomes one CSV row in the same schema.
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

CSV_FIELDS = [
    "kernel", "provider", "mode", "metric", "unit", "x_name", "x_value",
    "p50", "p20", "p80", "device", "dtype", "timestamp", "torch", "triton", "commit",
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU by name, family and model (where /proc/cpuinfo has them), with AVX512-BF16 where
    it has bf16 instructions, and the core count. A virtual machine often shows a vendor line
    only: 'AMD EPYC' covers Zen 4 (family 25) and Zen 5 (family 26), and bf16 sped the default
    step up 1.48x on our earlier 'AMD EPYC' host (family not recorded) and 2.4x on a Zen 5 one,
    so a CPU figure needs the family."""
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if not line.strip() and fields:
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    from qin.train import cpu_has_bf16  # here, not at the top: qin.train is heavy for a helper
    return f"CPU {name}{' AVX512-BF16' if cpu_has_bf16() else ''} x{os.cpu_count()}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 10,
            min_seconds: float = 0.0) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of fn()."""
    if device.type == "cuda":
        return _time_cuda_ms(fn, device, warmup, reps)
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return percentiles(samples)


# Device types whose benchmark rows add the host's time and the kernels' listing (host_ms,
# device_kernels): where the host and the device work apart. Tests add "cpu" to run that code.
DIAGNOSED_DEVICE_TYPES = {"cuda"}


def diagnosed(device: torch.device) -> bool:
    return device.type in DIAGNOSED_DEVICE_TYPES


def host_ms(fn: Callable[[], object], device: torch.device, reps: int = 5) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds the host spends in fn(): each call starts with the device idle
    and is not waited for at its end. A call whose launches (Python, dispatch, kernel launches)
    take longer than its kernels shows here about the time time_ms gives it: it is bound by the
    host, and a faster GPU would not speed it up. A device-bound call shows much less. A wait for
    the device inside fn() (a host sync) counts. On the CPU, where the host does the work, the
    same as time_ms."""
    samples = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    return percentiles(samples)


def device_kernels(fn: Callable[[], object], device: torch.device, calls: int = 3) -> tuple[float, list[tuple]]:
    """What fn() runs on the device, under torch.profiler over `calls` calls after one warm-up:
    (the kernels' total milliseconds a call, [(name, launches a call, milliseconds a call), ...]
    costliest first). On CUDA the CUDA kernels; on the CPU the operators' self CPU time. Against
    time_ms's figure, the kernels' total says how much of a call the device spent idle: waiting
    for the host, or at a sync."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    listing = []
    for event in prof.key_averages():
        if cuda and getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
        us = float(next((getattr(event, n) for n in names if hasattr(event, n)), 0.0))
        listing.append((event.key, event.count / calls, us / calls / 1e3))
    listing.sort(key=lambda item: item[2], reverse=True)
    return sum(ms for _, _, ms in listing), listing


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    # "inclusive": within the samples' range; the default extrapolates past it, far for a few
    # samples (3 epochs of 10, 300, 300 gave a p20 of -48).
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7]


# CUDA timing. Not triton.testing.do_bench: its `rep` is milliseconds of timing, so an 80 ms
# training step ran once and its p20/p80 meant nothing. At least CUDA_MIN_REPS calls (and the
# caller's reps); a fast op as many as fill CUDA_FILL_MS, at most CUDA_MAX_REPS, so its
# quantiles rest on enough calls. L2 is cleared before each call, as do_bench does.
CUDA_MIN_REPS, CUDA_MAX_REPS, CUDA_FILL_MS = 10, 1000, 100.0
L2_FLUSH_BYTES = 256 * 2**20  # more than any GPU's L2


def cuda_reps(reps: int, estimate_ms: float) -> int:
    """How many timed calls of a function that took about `estimate_ms`."""
    fill = math.ceil(CUDA_FILL_MS / max(estimate_ms, 1e-3))
    return max(reps, CUDA_MIN_REPS, min(CUDA_MAX_REPS, fill))


def _time_cuda_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> tuple[float, float, float]:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def timed(n: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)  # once, after every call: no host wait between them
        return [start.elapsed_time(end) for start, end in events]

    for _ in range(warmup):
        fn()
    estimate = timed(1)[0]
    return percentiles(timed(cuda_reps(reps, estimate)))


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory allocated during fn(), above what was allocated before; None on the CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def triton_version() -> str:
    import kernels

    return kernels.triton.__version__ if kernels.triton is not None else "not installed"


def make_row(kernel: str, provider: str, mode: str, metric: str, unit: str, x_name: str, x_value,
             values: tuple[float, float, float] | float, device: torch.device, dtype: torch.dtype | str = "") -> dict:
    if not isinstance(values, tuple):
        values = (values, values, values)
    return {
        "kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
        "x_name": x_name, "x_value": x_value, "p50": values[0], "p20": values[1], "p80": values[2],
        "device": device_name(device), "dtype": short_dtype(dtype),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton_version(), "commit": git_commit(),
    }


def host_rows(kernel: str, provider: str, mode: str, x_name: str, x_value, host: tuple[float, float, float],
              device_ms: float, device: torch.device, dtype) -> list[dict]:
    """The rows of a host_ms timing beside the call's time_ms median `device_ms`: the host's
    milliseconds ("host_time"), and their share of the call ("host_share"; about 1 or more: the
    call is bound by its launches, not by its kernels)."""
    return [make_row(kernel, provider, mode, "host_time", "ms", x_name, x_value, host, device, dtype),
            make_row(kernel, provider, mode, "host_share", "x", x_name, x_value, host[0] / device_ms, device, dtype)]


SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def short_dtype(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 -> 'bf16': one spelling per dtype in every table."""
    name = str(dtype).replace("torch.", "")
    return SHORT_DTYPES.get(name, name)


def append_csv(rows: list[dict], path: str | Path, extra_fields: tuple[str, ...] = ()) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*CSV_FIELDS, *extra_fields], extrasaction="ignore")
        if new:
            writer.writeheader()
        elif _cut_off(path):  # a run killed mid-line: end that line, or it swallows our first row
            fh.write("\r\n")
        writer.writerows(rows)


def _cut_off(path: Path) -> bool:
    """Whether the file's last line has no end (the file is not empty)."""
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def keep(rows: list[dict], new: Iterable[dict], csv: str | Path | None = None) -> None:
    """Add each row of `new` to `rows`, and to the CSV, as it is measured (`new` is typically a
    generator that measures as it goes). SIGTERM (bench/gpu_run.sh's time box, see stop_on_sigterm)
    stops it: STOPPED is set, and every row measured before it is in `rows` and in the CSV."""
    try:
        for row in new:
            rows.append(row)
            if csv:
                append_csv([row], csv)
    except KeyboardInterrupt:
        STOPPED.set()
        print("out of time: stopped by SIGTERM (or Ctrl-C); the rows measured so far are kept")


def measure_copy_bandwidth_gbs(device: torch.device, mbytes: int = 512) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written: the memory ceiling."""
    n = mbytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    p50, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (p50 * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 4096) -> float:
    """Dense matrix-product rate of this device and dtype: the compute ceiling."""
    if device.type == "cpu":
        n = min(n, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    p50, _, _ = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (p50 * 1e-3) / 1e12


def print_table(rows: list[dict], title: str = "") -> None:
    """Plain-text table of rows (provider, mode, x, p50) for the terminal."""
    if title:
        print(f"\n## {title}")
    if not rows:  # e.g. a run stopped by its time box before its first figure
        print("(no figures)")
        return
    cols = ["kernel", "provider", "mode", "dtype", "x_name", "x_value", "metric", "p50", "unit"]
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def device_argument(text: str) -> torch.device:
    """The type of a benchmark's --device: cpu, or cuda[:N] where that GPU is here."""
    import argparse

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if device.type == "cuda" and (device.index or 0) >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA device here")
    return device


def kernel_bench_main(run: Callable, doc: str, quick_help: str, argv=None) -> None:
    """The command line of a kernel benchmark module: --device, --quick, --csv, then run()."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_argument)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--csv", help="append the rows to this CSV file")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    run(args.device, quick=args.quick, csv=args.csv)


# Set when SIGTERM arrived (bench/gpu_run.sh time-boxes each stage with `timeout`): a benchmark's
# loop then stops and still prints and saves the rows it has. Not SIGINT: a script started in the
# background inherits SIGINT ignored, and Python then never raises KeyboardInterrupt for it.
STOPPED = threading.Event()


def stop_on_sigterm() -> None:
    """From now on SIGTERM sets STOPPED and raises KeyboardInterrupt where the program is."""
    def handler(signum, frame):
        STOPPED.set()
        raise KeyboardInterrupt("SIGTERM: out of time")

    signal.signal(signal.SIGTERM, handler)

"""`qin bench` / `python -m bench`: every benchmark of bench/ in one run, one report.

Writes into --out: report.md (tables with each variant's ratio against the baseline of its own
section, measured in the same run), results.csv (every figure, with device, versions, date and
commit) and PNG plots. Outputs are built in a temporary folder beside --out and moved into place
only when complete, and existing files are never overwritten without --force.
"""
from __future__ import annotations

import datetime
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench import common
from bench.arguments import build_parser

# Published, not measured here (SPEC.md): 2.8 minutes an epoch of 3.6M rows on an RTX 4090.
AUTHORS_SAMPLES_PER_S = 21_000
AUTHORS_DEVICE = "RTX 4090 (the authors' log)"

# Metrics that get a ratio against the table's baseline: speed-up for time and throughput,
# fraction for memory. Derived rates (GB/s, TFLOP/s, fractions of a ceiling) repeat the time's ratio.
HIGHER_IS_BETTER = {"throughput"}
MEMORY_METRICS = {"peak_memory", "saved_bytes"}
# The suffix of bench_train's variants that run ASTA's attention op in bf16 (model.asta_precision=autocast).
BF16_OP = ", ASTA op in bf16"
# The metric of bench_train's row saying how many times slower a bf16 matrix product ran than
# fp32's on a CPU where it left the bf16 variants out (bench_train.bf16_left_out).
BF16_SLOWDOWN = "bf16_matmul_slowdown_vs_fp32"
RATIO_METRICS = {"time", "throughput", *MEMORY_METRICS}

REPORT_FILES = ("report.md", "results.csv")
PLOT_FILES = ("time_per_variant.png", "memory_per_variant.png", "train_throughput.png")  # what make_plots writes


class BenchError(Exception):
    pass


def _sections(quick: bool, device: torch.device, codegen: bool):
    """(title, callable returning rows). Imported lazily: a broken section must not hide the rest."""
    def asta():
        from bench import bench_asta
        return bench_asta.run(device, quick=quick)

    def qnn():
        from bench import bench_qnn
        return bench_qnn.run(device, quick=quick)

    def train():
        from bench import bench_train
        return bench_train.run(device, quick=quick)

    def loader():
        from bench import bench_loader
        return bench_loader.run(device, quick=quick)

    def suite():
        return pytest_benchmark_rows(device, quick)

    def ddp():
        from bench import bench_ddp
        return bench_ddp.run(device, quick=quick)

    def ceilings():
        rows = [common.make_row("ceiling", "copy", "device", "bandwidth", "GB/s", "", "",
                                common.measure_copy_bandwidth_gbs(device, 64 if quick else 512), device, "fp32")]
        dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
        for dtype in dtypes:
            rows.append(common.make_row("ceiling", "matmul", "device", "tflops", "TFLOP/s", "", "",
                                        common.measure_matmul_tflops(device, dtype), device, dtype))
        return rows

    sections = [("Device ceilings", ceilings), ("pytest-benchmark suite of the fused ops", suite),
                ("ASTA: sparse target attention", asta),
                ("QNN: quadratic projection", qnn), ("Training step, end to end", train),
                ("Data loading", loader)]
    if not quick:  # a few steps per process would time startup, not the ranks' steady speed
        sections.append(("Several processes (DDP)", ddp))
    def codegen_rows():
        from bench import codegen
        rows = codegen.run()
        print(codegen_table(rows))
        return rows

    generated = [(CODEGEN_SECTION, codegen_rows)]
    if codegen:  # --codegen: the generated-code table alone
        return generated
    return sections + ([] if quick else generated)


def pytest_benchmark_rows(device: torch.device, quick: bool) -> list[dict]:
    """Run bench/test_ops_benchmark.py under pytest-benchmark in a subprocess; its medians as rows."""
    import json
    import subprocess

    import importlib.util

    missing = [name for name in ("pytest", "pytest_benchmark") if importlib.util.find_spec(name) is None]
    if missing:  # else pytest's "unrecognized arguments: --benchmark-only" would not say what is missing
        raise BenchError(f"the pytest-benchmark suite needs {' and '.join(missing)}: pip install -e \".[bench]\"")
    suite = Path(__file__).with_name("test_ops_benchmark.py")
    # The real kernels, never the interpreter; and a pytest session of its own: called from a
    # pytest-xdist worker (the test suite), the worker's PYTEST_XDIST_* variables would make
    # pytest-benchmark disable itself and refuse --benchmark-only.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST_")}
    env.update(QIN_BENCH_DEVICE=device.type, QIN_BENCH_QUICK="1" if quick else "0")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "benchmark.json"
        result = subprocess.run([sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
                                 "--benchmark-only", f"--benchmark-json={out}", "-o", "addopts="],
                                env=env, capture_output=True, text=True, cwd=suite.parent.parent, timeout=3600)
        if result.returncode != 0:
            raise BenchError(f"the pytest-benchmark suite failed:\n{result.stdout[-3000:]}{result.stderr[-2000:]}")
        data = json.loads(out.read_text())
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        stats = bench["stats"]
        rows.append(common.make_row(f"pytest-benchmark {info['op']}", info["backend"], info["mode"], "time", "ms",
                                    info.get("shape_names", "batch"), info.get("shape", info["batch"]),
                                    # the JSON holds every round's time: the 20th/80th percentiles, as elsewhere
                                    (stats["median"] * 1e3, *(np.percentile(stats["data"], [20, 80]) * 1e3)),
                                    device, info["dtype"]))
    return rows


def collect(device: torch.device, quick: bool, codegen: bool = False, only: list[str] | None = None,
            log=print) -> tuple[list[dict], list[str]]:
    rows, failures = [], []
    for title, fn in _sections(quick, device, codegen):
        if only and not any(word.lower() in title.lower() for word in only):
            continue
        log(f"== {title}")
        start = time.perf_counter()
        try:
            section_rows = fn()
        except Exception as exc:  # keep going: the report says which section failed and why
            traceback.print_exc()
            failures.append(f"{title}: {type(exc).__name__}: {exc}")
            continue
        for row in section_rows:
            row.setdefault("section", title)
            if row.get("metric") == "compile_error":  # a kernel that did not compile fails its section
                failures.append(f"{title}: {row['kernel']} {row['dtype']} {row['provider']}: {_last_line(row['p50'])}")
        rows += section_rows
        log(f"   {len(section_rows)} figures in {time.perf_counter() - start:.0f} s")
    return rows, failures


# -- the Markdown report ---------------------------------------------------------------------------

def _fmt(value) -> str:
    if _number(value) is None:
        return str(value)
    value = float(value)
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


CODEGEN_SECTION = "Generated code for sm_89 (RTX 4090) and sm_90 (H100), compiled on this machine"
CODEGEN_COLUMNS = ["registers", "shared_memory", "local_memory", "occupancy", "load_width_bits",
                   "store_width_bits", "matrix_instructions", "sass_instructions"]


def codegen_table(rows: list[dict]) -> str:
    """One line per (kernel, dtype, target): registers, shared/local memory, occupancy, access widths, SASS."""
    records: dict[tuple, dict] = {}
    for r in rows:
        if r.get("mode") == "codegen":
            records.setdefault((r["kernel"], r["dtype"], r["provider"]), {})[r["metric"]] = r["p50"]
    header = ["kernel", "dtype", "target", "regs/thread", "shared B", "local B (spills)", "occupancy",
              "load bits", "store bits", "matrix instr.", "SASS instr."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (kernel, dtype, target), metrics in records.items():
        if "compile_error" in metrics:
            lines.append(f"| {kernel} | {dtype} | {target} | compile error: {_last_line(metrics['compile_error'])} |")
            continue
        cells = [_fmt(metrics.get(c, "-")) for c in CODEGEN_COLUMNS]
        lines.append("| " + " | ".join([kernel, dtype, target, *cells]) + " |")
    return "\n".join(lines)


def _last_line(error) -> str:
    """A compiler's multi-line error as one table cell: its last line (the message), without pipes."""
    lines = str(error).strip().splitlines() or [""]
    return lines[-1][:200].replace("|", "/")


def _number(value) -> float | None:
    """The figure as a float, or None where it is not a finite number (a cut-off line, "nan")."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _ratio(metric: str, value: float, base: float) -> str:
    if not base or not value:
        return ""
    ratio = value / base if metric in HIGHER_IS_BETTER or metric in MEMORY_METRICS else base / value
    return f" ({ratio:.2f}x)"


WIDE_SPREAD = 0.25  # of the median: a cell whose 20th-80th percentiles span more shows them


def _wide_spread(cell: dict) -> str:
    """" [p20-p80: a-b]" where the repeats of a figure disagree enough that its ratio is doubtful
    (a loaded machine, a one-off stall), else ""."""
    p50, p20, p80 = (_number(cell.get(k)) for k in ("p50", "p20", "p80"))
    if None in (p50, p20, p80) or not p50 or abs(p80 - p20) <= WIDE_SPREAD * abs(p50):
        return ""
    return f" [p20-p80: {_fmt(min(p20, p80))}-{_fmt(max(p20, p80))}]"


def pivot_tables(rows: list[dict]) -> list[str]:
    """One table per (kernel, metric): a line per (mode, dtype, x), a column per provider.

    Each cell is the median with its ratio to the first provider of the table (the baseline):
    speed-up for time and throughput, fraction for memory.
    """
    out = []
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    for kernel in kernels:
        kernel_rows = [r for r in rows if r["kernel"] == kernel]
        for metric in dict.fromkeys(r["metric"] for r in kernel_rows):
            metric_rows = [r for r in kernel_rows if r["metric"] == metric]
            providers = list(dict.fromkeys(r["provider"] for r in metric_rows))
            keys = list(dict.fromkeys((r["mode"], r["dtype"], r["x_name"], str(r["x_value"])) for r in metric_rows))
            cells = {(r["mode"], r["dtype"], r["x_name"], str(r["x_value"]), r["provider"]): r for r in metric_rows}
            unit = metric_rows[0]["unit"]
            ratio_note = "" if len(providers) < 2 or metric not in RATIO_METRICS else (
                f"; in parentheses: against {providers[0]}" + (" (x = its fraction)" if metric in MEMORY_METRICS else
                                                            " (x = speed-up)"))
            out.append(f"**{kernel}: {metric.replace('_', ' ')} ({unit})**{ratio_note}\n")
            out.append("| mode | dtype | shape | " + " | ".join(providers) + " |")
            out.append("|" + "---|" * (3 + len(providers)))
            for mode, dtype, x_name, x_value in keys:
                base = cells.get((mode, dtype, x_name, x_value, providers[0]))
                line = [mode, dtype or "-", f"{x_name}={x_value}" if x_name else "-"]
                for provider in providers:
                    cell = cells.get((mode, dtype, x_name, x_value, provider))
                    if cell is None:
                        line.append("-")
                        continue
                    text = _fmt(cell["p50"])
                    numbers = (_number(cell["p50"]), _number(base["p50"]) if base is not None else None)
                    if provider != providers[0] and None not in numbers and metric in RATIO_METRICS:
                        text += _ratio(metric, *numbers)
                    line.append(text + _wide_spread(cell))
                out.append("| " + " | ".join(line) + " |")
            out.append("")
    return out


def _value(rows, **match) -> float | None:
    """The figure of the last row matching (as the tables show it), or None."""
    found = None
    for r in rows:
        if all(str(r.get(k)) == str(v) for k, v in match.items()):
            found = _number(r["p50"])
    return found


CPU_HEADLINE_BATCH = 1024  # bench_train.default_batches(cpu)[0]


def targets(rows: list[dict], device: torch.device) -> list[str]:
    """The issues' targets, each with its measured figure or 'unmeasured'."""
    every_train = [r for r in rows if r["kernel"] == "train_step"]
    train = [r for r in every_train if r["metric"] == "throughput" and r["dtype"] in ("fp32", "")]
    batches = sorted({int(r["x_value"]) for r in train}, reverse=True)
    lines = ["| target | measured here | verdict |", "|---|---|---|"]

    def add(name, figure, ok, unmeasured=False):  # ok None: only part of what the target needs was measured
        # unmeasured: the figure says why nothing was measured
        verdict = "unmeasured" if figure is None or unmeasured else (
            "partly measured" if ok is None else "met" if ok else "not met")
        lines.append(f"| {name} | {figure or 'unmeasured'} | {verdict} |")

    fused = ["default (auto)", "+ Triton QNN (all fused)", "+ item dedup"]
    on_cpu = device.type == "cpu"
    best = None
    # The CPU targets take the headline batch (bench_train.default_batches' first) where it was
    # timed, else the largest; the GPU targets name batch 8192, whatever else ran.
    if on_cpu:
        batches = sorted(batches, key=lambda b: (b != CPU_HEADLINE_BATCH, -b))
    for batch in batches if on_cpu else [b for b in batches if b == 8192]:
        literal = _value(train, provider="literal eager", x_value=batch)
        for name in fused:
            ours = _value(train, provider=name, x_value=batch)
            if ours and literal:
                best = (batch, name, ours, literal)
                break
        if best:
            break
    if on_cpu and best:
        batch, name, ours, literal = best
        add("CPU: full training step >= 2x the literal eager model (same batch, same run)",
            f"{ours / literal:.2f}x ({name}, batch {batch}: {ours:,.0f} vs {literal:,.0f} samples/s)", ours / literal >= 2)
    else:
        add("CPU: full training step >= 2x the literal eager model", None, False)
    if not on_cpu and best:
        batch, name, ours, literal = best
        add("GPU: >= 10x the literal eager model's samples/s at batch 8192",
            f"{ours / literal:.1f}x ({name}: {ours:,.0f} vs {literal:,.0f} samples/s)", ours / literal >= 10)
        add("GPU (H100 class): >= 300,000 samples/s at batch 8192",
            f"{ours:,.0f} samples/s ({name}) on {common.device_name(device)}",
            ours >= 300_000)
        memory = [r for r in every_train if r["metric"] == "peak_memory" and r["dtype"] == "fp32"]
        ours_mem, lit_mem = _value(memory, provider=name, x_value=batch), _value(memory, provider="literal eager", x_value=batch)
        add("GPU: peak training memory <= 1/3 of the literal eager model",
            f"{ours_mem / lit_mem:.2f} ({ours_mem:,.0f} vs {lit_mem:,.0f} MB)" if ours_mem and lit_mem else None,
            bool(ours_mem and lit_mem and ours_mem / lit_mem <= 1 / 3))
    else:
        for name in ("GPU: >= 10x the literal eager model's samples/s at batch 8192",
                     "GPU (H100 class): >= 300,000 samples/s at batch 8192",
                     "GPU: peak training memory <= 1/3 of the literal eager model"):
            add(name, None, False)
    # Mixed precision: the default model (PyTorch ops on the CPU, fused kernels on a GPU) in bf16
    # against fp32, same run, same batch; and the bytes it saves for backward.
    # The default keeps ASTA's attention op in fp32 (model.asta_precision); the second pair of
    # lines is the same model with that op in bf16 too.
    default = "+ item dedup" if on_cpu else "default (auto)"
    where, goal = ("CPU", 2.0) if on_cpu else ("GPU", 2.5)
    for op, which in (("", "default model"), (BF16_OP, "model.asta_precision=autocast")):
        pair = None
        for batch in batches:
            speeds = [_value(every_train, provider=p, metric="throughput", x_value=batch)
                      for p in (f"{default}{op}, autocast bf16", default)]
            saved = [_value(every_train, provider=p, metric="saved_bytes", x_value=batch)
                     for p in (f"{default}{op}, autocast bf16", default)]
            if None not in speeds:
                pair = batch, speeds, saved
                break
        batch, (bf16, fp32), (saved_bf16, saved_fp32) = pair or (None, (None, None), (None, None))
        # Why there is no pair, where bench_train left the bf16 variants out (bf16_left_out).
        left_out = (f"left out: bf16 matrix products ran {slowdown:.0f}x slower than fp32's on this CPU (no bf16 "
                    f"instructions)" if on_cpu and (slowdown := _value(rows, metric=BF16_SLOWDOWN)) else None)
        add(f"{where}: training step in bf16 >= {goal}x fp32 ({which}; same run, same batch)",
            f"{bf16 / fp32:.2f}x ({default}, batch {batch}: {bf16:,.0f} vs {fp32:,.0f} samples/s)" if pair else left_out,
            bool(pair and bf16 / fp32 >= goal), unmeasured=not pair)
        add(f"Saved for backward: bf16 bytes/sample <= 0.55x fp32 ({which})",
            f"{saved_bf16 / saved_fp32:.2f} ({saved_bf16:,.0f} vs {saved_fp32:,.0f} bytes/sample, batch {batch})"
            if saved_bf16 and saved_fp32 else left_out, bool(saved_bf16 and saved_fp32 and saved_bf16 / saved_fp32 <= 0.55),
            unmeasured=not (saved_bf16 and saved_fp32))
    # Issue 4's QNN targets, at the paper's shape in bf16 (GPU only: the CPU runs no Triton).
    speed = _value(rows, kernel="qnn", provider="triton", mode="fwd+bwd", metric="speedup_vs_eager", dtype="bf16",
                   x_value=8192)
    add("GPU: QNN projection bf16 fwd+bwd >= 1.5x eager (B=8192, D=1024, M=4)",
        f"{speed:.2f}x" if speed else None, bool(speed and speed >= 1.5))
    fraction = _value(rows, kernel="qnn", provider="triton", mode="fwd+bwd", metric="matmul_fraction", dtype="bf16",
                      x_value=8192)
    add("GPU: QNN projection bf16 fwd+bwd >= 60% of the measured matrix-product rate",
        f"{fraction:.0%}" if fraction else None, bool(fraction and fraction >= 0.6))
    # Issue 14: the QNN op at least as fast as cuBLAS eager (the eager reference's products) in fp32 and bf16.
    for dtype in ("fp32", "bf16"):
        speed = _value(rows, kernel="qnn", provider="triton", mode="fwd+bwd", metric="speedup_vs_eager", dtype=dtype,
                       x_value=8192)
        add(f"GPU: QNN projection {dtype} fwd+bwd Triton >= 1.0x cuBLAS eager (B=8192, D=1024, M=4)",
            f"{speed:.2f}x" if speed else None, bool(speed and speed >= 1.0))
    eager_mem = _value(rows, kernel="qnn_stack", provider="eager", metric="peak_memory", dtype="bf16")
    triton_mem = _value(rows, kernel="qnn_stack", provider="triton", metric="peak_memory", dtype="bf16")
    add("GPU: 4-layer QNN fwd+bwd peak memory <= 1/2 of eager (bf16)",
        f"{triton_mem / eager_mem:.2f} ({triton_mem:,.0f} vs {eager_mem:,.0f} MB)" if eager_mem and triton_mem else None,
        bool(eager_mem and triton_mem and triton_mem / eager_mem <= 0.5))
    # Issue 14: the default step against the strongest torch-only recipes, batch 8192, same run.
    # Every throughput line, whatever its dtype: most of these pairs are bf16 ones.
    speeds = [r for r in every_train if r["metric"] == "throughput"]

    def step_ratio(name, ours, theirs, need):
        a, b = _value(speeds, provider=ours, x_value=8192), _value(speeds, provider=theirs, x_value=8192)
        add(name, f"{a / b:.2f}x ({a:,.0f} vs {b:,.0f} samples/s)" if a and b else None, bool(a and b and a / b >= need))

    step_ratio("GPU fp32: default step >= 1.3x hoisted + dedup eager (batch 8192)", "default (auto)", "+ item dedup", 1.3)
    step_ratio("GPU bf16: default step under autocast >= 1.5x literal + torch.compile + autocast (batch 8192)",
               "default (auto), autocast bf16", "literal + torch.compile, autocast bf16", 1.5)
    step_ratio("GPU bf16, both compiled: default + torch.compile under autocast >= 1.5x literal + torch.compile + "
               "autocast (batch 8192)", "default (auto) + torch.compile, autocast bf16",
               "literal + torch.compile, autocast bf16", 1.5)
    step_ratio("GPU bf16, CUDA graphs (train.cuda_graphs=true) >= 1.5x literal + torch.compile + autocast "
               "(batch 8192)", "default (auto) + CUDA graphs, autocast bf16", "literal + torch.compile, autocast bf16",
               1.5)
    memory = [r for r in rows if r["kernel"] == "train_step" and r["metric"] == "peak_memory"]
    ours_mem = _value(memory, provider="default (auto)", x_value=8192)
    hoisted_mem = _value(memory, provider="+ hoisted ASTA", x_value=8192)
    add("GPU: default step peak memory <= the hoisted eager variant's (batch 8192)",
        f"{ours_mem:,.0f} vs {hoisted_mem:,.0f} MB" if ours_mem and hoisted_mem else None,
        bool(ours_mem and hoisted_mem and ours_mem <= hoisted_mem))
    for kernel in ("asta_op", "asta_gathered_op"):
        fraction = _value(rows, kernel=kernel, provider="triton", mode="fwd+bwd full mask", metric="fraction_of_peak",
                          dtype="bf16", x_value=8192)
        add(f"GPU: {kernel} bf16 fwd+bwd, every position live, >= 0.7 of the copy ceiling (B=8192, L=64)",
            f"{fraction:.2f}" if fraction else None, bool(fraction and fraction >= 0.7))
    # Issue 14: the ASTA ops at least as fast as the reference (eager) in every dtype and mode.
    for kernel, modes in ASTA_TARGET_MODES.items():
        for dtype in ("bf16", "fp32", "fp16"):
            ratios = {mode: _value(rows, kernel=kernel, provider="triton", mode=mode, metric="speedup_vs_reference",
                                   dtype=dtype, x_value=8192) for mode in modes}
            measured = {mode: ratio for mode, ratio in ratios.items() if ratio}
            missing = [mode for mode in modes if mode not in measured]
            figure = ", ".join(f"{mode} {ratio:.2f}x" for mode, ratio in measured.items()) + (
                f"; unmeasured: {', '.join(missing)}" if missing else "")
            slower = any(ratio < 1.0 for ratio in measured.values())
            add(f"GPU: {kernel} {dtype} Triton >= the reference (eager) in every mode (B=8192, L=64)",
                figure if measured else None, False if slower else None if missing else True)
    loader = _value(rows, kernel="loader", provider="numpy", mode="assemble", x_value=2)  # MicroLens' schema
    add("Loader: batch assembly at batch 8192 >= 500k samples/s on 2 CPU cores",
        f"{loader:,.0f} samples/s" if loader else None, bool(loader and loader >= 500_000))
    return lines


# -- kernel variants the run decides between ------------------------------------------------------

# (table, the speed-up metric of the variant as it runs over the other, what runs, the other).
# A variant stays where it is not slower in any case; bench/bench_asta.py times both in one run.
KERNEL_CHOICES = (
    ("asta_tile_skip", "speedup_vs_every_tile", "skipping tiles of padding alone (SKIP_EMPTY_TILES)",
     "reading every tile"),
    ("asta_layout_plain", "speedup_vs_triton_layout", "16-bit rows in fp32's thread layout (VEC=4)",
     "Triton's own layout (VEC=0)"),
    ("asta_layout_gathered", "speedup_vs_triton_layout", "16-bit rows in fp32's thread layout (VEC=4)",
     "Triton's own layout (VEC=0)"),
    ("asta_register_cap_plain", "speedup_vs_other_register_cap",
     "the 16-bit forwards' register cap as committed (FORWARD_MAX_REGISTERS_16_BIT)",
     "bench_asta's REGISTER_CAP_CANDIDATE"),
    ("asta_register_cap_gathered", "speedup_vs_other_register_cap",
     "the 16-bit forwards' register cap as committed (FORWARD_MAX_REGISTERS_16_BIT)",
     "bench_asta's REGISTER_CAP_CANDIDATE"),
    ("fp32_gemm", "speedup_vs_cublas", "the Triton QNN's fp32 products through 3xTF32 (kernels/fp32_gemm.py; "
     "its operands split in the kernel, or in memory first: PRESPLIT)", "cuBLAS's SGEMM, TF32 off"),
)


# (variant, the training step it runs against, what it decides): bench/bench_train.py times both.
STEP_CHOICES = (
    ("default (auto), QNN through autograd, autocast bf16", "default (auto), autocast bf16",
     "the QNN's torch path as plain autograd through the reference, against the form auto chose"),
    ("default (auto), QNN through its Function, autocast bf16", "default (auto), autocast bf16",
     "the QNN's torch path through its autograd Function, against the form auto chose"),
    ("default (auto) graph-safe, whole step as one CUDA graph, autocast bf16", "default (auto), autocast bf16",
     "the eager step replayed as one CUDA graph (captured in a second, no compile), against the eager step"),
)


def kernel_choices(rows: list[dict]) -> list[str]:
    """For each kernel variant the run timed against its alternative: the ratios per dtype and mode,
    and whether it stays (not slower in any case timed) or goes. Then where the Triton QNN's
    backward spends its time (bench_qnn's qnn_backward rows), and each training-step variant of
    STEP_CHOICES against the step it would replace. [] where none of these was timed."""
    lines = []
    for table, metric, runs, other in KERNEL_CHOICES:
        found = [r for r in rows if r["kernel"] == table and r["metric"] == metric and _number(r["p50"])]
        providers = list(dict.fromkeys(r["provider"] for r in found))
        for provider in providers:  # a table timing two variants against one yardstick: a verdict each
            ratios = [(r["dtype"], r["mode"], _number(r["p50"])) for r in found if r["provider"] == provider]
            verdict = ("stays" if all(x >= 1.0 for *_, x in ratios) else
                       "slower somewhere: time it again, and revert it where it loses twice")
            which = f" ({provider})" if len(providers) > 1 else ""
            lines += [f"**{table}**{which}: {runs} against {other}: {verdict}.", "",
                      "| dtype | mode | speed-up |", "|---|---|---|"]
            lines += [f"| {dtype} | {mode} | {x:.2f}x |" for dtype, mode, x in ratios] + [""]
    parts = [r for r in rows if r["kernel"] == "qnn_backward" and r["metric"] == "time" and _number(r["p50"])]
    for dtype in dict.fromkeys(r["dtype"] for r in parts):
        times = {r["provider"]: _number(r["p50"]) for r in parts if r["dtype"] == dtype}
        whole = times.get("triton backward")
        lines += [f"**qnn_backward** {dtype}, batch {next(r['x_value'] for r in parts if r['dtype'] == dtype)}: "
                  "forward with its graph kept and backward alone, and the Triton backward's parts timed apart"
                  + (f" (share of its {whole:.3g} ms)" if whole else "") + ":", "",
                  "| part | ms | share |", "|---|---|---|"]
        whole_ops = ("forward, graph kept", "backward")  # a whole forward or backward: no share of another
        lines += [f"| {name} | {ms:.3g} | {f'{ms / whole:.0%}' if whole and not name.endswith(whole_ops) else ''} |"
                  for name, ms in times.items()] + [""]
        # Each provider's fwd+bwd under the profiler: its kernels' time against the op table's time
        # of the same call; the rest the GPU sat idle (waiting for the host, or at a sync).
        idle = []
        for r in rows:
            if r["kernel"] == "qnn_backward" and r["metric"] == "kernel_time" and r["dtype"] == dtype:
                provider = r["provider"].split(" fwd+bwd")[0]
                call = _value(rows, kernel="qnn", provider=provider, mode="fwd+bwd", metric="time", dtype=dtype,
                              x_value=r["x_value"])
                kernels_ms = _number(r["p50"])
                if call and kernels_ms:
                    idle.append(f"- {provider} fwd+bwd: its kernels {kernels_ms:.3g} ms of the call's {call:.3g} ms "
                                f"(the GPU idle {max(0.0, 1 - kernels_ms / call):.0%} of it)")
        lines += idle + [""] * bool(idle)
    found = [r for r in rows if r["kernel"] == "train_step" and r["metric"] == "throughput"]
    for variant, baseline, decides in STEP_CHOICES:
        ours = {r["x_value"]: _number(r["p50"]) for r in found if r["provider"] == variant}
        base = {r["x_value"]: _number(r["p50"]) for r in found if r["provider"] == baseline}
        for batch in (b for b in ours if ours[b] and base.get(b)):
            ratio = ours[batch] / base[batch]
            verdict = ("faster by more than a training step's noise: time it again, and switch where it wins twice"
                       if ratio > 1.1 else "not faster beyond the noise: the default stays")
            lines += [f"**train_step**, batch {batch}: {decides}: {ratio:.2f}x ({ours[batch]:,.0f} against "
                      f"{base[batch]:,.0f} samples/s); {verdict}.", ""]
    return lines


# -- what backend="auto" runs, and what the measurements support adding to MEASURED_FASTER --------

# The op names of kernels.utils.MEASURED_FASTER and the op tables that time each (a table's
# "triton" line against its torch-only lines: eager and torch.compile of the reference).
AUTO_OPS = {"asta": ("asta_op", "asta_gathered_op"), "qnn": ("qnn",)}
AUTO_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The modes of the ASTA op tables (bench_asta) that issue 14's "Triton >= the reference" covers.
ASTA_TARGET_MODES = {"asta_op": ("fwd full mask", "fwd+bwd full mask"),
                     "asta_gathered_op": ("fwd full mask", "fwd+bwd full mask", "fwd", "fwd+bwd")}
# What an entry needs timed, Triton beside a torch line in each: every mode of each of the op's
# tables (bench_asta times the gathered op with every position live and with histories as the
# model sees them), and each dtype line of the family that the op's benchmark times on a GPU (an
# entry holds whether TF32 is on or off, and QNN's bf16 both with bf16 weights and under autocast
# with fp32 ones, as train.precision=bf16 calls it). A run a time box cut short lacks some.
REQUIRED_MODES = {**ASTA_TARGET_MODES, "qnn": ("fwd", "fwd+bwd")}
# And in each case every torch line its table times on a GPU (bench_asta, bench_qnn): a case whose
# compiled line a time box cut would otherwise rest on eager alone, where under torch.compile
# (MEASURED_FASTER's main use) the compiled line is the one to beat.
REQUIRED_TORCH_LINES = {"asta_op": ("reference eager", "reference compile"),
                        "asta_gathered_op": ("reference eager", "torch backend", "reference compile"),
                        "qnn": ("eager", "torch backend", "compile")}
REQUIRED_LABELS = {("qnn", "fp32"): ("fp32", "fp32-tf32"), ("qnn", "bf16"): ("bf16", "bf16-autocast")}
_TORCH_NAMES = {torch.float32: "torch.float32", torch.bfloat16: "torch.bfloat16", torch.float16: "torch.float16"}


def auto_evidence(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(op, dtype) -> {"won": Triton beat the best torch line in every case timed, "modes": the
    modes timed ("fwd", "fwd+bwd"), "tables": the (table, mode) pairs timed, "losses": the cases it
    lost}. A case is one line of an op table (kernel, mode, dtype, shape) holding at least one torch
    time. Where Triton was timed for the op and dtype at all, a case without a triton time, or
    without one of the torch lines of REQUIRED_TORCH_LINES, is a loss ("triton missing": it
    failed, or the time box cut it), never a case left out.
    'fp32-tf32' lines count as fp32: auto follows one entry whatever the TF32 switch says."""
    cases: dict[tuple, dict[str, float]] = {}
    for r in rows:
        op = next((op for op, tables in AUTO_OPS.items() if r["kernel"] in tables), None)
        if op is None or r["metric"] != "time" or _number(r["p50"]) is None:
            continue
        key = (op, r["dtype"].split("-")[0], r["kernel"], r["mode"], r["dtype"], f"{r['x_name']}={r['x_value']}")
        cases.setdefault(key, {})[r["provider"]] = float(r["p50"])
    timed_triton = {key[:2] for key, times in cases.items() if "triton" in times}  # (op, family)
    evidence: dict[tuple[str, str], dict] = {}
    for (op, family, kernel, mode, dtype, shape), times in cases.items():
        torch_times = [t for provider, t in times.items() if provider != "triton"]
        if (op, family) not in timed_triton or not torch_times:  # e.g. the CPU, where Triton is never timed
            continue
        entry = evidence.setdefault((op, family), {"won": True, "modes": set(), "tables": set(), "losses": []})
        entry["modes"].add(mode.split()[0])  # "fwd full mask" -> "fwd"
        entry["tables"].add((kernel, mode, dtype))
        missing = [line for line in ("triton", *REQUIRED_TORCH_LINES[kernel]) if line not in times]
        if missing:
            entry["won"] = False
            entry["losses"].append(f"{kernel} {mode} {dtype} {shape}: {', '.join(missing)} missing")
        elif times["triton"] >= min(torch_times):
            entry["won"] = False
            entry["losses"].append(f"{kernel} {mode} {dtype} {shape}: {times['triton']:.3g} vs {min(torch_times):.3g} ms")
    return evidence


def untimed_tables(op: str, family: str, evidence: dict) -> list[str]:
    """The cases (table, mode, dtype line) of REQUIRED_MODES and REQUIRED_LABELS this evidence of
    `op` in `family` lacks: an entry needs every one."""
    return [f"{table} {mode} {label}" for table in AUTO_OPS[op] for mode in REQUIRED_MODES[table]
            for label in REQUIRED_LABELS.get((op, family), (family,))
            if (table, mode, label) not in evidence["tables"]]


def measured_faster(rows: list[dict], gpu: str) -> set[tuple[str, torch.dtype, str]]:
    """The MEASURED_FASTER entries these rows support on `gpu` (as kernels.choice.where names it):
    Triton faster than the best torch line in every case timed, and every required case timed."""
    return {(op, AUTO_DTYPES[family], gpu) for (op, family), e in auto_evidence(rows).items()
            if e["won"] and family in AUTO_DTYPES and not untimed_tables(op, family, e)}


def measured_faster_source(entries) -> str:
    """The entries as Python to paste into kernels/utils.py."""
    if not entries:
        return "MEASURED_FASTER: set[tuple[str, torch.dtype, str]] = set()"
    lines = [f"    ({op!r}, {_TORCH_NAMES[dtype]}, {gpu!r})," for op, dtype, gpu in sorted(entries, key=str)]
    return "MEASURED_FASTER: set[tuple[str, torch.dtype, str]] = {\n" + "\n".join(lines) + "\n}"


def timed_section(device: torch.device) -> list[str]:
    """Where the table is silent, "auto" on a GPU times both paths once per shape class
    (kernels.choice): the decisions this machine has made, as the benchmarks that ran before
    this report made them."""
    from kernels import choice

    records = choice.decisions(device)
    try:
        where = choice.cache_file()
    except OSError as exc:  # no cache folder: what this process timed, kept nowhere
        where = f"this process (kept in no file: {exc})"
    if not records:
        return [f"No timed decisions for this device in {where}.", ""]
    return [f"Timed by backend=\"auto\" on this device ({where}; Triton runs where it took at most "
            f"{choice.MARGIN:.0%} of torch's time):", "", *choice.table(records), ""]


def auto_section(rows: list[dict], device: torch.device) -> list[str]:
    """What backend="auto" runs on this device for each op and dtype, and the table entries this
    run's op timings support."""
    from kernels.choice import where
    from kernels.utils import resolve_backend

    evidence = auto_evidence(rows)
    gpu = where(device) if device.type == "cuda" else None
    lines = [f'On {gpu or "the CPU"}, with kernels.utils.MEASURED_FASTER as committed:', "",
             '| op | dtype | the table says | this run: Triton faster than every torch line? |', "|---|---|---|---|"]
    for op in AUTO_OPS:
        for name, dtype in AUTO_DTYPES.items():
            e = evidence.get((op, name))
            if e is None:
                verdict = "not measured"
            elif not e["won"]:
                verdict = "no: " + "; ".join(e["losses"][:3])
            elif untimed_tables(op, name, e):
                verdict = "not every case timed: " + ", ".join(untimed_tables(op, name, e)) + " missing"
            else:
                verdict = "yes, fwd and fwd+bwd"
            lines.append(f"| {op} | {name} | {resolve_backend('auto', device, op, dtype)} | {verdict} |")
    lines.append("")
    lines += timed_section(device)
    if gpu is None:
        lines += ["No CUDA device: auto runs torch everywhere and nothing can be added to MEASURED_FASTER.", ""]
    else:
        lines += ["The entries this run supports (Triton faster than the best torch line, eager or compiled, "
                  "in every case timed, and every case an entry needs timed), ready to paste into "
                  "kernels/utils.py:", "", "```python", measured_faster_source(measured_faster(rows, gpu)), "```", ""]
    return lines


def render(rows: list[dict], failures: list[str], device: torch.device, quick: bool, plots: list[str],
           seconds: float | None, skipped: list[str] = (), command: str | None = None) -> str:
    """report.md; seconds None: the rows come from a CSV (bench/csv_report.py), not from this run;
    `skipped`: the CSV's lines left out, each with why (e.g. a line cut off, a figure measured again)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    parts = [
        f"# QIN benchmark report: {common.device_name(device)}",
        "",
        f"{when}; torch {torch.__version__}, triton {common.triton_version()}, commit {common.git_commit()}; "
        + (f"`{command or 'qin bench'}`, {seconds / 60:.1f} minutes. " if seconds is not None else
           "figures read from the CSV of bench/gpu_run.sh. ")
        + ("Medians (p50) of repeated runs; every ratio compares two variants measured in this same run; "
           f"where the 20th-80th percentiles of a figure span more than {WIDE_SPREAD:.0%} of it, they follow "
           "in square brackets, and its ratio is doubtful. "
           "Absolute times mean little on a CPU." if any(r["section"] != CODEGEN_SECTION for r in rows) else ""),
        "",
    ]
    if device.type == "cpu":
        parts += ["On the CPU the Triton variants are not timed: the kernels run there only through "
                  "Triton's interpreter, which checks correctness, not speed.", ""]
    if failures:
        parts += ["## Sections that failed", ""] + [f"- {f}" for f in failures] + [""]
    if skipped:
        parts += ["## CSV rows left out", ""] + [f"- `{line}`" for line in skipped] + [""]
    timed = [r for r in rows if r["section"] != CODEGEN_SECTION]
    if timed:
        parts += ["## Targets", ""] + targets(rows, device) + [""]
        if quick:
            parts += ["--quick: a training step's figure is the median of 3 steps, so these verdicts are "
                      "indicative; a full run times 8.", ""]
    train = [r for r in rows if r["kernel"] == "train_step" and r["metric"] == "throughput"]
    if train:
        ours = max(train, key=lambda r: float(r["p50"]) if not r["provider"].startswith("data") else 0)
        parts += ["## Against the authors' published speed", "",
                  "| implementation | device | samples/s |", "|---|---|---|",
                  f"| authors' FuxiCTR QIN (published, not measured here) | {AUTHORS_DEVICE} | {AUTHORS_SAMPLES_PER_S:,} |",
                  f"| ours, fastest variant ({ours['provider']}, {ours['dtype']}, batch {ours['x_value']}) | {ours['device']} | {float(ours['p50']):,.0f} |",
                  ""]
    if timed:
        parts += ['## What backend="auto" runs', ""] + auto_section(rows, device)
    choices = kernel_choices(rows)
    if choices:
        parts += ["## Kernel variants this run decides", ""] + choices
    sections = list(dict.fromkeys(r["section"] for r in rows))
    for section in sections:
        in_section = [r for r in rows if r["section"] == section]
        if section == CODEGEN_SECTION:
            parts += [f"## {section}", "", "From `triton.compile` for each target and the triton wheel's cuobjdump: "
                      "the configurations the autograd wrappers launch at the paper's shapes.", "",
                      codegen_table(in_section), ""]
        else:
            parts += [f"## {section}", ""] + pivot_tables(in_section)
    if plots:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    if seconds is None:  # from the CSV of a gpu_run.sh run, whose command made these figures
        dry = "GPU_RUN_DRY=1 " if device.type == "cpu" else ""
        parts += [f"Reproduce: `{dry}OUT=DIR bash bench/gpu_run.sh` (this report is its report stage: "
                  f"`python -m bench.csv_report DIR/results.csv --device {device.type} --out DIR/report.md`).", ""]
    else:
        parts += [f"Reproduce: `{command or 'qin bench' + (' --quick' if quick else '')} --device {device.type} "
                  f"--out DIR`.", ""]
    return "\n".join(parts)


# -- plots -----------------------------------------------------------------------------------------

def make_plots(rows: list[dict], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # Time and memory per variant, at each kernel's largest shape and first mode/dtype.
    for metric, unit_label, name in (("time", "ms", PLOT_FILES[0]), ("peak_memory", "MB", PLOT_FILES[1])):
        kernels = [k for k in dict.fromkeys(r["kernel"] for r in rows)
                   if any(r["kernel"] == k and r["metric"] == metric for r in rows)]
        if not kernels:
            continue
        fig, axes = plt.subplots(1, len(kernels), figsize=(4.5 * len(kernels), 3.6), squeeze=False)
        for ax, kernel in zip(axes[0], kernels):
            subset = [r for r in rows if r["kernel"] == kernel and r["metric"] == metric]
            groups = list(dict.fromkeys((r["mode"], r["dtype"]) for r in subset))
            labels, values = [], []
            for mode, dtype in groups:
                in_group = [r for r in subset if (r["mode"], r["dtype"]) == (mode, dtype)]
                largest = max(in_group, key=lambda r: float(r["x_value"]) if str(r["x_value"]).replace(".", "").isdigit() else 0)
                for r in in_group:
                    if r["x_value"] == largest["x_value"]:
                        labels.append(f"{r['provider']}\n{mode} {dtype}".strip())
                        values.append(float(r["p50"]))
            ax.barh(range(len(values)), values, color="tab:blue")
            ax.set_yticks(range(len(values)), labels, fontsize=6)
            ax.invert_yaxis()
            ax.set_xlabel(unit_label)
            ax.set_title(kernel, fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(str(folder / name))
    # Training throughput against batch size, one line per variant.
    train = [r for r in rows if r["kernel"] == "train_step" and r["metric"] == "throughput"
             and not r["provider"].startswith("data")]
    if train:
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider, dtype in dict.fromkeys((r["provider"], r["dtype"]) for r in train):
            points = sorted((int(r["x_value"]), float(r["p50"])) for r in train
                            if (r["provider"], r["dtype"]) == (provider, dtype))
            ax.plot(*zip(*points), marker="o", label=f"{provider} {dtype}".strip(),
                    linestyle="--" if dtype == "bf16" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("samples/s")
        ax.set_title(f"QIN training step: {train[0]['device']}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / PLOT_FILES[2], dpi=120)
        plt.close(fig)
        written.append(str(folder / PLOT_FILES[2]))
    return written


# -- the command -----------------------------------------------------------------------------------

def write_outputs(out: Path, rows: list[dict], failures: list[str], device: torch.device, quick: bool,
                  seconds: float, force: bool, command: str | None = None) -> list[str]:
    """Build everything in a temporary folder beside `out`, then move the files into place; returns
    their names."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        common.append_csv(rows, staging / "results.csv", extra_fields=("section",))
        plots = make_plots(rows, staging)
        (staging / "report.md").write_text(render(rows, failures, device, quick, plots, seconds, command=command))
        out.mkdir(exist_ok=True)
        staged = sorted(staging.iterdir())
        # Checked again, every file before any moves: something may have appeared meanwhile.
        clash = next((out / f.name for f in staged if (out / f.name).exists()), None)
        if clash is not None and not force:
            raise BenchError(f"{clash} exists; pass --force to overwrite it")
        for f in staged:
            os.replace(f, out / f.name)
        return [f.name for f in staged]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_command(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but no CUDA device is available")
    out = Path(args.out)
    blocking = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():  # found now, not after the whole run
        raise BenchError(f"--out {out}: {blocking} is a file, not a folder")
    clashes = [out / name for name in (*REPORT_FILES, *PLOT_FILES) if (out / name).exists()]
    if clashes and not args.force:
        raise BenchError(f"{clashes[0]} exists; pass --force to overwrite it, or choose another --out")
    titles = [title for title, _ in _sections(args.quick, device, args.codegen)]
    if args.only and not any(word.lower() in title.lower() for title in titles for word in args.only):
        raise BenchError(f"--only {' '.join(args.only)}: no section title holds these words; the sections are "
                         + "; ".join(titles))
    start = time.perf_counter()
    rows, failures = collect(device, args.quick, codegen=args.codegen, only=args.only)
    if not rows:
        raise BenchError("no section produced a figure: " + "; ".join(failures))
    command = " ".join(["qin bench", *(["--quick"] if args.quick else []), *(["--codegen"] if args.codegen else []),
                        *(["--only", *args.only] if args.only else [])])
    written = write_outputs(out, rows, failures, device, args.quick, time.perf_counter() - start, args.force,
                            command)
    print(f"\nwrote {', '.join(written)} in {out} ({len(rows)} result rows"
          + (f"; {len(failures)} section(s) failed, see the report" if failures else "") + ")")
    return 1 if failures else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2

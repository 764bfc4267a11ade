"""`qin bench`: one command, a report, a CSV and plots; never overwriting, never leaving partial files."""
import csv
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench.report
from qin.cli import main
from qin.synth import make_dataset


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    # As a pytest-xdist worker (the README's test command) runs it, whichever way this test runs:
    # the worker's variables must not reach the pytest-benchmark suite's own pytest.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTEST_XDIST_WORKER", os.environ.get("PYTEST_XDIST_WORKER", "gw0"))
        code = main(["bench", "--quick", "--device", "cpu", "--out", str(out)])
    return code, out


def test_quick_bench_writes_report_csv_and_plots(quick_report):
    from bench import bench_train
    from bench.report import BF16_SLOWDOWN

    code, out = quick_report
    assert code == 0, (out / "report.md").read_text() if (out / "report.md").exists() else "no report"
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "results.csv", "train_throughput.png", "time_per_variant.png"} <= names
    assert not [n for n in names if n.startswith(".")], "staging files left behind"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {"device", "torch", "triton", "timestamp", "commit"} <= set(rows[0])
    sections = {r["section"] for r in rows}
    assert {"ASTA: sparse target attention", "QNN: quadratic projection", "Training step, end to end",
            "Data loading", "pytest-benchmark suite of the fused ops"} <= sections
    assert "Several processes (DDP)" not in sections  # a few steps per process time the start-up, not DDP
    report = (out / "report.md").read_text()
    assert "`qin bench --quick`" in report and "Reproduce: `qin bench --quick --device cpu --out DIR`" in report
    assert "these verdicts are indicative" in report
    suite = [r for r in rows if r["kernel"].startswith("pytest-benchmark")]
    assert suite and all(float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in suite)
    # Each op's rows name its shape, the gathered form (training's) among them; backward adds time.
    shapes = {(r["kernel"], r["x_name"], r["x_value"]) for r in suite}
    assert shapes == {("pytest-benchmark asta", "B,L,D", "256,64,384"),
                      ("pytest-benchmark asta gathered", "B,L,D,U", "256,64,384,4096"),
                      ("pytest-benchmark qnn", "B,D,M", "256,256,4")}, shapes
    for op in ("asta", "asta gathered", "qnn"):
        fwd, both = (float(r["p50"]) for mode in ("forward", "forward+backward") for r in suite
                     if r["kernel"] == f"pytest-benchmark {op}" and r["mode"] == mode)
        assert both > fwd, op
    # The loader's figure for the MicroLens schema is the one the target reads.
    assert [(r["x_name"], r["x_value"]) for r in rows if r["kernel"] == "loader"] == [("context features", "2"),
                                                                                      ("context features", "6")]
    assert "Sections that failed" not in report, report
    assert "## Targets" in report and "21,000" in report
    assert '| qnn | fp32 | torch | not measured |' in report  # what backend="auto" runs here
    # The gathered op's table times the torch backend that "auto" trains with, not only the reference.
    gathered = {r["provider"] for r in rows if r["kernel"] == "asta_gathered_op" and r["mode"].startswith("fwd+bwd")}
    assert {"reference eager", "torch backend"} <= gathered
    # and the two ways the torch backend can sum the gradient into the representations.
    ways = {r["provider"] for r in rows if r["kernel"] == "asta_reps_gradient" and r["metric"] == "time"}
    assert ways == {"sparse product", "scatter"}
    # Every ratio in the training table compares with the literal eager model of the same run.
    providers = {r["provider"] for r in rows if r["kernel"] == "train_step"}
    assert {"literal eager", "+ hoisted ASTA", "+ item dedup"} <= providers
    # Mixed precision beside fp32, same run: a bf16 step, and the bytes saved for backward; on a CPU
    # without bf16 instructions, no bf16 step, and the report says why (the bytes: the test below).
    speed = {(r["provider"], r["dtype"]) for r in rows if r["kernel"] == "train_step" and r["metric"] == "throughput"}
    slowdown = [float(r["p50"]) for r in rows if r["metric"] == BF16_SLOWDOWN]
    assert bool(slowdown) == (bench_train.bf16_left_out(torch.device("cpu")) is not None), slowdown
    bf16_op = "+ item dedup, ASTA op in bf16, autocast bf16"  # model.asta_precision=autocast
    if slowdown:
        assert ("+ item dedup", "fp32") in speed and not [name for name, dtype in speed if dtype == "bf16"]
        step = _target(report.splitlines(), "CPU: training step in bf16 >= 2.0x fp32 (default model")
        assert "bf16 matrix products ran" in step
    else:
        assert {("+ item dedup", "fp32"), ("+ item dedup, autocast bf16", "bf16"), (bf16_op, "bf16")} <= speed
        saved = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "saved_bytes"}
        assert 0 < saved[bf16_op] < saved["+ item dedup, autocast bf16"] < saved["+ item dedup"] < saved["literal eager"]
    assert "training step in bf16 >= 2.0x fp32 (default model" in report
    assert "Saved for backward: bf16 bytes/sample <= 0.55x fp32 (model.asta_precision=autocast)" in report


def test_bf16_keeps_fewer_bytes_for_backward_than_fp32_and_the_op_in_bf16_fewer_still():
    """Issue 15's memory figure, from bench_train's own variants and count, on any CPU (the quick
    bench leaves the bf16 steps out where bf16 has no instructions; one forward each is cheap)."""
    from bench import bench_train
    from qin.config import QINConfig

    cpu = torch.device("cpu")
    data = bench_train.synthetic_batch(256, cpu)
    variants = {name: (overrides, amp) for name, overrides, _, amp in bench_train.VARIANTS}

    def saved(name):
        overrides, amp = variants[name]
        model = bench_train.build(QINConfig(**overrides), cpu)
        return bench_train.saved_bytes(lambda: bench_train._forward_loss(model, data, amp),
                                       [*model.parameters(), *model.buffers(), *data.values()])

    names = ("+ item dedup, ASTA op in bf16, autocast bf16", "+ item dedup, autocast bf16", "+ item dedup",
             "literal eager")
    sizes = [saved(name) for name in names]
    assert 0 < sizes[0] < sizes[1] < sizes[2] < sizes[3], dict(zip(names, sizes))


def test_saved_bytes_counts_each_storage_once_and_leaves_resident_tensors_out():
    from bench.bench_train import saved_bytes

    weight, x = torch.randn(64, requires_grad=True), torch.randn(64)
    # x * weight saves x; exp saves its output, which the next product saves again (one storage);
    # the weight, saved twice, is resident and left out.
    assert saved_bytes(lambda: (torch.exp(x * weight) * weight).sum(), [weight]) == 64 * 4 * 2
    # x * x saves x twice: one storage.
    assert saved_bytes(lambda: (x * x.requires_grad_()).sum(), []) == 64 * 4


def test_bench_never_overwrites_without_force(quick_report, capsys):
    _, out = quick_report
    before = (out / "report.md").read_bytes()
    assert main(["bench", "--quick", "--device", "cpu", "--only", "ceilings", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "report.md").read_bytes() == before
    assert main(["bench", "--quick", "--device", "cpu", "--only", "ceilings", "--out", str(out), "--force"]) == 0
    assert (out / "report.md").read_bytes() != before


def test_a_failed_bench_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    def broken(quick, device, codegen):
        def fail():
            raise RuntimeError("device lost")
        return [("Broken section", fail)]

    monkeypatch.setattr(bench.report, "_sections", broken)
    out = tmp_path / "report"
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out)]) == 2
    assert "device lost" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_codegen_table_alone(tmp_path, capsys):
    out = tmp_path / "codegen"
    assert main(["bench", "--codegen", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    for kernel in ("asta_fwd", "asta_bwd", "asta_gather_fwd", "asta_gather_bwd", "qnn_dropout_sum", "qnn_masked_grad"):
        assert f"| {kernel} | bf16 | sm_90 |" in report and f"| {kernel} | fp32 | sm_89 |" in report
        assert kernel in printed
    assert "## Targets" not in report and "Medians" not in report  # nothing was timed
    assert "`qin bench --codegen`" in report and "Reproduce: `qin bench --codegen --device cpu --out DIR`" in report


def _time(kernel, provider, mode, dtype, p50):
    return {"kernel": kernel, "provider": provider, "mode": mode, "metric": "time", "unit": "ms",
            "x_name": "batch", "x_value": 8192, "p50": p50, "dtype": dtype}


def _lines(kernel, dtype, times, mode_suffix="", torch_names=("reference eager", "reference compile")):
    """Rows of one op table: times = {mode: (eager, compiled, triton)}; the third torch line of the
    gathered op's and the QNN's tables (their torch backend, what "auto" trains with) takes the
    eager time."""
    rows = []
    for mode, values in times.items():
        for provider, p50 in zip((*torch_names, "triton"), values):
            rows.append(_time(kernel, provider, mode + mode_suffix, dtype, p50))
        if kernel in ("asta_gathered_op", "qnn"):
            rows.append(_time(kernel, "torch backend", mode + mode_suffix, dtype, values[0]))
    return rows


def test_measured_faster_needs_triton_ahead_of_every_torch_line_in_both_modes():
    from bench.report import auto_evidence, measured_faster, measured_faster_source

    qnn = ("eager", "compile")
    wins = {"fwd": (1.0, 0.8, 0.7), "fwd+bwd": (3.0, 2.5, 2.0)}
    loses_to_compile = {"fwd": (1.0, 0.8, 0.7), "fwd+bwd": (3.0, 1.9, 2.0)}
    rows = (_lines("qnn", "bf16", wins, torch_names=qnn)  # an entry: bf16 tensors ...
            + _lines("qnn", "bf16-autocast", wins, torch_names=qnn)  # ... and fp32 ones under autocast
            + _lines("qnn", "fp32", wins, torch_names=qnn)  # TF32 off: wins ...
            + _lines("qnn", "fp32-tf32", loses_to_compile, torch_names=qnn)  # ... TF32 on: loses, so no entry
            + _lines("asta_op", "bf16", wins, " full mask")  # the plain form wins,
            + _lines("asta_gathered_op", "bf16", loses_to_compile)  # the gathered loses: no entry
            + _lines("asta_op", "fp32", wins, " full mask") + _lines("asta_gathered_op", "fp32", wins, " full mask")
            + _lines("asta_gathered_op", "fp32", wins)  # an entry
            + _lines("asta_op", "fp16", {"fwd": (1.0, 0.8, 0.7)}, " full mask")  # fwd alone: no entry
            + _lines("qnn_stack", "fp16", wins, torch_names=qnn))  # not an op table of auto: ignored
    # Only times count: a higher bandwidth is not a faster kernel.
    rows.append(dict(_time("qnn", "triton", "fwd", "fp16", 9.0), metric="tflops"))
    rows.append(dict(_time("qnn", "eager", "fwd", "fp16", 1.0), metric="tflops"))
    cap = "Fake H200 sm_90"
    assert measured_faster(rows, cap) == {("qnn", torch.bfloat16, cap), ("asta", torch.float32, cap)}
    evidence = auto_evidence(rows)
    assert ("qnn", "fp16") not in evidence and evidence[("asta", "fp16")]["modes"] == {"fwd"}
    assert "asta_gathered_op fwd+bwd bf16" in evidence[("asta", "bf16")]["losses"][0]
    # A tie is not faster: the same complete evidence as the entry above, one case tied.
    tied = {"fwd": (1.0, 0.8, 0.7), "fwd+bwd": (3.0, 2.0, 2.0)}
    assert measured_faster(_lines("qnn", "bf16", wins, torch_names=qnn)
                           + _lines("qnn", "bf16-autocast", wins, torch_names=qnn), cap) == {("qnn", torch.bfloat16, cap)}
    assert measured_faster(_lines("qnn", "bf16", wins, torch_names=qnn)
                           + _lines("qnn", "bf16-autocast", tied, torch_names=qnn), cap) == set()
    # The printed source is the set itself, ready to paste.
    for entries in (measured_faster(rows, cap), set()):
        namespace = {"torch": torch}
        exec(measured_faster_source(entries), namespace)
        assert namespace["MEASURED_FASTER"] == entries


def test_a_run_cut_short_supports_no_entry_and_says_what_is_missing():
    # A time box cuts the last cases of a stage: the gathered op's histories as the model sees them
    # (after its every-position-live cases), fp32 with TF32 on, bf16 under autocast. Triton may
    # lose exactly there, so an entry must not rest on the cases before the cut.
    from bench.report import auto_evidence, measured_faster, untimed_tables

    qnn, wins = ("eager", "compile"), {"fwd": (1.0, 0.8, 0.7), "fwd+bwd": (3.0, 2.5, 2.0)}
    rows = (_lines("asta_op", "fp16", wins, " full mask") + _lines("asta_gathered_op", "fp16", wins, " full mask")
            + _lines("qnn", "fp32", wins, torch_names=qnn) + _lines("qnn", "bf16", wins, torch_names=qnn))
    assert measured_faster(rows, "Fake H200 sm_90") == set()
    evidence = auto_evidence(rows)
    assert untimed_tables("asta", "fp16", evidence[("asta", "fp16")]) == [
        "asta_gathered_op fwd fp16", "asta_gathered_op fwd+bwd fp16"]
    assert untimed_tables("qnn", "fp32", evidence[("qnn", "fp32")]) == ["qnn fwd fp32-tf32", "qnn fwd+bwd fp32-tf32"]
    assert untimed_tables("qnn", "bf16", evidence[("qnn", "bf16")]) == [
        "qnn fwd bf16-autocast", "qnn fwd+bwd bf16-autocast"]
    complete = rows + _lines("asta_gathered_op", "fp16", wins) + _lines("qnn", "fp32-tf32", wins, torch_names=qnn)
    assert measured_faster(complete, "Fake H200 sm_90") == {("asta", torch.float16, "Fake H200 sm_90"),
                                                            ("qnn", torch.float32, "Fake H200 sm_90")}


def test_a_case_whose_compiled_line_was_cut_supports_no_entry():
    # Under torch.compile (where the table serves) the compiled torch line is the one to beat:
    # Triton ahead of eager alone is no evidence.
    from bench.report import auto_evidence, measured_faster

    qnn, wins = ("eager", "compile"), {"fwd": (1.0, 0.8, 0.7), "fwd+bwd": (3.0, 2.5, 2.0)}
    rows = _lines("qnn", "bf16", wins, torch_names=qnn) + _lines("qnn", "bf16-autocast", wins, torch_names=qnn)
    cut = [r for r in rows if not (r["dtype"] == "bf16-autocast" and r["mode"] == "fwd+bwd" and r["provider"] == "compile")]
    assert measured_faster(rows, "Fake H200 sm_90") == {("qnn", torch.bfloat16, "Fake H200 sm_90")}
    assert measured_faster(cut, "Fake H200 sm_90") == set()
    assert auto_evidence(cut)[("qnn", "bf16")]["losses"] == ["qnn fwd+bwd bf16-autocast batch=8192: compile missing"]
    # Nor ahead of the reference without the torch backend that "auto" trains with beside it.
    no_backend = [r for r in rows if not (r["dtype"] == "bf16" and r["mode"] == "fwd" and r["provider"] == "torch backend")]
    assert measured_faster(no_backend, "Fake H200 sm_90") == set()
    assert auto_evidence(no_backend)[("qnn", "bf16")]["losses"] == ["qnn fwd bf16 batch=8192: torch backend missing"]


def test_report_says_what_auto_runs_on_the_device(monkeypatch):
    import kernels.utils
    from bench.report import auto_section

    from kernels import choice

    wins = {"fwd": (1.0, 0.8, 0.7), "fwd+bwd": (3.0, 2.5, 2.0)}
    rows = (_lines("qnn", "bf16", wins, torch_names=("eager", "compile"))
            + _lines("qnn", "bf16-autocast", wins, torch_names=("eager", "compile")))
    cpu = "\n".join(auto_section(rows, torch.device("cpu")))
    assert "| qnn | bf16 | torch | yes, fwd and fwd+bwd |" in cpu and "| asta | fp32 | torch | not measured |" in cpu
    assert "```python" not in cpu  # no GPU to key an entry on
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H200")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(kernels.utils, "MEASURED_FASTER", {("qnn", torch.bfloat16, "Fake H200 sm_90")})
    choice.forget()  # the GPU's name is asked afresh
    try:
        gpu = "\n".join(auto_section(rows, torch.device("cuda")))
    finally:
        choice.forget()
    assert "On Fake H200 sm_90, with kernels.utils.MEASURED_FASTER as committed" in gpu
    assert "| qnn | bf16 | triton |" in gpu and "| qnn | fp32 | torch |" in gpu and "| asta | bf16 | torch |" in gpu
    assert "('qnn', torch.bfloat16, 'Fake H200 sm_90')," in gpu


def test_every_training_variant_is_a_valid_config():
    from bench.bench_train import (CPU_VARIANTS, CUDA_GRAPHS, GRAPH_SAFE, QNN_AUTOGRAD, QNN_FUNCTION, VARIANTS,
                                   WHOLE_STEP_GRAPH)
    from qin.config import QINConfig

    names = [name for name, *_ in VARIANTS]
    assert len(set(names)) == len(names) and set(CPU_VARIANTS) <= set(names)
    for name, overrides, compiled, amp in VARIANTS:
        QINConfig(**overrides).validate()
        assert amp in (None, torch.bfloat16, torch.float16), name
        assert compiled in (False, True, CUDA_GRAPHS, GRAPH_SAFE, QNN_AUTOGRAD, QNN_FUNCTION, WHOLE_STEP_GRAPH), name
        # The whole-step graph has no gradient scaler (fp16's) and needs CUDA.
        assert compiled != WHOLE_STEP_GRAPH or (amp != torch.float16 and name not in CPU_VARIANTS), name


def test_the_whole_step_graph_is_captured_after_warm_up_steps_on_a_side_stream(monkeypatch):
    """bench_train.whole_step_graph follows torch.cuda.graph's whole-network recipe (CUDA's objects
    stand in for here: the capture itself needs a GPU)."""
    import contextlib

    from bench import bench_train

    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits for {other.name}")

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def on(stream):
        log.append(f"on {stream.name}")
        yield
        log.append(f"off {stream.name}")

    @contextlib.contextmanager
    def capture(graph):
        log.append("capture")
        yield
        log.append("captured")

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream("main"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)

    class Optimizer:
        def zero_grad(self, set_to_none):
            assert set_to_none  # the captured backward allocates the gradients in the graph's pool
            log.append("zero_grad")

    replay = bench_train.whole_step_graph(lambda: log.append("step"), Optimizer(), torch.device("cuda"), warmup=2)
    assert log == ["side waits for main", "on side", "zero_grad", "step", "zero_grad", "step", "off side",
                   "main waits for side", "zero_grad", "capture", "step", "captured"]
    log.clear()
    replay()
    assert log == ["replay"]


def _gpu_run(tmp_path, rows=(), **env):
    """bench/gpu_run.sh in its CPU dry mode, with `rows` already in its results.csv."""
    import os
    import subprocess
    import sys

    from bench.common import append_csv

    out = tmp_path / "out"
    if rows:
        append_csv(list(rows), out / "results.csv")
    # The script calls `python3`: this interpreter's, even where its venv is not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # QIN_CACHE: the script would make a fresh folder under /tmp and leave it.
    env = {**os.environ, "PATH": path, "OUT": str(out), "GPU_RUN_DRY": "1", "QIN_CACHE": str(tmp_path / "cache"),
           **env}
    result = subprocess.run(["bash", "bench/gpu_run.sh"], env=env, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parent.parent)
    return result, out


def test_gpu_run_dry_mode_runs_its_stages_on_the_cpu(tmp_path):
    # The whole dry run takes minutes on a 2-core CPU: the device stage and the report from rows
    # already in the CSV show the script's plumbing; each benchmark's CPU path has its own test.
    from bench.common import make_row

    rows = [make_row("train_step", "literal eager", "full", "throughput", "samples/s", "batch", 64, 7.0,
                     torch.device("cpu"), "fp32")]
    result, out = _gpu_run(tmp_path, rows, GPU_RUN_STAGES="device report")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    device = (out / "device.txt").read_text()
    assert "torch" in device and "triton" in device and "stage report: exit 0" in device
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "| qnn | bf16 | torch | not measured |" in report
    # On a GPU the training step is timed with --quick and the report says so; here (8 steps) not.
    assert "--quick:" not in report
    cuda_branch = Path("bench/gpu_run.sh").read_text().split("DEV=cuda", 1)[1].split("fi\n", 1)[0]
    assert "REPORT=(--device cuda --quick)" in cuda_branch
    assert len(list(out.rglob("*"))) <= 8


def test_gpu_run_full_run_stage_trains_to_the_end_on_the_cpu(tmp_path):
    """The fullrun stage (bench/full_run.py): on the CPU the eager run alone, to its last epoch,
    its table in bench.log."""
    result, out = _gpu_run(tmp_path, GPU_RUN_STAGES="device fullrun")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "stage fullrun: exit 0" in (out / "device.txt").read_text()
    log = (out / "bench.log").read_text()
    assert "| run | wall s |" in log and "| eager |" in log and "CUDA graphs |" not in log
    assert len([line for line in log.splitlines() if line.startswith("| eager |")]) == 2  # both epochs


def test_full_run_reads_the_compile_time_the_trainer_logs():
    import inspect

    from bench.full_run import COMPILE_LINE, compile_seconds
    from qin import train

    assert f'f"{COMPILE_LINE}{{' in inspect.getsource(train)  # the trainer still logs it so
    assert compile_seconds(f"epoch 1\n[qin] {COMPILE_LINE}41.5 s, compilation included\n") == 41.5
    assert compile_seconds("epoch 1: train loss 0.5") is None


def test_full_run_says_after_how_many_samples_graphs_pay_back_their_compile():
    from bench.full_run import MICROLENS_TRAIN_ROWS, payback, steady_rate

    def run(rates, compile_s=None):
        return {"compile_s": compile_s, "epochs": [{"samples_per_s": r} for r in rates]}

    eager, graphs = run([500_000, 750_000]), run([20_000, 1_500_000], compile_s=60.0)
    assert steady_rate(graphs) == 1_500_000  # the last epoch: the first carries the compile
    # 60 s = N / 750k - N / 1.5M  ->  N = 90M samples
    line = payback(eager, graphs, rows=500_000)
    assert "2.00x" in line and "90,000,000 samples" in line and "180.0 epochs of this data" in line
    assert f"{90e6 / MICROLENS_TRAIN_ROWS:.1f} of MicroLens" in line
    assert "never paid back" in payback(eager, run([700_000], compile_s=60.0), rows=500_000)
    assert payback(eager, run([1_500_000]), rows=500_000) is None  # no compile time logged


def test_gpu_run_skips_a_stage_the_budget_cannot_fit(tmp_path):
    result, out = _gpu_run(tmp_path, GPU_RUN_STAGES="report", GPU_RUN_BUDGET="5")
    assert result.returncode == 1
    assert "stage report: not run" in (out / "device.txt").read_text() and not (out / "report.md").exists()


def test_report_from_the_csv_of_a_gpu_run(tmp_path):
    from bench import csv_report
    from bench.common import append_csv, make_row

    cpu = torch.device("cpu")
    rows = [make_row("train_step", name, "full", "throughput", "samples/s", "batch", 1024, value, cpu, "fp32")
            for name, value in (("literal eager", 100.0), ("+ item dedup", 300.0))]
    rows += [make_row("asta_gathered_op", "reference eager", "fwd+bwd full mask", "time", "ms", "batch", 256, 2.0,
                      cpu, "fp32")]
    append_csv(rows, tmp_path / "results.csv")
    assert csv_report.main([str(tmp_path / "results.csv"), "--device", "cpu", "--out", str(tmp_path / "report.md")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "3.00x (+ item dedup, batch 1024" in report  # the targets, from the CSV's rows
    assert "## Training step, end to end" in report and "## ASTA: sparse target attention" in report
    assert "| asta | fp32 | torch | not measured |" in report and "read from the CSV" in report
    # Its figures came from gpu_run.sh's stages, not from `qin bench`.
    assert "Reproduce: `GPU_RUN_DRY=1 OUT=DIR bash bench/gpu_run.sh`" in report and "`qin bench" not in report
    assert "--quick:" not in report
    assert csv_report.main([str(tmp_path / "results.csv"), "--device", "cpu", "--out", str(tmp_path / "quick.md"),
                            "--quick"]) == 0
    assert "--quick: a training step's figure is the median of 3 steps" in (tmp_path / "quick.md").read_text()
    assert csv_report.main([str(tmp_path / "missing.csv"), "--device", "cpu"]) == 1


def test_the_ddp_line_tries_once_more_when_a_rank_was_killed_by_a_signal(monkeypatch):
    from bench import bench_ddp

    calls = []

    def killed_once(data, out, procs, device, overrides):
        assert "train.precision=fp32" in overrides  # as the rows say (auto is bf16 on a recent GPU)
        calls.append(procs)
        if procs == 2 and calls.count(2) == 1:
            raise RuntimeError("2-process training failed (exit 1):\ntraceback : Signal 6 (SIGABRT) received by PID 7")
        return [100.0 * procs]

    monkeypatch.setattr(bench_ddp, "make_dataset", lambda *args, **kwargs: "data")
    monkeypatch.setattr(bench_ddp, "train_samples_per_s", killed_once)
    rows = bench_ddp.run(torch.device("cpu"), quick=True)
    assert calls == [1, 2, 2]
    assert [r["provider"] for r in rows] == ["1 process", "2 processes (second try: a rank of the first was killed by a signal)"]
    assert rows[1]["p50"] == 200.0

    def broken(data, out, procs, device, overrides):
        raise RuntimeError("2-process training failed (exit 1):\nValueError: bad config")

    monkeypatch.setattr(bench_ddp, "train_samples_per_s", broken)
    with pytest.raises(RuntimeError, match="bad config"):
        bench_ddp.run(torch.device("cpu"), quick=True)


def test_the_ddp_lines_launch_their_process_count_and_read_every_epoch_after_the_warm_up(tmp_path, monkeypatch):
    from bench import bench_ddp

    commands = []

    def finished(command, env, timeout):
        commands.append(command)
        out = Path(command[command.index("--out") + 1])
        out.mkdir()
        epochs = [{"epoch": 1, "samples_per_s": 1.0}, {"epoch": 2, "samples_per_s": 300.0},
                  {"epoch": 3, "samples_per_s": None}, {"epoch": 4, "samples_per_s": 100.0}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bench_ddp, "run_to_the_end", finished)
    assert bench_ddp.train_samples_per_s(tmp_path / "d", tmp_path / "one", 1, torch.device("cpu"), []) == [300.0, 100.0]
    assert bench_ddp.train_samples_per_s(tmp_path / "d", tmp_path / "two", 2, torch.device("cpu"), []) == [300.0, 100.0]
    assert "torch.distributed.run" not in commands[0] and "train.device=cpu" in commands[0]
    assert "--nproc-per-node=2" in commands[1] and commands[1][commands[1].index("-m", 2) + 1] == "qin"
    # Every line trains the same global batch, a multiple of the processes.
    cuda = torch.device("cuda")
    assert [bench_ddp.global_batch(cuda, n) for n in (1, 2, 3, 7)] == [8192, 8192, 8190, 8190]
    assert bench_ddp.global_batch(torch.device("cpu"), 2) == 1024


def test_the_ddp_line_reads_what_a_real_run_wrote(tmp_path):
    """One real `qin train` through the benchmark: the figures are metrics.jsonl's epochs 2 and 3."""
    from bench import bench_ddp

    data = make_dataset(tmp_path / "data", rows=300, items=30, seed=0, valid_rows=50, test_rows=5)
    overrides = ["model.embed_dim=4", "model.attention_dim=8", "train.batch_size=64", "train.epochs=3",
                 "train.max_steps_per_epoch=2"]
    rates = bench_ddp.train_samples_per_s(data, tmp_path / "run", 1, torch.device("cpu"), overrides)
    logged = [json.loads(line)["samples_per_s"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and rates == logged[1:]


def test_a_ddp_run_past_its_time_leaves_no_rank_running(tmp_path, monkeypatch):
    """torchrun starts its ranks in sessions of their own: killing torchrun alone left them
    training. The worker here only writes its pid and sleeps."""
    from bench import bench_ddp

    worker, pid_file = tmp_path / "worker.py", tmp_path / "pid"
    worker.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(worker),
               str(pid_file)]

    class TimedOnceTheWorkerRuns(subprocess.Popen):
        """The 15 s start once the worker has written its pid: torchrun's own start (importing
        torch, the rendezvous) took 34-38 s on a loaded 2-core machine."""
        def communicate(self, input=None, timeout=None):
            deadline = time.time() + 180
            while timeout == 15 and not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
                time.sleep(0.1)
            return super().communicate(input, timeout)

    monkeypatch.setattr(bench_ddp.subprocess, "Popen", TimedOnceTheWorkerRuns)
    with pytest.raises(RuntimeError, match="still running after 15 s; stopped"):
        bench_ddp.run_to_the_end(command, {**os.environ, "TMPDIR": str(tmp_path)}, timeout=15)
    pid = int(pid_file.read_text())  # the worker had started
    time.sleep(1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


PARENT_OF_A_DDP_JOB = """
import os, sys
from bench import bench_ddp

command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", sys.argv[1], sys.argv[2]]
bench_ddp.run_to_the_end(command, dict(os.environ), timeout=300)
"""


def test_a_ddp_run_whose_benchmark_is_killed_leaves_no_rank_running(tmp_path):
    """`kill` (SIGTERM) of the benchmark, not of its process group: it ended the benchmark where it
    waited, and left torchrun and its ranks running."""
    worker, pid_file, parent = tmp_path / "worker.py", tmp_path / "pid", tmp_path / "parent.py"
    worker.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    parent.write_text(PARENT_OF_A_DDP_JOB)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(parent), str(worker), str(pid_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())  # the worker has started
    proc.terminate()
    assert proc.wait(timeout=90) != 0
    time.sleep(1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_suite_without_its_plugin_says_what_to_install(monkeypatch):
    import importlib.util

    from bench.report import BenchError, pytest_benchmark_rows

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest_benchmark" else
                        find_spec(name, *a))
    with pytest.raises(BenchError, match=r'needs pytest_benchmark: pip install -e "\.\[bench\]"'):
        pytest_benchmark_rows(torch.device("cpu"), quick=True)


def test_the_loader_figure_is_whole_epochs_over_their_median_time(monkeypatch):
    from bench import bench_loader

    split = bench_loader.make_split(20_000)
    epochs = []

    def timed_once(fn, device, **kwargs):  # each call of fn is one timed epoch
        fn()
        epochs.append(1)
        return (100.0, 90.0, 110.0)

    monkeypatch.setattr(bench_loader, "time_ms", timed_once)
    assert bench_loader.assembly_throughput(split, torch.device("cpu"), reps=3) == (200_000.0, 20_000 / 0.11,
                                                                                     20_000 / 0.09)
    # An epoch that stops short is refused, not timed as if whole.
    whole = bench_loader.iterate_batches
    monkeypatch.setattr(bench_loader, "iterate_batches", lambda *args, **kwargs: list(whole(*args, **kwargs))[:-1])
    with pytest.raises(RuntimeError, match=r"an epoch delivered 16384 of 20000 rows"):
        bench_loader.assembly_throughput(split, torch.device("cpu"), reps=3)


def test_cpu_name_gives_the_family_and_model_a_virtual_machine_hides_behind_a_vendor_line(tmp_path, monkeypatch):
    import qin.train
    from bench.common import cpu_name
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: AMD EPYC\nflags\t\t: fpu avx512_bf16\n\n"
                       "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: other\n")
    monkeypatch.setattr(qin.train, "cpu_has_bf16", lambda: True)
    assert cpu_name(str(cpuinfo)).startswith("CPU AMD EPYC (family 26, model 2) AVX512-BF16 x")
    monkeypatch.setattr(qin.train, "cpu_has_bf16", lambda: False)
    assert "AVX512-BF16" not in cpu_name(str(cpuinfo))
    assert cpu_name(str(tmp_path / "absent")).startswith("CPU ")  # no /proc: the machine type


# -- the GPU run's pipeline, checked on the CPU with hand-made rows -----------------------------------

def _row(kernel, provider, metric, value, dtype, mode="full", batch=8192):
    from bench.common import make_row
    return make_row(kernel, provider, mode, metric, "x", "batch", batch, value, torch.device("cpu"), dtype)


def _target(lines, start):
    found = [line for line in lines if line.startswith(f"| {start}")]
    assert len(found) == 1, (start, lines)
    return found[0]


def test_gpu_targets_read_the_bf16_steps_and_issue_14s_op_lines(monkeypatch):
    from bench.report import targets

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H200")
    speeds = {("literal eager", "fp32"): 100e3, ("+ item dedup", "fp32"): 245e3, ("default (auto)", "fp32"): 330e3,
              ("literal + torch.compile, autocast bf16", "bf16"): 420e3,
              ("default (auto), autocast bf16", "bf16"): 672e3,
              ("default (auto) + torch.compile, autocast bf16", "bf16"): 600e3,
              ("default (auto) + CUDA graphs, autocast bf16", "bf16"): 840e3}
    rows = [_row("train_step", name, "throughput", value, dtype) for (name, dtype), value in speeds.items()]
    rows += [_row("qnn", "triton", "speedup_vs_eager", 0.8, "fp32", "fwd+bwd"),
             _row("qnn", "triton", "speedup_vs_eager", 1.2, "bf16", "fwd+bwd")]
    rows += [_row("asta_op", "triton", "speedup_vs_reference", ratio, dtype, mode)
             for dtype, mode, ratio in (("bf16", "fwd full mask", 1.1), ("bf16", "fwd+bwd full mask", 1.3),
                                        ("fp32", "fwd full mask", 0.9), ("fp32", "fwd+bwd full mask", 1.2))]
    rows += [_row("asta_gathered_op", "triton", "speedup_vs_reference", 1.5, "bf16", mode)
             for mode in ("fwd full mask", "fwd+bwd full mask")]  # its realistic-mask modes cut off
    lines = targets(rows, torch.device("cuda"))
    assert "1.35x (330,000 vs 245,000" in _target(lines, "GPU fp32: default step >= 1.3x")
    # The bf16 pairs: every throughput row counts, whatever its dtype.
    assert _target(lines, "GPU bf16: default step under autocast").endswith("1.60x (672,000 vs 420,000 samples/s) | met |")
    assert _target(lines, "GPU bf16, both compiled").endswith("1.43x (600,000 vs 420,000 samples/s) | not met |")
    assert _target(lines, "GPU bf16, CUDA graphs").endswith("2.00x (840,000 vs 420,000 samples/s) | met |")
    assert _target(lines, "GPU: QNN projection fp32 fwd+bwd Triton >= 1.0x").endswith("| 0.80x | not met |")
    assert _target(lines, "GPU: QNN projection bf16 fwd+bwd Triton >= 1.0x").endswith("| 1.20x | met |")
    assert _target(lines, "GPU: asta_op bf16 Triton >= the reference").endswith(
        "| fwd full mask 1.10x, fwd+bwd full mask 1.30x | met |")
    assert _target(lines, "GPU: asta_op fp32 Triton >= the reference").endswith("| not met |")
    assert _target(lines, "GPU: asta_gathered_op bf16 Triton").endswith("unmeasured: fwd, fwd+bwd | partly measured |")
    assert _target(lines, "GPU: asta_op fp16 Triton").endswith("| unmeasured | unmeasured |")


def test_cpu_targets_read_the_headline_batch_when_larger_ones_were_timed_too():
    from bench.report import targets

    rows = [_row("train_step", name, "throughput", value, "fp32", batch=batch)
            for batch, values in ((1024, (500, 1200)), (2048, (400, 1300)))
            for name, value in zip(("literal eager", "+ item dedup"), values)]
    lines = targets(rows, torch.device("cpu"))
    assert _target(lines, "CPU: full training step >= 2x").endswith(
        "| 2.40x (+ item dedup, batch 1024: 1,200 vs 500 samples/s) | met |")


@pytest.mark.parametrize("slowdown", [48.0, 1.5, None])
def test_a_cpu_without_bf16_instructions_times_no_bf16_variant_and_the_report_says_why(slowdown, monkeypatch, capsys):
    """Where a bf16 matrix product runs more than SLOW_MATMUL times slower than fp32's (torch's scalar
    loop on a CPU without bf16 instructions), bench_train leaves every bf16 variant out, says so and
    records the slowdown; the report's bf16 targets then say why they are unmeasured. Elsewhere
    (a fast or no probe) the bf16 variants run."""
    from bench import bench_train
    from bench.report import BF16_SLOWDOWN, targets
    from qin.train import SLOW_MATMUL

    monkeypatch.setattr(bench_train, "matmul_slowdown", lambda device, precision: slowdown)
    monkeypatch.setattr(bench_train, "CPU_VARIANTS", ("literal eager", "literal eager, autocast bf16"))
    ran = []
    monkeypatch.setattr(bench_train, "build", lambda cfg, device: ran.append(cfg) or (_ for _ in ()).throw(
        RuntimeError("not built in this test")))
    monkeypatch.setattr(bench_train, "loader_rows", lambda *args: iter(()))
    rows = bench_train.run(torch.device("cpu"), quick=True)
    out = capsys.readouterr().out
    left_out = slowdown is not None and slowdown > SLOW_MATMUL
    assert len(ran) == (1 if left_out else 2), out  # each variant tried reaches build, the bf16 one only if kept
    assert ("bf16 variants left out" in out) == left_out, out
    assert [r["p50"] for r in rows if r["metric"] == BF16_SLOWDOWN] == ([slowdown] if left_out else [])
    fp32 = [_row("train_step", name, "throughput", 1000.0, "fp32", batch=1024)
            for name in ("literal eager", "+ item dedup")]
    lines = targets(rows + fp32, torch.device("cpu"))
    step, saved = (_target(lines, f"{what} (default model")
                   for what in ("CPU: training step in bf16 >= 2.0x fp32",
                                "Saved for backward: bf16 bytes/sample <= 0.55x fp32"))
    for line in (step, saved):
        assert line.endswith("| unmeasured |"), line
        assert ("ran 48x slower than fp32's on this CPU (no bf16 instructions)" in line) == left_out, line


def test_gpu_step_targets_read_batch_8192_when_a_larger_batch_was_timed_too(monkeypatch):
    from bench.report import targets

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H100")
    rows = [_row("train_step", name, "throughput", value, "fp32", batch=batch)
            for batch in (8192, 16384) for name, value in (("literal eager", 30e3), ("default (auto)", 330e3))]
    rows += [_row("train_step", name, "peak_memory", value, "fp32") for name, value in
             (("literal eager", 6000), ("default (auto)", 1500))]
    lines = targets(rows, torch.device("cuda"))
    assert _target(lines, "GPU: >= 10x the literal").endswith(
        "11.0x (default (auto): 330,000 vs 30,000 samples/s) | met |")
    assert _target(lines, "GPU (H100 class)").endswith("330,000 samples/s (default (auto)) on Fake H100 | met |")
    assert _target(lines, "GPU: peak training memory <= 1/3").endswith("| 0.25 (1,500 vs 6,000 MB) | met |")


def test_a_figure_measured_again_replaces_the_earlier_one_everywhere_and_nan_is_no_figure(tmp_path, monkeypatch):
    from bench import csv_report
    from bench.common import append_csv
    from bench.report import auto_evidence, pivot_tables, targets

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H200")
    path = tmp_path / "results.csv"
    first = [_row("qnn", "triton", "speedup_vs_eager", 0.91, "bf16", "fwd+bwd"),
             _row("asta_op", "triton", "speedup_vs_reference", 0.9, "fp32", "fwd full mask")]
    again = [_row("qnn", "triton", "speedup_vs_eager", 1.2, "bf16", "fwd+bwd"),  # the stage run again
             _row("asta_op", "triton", "speedup_vs_reference", 1.1, "fp32", "fwd full mask"),
             _row("asta_op", "triton", "speedup_vs_reference", "nan", "fp32", "fwd+bwd full mask")]
    append_csv(first, path)
    append_csv(again, path)
    rows, skipped = csv_report.read_rows(path)
    assert len(rows) == 2 and len(skipped) == 3
    assert "line 2: measured again on line 4" in skipped[0] and "line 3: measured again on line 5" in skipped[1]
    assert "line 6: its figures do not parse" in skipped[2]
    lines = targets(rows, torch.device("cuda"))
    assert _target(lines, "GPU: QNN projection bf16 fwd+bwd Triton >= 1.0x").endswith("| 1.20x | met |")
    assert _target(lines, "GPU: asta_op fp32 Triton").endswith(
        "| fwd full mask 1.10x; unmeasured: fwd+bwd full mask | partly measured |")  # nan: not "met"
    assert "| fwd+bwd | bf16 | batch=8192 | 1.2 |" in "\n".join(pivot_tables(rows))
    # In rows made in memory too, a nan time is no figure: not a Triton win.
    nan_win = _lines("qnn", "bf16", {"fwd": (1.0, 0.8, float("nan")), "fwd+bwd": (3.0, 2.5, 2.0)},
                     torch_names=("eager", "compile"))
    assert auto_evidence(nan_win)[("qnn", "bf16")]["won"] is False


def test_csv_report_files_codegen_rows_under_generated_code(tmp_path):
    from bench import codegen, csv_report
    from bench.common import append_csv

    record = {"kernel": "asta_fwd", "dtype": "bf16", "arch": "sm_90", "registers": 40, "shared_memory": 0,
              "local_memory": 0, "occupancy": 1.0, "load_widths": "16,128", "store_widths": "128",
              "sass_instructions": 300, "matrix_instructions": "none"}
    path = tmp_path / "results.csv"
    append_csv(codegen.to_rows([record]), path)
    assert csv_report.main([str(path), "--device", "cpu", "--out", str(tmp_path / "report.md")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## CSV rows left out" not in report and "## Targets" not in report
    assert "| asta_fwd | bf16 | sm_90 | 40 | 0 | 0 | 1 | 16,128 | 128 | none | 300 |" in report


def test_a_kernel_that_does_not_compile_fails_the_codegen_section_in_one_line(monkeypatch):
    from bench import codegen, report

    error = "CompilationError: at 12:4:\n    acc += undefined_name\n    ^\nNameError('undefined_name is not defined')"
    monkeypatch.setattr(codegen, "run", lambda: codegen.to_rows([{"kernel": "asta_fwd", "dtype": "bf16",
                                                                   "arch": "sm_90", "error": error}]))
    rows, failures = report.collect(torch.device("cpu"), quick=False, codegen=True, log=lambda *a: None)
    assert failures == [f"{report.CODEGEN_SECTION}: asta_fwd bf16 sm_90: NameError('undefined_name is not defined')"]
    table = report.codegen_table(rows)
    assert table.splitlines()[-1] == "| asta_fwd | bf16 | sm_90 | compile error: NameError('undefined_name is not defined') |"


def test_measured_faster_counts_a_missing_triton_line_as_a_loss_and_needs_every_table():
    from bench.report import auto_evidence, auto_section, measured_faster

    qnn = ("eager", "compile")
    wins = {"fwd": (1.0, 0.8, 0.7), "fwd+bwd": (3.0, 2.5, 2.0)}
    cut = [_time("qnn", provider, "fwd+bwd", "bf16", p50)
           for provider, p50 in (("eager", 9.0), ("torch backend", 9.0), ("compile", 8.0))]
    for row in cut:
        row["x_value"] = 16384  # a case whose triton line the time box cut (or Triton failed)
    rows = (_lines("qnn", "bf16", wins, torch_names=qnn) + cut
            + _lines("asta_op", "bf16", wins, " full mask")  # the gathered table never ran: no entry
            + _lines("asta_op", "fp32", wins, " full mask") + _lines("asta_gathered_op", "fp32", wins, " full mask")
            + _lines("asta_gathered_op", "fp32", wins))
    cap = "Fake H200 sm_90"
    assert measured_faster(rows, cap) == {("asta", torch.float32, cap)}
    assert "triton missing" in auto_evidence(rows)[("qnn", "bf16")]["losses"][0]
    section = "\n".join(auto_section(rows, torch.device("cpu")))
    assert ("| asta | bf16 | torch | not every case timed: asta_gathered_op fwd full mask bf16, asta_gathered_op "
            "fwd+bwd full mask bf16, asta_gathered_op fwd bf16, asta_gathered_op fwd+bwd bf16 missing |") in section
    # Where Triton was never timed (the CPU), torch lines alone are no evidence either way.
    assert auto_evidence(_lines("qnn", "fp32", {"fwd": (1.0, 0.8)}, torch_names=qnn)) == {}


def test_report_says_which_kernel_variants_stay_and_where_the_qnn_backward_goes():
    from bench.report import kernel_choices, render

    def ratio(kernel, metric, dtype, mode, value):
        return dict(_time(kernel, "triton", mode, dtype, value), metric=metric, unit="x")

    rows = [ratio("asta_tile_skip", "speedup_vs_every_tile", "bf16", "fwd", 3.0),
            ratio("asta_tile_skip", "speedup_vs_every_tile", "bf16", "fwd+bwd", 1.3),
            ratio("asta_layout_plain", "speedup_vs_triton_layout", "bf16", "fwd full mask", 1.6),
            ratio("asta_layout_plain", "speedup_vs_triton_layout", "fp16", "fwd+bwd full mask", 0.9),
            _time("asta_layout_plain", "triton, fp32's layout", "fwd full mask", "bf16", 0.2)]  # a time: no ratio
    rows += [dict(_time("qnn_backward", provider, "bwd", "bf16", ms))
             for provider, ms in (("eager backward", 0.4), ("triton backward", 1.2), ("masked-gradient pass", 0.9),
                                  ("grad_x product", 0.1))]
    rows += [_time("qnn_backward", "torch backend forward, graph kept", "fwd (grad on)", "bf16", 0.5)]
    # The profiled kernels of a fwd+bwd against the op table's time of the call.
    rows += [dict(_time("qnn_backward", "torch backend fwd+bwd, its kernels' time", "fwd+bwd", "bf16", 0.6),
                  metric="kernel_time"), _time("qnn", "torch backend", "fwd+bwd", "bf16", 0.95)]
    text = "\n".join(kernel_choices(rows))
    assert "- torch backend fwd+bwd: its kernels 0.6 ms of the call's 0.95 ms (the GPU idle 37% of it)" in text
    assert "**asta_tile_skip**: skipping tiles of padding alone (SKIP_EMPTY_TILES) against reading every tile: stays." in text
    assert "| bf16 | fwd | 3.00x |" in text and "| bf16 | fwd+bwd | 1.30x |" in text
    assert ("**asta_layout_plain**: 16-bit rows in fp32's thread layout (VEC=4) against Triton's own layout (VEC=0): "
            "slower somewhere") in text and "| fp16 | fwd+bwd full mask | 0.90x |" in text
    assert "asta_layout_gathered" not in text  # not timed: no line
    assert "(share of its 1.2 ms)" in text and "| masked-gradient pass | 0.9 | 75% |" in text
    assert "| eager backward | 0.4 |  |" in text  # a whole backward has no share of another
    assert "| torch backend forward, graph kept | 0.5 |  |" in text  # nor a forward
    assert kernel_choices([_time("qnn", "eager", "fwd", "bf16", 1.0)]) == []
    step = lambda provider, value: dict(_time("train_step", provider, "full", "bf16", value), metric="throughput")
    steps = kernel_choices([step("default (auto), autocast bf16", 800_000.0),
                            step("default (auto), QNN through autograd, autocast bf16", 960_000.0)])
    assert any("against the form auto chose: 1.20x (960,000 against 800,000 samples/s); faster" in line
               for line in steps), steps
    steps = kernel_choices([step("default (auto), autocast bf16", 800_000.0),
                            step("default (auto), QNN through autograd, autocast bf16", 820_000.0)])
    assert any("1.02x" in line and "the default stays" in line for line in steps), steps
    steps = kernel_choices([step("default (auto), autocast bf16", 800_000.0),
                            step("default (auto) graph-safe, whole step as one CUDA graph, autocast bf16", 1_200_000.0)])
    assert any("replayed as one CUDA graph" in line and "1.50x" in line for line in steps), steps
    for r in rows:
        r.update(section="ASTA", device="cuda", timestamp="", torch="", triton="", commit="")
    report = render(rows, [], torch.device("cpu"), True, [], None)
    assert "## Kernel variants this run decides" in report and "**asta_tile_skip**" in report


def test_a_cut_off_csv_line_is_left_out_of_the_report_and_named(tmp_path):
    from bench import csv_report
    from bench.common import append_csv, make_row

    cpu = torch.device("cpu")
    good = [make_row("train_step", name, "full", "throughput", "samples/s", "batch", 1024, value, cpu, "fp32")
            for name, value in (("literal eager", 100.0), ("+ item dedup", 300.0))]
    path = tmp_path / "results.csv"
    append_csv(good[:1], path)
    with open(path, "a") as fh:  # a stage killed while writing its row
        fh.write("train_step,+ hoisted ASTA,full,throughput,samples/s,batch,10")
    append_csv(good[1:], path)  # the next stage: its row must not be glued to the cut line
    assert csv_report.main([str(path), "--device", "cpu", "--out", str(tmp_path / "report.md")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "3.00x (+ item dedup, batch 1024" in report
    assert "## CSV rows left out" in report and "line 3: its figures do not parse: train_step,+ hoisted ASTA" in report
    rows, skipped = csv_report.read_rows(path)
    assert [r["provider"] for r in rows] == ["literal eager", "+ item dedup"] and len(skipped) == 1


def test_rows_of_another_device_or_commit_are_left_out_of_the_report_and_named(tmp_path):
    """gpu_run.sh appends to $OUT/results.csv: rows an earlier run left there, on another GPU or
    at another commit, must not fill this run's tables, least of all as MEASURED_FASTER evidence."""
    from bench import common, csv_report
    from bench.common import append_csv, make_row

    cpu = torch.device("cpu")
    rows = [make_row("train_step", name, "full", "throughput", "samples/s", "batch", 1024, value, cpu, "fp32")
            for name, value in (("literal eager", 100.0), ("+ item dedup", 300.0), ("+ hoisted ASTA", 900.0))]
    rows[1]["device"] = "NVIDIA A100-SXM4-80GB"  # the same figure key, measured elsewhere: kept beside, not over
    rows[2]["commit"] = "0000000"
    path = tmp_path / "results.csv"
    append_csv(rows, path)
    kept, skipped = csv_report.read_rows(path, common.device_name(cpu), common.git_commit())
    assert [r["provider"] for r in kept] == ["literal eager"]
    assert "line 3: measured on another device 'NVIDIA A100-SXM4-80GB'" in skipped[0]
    assert "line 4: measured on another commit '0000000'" in skipped[1]
    assert csv_report.main([str(path), "--device", "cpu", "--out", str(tmp_path / "report.md")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "+ item dedup" not in report.split("## CSV rows left out")[0]
    assert "measured on another device 'NVIDIA A100-SXM4-80GB'" in report
    assert len(csv_report.read_rows(path)[0]) == 3  # without the filters every row is read


def test_cuda_timing_repeats_a_slow_step_and_fills_time_with_a_fast_op(monkeypatch):
    from bench import common

    assert common.cuda_reps(3, 80.0) == common.CUDA_MIN_REPS  # a training step: never timed once
    assert common.cuda_reps(20, 80.0) == 20  # the caller's reps when more
    assert common.cuda_reps(8, 0.2) == 500  # a fast op: as many as fill 100 ms
    assert common.cuda_reps(8, 1e-6) == common.CUDA_MAX_REPS
    # The event loop itself, with host-clock events standing in for CUDA's.
    import time

    class Event:
        def __init__(self, enable_timing):
            self.at = None

        def record(self):
            self.at = time.perf_counter()

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(common, "L2_FLUSH_BYTES", 1024)
    calls = []
    p50, p20, p80 = common._time_cuda_ms(lambda: (calls.append(1), time.sleep(0.02)), torch.device("cpu"), 2, 3)
    assert len(calls) == 2 + 1 + common.CUDA_MIN_REPS  # warm-up, the estimate, the timed calls
    assert 19 < p20 <= p50 <= p80 < 2000  # milliseconds (a sleep of 20 ms; a loaded host adds to it)


def test_host_time_counts_the_call_alone_each_started_with_the_device_idle(monkeypatch):
    import time

    from bench import common

    waits = []

    def synchronize(device=None):  # a device that takes 50 ms to go idle
        waits.append(1)
        time.sleep(0.05)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    calls = []
    p50, p20, p80 = common.host_ms(lambda: (calls.append(len(waits)), time.sleep(0.005)), torch.device("cuda"), reps=4)
    assert calls == [1, 2, 3, 4]  # each call after a wait for the device
    assert len(waits) == 5  # and one after the last: nothing is left running
    assert 4.9 < p20 <= p50 <= p80 < 45  # milliseconds: the call's 5, none of the waits' 50
    device_ms = 10.0
    rows = common.host_rows("train_step", "default", "full", "batch", 64, (p50, p20, p80), device_ms,
                            torch.device("cpu"), "bf16")
    assert [r["metric"] for r in rows] == ["host_time", "host_share"]
    assert rows[1]["p50"] == pytest.approx(p50 / device_ms)


def test_device_kernels_lists_what_a_call_runs_costliest_first():
    from bench import common

    a = torch.randn(256, 256)
    total, listing = common.device_kernels(lambda: (a @ a).relu_(), torch.device("cpu"), calls=2)
    names = [name for name, _, _ in listing]
    assert "aten::mm" in names and "aten::relu_" in names
    assert all(count == 1 for name, count, _ in listing if name in ("aten::mm", "aten::relu_"))  # a call, not in all
    times = [ms for _, _, ms in listing]
    assert times == sorted(times, reverse=True) and total == pytest.approx(sum(times)) and total > 0


def test_op_tables_run_bf16_first_and_every_dtypes_ops_before_any_sweep(monkeypatch):
    from bench import bench_asta, bench_qnn

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H200")
    order = []

    def fake(kind):
        def rows(*args, **kwargs):
            dtype = next(a for a in args if isinstance(a, torch.dtype))
            order.append((kind, common_name(dtype)))
            yield _row(kind, "fake", "time", 1.0, dtype)
        return rows

    from bench.common import short_dtype as common_name
    for name in ("_op_rows", "_gathered_rows", "_tile_skip_rows", "_layout_rows", "_register_cap_rows",
                 "_reps_gradient_rows", "_block_rows"):
        monkeypatch.setattr(bench_asta, name, fake(name))
    monkeypatch.setattr(bench_asta, "measure_copy_bandwidth_gbs", lambda *args: 1000.0)
    bench_asta.run(torch.device("cuda"), quick=True)
    dtypes = list(dict.fromkeys(dtype for _, dtype in order))
    assert dtypes == ["bf16", "fp32", "fp16"]
    kinds = [kind for kind, _ in order]
    last_op = max(i for i, kind in enumerate(kinds) if kind in ("_op_rows", "_gathered_rows"))
    skips = [i for i, kind in enumerate(kinds) if kind == "_tile_skip_rows"]
    sweeps = [i for i, kind in enumerate(kinds) if kind in ("_reps_gradient_rows", "_block_rows")]
    layouts = [i for i, kind in enumerate(kinds) if kind == "_layout_rows"]
    caps = [i for i, kind in enumerate(kinds) if kind == "_register_cap_rows"]
    # the ops, then the skip, then the layouts, then the register cap, then the sweeps
    assert last_op < min(skips) and max(skips) < min(layouts) and max(layouts) < min(caps) and max(caps) < min(sweeps)
    assert [order[i][1] for i in skips] == ["bf16", "fp32", "fp16"]
    assert [order[i][1] for i in layouts] == ["bf16", "fp16"]  # in fp32 the two layouts are one code
    assert [order[i][1] for i in caps] == ["bf16"]  # the cap is the 16-bit forwards'; bf16 stands for fp16
    order.clear()
    monkeypatch.setattr(bench_qnn, "measure_matmul_tflops", lambda *args: 100.0)
    monkeypatch.setattr(bench_qnn, "_stack_rows", fake("stack"))
    def projection(device, dtype, batches, dim, rate, label):  # the line's label: bf16-autocast has fp32 tensors
        order.append((f"projection {batches}", label))
        yield from [_row("qnn", "fake", "time", 1.0, dtype)] if batches else []

    monkeypatch.setattr(bench_qnn, "_projection_rows", projection)

    def backward_parts(device, dtype, batch, dim, label):
        order.append((f"backward parts {batch}", label))
        yield _row("qnn_backward", "fake", "time", 1.0, dtype)

    monkeypatch.setattr(bench_qnn, "_backward_parts_rows", backward_parts)

    def fp32_products(device, batch, dim, label):
        order.append((f"fp32 products {batch}", label))
        yield _row("fp32_gemm", "fake", "time", 1.0, "fp32")

    monkeypatch.setattr(bench_qnn, "_fp32_product_rows", fp32_products)
    bench_qnn.run(torch.device("cuda"), quick=False)
    # Each op line, bf16's and fp32-tf32's followed by where its backward's time goes, fp32's (TF32
    # off) by its products alone.
    assert order[:7] == [("projection [8192]", "bf16"), ("backward parts 8192", "bf16"),
                         ("projection [8192]", "bf16-autocast"), ("projection [8192]", "fp32"),
                         ("fp32 products 8192", "fp32"),
                         ("projection [8192]", "fp32-tf32"), ("backward parts 8192", "fp32-tf32")]
    assert all(kind not in ("projection [8192]", "backward parts 8192", "fp32 products 8192") for kind, _ in order[7:])
    assert ("stack", "bf16") in order


def _stop_when(cmd, ready, tmp_path, wait=300):
    """Start a benchmark, send it SIGTERM (gpu_run.sh's time box) once ready() holds; its output."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "QIN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", *cmd], env=env, cwd=Path(__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + wait
    try:
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "nothing was saved before the run ended:\n" + proc.stdout.read()[-3000:]
        assert ready(), "nothing saved in time"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return out


@pytest.mark.parametrize("module, args", [
    ("bench.bench_qnn", ["--quick"]),
    ("bench.bench_train", ["--batch", "64"]),
])
def test_a_benchmark_stopped_by_sigterm_keeps_the_rows_it_measured(tmp_path, module, args):
    path = tmp_path / "results.csv"

    def figures():
        if not path.exists():
            return []
        return [r for r in csv.DictReader(open(path)) if r["kernel"] in ("qnn", "train_step")]

    out = _stop_when([module, "--device", "cpu", *args, "--csv", str(path)], lambda: len(figures()) >= 2, tmp_path)
    assert "out of time" in out, out[-3000:]
    rows = figures()
    assert len(rows) >= 2 and all(float(r["p50"]) > 0 for r in rows)


def test_profile_step_stopped_by_sigterm_keeps_the_precisions_it_finished(tmp_path):
    path = tmp_path / "profile.md"
    args = ["--device", "cpu", "--batch", "64", "--steps", "1", "--top", "3", "--precision", "fp32", "bf16"]
    _stop_when(["bench.profile_step", *args, "--out", str(path)],
               lambda: path.exists() and "## fp32" in path.read_text(), tmp_path)
    text = path.read_text()
    assert "## fp32, batch 64" in text and "## bf16: not finished: out of time" in text  # fp32 kept, bf16 cut


def test_profile_step_ranks_the_operators_and_gives_per_step_times_that_add_up(tmp_path, capsys):
    """Every operator listed (--top past their count), most time first; their times a step sum to
    the total line, and on the CPU that total is the step's wall time less what no operator holds."""
    import re

    from bench import profile_step

    path = tmp_path / "profile.md"
    assert profile_step.main(["--device", "cpu", "--batch", "32", "--steps", "2", "--top", "100000",
                              "--out", str(path)]) == 0
    text = path.read_text()
    wall = float(re.search(r"batch 32: ([\d.]+) ms a step", text).group(1))
    rows = [(float(ms), float(share)) for ms, share in re.findall(r"^\| `.*` \| [\d.]+ \| ([\d.]+) \| ([\d.]+)% \|$",
                                                                   text, re.M)]
    count, total = re.search(r"All (\d+) operators: ([\d.]+) ms a step", text).groups()
    assert len(rows) == int(count) > 10
    assert [ms for ms, _ in rows] == sorted((ms for ms, _ in rows), reverse=True)
    assert sum(ms for ms, _ in rows) == pytest.approx(float(total), abs=0.001 * len(rows))
    assert sum(share for _, share in rows) == pytest.approx(100.0, abs=0.05 * len(rows))
    assert 0.5 * wall < float(total) <= 1.05 * wall


def test_the_qnn_torch_form_variants_force_their_form_and_restore_the_choice(monkeypatch):
    """bench_train's QNN_AUTOGRAD and QNN_FUNCTION variants: inside qnn_torch_form the model's torch
    QNN path is autograd through the reference (no autograd Function in the graph), or the Function,
    whatever form it was given; after it, the form given again."""
    import kernels
    from bench.bench_train import qnn_torch_form
    from kernels import reference

    x, weight, bias = (torch.randn(*shape, requires_grad=True) for shape in ((4, 8), (16, 8), (16,)))
    op = lambda: kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.1, training=True, backend="torch")
    with qnn_torch_form("autograd"):
        inside = op().grad_fn
    assert "TrainingQuadraticProjection" not in type(inside).__name__
    assert "TrainingQuadraticProjection" in type(op().grad_fn).__name__
    plain = lambda *args: reference.training_quadratic_projection(*args, "autograd")
    with qnn_torch_form("function"):  # over a chosen plain form
        inside = plain(x, weight, bias, 2, 0.1, True, torch.float32).grad_fn
    assert "TrainingQuadraticProjection" in type(inside).__name__
    outside = plain(x, weight, bias, 2, 0.1, True, torch.float32).grad_fn
    assert "TrainingQuadraticProjection" not in type(outside).__name__
    assert reference.training_quadratic_projection.__name__ == "training_quadratic_projection"


def test_profile_says_when_the_host_bounds_a_step():
    from bench.profile_step import host_share

    assert host_share(6.73, 10.8, 512) == ("Without the profiler the fastest warm-up step took 10.80 ms: its 512 kernel "
                                           "launches a step fill 62% of it, so the device waits for the host (CUDA "
                                           "graphs or torch.compile cut that).")
    assert host_share(23.3, 24.5, 400).endswith("fill 95% of it.")


@pytest.mark.parametrize("args, named", [(["--steps", "0"], "--steps"), (["--batch", "0"], "--batch"),
                                         (["--top", "-2"], "--top"), (["--device", "tpu"], "--device"),
                                         (["--out", "{file}/p.md"], "{file} is a file, not a folder"),
                                         (["--out", "{folder}"], "{folder} is a folder")])
def test_profile_step_refuses_bad_arguments_before_profiling(args, named, capsys, tmp_path):
    from bench import profile_step

    (tmp_path / "f").write_text("")
    where = {"file": tmp_path / "f", "folder": tmp_path}
    args, named = [a.format(**where) for a in args], named.format(**where)
    with pytest.raises(SystemExit) as stop:
        profile_step.main(["--device", "cpu", *args])
    assert stop.value.code == 2 and named in capsys.readouterr().err


def test_gpu_run_default_stages_fit_the_budget_with_the_tests_time_reserved(tmp_path):
    import re

    script = (Path(__file__).parent.parent / "bench" / "gpu_run.sh").read_text()
    stages = re.search(r'STAGES=" \$\{GPU_RUN_STAGES:-([a-z ]+)\} "', script).group(1).split()
    assert "parity" not in stages  # it has its own call
    caps = {name: int(cap) for name, cap in re.findall(r"^stage (\w+) (\d+) ", script, re.M)}
    caps["tests"] = int(re.findall(r"^  TESTS_CAP=(\d+)$", script, re.M)[-1])  # the GPU's (the dry run's first)
    budget = int(re.search(r"BUDGET=\$\{GPU_RUN_BUDGET:-(\d+)\}", script).group(1))
    assert sum(caps[s] for s in stages if s != "device") <= budget - 15, caps
    # A stage before the tests never eats their time: here the report stage has 10 s once the
    # tests' 20 are set aside, too few to start.
    result, out = _gpu_run(tmp_path, GPU_RUN_STAGES="report tests", GPU_RUN_BUDGET="30", GPU_RUN_CAP_tests="20")
    device = (out / "device.txt").read_text()
    assert "stage report: not run" in device and "stage tests: exit" in device, device


def test_the_cuda_graphs_step_memory_is_labelled_and_compared_with_nothing(monkeypatch):
    from bench import bench_train
    from bench.report import pivot_tables

    name = "default (auto) + CUDA graphs, autocast bf16"
    monkeypatch.setattr(bench_train, "VARIANTS", [v for v in bench_train.VARIANTS if v[0] == name])
    monkeypatch.setattr(bench_train, "CPU_VARIANTS", (name,))
    monkeypatch.setattr(bench_train, "compile_model", lambda model, cuda_graphs: model)  # no graphs on the CPU
    monkeypatch.setattr(bench_train, "peak_memory_mb", lambda fn, device: 123.0)
    monkeypatch.setattr(bench_train, "time_ms", lambda fn, device, **kwargs: (10.0, 9.0, 11.0))
    rows = list(bench_train.run_batch(torch.device("cpu"), False, 64))
    assert {r["metric"] for r in rows} == {"throughput", "saved_bytes", bench_train.GRAPHS_MEMORY}
    for row in rows:
        row["section"] = "Training step, end to end"
    assert any("peak memory beyond graph pool (MB)" in line for line in pivot_tables(rows))


def test_on_a_gpu_each_step_and_qnn_call_gets_its_host_time_and_the_qnn_its_kernels(monkeypatch):
    """The rows bench_train and bench_qnn add on CUDA, run here on the CPU (common.DIAGNOSED_DEVICE_TYPES)."""
    from bench import bench_qnn, bench_train, common

    monkeypatch.setattr(common, "DIAGNOSED_DEVICE_TYPES", {"cuda", "cpu"})
    name = "+ item dedup"
    monkeypatch.setattr(bench_train, "VARIANTS", [v for v in bench_train.VARIANTS if v[0] == name])
    monkeypatch.setattr(bench_train, "time_ms", lambda fn, device, **kwargs: (1e4, 9e3, 1.1e4))
    rows = list(bench_train.run_batch(torch.device("cpu"), True, 16))
    host = {r["metric"]: r for r in rows if r["metric"].startswith("host_")}
    assert set(host) == {"host_time", "host_share"} and host["host_time"]["provider"] == name
    # A CPU step is all host: its host time is the step, here against a faked 10 s step time.
    assert 0 < host["host_share"]["p50"] == pytest.approx(host["host_time"]["p50"] / 1e4)
    rows = list(bench_qnn._projection_rows(torch.device("cpu"), torch.float32, [8], 16, 1.0, "fp32"))
    # Every provider timed fwd+bwd (compile, where this CPU can compile, too) and only fwd+bwd.
    timed = {r["provider"] for r in rows if r["metric"] == "time" and r["mode"] == "fwd+bwd"}
    assert {"eager", "torch backend"} <= timed
    assert {r["provider"] for r in rows if r["metric"] == "host_time"} == timed
    assert all(r["mode"] == "fwd+bwd" for r in rows if r["metric"] in ("host_time", "host_share"))
    rows = list(bench_qnn._backward_parts_rows(torch.device("cpu"), torch.float32, 8, 16, "fp32"))
    listed = [r["provider"] for r in rows if r["metric"] == "kernel_time"]
    assert listed == ["eager fwd+bwd, its kernels' time", "torch backend fwd+bwd, its kernels' time",
                      "triton fwd+bwd, its kernels' time"]
    assert all(r["p50"] > 0 for r in rows if r["metric"] == "kernel_time")


def test_the_whole_step_graph_variant_trains_the_graph_safe_model_with_a_capturable_adam(monkeypatch):
    """bench_train's whole-step graph variant up to the capture (which needs a GPU: a stand-in runs
    the step uncaptured here): the model made graph-safe, Adam capturable, a step that trains."""
    from bench import bench_train
    from qin.model import FeatureModules

    name = next(v[0] for v in bench_train.VARIANTS if v[2] == bench_train.WHOLE_STEP_GRAPH)
    monkeypatch.setattr(bench_train, "VARIANTS", [v for v in bench_train.VARIANTS if v[0] == name])
    monkeypatch.setattr(bench_train, "CPU_VARIANTS", (name,))
    seen = {}

    def uncaptured(body, optimizer, device, warmup=3):
        seen["capturable"] = all(g["capturable"] for g in optimizer.param_groups)
        seen["graph safe"] = all(m.graph_safe for m in seen["model"].modules() if isinstance(m, FeatureModules))
        weights = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
        optimizer.zero_grad(set_to_none=True)
        body()
        seen["trained"] = any(not torch.equal(a, p) for a, p in zip(weights, optimizer.param_groups[0]["params"]))

        def replay():
            optimizer.zero_grad(set_to_none=True)
            body()
        return replay

    build = bench_train.build
    monkeypatch.setattr(bench_train, "build", lambda *a, **k: seen.setdefault("model", build(*a, **k)))
    monkeypatch.setattr(bench_train, "whole_step_graph", uncaptured)
    monkeypatch.setattr(bench_train, "time_ms", lambda fn, device, **kwargs: (10.0, 9.0, 11.0))
    rows = list(bench_train.run_batch(torch.device("cpu"), True, 16))
    assert seen == {"model": seen["model"], "capturable": True, "graph safe": True, "trained": True}
    assert {r["metric"] for r in rows} == {"throughput", "saved_bytes"}


def test_percentiles_of_a_few_samples_stay_within_them():
    from bench.common import percentiles

    assert percentiles([10.0, 300.0, 300.0]) == (300.0, pytest.approx(126.0), 300.0)  # "exclusive" gave -48
    assert percentiles([5.0]) == (5.0, 5.0, 5.0)


def test_a_figure_whose_repeats_disagree_shows_their_spread_beside_its_ratio():
    from bench.common import make_row
    from bench.report import pivot_tables

    cpu = torch.device("cpu")
    rows = [make_row("ddp", "1 process", "train", "throughput", "samples/s", "batch", 1024, (1000.0, 990.0, 1010.0),
                     cpu, "fp32"),
            make_row("ddp", "2 processes", "train", "throughput", "samples/s", "batch", 1024, (3000.0, 1000.0, 5000.0),
                     cpu, "fp32")]
    assert "| train | fp32 | batch=1024 | 1,000 | 3,000 (3.00x) [p20-p80: 1,000-5,000] |" in pivot_tables(rows)
    rows[1].update(p20=2700.0, p80=3400.0)  # a spread of 23% of the median: the ratio stands alone
    assert "| train | fp32 | batch=1024 | 1,000 | 3,000 (3.00x) |" in pivot_tables(rows)


def test_asta_speedups_are_against_the_first_provider_or_not_given():
    """Where the baseline (literal eager) fails, e.g. out of memory, the rows named
    speedup_vs_literal must not quietly hold ratios against the next provider."""
    from bench import bench_asta

    history = torch.randn(2, 4, 8, requires_grad=True)
    grad_out = torch.randn(2, 8)

    def out_of_memory(h):
        raise RuntimeError("CUDA out of memory (simulated)")

    def run(providers):
        rows = bench_asta._case_rows("asta_block", providers, (history,), (history,), grad_out, history, "batch", 2,
                                     torch.float32, torch.device("cpu"), copy_gbs=10.0, full_mask=False)
        return {(r["provider"], r["mode"]) for r in rows if r["metric"] == "speedup_vs_literal"}

    double = lambda h: (h * 2).sum(1)
    assert run({"literal eager": double, "hoisted eager": double, "hoisted triton": double}) == {
        (p, m) for p in ("hoisted eager", "hoisted triton") for m in ("fwd", "fwd+bwd")}
    assert run({"literal eager": out_of_memory, "hoisted eager": double, "hoisted triton": double}) == set()


def test_the_tile_skip_is_timed_against_reading_every_tile(monkeypatch):
    """bench_asta's asta_tile_skip rows on the CPU (Triton's interpreter, B=4): the gathered op
    reading every tile (forward and backward launched with SKIP_EMPTY_TILES off) and as it runs,
    with the skip's speed-up over reading every tile, per mode."""
    from bench import bench_asta

    sta = importlib.import_module("kernels.sparse_target_attention")
    seen, config = [], sta._config
    monkeypatch.setattr(sta, "_config", lambda *args, **kw: seen.append(config(*args, **kw)) or seen[-1])
    rows = list(bench_asta._tile_skip_rows(4, 64, torch.float32, torch.device("cpu"), 10.0))
    every, skipping = "triton, reading every tile", "triton, skipping padding tiles"
    assert {(r["provider"], r["mode"]) for r in rows if r["metric"] == "time"} == {
        (p, m) for p in (every, skipping) for m in ("fwd", "fwd+bwd")}
    assert {(r["provider"], r["mode"]) for r in rows if r["metric"] == "speedup_vs_every_tile"} == {
        (skipping, "fwd"), (skipping, "fwd+bwd")}
    # Every launch of one provider's timings is followed by those of the other: fwd, fwd+bwd (two
    # kernels) each warmed up and timed, all with the skip off, then all with it on.
    flags = [c["SKIP_EMPTY_TILES"] for c in seen]
    assert flags == sorted(flags) and flags.count(False) == flags.count(True) > 3


def test_the_16_bit_layout_is_timed_against_tritons_own(monkeypatch):
    """bench_asta's asta_layout rows on the CPU (Triton's interpreter, B=4): the plain and the
    gathered op with every position live, launched with VEC=0 (Triton's own layout) and as they
    run (VEC=4), with the speed-up over Triton's layout, per form and mode."""
    from bench import bench_asta

    sta = importlib.import_module("kernels.sparse_target_attention")
    seen, config = [], sta._config
    monkeypatch.setattr(sta, "_config", lambda *args, **kw: seen.append(config(*args, **kw)) or seen[-1])
    rows = list(bench_asta._layout_rows(4, 16, torch.bfloat16, torch.device("cpu"), 10.0))
    own, as_run = "triton, Triton's own layout", "triton, fp32's layout"
    for form in ("plain", "gathered"):
        form_rows = [r for r in rows if r["kernel"] == f"asta_layout_{form}"]
        assert {(r["provider"], r["mode"]) for r in form_rows if r["metric"] == "time"} == {
            (p, m) for p in (own, as_run) for m in ("fwd full mask", "fwd+bwd full mask")}
        assert {(r["provider"], r["mode"]) for r in form_rows if r["metric"] == "speedup_vs_triton_layout"} == {
            (as_run, "fwd full mask"), (as_run, "fwd+bwd full mask")}
    # Per form: every launch of Triton's layout, then every launch as the ops run.
    vecs = [c["VEC"] for c in seen]
    half = len(vecs) // 2
    assert vecs[:half] == sorted(vecs[:half]) and vecs[half:] == sorted(vecs[half:])
    assert vecs.count(0) == vecs.count(4) > 6 and set(vecs) == {0, 4}


def test_the_16_bit_register_cap_is_timed_against_the_candidate(monkeypatch):
    """bench_asta's asta_register_cap rows on the CPU (Triton's interpreter, B=4): the plain and the
    gathered op with every position live, launched with the candidate cap forced and as they run,
    with the speed-up of the committed cap over the candidate, per form and mode."""
    from bench import bench_asta

    sta = importlib.import_module("kernels.sparse_target_attention")
    seen, cap = [], sta._register_cap
    monkeypatch.setattr(sta, "_register_cap", lambda x: seen.append(sta._FORCED.get("maxnreg")) or cap(x))
    rows = list(bench_asta._register_cap_rows(4, 16, torch.bfloat16, torch.device("cpu"), 10.0))
    other, as_run = f"triton, maxnreg {bench_asta.REGISTER_CAP_CANDIDATE}", "triton, maxnreg as run"
    for form in ("plain", "gathered"):
        form_rows = [r for r in rows if r["kernel"] == f"asta_register_cap_{form}"]
        assert {(r["provider"], r["mode"]) for r in form_rows if r["metric"] == "time"} == {
            (p, m) for p in (other, as_run) for m in ("fwd full mask", "fwd+bwd full mask")}
        assert {(r["provider"], r["mode"]) for r in form_rows if r["metric"] == "speedup_vs_other_register_cap"} == {
            (as_run, "fwd full mask"), (as_run, "fwd+bwd full mask")}
    # Per form: every forward launch with the candidate forced, then every one as the ops run.
    half = len(seen) // 2
    assert seen == [64] * (half // 2) + [None] * (half // 2) + [64] * (half // 2) + [None] * (half // 2), seen
    assert half > 6 and bench_asta.REGISTER_CAP_CANDIDATE == 64 != sta.FORWARD_MAX_REGISTERS_16_BIT


def test_the_qnn_fp32_products_are_timed_against_cublas_with_their_error():
    """bench_qnn's fp32_gemm rows on the CPU (Triton's interpreter, the split forced, a toy size):
    each of the three products, cuBLAS's and the kernel's in both forms, timed, with its error
    against float64 in units of the fp32 tolerance (under 1 here: the interpreter multiplies in
    IEEE fp32). Where the kernel does not apply (the CPU, not forced) nothing is timed."""
    from bench import bench_qnn
    from kernels import fp32_gemm

    assert list(bench_qnn._fp32_product_rows(torch.device("cpu"), 8, 16, "fp32")) == []
    with fp32_gemm.products("3xtf32"):
        rows = list(bench_qnn._fp32_product_rows(torch.device("cpu"), 8, 16, "fp32"))
    modes = ["forward x @ W.T + b", "grad_x G @ W + gy * s", "grad_W G.T @ x"]
    kernels = ("3xTF32", "3xTF32, split first")
    assert [(r["provider"], r["mode"]) for r in rows if r["metric"] == "time"] == [
        (p, m) for m in modes for p in ("cuBLAS", *kernels)]
    assert [(r["provider"], r["mode"]) for r in rows if r["metric"] == "speedup_vs_cublas"] == [
        (p, m) for m in modes for p in kernels]
    errors = [r["p50"] for r in rows if r["metric"] == "error_vs_float64"]
    assert len(errors) == 9 and all(0 <= e < 1 for e in errors), errors
    # The report: a verdict per kernel form against cuBLAS.
    from bench import report

    lines = "\n".join(report.kernel_choices(rows))
    assert "**fp32_gemm** (3xTF32):" in lines and "**fp32_gemm** (3xTF32, split first):" in lines
    assert {r["kernel"] for r in rows} == {"fp32_gemm"} and {r["dtype"] for r in rows} == {"fp32"}


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_the_qnn_backward_is_timed_part_by_part(amp):
    """bench_qnn's qnn_backward rows on the CPU (Triton's interpreter, a toy size): eager's, the torch
    backend's and the Triton op's backward, and each part of the Triton backward, which together make its gradients."""
    import kernels
    from bench import bench_qnn

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
        rows = list(bench_qnn._backward_parts_rows(torch.device("cpu"), torch.float32, 8, 16, "label"))
    assert [r["provider"] for r in rows] == [
        "eager forward, graph kept", "eager backward", "torch backend forward, graph kept", "torch backend backward",
        "triton forward, graph kept", "triton backward", "masked-gradient pass", "grad_x product", "grad_W product",
        "grad_b sum", "grad_b as a product with ones"]
    assert {r["mode"] for r in rows if "forward" in r["provider"]} == {"fwd (grad on)"}
    assert all(r["kernel"] == "qnn_backward" and r["metric"] == "time" and r["p50"] > 0 for r in rows)
    # The parts are the op's backward: put together, they give the gradients autograd gets.
    qp = importlib.import_module("kernels.quadratic_projection")
    x, weight, bias, gy = bench_qnn._make(8, 16, torch.float32, torch.device("cpu"))
    seed = qp._seed_tensor(5, x.device)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
        y = kernels.quadratic_projection(x, weight, bias, bench_qnn.ROWS, dropout_p=bench_qnn.DROPOUT, training=True,
                                         seed=seed, backend="triton")
    want = torch.autograd.grad(y, (x, weight, bias), gy)
    wide = amp or torch.float32
    xw, ww, bw = x.detach().to(wide), weight.detach().to(wide), bias.detach().to(wide)
    y, s = qp._forward(x.detach(), ww, bw, seed, bench_qnn.ROWS, bench_qnn.DROPOUT)
    g, gys = qp._masked_gradient(gy.to(y.dtype), xw, s, seed, bench_qnn.ROWS, bench_qnn.DROPOUT, x.dtype)
    got = (gys + (g @ ww).to(x.dtype), (g.t() @ xw).to(weight.dtype), g.sum(0, dtype=s.dtype).to(wide).to(bias.dtype))
    for name, a, b in zip(("grad_x", "grad_W", "grad_b"), got, want):
        torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close((torch.ones(8, dtype=wide) @ g).float(), g.sum(0, dtype=torch.float32),
                               **({} if amp is None else dict(rtol=1.6e-2, atol=1e-2)))


def test_bad_bench_arguments_are_refused_before_anything_runs(tmp_path, capsys):
    from bench import bench_asta, bench_train, common
    from bench.report import main

    a_file = tmp_path / "file"
    a_file.write_text("")
    for argv, named in ((["--out", str(a_file)], f"{a_file} is a file, not a folder"),
                        (["--out", str(a_file / "sub")], f"{a_file} is a file, not a folder"),
                        (["--only", "nosuchword"], "no section title holds these words; the sections are Device")):
        assert main(["--quick", "--device", "cpu", *argv]) == 2
        assert named in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train_throughput.png").write_bytes(b"an earlier plot")  # any file the run would write
    assert main(["--quick", "--device", "cpu", "--out", str(tmp_path / "out"), "--only", "nosuchword"]) == 2
    assert "train_throughput.png exists; pass --force" in capsys.readouterr().err
    for run, argv, named in ((bench_train.main, ["--batch", "0"], "expected a positive integer"),
                             (bench_train.main, ["--device", "foo"], "expected cpu or cuda"),
                             (lambda a: common.kernel_bench_main(bench_asta.run, "", "", a), ["--device", "cuda:3"],
                              "no such CUDA device here")):
        with pytest.raises(SystemExit) as exit_:
            run(argv)
        assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_tune_fp32_gemm_times_each_candidate_beside_cublas_and_names_the_fastest(monkeypatch):
    """bench/tune_fp32_gemm.py on the CPU (Triton's interpreter, a toy size, one candidate): per
    product cuBLAS's line (torch's product), _config's and the candidate's, each launch with the
    candidate's configuration forced, and a summary line per product."""
    from bench import tune_fp32_gemm
    from kernels import fp32_gemm

    monkeypatch.setattr(tune_fp32_gemm, "CANDIDATES", [(16, 32, 16, 1, 1)])
    seen, config = [], fp32_gemm._config
    monkeypatch.setattr(fp32_gemm, "_config", lambda *a, **kw: seen.append(config(*a, **kw)) or seen[-1])
    rows = list(tune_fp32_gemm._rows(torch.device("cpu"), 8, 16))
    modes = ["forward x @ W.T + b", "grad_x G @ W + gy * s", "grad_W G.T @ x"]
    lines = ["cuBLAS", "_config's", "_config's, split first", "16x32x16 warps=1 stages=1"]
    assert [(r["mode"], r["provider"]) for r in rows if r["metric"] == "time"] == [(m, p) for m in modes for p in lines]
    assert all(r["kernel"] == "fp32_gemm_config" and r["p50"] > 0 for r in rows)
    assert {c["BLOCK_N"] for c in seen} == {16, 32} and all(c["BLOCK_K"] == 16 for c in seen)
    summary = tune_fp32_gemm.summary(rows)
    assert len(summary) == 3 and all("_config's" in line and "cuBLAS" in line for line in summary), summary
    with pytest.raises(ValueError, match="forced_config takes"):
        with fp32_gemm.forced_config(BLOCK_L=4):
            pass


def test_tune_asta_times_each_candidate_and_names_the_fastest(monkeypatch):
    """bench/tune_asta.py on the CPU (Triton's interpreter, a toy size, one candidate): a line per
    provider, form and mode, and a summary naming the fastest configuration against _config's."""
    from bench import tune_asta

    monkeypatch.setattr(tune_asta, "CANDIDATES", [(2, 1)])
    sta = importlib.import_module("kernels.sparse_target_attention")
    seen, config = [], sta._config
    monkeypatch.setattr(sta, "_config", lambda *args, **kw: seen.append(config(*args, **kw)) or seen[-1])
    rows = list(tune_asta._rows(torch.float32, torch.device("cpu"), 2, (0,)))
    providers = {(r["kernel"], r["provider"], r["mode"]) for r in rows}
    for form in ("plain", "gathered"):
        for provider in ("reference eager", "_config's", "BLOCK_L=2 warps=1 VEC=0"):
            for mode in ("fwd", "fwd+bwd"):
                assert (f"asta_config_{form}", provider, mode) in providers
    assert {(c["BLOCK_L"], c["num_warps"], c["VEC"]) for c in seen} == {
        (config(64, 384)["BLOCK_L"], config(64, 384)["num_warps"], 4), (2, 1, 0)}  # _config's, then the candidate's
    lines = tune_asta.summary(rows)
    assert len(lines) == 4 and all("BLOCK_L=2 warps=1 VEC=0" in line and "x _config's" in line for line in lines)

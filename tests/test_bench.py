"""`qin bench`: one command, a report, a CSV and plots; never overwriting, never leaving partial files."""
import csv

import pytest
import torch

import bench.report
from qin.cli import main


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    code = main(["bench", "--quick", "--device", "cpu", "--out", str(out)])
    return code, out


def test_quick_bench_writes_report_csv_and_plots(quick_report):
    code, out = quick_report
    assert code == 0, (out / "report.md").read_text() if (out / "report.md").exists() else "no report"
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "results.csv", "train_throughput.png", "time_per_variant.png"} <= names
    assert not [n for n in names if n.startswith(".")], "staging files left behind"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {"device", "torch", "triton", "timestamp", "commit"} <= set(rows[0])
    sections = {r["section"] for r in rows}
    assert {"ASTA: sparse target attention", "QNN: quadratic projection", "Training step, end to end",
            "Data loading", "Several processes (DDP)", "pytest-benchmark suite of the fused ops"} <= sections
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "21,000" in report and "Sections that failed" not in report
    # Every ratio in the training table compares with the literal eager model of the same run.
    providers = {r["provider"] for r in rows if r["kernel"] == "train_step"}
    assert {"literal eager", "+ hoisted ASTA", "+ item dedup"} <= providers
    # Mixed precision beside fp32, same run: a bf16 step, and the bytes saved for backward.
    speed = {(r["provider"], r["dtype"]) for r in rows if r["kernel"] == "train_step" and r["metric"] == "throughput"}
    assert {("+ item dedup", "fp32"), ("+ item dedup", "bf16")} <= speed
    saved = {(r["provider"], r["dtype"]): float(r["p50"]) for r in rows if r["metric"] == "saved_bytes"}
    assert 0 < saved[("+ item dedup", "bf16")] < saved[("+ item dedup", "fp32")] < saved[("literal eager", "fp32")]
    assert "default training step in bf16" in report and "Saved for backward" in report


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
    for kernel in ("asta_fwd", "asta_bwd", "qnn_fwd", "qnn_bwd_dx", "qnn_bwd_dw"):
        assert f"| {kernel} | bf16 | sm_90 |" in report and f"| {kernel} | fp32 | sm_89 |" in report
        assert kernel in printed
    assert "HGMMA" in report and "HMMA" in report
    assert "## Targets" not in report  # nothing was timed

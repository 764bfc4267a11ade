"""`qin parity`: the quick run passes and reports everything it claims; a broken kernel fails it by name."""
import csv
import math
import subprocess

import pytest
import torch

import kernels
import kernels.utils
from kernels import tolerances
from qin import parity
from qin.cli import BUILTIN_SETTINGS, main
from qin.config import TrainConfig


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One `qin parity --quick` run through the CLI (about a minute here), shared by the tests below."""
    out = tmp_path_factory.mktemp("parity")
    status = main(["parity", "--quick", "--device", "cpu", "--out", str(out)])
    with open(out / "parity.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return status, out, rows


def test_quick_run_passes_and_writes_both_files(quick_report):
    status, out, rows = quick_report
    failed = [f"{r['op']} {r['quantity']} {r['dtype']} {r['shape']}" for r in rows if r["pass"] != "yes"]
    assert status == 0, failed
    assert not failed
    md = (out / "parity.md").read_text()
    assert "device: CPU" in md and "torch " + torch.__version__ in md and "All " in md
    for row in rows:  # every number is a measurement, within its tolerance
        assert float(row["max_rel_error"]) <= float(row["tolerance"]), row


def test_quick_run_covers_every_op_dtype_gradient_and_odd_shape(quick_report):
    _, _, rows = quick_report
    ops = {(r["op"], r["quantity"], r["dtype"]) for r in rows if r["check"] == "ops"}
    for op, quantities in (("asta", ("out", "grad_history", "grad_query")),
                           ("qnn_train", ("out", "grad_x", "grad_weight", "grad_bias")),
                           ("qnn_eval", ("out", "grad_x", "grad_weight", "grad_bias"))):
        for dtype in ("fp32", "bf16", "fp16", "fp64"):
            for quantity in quantities:
                assert (op, quantity, dtype) in ops
    asta_shapes = " ".join(r["shape"] for r in rows if r["op"] == "asta")
    for label in ("L=1 ", "L=513", "D=1 ", "D=200", "B=1 ", "all-padding", "non-contiguous"):
        assert label in asta_shapes + " ", label
    assert "dropout-scaled mask" in asta_shapes
    gathered_shapes = " ".join(r["shape"] for r in rows if r["op"] == "gathered_asta")
    assert "one item" in gathered_shapes and "dropout-scaled mask" in gathered_shapes
    qnn_shapes = " ".join(r["shape"] for r in rows if r["op"] == "qnn_train")
    assert "B=1 " in qnn_shapes and "D=1 " in qnn_shapes and "non-contiguous" in qnn_shapes
    assert "6 tiles" in qnn_shapes  # more than one (BLOCK_B, BLOCK_D) tile each way
    for dtype in ("bf16", "fp16"):  # fp32 x and weights under autocast, as mixed-precision training runs
        for quantity in ("out", "grad_x", "grad_weight", "grad_bias"):
            assert ("qnn_train_autocast", quantity, dtype) in ops
    model = {(r["op"], r["quantity"], r["dtype"]) for r in rows if r["check"] == "model"}
    for backend in ("torch", "triton"):
        for dtype in ("fp32", "bf16", "fp16"):
            assert (f"model[{backend}]", "logits (train mode)", dtype) in model
            assert (f"model[{backend}]", "logits (eval mode)", dtype) in model
            assert (f"model[{backend}]", "grad asta.W_o.weight", dtype) in model
            assert (f"model[{backend}]", "grad items.item_embedding.weight", dtype) in model
        assert any(q.startswith("loss over") for b, q, d in model if b == f"model[{backend}]")
    # Every model row reports the measured noise floor beside its tolerance.
    assert all(r["noise_floor"] for r in rows if r["check"] == "model")


def test_a_broken_kernel_fails_by_name(tmp_path, monkeypatch, capsys):
    """A QNN projection off by 1e-3 relative: over fp32's tolerance, within bf16's."""
    real = kernels.quadratic_projection

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) * (1 + 1e-3)

    monkeypatch.setattr(kernels, "quadratic_projection", off_by_a_little)
    assert main(["parity", "--quick", "--device", "cpu", "--only", "qnn_eval", "--out", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "qnn_eval out fp32" in printed and "qnn_eval out fp64" in printed
    assert "qnn_eval out bf16" not in printed.split("FAILED")[-1]
    assert "FAILED" in (tmp_path / "parity.md").read_text()


def test_a_wrong_interpreter_setting_reruns_the_command_in_a_fresh_process(monkeypatch, tmp_path):
    """Triton reads TRITON_INTERPRET when `qin` imports it, so a mismatch means a new process."""
    calls = []
    monkeypatch.setattr(kernels.utils, "INTERPRETING", False)
    monkeypatch.delenv(parity.CHILD_ENV, raising=False)

    class Child:
        def __init__(self, cmd, env):
            calls.append((cmd, env))

        def wait(self):
            return 3

    monkeypatch.setattr(subprocess, "Popen", Child)
    assert main(["parity", "--quick", "--device", "cpu", "--out", str(tmp_path), "--only", "asta", "--force",
                 "--seeds", "2"]) == 3
    (cmd, env), = calls
    assert cmd[1:4] == ["-m", "qin", "parity"]
    assert cmd[4:] == ["--device", "cpu", "--out", str(tmp_path), "--seeds", "2", "--quick", "--only", "asta",
                       "--force"]  # every option the user gave, none dropped
    assert env["TRITON_INTERPRET"] == "1" and env[parity.CHILD_ENV] == "1"


def test_training_verdict_agrees_within_the_spread_or_says_it_does_not():
    rows, lines = parity.summarise_training({"torch": [0.80, 0.82, 0.81], "triton": [0.815, 0.80, 0.82]}, "t")
    assert rows[0].passed and "they agree" in lines[0]
    rows, lines = parity.summarise_training({"torch": [0.868, 0.870, 0.869], "triton": [0.838, 0.84, 0.839]}, "t")
    assert not rows[0].passed and "DO NOT agree" in lines[0]


def test_tolerance_arithmetic():
    tol = tolerances.Tolerance(rtol=1e-2, floor=0.0)
    zeros = torch.zeros(3)
    assert tolerances.relative_error(zeros, zeros, zeros, tol) == 0.0  # exact zeros where the scale is 0
    assert tolerances.relative_error(torch.tensor([1e-30, 0, 0]), zeros, zeros, tol) == math.inf
    nan = tolerances.relative_error(torch.tensor([float("nan"), 0, 0]), zeros, torch.ones(3), tol)
    assert not tolerances.passes(nan, tol)
    got, want, scale = torch.tensor([1.01, 2.0]), torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])
    assert tolerances.relative_error(got, want, scale, tol) == pytest.approx(0.005)
    # The floor lifts an element's scale by a part of the tensor's largest scale.
    floored = tolerances.Tolerance(rtol=1e-2, floor=0.5)
    assert tolerances.relative_error(torch.tensor([0.01, 4.0]), torch.tensor([0.0, 4.0]), torch.tensor([0.0, 4.0]),
                                     floored) == pytest.approx(0.005)
    # Below fp16's normal range a rounding errs by up to half the subnormal spacing (2^-25),
    # whatever the scale: four roundings' worth passes, five do not.
    fp16, zero = tolerances.OPS[torch.float16], torch.zeros(1)
    assert tolerances.passes(tolerances.relative_error(torch.tensor([4 * 2.0**-25]), zero, zero, fp16), fp16)
    assert not tolerances.passes(tolerances.relative_error(torch.tensor([5 * 2.0**-25]), zero, zero, fp16), fp16)


def test_training_on_the_cpu_is_refused_with_the_reason(tmp_path, capsys):
    assert main(["parity", "--training", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "--training needs --device cuda" in capsys.readouterr().err
    assert not (tmp_path / "parity.md").exists()


def test_training_runs_each_backend_over_the_seeds(monkeypatch):
    """The plumbing of --training (a GPU runs it for real): same run, each backend, seeds 0..N-1."""
    from types import SimpleNamespace

    import qin.data
    import qin.synth
    import qin.train

    runs = []

    class FakeTrainer:
        def __init__(self, cfg, dataset, out_dir, log):
            runs.append((cfg.model.asta_kernel, cfg.model.qnn_kernel, cfg.train.seed, cfg.train.epochs))
            assert cfg.train.precision == "fp32"  # as the row is labelled (auto: bf16 on a recent GPU)

        def fit(self):
            return SimpleNamespace(best_auc=0.8 + 0.01 * (len(runs) % 3))

    monkeypatch.setattr(qin.train, "Trainer", FakeTrainer)
    monkeypatch.setattr(qin.train, "fill_vocab_from_data", lambda cfg, dataset: None)
    monkeypatch.setattr(qin.synth, "builtin_dataset", lambda: "builtin")
    monkeypatch.setattr(qin.data, "load_dataset", lambda root: root)
    rows, lines = parity.training_runs(torch.device("cpu"), seeds=3, quick=False, log=lambda *_: None)
    base = BUILTIN_SETTINGS["train"]
    seed = TrainConfig().seed
    assert runs == [(b, b, seed + s, base["epochs"]) for b in ("torch", "triton") for s in range(3)]
    assert rows[0].passed and "3 seeds per backend" in lines[0]


def test_an_unknown_check_name_is_refused(tmp_path, capsys):
    assert main(["parity", "--quick", "--device", "cpu", "--only", "asat", "--out", str(tmp_path)]) == 2
    assert "asat names no check" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")  # an --out under a file: refused at once, as by the other commands
    assert main(["parity", "--quick", "--device", "cpu", "--out", str(tmp_path / "afile" / "x")]) == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


def test_a_checks_whole_name_selects_it_alone_and_a_prefix_every_check_it_begins():
    from qin.parity import CHECK_NAMES, selected

    assert [n for n in CHECK_NAMES if selected(n, "qnn_train")] == ["qnn_train"]
    assert [n for n in CHECK_NAMES if selected(n, "qnn_train_autocast,asta")] == ["asta", "qnn_train_autocast"]
    assert [n for n in CHECK_NAMES if selected(n, "qnn")] == [n for n in CHECK_NAMES if n.startswith("qnn")]
    assert len([n for n in CHECK_NAMES if n.startswith("qnn")]) == 4


def test_a_weight_that_fp16_turns_subnormal_is_named_in_the_report(quick_report):
    """The quick model's item table (std 1e-4, the authors' init) is 40-50% fp16 subnormals, which
    is why its fp16 gradient is far from float64's; bf16 keeps fp32's exponent range."""
    torch.manual_seed(0)
    table = torch.randn(300, 8) * 1e-4
    table[0] = 0  # a padding row is not counted
    share = (table[1:].abs() < torch.finfo(torch.float16).tiny).double().mean().item()
    assert parity._subnormal_note(table, torch.float16) == f"{share:.0%} of this weight is subnormal in fp16"
    assert 0.4 < share < 0.5
    assert parity._subnormal_note(table, torch.bfloat16) == parity._subnormal_note(table, torch.float32) == ""
    assert parity._subnormal_note(torch.randn(300, 8), torch.float16) == ""
    _, _, rows = quick_report
    noted = {r["quantity"] for r in rows if r["dtype"] == "fp16" and "subnormal" in r["note"]}
    assert "grad items.item_embedding.weight" in noted


@pytest.mark.parametrize("seed", [2, 4, 8])
def test_eval_mode_runs_at_calibrated_batchnorm_statistics(seed):
    """At the initial BatchNorm statistics (mean 0, variance 1) these setup seeds gave the quick
    model eval logits near 3e4, past fp16's range: its eval row compared infinities. The setup
    averages the statistics over its batches, so eval-mode fp16 logits are finite and within
    tolerance of float64's."""
    setup = parity.model_setup(True, steps=3, batch_size=16, seq_len=8, seed=seed)
    norm_keys = [k for k in setup.weights if k.endswith("running_var")]
    assert norm_keys and all(not torch.equal(setup.weights[k], torch.ones_like(setup.weights[k])) for k in norm_keys)
    want = parity.logits_and_grads(parity.build(setup, "torch", torch.float64, torch.device("cpu")), setup.batches[0])[0]
    got = parity.logits_and_grads(parity.build(setup, "torch", torch.float16, torch.device("cpu")), setup.batches[0])[0]
    logits = got["logits (eval mode)"]
    assert torch.isfinite(logits).all()
    _, rel = parity._normwise(logits, want["logits (eval mode)"], tolerances.MODEL[torch.float16])
    assert rel < tolerances.MODEL[torch.float16].rtol


def test_an_earlier_report_or_a_file_as_out_is_refused_before_any_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(parity, "run", lambda args: pytest.fail("checks ran"))
    (tmp_path / "parity.md").write_text("precious\n")
    assert main(["parity", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "parity.md exists; pass --force" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["parity", "--quick", "--device", "cpu", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "parity.md").read_text() == "precious\n"


def test_a_bf16_gradient_that_is_all_zeros_fails(tmp_path, monkeypatch, capsys):
    """A normwise error of 1 (a gradient with nothing right) is never within a model tolerance:
    here the attention's weights get no gradient in bf16, in code both backends share."""
    from qin.model import SparseTargetAttention

    real = SparseTargetAttention.forward

    def no_bf16_gradient(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return out * 0 + out.detach() if out.dtype == torch.bfloat16 else out

    monkeypatch.setattr(SparseTargetAttention, "forward", no_bf16_gradient)
    assert main(["parity", "--quick", "--device", "cpu", "--only", "model", "--out", str(tmp_path)]) == 1
    failed = capsys.readouterr().out.split("FAILED")[-1]
    assert "grad asta.W_q.weight" in failed and "bf16" in failed


def test_a_gradient_both_models_get_wrong_fails_both_and_heads_their_summaries(monkeypatch):
    """The fused model's tolerance widens to MODEL_VS_PLAIN x the plain model's error at most up
    to MODEL_VS_PLAIN x the table's: a plain model with nothing right leaves the fused one held to
    that, not to twice its own error. And the summary line names the worst gradient, not the best."""
    from qin.model import SparseTargetAttention

    real = SparseTargetAttention.forward
    def no_bf16_gradient(self, *args, **kwargs):  # as above: the float64 oracle keeps its gradient
        out = real(self, *args, **kwargs)
        return out * 0 + out.detach() if out.dtype == torch.bfloat16 else out

    monkeypatch.setattr(SparseTargetAttention, "forward", no_bf16_gradient)
    setup = parity.model_setup(True, steps=0, batch_size=16, seq_len=8)
    grads = []
    rows = parity.check_model(setup, [torch.bfloat16], torch.device("cpu"), all_grads=grads)
    for label in ("model[torch]", "model[triton]"):
        (w_q,) = [r for r in grads if r.op == label and r.quantity == "grad asta.W_q.weight"]
        assert not w_q.passed and w_q.tolerance <= tolerances.MODEL_VS_PLAIN * tolerances.MODEL[torch.bfloat16].rtol
        (summary,) = [r for r in rows if r.op == label and r.quantity.startswith("every parameter gradient")]
        assert not summary.passed and summary.note.startswith("worst: asta.")


def test_the_model_rows_run_the_fused_qnn_kernels_in_training(monkeypatch):
    """The model rows train with dropout on (its masks replayed alike into every model), so a
    fault that only the fused QNN's dropout path has fails them; the plain model's rows pass."""
    real = kernels.quadratic_projection

    def faulty_dropout(*args, **kwargs):
        out = real(*args, **kwargs)
        triton_dropout = kwargs.get("backend") == "triton" and kwargs.get("training") and kwargs.get("dropout_p")
        return out * (1 + 1e-2) if triton_dropout else out

    monkeypatch.setattr(kernels, "quadratic_projection", faulty_dropout)
    setup = parity.model_setup(True, steps=0, batch_size=16, seq_len=8)
    rows = parity.check_model(setup, [torch.float32], torch.device("cpu"))
    failed = {r.op for r in rows if not r.passed}
    assert failed == {"model[triton]"}, [r.name for r in rows if not r.passed]


def test_a_run_that_fails_leaves_no_earlier_report_standing(tmp_path, monkeypatch):
    assert main(["parity", "--quick", "--device", "cpu", "--only", "qnn_dropout_mask", "--out", str(tmp_path)]) == 0
    assert "All 5 comparisons pass" in (tmp_path / "parity.md").read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("stopped halfway")

    monkeypatch.setattr(parity, "check_dropout_mask", crash)
    with pytest.raises(RuntimeError, match="stopped halfway"):
        main(["parity", "--quick", "--device", "cpu", "--only", "qnn_dropout_mask", "--out", str(tmp_path), "--force"])
    assert "**INCOMPLETE**" in (tmp_path / "parity.md").read_text()
    assert not (tmp_path / "parity.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parity.md"]


def test_the_report_is_never_written_through_a_link_planted_in_its_folder(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "shared"
    out.mkdir()
    (out / ".parity.md.incomplete").symlink_to(victim)  # the name the INCOMPLETE report was staged under
    parity.mark_incomplete(out, ["header"])
    assert victim.read_text() == "precious"
    assert "**INCOMPLETE**" in (out / "parity.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [".parity.md.incomplete", "parity.md"]


def test_a_run_stopped_part_way_keeps_the_checks_it_finished(tmp_path, monkeypatch, capsys):
    # A time box (gpu_run.sh's parity stage) must not lose every row measured before it struck.
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(parity, "check_model", stopped)
    with pytest.raises(KeyboardInterrupt):  # qin.cli.console_main leaves by the signal
        main(["parity", "--quick", "--device", "cpu", "--only", "qnn_dropout_mask,model", "--out", str(tmp_path)])
    assert capsys.readouterr().err.count("qin parity: interrupted") == 1
    report = (tmp_path / "parity.md").read_text()
    assert "**INCOMPLETE**" in report and "the checks done so far: qnn_dropout_mask." in report
    assert len((tmp_path / "parity.csv").read_text().splitlines()) == 1 + 5  # the mask's rows


def test_ctrl_c_in_a_rerun_says_one_line(tmp_path):
    """Ctrl-C reaches the whole process group: the parent that reran the command for the
    interpreter and its child each printed a KeyboardInterrupt traceback."""
    import os
    import signal
    import sys
    import time
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # so that the CPU run reruns
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    # A process group of its own, as a terminal gives a command, and SIGINT handled as there: a
    # suite run in the background (`pytest &` in a script) inherits it ignored, and so would qin.
    proc = subprocess.Popen([sys.executable, "-m", "qin", "parity", "--quick", "--device", "cpu", "--out",
                             str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 180
        while not (tmp_path / "parity.md").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # the child writes its report as it goes
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGINT, stderr[-3000:]  # both leave by the signal, as a shell expects
    assert "Traceback" not in stderr and stderr.count("qin parity: interrupted") == 1, stderr[-3000:]
    assert "**INCOMPLETE**" in (tmp_path / "parity.md").read_text()


def test_the_dropout_mask_statistics_catch_a_wrong_rate_and_correlated_draws(monkeypatch):
    assert all(r.passed for r in parity.check_dropout_mask(torch.device("cpu")))
    real = parity.dropout_keep_mask

    def twice_p(seed, batch, num_row, dim, p, device):
        return real(seed, batch, num_row, dim, 2 * p, device)

    def pairs_alike(seed, batch, num_row, dim, p, device):  # element 2k+1 repeats element 2k
        keep = real(seed, batch, num_row, dim, p, device)
        return keep.view(batch, -1, 2)[:, :, :1].expand(batch, num_row * dim // 2, 2).reshape(batch, -1)

    for fault, fails in ((twice_p, "keep rate"), (pairs_alike, "both kept: neighbouring elements")):
        monkeypatch.setattr(parity, "dropout_keep_mask", fault)
        assert fails in {r.quantity for r in parity.check_dropout_mask(torch.device("cpu")) if not r.passed}


def test_the_help_names_every_check(capsys):
    with pytest.raises(SystemExit):
        main(["parity", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in parity.CHECK_NAMES), text

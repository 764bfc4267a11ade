"""backend="auto" timing both paths on the device (kernels.choice).

On the CPU the Triton path is the interpreter, so the real trials here always end in torch: they
check the mechanism (both paths run, forward and backward, the decision is kept, logged and
written, the random generators do not move). Fake timings check the rule itself.
"""
import json
import logging

import pytest
import torch

import kernels
from kernels import choice, reference
from kernels.utils import resolve_backend


@pytest.fixture
def timed(monkeypatch, tmp_path, device):
    """Timing on, on this test's device, with an empty decision file of its own."""
    monkeypatch.setenv("QIN_AUTO_BACKEND", "timed")
    monkeypatch.setenv("QIN_CACHE", str(tmp_path))
    monkeypatch.setattr(choice, "TIMED_DEVICE_TYPES", {"cuda", device.type})
    choice.forget()
    yield tmp_path / "backend_choice.json"
    choice.forget()


def _qnn_inputs(device, batch=5, dim=8, num_row=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=g).to(device).requires_grad_()
    weight = (torch.randn(num_row * dim, dim, generator=g) * 0.3).to(device).requires_grad_()
    bias = torch.randn(num_row * dim, generator=g).to(device).requires_grad_()
    return x, weight, bias


def _rng_states(device):
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def test_auto_times_both_paths_once_and_keeps_the_decision(timed, device, caplog):
    x, weight, bias = _qnn_inputs(device)
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="kernels.choice"):
        y_auto = kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.25, training=True)
    after_auto = _rng_states(device)
    (record,) = choice.decisions(device)
    assert record["op"] == "qnn" and record["shape"] == ["B<=8", "D=8", "M=2", "fwd+bwd"]
    assert record["torch_ms"] > 0 and record["triton_ms"] > 0 and "error" not in record
    assert record["choice"] == ("triton" if record["triton_ms"] <= choice.MARGIN * record["torch_ms"] else "torch")
    assert "backend='auto' timed qnn" in caplog.text
    # The trials left the generators where they were: auto's output is the chosen backend's for
    # the same seed, bitwise, and the generator moved as that backend alone moves it.
    # (The torch path's plain-autograd form, where it won: the Function scales before summing the
    # groups, the reference after, so the two differ in the last bits.)
    assert record["torch_forms"].keys() == {"autograd"}
    torch.manual_seed(1)
    if record.get("torch_form"):
        y_chosen = reference.training_quadratic_projection(x, weight, bias, 2, 0.25, True, torch.float32,
                                                           record["torch_form"])
    else:
        y_chosen = kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.25, training=True,
                                                backend=record["choice"], seed=None)
    assert torch.equal(y_auto, y_chosen)
    assert all(torch.equal(a, b) for a, b in zip(after_auto, _rng_states(device)))
    # Written to the file; a new process (here: forgetting) reads it and does not time again.
    assert json.loads(timed.read_text()) == [record]
    choice.forget()
    calls = []
    original = choice._time
    choice._time = lambda *a: calls.append(a) or original(*a)
    try:
        kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.25, training=True)
        six = torch.cat([x, x[:1]]).detach().requires_grad_()  # batch 6: the class of 5 (B<=8)
        kernels.quadratic_projection(six, weight, bias, 2, dropout_p=0.25, training=True)
    finally:
        choice._time = original
    assert calls == [] and len(choice.decisions(device)) == 1


def test_each_op_form_and_mode_is_its_own_shape_class(timed, device):
    g = torch.Generator().manual_seed(0)
    reps = torch.randn(6, 16, generator=g).to(device).requires_grad_()
    index = torch.randint(0, 6, (3, 5), generator=g).to(device)
    query = torch.randn(3, 16, generator=g).to(device).requires_grad_()
    mask = (torch.arange(5) >= 2).expand(3, 5).to(device)
    kernels.gathered_sparse_target_attention(reps, index, query, mask)
    kernels.sparse_target_attention(reps[index].detach(), query, mask)  # history without grad: still trains query
    with torch.no_grad():
        kernels.sparse_target_attention(reps[index], query, mask)
    x, weight, bias = _qnn_inputs(device)
    kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.0, training=True)  # no dropout: nothing to choose
    kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.1, training=False)  # eval folds: nothing either
    shapes = sorted(tuple(r["shape"]) for r in choice.decisions(device))
    assert shapes == [("B<=4", "gathered", "L=5", "D=16", "fwd+bwd"), ("B<=4", "plain", "L=5", "D=16", "fwd"),
                      ("B<=4", "plain", "L=5", "D=16", "fwd+bwd")]
    assert all(r["torch_ms"] > 0 and r["triton_ms"] > 0 for r in choice.decisions(device))


def _fake_trial(triton_ms, fail=False):
    def run(backend):
        if backend == "triton" and fail:
            raise RuntimeError("no kernel for this GPU")

    return choice.Trial("asta", torch.float32, ("B<=8", f"fake {triton_ms} {fail}"), run)


def _fake_timings(monkeypatch, *times_ms) -> list:
    """_median_ms gives these in turn (a trial times torch and Triton: two each); the list of calls."""
    calls, times = [], iter(times_ms)
    monkeypatch.setattr(choice, "_median_ms", lambda runs, dev: calls.append(1) or {name: next(times) for name in runs})
    return calls


@pytest.mark.parametrize("triton_ms, picked", [(0.5, "triton"), (0.95, "triton"), (0.97, "torch"), (1.5, "torch")])
def test_triton_is_chosen_only_when_faster_by_the_margin(timed, device, monkeypatch, triton_ms, picked):
    trial = _fake_trial(triton_ms)
    ran = _fake_timings(monkeypatch, 1.0, triton_ms)
    assert resolve_backend("auto", device, "asta", torch.float32, trial) == picked
    assert len(ran) == 1
    assert resolve_backend("auto", device, "asta", torch.float32, trial) == picked and len(ran) == 1  # kept


def _fake_qnn_trial(fail_form=False):
    def run(backend):
        if backend == "autograd" and fail_form:
            raise RuntimeError("form failed")

    return choice.Trial("qnn", torch.float32, ("B<=8", f"fake {fail_form}"), run, ("autograd",))


@pytest.mark.parametrize("autograd_ms, triton_ms, runs", [
    (0.9, 0.5, ("triton", "autograd")),  # Triton against the faster torch form: 0.5 <= 0.95 * 0.9
    (0.9, 0.9, ("torch", "autograd")),  # the plain form by the margin; Triton not faster than it
    (0.96, 0.93, ("triton", None)),  # the plain form not faster by the margin: Triton against the Function
    (0.96, 1.5, ("torch", None)),
    (0.5, 0.5, ("torch", "autograd")),
])
def test_the_qnn_torch_path_runs_its_faster_form_and_triton_must_beat_that(timed, device, monkeypatch, autograd_ms,
                                                                           triton_ms, runs):
    """The QNN's trial times the torch path's two forms (its autograd Function, 1.0 here, and
    plain autograd) beside Triton: the plain form runs where it took at most MARGIN of the
    Function's time, and Triton only where it took at most MARGIN of the torch form that runs."""
    trial = _fake_qnn_trial()
    _fake_timings(monkeypatch, 1.0, autograd_ms, triton_ms)
    assert (resolve_backend("auto", device, "qnn", torch.float32, trial), choice.torch_form(trial, device)) == runs
    (record,) = choice.decisions(device)
    assert record["torch_forms"] == {"autograd": autograd_ms} and record.get("torch_form") == runs[1]
    shown = "torch (autograd)" if runs == ("torch", "autograd") else runs[0]  # the form where it runs
    assert "(as autograd: " in choice.table([record])[2] and choice.table([record])[2].endswith(f"| {shown} |")
    choice.forget()  # read back from the file: the form too
    assert choice.preload(device) == 1
    call = (trial.op, trial.dtype, trial.shape, device)
    assert (choice._by_call[call], choice.torch_form(trial, device)) == runs


def test_a_failing_torch_form_is_left_out_and_said(timed, device, monkeypatch):
    trial = _fake_qnn_trial(fail_form=True)
    _fake_timings(monkeypatch, 1.0, 2.0)  # torch, triton: the failed form is not timed
    assert resolve_backend("auto", device, "qnn", torch.float32, trial) == "torch"
    (record,) = choice.decisions(device)
    assert record["torch_forms"] == {} and "torch_form" not in record
    assert record["error"] == "autograd: RuntimeError: form failed"
    assert choice.torch_form(trial, device) is None


def test_a_qnn_call_runs_the_torch_form_auto_chose(timed, device, monkeypatch):
    """Where the plain form won, the call trains through autograd of the reference (no autograd
    Function in its graph); where it lost, through the Function."""
    x, weight, bias = _qnn_inputs(device)
    for autograd_ms, node in ((0.5, "MulBackward0"), (1.0, "_TrainingQuadraticProjectionBackward")):
        timed.unlink(missing_ok=True)  # a decision of its own each time
        choice.forget()
        _fake_timings(monkeypatch, 1.0, autograd_ms, 10.0)
        y = kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.25, training=True)
        assert type(y.grad_fn).__name__ == node
        with torch.no_grad():  # nothing trains: neither form, nor a trial
            assert kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.25, training=True).grad_fn is None


def test_a_failing_triton_path_means_torch_and_says_why(timed, device):
    trial = _fake_trial(0.1, fail=True)
    assert resolve_backend("auto", device, "asta", torch.float32, trial) == "torch"
    (record,) = choice.decisions(device)
    assert record["triton_ms"] is None and "no kernel for this GPU" in record["error"]


def test_nothing_is_timed_in_table_mode_while_compiling_or_with_another_backend(timed, device, monkeypatch):
    """Without timing, "auto" goes by the committed table: empty here (on an H200 its fp32 ASTA
    entry answered "triton", which is the table's business, not this test's)."""
    trial = _fake_trial(0.1)
    monkeypatch.setattr(kernels.utils, "MEASURED_FASTER", set())
    monkeypatch.setattr(choice, "_time", lambda *a: pytest.fail("timed"))
    monkeypatch.setenv("QIN_AUTO_BACKEND", "table")
    assert resolve_backend("auto", device, "asta", torch.float32, trial) == "torch"
    monkeypatch.setenv("QIN_AUTO_BACKEND", "timed")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve_backend("auto", device, "asta", torch.float32, trial) == "torch"
    assert choice.trial("torch", device, "asta", torch.float32, (), kernels.sparse_target_attention, (), {}) is None
    monkeypatch.setenv("QIN_AUTO_BACKEND", "fastest")
    with pytest.raises(ValueError, match="QIN_AUTO_BACKEND"):
        resolve_backend("auto", device, "asta", torch.float32, trial)


def test_a_damaged_decision_file_is_ignored_with_a_warning(timed, device, monkeypatch, caplog):
    timed.write_text("{ not json")
    trial = _fake_trial(0.5)
    with caplog.at_level(logging.WARNING, logger="kernels.choice"):
        resolve_backend("auto", device, "asta", torch.float32, trial)
    assert "cannot be read" in caplog.text
    assert json.loads(timed.read_text()) == choice.decisions(device)  # rewritten whole


def test_without_a_home_the_decisions_last_for_the_process_and_say_so(timed, device, monkeypatch, caplog, capsys):
    """Neither HOME nor a passwd entry (a container run under an arbitrary uid): Path.home() raises,
    which crashed the first auto op of a run on a GPU, `qin backends` and the benchmark report."""
    from pathlib import Path

    from bench.report import timed_section
    from qin.cli import main

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("QIN_CACHE")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    _fake_timings(monkeypatch, 1.0, 0.5)
    with caplog.at_level(logging.WARNING, logger="kernels.choice"):
        assert resolve_backend("auto", device, "asta", torch.float32, _fake_trial(0.5)) == "triton"
        assert resolve_backend("auto", device, "asta", torch.float32, _fake_trial(0.5)) == "triton"  # kept
    assert caplog.text.count("no home folder") == 1 and "set QIN_CACHE" in caplog.text
    assert "decisions last for this process only" in caplog.text
    assert "no home folder" in "\n".join(timed_section(device))
    assert main(["backends"]) == 2
    assert "set QIN_CACHE" in capsys.readouterr().err


def test_the_benchmark_report_lists_the_timed_decisions(timed, device, monkeypatch):
    from bench.report import timed_section

    assert "No timed decisions" in timed_section(device)[0]
    _fake_timings(monkeypatch, 1.0, 0.5)
    resolve_backend("auto", device, "asta", torch.float32, _fake_trial(0.5))
    assert "| asta | float32 | B<=8, fake 0.5 False | 1.000 | 0.500 | triton |" in timed_section(device)


def test_a_compiled_model_follows_the_preloaded_decisions_and_never_times(timed, device, monkeypatch):
    """Under torch.compile (fullgraph: the lookup must not break the graph) "auto" uses what was
    decided eagerly before, read back with preload; without a decision it runs torch. The table
    is emptied: on a GPU it names (the H200's ASTA entries) it would run Triton without a decision."""
    import sys

    from qin.model import compile_model
    from tests.test_compile import step, tiny_batch, tiny_model

    monkeypatch.setattr(kernels.utils, "MEASURED_FASTER", set())
    # Triton wins every op, against each form of the torch path.
    monkeypatch.setattr(choice, "_median_ms", lambda runs, dev: {name: 0.5 if name == "triton" else 1.0
                                                                 for name in runs})
    model = tiny_model(dropout=0.1).to(device)
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    step(model, model, batch)  # eager: times both ops
    assert {(r["op"], r["choice"]) for r in choice.decisions(device)} == {("asta", "triton"), ("qnn", "triton")}

    launched = []
    for module in (sys.modules["kernels.quadratic_projection"], sys.modules["kernels.sparse_target_attention"]):
        monkeypatch.setattr(module, "_forward", lambda *a, _f=module._forward: launched.append(_f) or _f(*a))
    monkeypatch.setattr(choice, "_time", lambda *a: pytest.fail("timed while compiling"))
    for preloaded in (False, True):
        choice.forget()  # a new process: nothing known until preload reads the file
        if preloaded:
            assert choice.preload(device) == 2
        torch._dynamo.reset()
        launched.clear()
        loss, _ = step(compile_model(model, fullgraph=True), model, batch)
        assert torch.isfinite(loss)
        # The Triton forwards: ASTA's, and QNN's in each of the 2 layers; none on the torch path.
        assert len(launched) == (3 if preloaded else 0)


def test_a_trial_that_cannot_run_at_all_means_torch_for_now_and_is_not_kept(timed, device):
    def run(backend):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test)")

    trial = choice.Trial("qnn", torch.float32, ("B<=8", "oom"), run)
    assert resolve_backend("auto", device, "qnn", torch.float32, trial) == "torch"
    assert choice.decisions(device) == [] and not timed.exists()


def test_decisions_written_meanwhile_by_another_process_are_kept(timed, device):
    resolve_backend("auto", device, "asta", torch.float32, _fake_trial(2.0))
    other = {"key": "qnn|bfloat16|B<=8|another GPU sm_89|...", "op": "qnn", "dtype": "bfloat16", "shape": ["B<=8"],
             "torch_ms": 1.0, "triton_ms": 0.5, "choice": "triton"}
    timed.write_text(json.dumps(json.loads(timed.read_text()) + [other]))
    resolve_backend("auto", device, "asta", torch.float32, _fake_trial(3.0))
    assert len(json.loads(timed.read_text())) == 3 and other in json.loads(timed.read_text())


def test_qin_backends_lists_the_decisions_and_forgets_them(timed, device, monkeypatch, capsys):
    from qin.cli import main

    assert main(["backends"]) == 0 and "none yet" in capsys.readouterr().out
    _fake_timings(monkeypatch, 1.0, 0.5)
    resolve_backend("auto", device, "asta", torch.float32, _fake_trial(0.5))
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert f"| {choice.where(device)} | asta | float32 | B<=8, fake 0.5 False | 1.000 | 0.500 | triton |" in out, out
    assert main(["backends", "--forget"]) == 0 and not timed.exists()
    choice.forget()
    monkeypatch.setenv("QIN_AUTO_BACKEND", "fastest")
    assert main(["backends"]) == 2 and "QIN_AUTO_BACKEND" in capsys.readouterr().err


def test_incomplete_records_are_skipped_and_an_unremovable_file_is_named(timed, device, monkeypatch, capsys,
                                                                        caplog):
    # A record another version wrote, or a hand edit left short, must not break `qin backends`.
    from qin.cli import main

    _fake_timings(monkeypatch, 1.0, 0.5)
    resolve_backend("auto", device, "asta", torch.float32, _fake_trial(0.5))
    good = json.loads(timed.read_text())
    short = [{"key": "qnn|float32", "choice": "torch"}, {**good[0], "key": good[0]["key"] + "x", "torch_ms": None},
             {**good[0], "key": good[0]["key"] + "y", "shape": "B<=8"},
             {**good[0], "key": good[0]["key"] + "z", "shape": [["B<=8"]]},  # unhashable: preload's key
             {**good[0], "key": good[0]["key"] + "e", "triton_ms": None, "error": None}]  # table() slices it
    timed.write_text(json.dumps(good + short))
    choice.forget()
    with caplog.at_level(logging.WARNING, logger="kernels.choice"):
        assert main(["backends"]) == 0
        assert choice.preload(device) == 1  # the good record alone
    assert "ignoring 5 record(s)" in caplog.text
    assert capsys.readouterr().out.count("| asta | float32 |") == 1

    caplog.clear()
    timed.write_text(json.dumps({"key": "a dict, not a list"}))
    choice.forget()
    with caplog.at_level(logging.WARNING, logger="kernels.choice"):
        assert main(["backends"]) == 0
    assert "holds no list of decisions" in caplog.text

    timed.unlink()
    timed.mkdir()  # a path unlink cannot remove
    assert main(["backends", "--forget"]) == 2
    assert f"cannot remove {timed}" in capsys.readouterr().err


def test_only_an_out_of_memory_triton_trial_is_not_kept_either(timed, device):
    """The trial's copies share the device with the call's own activations: running out of memory
    there says nothing of the Triton path, so it is not written down as a loss for later runs."""
    def run(backend):
        if backend == "triton":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test)")

    trial = choice.Trial("qnn", torch.float32, ("B<=8", "oom triton"), run)
    assert resolve_backend("auto", device, "qnn", torch.float32, trial) == "torch"
    assert choice.decisions(device) == [] and not timed.exists()


def test_a_trial_times_the_two_paths_in_turns():
    order = []
    runs = {"torch": lambda: order.append("torch"), "triton": lambda: order.append("triton")}
    times = choice._median_ms(runs, torch.device("cpu"), reps=3, min_seconds=0)
    assert order == ["torch", "triton"] * 3 and set(times) == {"torch", "triton"}


def test_a_trial_differentiates_what_the_call_does_and_lets_its_copies_go(timed, device):
    """ASTA's mask is no input to differentiate, in the trial as in the call; the copies are freed
    once timed, before the real call runs."""
    import weakref

    seen, copies = [], []

    def fn(history, query, mask, backend):
        seen.append((history.requires_grad, query.requires_grad, mask.requires_grad))
        copies.extend(weakref.ref(t) for t in (history, query, mask))
        return (history * query[:, None, :] * mask[..., None]).sum(1)

    history = torch.randn(3, 4, 5, device=device, requires_grad=True)
    query = torch.randn(3, 5, device=device, requires_grad=True)
    mask = torch.ones(3, 4, device=device)
    trial = choice.trial("auto", device, "asta", torch.float32, ("fidelity",), fn, (history, query, mask), {})
    assert trial.shape[-1] == "fwd+bwd"
    choice.decide(trial, device)
    assert seen and set(seen) == {(True, True, False)}
    assert trial.run is None and all(ref() is None for ref in copies)


def test_fp32_on_cuda_is_its_own_shape_class_with_tf32(monkeypatch):
    """TF32 speeds up the cuBLAS products of both paths, not alike: a decision timed without it
    does not stand for a run with it. (Building a trial does not touch the GPU.)"""
    monkeypatch.setenv("QIN_AUTO_BACKEND", "timed")
    x = torch.randn(3, 4)
    shapes, was = {}, torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for dtype in (torch.float32, torch.bfloat16):
                t = choice.trial("auto", torch.device("cuda"), "qnn", dtype, ("D=4",), kernels.quadratic_projection,
                                 (x,), {}, train=True)
                shapes[tf32, dtype] = t.shape
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was
    assert shapes[False, torch.float32] == ("B<=4", "D=4", "fwd+bwd")
    assert shapes[True, torch.float32] == ("B<=4", "D=4", "fwd+bwd", "tf32")
    assert shapes[True, torch.bfloat16] == shapes[False, torch.bfloat16] == ("B<=4", "D=4", "fwd+bwd")


def test_the_qnn_decision_says_when_its_fp32_products_run_in_3xtf32(timed, device):
    """Where the Triton QNN multiplies fp32 through 3xTF32 (kernels/fp32_gemm.py; forced here, as on
    an H200 with TF32 off) its decision is a shape class of its own: a decision timed with cuBLAS's
    products (QIN_FP32_GEMM=vendor, or before the split existed) does not stand for it, nor the
    other way round. 16-bit calls never run the split and keep their class."""
    from kernels import fp32_gemm

    x, weight, bias = _qnn_inputs(device)
    with fp32_gemm.products("3xtf32"):
        kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.25, training=True)
        kernels.quadratic_projection(x.double(), weight.double(), bias.double(), 2, dropout_p=0.25, training=True)
    with fp32_gemm.products("vendor"):
        kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.25, training=True)
    shapes = {(r["dtype"], tuple(r["shape"])) for r in choice.decisions(device)}
    assert shapes == {("float32", ("B<=8", "D=8", "M=2", "3xTF32", "fwd+bwd")),
                      ("float64", ("B<=8", "D=8", "M=2", "fwd+bwd")),
                      ("float32", ("B<=8", "D=8", "M=2", "fwd+bwd"))}, shapes


def test_deterministic_algorithms_keep_auto_off_the_atomic_backward(timed, device, monkeypatch,
                                                                   deterministic_algorithms):
    """The gathered form's Triton backward sums into reps by atomic adds: under
    torch.use_deterministic_algorithms(True) "auto" runs torch, untimed, as long as reps trains."""
    from test_asta import small_gathered_inputs

    monkeypatch.setattr(choice, "_time", lambda *a: pytest.fail("timed"))
    reps, index, query, mask = small_gathered_inputs(device)
    z = kernels.gathered_sparse_target_attention(reps, index, query, mask)
    assert choice.decisions(device) == []
    want = reference.regathered_sparse_target_attention(reps, index, query, mask)
    assert torch.equal(z, want)


def test_alert_not_deterministic_follows_torchs_setting():
    from kernels.utils import alert_not_deterministic

    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        alert_not_deterministic("op X")  # off: nothing
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="op X is not deterministic"):
            alert_not_deterministic("op X")
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="op X is not deterministic"):
            alert_not_deterministic("op X")
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_runs_one_backend_and_gets_the_plain_gradient(timed, device, monkeypatch, reentrant):
    """Under torch.utils.checkpoint the forward may run without grad (reentrant) and is run again
    in backward: QNN's class follows its dropout, not the grad mode, so both runs take one
    backend and draw one mask; and the trial's tensors bypass checkpoint's saved-tensor hooks."""
    from torch.utils.checkpoint import checkpoint

    _fake_timings(monkeypatch, 1.0, 2.0, 1.0, 0.5)  # a second class would pick Triton
    x, weight, bias = _qnn_inputs(device, batch=6)

    def layer(inp):
        return kernels.quadratic_projection(inp, weight, bias, 2, dropout_p=0.5, training=True)

    torch.manual_seed(3)
    checkpoint(layer, x, use_reentrant=reentrant).sum().backward()
    got = x.grad.clone()
    (record,) = choice.decisions(device)
    x.grad = None
    torch.manual_seed(3)
    kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.5, training=True,
                                 backend=record["choice"]).sum().backward()
    assert torch.equal(got, x.grad)


def test_a_dynamic_batch_is_not_fixed_by_the_shape_class(timed, device, monkeypatch):
    """Traced with a symbolic batch (torch.compile's dynamic shapes, torch.export), the call
    follows the decision of the largest batch timed before, without fixing the batch: one graph
    for every batch size."""
    import sys

    from torch._dynamo.testing import CompileCounter

    asta = sys.modules["kernels.sparse_target_attention"]

    def inputs(batch):
        g = torch.Generator().manual_seed(batch)
        return (torch.randn(batch, 5, 8, generator=g).to(device), torch.randn(batch, 8, generator=g).to(device),
                torch.ones(batch, 5, device=device))

    _fake_timings(monkeypatch, 1.0, 2.0, 1.0, 0.5)  # B<=4: torch; B<=16: Triton
    with torch.no_grad():
        kernels.sparse_target_attention(*inputs(3))
        kernels.sparse_target_attention(*inputs(12))
    assert sorted((r["shape"][0], r["choice"]) for r in choice.decisions(device)) == [("B<=16", "triton"),
                                                                                      ("B<=4", "torch")]
    monkeypatch.setattr(choice, "_time", lambda *a: pytest.fail("timed while compiling"))
    launched = []
    monkeypatch.setattr(asta, "_forward", lambda *a, _f=asta._forward: launched.append(1) or _f(*a))
    torch._dynamo.reset()
    graphs = CompileCounter()
    compiled = torch.compile(kernels.sparse_target_attention, backend=graphs, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for batch in (9, 10, 11):  # not 5 or 8: dynamo would take the batch for L or D, which the class fixes
            assert torch.allclose(compiled(*inputs(batch)), reference.sparse_target_attention(*inputs(batch)),
                                  atol=1e-5)
    assert graphs.frame_count == 1 and len(launched) == 3


def test_export_with_auto_timing_keeps_the_batch_dynamic(timed, device):
    """`qin export` on a device where auto times (CUDA; here the CPU added): the traced shape class
    must not fix the batch, or torch.export refuses the dynamic batch dimension."""
    from qin.export import export_model
    from tests.test_compile import tiny_batch, tiny_model

    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    batch.pop("label")
    export_model(tiny_model().to(device), batch)


@pytest.fixture
def fake_h200(monkeypatch, tmp_path):
    """cuda:0 named as an H200 (sm_90), with a MEASURED_FASTER entry for its bf16 QNN; no GPU needed
    as long as nothing runs on it. Returns the device and a dict whose "name" renames the GPU."""
    import kernels.utils

    monkeypatch.setenv("QIN_CACHE", str(tmp_path))
    monkeypatch.setenv("QIN_AUTO_BACKEND", "timed")
    gpu = {"name": "NVIDIA H200"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu["name"])
    monkeypatch.setattr(kernels.utils, "MEASURED_FASTER", {("qnn", torch.bfloat16, "NVIDIA H200 sm_90")})
    choice.forget()
    yield torch.device("cuda", 0), gpu
    choice.forget()


def test_a_table_entry_serves_only_its_gpu_and_never_overrides_a_timing(fake_h200, monkeypatch):
    h200, gpu = fake_h200
    shape = ("B<=8192", "D=1024", "M=4", "fwd+bwd")
    timed_here = choice.Trial("qnn", torch.bfloat16, shape, lambda backend: pytest.fail("timed again"))
    choice._by_call[("qnn", torch.bfloat16, shape, h200)] = "torch"  # timed on this GPU: torch won
    assert resolve_backend("auto", h200, "qnn", torch.bfloat16, timed_here) == "torch"
    # Where nothing is timed (a traced call of a shape class never timed; table mode), the entry.
    traced = choice.Trial("qnn", torch.bfloat16, (choice.TRACED_BATCH, "D=512", "M=4", "fwd+bwd"), None)
    assert resolve_backend("auto", h200, "qnn", torch.bfloat16, traced) == "triton"
    monkeypatch.setenv("QIN_AUTO_BACKEND", "table")
    assert resolve_backend("auto", h200, "qnn", torch.bfloat16) == "triton"
    assert resolve_backend("auto", h200, "qnn", torch.float32) == "torch"
    for other in ("NVIDIA H100 PCIe", "NVIDIA H20"):  # the same compute capability, never measured
        gpu["name"] = other
        choice.forget()
        assert resolve_backend("auto", h200, "qnn", torch.bfloat16) == "torch"


def test_a_table_lookup_under_torch_compile_keeps_the_graph_whole(fake_h200):
    from kernels.utils import auto_picks_triton

    h200, _ = fake_h200
    # Dynamo's graph is what is checked (fullgraph raises at a break); backend="eager" skips
    # inductor, whose first compile of a process took 45-77 s on the H200 image.
    compiled = torch.compile(lambda x: x * 2 if auto_picks_triton("qnn", torch.bfloat16, h200) else x, fullgraph=True,
                             backend="eager")
    assert compiled(torch.ones(2)).tolist() == [2.0, 2.0]


def test_auto_runs_torch_where_the_kernels_cannot_take_the_shape(device, monkeypatch):
    # A table entry (or a timing of another shape) saying Triton must not make "auto" raise where
    # the torch path works: histories wider than the ASTA kernel's rows, QNN past int32 offsets.
    import importlib

    asta = importlib.import_module("kernels.sparse_target_attention")  # the modules (kernels' names are the ops)
    qnn = importlib.import_module("kernels.quadratic_projection")
    asked = []

    def as_if_measured_faster(backend, *args, **kwargs):
        asked.append(backend)
        return "triton" if backend == "auto" else backend

    monkeypatch.setattr(asta, "resolve_backend", as_if_measured_faster)
    monkeypatch.setattr(qnn, "resolve_backend", as_if_measured_faster)
    wide = asta.MAX_D + 1
    history, query = torch.randn(2, 3, wide, device=device), torch.randn(2, wide, device=device)
    mask = torch.ones(2, 3, device=device)
    assert torch.allclose(kernels.sparse_target_attention(history, query, mask),
                          reference.sparse_target_attention(history, query, mask))
    kernels.gathered_sparse_target_attention(history[0], torch.zeros(2, 3, dtype=torch.long, device=device),
                                             query, mask)
    assert asked == ["torch", "torch"]
    monkeypatch.setattr(qnn, "INT32_LIMIT", 5 * 2 * 8)  # as B*M*D past 2**31 would
    x, weight, bias = _qnn_inputs(device)
    kernels.quadratic_projection(x, weight, bias, 2, dropout_p=0.1, training=True)
    assert asked[-1] == "torch"


def test_the_decisions_listed_for_a_device_are_those_that_hold_now(timed, device):
    resolve_backend("auto", device, "asta", torch.float32, _fake_trial(2.0))
    (current,) = choice.decisions(device)
    stale = dict(current, key=current["key"].rsplit("|torch ", 1)[0] + "|torch 2.4.0|triton 3.0.0|kernels 0123456789ab",
                 choice="triton")
    timed.write_text(json.dumps([current, stale]))
    choice.forget()
    assert choice.decisions(device) == [current]  # the other versions' record is never used: not listed
    assert len(choice.decisions()) == 2


def test_a_trial_runs_backward_outside_autocast_as_the_trainer_does():
    """A call made under autocast is timed with its forward under autocast and its backward
    outside, as the trainer runs them: inside, the torch backward of the gathered attention
    failed on CUDA in bf16, and the trial gave up timing it."""
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", torch.is_autocast_enabled("cpu")))
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", torch.is_autocast_enabled("cpu")))
            return grad * 2

    x = torch.randn(4, requires_grad=True)
    run = choice._replay(lambda x, backend: Probe.apply(x), (x,), {}, train=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run("torch")
    assert seen == [("forward", True), ("backward", False)]

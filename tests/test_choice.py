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
from kernels import choice
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
    torch.manual_seed(1)
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
    """_median_ms returns these in turn (a trial times torch, then Triton); the list of calls."""
    calls, times = [], iter(times_ms)
    monkeypatch.setattr(choice, "_median_ms", lambda run, dev: calls.append(1) or next(times))
    return calls


@pytest.mark.parametrize("triton_ms, picked", [(0.5, "triton"), (0.95, "triton"), (0.97, "torch"), (1.5, "torch")])
def test_triton_is_chosen_only_when_faster_by_the_margin(timed, device, monkeypatch, triton_ms, picked):
    trial = _fake_trial(triton_ms)
    ran = _fake_timings(monkeypatch, 1.0, triton_ms)
    assert resolve_backend("auto", device, "asta", torch.float32, trial) == picked
    assert len(ran) == 2
    assert resolve_backend("auto", device, "asta", torch.float32, trial) == picked and len(ran) == 2  # kept


def test_a_failing_triton_path_means_torch_and_says_why(timed, device):
    trial = _fake_trial(0.1, fail=True)
    assert resolve_backend("auto", device, "asta", torch.float32, trial) == "torch"
    (record,) = choice.decisions(device)
    assert record["triton_ms"] is None and "no kernel for this GPU" in record["error"]


def test_nothing_is_timed_in_table_mode_while_compiling_or_with_another_backend(timed, device, monkeypatch):
    trial = _fake_trial(0.1)
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


def test_the_benchmark_report_lists_the_timed_decisions(timed, device, monkeypatch):
    from bench.report import timed_section

    assert "No timed decisions" in timed_section(device)[0]
    _fake_timings(monkeypatch, 1.0, 0.5)
    resolve_backend("auto", device, "asta", torch.float32, _fake_trial(0.5))
    assert "| asta | float32 | B<=8, fake 0.5 False | 1.000 | 0.500 | triton |" in timed_section(device)


def test_a_compiled_model_follows_the_preloaded_decisions_and_never_times(timed, device, monkeypatch):
    """Under torch.compile (fullgraph: the lookup must not break the graph) "auto" uses what was
    decided eagerly before, read back with preload; without a decision it runs torch."""
    import sys

    from qin.model import compile_model
    from tests.test_compile import step, tiny_batch, tiny_model

    _fake_timings(monkeypatch, *[1.0, 0.5] * 4)  # torch, then Triton, for each op: Triton wins
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
    assert f"| {choice._where(device)} | asta | float32 | B<=8, fake 0.5 False | 1.000 | 0.500 | triton |" in out, out
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
             {**good[0], "key": good[0]["key"] + "y", "shape": "B<=8"}]
    timed.write_text(json.dumps(good + short))
    choice.forget()
    with caplog.at_level(logging.WARNING, logger="kernels.choice"):
        assert main(["backends"]) == 0
    assert "ignoring 3 record(s)" in caplog.text
    assert capsys.readouterr().out.count("| asta | float32 |") == 1

    timed.unlink()
    timed.mkdir()  # a path unlink cannot remove
    assert main(["backends", "--forget"]) == 2
    assert f"cannot remove {timed}" in capsys.readouterr().err

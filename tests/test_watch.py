"""Watching a run: the TensorBoard events hold what the run did, each step once also across a stop
and resume; curves.png is drawn; a failing events file or picture warns once and training goes on."""
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch.utils.tensorboard

import qin.train
from qin.checkpoint import load_checkpoint
from qin.cli import main
from qin.config import load_config
from qin.curves import labels_for, steps_to_epochs
from qin.data import load_dataset
from qin.events import event_files, read_scalars
from qin.synth import make_dataset
from qin.train import Trainer, fill_vocab_from_data
from qin.watch import RunWatch

# 2000 rows at batch 250: 8 steps an epoch.
SMALL = ["model.embed_dim=8", "model.attention_dim=16", "train.batch_size=250", "train.eval_batch_size=1000",
         "train.epochs=2", "train.device=cpu"]
STEPS_PER_EPOCH = 8
# A clip far below the gradient norm (the logged norm must be the one before clipping), and
# checkpoints that leave logged steps uncovered when a run stops between them.
WATCHED = ("train.log_every_steps=2", "train.checkpoint_every_steps=5", "train.grad_clip=0.001")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data") / "ds", rows=2000, items=100, seed=6,
                        valid_rows=500, test_rows=50)
    return load_dataset(root)


def make_trainer(dataset, out_dir, *overrides):
    cfg = load_config(overrides=[*SMALL, *overrides])
    cfg.data.dir = str(dataset.root)
    fill_vocab_from_data(cfg, dataset)
    return Trainer(cfg, dataset, out_dir, log=lambda *_: None)


def steps_by_tag(run_dir):
    return {tag: [step for step, _ in points] for tag, points in read_scalars(run_dir).items()}


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "small-run"
    make_trainer(dataset, out, *WATCHED).fit()
    return out


def test_events_hold_the_step_and_epoch_scalars(run_dir):
    scalars = read_scalars(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = list(range(2, 2 * STEPS_PER_EPOCH + 1, 2))
    for tag in ("train/loss", "train/grad_norm", "train/lr", "train/samples_per_s"):
        assert [step for step, _ in scalars[tag]] == logged, tag
    for tag in ("epoch/train_loss", "epoch/valid_auc", "epoch/valid_logloss", "epoch/lr", "epoch/samples_per_s",
                "epoch/peak_memory_mb"):
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
        values = [v for _, v in scalars[tag]]
        np.testing.assert_allclose(values, [r[tag.split("/")[1]] for r in records], rtol=1e-6)
    # Each point is the mean loss of its 2 steps, so an epoch's four points average to the epoch's loss.
    losses = [v for _, v in scalars["train/loss"]]
    np.testing.assert_allclose([np.mean(losses[:4]), np.mean(losses[4:])], [r["train_loss"] for r in records],
                               rtol=1e-5)
    assert all(norm > 0.01 for _, norm in scalars["train/grad_norm"]), "a clipped norm was logged"
    np.testing.assert_allclose([v for _, v in scalars["train/lr"]], 2e-3, rtol=1e-6)
    assert all(v > 0 for _, v in scalars["train/samples_per_s"])


def test_tensorboard_reads_the_run_folder(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    assert {"train/loss", "epoch/valid_auc"} <= set(accumulator.Tags()["scalars"])
    assert [e.step for e in accumulator.Scalars("epoch/valid_auc")] == [1, 2]


def test_curves_png_is_drawn_and_qin_plot_draws_several_runs(run_dir, tmp_path, capsys):
    import matplotlib.image

    assert matplotlib.image.imread(run_dir / "curves.png").shape[1] > 800
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())  # no step log: epochs only
    output = tmp_path / "both.png"
    assert main(["plot", str(run_dir), str(other), "--output", str(output)]) == 0
    assert matplotlib.image.imread(output).shape[1] > 800
    assert main(["plot", str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    # Among several runs, one that has not finished an epoch yet is left out, named.
    starting = tmp_path / "starting"
    starting.mkdir()
    capsys.readouterr()
    assert main(["plot", str(run_dir), str(starting), "--output", str(tmp_path / "y.png")]) == 0
    printed = capsys.readouterr()
    assert f"left out: {starting}: no metrics.jsonl" in printed.err and "(1 run(s))" in printed.out
    assert main(["plot", str(starting), str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")]) == 2
    assert "no run has a finished epoch to draw yet" in capsys.readouterr().err
    # A damaged metrics.jsonl, or an output that is no PNG file, is named, never a traceback.
    for line, named in (('{"epoch": 1', "line 2: not JSON"), ('{"epoch": 1}', "line 2: no step, train_loss")):
        (other / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text().splitlines()[0] + "\n" + line)
        assert main(["plot", str(other), "--output", str(tmp_path / "x.png")]) == 2
        assert named in capsys.readouterr().err
    (tmp_path / "dir.png").mkdir()
    for output, named in ((run_dir / "best.pt", "give it a .png name"), (tmp_path / "dir.png", "is a folder")):
        assert main(["plot", str(run_dir), "--output", str(output)]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_labels_and_epoch_axis():
    assert labels_for([Path("runs/fp32"), Path("runs/bf16")]) == ["fp32", "bf16"]
    assert labels_for([Path("a/qin"), Path("b/qin")]) == ["a/qin", "b/qin"]
    records = [{"step": 8}, {"step": 16}]
    np.testing.assert_allclose(steps_to_epochs(records, np.array([4.0, 8.0, 12.0, 20.0])), [0.5, 1.0, 1.5, 2.5])


def test_a_run_that_logged_one_step_shows_it(tmp_path, monkeypatch):
    """12 steps logged every 10: one point per step curve, which a line alone left undrawn (an
    empty learning-rate panel)."""
    from matplotlib.figure import Figure

    from qin.curves import RunCurves, draw

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig))
    records = [{"epoch": 1, "step": 6, "train_loss": 0.6, "valid_auc": 0.7, "valid_logloss": 0.6, "lr": 1e-3},
               {"epoch": 2, "step": 12, "train_loss": 0.5, "valid_auc": 0.8, "valid_logloss": 0.5, "lr": 1e-3}]
    draw([RunCurves("mine", records, {"train/loss": [(10, 0.55)], "train/lr": [(10, 1e-3)]})], tmp_path / "c.png")
    ax_loss, _, ax_lr = drawn[0].axes
    for ax in (ax_loss, ax_lr):
        line = ax.lines[0]  # the step series
        assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "", " ")


def test_a_stopped_run_resumes_its_curves_with_each_step_once(dataset, run_dir, tmp_path, monkeypatch):
    # Stop at step 7: the checkpoint covers step 5, the events already hold step 6.
    first = make_trainer(dataset, tmp_path / "split", *WATCHED)
    original, calls = qin.train.loss_fn, {"n": 0}

    def stop_at_step_seven(*args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(qin.train, "loss_fn", stop_at_step_seven)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    monkeypatch.setattr(qin.train, "loss_fn", original)
    first.watch.close()  # the worst case: everything the process logged reached the disk
    assert load_checkpoint(tmp_path / "split" / "latest.pt")["trainer"]["step"] == 5
    assert steps_by_tag(tmp_path / "split")["train/loss"] == [2, 4, 6]

    make_trainer(dataset, tmp_path / "split", *WATCHED).fit(resume=True)
    straight, split = read_scalars(run_dir), read_scalars(tmp_path / "split")
    assert split.keys() == straight.keys()
    for tag, points in split.items():
        counts = Counter(step for step, _ in points)
        assert max(counts.values()) == 1, f"{tag}: steps written twice: {[s for s, n in counts.items() if n > 1]}"
        assert sorted(counts) == [step for step, _ in straight[tag]], tag
    # The points are the uninterrupted run's, that of step 6 too: its window (steps 5 and 6)
    # straddles the checkpoint, which carries step 5's share of it.
    for tag in ("train/loss", "train/grad_norm", "train/lr"):
        assert split[tag] == straight[tag], tag


def test_a_fresh_run_drops_the_events_of_a_run_that_left_no_checkpoint(dataset, run_dir, tmp_path):
    # A run killed before its first checkpoint leaves events (flushed every 30 s) and no
    # latest.pt, so a fresh run may start in its folder; its curves must not show both runs.
    folder = tmp_path / "again"
    folder.mkdir()
    for path in event_files(run_dir):
        (folder / path.name).write_bytes(path.read_bytes())
    make_trainer(dataset, folder, *WATCHED).fit()
    assert steps_by_tag(folder) == steps_by_tag(run_dir)
    assert len(event_files(folder)) == 1


@pytest.mark.parametrize("failing", ["__init__", "add_scalar", "flush"])
def test_a_failing_events_file_or_picture_warns_once_and_training_goes_on(dataset, tmp_path, monkeypatch,
                                                                          caplog, failing):
    calls = {"n": 0}
    real = getattr(torch.utils.tensorboard.SummaryWriter, failing)

    def full_disk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2 or failing == "__init__":  # fails from its second use on, as a disk fills
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.tensorboard.SummaryWriter, failing, full_disk)
    out = tmp_path / "run"
    (out / "curves.png").mkdir(parents=True)  # a folder where the picture should go: it cannot be written
    caplog.set_level(logging.WARNING, logger="qin.watch")
    state = make_trainer(dataset, out, "train.log_every_steps=1", "train.max_steps_per_epoch=3").fit()
    assert state.epoch == 2 and load_checkpoint(out / "latest.pt")["trainer"]["step"] == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "TensorBoard" in w]) == 1, warnings
    assert len([w for w in warnings if "curves.png" in w]) == 1, warnings
    assert "No space left on device" in " ".join(warnings)
    assert len(event_files(out)) <= 1


def test_a_write_error_in_tensorboards_writer_thread_is_one_warning_not_a_thread_traceback(
        dataset, tmp_path, monkeypatch, caplog):
    import threading

    from tensorboard.summary.writer import record_writer

    real, calls, thread_errors = record_writer.RecordWriter.write, {"n": 0}, []

    def full_disk(self, data):  # runs in tensorboard's writer thread
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))
    caplog.set_level(logging.WARNING, logger="qin.watch")
    state = make_trainer(dataset, tmp_path / "run", "train.log_every_steps=1", "train.max_steps_per_epoch=3").fit()
    assert state.epoch == 2
    assert thread_errors == []  # the default hook would have printed "Exception in thread ..."
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    assert threading.excepthook is not None and threading.excepthook.__name__ == "<lambda>"  # put back


def test_log_every_steps_must_be_positive():
    from qin.config import ConfigError

    with pytest.raises(ConfigError, match="train.log_every_steps must be a positive integer"):
        load_config(overrides=["train.log_every_steps=0"])


def test_trimming_removes_the_duplicates_an_interrupted_trim_leaves(run_dir, tmp_path):
    from qin.events import keep_covered

    (original,) = event_files(run_dir)
    # As if a kill came after the trimmed copy was written but before the old file was deleted.
    for name in (original.name, original.name + ".resumed"):
        (tmp_path / name).write_bytes(original.read_bytes())
    # Another writer's file with no scalar at all (add_graph writes a graph, no summary) stays.
    graph_writer = torch.utils.tensorboard.SummaryWriter(str(tmp_path), filename_suffix=".graph")
    graph_writer.add_graph(torch.nn.Linear(2, 1), torch.zeros(1, 2))
    graph_writer.close()
    (graph,) = [path for path in event_files(tmp_path) if path.name.endswith(".graph")]
    assert keep_covered(tmp_path, last_step=2 * STEPS_PER_EPOCH, last_epoch=2)
    assert graph.exists()
    graph.unlink()
    assert len(event_files(tmp_path)) == 1
    assert steps_by_tag(tmp_path) == steps_by_tag(run_dir)
    assert not keep_covered(tmp_path, last_step=2 * STEPS_PER_EPOCH, last_epoch=2)  # nothing left to do
    assert keep_covered(tmp_path, last_step=STEPS_PER_EPOCH, last_epoch=1)
    assert steps_by_tag(tmp_path)["train/loss"] == [2, 4, 6, 8]
    assert steps_by_tag(tmp_path)["epoch/valid_auc"] == [1]


def test_skipped_fp16_steps_leave_the_gradient_norm_curve_instead_of_logging_zero(tmp_path):
    # A step the fp16 scaler skipped has an inf/NaN norm: max() dropped it and a window of them logged 0.
    watch = RunWatch(tmp_path, log_every_steps=2)
    watch.open()
    for step, norm in enumerate([math.inf, math.nan, math.nan, 3.0, 5.0, 4.0], start=1):
        watch.after_step(step, 0.5, norm, 1e-3, 8)
    watch.close()
    norms = [value for _, value in read_scalars(tmp_path)["train/grad_norm"]]
    assert math.isnan(norms[0]) and norms[1:] == [3.0, 5.0]


def test_a_fresh_run_leaves_another_writers_events_in_its_folder_alone(dataset, tmp_path):
    # The folder may be a TensorBoard log directory shared with other work: only the events of an
    # earlier run of ours (train/, epoch/ scalars) are the fresh run's to remove.
    out = tmp_path / "shared_logdir"
    writer = torch.utils.tensorboard.SummaryWriter(str(out))
    for i in range(100):
        writer.add_scalar("other_model/loss", 1 / (i + 1), i)
    writer.close()
    (theirs,) = event_files(out)
    make_trainer(dataset, out, "train.epochs=1", "train.log_every_steps=4").fit()
    assert theirs.exists()
    scalars = read_scalars(out)
    assert [step for step, _ in scalars["other_model/loss"]] == list(range(100))
    assert [step for step, _ in scalars["train/loss"]] == [4, 8]


def test_the_compiling_step_is_left_out_of_samples_per_s(dataset, tmp_path, monkeypatch):
    """The first step of train.compile=true compiles (minutes on a GPU): neither the epoch's figure
    nor TensorBoard's first samples/s point counts it. A fake clock puts 1000 s in that step."""
    import time

    real, offset, calls = time.perf_counter, [0.0], []
    monkeypatch.setattr(time, "perf_counter", lambda: real() + offset[0])
    original = qin.train.loss_fn

    def compiling_first(*args, **kwargs):
        if not calls:
            offset[0] += 1000.0
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(qin.train, "loss_fn", compiling_first)
    trainer = make_trainer(dataset, tmp_path / "run", "train.epochs=1", "train.log_every_steps=2")
    trainer._compiling = True  # as train.compile=true sets it (nothing compiles here)
    state = trainer.fit()
    first_point = read_scalars(tmp_path / "run")["train/samples_per_s"][0]
    assert first_point[0] == 2 and first_point[1] > 250 / 100  # one 250-row step in well under 100 s
    assert state.history[0]["samples_per_s"] > 250 / 100
    # One step an epoch: nothing but the compiling step ran, so nothing is measured, and says why.
    calls.clear()
    logged = []
    trainer = make_trainer(dataset, tmp_path / "one", "train.epochs=1", "train.max_steps_per_epoch=1")
    trainer.log = logged.append
    trainer._compiling = True
    assert trainer.fit().history[0]["samples_per_s"] is None
    assert any("samples/s not measured (only the compiling step ran)" in line for line in logged), logged


def test_the_star_marks_the_epoch_best_pt_holds(tmp_path):
    # A gain under the trainer's MIN_AUC_GAIN is no gain: best.pt stays at epoch 1, so does the star.
    import matplotlib

    matplotlib.use("Agg")
    from qin import curves

    run = tmp_path / "run"
    run.mkdir()
    records = [dict(epoch=1, step=8, train_loss=0.5, valid_auc=0.7, valid_logloss=0.5, lr=1e-3, best=True),
               dict(epoch=2, step=16, train_loss=0.4, valid_auc=0.7000008, valid_logloss=0.5, lr=5e-4, best=False)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = []
    real_annotate = matplotlib.axes.Axes.annotate
    matplotlib.axes.Axes.annotate = lambda self, text, xy, *a, **k: drawn.append((text, xy)) or real_annotate(
        self, text, xy, *a, **k)
    try:
        curves.draw_runs([run], tmp_path / "c.png")
    finally:
        matplotlib.axes.Axes.annotate = real_annotate
    assert drawn == [("0.7000", (1, 0.7))]


def test_a_picture_that_cannot_be_drawn_never_stops_training(dataset, tmp_path, monkeypatch, caplog):
    from qin import curves

    def broken(*args, **kwargs):
        raise ImportError("No module named 'matplotlib.figure'")  # a broken or --no-deps install

    monkeypatch.setattr(curves, "draw_runs", broken)
    with caplog.at_level(logging.WARNING, logger="qin.watch"):
        state = make_trainer(dataset, tmp_path / "run", "train.epochs=2").fit()
    assert len(state.history) == 2 and caplog.text.count("could not write") == 1
    assert "ImportError: No module named 'matplotlib.figure'" in caplog.text

"""The `qin` command as a user meets it: each subcommand end to end, and every refusal with its message."""

import json
import logging
import os
import re
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from qin.checkpoint import LOCK_NAME, atomic_write, load_checkpoint, run_lock
from qin.cli import main
from qin.synth import make_dataset

SMALL_RUN = ["model.embed_dim=8", "model.attention_dim=16", "train.batch_size=256",
             "train.eval_batch_size=1024", "train.epochs=1", "train.device=cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", rows=3000, items=200, seed=5,
                        valid_rows=800, test_rows=300)


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(out), *SMALL_RUN]) == 0
    return out


def test_make_data_writes_the_layout_and_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "generated"
    assert main(["make-data", str(out), "--rows", "500", "--items", "50", "--seed", "1"]) == 0
    assert {p.name for p in out.iterdir()} >= {"train.parquet", "valid.parquet", "test.parquet", "item_info.parquet"}
    assert pq.read_table(out / "train.parquet").num_rows == 500
    assert "label" not in pq.read_schema(out / "test.parquet").names
    before = (out / "train.parquet").read_bytes()
    assert main(["make-data", str(out), "--rows", "100"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "train.parquet").read_bytes() == before


@pytest.mark.parametrize("args, named", [(["--rows", "1"], "--rows must be at least 2"),
                                         (["--items", "0"], "--items must be at least 1"),
                                         (["--seed", "-1"], "--seed must be at least 0")])
def test_make_data_refuses_bad_sizes(tmp_path, capsys, args, named):
    assert main(["make-data", str(tmp_path / "d"), *args]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_make_data_that_fails_leaves_the_earlier_dataset_whole(tmp_path, monkeypatch, capsys):
    import qin.synth

    out = tmp_path / "generated"
    assert main(["make-data", str(out), "--rows", "300", "--items", "20"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def half_then_fail(root, **kwargs):
        (Path(root) / "item_info.parquet").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(qin.synth, "make_dataset", half_then_fail)
    assert main(["make-data", str(out), "--rows", "500", "--force"]) == 130
    assert f"interrupted; {out} is as it was" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either
    assert [p.name for p in tmp_path.iterdir()] == ["generated"]

    def out_of_memory(root, **kwargs):
        raise MemoryError

    monkeypatch.setattr(qin.synth, "make_dataset", out_of_memory)
    assert main(["make-data", str(tmp_path / "huge"), "--rows", "2000000000"]) == 2
    assert "2,000,000,000 rows of 5,000 items do not fit" in capsys.readouterr().err
    assert not (tmp_path / "huge").exists()  # the folder it made is gone with the failure


def test_make_data_stages_on_the_output_folders_filesystem(tmp_path, monkeypatch):
    # Staged beside the folder, the files could not be renamed into a folder that is a mount or a
    # link to another disk (os.replace: "Invalid cross-device link").
    import qin.synth

    real, staged_in = qin.synth.make_dataset, []

    def record(root, **kwargs):
        staged_in.append(Path(root).parent)
        return real(root, **kwargs)

    monkeypatch.setattr(qin.synth, "make_dataset", record)
    (tmp_path / "disk").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "disk")
    assert main(["make-data", str(tmp_path / "link"), "--rows", "300", "--items", "20"]) == 0
    assert staged_in == [tmp_path / "link"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == [
        "item_info.parquet", "test.parquet", "train.parquet", "valid.parquet"]


def test_make_data_force_never_mixes_an_old_and_a_new_dataset(tmp_path, capsys):
    out = tmp_path / "generated"
    assert main(["make-data", str(out), "--rows", "300", "--items", "20", "--seed", "1"]) == 0
    (out / "valid.parquet").unlink()
    (out / "valid.parquet").mkdir()  # something in the way of one of the four files
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["make-data", str(out), "--rows", "300", "--items", "20", "--seed", "2", "--force"]) == 2
    assert f"{out / 'valid.parquet'} is in the way (not a file); nothing was written" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["item_info.parquet", "test.parquet", "train.parquet",
                                                     "valid.parquet"]


def test_make_data_under_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["make-data", str(tmp_path / "afile" / "sub")]) == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


def test_make_data_other_schema_writes_the_data_block_it_trains_with(tmp_path, capsys):
    from qin.config import load_config
    from qin.data import load_dataset

    out = tmp_path / "other"
    assert main(["make-data", str(out), "--schema", "other", "--rows", "300", "--items", "20"]) == 0
    assert f"--config {out / 'data.yaml'}" in capsys.readouterr().out
    data = load_config(out / "data.yaml").data
    dataset = load_dataset(out, features=data.features, label=data.label, history=data.history)
    assert [f.name for f in dataset.features][-1] == "item_emb_d64" and len(dataset.splits["train"]) == 300


def test_make_data_force_over_the_other_schema_leaves_no_data_block_of_its_columns(tmp_path, capsys):
    """The other schema's data.yaml, left beside a MicroLens-layout dataset, declared columns the
    files no longer had; a data.yaml of the user's own is left as it is."""
    out = tmp_path / "generated"
    assert main(["make-data", str(out), "--schema", "other", "--rows", "300", "--items", "20"]) == 0
    assert main(["make-data", str(out), "--rows", "300", "--items", "20", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["item_info.parquet", "test.parquet", "train.parquet",
                                                     "valid.parquet"]
    for own in (b"data:\n  label: label\n", b"data:\n  label: clic\xe9\n"):  # the second: not UTF-8
        (out / "data.yaml").write_bytes(own)
        assert main(["make-data", str(out), "--rows", "300", "--items", "20", "--force"]) == 0
        assert (out / "data.yaml").read_bytes() == own


def test_train_writes_a_complete_run(run_dir, capsys):
    names = {p.name for p in run_dir.iterdir()}
    events = {n for n in names if n.startswith("events.out.tfevents.")}
    assert len(events) == 1, names
    assert names - events == {"best.pt", "latest.pt", "config.yaml", "metrics.jsonl", "curves.png", LOCK_NAME}
    ckpt = load_checkpoint(run_dir / "latest.pt")
    assert ckpt["trainer"]["epoch"] == 1
    assert ckpt["config"]["model"]["num_items"] == 201  # filled from the data: 200 items + padding


def test_train_refuses_to_overwrite_a_run(data_dir, run_dir, capsys):
    before = (run_dir / "latest.pt").read_bytes()
    assert main(["train", "--data", str(data_dir), "--out", str(run_dir), *SMALL_RUN]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"--resume {run_dir}" in err
    assert (run_dir / "latest.pt").read_bytes() == before


def test_the_lock_file_is_never_written_through_a_link(tmp_path):
    """The lock file is truncated and written: a link planted in a shared run folder must not
    make that happen to the file it points at."""
    from qin.checkpoint import CheckpointError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / LOCK_NAME).symlink_to(victim)
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        with run_lock(shared):
            pass
    assert victim.read_text() == "precious"
    (shared / LOCK_NAME).unlink()
    (shared / LOCK_NAME).mkdir()
    with pytest.raises(CheckpointError, match="not a plain file"):
        with run_lock(shared):
            pass


def test_a_lock_file_this_user_may_not_write_is_named_as_the_system_says(tmp_path, monkeypatch):
    import qin.checkpoint

    (tmp_path / LOCK_NAME).write_text("process 7 on elsewhere")  # another user's run left it, 0644

    def refused(path, *args, **kwargs):  # as os.open answers a user who may not write it (root may)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(qin.checkpoint.os, "open", refused)
    with pytest.raises(PermissionError, match="Permission denied"):
        with run_lock(tmp_path):
            pass


def test_train_refuses_a_run_whose_latest_checkpoint_was_deleted(data_dir, run_dir, tmp_path, capsys):
    """latest.pt is three times best.pt: a user may delete it to save space, keeping the model."""
    import shutil

    for kept in (("best.pt", "metrics.jsonl"), ("metrics.jsonl",)):
        kept_run = tmp_path / "-".join(kept)
        kept_run.mkdir()
        for name in kept:
            shutil.copy(run_dir / name, kept_run / name)
        before = {name: (kept_run / name).read_bytes() for name in kept}
        assert main(["train", "--data", str(data_dir), "--out", str(kept_run), *SMALL_RUN]) == 2
        err = capsys.readouterr().err
        assert f"{kept_run} already holds an earlier run's {' and '.join(kept)}" in err
        assert {name: (kept_run / name).read_bytes() for name in kept} == before
        assert sorted(p.name for p in kept_run.iterdir()) == sorted(kept)


def test_resume_continues_and_refuses_new_data(data_dir, run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in run_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert main(["train", "--resume", str(copy), "--data", str(data_dir)]) == 2
    assert "drop --config/--data" in capsys.readouterr().err
    for override in ("data.max_len=8", "data.label=clicked"):  # nor through an override
        assert main(["train", "--resume", str(copy), override]) == 2
        assert f"{override.split('=')[0]}: --resume continues on the run's own data" in capsys.readouterr().err
    assert main(["train", "--resume", str(copy), "train.epochs=2"]) == 0
    assert load_checkpoint(copy / "latest.pt")["trainer"]["epoch"] == 2
    # The override is the run's setting now: a later plain --resume must not fall back to 1 epoch.
    assert yaml.safe_load((copy / "config.yaml").read_text())["train"]["epochs"] == 2
    capsys.readouterr()
    events = sorted(copy.glob("events.out.tfevents.*"))
    assert events
    assert main(["train", "--resume", str(copy)]) == 0
    assert "the run is over after 2 epochs (train.epochs=2); a larger train.epochs" in capsys.readouterr().out
    assert sorted(copy.glob("events.out.tfevents.*")) == events  # no empty events file of a run that trained nothing
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no latest.pt" in capsys.readouterr().err


def test_resume_may_change_how_attention_rounds_not_what_the_model_is(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in run_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert main(["train", "--resume", str(copy), "train.epochs=2", "model.asta_precision=autocast"]) == 0
    assert main(["train", "--resume", str(copy), "train.epochs=3", "model.embed_dim=16"]) == 2
    assert "checkpoint config does not match the model: model.embed_dim" in capsys.readouterr().err


def test_a_din_run_from_before_p_evaluates_but_its_resume_is_refused_by_name(data_dir, tmp_path, capsys):
    """A DIN checkpoint without P (written before DIN had one) scores as it did (P = I); its
    optimizer holds one parameter fewer, so a resume says so instead of raising a ValueError."""
    from qin.checkpoint import save_checkpoint

    out = tmp_path / "din"
    din = ["model.architecture=din", "model.din_embed_dim=4", "model.din_attention_units=[8]",
           "model.din_dnn_units=[8]", "train.max_steps_per_epoch=2"]
    assert main(["train", "--data", str(data_dir), "--out", str(out), *SMALL_RUN, *din]) == 0
    capsys.readouterr()
    for name in ("best.pt", "latest.pt"):
        payload = load_checkpoint(out / name)
        keys = list(payload["model"])
        p_index = keys.index("items.mm_projection.weight")  # parameters come in state_dict order here
        del payload["model"]["items.mm_projection.weight"]
        if "optimizer" in payload:
            group = payload["optimizer"]["param_groups"][0]
            group["params"] = group["params"][:-1]
            payload["optimizer"]["state"].pop(p_index, None)
        save_checkpoint(out / name, {k: v for k, v in payload.items() if k != "format"})
    assert main(["evaluate", str(out)]) == 0
    assert "AUC" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'latest.pt'}: its optimizer state does not fit this model's parameters" in err
    assert "cannot be resumed: start a new run" in err


def test_a_folder_another_process_trains_in_is_refused(data_dir, run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in run_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.name != LOCK_NAME}
    with run_lock(copy):  # as a running `qin train --resume` holds it
        assert main(["train", "--resume", str(copy), "train.epochs=2"]) == 2
        assert f"{copy} is in use: process " in capsys.readouterr().err
        # A new run there is told the folder is in use, not to --resume it.
        assert main(["train", "--data", str(data_dir), "--out", str(copy), *SMALL_RUN]) == 2
        assert f"{copy} is in use: process " in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.name != LOCK_NAME} == before
    assert main(["train", "--resume", str(copy), "train.epochs=2"]) == 0  # released


def test_a_data_dir_override_is_data_not_the_built_in_run(data_dir, tmp_path, capsys):
    # data.dir=DIR stands for --data DIR: the paper's settings (the built-in run's are for its own data).
    out = tmp_path / "run"
    unset = [o for o in SMALL_RUN if not o.startswith("train.eval_batch_size")]
    assert main(["train", "--out", str(out), f"data.dir={data_dir}", *unset, "train.max_steps_per_epoch=2"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["dir"] == str(data_dir.resolve())
    assert saved["train"]["eval_batch_size"] == 8192  # the paper's, not the built-in run's 2048
    compared = tmp_path / "cmp"
    assert main(["compare", "--variants", "qin", "--epochs", "1", "--out", str(compared), f"data.dir={data_dir}",
                 *[o for o in SMALL_RUN if not o.startswith("train.epochs")], "train.max_steps_per_epoch=2"]) == 0
    assert f"Data: {data_dir.resolve()};" in (compared / "compare.md").read_text()


def test_resume_in_another_folder_and_data_sized_overrides_are_refused(data_dir, run_dir, tmp_path, capsys):
    for args, named in ((["--resume", str(run_dir), "--out", str(tmp_path / "x")], "drop --out/train.out_dir"),
                        (["--resume", str(run_dir), "train.out_dir=x"], "drop --out/train.out_dir"),
                        (["--data", str(data_dir), "--out", str(tmp_path / "y"), "model.num_tags=7"],
                         "qin train sizes model.num_tags from the data")):
        assert main(["train", *args]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # In a --config file they are said to do nothing (they were recorded in config.yaml, silently);
    # not refused, as a run's own config.yaml, reused as one, may hold them.
    from qin.cli import data_sized_in_file
    from qin.config import load_config

    (tmp_path / "tags.yaml").write_text("model:\n  num_tags: 5\n  mm_dim: 128\n")
    assert data_sized_in_file("tags.yaml", load_config(tmp_path / "tags.yaml")) == [
        "tags.yaml: model.num_tags: 5 is ignored: qin train sizes the model from the data (declare vocab_size and "
        "embedding_dim in data.features)"]
    assert data_sized_in_file("config.yaml", load_config(run_dir / "config.yaml")) == []


def test_histories_too_large_for_memory_name_max_len(data_dir, monkeypatch):
    from qin.data import DataError, load_dataset

    real = np.empty

    def no_memory_for_histories(shape, dtype=float, *args, **kwargs):
        if dtype == np.int32 and isinstance(shape, tuple) and shape[1:] == (10**8,):
            raise MemoryError
        return real(shape, dtype, *args, **kwargs)

    monkeypatch.setattr(np, "empty", no_memory_for_histories)
    with pytest.raises(DataError, match=r"train.parquet: 3,000 histories of data.max_len=100000000 items need "
                                        r"1,118 GiB; a smaller data.max_len fits"):
        load_dataset(data_dir, max_len=10**8)


@pytest.mark.parametrize("override, named", [
    ("train.lr_max=1", "train.lr_max"),
    ("model.embed_dim=big", "model.embed_dim"),
    ("nonsense", "nonsense"),
])
def test_bad_overrides_are_refused_by_name(data_dir, tmp_path, capsys, override, named):
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(out), *SMALL_RUN, override]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_overrides_on_either_side_of_an_option_all_apply_in_order(capsys):
    from qin.cli import _parse, build_parser

    args = _parse(build_parser(), ["train", "train.lr=1e-2", "--out", "x", "model.embed_dim=4", "--data", "d",
                                   "train.lr=1e-3"])
    assert (args.out, args.data) == ("x", "d")
    assert args.overrides == ["train.lr=1e-2", "model.embed_dim=4", "train.lr=1e-3"]  # the last train.lr wins
    args = _parse(build_parser(), ["compare", "--epochs", "1", "train.lr=1e-2", "--seeds", "2", "train.seed=3"])
    assert (args.epochs, args.seeds, args.overrides) == (1, 2, ["train.lr=1e-2", "train.seed=3"])
    # What is not an override is still argparse's to refuse: an unknown option, or an override where none is taken.
    for argv in (["train", "--out", "x", "train.lr=1e-2", "--bogus", "3"], ["evaluate", "runs/x", "train.lr=1e-2"]):
        with pytest.raises(SystemExit) as stop:
            _parse(build_parser(), argv)
        assert stop.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_bad_data_is_refused_before_anything_is_written(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in data_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    table = pq.read_table(bad / "valid.parquet")
    pq.write_table(table.drop(["likes_level"]), bad / "valid.parquet")
    out = tmp_path / "run"
    assert main(["train", "--data", str(bad), "--out", str(out), *SMALL_RUN]) == 2
    err = capsys.readouterr().err
    assert "valid.parquet" in err and "likes_level" in err
    assert not out.exists()


def test_evaluate_a_run_folder_and_a_checkpoint_file(run_dir, capsys):
    assert main(["evaluate", str(run_dir)]) == 0
    from_folder = capsys.readouterr().out
    assert from_folder.startswith("valid: AUC ")
    assert main(["evaluate", str(run_dir / "best.pt"), "--split", "valid"]) == 0
    assert capsys.readouterr().out == from_folder
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 2  # test has no label
    assert "no label" in capsys.readouterr().err
    # The numbers are the trained model's: those training logged for the best epoch, from a fresh
    # process's view of the checkpoint (its item table loaded, eval mode, the same metrics).
    best = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert best["best"]
    auc, logloss = (float(part.split()[-1]) for part in from_folder.removeprefix("valid: ").split(","))
    assert auc == pytest.approx(best["valid_auc"], abs=2e-6)
    assert logloss == pytest.approx(best["valid_logloss"], abs=2e-6)


def test_evaluating_a_test_split_reads_its_labels_strictly(run_dir, data_dir, tmp_path, capsys):
    """Placeholder test labels are left out with a warning wherever labels are not needed; `qin
    evaluate --split test` needs them, so a bad one is named there, row and value (it used to warn
    to run the very command that was running, then say the column it had just read was missing)."""
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    (labelled / "item_info.parquet").write_bytes((data_dir / "item_info.parquet").read_bytes())
    table = pq.read_table(data_dir / "valid.parquet")
    pq.write_table(table, labelled / "test.parquet")
    assert main(["evaluate", str(run_dir), "--data", str(labelled), "--split", "test"]) == 0
    assert capsys.readouterr().out.startswith("test: AUC ")
    labels = table.column("label").to_numpy().copy()
    labels[2] = -1
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels)),
                   labelled / "test.parquet")
    assert main(["evaluate", str(run_dir), "--data", str(labelled), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "test.parquet, column 'label', row 2: label -1" in err and "no label column" not in err
    output = tmp_path / "prediction.csv"
    assert main(["predict", str(run_dir), "--data", str(labelled), "--output", str(output)]) == 0  # not needed here


def test_scoring_with_another_item_table_of_the_same_size_warns(run_dir, data_dir, tmp_path, capsys, caplog):
    """Tags and frozen embeddings are the model's input: a refreshed table may be meant, so it is
    used, but said, naming the file (before, it was silent: another AUC, no word why)."""
    other = tmp_path / "other"
    other.mkdir()
    for name in ("valid.parquet", "test.parquet"):
        (other / name).write_bytes((data_dir / name).read_bytes())
    refreshed = make_dataset(tmp_path / "refreshed", rows=300, items=200, seed=6, valid_rows=100, test_rows=50)
    (other / "item_info.parquet").write_bytes((refreshed / "item_info.parquet").read_bytes())
    with caplog.at_level(logging.WARNING, logger="qin.data"):
        assert main(["evaluate", str(run_dir)]) == 0
        assert "not the item table" not in caplog.text
        same = capsys.readouterr().out
        assert main(["evaluate", str(run_dir), "--data", str(other)]) == 0
    assert f"{other / 'item_info.parquet'} is not the item table" in caplog.text
    assert capsys.readouterr().out != same


def test_resuming_on_a_changed_item_table_warns(tmp_path, caplog):
    data = make_dataset(tmp_path / "ds", rows=400, items=50, seed=2, valid_rows=100, test_rows=20)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *SMALL_RUN]) == 0
    refreshed = make_dataset(tmp_path / "refreshed", rows=100, items=50, seed=3, valid_rows=50, test_rows=20)
    (data / "item_info.parquet").write_bytes((refreshed / "item_info.parquet").read_bytes())
    with caplog.at_level(logging.WARNING, logger="qin.data"):
        assert main(["train", "--resume", str(run), "train.epochs=2"]) == 0
    assert f"{data / 'item_info.parquet'} is not the item table {run / 'latest.pt'} was trained with" in caplog.text


def test_predict_writes_one_probability_per_test_row_and_never_overwrites(run_dir, data_dir, tmp_path, capsys):
    output = tmp_path / "prediction.csv"
    assert main(["predict", str(run_dir), "--output", str(output)]) == 0
    lines = output.read_text().splitlines()
    assert lines[0] == "ID,Task2"
    assert len(lines) == 1 + pq.read_table(data_dir / "test.parquet").num_rows
    ids, probs = zip(*(line.split(",") for line in lines[1:]))
    assert [int(i) for i in ids] == list(range(len(ids)))
    assert all(0.0 < float(p) < 1.0 for p in probs)

    output.write_text("precious\n")
    assert main(["predict", str(run_dir), "--output", str(output)]) == 2
    assert "--force" in capsys.readouterr().err
    assert output.read_text() == "precious\n"
    assert main(["predict", str(run_dir), "--output", str(output), "--force"]) == 0
    assert output.read_text().splitlines() == lines
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_predict_that_fails_to_write_leaves_the_earlier_file_whole(run_dir, tmp_path, monkeypatch, capsys):
    """A full disk while writing: the earlier predictions stay as they were, with nothing beside."""
    output = tmp_path / "prediction.csv"
    output.write_text("earlier\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert main(["predict", str(run_dir), "--output", str(output), "--force"]) != 0
    assert "No space left on device" in capsys.readouterr().err
    assert output.read_text() == "earlier\n" and [p.name for p in tmp_path.iterdir()] == ["prediction.csv"]


def test_scoring_reads_only_the_split_it_scores(run_dir, data_dir, tmp_path, capsys):
    # New data to score need not come with a train or valid split (3.6M rows on MicroLens).
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("item_info.parquet", "test.parquet"):
        (fresh / name).write_bytes((data_dir / name).read_bytes())
    assert main(["predict", str(run_dir), "--data", str(fresh), "--output", str(tmp_path / "a.csv")]) == 0
    assert main(["predict", str(run_dir), "--output", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert main(["evaluate", str(run_dir), "--data", str(fresh)]) == 2
    assert f"valid.parquet: file is missing from {fresh} (it holds item_info.parquet, test.parquet)" in \
        capsys.readouterr().err  # what --split could name


@pytest.mark.parametrize("command", ["predict", "export"])
def test_an_output_that_cannot_be_written_is_refused_before_scoring(run_dir, tmp_path, capsys, command):
    folder, file = tmp_path / "folder", tmp_path / "file.csv"
    folder.mkdir()
    file.write_text("x")
    for output, named in ((folder, f"--output {folder} is a folder"),
                          (file / "p.csv", f"--output {file / 'p.csv'}: {file} is a file, not a folder")):
        assert main([command, str(run_dir), "--output", str(output), "--force"]) == 2
        assert named in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "-5", "many"])
def test_a_batch_size_below_one_is_refused(run_dir, tmp_path, capsys, size):
    with pytest.raises(SystemExit):
        main(["predict", str(run_dir), "--output", str(tmp_path / "p.csv"), "--batch-size", size])
    assert "expected a positive integer" in capsys.readouterr().err


def test_a_run_trained_with_triton_kernels_scores_on_a_cpu_without_the_interpreter(run_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    import kernels.utils

    payload = torch.load(run_dir / "best.pt", weights_only=False)
    payload["config"]["model"].update(asta_kernel="triton", qnn_kernel="triton")  # as trained on a GPU
    torch.save(payload, tmp_path / "best.pt")
    monkeypatch.setattr(kernels.utils, "INTERPRETING", False)  # a user's CPU: no TRITON_INTERPRET
    assert main(["evaluate", str(run_dir)]) == 0
    want = capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "best.pt")]) == 0
    assert capsys.readouterr().out == want


def test_triton_kernels_where_triton_cannot_run_are_refused_up_front_or_on_resume_become_auto(
        data_dir, run_dir, tmp_path, capsys, caplog, monkeypatch):
    """On a CPU without TRITON_INTERPRET, model.*_kernel=triton stops `qin train` in one line before
    anything is loaded or written (it failed with a traceback at the first step, after the run's
    config.yaml). A run whose config.yaml says triton (trained on a GPU) resumes here with 'auto',
    unless the override asks for triton again."""
    import kernels.utils

    monkeypatch.setattr(kernels.utils, "INTERPRETING", False)  # a user's CPU: no TRITON_INTERPRET
    for key in ("asta_kernel", "qnn_kernel"):
        out = tmp_path / key
        assert main(["train", "--data", str(data_dir), "--out", str(out), *SMALL_RUN, f"model.{key}=triton"]) == 2
        err = capsys.readouterr().err
        assert f"model.{key}=triton" in err and "TRITON_INTERPRET=1" in err and "Traceback" not in err
        assert not out.exists() or not any(out.iterdir())
    # Where the model has no such op, the setting changes nothing: trained, and said so.
    with caplog.at_level(logging.INFO, logger="qin"):
        assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "mlp"), *SMALL_RUN,
                     "train.max_steps_per_epoch=2", "model.interaction=mlp", "model.qnn_kernel=triton"]) == 0
    assert "model.qnn_kernel=triton has no effect with model.interaction=mlp" in caplog.text
    caplog.clear()  # without dropout the QNN op is torch products on any backend (it failed at the first step)
    with caplog.at_level(logging.INFO, logger="qin"):
        assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "p0"), *SMALL_RUN,
                     "train.max_steps_per_epoch=2", "model.dropout=0", "model.qnn_kernel=triton"]) == 0
    assert "model.qnn_kernel=triton has no effect with model.dropout=0" in caplog.text

    copy = tmp_path / "copy"
    copy.mkdir()
    for f in run_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["asta_kernel"] = "triton"  # as trained on a GPU
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--resume", str(copy), "train.epochs=2", "model.asta_kernel=triton"]) == 2
    assert "model.asta_kernel=triton" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qin"):
        assert main(["train", "--resume", str(copy), "train.epochs=2", "train.max_steps_per_epoch=2"]) == 0
    assert "model.asta_kernel: the run trained with 'triton', which cannot run here" in caplog.text
    assert yaml.safe_load((copy / "config.yaml").read_text())["model"]["asta_kernel"] == "auto"


def test_a_data_error_in_the_built_in_dataset_says_that_no_folder_was_named(data_dir, tmp_path, capsys, monkeypatch):
    """--config declaring another dataset's columns, --data forgotten: the built-in data is read,
    and its error says so (it named item_info.parquet alone, of a folder the user never chose)."""
    import qin.synth

    monkeypatch.setattr(qin.synth, "builtin_dataset", lambda: data_dir)
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"data": {"features": [
        {"name": "likes_level", "type": "categorical"}, {"name": "item_id", "type": "categorical", "source": "item"},
        {"name": "item_topic", "type": "categorical", "source": "item"}]}}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), *SMALL_RUN]) == 2
    err = capsys.readouterr().err
    assert f"the built-in dataset ({data_dir}" in err and "--data DIR" in err and "'item_topic': missing" in err


def test_a_checkpoint_does_not_load_against_other_items(run_dir, tmp_path, capsys):
    other = make_dataset(tmp_path / "other", rows=300, items=120, seed=1, valid_rows=100, test_rows=50)
    output = tmp_path / "prediction.csv"
    assert main(["predict", str(run_dir), "--data", str(other), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "201 items" in err and "item_info.parquet" in err
    assert not output.exists()


def test_scoring_refuses_ids_beyond_the_trained_vocabularies(run_dir, data_dir, tmp_path, capsys):
    # Same items, but one tag id the model has no row for: refused naming the cell, whatever
    # vocabulary the new data alone would suggest.
    trained_tags = load_checkpoint(run_dir / "best.pt")["model"]["items.tag_embedding.weight"].shape[0]
    other = tmp_path / "other"
    other.mkdir()
    for f in data_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    table = pq.read_table(other / "item_info.parquet")
    tags = table.column("item_tags").to_pylist()
    tags[3] = [0, 0, 0, 0, trained_tags]
    table = table.set_column(table.schema.get_field_index("item_tags"), "item_tags",
                             pa.array(tags, table.schema.field("item_tags").type))
    pq.write_table(table, other / "item_info.parquet")
    output = tmp_path / "prediction.csv"
    for command in (["predict", str(run_dir), "--data", str(other), "--output", str(output)],
                    ["evaluate", str(run_dir), "--data", str(other)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "item_info.parquet" in err and "item_tags" in err and "row 3" in err, err
        assert f"0..{trained_tags - 1}" in err, err
    assert not output.exists()


def test_written_files_get_the_mode_open_would_give(tmp_path):
    # Checkpoints, configs and predictions go through atomic_write's temporary file, which
    # mkstemp creates for its owner only; a run must stay readable to whom the umask allows.
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "atomic", lambda fh: fh.write(b"x"))
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640


def test_atomic_write_stages_beside_its_target_syncs_it_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    # Beside the target: a rename from another filesystem (a /tmp of its own) fails, and a
    # resume's clean-up looks there. Synced before the rename and the folder after it: a power
    # loss must not leave an empty latest.pt.
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append((len(synced), a, b)) or real_replace(a, b))

    def write(fh):
        assert len(list(tmp_path.glob(".atomic.*.tmp"))) == 1  # the file being written, in the target's folder
        fh.write(b"x")

    atomic_write(tmp_path / "atomic", write)
    ((synced_before, tmp, target),) = renamed
    assert synced_before == 1 and synced[0] == str(tmp) and target == tmp_path / "atomic"
    assert synced[1:] == [str(tmp_path)]
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "other", lambda fh: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic"]


def test_a_prediction_into_a_folder_this_user_may_not_write_names_the_file_asked_for(run_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    import tempfile

    def refused(*args, dir=None, **kwargs):  # as mkstemp answers in a folder the user may not write (root may)
        raise PermissionError(13, "Permission denied", os.path.join(dir, ".p.csv.x1y2z3.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    assert main(["predict", str(run_dir), "--output", str(tmp_path / "p.csv")]) != 0
    err = capsys.readouterr().err
    assert f"Permission denied: '{tmp_path / 'p.csv'}'" in err and ".tmp" not in err


def test_a_checkpoint_config_this_version_cannot_read_is_named(run_dir, tmp_path, capsys):
    payload = torch.load(run_dir / "best.pt", weights_only=False)
    payload["config"]["model"]["heads"] = 2  # a key of some other version
    torch.save(payload, tmp_path / "best.pt")
    assert main(["evaluate", str(tmp_path / "best.pt")]) == 2
    assert f"{tmp_path / 'best.pt'}'s config: unknown key 'model.heads'" in capsys.readouterr().err


def test_scoring_a_run_whose_data_moved_or_that_has_no_best_epoch_says_what_to_do(run_dir, data_dir, tmp_path,
                                                                                  capsys):
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("config.yaml", "best.pt"):
        (moved / name).write_bytes((run_dir / name).read_bytes())
    payload = torch.load(moved / "best.pt", weights_only=False)
    payload["config"]["data"]["dir"] = str(tmp_path / "gone")
    torch.save(payload, moved / "best.pt")
    assert main(["evaluate", str(moved)]) == 2
    assert f"trained on {tmp_path / 'gone'}, which is no longer there: name the data with --data DIR" in \
        capsys.readouterr().err
    assert main(["evaluate", str(moved), "--data", str(data_dir)]) == 0
    capsys.readouterr()
    (moved / "best.pt").rename(moved / "latest.pt")  # stopped before its first validation
    assert main(["evaluate", str(moved)]) == 2
    assert f"no such checkpoint (the run has no best epoch yet; {moved / 'latest.pt'} holds its last step)" in \
        capsys.readouterr().err


def test_unreadable_checkpoint_is_refused(tmp_path, capsys):
    bad = tmp_path / "best.pt"
    for junk in (b"not a checkpoint", b"hello"):
        bad.write_bytes(junk)
        assert main(["evaluate", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"{bad}: not a readable checkpoint (" in err
        assert "(101)" not in err  # torch's weights-only unpickler says KeyError(101) for b"hello"


class _RunsCodeWhenUnpickled:
    """What a malicious checkpoint holds: unpickling it calls a function of the file's choosing."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(run_dir, data_dir, tmp_path, capsys):
    """evaluate/predict/export/--resume read checkpoints someone may have sent: torch.load with
    weights_only=False would call whatever the pickle names."""
    import shutil

    sent = tmp_path / "sent"
    shutil.copytree(run_dir, sent)
    marker = tmp_path / "code-ran"
    for name in ("best.pt", "latest.pt"):
        payload = torch.load(sent / name, weights_only=True)
        torch.save({**payload, "trick": _RunsCodeWhenUnpickled(marker)}, sent / name)
    assert main(["evaluate", str(sent), "--data", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{sent / 'best.pt'}: refused: it asks to build getattr" in err and "weights_only=True" in err
    assert main(["train", "--resume", str(sent)]) == 2
    assert f"{sent / 'latest.pt'}: refused: it asks to build getattr" in capsys.readouterr().err
    assert not marker.exists()


def test_running_out_of_gpu_memory_says_what_to_lower(data_dir, tmp_path, monkeypatch, capsys):
    import qin.train

    def out_of_memory(self, resume=False):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(qin.train.Trainer, "fit", out_of_memory)
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), *SMALL_RUN]) == 1
    err = capsys.readouterr().err
    assert "qin train: error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in err
    assert "train.batch_size" in err and "Traceback" not in err


def test_an_out_that_is_a_file_is_refused_before_the_data_loads(tmp_path, capsys, monkeypatch):
    import qin.cli

    monkeypatch.setattr(qin.cli, "load_data", lambda *a, **k: pytest.fail("the data loaded"))
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        assert main(["train", "--out", str(out), "train.device=cpu"]) == 2
        assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


def test_a_torch_file_that_is_no_qin_checkpoint_is_named(tmp_path, capsys):
    torch.save({"model": {}}, tmp_path / "other.pt")  # someone else's weights: no QIN format key
    assert main(["evaluate", str(tmp_path / "other.pt")]) == 2
    assert f"{tmp_path / 'other.pt'}: not a QIN checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("env, named", [({"RANK": "abc"}, "RANK='abc' is not a whole number"),
                                        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
                                        ({"RANK": "1"}, "RANK=1, WORLD_SIZE=1"),  # left from a torchrun job
                                        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1")])
def test_torchrun_variables_that_name_no_process_are_refused_in_one_line(env, named, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["backends"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qin: error: the environment variable") and named in err and "unset" in err


def test_a_bad_qin_auto_backend_is_refused_before_the_data_loads(data_dir, tmp_path, monkeypatch, capsys):
    """On a GPU, backend="auto" reads QIN_AUTO_BACKEND at the model's first step, after the data has
    loaded; a bad value is refused at once, on any machine."""
    import qin.cli

    monkeypatch.setenv("QIN_AUTO_BACKEND", "Table")
    monkeypatch.setattr(qin.cli, "load_data", lambda *a, **k: pytest.fail("the data loaded"))
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), *SMALL_RUN]) == 2
    assert "qin train: error: QIN_AUTO_BACKEND must be one of" in capsys.readouterr().err


def test_a_checkpoint_without_its_config_or_with_weights_that_do_not_fit_is_named(run_dir, tmp_path, capsys):
    import shutil

    from qin.checkpoint import FORMAT

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    payload = torch.load(run_dir / "best.pt", weights_only=True)
    torch.save({"format": FORMAT, "model": payload["model"]}, damaged / "best.pt")
    assert main(["evaluate", str(damaged)]) == 2
    assert f"{damaged / 'best.pt'}: a QIN checkpoint without its config" in capsys.readouterr().err

    weights = dict(payload["model"])
    weights.pop(next(iter(weights)))
    torch.save({**payload, "model": weights}, damaged / "best.pt")
    assert main(["evaluate", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert f"{damaged / 'best.pt'}: its weights do not fit the model its config builds" in err and "Missing key" in err
    latest = torch.load(run_dir / "latest.pt", weights_only=True)
    torch.save({**latest, "model": weights}, damaged / "latest.pt")
    assert main(["train", "--resume", str(damaged)]) == 2
    assert f"{damaged / 'latest.pt'}: its weights do not fit" in capsys.readouterr().err


def test_train_help_lists_every_setting_with_its_default_and_its_comment(capsys):
    """`qin train --help` is where a user finds the settings: every key of the three sections, its
    default as YAML would give it back, and the comment config.py carries for it."""
    import dataclasses

    from qin.config import DataConfig, QINConfig, TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    # "  section.key=value" then, 2 spaces on or on the next lines, the comment
    listed = dict(re.findall(r"^  ((?:data|model|train)\.\w+)=(.*?)(?:  |$)", text, re.M))
    comments = {key: line for line in text.splitlines() for key in listed if line.startswith(f"  {key}=")}
    fields = {f"{section}.{f.name}": getattr(cls(), f.name)
              for section, cls in (("data", DataConfig), ("model", QINConfig), ("train", TrainConfig))
              for f in dataclasses.fields(cls)}
    assert listed.keys() == fields.keys()
    for key, default in fields.items():
        assert yaml.safe_load(listed[key]) == default, key
    assert "auto | torch | triton" in comments["model.asta_kernel"]  # a comment on the field's line
    assert "ASTA computed literally" in comments["model.asta_form"]  # a comment above the field
    assert "sized from the data" in comments["model.num_items"]
    assert "train.batch_size=512" in text  # the built-in run's own settings are named

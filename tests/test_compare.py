"""`qin compare`: every variant on the same data and seeds, one table, CSV and chart."""
import csv
import os
import signal

import pytest

import qin.train
from qin.cli import main
from qin.compare import VARIANTS, shadowed
from qin.synth import make_dataset

TINY = ["model.embed_dim=4", "model.attention_dim=8", "model.din_embed_dim=4", "model.din_attention_units=[8]",
        "model.din_dnn_units=[16,8]", "train.batch_size=128", "train.max_steps_per_epoch=2", "train.device=cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", rows=500, items=60, seed=4, valid_rows=200, test_rows=10)


def test_compare_writes_a_table_with_every_variant_and_the_paper_column(data_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data_dir), "--epochs", "1", "--seeds", "2", "--out", str(out), *TINY]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.md", "compare.png"]
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["variant"] for r in rows] == list(VARIANTS)
    for r in rows:
        assert r["seeds"] == "2" and 0.0 <= float(r["auc_mean"]) <= 1.0 and float(r["auc_std"]) > 0.0
        assert float(r["paper_auc_microlens"]) == VARIANTS[r["variant"]].paper_auc
    table = (out / "compare.md").read_text()
    assert "paper's valid AUC on MicroLens_1M_x1" in table and "0.9701" in table and "0.8655" in table
    # The variants really differ where they claim to: no ASTA has fewer parameters than QIN.
    params = {r["variant"]: int(r["parameters"]) for r in rows}
    assert params["no_asta"] < params["qin"] == params["asta_softmax"] == params["asta_dropout"]


def test_compare_refuses_to_overwrite_and_unknown_variants(data_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(data_dir), "--epochs", "1", "--out", str(out), "--variants", "qin", *TINY]
    assert main(args) == 0
    before = (out / "compare.md").read_text()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "compare.md").read_text() == before
    assert main([*args, "--force"]) == 0
    assert main(["compare", "--data", str(data_dir), "--variants", "qin,transformer", "--out", str(tmp_path / "x")]) == 2
    assert "transformer" in capsys.readouterr().err
    for variants, named in ((",", "names no variant"), ("qin,din,qin", "names qin more than once")):
        assert main(["compare", "--data", str(data_dir), "--variants", variants, "--out", str(tmp_path / "y")]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_an_override_a_variant_fixes_is_named_where_it_does_not_apply():
    lines = shadowed(["train.lr=1e-4", "model.asta_dropout=0.3", "train.epochs=3"],
                     [VARIANTS["qin"], VARIANTS["asta_dropout"], VARIANTS["din"]])
    assert lines == ["model.asta_dropout=0.3 does not apply to asta_dropout, which sets model.asta_dropout=0.1",
                     "train.lr=1e-4 does not apply to din, which sets train.lr=1e-3"]


def test_a_run_config_yaml_at_qins_defaults_is_taken_and_what_it_cannot_set_is_said(data_dir, tmp_path, capsys,
                                                                                     monkeypatch):
    """A run's config.yaml holds every variant key, at QIN's values: taken (it was refused key by
    key); its train.epochs gives way to --epochs, and its train.lr to DIN's, each said."""
    import yaml

    from qin.config import load_config

    class ReachedTraining(BaseException):  # (not an Exception: nothing on the way catches it)
        pass

    def fit(self):
        raise ReachedTraining

    monkeypatch.setattr(qin.train.Trainer, "fit", fit)
    saved = load_config(overrides=TINY)
    tree = {"model": {k: getattr(saved.model, k) for k in ("architecture", "use_asta", "asta_dropout",
                                                            "asta_activation", "qnn_activation", "interaction")},
            "train": {"epochs": 7, "lr": 5e-3, "patience": saved.train.patience}}  # patience: DIN's own, at QIN's
    config = tmp_path / "config.yaml"
    # 0e0: a number YAML reads as text and load_config as 0.0, QIN's default
    config.write_text(yaml.safe_dump(tree).replace("asta_dropout: 0.0", "asta_dropout: 0e0"))
    with pytest.raises(ReachedTraining):
        main(["compare", "--data", str(data_dir), "--config", str(config), "--out", str(tmp_path / "cmp"),
              "--variants", "qin,din", *TINY])
    out = capsys.readouterr().out
    assert f"{config}: train.epochs=7 is ignored: every run trains --epochs epochs" in out
    assert f"train.lr=0.005 ({config}) does not apply to din, which sets train.lr=1e-3" in out
    assert "does not apply" in out and out.count("does not apply") == 1, out  # not for values at QIN's defaults


def test_a_stopped_compare_keeps_the_finished_runs_and_says_where(data_dir, tmp_path, monkeypatch, capsys):
    fit, calls = qin.train.Trainer.fit, []

    def stopped_in_the_second_run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise qin.train.TrainingInterrupted("interrupted at epoch 1, step 1; checkpoint saved to "
                                                f"{self.out_dir}/latest.pt", signal.SIGTERM)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(qin.train.Trainer, "fit", stopped_in_the_second_run)
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(data_dir), "--epochs", "1", "--out", str(out), "--variants", "qin,no_asta", *TINY]
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"stopped in no_asta seed 0; the 1 finished run(s) of 2 are in {out / 'compare.md'}" in err
    assert "--resume" not in err  # the scratch run it would name is gone
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.md", "compare.png"]
    table = (out / "compare.md").read_text()
    assert "**Incomplete:** stopped in no_asta seed 0 after 1 of 2 runs" in table
    assert "(`qin`)" in table and "(`no_asta`)" not in table
    assert "one seed: no spread" in table and " ± " not in table
    assert [r["auc_std"] for r in csv.DictReader(open(out / "compare.csv"))] == [""]
    # Stopped again with --force before any run finished: the table there is the earlier one, and said so.
    calls.clear()
    calls.append(1)  # the next run is the second call: stopped
    assert main([*args, "--force"]) == 128 + signal.SIGTERM
    assert (f"no run had finished; nothing written ({out / 'compare.md'} is an earlier compare's, left as it was)"
            in capsys.readouterr().err)
    assert (out / "compare.md").read_text() == table


@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice: at once"])
def test_a_stop_signal_in_compare_promises_the_table_not_a_checkpoint(data_dir, tmp_path, monkeypatch, capsys,
                                                                       signals):
    """The runs' folders are scratch, deleted when compare ends: the signal's answer must not say
    latest.pt is being saved, as a plain `qin train` does. A second signal stops the run in
    progress at once, and the finished runs' table is still kept."""
    train_epoch, calls = qin.train.Trainer._train_epoch, []

    def signalled_in_the_second_run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGTERM)  # the handler sets a flag; the step loop stops
        return train_epoch(self, *args, **kwargs)

    monkeypatch.setattr(qin.train.Trainer, "_train_epoch", signalled_in_the_second_run)
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(data_dir), "--epochs", "1", "--out", str(out), "--variants", "qin,no_asta", *TINY]
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "received SIGTERM: stopping after this step; the finished runs' table is kept" in err
    assert "latest.pt" not in err and "--resume" not in err
    how = "stopped" if signals == 1 else "stopped at once"
    assert f"{how} in no_asta seed 0; the 1 finished run(s) of 2 are in {out / 'compare.md'}" in err
    assert "(`qin`)" in (out / "compare.md").read_text()


def test_runs_that_early_stopping_ended_sooner_are_not_said_to_have_every_epoch():
    from qin.compare import Result, markdown, summarise

    qin_v, din_v = VARIANTS["qin"], VARIANTS["din"]
    full = summarise([Result(qin_v, 0, 0.8, 0.5, 10, 1.0, 5), Result(din_v, 0, 0.7, 0.6, 5, 1.0, 5)])
    assert "; 5 epoch(s) per run;" in markdown(full, "built-in", 5, 60.0)
    rows = summarise([Result(qin_v, 0, 0.8, 0.5, 10, 1.0, 5), Result(din_v, 0, 0.7, 0.6, 5, 1.0, 4),
                      Result(din_v, 1, 0.7, 0.6, 5, 1.0, 2)])
    assert [(r["epochs_min"], r["epochs_max"]) for r in rows] == [(5, 5), (2, 4)]
    assert "; up to 5 epoch(s) per run (early stopping ended some sooner: din 2-4);" in markdown(rows, "built-in", 5, 60.0)


def test_din_trains_with_the_challenge_baselines_settings(data_dir, tmp_path, monkeypatch):
    """FuxiCTR's rate cut (x0.1), the challenge's embedding L2 (1e-6), lr 1e-3, patience 3; QIN
    keeps its own (x0.5, 2e-4, 2e-3, 8)."""
    from types import SimpleNamespace

    from qin.commands_common import load_data
    from qin.compare import train_variant, variant_config
    from qin.config import load_config

    trained = {}

    def fit(self):
        trained[self.cfg.model.architecture] = self.cfg.train
        return SimpleNamespace(history=[{"epoch": 1, "valid_logloss": 0.5, "samples_per_s": 1.0}], best_epoch=1,
                               best_auc=0.5)

    monkeypatch.setattr(qin.train.Trainer, "fit", fit)
    dataset = load_data(str(data_dir), load_config(overrides=TINY).data)
    for name in ("din", "qin"):
        cfg = variant_config(VARIANTS[name], 0, dataset, 1, TINY, None)
        train_variant(VARIANTS[name], 0, cfg, dataset, tmp_path / name, print)
    din, qin_ = trained["din"], trained["qin"]
    assert (din.lr, din.patience, din.lr_decay, din.embedding_l2) == (1e-3, 3, 0.1, 1e-6)
    assert (qin_.lr, qin_.patience, qin_.lr_decay, qin_.embedding_l2) == (2e-3, 8, 0.5, 2e-4)


def test_settings_a_later_variant_makes_invalid_are_refused_before_any_run_trains(data_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """DIN sets train.lr=1e-3: a train.min_lr above it passed QIN's runs and stopped the compare at
    DIN's, hours in, with nothing written."""
    trained = []
    monkeypatch.setattr(qin.train.Trainer, "fit", lambda self: trained.append(self.cfg.model.architecture))
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data_dir), "--out", str(out), "--variants", "qin,din", *TINY,
                 "train.lr=5e-3", "train.min_lr=2e-3"]) == 2
    assert "train.min_lr=0.002 is above train.lr=0.001" in capsys.readouterr().err
    assert trained == [] and not (out / "compare.md").exists()


def test_a_run_that_fails_on_its_settings_keeps_the_finished_runs_table(data_dir, tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from qin.config import ConfigError

    def fit(self):
        if self.cfg.model.architecture == "din":
            raise ConfigError("a setting only the trainer checks")
        return SimpleNamespace(history=[{"epoch": 1, "valid_logloss": 0.5, "samples_per_s": 1.0}], best_epoch=1,
                               best_auc=0.5)

    monkeypatch.setattr(qin.train.Trainer, "fit", fit)
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data_dir), "--out", str(out), "--variants", "qin,din", *TINY]) == 2
    assert "failed in din seed 0: a setting only the trainer checks" in capsys.readouterr().err
    assert "after 1 of 2 runs" in (out / "compare.md").read_text()


def test_a_data_folder_that_is_not_there_is_named(tmp_path, capsys):
    assert main(["compare", "--data", str(tmp_path / "gone"), "--out", str(tmp_path / "cmp")]) == 2
    assert f"{tmp_path / 'gone'}: no such data folder" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "gone"), "--out", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'gone'}: no such data folder" in capsys.readouterr().err


@pytest.mark.parametrize("override, named", [
    ("model.use_asta=false", "qin compare sets model.use_asta per variant"),
    ("model.architecture=din", "qin compare sets model.architecture per variant"),
    ("train.epochs=5", "pass --epochs"),
])
def test_an_override_that_would_relabel_the_variants_is_refused(data_dir, tmp_path, capsys, override, named):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data_dir), "--out", str(out), *TINY, override]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_a_run_with_no_measured_samples_per_s_shows_a_dash_not_a_crash():
    # train.compile=true with train.max_steps_per_epoch=1: every epoch is the compiling step, whose
    # time is left out, so no epoch has a samples/s (None in metrics.jsonl).
    from qin.compare import Result, markdown, summarise

    results = [Result(VARIANTS["qin"], 0, 0.8, 0.5, 1000, None, 1), Result(VARIANTS["din"], 0, 0.7, 0.6, 900, 2000.0, 1),
               Result(VARIANTS["din"], 1, 0.7, 0.6, 900, None, 1)]
    rows = summarise(results)
    assert [r["samples_per_s"] for r in rows] == [None, 2000.0]
    table = markdown(rows, "built-in", 1, 60.0)
    assert "| 0.5000 | 1,000 | - |" in table and "| 0.6000 | 900 | 2,000 |" in table


def test_a_run_is_summarised_by_its_best_epoch_and_variants_by_their_mean_and_sample_spread(data_dir, tmp_path,
                                                                                            monkeypatch):
    """Two epochs, the best one first: its AUC and logloss, not the last epoch's; samples/s the
    mean of the epochs that counted one; over seeds the mean and the sample standard deviation."""
    from types import SimpleNamespace

    from qin.commands_common import load_data
    from qin.compare import Result, summarise, train_variant, variant_config
    from qin.config import load_config

    history = [{"epoch": 1, "valid_auc": 0.9, "valid_logloss": 0.3, "samples_per_s": 100.0},
               {"epoch": 2, "valid_auc": 0.8, "valid_logloss": 0.2, "samples_per_s": 300.0},
               {"epoch": 3, "valid_auc": 0.7, "valid_logloss": 0.1, "samples_per_s": None}]
    monkeypatch.setattr(qin.train.Trainer, "fit",
                        lambda self: SimpleNamespace(history=history, best_epoch=1, best_auc=0.9))
    dataset = load_data(str(data_dir), load_config(overrides=TINY).data)
    cfg = variant_config(VARIANTS["qin"], 0, dataset, 3, TINY, None)
    result = train_variant(VARIANTS["qin"], 0, cfg, dataset, tmp_path / "run", print)
    assert (result.auc, result.logloss, result.samples_per_s, result.epochs) == (0.9, 0.3, 200.0, 3)

    qin_v, din_v = VARIANTS["qin"], VARIANTS["din"]
    rows = summarise([Result(qin_v, 0, 0.80, 0.5, 10, 100.0, 3), Result(din_v, 0, 0.70, 0.6, 5, None, 3),
                      Result(qin_v, 1, 0.84, 0.3, 10, None, 3)])
    assert [r["variant"] for r in rows] == ["qin", "din"]
    assert rows[0]["auc_mean"] == pytest.approx(0.82) and rows[0]["auc_std"] == pytest.approx(0.04 / 2**0.5)
    assert rows[0]["logloss_mean"] == pytest.approx(0.4) and rows[0]["samples_per_s"] == 100.0
    assert rows[1]["auc_std"] is None and rows[1]["samples_per_s"] is None


def test_compare_takes_another_dataset_with_its_config_as_qin_train_does(tmp_path, capsys):
    """The data block qin make-data --schema other writes, read by --config (compare had no --config:
    such data could be compared only through a FuxiCTR --data-config file)."""
    import yaml

    from qin.synth import OTHER_DATA_SECTION

    data = make_dataset(tmp_path / "other", rows=400, items=50, seed=2, valid_rows=150, test_rows=10, schema="other")
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": OTHER_DATA_SECTION}, sort_keys=False))
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data), "--config", str(config), "--epochs", "1", "--out", str(out),
                 "--variants", "qin,no_asta", *TINY]) == 0
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["variant"] for r in rows] == ["qin", "no_asta"] and all(0 <= float(r["auc_mean"]) <= 1 for r in rows)
    assert str(data.resolve()) in (out / "compare.md").read_text()


def test_a_config_file_may_not_set_what_the_variants_differ_in(data_dir, tmp_path, capsys, monkeypatch):
    """An ablation run's config.yaml given to compare would turn every row into that ablation while
    the table kept the variants' names; the keys refused as overrides are refused in the file."""
    import yaml

    import kernels.utils

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"use_asta": False, "asta_dropout": 0.1, "qnn_activation": "prelu"}}))
    assert main(["compare", "--data", str(data_dir), "--config", str(config), "--out", str(tmp_path / "cmp"),
                 *TINY]) == 2
    assert (f"{config}: model.asta_dropout=0.1, model.use_asta=false: qin compare sets these per variant"
            in capsys.readouterr().err)
    # What the data sizes, as qin train treats it: refused as an override, and named as ignored in a file.
    assert main(["compare", "--data", str(data_dir), "--out", str(tmp_path / "cmp"), *TINY, "model.num_tags=5"]) == 2
    assert "model.num_tags=5: qin train sizes model.num_tags from the data" in capsys.readouterr().err
    # Triton where it cannot run: refused before anything trains, as qin train refuses it.
    monkeypatch.setattr(kernels.utils, "INTERPRETING", False)
    assert main(["compare", "--data", str(data_dir), "--out", str(tmp_path / "cmp"), *TINY,
                 "model.asta_kernel=triton"]) == 2
    assert "model.asta_kernel=triton: they run on a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()

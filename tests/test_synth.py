"""qin.synth: the generated dataset has SPEC.md's exact layout and a strong, visible signal."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qin import synth
from qin.data import load_dataset

SPLIT_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("item_seq", pa.list_(pa.int64())), ("item_id", pa.int64()),
    ("likes_level", pa.int64()), ("views_level", pa.int64()), ("label", pa.float32()),
])
TEST_SCHEMA = pa.schema([field for field in SPLIT_SCHEMA if field.name != "label"])
ITEM_INFO_SCHEMA = pa.schema([
    ("item_id", pa.int64()), ("item_tags", pa.list_(pa.int64())), ("item_emb_d128", pa.list_(pa.float32())),
])


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve from the rank sum of the positives, ties sharing their mean rank."""
    order = np.argsort(scores, kind="stable")
    _, tie_group, tie_size = np.unique(scores[order], return_inverse=True, return_counts=True)
    mean_rank = np.bincount(tie_group, weights=np.arange(1, len(scores) + 1)) / tie_size
    ranks = np.empty(len(scores))
    ranks[order] = mean_rank[tie_group]
    positive = labels > 0.5
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auc_helper():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert auc(np.array([1, 0, 1, 0]), np.array([0.3, 0.2, 0.1, 0.4])) == 0.25


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return synth.make_dataset(tmp_path_factory.mktemp("synth"), rows=3000, items=400, seed=1)


@pytest.fixture(scope="module")
def generated():
    """Enough rows for stable statistics; generate() returns the truth behind the labels."""
    return synth.generate(30_000, 2_000, seed=0)


def test_layout_is_exactly_spec(folder):
    assert sorted(p.name for p in folder.iterdir()) == [
        "item_info.parquet", "test.parquet", "train.parquet", "valid.parquet"]
    for name, schema, rows in (("train", SPLIT_SCHEMA, 3000), ("valid", SPLIT_SCHEMA, 1000), ("test", TEST_SCHEMA, 1000)):
        table = pq.read_table(folder / f"{name}.parquet")
        assert table.schema.equals(schema), (name, table.schema)
        assert table.num_rows == rows
        history = np.array(table.column("item_seq").to_pylist())  # every row is padded to the same width
        assert history.shape == (rows, synth.HISTORY_WIDTH)
        assert ((history >= 0) & (history <= 400)).all()
        # Left-padded: once a row's history starts, no padding follows.
        started = np.maximum.accumulate(history > 0, axis=1)
        assert (history[started] > 0).all()
        assert table.column("item_id").to_numpy().min() >= 1 and table.column("item_id").to_numpy().max() <= 400
        for level in ("likes_level", "views_level"):
            values = table.column(level).to_numpy()
            assert values.min() >= 0 and values.max() <= 10
        if name != "test":
            assert set(np.unique(table.column("label").to_numpy())) == {0.0, 1.0}

    info = pq.read_table(folder / "item_info.parquet")
    assert info.schema.equals(ITEM_INFO_SCHEMA), info.schema
    assert info.column("item_id").to_numpy().tolist() == list(range(401))
    tags = np.array(info.column("item_tags").to_pylist())
    emb = np.array(info.column("item_emb_d128").to_pylist())
    assert tags.shape == (401, 5) and emb.shape == (401, 128)
    assert not tags[0].any() and not emb[0].any()
    assert (np.maximum.accumulate(tags > 0, axis=1) == (tags > 0)).all()  # tags left-padded too
    assert (tags[1:] > 0).any(axis=1).all()  # every item has at least one tag
    assert np.isfinite(emb).all()


def test_loads_without_complaint(folder):
    ds = load_dataset(folder)
    assert len(ds.splits["train"]) == 3000 and ds.splits["test"].label is None
    assert ds.item_info.num_items == 401
    assert ds.extra_columns == {}


def test_split_sizes_default_to_a_tenth(tmp_path):
    root = synth.make_dataset(tmp_path, rows=20_000, items=100, seed=0)
    assert pq.read_metadata(root / "valid.parquet").num_rows == 2000
    assert pq.read_metadata(root / "test.parquet").num_rows == 2000
    root = synth.make_dataset(tmp_path / "explicit", rows=500, items=100, valid_rows=50, test_rows=70, tags=30)
    assert pq.read_metadata(root / "valid.parquet").num_rows == 50
    assert pq.read_metadata(root / "test.parquet").num_rows == 70
    assert load_dataset(root).item_info.num_tags <= 31


def test_deterministic_per_seed(tmp_path):
    def tables(seed, name):
        root = synth.make_dataset(tmp_path / f"{name}", rows=400, items=50, seed=seed, valid_rows=100, test_rows=100)
        return {f: pq.read_table(root / f) for f in ("train.parquet", "valid.parquet", "test.parquet", "item_info.parquet")}

    first, again, other = tables(5, "a"), tables(5, "b"), tables(6, "c")
    assert all(first[f].equals(again[f]) for f in first)
    assert not first["train.parquet"].equals(other["train.parquet"])


def test_positive_rate(generated, folder):
    assert 0.18 <= generated.label.mean() <= 0.32
    assert 0.18 <= pq.read_table(folder / "train.parquet").column("label").to_numpy().mean() <= 0.32


def test_history_lengths(generated, folder):
    lengths = np.diff(generated.history_offsets)
    assert lengths.min() >= 3 and lengths.max() <= 100
    assert 5 <= np.median(lengths) <= 7
    assert np.mean(lengths > 64) > 0.001  # a long tail: some histories are truncated at max_len 64
    written = np.array(pq.read_table(folder / "train.parquet").column("item_seq").to_pylist())
    written_lengths = (written > 0).sum(axis=1)
    assert written_lengths.min() >= 3 and 5 <= np.median(written_lengths) <= 7


def test_signal_is_strong_and_needs_the_history(generated):
    labels = generated.label
    oracle = auc(labels, generated.click_probability)
    without_history = auc(labels, generated.logit_without_history)
    assert oracle > 0.85
    assert without_history < oracle - 0.15
    assert without_history > 0.55  # the levels and the item carry a weaker signal of their own


def test_signal_is_visible_through_the_item_embeddings(generated):
    """The match of target and history measured on item_emb_d128 alone (what P sees) recovers most of it."""
    emb = generated.item_emb / np.linalg.norm(generated.item_emb, axis=1, keepdims=True).clip(1e-6)
    offsets = generated.history_offsets
    targets = np.repeat(generated.item_id, np.diff(offsets))
    cosine = np.einsum("nd,nd->n", emb[generated.history_items], emb[targets])
    visible_match = np.add.reduceat(np.maximum(cosine - 0.3, 0.0), offsets[:-1])
    assert auc(generated.label, visible_match) > 0.8


def test_signal_is_visible_through_the_tags(generated):
    """Items of one topic share tags: counting history items that share a tag with the target works too."""
    tags = generated.item_tags
    offsets = generated.history_offsets
    targets = np.repeat(generated.item_id, np.diff(offsets))
    history_tags, target_tags = tags[generated.history_items], tags[targets]
    shared = ((history_tags[:, :, None] == target_tags[:, None, :]) & (history_tags[:, :, None] > 0)).any(axis=(1, 2))
    assert auc(generated.label, np.add.reduceat(shared.astype(float), offsets[:-1])) > 0.7


def test_builtin_dataset_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "BUILTIN_ROWS", 300)
    monkeypatch.setattr(synth, "BUILTIN_ITEMS", 60)
    monkeypatch.setenv("QIN_CACHE", str(tmp_path / "cache"))
    path = synth.builtin_dataset()
    assert path.parent == tmp_path / "cache" and path.name.startswith(synth.BUILTIN_VERSION)
    assert len(load_dataset(path).splits["train"]) == 300
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging folder left behind

    def refuse(*args, **kwargs):
        raise AssertionError("the cached dataset should be reused")

    monkeypatch.setattr(synth, "make_dataset", refuse)
    assert synth.builtin_dataset() == path
    assert synth.builtin_dataset(tmp_path / "cache") == path


def test_builtin_dataset_made_by_another_generator_is_made_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(synth, "BUILTIN_ROWS", 300)
    monkeypatch.setattr(synth, "BUILTIN_ITEMS", 60)
    path = synth.builtin_dataset(tmp_path)
    rate = load_dataset(path).splits["train"].label.mean()
    monkeypatch.setattr(synth, "POSITIVE_RATE", 0.6)  # as an edit of the generator would
    with caplog.at_level("INFO", logger="qin.synth"):
        assert synth.builtin_dataset(tmp_path) == path
    assert "made by another version of qin.synth" in caplog.text
    assert load_dataset(path).splits["train"].label.mean() > rate + 0.2
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the old one removed, no staging left
    (path / synth.FINGERPRINT_FILE).unlink()  # a folder made before fingerprints: made again too
    monkeypatch.setattr(synth, "make_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("made")))
    with pytest.raises(AssertionError, match="made"):
        synth.builtin_dataset(tmp_path)


def test_a_cache_path_through_a_file_is_refused_naming_it(tmp_path):
    from qin.config import ConfigError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"afile is a file \(QIN_CACHE names the cache folder\)"):
        synth.builtin_dataset(tmp_path / "afile" / "cache")


def test_a_cache_folder_that_cannot_be_made_says_to_set_qin_cache(tmp_path, monkeypatch):
    """A read-only home (a container's): the default cache cannot be made; say what to set."""
    from pathlib import Path

    from qin.config import ConfigError

    def read_only(self, *args, **kwargs):  # what mkdir meets in a home this user may not write (root may)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConfigError, match=r"cache .*cannot be made \(Permission denied\); set QIN_CACHE"):
        synth.builtin_dataset(tmp_path / "home" / ".cache" / "qin")


def test_without_a_home_the_built_in_dataset_says_to_set_qin_cache(monkeypatch):
    from pathlib import Path

    from qin.config import ConfigError

    def no_home():  # neither HOME nor a passwd entry: a container run under an arbitrary uid
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("QIN_CACHE", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(ConfigError, match=r"built-in dataset: this user has no home folder .*set QIN_CACHE"):
        synth.builtin_dataset()


def test_sigterm_while_generating_leaves_no_staging_folder(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time; from pathlib import Path; from qin import synth\n"
        "def slow(root, **kwargs):\n"
        "    (Path(root) / 'train.parquet').write_bytes(b'half'); time.sleep(60)\n"
        "synth.make_dataset = slow\n"
        "synth.builtin_dataset(sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stderr=subprocess.PIPE)
    deadline = time.time() + 180  # a child's start: Python and pyarrow, on a loaded machine
    while not list(tmp_path.glob(".*/train.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".*/train.parquet")), "the generation never started"
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0 and list(tmp_path.iterdir()) == []


def test_builtin_dataset_leaves_nothing_when_generation_fails(tmp_path, monkeypatch):
    def fail(root, **kwargs):
        (root / "train.parquet").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "make_dataset", fail)
    with pytest.raises(RuntimeError):
        synth.builtin_dataset(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_small_and_odd_sizes(tmp_path):
    root = synth.make_dataset(tmp_path, rows=5, items=3, seed=2, valid_rows=2, test_rows=1)
    ds = load_dataset(root)
    assert ds.item_info.num_items == 4 and len(ds.splits["test"]) == 1
    with pytest.raises(ValueError):
        synth.generate(0, 10)
    with pytest.raises(ValueError):
        synth.generate(10, 100, tags=3)

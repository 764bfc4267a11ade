"""Malformed datasets drawn at random, fed to `qin train` as a hostile user would.

Each drawn dataset breaks one rule at one random row. The run must be refused before training
(exit 2) with a message naming the file, the column and the row, and the output folder, which
already holds an earlier run, must be left byte for byte as it was.
"""
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings, strategies as st

from qin.cli import main

ITEMS = 30  # item_info rows, padding row 0 included
ROWS = {"train.parquet": 40, "valid.parquet": 15, "test.parquet": 12}
SPLITS = list(ROWS)


def clean_tables(seed: int) -> dict[str, dict[str, list]]:
    """Plain Python lists per column, so a corruption can put any value anywhere."""
    rng = np.random.default_rng(seed)
    tables = {}
    for file, rows in ROWS.items():
        columns = {
            "user_id": rng.integers(0, 9, rows).tolist(),
            "item_seq": [rng.integers(1, ITEMS, rng.integers(1, 9)).tolist() for _ in range(rows)],
            "item_id": rng.integers(1, ITEMS, rows).tolist(),
            "likes_level": rng.integers(0, 11, rows).tolist(),
            "views_level": rng.integers(0, 11, rows).tolist(),
        }
        if file != "test.parquet":
            columns["label"] = rng.integers(0, 2, rows).astype(float).tolist()
        tables[file] = columns
    emb = rng.standard_normal((ITEMS, 128)).round(3)
    emb[0] = 0
    tables["item_info.parquet"] = {
        "item_id": list(range(ITEMS)),
        "item_tags": [[]] + [rng.integers(1, 12, rng.integers(1, 6)).tolist() for _ in range(ITEMS - 1)],
        "item_emb_d128": emb.tolist(),
    }
    return tables


TYPES = {"user_id": pa.int64(), "item_seq": pa.list_(pa.int64()), "item_id": pa.int64(), "likes_level": pa.int64(),
         "views_level": pa.int64(), "label": pa.float32(), "item_tags": pa.list_(pa.int64()),
         "item_emb_d128": pa.list_(pa.float32())}


def write(root: Path, tables, types=None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for file, columns in tables.items():
        kinds = {**TYPES, **((types or {}).get(file, {}))}
        pq.write_table(pa.table({name: pa.array(values, kinds[name]) for name, values in columns.items()}), root / file)


# One corruption: (file, column, row or None) and how to break it. Each returns the words the
# message must hold besides the file, column and row.
def corrupt(tables, types, kind: str, file: str, row: int, value_seed: int):
    rng = np.random.default_rng(value_seed)
    if kind == "negative id":
        column = "item_id"
        tables[file][column][row] = -int(rng.integers(1, 1000))
    elif kind == "id beyond item_info":
        column = "item_id"
        tables[file][column][row] = ITEMS + int(rng.integers(0, 10**6))
    elif kind == "history id out of range":
        column = "item_seq"
        history = tables[file][column][row]
        history[int(rng.integers(0, len(history)))] = int(rng.choice([-1, ITEMS, 10**9]))
    elif kind == "level out of range":
        column = str(rng.choice(["likes_level", "views_level"]))
        tables[file][column][row] = int(rng.choice([-5, -1, 11, 1000]))
    elif kind == "null level":
        column = "likes_level"
        tables[file][column][row] = None
    elif kind == "bad label":
        file = file if file != "test.parquet" else "train.parquet"
        column = "label"
        tables[file][column][row] = float(rng.choice([2.0, -1.0, 0.5, np.nan, np.inf]))
    elif kind == "non-finite embedding":
        file, column = "item_info.parquet", "item_emb_d128"
        row = 1 + row % (ITEMS - 1)
        tables[file][column][row][int(rng.integers(0, 128))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    elif kind == "ragged embedding":
        file, column = "item_info.parquet", "item_emb_d128"
        row = 1 + row % (ITEMS - 1)
        length = int(rng.choice([0, 1, 127, 129, 256]))
        tables[file][column][row] = [0.25] * length
    elif kind == "too many tags":
        file, column = "item_info.parquet", "item_tags"
        row = 1 + row % (ITEMS - 1)
        tables[file][column][row] = rng.integers(1, 12, int(rng.integers(6, 12))).tolist()
    elif kind == "negative tag":
        file, column = "item_info.parquet", "item_tags"
        row = 1 + row % (ITEMS - 1)
        tables[file][column][row] = [-int(rng.integers(1, 50))]
    else:
        raise AssertionError(kind)
    return file, column, row


KINDS = ["negative id", "id beyond item_info", "history id out of range", "level out of range", "null level",
         "bad label", "non-finite embedding", "ragged embedding", "too many tags", "negative tag"]


def earlier_run(out: Path) -> dict[str, bytes]:
    """What a run killed before its first checkpoint leaves (a folder a new run may train in), and a
    user's file beside it. (An earlier run's best.pt or metrics.jsonl is refused before the data loads.)"""
    out.mkdir(parents=True)
    files = {"config.yaml": b"train: {}\n", "notes.txt": b"the user's own file"}
    for name, content in files.items():
        (out / name).write_bytes(content)
    return files


def refused(data: Path, out: Path, capsys) -> str:
    """Run `qin train` on data into out; it must exit 2 and leave out as it was."""
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A tiny model, so that a wrongly accepted dataset fails the test in seconds, not minutes.
    code = main(["train", "--data", str(data), "--out", str(out), "train.device=cpu", "train.epochs=1",
                 "model.embed_dim=4", "model.attention_dim=4", "model.qnn_layers=1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a refused run changed the output folder"
    return err


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(kind=st.sampled_from(KINDS), file=st.sampled_from(SPLITS), row=st.integers(0, 11),
       seed=st.integers(0, 2**16), value_seed=st.integers(0, 2**16))
def test_a_corrupted_cell_is_refused_naming_file_column_and_row(kind, file, row, seed, value_seed, capsys):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tables = clean_tables(seed)
        file, column, row = corrupt(tables, {}, kind, file, row, value_seed)
        write(root / "data", tables)
        earlier_run(root / "out")
        err = refused(root / "data", root / "out", capsys)
        assert f"{file}, column '{column}', row {row}:" in err, err


STRUCTURAL = ["missing column", "wrong column type", "empty file", "truncated bytes", "zero rows", "not parquet"]


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(kind=st.sampled_from(STRUCTURAL), file=st.sampled_from([*SPLITS, "item_info.parquet"]),
       seed=st.integers(0, 2**16), cut=st.floats(0.05, 0.95))
def test_a_broken_file_is_refused_naming_it(kind, file, seed, cut, capsys):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tables = clean_tables(seed)
        types = {}
        # user_id is optional: it groups rows in the layout but is never read as a feature.
        columns = sorted(c for c in tables[file] if c != "user_id")
        column = columns[seed % len(columns)]
        if kind == "missing column":
            del tables[file][column]
        elif kind == "wrong column type":
            tables[file][column] = [str(v) for v in tables[file][column]]
            types = {file: {column: pa.string()}}
        elif kind == "zero rows":
            tables[file] = {name: [] for name in tables[file]}
        write(root / "data", tables, types)
        path = root / "data" / file
        if kind == "empty file":
            path.write_bytes(b"")
        elif kind == "truncated bytes":
            content = path.read_bytes()
            path.write_bytes(content[: int(len(content) * cut)])
        elif kind == "not parquet":
            path.write_text("user_id,item_id\n1,2\n")
        earlier_run(root / "out")
        err = refused(root / "data", root / "out", capsys)
        assert file in err, err
        if kind in ("missing column", "wrong column type"):
            assert f"column '{column}'" in err, err


def test_extra_columns_are_ignored_and_named_once(tmp_path, caplog, capsys):
    import logging

    from qin.data import load_dataset

    tables = clean_tables(0)
    tables["train.parquet"]["device_type"] = ["phone"] * ROWS["train.parquet"]
    write(tmp_path, tables, {"train.parquet": {"device_type": pa.string()}})
    with caplog.at_level(logging.INFO, logger="qin.data"):
        dataset = load_dataset(tmp_path)
    assert len(dataset.splits["train"]) == ROWS["train.parquet"]
    mentions = [r.getMessage() for r in caplog.records if "device_type" in r.getMessage()]
    assert len(mentions) == 1 and "train.parquet" in mentions[0], mentions

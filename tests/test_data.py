"""qin.data: reading and validating a dataset folder, and assembling batches."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, strategies as st

from qin import data, synth
from qin.data import DataError, Split, iterate_batches, keep_last, load_dataset, num_batches
from qin.features import MICROLENS_FEATURES

NUM_ITEMS = 20  # item_info rows: padding row 0 and items 1..19
TRAIN_ROWS, VALID_ROWS, TEST_ROWS = 40, 12, 10


# ---------------------------------------------------------------------------------------------
# A small hand-built dataset whose columns the malformed cases edit
# ---------------------------------------------------------------------------------------------

def _split_columns(rows: int, seed: int, with_label: bool = True) -> dict[str, pa.Array]:
    """Ragged histories (0..9 items, no padding) so pad and truncate both happen at max_len 4."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 10, size=rows)
    columns = {
        "user_id": pa.array(rng.integers(0, 5, size=rows), pa.int64()),
        "item_seq": pa.array([rng.integers(1, NUM_ITEMS, size=n).tolist() for n in lengths], pa.list_(pa.int64())),
        "item_id": pa.array(rng.integers(1, NUM_ITEMS, size=rows), pa.int64()),
        "likes_level": pa.array(rng.integers(0, 11, size=rows), pa.int64()),
        "views_level": pa.array(rng.integers(0, 11, size=rows), pa.int64()),
    }
    if with_label:
        columns["label"] = pa.array(rng.integers(0, 2, size=rows).astype(np.float32), pa.float32())
    return columns


def _item_info_columns() -> dict[str, pa.Array]:
    rng = np.random.default_rng(7)
    tags = [[]] + [rng.integers(1, 30, size=rng.integers(0, 6)).tolist() for _ in range(NUM_ITEMS - 1)]
    emb = rng.standard_normal((NUM_ITEMS, 128)).astype(np.float32)
    emb[0] = 0
    return {
        "item_id": pa.array(np.arange(NUM_ITEMS), pa.int64()),
        "item_tags": pa.array(tags, pa.list_(pa.int64())),
        "item_emb_d128": pa.array(emb.tolist(), pa.list_(pa.float32())),
    }


def base_tables() -> dict[str, dict[str, pa.Array]]:
    return {
        "train.parquet": _split_columns(TRAIN_ROWS, 1),
        "valid.parquet": _split_columns(VALID_ROWS, 2),
        "test.parquet": _split_columns(TEST_ROWS, 3, with_label=False),
        "item_info.parquet": _item_info_columns(),
    }


def write_tables(root, tables: dict[str, dict[str, pa.Array]]):
    root.mkdir(parents=True, exist_ok=True)
    for file, columns in tables.items():
        pq.write_table(pa.table(columns), root / file)
    return root


def _replace(tables, file, column, row, value):
    """Set one cell (row) of one column, keeping its type."""
    array = tables[file][column]
    values = array.to_pylist()
    values[row] = value
    tables[file][column] = pa.array(values, array.type)


def _set_list_item(tables, file, column, row, position, value):
    array = tables[file][column]
    values = array.to_pylist()
    values[row] = list(values[row]) or [0]
    values[row][position] = value
    tables[file][column] = pa.array(values, array.type)


# ---------------------------------------------------------------------------------------------
# Loading a generated dataset
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return synth.make_dataset(tmp_path_factory.mktemp("generated"), rows=300, items=80, seed=3,
                              valid_rows=100, test_rows=100)


def _reference_pad(lists: list[list[int]], width: int) -> np.ndarray:
    """Plain Python: keep the last `width` entries, left-pad with zeros."""
    return np.array([[0] * (width - len(x[-width:])) + list(x[-width:]) for x in lists], dtype=np.int64).reshape(-1, width)


@pytest.mark.parametrize("max_len", [64, 8])
def test_generated_dataset_shapes_dtypes_and_padding(generated, max_len):
    ds = load_dataset(generated, max_len=max_len)
    assert set(ds.splits) == {"train", "valid", "test"}
    assert ds.item_info.num_items == 81
    assert ds.item_info.tags.shape == (81, 5) and ds.item_info.tags.dtype == torch.int64
    assert ds.item_info.mm.shape == (81, 128) and ds.item_info.mm.dtype == torch.float32
    assert ds.item_info.num_tags == int(ds.item_info.tags.max()) + 1
    for name, rows in (("train", 300), ("valid", 100), ("test", 100)):
        split = ds.splits[name]
        assert len(split) == rows
        assert split.item_id.dtype == np.int64 and split.item_id.shape == (rows,)
        assert split.item_seq.dtype == np.int32 and split.item_seq.shape == (rows, max_len)
        assert split.likes_level.dtype == np.int64 and split.views_level.dtype == np.int64
        raw = pq.read_table(generated / f"{name}.parquet")
        np.testing.assert_array_equal(split.item_seq, _reference_pad(raw.column("item_seq").to_pylist(), max_len))
        np.testing.assert_array_equal(split.item_id, raw.column("item_id").to_numpy())
        if name == "test":
            assert split.label is None
        else:
            assert split.label.dtype == np.float32
            np.testing.assert_array_equal(split.label, raw.column("label").to_numpy())


def test_most_recent_history_is_kept_last(tmp_path):
    tables = base_tables()
    tables["train.parquet"]["item_seq"] = pa.array(
        [[1, 2, 3, 4, 5, 6]] + [[7]] * (TRAIN_ROWS - 1), pa.list_(pa.int64()))
    split = load_dataset(write_tables(tmp_path, tables), max_len=4).splits["train"]
    assert split.item_seq[0].tolist() == [3, 4, 5, 6]  # truncation drops the oldest
    assert split.item_seq[1].tolist() == [0, 0, 0, 7]  # padding goes on the left


def test_a_history_padded_on_the_right_is_refused(tmp_path):
    """A list that ends in 0 after an id would keep its padding and lose its most recent items
    to the cut at max_len; empty lists and zeros between ids (masked, as padding) are legal."""
    tables = base_tables()
    histories = [[0, 0, 0], [4, 0, 5], [], [0, 7]] + [[7]] * (TRAIN_ROWS - 4)
    tables["train.parquet"]["item_seq"] = pa.array(histories, pa.list_(pa.int64()))
    split = load_dataset(write_tables(tmp_path, tables), max_len=4).splits["train"]
    assert split.item_seq[:4].tolist() == [[0, 0, 0, 0], [0, 4, 0, 5], [0, 0, 0, 0], [0, 0, 0, 7]]

    histories[5] = [3, 8] + [0] * 6
    tables["train.parquet"]["item_seq"] = pa.array(histories, pa.list_(pa.int64()))
    with pytest.raises(DataError) as caught:
        load_dataset(write_tables(tmp_path, tables), max_len=4)
    message = str(caught.value)
    assert message.startswith("train.parquet") and "column 'item_seq'" in message and "row 5:" in message, message
    assert "left-padded" in message, message


@given(st.lists(st.lists(st.integers(0, 3), max_size=5), max_size=12))
def test_first_padded_on_the_right_matches_plain_python(lists):
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    values = np.array([v for x in lists for v in x], dtype=np.int64)
    want = next((r for r, x in enumerate(lists) if x and x[-1] == 0 and max(x) > 0), None)
    assert data._first_padded_on_the_right(lengths, values) == want


def test_a_folder_in_place_of_a_file_is_named(tmp_path):
    write_tables(tmp_path, base_tables())
    (tmp_path / "test.parquet").unlink()
    (tmp_path / "test.parquet").mkdir()  # a partitioned table, as Spark writes one
    with pytest.raises(DataError, match=r"^test\.parquet: is a folder in .*; expected one parquet file"):
        load_dataset(tmp_path)


def test_a_column_twice_in_a_file_is_refused(tmp_path):
    write_tables(tmp_path, base_tables())
    table = pq.read_table(tmp_path / "valid.parquet")
    pq.write_table(table.append_column("item_id", table.column("item_id")), tmp_path / "valid.parquet")
    with pytest.raises(DataError) as caught:
        load_dataset(tmp_path)
    message = str(caught.value)
    assert message.startswith("valid.parquet") and "column 'item_id'" in message and "2 columns" in message, message


def test_ragged_histories_match_plain_python(tmp_path):
    tables = base_tables()
    ds = load_dataset(write_tables(tmp_path, tables), max_len=4)
    for name in ("train", "valid", "test"):
        expected = _reference_pad(tables[f"{name}.parquet"]["item_seq"].to_pylist(), 4)
        np.testing.assert_array_equal(ds.splits[name].item_seq, expected)
    tags = _reference_pad(tables["item_info.parquet"]["item_tags"].to_pylist(), 5)
    np.testing.assert_array_equal(ds.item_info.tags.numpy(), tags)


@given(lengths=st.lists(st.integers(0, 20), max_size=30), width=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_keep_last_matches_plain_python(lengths, width, seed):
    values = np.random.default_rng(seed).integers(1, 1000, size=sum(lengths))
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(int)
    lists = [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(lengths))]
    got = keep_last(np.array(lengths, dtype=np.int64), values, width)
    np.testing.assert_array_equal(got, _reference_pad(lists, width))


@given(rows=st.integers(1, 10), length=st.integers(0, 12), width=st.integers(1, 12))
def test_keep_last_of_equal_lengths_matches_plain_python(rows, length, width):
    values = np.arange(1, rows * length + 1)
    lists = [values[r * length:(r + 1) * length].tolist() for r in range(rows)]
    got = keep_last(np.full(rows, length), values, width, dtype=np.int32)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, _reference_pad(lists, width))


def test_narrow_and_wide_types_are_accepted(tmp_path):
    """int32 ids and levels, float64 embeddings, large_list and fixed_size_list load to the same arrays."""
    tables = base_tables()
    expected = load_dataset(write_tables(tmp_path / "int64", tables), max_len=6)
    for file in ("train.parquet", "valid.parquet", "test.parquet"):
        columns = tables[file]
        for column in ("user_id", "item_id", "likes_level", "views_level"):
            columns[column] = columns[column].cast(pa.int32())
        columns["item_seq"] = columns["item_seq"].cast(pa.large_list(pa.int32()))
    tables["train.parquet"]["label"] = tables["train.parquet"]["label"].cast(pa.float64())
    tables["valid.parquet"]["label"] = tables["valid.parquet"]["label"].cast(pa.int64())
    info = tables["item_info.parquet"]
    info["item_id"] = info["item_id"].cast(pa.int32())
    info["item_tags"] = info["item_tags"].cast(pa.list_(pa.int32()))
    info["item_emb_d128"] = info["item_emb_d128"].cast(pa.list_(pa.float64(), 128))
    got = load_dataset(write_tables(tmp_path / "narrow", tables), max_len=6)
    assert torch.equal(got.item_info.tags, expected.item_info.tags)
    assert torch.equal(got.item_info.mm, expected.item_info.mm)
    for name, split in expected.splits.items():
        for field in ("item_id", "item_seq", "likes_level", "views_level", "label"):
            want, have = getattr(split, field), getattr(got.splits[name], field)
            if want is None:
                assert have is None
            else:
                assert have.dtype == want.dtype
                np.testing.assert_array_equal(have, want)


def test_extra_columns_are_ignored_and_named(tmp_path, caplog):
    tables = base_tables()
    tables["train.parquet"]["video_duration"] = pa.array(np.ones(TRAIN_ROWS))
    tables["item_info.parquet"]["item_title"] = pa.array(["x"] * NUM_ITEMS)
    with caplog.at_level(logging.INFO, logger="qin.data"):
        ds = load_dataset(write_tables(tmp_path, tables))
    assert ds.extra_columns == {"item_info.parquet": ["item_title"], "train.parquet": ["video_duration"]}
    assert "video_duration" in caplog.text and "item_title" in caplog.text
    assert len(ds.splits["train"]) == TRAIN_ROWS


def test_rows_holding_the_padding_id_are_counted_per_categorical_column(tmp_path, caplog):
    tables = base_tables()
    likes = np.arange(TRAIN_ROWS) % 10 + 1
    likes[[3, 5, 8]] = 0  # 0-based ids would lose category 0 to padding: the log says how many rows
    tables["train.parquet"]["likes_level"] = pa.array(likes, pa.int64())
    features = [dict(f) for f in MICROLENS_FEATURES]
    for f in features:
        if f["name"] == "views_level":
            f["padding_idx"] = None  # row 0 trains: nothing to say
    with caplog.at_level(logging.INFO, logger="qin.data"):
        load_dataset(write_tables(tmp_path, tables), features=features)
    assert "rows holding the padding id 0" in caplog.text and f"'likes_level' 3 of {TRAIN_ROWS}" in caplog.text
    assert "'views_level'" not in caplog.text


def test_histories_cut_are_counted_by_items_not_by_left_padding(tmp_path, caplog):
    tables = base_tables()
    # Width 10, as pre-padded data comes; 4 items (exactly max_len) lose nothing, 5 lose one.
    lists = [[0] * 7 + [1, 2, 3]] * (TRAIN_ROWS - 4) + [[0] * 6 + [1, 2, 3, 4]] * 2 + [[4, 5, 6, 7, 8]] * 2
    tables["train.parquet"]["item_seq"] = pa.array(lists, pa.list_(pa.int64()))
    with caplog.at_level(logging.INFO, logger="qin.data"):
        load_dataset(write_tables(tmp_path, tables), max_len=4)
    assert f"train.parquet: 2 of {TRAIN_ROWS} histories hold more than data.max_len=4 items" in caplog.text


def test_test_split_is_optional_and_user_id_unused(tmp_path):
    tables = base_tables()
    del tables["test.parquet"]
    del tables["train.parquet"]["user_id"]
    ds = load_dataset(write_tables(tmp_path, tables))
    assert set(ds.splits) == {"train", "valid"}


def test_bad_max_len_is_refused(generated):
    with pytest.raises(ValueError, match="max_len"):
        load_dataset(generated, max_len=0)


# ---------------------------------------------------------------------------------------------
# Malformed datasets: one DataError naming file, column and first bad row
# ---------------------------------------------------------------------------------------------

def _drop_file(file):
    return lambda tables, root: tables.pop(file)


def _drop_column(file, column):
    return lambda tables, root: tables[file].pop(column)


def _cast(file, column, type_):
    return lambda tables, root: tables[file].__setitem__(column, tables[file][column].cast(type_, safe=False))


def _cell(file, column, row, value):
    return lambda tables, root: _replace(tables, file, column, row, value)


def _list_cell(file, column, row, position, value):
    return lambda tables, root: _set_list_item(tables, file, column, row, position, value)


def _empty(file):
    def edit(tables, root):
        tables[file] = {name: array.slice(0, 0) for name, array in tables[file].items()}
    return edit


MALFORMED = {
    # name: (edit, file, column, row, words in the message)
    "missing train": (_drop_file("train.parquet"), "train.parquet", None, None, "missing"),
    "missing item_info": (_drop_file("item_info.parquet"), "item_info.parquet", None, None, "missing"),
    "missing column": (_drop_column("valid.parquet", "likes_level"), "valid.parquet", "likes_level", None, "missing"),
    "missing label": (_drop_column("train.parquet", "label"), "train.parquet", "label", None, "missing"),
    "id as string": (_cast("train.parquet", "item_id", pa.string()), "train.parquet", "item_id", None, "string"),
    "label as string": (_cast("valid.parquet", "label", pa.string()), "valid.parquet", "label", None, "string"),
    "item_seq not a list": (lambda t, r: t["train.parquet"].__setitem__("item_seq", t["train.parquet"]["item_id"]),
                            "train.parquet", "item_seq", None, "list"),
    "float embedding as ints": (_cast("item_info.parquet", "item_emb_d128", pa.list_(pa.int64())),
                                "item_info.parquet", "item_emb_d128", None, "list of floats"),
    "six tags": (_cell("item_info.parquet", "item_tags", 3, [1, 2, 3, 4, 5, 6]), "item_info.parquet", "item_tags", 3, "6 ids, at most max_len 5"),
    "127 embedding values": (_cell("item_info.parquet", "item_emb_d128", 2, [0.5] * 127),
                             "item_info.parquet", "item_emb_d128", 2, "127 values"),
    "history id beyond item_info": (_list_cell("train.parquet", "item_seq", 17, 0, 99999),
                                    "train.parquet", "item_seq", 17, "item id 99999 is beyond item_info (ids 0..19)"),
    "negative history id": (_list_cell("test.parquet", "item_seq", 5, 0, -3), "test.parquet", "item_seq", 5, "item id -3 is negative"),
    "negative target id": (_cell("valid.parquet", "item_id", 4, -1), "valid.parquet", "item_id", 4, "-1"),
    "padding target id": (_cell("train.parquet", "item_id", 8, 0), "train.parquet", "item_id", 8, "padding id"),
    "target id beyond item_info": (_cell("train.parquet", "item_id", 9, NUM_ITEMS), "train.parquet", "item_id", 9, "item id 20 is beyond"),
    "level 11": (_cell("train.parquet", "views_level", 12, 11), "train.parquet", "views_level", 12, "11"),
    "negative tag": (_list_cell("item_info.parquet", "item_tags", 6, 0, -2), "item_info.parquet", "item_tags", 6, "-2"),
    "NaN in embedding": (_list_cell("item_info.parquet", "item_emb_d128", 5, 17, float("nan")),
                         "item_info.parquet", "item_emb_d128", 5, "nan"),
    "inf in embedding": (_list_cell("item_info.parquet", "item_emb_d128", 9, 0, float("inf")),
                         "item_info.parquet", "item_emb_d128", 9, "inf"),
    "label 2": (_cell("train.parquet", "label", 7, 2.0), "train.parquet", "label", 7, "not 0 or 1"),
    "label 0.5": (_cell("train.parquet", "label", 7, 0.5), "train.parquet", "label", 7, "not 0 or 1"),
    "NaN label": (_cell("valid.parquet", "label", 9, float("nan")), "valid.parquet", "label", 9, "NaN"),
    "null level": (_cell("train.parquet", "likes_level", 11, None), "train.parquet", "likes_level", 11, "null"),
    "null label": (_cell("train.parquet", "label", 3, None), "train.parquet", "label", 3, "null"),
    "null history": (_cell("valid.parquet", "item_seq", 2, None), "valid.parquet", "item_seq", 2, "null"),
    "null inside history": (_list_cell("train.parquet", "item_seq", 6, 0, None), "train.parquet", "item_seq", 6, "null"),
    "null embedding value": (_list_cell("item_info.parquet", "item_emb_d128", 4, 3, None),
                             "item_info.parquet", "item_emb_d128", 4, "null"),
    "item_info row out of order": (_cell("item_info.parquet", "item_id", 4, 5), "item_info.parquet", "item_id", 4, "expected 4"),
    "padding row not zero": (_list_cell("item_info.parquet", "item_emb_d128", 0, 0, 1.0),
                             "item_info.parquet", "item_emb_d128", 0, "padding row"),
    "padding row has a tag": (_cell("item_info.parquet", "item_tags", 0, [3]), "item_info.parquet", "item_tags", 0, "padding row"),
    "empty train": (_empty("train.parquet"), "train.parquet", None, None, "no rows"),
    "empty item_info": (_empty("item_info.parquet"), "item_info.parquet", None, None, "no rows"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_dataset_is_named(tmp_path, case):
    edit, file, column, row, words = MALFORMED[case]
    tables = base_tables()
    edit(tables, tmp_path)
    write_tables(tmp_path, tables)
    with pytest.raises(DataError) as caught:
        load_dataset(tmp_path)
    message = str(caught.value)
    assert message.startswith(file), message
    assert words in message, message
    if column is not None:
        assert f"column '{column}'" in message, message
    if row is not None:
        assert f"row {row}:" in message, message
    assert (caught.value.file, caught.value.column, caught.value.row) == (file, column, row)


@pytest.mark.parametrize("damage", ["truncated", "not parquet"])
def test_unreadable_file_is_named(tmp_path, damage):
    root = write_tables(tmp_path, base_tables())
    path = root / "valid.parquet"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=r"^valid\.parquet: not a readable parquet file"):
        load_dataset(root)


def test_row_numbers_count_across_record_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BATCH_ROWS", 16)
    tables = base_tables()
    _set_list_item(tables, "train.parquet", "item_seq", 37, 0, 999)
    with pytest.raises(DataError, match=r"^train\.parquet, column 'item_seq', row 37: item id 999 is beyond item_info \(ids 0\.\.19\)"):
        load_dataset(write_tables(tmp_path, tables))


@pytest.mark.parametrize("edit", [lambda t: _replace(t, "train.parquet", "likes_level", 37, None),
                                  lambda t: _set_list_item(t, "train.parquet", "item_seq", 37, 0, None)],
                         ids=["null value", "null inside a list"])
def test_nulls_past_the_first_record_batch_name_their_row(tmp_path, monkeypatch, edit):
    monkeypatch.setattr(data, "READ_BATCH_ROWS", 16)
    tables = base_tables()
    edit(tables)
    with pytest.raises(DataError, match=r"^train\.parquet, column '\w+', row 37: .*null"):
        load_dataset(write_tables(tmp_path, tables))


def test_first_bad_row_is_reported(tmp_path):
    tables = base_tables()
    _replace(tables, "train.parquet", "likes_level", 30, 12)
    _replace(tables, "train.parquet", "likes_level", 21, -1)
    with pytest.raises(DataError, match="row 21:"):
        load_dataset(write_tables(tmp_path, tables))


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def make_split(rows: int, with_label: bool = True, max_len: int = 6) -> Split:
    """item_id = row number + 1, so a batch tells which rows it holds."""
    ids = np.arange(1, rows + 1, dtype=np.int64)
    return Split(
        name="train", item_id=ids,
        item_seq=(ids[:, None] * 10 + np.arange(max_len)).astype(np.int32),
        features={"likes_level": ids % 11, "views_level": (ids * 3) % 11},
        label=(ids % 2).astype(np.float32) if with_label else None,
    )


def _rows(batches) -> list[np.ndarray]:
    return [b["item_id"].numpy() - 1 for b in batches]


def test_batch_shapes_and_dtypes():
    split = make_split(50)
    batches = list(iterate_batches(split, 16, shuffle=True, device="cpu"))
    assert [len(b["item_id"]) for b in batches] == [16, 16, 16, 2]
    for b in batches:
        assert set(b) == {"item_id", "item_seq", "likes_level", "views_level", "label"}
        assert b["item_seq"].shape == (len(b["item_id"]), 6)
        for key in ("item_id", "item_seq", "likes_level", "views_level"):
            assert b[key].dtype == torch.int64
        assert b["label"].dtype == torch.float32
        rows = b["item_id"].numpy() - 1
        np.testing.assert_array_equal(b["item_seq"].numpy(), split.item_seq[rows])
        np.testing.assert_array_equal(b["label"].numpy(), split.label[rows])
    assert "label" not in next(iterate_batches(make_split(5, with_label=False), 4))


def test_batches_do_not_alias_the_split():
    split = make_split(10)
    batch = next(iterate_batches(split, 4))
    batch["item_id"] += 100
    batch["label"] += 1
    assert split.item_id[0] == 1 and split.label[0] == 1


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("rows,batch_size", [(50, 16), (48, 16), (7, 8), (1, 1)])
def test_one_epoch_covers_every_row_once(shuffle, rows, batch_size):
    split = make_split(rows)
    seen = np.concatenate(_rows(iterate_batches(split, batch_size, shuffle=shuffle, seed=3, epoch=2)))
    assert sorted(seen) == list(range(rows))
    assert len(_rows(iterate_batches(split, batch_size))) == num_batches(split, batch_size)
    kept = np.concatenate(_rows(iterate_batches(split, batch_size, shuffle=shuffle, drop_last=True))
                          or [np.zeros(0, dtype=int)])
    assert len(kept) == rows // batch_size * batch_size == num_batches(split, batch_size, drop_last=True) * batch_size
    assert len(set(kept)) == len(kept)


def test_shuffle_is_reproducible_and_changes_per_epoch():
    split = make_split(200)

    def order(seed, epoch):
        return np.concatenate(_rows(iterate_batches(split, 32, shuffle=True, seed=seed, epoch=epoch)))

    np.testing.assert_array_equal(order(5, 0), order(5, 0))
    assert not np.array_equal(order(5, 0), order(5, 1))
    assert not np.array_equal(order(5, 0), order(6, 0))
    np.testing.assert_array_equal(np.concatenate(_rows(iterate_batches(split, 32))), np.arange(200))


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("rows,drop_last", [(103, False), (103, True), (64, False), (2, False)])
def test_ranks_partition_each_global_batch(world_size, rows, drop_last):
    split = make_split(rows)
    single = _rows(iterate_batches(split, 16, shuffle=True, seed=1, epoch=4, drop_last=drop_last))
    per_rank = [_rows(iterate_batches(split, 16, shuffle=True, seed=1, epoch=4, drop_last=drop_last,
                                      rank=r, world_size=world_size)) for r in range(world_size)]
    assert all(len(batches) == len(single) for batches in per_rank)  # every rank steps together
    for step, global_batch in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([batches[step] for batches in per_rank]), global_batch)
        sizes = [len(batches[step]) for batches in per_rank]
        assert max(sizes) - min(sizes) <= 1  # a short last batch is shared as evenly as it can be
        if len(global_batch) == 16:
            assert sizes == [16 // world_size] * world_size


@pytest.mark.parametrize("kwargs", [dict(world_size=3), dict(rank=2, world_size=2), dict(rank=-1, world_size=2),
                                    dict(world_size=0)])
def test_bad_distribution_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        next(iterate_batches(make_split(20), 16, **kwargs))


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError):
        num_batches(make_split(5), 0)
    with pytest.raises(ValueError):
        next(iterate_batches(make_split(5), 0))


def test_a_dataset_of_another_layout_without_data_features_is_told_to_declare_them(tmp_path):
    root = synth.make_dataset(tmp_path / "other", rows=50, items=10, seed=0, valid_rows=20, test_rows=5, schema="other")
    with pytest.raises(DataError, match=r"item_info\.parquet, column 'item_tags': missing \(the file has item_id.*"
                                        r"declare this dataset's columns in data\.features"):
        load_dataset(root)


@pytest.mark.parametrize("setting,column", [("history", "clicked_items"), ("label", "clicked")])
def test_a_history_or_label_under_another_name_is_told_which_setting_names_it(tmp_path, setting, column):
    """Declared features (a FuxiCTR block, say) cannot name the history or label column: data.* can."""
    root = synth.make_dataset(tmp_path / "other", rows=50, items=10, seed=0, valid_rows=20, test_rows=5, schema="other")
    section = {**synth.OTHER_DATA_SECTION}
    del section[setting]  # the MicroLens name then, which this layout lacks
    default = {"history": "item_seq", "label": "label"}[setting]
    with pytest.raises(DataError, match=rf"train\.parquet, column '{default}': missing .*{column}.*; if another column "
                                        rf"holds the \w+, set data\.{setting}=COLUMN$"):
        load_dataset(root, **section)

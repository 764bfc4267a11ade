"""Reading, validating and batching a dataset folder: the MicroLens_1M_x1 layout of SPEC.md, or any
schema declared as features (qin.features): train/valid/test.parquet hold the label, the history,
the target item id and the context features; item_info.parquet the item attributes, row i = item i.

Every check runs when the folder is loaded, vectorised over whole columns, so bad data fails before
training starts with one DataError naming the file, the column and the first bad row (rows count
from 0). Files are streamed in record batches, so the peak memory is the loaded arrays plus one batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from qin.errors import ConfigError
from qin.features import MICROLENS_FEATURES, context_features, item_features, item_key, parse_features, to_dicts

logger = logging.getLogger("qin.data")

READ_BATCH_ROWS = 1 << 18
REQUIRED_SPLITS = ("train", "valid")  # test is optional

# What each column must hold, by feature type (qin.features).
KIND_OF_TYPE = {"categorical": "int", "sequence": "int_list", "embedding": "float_list", "numeric": "number"}
KIND_NAMES = {"int": "an integer type", "number": "an integer or floating type",
              "int_list": "a list of integers", "float_list": "a list of floats"}


class DataError(ValueError):
    """A dataset that breaks the layout; the message names the file, the column and the first bad row.

    The same fields are kept as attributes (None where they do not apply) for callers and tests.
    """

    file: str | None = None
    column: str | None = None
    row: int | None = None


def data_error(file: str, message: str, column: str | None = None, row: int | None = None) -> DataError:
    """DataError("<file>, column '<column>', row <row>: <message>")."""
    where = file if column is None else f"{file}, column '{column}'"
    if row is not None:
        where += f", row {row}"
    error = DataError(f"{where}: {message}")
    error.file, error.column, error.row = file, column, row
    return error


@dataclass
class ItemInfo:
    """The item attributes as tensors, row = item id (row 0 = padding, all zeros); the item id
    column itself is the row number and is not stored."""

    columns: dict[str, torch.Tensor]  # sequence (N, max_len) int64, categorical (N,) int64, else float32
    num_items: int  # rows of item_info, padding row 0 included

    @property
    def tags(self) -> torch.Tensor:
        """MicroLens: item_tags (num_items, 5)."""
        return self.columns["item_tags"]

    @property
    def mm(self) -> torch.Tensor:
        """MicroLens: the frozen item_emb_d128 (num_items, 128)."""
        return self.columns["item_emb_d128"]

    @property
    def num_tags(self) -> int:
        """MicroLens: tag vocabulary, max tag id + 1 (id 0 is padding)."""
        return int(self.tags.max()) + 1


def item_info_fingerprint(info: ItemInfo) -> str:
    """A hash of the item table as the model reads it (every column's name, dtype, shape and
    values): a checkpoint records it, so that scoring with another item_info.parquet of the same
    size (new tags or frozen embeddings) is told, not silent. ~0.05 s for MicroLens' table."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(info.columns):
        column = info.columns[name]
        digest.update(f"{name}:{column.dtype}:{tuple(column.shape)};".encode())
        digest.update(column.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def warn_if_another_item_table(trained: str | None, dataset: Dataset, checkpoint: str) -> bool:
    """Warn (True) when the checkpoint's item-table fingerprint (None: saved before 2026-12-02, not
    known) is not the dataset's: a refreshed table may be meant, so it is used, but never silently."""
    if trained is None or trained == item_info_fingerprint(dataset.item_info):
        return False
    logger.warning("%s is not the item table %s was trained with (same %d items, other tags or frozen "
                   "embeddings): scoring uses this one", dataset.root / "item_info.parquet", checkpoint,
                   dataset.item_info.num_items)
    return True


@dataclass
class Split:
    name: str  # "train" / "valid" / "test"
    item_id: np.ndarray  # (N,) int64, the target items
    item_seq: np.ndarray  # (N, max_len) int32, the last max_len history items, left-padded with 0
    label: np.ndarray | None  # (N,) float32; None when the file has no label column (test)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # context features by name

    def __len__(self) -> int:
        return len(self.item_id)

    def __getattr__(self, name: str) -> np.ndarray:
        # A context feature reads like a field: split.likes_level.
        features = self.__dict__.get("features", {})
        if name in features:
            return features[name]
        raise AttributeError(name)

    def rows(self, start: int, stop: int) -> "Split":
        """Rows start..stop-1 as a Split of views (no copy)."""
        return Split(self.name, self.item_id[start:stop], self.item_seq[start:stop],
                     None if self.label is None else self.label[start:stop],
                     {name: values[start:stop] for name, values in self.features.items()})


@dataclass
class Dataset:
    root: Path
    item_info: ItemInfo
    splits: dict[str, Split]
    extra_columns: dict[str, list[str]] = field(default_factory=dict)  # file -> ignored columns
    features: list = field(default_factory=list)  # qin.features.Feature, vocab sizes resolved


# ---------------------------------------------------------------------------------------------
# Vectorised helpers
# ---------------------------------------------------------------------------------------------

def _first_padded_on_the_right(lengths: np.ndarray, values: np.ndarray) -> int | None:
    """The first row whose list ends in 0 after a non-zero id (ids >= 0), or None.

    A history padded on the right would lose its items to keep_last, silently, where the
    stored width exceeds max_len; zeros between ids are only masked, so they pass.
    """
    live = np.flatnonzero(lengths)
    if not live.size:
        return None
    ends = np.cumsum(lengths)[live]
    largest = np.maximum.reduceat(values, ends - lengths[live])  # the live rows tile `values`
    bad = _first((values[ends - 1] == 0) & (largest > 0))
    return None if bad is None else int(live[bad])


def keep_last(lengths: np.ndarray, values: np.ndarray, width: int, dtype=np.int64) -> np.ndarray:
    """(rows, width): each row's last `width` values, right-aligned after zero padding.

    Row r's list is values[o_r : o_r + lengths[r]] with o = exclusive cumsum of lengths; it keeps
    its most recent (last) entries, so a list longer than `width` loses its oldest ones.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = len(lengths)
    if rows and (lengths == lengths[0]).all():
        # Lists stored padded to one length (the usual layout): a reshape and a slice suffice.
        stored = values.reshape(rows, int(lengths[0]))[:, max(0, int(lengths[0]) - width):]
        out = np.zeros((rows, width), dtype=dtype)
        out[:, width - stored.shape[1]:] = stored
        return out
    kept = np.minimum(lengths, width)
    ends = np.cumsum(lengths)
    kept_starts = np.cumsum(kept) - kept
    out = np.zeros((rows, width), dtype=dtype)
    # Position j of the kept part of row r comes from values[ends_r - kept_r + j] and goes to the
    # flat slot r * width + (width - kept_r) + j; arange(total) - kept_starts_r is that j.
    step = np.arange(int(kept.sum()), dtype=np.int64)
    source = step + np.repeat(ends - kept - kept_starts, kept)
    target = step + np.repeat(np.arange(rows, dtype=np.int64) * width + width - kept - kept_starts, kept)
    out.reshape(-1)[target] = values[source]
    return out


def _first(mask: np.ndarray) -> int | None:
    return int(np.argmax(mask)) if mask.any() else None


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _type_fits(kind: str, t: pa.DataType) -> bool:
    if kind == "int":
        return pa.types.is_integer(t)
    if kind == "number":
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    # A list column whose every list is empty has no value type to infer: pa.table writes list<null>.
    if kind == "int_list":
        return _is_list(t) and (pa.types.is_integer(t.value_type) or pa.types.is_null(t.value_type))
    return _is_list(t) and (pa.types.is_floating(t.value_type) or pa.types.is_null(t.value_type))


class _FileReader:
    """One parquet file: schema checked on open, then read in record batches with row numbers."""

    def __init__(self, path: Path, kinds: dict[str, str], required: set[str]):
        self.path, self.name = path, path.name
        if path.is_dir():  # as Spark writes a partitioned table
            raise data_error(self.name, f"is a folder in {path.parent}; expected one parquet file")
        if not path.is_file():
            there = sorted(p.name for p in path.parent.glob("*.parquet")) if path.parent.is_dir() else []
            raise data_error(self.name, f"file is missing from {path.parent}"
                             + (f" (it holds {', '.join(there)})" if there else ""))
        try:
            self.parquet = pq.ParquetFile(path)
            schema = self.parquet.schema_arrow
        except (pa.ArrowException, OSError) as exc:
            raise data_error(self.name, f"not a readable parquet file ({exc})") from None
        try:
            self._check_schema(schema, kinds, required)
        except DataError:
            self.close()
            raise

    def __enter__(self) -> "_FileReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.parquet.close()

    def _check_schema(self, schema: pa.Schema, kinds: dict[str, str], required: set[str]) -> None:
        """Refuse missing columns, wrong types and an empty file; note the columns present and extra."""
        missing = [column for column in kinds if column in required and column not in schema.names]
        if missing:
            error = data_error(self.name, f"missing (the file has {', '.join(schema.names) or 'no columns'})", missing[0])
            error.missing_column = True
            raise error
        for column in kinds:
            if schema.names.count(column) > 1:  # which one to read would be a guess
                raise data_error(self.name, f"the file has {schema.names.count(column)} columns of this name", column)
        self.num_rows = self.parquet.metadata.num_rows
        if self.num_rows == 0:  # before the types: an empty column's type is often null
            raise data_error(self.name, "the file has no rows")
        for column, kind in kinds.items():
            if kind is not None and column in schema.names and not _type_fits(kind, schema.field(column).type):
                raise data_error(self.name, f"expected {KIND_NAMES[kind]}, got {schema.field(column).type}", column)
        self.extra = [name for name in schema.names if name not in kinds]
        self.present = [name for name in kinds if name in schema.names]

    def batches(self, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first row, batch) pairs over the chosen columns; a corrupt body is a DataError too."""
        start = 0
        try:
            for batch in self.parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
                yield start, batch
                start += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise data_error(self.name, f"not a readable parquet file ({exc})") from None
        if start != self.num_rows:
            raise data_error(self.name, f"read {start} rows, the footer promises {self.num_rows}")

    def fail(self, column: str, row: int | None, message: str) -> DataError:
        return data_error(self.name, message, column, row)

    def check_no_nulls(self, column: str, array: pa.Array, start: int) -> None:
        if array.null_count:
            row = start + _first(array.is_null().to_numpy(zero_copy_only=False))
            raise self.fail(column, row, "null value")

    def ints(self, column: str, array: pa.Array, start: int) -> np.ndarray:
        self.check_no_nulls(column, array, start)
        return self.int64(column, array.to_numpy(zero_copy_only=False), start)

    def int64(self, column: str, values: np.ndarray, start: int, lengths: np.ndarray | None = None) -> np.ndarray:
        """Integer ids as int64; a uint64 id past int64's range is refused as it is, never wrapped."""
        if values.dtype == np.uint64:
            bad = _first(values > np.iinfo(np.int64).max)
            if bad is not None:
                row = bad if lengths is None else self.row_of(lengths, bad)
                raise self.fail(column, start + row, f"id {int(values[bad])} is too large (ids are int64)")
        return values.astype(np.int64, copy=False)

    def lists(self, column: str, array: pa.Array, start: int) -> tuple[np.ndarray, np.ndarray]:
        """(lengths, flat values) of a list column, nulls in either refused."""
        self.check_no_nulls(column, array, start)
        values = array.flatten()
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
        if values.null_count:
            position = _first(values.is_null().to_numpy(zero_copy_only=False))
            raise self.fail(column, start + self.row_of(lengths, position), "null value inside the list")
        return lengths, values.to_numpy(zero_copy_only=False)

    @staticmethod
    def row_of(lengths: np.ndarray, position: int) -> int:
        """The row holding flat list position `position`."""
        return int(np.searchsorted(np.cumsum(lengths), position, side="right"))

    def check_range(self, column: str, values: np.ndarray, start: int, low: int, high: int, describe,
                    lengths: np.ndarray | None = None) -> None:
        """Refuse the first value outside low..high; describe(value) says what is wrong with it."""
        bad = _first((values < low) | (values > high))
        if bad is not None:
            row = bad if lengths is None else self.row_of(lengths, bad)
            raise self.fail(column, start + row, describe(int(values[bad])))


def _describe_item_id(num_items: int):
    def describe(value: int) -> str:
        if value >= num_items:
            return f"item id {value} is beyond item_info (ids 0..{num_items - 1})"
        if value < 0:
            return f"item id {value} is negative"
        return "item id 0 is the padding id, not an item"
    return describe


def _describe_id(feature):
    def describe(value: int) -> str:
        if value < 0:
            return f"id {value} is negative"
        if feature.vocab_size is None:  # past the ids the column's array holds
            return (f"id {value} is above {np.iinfo(np.int32).max}, the largest a {feature.type} feature holds; "
                    f"map the ids to 1..N")
        return f"id {value} is outside the vocabulary 0..{feature.vocab_size - 1}"
    return describe


def _empty_column(feature, rows: int) -> np.ndarray:
    if feature.type == "categorical":
        return np.zeros(rows, dtype=np.int64)
    if feature.type == "sequence":
        return np.zeros((rows, feature.max_len), dtype=np.int32)
    if feature.type == "embedding":
        return np.zeros((rows, feature.embedding_dim), dtype=np.float32)
    return np.zeros(rows, dtype=np.float32)


def _read_feature(reader: _FileReader, feature, array: pa.Array, start: int, out: np.ndarray) -> None:
    """Check one record batch of a feature's column and write it into out[start:]."""
    name, stop = feature.name, start + len(array)
    # Without a declared vocabulary, what the column's array holds (sequences: int32): never wrapped.
    highest = feature.vocab_size - 1 if feature.vocab_size else (
        np.iinfo(out.dtype).max if out.dtype.kind == "i" else np.iinfo(np.int64).max)
    if feature.type == "categorical":
        ids = reader.ints(name, array, start)
        reader.check_range(name, ids, start, 0, highest, _describe_id(feature))
        out[start:stop] = ids
    elif feature.type == "sequence":
        lengths, values = reader.lists(name, array, start)
        bad = _first(lengths > feature.max_len)
        if bad is not None:
            raise reader.fail(name, start + bad, f"{lengths[bad]} ids, at most max_len {feature.max_len} allowed")
        values = reader.int64(name, values, start, lengths)
        reader.check_range(name, values, start, 0, highest, _describe_id(feature), lengths)
        out[start:stop] = keep_last(lengths, values, feature.max_len, dtype=out.dtype)
    elif feature.type == "embedding":
        width = feature.embedding_dim
        lengths, values = reader.lists(name, array, start)
        bad = _first(lengths != width)
        if bad is not None:
            raise reader.fail(name, start + bad, f"{lengths[bad]} values, expected {width}")
        values = values.astype(np.float32, copy=False)  # a float64 too large for float32 becomes inf here
        bad = _first(~np.isfinite(values))
        if bad is not None:
            raise reader.fail(name, start + bad // width, f"non-finite value {values[bad]}")
        out[start:stop] = values.reshape(-1, width)
    else:  # numeric
        reader.check_no_nulls(name, array, start)
        values = array.to_numpy(zero_copy_only=False).astype(np.float32)
        bad = _first(~np.isfinite(values))
        if bad is not None:
            raise reader.fail(name, start + bad, f"non-finite value {values[bad]}")
        out[start:stop] = values


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _meta_kinds(features) -> dict[str, None]:
    """Meta columns: declared, so not named as extra, but never read or checked."""
    return {f.name: None for f in features if f.type == "meta"}


def _load_item_info(path: Path, features) -> tuple[ItemInfo, list[str]]:
    key, attributes = item_key(features), item_features(features)[1:]
    kinds = {key.name: "int", **{f.name: KIND_OF_TYPE[f.type] for f in attributes}}
    with _FileReader(path, kinds, set(kinds)) as reader:
        n = reader.num_rows
        if key.vocab_size is not None and n > key.vocab_size:
            raise reader.fail(key.name, key.vocab_size, f"{n} items, beyond the vocab_size {key.vocab_size}")
        columns = {f.name: _empty_column(f, n) for f in attributes}
        for start, batch in reader.batches(list(kinds)):
            stop = start + batch.num_rows
            ids = reader.ints(key.name, batch.column(key.name), start)
            bad = _first(ids != np.arange(start, stop))
            if bad is not None:
                raise reader.fail(key.name, start + bad,
                                  f"{key.name} {ids[bad]}, expected {start + bad} (row i must hold item i)")
            for f in attributes:
                _read_feature(reader, f, batch.column(f.name), start, columns[f.name])
        for f in attributes:
            if columns[f.name][0].any():
                raise reader.fail(f.name, 0, "the padding row 0 must be all zeros")
        _log_padding_ids(reader.name, attributes, {name: values[1:] for name, values in columns.items()})
        tensors = {name: torch.from_numpy(values.astype(np.int64) if values.dtype == np.int32 else values)
                   for name, values in columns.items()}
        return ItemInfo(columns=tensors, num_items=n), reader.extra


def _load_split(path: Path, name: str, num_items: int, max_len: int, features, label: str,
                history: str, labels_optional: bool) -> tuple[Split, list[str]]:
    key, context = item_key(features), context_features(features)
    kinds = {history: "int_list", key.name: "int", **{f.name: KIND_OF_TYPE[f.type] for f in context},
             label: "number"}
    required = set(kinds) - ({label} if name == "test" else set())  # absent: `qin evaluate` says so
    with _FileReader(path, {**_meta_kinds(features), **kinds}, required) as reader:
        has_label = label in reader.present
        n = reader.num_rows
        item_id = np.empty(n, dtype=np.int64)
        try:
            item_seq = np.empty((n, max_len), dtype=np.int32)
        except MemoryError:
            raise data_error(path.name, f"{n:,} histories of data.max_len={max_len} items need "
                             f"{n * max_len * 4 / 2**30:,.0f} GiB; a smaller data.max_len fits") from None
        labels = np.empty(n, dtype=np.float32) if has_label else None
        columns = {f.name: _empty_column(f, n) for f in context}
        cut = 0  # histories longer than max_len: the model reads their last max_len items
        for start, batch in reader.batches([c for c in kinds if c in reader.present]):
            stop = start + batch.num_rows
            ids = reader.ints(key.name, batch.column(key.name), start)
            reader.check_range(key.name, ids, start, 1, num_items - 1, _describe_item_id(num_items))
            item_id[start:stop] = ids

            lengths, values = reader.lists(history, batch.column(history), start)
            values = reader.int64(history, values, start, lengths)
            if (lengths > max_len).any():  # lists may come left-padded: count items, not list entries
                rows = np.repeat(np.arange(len(lengths)), lengths)
                items = np.bincount(rows, weights=values != 0, minlength=len(lengths))
                cut += int((items > max_len).sum())
            reader.check_range(history, values, start, 0, num_items - 1, _describe_item_id(num_items), lengths)
            bad = _first_padded_on_the_right(lengths, values)
            if bad is not None:
                raise reader.fail(history, start + bad, "the history ends in the padding id 0 after item ids; "
                                  "histories are left-padded with 0, most recent last (the last "
                                  f"{max_len} positions are what the model reads)")
            item_seq[start:stop] = keep_last(lengths, values, max_len, dtype=np.int32)

            for f in context:
                _read_feature(reader, f, batch.column(f.name), start, columns[f.name])

            if has_label:
                array = batch.column(label)
                values = array.to_numpy(zero_copy_only=False)
                bad = _label_problem(array, values)
                if bad is not None and labels_optional:
                    # Only `qin evaluate --split test` reads test labels; placeholders (-1, null)
                    # must not stop training or prediction.
                    row, problem = bad
                    logger.warning("%s, column '%s', row %d: %s: the test split is read without labels "
                                   "(only `qin evaluate --split test` needs them)", reader.name, label,
                                   start + row, problem)
                    has_label, labels = False, None
                elif bad is not None:
                    raise reader.fail(label, start + bad[0], bad[1])
                else:
                    labels[start:stop] = values
        _log_padding_ids(reader.name, context, columns)
        if cut:
            logger.info("%s: %d of %d histories hold more than data.max_len=%d items; the model reads the last "
                        "%d of each", reader.name, cut, n, max_len, max_len)
        return Split(name=name, item_id=item_id, item_seq=item_seq, label=labels, features=columns), reader.extra


def _log_padding_ids(file: str, features, columns: dict[str, np.ndarray]) -> None:
    """Name the categorical columns holding the padding id 0 in some rows: those rows read an
    all-zero, untrained embedding, which silently drops category 0 from data with 0-based ids."""
    counts = [f"'{f.name}' {int((columns[f.name] == 0).sum())} of {len(columns[f.name])}" for f in features
              if f.type == "categorical" and f.padding_idx == 0 and (columns[f.name] == 0).any()]
    if counts:
        logger.info("%s: rows holding the padding id 0 (an all-zero row that never trains; `padding_idx: "
                    "null` trains it): %s", file, ", ".join(counts))


def _label_problem(array: pa.Array, values: np.ndarray) -> tuple[int, str] | None:
    """(row in the batch, what is wrong) for the first label that is not 0 or 1, or None."""
    if array.null_count:
        return _first(array.is_null().to_numpy(zero_copy_only=False)), "null value"
    bad = _first(np.isnan(values)) if values.dtype.kind == "f" else None
    if bad is not None:
        return bad, "label is NaN"
    bad = _first((values != 0) & (values != 1))
    if bad is not None:
        return bad, f"label {values[bad]} is not 0 or 1"
    return None


def require_both_classes(split: Split, file: str, label: str = "label") -> None:
    """AUC needs clicks and non-clicks: refuse a labelled split of one class, naming it, before
    an epoch of training ends in an undefined AUC."""
    clicks = int(split.label.sum())
    if clicks in (0, len(split)):
        raise data_error(file, f"all {len(split):,} rows have label {int(split.label[0])}: AUC needs "
                         f"both clicks and non-clicks", label)


# An inferred vocabulary past this many rows, SPARSE_IDS_RATIO times the ids seen, is refused:
# hashed ids would otherwise ask for a table of billions of rows.
SPARSE_IDS_ABOVE = 10_000_000
SPARSE_IDS_RATIO = 100


def _resolve_vocab(features, item_info: ItemInfo, splits: dict[str, Split]) -> list:
    """Features with every vocab_size known: the declared one, else the largest id seen + 1."""
    resolved = []
    for f in features:
        f = dataclasses.replace(f)
        if f.vocab_size is None and f.has_ids:
            if f.name == item_key(features).name:
                f.vocab_size = item_info.num_items
            else:
                arrays = ([item_info.columns[f.name].numpy()] if f.is_item
                          else [split.features[f.name] for split in splits.values()])
                files = "item_info.parquet" if f.is_item else "/".join(f"{name}.parquet" for name in splits)
                f.vocab_size = max(int(a.max()) if a.size else 0 for a in arrays) + 1
                if f.vocab_size == 1 and f.padding_idx == 0:
                    raise data_error(files, "every value is 0, the padding id: the feature carries nothing "
                                     "(drop it from data.features; a categorical feature whose id 0 is a value declares "
                                     "padding_idx: null)",
                                     f.name)
                if f.vocab_size > SPARSE_IDS_ABOVE:
                    distinct = np.unique(np.concatenate([a.ravel() for a in arrays])).size
                    if f.vocab_size > SPARSE_IDS_RATIO * distinct:
                        raise data_error(files, f"ids reach {f.vocab_size - 1:,} but only {distinct:,} distinct "
                                         f"ids appear: an embedding table of {f.vocab_size:,} rows would be "
                                         f"almost all unused; map the ids to 1..N (hashed ids), or declare "
                                         f"vocab_size", f.name)
        resolved.append(f)
    return resolved


def load_dataset(root, max_len: int = 64, splits=("train", "valid", "test"), features=None,
                 label: str = "label", history: str = "item_seq", required=REQUIRED_SPLITS,
                 labelled=("train", "valid")) -> Dataset:
    """Read and validate item_info.parquet and the named splits; those in `required` must exist.
    Labels are read strictly in the `labelled` splits; elsewhere (the test split, unless `qin
    evaluate` scores it) a label column of placeholders (-1, null) is left out with a warning.

    `features` is a list of qin.features.Feature or config dicts; None reads the MicroLens layout.
    Dataset.features holds them back with every vocab_size resolved.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len}")
    declared = features is not None
    features = parse_features(MICROLENS_FEATURES if features is None else
                              [f if isinstance(f, dict) else to_dicts([f])[0] for f in features])
    for f in context_features(features):  # read as an input, the label would leak into the model
        if f.name in (label, history):
            role = "data.label" if f.name == label else "data.history"
            raise ConfigError(f"data.features: feature '{f.name}' is the column {role} names; "
                              f"a feature cannot read it")
    root = Path(root)
    try:
        item_info, extra = _load_item_info(root / "item_info.parquet", features)
        extra_columns = {"item_info.parquet": extra} if extra else {}
        loaded = {}
        for name in splits:
            path = root / f"{name}.parquet"
            if name not in required and not path.exists():
                continue
            loaded[name], extra = _load_split(path, name, item_info.num_items, max_len, features, label, history,
                                              labels_optional=name not in labelled)
            if extra:
                extra_columns[path.name] = extra
    except DataError as exc:
        if not getattr(exc, "missing_column", False):
            raise
        hints = []
        if exc.column in (history, label):  # a FuxiCTR block cannot name these: only data.* can
            setting, what = ("data.history", "histories") if exc.column == history else ("data.label", "clicks")
            hints.append(f"if another column holds the {what}, set {setting}=COLUMN")
        if not declared:
            hints.append("with no data.features the loader reads the MicroLens_1M_x1 layout: declare this "
                         "dataset's columns in data.features")
        if not hints:
            raise
        hinted = DataError(f"{exc}; {'; '.join(hints)}")
        hinted.file, hinted.column, hinted.row = exc.file, exc.column, exc.row
        raise hinted from None
    for file, names in extra_columns.items():
        logger.info("%s: ignoring extra columns %s", file, ", ".join(names))
    return Dataset(root=root, item_info=item_info, splits=loaded, extra_columns=extra_columns,
                   features=_resolve_vocab(features, item_info, loaded))


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def num_batches(split: Split, batch_size: int, drop_last: bool = False) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    full, rest = divmod(len(split), batch_size)
    return full + (1 if rest and not drop_last else 0)


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled row order of one epoch: the same in every process given (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def assemble_batch(split: Split, rows: np.ndarray, device=None) -> dict[str, torch.Tensor]:
    """Gather `rows` of every column into tensors (ids widened to int64, as embeddings want):
    item_id, item_seq, label and each context feature by its name."""
    batch = {"item_id": torch.from_numpy(split.item_id[rows]),
             "item_seq": torch.from_numpy(split.item_seq[rows]).long()}
    for name, values in split.features.items():
        column = torch.from_numpy(values[rows])
        batch[name] = column.long() if column.dtype == torch.int32 else column
    if split.label is not None:
        batch["label"] = torch.from_numpy(split.label[rows])
    if device is not None:
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    return batch


def iterate_batches(split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                    drop_last: bool = False, rank: int = 0, world_size: int = 1,
                    device=None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of one epoch; with world_size > 1, this rank's contiguous share of each global batch.

    Every rank yields the same number of batches. A last, partial global batch is shared out as
    evenly as contiguous slices allow (a rank may get an empty batch when it has fewer rows than
    ranks); drop_last skips it.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"the global batch_size {batch_size} must be a positive multiple of world_size {world_size}")
    n = len(split)
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
    for index in range(num_batches(split, batch_size, drop_last)):
        start = index * batch_size
        size = min(batch_size, n - start)
        lo, hi = start + size * rank // world_size, start + size * (rank + 1) // world_size
        yield assemble_batch(split, order[lo:hi], device)

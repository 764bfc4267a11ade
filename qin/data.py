"""Reading, validating and batching a dataset folder in the MicroLens_1M_x1 layout of SPEC.md.

Every check runs when the folder is loaded, vectorised over whole columns, so bad data fails before
training starts with one DataError naming the file, the column and the first bad row (rows count
from 0). Files are streamed in record batches, so the peak memory is the loaded arrays plus one batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

logger = logging.getLogger("qin.data")

TAGS_PER_ITEM = 5
EMBEDDING_DIM = 128
MAX_LEVEL = 10  # likes_level / views_level take 0..10
READ_BATCH_ROWS = 1 << 18
REQUIRED_SPLITS = ("train", "valid")  # test is optional

# Column kinds: what each column must hold. user_id is in the layout but not a model feature:
# its type is checked when present, its values are never read.
SPLIT_COLUMNS = {"user_id": "int", "item_seq": "int_list", "item_id": "int", "likes_level": "int",
                 "views_level": "int", "label": "number"}
ITEM_INFO_COLUMNS = {"item_id": "int", "item_tags": "int_list", "item_emb_d128": "float_list"}
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
    tags: torch.Tensor  # (num_items, 5) int64, row = item id, left-padded with 0
    mm: torch.Tensor  # (num_items, 128) float32, the frozen item_emb_d128

    @property
    def num_items(self) -> int:
        """Rows of item_info, padding row 0 included."""
        return self.tags.shape[0]

    @property
    def num_tags(self) -> int:
        """Tag vocabulary: max tag id + 1 (id 0 is padding)."""
        return int(self.tags.max()) + 1


@dataclass
class Split:
    name: str  # "train" / "valid" / "test"
    item_id: np.ndarray  # (N,) int64
    item_seq: np.ndarray  # (N, max_len) int32, the last max_len history items, left-padded with 0
    likes_level: np.ndarray  # (N,) int64
    views_level: np.ndarray  # (N,) int64
    label: np.ndarray | None  # (N,) float32; None when the file has no label column (test)

    def __len__(self) -> int:
        return len(self.item_id)

    def rows(self, start: int, stop: int) -> "Split":
        """Rows start..stop-1 as a Split of views (no copy)."""
        return Split(self.name, self.item_id[start:stop], self.item_seq[start:stop], self.likes_level[start:stop],
                     self.views_level[start:stop], None if self.label is None else self.label[start:stop])


@dataclass
class Dataset:
    root: Path
    item_info: ItemInfo
    splits: dict[str, Split]
    extra_columns: dict[str, list[str]] = field(default_factory=dict)  # file -> ignored columns


# ---------------------------------------------------------------------------------------------
# Vectorised helpers
# ---------------------------------------------------------------------------------------------

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
    if kind == "int_list":
        return _is_list(t) and pa.types.is_integer(t.value_type)
    return _is_list(t) and pa.types.is_floating(t.value_type)


class _FileReader:
    """One parquet file: schema checked on open, then read in record batches with row numbers."""

    def __init__(self, path: Path, kinds: dict[str, str], required: set[str]):
        self.path, self.name = path, path.name
        if not path.is_file():
            raise data_error(self.name, f"file is missing from {path.parent}")
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
            raise data_error(self.name, f"missing (the file has {', '.join(schema.names) or 'no columns'})", missing[0])
        for column, kind in kinds.items():
            if column in schema.names and not _type_fits(kind, schema.field(column).type):
                raise data_error(self.name, f"expected {KIND_NAMES[kind]}, got {schema.field(column).type}", column)
        self.extra = [name for name in schema.names if name not in kinds]
        self.present = [name for name in kinds if name in schema.names]
        self.num_rows = self.parquet.metadata.num_rows
        if self.num_rows == 0:
            raise data_error(self.name, "the file has no rows")

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
        return array.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)

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


def _describe_level(value: int) -> str:
    return f"level {value} is outside 0..{MAX_LEVEL}"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _load_item_info(path: Path) -> tuple[ItemInfo, list[str]]:
    with _FileReader(path, ITEM_INFO_COLUMNS, set(ITEM_INFO_COLUMNS)) as reader:
        return _read_item_info(reader)


def _read_item_info(reader: _FileReader) -> tuple[ItemInfo, list[str]]:
    n = reader.num_rows
    tags = np.zeros((n, TAGS_PER_ITEM), dtype=np.int64)
    mm = np.zeros((n, EMBEDDING_DIM), dtype=np.float32)
    for start, batch in reader.batches(list(ITEM_INFO_COLUMNS)):
        stop = start + batch.num_rows
        ids = reader.ints("item_id", batch.column("item_id"), start)
        bad = _first(ids != np.arange(start, stop))
        if bad is not None:
            raise reader.fail("item_id", start + bad, f"item_id {ids[bad]}, expected {start + bad} (row i must hold item i)")

        lengths, values = reader.lists("item_tags", batch.column("item_tags"), start)
        bad = _first(lengths > TAGS_PER_ITEM)
        if bad is not None:
            raise reader.fail("item_tags", start + bad, f"{lengths[bad]} tags, at most {TAGS_PER_ITEM} allowed")
        bad = _first(values < 0)
        if bad is not None:
            raise reader.fail("item_tags", start + reader.row_of(lengths, bad), f"tag id {values[bad]} is negative")
        tags[start:stop] = keep_last(lengths, values.astype(np.int64, copy=False), TAGS_PER_ITEM)

        lengths, values = reader.lists("item_emb_d128", batch.column("item_emb_d128"), start)
        bad = _first(lengths != EMBEDDING_DIM)
        if bad is not None:
            raise reader.fail("item_emb_d128", start + bad, f"{lengths[bad]} values, expected {EMBEDDING_DIM}")
        values = values.astype(np.float32, copy=False)  # a float64 too large for float32 becomes inf here
        bad = _first(~np.isfinite(values))
        if bad is not None:
            raise reader.fail("item_emb_d128", start + bad // EMBEDDING_DIM, f"non-finite value {values[bad]}")
        mm[start:stop] = values.reshape(-1, EMBEDDING_DIM)

    if tags[0].any():
        raise reader.fail("item_tags", 0, "the padding row 0 must be all zeros")
    if mm[0].any():
        raise reader.fail("item_emb_d128", 0, "the padding row 0 must be all zeros")
    return ItemInfo(tags=torch.from_numpy(tags), mm=torch.from_numpy(mm)), reader.extra


def _load_split(path: Path, name: str, num_items: int, max_len: int) -> tuple[Split, list[str]]:
    required = set(SPLIT_COLUMNS) - {"user_id", "label"}
    if name != "test":
        required.add("label")
    with _FileReader(path, SPLIT_COLUMNS, required) as reader:
        return _read_split(reader, name, num_items, max_len)


def _read_split(reader: _FileReader, name: str, num_items: int, max_len: int) -> tuple[Split, list[str]]:
    has_label = "label" in reader.present
    n = reader.num_rows
    item_id = np.empty(n, dtype=np.int64)
    item_seq = np.empty((n, max_len), dtype=np.int32)
    likes_level = np.empty(n, dtype=np.int64)
    views_level = np.empty(n, dtype=np.int64)
    label = np.empty(n, dtype=np.float32) if has_label else None
    columns = [c for c in reader.present if c != "user_id"]
    for start, batch in reader.batches(columns):
        stop = start + batch.num_rows
        ids = reader.ints("item_id", batch.column("item_id"), start)
        reader.check_range("item_id", ids, start, 1, num_items - 1, _describe_item_id(num_items))
        item_id[start:stop] = ids

        lengths, values = reader.lists("item_seq", batch.column("item_seq"), start)
        values = values.astype(np.int64, copy=False)
        reader.check_range("item_seq", values, start, 0, num_items - 1, _describe_item_id(num_items), lengths)
        item_seq[start:stop] = keep_last(lengths, values, max_len, dtype=np.int32)

        for column, out in (("likes_level", likes_level), ("views_level", views_level)):
            levels = reader.ints(column, batch.column(column), start)
            reader.check_range(column, levels, start, 0, MAX_LEVEL, _describe_level)
            out[start:stop] = levels

        if has_label:
            reader.check_no_nulls("label", batch.column("label"), start)
            labels = batch.column("label").to_numpy(zero_copy_only=False)
            bad = _first(np.isnan(labels)) if labels.dtype.kind == "f" else None
            if bad is not None:
                raise reader.fail("label", start + bad, "label is NaN")
            bad = _first((labels != 0) & (labels != 1))
            if bad is not None:
                raise reader.fail("label", start + bad, f"label {labels[bad]} is not 0 or 1")
            label[start:stop] = labels
    split = Split(name=name, item_id=item_id, item_seq=item_seq, likes_level=likes_level,
                  views_level=views_level, label=label)
    return split, reader.extra


def load_dataset(root, max_len: int = 64, splits=("train", "valid", "test")) -> Dataset:
    """Read and validate item_info.parquet and the named splits; train and valid must exist, others may not."""
    if max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len}")
    root = Path(root)
    item_info, extra = _load_item_info(root / "item_info.parquet")
    extra_columns = {"item_info.parquet": extra} if extra else {}
    loaded = {}
    for name in splits:
        path = root / f"{name}.parquet"
        if name not in REQUIRED_SPLITS and not path.exists():
            continue
        loaded[name], extra = _load_split(path, name, item_info.num_items, max_len)
        if extra:
            extra_columns[path.name] = extra
    for file, names in extra_columns.items():
        logger.info("%s: ignoring extra columns %s", file, ", ".join(names))
    return Dataset(root=root, item_info=item_info, splits=loaded, extra_columns=extra_columns)


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
    """Gather `rows` of every column into tensors (ids widened to int64, as embeddings want)."""
    batch = {
        "item_id": torch.from_numpy(split.item_id[rows]),
        "item_seq": torch.from_numpy(split.item_seq[rows]).long(),
        "likes_level": torch.from_numpy(split.likes_level[rows]),
        "views_level": torch.from_numpy(split.views_level[rows]),
    }
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

"""Data loader speed: batch assembly (a loaded split -> shuffled batches of tensors) and load_dataset.

Assembly is timed over one whole shuffled epoch at batch 8192, from the in-memory split to the
tensors on `device`, each epoch checked to have delivered every row; the target on 2 CPU cores
is 500k samples/s. The MicroLens schema (2 context features) and one with 6 are lines of one
table, not variants of each other: no ratio. Loading is timed on a folder written by qin.synth,
parquet to validated arrays, with the files in the page cache (just written, and one warm-up
load): the parsing, not the disk. Throughput percentiles come from the time percentiles (the
20th percentile of time is the 80th of throughput).

    python -m bench.bench_loader [--quick] [--device cpu] [--csv loader.csv]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import append_csv, device_argument, make_row, print_table, time_ms
from qin.commands_common import file_in_the_way
from qin.data import Split, iterate_batches, load_dataset
from qin.synth import make_dataset

BATCH_SIZE = 8192
MAX_LEN = 64
NUM_ITEMS = 91_718  # the real item vocabulary


def make_split(rows: int, seed: int = 0, context_features: int = 2) -> Split:
    """A random split of `rows` rows with the loaded dtypes and shapes (histories half padding).

    Two context features are MicroLens' levels; more add categorical features of 100 values,
    with every third one numeric (float32), as another schema would."""
    rng = np.random.default_rng(seed)
    item_seq = rng.integers(1, NUM_ITEMS, size=(rows, MAX_LEN), dtype=np.int32)
    item_seq[:, : MAX_LEN // 2] = 0
    features = {"likes_level": rng.integers(0, 11, size=rows), "views_level": rng.integers(0, 11, size=rows)}
    for index in range(2, context_features):
        features[f"context_{index}"] = (rng.random(rows, dtype=np.float32) if index % 3 == 2
                                        else rng.integers(0, 100, size=rows))
    return Split(name="train", item_id=rng.integers(1, NUM_ITEMS, size=rows), item_seq=item_seq,
                 label=(rng.random(rows) < 0.25).astype(np.float32), features=features)


def _throughput(count: int, times_ms: tuple[float, float, float]) -> tuple[float, float, float]:
    p50, p20, p80 = times_ms
    return count / (p50 * 1e-3), count / (p80 * 1e-3), count / (p20 * 1e-3)


def assembly_throughput(split: Split, device: torch.device, reps: int) -> tuple[float, float, float]:
    """samples/s of whole shuffled epochs of `split` at BATCH_SIZE, each a fresh shuffle."""
    epochs = iter(range(1_000_000))
    rows = len(split.label)

    def one_epoch():
        delivered = 0
        for batch in iterate_batches(split, BATCH_SIZE, shuffle=True, seed=0, epoch=next(epochs), device=device):
            delivered += len(batch["item_id"])
        if delivered != rows:  # a figure for less work than it names would flatter the loader
            raise RuntimeError(f"an epoch delivered {delivered} of {rows} rows")

    return _throughput(rows, time_ms(one_epoch, device, warmup=1, reps=reps))


def run(device, quick: bool = False) -> list[dict]:
    device = torch.device(device)
    rows = 200_000 if quick else 1_000_000
    results = []
    # MicroLens (2 context features), then a schema with 6 (the target holds for both).
    for context_features in (2, 6):
        assemble = assembly_throughput(make_split(rows, context_features=context_features), device,
                                       reps=3 if quick else 5)
        results.append(make_row("loader", "numpy", "assemble", "throughput", "samples/s", "context features",
                                context_features, assemble, device, "int64"))

    load_rows = 20_000 if quick else 200_000
    with tempfile.TemporaryDirectory() as folder:
        root = make_dataset(folder, rows=load_rows, items=5_000, seed=0, valid_rows=1000, test_rows=1000)
        cpu = torch.device("cpu")
        load = _throughput(load_rows + 2000, time_ms(lambda: load_dataset(root), cpu, warmup=1, reps=3))
    results.append(make_row("load_dataset", "pyarrow (page cache warm)", "load", "throughput", "rows/s", "rows",
                            load_rows + 2000, load, cpu, "int64"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller split, fewer repeats")
    parser.add_argument("--device", default="cpu", type=device_argument, help="where the batches go (cpu, cuda)")
    parser.add_argument("--csv", help="append the rows to this CSV file")
    args = parser.parse_args()
    blocking = args.csv and (Path(args.csv) if Path(args.csv).is_dir() else file_in_the_way(Path(args.csv).parent))
    if blocking:  # before the timing, not after it
        parser.error(f"--csv {args.csv}: {blocking} is " + ("a folder" if blocking.is_dir() else "a file, not a folder"))
    rows = run(args.device, quick=args.quick)
    print_table(rows, "data loader")
    print(f"batch assembly: {rows[0]['p50']:,.0f} samples/s at batch {BATCH_SIZE} (MicroLens), "
          f"{rows[1]['p50']:,.0f} with 6 context features; load_dataset: {rows[2]['p50']:,.0f} rows/s")
    if args.csv:
        append_csv(rows, args.csv)


if __name__ == "__main__":
    main()

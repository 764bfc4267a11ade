"""What backend="auto" runs on this device, and the MEASURED_FASTER entries a run's op tables support.

Reads the CSV the op benchmarks appended to (bench_asta, bench_qnn with --csv) and prints
bench/report.py's auto section as Markdown; run it on the device that made the CSV:

    python -m bench.auto_choice results.csv [--device cuda] [--out auto.md]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from bench.report import auto_section


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="rows of bench_asta / bench_qnn (a missing file counts as no rows)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", help="also write the Markdown here")
    args = parser.parse_args(argv)
    path = Path(args.csv)
    rows = list(csv.DictReader(open(path))) if path.exists() else []
    text = "\n".join(['# What backend="auto" runs', "", f"From {len(rows)} rows of {path}.", "",
                      *auto_section(rows, torch.device(args.device))])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""report.md from the CSV the benchmark modules appended to (bench/gpu_run.sh's results.csv).

Run it on the device that made the CSV: the report's targets, its tables and what backend="auto"
runs here with the MEASURED_FASTER entries the op tables support (bench/report.py's render,
without plots: `bench.report.make_plots` draws them anywhere from the same CSV).

    python -m bench.csv_report results.csv [--device cuda] [--out report.md] [--quick]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from bench import common
from bench.report import CODEGEN_SECTION, _number, auto_section, render

# The report's section of each kernel the modules write (bench/report.py's section titles).
SECTIONS = {"train_step": "Training step, end to end", "copy": "ASTA: sparse target attention",
            "matmul": "QNN: quadratic projection"}


# What names one figure: a later row with the same key (a stage run again into the same CSV)
# replaces an earlier one, so that every table, target and ratio reads the same, latest, figure.
ROW_KEY = ("kernel", "provider", "mode", "metric", "dtype", "x_name", "x_value")


def section_of(row: dict) -> str:
    if row.get("section"):  # written by `qin bench` itself
        return row["section"]
    if row.get("mode") == "codegen":
        return CODEGEN_SECTION
    kernel = row["kernel"]
    if kernel in SECTIONS:
        return SECTIONS[kernel]
    if kernel.startswith("asta"):
        return "ASTA: sparse target attention"
    if kernel.startswith("qnn"):
        return "QNN: quadratic projection"
    return "Other"


def read_rows(path: Path, device: str | None = None, commit: str | None = None) -> tuple[list[dict], list[str]]:
    """The CSV's rows, and the lines left out: a field missing or one too many, a figure that is
    not a finite number (a line cut off when a stage was killed: one bad line must not lose the
    report), a figure measured again further down, or (where `device` or `commit` is given) one
    measured on another device or at another commit: a CSV appended to by an earlier run must
    not lend its figures to this one, least of all as evidence for MEASURED_FASTER. Generated-code
    rows hold text figures (access widths, instruction names) and are kept as they are."""
    latest: dict[tuple, tuple[int, dict]] = {}
    skipped = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            text = ",".join(str(v) for v in row.values() if v is not None)[:200]
            numeric = row.get("mode") != "codegen"
            if None in row or None in row.values() or (
                    numeric and any(_number(row.get(f)) is None for f in ("p50", "p20", "p80"))):
                skipped.append(f"line {reader.line_num}: its figures do not parse: {text}")
                continue
            # Generated code is compiled here for a named GPU, whatever device reads the CSV.
            other = [f"{field} {row.get(field)!r}, not {want!r}"
                     for field, want in (("device", device if numeric else None), ("commit", commit))
                     if want is not None and row.get(field) != want]
            if other:
                skipped.append(f"line {reader.line_num}: measured on another {', '.join(other)}")
                continue
            key = tuple(row.get(f) for f in ROW_KEY)
            if key in latest:
                line, _ = latest[key]
                skipped.append(f"line {line}: measured again on line {reader.line_num}, which the report shows")
            latest[key] = (reader.line_num, row)
    return [row for _, row in latest.values()], skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="rows of bench_train / bench_asta / bench_qnn (a missing file: no rows)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", help="write report.md here")
    parser.add_argument("--quick", action="store_true",
                        help="the modules ran with --quick (bench/gpu_run.sh's): the report says its verdicts are indicative")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    path = Path(args.csv)
    rows, skipped = read_rows(path, common.device_name(device), common.git_commit()) if path.exists() else ([], [])
    for row in rows:
        row["section"] = section_of(row)
    for line in skipped:
        print(f"left out of the report: {line}")
    print("\n".join(['## What backend="auto" runs', "", *auto_section(rows, device)]))
    if args.out:
        failures = [] if rows else [f"no figures in {path}"]
        Path(args.out).write_text(render(rows, failures, device, quick=args.quick, plots=[], seconds=None,
                                          skipped=skipped))
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())

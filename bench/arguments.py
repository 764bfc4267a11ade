"""The benchmark command's arguments, shared by `python -m bench` and `qin bench`, in a module that
imports no torch: `qin --help` builds every command's arguments, and answers before torch loads."""
from __future__ import annotations

import argparse


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m bench", description="every benchmark of bench/ in one run, one report")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats: minutes on a 2-core CPU")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where a GPU is available, else cpu")
    parser.add_argument("--out", default="bench-report", help="folder for report.md, results.csv and plots")
    parser.add_argument("--force", action="store_true", help="overwrite files already in --out")
    parser.add_argument("--codegen", action="store_true",
                        help="only compile every Triton kernel for sm_89 and sm_90 and report registers, spills, "
                             "load widths, tensor-core instructions (part of every full run)")
    parser.add_argument("--only", nargs="+", metavar="WORD", help="run only the sections whose title holds a word")
    return parser

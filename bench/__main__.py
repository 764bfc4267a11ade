"""python -m bench [--quick] [--device cpu|cuda] [--out DIR] [--force] [--codegen]: see bench/report.py."""
import sys

from bench.arguments import build_parser

build_parser().parse_args()  # --help and argument errors answer before torch is imported (seconds)

from bench.report import main  # noqa: E402

sys.exit(main())

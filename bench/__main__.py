"""python -m bench [--quick] [--device cpu|cuda] [--out DIR] [--force] [--codegen]: see bench/report.py."""
import sys

from bench.report import main

sys.exit(main())

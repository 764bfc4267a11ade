"""The README's Python examples run as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block_under(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_from_python_example_runs_and_its_numbers_hold():
    code = _python_block_under("## From Python")
    names: dict = {}
    exec(compile(code, f"{README}:From Python", "exec"), names)
    parameters = re.search(r"QINConfig\(\)\)\s+# the paper's model: ([\d,]+) parameters", code).group(1)
    assert sum(p.numel() for p in names["model"].parameters()) == int(parameters.replace(",", ""))
    B, D = names["B"], names["D"]
    assert names["z"].shape == (B, D) and names["y"].shape == names["x"].shape and names["y"].isfinite().all()

"""The README's Python examples run as written, its commands parse, and the links of every
markdown file in the repository lead somewhere."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from qin.cli import build_parser

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


def _readme_command_lines() -> list[str]:
    text = README.read_text()
    lines = [line.split("#")[0].strip() for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    return [line[line.index("qin "):] for line in lines if re.search(r"(^|&& )qin ", line)]


def _readme_commands() -> list[str]:
    """Every `qin ...` command line in the README's code blocks (what users copy), but for the
    synopses ([optional] and a|b parts, which are not commands)."""
    return sorted({c for c in _readme_command_lines() if not re.search(r"[\[|]|\.\.\.", c)})


def test_every_command_the_readme_shows_parses():
    commands = _readme_commands()
    assert len(commands) >= 10 and "qin train --resume runs/mine" in commands
    parser = build_parser()
    for command in commands:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            raise AssertionError(f"README command does not parse: {command}") from None


def test_every_option_the_readme_synopses_name_exists():
    synopses = [c for c in _readme_command_lines() if "[" in c]
    assert {c.split()[1] for c in synopses} >= {"bench", "compare", "parity"}
    commands = build_parser()._subparsers._group_actions[0].choices
    for synopsis in synopses:
        known = commands[synopsis.split()[1]]._option_string_actions
        for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", synopsis):
            assert option in known, f"README synopsis names {option}, which qin {synopsis.split()[1]} lacks"


ROOT = README.parent


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def heading_anchors(text: str) -> set[str]:
    """The fragments GitHub gives a markdown file's headings: lower case, punctuation but hyphens
    and underscores dropped, spaces made hyphens; a repeated one gets -1, -2, ..."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?)\s*$", _without_code(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_heading_anchors_follow_github():
    text = "# QIN-Triton\n## From Python, and what `auto` runs\n```\n# not a heading\n```\n## Notes\n## Notes\n"
    assert heading_anchors(text) == {"qin-triton", "from-python-and-what-auto-runs", "notes", "notes-1"}


def test_every_relative_link_in_the_markdown_files_leads_somewhere():
    """A file moved or a heading renamed leaves no dead link behind (the README and the reports
    under bench/results link into each other by heading)."""
    files = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (an sdist): the markdown files there are these
        files = [str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.md") if ".git" not in p.parts]
    assert "README.md" in files
    dead, checked = [], 0
    for name in files:
        source = ROOT / name
        for link in re.findall(r"\]\(([^)\s]+)\)", _without_code(source.read_text())):
            if re.match(r"[a-z][a-z+.-]*:", link):  # https:, mailto:
                continue
            path, _, fragment = link.partition("#")
            target = (source.parent / path) if path else source
            checked += 1
            if not target.exists():
                dead.append(f"{name}: {link} (no such file)")
            elif fragment and target.suffix == ".md" and fragment not in heading_anchors(target.read_text()):
                dead.append(f"{name}: {link} (no such heading in {target.relative_to(ROOT)})")
    assert checked >= 10, checked
    assert not dead, "dead links:\n" + "\n".join(dead)

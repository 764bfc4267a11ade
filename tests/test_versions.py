"""setup.py's stated floor is the oldest pair that .ci/versions.sh tests, and torch has no upper bound."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _floor_pair() -> dict:
    m = re.search(r'^FLOOR="([^"]+)"', (REPO / ".ci" / "versions.sh").read_text(), re.MULTILINE)
    assert m, "no FLOOR= line in .ci/versions.sh"
    return dict(re.match(r"([a-z]+)==(\S+)", r).groups() for r in m.group(1).split() if "==" in r)


def _requirement(name: str) -> str:
    text = (REPO / "setup.py").read_text()
    # A requirement string in either quote style (the triton one holds double quotes).
    pattern = r"'((?:torch|triton)\b[^']*)'" + r'|"((?:torch|triton)\b[^"]*)"'
    reqs = [a or b for a, b in re.findall(pattern, text)]
    found = [r for r in reqs if re.match(rf"{name}\b", r)]
    assert len(found) == 1, reqs
    return found[0]


def test_setup_floor_is_the_tested_floor():
    floor = _floor_pair()
    for name in ("torch", "triton"):
        major_minor = ".".join(floor[name].split(".")[:2])
        assert _requirement(name).split(";")[0].strip() == f"{name}>={major_minor}", (name, floor[name])


def test_no_upper_bound_on_torch_and_triton_only_where_wheels_exist():
    assert "<" not in _requirement("torch")
    marker = _requirement("triton").split(";", 1)[1]
    assert 'platform_system == "Linux"' in marker and "x86_64" in marker and "aarch64" in marker

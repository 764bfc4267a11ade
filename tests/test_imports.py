"""The package's imports point one way: no module imports, even lazily, one that imports it back."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qin"


def qin_imports(path: Path) -> set[str]:
    """The qin modules that `path` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qin":
            if node.module == "qin":  # `from qin import distributed` names a module
                found |= {f"qin.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qin.")}
    return found


def test_no_import_circles():
    graph = {f"qin.{p.stem}": qin_imports(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done or module not in graph:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_public_names_still_import():
    from qin import QIN, QINConfig
    from qin.model import QIN as QINFromModel
    from qin.models import build_model

    assert QIN is QINFromModel
    assert type(build_model(QINConfig(architecture="din", num_items=20, num_tags=5))).__name__ == "DIN"

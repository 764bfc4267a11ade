"""The package's imports point one way: no module imports, even lazily, one that imports it back;
and importing it stays cheap (no torch._dynamo until something compiles or builds an optimizer)."""
import ast
import subprocess
import sys
from pathlib import Path

import torch

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
    import qin
    from qin import QIN, QINConfig
    from qin.model import QIN as QINFromModel
    from qin.models import build_model

    assert QIN is QINFromModel is qin.QIN and "QIN" in dir(qin)  # loaded on first use (qin/__init__.py)
    assert type(build_model(QINConfig(architecture="din", num_items=20, num_tags=5))).__name__ == "DIN"


def test_the_commands_help_and_usage_errors_answer_without_importing_torch():
    """`qin --help`, `qin train --help`, a mistyped command or `python -m bench --help`: 0.3-0.4 s
    on our 2-core test machine, where importing torch takes 3-4 s. The arguments are parsed before
    anything imports torch."""
    code = ("import sys\nfrom qin.cli import main\nfor argv in (['--help'], ['train', '--help'], ['bench', '--help'], "
            "['parity', '--help'], ['trian']):\n    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "import runpy\nsys.argv = ['bench', '--help']\ntry:\n    runpy.run_module('bench', run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert "invalid choice: 'trian'" in out.stderr and "--data-config" in out.stdout and "python -m bench" in out.stdout
    assert out.stderr.split()[-1] == "False", out.stderr


def test_importing_the_command_and_the_kernels_leaves_dynamo_unloaded():
    """torch._dynamo takes 2.3 s to import on our 2-core test machine, a third of `qin --help`;
    only torch.compile and the optimizers need it (torch's Optimizer imports it itself)."""
    code = "import sys, qin.cli, kernels.fp32_gemm, kernels.choice; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.split() == ["False"], out.stderr


def test_constant_under_compile_marks_as_torch_compiler_does():
    """kernels.utils.constant_under_compile is torch.compiler.assume_constant_result without its
    import of torch._dynamo: the same marks on the function, on this torch (a torch that marks
    otherwise fails here; tests/test_fp32_gemm.py shows the mark holding under fullgraph=True)."""
    from kernels.utils import constant_under_compile

    def ours():
        return 1

    def torchs():
        return 1

    assert constant_under_compile(ours) is ours
    assert torch.compiler.assume_constant_result(torchs) is torchs
    assert vars(ours) == vars(torchs) == {"_dynamo_marked_constant": True}

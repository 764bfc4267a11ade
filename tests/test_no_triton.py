"""Without the triton package (platforms with no triton wheel), `import kernels` and the torch
backend still work, and backend="triton" says what is missing.

Run in a subprocess whose sys.modules blocks triton (an entry of None makes `import triton` raise
ImportError), so that this process's own triton import is untouched.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from test_model import random_batch, small_model

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys
sys.modules["triton"] = None  # as if no triton wheel existed for this platform
import torch
import kernels
from qin.train import loss_fn
from test_model import random_batch, small_model

out = {"modules": sorted(m for m in sys.modules if m.startswith("triton") and sys.modules[m] is not None),
       "entry": kernels.quadratic_projection.__module__}
model = small_model(seed=2)  # model.asta_kernel and qnn_kernel: "auto"
model.train()
torch.manual_seed(5)
loss = loss_fn(model, random_batch(batch=6, length=7), 2e-4)
loss.backward()
out["loss"] = loss.item()
out["grad_norm"] = sum(p.grad.double().pow(2).sum().item() for p in model.parameters() if p.grad is not None)
x = torch.randn(3, 4)
errors = []
for call in (lambda: kernels.quadratic_projection(x, torch.randn(8, 4), torch.randn(8), 2, dropout_p=0.1, training=True,
                                                 backend="triton"),
             lambda: kernels.sparse_target_attention(torch.randn(3, 5, 4), x, torch.ones(3, 5), backend="triton"),
             lambda: kernels.gathered_sparse_target_attention(torch.randn(6, 4), torch.zeros(3, 5, dtype=torch.long),
                                                              x, torch.ones(3, 5), backend="triton")):
    try:
        call()
        errors.append(None)
    except RuntimeError as exc:
        errors.append(str(exc))
out["errors"] = errors
mask, index = torch.ones(3, 5), torch.zeros(3, 5, dtype=torch.long)
mask[:, 0], index[:, 0] = 0, 6
try:  # an index outside reps at a masked position: refused as by the full package
    kernels.gathered_sparse_target_attention(torch.randn(6, 4), index, x, mask, backend="torch")
    out["bad_index"] = None
except ValueError as exc:
    out["bad_index"] = str(exc)
# Without dropout no Triton kernel runs, here as in the full package: 'triton' is the torch fold.
out["qnn_no_dropout_triton"] = kernels.quadratic_projection(torch.arange(12.0).reshape(3, 4) / 10, torch.ones(8, 4),
                                                            torch.ones(8), 2, backend="triton", training=True).tolist()
out["bad_args"] = bad_argument_messages(kernels)
# The commands that read triton's version or compare its kernels: a figure, or a one-line refusal.
import contextlib, io, tempfile
from qin.cli import main
folder = tempfile.mkdtemp()
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    out["parity"] = main(["parity", "--quick", "--out", folder + "/parity"])
    out["bench"] = main(["bench", "--quick", "--only", "loading", "--out", folder + "/bench"])
out["stderr"] = err.getvalue()
out["bench_report"] = open(folder + "/bench/report.md").read()
print(json.dumps(out))
"""

# Bad arguments, each refused by the full package and by kernels.torch_only in the same words.
BAD_ARGUMENTS = """
import torch

def bad_argument_messages(kernels):
    x, w, b = torch.randn(3, 4), torch.randn(8, 4), torch.randn(8)
    h, q, m = torch.randn(3, 5, 4), torch.randn(3, 4), torch.ones(3, 5)
    reps, index = torch.randn(6, 4), torch.zeros(3, 5, dtype=torch.long)
    calls = [
        lambda: kernels.quadratic_projection(x, w, b, 2, dropout_p=-0.5, training=True),
        lambda: kernels.quadratic_projection(x, w, b, 2, dropout_p=1.0, training=True),
        lambda: kernels.quadratic_projection(x, w, b, 2, seed="abc"),
        lambda: kernels.quadratic_projection(x, w, b, 3),
        lambda: kernels.quadratic_projection(x, w, b[:7], 2),
        lambda: kernels.quadratic_projection(x.long(), w, b, 2),
        lambda: kernels.quadratic_projection(x, w, b, 2, backend="fast"),
        lambda: kernels.sparse_target_attention(h, q[:2], m),
        lambda: kernels.sparse_target_attention(h, q, m[:, :4]),
        lambda: kernels.sparse_target_attention(h[0], q, m),
        lambda: kernels.sparse_target_attention(h, q, m.to(torch.complex64)),
        lambda: kernels.gathered_sparse_target_attention(reps, index.float(), q, m),
        lambda: kernels.gathered_sparse_target_attention(reps, index, q[:, :3], m),
        lambda: kernels.gathered_sparse_target_attention(reps, index + 6, q, m),
    ]
    messages = []
    for call in calls:
        try:
            call()
            messages.append(None)
        except Exception as exc:
            messages.append(f"{type(exc).__name__}: {exc}")
    return messages
"""
exec(BAD_ARGUMENTS)
CHILD = BAD_ARGUMENTS + CHILD


@pytest.fixture(scope="module")
def child() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_import_and_train_without_triton(child):
    from qin.train import loss_fn

    assert child["modules"] == []  # nothing of triton was loaded
    assert child["entry"] == "kernels.torch_only"
    # The same model, batch and dropout draws through the full kernels package's torch backend.
    model = small_model(seed=2, asta_kernel="torch", qnn_kernel="torch")
    model.train()
    torch.manual_seed(5)
    loss = loss_fn(model, random_batch(batch=6, length=7), 2e-4)
    loss.backward()
    grad_norm = sum(p.grad.double().pow(2).sum().item() for p in model.parameters() if p.grad is not None)
    assert child["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert child["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
    assert grad_norm > 0


def test_triton_backend_names_the_missing_package(child):
    assert len(child["errors"]) == 3
    for message in child["errors"]:
        assert message is not None and "triton package" in message and "backend='torch'" in message


def test_full_package_is_used_when_triton_is_present():
    assert kernels.quadratic_projection.__module__ == "kernels.quadratic_projection"


def test_an_index_outside_reps_is_refused_as_by_the_full_package(child):
    assert child["bad_index"] is not None and "outside reps' 6 rows (at masked positions" in child["bad_index"]


def test_bad_arguments_are_refused_in_the_same_words_without_triton(child):
    """kernels.torch_only ran none of the full package's checks: dropout_p=-0.5 trained without
    dropout, dropout_p=1.0 returned zeros, seed='abc' passed, a wrong shape failed inside einsum."""
    want = bad_argument_messages(kernels)
    assert all(message is not None and message.startswith("ValueError") for message in want), want
    assert child["bad_args"] == want


def test_the_projection_without_dropout_takes_triton_as_the_torch_fold(child):
    want = kernels.quadratic_projection(torch.arange(12.0).reshape(3, 4) / 10, torch.ones(8, 4), torch.ones(8), 2)
    assert torch.tensor(child["qnn_no_dropout_triton"]).allclose(want)


def test_parity_is_refused_in_one_line_and_bench_reports_without_triton(child):
    """qin parity ended in a traceback (ModuleNotFoundError), and qin bench produced no figure at
    all: it read triton's version for every row."""
    assert child["parity"] == 2
    assert "qin parity: error: qin parity compares the Triton kernels" in child["stderr"]
    assert "Traceback" not in child["stderr"]
    assert child["bench"] == 0 and "triton not installed" in child["bench_report"]

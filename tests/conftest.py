import atexit
import os
import shutil
import tempfile

# The Triton kernels run on the CPU through Triton's interpreter. It must be chosen before
# triton is first imported, so it is set here, before any test module imports `kernels`.
if not os.environ.get("QIN_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# backend="auto" from the committed table alone: on a GPU the timed choice (kernels.choice) would
# otherwise time both paths at every new test shape and write the user's decision file.
# tests/test_choice.py turns it on, with a file of its own.
os.environ.setdefault("QIN_AUTO_BACKEND", "table")
# torch.compile's on-disk caches key a graph by what dynamo traced, not by our ops' autograd
# code: a cache left by an older checkout replays a backward that calls an op with the old
# arguments (a RuntimeError naming the op). qin.model.compile_model keys them by the kernels'
# source; tests that call torch.compile themselves do not pass there, so each test session also
# compiles into a fresh directory.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="qin-test-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
# Under pytest-xdist (`-n auto`, the README's test command) the workers share the cores: each
# worker, and every process its tests start, gets its share of torch's threads, not all of them
# (two workers of two threads each on two cores run slower than one).
def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores() // _WORKERS))

import pytest
import torch
from hypothesis import settings

# Interpreter runs are slow and timing varies with load: no deadlines, few examples by default.
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=10)
settings.register_profile("thorough", deadline=None, max_examples=200)
# On a GPU every new shape of a hypothesis draw compiles the kernels again (about a second each):
# fewer draws keep the CUDA suite within minutes; the fixed-shape tests cover the paper's shapes.
settings.register_profile("cuda", deadline=None, max_examples=8, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cuda" if os.environ.get("QIN_TEST_CUDA") else "ci"))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, at most 4. The README's command sends each test file to one
    worker (--dist loadfile, so a module's shared fixture runs once), and the longest file
    (test_bench.py, about 6 minutes on 2 cores) bounds the run: more workers would only add memory,
    each importing torch and Triton."""
    return max(1, min(_cores(), 4))


def pytest_report_teststatus(report, config):
    """On CUDA (QIN_TEST_CUDA=1, bench/gpu_run.sh's tests stage, run with -v) each passed test's line
    says its seconds: that stage runs in a time box, which kills pytest before --durations prints."""
    if os.environ.get("QIN_TEST_CUDA") and report.when == "call" and report.passed:
        return "passed", ".", f"PASSED {report.duration:.1f}s"
    return None


@pytest.fixture(autouse=True)
def same_random_state_whatever_ran_before():
    """torch's global generator seeded afresh for every test function: what its body draws without a
    generator of its own does not depend on which tests ran before it (module-scoped fixtures,
    set up earlier, are not covered)."""
    torch.manual_seed(0)


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for the test, then the settings as they were."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the CPU under the interpreter, or CUDA when QIN_TEST_CUDA=1."""
    return torch.device("cuda" if os.environ.get("QIN_TEST_CUDA") else "cpu")

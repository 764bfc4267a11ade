"""backend="auto" on a GPU: time both paths of an op on the user's own device, once, and keep the
faster.

A Triton path may run under "auto" only where it measured faster than the torch path on that
device, in the same run. The first call of an op for a shape class times one forward (plus
backward when training) of each path on copies of its inputs, and keeps Triton only if it took at
most MARGIN of torch's time. The QNN's torch path has two forms in training (its autograd
Function, the default, and plain autograd through the reference: reference.QNN_TORCH_FORMS),
both timed: the plain one runs where it took at most MARGIN of the Function's time, and Triton
must beat the form that runs. The decision is logged, kept for the process and written to a JSON
file (QIN_CACHE or ~/.cache/qin, backend_choice.json), keyed by the GPU, torch and Triton versions
and a hash of the kernels' source, so a later run on the same machine and code does not time
again, and a code change times afresh. kernels.utils.MEASURED_FASTER (what our benchmark runs
measured on named GPUs) serves only where nothing is timed: a decision timed here, for this
shape class, comes first.

QIN_AUTO_BACKEND=table turns the timing off: then "auto" is MEASURED_FASTER alone (torch
elsewhere). Nothing is timed where timing cannot run or would mislead: under torch.compile
tracing, during CUDA graph capture, off CUDA. There a decision made earlier in this process (or
read from the file by `preload`) is used, else MEASURED_FASTER, else torch; a traced call
follows the decision of the largest batch timed (its batch is left dynamic). A trial that fails on the torch path, or runs
out of memory on either (its copies share the device with the call's activations), means torch
for this process, and nothing is written. A trial does not move the random generators (they are
forked), times the two paths in turns, and frees its copies before the real call runs; a Triton
path that fails to compile or run is recorded as torch, with the error. Under
torch.use_deterministic_algorithms(True) the gathered attention, whose Triton backward adds into
the representations by atomics, runs torch when they train.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kernels.compile_cache import cache_root
from kernels.utils import autocast_off, constant_under_compile

logger = logging.getLogger("kernels.choice")

MARGIN = 0.95  # Triton must take at most 95% of torch's time: noise never flips auto to a loser
MODES = ("timed", "table")
# What a decision depends on: the two paths, and how they are timed and chosen (MARGIN, _time).
_SOURCES = ("quadratic_projection.py", "sparse_target_attention.py", "reference.py", "dropout.py", "choice.py",
            "utils.py", "fp32_gemm.py")
# Device types where "auto" may time the two paths. Only CUDA: on the CPU the Triton path is the
# interpreter (slow by design). Tests add "cpu" to check the mechanism there.
TIMED_DEVICE_TYPES = {"cuda"}
TRACED_BATCH = "B=traced"  # the batch class of a call that torch.compile or torch.export traces
_decisions: dict[str, dict] = {}  # key -> record, this process (and what was read from the file)
_by_call: dict[tuple, str] = {}  # (op, dtype, shape, device) -> choice: the per-call lookup
_forms_by_call: dict[tuple, str] = {}  # the same -> the torch path's form, where another than its default won
_loaded_from: list[Path] = []


@dataclass
class Trial:
    """One call of an op, ready to be replayed on either backend: `shape` names its shape class
    (what a decision is kept for), `run(backend)` runs forward, and backward where the call trains,
    on copies of the call's inputs. `torch_forms`: other forms of the torch path, timed beside its
    default (run(form) runs one), of which the fastest by MARGIN is what "torch" then runs."""
    op: str
    dtype: torch.dtype
    shape: tuple
    run: Callable[[str], None]
    torch_forms: tuple[str, ...] = ()


def mode() -> str:
    value = os.environ.get("QIN_AUTO_BACKEND", "timed")
    if value not in MODES:
        raise ValueError(f"QIN_AUTO_BACKEND must be one of {MODES}, got {value!r}")
    return value


def cache_file() -> Path:
    """Where the decisions are kept (OSError where there is no cache folder: kernels.compile_cache)."""
    return cache_root() / "backend_choice.json"


@functools.cache
def source_hash() -> str:
    """12 hex digits naming the source of the registered ops and their kernels."""
    digest = hashlib.sha1()
    here = Path(__file__).parent
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:12]


def where(device: torch.device) -> str:
    """The device as decisions and kernels.utils.MEASURED_FASTER name it: on CUDA the GPU's name
    and compute capability ("NVIDIA H200 sm_90"), else the device type."""
    if device.type != "cuda":
        return device.type
    return gpu_label(device.index if device.index is not None else torch.cuda.current_device())


@constant_under_compile  # under torch.compile: asked once while tracing, a constant after
def gpu_label(index: int) -> str:
    return _gpu_label(index)


@functools.cache
def _gpu_label(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def _key(trial: Trial, device: torch.device) -> str:
    import triton

    shape = ",".join(map(str, trial.shape))
    return (f"{trial.op}|{str(trial.dtype).removeprefix('torch.')}|{shape}|{where(device)}|"
            f"torch {torch.__version__}|triton {triton.__version__}|kernels {source_hash()}")


def timing_allowed(device: torch.device) -> bool:
    """Whether a trial may run now: outside compile tracing and CUDA graph capture."""
    if torch.compiler.is_compiling():
        return False
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


@functools.cache
def _say_once(message: str) -> None:
    logger.warning("%s", message)


def _load() -> None:
    try:
        path = cache_file()
    except OSError as exc:
        _say_once(f"backend='auto': {exc}; decisions last for this process only")
        return
    if path in _loaded_from:
        return
    _loaded_from.append(path)
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        logger.warning("backend='auto': ignoring %s, which cannot be read (%s); timing afresh", path, exc)
        return
    if not isinstance(records, list):
        logger.warning("backend='auto': ignoring %s, which holds no list of decisions; timing afresh", path)
        return
    kept = [record for record in records if _well_formed(record)]
    if len(kept) < len(records):
        logger.warning("backend='auto': ignoring %d record(s) of %s that lack what a decision holds",
                       len(records) - len(kept), path)
    for record in kept:
        _decisions.setdefault(record["key"], record)


def _well_formed(record) -> bool:
    """Whether a record of the file holds all that decide(), table() and preload() read (a file of
    another version, or edited by hand, may not)."""
    number = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)  # noqa: E731
    return (isinstance(record, dict) and isinstance(record.get("key"), str) and record["key"].count("|") >= 3
            and record.get("choice") in ("torch", "triton") and isinstance(record.get("op"), str)
            and isinstance(record.get("dtype"), str) and isinstance(record.get("shape"), list)
            and all(isinstance(part, (int, float, str)) for part in record["shape"])  # hashable: a key
            and number(record.get("torch_ms")) and (record.get("triton_ms") is None or number(record["triton_ms"]))
            and isinstance(record.get("error", ""), str)
            and isinstance(record.get("torch_forms", {}), dict)
            and all(isinstance(k, str) and number(v) for k, v in record.get("torch_forms", {}).items())
            and record.get("torch_form") in (None, *record.get("torch_forms", {})))


def _save() -> None:
    """Write every decision this process knows, with what other processes wrote meanwhile (read
    again and merged), atomically: a reader never sees half a file."""
    try:
        path = cache_file()
    except OSError:  # (said by _load)
        return
    if path in _loaded_from:
        _loaded_from.remove(path)
    _load()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own (not the pid: hosts sharing the folder may reuse one), renamed over.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(sorted(_decisions.values(), key=lambda r: r["key"]), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("backend='auto': could not write %s (%s); decisions last for this process only", path, exc)


def _median_ms(runs: dict[str, Callable[[], None]], device: torch.device, reps: int = 5,
               min_seconds: float = 0.02) -> dict[str, float]:
    """The median milliseconds of each run, timed in turns (torch, triton, torch, ...) so that a
    clock ramping up or drifting meets both alike. Each was called once before, untimed."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    samples: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    while min(map(len, samples.values())) < reps or time.perf_counter() - start < min_seconds:
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if min(map(len, samples.values())) >= 50:
            break
    return {name: statistics.median(times) for name, times in samples.items()}


def _warm(run: Callable[[], None], device: torch.device) -> str | None:
    """Call once (the first call compiles Triton, initialises cuBLAS): None, or what failed."""
    try:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - reported by the caller, which decides what it means
        return f"{type(exc).__name__}: {exc}"[:500]
    return None


def _time(trial: Trial, device: torch.device) -> dict:
    """The trial's record: torch_ms (the torch path's default form), triton_ms (None: failed) and
    choice; with torch_forms, each other form's time (torch_forms) and the form the torch path
    runs, where one took at most MARGIN of the default's time and is the fastest (torch_form).
    Triton is chosen where it took at most MARGIN of the time of the torch form that runs.
    torch_ms None (the torch path failed, or any ran out of memory: the copies and the call's own
    activations share the device, so that says nothing of the path) means: do not decide now."""
    record = {"op": trial.op, "dtype": str(trial.dtype).removeprefix("torch."), "shape": list(trial.shape)}
    runs = {backend: (lambda backend=backend: trial.run(backend))
            for backend in ("torch", *trial.torch_forms, "triton")}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        errors = {backend: _warm(run, device) for backend, run in runs.items()}
        out_of_memory = any(e and e.startswith("OutOfMemoryError") for e in errors.values())
        if errors["torch"] or out_of_memory:
            record.update(torch_ms=None, error=errors["torch"] or next(e for e in errors.values() if e))
            return record
        for backend, error in errors.items():  # any other failure: that path is not chosen
            if error:
                record["error"] = f"{backend}: {error}" if backend != "triton" else error
                del runs[backend]
        times = _median_ms(runs, device)
    record["torch_ms"], record["triton_ms"] = times["torch"], times.get("triton")
    torch_ms = times["torch"]
    if trial.torch_forms:
        record["torch_forms"] = {form: times[form] for form in trial.torch_forms if form in times}
        form, form_ms = min(record["torch_forms"].items(), key=lambda item: item[1], default=(None, None))
        if form_ms is not None and form_ms <= MARGIN * torch_ms:
            record["torch_form"], torch_ms = form, form_ms
    faster = record["triton_ms"] is not None and record["triton_ms"] <= MARGIN * torch_ms
    record["choice"] = "triton" if faster else "torch"
    return record


def decide(trial: Trial, device: torch.device) -> str | None:
    """'triton' or 'torch' for this call's shape class on `device` (timing it if it never was and
    timing is allowed here), or None where it was never timed and cannot be now."""
    call = (trial.op, trial.dtype, trial.shape, device)
    if trial.shape[0] == TRACED_BATCH:
        return _largest_batch_decision(call)
    known = _by_call.get(call)
    if known is not None or not timing_allowed(device):
        return known  # under torch.compile only this lookup is traced: see preload
    _load()
    key = _key(trial, device)
    record = _decisions.get(key)
    if record is not None:
        _remember(call, record)
        return record["choice"]
    record = _time(trial, device)
    trial.run = None  # the copies of the inputs go now, before the real call runs
    if record["torch_ms"] is None:  # the trial itself failed: torch for this process, nothing kept
        logger.warning("backend='auto' could not time %s (%s) on %s (%s); running torch", trial.op,
                       record["dtype"], where(device), record["error"])
        _by_call[call] = "torch"
        return "torch"
    record["key"] = key
    _decisions[key] = record
    _remember(call, record)
    _save()
    triton_ms = "failed" if record["triton_ms"] is None else f"{record['triton_ms']:.3f} ms"
    forms = "".join(f", torch as {form} {ms:.3f} ms" for form, ms in record.get("torch_forms", {}).items())
    logger.info("backend='auto' timed %s (%s, %s) on %s: torch %.3f ms%s, triton %s -> %s%s", trial.op,
                record["dtype"], ", ".join(map(str, trial.shape)), key.split("|")[3], record["torch_ms"], forms,
                triton_ms, _runs(record), f" ({record['error']})" if "error" in record else "")
    return record["choice"]


def _remember(call: tuple, record: dict) -> None:
    _by_call[call] = record["choice"]
    if record.get("torch_form"):
        _forms_by_call[call] = record["torch_form"]
    else:
        _forms_by_call.pop(call, None)


def _runs(record: dict) -> str:
    """What a decision runs: "triton", "torch", or the torch path's form ("torch (autograd)")."""
    form = record.get("torch_form")
    return f"torch ({form})" if record["choice"] == "torch" and form else record["choice"]


def torch_form(trial: Trial | None, device: torch.device) -> str | None:
    """The form of the torch path that a decision made for this call's shape class chose (after
    decide), or None: the torch path's default."""
    if trial is None:
        return None
    return _forms_by_call.get((trial.op, trial.dtype, trial.shape, device))


def _largest_batch_decision(call: tuple) -> str | None:
    """For a traced call: the decision of the largest batch class known for
    its op, dtype, device and the rest of its shape class (a training run's batch), or None."""
    op, dtype, shape, device = call
    known = [(int(s[0].removeprefix("B<=")), choice) for (o, d, s, dev), choice in _by_call.items()
             if (o, d, s[1:], dev) == (op, dtype, shape[1:], device) and s[0].startswith("B<=")]
    return max(known)[1] if known else None


def preload(device: torch.device) -> int:
    """Make the file's decisions for `device` (this GPU, versions and kernels' source) known to
    traced code. Under torch.compile "auto" only looks up decisions already in this process, so
    a run that compiles its model calls this first, eagerly. Returns how many there are."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in TIMED_DEVICE_TYPES or mode() == "table":
        return 0
    try:
        import triton  # noqa: F401  (only whether it imports)
    except ImportError:  # the torch-only entry points: nothing to choose
        return 0
    _load()
    count = 0
    for record in _decisions.values():
        dtype = getattr(torch, str(record.get("dtype")), None)
        if record["key"].endswith(_suffix(device)) and isinstance(dtype, torch.dtype) and isinstance(record.get("shape"), list):
            _remember((record["op"], dtype, tuple(record["shape"]), device), record)
            count += 1
    return count


def _suffix(device: torch.device) -> str:
    """The end of the keys of decisions that hold here: this device, versions and kernels' source."""
    try:
        import triton
    except ImportError:  # the torch-only entry points: no decision of the file holds
        return "|no triton"
    return f"|{where(device)}|torch {torch.__version__}|triton {triton.__version__}|kernels {source_hash()}"


def decisions(device: torch.device | None = None) -> list[dict]:
    """The decisions known to this process (its own, and the file's); with `device`, those that
    hold for it now (made with this torch, Triton and kernels' source: others are never used)."""
    _load()
    records = sorted(_decisions.values(), key=lambda r: r["key"])
    return records if device is None else [r for r in records if r["key"].endswith(_suffix(device))]


def table(records: list[dict], with_device: bool = False) -> list[str]:
    """The decisions as Markdown table lines (for `qin backends` and the benchmark report)."""
    head = ["device"] * with_device + ["op", "dtype", "shape class", "torch ms", "Triton ms", "auto runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        triton_ms = "failed: " + r.get("error", "")[:80] if r.get("triton_ms") is None else f"{r['triton_ms']:.3f}"
        forms = r.get("torch_forms", {})
        torch_ms = f"{r['torch_ms']:.3f}" + "".join(f" (as {form}: {ms:.3f})" for form, ms in forms.items())
        cells = [r["key"].split("|")[3]] * with_device + [
            r["op"], r["dtype"], ", ".join(map(str, r["shape"])), torch_ms, triton_ms, _runs(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def forget() -> None:
    """Drop what this process knows (tests; a changed QIN_CACHE is read afresh)."""
    _decisions.clear()
    _by_call.clear()
    _forms_by_call.clear()
    _loaded_from.clear()
    _gpu_label.cache_clear()
    _say_once.cache_clear()


def trial(backend: str, device: torch.device, op: str, dtype: torch.dtype, shape: tuple, fn: Callable,
          tensors: tuple, kwargs: dict, train: bool | None = None, torch_forms: tuple[str, ...] = ()) -> Trial | None:
    """The Trial of a call of `fn(*tensors, backend=..., **kwargs)` (a public op), or None where
    "auto" will not time it: another backend asked for, a device it does not time on, or
    QIN_AUTO_BACKEND=table. The shape class gets the batch (first dimension of the first tensor)
    rounded up to a power of two; whether the call trains (`train`, else: grad on and an input
    requiring grad); and for fp32 on CUDA, whether TF32 is on (it speeds up the cuBLAS products of
    both paths, not alike). Under torch.compile or torch.export the class says "B=traced": naming
    the batch's power of two would fix a dynamic batch in the graph (one graph per batch size, and
    torch.export refusing the dynamic dimension); decide() then follows the decision of the
    largest batch timed before, a training run's batch."""
    if backend != "auto" or device.type not in TIMED_DEVICE_TYPES or mode() == "table":
        return None
    if train is None:
        train = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    batch = tensors[0].shape[0]
    size = TRACED_BATCH if torch.compiler.is_compiling() else f"B<={1 << max(0, (int(batch) - 1).bit_length())}"
    tf32 = ("tf32",) if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else ()
    shape = (size, *shape, "fwd+bwd" if train else "fwd", *tf32)
    return Trial(op, dtype, shape, _replay(fn, tensors, kwargs, train), torch_forms if train else ())


def _replay(fn: Callable, tensors: tuple, kwargs: dict, train: bool) -> Callable[[str], None]:
    """Trial.run: the call again on copies of its tensors (floating ones as new leaves, requiring
    grad when it trains), and backward from a fixed random gradient when it trains. The copies
    are made at the first run, so a call that is never timed copies nothing."""
    inputs: list = []
    grad_out: list[torch.Tensor] = []

    def copy(t):
        if not isinstance(t, torch.Tensor):
            return t
        # Only what the call differentiates (not ASTA's mask, say) requires grad in the trial.
        return t.detach().clone().requires_grad_(train and t.requires_grad)

    def run(backend: str) -> None:
        if not inputs:
            inputs.extend(copy(t) for t in tensors)
        # Plain saved tensors: hooks in force around the call (activation checkpointing's,
        # save_on_cpu's) must neither see the trial's tensors nor slow its timing.
        with torch.set_grad_enabled(train), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = fn(*inputs, backend=backend, **kwargs)
            if train and out.requires_grad:
                if not grad_out:
                    grad_out.append(torch.randn_like(out))
                # Backward outside autocast, as the trainer runs it (inside, the torch backward
                # of the gathered attention failed on CUDA in bf16 before it turned autocast off).
                with autocast_off(out.device.type):
                    out.backward(grad_out[0])
                for t in inputs:
                    if isinstance(t, torch.Tensor):
                        t.grad = None

    return run

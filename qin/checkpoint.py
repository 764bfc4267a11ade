"""Checkpoints written atomically: a kill at any moment leaves the previous file readable."""
from __future__ import annotations

import os
import pickle
import re
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

FORMAT = "qin-checkpoint-v1"


class CheckpointError(ValueError):
    pass


def atomic_write(path: str | Path, write) -> None:
    """Call write(file_object) on a temporary file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # a folder this user may not write: name the file asked for, not the temporary
        exc.filename = str(path)
        raise
    try:
        # mkstemp creates the file readable by its owner only; the result gets the mode open()
        # would give it, so a run or a prediction stays readable to whom the umask allows.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # write or fsync: say which file (a full disk)
            exc.filename = str(path)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


LOCK_NAME = ".qin-train.lock"


@contextmanager
def run_lock(folder: str | Path):
    """Hold the run folder for one training process: a second `qin train` (or --resume) there is
    refused, rather than both writing its checkpoints and one deleting the other's temporaries.

    An advisory flock on a file that stays in the folder (unlinking it would let a third process
    lock a new file while a second still holds the old one); the kernel drops it when the process
    dies, so a killed run leaves nothing to clean up. Without fcntl (not POSIX) nothing is held.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(folder) / LOCK_NAME
    try:  # not through a symbolic link: the lock file is truncated and written below
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError:
        if path.is_symlink():
            raise CheckpointError(f"{path} is a symbolic link; qin writes its lock file only as a plain file "
                                  f"(remove the link)") from None
        if path.exists() and not path.is_file():  # a folder: open() cannot take it
            raise CheckpointError(f"{path} is not a plain file; qin keeps its lock there (remove it)") from None
        raise  # a lock file this user may not write (another user's run): say so as the OS does
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device, which open() did take
        os.close(fd)
        raise CheckpointError(f"{path} is not a plain file; qin keeps its lock there (remove it)")
    with os.fdopen(fd, "r+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise CheckpointError(f"{folder} is in use: {holder} is training there (wait for it, or stop it)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def training_there(folder: str | Path) -> str | None:
    """Who holds run_lock on the folder now ("process N on HOST"), or None: a check made before
    the data loads, so a second run is refused at once (run_lock itself still decides)."""
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return None
    with open(path, "r") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


# What a run writes into its folder with atomic_write: a resume removes only their temporaries.
RUN_FILES = ("latest.pt", "best.pt", "metrics.jsonl", "config.yaml", "curves.png")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of atomic_write that a killed process left in `folder`.

    A SIGKILL between mkstemp and the rename leaves `.<name>.<random>.tmp` behind; the file it was
    meant to replace is intact, so the leftover holds nothing worth keeping.
    """
    folder = Path(folder)
    stale = sorted(path for name in RUN_FILES for path in folder.glob(f".{name}.*.tmp")
                   if path.is_file() and not path.is_symlink()) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(path: str | Path, payload: dict) -> None:
    atomic_write(path, lambda fh: torch.save({"format": FORMAT, **payload}, fh))


def checkpoint_file(path: str | Path) -> Path:
    """The file a checkpoint argument names: a run folder means its best.pt."""
    path = Path(path)
    return path / "best.pt" if path.is_dir() else path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = checkpoint_file(path)
    if not path.exists():
        latest = path.with_name("latest.pt")
        hint = (f" (the run has no best epoch yet; {latest} holds its last step)"
                if path.name == "best.pt" and latest.exists() else "")
        raise CheckpointError(f"{path}: no such checkpoint{hint}")
    try:
        # weights_only: a checkpoint holds tensors and plain values only, so it is read without
        # unpickling arbitrary objects; a file from elsewhere cannot run code by being loaded.
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        if path.suffix == ".pt2":
            raise CheckpointError(f"{path}: a torch.export program (qin export's output), not a checkpoint; "
                                  f"name the run folder or its best.pt") from None
        # The object weights_only would not build, named in torch's message.
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if refused:
            raise CheckpointError(
                f"{path}: refused: it asks to build {refused.group(1)}, and qin reads checkpoints with "
                f"torch.load(weights_only=True), which builds tensors and plain values only, so that loading a file "
                f"runs no code from it (qin's own checkpoints hold nothing else)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_unpickling_reason(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a QIN checkpoint (expected format {FORMAT})")
    lacking = [key for key in ("config", "model") if not isinstance(payload.get(key), dict)]
    if lacking:
        raise CheckpointError(f"{path}: a QIN checkpoint without its {' and '.join(lacking)} (damaged, or not "
                              f"written by qin train)")
    return payload


def load_weights(model, payload: dict, source) -> None:
    """model.load_state_dict(payload["model"]), naming the checkpoint where its weights do not fit."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:  # missing or unexpected keys, other shapes
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"{source}: its weights do not fit the model its config builds ({detail[:300]})") from None


# torch's weights_only errors wrap the reason in advice about weights_only=False, which is not
# ours to give: these lines are skipped when naming what was wrong with the file.
_TORCH_ADVICE = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")


def _unpickling_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):  # what torch's weights-only unpickler raises on text or junk bytes
        return "not a file torch.save wrote"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_TORCH_ADVICE)]
    return (reasons or lines or [type(exc).__name__])[0]


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two (nested) config dicts, as 'section.key: saved -> current'."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} here")
    return diffs


# Switches that change how the model computes, not what: a checkpoint loads across them.
EXECUTION_KEYS = ("asta_form", "asta_kernel", "qnn_kernel", "dedup_items", "asta_precision")


def check_model_config(payload: dict, model_config: dict, source: str) -> None:
    """Refuse a checkpoint whose model config differs from `model_config`, naming the keys."""
    saved = {k: v for k, v in payload["config"]["model"].items() if k not in EXECUTION_KEYS}
    current = {k: v for k, v in model_config.items() if k not in EXECUTION_KEYS}
    diffs = config_differences(saved, current, "model.")
    if diffs:
        raise CheckpointError(f"{source}: checkpoint config does not match the model: " + "; ".join(diffs))

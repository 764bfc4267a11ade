"""TensorBoard event files of a run folder: read the scalars back, and trim them to a checkpoint.

Two step axes: tags under `train/` count optimizer steps, tags under `epoch/` count completed
epochs. A resumed run repeats what its checkpoint did not cover, so before it writes anything
`keep_covered` rewrites the run's events to hold each (tag, step) once, none beyond the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

EVENT_FILE_GLOB = "events.out.tfevents.*"


def event_files(run_dir: str | Path) -> list[Path]:
    # The name starts with the creation time in seconds, so name order is writing order.
    return sorted(Path(run_dir).glob(EVENT_FILE_GLOB))


# The tags a run writes (qin.watch): the only ones keep_covered rewrites.
QIN_TAG_PREFIXES = ("train/", "epoch/")


def _summary_values(path: Path):
    """(tag, step, value or None where it is not a plain scalar, wall_time) of every summary value
    in one event file; a record cut short by a kill ends the file quietly (the loader stops at it)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    for event in LegacyEventFileLoader(str(path)).Load():
        if event.HasField("summary"):
            for value in event.summary.value:
                scalar = value.simple_value if value.HasField("simple_value") else None
                yield value.tag, event.step, scalar, event.wall_time


def _scalar_events(path: Path):
    """(tag, step, value, wall_time) of every scalar in one event file."""
    return ((tag, step, value, wall) for tag, step, value, wall in _summary_values(path) if value is not None)


def _values_if_ours(path: Path) -> list | None:
    """The summary values of an event file a run of ours wrote: one holding nothing but scalars
    under our tags, besides the file's version header (a run killed before its first scalar leaves
    only that). None for a file holding anything else (another writer's graph, images, other tags)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    values = []
    for event in LegacyEventFileLoader(str(path)).Load():
        if event.HasField("file_version"):
            continue
        if not event.HasField("summary"):
            return None  # a graph, run metadata, a log message: another writer's
        for value in event.summary.value:
            if not value.HasField("simple_value") or not value.tag.startswith(QIN_TAG_PREFIXES):
                return None
            values.append((value.tag, event.step, value.simple_value, event.wall_time))
    return values


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...] in writing order} over all event files of the run."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(run_dir):
        for tag, step, value, _ in _scalar_events(path):
            scalars.setdefault(tag, []).append((step, value))
    return scalars


def _covered(tag: str, step: int, last_step: int, last_epoch: int) -> bool:
    return step <= (last_epoch if tag.startswith("epoch/") else last_step)


def keep_covered(run_dir: str | Path, last_step: int, last_epoch: int) -> bool:
    """Make the run's events hold each (tag, step) once and nothing past the checkpoint (optimizer
    step `last_step`, `last_epoch` epochs done). Returns whether anything had to be rewritten.

    The kept scalars go to one new file before the old files are deleted; a kill in between leaves
    duplicates that the next resume removes the same way. Only files that hold nothing but scalars
    under the run's own tags are touched: another writer's events in the folder are left alone.
    """
    from torch.utils.tensorboard import SummaryWriter

    files = []
    kept, seen, clean = [], set(), True
    for path in event_files(run_dir):
        values = _values_if_ours(path)
        if values is None:
            continue  # not written by a run of ours
        files.append(path)
        for tag, step, value, wall_time in values:
            if (tag, step) in seen or not _covered(tag, step, last_step, last_epoch):
                clean = False
                continue
            seen.add((tag, step))
            kept.append((tag, step, value, wall_time))
    if clean:
        return False
    if kept:
        writer = SummaryWriter(str(run_dir), filename_suffix=".resumed")
        try:
            for tag, step, value, wall_time in kept:
                writer.add_scalar(tag, value, step, walltime=wall_time)
        finally:
            writer.close()
    for path in files:
        path.unlink()
    return True

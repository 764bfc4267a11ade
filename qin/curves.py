"""curves.png: loss, valid AUC and learning rate against epoch, for one run or several on the same axes.

A run's curves come from its metrics.jsonl (one record per epoch) and its step log (the TensorBoard
events of qin/watch.py); steps are placed on the epoch axis by the step count each record holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qin.checkpoint import atomic_write
from qin.events import read_scalars


class NoCurvesError(ValueError):
    """A folder with nothing to draw, or a damaged metrics.jsonl."""


class NoEpochYet(NoCurvesError):
    """A folder with no completed epoch (yet) to draw."""


@dataclass
class RunCurves:
    label: str
    records: list[dict]  # metrics.jsonl, one per completed epoch
    steps: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # step log: tag -> (step, value)


RECORD_KEYS = ("epoch", "step", "train_loss", "valid_auc", "valid_logloss", "lr")  # what the picture reads


def read_run(run_dir: str | Path, label: str | None = None) -> RunCurves:
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise NoEpochYet(f"{run_dir}: no metrics.jsonl (not a run folder, or no epoch finished yet)")
    records = []
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise NoCurvesError(f"{metrics}, line {number}: not JSON") from None
        missing = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
        if missing:
            raise NoCurvesError(f"{metrics}, line {number}: no {', '.join(missing)} (not an epoch record)")
        records.append(record)
    if not records:
        raise NoEpochYet(f"{metrics}: no epoch finished yet")
    return RunCurves(label or run_dir.resolve().name, records, read_scalars(run_dir))


def steps_to_epochs(records: list[dict], steps: np.ndarray) -> np.ndarray:
    """Optimizer steps as fractional epochs; steps past the last finished epoch continue at its pace."""
    ends = np.array([0] + [r["step"] for r in records], dtype=np.float64)
    x = np.interp(steps, ends, np.arange(len(ends), dtype=np.float64))
    beyond = steps > ends[-1]
    x[beyond] = len(records) + (steps[beyond] - ends[-1]) / max(ends[-1] - ends[-2], 1.0)
    return x


def _step_series(run: RunCurves, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not run.steps.get(tag):
        return None
    last = dict(run.steps[tag])  # a step written twice shows its last value, as TensorBoard does
    steps = np.array(sorted(last), dtype=np.float64)
    return steps_to_epochs(run.records, steps), np.array([last[s] for s in sorted(last)])


def _lone(series: tuple[np.ndarray, np.ndarray]) -> str | None:
    """A marker for a series of one point (a short run logs one step), which a line alone leaves
    undrawn."""
    return "o" if len(series[0]) == 1 else None


def draw(runs: list[RunCurves], path: str | Path) -> None:
    """Three panels (loss, valid AUC, learning rate), one colour per run; written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_loss, ax_auc, ax_lr = fig.subplots(1, 3)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        epochs = [r["epoch"] for r in run.records]
        step_loss = _step_series(run, "train/loss")
        if step_loss is not None:
            ax_loss.plot(*step_loss, color=color, alpha=0.35, linewidth=1, marker=_lone(step_loss))
        ax_loss.plot(epochs, [r["train_loss"] for r in run.records], "o-", color=color, markersize=4)
        ax_loss.plot(epochs, [r["valid_logloss"] for r in run.records], "s--", color=color, markersize=4)
        auc = [r["valid_auc"] for r in run.records]
        ax_auc.plot(epochs, auc, "o-", color=color, markersize=4, label=run.label)
        # The epoch best.pt holds (a gain counts from MIN_AUC_GAIN), as the trainer marked it;
        # records written before the mark existed fall back to the highest AUC.
        marked = [i for i, r in enumerate(run.records) if r.get("best")]
        best = marked[-1] if marked else int(np.argmax(auc))
        ax_auc.plot(epochs[best], auc[best], "*", color=color, markersize=13)
        ax_auc.annotate(f"{auc[best]:.4f}", (epochs[best], auc[best]), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8, color=color)
        step_lr = _step_series(run, "train/lr")
        if step_lr is not None:
            ax_lr.plot(*step_lr, color=color, drawstyle="steps-post", marker=_lone(step_lr))
        else:  # no step log: the lr each epoch ended with
            ax_lr.plot(epochs, [r["lr"] for r in run.records], "o", color=color)
    ax_loss.set_title("loss")
    key = [Line2D([], [], color="gray", alpha=0.5, linewidth=1, label="train, logged steps"),
           Line2D([], [], color="gray", marker="o", markersize=4, label="train, epoch mean"),
           Line2D([], [], color="gray", marker="s", markersize=4, linestyle="--", label="valid logloss")]
    ax_loss.legend(handles=key, fontsize=8)
    ax_auc.set_title("valid AUC (* best)")
    ax_auc.margins(y=0.15)  # room for the best value's label
    ax_auc.legend(fontsize=8)
    ax_lr.set_title("learning rate")
    ax_lr.set_yscale("log")
    for ax in (ax_loss, ax_auc, ax_lr):
        ax.set_xlabel("epoch")
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))


def labels_for(run_dirs: list[Path]) -> list[str]:
    """The folder names, or the paths as given where two runs share a name."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def draw_runs(run_dirs: list[str | Path], path: str | Path, warn=print) -> int:
    """The runs on the same axes; returns how many were drawn. Among several, a run with no
    finished epoch yet is left out with a warning (`warn`); a damaged metrics.jsonl is an error
    whatever the number of runs."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = []
    for run_dir, label in zip(run_dirs, labels_for(run_dirs)):
        try:
            runs.append(read_run(run_dir, label))
        except NoEpochYet as exc:
            if len(run_dirs) == 1:
                raise
            warn(f"left out: {exc}")
    if not runs:
        raise NoCurvesError("no run has a finished epoch to draw yet")
    draw(runs, path)
    return len(runs)

"""What a training run shows while it runs: TensorBoard scalars and `curves.png` in its folder.

    train/loss         mean training loss over the last `log_every_steps` steps   (x: optimizer step)
    train/grad_norm    largest gradient norm before clipping over those steps (spikes are what matter)
    train/lr           learning rate
    train/samples_per_s
    epoch/train_loss, epoch/valid_auc, epoch/valid_logloss, epoch/lr, epoch/samples_per_s   (x: epoch)

Writing these never stops training: the first OSError (a full disk, an unwritable file) of each
kind is logged as a warning and that kind of output is switched off for the rest of the run.
The events are flushed before every checkpoint, so a checkpoint never covers a step the events
lack; on resume the events are trimmed back to the checkpoint (qin/events.py).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

from qin import curves, events

logger = logging.getLogger(__name__)


class RunWatch:
    """The scalars and the picture of one run; `enabled=False` (DDP ranks other than 0) writes nothing."""

    def __init__(self, run_dir: str | Path, log_every_steps: int, enabled: bool = True):
        self.run_dir, self.log_every_steps = Path(run_dir), log_every_steps
        self.writer = None
        # Each kind of output is switched off by its first failure.
        self.write_events = self.write_curves = enabled
        self._reset_window()

    def _reset_window(self) -> None:
        # NaN until a step's norm is finite: a window of fp16 steps the scaler skipped (their norm
        # is inf/NaN) shows as NaN, not as a norm of 0.
        self._losses, self._max_grad_norm, self._rows = [], math.nan, 0
        self._window_start = time.perf_counter()

    def _events_error(self, exc: OSError) -> None:
        logger.warning("could not write TensorBoard events in %s (%s); training goes on without them",
                       self.run_dir, exc)
        self.write_events = False
        self.writer = None  # a failed writer may raise again on close: drop it

    def window(self) -> dict:
        """The steps since the last logged point, for a checkpoint: a resumed run completes the
        point as the uninterrupted run would (samples/s, a rate, restarts with the process)."""
        return {"losses": list(self._losses), "max_grad_norm": self._max_grad_norm}

    def open(self, resumed_at: tuple[int, int] | None = None, window: dict | None = None) -> None:
        """Start writing; `resumed_at` = (step, epochs done) of the checkpoint a resumed run starts
        from, `window` what its window() held."""
        if not self.write_events:
            return
        try:
            # A fresh run keeps no events: the folder's may be those of a run killed before its
            # first checkpoint, which would otherwise appear beside this one's.
            if events.keep_covered(self.run_dir, *(resumed_at or (0, 0))):
                if resumed_at is None:
                    logger.info("removed the TensorBoard events of an earlier run that left no checkpoint here")
                else:
                    logger.info("TensorBoard events trimmed to the checkpoint (step %d, epoch %d)", *resumed_at)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir), flush_secs=30)
            self._quiet_writer_thread()
        except OSError as exc:
            self._events_error(exc)
        self._reset_window()
        if window:
            self._losses, self._max_grad_norm = list(window["losses"]), window["max_grad_norm"]

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        try:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        except OSError as exc:
            self._events_error(exc)

    def after_step(self, step: int, loss: float, grad_norm: float, lr: float, rows: int) -> None:
        """Called after every optimizer step; writes one point every `log_every_steps` steps."""
        if not self.write_events:
            return
        self._losses.append(loss)
        if math.isfinite(grad_norm) and not grad_norm <= self._max_grad_norm:  # also replaces the NaN
            self._max_grad_norm = grad_norm
        self._rows += rows
        if step % self.log_every_steps:
            return
        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        self._scalars({"train/loss": sum(self._losses) / len(self._losses), "train/grad_norm": self._max_grad_norm,
                       "train/lr": lr, "train/samples_per_s": self._rows / seconds}, step)
        self._reset_window()

    def after_epoch(self, record: dict) -> None:
        """A metrics.jsonl record: its scalars at x = epoch (before the checkpoint that covers it)."""
        scalars = {"epoch/train_loss": record["train_loss"], "epoch/valid_auc": record["valid_auc"],
                   "epoch/valid_logloss": record["valid_logloss"], "epoch/lr": record["lr"],
                   "epoch/samples_per_s": record["samples_per_s"], "epoch/peak_memory_mb": record.get("peak_memory_mb")}
        # None: not measured (an epoch resumed at its last batch; peak memory before it was recorded)
        scalars = {tag: value for tag, value in scalars.items() if value is not None}
        self._scalars(scalars, record["epoch"])

    def flush(self) -> None:
        """Before a checkpoint is written: everything it covers is on disk first."""
        if self.writer is None:
            return
        try:
            self.writer.flush()
        except OSError as exc:
            self._events_error(exc)

    def end_epoch(self) -> None:
        """The epoch is over and metrics.jsonl written: redraw curves.png from it and the events."""
        if self.write_curves:
            self.flush()
            try:
                curves.draw_runs([self.run_dir], self.run_dir / "curves.png")
            except Exception as exc:  # noqa: BLE001 - a picture (a broken matplotlib, a full disk) never stops training
                logger.warning("could not write %s (%s: %s); training goes on without it",
                               self.run_dir / "curves.png", type(exc).__name__, exc)
                self.write_curves = False
        # Evaluation, checkpoints and drawing are not training: the next samples/s window starts now.
        self.restart_window_clock()

    def restart_window_clock(self) -> None:
        """samples/s counts from now (the window's losses stay): after time that was not training."""
        self._rows, self._window_start = 0, time.perf_counter()

    def _quiet_writer_thread(self) -> None:
        """tensorboard writes events from a thread, which dies on a write error printing its
        traceback; the writer's next call raises the same error here, where it is warned about
        once. Until close(), that thread's OSError goes unprinted (every other error as before)."""
        previous = self._previous_excepthook = threading.excepthook

        def hook(args):
            if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
                previous(args)
        self._excepthook = threading.excepthook = hook

    def close(self) -> None:
        if getattr(self, "_excepthook", None) is not None and threading.excepthook is self._excepthook:
            threading.excepthook = self._previous_excepthook
        self._excepthook = None
        if self.writer is None:
            return
        try:
            self.writer.close()
        except OSError as exc:
            self._events_error(exc)
        self.writer = None

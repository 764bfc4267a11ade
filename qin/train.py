"""The training loop of SPEC.md: Adam, BCE + embedding L2, grad-norm clip, valid AUC every epoch,
LR halved on an epoch without gain, early stop, best checkpoint kept; resumable at any step.

Files in the run folder:
    config.yaml     the resolved settings        metrics.jsonl  one line per epoch
    latest.pt       everything needed to resume  best.pt        the best model by valid AUC
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from kernels import choice as kernels_choice
from qin import distributed
from qin.checkpoint import (CheckpointError, atomic_write, check_model_config, load_checkpoint, load_weights,
                            remove_stale_temporaries, run_lock, save_checkpoint)
from qin.config import ConfigError, RunConfig
from qin.data import (Dataset, Split, item_info_fingerprint, iterate_batches, require_both_classes,
                      warn_if_another_item_table)
from qin.errors import StoppedBySignal
from qin.host_memory import bound_kept_memory, keep_freed_memory
from qin.metrics import log_loss, roc_auc
from qin.model import compile_model, count_parameters
from qin.models import build_model as build_network
from qin.watch import RunWatch


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """Ctrl-C or a termination signal: a checkpoint was saved, the run can be resumed."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum  # the exit status is 128 + signum, as the shell reports a signal


class StoppedAtOnce(StoppedBySignal):
    """A second stop signal while the first waits for the step in progress (a slow step: fp16 on a
    CPU, a huge batch): stop now, without saving."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name} again: stopped at once, without saving the step "
                         f"in progress", signum)


@dataclasses.dataclass
class TrainerState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batches_done: int = 0  # batches of the unfinished epoch `epoch` already trained
    loss_sum: float = 0.0  # running sums over those batches, for the epoch's mean loss
    loss_count: int = 0
    lr: float = 0.0
    best_auc: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # consecutive epochs without valid-AUC gain
    finished: bool = False
    skipped_steps: int = 0  # fp16 steps the gradient scaler skipped for an overflow (counted in `step`)
    history: list = dataclasses.field(default_factory=list)  # one metrics record per epoch


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """The device `name` names (auto: a CUDA GPU if there is one); `setting` is how the user gave it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting} must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name} but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{setting}={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{setting}={name}: only cpu and cuda devices are supported")
    return device


MIN_AUC_GAIN = 1e-6  # the smallest valid-AUC rise that counts as a gain (early stop, lr decay)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SLOW_MATMUL = 4.0  # a 16-bit matrix product this many times slower than fp32's gets a warning


def _autocast_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether autocast on this device and torch really computes a matrix product in `dtype`."""
    try:
        with torch.autocast(device.type, dtype=dtype):
            out = F.linear(torch.ones(2, 2, device=device), torch.ones(2, 2, device=device))
        return out.dtype == dtype
    except (RuntimeError, ValueError):
        return False


def matmul_slowdown(device: torch.device, precision: str) -> float | None:
    """How many times slower a matrix product runs in `precision` than in fp32 on this CPU, from
    a probe of a few ms; None on other devices and for fp32.

    Many CPUs have no 16-bit matrix instructions for one of the two formats, and torch then runs
    a scalar loop: on our 2-core test machine (AVX512-BF16, no FP16) a (1024, 1024) x (1024, 4096)
    product takes 14 s in fp16 against 46 ms in fp32 (21 ms in bf16)."""
    if device.type != "cpu" or precision not in AUTOCAST_DTYPES:
        return None
    square = torch.randn(128, 128)

    def fastest(dtype: torch.dtype) -> float:
        x = square.to(dtype)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    return fastest(AUTOCAST_DTYPES[precision]) / max(fastest(torch.float32), 1e-9)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16; every CPU with AMX has them too),
    as torch's own dispatch sees it. False where torch cannot say (its check is private API)."""
    check = getattr(getattr(torch, "cpu", None), "_is_avx512_bf16_supported", None)
    try:
        return bool(check()) if check else False
    except Exception:  # a torch whose private check changed: say no rather than fail a run
        return False


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bf16 (Ampere, compute capability 8.0, and later). Not
    torch.cuda.is_bf16_supported(): by default it also says yes where bf16 is only emulated
    (a T4, a V100: far slower than fp16), and asks about the current device, not this one."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(name: str, device: torch.device, setting: str = "train.precision") -> str:
    """train.precision as run: 'auto' is bf16 on a CUDA device that has it, fp32 elsewhere.

    The CPU stays fp32 under 'auto', even one with bf16 instructions where bf16 trains 1.5-2.5x
    faster: the built-in run stops at 4 epochs, while the AUC still climbs, and there bf16's gap
    to fp32 is known only to about +-0.009 (twelve seeds: -0.004, standard error 0.0045; trained
    to the plateau, +0.0001 (0.0014)). `precision_hint` tells such a CPU's user.
    """
    if name == "auto":
        return "bf16" if device.type == "cuda" and cuda_has_bf16(device) else "fp32"
    if name == "fp32":
        return name
    if name == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        raise ConfigError(f"{setting}=bf16: {torch.cuda.get_device_name(device)} has no bf16; "
                          f"use {setting}=fp16 or fp32")
    if not _autocast_works(device, AUTOCAST_DTYPES[name]):
        raise ConfigError(f"{setting}={name}: autocast to {AUTOCAST_DTYPES[name]} does not work on "
                          f"{device.type} with torch {torch.__version__}; use {setting}=fp32")
    return name


def precision_hint(requested: str, device: torch.device) -> str | None:
    """A line for the run's log where 'auto' chose fp32 on a CPU on which bf16 would pay."""
    if requested != "auto" or device.type != "cpu" or not cpu_has_bf16():
        return None
    return ("train.precision=auto keeps fp32 on a CPU; this one has bf16 instructions, so "
            "train.precision=bf16 should train faster here: a default step ran 1.5x-2.5x faster in bf16 "
            "on the CPUs measured (README, 'Mixed precision')")


def peak_memory_mb(device: torch.device) -> float | None:
    """The most memory this run has held so far, in MiB: on a GPU what PyTorch has allocated there,
    on the CPU the process's largest resident set; None where the system does not say."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def autocast(device: torch.device, precision: str):
    """The context the model's forward runs in: nothing for fp32, autocast to bf16/fp16 otherwise."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def fill_vocab_from_data(cfg: RunConfig, dataset: Dataset) -> None:
    """The model's features are the dataset's, with the vocabulary sizes the data gave or declared."""
    from qin.features import to_dicts

    cfg.model.num_items = dataset.item_info.num_items
    cfg.model.features = to_dicts(dataset.features)


def build_model(cfg: RunConfig, dataset: Dataset, device: torch.device) -> torch.nn.Module:
    model = build_network(cfg.model)
    model.load_item_info(dataset.item_info.columns)
    return model.to(device)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel (one pass over each parameter instead of a dozen elementwise
    ops): on the CPU the paper's optimizer step over 31M parameters otherwise costs as much as
    the model's own forward."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict(model, split: Split, batch_size: int, device: torch.device,
            ctx: distributed.Context | None = None, precision: str = "fp32") -> np.ndarray:
    """Click probabilities for every row of `split`, in row order, the forward in `precision`.

    Under torch.distributed each rank scores a contiguous share of the rows and the shares are
    gathered, so every rank returns the whole split's predictions.
    """
    ctx = ctx or distributed.Context()
    if ctx.distributed:
        n = len(split)
        lo, hi = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
        share = predict(model, split.rows(lo, hi), batch_size, device, precision=precision)
        return distributed.gather_rows(ctx, share)
    was_training = model.training
    model.eval()
    out = []
    for batch in iterate_batches(split, batch_size, shuffle=False):
        with autocast(device, precision):
            logits = model(_to_device(batch, device))
        out.append(torch.sigmoid(logits.float()).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def evaluate(model, split: Split, batch_size: int, device: torch.device,
             ctx: distributed.Context | None = None, precision: str = "fp32") -> dict:
    if split.label is None:
        raise ValueError(f"split '{split.name}' has no label column: it cannot be evaluated")
    probs = predict(model, split, batch_size, device, ctx, precision)
    return {"auc": roc_auc(split.label, probs), "logloss": log_loss(split.label, probs)}


def loss_fn(model, batch: dict, embedding_l2: float, global_rows: int | None = None,
            world_size: int = 1, precision: str = "fp32") -> torch.Tensor:
    """Mean BCE + embedding L2. Under DDP (global_rows given) this rank's BCE is scaled so that
    DDP's average of the ranks' gradients is the gradient of the global batch's mean.

    Only the model's forward runs under autocast (`precision`); the loss and the L2 term are
    computed in fp32 from the fp32 weights.
    """
    with autocast(batch["label"].device, precision):
        logits = model(batch)
    if global_rows is None:
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch["label"])
    else:
        loss = distributed.local_loss(logits, batch["label"], global_rows, world_size)
    if embedding_l2:
        loss = loss + embedding_l2 / 2.0 * distributed.unwrapped(model).embedding_l2()
    return loss


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def epoch_batches(rows: int, batch_size: int, world_size: int = 1) -> tuple[int, int]:
    """(batches an epoch trains, rows it leaves out). BatchNorm cannot train on one sample, and
    under DDP a rank with no rows of the last batch cannot run the model: a last batch of one row,
    or of fewer rows than processes, is left out (the order is shuffled each epoch, so they are
    other rows each time)."""
    full, rest = divmod(rows, batch_size)
    left_out = rest if rest == 1 or rest < world_size else 0
    return full + (rest > left_out), left_out


# Ctrl-C, and what `kill`, `timeout`, Slurm, Kubernetes and `docker stop` send to stop a job.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _say(text: str) -> None:
    """Write to stderr from a signal handler: straight to the file descriptor, because the handler
    may run inside a write to sys.stderr's buffer (tqdm's, blocked on a full pipe), where a print
    raises "reentrant call"."""
    try:
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a stream without one (pytest's capture)
            if sys.stderr is not None:
                print(text, end="", file=sys.stderr)
            return
        os.write(fd, text.encode())
    except OSError:  # stderr gone (a closed pipe): the stop itself must not be lost
        pass


@contextmanager
def _catch_stop_signals(then: str = "saving latest.pt after this step"):
    """Turn a stop signal into a flag the loop checks between steps, so a checkpoint can be written;
    `then` is what the user is told happens next."""
    flag = {"set": False, "signum": signal.SIGINT}

    def handler(signum, frame):
        if flag.get("closing"):  # the run is ending already, its checkpoint saved or not: nothing to stop
            return
        first, ctx = not flag["set"], distributed.context_from_env()
        if not first and not ctx.distributed:  # asked twice: the user will not wait for the step
            raise StoppedAtOnce(signum)
        flag["set"], flag["signum"] = True, signum
        if first and ctx.is_main:  # under torchrun every rank gets it
            again = "" if ctx.distributed else " (again to stop at once, without saving)"
            _say(f"\nreceived {signal.Signals(signum).name}: {then}{again}\n")

    previous = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: leave signals alone
        for signum, old in previous.items():
            signal.signal(signum, old)
        yield flag
        return
    try:
        yield flag
    finally:
        flag["closing"] = True  # a signal now cannot leave the handlers half restored
        # Under torchrun, a rank that stopped exits now; the first to exit has torchrun SIGTERM the
        # rest, which killed rank 0 before it said how to resume. So it ignores stop signals until
        # it exits (torchrun kills it 30 s later if it hangs).
        keep_out = flag["set"] and distributed.context_from_env().distributed
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_IGN if keep_out else old)


def _run_facts(cfg: RunConfig, dataset: Dataset) -> dict:
    """What every rank of a run must have alike: the settings (but for the folders, which may be
    mounted at other paths) and the data's sizes and a checksum of its ids and labels."""
    settings = cfg.to_dict()
    settings["data"].pop("dir", None)
    settings["train"].pop("out_dir", None)
    facts = {"items": dataset.item_info.num_items}
    for name, split in dataset.splits.items():
        facts[f"{name}.parquet rows"] = len(split)
        facts[f"{name}.parquet ids"] = int(split.item_id.sum()) + int(split.item_seq.sum(dtype=np.int64))
        if split.label is not None:
            facts[f"{name}.parquet clicks"] = int(split.label.sum())
    for section, values in settings.items():
        for key, value in values.items():
            facts[f"{section}.{key}"] = value
    return facts


class Trainer:
    """Single-process training, or DistributedDataParallel when launched by torchrun.

    Under DDP every rank runs this same loop on its share of each global batch; only rank 0
    logs and writes files, and every decision (LR, early stop) is taken from gathered, identical
    numbers, so the ranks never disagree.
    """

    def __init__(self, cfg: RunConfig, dataset: Dataset, out_dir: str | Path, log=print, lr_given: bool = False,
                 on_stop: str = "saving latest.pt after this step"):
        """`lr_given`: train.lr was set for this run (an override), so a resume takes it even where
        it equals the configured rate, which the run may have decayed from. `on_stop`: what a stop
        signal is answered with (a caller whose run folder is scratch says so)."""
        self.cfg, self.dataset, self.out_dir, self.lr_given = cfg, dataset, Path(out_dir), lr_given
        self.on_stop = on_stop
        self.ctx = distributed.context_from_env()
        self.log = log if self.ctx.is_main else (lambda *_: None)
        if cfg.train.batch_size % self.ctx.world_size:  # each rank takes an equal share of a batch
            raise distributed.shared(ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of "
                                                 f"the {self.ctx.world_size} processes"))
        self.device = distributed.setup(self.ctx, resolve_device(cfg.train.device))
        different = distributed.first_difference(self.ctx, _run_facts(cfg, dataset)) if self.ctx.distributed else None
        if different:  # each rank would train on other rows, or wait for steps the others never take
            raise distributed.shared(ConfigError(f"the processes disagree on {different}: every machine must "
                                                 f"read the same data and settings"))
        if self.device.type == "cpu":
            keep_freed_memory()  # a CPU step would otherwise fault in fresh pages for every large tensor
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, dataset, self.device)
        self.item_info_fingerprint = item_info_fingerprint(dataset.item_info)
        self.forward_model = self.model
        if self.ctx.distributed:
            distributed.convert_batchnorm(self.model)
            self.forward_model = distributed.wrap(self.model, self.device)
            # Dropout must differ between ranks (the model itself is identical: same seed above).
            torch.manual_seed(cfg.train.seed + 1_000_003 * self.ctx.rank)
        if cfg.train.cuda_graphs:
            if self.device.type != "cuda" or self.ctx.distributed:
                where = f"{self.device} with {self.ctx.world_size} processes" if self.ctx.distributed else self.device
                raise distributed.shared(ConfigError(
                    f"train.cuda_graphs=true needs one process on a CUDA device; this run is on {where} "
                    "(train.compile=true compiles without graphs)"))
            cfg.train.compile = True  # written back: config.yaml says what ran
        if cfg.train.compile:
            # The compiled model's backend="auto" follows decisions timed before on this GPU (the
            # file of kernels.choice): it cannot time inside a graph, and runs torch elsewhere.
            known = kernels_choice.preload(self.device)
            if known:
                self.log(f"backend='auto' under torch.compile: {known} decisions timed before on this device")
            self.forward_model = compile_model(self.forward_model, cuda_graphs=cfg.train.cuda_graphs)
            if self.device.type == "cpu":
                self.log("train.compile=true on the CPU: the compiled step ran slower than eager in our CPU "
                         "benchmarks (bench/results/README.md, 'Mixed precision': bf16 on two hosts; fp32 0.96x in "
                         "cpu-train-step-2026-11-30); train.compile=false may train faster")
        self._compiling = cfg.train.compile  # until the first step has run (and compiled)
        self.optimizer = make_optimizer(self.model, cfg.train.lr)
        # Resolved once and written back, so config.yaml names what ran ('auto' would resolve
        # anew on another machine) and --resume continues in it.
        hint = precision_hint(cfg.train.precision, self.device)
        cfg.train.precision = resolve_precision(cfg.train.precision, self.device)
        if hint:
            self.log(hint)
        slowdown = matmul_slowdown(self.device, cfg.train.precision)
        if slowdown is not None and slowdown > SLOW_MATMUL:
            self.log(f"warning: train.precision={cfg.train.precision}: a matrix product runs {slowdown:.0f}x "
                     f"slower in {cfg.train.precision} than in fp32 on this CPU (torch has no fast "
                     f"{cfg.train.precision} kernels for it): this run will be far slower than in fp32"
                     + (" or bf16" if cfg.train.precision == "fp16" else ""))
        # fp16 gradients underflow without a loss scale; bf16 has fp32's range and needs none.
        # A disabled scaler passes everything through, so one code path serves every precision.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.state = TrainerState(lr=cfg.train.lr)
        self.watch = RunWatch(self.out_dir, cfg.train.log_every_steps, enabled=self.ctx.is_main)

    # -- checkpoints -------------------------------------------------------------------------
    def _payload(self, model_only: bool = False) -> dict:
        payload = {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "trainer": dataclasses.asdict(self.state),
            "num_parameters": count_parameters(self.model),
            "item_info": self.item_info_fingerprint,  # scoring warns when its item table is another
        }
        if not model_only:
            payload["optimizer"] = self.optimizer.state_dict()
            payload["scaler"] = self.scaler.state_dict()  # {} unless fp16: the loss scale and its counters
            payload["watch"] = self.watch.window()  # the logged point the checkpoint's last steps are part of
            # Every rank's RNG state, so that a resumed DDP run draws what the uninterrupted one would.
            payload["rng"] = distributed.all_gather_objects(self.ctx, _rng_state(self.device))
        return payload

    def save(self, name: str, model_only: bool = False) -> None:
        """Called on every rank (the RNG states are gathered); only rank 0 writes."""
        payload = self._payload(model_only)

        def write():
            self.watch.flush()  # the events hold every step the checkpoint covers
            save_checkpoint(self.out_dir / name, payload)

        def why(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return (f"could not write {self.out_dir / name} ({first}; is the disk full?): training stopped; an "
                    f"earlier {name} there is kept")

        # torch.save reports a short write as a RuntimeError
        self._on_rank0(write, errors=(OSError, RuntimeError), why=why)

    def _on_rank0(self, write, errors=(OSError,), why=str) -> None:
        """Call `write` on rank 0 alone, every rank waiting for the outcome: a failure (a full disk,
        a folder made read-only) stops every rank, with rank 0's message printed once. Raised on
        rank 0 alone, it left the other ranks to fail in their next collective with a dead peer's
        70-line gloo traceback, or over NCCL to wait out its 30-minute timeout."""
        error = None
        if self.ctx.is_main:
            try:
                write()
            except errors as exc:
                if not self.ctx.distributed:
                    raise TrainingError(why(exc)) from exc
                error = why(exc)
        error = distributed.rank0_error(self.ctx, error)
        if error:
            raise distributed.shared(TrainingError(error))

    def _write_metrics(self) -> None:
        """metrics.jsonl, rewritten whole from the state, so it always agrees with latest.pt (every rank
        calls this; rank 0 writes)."""
        self._on_rank0(self._write_metrics_file)

    def _write_metrics_file(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.state.history)
        atomic_write(self.out_dir / "metrics.jsonl", lambda fh: fh.write(lines.encode()))

    def _repair_after_resume(self) -> None:
        """What a stop between the writes at an epoch's end left behind: metrics.jsonl short of
        latest.pt's epochs, and best.pt without the best epoch when that is the epoch latest.pt
        ended (then the restored model is that epoch's). On rank 0 only (see _on_rank0)."""
        self._write_metrics_file()
        st = self.state
        if st.best_epoch and st.best_epoch == st.epoch and not st.batches_done:
            best = self.out_dir / "best.pt"
            try:
                saved = load_checkpoint(best, map_location="cpu")["trainer"]["epoch"] if best.exists() else None
            except CheckpointError:
                saved = None
            if saved != st.best_epoch:
                save_checkpoint(best, self._payload(model_only=True))
                self.log(f"wrote {best} again from latest.pt: the run stopped before it held epoch "
                         f"{st.best_epoch}, the best")

    def restore(self, path: Path) -> None:
        # Read onto the CPU whatever the run's device: the saved RNG states must stay there
        # (torch.set_rng_state refuses a CUDA tensor), and load_state_dict moves the rest.
        payload = load_checkpoint(path, map_location="cpu")
        check_model_config(payload, self.cfg.to_dict()["model"], str(path))
        load_weights(self.model, payload, path)
        warn_if_another_item_table(payload.get("item_info"), self.dataset, str(path))
        try:
            self.optimizer.load_state_dict(payload["optimizer"])
        except ValueError as exc:  # a model with parameters its run never had: a DIN run from before P
            raise CheckpointError(f"{path}: its optimizer state does not fit this model's parameters ({exc}); "
                                  f"it still evaluates and predicts, but cannot be resumed: start a new run") from None
        saved_precision = payload["config"]["train"].get("precision", "fp32")
        if saved_precision != self.cfg.train.precision:
            self.log(f"{path} was trained in {saved_precision}; this run continues in {self.cfg.train.precision}")
        if payload.get("scaler") and self.scaler.is_enabled():  # else a fresh scale (e.g. bf16 -> fp16)
            self.scaler.load_state_dict(payload["scaler"])
        self.state = TrainerState(**payload["trainer"])
        self._resumed_window = payload.get("watch")  # absent from checkpoints before 2026-12-02
        saved_train = payload["config"]["train"]
        if self.state.batches_done:
            # The rows the epoch's first batches_done batches held follow from these two: changed
            # now, the rest of the epoch would repeat some rows and never reach others.
            for name in ("batch_size", "seed"):
                if saved_train.get(name) != getattr(self.cfg.train, name):
                    raise ConfigError(
                        f"train.{name}={getattr(self.cfg.train, name)}: {path} stopped in the middle of epoch "
                        f"{self.state.epoch + 1}, trained with train.{name}={saved_train.get(name)}; changing it "
                        f"now would repeat some of the epoch's rows and skip others (resume without it; a "
                        f"checkpoint written at an epoch's end takes it)")
        # An override of train.patience decides afresh whether early stopping has ended the run.
        self.state.finished = self.state.bad_epochs >= self.cfg.train.patience
        if self.lr_given or saved_train.get("lr") != self.cfg.train.lr:  # an override: the rate from here on
            self.log(f"train.lr={self.cfg.train.lr:g}: the learning rate goes from {self.state.lr:g} to "
                     f"{self.cfg.train.lr:g} from here on")
            self.state.lr = self.cfg.train.lr
        for group in self.optimizer.param_groups:
            group["lr"] = self.state.lr
        states = payload["rng"] if isinstance(payload["rng"], list) else [payload["rng"]]
        if len(states) == self.ctx.world_size:
            _set_rng_state(states[self.ctx.rank], self.device)
        else:  # resumed with another number of processes: the data order is kept, dropout draws are not
            self.log(f"{path} was written by {len(states)} process(es), this run has {self.ctx.world_size}: "
                     f"the data order resumes exactly, dropout draws restart from the seed")

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainerState:
        cfg, tc = self.cfg, self.cfg.train
        train, valid = self.dataset.splits["train"], self.dataset.splits["valid"]
        batches_per_epoch, left_out = epoch_batches(len(train), tc.batch_size, self.ctx.world_size)
        if not batches_per_epoch:
            raise ConfigError(f"{self.dataset.root / 'train.parquet'} has {len(train)} row(s): too few to train "
                              f"(BatchNorm needs 2 rows, and each of the {self.ctx.world_size} process(es) one)")
        require_both_classes(valid, "valid.parquet", cfg.data.label)
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        # One process trains in a folder at a time (DDP: rank 0 holds it for all, and every rank
        # stops if it cannot).
        with ExitStack() as held:
            refused = None
            if self.ctx.is_main:
                try:
                    held.enter_context(run_lock(self.out_dir))
                except CheckpointError as exc:
                    refused = str(exc)
            refused = distributed.rank0_error(self.ctx, refused)
            if refused:
                raise distributed.shared(CheckpointError(refused))
            return self._fit(resume, train, valid, batches_per_epoch, left_out)

    def _fit(self, resume: bool, train: Split, valid: Split, batches_per_epoch: int, left_out: int) -> TrainerState:
        cfg, tc = self.cfg, self.cfg.train
        if resume:
            if self.ctx.is_main:
                for path in remove_stale_temporaries(self.out_dir):
                    self.log(f"removed {path.name}, a partial write left by the interrupted run")
            self.restore(self.out_dir / "latest.pt")
            self._on_rank0(self._repair_after_resume)
            if self.state.finished or self.state.epoch >= tc.epochs:
                why = "early stopping ended it" if self.state.finished else f"train.epochs={tc.epochs}"
                self.log(f"{self.out_dir / 'latest.pt'}: the run is over after {self.state.epoch} epochs ({why}); "
                         f"a larger train.epochs or train.patience continues it")
            else:
                self.log(f"resumed from {self.out_dir / 'latest.pt'} at epoch {self.state.epoch + 1}, "
                         f"step {self.state.step}")
        # A resume's overrides too: the next --resume reads them from here.
        self._on_rank0(lambda: atomic_write(self.out_dir / "config.yaml",
                                            lambda fh: fh.write(yaml.safe_dump(cfg.to_dict()).encode())))
        where = f"{self.ctx.world_size} processes ({self.device.type})" if self.ctx.distributed else str(self.device)
        self.log(f"{type(self.model).__name__}: {count_parameters(self.model):,} parameters on {where}, "
                 f"precision {tc.precision}; "
                 f"train {len(train):,} rows, valid {len(valid):,} rows")
        self.log("settings: " + json.dumps(cfg.to_dict(), sort_keys=True))
        if left_out:
            why = "one row" if left_out == 1 else f"fewer rows than the {self.ctx.world_size} processes"
            self.log(f"train has {len(train):,} rows, {left_out} more than a multiple of train.batch_size "
                     f"{tc.batch_size}: each epoch leaves out that last batch ({why})")

        if tc.max_steps_per_epoch:
            batches_per_epoch = min(batches_per_epoch, tc.max_steps_per_epoch)
        self.model.train()
        # Events past the checkpoint that an error leaves unwritten are repeated by the resumed run.
        if not self.state.finished and self.state.epoch < tc.epochs:  # a run that is over writes no events
            self.watch.open(resumed_at=(self.state.step, self.state.epoch) if resume else None,
                            window=self._resumed_window if resume else None)
        try:
            with _catch_stop_signals(self.on_stop) as interrupted:
                while not self.state.finished and self.state.epoch < tc.epochs:
                    self._train_epoch(train, batches_per_epoch, interrupted)
                    self._end_epoch(valid)
                    # A stop that arrived during validation: the epoch's checkpoint is written, so
                    # stop here rather than train a step of the next epoch first.
                    stop = self._any_rank_stopped(interrupted)
                    if stop and not self.state.finished and self.state.epoch < tc.epochs:
                        interrupted["set"] = True  # a stop another rank caught is this rank's too
                        raise TrainingInterrupted(
                            f"interrupted after epoch {self.state.epoch}, step {self.state.step}; checkpoint saved "
                            f"to {self.out_dir / 'latest.pt'}; continue with: qin train --resume {self.out_dir}",
                            interrupted["signum"])
        except StoppedAtOnce as exc:
            if (self.out_dir / "latest.pt").exists():
                exc.args = (f"{exc}; continue from the last checkpoint saved with: qin train --resume {self.out_dir}",)
            raise
        finally:
            self.watch.close()
        return self.state

    def _any_rank_stopped(self, interrupted: dict) -> bool:
        """Whether a stop signal reached this process (under DDP: any rank; every rank calls this)."""
        if not self.ctx.distributed:
            return interrupted["set"]
        flag = torch.tensor([float(interrupted["set"])], device=self.device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item())

    def _train_epoch(self, train: Split, batches_per_epoch: int, interrupted: dict) -> None:
        tc, st, ctx = self.cfg.train, self.state, self.ctx
        batches = iterate_batches(train, tc.batch_size, shuffle=True, seed=tc.seed, epoch=st.epoch,
                                  rank=ctx.rank, world_size=ctx.world_size)
        bar = tqdm(total=batches_per_epoch, initial=st.batches_done, desc=f"epoch {st.epoch + 1}",
                   unit="batch", leave=False, dynamic_ncols=True, disable=None if ctx.is_main else True)
        self._clock = [time.perf_counter(), 0]  # start, samples since: the epoch's samples/s
        self._unmeasured_why = "resumed at the epoch's last batch"  # should no step count towards it
        # One process in fp32 or bf16: a step's loss and gradient norm stay on the device until
        # the next report (every log_every_steps steps, before a checkpoint, at the epoch's end), so
        # the host never waits for the device mid-epoch and the next batch is assembled while the
        # device still works. Under DDP (the ranks agree on every step) and fp16 (the scaler's
        # verdict needs the scale) each step is checked on the host as it ends.
        lazy = not ctx.distributed and not self.scaler.is_enabled()
        self._stop_agreed = False  # under DDP: whether the ranks agreed, at the last step, to stop
        pending: list[tuple] = []  # (step, rows, (loss, grad_norm)) not yet reported
        for index, batch in enumerate(batches):
            if index >= batches_per_epoch:
                break
            if index < st.batches_done:  # resumed mid-epoch: the same order, skip what was done
                continue
            batch = _to_device(batch, self.device)
            if tc.cuda_graphs:  # a new step: the graphs may overwrite the last step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            global_rows = min(tc.batch_size, len(train) - index * tc.batch_size)
            rows = (global_rows, ctx.world_size) if ctx.distributed else (None, 1)
            loss = loss_fn(self.forward_model, batch, tc.embedding_l2, *rows, tc.precision)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            st.step += 1
            st.batches_done += 1
            step = self._deferred_step if lazy else self._checked_step
            pending.append(step(loss, grad_norm, global_rows, interrupted))
            if self.device.type == "cpu":
                bound_kept_memory()
            checkpoint = bool(tc.checkpoint_every_steps and st.step % tc.checkpoint_every_steps == 0)
            if not lazy or st.step % tc.log_every_steps == 0 or checkpoint or interrupted["set"] or self._compiling:
                self._report(pending, bar)
            bar.update(1)
            if self._compiling:  # report compilation once and keep it out of samples/s
                self._compiling = False
                self.log(f"torch.compile: the first step took {time.perf_counter() - self._clock[0]:.1f} s, "
                         f"compilation included")
                self._clock = [time.perf_counter(), 0]
                self._unmeasured_why = "only the compiling step ran"
                self.watch.restart_window_clock()  # the TensorBoard samples/s leaves it out too
            if checkpoint:
                self.save("latest.pt")
            if self._stop_agreed if ctx.distributed else interrupted["set"]:
                bar.close()
                self.save("latest.pt")
                interrupted["set"] = True  # a stop another rank caught is this rank's too
                raise TrainingInterrupted(
                    f"interrupted at epoch {st.epoch + 1}, step {st.step}; checkpoint saved to "
                    f"{self.out_dir / 'latest.pt'}; continue with: qin train --resume {self.out_dir}",
                    interrupted["signum"])
        self._report(pending, bar)
        bar.close()
        self._epoch_seconds = time.perf_counter() - self._clock[0]
        self._epoch_samples = self._clock[1]

    def _deferred_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, global_rows: int,
                       interrupted: dict) -> tuple:
        """The optimizer step without the host looking: a step whose loss or gradient is not finite
        is skipped on the device (fused Adam's found_inf, as GradScaler passes it), and _report
        raises for it when its numbers arrive."""
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.step()
        del self.optimizer.found_inf
        return self.state.step, global_rows, torch.stack([loss.detach().float(), grad_norm.float()])

    def _checked_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, global_rows: int,
                      interrupted: dict) -> tuple:
        """The optimizer step after the host has seen the loss and gradient norm (DDP, fp16)."""
        st = self.state
        loss_value = loss.item()
        if self.ctx.distributed:
            # One small all_reduce gives every rank the global loss and whether any rank got
            # Ctrl-C, so all of them stop (or save) at the same step.
            shared = torch.tensor([loss_value, float(interrupted["set"])], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(shared)
            # The loop stops on this verdict, not on the live flag: a Ctrl-C arriving after the
            # all_reduce would otherwise send one rank into save()'s collectives while the others
            # start the next step, and the job would hang. The next step's all_reduce carries it.
            loss_value, self._stop_agreed = shared[0].item() / self.ctx.world_size, bool(shared[1].item())
        # Under fp16 an overflowing gradient is the scaler's business: it skips the step and
        # halves the scale. Only once the scale is below 1 is the overflow the model's own.
        grad_norm_value = float(grad_norm)
        overflow = not math.isfinite(grad_norm_value)
        skipped = overflow and self.scaler.is_enabled() and self.scaler.get_scale() >= 1.0
        if not math.isfinite(loss_value) or (overflow and not skipped):
            self._non_finite(st.step, "loss" if not math.isfinite(loss_value) else "gradient norm")
        self.scaler.step(self.optimizer)  # the optimizer's step, unless skipped for an overflow
        self.scaler.update()
        st.skipped_steps += int(skipped)
        return st.step, global_rows, (loss_value, grad_norm_value)

    def _report(self, pending: list[tuple], bar) -> None:
        """Bring the pending steps' numbers to the host (one transfer), check them, and log them."""
        if not pending:
            return
        st = self.state
        numbers = [pair for _, _, pair in pending]
        if torch.is_tensor(numbers[0]):  # the lazy steps' device tensors: one copy for all of them
            numbers = torch.stack(numbers).tolist()
        for (step, rows, _), (loss_value, grad_norm_value) in zip(pending, numbers):
            if not math.isfinite(loss_value) or not math.isfinite(grad_norm_value) and not self.scaler.is_enabled():
                self._non_finite(step, "loss" if not math.isfinite(loss_value) else "gradient norm")
            st.loss_sum += loss_value
            st.loss_count += 1
            self._clock[1] += rows
            self.watch.after_step(step, loss_value, grad_norm_value, st.lr, rows)
        pending.clear()
        bar.set_postfix(loss=f"{loss_value:.4f}",
                        samples_s=f"{self._clock[1] / (time.perf_counter() - self._clock[0]):,.0f}")

    def _non_finite(self, step: int, what: str) -> None:
        # In fp16 the forward itself can overflow, which no loss scale prevents. The built-in run
        # did, in the last QNN layer's y = x * s, until that product stayed fp32 under fp16
        # (kernels.reference.product_dtype); every GEMM output is still rounded to fp16.
        fp16 = ""
        if self.cfg.train.precision == "fp16" and what == "loss":
            fp16 = ("; in fp16 the forward can pass fp16's largest value (65,504), which no loss scale "
                    "prevents. train.precision=bf16 has fp32's range")
        elif self.cfg.train.precision == "fp16":
            fp16 = (f"; in fp16 the gradient scaler skipped {self.state.skipped_steps} overflowing step(s) so far "
                    f"and lowered the loss scale below 1 (now {self.scaler.get_scale():g}): the gradient "
                    f"overflows at any scale. train.precision=bf16 has fp32's range")
        kept = (f"the last good checkpoint in {self.out_dir} is kept" if (self.out_dir / "latest.pt").exists()
                else "no checkpoint had been written yet")
        # Under DDP every rank sees the same global loss and gradient: all stop here, rank 0 prints.
        raise distributed.shared(TrainingError(f"non-finite {what} at epoch {self.state.epoch + 1}, step {step}: "
                                               f"training stopped; {kept}{fp16}"))

    def _end_epoch(self, valid: Split) -> None:
        tc, st = self.cfg.train, self.state
        # Validated in fp32 whatever the training precision, like `qin evaluate` by default: the
        # AUC measures the weights (fp32 masters), and runs in different precisions compare.
        metrics = evaluate(self.model, valid, tc.eval_batch_size, self.device, self.ctx)
        # A gain counts from 1e-6 up, as in the authors' checkpoint_and_earlystop (min_delta).
        improved = metrics["auc"] >= st.best_auc + MIN_AUC_GAIN
        epoch_loss = st.loss_sum / max(st.loss_count, 1)
        st.epoch += 1
        st.batches_done, st.loss_sum, st.loss_count = 0, 0.0, 0
        if improved:
            st.best_auc, st.best_epoch, st.bad_epochs = metrics["auc"], st.epoch, 0
        else:
            st.bad_epochs += 1
            st.lr = max(st.lr * tc.lr_decay, tc.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = st.lr
        if st.bad_epochs >= tc.patience:
            st.finished = True
        record = {
            "epoch": st.epoch, "step": st.step, "train_loss": epoch_loss,
            "valid_auc": metrics["auc"], "valid_logloss": metrics["logloss"], "lr": st.lr,
            # None when no step of the epoch counted (resumed at its last batch; only the compiling step ran).
            "samples_per_s": self._epoch_samples / max(self._epoch_seconds, 1e-9) if self._epoch_samples else None,
            "epoch_seconds": self._epoch_seconds, "best": improved, "skipped_steps": st.skipped_steps,
            "precision": tc.precision,  # a resume may change it: each epoch says what it trained in
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        st.history.append(record)
        self.watch.after_epoch(record)
        # latest.pt first: stopped between the two writes, a resume finds the best epoch in it and
        # writes best.pt again (_repair_after_resume); the other way round, best.pt could hold an
        # epoch the resumed run trains again differently, that no record describes.
        self.save("latest.pt")
        if improved:
            self.save("best.pt", model_only=True)
        self._write_metrics()
        self.watch.end_epoch()
        self.log(
            f"epoch {st.epoch}: train loss {epoch_loss:.4f}, valid AUC {metrics['auc']:.4f}, "
            f"logloss {metrics['logloss']:.4f}, "
            + (f"{record['samples_per_s']:,.0f} samples/s" if record["samples_per_s"] is not None
               else f"samples/s not measured ({self._unmeasured_why})")
            + (f", peak memory {record['peak_memory_mb']:,.0f} MB" if record["peak_memory_mb"] is not None else "")
            + ("  (best)" if improved else f"  (no gain; lr -> {st.lr:g})")
            + ("; early stop" if st.finished else "")
        )

"""One optimizer step of QIN, end to end: samples/s, peak memory and bytes saved for backward
per variant, in fp32 and in bf16 (train.precision=bf16: autocast over the forward), and on a GPU
the default in fp16 too (with the trainer's gradient scaler).

Variants switch the fused parts on one at a time, starting from the literal eager model
(SPEC.md's form, as the authors wrote it). Batches are drawn like the real data (91,718 items,
histories of median length about 6 out of 64, left-padded) and made outside the timed region.
Each variant is timed on its own, after the one before it (median of 8 steps after a warm-up, 3
with --quick):
on a shared machine, ratios between rows are only as steady as its load. Each row is kept (and
appended to --csv) as it is measured: a run stopped by SIGTERM (bench/gpu_run.sh's time box)
keeps every variant finished before it.

    python -m bench.bench_train --device cuda [--batch 8192] [--csv out.csv]
"""
from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch

from bench.report import BF16_OP, BF16_SLOWDOWN, timed_section
from bench.common import (STOPPED, device_argument, diagnosed, host_ms, host_rows, keep, make_row, peak_memory_mb,
                          print_table, stop_on_sigterm, time_ms)
from qin.config import QINConfig
from qin.host_memory import bound_kept_memory, keep_freed_memory
from qin.cli import positive_int
from qin.model import QIN, compile_model, make_graph_safe
from qin.train import SLOW_MATMUL, loss_fn, make_optimizer, matmul_slowdown

AUTHORS_SAMPLES_PER_S = 21_000  # SPEC.md: 2.8 min an epoch of 3.6M rows on an RTX 4090
AUTHORS_DEVICE = "RTX 4090 (authors' log)"

EAGER = dict(asta_kernel="torch", qnn_kernel="torch")
LITERAL = dict(asta_form="literal", dedup_items=False, **EAGER)
DEDUP = dict(asta_form="hoisted", dedup_items=True)
BF16, FP16 = torch.bfloat16, torch.float16
# A variant's "compiled" field beyond True/False: compile_model(cuda_graphs=True); or eager with
# the model made graph-safe (qin.model.make_graph_safe), which waits for the device nowhere.
CUDA_GRAPHS, GRAPH_SAFE = "cuda graphs", "graph-safe eager"
# ... or eager with the QNN's torch path in one form, whichever auto timed faster
# (qnn_torch_form): plain autograd through the reference, or its autograd Function.
QNN_AUTOGRAD, QNN_FUNCTION = "qnn through autograd", "qnn through its Function"
# ... or the graph-safe eager step, forward to optimizer, captured once as one CUDA graph and
# replayed (whole_step_graph): no compile.
WHOLE_STEP_GRAPH = "whole-step graph"
# (name, config overrides, torch.compile the model (or the two above), autocast dtype or None). The
# stock recipes a user has without us (the literal model, eager or compiled, fp32 or under
# autocast bf16) sit beside ours, so every ratio is against the strongest torch-only alternative
# of the same run. The compiled ones come last: they take longest to start, and a time-boxed run
# keeps the rest.
VARIANTS = [
    ("literal eager", LITERAL, False, None),
    ("literal eager, autocast bf16", LITERAL, False, BF16),
    ("+ hoisted ASTA", dict(asta_form="hoisted", dedup_items=False, **EAGER), False, None),
    ("+ item dedup", dict(DEDUP, **EAGER), False, None),
    ("+ item dedup, autocast bf16", dict(DEDUP, **EAGER), False, BF16),
    # model.asta_precision=autocast: the attention op in bf16 too (the default keeps it fp32).
    (f"+ item dedup{BF16_OP}, autocast bf16", dict(DEDUP, asta_precision="autocast", **EAGER), False, BF16),
    ("+ Triton ASTA", dict(DEDUP, asta_kernel="triton", qnn_kernel="torch"), False, None),
    ("Triton QNN, torch ASTA", dict(DEDUP, asta_kernel="torch", qnn_kernel="triton"), False, None),
    ("+ Triton QNN (all fused)", dict(DEDUP, asta_kernel="triton", qnn_kernel="triton"), False, None),
    ("all fused, autocast bf16", dict(DEDUP, asta_kernel="triton", qnn_kernel="triton"), False, BF16),
    ("default (auto)", {}, False, None),  # what `qin train` runs: the kernels' backend="auto"
    ("default (auto), autocast bf16", {}, False, BF16),
    ("default (auto) graph-safe, autocast bf16", {}, GRAPH_SAFE, BF16),  # is the eager default's waiting costly?
    # The QNN's torch path in each of its forms, whichever auto's own timing of the op chose
    # (on the H200 at 3f11c2d plain autograd ran the op faster): does the op's verdict hold in the step?
    ("default (auto), QNN through autograd, autocast bf16", {}, QNN_AUTOGRAD, BF16),
    ("default (auto), QNN through its Function, autocast bf16", {}, QNN_FUNCTION, BF16),
    (f"default (auto){BF16_OP}, autocast bf16", dict(asta_precision="autocast"), False, BF16),
    # Compiled, in the order of what they decide, should the time box stop the table early:
    # the strongest stock recipe (every bf16 target's yardstick), then ours in bf16, then fp32.
    ("literal + torch.compile, autocast bf16", LITERAL, True, BF16),
    # train.cuda_graphs=true: compiled with mode="reduce-overhead", the model made graph-safe.
    ("default (auto) + CUDA graphs, autocast bf16", {}, CUDA_GRAPHS, BF16),
    ("default (auto) + torch.compile, autocast bf16", {}, True, BF16),
    ("literal + torch.compile", LITERAL, True, None),
    ("default (auto) + torch.compile", {}, True, None),
    ("all fused + torch.compile, autocast bf16", dict(DEDUP, asta_kernel="triton", qnn_kernel="triton"), True, BF16),
    # The eager step as one CUDA graph, without torch.compile: does replaying the eager kernels
    # (6.7 ms a step in the H200 profile, against a 10.8 ms eager step) take most of what the
    # compiled graphs gain, for a capture of a second where they compile for a minute or more?
    # Near the end: a capture that fails can leave the device in error for what follows it.
    ("default (auto) graph-safe, whole step as one CUDA graph, autocast bf16", {}, WHOLE_STEP_GRAPH, BF16),
    # train.precision=fp16 (a gradient scaler, the host reading its overflow check every step), for
    # GPUs without bf16; last, as no target of the GPU issues depends on it.
    ("default (auto), autocast fp16", {}, False, FP16),
]
# On the CPU: the eager torch variants, the bf16 lines of issue 15's CPU targets, and (not with
# --quick: compiling the paper's model takes a minute or two here) the default compiled.
CPU_VARIANTS = ("literal eager", "literal eager, autocast bf16", "+ hoisted ASTA", "+ item dedup",
                "+ item dedup, autocast bf16", f"+ item dedup{BF16_OP}, autocast bf16",
                "default (auto) + torch.compile", "default (auto) + torch.compile, autocast bf16")
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# The CUDA-graphs variants' peak: peak_memory_mb counts what is allocated beyond the memory held
# before the step, and the graphs' pool is allocated before it (at capture) and reused by every
# replay, so its figure likely leaves out the step's activations: a metric of its own, compared
# with no other variant's peak (it feeds no target).
GRAPHS_MEMORY = "peak_memory_beyond_graph_pool"


@contextlib.contextmanager
def qnn_torch_form(form: str):
    """The QNN's torch path (what backend="auto" trains with until Triton measures faster) in
    `form` whatever auto chose (reference.QNN_TORCH_FORMS): "autograd", plain autograd through the
    reference (bench_qnn's "eager" line), or "function", its memory-saving autograd Function. On
    the H200 at 3f11c2d the op alone ran faster as plain autograd: bf16 fwd+bwd 0.586 ms against
    the Function's 0.95, under autocast 0.799 against 1.13."""
    from kernels import reference

    kept = reference.training_quadratic_projection

    def forced(x, weight, bias, num_row, dropout_p, training, dtype, form_chosen=None):
        return kept(x, weight, bias, num_row, dropout_p, training, dtype, form)

    reference.training_quadratic_projection = forced
    try:
        yield
    finally:
        reference.training_quadratic_projection = kept


def whole_step_graph(body, optimizer, device: torch.device, warmup: int = 3):
    """`body` (one training step without zero_grad: forward, backward, clipping, the optimizer's
    step) captured as one CUDA graph; returns what replays it. The optimizer must be capturable,
    the model graph-safe (no host sync, no size known only at run time) and its inputs static.
    As torch.cuda.graph's whole-network recipe: warm-up steps on a side stream (backend="auto"
    times its choices there: nothing is timed under capture), then the gradients set to None, so
    that the captured backward allocates them in the graph's pool and each replay writes them
    anew."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def saved_bytes(forward, resident_tensors) -> int:
    """Bytes autograd keeps for backward during `forward()`, each storage counted once.

    Saved tensors that are `resident_tensors` (parameters, buffers, the batch) are left out: they
    exist whether or not a backward follows. What autocast saves of them (their bf16 copies) is
    new memory and counts.
    """
    resident = {t.untyped_storage().data_ptr() for t in resident_tensors}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    del loss  # the graph (and what it saved) goes with it
    return sum(storages.values())


def _forward_loss(forward, data: dict, amp: torch.dtype | None) -> torch.Tensor:
    """The trainer's loss, its forward under autocast in `amp` as train.precision runs it."""
    return loss_fn(forward, data, 2e-4, precision=PRECISION_NAMES[amp])


def synthetic_batch(batch: int, device: torch.device, num_items: int = 91_718, max_len: int = 64,
                    seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(6), 0.9, batch)), 3, max_len).astype(np.int64)
    seq = rng.integers(1, num_items, (batch, max_len))
    seq[np.arange(max_len)[None, :] < (max_len - lengths)[:, None]] = 0
    out = {
        "item_id": rng.integers(1, num_items, batch), "item_seq": seq,
        "likes_level": rng.integers(0, 11, batch), "views_level": rng.integers(0, 11, batch),
        "label": (rng.random(batch) < 0.25).astype(np.float32),
    }
    return {k: torch.from_numpy(v).to(device) for k, v in out.items()}


def build(cfg: QINConfig, device: torch.device, seed: int = 0) -> QIN:
    torch.manual_seed(seed)
    model = QIN(cfg)
    g = torch.Generator().manual_seed(seed)
    model.load_item_info(torch.randint(0, cfg.num_tags, (cfg.num_items, cfg.tags_per_item), generator=g),
                         torch.randn(cfg.num_items, cfg.mm_dim, generator=g))
    return model.to(device).train()


def default_batches(device: torch.device, quick: bool) -> list[int]:
    """The paper's batch on a GPU with a sweep below it; on the CPU a batch big enough that the
    model, not the fixed per-step optimizer cost, dominates (the first is the headline)."""
    if device.type == "cuda":
        return [8192] if quick else [8192, 1024, 2048, 4096, 16384]
    return [1024] if quick else [1024, 256, 2048]


def bf16_left_out(device: torch.device) -> float | None:
    """On a CPU with no bf16 matrix instructions, how many times slower a bf16 product runs than
    fp32's (qin.train.matmul_slowdown), where that passes qin.train.SLOW_MATMUL; else None.

    torch then multiplies bf16 in a scalar loop (27-48x slower than fp32 on a 2-core Zen 2 without
    AVX-512): a bf16 variant's time there says nothing of bf16, and the CPU's bf16 variants made
    `qin bench --quick` take most of an hour. The trainer warns of the same (train.precision)."""
    slowdown = matmul_slowdown(device, "bf16")
    return slowdown if slowdown is not None and slowdown > SLOW_MATMUL else None


def run(device: torch.device, quick: bool = False, batch: int | None = None, csv: str | None = None) -> list[dict]:
    if device.type == "cpu":
        keep_freed_memory()  # as `qin train` does on the CPU, for every variant alike
    rows = []
    slowdown = bf16_left_out(device)
    if slowdown is not None:
        print(f"bf16 variants left out: a bf16 matrix product runs {slowdown:.0f}x slower than fp32's on this "
              f"CPU (no bf16 instructions), so their times would say nothing of bf16")
        keep(rows, [make_row("train_step", "torch", "probe", BF16_SLOWDOWN, "x", "", "", slowdown, device, BF16)], csv)
    for size in ([batch] if batch is not None else default_batches(device, quick)):
        if not STOPPED.is_set():
            keep(rows, run_batch(device, quick, size, skip_bf16=slowdown is not None), csv)
    if not STOPPED.is_set():
        keep(rows, loader_rows(device, batch or default_batches(device, quick)[0], quick), csv)
    return rows


def run_batch(device: torch.device, quick: bool, batch: int, skip_bf16: bool = False):
    """Yields each row as it is measured; without the bf16 variants where skip_bf16 (bf16_left_out)."""
    data = synthetic_batch(batch, device)
    for name, overrides, how, amp in VARIANTS:
        compiled = how in (True, CUDA_GRAPHS)
        if STOPPED.is_set():
            print(f"out of time: {name} and the variants after it were not run")
            break
        if device.type != "cuda" and (name not in CPU_VARIANTS or (quick and compiled)):
            print(f"skipped on the CPU: {name} (GPU only: Triton, or too slow here to say anything)")
            continue
        if skip_bf16 and amp == BF16:
            continue  # said once, in run
        patch = contextlib.ExitStack()
        try:
            if how in (QNN_AUTOGRAD, QNN_FUNCTION):
                patch.enter_context(qnn_torch_form("autograd" if how == QNN_AUTOGRAD else "function"))
            model = build(QINConfig(**overrides), device)
            # The trainer's own optimizer, for every variant; for a captured step the same fused Adam
            # with its step count kept on the device.
            optimizer = (torch.optim.Adam(model.parameters(), lr=2e-3, fused=True, capturable=True)
                         if how == WHOLE_STEP_GRAPH else make_optimizer(model, 2e-3))
            if how in (GRAPH_SAFE, WHOLE_STEP_GRAPH):
                make_graph_safe(model)
            forward = compile_model(model, cuda_graphs=how == CUDA_GRAPHS) if compiled else model
            # As the trainer steps: disabled (passing everything through) unless fp16.
            scaler = torch.amp.GradScaler(device.type, enabled=amp == FP16)

            def step():
                if how == CUDA_GRAPHS:  # a new step, as the trainer marks it
                    torch.compiler.cudagraph_mark_step_begin()
                loss = _forward_loss(forward, data, amp)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                scaler.step(optimizer)
                scaler.update()
                if device.type == "cpu":
                    bound_kept_memory()  # as the trainer does after each step

            if how == WHOLE_STEP_GRAPH:  # bf16 needs no scaler: the step without zero_grad, captured
                def body():
                    _forward_loss(forward, data, amp).backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                    optimizer.step()

                step = whole_step_graph(body, optimizer, device)

            from torch._dynamo.utils import counters
            counters["inductor"].clear()
            step()  # first step: allocate optimizer state, compile
            p50, p20, p80 = time_ms(step, device, warmup=1, reps=3 if quick else 8)
            skips = counters["inductor"]["cudagraph_skips"] if how == CUDA_GRAPHS else 0
            if skips:  # inductor ran the step without graphs: the row must not claim them
                print(f"{name}: inductor skipped {skips} CUDA graph(s) ({dict(counters['inductor'])}); "
                      f"timed as '{name} (graphs skipped)'")
                name = f"{name} (graphs skipped)"
            # Samples/s from the median time; p20 time gives the higher throughput.
            yield make_row("train_step", name, "full", "throughput", "samples/s", "batch", batch,
                           (batch / p50 * 1e3, batch / p80 * 1e3, batch / p20 * 1e3), device, amp or "fp32")
            if diagnosed(device):  # is the step bound by its launches? (on the CPU the host does the work)
                yield from host_rows("train_step", name, "full", "batch", batch, host_ms(step, device), p50, device,
                                     amp or "fp32")
            memory = peak_memory_mb(step, device)
            if memory is not None:
                graphed = how in (CUDA_GRAPHS, WHOLE_STEP_GRAPH)
                yield make_row("train_step", name, "full", GRAPHS_MEMORY if graphed else "peak_memory", "MB", "batch",
                               batch, memory, device, amp or "fp32")
            saved = saved_bytes(lambda: _forward_loss(forward, data, amp), [*model.parameters(), *model.buffers(),
                                                                          *data.values()])
            yield make_row("train_step", name, "full", "saved_bytes", "bytes/sample", "batch", batch,
                           saved / batch, device, amp or "fp32")
            # One line as each variant ends: a run stopped later still shows it.
            print(f"{name}: {batch / p50 * 1e3:,.0f} samples/s" + (f", peak {memory:,.0f} MB" if memory else ""))
        except KeyboardInterrupt:  # SIGTERM: the rows yielded so far are kept
            STOPPED.set()
            print(f"out of time during {name}: it and the variants after it were not run")
            break
        except Exception as exc:  # report and go on: one broken variant must not hide the others
            print(f"variant {name!r} failed: {type(exc).__name__}: {exc}")
        finally:
            patch.close()
            model = optimizer = forward = step = scaler = None  # free this variant's weights before the next
            if compiled:
                torch._dynamo.reset()  # the next compiled variant starts from an empty cache
            if device.type == "cuda":
                torch.cuda.empty_cache()


def loader_rows(device: torch.device, batch: int, quick: bool) -> list[dict]:
    """Batch assembly plus the host-to-device copy, as its own line beside the model step."""
    from qin.data import Split, iterate_batches

    n = batch * (4 if quick else 16)
    rng = np.random.default_rng(0)
    split = Split(name="train", item_id=rng.integers(1, 91_718, n), item_seq=rng.integers(0, 91_718, (n, 64)).astype(np.int32),
                  label=(rng.random(n) < 0.25).astype(np.float32),
                  features={"likes_level": rng.integers(0, 11, n), "views_level": rng.integers(0, 11, n)})

    def epoch():
        for b in iterate_batches(split, batch, shuffle=True, seed=0, epoch=0):
            {k: v.to(device, non_blocking=True) for k, v in b.items()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    p50, p20, p80 = time_ms(epoch, torch.device("cpu"), warmup=1, reps=3)
    return [make_row("train_step", "data loading (assemble + copy)", "full", "throughput", "samples/s", "batch",
                     batch, (n / p50 * 1e3, n / p80 * 1e3, n / p20 * 1e3), device, "")]


def print_ratios(rows: list[dict]) -> None:
    def table(metric):
        return {(r["provider"], r["dtype"]): r["p50"] for r in rows if r["metric"] == metric}

    speed, memory, saved = table("throughput"), table("peak_memory"), table("saved_bytes")
    base = speed.get(("literal eager", "fp32"))
    print("\nvariant                        dtype   samples/s  x literal  x fp32   saved B/sample  / fp32   peak MB")
    for (name, dtype), value in speed.items():
        if name.startswith("data loading"):
            print(f"{name:30s}        {value:10,.0f}  (the loader alone: compare with the model's samples/s)")
            continue
        twin = name.removesuffix(", autocast bf16").removesuffix(", autocast fp16").removesuffix(BF16_OP)  # in fp32
        fp32 = speed.get((twin, "fp32"))
        saved_here, saved_fp32 = saved.get((name, dtype)), saved.get((twin, "fp32"))
        mem = memory.get((name, dtype))
        print(f"{name:30s} {dtype:5s} {value:10,.0f}  {value / base if base else 0:8.2f}x "
              f"{value / fp32 if fp32 else 0:6.2f}x  {saved_here or 0:14,.0f}  "
              f"{saved_here / saved_fp32 if saved_here and saved_fp32 else 0:6.2f}  "
              + (f"{mem:8.0f}" if mem is not None else f"{'-':>8s}"))  # device memory: a GPU's only
    print(f"{AUTHORS_DEVICE:36s} {AUTHORS_SAMPLES_PER_S:10,d}   (published figure, not measured here)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_argument)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=positive_int)
    parser.add_argument("--csv")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    rows = run(args.device, args.quick, args.batch, csv=args.csv)  # in the CSV as measured
    print_table(rows, "QIN training step")
    print_ratios(rows)
    print("\n".join(["", 'What backend="auto" chose for the default variants:', *timed_section(args.device)]))


if __name__ == "__main__":
    main()

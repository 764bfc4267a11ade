"""What one training step of QIN asks of a GPU, counted on the CPU: aten operators, host syncs,
bytes moved and floating-point operations, and from them a floor time on the H200 of issue 14.

Run from the root of a checkout (any commit whose bench/bench_train.py has `build` and
`synthetic_batch`):
    PYTHONPATH=$PWD python step_cost.py --batch 8192 --csv counts.csv --label HEAD

One step as the trainer runs it (forward under autocast for bf16, BCE + embedding L2, backward,
gradient clipping, fused Adam) after a warm-up step, counted at the dispatcher
(TorchDispatchMode), eager:
- bytes: an operator reads its tensor inputs and writes its outputs and the inputs it mutates,
  in full; views and `empty` allocations move nothing; a gather (embedding, index, index_select,
  embedding_bag) reads only the rows it returns, plus its indices. A registered op written in
  Python (torch.library.custom_op: the torch path's qin::regathered_attention and its backward)
  is counted by the aten operators it runs. A Triton kernel is not seen: only torch-path
  variants are counted here.
- FLOPs: torch.utils.flop_counter's formulas (the matrix products).
- floor: the sum over operators of max(FLOPs / matmul rate, bytes / copy rate), at the rates of
  the H200 measured in issue 14's run (fp32 51 TFLOP/s with TF32 off, bf16 779, copy 3,670 GB/s),
  the rate by the operator's input dtype. An eager floor: every kernel at its ceiling, no launch
  or host cost, no fusion.
- syncs: operators whose result the host must wait for (.item(), unique, nonzero, a sparse product).
The CPU path differs from CUDA's in dropout: the CPU draws its own mask and regenerates it in
backward (kernels/dropout.py, and the QNN layer's reference._TrainingQuadraticProjection,
reference.regenerated_quadratic_projection before c01b37a); CUDA runs
aten.native_dropout (one kernel writing the output and a 1-byte mask). The count switches the
CPU path to CUDA's (`cuda_dropout`) and checks that every dropout site then ran native_dropout.
The index range check of the gathered ASTA op runs on the CPU only (2 .item() syncs); it is
reported apart (`cpu_only_syncs`).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import importlib
import inspect
import json
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch._library import custom_ops
from torch.utils.flop_counter import flop_registry

from bench.bench_train import build, synthetic_batch
from qin.config import QINConfig
import qin.train as qt

H200 = {"matmul_fp32": 51e12, "matmul_low": 779e12, "copy": 3.67e12}  # issue 14's measured ceilings
GATHERS = {"aten.embedding.default", "aten.index.Tensor", "aten.index_select.default", "aten._embedding_bag.default"}
# Operators whose output size, or value, the host must wait for. A sparse COO product coalesces
# its indices first, sizing the result on the host (kernels/reference.py says so where it avoids
# one under CUDA graph capture).
SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten._unique2.default",
         "aten.unique_dim.default", "aten.masked_select.default", "aten.is_nonzero.default",
         "aten._sparse_addmm.default"}
EAGER = dict(asta_kernel="torch", qnn_kernel="torch")
VARIANTS = {  # name -> (config overrides, precision); the torch-path variants of bench_train
    "literal eager": (dict(asta_form="literal", dedup_items=False, **EAGER), "fp32"),
    "literal eager, autocast bf16": (dict(asta_form="literal", dedup_items=False, **EAGER), "bf16"),
    "+ hoisted ASTA": (dict(asta_form="hoisted", dedup_items=False, **EAGER), "fp32"),
    "+ item dedup": (dict(asta_form="hoisted", dedup_items=True, **EAGER), "fp32"),
    "+ item dedup, autocast bf16": (dict(asta_form="hoisted", dedup_items=True, **EAGER), "bf16"),
    "+ item dedup, ASTA op in bf16, autocast bf16": (dict(asta_form="hoisted", dedup_items=True,
                                                         asta_precision="autocast", **EAGER), "bf16"),
}


def _native_dropout(x, p=0.5, training=True, inplace=False):
    return torch.native_dropout(x, p, True)[0] if training and p > 0 else x


@contextlib.contextmanager
def cuda_dropout():
    """Every dropout of the model as CUDA runs it (aten.native_dropout), on the CPU."""
    patched = [(F, "dropout")]
    for module in ("kernels.dropout", "kernels.reference", "qin.model"):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(module)
            if callable(getattr(mod, "dropout", None)):
                patched.append((mod, "dropout"))
    saved = [(mod, name, getattr(mod, name)) for mod, name in patched]
    reference = importlib.import_module("kernels.reference")
    regenerated = getattr(reference, "regenerated_quadratic_projection", None)  # before c01b37a
    # From c01b37a the QNN layer trains through reference._TrainingQuadraticProjection on every
    # device, drawing its mask from a seed only where draws_from_lanes says so on the CPU;
    # elsewhere it keeps torch.native_dropout's mask, as CUDA does.
    lanes = getattr(reference, "draws_from_lanes", None)
    try:
        for mod, name in patched:
            setattr(mod, name, lambda x, p=0.5, training=True, inplace=False: _native_dropout(x, p, training))
        if regenerated is not None:  # the CPU's mask-regenerating QNN -> the literal reference (CUDA's)
            reference.regenerated_quadratic_projection = (
                lambda x, w, b, m, p, t, dt: reference.quadratic_projection(x, w.to(dt), b.to(dt), m, p, t))
        if lanes is not None:
            reference.draws_from_lanes = lambda p: False
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        if regenerated is not None:
            reference.regenerated_quadratic_projection = regenerated
        if lanes is not None:
            reference.draws_from_lanes = lanes


def _nbytes(t: torch.Tensor) -> int:
    if t.is_sparse:  # a COO tensor's memory is its indices and values, not its dense shape
        return _nbytes(t._indices()) + _nbytes(t._values())
    return t.numel() * t.element_size()


class Count(TorchDispatchMode):
    """Per aten operator: calls, bytes moved, FLOPs, and the floor time at the H200's rates."""

    def __init__(self):
        super().__init__()
        self.rows = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])  # calls, bytes, flops, floor s
        self.cpu_only_syncs = 0
        self.custom_calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"{func.overloadpacket}.{func._overloadname}"
        opdef = custom_ops._maybe_get_opdef(func)
        if opdef is not None:  # a registered Python op (qin::regathered_attention): count what it runs
            self.custom_calls[name] += 1
            with self:
                return opdef._init_fn(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # reached below autograd (inside a custom op): count the operators it is made of
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outputs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
        if func.is_view or name.startswith(("aten.empty", "aten.new_empty")) or name in (
                "aten.detach.default", "aten._unsafe_view.default"):
            moved = 0
        elif name in GATHERS:
            moved = 2 * _nbytes(outputs[0]) + sum(_nbytes(a) for a in inputs if not a.is_floating_point())
        else:
            mutated = [a for arg, value in zip(func._schema.arguments, args)
                       if arg.alias_info is not None and arg.alias_info.is_write
                       for a in tree_flatten(value)[0] if isinstance(a, torch.Tensor)]
            fresh = [] if any(r.alias_info is not None for r in func._schema.returns) else outputs
            moved = sum(map(_nbytes, inputs)) + sum(map(_nbytes, mutated)) + sum(map(_nbytes, fresh))
        flops = 0
        if func.overloadpacket in flop_registry:
            flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        low = any(a.dtype in (torch.bfloat16, torch.float16) for a in inputs)
        floor = max(flops / H200["matmul_low" if low else "matmul_fp32"], moved / H200["copy"])
        row = self.rows[name]
        row[0] += 1
        row[1] += moved
        row[2] += flops
        row[3] += floor
        if name == "aten._local_scalar_dense.default" and any(
                "sparse_target_attention.py" in frame.filename for frame in inspect.stack()[2:12]):
            self.cpu_only_syncs += 1
        return out


def count_step(overrides: dict, precision: str, batch: int) -> Count:
    device = torch.device("cpu")
    model = build(QINConfig(**overrides), device)
    optimizer = qt.make_optimizer(model, 2e-3)
    data = synthetic_batch(batch, device)
    with_precision = "precision" in inspect.signature(qt.loss_fn).parameters

    def step():
        if with_precision:
            loss = qt.loss_fn(model, data, 2e-4, precision=precision)
        else:  # a tree from before train.precision: autocast over the forward, the L2 in fp32
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                logits = model(data)
            loss = F.binary_cross_entropy_with_logits(logits.float(), data["label"]) + 1e-4 * model.embedding_l2()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()

    with cuda_dropout():
        step()
        count = Count()
        with count:
            step()
    dropouts = count.rows["aten.native_dropout.default"][0]
    expected = 2 * QINConfig().qnn_layers  # each QNN layer's hidden and its residual branch
    if dropouts != expected:
        raise RuntimeError(f"{dropouts} native_dropout calls, expected {expected}: a dropout site escaped cuda_dropout")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--label", default="")
    parser.add_argument("--csv")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--top", type=int, default=0, help="also print the N costliest operators of each variant")
    args = parser.parse_args()
    rows = []
    for name in args.variants:
        overrides, precision = VARIANTS[name]
        t0 = time.time()
        try:
            count = count_step(overrides, precision, args.batch)
        except Exception as exc:  # a variant an older tree cannot run (bf16 before train.precision)
            print(f"{name}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        calls = sum(r[0] for r in count.rows.values())
        syncs = sum(r[0] for k, r in count.rows.items() if k in SYNCS)
        row = dict(label=args.label, variant=name, precision=precision, batch=args.batch, operators=calls,
                   syncs=syncs - count.cpu_only_syncs, cpu_only_syncs=count.cpu_only_syncs,
                   gbytes=round(sum(r[1] for r in count.rows.values()) / 1e9, 3),
                   gflop=round(sum(r[2] for r in count.rows.values()) / 1e9, 1),
                   floor_ms=round(sum(r[3] for r in count.rows.values()) * 1e3, 2))
        rows.append(row)
        print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
        for op, (n, moved, flops, floor) in sorted(count.rows.items(), key=lambda kv: -kv[1][3])[:args.top]:
            print(f"    {op:50s} {n:4d} calls {moved / 1e6:9.1f} MB {flops / 1e9:7.1f} GFLOP {floor * 1e3:6.3f} ms")
    if args.csv and rows:
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()

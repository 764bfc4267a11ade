"""`qin parity`: do the fused kernels still compute QIN on this machine, and how closely?

Three checks, each against a float64 evaluation of the same function on the same inputs:

  ops       every fused op (ASTA; the QNN projection in training, its dropout replayed from the
            seed; the QNN projection in eval, through W_bar), forward and every gradient, in each
            dtype, against kernels/reference.py run in float64 on the inputs upcast.
  model     QIN with the fused ops and QIN with the reference ops, in each dtype, against
            model.double() at the same weights: logits (train and eval mode) and every parameter
            gradient of the training loss; then a few fp32 Adam steps, loss by loss. In fp32
            dropout is on, each mask fixed by a seed and applied alike to every model
            (ReplayedDropout), so the fused QNN kernels run in training as in `qin train`.
            Beside each tolerance: the check's own noise floor, how far the float64 results move
            when ASTA's output alone is rounded to the dtype under test.
  training  (--training) the same short training run with each backend over N seeds: valid AUC
            mean and spread per backend; their means must agree within twice the larger spread.

Tolerances come from kernels/tolerances.py, the table the tests use too.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import kernels
import kernels.utils
from kernels import reference, tolerances
from kernels.dropout import keep_mask
from kernels.quadratic_projection import dropout_keep_mask
from qin.errors import StoppedBySignal

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CHILD_ENV = "QIN_PARITY_CHILD"


@dataclass
class Row:
    """One line of the report."""

    check: str  # ops | model | training
    op: str
    quantity: str
    dtype: str
    shape: str
    max_abs: float
    max_rel: float
    tolerance: float
    noise_floor: float | None = None
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance  # NaN never passes

    @property
    def name(self) -> str:
        return f"{self.op} {self.quantity} {self.dtype} [{self.shape}]"


# ----------------------------------------------------------------------------------------------
# The fused ops: one entry per op. An op builds its inputs for a case, and runs either through
# the fused kernels or through the reference formulas; the harness does the rest.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One shape of an op. `layout` names an input layout other than contiguous."""

    sizes: dict
    label: str = ""
    layout: str = "contiguous"  # contiguous | strided
    runs: str = "always"  # always | full (not with --quick) | compiled (full, on CUDA: paper sizes)

    def describe(self) -> str:
        text = " ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"{text} {self.label}".strip()


@dataclass(frozen=True)
class Op:
    name: str
    make_inputs: Callable  # (case, dtype, device, generator) -> (leaves: dict, extra: dict)
    fused: Callable  # (leaves, extra) -> output, through kernels.* with backend="triton"
    reference: Callable  # (leaves, extra) -> output, through kernels.reference (run in float64)
    cases: tuple
    dtypes: tuple | None = None  # the dtypes it is checked in (None: every one)
    # (quantity, dtype) -> the dtype the fused result must have (None: `dtype`, every quantity)
    result_dtype: Callable | None = None


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view whose rows are padded apart (last stride 1, others not dense)."""
    return F.pad(t, (0, 3))[..., : t.shape[-1]]


NON_NEGATIVE = "non-negative"


def _sign(case):
    """The inputs' signs: random, or for a NON_NEGATIVE case all >= 0. Then no term cancels, so
    the error scale (the sum of |terms|) is the result itself and the 16-bit tolerance, 4 u of it,
    bites: with random signs a gradient reduced over L*D terms may be 10% off in bf16 and pass."""
    return torch.abs if case.label == NON_NEGATIVE else (lambda t: t)


def _asta_inputs(case, dtype, device, g):
    """Left-padded histories of random length (row 0 always empty), scores O(1), no score near
    the ReLU kink: there a rounding may flip the gate in the kernel or the oracle, a property
    of the input, not an error (such history rows are redrawn)."""
    B, L, D = case.sizes["B"], case.sizes["L"], case.sizes["D"]
    sign = _sign(case)
    x = sign(torch.randn(B, L, D, generator=g)).to(dtype).to(device)
    q = sign(torch.randn(B, D, generator=g) / math.sqrt(D)).to(dtype).to(device)
    for _ in range(100):
        prod = x.double() * q.double()[:, None, :]
        near_kink = prod.sum(-1).abs() <= 1e-3 * prod.abs().sum(-1)
        if not near_kink.any():
            break
        x[near_kink] = torch.randn(int(near_kink.sum()), D, generator=g).to(dtype).to(device)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    if case.label == "all-padding":
        lengths.zero_()
    elif B > 1:
        lengths[0] = 0  # one all-padding row in every batch
        lengths[-1] = L  # and one full row
    mask = (torch.arange(L)[None, :] >= (L - lengths)[:, None]).double()
    if case.label == "dropout-scaled mask":  # as the model passes it with model.asta_dropout = 0.3
        mask *= (torch.rand(B, L, generator=g) >= 0.3) / 0.7
    grad_out = sign(torch.randn(B, D, generator=g)).to(dtype).to(device)
    return {"history": x, "query": q}, {"mask": mask.to(dtype).to(device), "layout": case.layout,
                                         "grad_out": grad_out}


def _asta_fused(leaves, extra):
    history = _strided(leaves["history"]) if extra["layout"] == "strided" else leaves["history"]
    return kernels.sparse_target_attention(history, leaves["query"], extra["mask"], backend="triton")


def _asta_reference(leaves, extra):
    history = _strided(leaves["history"]) if extra["layout"] == "strided" else leaves["history"]
    return reference.sparse_target_attention(history, leaves["query"], extra["mask"].to(history.dtype))


def _gathered_asta_inputs(case, dtype, device, g):
    """ASTA's inputs with the history as rows of a table of U distinct items: reps (U, D) and
    index (B, L) into it, drawn with repeats across and within rows (U = B*L/2; the last position
    of each row repeats its first; one id is U - 1), so gradients must sum over repeats, and a row
    no position reads gets none. "one item": U = 1, every position reads the same row. A query
    whose score with one of its rows lies near the ReLU kink is redrawn (see _asta_inputs)."""
    _, extra = _asta_inputs(case, dtype, device, g)
    B, L, D = case.sizes["B"], case.sizes["L"], case.sizes["D"]
    U = 1 if case.label == "one item" else max(1, B * L // 2)
    reps = _sign(case)(torch.randn(U, D, generator=g)).to(dtype)
    index = torch.randint(0, U, (B, L), generator=g)
    if L > 1:
        index[:, -1] = index[:, 0]
    index[-1, -2 if L > 1 else -1] = U - 1
    q = _sign(case)(torch.randn(B, D, generator=g) / math.sqrt(D)).to(dtype)
    for _ in range(100):
        prod = reps.double()[index] * q.double()[:, None, :]
        near_kink = (prod.sum(-1).abs() <= 1e-3 * prod.abs().sum(-1)).any(1)
        if not near_kink.any():
            break
        q[near_kink] = (torch.randn(int(near_kink.sum()), D, generator=g) / math.sqrt(D)).to(dtype)
    extra["index"] = index.to(device)
    return {"reps": reps.to(device), "query": q.to(device)}, extra


def _gathered_asta_fused(leaves, extra):
    reps = _strided(leaves["reps"]) if extra["layout"] == "strided" else leaves["reps"]
    return kernels.gathered_sparse_target_attention(reps, extra["index"], leaves["query"], extra["mask"],
                                                    backend="triton")


def _gathered_asta_reference(leaves, extra):
    reps = _strided(leaves["reps"]) if extra["layout"] == "strided" else leaves["reps"]
    return reference.sparse_target_attention(reps[extra["index"]], leaves["query"], extra["mask"].to(reps.dtype))


QNN_DROPOUT = 0.1  # the paper's


def _qnn_inputs(case, dtype, device, g):
    B, D, M = case.sizes["B"], case.sizes["D"], case.sizes["M"]
    sign = _sign(case)
    x = sign(torch.randn(B, D, generator=g))
    weight = sign(torch.randn(M * D, D, generator=g) / math.sqrt(D))
    bias = sign(torch.randn(M * D, generator=g) * 0.5)
    grad_out = sign(torch.randn(B, D, generator=g))
    leaves = {name: t.to(dtype).to(device) for name, t in (("x", x), ("weight", weight), ("bias", bias))}
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    return leaves, {"num_row": M, "seed": seed, "layout": case.layout, "grad_out": grad_out.to(dtype).to(device)}


def _qnn_x(leaves, extra):
    # A column-major x: transposed in memory, the same values.
    return leaves["x"].t().contiguous().t() if extra["layout"] == "strided" else leaves["x"]


def _qnn_train_fused(leaves, extra):
    return kernels.quadratic_projection(_qnn_x(leaves, extra), leaves["weight"], leaves["bias"], extra["num_row"],
                                        dropout_p=QNN_DROPOUT, training=True, seed=extra["seed"], backend="triton")


def _qnn_train_reference(leaves, extra):
    x = _qnn_x(leaves, extra)
    keep = dropout_keep_mask(extra["seed"], x.shape[0], extra["num_row"], x.shape[1], QNN_DROPOUT, x.device)
    return reference.quadratic_projection(x, leaves["weight"], leaves["bias"], extra["num_row"], QNN_DROPOUT,
                                          True, dropout_mask=keep)


def _qnn_autocast_inputs(case, dtype, device, g):
    """The QNN layer's inputs as mixed-precision training passes them: x, weight and bias fp32,
    the call under torch.autocast(`dtype`); the output's gradient in the output's dtype."""
    leaves, extra = _qnn_inputs(case, torch.float32, device, g)
    extra["autocast"] = dtype
    extra["grad_out"] = extra["grad_out"].to(reference.product_dtype(torch.float32, dtype))
    return leaves, extra


def _qnn_autocast_fused(leaves, extra):
    with torch.autocast(leaves["x"].device.type, dtype=extra["autocast"]):
        return _qnn_train_fused(leaves, extra)


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to `dtype` with the gradient passed through unrounded (autocast's cast is the
    identity for the function it differentiates)."""
    return t + (t.to(dtype).to(t.dtype) - t).detach()


def _qnn_autocast_reference(leaves, extra):
    """Autocast's function: the products with W read x, W and b rounded to the autocast dtype;
    the product with x reads x as it is."""
    x, dtype = leaves["x"], extra["autocast"]
    batch, dim, num_row = x.shape[0], x.shape[1], extra["num_row"]
    keep = dropout_keep_mask(extra["seed"], batch, num_row, dim, QNN_DROPOUT, x.device)
    hidden = F.linear(_rounded(x, dtype), _rounded(leaves["weight"], dtype), _rounded(leaves["bias"], dtype))
    s = (hidden * keep.to(hidden.dtype) / (1.0 - QNN_DROPOUT)).view(batch, num_row, dim).sum(1)
    return x * s


def _qnn_autocast_result_dtype(quantity: str, dtype: torch.dtype) -> torch.dtype:
    return reference.product_dtype(torch.float32, dtype) if quantity == "out" else torch.float32


def _qnn_eval_fused(leaves, extra):
    return kernels.quadratic_projection(_qnn_x(leaves, extra), leaves["weight"], leaves["bias"], extra["num_row"],
                                        dropout_p=QNN_DROPOUT, training=False, backend="triton")


def _qnn_eval_reference(leaves, extra):
    # The literal sum over the M row groups, not W_bar: the rewrite is what is under test.
    return reference.quadratic_projection(_qnn_x(leaves, extra), leaves["weight"], leaves["bias"],
                                          extra["num_row"], QNN_DROPOUT, False)


ASTA_CASES = (
    Case(dict(B=8192, L=64, D=384), "paper", runs="compiled"),
    Case(dict(B=256, L=513, D=384), runs="compiled"),
    Case(dict(B=4, L=64, D=384), "model's L and D"),
    Case(dict(B=1, L=64, D=384)),
    Case(dict(B=3, L=1, D=384)),
    Case(dict(B=2, L=513, D=48)),
    Case(dict(B=5, L=20, D=1)),
    Case(dict(B=3, L=33, D=200)),
    Case(dict(B=4, L=16, D=32), "all-padding"),
    Case(dict(B=4, L=16, D=32), "dropout-scaled mask"),
    Case(dict(B=3, L=24, D=40), "non-contiguous history", layout="strided"),
    Case(dict(B=4, L=64, D=384), NON_NEGATIVE),
)
GATHERED_ASTA_CASES = ASTA_CASES + (Case(dict(B=6, L=64, D=24), "one item"),)
QNN_CASES = (
    Case(dict(B=8192, D=1024, M=4), "paper", runs="compiled"),
    # Under the interpreter a QNN case costs about a second per 100 (16 x 16) tiles: --quick keeps
    # the odd shapes small and leaves the wide ones to full mode.
    Case(dict(B=16, D=128, M=4), runs="full"),
    Case(dict(B=9, D=200, M=4), runs="full"),
    Case(dict(B=5, D=24, M=4), "ragged tiles"),
    Case(dict(B=33, D=72, M=2), "6 tiles"),
    Case(dict(B=1, D=17, M=4)),
    Case(dict(B=7, D=1, M=4)),
    Case(dict(B=8, D=33, M=1)),
    Case(dict(B=6, D=20, M=3), "non-contiguous x", layout="strided"),
    Case(dict(B=33, D=72, M=2), NON_NEGATIVE),
)

# A new fused op is one more entry here: its inputs, the fused call, the reference, its shapes.
OPS = (
    Op("asta", _asta_inputs, _asta_fused, _asta_reference, ASTA_CASES),
    Op("gathered_asta", _gathered_asta_inputs, _gathered_asta_fused, _gathered_asta_reference, GATHERED_ASTA_CASES),
    Op("qnn_train", _qnn_inputs, _qnn_train_fused, _qnn_train_reference, QNN_CASES),
    # What every QNN layer runs in mixed-precision training: fp32 x and weights under autocast.
    Op("qnn_train_autocast", _qnn_autocast_inputs, _qnn_autocast_fused, _qnn_autocast_reference,
       tuple(c for c in QNN_CASES if c.layout == "contiguous"), dtypes=(torch.bfloat16, torch.float16),
       result_dtype=_qnn_autocast_result_dtype),
    Op("qnn_eval", _qnn_inputs, _qnn_eval_fused, _qnn_eval_reference, QNN_CASES),
)


def _forward_and_grads(fn, leaves, extra, grad_out):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    out = fn(leaves, extra)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return {"out": out.detach(), **{f"grad_{k}": g for k, g in zip(leaves, grads)}}


def check_op(op: Op, case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[Row]:
    """Forward and every gradient of one op at one shape and dtype, against float64."""
    g = torch.Generator().manual_seed(seed)
    leaves, extra = op.make_inputs(case, dtype, device, g)
    grad_out = extra["grad_out"]
    got = _forward_and_grads(op.fused, leaves, extra, grad_out)
    up = {k: v.double() for k, v in leaves.items()}
    want = _forward_and_grads(op.reference, up, extra, grad_out.double())
    # The error scale: the same formulas on |inputs|, the sum of |terms| each rounding scales with.
    scale = _forward_and_grads(op.reference, {k: v.abs() for k, v in up.items()}, extra, grad_out.double().abs())
    tol = tolerances.OPS[dtype]
    rows = []
    for quantity in got:
        g_, w, s = got[quantity], want[quantity], scale[quantity]
        note = ""
        expected = op.result_dtype(quantity, dtype) if op.result_dtype else dtype
        if g_.dtype != expected or g_.shape != w.shape:
            note = f"wrong result: {g_.dtype} {tuple(g_.shape)}, expected {expected} {tuple(w.shape)}"
        abs_err = (g_.double() - w).abs().max().item() if w.numel() and not note else math.inf
        rel = tolerances.relative_error(g_, w, s, tol) if not note else math.inf
        rows.append(Row("ops", op.name, quantity, DTYPE_NAMES[dtype], case.describe(), abs_err, rel, tol.rtol,
                        note=note))
    return rows


# ----------------------------------------------------------------------------------------------
# The QNN kernels' dropout mask: every op check above replays it into the oracle, so a wrong keep
# rate or correlated draws would pass them. Checked here by its statistics.
# ----------------------------------------------------------------------------------------------

MASK_SIGMAS = 5.0  # a statistic this many standard deviations off fails (6e-7 of the time by chance)


def check_dropout_mask(device: torch.device, batch: int = 64, num_row: int = 4, dim: int = 1024,
                       p: float = QNN_DROPOUT, seed: int = 1234) -> list[Row]:
    """The keep rate is 1 - p, and keeps are independent between neighbouring elements, the M
    groups, batch rows and seeds: each as its distance from the expected frequency in standard
    deviations of that frequency."""
    keep = dropout_keep_mask(seed, batch, num_row, dim, p, device).cpu().view(batch, num_row, dim).double()
    other = dropout_keep_mask(seed + 1, batch, num_row, dim, p, device).cpu().view(batch, num_row, dim).double()
    q = 1.0 - p
    pairs = {"keep rate": (keep, None, q),
             "both kept: neighbouring elements": (keep[:, :, :-1], keep[:, :, 1:], q * q),
             "both kept: groups r and r+1": (keep[:, :-1], keep[:, 1:], q * q),
             "both kept: rows b and b+1": (keep[:-1], keep[1:], q * q),
             "both kept: seeds s and s+1": (keep, other, q * q)}
    rows = []
    for quantity, (a, b, want) in pairs.items():
        both = a if b is None else a * b
        got = both.mean().item()
        sigma = math.sqrt(want * (1 - want) / both.numel())
        rows.append(Row("ops", "qnn_dropout_mask", quantity, "bool", f"B={batch} M={num_row} D={dim} p={p}",
                        abs(got - want), abs(got - want) / sigma, MASK_SIGMAS,
                        note=f"{got:.5f} against {want:.5f}; error in standard deviations"))
    return rows


# ----------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------

QUICK_MODEL = dict(num_items=300, num_tags=40, embed_dim=8, mm_dim=16, attention_dim=16)


@dataclass
class ModelSetup:
    cfg: object  # QINConfig (dropout QNN_DROPOUT, its masks replayed: ReplayedDropout)
    batches: list  # dicts of CPU tensors
    tags: torch.Tensor
    mm: torch.Tensor
    weights: dict = field(default_factory=dict)  # the shared initial state_dict


def model_setup(quick: bool, steps: int, batch_size: int, seq_len: int = 64, seed: int = 0) -> ModelSetup:
    from qin.config import QINConfig
    from qin.model import QIN

    cfg = QINConfig(**(QUICK_MODEL if quick else {}), dropout=QNN_DROPOUT, asta_kernel="torch", qnn_kernel="torch")
    g = torch.Generator().manual_seed(seed)
    tags = torch.randint(0, cfg.num_tags, (cfg.num_items, cfg.tags_per_item), generator=g)
    tags[:, :2] = 0  # left padding, as in item_info.parquet
    tags[0] = 0
    mm = torch.randn(cfg.num_items, cfg.mm_dim, generator=g)
    mm[0] = 0
    batches = []
    for _ in range(1 + steps):
        seq = torch.randint(1, cfg.num_items, (batch_size, seq_len), generator=g)
        lengths = torch.randint(0, seq_len + 1, (batch_size,), generator=g)
        lengths[0] = 0  # an all-padding history
        seq = torch.where(torch.arange(seq_len)[None, :] >= (seq_len - lengths)[:, None], seq, 0)
        batches.append({
            "item_id": torch.randint(1, cfg.num_items, (batch_size,), generator=g),
            "item_seq": seq,
            "likes_level": torch.randint(0, cfg.num_levels, (batch_size,), generator=g),
            "views_level": torch.randint(0, cfg.num_levels, (batch_size,), generator=g),
            "label": torch.randint(0, 2, (batch_size,), generator=g).double(),
        })
    torch.manual_seed(seed)
    weights = QIN(cfg).state_dict()  # the authors' initialisation
    setup = ModelSetup(cfg, batches, tags, mm, weights)
    _calibrate_batchnorm(setup)
    return setup


def _calibrate_batchnorm(setup: ModelSetup) -> None:
    """Set the BatchNorm running statistics to the float64 model's averages over the setup's
    batches (train-mode forwards, no gradient), so that eval-mode logits are those of a model in
    use. At the initial statistics (mean 0, variance 1) the quick model's eval logits reached 3e4 at
    some seeds, past fp16's range: the fp16 eval row then compared infinities."""
    model = build(setup, "torch", torch.float64, torch.device("cpu"))
    norms = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    for norm in norms.values():
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches
    with torch.no_grad(), ReplayedDropout(model):
        for batch in setup.batches:
            model(batch)
    for name, norm in norms.items():
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{name}.{buffer}"
            setup.weights[key] = getattr(norm, buffer).to(setup.weights[key].dtype)


def build(setup: ModelSetup, backend: str, dtype: torch.dtype, device: torch.device):
    from qin.model import QIN

    model = QIN(dataclasses.replace(setup.cfg, asta_kernel=backend, qnn_kernel=backend))
    model.load_state_dict(setup.weights)
    model.load_item_info(setup.tags, setup.mm)
    return model.to(device=device, dtype=dtype).train()


MASK_SEED = 2025  # ReplayedDropout: the k-th dropout call of a block draws from MASK_SEED + k


class ReplayedDropout:
    """Within the block, every dropout `model` applies in training is a fixed mask: the k-th QNN
    projection call (kernels.quadratic_projection) the mask the Triton kernels draw for seed
    MASK_SEED + k, the k-th residual dropout (model.qnn.dropout) kernels.dropout.keep_mask for
    seed MASK_SEED + 1000 + k. The fused backend draws its mask itself from that seed, so its
    kernels run as in training; the torch backend (the plain model and the float64 oracle) applies
    the same mask through kernels.reference. Every model compared then drops the same elements."""

    def __init__(self, model):
        self.model, self.projections, self.residuals = model, 0, 0

    def _projection(self, x, weight, bias, num_row, *, dropout_p=0.0, training=False, seed=None, backend="auto"):
        if not training or dropout_p == 0.0:
            return self.original(x, weight, bias, num_row, dropout_p=dropout_p, training=training, seed=seed,
                                 backend=backend)
        seed, self.projections = MASK_SEED + self.projections, self.projections + 1
        if backend == "triton":
            return self.original(x, weight, bias, num_row, dropout_p=dropout_p, training=True, seed=seed,
                                 backend="triton")
        keep = dropout_keep_mask(seed, x.shape[0], num_row, x.shape[1], dropout_p, x.device)
        return reference.quadratic_projection(x, weight, bias, num_row, dropout_p, True, dropout_mask=keep)

    def _residual(self, module, inputs, output):
        if not module.training or module.p == 0.0:
            return None
        x = inputs[0]
        keep = keep_mask(x.shape, module.p, seed=MASK_SEED + 1000 + self.residuals).to(x.device)
        self.residuals += 1
        return x * keep.to(x.dtype) / (1.0 - module.p)

    def __enter__(self):
        self.original = kernels.quadratic_projection
        kernels.quadratic_projection = self._projection
        self.handle = self.model.qnn.dropout.register_forward_hook(self._residual)
        return self

    def __exit__(self, *exc):
        kernels.quadratic_projection = self.original
        self.handle.remove()


def training_loss(model, batch: dict, embedding_l2: float = 2e-4) -> torch.Tensor:
    """The training loss (BCE + embedding L2), with the BCE in fp32 or wider: in float64 for
    the float64 model (the training loop's fp32 BCE would put an fp32 rounding into the oracle)."""
    logits = model(batch)
    wide = torch.promote_types(logits.dtype, torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits.to(wide), batch["label"].to(wide))
    return bce + embedding_l2 / 2.0 * model.embedding_l2().to(wide)


def _on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


class ActivationBranch:
    """The branch a train-mode forward takes at the model's piecewise-linear activations (the QNN's
    PReLU, or ReLU), recorded from one model and imposed on another.

    Why: a 16-bit QIN rounds some BatchNorm outputs across zero, so its PReLU takes the other
    slope there than the float64 model does, and one such element of a sample with a large
    gradient moves a whole weight gradient by more than its own size. The float64 gradient of the
    function the 16-bit model actually took (its gates imposed) is the oracle its gradient is held
    to; the logits, which are continuous, are still compared with the model's own. Measured on the
    quick model (batch 16) in bf16 at setup seeds 0-39: 9 seeds failed the tolerance against the
    float64 model's own gradients and 1 on the bf16 model's branch; with an ASTA op computed in
    float64 and rounded once, 15 and 3: they are the 16-bit model's, not the op's.

    While active: `gates` None records each activation's gate (input > 0) into `self.gates`;
    given, the activations compute where(gate, x, slope * x) instead. Either way `self.bounds`
    gets, per PReLU weight, sum |x * dy| over the elements on its negative side: the running error
    bound of its gradient, a sum that cancels (the scale its error is measured against)."""

    def __init__(self, model, gates: dict | None = None):
        self.modules = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.ReLU, torch.nn.PReLU))}
        self.gates, self.pinned, self.bounds, self.handles = {}, gates, {}, []

    def _forward(self, name, module, inputs, output):
        x = inputs[0]
        if self.pinned is None:
            self.gates[name] = x.detach() > 0
            gate = self.gates[name]
        else:
            gate = self.pinned[name]
            slope = module.weight if isinstance(module, torch.nn.PReLU) else torch.zeros((), dtype=x.dtype)
            output = torch.where(gate, x, slope * x)
        if isinstance(module, torch.nn.PReLU) and output.requires_grad:
            off = ~gate
            output.register_hook(lambda dy: self.bounds.__setitem__(
                f"{name}.weight", (x.detach().abs() * dy.abs())[off].sum().item()))
        return output

    def __enter__(self):
        self.handles = [m.register_forward_hook(lambda mod, i, o, name=name: self._forward(name, mod, i, o))
                        for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def logits_and_grads(model, batch, gates: dict | None = None) -> tuple[dict, ActivationBranch]:
    """Eval-mode logits, train-mode logits and every parameter gradient of the training loss (its
    dropout masks replayed); and the train-mode forward's ActivationBranch (with `gates`, that
    forward takes those).

    The BatchNorm running statistics are put back afterwards, so that every call on a model
    sees the same ones (a train-mode forward moves them)."""
    saved = {name: b.clone() for name, b in model.named_buffers()}
    model.eval()
    with torch.no_grad():
        out = {"logits (eval mode)": model(batch)}
    model.train()
    model.zero_grad(set_to_none=True)
    logits = []  # the loss's own forward: a second one would draw its dropout masks again
    handle = model.register_forward_hook(lambda mod, args, output: logits.append(output.detach()))
    try:
        with ActivationBranch(model, gates) as branch, ReplayedDropout(model):
            training_loss(model, batch).backward()
    finally:
        handle.remove()
    out["logits (train mode)"] = logits[0]
    out.update({f"grad {n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(saved[name])
    return out, branch


class RoundAstaOutput:
    """While active, ASTA's output is rounded to `dtype` and back: one rounding of that size,
    injected into an otherwise float64 model."""

    def __init__(self, model, dtype):
        self.model, self.dtype, self.handle = model, dtype, None

    def __enter__(self):
        self.handle = self.model.asta.register_forward_hook(lambda mod, args, out: out.to(self.dtype).to(out.dtype))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _normwise(got: torch.Tensor, want: torch.Tensor, tol, scale: float | None = None) -> tuple[float, float]:
    """(max abs error, max error relative to `scale`, by default want's largest magnitude)."""
    abs_err = (got.double() - want.double()).abs().max().item()
    scale = torch.full_like(want.double(), want.abs().max().item() if scale is None else scale)
    return abs_err, tolerances.relative_error(got, want, scale, tol)


def _subnormal_note(weight: torch.Tensor, dtype: torch.dtype) -> str:
    """What the model's cast to `dtype` does to this weight before any arithmetic, where it matters:
    the share of its nonzero entries below the dtype's smallest normal (rounded to a coarse grid).
    Embedding tables initialised at std 1e-4 lose that way in fp16, and BatchNorm downstream
    magnifies it: the model's gradient for them is then far from float64's at the unrounded weights."""
    if not weight.is_floating_point() or dtype.itemsize >= 4:
        return ""
    nonzero = weight[weight != 0]
    share = (nonzero.abs() < torch.finfo(dtype).tiny).double().mean().item() if nonzero.numel() else 0.0
    return f"{share:.0%} of this weight is subnormal in {DTYPE_NAMES[dtype]}" if share >= 0.01 else ""


def check_model(setup: ModelSetup, dtypes, device, steps: int = 0, all_grads: list | None = None) -> list[Row]:
    """Logits and gradients per dtype, with the reference ops and with the fused ops, against
    model.double(); then `steps` Adam steps. The plain (reference-ops) model must be within the
    table's tolerance; the fused model within that, or within MODEL_VS_PLAIN x the plain model's
    own error in the same dtype where that is larger (16-bit QIN is far from its float64 self).

    fp32 runs with the setup's dropout (its masks replayed), so the fused QNN kernels run as in
    training; 16-bit without: with dropout on the quick model's 16-bit gradients were further
    from float64's than a normwise check can use, whatever the kernels (bf16 with the reference
    ops alone: above 1 at 2 of 8 setup seeds, against 0.09 at most in fp16)."""
    cfg = setup.cfg
    shape = (f"B={setup.batches[0]['item_id'].shape[0]} L={setup.batches[0]['item_seq'].shape[1]} "
             f"D={cfg.qnn_dim} items={cfg.num_items}")
    batch = _on(setup.batches[0], device)
    without_dropout = dataclasses.replace(setup, cfg=dataclasses.replace(cfg, dropout=0.0))
    oracles = {}  # setup -> (float64 model, its results, the PReLU slopes' error scales)
    rows = []
    for dtype in dtypes:
        run = setup if dtype == torch.float32 else without_dropout
        if id(run) not in oracles:
            oracle = build(run, "torch", torch.float64, device)
            want, oracle_branch = logits_and_grads(oracle, batch)
            # A PReLU slope's gradient is a sum that cancels: measured against its running error bound.
            oracles[id(run)] = oracle, want, {f"grad {name}": b for name, b in oracle_branch.bounds.items()}
        oracle, want, scales = oracles[id(run)]
        table = tolerances.MODEL[dtype]
        with RoundAstaOutput(oracle, dtype):
            moved, _ = logits_and_grads(oracle, batch)
        floors = {q: _normwise(moved[q], want[q], table, scales.get(q))[1] for q in want}
        plain_error = {}
        for backend in ("torch", "triton"):  # the plain model first: it sets the fused one's tolerance
            got, branch = logits_and_grads(build(run, backend, dtype, device), batch)
            # The gradients against float64's on the branch this model took (ActivationBranch).
            on_branch, _ = logits_and_grads(oracle, batch, branch.gates)
            label = f"model[{backend}]"
            grads = []
            for q in want:
                oracle_q = on_branch[q] if q.startswith("grad ") else want[q]
                abs_err, rel = _normwise(got[q], oracle_q, table, scales.get(q))
                tol, note = table.rtol, ""
                if backend == "torch":
                    plain_error[q] = rel
                elif tolerances.MODEL_VS_PLAIN * plain_error[q] > tol:
                    # at most MODEL_VS_PLAIN x the table's: a failing plain model widens nothing further
                    tol = tolerances.MODEL_VS_PLAIN * min(plain_error[q], table.rtol)
                    note = f"tol {tolerances.MODEL_VS_PLAIN:g} x torch's"
                if q.startswith("grad "):
                    note = "; ".join(filter(None, [note, _subnormal_note(setup.weights[q[5:]], dtype)]))
                row = Row("model", label, q, DTYPE_NAMES[dtype], shape, abs_err, rel, tol, floors[q], note)
                if q.startswith("grad"):
                    grads.append(row)
                    if all_grads is not None:
                        all_grads.append(row)
                else:
                    rows.append(row)
            # One summary line for the gradients: the one furthest over (or nearest to) its tolerance.
            worst = max(grads, key=lambda r: (math.isnan(r.max_rel), r.max_rel / r.tolerance))
            rows.append(Row("model", label, f"every parameter gradient ({len(grads)})", DTYPE_NAMES[dtype], shape,
                            worst.max_abs, worst.max_rel, worst.tolerance, max(r.noise_floor for r in grads),
                            f"worst: {worst.quantity[5:]}" + (f"; {worst.note}" if worst.note else "")))
    if steps:
        rows += check_steps(setup, device, steps, shape)
    return rows


def loss_curve(model, batches, device, perturb_dtype=None) -> list[float]:
    """Losses of `len(batches)` Adam steps (the paper's lr), the dropout masks replayed."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    with ReplayedDropout(model):
        for batch in batches:
            losses.append(_adam_step(model, optimizer, _on(batch, device), perturb_dtype))
    return losses


def _adam_step(model, optimizer, batch, perturb_dtype) -> float:
    if perturb_dtype is None:
        loss = training_loss(model, batch)
    else:
        with RoundAstaOutput(model, perturb_dtype):
            loss = training_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def check_steps(setup, device, steps, shape) -> list[Row]:
    dtype = torch.float32
    tol = tolerances.STEPS[dtype]
    batches = setup.batches[1:1 + steps]
    want = torch.tensor(loss_curve(build(setup, "torch", torch.float64, device), batches, device))
    moved = torch.tensor(loss_curve(build(setup, "torch", torch.float64, device), batches, device, dtype))
    floor = ((moved - want).abs() / want.abs()).max().item()
    rows = []
    for backend in ("torch", "triton"):
        got = torch.tensor(loss_curve(build(setup, backend, dtype, device), batches, device))
        err = (got - want).abs()
        rows.append(Row("model", f"model[{backend}]", f"loss over {steps} Adam steps", DTYPE_NAMES[dtype], shape,
                        err.max().item(), (err / want.abs()).max().item(), tol.rtol, floor))
    return rows


# ----------------------------------------------------------------------------------------------
# Training: the same short run with each backend over N seeds
# ----------------------------------------------------------------------------------------------

AGREE_WITHIN = 2.0  # |difference of means| <= 2 x the larger seed spread (std)


def training_runs(device: torch.device, seeds: int, quick: bool, log=print) -> tuple[list[Row], list[str]]:
    """Valid AUC of the same run per backend and seed, on CUDA (the CLI refuses --training on the
    CPU). Full: the built-in `qin train` run (the paper's model, batch 512, 4 epochs); --quick:
    the same with 1 epoch."""
    from qin.commands_common import BUILTIN_SETTINGS
    from qin.config import load_config
    from qin.data import load_dataset
    from qin.synth import builtin_dataset
    from qin.train import Trainer, fill_vocab_from_data

    epochs = 1 if quick else BUILTIN_SETTINGS["train"]["epochs"]
    what = f"built-in dataset, the `qin train` run, {epochs} epoch(s)"
    dataset = load_dataset(builtin_dataset())
    aucs = {}
    with tempfile.TemporaryDirectory(prefix="qin-parity-") as tmp:
        for backend in ("torch", "triton"):
            aucs[backend] = []
            for s in range(seeds):
                # fp32, as the row says (auto would train in bf16 on a recent GPU)
                cfg = load_config(overrides=[f"model.asta_kernel={backend}", f"model.qnn_kernel={backend}",
                                             f"train.device={device}", f"train.epochs={epochs}",
                                             "train.precision=fp32"],
                                  base=BUILTIN_SETTINGS)
                cfg.train.seed += s
                fill_vocab_from_data(cfg, dataset)
                start = time.perf_counter()
                state = Trainer(cfg, dataset, Path(tmp) / f"{backend}-{s}", log=lambda *_: None).fit()
                aucs[backend].append(state.best_auc)
                log(f"  training {backend} seed {s}: valid AUC {state.best_auc:.4f} "
                    f"({time.perf_counter() - start:.0f} s)")
    return summarise_training(aucs, what)


def summarise_training(aucs: dict, what: str) -> tuple[list[Row], list[str]]:
    """One row: |mean(triton) - mean(torch)| in units of the larger spread; passes within AGREE_WITHIN."""
    stats = {b: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for b, v in aucs.items()}
    diff = abs(stats["triton"][0] - stats["torch"][0])
    spread = max(s for _, s in stats.values())
    in_spreads = diff / spread if spread > 0 else (0.0 if diff == 0 else math.inf)
    seeds = len(aucs["torch"])
    row = Row("training", "training", "valid AUC: |difference of means| / spread", "fp32", f"{seeds} seeds, {what}",
              diff, in_spreads, AGREE_WITHIN,
              note=f"torch {stats['torch'][0]:.4f} ± {stats['torch'][1]:.4f}, "
                   f"triton {stats['triton'][0]:.4f} ± {stats['triton'][1]:.4f}")
    verdict = "agree" if row.passed else "DO NOT agree"
    lines = [f"Training ({what}; {seeds} seeds per backend): valid AUC torch {stats['torch'][0]:.4f} ± "
             f"{stats['torch'][1]:.4f}, triton {stats['triton'][0]:.4f} ± {stats['triton'][1]:.4f} (mean ± std); "
             f"the means differ by {diff:.4f} = {in_spreads:.2f} x the larger spread: they {verdict} "
             f"(allowed: {AGREE_WITHIN:g} x)."]
    return [row], lines


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def environment(device: torch.device) -> list[str]:
    import triton

    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), Triton kernels compiled"
    else:
        where = f"CPU {platform.machine()} ({os.cpu_count()} cores), Triton kernels under the interpreter " \
                f"(TRITON_INTERPRET=1; bf16/fp16 arithmetic upcast to fp32 there)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return [f"device: {where}",
            f"versions: python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]


COLUMNS = ("check", "op", "quantity", "dtype", "shape", "max abs error", "max rel error", "tolerance",
           "noise floor", "pass", "note")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _cells(r: Row) -> list[str]:
    return [r.check, r.op, r.quantity, r.dtype, r.shape, _fmt(r.max_abs), _fmt(r.max_rel), _fmt(r.tolerance),
            _fmt(r.noise_floor), "yes" if r.passed else "FAIL", r.note]


def worst_per_op(rows: list[Row]) -> list[Row]:
    """The worst relative error per (op, dtype) of the op checks: the summary table."""
    worst: dict = {}
    for r in rows:
        if r.check != "ops":
            continue
        key = (r.op, r.dtype)
        if key not in worst or not r.max_rel <= worst[key].max_rel:
            worst[key] = r
    return list(worst.values())


def markdown_table(rows: list[Row]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return lines


REPORT_FILES = ("parity.csv", "parity.md")  # parity.md last: it says whether the run finished


def mark_incomplete(out: Path, header: list[str]) -> None:
    """Before any check: parity.md says the run has not finished, and an earlier parity.csv is
    gone, so a run that fails or is stopped never leaves an earlier report standing as its own."""
    out.mkdir(parents=True, exist_ok=True)
    # In a fresh folder, as write_report does: a fixed name could be a link planted in a shared
    # folder, and writing it would write through the link.
    staging = Path(tempfile.mkdtemp(prefix=".parity.", dir=out))
    try:
        (staging / "parity.md").write_text("\n".join(["# qin parity", "", *[f"- {h}" for h in header], "",
                                                     "**INCOMPLETE**: this run has not finished (it is running, "
                                                     "failed or was stopped); it compared nothing yet.", ""]),
                                           encoding="utf-8")
        (out / "parity.csv").unlink(missing_ok=True)
        os.replace(staging / "parity.md", out / "parity.md")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_report(out: Path, header: list[str], rows: list[Row], extra_rows: list[Row], notes: list[str],
                 done_so_far: str | None = None) -> None:
    """parity.csv and parity.md, written beside `out`'s old ones and renamed over them, parity.md last.
    `done_so_far` (the checks finished): a report of a run still going, marked INCOMPLETE, so that a
    run stopped by a time box keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".parity.", dir=out))
    try:
        _write_report_files(staging, header, rows, extra_rows, notes, done_so_far)
        for name in REPORT_FILES:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_report_files(out: Path, header: list[str], rows: list[Row], extra_rows: list[Row], notes: list[str],
                        done_so_far: str | None = None) -> None:
    with open(out / "parity.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([c.replace(" ", "_") for c in COLUMNS])
        for r in rows + extra_rows:
            writer.writerow([r.check, r.op, r.quantity, r.dtype, r.shape, repr(r.max_abs), repr(r.max_rel),
                             repr(r.tolerance), "" if r.noise_floor is None else repr(r.noise_floor),
                             "yes" if r.passed else "FAIL", r.note])
    failed = [r for r in rows + extra_rows if not r.passed]
    md = ["# qin parity", "", *[f"- {h}" for h in header], ""]
    if done_so_far:
        md += [f"**INCOMPLETE**: this run has not finished (it is running, failed or was stopped); the checks "
               f"done so far: {done_so_far}.", ""]
    md += [f"**{len(failed)} FAILED**: " + "; ".join(r.name for r in failed) if failed else
           f"**All {len(rows) + len(extra_rows)} comparisons pass.**", ""]
    md += ["Worst relative error per op and dtype (every shape, forward and every gradient):", ""]
    md += markdown_table(worst_per_op(rows)) + [""]
    md += [*notes, ""] if notes else []
    md += ["Every comparison (parity.csv also has each parameter's gradient):", ""] + markdown_table(rows) + [""]
    md += ["Errors are against float64 evaluations of the same function on the same inputs; tolerances are "
           "kernels/tolerances.py. Ops: relative to the formula evaluated on |inputs| (the sum of |terms|). "
           "Model: normwise per tensor (max |error| / max |float64 value|); its noise floor is how far the "
           "float64 result moves when ASTA's output alone is rounded to that dtype."]
    (out / "parity.md").write_text("\n".join(md) + "\n", encoding="utf-8")


def print_table(rows: list[Row], log=print) -> None:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for c in cells:
        log("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def _argv(args) -> list[str]:
    argv = ["--device", args.device, "--out", str(args.out), "--seeds", str(args.seeds)]
    argv += ["--quick"] if args.quick else []
    argv += ["--training"] if args.training else []
    argv += ["--only", args.only] if args.only else []
    argv += ["--force"] if args.force else []
    return argv


def rerun_if_interpreter_differs(args) -> int | None:
    """The Triton kernels run compiled on CUDA and under the interpreter on the CPU, and Triton
    reads TRITON_INTERPRET once, when it is imported: `qin` imports it before any subcommand
    runs. So when the setting does not fit the device, run this same command again in a fresh
    Python with TRITON_INTERPRET set (CPU) or removed (CUDA), and return its exit status."""
    want = args.device == "cpu"
    if kernels.utils.INTERPRETING == want:
        return None
    if os.environ.get(CHILD_ENV):
        raise ValueError("TRITON_INTERPRET does not match the device even in a fresh process")
    env = dict(os.environ, **{CHILD_ENV: "1"})
    if want:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    child = subprocess.Popen([sys.executable, "-m", "qin", "parity", *_argv(args)], env=env)
    # A Ctrl-C reaches the child too (the terminal signals the whole process group), and the child
    # says what it kept: this process only waits for it, where it printed a second traceback and
    # subprocess.run killed the child 0.25 s later. Ignored after the start: the child inherits it.
    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works there only
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        status = child.wait()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if status == -signal.SIGINT:  # the child said why and died of it: this process leaves the same way
        raise StoppedBySignal("", signal.SIGINT, reported=True)
    return status if status >= 0 else 128 - status  # another signal, as a shell reports it


CHECK_NAMES = tuple(op.name for op in OPS) + ("qnn_dropout_mask", "model")


def only_prefixes(only: str | None) -> list[str]:
    """The --only prefixes; each must name at least one check, so a typo cannot pass by checking nothing."""
    prefixes = [p.strip() for p in (only or "").split(",") if p.strip()]
    unknown = [p for p in prefixes if not any(n.startswith(p) for n in CHECK_NAMES)]
    if unknown:
        raise ValueError(f"--only: {', '.join(unknown)} names no check; the checks are {', '.join(CHECK_NAMES)}")
    return prefixes


def selected(name: str, only: str | None) -> bool:
    """A check's whole name selects it alone (qnn_train, not qnn_train_autocast too); else a prefix."""
    prefixes = only_prefixes(only)
    return not prefixes or any(name == p or (p not in CHECK_NAMES and name.startswith(p)) for p in prefixes)


def run(args, log=print) -> int:
    """`qin parity`; returns 0 when every comparison passes, 1 (naming them) when any fails."""
    device = torch.device(args.device)
    compiled = device.type == "cuda"
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([] if compiled else [torch.float64])
    start = time.perf_counter()
    header = environment(device)
    header.append(f"mode: {'--quick' if args.quick else 'full'}" + (" --training" if args.training else ""))
    for line in header:
        log(line)
    mark_incomplete(Path(args.out), header)
    done: list[str] = []

    def so_far(check: str) -> None:
        done.append(check)
        write_report(Path(args.out), header, rows, [], notes, ", ".join(done))
    notes = []
    if not compiled:
        notes.append("On the CPU the paper-size cases (ASTA B=8192 L=64 D=384, B=256 L=513; QNN B=8192 D=1024 "
                     "M=4) are left out: the interpreter would take hours. `qin parity --device cuda` runs them.")
    elif args.quick:
        notes.append("--quick: the paper-size cases are left out; run without --quick for them.")

    rows: list[Row] = []
    for op in OPS:
        if not selected(op.name, args.only):
            continue
        for case in op.cases:
            if (case.runs == "compiled" and not compiled) or (case.runs != "always" and args.quick):
                continue
            for dtype in dtypes:
                if op.dtypes is None or dtype in op.dtypes:
                    rows += check_op(op, case, dtype, device)
        log(f"{op.name}: {len([r for r in rows if r.op == op.name])} comparisons "
            f"({time.perf_counter() - start:.0f} s)")
        so_far(op.name)

    if selected("qnn_dropout_mask", args.only):
        rows += check_dropout_mask(device)
        log(f"qnn_dropout_mask: done ({time.perf_counter() - start:.0f} s)")
        so_far("qnn_dropout_mask")

    all_grads: list[Row] = []
    if selected("model", args.only):
        quick_model = args.quick or not compiled
        setup = model_setup(quick_model, steps=3 if quick_model else 10, batch_size=16 if quick_model else 2048,
                            seq_len=8 if quick_model else 64)
        model_dtypes = [torch.float32, torch.bfloat16, torch.float16]
        rows += check_model(setup, model_dtypes, device, steps=3 if quick_model else 10, all_grads=all_grads)
        log(f"model: done ({time.perf_counter() - start:.0f} s)")
        so_far("model")
        notes.append("Model: a small QINConfig (300 items, embed_dim 8, d_a 16, the paper's 4 layers and M=4), "
                     "batch 16, history 8." if quick_model else
                     "Model: the paper's QINConfig (31,244,293 parameters), batch 2048, history 64.")
        notes.append("Model gradients are held to float64's on the branch each model took at its PReLU "
                     "activations (its gates imposed on the float64 model: a 16-bit model rounds some inputs "
                     "across zero); a PReLU slope's gradient, a sum that cancels, is measured against its "
                     "running error bound, sum |x dy| over the negative side.")
    if args.training:
        train_rows, lines = training_runs(device, args.seeds, args.quick, log)
        rows += train_rows
        notes += lines

    elapsed = time.perf_counter() - start
    header.append(f"wall time: {elapsed:.0f} s")
    out = Path(args.out)
    write_report(out, header, rows, all_grads, notes)
    log("")
    print_table(rows, log)
    for n in notes:
        log(n)
    failed = [r for r in rows + all_grads if not r.passed]
    log(f"\nwrote {out / 'parity.md'} and {out / 'parity.csv'} ({elapsed:.0f} s)")
    if failed:
        log(f"qin parity: {len(failed)} comparison(s) FAILED:", )
        for r in failed:
            log(f"  {r.name}: relative error {_fmt(r.max_rel)} > tolerance {_fmt(r.tolerance)} {r.note}".rstrip())
        return 1
    log(f"qin parity: all {len(rows) + len(all_grads)} comparisons pass")
    return 0

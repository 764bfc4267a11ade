"""`qin train` with ASTA's attention op outside autocast, in fp32, in one of two forms:

  VARIANT=op       the op reads the item representations unrounded (ASTA's one cast of the
                   history is skipped) and the query in fp32 (computed by bf16 GEMMs: W_q, W_k,
                   W_v, W_o stay under autocast), and returns the pooled sum in fp32. The
                   bf16astaop-* runs; `qin train`'s default from 8c965b6 (model.asta_precision=fp32).
  VARIANT=outputs  the op is fed the bf16-rounded representations and query, upcast, so only what
                   it returns (pooled sum, scores, gradients) stays fp32. The bf16astarr-* runs;
                   from 8c965b6 on, add model.asta_precision=autocast to round them before the op.

    VARIANT=op python train_asta_op_fp32.py train --out DIR train.seed=S train.precision=bf16 train.epochs=12

(The runs were made at 6d6bb92 with one script per variant; this one repeats them.)
"""
import os
import sys

import torch

import qin.model as M

variant = os.environ.get("VARIANT")
if variant not in ("op", "outputs"):
    raise SystemExit(f"VARIANT must be op or outputs, got {variant!r}")
if variant == "op":
    M.autocast_dtype = lambda device_type: None  # ASTA's one cast of the history: skipped
_op = M.kernels.gathered_sparse_target_attention


def op_in_fp32(reps, index, query, mask, **kwargs):
    with torch.autocast(reps.device.type, enabled=False):
        return _op(reps.float(), index, query.float(), mask.float(), **kwargs)


M.kernels.gathered_sparse_target_attention = op_in_fp32

from qin.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))

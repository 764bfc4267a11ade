"""`qin train` with ASTA's attention op outside autocast but fed the bf16-rounded item
representations and query (upcast): what it computes differs from the default bf16 run only in
the op's outputs (pooled sum, scores, gradients), which stay fp32 instead of rounding to bf16.
    python train_asta_op_fp32_rounded_reps.py train --out DIR train.seed=S train.precision=bf16 train.epochs=12
(the bf16astarr-* runs, at 6d6bb92; from the commit that made the op's fp32 the default on, add
model.asta_precision=autocast, so that the representations are rounded before the op as here)
"""
import sys

import torch

import qin.model as M

_op = M.kernels.gathered_sparse_target_attention


def op_in_fp32(reps, index, query, mask, **kwargs):
    with torch.autocast(reps.device.type, enabled=False):
        return _op(reps.float(), index, query.float(), mask.float(), **kwargs)


M.kernels.gathered_sparse_target_attention = op_in_fp32

from qin.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))

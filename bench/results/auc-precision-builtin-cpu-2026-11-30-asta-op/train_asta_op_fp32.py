"""`qin train` with only ASTA's attention op in fp32 under autocast: the item representations it
reads are not rounded to bf16, the query reaches it in fp32 (computed by bf16 GEMMs, as the
rest of ASTA's products: W_q, W_k, W_v, W_o stay under autocast), and the pooled sum leaves it
in fp32.
    python train_asta_op_fp32.py train --out DIR train.seed=S train.precision=bf16 train.epochs=12
(the bf16astaop-* runs, at 6d6bb92; what `qin train` does by default from the commit that added
this folder, model.asta_precision=fp32)
"""
import sys

import torch

import qin.model as M

M.autocast_dtype = lambda device_type: None  # ASTA's one cast of the history: skipped
_op = M.kernels.gathered_sparse_target_attention


def op_in_fp32(reps, index, query, mask, **kwargs):
    with torch.autocast(reps.device.type, enabled=False):
        return _op(reps.float(), index, query.float(), mask.float(), **kwargs)


M.kernels.gathered_sparse_target_attention = op_in_fp32

from qin.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))

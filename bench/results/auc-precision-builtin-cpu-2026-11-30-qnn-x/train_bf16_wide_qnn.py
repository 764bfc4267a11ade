"""`qin train` with the QNN's quadratic output kept in the residual stream's dtype: the bf16wide-*
runs of this folder, a variant tried beside the adopted one and not adopted.

    python train_bf16_wide_qnn.py train --out DIR train.seed=S train.precision=bf16 train.epochs=12

The adopted code rounds y = x * s (x the fp32 residual stream, s the bf16 group sum) once to bf16
(kernels.reference.quadratic_product). Here y stays fp32, so BatchNorm, PReLU and dropout after it
run in fp32 too, and grad_x's direct term gy * s takes an fp32 gy. (The runs here were made with an
equivalent stand-alone copy of the CPU training path; this one-line form repeats its first epoch
to the last digit: train loss 0.6466, valid AUC 0.7004 at seed 20242025.)
"""
import sys

import kernels.reference

kernels.reference.quadratic_product = lambda x, s: x * s  # fp32 x times bf16 s: an fp32 y

from qin.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))

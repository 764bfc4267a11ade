"""`qin train` with one part of the model run outside autocast, in fp32: VARIANT=asta (the ASTA module)
or qnn (the QNN quadratic layers). Used for the bf16asta-* runs of this folder:
    VARIANT=asta python train_with_part_in_fp32.py train --out DIR train.seed=S train.precision=bf16 train.epochs=9
"""
import os, sys, torch
import qin.model as M
variant = os.environ["VARIANT"]

def fp32(cls):
    orig = cls.forward
    def forward(self, *args, **kwargs):
        dev = next(self.parameters()).device.type
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast(dev, enabled=False):
            return orig(self, *args, **kwargs)
    cls.forward = forward

if variant == "asta":
    fp32(M.SparseTargetAttention)
elif variant == "qnn":
    fp32(M.QuadraticLayer)
else:
    raise SystemExit(f"unknown VARIANT {variant}")
from qin.cli import main
sys.exit(main(sys.argv[1:]))

"""Which module's output first goes non-finite in fp16 training of the built-in run (CPU autocast fp16)."""
import sys, torch
import qin.train as qt
from qin.cli import main
orig = qt.build_model
state = {"step": 0}
def hooked(cfg, dataset, device):
    model = orig(cfg, dataset, device)
    def check(mod, inp, out, name=None):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if torch.is_tensor(o) and o.is_floating_point() and not torch.isfinite(o).all():
                ins = [i for i in inp if torch.is_tensor(i) and i.is_floating_point()]
                print(f"NON-FINITE output of {name} ({type(mod).__name__}) dtype {o.dtype}; inputs absmax",
                      [f"{i.dtype} {i.detach().abs().max().item():.3g}" for i in ins], flush=True)
                raise SystemExit(3)
        for o in outs:
            if torch.is_tensor(o) and o.dtype == torch.float16:
                m = o.detach().abs().max().item()
                if m > 3e4: print(f"near overflow: {name} absmax {m:.3g}", flush=True)
    for name, mod in model.named_modules():
        mod.register_forward_hook(lambda m, i, o, name=name: check(m, i, o, name))
    return model
qt.build_model = hooked
sys.exit(main(["train", "train.precision=fp16", "--out", sys.argv[1]]))

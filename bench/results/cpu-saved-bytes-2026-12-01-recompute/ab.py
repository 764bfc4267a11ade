"""A/B: the default training step (bench_train's) in fp32 and bf16, median of N steps, from the tree on sys.path."""
import sys, time, statistics, torch
from bench.bench_train import synthetic_batch, build, _forward_loss
from qin.config import QINConfig
from qin.train import make_optimizer
from qin.host_memory import keep_freed_memory, bound_kept_memory
keep_freed_memory()
B = 1024
dev = torch.device("cpu")
data = synthetic_batch(B, dev)
out = []
for amp in (None, torch.bfloat16):
    model = build(QINConfig(), dev)
    opt = make_optimizer(model, 2e-3)
    def step():
        loss = _forward_loss(model, data, amp)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0); opt.step(); bound_kept_memory()
    for _ in range(2): step()
    ts = []
    for _ in range(int(sys.argv[1])):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    out.append(f"{'bf16' if amp else 'fp32'} {B/statistics.median(ts):7.0f}")
print(" ".join(out))

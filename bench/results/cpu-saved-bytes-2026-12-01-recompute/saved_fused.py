import os, time
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
from bench.bench_train import synthetic_batch, build, _forward_loss, saved_bytes
from qin.config import QINConfig
B = int(os.environ.get("B", "1024"))
data = synthetic_batch(B, torch.device("cpu"))
for name, over, amp in [("default", {}, None), ("default", {}, torch.bfloat16),
                        ("all fused", dict(asta_kernel="triton", qnn_kernel="triton"), None),
                        ("all fused", dict(asta_kernel="triton", qnn_kernel="triton"), torch.bfloat16)]:
    model = build(QINConfig(**over), torch.device("cpu"))
    t = time.time()
    s = saved_bytes(lambda: _forward_loss(model, data, amp), [*model.parameters(), *model.buffers(), *data.values()])
    print(f"{name:10s} {'bf16' if amp else 'fp32'}: {s/B:9,.0f} B/sample  ({time.time()-t:.0f} s)", flush=True)

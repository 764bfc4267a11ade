"""Mean step time and resident memory of a real `qin train` run on the built-in data: the numbers
behind qin/host_memory.py's table.

    python bench/results/cpu-train-step-2026-12-01-zen5/step_memory.py OUT_DIR PRECISION EPOCHS LABEL

Prints one JSON line. Steps are timed from the end of one optimizer step to the end of the next;
the steps that straddle a validation pass (over 3 s) and the first five are left out. Settings
such as QIN_KEEP_FREED_MEMORY and THP_MEM_ALLOC_ENABLE come from the environment.
"""
import json
import resource
import sys
import time

import qin.train
from qin.cli import main


def resident_mb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) // 1024 for line in fh if line.startswith("VmRSS"))


records = []
step = qin.train.Trainer._deferred_step


def timed_step(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    records.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt, resident_mb()))
    return out


qin.train.Trainer._deferred_step = timed_step
out_dir, precision, epochs, label = sys.argv[1:5]
main(["train", "--out", out_dir, f"train.precision={precision}", f"train.epochs={epochs}"])
times = [(b[0] - a[0]) * 1e3 for a, b in zip(records, records[1:])][5:]
times = [t for t in times if t < 3000]
print(json.dumps({"label": label, "precision": precision, "mean_step_ms": round(sum(times) / len(times), 1),
                  "faults_per_step": round((records[-1][1] - records[5][1]) / (len(records) - 6)),
                  "resident_mb_at_start_middle_end": [records[i][2] for i in (5, len(records) // 2, -1)],
                  "max_resident_mb": max(r[2] for r in records)}))

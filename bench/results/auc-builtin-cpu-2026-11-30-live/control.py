"""Best valid AUC over 12 epochs, and the mean over epochs 5-12, of three fp32 forms of the same
function, paired by seed: the dense ASTA op (the baseline), the dense op summing the positions in
reverse order (the control: rounding alone), and the op reading live positions only.

    python bench/results/auc-builtin-cpu-2026-11-30-live/control.py
"""
import json
import math
from pathlib import Path

HERE = Path(__file__).parent
GROUPS = {"dense": HERE.parent / "auc-precision-builtin-cpu-2026-11-30-qnn-x" / "fp32",
          "control": HERE / "fp32ctl", "live": HERE / "fp32live"}
SEEDS = ["20242025", "1", "2", "3", "4", "5"]


def aucs(prefix: Path, seed: str) -> list[float]:
    path = prefix.parent / f"{prefix.name}-{seed}.metrics.jsonl"
    return [json.loads(line)["valid_auc"] for line in path.open()][:12]


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def main() -> None:
    runs = {g: {s: aucs(p, s) for s in SEEDS} for g, p in GROUPS.items()}
    stats = {"best of epochs 1-12": max, "mean of epochs 5-12": lambda a: sum(a[4:12]) / len(a[4:12])}
    for label, stat in stats.items():
        value = {g: {s: stat(runs[g][s]) for s in SEEDS} for g in GROUPS}
        print(f"\n## {label}\n")
        print("| seed | " + " | ".join(GROUPS) + " | control - dense | live - dense | live - control |")
        print("|---" * (len(GROUPS) + 4) + "|")
        for s in SEEDS:
            v = value
            print(f"| {s} | " + " | ".join(f"{v[g][s]:.4f}" for g in GROUPS)
                  + f" | {v['control'][s] - v['dense'][s]:+.4f} | {v['live'][s] - v['dense'][s]:+.4f}"
                  f" | {v['live'][s] - v['control'][s]:+.4f} |")
        cells = [f"{mean_se(list(value[g].values()))[0]:.4f}" for g in GROUPS]
        for a, b in (("control", "dense"), ("live", "dense"), ("live", "control")):
            m, se = mean_se([value[a][s] - value[b][s] for s in SEEDS])
            lower = sum(value[a][s] < value[b][s] for s in SEEDS)
            cells.append(f"{m:+.4f} ({se:.4f}), lower at {lower}")
        print("| mean (SE) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

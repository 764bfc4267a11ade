"""Valid AUC of bf16 against fp32 runs, paired by seed, per epoch: the tables of this folder's README.

    python bench/results/auc-precision-builtin-cpu-2026-11-30-plateau/paired_auc.py [A B [DIR]]

Reads NAME-SEED.metrics.jsonl in DIR (default: beside this file) and compares runs named B
(default bf16) with runs named A (default fp32) of the same seed, over the epochs both have.
A name with a folder in it (../other/fp32) reads that folder's runs instead.
"""
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).parent


def runs(name: str, folder: Path = HERE) -> dict[str, list[float]]:
    folder, name = folder / Path(name).parent, Path(name).name
    return {p.name[len(name) + 1:-len(".metrics.jsonl")]: [json.loads(line)["valid_auc"] for line in p.open()]
            for p in sorted(folder.glob(f"{name}-*.metrics.jsonl"))}


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def main() -> None:
    a_path, b_path = sys.argv[1:3] if len(sys.argv) > 2 else ("fp32", "bf16")
    folder = Path(sys.argv[3]) if len(sys.argv) > 3 else HERE
    a, b = runs(a_path, folder), runs(b_path, folder)
    a_name, b_name = Path(a_path).name, Path(b_path).name
    seeds = [s for s in a if s in b]
    epochs = min(min(len(a[s]), len(b[s])) for s in seeds)
    print(f"{b_name} - {a_name}, seeds {', '.join(seeds)}, epochs 1-{epochs}\n")
    print(f"| epoch | {a_name} mean | {b_name} mean | paired difference (standard error) | {b_name} ahead |")
    print("|---|---|---|---|---|")
    for e in range(epochs):
        diff = mean_se([b[s][e] - a[s][e] for s in seeds])
        print(f"| {e + 1} | {mean_se([a[s][e] for s in seeds])[0]:.4f} | {mean_se([b[s][e] for s in seeds])[0]:.4f} "
              f"| {diff[0]:+.4f} ({diff[1]:.4f}) | {sum(b[s][e] > a[s][e] for s in seeds)} of {len(seeds)} |")
    best = mean_se([max(b[s][:epochs]) - max(a[s][:epochs]) for s in seeds])
    print(f"\nbest over the {epochs} epochs, {b_name} - {a_name}: {best[0]:+.4f} (standard error {best[1]:.4f})")
    for s in seeds:
        print(f"- seed {s}: {a_name} {' '.join(f'{x:.4f}' for x in a[s][:epochs])}")
        print(f"  {' ' * len(s)}       {b_name} {' '.join(f'{x:.4f}' for x in b[s][:epochs])}")


if __name__ == "__main__":
    main()

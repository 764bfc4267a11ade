"""Best valid AUC over 12 epochs of the built-in run, bf16 (the default: ASTA's attention op in
fp32) against fp32, paired by seed: this folder's seeds, the six earlier ones, and all together.

    python bench/results/auc-precision-builtin-cpu-2026-12-04-plateau/pooled_best_auc.py

The earlier six: fp32 from ../auc-precision-builtin-cpu-2026-11-30-qnn-x (fp32-SEED), bf16 from
../auc-precision-builtin-cpu-2026-11-30-asta-op (bf16astaop-SEED), as that folder's README pairs them.
"""
import json
import math
from pathlib import Path

HERE = Path(__file__).parent
EARLIER = (HERE.parent / "auc-precision-builtin-cpu-2026-11-30-qnn-x", "fp32",
           HERE.parent / "auc-precision-builtin-cpu-2026-11-30-asta-op", "bf16astaop")


def best(path: Path) -> float:
    return max(json.loads(line)["valid_auc"] for line in path.open())


def pairs(fp32_dir: Path, fp32_name: str, bf16_dir: Path, bf16_name: str) -> dict[str, tuple[float, float]]:
    out = {}
    for path in sorted(fp32_dir.glob(f"{fp32_name}-*.metrics.jsonl")):
        seed = path.name[len(fp32_name) + 1:-len(".metrics.jsonl")]
        other = bf16_dir / f"{bf16_name}-{seed}.metrics.jsonl"
        if other.exists():
            out[seed] = (best(path), best(other))
    return out


def summary(name: str, runs: dict[str, tuple[float, float]]) -> str:
    diffs = [bf16 - fp32 for fp32, bf16 in runs.values()]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    fp32 = sum(a for a, _ in runs.values()) / n
    bf16 = sum(b for _, b in runs.values()) / n
    return (f"| {name} | {n} | {fp32:.4f} | {bf16:.4f} | {mean:+.4f} ({se:.4f}) | "
            f"{sum(d > 0 for d in diffs)} of {n} |")


def main() -> None:
    new = pairs(HERE, "fp32", HERE, "bf16")
    earlier = pairs(*EARLIER)
    print("| seed | fp32 | bf16 | bf16 - fp32 |\n|---|---|---|---|")
    for seed, (fp32, bf16) in new.items():
        print(f"| {seed} | {fp32:.4f} | {bf16:.4f} | {bf16 - fp32:+.4f} |")
    print("\n| seeds | n | fp32 mean | bf16 mean | bf16 - fp32 (standard error) | bf16 ahead |\n|---|---|---|---|---|---|")
    for name, runs in (("these", new), ("the earlier six", earlier), ("all", {**earlier, **new})):
        print(summary(name, runs))


if __name__ == "__main__":
    main()

"""How far two runs' gradients part at the first step: the relative difference of Adam's first
moment (0.1 x the clipped gradient after one step) between two runs' latest.pt.

    qin train --out A train.epochs=1 train.max_steps_per_epoch=1    # at one commit
    qin train --out B train.epochs=1 train.max_steps_per_epoch=1    # at another
    python bench/results/auc-builtin-cpu-2026-11-30-live/first_step.py A B
"""
import sys

import torch


def first_moments(run: str) -> list[torch.Tensor]:
    state = torch.load(f"{run}/latest.pt", weights_only=False)["optimizer"]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


def main() -> None:
    a, b = first_moments(sys.argv[1]), first_moments(sys.argv[2])
    per_tensor = sorted(((x - y).norm() / x.norm()).item() for x, y in zip(a, b))
    whole = torch.cat([x.flatten() for x in a]), torch.cat([y.flatten() for y in b])
    print(f"whole gradient: {((whole[0] - whole[1]).norm() / whole[0].norm()).item():.2e} relative; per tensor: "
          f"median {per_tensor[len(per_tensor) // 2]:.2e}, largest {per_tensor[-1]:.2e}")


if __name__ == "__main__":
    main()

"""Reptile over C2F-ARM on RLBench or its Meta-World stand-in.

    python c2farm_reptile_rlbench.py --backend metaworld
    python c2farm_reptile_rlbench.py --backend rlbench --held-out-task push_button   # the paper

Data collection, demos and replay are those of multi-task C2F-ARM (one buffer per task,
episodes round-robin over the tasks). Only the update differs: each outer step samples one
task, takes `--reptile-k` C2F-ARM updates on that task's buffer alone (weights theta -> phi),
then interpolates theta <- theta + eps * (phi - theta), with eps scheduled linearly from
`--reptile-eps-start` to `--reptile-eps-end` over training.

The backends, agent, buffer, update and loop are imported by name from c2farm_mt_rlbench.py
(the same C2F-ARM code; see its docstring); this file holds the Reptile part. The network
is the MT agent's, so a Reptile checkpoint fine-tunes exactly like an MT one.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import c2farm_mt_rlbench as c2f
from c2farm_mt_rlbench import C2FARMLearner, TaskError


@dataclass
class Args(c2f.Args):
    exp_name: str = "c2farm_reptile_rlbench"
    batch_size: int = 150
    """transitions per inner update, all from the one sampled task"""
    reptile_k: int = 5  # paper / authors: 5 inner updates per sampled task
    # Standard form theta <- theta + eps * (phi - theta). The authors' ARM fork writes
    # theta <- phi + e * (theta - phi) with e annealed 0.1 -> 0, i.e. eps = 1 - e goes
    # 0.9 -> 1.0: these defaults reproduce them.
    reptile_eps_start: float = 0.9
    reptile_eps_end: float = 1.0


def reptile_eps(step: int, total: int, start: float, end: float) -> float:
    """Linear schedule of the outer step size over `total` env steps."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    return start + frac * (end - start)


@torch.no_grad()
def reptile_interpolate(model: torch.nn.Module, theta: list[torch.Tensor], eps: float) -> None:
    """In place: model's weights phi become theta + eps * (phi - theta)."""
    for p, t in zip(model.parameters(), theta):
        p.copy_(t + eps * (p - t))


class ReptileLearner(C2FARMLearner):
    def update(self, global_step: int) -> dict[str, float]:
        args = self.args
        task = int(self.rng.choice(self.ready_tasks()))
        theta = [p.detach().clone() for p in self.agent.parameters()]
        for _ in range(args.reptile_k):  # inner loop: plain C2F-ARM updates on one task
            batch, meta = self.sample([task], args.batch_size)
            loss, priorities, _ = self.loss(batch)
            self.step_optimizer(loss)
            self.buffers[task].update_priorities(meta[0][1], priorities)
        eps = reptile_eps(global_step, args.total_timesteps, args.reptile_eps_start, args.reptile_eps_end)
        reptile_interpolate(self.agent, theta, eps)
        self.soft_update()
        return {"losses/td_loss": loss.item(), "charts/reptile_eps": eps, "charts/reptile_task": float(task)}


def save_checkpoint(path: str, args: Args, learner: ReptileLearner, train_tasks: list[str], global_step: int,
                    method: str = "reptile") -> None:
    """Tensors and plain values only (loads with weights_only=True); written atomically."""
    ckpt = {"format": c2f.CHECKPOINT_FORMAT, "format_version": 1, "module": "c2farm_reptile_rlbench",
            "benchmark": "rlbench", "method": method, "train_tasks": list(train_tasks),
            "args": dataclasses.asdict(args), "global_step": int(global_step), **learner.state()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    import tyro

    try:
        c2f.main(tyro.cli(Args), make_learner=ReptileLearner, save_checkpoint=save_checkpoint)
    except TaskError as e:
        sys.exit(f"c2farm_reptile_rlbench.py: error: {e}")

"""PEARL over C2F-ARM on RLBench or its Meta-World stand-in.

    python c2farm_pearl_rlbench.py --backend metaworld
    python c2farm_pearl_rlbench.py --backend rlbench --held-out-task push_button   # the paper

A context encoder (a small conv net on the front RGB, plus the action and reward) maps each
transition of a task to a Gaussian over a latent z (size 16); the transitions' Gaussians
are combined by a product of Gaussians into the task posterior, regularised by KL(q || N(0, I))
with weight 1. z is tiled into the depth-0 Q-attention network (its bottleneck, next to the
proprioception). Each task's context is 3 transitions drawn from the most recent 10 of that
task's buffer (demo transitions count). The Q-loss trains the encoder, as in PEARL.

Adaptation (`adapt`, used by finetune.py): on the new task, infer z from the experience
collected there (demos, if any, and the agent's own episodes), with no gradient step.

The backends, agent, buffer, update and loop are imported by name from c2farm_mt_rlbench.py
(the same C2F-ARM code; see its docstring); this file holds the PEARL part.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import c2farm_mt_rlbench as c2f
from c2farm_mt_rlbench import C2FARMLearner, TaskError


@dataclass
class Args(c2f.Args):
    exp_name: str = "c2farm_pearl_rlbench"
    latent_size: int = 16  # paper: latent of 16
    context_size: int = 3  # paper: 3 transitions per context ...
    context_window: int = 10  # ... drawn from the task's 10 most recent transitions
    kl_weight: float = 1.0  # paper: KL weight 1


def product_of_gaussians(mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine N independent Gaussian factors (N, L) into one: precision-weighted mean."""
    var = var.clamp(min=1e-7)
    post_var = 1.0 / (1.0 / var).sum(0)
    return post_var * (mu / var).sum(0), post_var


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)), summed over the latent dimensions."""
    return 0.5 * (var + mu**2 - 1.0 - torch.log(var)).sum(-1)


class ContextEncoder(nn.Module):
    """One transition (front RGB, discrete action scaled to [0, 1], reward) -> Gaussian (mu, var)."""

    def __init__(self, action_size: int, latent: int = 16, channels: int = 16):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, channels, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(2 * channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(2 * channels * 16 + action_size + 1, 128), nn.ReLU(),
                                 nn.Linear(128, 2 * latent))

    def forward(self, rgb, action, reward):
        h = self.conv(rgb.permute(0, 3, 1, 2).float() / 255.0)
        mu, raw_var = self.mlp(torch.cat([h, action, reward[:, None]], 1)).chunk(2, -1)
        return mu, F.softplus(raw_var) + 1e-4


class PEARLLearner(C2FARMLearner):
    def __init__(self, agent, buffers, args: Args, device):
        super().__init__(agent, buffers, args, device)
        self.action_scale = torch.tensor(agent.action_sizes(), dtype=torch.float32, device=device)
        self.encoder = ContextEncoder(len(self.action_scale), args.latent_size).to(device)
        self.model = nn.ModuleDict({"agent": agent, "encoder": self.encoder})
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.learning_rate)

    def posterior(self, task_id: int):
        """(mu, var) of z from `context_size` of the task's `context_window` latest transitions,
        or the prior N(0, I) when the task has none yet."""
        buffer, args = self.buffers[task_id], self.args
        recent = buffer.recent[-args.context_window:]
        if not recent:
            zeros = torch.zeros(args.latent_size, device=self.device)
            return zeros, zeros + 1.0
        idx = self.rng.choice(recent, args.context_size, replace=len(recent) < args.context_size)
        batch = buffer.batch(idx)
        action = torch.as_tensor(batch["action"], device=self.device).float() / self.action_scale
        mu, var = self.encoder(torch.as_tensor(batch["rgb"], device=self.device), action,
                               torch.as_tensor(batch["reward"], device=self.device))
        return product_of_gaussians(mu, var)

    def update(self, global_step: int) -> dict[str, float]:
        tasks, args = self.ready_tasks(), self.args
        per_task = max(1, args.batch_size // len(self.buffers))
        batch, meta = self.sample(tasks, per_task)
        zs, kls = [], []
        for t in tasks:
            mu, var = self.posterior(t)
            zs.append(mu + var.sqrt() * torch.randn_like(mu))  # reparameterised sample
            kls.append(kl_to_standard_normal(mu, var))
        latent = torch.stack(zs).repeat_interleave(per_task, 0)
        q_loss, priorities, _ = self.loss(batch, latent=latent, next_latent=latent.detach())
        kl = torch.stack(kls).mean()
        self.step_optimizer(q_loss + args.kl_weight * kl)
        self.soft_update()
        offset = 0
        for t, idx, _ in meta:
            self.buffers[t].update_priorities(idx, priorities[offset:offset + len(idx)])
            offset += len(idx)
        return {"losses/td_loss": q_loss.item(), "losses/kl": kl.item()}

    @torch.no_grad()
    def latent(self, task_id: int):
        return self.posterior(task_id)[0][None]  # act with the posterior mean

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "target_model": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict()}


def save_checkpoint(path: str, args: Args, learner: PEARLLearner, train_tasks: list[str], global_step: int,
                    method: str = "pearl") -> None:
    """Tensors and plain values only (loads with weights_only=True); written atomically."""
    ckpt = {"format": c2f.CHECKPOINT_FORMAT, "format_version": 1, "module": "c2farm_pearl_rlbench",
            "benchmark": "rlbench", "method": method, "train_tasks": list(train_tasks),
            "args": dataclasses.asdict(args), "global_step": int(global_step), **learner.state()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def adapt(args: Args, model_state: dict, task_name: str, writer, log_eval: Callable, eval_every: int | None) -> None:
    """PEARL's adaptation to a new task: collect `total_timesteps` env steps there (plus
    `--demos` demos) and act with z inferred from that task's own context; no gradient step."""
    args = dataclasses.replace(args, learning_starts=args.total_timesteps + 1)  # never update
    device, tasks, agent, buffers = c2f.setup(args, [task_name], latent=args.latent_size)
    learner = PEARLLearner(agent, buffers, args, device)
    learner.model.load_state_dict(model_state)
    try:
        c2f.train(args, learner, tasks, [task_name], writer, log_eval=log_eval, eval_every=eval_every)
    finally:
        for task in tasks:
            task.close()


if __name__ == "__main__":
    import tyro

    try:
        c2f.main(tyro.cli(Args), make_learner=PEARLLearner, save_checkpoint=save_checkpoint)
    except TaskError as e:
        sys.exit(f"c2farm_pearl_rlbench.py: error: {e}")

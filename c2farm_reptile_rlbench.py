"""Reptile over C2F-ARM (coarse-to-fine Q-attention) on RLBench or its Meta-World stand-in.

    python c2farm_reptile_rlbench.py --backend metaworld                             # ML10 train split
    python c2farm_reptile_rlbench.py --backend rlbench --held-out-task push_button   # the paper

Paper: Mandi, Abbeel, James, "On the Effectiveness of Fine-tuning Versus Meta-reinforcement Learning" (NeurIPS
2022), Sec. 5.2 (RLBench); Reptile: Nichol et al. 2018. Data collection, demos and replay are those of multi-task
C2F-ARM (one buffer per task, episodes round-robin over the tasks). Only the update differs: each outer step samples
one task, takes `--reptile-k` C2F-ARM updates on that task's buffer alone (weights theta -> phi), then interpolates
theta <- theta + eps * (phi - theta), eps linear from `--reptile-eps-start` to `--reptile-eps-end`. The network is
the MT agent's, so a Reptile checkpoint fine-tunes exactly like an MT one (finetune.py).

Top to bottom: Args; network; replay; learner; Reptile's outer step; loop. Environments, demos, voxel geometry,
plumbing and the run's flags come from envs/rlbench.py; the C2F-ARM code is c2farm_mt_rlbench.py's (a test keeps
the copies equal).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from envs.run_dir import use_bf16
from envs.rlbench import (  # noqa: F401  (the task lists are part of this script's interface)
    BACKEND_TASKS, LOWDIM_SIZE, METAWORLD_TEST_TASKS, METAWORLD_TRAIN_TASKS, RLBENCH_TASKS, SCENE_BOUNDS,
    ZOOM_HALF_WIDTH, RunArgs, TaskError, action_to_pose, check_c2farm_args,
    evaluate_success, log_episode, log_progress, lowdim_state, make_task, obs_tensors, pose_to_action, resume_loop,
    run_pretraining, to_tensors, voxelize, zoom_in)

SCRIPT = os.path.basename(__file__)[:-3]  # the checkpoint's module
METHOD = "reptile"  # the checkpoint's method


@dataclass
class Args(RunArgs):  # + the run's own flags (output, --resume, evaluation, checkpoints, machine)
    exp_name: str = "c2farm_reptile_rlbench"
    """the name of this experiment (run directories are runs/{exp_name}__{seed}__{time})"""
    seed: int = 1
    """seed of random, numpy, torch and the tasks"""

    # tasks
    backend: str = "metaworld"
    """`metaworld` (pip-installable stand-in) or `rlbench` (the paper; needs CoppeliaSim + PyRep + RLBench 1.2)"""
    train_tasks: list[str] = field(default_factory=list)
    """training tasks; empty = the backend's default split minus --held-out-task"""
    held_out_task: str | None = None
    """RLBench: leave this task out (paper: train on the other ten)"""
    image_size: int = 128
    """front camera resolution (paper: 128x128)"""
    episode_length: int = 10
    """next-best-pose actions per episode (paper: 10)"""
    demos: int = 5
    """expert demos per training task put into its replay (paper: 5)"""

    # C2F-ARM (paper Sec. 5.2 and C2F-ARM's settings)
    total_timesteps: int = 100_000
    """env steps (next-best-pose actions) over all tasks (ours, the paper has none: fills ARM's 1e5 replay once)"""
    batch_size: int = 150
    """transitions per update, an equal share from every task (paper: 15 from each of 10 tasks)"""
    learning_rate: float = 5e-4
    """Adam learning rate (C2F-ARM: 5e-4)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.0025
    """soft target update rate (C2F-ARM: 0.0025)"""
    replay_size: int = 100_000
    """replay capacity, split evenly over the tasks' buffers (C2F-ARM: 1e5)"""
    priority_exponent: float = 0.7
    """prioritized replay alpha (C2F-ARM: 0.7)"""
    importance_exponent: float = 1.0
    """importance-sampling exponent beta of the loss weights (ARM's REPLAY_BETA: 1.0)"""
    voxel_size: int = 16
    """voxels per axis at every depth (C2F-ARM: 16^3)"""
    depths: int = 2
    """coarse-to-fine depths (C2F-ARM: 2)"""
    rotation_resolution: float = 5.0
    """degrees per rotation bin (C2F-ARM: 5, i.e. 72 bins per Euler axis)"""
    demo_augmentation_every: int = 10
    """every n-th demo frame starts a chain to the next keypoints (C2F-ARM: 10)"""
    crop_augmentation: bool = True
    """demo transitions zoom around centres shifted by up to 0.75 zoom half-widths per axis (ARM C2FARM.yaml)"""
    unet_width: int = 64
    """CPU sizing flag: the 3D U-Net's first-level kernels, doubled per level (ARM: 64; a multiple of 4, e.g. 16)"""
    learning_starts: int = 0
    """env steps before updates begin (the demo transitions are there from the start)"""
    updates_per_step: int = 1
    """learner updates per env step"""
    exploration: Literal["greedy", "gaussian", "epsilon"] = "greedy"
    """training episodes act `greedy` (ARM's act forces deterministic), with ARM's optional `gaussian` noise (voxel
    and rotation indices + round(N(0, 1)), a random gripper 20% of the time) or `epsilon`-greedy per head"""
    epsilon: float = 0.1
    """with --exploration epsilon: chance that each head (voxel per depth, rotations, gripper) acts at random"""
    lambda_trans_qreg: float = 1.0
    """weight of the L1 regulariser pulling every voxel's Q-value towards 0 (ARM C2FARM.yaml: 1.0)"""
    lambda_rot_qreg: float = 1.0
    """weight of the L1 regulariser on the rotation and gripper Q-values (ARM C2FARM.yaml: 1.0)"""
    weight_decay: float = 1e-6
    """Adam weight decay (ARM C2FARM.yaml lambda_weight_l2: 1e-6)"""
    grad_clip_value: float = 0.01
    """clip every gradient element to [-v, v] (ARM c2farm/launch_utils.py: grad_clip=0.01, clip_grad_value_)"""

    # Reptile
    reptile_k: int = 5
    """inner C2F-ARM updates per sampled task (paper / authors: 5)"""
    reptile_eps_start: float = 0.9
    """outer step size at the start. Standard form theta <- theta + eps (phi - theta); the authors'
    ARM fork writes theta <- phi + e (theta - phi) with e annealed 0.1 -> 0, i.e. eps 0.9 -> 1.0"""
    reptile_eps_end: float = 1.0
    """outer step size at the end (linear schedule over --total-timesteps)"""


# --------------------------------------------------------------------------- ALGO LOGIC: Q-attention network


def conv3d(c_in: int, c_out: int, kernel: int = 3, activation: bool = True) -> nn.Module:
    """ARM's Conv3DBlock: replicate padding; Kaiming init for LeakyReLU(0.02), Xavier for a linear output."""
    conv = nn.Conv3d(c_in, c_out, kernel, padding=kernel // 2, padding_mode="replicate")
    return _init(conv, activation)


def dense(f_in: int, f_out: int, activation: bool = True) -> nn.Module:
    """ARM's DenseBlock: Linear, LeakyReLU(0.02) unless it is an output."""
    return _init(nn.Linear(f_in, f_out), activation)


def _init(layer: nn.Module, activation: bool) -> nn.Module:
    if activation:
        nn.init.kaiming_uniform_(layer.weight, a=0.02, nonlinearity="leaky_relu")
    else:
        nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return nn.Sequential(layer, nn.LeakyReLU(0.02)) if activation else layer


class Inception3D(nn.Module):
    """ARM's 3D inception block: 1x1 (half the output channels) | 1x1 -> 3x3 (a quarter) |
    1x1 -> 3x3 -> 3x3 (a quarter, a 5x5 receptive field), concatenated."""

    def __init__(self, c_in: int, c_out: int, inner: int):
        super().__init__()
        self.one = conv3d(c_in, c_out // 2, 1)
        self.three = nn.Sequential(conv3d(c_in, inner, 1), conv3d(inner, c_out // 4))
        self.five = nn.Sequential(conv3d(c_in, inner, 1), conv3d(inner, inner), conv3d(inner, c_out // 4))

    def forward(self, x):
        return torch.cat([self.one(x), self.three(x), self.five(x)], 1)


def spatial_softmax(x: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, 3C): per channel, the expected voxel position (each axis in [-1, 1])
    under softmax(x / temperature) over the voxels (ARM's SpatialSoftmax3D, temperature 0.01)."""
    attention = F.softmax(x.flatten(2) / temperature, -1)  # (B, C, DHW)
    axes = [torch.linspace(-1.0, 1.0, n, device=x.device) for n in x.shape[2:]]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (DHW, 3)
    return (attention @ positions).flatten(1)


class QAttentionNet(nn.Module):
    """Q-attention for one depth, ARM's Qattention3DNet (networks.py) for 16^3 voxels: inception blocks down 16 -> 8
    -> 4 and back up with skip connections, LeakyReLU(0.02), no normalisation; the proprioception (and PEARL's
    latent) through a dense layer, tiled over the grid. Outputs one Q-value per voxel and, at the last depth, a dense
    head over spatial-softmax and max-pooled features of four levels: Q-values for the rotation bins and the gripper.
    `width` (ARM: 64 kernels) is a CPU sizing knob."""

    def __init__(self, in_channels: int = 10, width: int = 64, lowdim: int = LOWDIM_SIZE, latent: int = 0,
                 rot_grip_outputs: int = 0):
        super().__init__()
        k, inner = width, max(4, width // 2)  # ARM: 64 kernels, inception inner width 32
        self.preprocess = Inception3D(in_channels, k, inner)
        self.proprio = dense(lowdim + latent, k)
        self.down0 = Inception3D(2 * k, k, inner)  # 16^3
        self.down1 = Inception3D(k, 2 * k, inner)  # 8^3
        self.down2 = Inception3D(2 * k, 4 * k, inner)  # 4^3
        self.pool = nn.MaxPool3d(3, stride=2, padding=1)
        self.up2 = nn.ModuleList([Inception3D(4 * k, k, inner), Inception3D(k, k, inner)])  # 4 -> 8
        self.up1 = nn.ModuleList([Inception3D(3 * k, k, inner), Inception3D(k, k, inner)])  # 8 -> 16
        self.final = conv3d(2 * k, k)
        self.q_trans = conv3d(k, 1, activation=False)
        self.rot_grip = (nn.Sequential(dense(32 * k, 128), dense(128, 128), dense(128, rot_grip_outputs, False))
                         if rot_grip_outputs else None)  # ARM: dense_feats 128

    @staticmethod
    def up(blocks, x, skip):
        """Inception, trilinear upsampling to the skip connection's size, inception."""
        x = F.interpolate(blocks[0](x), size=skip.shape[2:], mode="trilinear", align_corners=False)
        return blocks[1](x)

    def forward(self, grid, lowdim, latent=None):
        x = self.preprocess(grid)
        p = self.proprio(lowdim if latent is None else torch.cat([lowdim, latent], 1))
        d0 = self.down0(torch.cat([x, p[:, :, None, None, None].expand(-1, -1, *x.shape[2:])], 1))
        d1 = self.down1(self.pool(d0))
        d2 = self.down2(self.pool(d1))
        u1 = self.up(self.up1, torch.cat([d1, self.up(self.up2, d2, d1)], 1), d0)
        f1 = self.final(torch.cat([d0, u1], 1))
        q = self.q_trans(f1).flatten(1)  # (B, V^3)
        rot_grip = None
        if self.rot_grip is not None:
            features = [torch.cat([spatial_softmax(h), h.amax((2, 3, 4))], 1) for h in (d0, d1, d2, f1)]
            rot_grip = self.rot_grip(torch.cat(features, 1))  # 4k + 8k + 16k + 4k = 32k features
        return q, rot_grip


class C2FARM(nn.Module):
    """Coarse-to-fine Q-attention: depth 0 picks a voxel in the scene bounds, depth d+1 picks a voxel in a cube of
    +-zoom around the centre of depth d's choice; the last depth also picks the rotation (one of 72 bins per Euler
    axis) and the gripper state."""

    def __init__(self, scene_bounds, zoom_half_width: float, voxels: int = 16, depths: int = 2, width: int = 64,
                 rotation_resolution: float = 5.0, latent: int = 0):
        super().__init__()
        self.voxels, self.depths, self.zoom, self.resolution = voxels, depths, zoom_half_width, rotation_resolution
        self.rot_bins = int(round(360 / rotation_resolution))
        self.register_buffer("scene_bounds", torch.tensor(scene_bounds, dtype=torch.float32))
        self.qnets = nn.ModuleList(
            QAttentionNet(10, width, LOWDIM_SIZE, latent if d == 0 else 0,  # PEARL's z goes into depth 0
                          3 * self.rot_bins + 2 if d == depths - 1 else 0)
            for d in range(depths))

    def forward(self, points, colors, lowdim, latent=None, choose: Callable | None = None):
        """Act through the depths: each depth's Q-attention picks a voxel (`choose(q, depth)`, default argmax) and
        the next depth zooms around it. Returns the chosen voxels (B, depths), rotation/gripper Q (B, 3 * bins + 2)."""
        bounds = self.scene_bounds.expand(points.shape[0], 6)
        chosen = []
        for d, net in enumerate(self.qnets):
            q, rot_grip = net(voxelize(points, colors, bounds, self.voxels), lowdim, latent if d == 0 else None)
            chosen.append(q.argmax(1) if choose is None else choose(q, d))
            bounds = zoom_in(bounds, chosen[-1], self.voxels, self.zoom)
        return torch.stack(chosen, 1), rot_grip

    def split_rot_grip(self, rot_grip):
        n = self.rot_bins
        return [rot_grip[:, i * n:(i + 1) * n] for i in range(3)] + [rot_grip[:, 3 * n:]]

    def greedy_rot_grip(self, rot_grip) -> torch.Tensor:
        return torch.stack([h.argmax(1) for h in self.split_rot_grip(rot_grip)], 1)

    def encode_pose(self, pose: np.ndarray, gripper_open: float, shifts: np.ndarray | None = None) -> np.ndarray:
        """8-D next-best pose (or gripper pose + open state) -> discrete action (`shifts`: crop augmentation)."""
        return pose_to_action(pose, gripper_open, self.scene_bounds.cpu().numpy(), self.voxels, self.depths, self.zoom,
                              self.resolution, shifts)

    def decode_action(self, action: np.ndarray) -> np.ndarray:
        """Discrete action -> 8-D next-best pose: last depth's voxel centre, quaternion xyzw, gripper."""
        bounds = self.scene_bounds.cpu().numpy()
        return action_to_pose(action, bounds, self.voxels, self.depths, self.zoom, self.resolution)


def make_agent(args: Args, latent: int = 0) -> C2FARM:
    return C2FARM(SCENE_BOUNDS[args.backend], ZOOM_HALF_WIDTH[args.backend], args.voxel_size, args.depths,
                  args.unet_width, args.rotation_resolution, latent)


# --------------------------------------------------------------------------- ALGO LOGIC: replay


class Batch(NamedTuple):
    """Transitions (observation, discrete action, reward, done, next observation) as arrays."""

    rgb: np.ndarray  # (B, H, W, 3) uint8, front camera
    pcd: np.ndarray  # (B, H, W, 3) float16, world-frame point cloud
    lowdim: np.ndarray  # (B, LOWDIM_SIZE) proprioception
    action: np.ndarray  # (B, depths + 4) int64 discrete action
    reward: np.ndarray  # (B,) float32
    done: np.ndarray  # (B,) 1.0 where the episode terminated (time-outs bootstrap)
    next_rgb: np.ndarray
    next_pcd: np.ndarray
    next_lowdim: np.ndarray
    shift: np.ndarray  # (B, depths - 1, 3) crop-augmentation shift of each deeper depth's centre (0: none)
    next_attention: np.ndarray  # (B, depths) voxels chosen when acting from the next observation, -1 if none
    next_shift: np.ndarray  # (B, depths - 1, 3) their shifts
    weight: np.ndarray  # (B,) importance-sampling weights of prioritized replay


class ReplayBuffer:
    """One task's prioritized replay (proportional, exponent alpha). Observations are stored once (point cloud as
    float16) and transitions refer to them by index, so a demo chain shares its keypoint frames. Arrays are allocated
    lazily by the OS: memory grows with use."""

    def __init__(self, capacity: int, image_size: int, action_size: int, alpha: float = 0.7):
        self.capacity, self.alpha = capacity, alpha
        obs_capacity = 2 * capacity  # a transition adds at most two observations
        self.rgb = np.empty((obs_capacity, image_size, image_size, 3), np.uint8)
        self.pcd = np.empty((obs_capacity, image_size, image_size, 3), np.float16)
        self.lowdim = np.empty((obs_capacity, LOWDIM_SIZE), np.float32)
        self.attention = np.full((obs_capacity, action_size - 4), -1, np.int64)  # voxels chosen from each observation
        self.shift = np.zeros((obs_capacity, max(0, action_size - 5), 3), np.float32)  # and their zoom shifts
        self.obs_index = np.zeros((capacity, 2), np.int64)  # (obs, next obs)
        self.action = np.zeros((capacity, action_size), np.int64)
        self.reward = np.zeros(capacity, np.float32)
        self.done = np.zeros(capacity, np.float32)
        self.priority = np.zeros(capacity, np.float64)
        self.size = self.pos = self.obs_pos = self.obs_size = 0

    def add_observation(self, obs, t: int, episode_length: int) -> int:
        i = self.obs_pos
        self.rgb[i], self.pcd[i] = obs.front_rgb, obs.front_point_cloud
        self.lowdim[i] = lowdim_state(obs, t, episode_length)
        self.attention[i] = -1  # no action taken from it yet
        self.obs_pos, self.obs_size = (self.obs_pos + 1) % len(self.rgb), min(self.obs_size + 1, len(self.rgb))
        return i

    def add(self, obs_i: int, action: np.ndarray, reward: float, done: bool, next_i: int, shift=0.0) -> None:
        i = self.pos
        self.obs_index[i] = (obs_i, next_i)
        self.action[i], self.reward[i], self.done[i] = action, reward, float(done)
        self.attention[obs_i] = action[:self.attention.shape[1]]  # ARM: attention coordinates stored with the obs
        self.shift[obs_i] = shift
        self.priority[i] = self.priority[: self.size].max() if self.size else 1.0  # new data: max priority
        self.pos, self.size = (self.pos + 1) % self.capacity, min(self.size + 1, self.capacity)

    def latest(self, n: int) -> np.ndarray:
        """The n transitions added last (all while it holds fewer), oldest first: PEARL's context window."""
        return (self.pos - np.arange(min(n, self.size), 0, -1)) % self.capacity

    def sample(self, n: int, beta: float, rng: np.random.Generator) -> tuple[np.ndarray, Batch]:
        p = self.priority[: self.size] ** self.alpha
        p /= p.sum()  # P(i) = p_i^alpha / sum_k p_k^alpha
        idx = rng.choice(self.size, n, p=p)
        weights = (self.size * p[idx]) ** (-beta)  # w_i = (N P(i))^-beta, normalised by the largest
        return idx, self.batch(idx, (weights / weights.max()).astype(np.float32))

    def batch(self, idx, weight: np.ndarray | None = None) -> Batch:
        o, n = self.obs_index[idx, 0], self.obs_index[idx, 1]
        return Batch(self.rgb[o], self.pcd[o], self.lowdim[o], self.action[idx], self.reward[idx], self.done[idx],
                     self.rgb[n], self.pcd[n], self.lowdim[n], self.shift[o], self.attention[n], self.shift[n],
                     np.ones(len(idx), np.float32) if weight is None else weight)

    def update_priorities(self, idx, td: np.ndarray) -> None:
        self.priority[idx] = np.abs(td) + 1e-6


# --------------------------------------------------------------------------- ALGO LOGIC: the learner


class C2FARMLearner:
    """The C2F-ARM update (stepjam/ARM qattention_agent.py): per depth, a double-Q target from the target network at
    the next state (zoomed where the agent zoomed from it), a Huber loss for the taken voxel (and, at the last depth,
    the rotation and gripper heads), an L1 regulariser on all Q-values, soft target updates and prioritized replay
    over per-task buffers."""

    def __init__(self, agent: C2FARM, buffers: list[ReplayBuffer], args: Args, device):
        self.agent, self.buffers, self.args, self.device = agent, buffers, args, device
        self.model = agent  # what a checkpoint's "model" holds (PEARL: the agent and its context encoder)
        self.target = copy.deepcopy(agent).requires_grad_(False)
        self.optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.rng = np.random.default_rng(args.seed)
        self.bf16 = use_bf16(args.precision, device)  # SPEED: see `q_values`

    def sample(self, task_ids: list[int], per_task: int) -> tuple[Batch, list[tuple[int, np.ndarray]]]:
        """An equal share of the batch from each listed task's buffer; (task, indices) per share."""
        shares = [(t, *self.buffers[t].sample(per_task, self.args.importance_exponent, self.rng)) for t in task_ids]
        batch = Batch(*(np.concatenate(arrays) for arrays in zip(*(b for _, _, b in shares))))
        return batch, [(t, idx) for t, idx, _ in shares]

    def q_values(self, qnet: QAttentionNet, grid: torch.Tensor, lowdim: torch.Tensor, latent):
        """qnet's (voxel, rotation/gripper) Q-values in fp32; SPEED: in bf16 autocast under --precision bf16."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            q, rot_grip = qnet(grid, lowdim, latent)
        return q.float(), None if rot_grip is None else rot_grip.float()  # rotation and gripper: the last depth only

    def loss(self, batch: Batch, latent=None, next_latent=None):
        """The summed per-depth losses, new priorities (mean |TD| over the heads) and logs."""
        agent, target, args, dev, v = self.agent, self.target, self.args, self.device, self.agent.voxels
        points, colors, lowdim = to_tensors(batch, dev)
        next_points, next_colors, next_lowdim = to_tensors(batch, dev, next_obs=True)
        action = torch.as_tensor(batch.action, device=dev)
        next_attention = torch.as_tensor(batch.next_attention, device=dev)
        shift = torch.as_tensor(batch.shift, device=dev)
        next_shift = torch.as_tensor(batch.next_shift, device=dev)
        reward = torch.as_tensor(batch.reward, device=dev)
        done = torch.as_tensor(batch.done, device=dev)
        weight = torch.as_tensor(batch.weight, device=dev)
        bounds = next_bounds = agent.scene_bounds.expand(len(reward), 6)
        total, td, logs = 0.0, [], {}
        for d in range(agent.depths):
            last, z, next_z = d == agent.depths - 1, latent if d == 0 else None, next_latent if d == 0 else None
            q, rot_grip = self.q_values(agent.qnets[d], voxelize(points, colors, bounds, v), lowdim, z)
            with torch.no_grad():
                next_grid = voxelize(next_points, next_colors, next_bounds, v)
                online_q, online_rot_grip = self.q_values(agent.qnets[d], next_grid, next_lowdim, next_z)
                target_q, target_rot_grip = self.q_values(target.qnets[d], next_grid, next_lowdim, next_z)
                next_voxel = online_q.argmax(1)  # double Q: the online network picks a', the target network values it
                q_next = target_q.gather(1, next_voxel[:, None])
                if last:  # the last depth's target is the mean over its five heads (voxel, 3 rotations, gripper)
                    next_rot_grip = agent.greedy_rot_grip(online_rot_grip)
                    q_next = torch.cat([q_next] + [h.gather(1, next_rot_grip[:, i:i + 1]) for i, h in
                                                   enumerate(agent.split_rot_grip(target_rot_grip))], 1).mean(1, True)
                y = (reward + args.gamma * (1.0 - done) * q_next[:, 0]).clamp(min=0.0)  # max(0, r + gamma (1-d) Q')
            q_taken = q.gather(1, action[:, d:d + 1])
            qreg = args.lambda_trans_qreg * q.abs().mean(1)  # L1 towards 0 of every voxel's Q-value
            if last:
                rot_grip_taken = [h.gather(1, action[:, agent.depths + i:agent.depths + i + 1])
                                  for i, h in enumerate(agent.split_rot_grip(rot_grip))]
                q_taken = torch.cat([q_taken] + rot_grip_taken, 1)
                qreg = qreg + args.lambda_rot_qreg * rot_grip.abs().mean(1)
            y = y[:, None].expand_as(q_taken)
            delta = F.smooth_l1_loss(q_taken, y, reduction="none").mean(1)  # Huber, mean over this depth's heads
            total = total + ((delta + qreg) * weight).mean()  # importance-weighted, as each of ARM's depth agents
            td.append((q_taken - y).detach())
            logs[f"losses/bellman_depth{d}"] = delta.mean().detach()  # tensors: read only when logged (no host sync)
            logs[f"losses/qreg_depth{d}"] = qreg.mean().detach()
            if last:
                break
            # the next depth zooms where the agent did: at s the stored action's voxel, at s' the voxel
            # chosen when acting from s' (the online choice where none is stored: an episode's last state)
            bounds = zoom_in(bounds, action[:, d], v, agent.zoom, shift[:, d])
            stored = next_attention[:, d] >= 0
            next_bounds = zoom_in(next_bounds, torch.where(stored, next_attention[:, d], next_voxel), v, agent.zoom,
                                  next_shift[:, d] * stored[:, None])
        td = torch.cat(td, 1)
        logs["losses/td_loss"] = total.detach()
        return total, td.abs().mean(1).cpu().numpy(), logs

    def step_optimizer(self, loss):
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_value_([p for group in self.optimizer.param_groups for p in group["params"]],
                                  self.args.grad_clip_value)  # every element to [-v, v], as ARM
        self.optimizer.step()

    def soft_update(self):
        with torch.no_grad():
            for p, tp in zip(self.agent.parameters(), self.target.parameters()):
                tp.lerp_(p, self.args.tau)  # theta_target <- (1 - tau) theta_target + tau theta

    def ready_tasks(self) -> list[int]:
        """Tasks with data to learn from (with --demos 0 a task's buffer fills on its first episode)."""
        return [t for t, buffer in enumerate(self.buffers) if buffer.size > 0]

    def update_priorities(self, shares, priorities: np.ndarray) -> None:
        for (t, idx), share in zip(shares, np.split(priorities, len(shares))):  # the shares are equal
            self.buffers[t].update_priorities(idx, share)

    def update(self, global_step: int) -> dict[str, float]:
        """One multi-task update: batch_size / num_tasks transitions from every task."""
        batch, shares = self.sample(self.ready_tasks(), max(1, self.args.batch_size // len(self.buffers)))
        loss, priorities, logs = self.loss(batch)
        self.step_optimizer(loss)
        self.soft_update()
        self.update_priorities(shares, priorities)
        return logs

    def act(self, obs, t: int, task_id: int, explore: bool) -> np.ndarray:
        """A discrete action; training episodes (`explore`) follow --exploration, evaluation is greedy."""
        strategy = self.args.exploration if explore else "greedy"
        with torch.no_grad():
            points, colors, lowdim = obs_tensors(obs, t, self.args, self.device)
            choose = None if strategy == "greedy" else (lambda q, d: self.explore_voxel(q.argmax(1), strategy))
            voxels, rot_grip = self.agent(points, colors, lowdim, latent=self.latent(task_id), choose=choose)
            rot_grip = self.agent.greedy_rot_grip(rot_grip).cpu().numpy()[0]
        if strategy != "greedy":
            rot_grip = self.explore_rot_grip(rot_grip, strategy)
        return np.concatenate([voxels.cpu().numpy()[0], rot_grip])

    def greedy_pose(self, obs, t: int, task_id: int) -> np.ndarray:
        """The evaluation policy: the greedy action, as the 8-D next-best pose the task steps with."""
        return self.agent.decode_action(self.act(obs, t, task_id, explore=False))

    def explore_voxel(self, voxel: torch.Tensor, strategy: str) -> torch.Tensor:
        """A perturbed voxel choice (batch of one), applied at each depth before the next zooms."""
        v = self.agent.voxels
        if strategy == "epsilon":
            return voxel if self.rng.random() >= self.args.epsilon else torch.full_like(voxel, self.rng.integers(v**3))
        ijk = np.unravel_index(int(voxel[0]), (v, v, v)) + np.round(self.rng.normal(0.0, 1.0, 3))  # + round(N(0, 1))
        return torch.full_like(voxel, int(np.ravel_multi_index(np.clip(ijk, 0, v - 1).astype(np.int64), (v, v, v))))

    def explore_rot_grip(self, rot_grip: np.ndarray, strategy: str) -> np.ndarray:
        """Perturbed rotation bins and gripper: epsilon per head, or ARM's Gaussian (rotations
        + round(N(0, 1)) clamped to the bins, gripper random 20% of the time)."""
        rot_grip = rot_grip.copy()
        if strategy == "epsilon":
            for i, size in enumerate([self.agent.rot_bins] * 3 + [2]):
                if self.rng.random() < self.args.epsilon:
                    rot_grip[i] = self.rng.integers(size)
            return rot_grip
        rot_grip[:3] = np.clip(rot_grip[:3] + np.round(self.rng.normal(0.0, 1.0, 3)), 0, self.agent.rot_bins - 1)
        if self.rng.random() < 0.2:
            rot_grip[3] = self.rng.integers(2)
        return rot_grip

    def latent(self, task_id: int):
        return None  # PEARL overrides: the task's inferred context


# --------------------------------------------------------------------------- ALGO LOGIC: Reptile


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
        """One outer step: k C2F-ARM updates on one sampled task, then the interpolation."""
        args = self.args
        task = int(self.rng.choice(self.ready_tasks()))
        theta = [p.detach().clone() for p in self.agent.parameters()]
        for _ in range(args.reptile_k):  # inner loop: plain C2F-ARM updates on one task
            batch, shares = self.sample([task], args.batch_size)
            loss, priorities, _ = self.loss(batch)
            self.step_optimizer(loss)
            self.update_priorities(shares, priorities)
        eps = reptile_eps(global_step, args.total_timesteps, args.reptile_eps_start, args.reptile_eps_end)
        reptile_interpolate(self.agent, theta, eps)
        self.soft_update()
        return {"losses/td_loss": loss.detach(), "charts/reptile_eps": eps, "charts/reptile_task": float(task)}


# --------------------------------------------------------------------------- the loop


def train(args: Args, learner: C2FARMLearner, tasks: list, task_names: list[str], writer,
          log_eval: Callable | None = None, eval_every: int | None = None, save: Callable | None = None,
          stop=None, loop: dict | None = None) -> int:
    """The C2F-ARM loop of pretraining (MT / Reptile / PEARL learners) and fine-tuning: episodes round-robin over
    the tasks, `updates_per_step` learner updates per env step. `log_eval(step, success_rate, episodes)` gets
    evaluations at step 0 (if `eval_every`), at the first episode end after every `eval_every` env steps, and at
    the end; `save(step, loop, with_replay)` runs at the checkpoint and replay intervals and at the end. A set
    `stop` (SIGINT / SIGTERM) ends the loop after the current step; `loop` (a checkpoint's) continues a run."""
    start, successes, episode, logs = time.time(), [], 0, {}
    done, task_id, obs, obs_i, t, success = True, 0, None, 0, 0, 0.0
    global_step, next_eval, finished = 0, (0 if eval_every else None), False
    if loop is not None:
        global_step, episode, successes, next_eval, done, task_id, obs, obs_i, t, success = resume_loop(loop, tasks)
    first_step = global_step

    def where() -> dict:  # the loop's state: a checkpoint continues from exactly here
        return {"global_step": global_step, "episode": episode, "successes": successes[-20:], "next_eval": next_eval,
                "done": done, "task_id": task_id, "obs_i": obs_i, "t": t, "success": success, "finished": finished,
                "tasks": [task.get_state() for task in tasks]}

    while global_step < args.total_timesteps and not stop:
        # evaluate between episodes (evaluation resets the tasks): at step 0 and after every eval_every env steps
        if done and log_eval is not None and next_eval is not None and global_step >= next_eval:
            result = evaluate_success(tasks, learner.greedy_pose, args.eval_episodes, args.episode_length, stop)
            if result is None:
                break  # stopped: the checkpoint keeps this evaluation due
            log_eval(global_step, *result)
            next_eval += eval_every * ((global_step - next_eval) // eval_every + 1)

        # ALGO LOGIC: reset if done (tasks take turns), act, step, store
        global_step += 1  # counts env steps, this one included
        if done:
            task_id = episode % len(tasks)
            _, obs = tasks[task_id].reset()
            t, success = 0, 0.0
            obs_i = learner.buffers[task_id].add_observation(obs, 0, args.episode_length)
        action = learner.act(obs, t, task_id, explore=True)
        obs, reward, terminate = tasks[task_id].step(learner.agent.decode_action(action))
        t += 1
        success = max(success, reward)
        next_i = learner.buffers[task_id].add_observation(obs, t, args.episode_length)
        learner.buffers[task_id].add(obs_i, action, reward, terminate, next_i)  # a time-out is not terminal
        obs_i = next_i
        done = terminate or t == args.episode_length

        # ALGO LOGIC: update
        if global_step > args.learning_starts:
            for _ in range(args.updates_per_step):
                logs = learner.update(global_step)

        # TRY NOT TO MODIFY: log, save
        if global_step % 10 == 0:
            log_progress(writer, logs, global_step, (global_step - first_step) / (time.time() - start))
        if done:
            episode += 1
            successes.append(success)
            log_episode(writer, global_step, task_names[task_id], successes)
        with_replay = args.replay_save_interval > 0 and global_step % args.replay_save_interval == 0
        if save is not None and (global_step % args.checkpoint_interval == 0 or with_replay) \
                and global_step < args.total_timesteps:
            save(global_step, where(), with_replay)
    if log_eval is not None and not stop:  # the last point of the curve
        result = evaluate_success(tasks, learner.greedy_pose, args.eval_episodes, args.episode_length, stop)
        if result is not None:
            log_eval(global_step, *result)
    finished = not stop
    if save is not None:
        save(global_step, where(), bool(stop))  # at a stop with the replay buffers, to resume from here
    return global_step


# ------------------------------------ TRY NOT TO MODIFY: checks and main (the rest of the plumbing: envs/rlbench.py)


def check_args(args: Args) -> None:
    """Settings that cannot run raise TaskError, which the script reports as one line."""
    check_c2farm_args(args, at_least_one=("reptile_k",), unit_interval=("reptile_eps_start", "reptile_eps_end"))


def main(args: Args):
    """Pretraining: every input is checked before a folder, file or demo is made (envs.rlbench.run_pretraining)."""
    run_pretraining(args, SCRIPT, METHOD, check_args, make_agent, ReptileLearner, ReplayBuffer, train)


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except TaskError as e:
        sys.exit(f"c2farm_reptile_rlbench.py: error: {e}")

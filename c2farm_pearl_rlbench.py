"""PEARL over C2F-ARM (coarse-to-fine Q-attention) on RLBench or its Meta-World stand-in.

    python c2farm_pearl_rlbench.py --backend metaworld                             # ML10 train split
    python c2farm_pearl_rlbench.py --backend rlbench --held-out-task push_button   # the paper

Paper: Mandi, Abbeel, James, "On the Effectiveness of Fine-tuning Versus Meta-reinforcement
Learning" (NeurIPS 2022), Sec. 5.2 (RLBench); PEARL: Rakelly et al. 2019. A context encoder
(a small conv net on the front RGB, plus the encoded action and the reward) maps each transition of a
task to a Gaussian over a latent z (size 16); the Gaussians combine by a product of Gaussians
into the task posterior, regularised by KL(q || N(0, I)) with weight 1. z is tiled into the
depth-0 Q-attention network. Each task's context is 3 transitions drawn from the latest 10
of its buffer (demo transitions count). The Q-loss trains the encoder, as in PEARL.
Adaptation (`adapt`, used by finetune.py): infer z from the new task's own experience, no
gradient step.

Top to bottom: Args; C2F-ARM's discrete action; the voxel grid; the Q-attention network;
the replay buffer; demos into the replay; the learner; PEARL's context encoder and update;
the training loop; checkpoints, --resume and `adapt`. The environments come from
envs/rlbench.py; the C2F-ARM code is the same as in c2farm_mt_rlbench.py (a test keeps the
copies identical).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import signal
import sys
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from envs.rlbench import (  # noqa: F401  (the task lists are part of this script's interface)
    BACKEND_TASKS, METAWORLD_TEST_TASKS, METAWORLD_TRAIN_TASKS, RLBENCH_TASKS, SCENE_BOUNDS, ZOOM_HALF_WIDTH,
    Observation, TaskError, default_tasks, discover_keypoints, euler_to_quaternion, make_task, quaternion_to_euler)
from envs.run_dir import (
    CHECKPOINT, StopRequest, atomic_save, check_output_dir, load_resume, open_output_dir, rng_state, set_rng_state)

METHOD = "pearl"  # the checkpoint's method


@dataclass
class Args:
    exp_name: str = "c2farm_pearl_rlbench"
    """the name of this experiment (run directories are runs/{exp_name}__{seed}__{time})"""
    seed: int = 1
    """seed of random, numpy, torch and the tasks"""
    cuda: bool = False
    """use the GPU if there is one"""
    track: bool = False
    """log to Weights & Biases (wandb is imported only then)"""
    wandb_project_name: str = "finetune-vs-meta-rl"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """accepted for CLI uniformity; the front camera's frames are in the replay instead"""
    output_dir: str | None = None
    """where checkpoint.pt, replay.npz and TensorBoard logs go (default runs/{run_name})"""
    resume: bool = False
    """continue the run in --output-dir (required) from its checkpoint.pt and replay.npz: pass the run's own
    flags again (only where and how often it saves and the machine's settings may change); it ends at the
    same --total-timesteps. Without replay.npz (killed before its first save) the demos are collected again,
    the agent's own transitions are lost and the episode in progress restarts (a one-line warning says so)"""

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
    """env steps (next-best-pose actions) over all tasks (ours: the paper states no pretraining budget in
    env steps; 100k fills ARM's replay capacity of 1e5 once)"""
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
    """demo transitions zoom each deeper depth around a centre shifted by up to 0.75 x the zoom
    half-width per axis (ARM C2FARM.yaml crop_augmentation, launch_utils.py _get_action)"""
    unet_width: int = 64
    """CPU sizing flag: kernels of the Q-attention 3D U-Net's first level, doubled per level (ARM: 64;
    a multiple of 4, e.g. 16 for small CPU runs)"""
    learning_starts: int = 0
    """env steps before updates begin (the demo transitions are there from the start)"""
    updates_per_step: int = 1
    """learner updates per env step"""
    exploration: Literal["greedy", "gaussian", "epsilon"] = "greedy"
    """training episodes act `greedy` (ARM: QAttentionAgent.act forces deterministic), with `gaussian` noise
    (ARM's optional strategy: voxel and rotation indices + round(N(0, 1)), gripper flipped at random
    20% of the time) or `epsilon`-greedy per head"""
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

    # logging / evaluation
    eval_episodes: int = 5
    """greedy episodes per task at each evaluation (ours: neither the paper nor ARM's launch config fixes it)"""
    eval_interval: int = 0
    """env steps between evaluations during pretraining (0: only at the end)"""
    checkpoint_interval: int = 5_000
    """env steps between checkpoints (and one at the end)"""
    replay_save_interval: int = 10_000
    """env steps between saves of the replay buffers (demos and agent transitions) to replay.npz, each with a
    checkpoint; also written at a SIGINT / SIGTERM, removed when the run ends (it only serves --resume).
    About 10 GB at the paper's settings; 0 = only at a stop"""
    torch_threads: int = 1
    """CPU threads for torch (1 is fastest for these small 3D convolutions on a busy 2-core machine; 0 = torch's default)"""

    # PEARL
    latent_size: int = 16
    """size of the task latent z (paper: 16)"""
    context_size: int = 3
    """transitions per context (paper: 3) ..."""
    context_window: int = 10
    """... drawn from the task's latest transitions (paper: 10)"""
    kl_weight: float = 1.0
    """weight of KL(q(z | context) || N(0, I)) in the loss (paper: 1)"""


# --------------------------------------------------------------------------- ALGO LOGIC: the discrete action
# A C2F-ARM action is (voxel index per depth (flattened i*V*V + j*V + k), rot x, rot y, rot z bins, gripper open).


def discretize_rotation(q: np.ndarray, resolution: float = 5.0) -> np.ndarray:
    """Quaternion -> one bin per Euler axis: (angle + 180) / resolution, rounded, modulo 360/resolution."""
    bins = int(round(360 / resolution))
    return np.round((quaternion_to_euler(q) + 180.0) / resolution).astype(np.int64) % bins


def undiscretize_rotation(bins: np.ndarray, resolution: float = 5.0) -> np.ndarray:
    """Rotation bins -> quaternion xyzw: angle = bin * resolution - 180."""
    return euler_to_quaternion(np.asarray(bins, dtype=np.float64) * resolution - 180.0)


def point_to_voxel(point: np.ndarray, bounds: np.ndarray, voxels: int) -> np.ndarray:
    """Index (i, j, k) of the voxel containing a point; points outside go to the border voxel."""
    bounds = np.asarray(bounds, dtype=np.float64)
    size = (bounds[3:] - bounds[:3]) / voxels
    return np.clip(np.floor((np.asarray(point) - bounds[:3]) / size), 0, voxels - 1).astype(np.int64)


def voxel_to_point(index: np.ndarray, bounds: np.ndarray, voxels: int) -> np.ndarray:
    """Centre of voxel (i, j, k)."""
    bounds = np.asarray(bounds, dtype=np.float64)
    size = (bounds[3:] - bounds[:3]) / voxels
    return bounds[:3] + (np.asarray(index, dtype=np.float64) + 0.5) * size


def zoom_bounds(center: np.ndarray, half_width: float) -> np.ndarray:
    """Bounds of the next depth: a cube of +-half_width around the previous depth's voxel centre."""
    center = np.asarray(center, dtype=np.float64)
    return np.concatenate([center - half_width, center + half_width])


def voxelize(points: torch.Tensor, colors: torch.Tensor, bounds: torch.Tensor, voxels: int) -> torch.Tensor:
    """Points (B, N, 3), colours in [0, 1] (B, N, 3), bounds (B, 6) -> grid (B, 10, V, V, V).

    Channels: mean xyz of the points in the voxel (3), mean RGB (3), the voxel's normalised
    index (3), occupancy (1). Points outside the bounds are dropped."""
    b, n, _ = points.shape
    lo, hi = bounds[:, None, :3], bounds[:, None, 3:]
    idx = torch.floor((points - lo) / (hi - lo) * voxels).long()
    valid = ((idx >= 0) & (idx < voxels)).all(-1).reshape(-1)
    flat = (torch.arange(b, device=points.device)[:, None] * voxels**3
            + idx[..., 0] * voxels**2 + idx[..., 1] * voxels + idx[..., 2]).reshape(-1)[valid]
    feats = torch.cat([points, colors, torch.ones_like(points[..., :1])], -1).reshape(b * n, 7)[valid]
    sums = torch.zeros(b * voxels**3, 7, device=points.device).index_add_(0, flat, feats)
    count = sums[:, 6:7]
    means = sums[:, :6] / count.clamp(min=1.0)
    occupancy = (count > 0).float()
    grid = torch.cat([means, occupancy], -1).reshape(b, voxels, voxels, voxels, 7).permute(0, 4, 1, 2, 3)
    axis = torch.arange(voxels, device=points.device, dtype=torch.float32) / (voxels - 1)
    index = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), 0).expand(b, 3, voxels, voxels, voxels)
    return torch.cat([grid[:, :6], index, grid[:, 6:]], 1)


# --------------------------------------------------------------------------- ALGO LOGIC: Q-attention network


def lowdim_state(obs, t: int, episode_length: int) -> np.ndarray:
    """Proprioception: gripper open, gripper pose (7), finger positions (2), time in [-1, 1]."""
    time_left = (1.0 - t / episode_length) * 2.0 - 1.0
    return np.concatenate([[float(obs.gripper_open)], obs.gripper_pose, obs.gripper_joint_positions[:2],
                           [time_left]]).astype(np.float32)


LOWDIM_SIZE = 11


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
    """Q-attention for one depth, ARM's Qattention3DNet (networks.py) for 16^3 voxels: inception
    blocks down 16 -> 8 -> 4 and back up with skip connections, LeakyReLU(0.02), no normalisation.
    The proprioception (and PEARL's latent) goes through a dense layer and is tiled over the grid.
    Outputs one Q-value per voxel and, at the last depth, a dense head over spatial-softmax and
    max-pooled features of four levels: Q-values for the rotation bins and the gripper.
    `width` (ARM: 64 kernels) is a CPU sizing knob; the inner width of the inception blocks is half."""

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

    def reset_heads(self):
        """Re-initialise the Q outputs (finetune.py --load-encoder-only)."""
        _init(self.q_trans, activation=False)
        if self.rot_grip is not None:
            for block in self.rot_grip[:-1]:
                _init(block[0], activation=True)
            _init(self.rot_grip[-1], activation=False)


class C2FARM(nn.Module):
    """Coarse-to-fine Q-attention: depth 0 picks a voxel in the scene bounds, depth d+1 picks a
    voxel in a cube of +-zoom around the centre of depth d's choice; the last depth also picks
    the rotation (one of 72 bins per Euler axis) and the gripper state."""

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

    def index_to_center(self, flat_index: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        v = self.voxels
        ijk = torch.stack([flat_index // (v * v), (flat_index // v) % v, flat_index % v], -1).float()
        return bounds[:, :3] + (ijk + 0.5) * (bounds[:, 3:] - bounds[:, :3]) / v

    def zoom_in(self, bounds: torch.Tensor, flat_index: torch.Tensor, shift=None) -> torch.Tensor:
        """The next depth's bounds (B, 6): a cube of +-zoom around the centre of the chosen voxel
        (moved by `shift` (B, 3), the crop augmentation of demo transitions)."""
        center = self.index_to_center(flat_index, bounds) + (0.0 if shift is None else shift)
        return torch.cat([center - self.zoom, center + self.zoom], 1)

    def forward(self, points, colors, lowdim, latent=None, choose: Callable | None = None):
        """Act through the depths: each depth's Q-attention picks a voxel (`choose(q, depth)`,
        default argmax) and the next depth zooms around it. Returns the chosen voxels
        (B, depths) and the last depth's rotation/gripper Q-values (B, 3 * bins + 2)."""
        bounds = self.scene_bounds.expand(points.shape[0], 6)
        chosen = []
        for d, net in enumerate(self.qnets):
            q, rot_grip = net(voxelize(points, colors, bounds, self.voxels), lowdim, latent if d == 0 else None)
            chosen.append(q.argmax(1) if choose is None else choose(q, d))
            bounds = self.zoom_in(bounds, chosen[-1])
        return torch.stack(chosen, 1), rot_grip

    def split_rot_grip(self, rot_grip):
        n = self.rot_bins
        return [rot_grip[:, i * n:(i + 1) * n] for i in range(3)] + [rot_grip[:, 3 * n:]]

    def greedy_rot_grip(self, rot_grip) -> torch.Tensor:
        return torch.stack([h.argmax(1) for h in self.split_rot_grip(rot_grip)], 1)

    # -- discrete <-> continuous (numpy, one action)
    def encode_pose(self, pose: np.ndarray, gripper_open: float, shifts: np.ndarray | None = None) -> np.ndarray:
        """8-D next-best pose (or gripper pose + open state) -> discrete action; depth d + 1 zooms
        around depth d's voxel centre moved by shifts[d] (crop augmentation; none by default)."""
        bounds = self.scene_bounds.cpu().numpy().astype(np.float64)
        indices = []
        for d in range(self.depths):
            ijk = point_to_voxel(pose[:3], bounds, self.voxels)
            indices.append(ijk[0] * self.voxels**2 + ijk[1] * self.voxels + ijk[2])
            shift = shifts[d] if shifts is not None and d < self.depths - 1 else 0.0
            bounds = zoom_bounds(voxel_to_point(ijk, bounds, self.voxels) + shift, self.zoom)
        rot = discretize_rotation(pose[3:7], self.resolution)
        return np.array(indices + list(rot) + [int(gripper_open > 0.5)], dtype=np.int64)

    def decode_action(self, action: np.ndarray) -> np.ndarray:
        """Discrete action -> 8-D next-best pose: last depth's voxel centre, quaternion xyzw, gripper."""
        bounds = self.scene_bounds.cpu().numpy().astype(np.float64)
        v = self.voxels
        for d in range(self.depths):
            i = int(action[d])
            center = voxel_to_point(np.array([i // (v * v), (i // v) % v, i % v]), bounds, v)
            bounds = zoom_bounds(center, self.zoom)
        quat = undiscretize_rotation(action[self.depths:self.depths + 3], self.resolution)
        return np.concatenate([center, quat, [float(action[-1])]])


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
    """One task's prioritized replay (proportional, exponent alpha). Observations are stored
    once (point cloud as float16) and transitions refer to them by index, so a demo chain
    shares its keypoint frames. Arrays are allocated lazily by the OS: memory grows with use."""

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
        self.recent: list[int] = []  # transitions in insertion order (PEARL's context window)

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
        self.attention[obs_i] = action[:self.attention.shape[1]]  # ARM stores the attention coordinates with the observation
        self.shift[obs_i] = shift
        self.priority[i] = self.priority[: self.size].max() if self.size else 1.0  # new data: max priority
        self.pos, self.size = (self.pos + 1) % self.capacity, min(self.size + 1, self.capacity)
        self.recent = (self.recent + [i])[-100:]

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


# --------------------------------------------------------------------------- ALGO LOGIC: demos


def demo_chains(keypoints: list[int], every: int = 10) -> list[list[int]]:
    """Demo augmentation: every `every`-th frame before the last keypoint starts a chain of
    frames [start, next keypoint, following keypoints..., last keypoint]."""
    return [[start] + [k for k in keypoints if k > start] for start in range(0, keypoints[-1], every)]


def demo_frames(demo, every: int = 10, backend: str = "metaworld") -> list[int]:
    """The frames the demo pipeline reads images from (so a backend may render only these)."""
    keypoints = discover_keypoints(demo, backend)
    return sorted({i for chain in demo_chains(keypoints, every) for i in chain})


def add_demos(buffer: ReplayBuffer, agent: C2FARM, demos, args: Args, rng: np.random.Generator) -> int:
    """Keypoint discovery (the backend's rule, envs/rlbench.py) + demo augmentation into a replay
    buffer; returns the transitions added.
    Each chain is an episode: (frame -> keypoint) transitions whose action is the keypoint's
    gripper pose and open state, reward 1 and done at the last keypoint (demos succeed). With
    --crop-augmentation each transition zooms around shifted centres, U(-0.75 zoom, 0.75 zoom) per axis."""
    added, max_shift = 0, 0.75 * agent.zoom if args.crop_augmentation else 0.0
    for demo in demos:
        for chain in demo_chains(discover_keypoints(demo, args.backend), args.demo_augmentation_every):
            prev = buffer.add_observation(demo[chain[0]], 0, args.episode_length)
            for t, k in enumerate(chain[1:], start=1):
                nxt = buffer.add_observation(demo[k], min(t, args.episode_length), args.episode_length)
                shifts = rng.uniform(-max_shift, max_shift, (agent.depths - 1, 3))
                action = agent.encode_pose(demo[k].gripper_pose, demo[k].gripper_open, shifts)
                last = k == chain[-1]
                buffer.add(prev, action, float(last), last, nxt, shifts)
                prev, added = nxt, added + 1
    return added


def collect_demos(task, args: Args):
    """Demos from the backend; the Meta-World stand-in renders only the frames we read."""
    return task.get_demos(args.demos, live_demos=True,
                          frames=lambda demo: demo_frames(demo, args.demo_augmentation_every, args.backend))


# --------------------------------------------------------------------------- ALGO LOGIC: the learner


def to_tensors(batch: Batch, device, next_obs: bool = False):
    """Replay arrays -> (points (B,N,3), colours in [0,1] (B,N,3), lowdim (B,L)) tensors."""
    pcd, rgb, lowdim = (batch.next_pcd, batch.next_rgb, batch.next_lowdim) if next_obs else (
        batch.pcd, batch.rgb, batch.lowdim)
    points = torch.as_tensor(pcd, device=device).float().flatten(1, 2)
    colors = torch.as_tensor(rgb, device=device).float().flatten(1, 2) / 255.0
    return points, colors, torch.as_tensor(lowdim, device=device)


def obs_tensors(obs, t: int, args: Args, device):
    """One observation as a batch of one."""
    points = torch.as_tensor(obs.front_point_cloud, device=device).float().reshape(1, -1, 3)
    colors = torch.as_tensor(obs.front_rgb, device=device).float().reshape(1, -1, 3) / 255.0
    return points, colors, torch.as_tensor(lowdim_state(obs, t, args.episode_length), device=device)[None]


class C2FARMLearner:
    """The C2F-ARM update (stepjam/ARM qattention_agent.py): per depth, a double-Q target from the
    target network at the next state (zoomed where the agent zoomed from it), a Huber loss for
    the taken voxel (and, at the last depth, the rotation and gripper heads), an L1 regulariser
    on all Q-values, soft target updates and prioritized replay over per-task buffers."""

    def __init__(self, agent: C2FARM, buffers: list[ReplayBuffer], args: Args, device):
        self.agent, self.buffers, self.args, self.device = agent, buffers, args, device
        self.model = agent  # what a checkpoint's "model" holds (PEARL: the agent and its context encoder)
        self.target = copy.deepcopy(agent).requires_grad_(False)
        self.optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.rng = np.random.default_rng(args.seed)

    def sample(self, task_ids: list[int], per_task: int) -> tuple[Batch, list[tuple[int, np.ndarray]]]:
        """An equal share of the batch from each listed task's buffer; (task, indices) per share."""
        shares = [(t, *self.buffers[t].sample(per_task, self.args.importance_exponent, self.rng)) for t in task_ids]
        batch = Batch(*(np.concatenate(arrays) for arrays in zip(*(b for _, _, b in shares))))
        return batch, [(t, idx) for t, idx, _ in shares]

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
            q, rot_grip = agent.qnets[d](voxelize(points, colors, bounds, v), lowdim, z)
            with torch.no_grad():
                next_grid = voxelize(next_points, next_colors, next_bounds, v)
                online_q, online_rot_grip = agent.qnets[d](next_grid, next_lowdim, next_z)
                target_q, target_rot_grip = target.qnets[d](next_grid, next_lowdim, next_z)
                next_voxel = online_q.argmax(1)  # double Q: the online network picks a', the target network values it
                q_next = target_q.gather(1, next_voxel[:, None])
                if last:  # the last depth's target is the mean over its five heads (voxel, 3 rotations, gripper)
                    next_rot_grip = agent.greedy_rot_grip(online_rot_grip)
                    q_next = torch.cat([q_next] + [h.gather(1, next_rot_grip[:, i:i + 1]) for i, h in
                                                   enumerate(agent.split_rot_grip(target_rot_grip))], 1).mean(1, True)
                y = (reward + args.gamma * (1.0 - done) * q_next[:, 0]).clamp(min=0.0)  # y = max(0, r + gamma (1 - done) Q')
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
            bounds = agent.zoom_in(bounds, action[:, d], shift[:, d])
            stored = next_attention[:, d] >= 0
            next_bounds = agent.zoom_in(next_bounds, torch.where(stored, next_attention[:, d], next_voxel),
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
        offset = 0
        for t, idx in shares:
            self.buffers[t].update_priorities(idx, priorities[offset:offset + len(idx)])
            offset += len(idx)

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

    def explore_voxel(self, voxel: torch.Tensor, strategy: str) -> torch.Tensor:
        """A perturbed voxel choice (batch of one), applied at each depth before the next zooms."""
        v = self.agent.voxels
        if strategy == "epsilon":
            return voxel if self.rng.random() >= self.args.epsilon else torch.full_like(voxel, self.rng.integers(v**3))
        i = int(voxel[0])
        ijk = np.array([i // (v * v), (i // v) % v, i % v]) + np.round(self.rng.normal(0.0, 1.0, 3))  # ARM: +round(N(0, 1))
        ijk = np.clip(ijk, 0, v - 1).astype(np.int64)
        return torch.full_like(voxel, int(ijk[0] * v * v + ijk[1] * v + ijk[2]))

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

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "target_model": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "sampling_rng": self.rng.bit_generator.state}

    def load(self, ckpt: dict) -> None:
        """Restore what `state` saved (--resume)."""
        self.model.load_state_dict(ckpt["model"])
        self.target.load_state_dict(ckpt["target_model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.rng.bit_generator.state = ckpt["sampling_rng"]


# --------------------------------------------------------------------------- ALGO LOGIC: PEARL


def product_of_gaussians(mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine N independent Gaussian factors (N, L) into one: precision-weighted mean."""
    var = var.clamp(min=1e-7)
    post_var = 1.0 / (1.0 / var).sum(0)  # sigma^2 = 1 / sum_n (1 / sigma_n^2)
    return post_var * (mu / var).sum(0), post_var  # mu = sigma^2 * sum_n mu_n / sigma_n^2


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)) = 1/2 sum (var + mu^2 - 1 - log var), summed over the latent dimensions."""
    return 0.5 * (var + mu**2 - 1.0 - torch.log(var)).sum(-1)


ACTION_FEATURES = 10  # xyz (3), sin and cos of the three rotation angles (6), gripper (1)


def encode_actions(agent: C2FARM, action: torch.Tensor) -> torch.Tensor:
    """Context features of discrete actions (N, depths + 4) -> (N, 10): the position the action
    moves to (the last depth's voxel centre) normalised to [0, 1] in the scene bounds, every
    rotation angle (bin * resolution - 180 degrees) as its sine and cosine, the gripper bit."""
    bounds = agent.scene_bounds.expand(len(action), 6)
    for d in range(agent.depths):
        center = agent.index_to_center(action[:, d], bounds)
        bounds = agent.zoom_in(bounds, action[:, d])
    lo, hi = agent.scene_bounds[:3], agent.scene_bounds[3:]
    angles = torch.deg2rad(action[:, agent.depths:agent.depths + 3].float() * agent.resolution - 180.0)
    return torch.cat([(center - lo) / (hi - lo), angles.sin(), angles.cos(), action[:, -1:].float()], 1)


class ContextEncoder(nn.Module):
    """One transition (front RGB, encoded action, reward) -> Gaussian (mu, var) over z."""

    def __init__(self, action_size: int = ACTION_FEATURES, latent: int = 16, channels: int = 16):
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
        self.encoder = ContextEncoder(ACTION_FEATURES, args.latent_size).to(device)
        self.model = nn.ModuleDict({"agent": agent, "encoder": self.encoder})
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    def posterior(self, task_id: int):
        """(mu, var) of z from `context_size` of the task's `context_window` latest transitions,
        or the prior N(0, I) when the task has none yet."""
        buffer, args = self.buffers[task_id], self.args
        recent = buffer.recent[-args.context_window:]
        if not recent:
            zeros = torch.zeros(args.latent_size, device=self.device)
            return zeros, zeros + 1.0
        idx = self.rng.choice(recent, args.context_size, replace=len(recent) < args.context_size)
        context = buffer.batch(idx)
        action = encode_actions(self.agent, torch.as_tensor(context.action, device=self.device))
        mu, var = self.encoder(torch.as_tensor(context.rgb, device=self.device), action,
                               torch.as_tensor(context.reward, device=self.device))
        return product_of_gaussians(mu, var)

    def update(self, global_step: int) -> dict[str, float]:
        """One multi-task update with every task's sampled z; loss = Q-loss + kl_weight * KL."""
        tasks, args = self.ready_tasks(), self.args
        per_task = max(1, args.batch_size // len(self.buffers))
        batch, shares = self.sample(tasks, per_task)
        zs, kls = [], []
        for t in tasks:
            mu, var = self.posterior(t)
            zs.append(mu + var.sqrt() * torch.randn_like(mu))  # reparameterised sample z = mu + sigma * eps
            kls.append(kl_to_standard_normal(mu, var))
        latent = torch.stack(zs).repeat_interleave(per_task, 0)
        q_loss, priorities, logs = self.loss(batch, latent=latent, next_latent=latent.detach())
        kl = torch.stack(kls).mean()
        self.step_optimizer(q_loss + args.kl_weight * kl)
        self.soft_update()
        self.update_priorities(shares, priorities)
        return {**logs, "losses/kl": kl.detach()}

    @torch.no_grad()
    def latent(self, task_id: int):
        return self.posterior(task_id)[0][None]  # act with the posterior mean


# --------------------------------------------------------------------------- the loop


def evaluate(tasks, learner: C2FARMLearner, args: Args, stop=None) -> tuple[float, int] | None:
    """Greedy success rate over `eval_episodes` episodes of every task, and the episode count
    (None once `stop` is set: a SIGINT / SIGTERM does not wait for a long evaluation)."""
    successes = []
    for task_id, task in enumerate(tasks):
        for _ in range(args.eval_episodes):
            if stop:
                return None
            _, obs = task.reset()
            success = 0.0
            for t in range(args.episode_length):
                action = learner.act(obs, t, task_id, explore=False)
                obs, reward, terminate = task.step(learner.agent.decode_action(action))
                success = max(success, reward)
                if terminate:
                    break
            successes.append(success)
    return float(np.mean(successes)), len(successes)


def train(args: Args, learner: C2FARMLearner, tasks: list, task_names: list[str], writer,
          log_eval: Callable | None = None, eval_every: int | None = None, save: Callable | None = None,
          stop=None, loop: dict | None = None) -> int:
    """The C2F-ARM loop shared by pretraining (MT / Reptile / PEARL learners) and fine-tuning:
    episodes round-robin over the tasks, `updates_per_step` learner updates per env step.
    `log_eval(step, success_rate, episodes)` receives evaluations at step 0 (when `eval_every`
    is set), at the first episode end after every `eval_every` env steps, and at the end;
    `save(step, loop, with_replay)` every `checkpoint_interval` steps, with the replay buffers every
    `replay_save_interval`, and at the end. A set `stop` (SIGINT / SIGTERM) ends the loop after the
    current step with a save that includes the replay. `loop` (a checkpoint's) continues a run
    exactly where it stopped. Returns the env steps taken."""
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
            result = evaluate(tasks, learner, args, stop)
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
            for k, v in logs.items():
                writer.add_scalar(k, float(v), global_step)
            sps = (global_step - first_step) / (time.time() - start)  # env steps/s, updates and evaluations included
            writer.add_scalar("charts/SPS", sps, global_step)
            print(f"global_step={global_step} SPS={sps:.2f}", flush=True)
        if done:
            episode += 1
            successes.append(success)
            rate = float(np.mean(successes[-20:]))
            writer.add_scalar("charts/episodic_return", success, global_step)
            writer.add_scalar(f"charts/success/{task_names[task_id]}", success, global_step)
            writer.add_scalar("charts/success_rate", rate, global_step)
            print(f"global_step={global_step} task={task_names[task_id]} episodic_return={success:.0f} "
                  f"success_rate(last 20)={rate:.2f}", flush=True)
        with_replay = args.replay_save_interval > 0 and global_step % args.replay_save_interval == 0
        if save is not None and (global_step % args.checkpoint_interval == 0 or with_replay) \
                and global_step < args.total_timesteps:
            save(global_step, where(), with_replay)
    if log_eval is not None and not stop:  # the last point of the curve
        result = evaluate(tasks, learner, args, stop)
        if result is not None:
            log_eval(global_step, *result)
    finished = not stop
    if save is not None:
        save(global_step, where(), bool(stop))  # at a stop with the replay buffers, to resume from here
    return global_step


# --------------------------------------------------------------------------- TRY NOT TO MODIFY: checkpoint and setup


CHECKPOINT_FORMAT = "finetune-vs-meta-rl"  # = finetune.CHECKPOINT_FORMAT


def save_checkpoint(path: str, args: Args, learner: C2FARMLearner, train_tasks: list[str], global_step: int,
                    method: str = METHOD, loop: dict | None = None) -> None:
    """Tensors and plain values only (loads with weights_only=True); written atomically.
    finetune.py also saves its fine-tuned agents with this (method "finetune" / "scratch").
    --resume continues from the learner's state, the random states and `loop` (train's state: "resume")."""
    ckpt = {"format": CHECKPOINT_FORMAT, "format_version": 1, "module": os.path.basename(__file__)[:-3],
            "benchmark": "rlbench", "method": method, "train_tasks": list(train_tasks),
            "args": dataclasses.asdict(args), "global_step": int(global_step), **learner.state(),
            "rng": rng_state(), "resume": loop}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save(ckpt, path)


def check_args(args: Args) -> None:
    """Settings that cannot run raise TaskError, which the scripts report as one line."""
    for name in ("total_timesteps", "batch_size", "image_size", "episode_length", "voxel_size", "depths",
                 "replay_size", "updates_per_step", "eval_episodes", "checkpoint_interval", "unet_width",
                 "demo_augmentation_every",
                 "latent_size", "context_size"):
        if getattr(args, name) < 1:
            raise TaskError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.context_window < args.context_size:
        raise TaskError(f"--context-window ({args.context_window}) must hold --context-size "
                        f"({args.context_size}) transitions")
    if args.context_window > 100:
        raise TaskError(f"--context-window must be at most 100, the transitions a buffer keeps as recent "
                        f"(got {args.context_window})")
    for name in ("demos", "learning_starts", "eval_interval", "replay_save_interval", "torch_threads", "weight_decay",
                 "priority_exponent", "importance_exponent", "lambda_trans_qreg", "lambda_rot_qreg", "kl_weight"):
        if not getattr(args, name) >= 0:
            raise TaskError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(args, name)})")
    for name in ("gamma", "epsilon"):
        if not 0 <= getattr(args, name) <= 1:
            raise TaskError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")
    for name in ("learning_rate", "grad_clip_value"):
        if not getattr(args, name) > 0:
            raise TaskError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if not 0 < args.tau <= 1:
        raise TaskError(f"--tau must be in (0, 1] (got {args.tau})")
    if not 0 < args.rotation_resolution <= 180:
        raise TaskError(f"--rotation-resolution must be in (0, 180] degrees (got {args.rotation_resolution})")
    if args.unet_width % 4:
        raise TaskError(f"--unet-width must be a multiple of 4 (got {args.unet_width})")
    if args.exploration not in ("greedy", "gaussian", "epsilon"):
        raise TaskError(f"--exploration must be greedy, gaussian or epsilon (got {args.exploration})")


def setup(args: Args, task_names: list[str], agent: C2FARM | None = None, latent: int = 0):
    """Seeds, device, tasks and agent: the part every script shares (the replay: `make_buffers`)."""
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    tasks = [make_task(args.backend, name, args.image_size, args.seed + i) for i, name in enumerate(task_names)]
    agent = (agent or make_agent(args, latent)).to(device)
    return device, tasks, agent


def make_buffers(args: Args, task_names: list[str], tasks: list, agent: C2FARM, stop=None,
                 replay: str | None = None, resume_step: int | None = None) -> tuple[list[ReplayBuffer], bool]:
    """Every task's prioritized replay, filled with `--demos` expert demos, or (--resume) loaded from
    the run's `replay` file. Also returns whether that file is of the checkpoint's env step
    `resume_step` (else the episode in progress cannot continue: its observations are not in it)."""
    buffers = [ReplayBuffer(max(1, args.replay_size // len(tasks)), args.image_size, args.depths + 4,
                            args.priority_exponent) for _ in tasks]
    if replay is not None and os.path.exists(replay):
        step = load_replay(replay, buffers)
        print(f"replay buffers of env step {step} from {replay}", flush=True)
        if step != resume_step:  # killed between the replay's save and the checkpoint's
            print(f"warning: {replay} is of env step {step}, the checkpoint of env step {resume_step}: "
                  "resuming with it; the episode in progress restarts", file=sys.stderr, flush=True)
        return buffers, step == resume_step
    if replay is not None:
        print(f"warning: {replay} is missing: collecting the demos again; the agent's own transitions "
              "before the checkpoint are lost and the episode in progress restarts", file=sys.stderr, flush=True)
    demo_rng = np.random.default_rng(args.seed)
    for name, task, buffer in zip(task_names, tasks, buffers):
        if stop:  # demos take minutes on RLBench: a stop does not wait for all of them
            print(f"stopped by {signal.Signals(stop.signum).name} while collecting demos; nothing new was saved: "
                  "run the same command again", file=sys.stderr, flush=True)
            raise SystemExit(128 + stop.signum)
        if args.demos > 0:
            t0 = time.time()
            n = add_demos(buffer, agent, collect_demos(task, args), args, demo_rng)
            print(f"{name}: {args.demos} demos -> {n} transitions ({time.time() - t0:.1f}s)", flush=True)
    return buffers, False


def make_writer(args: Args, run_dir: str, purge_step: int | None = None):
    """TensorBoard in run_dir; a resumed run (`purge_step`: its checkpoint's step) continues the same
    log, TensorBoard dropping what the killed run logged after its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=os.path.basename(run_dir), save_code=True)
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    if purge_step is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


# --------------------------------------------------------------------------- TRY NOT TO MODIFY: resume


REPLAY = "replay.npz"  # the replay buffers, beside checkpoint.pt
OBS_ARRAYS = ("rgb", "pcd", "lowdim", "attention", "shift")  # ReplayBuffer's arrays per observation
TRANSITION_ARRAYS = ("obs_index", "action", "reward", "done", "priority")  # and per transition


def save_run(output_dir: str, args: Args, learner: C2FARMLearner, train_tasks: list[str], global_step: int,
             loop: dict, with_replay: bool, method: str = METHOD) -> None:
    """`train`'s save: the replay buffers first (`with_replay`), then the checkpoint. A finished run's
    replay file goes: it only serves --resume and is the run's largest file."""
    replay = os.path.join(output_dir, REPLAY)
    if with_replay:
        save_replay(replay, learner.buffers, global_step)
    save_checkpoint(os.path.join(output_dir, CHECKPOINT), args, learner, train_tasks, global_step, method, loop)
    if loop["finished"] and os.path.exists(replay):
        os.remove(replay)


def save_replay(path: str, buffers: list[ReplayBuffer], global_step: int) -> None:
    """The filled part of every task's replay arrays (demos, agent transitions, priorities, PEARL's
    recent transitions) in one .npz, deflated at level 1 (numpy's default level takes about 3x as
    long for a similar size), written to a temporary name of this process and renamed into place."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        def put(name: str, array) -> None:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

        put("global_step", np.int64(global_step))
        for i, b in enumerate(buffers):
            put(f"{i}/counters", np.array([b.size, b.pos, b.obs_size, b.obs_pos], np.int64))
            put(f"{i}/recent", np.array(b.recent, np.int64))
            for name in OBS_ARRAYS:
                put(f"{i}/{name}", getattr(b, name)[:b.obs_size])
            for name in TRANSITION_ARRAYS:
                put(f"{i}/{name}", getattr(b, name)[:b.size])
    os.replace(tmp, path)


def load_replay(path: str, buffers: list[ReplayBuffer]) -> int:
    """Fill new buffers from `save_replay`'s file; returns its env step. One-line TaskError if it does not fit."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if f"{len(buffers)}/counters" in f.files:
                raise ValueError("it holds more task buffers than this run has")
            for i, b in enumerate(buffers):
                b.size, b.pos, b.obs_size, b.obs_pos = (int(x) for x in f[f"{i}/counters"])
                b.recent = f[f"{i}/recent"].tolist()
                for name in OBS_ARRAYS:
                    getattr(b, name)[:b.obs_size] = f[f"{i}/{name}"]
                for name in TRANSITION_ARRAYS:
                    getattr(b, name)[:b.size] = f[f"{i}/{name}"]
            return int(f["global_step"])
    except Exception as e:  # truncated, another run's shapes, not an npz
        reason = " ".join(str(e).split())[:120]
        raise TaskError(f"--resume: {path} does not fit this run ({type(e).__name__}: {reason}); remove it to "
                        "resume without it (the demos are collected again, the agent's transitions are lost)") from None


# Args a --resume may change (envs.run_dir.load_resume): where and how often it saves, and the machine's
# settings; any other flag must be the run's own (a resumed run is the same run).
RESUME_FREE = frozenset({"resume", "output_dir", "checkpoint_interval", "replay_save_interval", "cuda",
                         "torch_threads", "track", "wandb_project_name", "wandb_entity"})


def restore(learner: C2FARMLearner, ckpt: dict, path: str) -> dict:
    """--resume: the learner (networks, optimizer, sampling generator) and the global random states from
    a checkpoint, before any demo or file is made; returns train's loop state. One-line TaskError if it
    does not fit this run."""
    try:
        learner.load(ckpt)
        set_rng_state(ckpt["rng"])
        return dict(ckpt["resume"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        reason = " ".join(line.strip() for line in str(e).splitlines())[:240]
        raise TaskError(f"--resume: {path} does not fit this run: {reason}") from None


def resume_loop(loop: dict, tasks: list):
    """train's variables at the checkpoint; every task's simulator state restored. The episode in
    progress goes on where its task can continue it (RLBench cannot: a new episode starts)."""
    observations = [task.set_state(state) for task, state in zip(tasks, loop["tasks"])]
    obs = None if loop["done"] else observations[loop["task_id"]]
    return (loop["global_step"], loop["episode"], list(loop["successes"]), loop["next_eval"], obs is None,
            loop["task_id"], obs, loop["obs_i"], loop["t"], loop["success"])


def main(args: Args):
    """Pretraining entry point: every input is checked before a folder, file or demo is made."""
    task_names = default_tasks(args.backend, args.train_tasks, args.held_out_task)
    check_args(args)
    if args.resume and args.output_dir is None:
        raise TaskError("--resume needs --output-dir: the directory of the run to continue")
    run_dir = args.output_dir or os.path.join("runs", f"{args.exp_name}__{args.seed}__{int(time.time())}")
    check_output_dir(run_dir, args.resume)
    path, replay = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, REPLAY)
    script = os.path.basename(__file__)[:-3]
    ckpt = load_resume(run_dir, script, dataclasses.asdict(args), RESUME_FREE) if args.resume else None
    if ckpt is not None and ckpt["resume"]["finished"]:
        print(f"the run in {run_dir} is complete ({ckpt['global_step']} env steps): nothing to resume", flush=True)
        return
    device, tasks, agent = setup(args, task_names, latent=args.latent_size)
    writer = stop = loop = None
    try:
        learner = PEARLLearner(agent, [], args, device)
        loop = restore(learner, ckpt, path) if ckpt is not None else None
        lock = open_output_dir(run_dir)  # noqa: F841  (held while this process runs)
        stop = StopRequest()
        learner.buffers, exact = make_buffers(args, task_names, tasks, agent, stop, ckpt and replay,
                                              ckpt and ckpt["global_step"])
        if loop is not None and not exact:
            loop["done"] = True  # the episode in progress restarts
        writer = make_writer(args, run_dir, purge_step=loop and loop["global_step"])

        def log_eval(step, rate, episodes):
            writer.add_scalar("eval/success_rate", rate, step)
            print(f"[eval] global_step={step} success_rate={rate:.3f} ({episodes} episodes)", flush=True)

        step = train(args, learner, tasks, task_names, writer, log_eval=log_eval, eval_every=args.eval_interval or None,
                     save=lambda step, loop, with_replay: save_run(run_dir, args, learner, task_names, step, loop,
                                                                   with_replay),
                     stop=stop, loop=loop)
    finally:
        for task in tasks:
            task.close()
        if writer is not None:
            writer.close()
    if stop:
        stop.exit(run_dir, step)
    print(f"saved {path}", flush=True)


def adapt(args: Args, learner: PEARLLearner, tasks: list, task_name: str, writer, log_eval: Callable, eval_every: int,
          save: Callable | None = None, stop=None, loop: dict | None = None) -> int:
    """PEARL's adaptation to a new task (finetune.py: `learner` holds the pretrained agent and encoder,
    its buffer the task's `--demos` demos): collect `total_timesteps` env steps there and act with z
    inferred from that task's own context; no gradient step. Evaluates at step 0 (the zero-shot point),
    every `eval_every` steps and at the end; `save`, `stop` and `loop` as in `train` (--resume)."""
    args = dataclasses.replace(args, learning_starts=args.total_timesteps + 1)  # never update
    return train(args, learner, tasks, [task_name], writer, log_eval=log_eval, eval_every=max(1, eval_every),
                 save=save, stop=stop, loop=loop)


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except TaskError as e:
        sys.exit(f"c2farm_pearl_rlbench.py: error: {e}")

"""Reptile on data-efficient Rainbow (DER) for Atari: meta-pretraining over several games.

    python rainbow_reptile_atari.py --train-games 10          # paper's 10-game set, 1M env steps

The study's Reptile-Rainbow (Mandi, Abbeel, James 2022, authors' Kaixhin/Rainbow fork): the
agent plays a random game per reset, as multi-task DER does (rainbow_mt_atari.py); at every
env step after learning starts it picks one game's buffer, makes `--reptile-k` DER updates on
batches from that game only (phi), and then moves the meta-weights toward them:

    theta <- theta + eps * (phi - theta)        (Nichol et al. 2018, the standard form)

with eps scheduled linearly from --reptile-eps-start to --reptile-eps-end over training.
The authors' code writes theta <- phi + e * (theta - phi), i.e. eps = 1 - e, and their
schedule makes the effective eps go 0 -> 1; our defaults (0.0 -> 1.0) reproduce that.
Nichol et al.'s standard Reptile anneals instead from 1.0 to 0.0
(--reptile-eps-start 1.0 --reptile-eps-end 0.0).

The network and its state_dict keys equal rainbow_mt_atari's, so finetune.py fine-tunes a
Reptile checkpoint with the same DER code. Everything else (env, buffer, loss) is the same
DER as in rainbow_mt_atari.py, repeated here so this file stands alone.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from envs import atari
from envs.atari import FIVE_GAMES, FULL_ACTIONS, TEN_GAMES, AtariEnv, find_rom_id, pad_action, rom_id  # noqa: F401

CHECKPOINT_FORMAT = "finetune-vs-meta-rl"  # must equal finetune.CHECKPOINT_FORMAT


@dataclass
class Args:
    exp_name: str = "rainbow_reptile_atari"
    seed: int = 1
    cuda: bool = False
    """use the GPU if there is one"""
    track: bool = False
    """log to Weights & Biases (wandb is imported only then)"""
    wandb_project_name: str = "finetune-vs-meta-rl"
    output_dir: str | None = None
    """TensorBoard logs and checkpoint.pt go here (default runs/{run_name})"""
    torch_threads: int = 2
    """torch CPU threads; DER's small network gains from a second thread (about 20% more env steps
    per second on a 2-core CPU, benchmarks/bench_rainbow_atari.py). Use 1 on a machine busy with
    other work (OpenMP's second thread then waits for a core)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """encoder and hidden layers in bfloat16 (output layers, C51 loss and Adam stay fp32);
    auto = bf16 where the hardware has native bfloat16 arithmetic"""

    # games
    train_games: int = 10
    """5 or 10: the paper's game sets (ignored when --games is given)"""
    games: tuple[str, ...] | None = None
    """explicit list of games, e.g. --games Pong Breakout (CamelCase ALE names)"""
    pad_actions: bool = True
    """pad every game's action set to 18 (padding = NOOP), as the authors' pretrained agents"""

    # Reptile (authors' fork: k=5 inner updates on one game per env step)
    reptile_k: int = 5
    """inner DER updates on one game's buffer before each outer step"""
    reptile_eps_start: float = 0.0
    """outer step size at the start; 0.0 -> 1.0 is the authors' effective schedule (their e = 1 - eps)"""
    reptile_eps_end: float = 1.0
    """outer step size at the end of training (standard Reptile anneals 1.0 -> 0.0)"""

    # budget and logging
    total_timesteps: int = 1_000_000
    """env steps (agent steps, 4 frames each); authors pretrain for 1M"""
    save_every: int = 100_000
    """write checkpoint.pt every this many env steps (and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation when this checkpoint is fine-tuned (finetune.py)"""
    eval_epsilon: float = 0.001
    """epsilon-greedy during evaluation (DER protocol)"""
    eval_max_steps: int = 27_000
    """cap on agent steps per evaluation episode: 108k frames, the ALE standard"""

    # DER hyperparameters (van Hasselt et al. 2019, Table 1; same in the authors' fork)
    buffer_size: int = 1_000_000
    """total replay capacity, split evenly between the games"""
    learning_starts: int = 1600
    batch_size: int = 32
    """every inner batch comes from the one game of the current outer step"""
    learning_rate: float = 1e-4
    adam_eps: float = 1.5e-4
    gamma: float = 0.99
    n_step: int = 20
    num_atoms: int = 51
    v_min: float = -10.0
    v_max: float = 10.0
    noisy_std: float = 0.1
    hidden_size: int = 256
    """dueling head width: DER uses 256; the authors used 512 for their pretrained agents.
    We keep 256 everywhere so pretrained and scratch agents have the same capacity."""
    target_network_frequency: int = 2000
    """gradient updates (inner steps) between target syncs"""
    priority_exponent: float = 0.5
    priority_weight: float = 0.4
    """importance-sampling exponent, annealed linearly to 1 over training"""
    max_grad_norm: float = 10.0
    max_noops: int = 30
    """up to this many no-ops after a reset"""
    max_episode_steps: int = 27_000
    """agent steps before a training episode is truncated (108k frames)"""


# --------------------------------------------------------------------------- environment


def make_env(game: str, seed: int, num_actions: int | None = None, episodic_life: bool = True,
             args: Args | None = None) -> AtariEnv:
    """envs.atari.make_env with this script's settings (episode caps, no-ops)."""
    args = args or Args()
    return atari.make_env(game, seed, num_actions, episodic_life, args.max_noops,
                          args.max_episode_steps if episodic_life else args.eval_max_steps)


# --------------------------------------------------------------------------- network


class NoisyLinear(nn.Module):
    """Factorised Gaussian NoisyNet layer (Fortunato et al. 2018). In eval() mode it uses the
    mean weights only."""

    def __init__(self, in_features: int, out_features: int, std_init: float = 0.1):
        super().__init__()
        self.in_features, self.out_features, self.std_init = in_features, out_features, std_init
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_sigma = nn.Parameter(torch.empty(out_features, in_features))
        self.bias_mu = nn.Parameter(torch.empty(out_features))
        self.bias_sigma = nn.Parameter(torch.empty(out_features))
        self.register_buffer("weight_epsilon", torch.zeros(out_features, in_features))
        self.register_buffer("bias_epsilon", torch.zeros(out_features))
        bound = 1 / in_features**0.5
        nn.init.uniform_(self.weight_mu, -bound, bound)
        nn.init.uniform_(self.bias_mu, -bound, bound)
        self.reset_sigma()
        self.reset_noise()

    @torch.no_grad()
    def reset_sigma(self) -> None:
        self.weight_sigma.fill_(self.std_init / self.in_features**0.5)
        self.bias_sigma.fill_(self.std_init / self.out_features**0.5)

    @staticmethod
    def scaled_noise(n: int, device: torch.device) -> torch.Tensor:
        """n draws of f(x) = sign(x) sqrt(|x|), x ~ N(0, 1): the factorised noise."""
        x = torch.randn(n, device=device)
        return x.sign() * x.abs().sqrt()

    @torch.no_grad()
    def reset_noise(self, eps: torch.Tensor | None = None) -> None:
        """New noise: eps (in_features + out_features values of `scaled_noise`, drawn here if not
        given) gives the weight noise eps_out x eps_in and the bias noise eps_out."""
        if eps is None:
            eps = self.scaled_noise(self.in_features + self.out_features, self.weight_epsilon.device)
        eps_in, eps_out = eps[:self.in_features], eps[self.in_features:]
        torch.outer(eps_out, eps_in, out=self.weight_epsilon)
        self.bias_epsilon.copy_(eps_out)

    def noisy_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) as the layer uses them: mu + sigma * epsilon in train() mode, mu in eval()."""
        if not self.training:
            return self.weight_mu, self.bias_mu
        return (torch.addcmul(self.weight_mu, self.weight_sigma, self.weight_epsilon),
                torch.addcmul(self.bias_mu, self.bias_sigma, self.bias_epsilon))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.noisy_weights())


PATCHES, PATCH_PIXELS = 16 * 16, 5 * 5  # the first conv's 16x16 positions and its 5x5 window


def frame_patches(frames: np.ndarray) -> np.ndarray:
    """(..., 84, 84) frames -> (..., 256, 25): the non-overlapping 5x5 patches that DER's first conv
    (kernel 5, stride 5) reads, row by row. It never reads the last 4 rows and columns."""
    lead = frames.shape[:-2]
    x = frames[..., :80, :80].reshape(*lead, 16, 5, 16, 5)
    return np.swapaxes(x, -3, -2).reshape(*lead, PATCHES, PATCH_PIXELS)


def to_patches(obs: np.ndarray) -> np.ndarray:
    """(..., 4, 84, 84) frame stacks -> (..., 256, 100), the network's input: at each patch
    position the 4 frames' 25 pixels, frame by frame (the order of the conv weight's inputs)."""
    return np.swapaxes(frame_patches(obs), -3, -2).reshape(*obs.shape[:-3], PATCHES, 4 * PATCH_PIXELS)


class Encoder(nn.Module):
    """DER's conv torso: Conv(4 -> 32, 5x5, stride 5), ReLU, Conv(32 -> 64, 5x5, stride 5), ReLU,
    flatten -> 576 features. A conv whose stride equals its kernel reads non-overlapping patches,
    so each conv is one matrix product over patches. Written that way, forward plus backward runs
    1.3 to 1.7 times as fast on a CPU as nn.Conv2d (benchmarks/bench_rainbow_atari.py --compare);
    the parameters are the nn.Conv2d ones and the outputs equal the conv's (tests/test_atari.py)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 32, 5, stride=5)
        self.conv2 = nn.Conv2d(32, 64, 5, stride=5)

    def matrices(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The two convs as (weight, bias) of linear maps over patches: conv1 reads `to_patches`'
        100 values (frame, row, column), conv2 a 5x5 block of conv1's outputs (row, column, channel)."""
        return ((self.conv1.weight.flatten(1), self.conv1.bias),
                (self.conv2.weight.permute(0, 2, 3, 1).flatten(1), self.conv2.bias))

    def forward(self, patches: torch.Tensor, matrices=None) -> torch.Tensor:
        """patches (B, 256, 100) from `to_patches` -> features (B, 576); `matrices` as `matrices()`
        gives them (QNetwork passes its own, with the pixel scale folded in)."""
        (w1, b1), (w2, b2) = self.matrices() if matrices is None else matrices
        b = patches.shape[0]
        x = F.relu(F.linear(patches, w1, b1))  # (B, 16 * 16, 32)
        # conv2's 3x3 positions each read a 5x5 block of conv1's 16x16 map (row and column 15 unused)
        x = x.view(b, 16, 16, 32)[:, :15, :15].reshape(b, 3, 5, 3, 5, 32).transpose(2, 3).reshape(b, 9, 800)
        x = F.relu(F.linear(x, w2, b2))  # (B, 9, 64)
        return x.transpose(1, 2).flatten(1)  # nn.Flatten's (channel, row, column) order


class QNetwork(nn.Module):
    """DER network: the conv `Encoder` (576 features), dueling NoisyNet heads over num_atoms return
    atoms. forward() takes `to_patches` observations (uint8) and gives log-probabilities
    (batch, actions, atoms). With `bf16` set, the encoder and the hidden layers run in bfloat16;
    the output layers and the softmax stay fp32 (bf16 there was no faster, README: Atari: Speed).

    The layers' weights for a step come from `weights()`: noise added, cast, the pixel scale folded
    in. dqn_loss computes them once and shares them between both online passes of an update,
    instead of each pass composing the noisy weights again."""

    def __init__(self, num_actions: int, hidden_size: int = 256, num_atoms: int = 51, v_min: float = -10.0,
                 v_max: float = 10.0, noisy_std: float = 0.1):
        super().__init__()
        self.num_actions, self.num_atoms = num_actions, num_atoms
        self.bf16 = False  # set from --precision by `use_bf16`; not part of the state dict
        self.register_buffer("support", torch.linspace(v_min, v_max, num_atoms))
        self.encoder = Encoder()
        self.value_hidden = NoisyLinear(576, hidden_size, noisy_std)
        self.value_out = NoisyLinear(hidden_size, num_atoms, noisy_std)
        self.advantage_hidden = NoisyLinear(576, hidden_size, noisy_std)
        self.advantage_out = NoisyLinear(hidden_size, num_actions * num_atoms, noisy_std)

    def noisy_layers(self):
        return [m for m in self.modules() if isinstance(m, NoisyLinear)]

    def reset_noise(self) -> None:
        """New noise in every NoisyNet layer, drawn in one call (fewer small ops than one per layer)."""
        sizes = [layer.in_features + layer.out_features for layer in self.noisy_layers()]
        noise = NoisyLinear.scaled_noise(sum(sizes), self.support.device)
        for layer, eps in zip(self.noisy_layers(), noise.split(sizes)):
            layer.reset_noise(eps)

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (weight, bias) as forward() uses them, current noise included (train mode).
        The first layer takes pixel values 0..255 (exact in bf16) and carries the 1/255 scale; the
        encoder and hidden layers are in `input_dtype`, the output layers fp32."""
        (w1, b1), conv2 = self.encoder.matrices()
        low = {"conv1": (w1 / 255, b1), "conv2": conv2, "value_hidden": self.value_hidden.noisy_weights(),
               "advantage_hidden": self.advantage_hidden.noisy_weights()}
        weights = {name: (w.to(self.input_dtype), b.to(self.input_dtype)) for name, (w, b) in low.items()}
        return weights | {"value_out": self.value_out.noisy_weights(),
                          "advantage_out": self.advantage_out.noisy_weights()}

    def forward(self, obs: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        """obs: uint8 `to_patches` observations (or those values already in `input_dtype`, to convert
        once for several passes). weights: from `weights()`, computed here if not given."""
        w = self.weights() if weights is None else weights
        x = self.encoder(obs.to(self.input_dtype), (w["conv1"], w["conv2"]))
        value = F.linear(F.relu(F.linear(x, *w["value_hidden"])).float(), *w["value_out"])
        adv = F.linear(F.relu(F.linear(x, *w["advantage_hidden"])).float(), *w["advantage_out"])
        value, adv = value.view(-1, 1, self.num_atoms), adv.view(-1, self.num_actions, self.num_atoms)
        return F.log_softmax(value + adv - adv.mean(1, keepdim=True), dim=2)

    def q_values(self, obs: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        return (self.forward(obs, weights).exp() * self.support).sum(2)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve --precision: bf16 only where the hardware has native bfloat16 arithmetic."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def project_distribution(next_probs: torch.Tensor, returns: torch.Tensor, discounts: torch.Tensor,
                         support: torch.Tensor) -> torch.Tensor:
    """C51 projection of the target distribution R + discount * z onto the fixed support.
    next_probs (B, atoms), returns (B,), discounts (B,) = gamma^n, 0 where the episode ended.
    When an atom lands exactly on a support point (l == u) it gets the whole mass."""
    v_min, v_max, atoms = support[0], support[-1], support.numel()
    delta = (v_max - v_min) / (atoms - 1)
    tz = (returns[:, None] + discounts[:, None] * support[None]).clamp(v_min, v_max)
    # clamped again: (v_max - v_min) / delta can round to just over atoms - 1 (fp32 support [-1, 1]
    # with 62 atoms on the CPU; [-10, 10] with 51 on CUDA), and its ceil would index past the end
    b = ((tz - v_min) / delta).clamp(0, atoms - 1)
    lower, upper = b.floor(), b.ceil()
    exact = (lower == upper).to(next_probs.dtype)
    offset = (torch.arange(next_probs.shape[0], device=b.device) * atoms)[:, None]
    target = torch.zeros(next_probs.numel(), dtype=next_probs.dtype, device=next_probs.device)
    target.index_add_(0, (lower.long() + offset).view(-1), (next_probs * (upper - b + exact)).view(-1))
    target.index_add_(0, (upper.long() + offset).view(-1), (next_probs * (b - lower)).view(-1))
    return target.view_as(next_probs)


# --------------------------------------------------------------------------- replay


class SumTree:
    """Sum tree over `capacity` leaves with FANOUT children per node; vectorised update and
    stratified sampling. Each level is one array padded to whole blocks of FANOUT children, so the
    children of node j are entries j*FANOUT .. j*FANOUT+FANOUT-1 of the level below. With 64
    children, a 100k-leaf tree has 4 levels under the root instead of a binary tree's 17: each
    sample, add and priority update makes a quarter of the numpy calls (README, Atari: Speed)."""

    FANOUT = 64

    def __init__(self, capacity: int):
        self.capacity = capacity
        sizes, n = [], capacity
        while True:
            n = -(-n // self.FANOUT) * self.FANOUT  # whole blocks of children
            sizes.append(n)
            if n == self.FANOUT:
                break
            n //= self.FANOUT
        self.levels = [np.zeros(1)] + [np.zeros(size) for size in reversed(sizes)]  # root first
        self.leaves = self.levels[-1]
        self.max_priority = 1.0

    @property
    def total(self) -> float:
        return float(self.levels[0][0])

    def update(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        idx = np.asarray(indices, np.int64)
        self.leaves[idx] = priorities
        for children, parents in zip(self.levels[:0:-1], self.levels[-2::-1]):  # leaves up to the root
            idx = idx // self.FANOUT  # a parent shared by several leaves is recomputed to the same sum each time
            parents[idx] = children.reshape(-1, self.FANOUT)[idx].sum(1)

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.leaves[np.asarray(indices, np.int64)]

    def find(self, values: np.ndarray) -> np.ndarray:
        """Leaf index whose cumulative-priority interval contains each value."""
        values = np.array(values, np.float64)
        rows, idx = np.arange(len(values)), np.zeros(len(values), np.int64)
        for level in self.levels[1:]:
            block = level.reshape(-1, self.FANOUT)[idx]  # (n, FANOUT) children of each current node
            ends = np.cumsum(block, 1)  # each child's interval ends here
            child = (values[:, None] >= ends).sum(1)  # zero-priority children are skipped: equal ends
            # never past the last nonzero child (guards against float round-off at the edge)
            child = np.minimum(child, self.FANOUT - 1 - np.argmax(block[:, ::-1] > 0, 1))
            values = values - np.where(child > 0, ends[rows, child - 1], 0.0)
            idx = idx * self.FANOUT + child
        return np.minimum(idx, self.capacity - 1)

    def sample_stratified(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """One leaf from each of n equal slices of the total priority."""
        values = (np.arange(n) + rng.random(n)) * (self.total / n)
        return self.find(np.minimum(values, np.nextafter(self.total, 0)))


class ReplayBuffer:
    """Prioritized n-step replay that stores every frame once (as its 5x5 patches, the layout
    the network reads; see `frame_patches`). Entry i holds the newest frame
    of observation s_i, the action, the (clipped) reward, whether the step ended the episode,
    and t_i, the step's index in its episode. s_i = frames i-3..i, with the frames from before
    the episode start replaced by zeros (what the env's stack shows). A transition becomes
    sampleable (gets a priority) once the n following entries exist; its next observation is
    s_{i+n}."""

    def __init__(self, capacity: int, n_step: int, gamma: float, priority_exponent: float, seed: int = 0):
        self.capacity, self.n_step, self.gamma, self.alpha = capacity, n_step, gamma, priority_exponent
        # frames as `frame_patches` gives them; the extra last one stays blank (zeros before an episode start)
        self.frames = np.zeros((capacity + 1, PATCHES, PATCH_PIXELS), np.uint8)
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float32)
        self.dones = np.zeros(capacity, np.bool_)
        self.timesteps = np.zeros(capacity, np.int64)
        self.tree = SumTree(capacity)
        self.rng = np.random.default_rng(seed)
        self.pos, self.size, self.next_t = 0, 0, 0
        self.discounts = gamma ** np.arange(n_step, dtype=np.float32)

    def add(self, frame: np.ndarray, action: int, reward: float, done: bool) -> None:
        i = self.pos
        self.frames[i], self.actions[i], self.rewards[i], self.dones[i] = frame_patches(frame), action, reward, done
        self.timesteps[i] = self.next_t
        self.next_t = 0 if done else self.next_t + 1
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)
        # entries i..i+3 stop being valid (i is overwritten, i+1..i+3 would stack the new frame); the
        # entry n steps back now has its full n-step window (one tree update for both)
        indices, priorities = np.arange(i, i + 4) % self.capacity, np.zeros(4)
        if self.size > self.n_step:
            indices = np.append(indices, (i - self.n_step) % self.capacity)
            priorities = np.append(priorities, self.tree.max_priority)
        self.tree.update(indices, priorities)

    def stacked(self, indices: np.ndarray) -> np.ndarray:
        """Observations s_i rebuilt from single frames, in the network's layout: `to_patches` of the
        (B, 4, 84, 84) stacks, i.e. (B, 256, 100)."""
        offsets = np.arange(3, -1, -1)  # frame i-3 first, i last
        idx = (indices[:, None] - offsets[None]) % self.capacity  # (B, 4)
        idx[offsets[None] > self.timesteps[indices][:, None]] = self.capacity  # before the episode start: blank
        # one gather of 25-pixel rows: row (frame f, patch p) of the ((capacity + 1) * 256, 25) view
        rows = idx[:, None, :] * PATCHES + np.arange(PATCHES)[None, :, None]  # (B, 256, 4)
        obs = np.take(self.frames.reshape(-1, PATCH_PIXELS), rows, axis=0)  # (B, 256, 4, 25)
        return obs.reshape(len(indices), PATCHES, 4 * PATCH_PIXELS)

    def nstep(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """n-step discounted return and bootstrap discount (gamma^n, or 0 if the episode ended)."""
        idx = (indices[:, None] + np.arange(self.n_step)[None]) % self.capacity
        dones = self.dones[idx]
        alive = np.cumprod(np.concatenate([np.ones((len(indices), 1), bool), ~dones[:, :-1]], 1), 1)
        returns = (self.rewards[idx] * alive * self.discounts).sum(1)
        bootstrap = np.where(dones.any(1), 0.0, self.gamma**self.n_step).astype(np.float32)
        return returns.astype(np.float32), bootstrap

    @property
    def ready(self) -> bool:
        return self.tree.total > 0

    def sample(self, batch_size: int, beta: float) -> dict[str, np.ndarray]:
        indices = self.tree.sample_stratified(batch_size, self.rng)
        probs = self.tree.get(indices) / self.tree.total
        valid = int((self.tree.leaves > 0).sum())
        weights = (valid * probs) ** -beta
        returns, discounts = self.nstep(indices)
        return {"indices": indices, "obs": self.stacked(indices), "actions": self.actions[indices],
                "returns": returns, "discounts": discounts,
                "next_obs": self.stacked((indices + self.n_step) % self.capacity), "weights": weights}

    def update_priorities(self, indices: np.ndarray, losses: np.ndarray) -> None:
        priorities = np.maximum(losses, 1e-6) ** self.alpha
        self.tree.max_priority = max(self.tree.max_priority, float(priorities.max()))
        self.tree.update(indices, priorities)


# --------------------------------------------------------------------------- learning


def target_distribution(q_network: QNetwork, target_network: QNetwork, weights: dict, next_obs: torch.Tensor,
                        returns: torch.Tensor, discounts: torch.Tensor) -> torch.Tensor:
    """The C51 target with double Q: the online net (this step's `weights`) picks the next action,
    the target net rates it."""
    with torch.no_grad():
        next_best = q_network.q_values(next_obs, weights).argmax(1)
        next_probs = target_network(next_obs).exp()[torch.arange(len(next_best), device=next_obs.device), next_best]
        return project_distribution(next_probs, returns, discounts, q_network.support)


def dqn_loss(q_network: QNetwork, target_network: QNetwork, batch: dict[str, np.ndarray], device,
             weights: dict | None = None) -> torch.Tensor:
    """Per-sample C51 cross-entropy against the double-Q target; `weights`: the online net's for this
    step (`QNetwork.weights`), computed here if not given."""
    t = {k: torch.as_tensor(v, device=device) for k, v in batch.items() if k != "indices"}  # frames stay uint8
    weights = q_network.weights() if weights is None else weights
    next_obs = t["next_obs"].to(q_network.input_dtype)  # converted once for the online and the target pass
    target_network.reset_noise()
    target = target_distribution(q_network, target_network, weights, next_obs, t["returns"], t["discounts"])
    log_probs = q_network(t["obs"], weights)[torch.arange(len(t["actions"]), device=device), t["actions"]]
    return -(target * log_probs).sum(1)


def reptile_step(q_network: nn.Module, theta: list[torch.Tensor], eps: float) -> None:
    """Outer Reptile update in place: parameters phi become theta + eps * (phi - theta)."""
    with torch.no_grad():
        for p, p0 in zip(q_network.parameters(), theta):
            p.copy_(torch.lerp(p0, p, eps))


def reptile_eps(args: Args, global_step: int) -> float:
    """Linear schedule from reptile_eps_start (at learning_starts) to reptile_eps_end (at the end)."""
    frac = min(1.0, max(0.0, (global_step - args.learning_starts) / max(1, args.total_timesteps - args.learning_starts)))
    return args.reptile_eps_start + frac * (args.reptile_eps_end - args.reptile_eps_start)


def optimize(q_network, target_network, optimizer, batch, args: Args, device, weights: dict | None = None) -> torch.Tensor:
    """One prioritized, importance-weighted gradient step; returns per-sample losses."""
    losses = dqn_loss(q_network, target_network, batch, device, weights)
    importance = torch.as_tensor(batch["weights"], dtype=torch.float32, device=device)
    optimizer.zero_grad()
    (importance * losses).mean().backward()
    clip_gradients(list(q_network.parameters()), args.max_grad_norm)
    optimizer.step()
    return losses.detach()


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> None:
    """nn.utils.clip_grad_norm_, without its rescaling pass when the norm is under the cap (most
    steps): the same gradients, one pass over them fewer."""
    grad_norm = nn.utils.get_total_norm([p.grad for p in params])
    if grad_norm > max_norm:
        nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm)


@torch.inference_mode()
def act(q_network: QNetwork, obs: np.ndarray, device, weights: dict | None = None) -> int:
    obs = torch.as_tensor(to_patches(obs), device=device)[None]
    return int(q_network.q_values(obs, weights).argmax(1).item())


def save_checkpoint(path: str, args: Args, q_network: nn.Module, optimizer, global_step: int, method: str,
                    train_tasks: list[str], num_actions: int) -> None:
    ckpt = {
        "format": CHECKPOINT_FORMAT, "format_version": 1, "module": "rainbow_reptile_atari", "benchmark": "atari",
        "method": method, "train_tasks": list(train_tasks), "args": _plain(dataclasses.asdict(args)),
        "global_step": int(global_step), "model": q_network.state_dict(), "optimizer": optimizer.state_dict(),
        "num_actions": int(num_actions),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def _plain(value):
    """Tuples become lists so the checkpoint loads with weights_only=True."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_args(args: Args, num_games: int) -> None:
    """One-line errors for settings that cannot run."""
    for name in ("total_timesteps", "batch_size", "reptile_k", "n_step", "target_network_frequency", "save_every",
                 "eval_episodes", "torch_threads"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.num_atoms < 2 or args.v_min >= args.v_max:
        sys.exit(f"error: the return support needs --num-atoms >= 2 and --v-min < --v-max "
                 f"(got {args.num_atoms}, {args.v_min}, {args.v_max})")
    if args.buffer_size // num_games <= args.n_step + 4:
        sys.exit(f"error: --buffer-size {args.buffer_size} leaves {args.buffer_size // num_games} transitions "
                 f"per game; each needs more than --n-step + 4 = {args.n_step + 4}")


def resolve_games(args: Args) -> list[str]:
    if args.games:
        games = list(args.games)
    elif args.train_games in (5, 10):
        games = list(FIVE_GAMES if args.train_games == 5 else TEN_GAMES)
    else:
        sys.exit(f"error: --train-games must be 5 or 10 (got {args.train_games}); or give --games")
    for g in games:
        rom_id(g)
    return games


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse. By default it hands big freed blocks back to the OS
    and page-faults them in again at the next allocation, and DER allocates a few MB of batch and
    activation tensors per update. Measured effect on a CPU step: from none (within noise) to 8%
    faster (benchmarks/bench_rainbow_atari.py --default-malloc). Does nothing without glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB come from the heap, not from mmap
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap before returning it


def seed_everything(args: Args) -> torch.device:
    """Seeds, threads and the allocator; returns the device."""
    keep_freed_memory()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def setup(args: Args, run_name: str):
    """TensorBoard writer under args.output_dir (and wandb when --track)."""
    from torch.utils.tensorboard import SummaryWriter

    args.output_dir = args.output_dir or os.path.join("runs", run_name)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name,
                   save_code=True)
    writer = SummaryWriter(args.output_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


def train(args: Args, games: list[str], writer=None) -> QNetwork:
    """Reptile-DER on `games`: one buffer each, a random game per reset, k inner DER updates on
    one game's buffer per env step, then the outer interpolation."""
    check_args(args, len(games))
    device = seed_everything(args)
    if writer is None:
        writer = setup(args, f"{args.exp_name}__{args.seed}__{int(time.time())}")
    num_actions = FULL_ACTIONS if args.pad_actions else len(make_env(games[0], 0, args=args).action_set)
    q_network = QNetwork(num_actions, args.hidden_size, args.num_atoms, args.v_min, args.v_max,
                         args.noisy_std).to(device)
    target_network = QNetwork(num_actions, args.hidden_size, args.num_atoms, args.v_min, args.v_max,
                              args.noisy_std).to(device)
    target_network.load_state_dict(q_network.state_dict())
    q_network.bf16 = target_network.bf16 = use_bf16(args.precision, device)
    # one Adam for the inner loops, its moments carried across outer steps (as in the authors' fork)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    buffers = [ReplayBuffer(args.buffer_size // len(games), args.n_step, args.gamma, args.priority_exponent,
                            args.seed + g) for g in range(len(games))]
    envs = [make_env(game, args.seed + 1000 * g, num_actions, args=args) for g, game in enumerate(games)]
    rng = np.random.default_rng(args.seed)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")

    game = rng.integers(len(games))
    obs, _ = envs[game].reset()
    updates, start_time, update_time = 0, time.time(), 0.0
    for global_step in range(1, args.total_timesteps + 1):
        action = act(q_network, obs, device)
        next_obs, reward, terminated, truncated, info = envs[game].step(action)
        # learning sees clipped rewards and life loss as terminal; logging sees the real game
        buffers[game].add(obs[-1], action, float(np.sign(reward)), terminated or truncated)
        obs = next_obs
        if "episode" in info:
            writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
            writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
            writer.add_scalar(f"charts/episodic_return/{games[game]}", info["episode"]["r"], global_step)
            game = rng.integers(len(games))  # a random game at every real reset
        if terminated or truncated:
            obs, _ = envs[game].reset()

        if global_step >= args.learning_starts and any(b.ready for b in buffers):
            t0 = time.time()
            beta = args.priority_weight + (1.0 - args.priority_weight) * min(
                1.0, (global_step - args.learning_starts) / max(1, args.total_timesteps - args.learning_starts))
            task = rng.choice([g for g, b in enumerate(buffers) if b.ready])  # the inner loop's one game
            theta = [p.detach().clone() for p in q_network.parameters()]
            for _ in range(args.reptile_k):
                q_network.reset_noise()
                batch = buffers[task].sample(args.batch_size, beta)
                batch["weights"] = batch["weights"] / batch["weights"].max()
                losses = optimize(q_network, target_network, optimizer, batch, args, device).cpu().numpy()
                buffers[task].update_priorities(batch["indices"], losses)
                updates += 1
                if updates % args.target_network_frequency == 0:
                    target_network.load_state_dict(q_network.state_dict())
            eps = reptile_eps(args, global_step)
            reptile_step(q_network, theta, eps)
            update_time += time.time() - t0
            if global_step % 100 == 0:
                writer.add_scalar("losses/loss", float(losses.mean()), global_step)
                writer.add_scalar("charts/beta", beta, global_step)
                writer.add_scalar("charts/reptile_eps", eps, global_step)
        if global_step % 1000 == 0 or global_step == args.total_timesteps:
            sps = int(global_step / (time.time() - start_time))
            print(f"global_step={global_step}, SPS={sps}, update share={update_time / (time.time() - start_time):.2f}",
                  flush=True)
            writer.add_scalar("charts/SPS", sps, global_step)
        if global_step % args.save_every == 0 or global_step == args.total_timesteps:
            save_checkpoint(ckpt_path, args, q_network, optimizer, global_step, "reptile", games, num_actions)
    return q_network


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    games = resolve_games(args)
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = setup(args, run_name)
    print(f"Reptile-DER on {', '.join(games)} -> {args.output_dir}", flush=True)
    train(args, games, writer=writer)
    writer.close()

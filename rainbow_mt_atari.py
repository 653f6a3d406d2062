"""Multi-task data-efficient Rainbow (DER) on Atari: one agent, several games.

Paper: Mandi, Abbeel, James, "On the Effectiveness of Fine-tuning Versus Meta-reinforcement
Learning" (NeurIPS 2022), Sec. 5.3: pretrain one DER agent (van Hasselt et al. 2019, Table 1: C51,
20-step returns, double Q, dueling NoisyNet heads, prioritized replay, one update per env step) on 5
or 10 games, then fine-tune it on a held-out game (finetune.py). As the authors' Kaixhin/Rainbow fork
(MandiZhao/Rainbow): one replay buffer per game, a random game at every reset, each batch an equal
share from a few sampled games, the action space padded to 18 (padding plays NOOP).

    python rainbow_mt_atari.py --train-games 10              # paper's 10-game set, 1M env steps
    python finetune.py --scratch atari --task Pong           # DER from scratch: this file's train()

Read top to bottom: Args, the network, the replay, the update, the loop; below it, marked TRY NOT
TO MODIFY, the network's speed form (the same function, faster on a CPU; tested against the plain
modules). The environment, the run's plumbing and its flags (`RunArgs`) are envs/atari.py; details
in docs/atari.md.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from envs import atari
from envs.atari import FULL_ACTIONS, REPLAY, find_rom_id, keep_freed_memory, rom_id  # noqa: F401 (used from here)
from envs.run_dir import CHECKPOINT, StopRequest, use_bf16

MODULE = os.path.splitext(os.path.basename(__file__))[0]  # this script's module name, also when run as __main__


@dataclass
class Args(atari.RunArgs):  # + the run's own flags (output, --resume, checkpoints, logging)
    exp_name: str = "rainbow_mt_atari"
    """name of the run (TensorBoard directory runs/{exp_name}__{seed}__{time})"""
    seed: int = 1
    """seed of python, numpy, torch and the emulators"""
    torch_threads: int = 2
    """torch CPU threads for the learner (one while a background evaluation runs); use 1 on a busy machine"""
    speed_form: bool = True
    """train with the network's speed form (`fast_forward`, the same function; faster on a CPU)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """speed form: encoder and hidden layers in bf16 (auto: where the hardware has native bf16)"""

    # games
    train_games: int = 10
    """5 or 10: the paper's game sets (ignored when --games is given)"""
    games: tuple[str, ...] | None = None
    """explicit list of games, e.g. --games Pong Breakout (CamelCase ALE names)"""
    pad_actions: bool = True
    """pad every game's action set to 18 (padding = NOOP), as the authors' pretrained agents"""

    # budget and evaluation
    total_timesteps: int = 1_000_000
    """env steps (agent steps, 4 frames each); authors pretrain for 1M"""
    eval_episodes: int = 10
    """episodes per evaluation (DER protocol and the authors' --evaluation_episodes: 10)"""
    eval_epsilon: float = 0.001
    """epsilon-greedy during evaluation (DER protocol; authors' --eval_eps 0.001)"""
    eval_max_steps: int = 27_000
    """cap on agent steps per evaluation episode: 108k frames, the ALE standard"""
    background_eval: bool = True
    """finetune.py's evaluations run in a second process while training goes on (False: in the loop)"""

    # fine-tuning (set by finetune.py --load-encoder-only)
    freeze_encoder: bool = False
    """keep the conv encoder fixed (no gradient step); authors' --load_conv_only freezes the convs"""
    unfreeze_encoder_at: int | None = None
    """with --freeze-encoder: env step from which the encoder trains (authors' --unfreeze_conv_when); never"""

    # DER hyperparameters (van Hasselt et al. 2019, Table 1; the same in the authors' scripts)
    buffer_size: int = 1_000_000
    """total replay capacity, split evenly between the games (authors: --memory-capacity 1M)"""
    learning_starts: int = 1600
    """env steps before the first update (DER)"""
    batch_size: int = 32
    """transitions per update"""
    games_per_batch: int = 2
    """each batch draws batch_size/games_per_batch from this many sampled games (authors: 2 x 16)"""
    learning_rate: float = 1e-4
    """Adam learning rate"""
    adam_eps: float = 1.5e-4
    """Adam epsilon"""
    gamma: float = 0.99
    """discount"""
    n_step: int = 20
    """multi-step return length"""
    num_atoms: int = 51
    """C51 atoms of the return distribution"""
    v_min: float = -10.0
    """lowest atom"""
    v_max: float = 10.0
    """highest atom"""
    noisy_std: float = 0.1
    """initial sigma scale of the NoisyNet layers"""
    hidden_size: int = 256
    """dueling head width (DER: 256; the authors' 5- and 10-game agents: 512; docs/atari.md)"""
    target_network_frequency: int = 2000
    """sync the target network when the env step is a multiple of this (authors' main_mt.py)"""
    replay_ratio: int = 1
    """updates per env step"""
    priority_exponent: float = 0.5
    """prioritized replay: priority = loss ** exponent"""
    priority_weight: float = 0.4
    """importance-sampling exponent, annealed linearly to 1 over training"""
    max_grad_norm: float = 10.0
    """gradients clipped to this global L2 norm"""
    max_noops: int = 30
    """up to this many no-ops after a reset"""
    max_episode_steps: int = 27_000
    """agent steps before a training episode is truncated (108k frames)"""


# --------------------------------------------------------------------------- ALGO LOGIC: network


class NoisyLinear(nn.Module):
    """Factorised Gaussian NoisyNet layer (Fortunato et al. 2018):
    y = (mu_w + sigma_w * eps_w) x + mu_b + sigma_b * eps_b, with eps_w = f(eps_out) f(eps_in)^T,
    eps_b = f(eps_out), f(x) = sign(x) sqrt(|x|). In eval() mode it uses the mean weights."""

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
        self.weight_sigma.fill_(self.std_init / self.in_features**0.5)  # sigma_0 / sqrt(p)
        self.bias_sigma.fill_(self.std_init / self.out_features**0.5)

    @staticmethod
    def scaled_noise(n: int, device: torch.device) -> torch.Tensor:
        """n draws of f(x) = sign(x) sqrt(|x|), x ~ N(0, 1)."""
        x = torch.randn(n, device=device)
        return x.sign() * x.abs().sqrt()

    @torch.no_grad()
    def reset_noise(self, eps: torch.Tensor | None = None) -> None:
        """New noise from eps (in_features + out_features values of `scaled_noise`, drawn if not given)."""
        if eps is None:
            eps = self.scaled_noise(self.in_features + self.out_features, self.weight_epsilon.device)
        eps_in, eps_out = eps[:self.in_features], eps[self.in_features:]
        torch.outer(eps_out, eps_in, out=self.weight_epsilon)  # eps_w = f(eps_out) f(eps_in)^T
        self.bias_epsilon.copy_(eps_out)

    def noisy_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) as the layer uses them: mu + sigma * epsilon in train() mode, mu in eval()."""
        if not self.training:
            return self.weight_mu, self.bias_mu
        return (torch.addcmul(self.weight_mu, self.weight_sigma, self.weight_epsilon),
                torch.addcmul(self.bias_mu, self.bias_sigma, self.bias_epsilon))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.noisy_weights())


class Encoder(nn.Module):
    """DER's conv torso over a stack of 4 frames in [0, 1]: (B, 4, 84, 84) -> 576 features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 32, kernel_size=5, stride=5)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, stride=5)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(frames))  # (B, 32, 16, 16)
        x = F.relu(self.conv2(x))  # (B, 64, 3, 3)
        return x.flatten(1)  # (B, 576)


class QNetwork(nn.Module):
    """DER network: the conv `Encoder`, then dueling NoisyNet heads over num_atoms return atoms.
    forward(obs): uint8 frame stacks (B, 4, 84, 84) -> log p(s, a, .) of shape (B, actions, atoms).
    With `weights` (from `step_weights`) it runs the speed form, `fast_forward`: the same function."""

    def __init__(self, num_actions: int, hidden_size: int = 256, num_atoms: int = 51, v_min: float = -10.0,
                 v_max: float = 10.0, noisy_std: float = 0.1):
        super().__init__()
        self.num_actions, self.num_atoms = num_actions, num_atoms
        self.bf16 = False  # speed form only, set from --precision by `use_bf16`; not in the state dict
        self.register_buffer("support", torch.linspace(v_min, v_max, num_atoms))  # z_1 .. z_N
        self.encoder = Encoder()
        self.value_hidden = NoisyLinear(576, hidden_size, noisy_std)
        self.value_out = NoisyLinear(hidden_size, num_atoms, noisy_std)
        self.advantage_hidden = NoisyLinear(576, hidden_size, noisy_std)
        self.advantage_out = NoisyLinear(hidden_size, num_actions * num_atoms, noisy_std)

    def noisy_layers(self) -> list[NoisyLinear]:
        return [m for m in self.modules() if isinstance(m, NoisyLinear)]

    def reset_noise(self) -> None:
        """New noise in every NoisyNet layer, drawn in one call."""
        sizes = [layer.in_features + layer.out_features for layer in self.noisy_layers()]
        noise = NoisyLinear.scaled_noise(sum(sizes), self.support.device)
        for layer, eps in zip(self.noisy_layers(), noise.split(sizes)):
            layer.reset_noise(eps)

    def forward(self, obs: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        if weights is not None:  # the speed form (below the loop): same function, faster on a CPU
            return fast_forward(self, obs, weights)
        x = self.encoder(obs.float() / 255)
        value = self.value_out(F.relu(self.value_hidden(x))).view(-1, 1, self.num_atoms)
        adv = self.advantage_out(F.relu(self.advantage_hidden(x))).view(-1, self.num_actions, self.num_atoms)
        return F.log_softmax(value + adv - adv.mean(1, keepdim=True), dim=2)  # dueling: V + A - mean_a A

    def q_values(self, obs: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        return (self.forward(obs, weights).exp() * self.support).sum(2)  # Q(s, a) = sum_i z_i p_i(s, a)


# --------------------------------------------------------------------------- ALGO LOGIC: replay


class SumTree:
    """Sum tree over `capacity` leaves, FANOUT children per node (64: 4 levels under the root for 100k
    leaves, a binary tree has 17); each level one array, node j's children at j*FANOUT ... of the next."""

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


class Batch(NamedTuple):
    """A prioritized n-step batch (numpy arrays, first axis the B transitions)."""
    indices: np.ndarray  # replay entries i (for the priority update)
    obs: np.ndarray  # s_i, uint8 (B, 4, 84, 84)
    actions: np.ndarray  # a_i
    returns: np.ndarray  # R_i = sum_{k<n} gamma^k r_{i+k}, cut at the episode's end
    discounts: np.ndarray  # gamma^n, or 0 when the episode ended within the n steps
    next_obs: np.ndarray  # s_{i+n}
    weights: np.ndarray  # importance-sampling weights (N P(i))^-beta, over their batch maximum


class ReplayBuffer:
    """Prioritized n-step replay that stores every frame once. Entry i holds the newest frame of
    observation s_i, the action, the (clipped) reward, whether the step ended the episode, and
    t_i, the step's index in its episode. s_i = frames i-3..i, with the frames from before the
    episode start replaced by zeros (what the env's stack shows). A transition becomes sampleable
    (gets a priority) once the n following entries exist; its next observation is s_{i+n}."""

    def __init__(self, capacity: int, n_step: int, gamma: float, priority_exponent: float, seed: int = 0):
        self.capacity, self.n_step, self.gamma, self.alpha = capacity, n_step, gamma, priority_exponent
        self.frames = np.zeros((capacity + 1, 84, 84), np.uint8)  # the extra last one stays blank
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float32)
        self.dones = np.zeros(capacity, np.bool_)
        self.timesteps = np.zeros(capacity, np.int64)
        self.tree = SumTree(capacity)
        self.rng = np.random.default_rng(seed)
        self.pos, self.size, self.next_t = 0, 0, 0
        self.discounts = gamma ** np.arange(n_step, dtype=np.float32)  # gamma^0 .. gamma^(n-1)

    def add(self, frame: np.ndarray, action: int, reward: float, done: bool) -> None:
        i = self.pos
        self.frames[i], self.actions[i], self.rewards[i], self.dones[i] = frame, action, reward, done
        self.timesteps[i] = self.next_t
        self.next_t = 0 if done else self.next_t + 1
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)
        # entries i..i+3 stop being valid (i is overwritten, i+1..i+3 would stack the new frame); the
        # entry n steps back now has its full n-step window and gets the highest priority seen
        indices, priorities = np.arange(i, i + 4) % self.capacity, np.zeros(4)
        if self.size > self.n_step:
            indices = np.append(indices, (i - self.n_step) % self.capacity)
            priorities = np.append(priorities, self.tree.max_priority)
        self.tree.update(indices, priorities)

    def stacked(self, indices: np.ndarray) -> np.ndarray:
        """Observations s_i (B, 4, 84, 84) rebuilt from single frames."""
        offsets = np.arange(3, -1, -1)  # frame i-3 first, i last
        idx = (indices[:, None] - offsets[None]) % self.capacity  # (B, 4)
        idx[offsets[None] > self.timesteps[indices][:, None]] = self.capacity  # before the episode start: blank
        return self.frames[idx]

    def nstep(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """n-step discounted return and bootstrap discount (gamma^n, or 0 if the episode ended)."""
        idx = (indices[:, None] + np.arange(self.n_step)[None]) % self.capacity
        dones = self.dones[idx]
        alive = np.cumprod(np.concatenate([np.ones((len(indices), 1), bool), ~dones[:, :-1]], 1), 1)
        returns = (self.rewards[idx] * alive * self.discounts).sum(1)  # sum_k gamma^k r_{i+k} until done
        bootstrap = np.where(dones.any(1), 0.0, self.gamma**self.n_step).astype(np.float32)
        return returns.astype(np.float32), bootstrap

    @property
    def ready(self) -> bool:
        return self.tree.total > 0

    def sample(self, batch_size: int, beta: float) -> Batch:
        indices = self.tree.sample_stratified(batch_size, self.rng)
        probs = self.tree.get(indices) / self.tree.total  # P(i) = p_i / sum_k p_k
        valid = int((self.tree.leaves > 0).sum())
        weights = (valid * probs) ** -beta  # w_i = (N P(i))^-beta
        returns, discounts = self.nstep(indices)
        next_obs = self.stacked((indices + self.n_step) % self.capacity)
        return Batch(indices, self.stacked(indices), self.actions[indices], returns, discounts, next_obs, weights)

    def update_priorities(self, indices: np.ndarray, losses: np.ndarray) -> None:
        priorities = np.maximum(losses, 1e-6) ** self.alpha  # p_i = loss_i ^ omega
        self.tree.max_priority = max(self.tree.max_priority, float(priorities.max()))
        self.tree.update(indices, priorities)


def sample_games(buffers: list[ReplayBuffer], args: Args, beta: float,
                 rng: np.random.Generator) -> tuple[Batch, list[tuple[int, int]]]:
    """An equal share of the batch from each of `games_per_batch` sampled games with data.
    Returns the batch and [(game, rows)] in batch order."""
    ready = [g for g, b in enumerate(buffers) if b.ready]
    k = min(args.games_per_batch, len(ready))
    games = rng.choice(ready, size=k, replace=False)
    sizes = [args.batch_size // k + (1 if j < args.batch_size % k else 0) for j in range(k)]
    parts = [buffers[g].sample(s, beta) for g, s in zip(games, sizes)]
    batch = Batch(*[np.concatenate(field) for field in zip(*parts)])
    batch = batch._replace(weights=batch.weights / batch.weights.max())  # IS weights over their maximum
    return batch, [(int(g), s) for g, s in zip(games, sizes)]


# --------------------------------------------------------------------------- ALGO LOGIC: update


def project_distribution(next_probs: torch.Tensor, returns: torch.Tensor, discounts: torch.Tensor,
                         support: torch.Tensor) -> torch.Tensor:
    """C51 projection of the target distribution R + discount * z onto the fixed support.
    next_probs (B, atoms), returns (B,), discounts (B,) = gamma^n, 0 where the episode ended.
    When an atom lands exactly on a support point (l == u) it gets the whole mass."""
    v_min, v_max, atoms = support[0], support[-1], support.numel()
    delta = (v_max - v_min) / (atoms - 1)
    tz = (returns[:, None] + discounts[:, None] * support[None]).clamp(v_min, v_max)  # Tz = R + gamma^n z
    # clamped again: (v_max - v_min) / delta can round to just over atoms - 1 (fp32 support [-1, 1]
    # with 62 atoms on the CPU; [-10, 10] with 51 on CUDA), and its ceil would index past the end
    b = ((tz - v_min) / delta).clamp(0, atoms - 1)  # b = (Tz - v_min) / delta_z
    lower, upper = b.floor(), b.ceil()
    exact = (lower == upper).to(next_probs.dtype)
    offset = (torch.arange(next_probs.shape[0], device=b.device) * atoms)[:, None]
    target = torch.zeros(next_probs.numel(), dtype=next_probs.dtype, device=next_probs.device)
    target.index_add_(0, (lower.long() + offset).view(-1),
                      (next_probs * (upper - b + exact)).view(-1))  # m_l += p (u - b)
    target.index_add_(0, (upper.long() + offset).view(-1), (next_probs * (b - lower)).view(-1))  # m_u += p (b - l)
    return target.view_as(next_probs)


def dqn_loss(q_network: QNetwork, target_network: QNetwork, batch: Batch, device,
             weights: dict | None = None) -> torch.Tensor:
    """Per-sample C51 cross-entropy -sum_i m_i log p_i(s, a) against the double-Q target m.
    `weights`: the online network's step weights for the speed form (None: the plain modules)."""
    obs = torch.as_tensor(batch.obs, device=device)  # frames stay uint8 until the network
    actions = torch.as_tensor(batch.actions, device=device)
    next_obs = torch.as_tensor(batch.next_obs, device=device)
    rows = torch.arange(len(actions), device=device)
    with torch.no_grad():
        next_best = q_network.q_values(next_obs, weights).argmax(1)  # a* = argmax_a Q_online(s_{t+n}, a)
        target_network.reset_noise()
        target_weights = None if weights is None else step_weights(target_network)
        next_probs = target_network(next_obs, target_weights).exp()[rows, next_best]  # p_target(s_{t+n}, a*)
        returns = torch.as_tensor(batch.returns, device=device)
        discounts = torch.as_tensor(batch.discounts, device=device)
        target = project_distribution(next_probs, returns, discounts, q_network.support)  # m = Phi(R + gamma^n z)
    log_probs = q_network(obs, weights)[rows, actions]  # log p(s_t, a_t)
    return -(target * log_probs).sum(1)


def optimize(q_network: QNetwork, target_network: QNetwork, optimizer: torch.optim.Optimizer, batch: Batch,
             args: Args, device, weights: dict | None = None) -> torch.Tensor:
    """One prioritized gradient step on mean_i w_i loss_i; returns the per-sample losses."""
    losses = dqn_loss(q_network, target_network, batch, device, weights)
    importance = torch.as_tensor(batch.weights, dtype=torch.float32, device=device)
    optimizer.zero_grad()
    (importance * losses).mean().backward()
    nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)  # one L2 norm over all gradients
    optimizer.step()
    return losses.detach()


# --------------------------------------------------------------------------- ALGO LOGIC: acting and the loop


@torch.inference_mode()
def act(q_network: QNetwork, obs: np.ndarray, device, weights: dict | None = None) -> int:
    """argmax_a Q(s, a) with the network's current (noisy, in train mode) weights."""
    obs = torch.as_tensor(obs, device=device)[None]
    return int(q_network.q_values(obs, weights).argmax(1).item())


@torch.no_grad()
def evaluate(q_network: QNetwork, game: str, args: Args, num_actions: int, device, seed: int) -> list[float]:
    """DER's evaluation protocol (envs/atari.py `evaluate_policy`) with the mean weights: no noise."""
    was_training = q_network.training
    q_network.eval()
    weights = step_weights(q_network) if args.speed_form else None
    scores = atari.evaluate_policy(lambda obs: act(q_network, obs, device, weights), game, args, num_actions, seed)
    q_network.train(was_training)
    return scores


def train(args: Args, games: list[str], q_network: QNetwork | None = None, method: str = "mt", writer=None,
          log_eval=None, eval_every: int | None = None) -> QNetwork:
    """DER on `games` (one buffer each, a random game per reset). With log_eval(step, mean, episodes),
    evaluates on games[0] (fine-tuning has one game) before the first update, every eval_every env
    steps and at the end. With args.resume, continues the run in args.output_dir."""
    check_args(args, len(games))
    if writer is None:
        writer = atari.setup(args, f"{args.exp_name}__{args.seed}__{int(time.time())}", MODULE)
    resume = atari.load_resume(args, MODULE)
    device = atari.seed_everything(args)
    num_actions = FULL_ACTIONS if args.pad_actions else atari.num_game_actions(games[0])
    if q_network is None:
        q_network = QNetwork(num_actions, args.hidden_size, args.num_atoms, args.v_min, args.v_max, args.noisy_std)
    q_network = q_network.to(device).train()
    q_network.encoder.requires_grad_(not args.freeze_encoder)  # finetune.py --load-encoder-only
    target_network = QNetwork(num_actions, args.hidden_size, args.num_atoms, args.v_min, args.v_max,
                              args.noisy_std).to(device)
    target_network.load_state_dict(q_network.state_dict())
    q_network.bf16 = target_network.bf16 = use_bf16(args.precision, device)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    buffers = [ReplayBuffer(args.buffer_size // len(games), args.n_step, args.gamma, args.priority_exponent,
                            args.seed + g) for g in range(len(games))]
    env = atari.MultiGameEnv(games, args.seed, num_actions, args.max_noops, args.max_episode_steps)
    rng = np.random.default_rng(args.seed)
    evaluator = atari.Evaluator(log_eval, games[0], args, num_actions, device, QNetwork, evaluate)
    stop = StopRequest()  # SIGINT / SIGTERM: finish the step, write checkpoint and replay, exit
    obs, _ = env.reset()
    start_step, learning_starts = 0, args.learning_starts
    if resume is None:
        evaluator.run(0, q_network)  # the zero-shot point, before any update
    else:  # the same run from its checkpoint: networks, optimizer, env, replay, random states
        start_step, obs, learning_starts = atari.restore_run(resume, args, q_network, target_network, optimizer, env,
                                                             rng, buffers)
        if args.freeze_encoder and args.unfreeze_encoder_at is not None and args.unfreeze_encoder_at <= start_step:
            q_network.encoder.requires_grad_(True)
        evaluator.resume(resume["resume"]["evaluations"], q_network)  # those the stopped run left unfinished

    def checkpoint(step: int) -> None:  # what --resume continues from, the unfinished evaluations included
        state = atari.run_state(target_network, env, obs, rng, learning_starts, evaluations=evaluator.unfinished())
        atari.save_checkpoint(os.path.join(args.output_dir, CHECKPOINT), MODULE, args, q_network, optimizer, step,
                              method, games, num_actions, state)

    start_time, update_time = time.time(), 0.0
    try:
        for global_step in range(start_step + 1, args.total_timesteps + 1):
            if args.freeze_encoder and global_step == args.unfreeze_encoder_at:
                q_network.encoder.requires_grad_(True)
            # fresh noise, then act and learn with the same noisy weights (Kaixhin/Rainbow's order)
            q_network.reset_noise()
            weights = step_weights(q_network) if args.speed_form else None
            action = act(q_network, obs, device, weights)
            game = env.game
            next_obs, reward, terminated, truncated, info = env.step(action)
            # learning sees clipped rewards and life loss as terminal; logging sees the real game
            buffers[game].add(obs[-1], action, float(np.sign(reward)), terminated or truncated)
            obs = next_obs
            if "episode" in info:
                writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
                writer.add_scalar(f"charts/episodic_return/{games[game]}", info["episode"]["r"], global_step)
            if terminated or truncated:
                obs, _ = env.reset()  # a random game after a game over, the same game after a lost life

            if global_step >= learning_starts and any(b.ready for b in buffers):
                t0 = time.time()
                beta = args.priority_weight + (1.0 - args.priority_weight) * min(
                    1.0, (global_step - args.learning_starts) / max(1, args.total_timesteps - args.learning_starts))
                for k in range(args.replay_ratio):
                    if k > 0:  # the parameters changed: new noise and weights for the next update
                        q_network.reset_noise()
                        weights = step_weights(q_network) if args.speed_form else None
                    batch, parts = sample_games(buffers, args, beta, rng)
                    losses = optimize(q_network, target_network, optimizer, batch, args, device, weights).cpu().numpy()
                    start = 0
                    for g, size in parts:
                        buffers[g].update_priorities(batch.indices[start:start + size], losses[start:start + size])
                        start += size
                if global_step % args.target_network_frequency == 0:  # on env steps, as the authors
                    target_network.load_state_dict(q_network.state_dict())
                update_time += time.time() - t0
                if global_step % 100 == 0:
                    writer.add_scalar("losses/loss", float(losses.mean()), global_step)
                    writer.add_scalar("charts/beta", beta, global_step)

            # TRY NOT TO MODIFY: logging, evaluation, checkpoints
            evaluator.share_cores()
            if global_step % 1000 == 0 or global_step == args.total_timesteps:
                atari.log_speed(writer, global_step, start_step, start_time, update_time)
                evaluator.log_finished()
            if (eval_every and global_step % eval_every == 0) or global_step == args.total_timesteps:
                evaluator.run(global_step, q_network)
            stopping = bool(stop)  # once per step: a signal that arrives while saving stops the next one
            if stopping:
                evaluator.terminate()  # its unfinished evaluations go into the checkpoint
            replay = stopping or global_step % args.save_replay_every == 0
            if replay or global_step % args.save_every == 0 or global_step == args.total_timesteps:
                checkpoint(global_step)
            if replay:
                atari.save_replay(os.path.join(args.output_dir, REPLAY), buffers, global_step)
            if stopping:
                stop.exit(args.output_dir, global_step)
        evaluator.close(stop)  # waits for the last evaluations; a stop leaves them to --resume
        if stop:
            stop.exit(args.output_dir, args.total_timesteps)
        if log_eval is not None:
            checkpoint(args.total_timesteps)  # again, no evaluation left unfinished: a --resume sees a complete run
    finally:  # a stop or an error: no background evaluation outlives the run
        evaluator.terminate()
        stop.restore()
    atari.remove_replay(args.output_dir)  # the run is complete: the replay was only for --resume
    return q_network


# --------------------------------------------------------------------------- TRY NOT TO MODIFY: the speed form
# The same network as QNetwork.forward, computed from its parameters in a form that runs faster
# on a CPU: the noisy weights composed once per env step and shared by acting and both online
# passes of the update, the 1/255 scale folded into the first conv, and bf16 convs and hidden
# layers where the hardware has native bf16 (--precision). tests/test_atari.py checks it against
# the plain modules; benchmarks/README.md measures what it gains over a whole 100k run.


def encoder_weights(encoder: Encoder, dtype: torch.dtype):
    """The two convs' (weight, bias) in dtype, conv1's weight divided by 255 so that it reads raw
    pixels (0..255, exact in bf16): no scaling pass over the frames."""
    conv1, conv2 = encoder.conv1, encoder.conv2
    return ((conv1.weight / 255).to(dtype), conv1.bias.to(dtype)), (conv2.weight.to(dtype), conv2.bias.to(dtype))


def fast_encoder(obs: torch.Tensor, weights) -> torch.Tensor:
    """Encoder(obs / 255) from uint8 frame stacks and `encoder_weights`: the same two convs."""
    (w1, b1), (w2, b2) = weights
    x = F.relu(F.conv2d(obs.to(w1.dtype), w1, b1, stride=5))  # (B, 32, 16, 16)
    return F.relu(F.conv2d(x, w2, b2, stride=5)).flatten(1)  # (B, 576)


def step_weights(q_network: QNetwork) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (weight, bias) for one env step, current noise included (train mode), composed
    once and shared by acting and both online passes of the update. The encoder and the hidden
    layers are in bf16 when q_network.bf16 (raw pixels 0..255 are exact in bf16); the output
    layers, the softmax and the loss stay fp32."""
    dtype = torch.bfloat16 if q_network.bf16 else torch.float32
    conv1, conv2 = encoder_weights(q_network.encoder, dtype)
    weights = {"conv1": conv1, "conv2": conv2}
    for name in ("value_hidden", "advantage_hidden"):
        w, b = getattr(q_network, name).noisy_weights()
        weights[name] = (w.to(dtype), b.to(dtype))
    weights["value_out"] = q_network.value_out.noisy_weights()
    weights["advantage_out"] = q_network.advantage_out.noisy_weights()
    return weights


def fast_forward(q_network: QNetwork, obs: torch.Tensor, weights: dict) -> torch.Tensor:
    """QNetwork.forward(obs) computed from `step_weights`."""
    x = fast_encoder(obs, (weights["conv1"], weights["conv2"]))
    value = F.linear(F.relu(F.linear(x, *weights["value_hidden"])).float(), *weights["value_out"])
    adv = F.linear(F.relu(F.linear(x, *weights["advantage_hidden"])).float(), *weights["advantage_out"])
    value, adv = value.view(-1, 1, q_network.num_atoms), adv.view(-1, q_network.num_actions, q_network.num_atoms)
    return F.log_softmax(value + adv - adv.mean(1, keepdim=True), dim=2)


# --------------------------------------------------------------------------- TRY NOT TO MODIFY: flag checks


def check_args(args: Args, num_games: int) -> None:
    """One-line errors for settings that cannot run."""
    atari.check_der_args(args, num_games, at_least_one=("games_per_batch", "replay_ratio"))
    if args.unfreeze_encoder_at is not None and not args.freeze_encoder:
        sys.exit("error: --unfreeze-encoder-at needs a frozen encoder (finetune.py --load-encoder-only)")
    if args.unfreeze_encoder_at is not None and args.unfreeze_encoder_at < 1:
        sys.exit(f"error: --unfreeze-encoder-at must be at least 1 (got {args.unfreeze_encoder_at})")


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    games = atari.game_set(args.train_games, args.games)
    check_args(args, len(games))  # every flag error before anything is created
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = atari.setup(args, run_name, MODULE)
    print(f"multi-task DER on {', '.join(games)} -> {args.output_dir}", flush=True)
    train(args, games, method="mt", writer=writer)
    writer.close()

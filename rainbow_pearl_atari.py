"""PEARL on data-efficient Rainbow (DER) for Atari: a latent task variable inferred from context.

Paper: Mandi, Abbeel, James, "On the Effectiveness of Fine-tuning Versus Meta-reinforcement Learning" (NeurIPS
2022), Sec. 5.3, PEARL-Rainbow; PEARL: Rakelly et al. 2019. A context encoder maps each of a few recent transitions
of one game to a Gaussian factor over a latent z (size 32); the factors multiply into the posterior q(z | c), pulled
toward N(0, I) by a KL term added unweighted, as in the authors' agent_pearl.py (CE_i: sample i's C51 loss, w_i its
importance weight, c_g(i) the context of its game):

    loss = mean_i w_i * (CE_i + KL(q(z | c_g(i)) || N(0, I)))

The dueling C51 heads see [conv features, z]; each episode starts with z sampled from the game's posterior.
`adapt` (finetune.py) is the same loop with no gradient step on the held-out game.

    python rainbow_pearl_atari.py --train-games 10            # paper's 10-game set, 1M env steps
    python finetune.py --checkpoint runs/.../checkpoint.pt --task Pong   # adapt: infer z, no gradient

The DER pieces are rainbow_mt_atari.py's (a test keeps them identical); the environment, the plumbing and the run's
flags (`RunArgs`) are envs/atari.py (details: docs/atari.md)."""

from __future__ import annotations

import copy
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
from envs.atari import FULL_ACTIONS, REPLAY
from envs.run_dir import CHECKPOINT, StopRequest, use_bf16

MODULE = os.path.splitext(os.path.basename(__file__))[0]  # this script's module name, also when run as __main__


@dataclass
class Args(atari.RunArgs):  # + the run's own flags (output, --resume, checkpoints, logging)
    exp_name: str = "rainbow_pearl_atari"
    """name of the run (TensorBoard directory runs/{exp_name}__{seed}__{time})"""
    seed: int = 1
    """seed of python, numpy, torch and the emulators"""
    torch_threads: int = 2
    """torch CPU threads for the learner; use 1 on a busy machine"""
    speed_form: bool = True
    """run the conv encoders in their speed form (`fast_encoder`, the same function; faster on a CPU)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """speed form: the conv encoders in bf16 (auto: where the hardware has native bf16)"""

    # games
    train_games: int = 10
    """5 or 10: the paper's game sets (ignored when --games is given)"""
    games: tuple[str, ...] | None = None
    """explicit list of games, e.g. --games Pong Breakout (CamelCase ALE names)"""
    pad_actions: bool = True
    """pad every game's action set to 18 (padding = NOOP), as the authors' pretrained agents"""

    # PEARL (authors' main_mt.py: --pearl_z_size 32; contexts of 10 from a game's last 100)
    latent_size: int = 32
    """size of the latent z"""
    context_size: int = 10
    """transitions per context (authors' --context_window 10: the number sampled)"""
    context_window: int = 100
    """contexts are drawn from this many most recent transitions of a game (authors' --context_length 100)"""
    context_hidden: int = 256
    """width of the context encoder's two hidden layers (authors: one layer of --pearl_hidden_size 512)"""
    kl_weight: float = 1.0
    """weight of the KL term; 1 = added unweighted, as the authors' agent_pearl.py (PEARL's own default: 0.1)"""

    # budget and evaluation
    total_timesteps: int = 1_000_000
    """env steps (agent steps, 4 frames each); authors pretrain for 1M"""
    eval_episodes: int = 10
    """episodes per evaluation during adaptation (DER protocol: 10)"""
    eval_epsilon: float = 0.001
    """epsilon-greedy during evaluation (DER protocol; authors' --eval_eps 0.001)"""
    eval_max_steps: int = 27_000
    """cap on agent steps per evaluation episode: 108k frames, the ALE standard"""

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
    """dueling head width: DER uses 256; the authors used 512 for their 5- and 10-game agents"""
    target_network_frequency: int = 2000
    """sync the target network when the env step is a multiple of this (authors' main_mt.py)"""
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
    """DER network conditioned on z: the conv `Encoder` (576 features), then dueling NoisyNet heads
    over [features, z] and num_atoms return atoms. forward(obs, z): uint8 frame stacks
    (B, 4, 84, 84) and z (B, latent) -> log p(s, z, a, .) of shape (B, actions, atoms)."""

    def __init__(self, num_actions: int, latent_size: int = 32, hidden_size: int = 256, num_atoms: int = 51,
                 v_min: float = -10.0, v_max: float = 10.0, noisy_std: float = 0.1):
        super().__init__()
        self.num_actions, self.num_atoms = num_actions, num_atoms
        self.speed_form, self.bf16 = False, False  # how `encode` runs the encoder; not in the state dict
        self.register_buffer("support", torch.linspace(v_min, v_max, num_atoms))  # z_1 .. z_N
        self.encoder = Encoder()
        self.value_hidden = NoisyLinear(576 + latent_size, hidden_size, noisy_std)
        self.value_out = NoisyLinear(hidden_size, num_atoms, noisy_std)
        self.advantage_hidden = NoisyLinear(576 + latent_size, hidden_size, noisy_std)
        self.advantage_out = NoisyLinear(hidden_size, num_actions * num_atoms, noisy_std)

    def reset_noise(self) -> None:
        for m in self.modules():
            if isinstance(m, NoisyLinear):
                m.reset_noise()

    def forward(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([encode(self.encoder, obs, self.speed_form, self.bf16), z], 1)
        value = self.value_out(F.relu(self.value_hidden(x))).view(-1, 1, self.num_atoms)
        adv = self.advantage_out(F.relu(self.advantage_hidden(x))).view(-1, self.num_actions, self.num_atoms)
        return F.log_softmax(value + adv - adv.mean(1, keepdim=True), dim=2)  # dueling: V + A - mean_a A

    def q_values(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (self.forward(obs, z).exp() * self.support).sum(2)  # Q(s, z, a) = sum_i z_i p_i


def product_of_gaussians(mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine independent Gaussian factors (..., N, L) into one Gaussian (..., L)."""
    var_z = 1.0 / (1.0 / var).sum(-2)  # sigma^2 = 1 / sum_n 1 / sigma_n^2
    return var_z * (mu / var).sum(-2), var_z  # mu = sigma^2 sum_n mu_n / sigma_n^2


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)) = 1/2 sum_l (var_l + mu_l^2 - 1 - log var_l)."""
    return 0.5 * (var + mu**2 - 1.0 - var.log()).sum(-1)


class ContextEncoder(nn.Module):
    """One Gaussian factor over z per transition (obs, action, reward)."""

    def __init__(self, num_actions: int, latent_size: int = 32, hidden: int = 256):
        super().__init__()
        self.num_actions, self.latent_size = num_actions, latent_size
        self.speed_form, self.bf16 = False, False  # set with QNetwork's
        self.encoder = Encoder()
        self.mlp = nn.Sequential(nn.Linear(576 + num_actions + 1, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 2 * latent_size))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor):
        features = encode(self.encoder, obs, self.speed_form, self.bf16)
        x = torch.cat([features, F.one_hot(actions, self.num_actions).float(), rewards[:, None]], 1)
        mu, pre_var = self.mlp(x).chunk(2, dim=1)
        return mu, F.softplus(pre_var).clamp(min=1e-7)  # one factor N(mu_n, sigma_n^2) per transition


class PearlAgent(nn.Module):
    """The context encoder and the z-conditioned DER network, saved together."""

    def __init__(self, num_actions: int, args: Args):
        super().__init__()
        self.context_encoder = ContextEncoder(num_actions, args.latent_size, args.context_hidden)
        self.q = QNetwork(num_actions, args.latent_size, args.hidden_size, args.num_atoms, args.v_min, args.v_max,
                          args.noisy_std)

    def set_speed_form(self, speed_form: bool, bf16: bool) -> None:
        for net in (self.q, self.context_encoder):
            net.speed_form, net.bf16 = speed_form, bf16

    def posterior(self, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(z | c) for one game's context of N transitions."""
        mu, var = self.context_encoder(context.obs, context.actions, context.rewards)
        return product_of_gaussians(mu, var)


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


class Context(NamedTuple):
    """A PEARL context: N recent transitions of one game (tensors on the device)."""
    obs: torch.Tensor  # uint8 (N, 4, 84, 84)
    actions: torch.Tensor  # (N,)
    rewards: torch.Tensor  # (N,) clipped


class ContextReplayBuffer(ReplayBuffer):
    """DER's replay plus the contexts PEARL reads from a game's newest transitions."""

    def context(self, count: int, window: int, device) -> Context:
        """`count` distinct transitions among the `window` newest entries."""
        ages = self.rng.choice(min(window, self.size), size=min(count, window, self.size), replace=False)
        idx = (self.pos - 1 - ages) % self.capacity
        return Context(torch.as_tensor(self.stacked(idx), device=device),
                       torch.as_tensor(self.actions[idx], device=device),
                       torch.as_tensor(self.rewards[idx], device=device))


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


def dqn_loss(q_network: QNetwork, target_network: QNetwork, batch: Batch, z: torch.Tensor, device) -> torch.Tensor:
    """Per-sample C51 cross-entropy -sum_i m_i log p_i(s, z, a) against the double-Q target m; z
    (B, latent) carries gradient into the context encoder through the online pass only."""
    obs = torch.as_tensor(batch.obs, device=device)  # frames stay uint8 until the network
    actions = torch.as_tensor(batch.actions, device=device)
    next_obs = torch.as_tensor(batch.next_obs, device=device)
    rows = torch.arange(len(actions), device=device)
    with torch.no_grad():
        z_next = z.detach()
        next_best = q_network.q_values(next_obs, z_next).argmax(1)  # a* = argmax_a Q_online(s_{t+n}, z, a)
        target_network.reset_noise()
        next_probs = target_network(next_obs, z_next).exp()[rows, next_best]  # p_target(s_{t+n}, z, a*)
        returns = torch.as_tensor(batch.returns, device=device)
        discounts = torch.as_tensor(batch.discounts, device=device)
        target = project_distribution(next_probs, returns, discounts, q_network.support)  # m = Phi(R + gamma^n z)
    log_probs = q_network(obs, z)[rows, actions]  # log p(s_t, z, a_t)
    return -(target * log_probs).sum(1)


def pearl_loss(ce: torch.Tensor, kl: torch.Tensor, importance: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """mean_i w_i (CE_i + kl_weight * KL_i), KL_i the KL of sample i's game's posterior. With
    kl_weight 1 this is the authors' agent_pearl.py, which adds the KL unweighted to every sample's
    loss before the importance weights (and sums the per-game means where we take one mean: a
    factor games_per_batch on the whole loss)."""
    return (importance * (ce + kl_weight * kl)).mean()


def optimize(agent: PearlAgent, target_network: QNetwork, optimizer: torch.optim.Optimizer, batch: Batch,
             parts: list[tuple[int, int]], buffers: list[ContextReplayBuffer], args: Args, device):
    """One update: per sampled game, a context -> posterior -> reparameterised z for its share of
    the batch, then one gradient step on `pearl_loss`. Returns (per-sample C51 losses, mean KL)."""
    zs, kls = [], []
    for g, size in parts:
        mu, var = agent.posterior(buffers[g].context(args.context_size, args.context_window, device))
        zs.append((mu + var.sqrt() * torch.randn_like(mu)).expand(size, -1))  # z = mu + sigma * eps
        kls.append(kl_to_standard_normal(mu, var).expand(size))
    ce = dqn_loss(agent.q, target_network, batch, torch.cat(zs), device)
    kl = torch.cat(kls)
    importance = torch.as_tensor(batch.weights, dtype=torch.float32, device=device)
    optimizer.zero_grad()
    pearl_loss(ce, kl, importance, args.kl_weight).backward()
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)  # one L2 norm over all gradients
    optimizer.step()
    return ce.detach(), kl.mean().detach()


# --------------------------------------------------------------------------- ALGO LOGIC: acting and the loop


@torch.inference_mode()
def infer_z(agent: PearlAgent, buffer: ContextReplayBuffer | None, args: Args, device,
            sample: bool = True) -> torch.Tensor:
    """z (1, latent): from the prior N(0, I) without experience, else from q(z | c) of the buffer's
    recent transitions (a sample, or the mean with sample=False)."""
    if buffer is None or buffer.size == 0:
        mu, var = torch.zeros(args.latent_size, device=device), torch.ones(args.latent_size, device=device)
    else:
        mu, var = agent.posterior(buffer.context(args.context_size, args.context_window, device))
    return (mu + var.sqrt() * torch.randn_like(mu) if sample else mu)[None]


@torch.inference_mode()
def act(agent: PearlAgent, obs: np.ndarray, z: torch.Tensor, device) -> int:
    """argmax_a Q(s, z, a) with the network's current (noisy, in train mode) weights."""
    return int(agent.q.q_values(torch.as_tensor(obs, device=device)[None], z).argmax(1).item())


def train(args: Args, games: list[str], writer=None, agent: PearlAgent | None = None, log_eval=None,
          eval_every: int = 0, train_tasks: list[str] | None = None) -> PearlAgent:
    """PEARL-DER on `games`: one buffer each, a random game per reset, z resampled from the current game's
    posterior at every episode start, one update per env step. Given a pretrained `agent`, the same loop is PEARL's
    adaptation (`adapt`): no update, and with log_eval(step, mean_return, episodes) an evaluation at step 0 (not
    on a resume), every eval_every env steps and at the end."""
    check_args(args, len(games))
    if writer is None:
        writer = atari.setup(args, f"{args.exp_name}__{args.seed}__{int(time.time())}", MODULE)
    resume = atari.load_resume(args, MODULE)
    device = atari.seed_everything(args)
    adapting = agent is not None
    if agent is None:
        agent = PearlAgent(FULL_ACTIONS if args.pad_actions else atari.num_game_actions(games[0]), args).train()
    agent, num_actions = agent.to(device), agent.q.num_actions
    agent.set_speed_form(args.speed_form, use_bf16(args.precision, device))
    target_network = copy.deepcopy(agent.q).requires_grad_(False)  # the same network, synced on env steps
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    # adaptation reads only the newest transitions: a window-sized buffer (+ room for the frame stacks)
    capacity = args.context_window + 8 if adapting else args.buffer_size // len(games)
    buffers = [ContextReplayBuffer(capacity, args.n_step, args.gamma, args.priority_exponent, args.seed + g)
               for g in range(len(games))]
    env = atari.MultiGameEnv(games, args.seed, num_actions, args.max_noops, args.max_episode_steps)
    rng = np.random.default_rng(args.seed)
    stop = StopRequest()  # SIGINT / SIGTERM: finish the step, write checkpoint and replay, exit

    def evaluate(step: int) -> None:  # DER's protocol, z fixed to the posterior mean of the game's newest transitions
        z_mean = infer_z(agent, buffers[0], args, device, sample=False)
        scores = atari.evaluate_policy(lambda o: act(agent, o, z_mean, device), games[0], args, num_actions,
                                       seed=args.seed + 10_000 + step)
        log_eval(step, float(np.mean(scores)), len(scores))

    obs, _ = env.reset()
    z = infer_z(agent, None, args, device)
    start_step, learning_starts = 0, args.learning_starts
    if resume is None and log_eval is not None:
        evaluate(0)  # the zero-shot point: no experience of the game yet, z = the prior's mean, 0
    if resume is not None:  # the same run from its checkpoint: networks, optimizer, env, replay, z, random states
        start_step, obs, learning_starts = atari.restore_run(resume, args, agent, target_network, optimizer, env, rng,
                                                             buffers)
        z = resume["resume"]["z"].to(device)

    start_time, update_time = time.time(), 0.0
    for global_step in range(start_step + 1, args.total_timesteps + 1):
        if not adapting:  # adaptation acts with the mean weights: no noise to draw
            agent.q.reset_noise()  # fresh noise, then act and learn with it (Kaixhin/Rainbow's order)
        action = act(agent, obs, z, device)
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
            z = infer_z(agent, buffers[env.game], args, device)

        if not adapting and global_step >= learning_starts and any(b.ready for b in buffers):
            t0 = time.time()
            beta = args.priority_weight + (1.0 - args.priority_weight) * min(
                1.0, (global_step - args.learning_starts) / max(1, args.total_timesteps - args.learning_starts))
            batch, parts = sample_games(buffers, args, beta, rng)
            losses, kl = optimize(agent, target_network, optimizer, batch, parts, buffers, args, device)
            losses = losses.cpu().numpy()
            start = 0
            for g, size in parts:  # priorities from the C51 loss alone
                buffers[g].update_priorities(batch.indices[start:start + size], losses[start:start + size])
                start += size
            if global_step % args.target_network_frequency == 0:  # on env steps, as the authors
                target_network.load_state_dict(agent.q.state_dict())
            update_time += time.time() - t0
            if global_step % 100 == 0:
                writer.add_scalar("losses/loss", float(losses.mean()), global_step)
                writer.add_scalar("losses/kl", float(kl), global_step)
                writer.add_scalar("charts/beta", beta, global_step)

        # TRY NOT TO MODIFY: logging, evaluation and checkpoints
        if global_step % 1000 == 0 or global_step == args.total_timesteps:
            atari.log_speed(writer, global_step, start_step, start_time, update_time)
        if log_eval is not None and ((eval_every and global_step % eval_every == 0)
                                     or global_step == args.total_timesteps):
            evaluate(global_step)
        stopping = bool(stop)  # once per step: a signal that arrives while saving stops the next one
        replay = stopping or global_step % args.save_replay_every == 0
        if replay or global_step % args.save_every == 0 or global_step == args.total_timesteps:
            state = atari.run_state(target_network, env, obs, rng, learning_starts, z=z.cpu())
            atari.save_checkpoint(os.path.join(args.output_dir, CHECKPOINT), MODULE, args, agent, optimizer,
                                  global_step, "pearl", train_tasks or games, num_actions, state)
            if replay or adapting:  # an adaptation's buffer is a few frames: written with every checkpoint
                atari.save_replay(os.path.join(args.output_dir, REPLAY), buffers, global_step)
        if stopping:
            stop.exit(args.output_dir, global_step)
    stop.restore()
    atari.remove_replay(args.output_dir)  # the run is complete: the replay was only for --resume
    return agent


def adapt(args: Args, model_state: dict, game: str, num_actions: int, writer=None, log_eval=None,
          eval_every: int = 5_000, train_tasks: list[str] | None = None) -> PearlAgent:
    """PEARL's adaptation to a held-out game (finetune.py), with no gradient step: the training loop without its
    update, acting with the pretrained agent's mean weights (eval mode) and z inferred from the game's own newest
    transitions (resampled at every episode start). Evaluations use z = the posterior mean (at step 0 the prior's,
    0). checkpoint.pt records `train_tasks`, the agent's pretraining games; args.resume continues a stopped one."""
    check_args(args, 1)  # every error before anything is built
    atari.rom_id(game)
    agent = PearlAgent(num_actions, args)
    agent.load_state_dict(model_state)
    return train(args, [game], writer, agent=agent.eval(), log_eval=log_eval, eval_every=eval_every,
                 train_tasks=train_tasks)


# --------------------------------------------------------------------------- TRY NOT TO MODIFY: the speed form
# The same network as Encoder.forward, computed from its parameters in a form that runs faster
# on a CPU: the 1/255 scale folded into the first conv, and bf16 convs where the hardware has
# native bf16 (--precision). tests/test_atari.py checks it against the plain modules.


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


def encode(encoder: Encoder, obs: torch.Tensor, speed_form: bool, bf16: bool) -> torch.Tensor:
    """Encoder(obs / 255) for uint8 frame stacks: the plain module, or `fast_encoder` (bf16 when asked)."""
    if not speed_form:
        return encoder(obs.float() / 255)
    dtype = torch.bfloat16 if bf16 else torch.float32
    return fast_encoder(obs, encoder_weights(encoder, dtype)).float()


# --------------------------------------------------------------------------- TRY NOT TO MODIFY: flag checks


def check_args(args: Args, num_games: int) -> None:
    """One-line errors for settings that cannot run."""
    atari.check_der_args(args, num_games, at_least_one=("games_per_batch", "latent_size", "context_size"))
    if args.context_window < args.context_size:
        sys.exit(f"error: --context-window ({args.context_window}) must hold --context-size "
                 f"({args.context_size}) transitions")


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    games = atari.game_set(args.train_games, args.games)
    check_args(args, len(games))  # every flag error before anything is created
    writer = atari.setup(args, f"{args.exp_name}__{args.seed}__{int(time.time())}", MODULE)
    print(f"PEARL-DER on {', '.join(games)} -> {args.output_dir}", flush=True)
    train(args, games, writer=writer)
    writer.close()

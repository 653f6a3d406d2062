"""RL2 with PPO on Procgen CoinRun (Duan et al. 2016; Mandi, Abbeel & James 2022).

A recurrent policy is trained across meta-episodes: `--num-trials` consecutive episodes
(trials) on the same level. The LSTM reads [IMPALA embedding of the frame, one-hot previous
action, previous reward, "a trial just began" flag]; its state carries across the trials
of a meta-episode and is reset only when the level changes. Returns are not cut at trial
ends, so the agent learns to use earlier trials to do better in later ones. Adaptation to a
held-out level (`finetune.py`, via `adapt`) is rolling out with the recurrent state: no
gradient step.

    python ppo_rl2_procgen.py --num-levels 1000
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

NUM_ACTIONS = 15  # Procgen's full action set; CoinRun uses all 15 ids.


@dataclass
class Args:
    exp_name: str = "ppo_rl2_procgen"
    seed: int = 1
    torch_deterministic: bool = True
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to Weights & Biases (wandb is imported only when set)"""
    wandb_project_name: str = "finetune-vs-meta-rl"
    wandb_entity: Optional[str] = None
    output_dir: Optional[str] = None
    """where checkpoint.pt and TensorBoard logs go (default runs/{run_name})"""
    save_every: int = 50
    """iterations between periodic checkpoints"""

    # Environment: the paper's CoinRun cross-level setting.
    env_id: str = "coinrun"
    distribution_mode: Literal["easy", "hard", "extreme", "memory", "exploration"] = "hard"
    num_levels: int = 1000
    """training levels (the paper reports 100, 1000 and 10000)"""
    start_level: int = 0
    """first training level; held-out test levels start at 10000"""
    env_threads: Optional[int] = None
    """procgen's threads stepping the envs (default: one per CPU core; procgen's own default is 4).
    On a 16-core GPU machine, 16 threads halved the env time of a 256-env rollout (README)"""
    num_trials: int = 2
    """episodes per meta-episode on one level (authors: 2)"""

    # RL2 network (authors: a 2-layer LSTM of 128 units over a 256-d embedding).
    lstm_layers: int = 2
    lstm_hidden: int = 128

    # PPO, as in the authors' SB3 config (DESIGN.md section 3).
    total_timesteps: int = 1500 * 256 * 256
    """1500 iterations of 256 envs x 256 steps (~100M steps)"""
    learning_rate: float = 5e-4
    anneal_lr: bool = False
    """the authors keep the learning rate constant"""
    num_envs: int = 256
    num_steps: int = 256
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 32
    """minibatches of whole env sequences: 256 envs / 32 = 8 sequences x 256 steps = 2048 samples"""
    update_epochs: int = 3
    norm_adv: bool = True
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: Optional[float] = 0.01
    """stop the epoch loop once a minibatch's approx KL exceeds 1.5 x this (SB3's rule)"""
    norm_reward: bool = True
    """scale the learning signal by a running std of the discounted return (the LSTM sees raw rewards)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """convolutions in bfloat16 autocast (LSTM, heads, losses and optimizer stay fp32); auto = bf16
    where the hardware runs it natively (recent CUDA GPUs, CPUs with AVX512-BF16/AMX), else fp32"""


# ----------------------------------------------------------------------------- environment


def import_procgen():
    """procgen still imports the unmaintained `gym`, which prints a banner; keep it out of sight."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import procgen
    return procgen


class ProcgenVecEnv:
    """ProcgenEnv with numpy uint8 observations (N, 64, 64, 3) and episode bookkeeping.

    `step` returns (obs, reward, done, finished) where `finished` is a list of
    (env_index, episodic_return, episodic_length, level_seed) for episodes that just ended.
    Procgen resets finished environments itself; `obs` is then the new episode's first frame.
    """

    def __init__(self, num_envs: int, env_id: str, num_levels: int, start_level: int, distribution_mode: str, seed: int,
                 threads: Optional[int] = None):
        procgen = import_procgen()
        from procgen.env import ENV_NAMES

        if env_id not in ENV_NAMES:  # procgen would abort the interpreter on an unknown name
            raise SystemExit(f"error: unknown Procgen game '{env_id}'; choose one of {', '.join(ENV_NAMES)}")
        if threads is not None and threads < 1:
            raise SystemExit(f"error: --env-threads must be at least 1 (got {threads})")
        self.env = procgen.ProcgenEnv(num_envs=num_envs, env_name=env_id, num_levels=num_levels,
                                      start_level=start_level, distribution_mode=distribution_mode, rand_seed=seed,
                                      num_threads=threads or os.cpu_count() or 4)
        self.num_envs = num_envs
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.level_seeds = np.zeros(num_envs, dtype=np.int64)

    def reset(self) -> np.ndarray:
        self.returns[:] = 0
        self.lengths[:] = 0
        obs = self.env.reset()["rgb"]
        self.level_seeds[:] = [info["level_seed"] for info in self.env.env.get_info()]
        return obs

    def step(self, actions: np.ndarray):
        obs, reward, done, infos = self.env.step(actions)
        self.returns += reward
        self.lengths += 1
        finished = []
        for i in np.flatnonzero(done):
            finished.append((int(i), float(self.returns[i]), int(self.lengths[i]), int(infos[i]["prev_level_seed"])))
        self.returns[done] = 0
        self.lengths[done] = 0
        self.level_seeds[:] = [info["level_seed"] for info in infos]
        return obs["rgb"], reward.astype(np.float32), done, finished

    def close(self):
        self.env.close()


class RewardNormalizer:
    """Divides rewards by the running std of each env's discounted return, then clips to [-10, 10]."""

    def __init__(self, num_envs: int, gamma: float, eps: float = 1e-8):
        self.gamma, self.eps = gamma, eps
        self.ret = np.zeros(num_envs, dtype=np.float64)
        self.mean, self.var, self.count = 0.0, 1.0, eps

    def __call__(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        self.ret = self.ret * self.gamma + reward
        batch_mean, batch_var, n = self.ret.mean(), self.ret.var(), len(self.ret)
        delta, total = batch_mean - self.mean, self.count + n  # parallel (Chan et al.) variance update
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total
        self.ret[done] = 0.0
        return np.clip(reward / np.sqrt(self.var + self.eps), -10, 10).astype(np.float32)




class MetaEpisodeVecEnv(ProcgenVecEnv):
    """ProcgenVecEnv whose environments replay their level for `num_trials` episodes.

    When a trial ends before the last, the environment is restored to the saved initial
    state of its level (procgen's get_state/set_state), so the next trial is the same level.
    After the last trial Procgen's own reset draws a new level and a new meta-episode begins.
    `step` additionally returns `new_meta[i]`: env i's next observation starts a new
    meta-episode (reset the recurrent state there, and do not bootstrap across it).
    """

    def __init__(self, num_trials: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_trials = num_trials
        self.trial = np.zeros(self.num_envs, dtype=np.int64)
        self.initial_states: list = []

    def reset(self) -> np.ndarray:
        obs = super().reset()
        self.trial[:] = 0
        self.initial_states = list(self.env.env.callmethod("get_state"))
        return obs

    def step(self, actions: np.ndarray):
        obs, reward, done, finished = super().step(actions)
        # finished episodes as (env, return, length, level, trial index within the meta-episode)
        finished = [(i, ret, length, level, int(self.trial[i])) for i, ret, length, level in finished]
        new_meta = np.zeros(self.num_envs, dtype=bool)
        if done.any():
            states = list(self.env.env.callmethod("get_state"))
            replay = []
            for i in np.flatnonzero(done):
                self.trial[i] += 1
                if self.trial[i] < self.num_trials:
                    states[i] = self.initial_states[i]  # same level, from its first frame
                    replay.append(i)
                else:
                    self.trial[i] = 0
                    new_meta[i] = True
                    self.initial_states[i] = states[i]  # Procgen already reset env i to a new level
            if replay:
                self.env.env.callmethod("set_state", states)
                _, gym3_obs, _ = self.env.env.observe()
                obs = gym3_obs["rgb"].copy()
                infos = self.env.env.get_info()
                self.level_seeds[replay] = [infos[i]["level_seed"] for i in replay]
        return obs, reward, done, new_meta, finished


# ----------------------------------------------------------------------------- network


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ConvSequence(nn.Module):
    """IMPALA stage: conv3x3, maxpool 3 stride 2, two residual blocks."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.res0 = ResidualBlock(out_channels)
        self.res1 = ResidualBlock(out_channels)

    def forward(self, x):
        x = F.max_pool2d(self.conv(x), kernel_size=3, stride=2, padding=1)
        return self.res1(self.res0(x))


class ImpalaEncoder(nn.Module):
    """IMPALA-CNN (Espeholt et al. 2018) with channels 16, 32, 32 -> 256 features."""

    def __init__(self, channels=(16, 32, 32), out_features: int = 256):
        super().__init__()
        self.bf16 = False  # set by `use_bf16`; not part of the state dict
        stages, c_in = [], 3
        for c in channels:
            stages.append(ConvSequence(c_in, c))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in * 8 * 8, out_features)  # 64 -> 32 -> 16 -> 8

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        # uint8 (B, 64, 64, 3) -> float (B, 3, 64, 64) in [0, 1]. The permuted view is already
        # channels_last in memory, which is the fast layout for CPU convolutions: no copy.
        x = obs.permute(0, 3, 1, 2).float().mul_(1.0 / 255.0)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x = self.stages(x)
            x = F.relu(self.fc(F.relu(x).flatten(1)))
        return x.float()


class RL2Agent(nn.Module):
    """IMPALA embedding + [one-hot previous action, previous reward, trial-start flag] -> 256 -> LSTM -> heads."""

    def __init__(self, num_actions: int = NUM_ACTIONS, lstm_hidden: int = 128, lstm_layers: int = 2):
        super().__init__()
        self.num_actions = num_actions
        self.encoder = ImpalaEncoder()
        self.embed = layer_init(nn.Linear(256 + num_actions + 2, 256))
        self.lstm = nn.LSTM(256, lstm_hidden, lstm_layers)
        for name, param in self.lstm.named_parameters():
            if "bias" in name:
                nn.init.constant_(param, 0)
            else:
                nn.init.orthogonal_(param, 1.0)
        self.actor = layer_init(nn.Linear(lstm_hidden, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(lstm_hidden, 1), std=1.0)
        self.to(memory_format=torch.channels_last)

    def initial_state(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.lstm.num_layers, batch_size, self.lstm.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def recurrent(self, obs, prev_action, prev_reward, trial_start, state, resets):
        """Runs (T, B) sequences; the state is zeroed before step t wherever resets[t] = 1.
        prev_action is -1 at the start of a meta-episode (no previous action)."""
        num_steps, batch = resets.shape
        x = self.encoder(obs.reshape(num_steps * batch, *obs.shape[2:]))
        one_hot = (prev_action.reshape(-1, 1) == torch.arange(self.num_actions, device=obs.device)).float()
        x = torch.cat([x, one_hot, prev_reward.reshape(-1, 1), trial_start.reshape(-1, 1)], dim=1)
        x = F.relu(self.embed(x)).view(num_steps, batch, -1)
        h, c = state
        outputs = []
        for t in range(num_steps):
            keep = (1.0 - resets[t]).view(1, -1, 1)
            out, (h, c) = self.lstm(x[t:t + 1], (h * keep, c * keep))
            outputs.append(out)
        return torch.cat(outputs), (h, c)

    def get_action_and_value(self, obs, prev_action, prev_reward, trial_start, state, resets, action=None):
        """All inputs (T, B, ...); returns action, log-prob, entropy, value (each (T, B)) and the final state."""
        hidden, state = self.recurrent(obs, prev_action, prev_reward, trial_start, state, resets)
        log_probs = self.actor(hidden).log_softmax(-1)
        if action is None:
            action = torch.multinomial(log_probs.exp().flatten(0, 1), 1).view(log_probs.shape[:2])
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        logprob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        return action, logprob, entropy, self.critic(hidden).squeeze(-1), state


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve --precision: bf16 only where the hardware has native bfloat16 arithmetic."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ----------------------------------------------------------------------------- PPO over whole sequences


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
                gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a (T, N) rollout.

    `dones[t]` is 1 where the episode ended with transition t (so s_{t+1} belongs to a new
    episode and must not be bootstrapped); `last_value` is V(s_T) for the state after the rollout.
    Returns (advantages, returns) with returns = advantages + values.
    """
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_value, last_gae = last_value, torch.zeros_like(last_value)
    for t in reversed(range(num_steps)):
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        last_gae = delta + gamma * gae_lambda * nonterminal * last_gae
        advantages[t] = last_gae
        next_value = values[t]
    return advantages, advantages + values




def sequence_minibatches(num_envs: int, num_minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Random disjoint groups of env indices; a minibatch takes each chosen env's whole sequence,
    so the LSTM is replayed over contiguous steps from its stored initial state."""
    return list(torch.randperm(num_envs, generator=generator).chunk(num_minibatches))


def ppo_update(agent: RL2Agent, optimizer: torch.optim.Optimizer, rollout: dict, args: Args,
               generator: torch.Generator) -> dict:
    """Clipped-surrogate PPO on (T, N) rollouts, minibatching over environments (whole sequences)."""
    stats = {"pg_loss": [], "v_loss": [], "entropy": [], "approx_kl": [], "clipfrac": []}
    h0, c0 = rollout["state"]
    stopped = False
    for _epoch in range(args.update_epochs):
        for mb in sequence_minibatches(args.num_envs, args.num_minibatches, generator):
            _, newlogprob, entropy, newvalue, _ = agent.get_action_and_value(
                rollout["obs"][:, mb], rollout["prev_actions"][:, mb], rollout["prev_rewards"][:, mb],
                rollout["trial_starts"][:, mb], (h0[:, mb], c0[:, mb]), rollout["resets"][:, mb],
                rollout["actions"][:, mb])
            logratio = newlogprob - rollout["logprobs"][:, mb]
            ratio = logratio.exp()
            with torch.no_grad():  # statistics stay on the device: one host sync per minibatch (the KL check), not five
                approx_kl = ((ratio - 1) - logratio).mean()  # the k3 estimator (Schulman 2020)
                stats["approx_kl"].append(approx_kl)
                stats["clipfrac"].append(((ratio - 1.0).abs() > args.clip_coef).float().mean())
            if args.target_kl is not None and approx_kl.item() > 1.5 * args.target_kl:
                stopped = True  # SB3 early stopping: skip this minibatch and all that follow
                break
            mb_adv = rollout["advantages"][:, mb]
            if args.norm_adv:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
            v_loss = 0.5 * ((newvalue - rollout["returns"][:, mb]) ** 2).mean()
            entropy_loss = entropy.mean()
            loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            stats["pg_loss"].append(pg_loss.detach())
            stats["v_loss"].append(v_loss.detach())
            stats["entropy"].append(entropy_loss.detach())
        if stopped:
            break
    out = {k: torch.stack(v).mean().item() if v else float("nan") for k, v in stats.items()}
    y_pred, y_true = rollout["values"], rollout["returns"]
    var_y = y_true.var()
    out["explained_variance"] = float("nan") if var_y == 0 else float(1 - (y_true - y_pred).var() / var_y)
    return out


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str, agent: nn.Module, optimizer: torch.optim.Optimizer, args: Args, global_step: int,
                    train_tasks: list) -> None:
    """Atomic save (temp file + rename) of plain values and tensors only (weights_only-loadable)."""
    ckpt = {
        "format": "finetune-vs-meta-rl",
        "format_version": 1,
        "module": "ppo_rl2_procgen",
        "benchmark": "procgen",
        "method": "rl2",
        "train_tasks": [int(t) for t in train_tasks],
        "args": dataclasses.asdict(args),
        "global_step": int(global_step),
        "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- rollouts and training loop

LOSS_TAGS = {"pg_loss": "policy_loss", "v_loss": "value_loss", "entropy": "entropy", "approx_kl": "approx_kl",
             "clipfrac": "clipfrac", "explained_variance": "explained_variance"}


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


def make_writer(args: Args, run_name: str):
    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(args.output_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


def setup(args: Args, writer):
    """Checks the budget flags, seeds, and opens the output directory; returns
    (num_iterations, device, writer, owns_writer)."""
    if args.num_envs < 1 or args.num_steps < 1:
        raise SystemExit(f"error: --num-envs ({args.num_envs}) and --num-steps ({args.num_steps}) must be at least 1")
    batch_size = args.num_envs * args.num_steps
    if args.num_trials < 1:
        raise SystemExit("error: --num-trials must be at least 1")
    num_iterations = args.total_timesteps // batch_size
    if num_iterations < 1:
        raise SystemExit(f"error: --total-timesteps {args.total_timesteps} is less than one rollout ({batch_size} steps)")
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", run_name)
    os.makedirs(args.output_dir, exist_ok=True)
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    return num_iterations, device, writer or make_writer(args, run_name), writer is None


class RL2Rollout:
    """(num_steps, num_envs) sequence storage plus the recurrent inputs carried between rollouts."""

    def __init__(self, args: Args, agent: RL2Agent, envs: MetaEpisodeVecEnv, device: torch.device):
        steps, n = args.num_steps, args.num_envs
        self.args = args
        self.obs = torch.zeros((steps, n, 64, 64, 3), dtype=torch.uint8, device=device)
        self.actions, self.prev_actions = (torch.zeros((steps, n), dtype=torch.long, device=device) for _ in range(2))
        self.logprobs, self.rewards, self.dones, self.values, self.prev_rewards, self.trial_starts, self.resets = (
            torch.zeros((steps, n), device=device) for _ in range(7))
        # What the next step will see: a fresh meta-episode everywhere.
        self.next_obs = torch.from_numpy(envs.reset()).to(device)
        self.prev_action = torch.full((n,), -1, dtype=torch.long, device=device)
        self.prev_reward = torch.zeros(n, device=device)
        self.trial_start = torch.ones(n, device=device)
        self.reset = torch.ones(n, device=device)
        self.state = agent.initial_state(n, device)

    def _inputs(self):
        return (self.next_obs[None], self.prev_action[None], self.prev_reward[None], self.trial_start[None],
                self.state, self.reset[None])

    @torch.inference_mode()
    def collect(self, agent: RL2Agent, envs: MetaEpisodeVecEnv, normalize) -> tuple[dict, list]:
        """One rollout; returns the (T, N) batch (with GAE) and the finished episodes."""
        device = self.obs.device
        start_state = tuple(s.clone() for s in self.state)
        finished_all = []
        for step in range(self.obs.shape[0]):
            self.obs[step], self.prev_actions[step], self.prev_rewards[step] = self.next_obs, self.prev_action, self.prev_reward
            self.trial_starts[step], self.resets[step] = self.trial_start, self.reset
            action, logprob, _, value, self.state = agent.get_action_and_value(*self._inputs())
            action = action[0]
            self.actions[step], self.logprobs[step], self.values[step] = action, logprob[0], value[0]
            raw_obs, reward, done, new_meta, finished = envs.step(action.cpu().numpy())
            finished_all += finished
            new_meta_t = torch.from_numpy(new_meta).to(device)
            self.rewards[step] = torch.from_numpy(normalize(reward, new_meta) if normalize is not None else reward)
            self.dones[step] = new_meta_t.float()  # returns run across trials, stop at meta-episode ends
            self.next_obs = torch.from_numpy(raw_obs).to(device)
            self.prev_action = torch.where(new_meta_t, -1, action)
            self.prev_reward = torch.where(new_meta_t, 0.0, torch.from_numpy(reward).to(device))
            self.trial_start = torch.from_numpy(done.astype(np.float32)).to(device)
            self.reset = new_meta_t.float()
        last_value = agent.get_action_and_value(*self._inputs())[3][0]
        advantages, returns = compute_gae(self.rewards, self.values, self.dones, last_value,
                                          self.args.gamma, self.args.gae_lambda)
        batch = {"obs": self.obs, "actions": self.actions, "logprobs": self.logprobs, "values": self.values,
                 "prev_actions": self.prev_actions, "prev_rewards": self.prev_rewards,
                 "trial_starts": self.trial_starts, "resets": self.resets, "state": start_state,
                 "advantages": advantages, "returns": returns}
        return batch, finished_all


def report(writer, prefix: str, iteration: int, num_iterations: int, global_step: int, start_time: float,
           finished: list, num_trials: int) -> None:
    """TensorBoard and stdout: mean return overall and per trial index of the finished episodes."""
    sps = int(global_step / (time.time() - start_time))
    writer.add_scalar("charts/SPS", sps, global_step)
    returns = [ret for _e, ret, _n, _l, _t in finished]
    per_trial = []
    if returns:
        writer.add_scalar(f"{prefix}/episodic_return", np.mean(returns), global_step)
        writer.add_scalar(f"{prefix}/episodic_length", np.mean([n for _e, _r, n, _l, _t in finished]), global_step)
        for k in range(num_trials):
            trial_returns = [ret for _e, ret, _n, _l, t in finished if t == k]
            if trial_returns:
                writer.add_scalar(f"{prefix}/trial_{k}_return", np.mean(trial_returns), global_step)
                per_trial.append(f"trial{k}={np.mean(trial_returns):.2f}")
    mean_ret = f"{np.mean(returns):.2f}" if returns else "n/a"
    print(f"iter {iteration}/{num_iterations} step={global_step} episodic_return={mean_ret} {' '.join(per_trial)} "
          f"({len(returns)} episodes) SPS={sps}", flush=True)


def make_agent(args: Args, device: torch.device) -> RL2Agent:
    agent = RL2Agent(NUM_ACTIONS, args.lstm_hidden, args.lstm_layers).to(device)
    agent.encoder.bf16 = use_bf16(args.precision, device)
    return agent


def train(args: Args, writer=None) -> RL2Agent:
    """RL2-PPO over meta-episodes on levels [start_level, start_level + num_levels)."""
    if args.num_minibatches < 1 or args.num_envs % args.num_minibatches:
        raise SystemExit(f"error: --num-envs ({args.num_envs}) must be divisible by --num-minibatches "
                         f"({args.num_minibatches}): RL2 minibatches are whole env sequences")
    num_iterations, device, writer, own_writer = setup(args, writer)
    generator = torch.Generator().manual_seed(args.seed)
    train_tasks = list(range(args.start_level, args.start_level + args.num_levels))
    envs = MetaEpisodeVecEnv(args.num_trials, args.num_envs, args.env_id, args.num_levels, args.start_level,
                             args.distribution_mode, args.seed, args.env_threads)
    agent = make_agent(args, device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    normalize = RewardNormalizer(args.num_envs, args.gamma) if args.norm_reward else None
    rollout = RL2Rollout(args, agent, envs, device)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    global_step, start_time = 0, time.time()
    for iteration in range(1, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
        batch, finished = rollout.collect(agent, envs, normalize)
        global_step += args.num_envs * args.num_steps
        stats = ppo_update(agent, optimizer, batch, args, generator)
        for k, tag in LOSS_TAGS.items():
            writer.add_scalar(f"losses/{tag}", stats[k], global_step)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        report(writer, "charts", iteration, num_iterations, global_step, start_time, finished, args.num_trials)
        if iteration % args.save_every == 0 or iteration == num_iterations:
            save_checkpoint(ckpt_path, agent, optimizer, args, global_step, train_tasks)
    envs.close()
    print(f"saved {ckpt_path}")
    if own_writer:
        writer.close()
    return agent


def adapt(args: Args, model_state: dict, level: int, writer=None,
          log_eval: Optional[Callable[[int, float], None]] = None, eval_every: Optional[int] = None) -> None:
    """Test-time adaptation on one held-out level: meta-episodes of `num_trials` episodes with the
    recurrent state reset at the start of each (as in training), no gradient step. `log_eval`
    receives the mean episodic return of the episodes finished every `eval_every` env steps."""
    num_iterations, device, writer, own_writer = setup(args, writer)
    envs = MetaEpisodeVecEnv(args.num_trials, args.num_envs, args.env_id, 1, level, args.distribution_mode, args.seed,
                             args.env_threads)
    agent = make_agent(args, device)
    agent.load_state_dict(model_state)
    agent.eval()
    rollout = RL2Rollout(args, agent, envs, device)
    global_step, start_time, next_eval, pending = 0, time.time(), eval_every or 0, []
    for iteration in range(1, num_iterations + 1):
        _, finished = rollout.collect(agent, envs, None)
        global_step += args.num_envs * args.num_steps
        report(writer, "eval", iteration, num_iterations, global_step, start_time, finished, args.num_trials)
        pending += [ret for _e, ret, _n, _l, _t in finished]
        if log_eval is not None and pending and (global_step >= next_eval or iteration == num_iterations):
            log_eval(global_step, float(np.mean(pending)))
            pending, next_eval = [], global_step + (eval_every or 0)
    envs.close()
    if own_writer:
        writer.close()


if __name__ == "__main__":
    train(tyro.cli(Args))

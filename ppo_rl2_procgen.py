"""RL2 with PPO on Procgen CoinRun (Duan et al. 2016, Sec. 2; Mandi, Abbeel & James 2022, Sec. 5.1).

The "RL2" meta-RL baseline of "On the Effectiveness of Fine-tuning Versus Meta-reinforcement Learning"
(NeurIPS 2022): a recurrent policy trained over meta-episodes of `--num-trials` episodes (trials) on one
level. The LSTM reads [IMPALA embedding, one-hot previous action, previous reward, trial-start flag]; its
state carries across the trials and resets when the level changes, and returns run across trial ends, so
the agent learns to use earlier trials. Adapting to a held-out level (`adapt`, via finetune.py) is rolling
out with the recurrent state, no gradient step. Details: docs/procgen.md; the environment
and the run's flags (`RunArgs`): envs/procgen.py.

    python ppo_rl2_procgen.py --num-levels 1000
    python finetune.py --checkpoint runs/.../checkpoint.pt --task 10000
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from envs.procgen import (LOSS_TAGS, NUM_ACTIONS, EvalEpisodes, ProcgenVecEnv, RunArgs, VecNormalizeReward,
                          check_env_id, check_levels, make_writer, save_checkpoint, seed_everything, state_tensor)
from envs.run_dir import (CHECKPOINT, StopRequest, check_output_dir, load_resume, open_output_dir, restore,
                          use_bf16)

SCRIPT = "ppo_rl2_procgen"  # the module name checkpoints record (finetune.py checks it)


@dataclass
class Args(RunArgs):  # + the run's own flags (output, --resume, checkpoints, logging, device)
    exp_name: str = "ppo_rl2_procgen"
    """the name of this experiment (part of the default run directory's name)"""
    seed: int = 1
    """seed of Python, numpy, torch and the environments"""
    # Environment: the paper's CoinRun cross-level setting.
    env_id: str = "coinrun"
    """the Procgen game (the paper: coinrun)"""
    distribution_mode: Literal["easy", "hard", "extreme", "memory", "exploration"] = "hard"
    """Procgen's level distribution (the paper and the authors: hard)"""
    num_levels: int = 1000
    """training levels (the paper reports 100, 1000 and 10000)"""
    start_level: int = 0
    """first training level; held-out test levels start at 10000"""
    env_threads: Optional[int] = None
    """procgen's threads stepping the envs (default: one per CPU core); never taken from a checkpoint"""
    num_trials: int = 2
    """episodes per meta-episode on one level (authors: max_trials 2)"""

    # RL2 network (authors: a 2-layer LSTM of 128 units over a 256-d embedding).
    lstm_layers: int = 2
    """stacked LSTM layers (authors: 2)"""
    lstm_hidden: int = 128
    """units per LSTM layer (authors: 128)"""

    # PPO, as in the authors' SB3 config (DESIGN.md section 3).
    total_timesteps: int = 1500 * 256 * 256
    """1500 iterations of 256 envs x 256 steps (~100M steps)"""
    learning_rate: float = 5e-4
    """Adam's learning rate (authors: 5e-4)"""
    anneal_lr: bool = False
    """anneal the learning rate linearly to 0 (the authors keep it constant)"""
    num_envs: int = 256
    """parallel training environments (authors: 256)"""
    num_steps: int = 256
    """steps per environment in one rollout (one sequence per env)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 32
    """minibatches per epoch, of whole env sequences: 256 envs / 32 = 8 sequences x 256 steps = 2048 samples"""
    update_epochs: int = 3
    """passes over the rollout per PPO update (authors' n_epochs: 3)"""
    norm_adv: bool = True
    """normalise advantages within each minibatch (SB3 does)"""
    clip_coef: float = 0.2
    """PPO's clipping range epsilon"""
    ent_coef: float = 0.01
    """weight of the entropy bonus"""
    vf_coef: float = 0.5
    """weight of the value loss mean((R - V)^2) (SB3's form: no extra 1/2)"""
    max_grad_norm: float = 0.5
    """clip the gradient's global norm to this"""
    target_kl: Optional[float] = 0.01
    """stop the epoch loop once a minibatch's approx KL exceeds 1.5 x this (SB3's rule)"""
    norm_reward: bool = True
    """scale the learning signal by a running std of the discounted return (the LSTM sees raw rewards)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """convolutions in bfloat16 autocast (the rest stays fp32); auto: where the hardware has native bf16"""

    # Adaptation's fresh-state evaluation (adapt): its own envs on the held-out level, a new recurrent state.
    eval_episodes: int = 100
    """episodes of the step-0 point, and of any point where no adaptation episode finished (authors: 100)"""
    eval_num_envs: int = 50
    """parallel envs of the fresh-state evaluation's own ProcgenEnv (authors: 50)"""


# ----------------------------------------------------------------------------- ALGO LOGIC: the network


def ortho_init(module: nn.Module, gain: float) -> nn.Module:
    """SB3's `ortho_init`: every Conv2d and Linear inside `module` gets orthogonal weights scaled
    by `gain` and zero biases (ActorCriticPolicy: features sqrt(2), policy head 0.01, value 1)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(layer.weight, gain)
            nn.init.zeros_(layer.bias)
    return module


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
        self.bf16 = False  # set from --precision (use_bf16); not part of the state dict
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
        # SPEED: bf16 autocast where the hardware has it (use_bf16). No autocast cache: each weight
        # is cast once per pass anyway, and a cache must stay off while a CUDA graph is captured.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            x = self.stages(x)
            x = F.relu(self.fc(F.relu(x).flatten(1)))
        return x.float()


class RL2Agent(nn.Module):
    """IMPALA embedding + [one-hot previous action, previous reward, trial-start flag] -> 256 -> LSTM -> heads."""

    def __init__(self, num_actions: int = NUM_ACTIONS, lstm_hidden: int = 128, lstm_layers: int = 2):
        super().__init__()
        self.num_actions = num_actions
        self.encoder = ortho_init(ImpalaEncoder(), np.sqrt(2))
        self.embed = ortho_init(nn.Linear(256 + num_actions + 2, 256), np.sqrt(2))
        self.lstm = nn.LSTM(256, lstm_hidden, lstm_layers)
        for name, param in self.lstm.named_parameters():  # CleanRL's ppo_atari_lstm.py: orthogonal, zero biases
            if "bias" in name:
                nn.init.constant_(param, 0)
            else:
                nn.init.orthogonal_(param, 1.0)
        self.actor = ortho_init(nn.Linear(lstm_hidden, num_actions), 0.01)
        self.critic = ortho_init(nn.Linear(lstm_hidden, 1), 1.0)
        self.to(memory_format=torch.channels_last)

    def initial_state(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.lstm.num_layers, batch_size, self.lstm.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def recurrent(self, obs, prev_action, prev_reward, trial_start, state, resets):
        """Runs (T, B) sequences, zeroing the state before step t where resets[t] = 1 (prev_action -1: none)."""
        num_steps, batch = resets.shape
        x = self.encoder(obs.reshape(num_steps * batch, *obs.shape[2:]))
        one_hot = (prev_action.reshape(-1, 1) == torch.arange(self.num_actions, device=obs.device)).float()
        x = torch.cat([x, one_hot, prev_reward.reshape(-1, 1), trial_start.reshape(-1, 1)], dim=1)
        x = F.relu(self.embed(x)).view(num_steps, batch, -1)
        h, c = state
        outputs = []
        for t in range(num_steps):
            keep = (1.0 - resets[t]).view(1, -1, 1)  # a new meta-episode starts from a zero state
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


# ----------------------------------------------------------------------------- ALGO LOGIC: meta-episodes


class RL2Episode(NamedTuple):
    """One finished episode (trial): env, undiscounted return, length, level, trial index."""

    env: int
    ret: float
    length: int
    level: int
    trial: int


class MetaEpisodeVecEnv(ProcgenVecEnv):
    """ProcgenVecEnv whose envs replay their level (its saved first state) for `num_trials` episodes, then
    let Procgen draw a new one. `step` returns (obs, reward, meta_done, trial_done, finished): meta_done[i]
    = env i's next observation starts a new meta-episode (reset the recurrent state, do not bootstrap
    across it); trial_done[i] = a trial ended."""

    def __init__(self, num_trials: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_trials = num_trials
        self.trial = np.zeros(self.num_envs, dtype=np.int64)
        self.initial_states: list = []

    def reset(self) -> np.ndarray:
        obs = super().reset()
        self.trial[:] = 0
        self.initial_states = self.get_states()
        return obs

    def step(self, actions: np.ndarray):
        obs, reward, trial_done, finished = super().step(actions)
        finished = [RL2Episode(*episode, int(self.trial[episode.env])) for episode in finished]
        meta_done = np.zeros(self.num_envs, dtype=bool)
        if trial_done.any():
            states = self.get_states()
            replay = False
            for i in np.flatnonzero(trial_done):
                self.trial[i] += 1
                if self.trial[i] < self.num_trials:
                    states[i] = self.initial_states[i]  # same level, from its first frame
                    replay = True
                else:
                    self.trial[i] = 0
                    meta_done[i] = True
                    self.initial_states[i] = states[i]  # Procgen already reset env i to a new level
            if replay:
                obs = self.set_states(states)
        return obs, reward, meta_done, trial_done, finished

    def state_dict(self) -> dict:  # for --resume: also each env's trial and its level's first frame
        return {**super().state_dict(), "trial": torch.from_numpy(self.trial.copy()),
                "initial_states": [state_tensor(s) for s in self.initial_states]}

    def load_state_dict(self, state: dict) -> np.ndarray:
        obs = super().load_state_dict(state)
        self.trial[:] = state["trial"].numpy()
        self.initial_states = [bytes(t.numpy()) for t in state["initial_states"]]
        return obs


class SequenceBatch(NamedTuple):
    """One rollout as (T, N) sequences, one per env: what PPO over whole sequences reads."""

    obs: torch.Tensor  # (T, N, 64, 64, 3) uint8
    prev_actions: torch.Tensor  # (T, N) a_{t-1}, -1 at a meta-episode start
    prev_rewards: torch.Tensor  # (T, N) raw r_{t-1}, 0 at a meta-episode start
    trial_starts: torch.Tensor  # (T, N) 1 where a trial begins
    resets: torch.Tensor  # (T, N) 1 where the recurrent state is zeroed before step t
    initial_state: tuple  # (h, c), each (layers, N, hidden): the LSTM state before step 0
    actions: torch.Tensor  # (T, N) a_t
    logprobs: torch.Tensor  # (T, N) log pi_old(a_t | history)
    values: torch.Tensor  # (T, N) V_old(history)
    advantages: torch.Tensor  # (T, N) GAE A_t, across trials, cut at meta-episode ends
    returns: torch.Tensor  # (T, N) A_t + V_old: the value target


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
                gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a (T, N) rollout.

    `dones[t]` is 1 where the episode ended with transition t (so s_{t+1} belongs to a new
    episode and must not be bootstrapped); `last_value` is V(s_T) for the state after the rollout.
    Returns (advantages, returns) with returns = advantages + values.
    """
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_value = last_value
    last_gae = torch.zeros_like(last_value)
    for t in reversed(range(num_steps)):
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]  # TD error
        last_gae = delta + gamma * gae_lambda * nonterminal * last_gae  # A_t = delta_t + gamma lambda A_{t+1}
        advantages[t] = last_gae
        next_value = values[t]
    return advantages, advantages + values


class RL2Rollout:
    """(num_steps, num_envs) sequence storage plus the recurrent inputs carried from step to step."""

    def __init__(self, agent: RL2Agent, envs: VecNormalizeReward, device: torch.device, num_steps: int):
        n = envs.num_envs
        self.obs = torch.zeros((num_steps, n, 64, 64, 3), dtype=torch.uint8, device=device)
        self.actions = torch.zeros((num_steps, n), dtype=torch.long, device=device)
        self.prev_actions = torch.zeros((num_steps, n), dtype=torch.long, device=device)
        self.logprobs = torch.zeros((num_steps, n), device=device)
        self.rewards = torch.zeros((num_steps, n), device=device)
        self.dones = torch.zeros((num_steps, n), device=device)
        self.values = torch.zeros((num_steps, n), device=device)
        self.prev_rewards = torch.zeros((num_steps, n), device=device)
        self.trial_starts = torch.zeros((num_steps, n), device=device)
        self.resets = torch.zeros((num_steps, n), device=device)
        # What the next step will see: a fresh meta-episode everywhere.
        self.next_obs = torch.from_numpy(envs.reset()).to(device)
        self.prev_action = torch.full((n,), -1, dtype=torch.long, device=device)
        self.prev_reward = torch.zeros(n, device=device)
        self.trial_start = torch.ones(n, device=device)
        self.reset = torch.ones(n, device=device)
        self.state = agent.initial_state(n, device)

    CARRIED = ("next_obs", "prev_action", "prev_reward", "trial_start", "reset")

    def state_dict(self) -> dict:  # for --resume: what the next step will see
        return {**{name: getattr(self, name) for name in self.CARRIED}, "state": list(self.state)}

    def load_state_dict(self, state: dict) -> None:
        for name in self.CARRIED:
            setattr(self, name, state[name].to(self.next_obs.device))
        self.state = tuple(s.to(self.next_obs.device) for s in state["state"])

    def _inputs(self):
        return (self.next_obs[None], self.prev_action[None], self.prev_reward[None], self.trial_start[None],
                self.state, self.reset[None])

    @torch.inference_mode()
    def step(self, agent: RL2Agent, envs: VecNormalizeReward):
        """One step of every env: (action, log-prob, value, learning reward, meta_done, finished episodes)."""
        device = self.next_obs.device
        action, logprob, _, value, self.state = agent.get_action_and_value(*self._inputs())
        action = action[0]
        raw_obs, reward, meta_done, trial_done, finished = envs.step(action.cpu().numpy())
        meta_done = torch.from_numpy(meta_done).to(device)
        raw_reward = torch.from_numpy(envs.get_original_reward()).to(device)  # the LSTM sees raw rewards
        self.next_obs = torch.from_numpy(raw_obs).to(device)
        self.prev_action = torch.where(meta_done, -1, action)
        self.prev_reward = torch.where(meta_done, 0.0, raw_reward)
        self.trial_start = torch.from_numpy(trial_done.astype(np.float32)).to(device)
        self.reset = meta_done.float()
        return action, logprob[0], value[0], reward, meta_done, finished

    @torch.inference_mode()
    def collect(self, agent: RL2Agent, envs: VecNormalizeReward, args: Args) -> tuple[SequenceBatch, list]:
        """One rollout; returns the (T, N) batch (with GAE) and the finished episodes."""
        initial_state = tuple(s.clone() for s in self.state)
        finished_all = []
        for step in range(self.obs.shape[0]):
            self.obs[step] = self.next_obs
            self.prev_actions[step] = self.prev_action
            self.prev_rewards[step] = self.prev_reward
            self.trial_starts[step] = self.trial_start
            self.resets[step] = self.reset
            action, logprob, value, reward, meta_done, finished = self.step(agent, envs)
            self.actions[step] = action
            self.logprobs[step] = logprob
            self.values[step] = value
            self.rewards[step] = torch.from_numpy(reward)
            self.dones[step] = meta_done.float()  # returns run across trials, stop at meta-episode ends
            finished_all += finished
        last_value = agent.get_action_and_value(*self._inputs())[3][0]
        advantages, returns = compute_gae(self.rewards, self.values, self.dones, last_value, args.gamma,
                                          args.gae_lambda)
        batch = SequenceBatch(obs=self.obs, prev_actions=self.prev_actions, prev_rewards=self.prev_rewards,
                              trial_starts=self.trial_starts, resets=self.resets, initial_state=initial_state,
                              actions=self.actions, logprobs=self.logprobs, values=self.values,
                              advantages=advantages, returns=returns)
        return batch, finished_all


# ----------------------------------------------------------------------------- ALGO LOGIC: PPO over whole sequences


class PPOLoss(NamedTuple):
    loss: torch.Tensor
    pg_loss: torch.Tensor
    v_loss: torch.Tensor
    entropy: torch.Tensor


def ppo_loss(logratio: torch.Tensor, advantages: torch.Tensor, newvalue: torch.Tensor, returns: torch.Tensor,
             entropy: torch.Tensor, args: Args) -> PPOLoss:
    """PPO's objective on one minibatch (Schulman et al. 2017, eq. 9), in SB3's form."""
    ratio = logratio.exp()  # r = pi(a|s) / pi_old(a|s)
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    clipped_ratio = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(-advantages * ratio, -advantages * clipped_ratio).mean()  # -E[min(r A, clip(r) A)]
    v_loss = F.mse_loss(returns, newvalue)  # E[(R - V)^2]; SB3 has no 1/2 here
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss
    return PPOLoss(loss, pg_loss, v_loss, entropy_loss)


def sequence_minibatches(num_envs: int, num_minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Random disjoint groups of env indices: a minibatch replays each chosen env's whole sequence."""
    return list(torch.randperm(num_envs, generator=generator).chunk(num_minibatches))


def sequence_minibatch(batch: SequenceBatch, envs: torch.Tensor) -> SequenceBatch:
    """The whole sequences of the envs `envs` (columns of every (T, N) field; the state's batch axis)."""
    h0, c0 = batch.initial_state
    fields = {name: value[:, envs] for name, value in batch._asdict().items() if name != "initial_state"}
    return SequenceBatch(**fields, initial_state=(h0[:, envs], c0[:, envs]))


def ppo_update(agent: RL2Agent, optimizer: torch.optim.Optimizer, batch: SequenceBatch, args: Args,
               generator: torch.Generator) -> dict:
    """Clipped-surrogate PPO on (T, N) rollouts, minibatching over environments (whole sequences)."""
    stats = {"pg_loss": [], "v_loss": [], "entropy": [], "approx_kl": [], "clipfrac": []}
    stopped = False
    for _epoch in range(args.update_epochs):
        for envs in sequence_minibatches(args.num_envs, args.num_minibatches, generator):
            mb = sequence_minibatch(batch, envs)
            _, newlogprob, entropy, newvalue, _ = agent.get_action_and_value(
                mb.obs, mb.prev_actions, mb.prev_rewards, mb.trial_starts, mb.initial_state, mb.resets, mb.actions)
            logratio = newlogprob - mb.logprobs
            with torch.no_grad():  # statistics stay on the device: one host sync per minibatch (the KL check)
                approx_kl = ((logratio.exp() - 1) - logratio).mean()  # the k3 estimator (Schulman 2020)
                stats["approx_kl"].append(approx_kl)
                stats["clipfrac"].append(((logratio.exp() - 1.0).abs() > args.clip_coef).float().mean())
            if args.target_kl is not None and approx_kl.item() > 1.5 * args.target_kl:
                stopped = True  # SB3 early stopping: skip this minibatch and all that follow
                break
            terms = ppo_loss(logratio, mb.advantages, newvalue, mb.returns, entropy, args)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            stats["pg_loss"].append(terms.pg_loss.detach())
            stats["v_loss"].append(terms.v_loss.detach())
            stats["entropy"].append(terms.entropy.detach())
        if stopped:
            break
    out = {k: torch.stack(v).mean().item() if v else float("nan") for k, v in stats.items()}
    var_y = batch.returns.var()
    out["explained_variance"] = float("nan") if var_y == 0 else float(1 - (batch.returns - batch.values).var() / var_y)
    return out


# ----------------------------------------------------------------------------- ALGO LOGIC: the training loop


def make_agent(args: Args, device: torch.device) -> RL2Agent:
    agent = RL2Agent(NUM_ACTIONS, args.lstm_hidden, args.lstm_layers).to(device)
    agent.encoder.bf16 = use_bf16(args.precision, device)
    return agent


def train(args: Args, writer=None) -> RL2Agent:
    """RL2-PPO over meta-episodes on levels [start_level, start_level + num_levels)."""
    num_iterations, device, writer, own_dir, resume = setup(args, writer)
    stop = StopRequest()  # SIGINT/SIGTERM: finish the iteration, write a checkpoint, exit
    generator = torch.Generator().manual_seed(args.seed)
    train_tasks = list(range(args.start_level, args.start_level + args.num_levels))
    envs = MetaEpisodeVecEnv(args.num_trials, args.num_envs, args.env_id, args.num_levels, args.start_level,
                             args.distribution_mode, args.seed, args.env_threads)
    envs = VecNormalizeReward(envs, args.gamma, norm_reward=args.norm_reward)  # returns end at meta-episode ends
    agent = make_agent(args, device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    rollout = RL2Rollout(agent, envs, device, args.num_steps)
    ckpt_path = os.path.join(args.output_dir, CHECKPOINT)
    global_step, start_iteration = 0, 0
    if resume is not None:  # --resume: continue exactly where the checkpoint left off
        global_step, state = restore(resume, agent, optimizer, generator)
        start_iteration = state["iteration"]
        envs.load_state_dict(state["envs"])
        rollout.load_state_dict(state["rollout"])
    start_time, start_step = time.time(), global_step
    for iteration in range(start_iteration + 1, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
        batch, finished = rollout.collect(agent, envs, args)
        global_step += args.num_envs * args.num_steps
        stats = ppo_update(agent, optimizer, batch, args, generator)
        for k, tag in LOSS_TAGS.items():
            writer.add_scalar(f"losses/{tag}", stats[k], global_step)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        report(writer, "charts", iteration, num_iterations, global_step, (start_time, start_step), finished,
               args.num_trials)
        if iteration % args.save_every == 0 or iteration == num_iterations or stop:
            save_checkpoint(ckpt_path, SCRIPT, agent.state_dict(), optimizer, args, global_step, "rl2", train_tasks,
                            dict(iteration=iteration, generator=generator.get_state(), envs=envs.state_dict(),
                                 rollout=rollout.state_dict()))
        if stop:
            break
    stop.restore()
    envs.close()
    print(f"saved {ckpt_path}")
    if own_dir:
        writer.close()
        own_dir.close()  # releases the folder's lock
    if stop:
        stop.exit(args.output_dir, global_step)
    return agent


# ----------------------------------------------------------------------------- ALGO LOGIC: adaptation (no gradient)


@torch.inference_mode()
def evaluate(agent: RL2Agent, envs: VecNormalizeReward, num_episodes: int, device: torch.device) -> list:
    """Meta-episodes from a fresh recurrent state in the evaluation's own envs until each env has finished
    its share of `num_episodes` (EvalEpisodes; an env's episodes are its trials in order: 0, 1, 0, 1, ...)."""
    counted = EvalEpisodes(envs.num_envs, num_episodes)
    rollout = RL2Rollout(agent, envs, device, num_steps=0)  # resets the envs: every env starts a meta-episode
    while not counted.complete:
        finished = rollout.step(agent, envs)[-1]
        counted.add(finished)
    return counted.episodes


def adapt(args: Args, model_state: dict, level: int, writer=None,
          log_eval: Optional[Callable[[int, float, int], None]] = None, eval_every: Optional[int] = None,
          train_tasks: Optional[list] = None) -> None:
    """Test-time adaptation on one held-out level: meta-episodes as in training, no gradient step.
    `log_eval(env_step, mean_return, episodes)` gets the fresh-state evaluation at step 0, then every
    `eval_every` env steps (default: every rollout) and at the end the mean return of the rollout's
    episodes finished since the last point (none: a fresh-state evaluation again; docs/procgen.md)."""
    if args.eval_episodes < 1 or args.eval_num_envs < 1:
        raise SystemExit(f"error: --eval-episodes ({args.eval_episodes}) and --eval-num-envs ({args.eval_num_envs}) "
                         "must be at least 1")
    num_iterations, device, writer, own_dir, resume = setup(args, writer)
    stop = StopRequest()
    agent = make_agent(args, device)
    agent.load_state_dict(model_state)
    agent.eval()
    ckpt_path = os.path.join(args.output_dir, CHECKPOINT)

    def fresh_state_evaluation() -> list:  # its own envs on the level, every env from a new meta-episode
        eval_envs = MetaEpisodeVecEnv(args.num_trials, args.eval_num_envs, args.env_id, 1, level,
                                      args.distribution_mode, args.seed + 1, args.env_threads)
        episodes = evaluate(agent, VecNormalizeReward(eval_envs, args.gamma, norm_reward=False), args.eval_episodes,
                            device)
        eval_envs.close()
        return episodes

    if log_eval is not None and resume is None:
        episodes = fresh_state_evaluation()
        report(writer, "eval", 0, num_iterations, 0, (time.time(), 0), episodes, args.num_trials)
        log_eval(0, float(np.mean([e.ret for e in episodes])), len(episodes))
    envs = MetaEpisodeVecEnv(args.num_trials, args.num_envs, args.env_id, 1, level, args.distribution_mode, args.seed,
                             args.env_threads)
    envs = VecNormalizeReward(envs, args.gamma, norm_reward=False)
    rollout = RL2Rollout(agent, envs, device, args.num_steps)
    global_step, start_iteration = 0, 0
    eval_every = eval_every or args.num_envs * args.num_steps
    next_eval = eval_every
    pending = []  # adaptation episodes finished since the last point
    if resume is not None:  # --resume: the rollout where it stopped (the weights never change)
        global_step, state = restore(resume, agent)
        start_iteration, next_eval = state["iteration"], state["next_eval"]
        pending = [RL2Episode(*episode) for episode in state["pending"]]
        envs.load_state_dict(state["envs"])
        rollout.load_state_dict(state["rollout"])
    start_time, start_step = time.time(), global_step
    for iteration in range(start_iteration + 1, num_iterations + 1):
        _, finished = rollout.collect(agent, envs, args)
        global_step += args.num_envs * args.num_steps
        report(writer, "eval", iteration, num_iterations, global_step, (start_time, start_step), finished,
               args.num_trials)
        pending += finished
        if log_eval is not None and (global_step >= next_eval or iteration == num_iterations):
            episodes = pending or fresh_state_evaluation()
            log_eval(global_step, float(np.mean([e.ret for e in episodes])), len(episodes))
            pending = []
            next_eval = global_step + eval_every
        if iteration % args.save_every == 0 or iteration == num_iterations or stop:
            save_checkpoint(ckpt_path, SCRIPT, model_state, None, args, global_step, "rl2", train_tasks or [level],
                            dict(iteration=iteration, next_eval=next_eval, pending=[list(e) for e in pending],
                                 envs=envs.state_dict(), rollout=rollout.state_dict()))
        if stop:
            break
    stop.restore()
    envs.close()
    if own_dir:
        writer.close()
        own_dir.close()  # releases the folder's lock
    if stop:
        stop.exit(args.output_dir, global_step)


# ----------------------------------------------------------------------------- TRY NOT TO MODIFY: plumbing


def check_args(args: Args) -> int:
    """Every flag error as one line, before anything is created; returns the number of iterations."""
    if args.num_envs < 1 or args.num_steps < 1:
        raise SystemExit(f"error: --num-envs ({args.num_envs}) and --num-steps ({args.num_steps}) must be at least 1")
    if args.num_minibatches < 1 or args.num_envs % args.num_minibatches:
        raise SystemExit(f"error: --num-envs ({args.num_envs}) must be divisible by --num-minibatches "
                         f"({args.num_minibatches}): RL2 minibatches are whole env sequences")
    if args.num_trials < 1:
        raise SystemExit("error: --num-trials must be at least 1")
    if args.lstm_layers < 1 or args.lstm_hidden < 1:
        raise SystemExit(f"error: --lstm-layers ({args.lstm_layers}) and --lstm-hidden ({args.lstm_hidden}) "
                         "must be at least 1")
    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    if num_iterations < 1:
        raise SystemExit(f"error: --total-timesteps {args.total_timesteps} is less than one rollout "
                         f"({batch_size} steps)")
    if args.save_every < 1:
        raise SystemExit(f"error: --save-every must be at least 1 iteration (got {args.save_every})")
    if not args.learning_rate > 0 or args.update_epochs < 1:
        raise SystemExit(f"error: --learning-rate must be above 0 and --update-epochs at least 1 "
                         f"(got {args.learning_rate}, {args.update_epochs})")
    if args.resume and args.output_dir is None:
        raise SystemExit("error: --resume needs --output-dir: the directory of the run to continue")
    check_levels(args.start_level, args.num_levels, args.distribution_mode, args.seed)
    check_env_id(args.env_id)
    return num_iterations


def setup(args: Args, writer):
    """Checks the flags, opens the output directory (a script run: never over another run, locked for
    this process; finetune.py's Run does both for its own `writer`), seeds, and loads the checkpoint
    to resume from; returns (num_iterations, device, writer, the folder's lock or None, checkpoint or None)."""
    num_iterations = check_args(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", run_name)
    if writer is None:
        check_output_dir(args.output_dir, args.resume)
    resume = load_resume(args.output_dir, SCRIPT, dataclasses.asdict(args)) if args.resume else None
    own_dir = open_output_dir(args.output_dir) if writer is None else None
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    writer = writer or make_writer(args, run_name, resume["global_step"] if resume else None)
    return num_iterations, device, writer, own_dir, resume


def report(writer, prefix: str, iteration: int, num_iterations: int, global_step: int, start: tuple[float, int],
           finished: list, num_trials: int) -> None:
    """TensorBoard and stdout: the finished episodes' mean return, overall and per trial index (SPS since `start`)."""
    sps = int((global_step - start[1]) / max(time.time() - start[0], 1e-9))
    writer.add_scalar("charts/SPS", sps, global_step)
    returns = [episode.ret for episode in finished]
    per_trial = []
    if returns:
        writer.add_scalar(f"{prefix}/episodic_return", np.mean(returns), global_step)
        writer.add_scalar(f"{prefix}/episodic_length", np.mean([episode.length for episode in finished]), global_step)
        for k in range(num_trials):
            trial_returns = [episode.ret for episode in finished if episode.trial == k]
            if trial_returns:
                writer.add_scalar(f"{prefix}/trial_{k}_return", np.mean(trial_returns), global_step)
                per_trial.append(f"trial{k}={np.mean(trial_returns):.2f}")
    mean_ret = f"{np.mean(returns):.2f}" if returns else "n/a"
    print(f"iter {iteration}/{num_iterations} step={global_step} episodic_return={mean_ret} {' '.join(per_trial)} "
          f"({len(returns)} episodes) SPS={sps}", flush=True)


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_float32_matmul_precision("high")
    train(args)

"""Reptile around PPO on Procgen CoinRun (Nichol et al. 2018; Mandi, Abbeel & James 2022).

The "Reptile" pretraining of Mandi, Abbeel & James, "On the Effectiveness of Fine-tuning Versus
Meta-reinforcement Learning" (NeurIPS 2022), Sec. 5.1, with Reptile from Nichol, Achiam &
Schulman, "On First-Order Meta-Learning Algorithms" (2018), Sec. 3. Each outer step samples one
training level, runs `--reptile-k` PPO iterations with all environments on that level (the inner
loop, weights theta -> phi), then moves the meta-weights toward the result:
theta <- theta + eps * (phi - theta), with eps scheduled linearly from `--reptile-eps-start` to
`--reptile-eps-end` over the outer steps. The checkpoint holds theta, which `finetune.py`
fine-tunes with plain PPO (ppo_mt_procgen.train) like an MT one.

    python ppo_reptile_procgen.py --num-levels 1000

The story, top to bottom: Args, the network, the rollout buffer and GAE, the PPO loss and
update (all as in ppo_mt_procgen.py), the Reptile step, the training loop. Plumbing and the
speed tricks come last. The environment and the run's flags (`RunArgs`) are `envs/procgen.py`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from envs.procgen import (LOSS_TAGS, NUM_ACTIONS, ProcgenVecEnv, RunArgs, RunningMeanStd, VecNormalizeReward,
                          check_env_id, check_levels, make_writer, save_checkpoint, seed_everything)
from envs.run_dir import (CHECKPOINT, StopRequest, check_output_dir, load_resume, open_output_dir, restore,
                          use_bf16)

SCRIPT = "ppo_reptile_procgen"  # the module name checkpoints record (finetune.py checks it)


@dataclass
class Args(RunArgs):  # + the run's own flags (output, --resume, checkpoints, logging, device)
    exp_name: str = "ppo_reptile_procgen"
    """the name of this experiment (part of the default run directory's name)"""
    seed: int = 1
    """seed of Python, numpy, torch and the environments"""
    # Environment: the paper's CoinRun cross-level setting.
    env_id: str = "coinrun"
    """the Procgen game (the paper: coinrun)"""
    distribution_mode: Literal["easy", "hard", "extreme", "memory", "exploration"] = "hard"
    """Procgen's level distribution (the paper and the authors: hard)"""
    num_levels: int = 1000
    """training levels (the paper reports 100, 1000 and 10000); 0 means unlimited"""
    start_level: int = 0
    """first training level; held-out test levels start at 10000"""
    env_threads: Optional[int] = None
    """procgen's threads stepping the envs (default: one per CPU core; procgen's own default is 4).
    A machine setting, never taken from a checkpoint (benchmarks/README.md)"""

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
    """steps per environment in one rollout (authors' n_steps: 256)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 32
    """minibatches per epoch: 256 x 256 / 32 = 2048 samples each (authors' batch_size: 2048)"""
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
    """scale rewards by a running std of the discounted return (openai/train-procgen's VecNormalize)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """convolutions in bfloat16 autocast (heads, losses and optimizer stay fp32); auto = bf16 where
    the hardware runs it natively (recent CUDA GPUs, CPUs with AVX512-BF16/AMX), else fp32"""

    # Reptile. The authors' code writes theta <- phi + e * (theta - phi), i.e. eps = 1 - e, with
    # e annealed 1 -> 0: the effective eps goes 0 -> 1, which these defaults reproduce. Nichol
    # et al.'s standard Reptile anneals the outer step size the other way, 1.0 -> 0.0.
    reptile_k: int = 3
    """PPO iterations in the inner loop on one sampled level (authors: ppo.reptile_k=3)"""
    reptile_eps_start: float = 0.0
    """outer step size eps at the first outer step (0.0 reproduces the authors' schedule)"""
    reptile_eps_end: float = 1.0
    """outer step size eps at the last outer step (1.0 reproduces the authors' schedule)"""


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


class Agent(nn.Module):
    """IMPALA-CNN features shared by a policy head (logits over 15 actions) and a value head."""

    def __init__(self, num_actions: int = NUM_ACTIONS):
        super().__init__()
        self.encoder = ortho_init(ImpalaEncoder(), np.sqrt(2))
        self.actor = ortho_init(nn.Linear(256, num_actions), 0.01)
        self.critic = ortho_init(nn.Linear(256, 1), 1.0)
        self.to(memory_format=torch.channels_last)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.encoder(obs)).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor, action: Optional[torch.Tensor] = None):
        """Samples a ~ pi(.|s) unless `action` is given; returns a, log pi(a|s), entropy, V(s)."""
        hidden = self.encoder(obs)
        log_probs = self.actor(hidden).log_softmax(-1)
        if action is None:
            action = torch.multinomial(log_probs.exp(), 1).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return action, log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1), entropy, self.critic(hidden).squeeze(-1)


# ----------------------------------------------------------------------------- ALGO LOGIC: rollouts and GAE


class Batch(NamedTuple):
    """One rollout, flattened to B = num_steps x num_envs samples: what the PPO update reads."""

    obs: torch.Tensor  # (B, 64, 64, 3) uint8
    actions: torch.Tensor  # (B,) a_t
    logprobs: torch.Tensor  # (B,) log pi_old(a_t | s_t)
    values: torch.Tensor  # (B,) V_old(s_t)
    advantages: torch.Tensor  # (B,) GAE A_t
    returns: torch.Tensor  # (B,) A_t + V_old(s_t): the value target


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


class RolloutBuffer:
    """(num_steps, num_envs) rollout storage; observations stay uint8 (4x less memory traffic)."""

    def __init__(self, num_steps: int, num_envs: int, device: torch.device):
        self.obs = torch.zeros((num_steps, num_envs, 64, 64, 3), dtype=torch.uint8, device=device)
        self.actions = torch.zeros((num_steps, num_envs), dtype=torch.long, device=device)
        self.logprobs = torch.zeros((num_steps, num_envs), device=device)
        self.rewards = torch.zeros((num_steps, num_envs), device=device)
        self.dones = torch.zeros((num_steps, num_envs), device=device)
        self.values = torch.zeros((num_steps, num_envs), device=device)

    @torch.inference_mode()
    def collect(self, policy: RolloutPolicy, envs: VecNormalizeReward, next_obs: torch.Tensor, args: Args):
        """Fill the buffer with one rollout; returns (next_obs, batch, finished episodes)."""
        finished_all = []
        for step in range(self.obs.shape[0]):
            self.obs[step] = next_obs
            action, logprob, _, value = policy(next_obs)
            self.actions[step] = action
            self.logprobs[step] = logprob
            self.values[step] = value
            raw_obs, reward, done, finished = envs.step(action.cpu().numpy())  # reward: normalised
            self.rewards[step] = torch.from_numpy(reward)
            self.dones[step] = torch.from_numpy(done.astype(np.float32))
            next_obs = torch.from_numpy(raw_obs).to(self.obs.device)
            finished_all += finished
        last_value = policy.agent.get_value(next_obs)
        advantages, returns = compute_gae(self.rewards, self.values, self.dones, last_value, args.gamma,
                                          args.gae_lambda)
        batch = Batch(obs=self.obs.reshape(-1, 64, 64, 3), actions=self.actions.reshape(-1),
                      logprobs=self.logprobs.reshape(-1), values=self.values.reshape(-1),
                      advantages=advantages.reshape(-1), returns=returns.reshape(-1))
        return next_obs, batch, finished_all


# ----------------------------------------------------------------------------- ALGO LOGIC: the PPO update


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


def ppo_update(agent: Agent, optimizer: torch.optim.Optimizer, batch: Batch, args: Args,
               generator: torch.Generator) -> dict:
    """Clipped-surrogate PPO over flat (B, ...) tensors for `update_epochs` epochs."""
    batch_size = batch.obs.shape[0]
    minibatch_size = batch_size // args.num_minibatches
    stats = {"pg_loss": [], "v_loss": [], "entropy": [], "approx_kl": [], "clipfrac": []}
    stopped = False
    for _epoch in range(args.update_epochs):
        order = torch.randperm(batch_size, generator=generator)
        for start in range(0, minibatch_size * args.num_minibatches, minibatch_size):
            mb = Batch(*(field[order[start:start + minibatch_size]] for field in batch))
            _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb.obs, mb.actions)
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


# ----------------------------------------------------------------------------- ALGO LOGIC: the Reptile step


def reptile_eps(outer_step: int, num_outer_steps: int, eps_start: float, eps_end: float) -> float:
    """Linear schedule over outer steps 0 .. num_outer_steps - 1 (start at the first, end at the last)."""
    if num_outer_steps <= 1:
        return eps_start
    return eps_start + (eps_end - eps_start) * outer_step / (num_outer_steps - 1)


@torch.no_grad()
def reptile_step(meta: dict[str, torch.Tensor], agent: nn.Module, eps: float) -> None:
    """theta <- theta + eps * (phi - theta) for every floating-point tensor, then agent <- theta."""
    phi = agent.state_dict()
    for name, theta in meta.items():
        if theta.is_floating_point():
            theta.add_(phi[name] - theta, alpha=eps)  # theta + eps * (phi - theta)
        else:
            theta.copy_(phi[name])
    agent.load_state_dict(meta)


# ----------------------------------------------------------------------------- ALGO LOGIC: the training loop


def train(args: Args, agent: Optional[Agent] = None, writer=None) -> Agent:
    """Reptile-PPO over levels [start_level, start_level + num_levels)."""
    if args.num_levels < 1 or args.reptile_k < 1:
        raise SystemExit("error: Reptile needs --num-levels >= 1 (a finite level set to sample from) "
                         "and --reptile-k >= 1")
    num_iterations, device, writer, own_dir, resume = setup(args, writer)
    stop = StopRequest()  # SIGINT/SIGTERM: finish the iteration, write a checkpoint, exit
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_tasks = list(range(args.start_level, args.start_level + args.num_levels))
    agent = (agent if agent is not None else Agent()).to(device)
    agent.encoder.bf16 = use_bf16(args.precision, device)
    # One Adam for the inner loops; its moments carry over between levels, as in Nichol et al.'s code.
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    ret_rms = RunningMeanStd()  # one reward scale across all levels' envs
    buffer = RolloutBuffer(args.num_steps, args.num_envs, device)
    policy = RolloutPolicy(agent, args.num_envs, device)  # reptile_step loads theta in place: the graph stays valid
    ckpt_path = os.path.join(args.output_dir, CHECKPOINT)
    num_outer = -(-num_iterations // args.reptile_k)

    global_step, first_outer, inner = 0, 0, None
    if resume is not None:  # --resume: theta, and (stopped inside an outer step) phi and the level's envs
        global_step, state = restore(resume, agent, optimizer, generator)
        rng.bit_generator.state, first_outer, inner = state["level_rng"], state["outer"], state["inner"]
        ret_rms.load_state_dict(state["ret_rms"])
    meta = {k: v.detach().clone() for k, v in agent.state_dict().items()}  # theta
    start_time, start_step = time.time(), global_step
    for outer in range(first_outer, num_outer):
        level = inner["level"] if inner else int(rng.choice(train_tasks))
        # All envs play the sampled level; a new level means a new ProcgenEnv (its level set is fixed).
        envs = ProcgenVecEnv(args.num_envs, args.env_id, 1, level, args.distribution_mode, args.seed + outer,
                             args.env_threads)
        envs = VecNormalizeReward(envs, args.gamma, norm_reward=args.norm_reward, ret_rms=ret_rms)
        next_obs = torch.from_numpy(envs.reset()).to(device)
        done = 0
        if inner:  # a resumed run continues this outer step's inner loop where it stopped
            agent.load_state_dict(inner["phi"])
            next_obs = torch.from_numpy(envs.load_state_dict(inner["envs"])).to(device)
            done, inner = inner["done"], None
        num_inner = min(args.reptile_k, num_iterations - outer * args.reptile_k)
        for j in range(done, num_inner):  # the inner loop: theta -> phi
            iteration = outer * args.reptile_k + j + 1
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
            next_obs, batch, finished = buffer.collect(policy, envs, next_obs, args)
            global_step += args.num_envs * args.num_steps
            stats = ppo_update(agent, optimizer, batch, args, generator)
            log_iteration(writer, iteration, num_iterations, global_step, (start_time, start_step), finished, stats,
                          optimizer.param_groups[0]["lr"])
            if stop and j + 1 < num_inner:  # stopped inside the inner loop: keep phi and the envs too
                save_checkpoint(ckpt_path, SCRIPT, meta, optimizer, args, global_step, "reptile", train_tasks,
                                resume_state(generator, rng, ret_rms, outer, dict(
                                    level=level, done=j + 1, phi=agent.state_dict(), envs=envs.state_dict())))
                break
        envs.close()
        if stop and j + 1 < num_inner:
            break
        eps = reptile_eps(outer, num_outer, args.reptile_eps_start, args.reptile_eps_end)
        reptile_step(meta, agent, eps)  # the outer step
        writer.add_scalar("charts/reptile_eps", eps, global_step)
        writer.add_scalar("charts/reptile_level", level, global_step)
        if (outer + 1) % max(1, args.save_every // args.reptile_k) == 0 or outer == num_outer - 1 or stop:
            save_checkpoint(ckpt_path, SCRIPT, meta, optimizer, args, global_step, "reptile", train_tasks,
                            resume_state(generator, rng, ret_rms, outer + 1, None))
        if stop:
            break

    stop.restore()
    print(f"saved {ckpt_path}")
    if own_dir:
        writer.close()
        own_dir.close()  # releases the folder's lock
    if stop:
        stop.exit(args.output_dir, global_step)
    return agent


def resume_state(generator: torch.Generator, rng: np.random.Generator, ret_rms: RunningMeanStd, outer: int,
                 inner: Optional[dict]) -> dict:
    """What --resume needs beyond theta and the optimizer: the next outer step, the random generators,
    the reward scale and, when stopped inside an outer step, its level, progress, phi and envs."""
    return dict(outer=outer, generator=generator.get_state(), level_rng=rng.bit_generator.state,
                ret_rms=ret_rms.state_dict(), inner=inner)


# ----------------------------------------------------------------------------- TRY NOT TO MODIFY: plumbing


def check_args(args: Args) -> int:
    """Every flag error as one line, before anything is created; returns the number of iterations."""
    if args.num_envs < 1 or args.num_steps < 1:
        raise SystemExit(f"error: --num-envs ({args.num_envs}) and --num-steps ({args.num_steps}) must be at least 1")
    batch_size = args.num_envs * args.num_steps
    if args.num_minibatches < 1 or batch_size % args.num_minibatches:
        raise SystemExit(f"error: --num-envs x --num-steps ({batch_size}) must be divisible by --num-minibatches "
                         f"({args.num_minibatches})")
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


def log_iteration(writer, iteration: int, num_iterations: int, global_step: int, start: tuple[float, int],
                  finished: list, stats: dict, lr: float) -> None:
    """Training episodes and losses to TensorBoard under CleanRL's tags, and one line to stdout.
    `start`: (time, env step) when this process began training (SPS counts its own steps)."""
    sps = int((global_step - start[1]) / max(time.time() - start[0], 1e-9))
    returns = [episode.ret for episode in finished]
    if returns:
        writer.add_scalar("charts/episodic_return", np.mean(returns), global_step)
        writer.add_scalar("charts/episodic_length", np.mean([episode.length for episode in finished]), global_step)
    writer.add_scalar("charts/learning_rate", lr, global_step)
    for k, tag in LOSS_TAGS.items():
        writer.add_scalar(f"losses/{tag}", stats[k], global_step)
    writer.add_scalar("charts/SPS", sps, global_step)
    mean_ret = f"{np.mean(returns):.2f}" if returns else "n/a"
    print(f"iter {iteration}/{num_iterations} step={global_step} episodic_return={mean_ret} "
          f"({len(returns)} episodes) SPS={sps}", flush=True)


# ----------------------------------------------------------------------------- SPEED: faster forms of plain steps


class RolloutPolicy:
    """The rollout's action step, `agent.get_action_and_value(obs)` without gradients. On CUDA it is
    replayed from a CUDA graph: IMPALA's forward for 256 observations is about 60 small kernels, and
    launching them one by one, not the GPU, set the pace (benchmarks/README.md, Procgen). The graph
    reads the parameters in place, so it sees every optimizer step without being captured again.
    The returned tensors are overwritten by the next call. Off CUDA it is the plain call."""

    def __init__(self, agent: Agent, num_envs: int, device: torch.device):
        self.agent = agent
        self.graph = None
        if device.type != "cuda":
            return
        self.obs = torch.zeros((num_envs, 64, 64, 3), dtype=torch.uint8, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):  # warm-up off the main stream (cuDNN/cuBLAS handles, workspaces)
                agent.get_action_and_value(self.obs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.out = agent.get_action_and_value(self.obs)

    def __call__(self, obs: torch.Tensor):
        if self.graph is None:
            with torch.inference_mode():
                return self.agent.get_action_and_value(obs)
        self.obs.copy_(obs)
        self.graph.replay()
        return self.out


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_float32_matmul_precision("high")
    train(args)

"""Multi-task PPO on Procgen CoinRun: one agent trained jointly on many levels.

The "MT" pretraining of Mandi, Abbeel & James, "On the Effectiveness of Fine-tuning Versus
Meta-reinforcement Learning" (NeurIPS 2022), Sec. 5.1: PPO (Schulman et al. 2017) with an
IMPALA-CNN trained on `--num-levels` CoinRun levels (100, 1000 or 10000 in the paper). The same
`train` fine-tunes a checkpoint on one held-out level (`finetune.py` imports `train` and `Agent`),
with a separate evaluation on that level. Settings follow the authors' Stable-Baselines3
configuration (docs/procgen.md, "Choices").

    python ppo_mt_procgen.py --num-levels 1000
    python finetune.py --checkpoint runs/.../checkpoint.pt --task 10000

The story, top to bottom: Args, the network (IMPALA-CNN, policy and value heads), the rollout
buffer and GAE, the PPO loss and update, the evaluation on the held-out level, the training loop.
Plumbing (seeding, logging, checkpoints) and the speed tricks (a CUDA graph for the rollout's
policy step, bf16 convolutions) come last. The environment and the run's flags (`RunArgs`: output,
--resume, checkpoints, logging) are `envs/procgen.py`.
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
                          check_env_id, check_levels, make_writer, save_checkpoint, seed_everything)
from envs.run_dir import (CHECKPOINT, StopRequest, check_output_dir, load_resume, open_output_dir, restore,
                          use_bf16)

SCRIPT = "ppo_mt_procgen"  # the module name checkpoints record (finetune.py checks it)


@dataclass
class Args(RunArgs):  # + the run's own flags (output, --resume, checkpoints, logging, device)
    exp_name: str = "ppo_mt_procgen"
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

    # Evaluation on the held-out level (fine-tuning runs; the authors' launch script:
    # procgen.eval.num_envs=50, learn.n_eval_episodes=100, learn.eval_freq=1).
    eval_episodes: int = 100
    """episodes per evaluation point on the held-out level (authors: 100)"""
    eval_num_envs: int = 50
    """parallel envs of the evaluation's own ProcgenEnv (authors: 50)"""


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


# ----------------------------------------------------------------------------- evaluation on the held-out level


@torch.inference_mode()
def evaluate(policy: RolloutPolicy, envs: ProcgenVecEnv, start_states: list, num_episodes: int,
             device: torch.device) -> list:
    """One evaluation point: every env of the evaluation's own ProcgenEnv restarts from the level's
    first frame, and the current policy acts as in training (sampled actions) until each env has
    finished its share of `num_episodes` (EvalEpisodes). Returns the counted episodes."""
    counted = EvalEpisodes(envs.num_envs, num_episodes)
    obs = envs.set_states(start_states, fresh_episodes=True)
    while not counted.complete:
        action = policy(torch.from_numpy(obs).to(device))[0]
        obs, _, _, finished = envs.step(action.cpu().numpy())
        counted.add(finished)
    return counted.episodes


# ----------------------------------------------------------------------------- ALGO LOGIC: the training loop


def train(args: Args, agent: Optional[Agent] = None, method: str = "mt", train_tasks: Optional[list] = None,
          writer=None, log_eval: Optional[Callable[[int, float, int], None]] = None, eval_every: Optional[int] = None,
          eval_level: Optional[int] = None) -> Agent:
    """PPO on levels [start_level, start_level + num_levels). Used for MT pretraining, and by
    finetune.py (one level, a pretrained or fresh `agent`). With `log_eval`, the policy is
    evaluated on `eval_level` (default: --start-level) in its own envs at env step 0, every
    `eval_every` env steps (default: every iteration, as the authors) and at the end, and
    `log_eval(env_step, mean_return, episodes)` receives each point."""
    if log_eval is not None and (args.eval_episodes < 1 or args.eval_num_envs < 1):
        raise SystemExit(f"error: --eval-episodes ({args.eval_episodes}) and --eval-num-envs ({args.eval_num_envs}) "
                         "must be at least 1")
    num_iterations, device, writer, own_dir, resume = setup(args, writer)
    stop = StopRequest()  # SIGINT/SIGTERM: finish the iteration, write a checkpoint, exit
    generator = torch.Generator().manual_seed(args.seed)
    if train_tasks is None:
        train_tasks = list(range(args.start_level, args.start_level + args.num_levels))
    envs = ProcgenVecEnv(args.num_envs, args.env_id, args.num_levels, args.start_level, args.distribution_mode,
                         args.seed, args.env_threads)
    envs = VecNormalizeReward(envs, args.gamma, norm_reward=args.norm_reward)
    agent = (agent if agent is not None else Agent()).to(device)
    agent.encoder.bf16 = use_bf16(args.precision, device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    buffer = RolloutBuffer(args.num_steps, args.num_envs, device)
    policy = RolloutPolicy(agent, args.num_envs, device)
    ckpt_path = os.path.join(args.output_dir, CHECKPOINT)

    next_eval = None
    if log_eval is not None:  # the held-out level in its own ProcgenEnv: training never steps it
        eval_level = args.start_level if eval_level is None else eval_level
        eval_envs = ProcgenVecEnv(args.eval_num_envs, args.env_id, 1, eval_level, args.distribution_mode,
                                  args.seed + 1, args.env_threads)
        eval_envs.reset()
        eval_start = eval_envs.get_states()  # every evaluation restarts from here
        eval_policy = RolloutPolicy(agent, args.eval_num_envs, device)
        eval_every = eval_every or args.num_envs * args.num_steps
        next_eval = eval_every

    def evaluate_and_log(step: int) -> None:
        episodes = evaluate(eval_policy, eval_envs, eval_start, args.eval_episodes, device)
        log_eval(step, float(np.mean([e.ret for e in episodes])), len(episodes))

    global_step, start_iteration = 0, 0
    next_obs = torch.from_numpy(envs.reset()).to(device)
    if resume is not None:  # --resume: continue exactly where the checkpoint left off
        global_step, state = restore(resume, agent, optimizer, generator)
        start_iteration, next_eval = state["iteration"], state["next_eval"]
        next_obs = torch.from_numpy(envs.load_state_dict(state["envs"])).to(device)
    elif log_eval is not None:
        evaluate_and_log(0)  # the zero-shot point, before any update
    start_time, start_step = time.time(), global_step
    for iteration in range(start_iteration + 1, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
        next_obs, batch, finished = buffer.collect(policy, envs, next_obs, args)
        global_step += args.num_envs * args.num_steps
        stats = ppo_update(agent, optimizer, batch, args, generator)
        log_iteration(writer, iteration, num_iterations, global_step, (start_time, start_step), finished, stats,
                      optimizer.param_groups[0]["lr"])
        if log_eval is not None and (global_step >= next_eval or iteration == num_iterations):
            evaluate_and_log(global_step)
            next_eval = global_step + eval_every
        if iteration % args.save_every == 0 or iteration == num_iterations or stop:
            save_checkpoint(ckpt_path, SCRIPT, agent.state_dict(), optimizer, args, global_step, method, train_tasks,
                            dict(iteration=iteration, generator=generator.get_state(), envs=envs.state_dict(),
                                 next_eval=next_eval))
        if stop:
            break

    stop.restore()
    envs.close()
    if log_eval is not None:
        eval_envs.close()
    print(f"saved {ckpt_path}")
    if own_dir:
        writer.close()
        own_dir.close()  # releases the folder's lock
    if stop:
        stop.exit(args.output_dir, global_step)
    return agent


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

"""Multi-task PPO on Procgen CoinRun: one agent trained jointly on many levels.

The "MT" pretraining of Mandi, Abbeel & James (2022), Sec. 5.1: PPO with an IMPALA-CNN
trained on `--num-levels` CoinRun levels (100, 1000 or 10000 in the paper), later
fine-tuned on a held-out level by `finetune.py`, which imports `train` and `Agent` from
this file. Settings follow the authors' Stable-Baselines3 configuration (DESIGN.md).

    python ppo_mt_procgen.py --num-levels 1000
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
    exp_name: str = "ppo_mt_procgen"
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
    """training levels (the paper reports 100, 1000 and 10000); 0 means unlimited"""
    start_level: int = 0
    """first training level; held-out test levels start at 10000"""
    env_threads: Optional[int] = None
    """procgen's threads stepping the envs (default: one per CPU core; procgen's own default is 4).
    On a 16-core GPU machine, 16 threads halved the env time of a 256-env rollout (README)"""

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
    """256 x 256 / 32 = minibatches of 2048 samples"""
    update_epochs: int = 3
    norm_adv: bool = True
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: Optional[float] = 0.01
    """stop the epoch loop once a minibatch's approx KL exceeds 1.5 x this (SB3's rule)"""
    norm_reward: bool = True
    """scale rewards by a running std of the discounted return (openai/train-procgen's VecNormalize)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """convolutions in bfloat16 autocast (heads, losses and optimizer stay fp32); auto = bf16 where
    the hardware runs it natively (recent CUDA GPUs, CPUs with AVX512-BF16/AMX), else fp32"""


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
        # no autocast cache: each weight is cast once per pass anyway, and a cache must stay off
        # while a CUDA graph is captured (RolloutPolicy)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            x = self.stages(x)
            x = F.relu(self.fc(F.relu(x).flatten(1)))
        return x.float()


class Agent(nn.Module):
    def __init__(self, num_actions: int = NUM_ACTIONS):
        super().__init__()
        self.encoder = ImpalaEncoder()
        self.actor = layer_init(nn.Linear(256, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(256, 1), std=1.0)
        self.to(memory_format=torch.channels_last)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.encoder(obs)).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor, action: Optional[torch.Tensor] = None):
        hidden = self.encoder(obs)
        logits = self.actor(hidden)
        log_probs = logits.log_softmax(-1)
        if action is None:
            action = torch.multinomial(log_probs.exp(), 1).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return action, log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1), entropy, self.critic(hidden).squeeze(-1)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve --precision: bf16 only where the hardware has native bfloat16 arithmetic."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ----------------------------------------------------------------------------- PPO


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


def ppo_update(agent: Agent, optimizer: torch.optim.Optimizer, batch: dict, args: Args, generator: torch.Generator) -> dict:
    """Clipped-surrogate PPO over flat (B, ...) tensors for `update_epochs` epochs."""
    batch_size = batch["obs"].shape[0]
    minibatch_size = batch_size // args.num_minibatches
    stats = {"pg_loss": [], "v_loss": [], "entropy": [], "approx_kl": [], "clipfrac": []}
    stopped = False
    for _epoch in range(args.update_epochs):
        order = torch.randperm(batch_size, generator=generator)
        for start in range(0, minibatch_size * args.num_minibatches, minibatch_size):
            mb = order[start:start + minibatch_size]
            _, newlogprob, entropy, newvalue = agent.get_action_and_value(batch["obs"][mb], batch["actions"][mb])
            logratio = newlogprob - batch["logprobs"][mb]
            ratio = logratio.exp()
            with torch.no_grad():  # statistics stay on the device: one host sync per minibatch (the KL check), not five
                approx_kl = ((ratio - 1) - logratio).mean()  # the k3 estimator (Schulman 2020)
                stats["approx_kl"].append(approx_kl)
                stats["clipfrac"].append(((ratio - 1.0).abs() > args.clip_coef).float().mean())
            if args.target_kl is not None and approx_kl.item() > 1.5 * args.target_kl:
                stopped = True  # SB3 early stopping: skip this minibatch and all that follow
                break
            mb_adv = batch["advantages"][mb]
            if args.norm_adv:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
            v_loss = 0.5 * ((newvalue - batch["returns"][mb]) ** 2).mean()
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
    y_pred, y_true = batch["values"], batch["returns"]
    var_y = y_true.var()
    out["explained_variance"] = float("nan") if var_y == 0 else float(1 - (y_true - y_pred).var() / var_y)
    return out


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str, agent: nn.Module, optimizer: torch.optim.Optimizer, args: Args, global_step: int,
                    method: str, train_tasks: list) -> None:
    """Atomic save (temp file + rename) of plain values and tensors only (weights_only-loadable)."""
    ckpt = {
        "format": "finetune-vs-meta-rl",
        "format_version": 1,
        "module": "ppo_mt_procgen",
        "benchmark": "procgen",
        "method": method,
        "train_tasks": [int(t) for t in train_tasks],
        "args": dataclasses.asdict(args),
        "global_step": int(global_step),
        "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- training loop

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


class RolloutPolicy:
    """The rollout's action step, `agent.get_action_and_value(obs)` without gradients. On CUDA it is
    replayed from a CUDA graph: IMPALA's forward for 256 observations is about 60 small kernels, and
    launching them one by one, not the GPU, set the pace (README, Procgen: GPU speed). The graph
    reads the parameters in place, so it sees every optimizer step without being captured again.
    The returned tensors are overwritten by the next call."""

    def __init__(self, agent: Agent, num_envs: int, device: torch.device):
        self.agent, self.graph = agent, None
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


class RolloutBuffer:
    """(num_steps, num_envs) rollout storage; observations stay uint8 (4x less memory traffic)."""

    def __init__(self, num_steps: int, num_envs: int, device: torch.device):
        self.obs = torch.zeros((num_steps, num_envs, 64, 64, 3), dtype=torch.uint8, device=device)
        self.actions = torch.zeros((num_steps, num_envs), dtype=torch.long, device=device)
        self.logprobs, self.rewards, self.dones, self.values = (
            torch.zeros((num_steps, num_envs), device=device) for _ in range(4))

    @torch.inference_mode()
    def collect(self, policy: RolloutPolicy, envs: ProcgenVecEnv, next_obs: torch.Tensor, normalize, args: Args):
        """Fill the buffer with one rollout; returns (next_obs, batch, finished episodes)."""
        finished_all = []
        for step in range(self.obs.shape[0]):
            self.obs[step] = next_obs
            action, logprob, _, value = policy(next_obs)
            self.actions[step], self.logprobs[step], self.values[step] = action, logprob, value
            raw_obs, reward, done, finished = envs.step(action.cpu().numpy())
            if normalize is not None:
                reward = normalize(reward, done)
            self.rewards[step] = torch.from_numpy(reward)
            self.dones[step] = torch.from_numpy(done.astype(np.float32))
            next_obs = torch.from_numpy(raw_obs).to(self.obs.device)
            finished_all += finished
        advantages, returns = compute_gae(self.rewards, self.values, self.dones, policy.agent.get_value(next_obs),
                                          args.gamma, args.gae_lambda)
        batch = {"obs": self.obs.reshape(-1, 64, 64, 3), "actions": self.actions.reshape(-1),
                 "logprobs": self.logprobs.reshape(-1), "advantages": advantages.reshape(-1),
                 "returns": returns.reshape(-1), "values": self.values.reshape(-1)}
        return next_obs, batch, finished_all


def log_iteration(writer, iteration: int, num_iterations: int, global_step: int, start_time: float, finished: list,
                  stats: dict, lr: float) -> None:
    sps = int(global_step / (time.time() - start_time))
    returns = [ret for _env, ret, _len, _level in finished]
    if returns:
        writer.add_scalar("charts/episodic_return", np.mean(returns), global_step)
        writer.add_scalar("charts/episodic_length", np.mean([n for _e, _r, n, _l in finished]), global_step)
    writer.add_scalar("charts/learning_rate", lr, global_step)
    for k, tag in LOSS_TAGS.items():
        writer.add_scalar(f"losses/{tag}", stats[k], global_step)
    writer.add_scalar("charts/SPS", sps, global_step)
    mean_ret = f"{np.mean(returns):.2f}" if returns else "n/a"
    print(f"iter {iteration}/{num_iterations} step={global_step} episodic_return={mean_ret} "
          f"({len(returns)} episodes) SPS={sps}", flush=True)


def setup(args: Args, writer):
    """Checks the budget flags, seeds, and opens the output directory; returns
    (num_iterations, device, writer, owns_writer)."""
    if args.num_envs < 1 or args.num_steps < 1:
        raise SystemExit(f"error: --num-envs ({args.num_envs}) and --num-steps ({args.num_steps}) must be at least 1")
    batch_size = args.num_envs * args.num_steps
    if args.num_minibatches < 1 or batch_size % args.num_minibatches:
        raise SystemExit(f"error: --num-envs x --num-steps ({batch_size}) must be divisible by --num-minibatches ({args.num_minibatches})")
    num_iterations = args.total_timesteps // batch_size
    if num_iterations < 1:
        raise SystemExit(f"error: --total-timesteps {args.total_timesteps} is less than one rollout ({batch_size} steps)")
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", run_name)
    os.makedirs(args.output_dir, exist_ok=True)
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    return num_iterations, device, writer or make_writer(args, run_name), writer is None


def train(args: Args, agent: Optional[Agent] = None, method: str = "mt", train_tasks: Optional[list] = None,
          writer=None, log_eval: Optional[Callable[[int, float], None]] = None, eval_every: Optional[int] = None) -> Agent:
    """PPO on levels [start_level, start_level + num_levels). Used for MT pretraining, and by
    finetune.py (one level, a pretrained or fresh `agent`, `log_eval` receiving the mean
    episodic return every `eval_every` env steps, default every iteration)."""
    num_iterations, device, writer, own_writer = setup(args, writer)
    generator = torch.Generator().manual_seed(args.seed)
    if train_tasks is None:
        train_tasks = list(range(args.start_level, args.start_level + args.num_levels))
    envs = ProcgenVecEnv(args.num_envs, args.env_id, args.num_levels, args.start_level, args.distribution_mode, args.seed,
                         args.env_threads)
    agent = (agent if agent is not None else Agent()).to(device)
    agent.encoder.bf16 = use_bf16(args.precision, device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    normalize = RewardNormalizer(args.num_envs, args.gamma) if args.norm_reward else None
    buffer = RolloutBuffer(args.num_steps, args.num_envs, device)
    policy = RolloutPolicy(agent, args.num_envs, device)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")

    global_step, start_time, next_eval = 0, time.time(), eval_every or 0
    pending_returns: list[float] = []  # episodes finished since the last evaluation report
    next_obs = torch.from_numpy(envs.reset()).to(device)
    for iteration in range(1, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
        next_obs, batch, finished = buffer.collect(policy, envs, next_obs, normalize, args)
        global_step += args.num_envs * args.num_steps
        stats = ppo_update(agent, optimizer, batch, args, generator)
        log_iteration(writer, iteration, num_iterations, global_step, start_time, finished, stats,
                      optimizer.param_groups[0]["lr"])

        pending_returns += [ret for _env, ret, _len, _level in finished]
        if log_eval is not None and pending_returns and (global_step >= next_eval or iteration == num_iterations):
            log_eval(global_step, float(np.mean(pending_returns)))
            pending_returns, next_eval = [], global_step + (eval_every or 0)
        if iteration % args.save_every == 0 or iteration == num_iterations:
            save_checkpoint(ckpt_path, agent, optimizer, args, global_step, method, train_tasks)

    envs.close()
    print(f"saved {ckpt_path}")
    if own_writer:
        writer.close()
    return agent


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_float32_matmul_precision("high")
    train(args)

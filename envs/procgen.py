"""Procgen CoinRun for the three PPO scripts, as CleanRL takes its environments from gym wrappers.

- `ProcgenVecEnv`: procgen's vectorised `ProcgenEnv` with numpy uint8 frames (N, 64, 64, 3) and
  episode bookkeeping (return, length and level of every episode that ends).
- `VecNormalizeReward`: the reward half of a `VecNormalize` wrapper (SB3, openai/baselines):
  rewards divided by a running standard deviation of the discounted return, then clipped.
- `EvalEpisodes`: which episodes an evaluation on several envs counts (SB3's `evaluate_policy` rule).
- At the end, the scripts' plumbing: seeding, the TensorBoard writer, the checkpoint file.

procgen still imports the unmaintained `gym` package; `import_procgen` keeps its banner out of
sight. Nothing here depends on the learning method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
from typing import NamedTuple, Optional

import numpy as np
import torch

from envs.run_dir import atomic_save, rng_state

NUM_ACTIONS = 15  # Procgen's full action set; CoinRun uses all 15 ids.


def import_procgen():
    """procgen still imports the unmaintained `gym`, which prints a banner; keep it out of sight."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import procgen
    return procgen


def check_env_id(env_id: str) -> None:
    """One-line error for an unknown game (procgen itself would abort the interpreter)."""
    import_procgen()
    from procgen.env import ENV_NAMES

    if env_id not in ENV_NAMES:
        raise SystemExit(f"error: unknown Procgen game '{env_id}'; choose one of {', '.join(ENV_NAMES)}")


MAX_LEVEL = 2**31  # procgen's level seeds and rand_seed are 32-bit signed integers


def check_levels(start_level: int, num_levels: int, distribution_mode: str = "hard", seed: int = 0) -> None:
    """One-line errors for level and seed flags procgen would reject with an AssertionError or a C++
    abort: levels [start_level, start_level + num_levels) must stay within [0, 2**31)."""
    if not 0 <= start_level < MAX_LEVEL:
        raise SystemExit(f"error: --start-level must be in [0, 2**31) (got {start_level})")
    if not 0 <= num_levels <= MAX_LEVEL - start_level:
        raise SystemExit(f"error: --num-levels must be in [0, 2**31 - start level] = [0, {MAX_LEVEL - start_level}] "
                         f"(got {num_levels}; 0 means unlimited)")
    if distribution_mode == "exploration":
        raise SystemExit("error: --distribution-mode exploration fixes its own level (procgen), which these scripts' "
                         "--start-level/--num-levels cannot; choose easy, hard, extreme or memory")
    if not 0 <= seed <= 2**30:
        raise SystemExit(f"error: --seed must be in [0, 2**30] (got {seed}): procgen seeds are 32-bit and the "
                         "scripts add small offsets (evaluation envs, Reptile's levels)")


def state_tensor(state: bytes):
    """One env's procgen state (bytes) as a uint8 tensor: a checkpoint stays weights_only-loadable."""
    import torch

    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


class Episode(NamedTuple):
    """One finished episode: which env played it, its undiscounted return, length and level."""

    env: int
    ret: float
    length: int
    level: int


class ProcgenVecEnv:
    """ProcgenEnv with numpy uint8 observations (N, 64, 64, 3) and episode bookkeeping.

    `step` returns (obs, reward, done, finished) where `finished` lists an `Episode` for every
    episode that just ended. Procgen resets finished environments itself; `obs` is then the new
    episode's first frame. `get_states`/`set_states` save and restore every env's full state
    (procgen's own get_state/set_state), e.g. to start an evaluation from the level's first frame.
    """

    def __init__(self, num_envs: int, env_id: str, num_levels: int, start_level: int, distribution_mode: str, seed: int,
                 threads: Optional[int] = None):
        procgen = import_procgen()
        check_env_id(env_id)
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
            level = int(infos[i]["prev_level_seed"])
            finished.append(Episode(int(i), float(self.returns[i]), int(self.lengths[i]), level))
        self.returns[done] = 0
        self.lengths[done] = 0
        self.level_seeds[:] = [info["level_seed"] for info in infos]
        return obs["rgb"], reward.astype(np.float32), done, finished

    def get_states(self) -> list:
        """Every env's full state (bytes), including its random generator."""
        return list(self.env.env.callmethod("get_state"))

    def set_states(self, states: list, fresh_episodes: bool = False) -> np.ndarray:
        """Restore `states` (one per env) and return the observations there. With
        `fresh_episodes`, the episode counters restart too (the states are episode starts)."""
        self.env.env.callmethod("set_state", states)
        _, obs, _ = self.env.env.observe()
        self.level_seeds[:] = [info["level_seed"] for info in self.env.env.get_info()]
        if fresh_episodes:
            self.returns[:] = 0
            self.lengths[:] = 0
        return obs["rgb"].copy()

    def state_dict(self) -> dict:
        """Everything `load_state_dict` needs to continue exactly here (a resumed run): every env's
        procgen state (its level, frame and random generator) and the episode bookkeeping."""
        import torch

        return {"states": [state_tensor(s) for s in self.get_states()],
                "returns": torch.from_numpy(self.returns.copy()), "lengths": torch.from_numpy(self.lengths.copy())}

    def load_state_dict(self, state: dict) -> np.ndarray:
        """Restore what `state_dict` saved; returns the observations there."""
        if len(state["states"]) != self.num_envs:
            raise SystemExit(f"error: the checkpoint holds {len(state['states'])} env states for {self.num_envs} envs")
        obs = self.set_states([bytes(t.numpy()) for t in state["states"]])
        self.returns[:] = state["returns"].numpy()
        self.lengths[:] = state["lengths"].numpy()
        return obs

    def close(self):
        self.env.close()


class RunningMeanStd:
    """Running mean and variance of a stream of batches (the parallel update of Chan et al.)."""

    def __init__(self, epsilon: float = 1e-8):
        self.mean, self.var, self.count = 0.0, 1.0, epsilon

    def state_dict(self) -> dict:
        return {"mean": float(self.mean), "var": float(self.var), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]

    def update(self, batch: np.ndarray) -> None:
        batch_mean, batch_var, n = batch.mean(), batch.var(), len(batch)
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total


class VecNormalizeReward:
    """The reward part of `VecNormalize(venv, norm_obs=False)` (SB3; openai/baselines, which
    openai/train-procgen uses for Procgen): wraps a vectorised env and divides each reward by the
    running std of the discounted return G <- gamma * G + r (per env, G restarts where `done`),
    then clips to [-clip, clip]. `get_original_reward()` gives the last step's raw rewards.

    `step` passes through whatever the wrapped env returns, (obs, reward, done, ...), with the
    reward replaced; `done` (the third value) is where discounted returns end. With
    `norm_reward=False` rewards pass unchanged. Pass `ret_rms` to keep one running statistic
    across several wrapped envs (Reptile builds a new env for every sampled level).
    """

    def __init__(self, venv, gamma: float, norm_reward: bool = True, clip: float = 10.0, epsilon: float = 1e-8,
                 ret_rms: Optional[RunningMeanStd] = None):
        self.venv, self.gamma, self.norm_reward, self.clip, self.epsilon = venv, gamma, norm_reward, clip, epsilon
        self.ret_rms = ret_rms if ret_rms is not None else RunningMeanStd(epsilon)
        self.returns = np.zeros(venv.num_envs, dtype=np.float64)
        self.original_reward = np.zeros(venv.num_envs, dtype=np.float32)

    def normalize(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + reward  # discounted return so far, per env
        self.ret_rms.update(self.returns)
        self.returns[done] = 0.0
        return np.clip(reward / np.sqrt(self.ret_rms.var + self.epsilon), -self.clip, self.clip).astype(np.float32)

    def step(self, actions: np.ndarray):
        obs, reward, done, *rest = self.venv.step(actions)
        self.original_reward = reward
        if self.norm_reward:
            reward = self.normalize(reward, done)
        return (obs, reward, done, *rest)

    def state_dict(self) -> dict:
        """The wrapped env's state, the running statistic and every env's discounted return so far."""
        import torch

        return {"venv": self.venv.state_dict(), "ret_rms": self.ret_rms.state_dict(),
                "returns": torch.from_numpy(self.returns.copy()),
                "original_reward": torch.from_numpy(np.asarray(self.original_reward, dtype=np.float32).copy())}

    def load_state_dict(self, state: dict) -> np.ndarray:
        obs = self.venv.load_state_dict(state["venv"])
        self.ret_rms.load_state_dict(state["ret_rms"])
        self.returns = state["returns"].numpy().copy()
        self.original_reward = state["original_reward"].numpy().copy()
        return obs

    def get_original_reward(self) -> np.ndarray:
        return self.original_reward

    def reset(self) -> np.ndarray:
        self.returns[:] = 0
        return self.venv.reset()

    def __getattr__(self, name):  # everything else is the wrapped env's (num_envs, level_seeds, close, ...)
        return getattr(self.venv, name)


class EvalEpisodes:
    """Which episodes an evaluation of `num_episodes` on `num_envs` parallel envs counts.

    All envs start an episode together; env i counts its first (num_episodes + i) // num_envs
    episodes (SB3's `evaluate_policy` rule; the targets sum to num_episodes) and later ones are
    ignored. Counting each env's first episodes, rather than the first num_episodes episodes to
    finish anywhere, keeps the estimate unbiased: short episodes finish first, and stopping at
    the first num_episodes endings would over-represent them.
    """

    def __init__(self, num_envs: int, num_episodes: int):
        self.targets = np.array([(num_episodes + i) // num_envs for i in range(num_envs)], dtype=np.int64)
        self.counts = np.zeros(num_envs, dtype=np.int64)
        self.episodes: list = []  # the counted episodes, in the order they finished

    def add(self, finished: list) -> None:
        for episode in finished:
            if self.counts[episode[0]] < self.targets[episode[0]]:
                self.counts[episode[0]] += 1
                self.episodes.append(episode)

    @property
    def complete(self) -> bool:
        return bool((self.counts >= self.targets).all())

    @property
    def returns(self) -> list[float]:
        return [episode[1] for episode in self.episodes]


# ----------------------------------------------------------------------------- running a PPO script: plumbing
# shared by the three scripts, not the algorithm (TensorBoard, seeding, the checkpoint file)

# TensorBoard tags of ppo_update's statistics
LOSS_TAGS = {"pg_loss": "policy_loss", "v_loss": "value_loss", "entropy": "entropy", "approx_kl": "approx_kl",
             "clipfrac": "clipfrac", "explained_variance": "explained_variance"}


@dataclasses.dataclass
class RunArgs:
    """The flags of a PPO run that are not the method's: device, logging, where it writes, checkpoints, --resume.
    Each script's Args extends it (its --help lists them all)."""

    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to Weights & Biases (wandb is imported only when set)"""
    wandb_project_name: str = "finetune-vs-meta-rl"
    """the wandb project, with --track"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team), with --track"""
    output_dir: Optional[str] = None
    """where checkpoint.pt and TensorBoard logs go (default runs/{run_name})"""
    save_every: int = 50
    """iterations between periodic checkpoints (at least 1; ppo_reptile_procgen.py rounds it down to whole outer
    steps); SIGINT/SIGTERM also write one, then stop"""
    resume: bool = False
    """continue the run in --output-dir (required) from its checkpoint.pt up to the same budget, with the run's
    flags again: everything the script needs to go on as if uninterrupted (README, "Stopping and resuming a run")"""


def seed_everything(seed: int, deterministic: bool) -> None:
    """Python's, numpy's and torch's global generators from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


def make_writer(args, run_name: str, resume_step: Optional[int] = None):
    """TensorBoard in --output-dir; a resumed run (`resume_step`: its checkpoint's step, whose events
    were all logged before the save) drops events logged after it and continues the same curve."""
    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(args.output_dir, purge_step=None if resume_step is None else resume_step + 1)
    if resume_step is None:
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return writer


def save_checkpoint(path: str, script: str, model: dict, optimizer: Optional[torch.optim.Optimizer], args,
                    global_step: int, method: str, train_tasks: list, resume: dict) -> None:
    """Atomic save (this process's temporary file, then a rename) of plain values and tensors only
    (weights_only-loadable). `script`: the module that wrote it; `model`: the state dict finetune.py adapts;
    `resume`: what --resume needs beyond it, the optimizer and the random states (the loop's counters, env
    states, ...)."""
    ckpt = {
        "format": "finetune-vs-meta-rl",
        "format_version": 1,
        "module": script,
        "benchmark": "procgen",
        "method": method,
        "train_tasks": [int(t) for t in train_tasks],
        "args": dataclasses.asdict(args),
        "global_step": int(global_step),
        "model": model,
        "optimizer": optimizer.state_dict() if optimizer is not None else {},  # RL2's adaptation has none
        "rng": rng_state(),
        "resume": resume,
    }
    atomic_save(ckpt, path)

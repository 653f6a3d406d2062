"""Atari for the study: ALE with the DER preprocessing, the paper's game sets, the multi-game env.

    from envs.atari import make_env, MultiGameEnv, FIVE_GAMES
    env = make_env("Pong", seed=1)                 # one game, life loss ends a learning episode
    env = MultiGameEnv(FIVE_GAMES, seed=1)         # a random game of the set at every game over

The three Rainbow scripts (rainbow_{mt,reptile,pearl}_atari.py) import this module, as
CleanRL's rainbow_atari.py imports its Atari wrappers. Preprocessing as DER (van Hasselt et
al. 2019) and the authors' Kaixhin/Rainbow fork (MandiZhao/Rainbow, env_mt.py):

- no sticky actions (`repeat_action_probability = 0`);
- frame skip 4, the observation the max of the last two frames;
- 84x84 grayscale (area resize of the 210x160 screen), a stack of the last 4 frames;
- up to 30 no-ops after a reset;
- for learning a lost life ends the episode (`terminated=True`; the next `reset` continues the
  same game with one no-op); evaluation (`episodic_life=False`) plays to the real game over;
- pretrained agents see 18 actions in every game: indices past a game's own minimal action set
  play NOOP (`pad_action`), as the authors' padded action space.

The env talks to ale-py's `ALEInterface` directly (faster than `gym.make` plus wrappers) and
keeps Gymnasium's `reset`/`step` API. The frame stack restarts with zeros at every episode start,
life loss included, which is what the replay buffers rebuild. Rewards come back unclipped (the
scripts clip them for learning); `info["episode"]` holds the real game's return and length at
game over. `get_state` / `set_state` hold everything the next steps depend on (the emulator,
the generators, the frame stack), so that a checkpoint can resume a run exactly.

The last section is not the environment but the plumbing the three scripts share to run: flag
checks, seeds, the output folder, checkpoints, replay files, the background evaluation.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import json
import os
import random
import re
import signal
import sys
import time
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from envs import run_dir

# the paper's game sets (Sec. 5.3; authors' main_mt.py GAME_SETS '5-task' and '10-task')
FIVE_GAMES = ("Breakout", "DemonAttack", "Robotank", "BankHeist", "Solaris")
TEN_GAMES = FIVE_GAMES + ("Alien", "Seaquest", "Asteroids", "Krull", "Frostbite")
TEST_GAMES = ("Pong", "Assault", "BattleZone", "MsPacman", "BeamRider")  # the held-out games
FULL_ACTIONS = 18  # ALE's full action set; pretrained agents pad every game to it


# --------------------------------------------------------------------------- game names


def find_rom_id(game: str) -> str | None:
    """'MsPacman' / 'ms_pacman' / 'ALE/MsPacman-v5' -> 'ms_pacman' when ale-py has that ROM, else None."""
    name = re.sub(r"^ALE/(\w+)-v\d+$", r"\1", game)  # ALE/Pong-v5 -> Pong; Meta-World's xxx-v3 stays
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        return None
    rid = name if name.islower() else re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    try:
        from ale_py import roms
    except ImportError:
        return None
    return rid if rid in roms.get_all_rom_ids() else None


def rom_id(game: str) -> str:
    """ale-py's ROM id of a game; exits with one line for unknown games."""
    rid = find_rom_id(game)
    if rid is None:
        sys.exit(f"error: unknown Atari game '{game}' (expected an ALE game name such as Pong or MsPacman)")
    return rid


def game_set(train_games: int, games: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """The training games: `games` if given, else the paper's 5- or 10-game set; one-line errors."""
    if games:
        chosen = list(games)
    elif train_games in (5, 10):
        chosen = list(FIVE_GAMES if train_games == 5 else TEN_GAMES)
    else:
        sys.exit(f"error: --train-games must be 5 or 10 (got {train_games}); or give --games")
    for game in chosen:
        rom_id(game)
    return chosen


def num_game_actions(game: str) -> int:
    """Size of the game's own (minimal) action set, e.g. 6 for Pong."""
    import ale_py
    from ale_py import roms

    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.loadROM(roms.get_rom_path(rom_id(game)))
    return len(ale.getMinimalActionSet())


def pad_action(action: int, num_legal: int) -> int:
    """Index into the game's minimal action set; padded indices play NOOP (index 0)."""
    return action if action < num_legal else 0


# --------------------------------------------------------------------------- one game


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an area (box-filter) resize along one axis."""
    m = np.zeros((n_out, n_in), np.float32)
    scale = n_in / n_out
    for i in range(n_out):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(int(lo), min(int(np.ceil(hi)), n_in)):
            m[i, j] = min(hi, j + 1) - max(lo, j)
    return m / scale


class AtariEnv(gym.Env):
    """One ALE game with the DER preprocessing (module docstring). Observations: uint8 (4, 84, 84)."""

    def __init__(self, game: str, seed: int = 0, num_actions: int | None = None, episodic_life: bool = True,
                 max_noops: int = 30, frame_skip: int = 4, max_episode_steps: int = 27_000):
        import ale_py
        from ale_py import roms

        self.game = game
        self.ale = ale_py.ALEInterface()
        self.ale.setLoggerMode(ale_py.LoggerMode.Error)
        self.ale.setInt("random_seed", seed % (2**31))
        self.ale.setFloat("repeat_action_probability", 0.0)  # DER: no sticky actions
        self.ale.loadROM(roms.get_rom_path(rom_id(game)))
        self.action_set = self.ale.getMinimalActionSet()
        self.num_actions = num_actions or len(self.action_set)
        self.action_space = gym.spaces.Discrete(self.num_actions)
        self.observation_space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
        self.episodic_life = episodic_life
        self.max_noops = max_noops
        self.frame_skip = frame_skip
        self.max_episode_steps = max_episode_steps
        self.rng = np.random.default_rng(seed)
        # the resize runs in torch, which keeps to its thread setting; numpy's BLAS would start
        # threads that spin on the other core after every frame
        self._rows = torch.from_numpy(_area_matrix(210, 84))
        self._cols = torch.from_numpy(_area_matrix(160, 84).T)
        self._screens = np.zeros((2, 210, 160), np.uint8)
        self.frames = np.zeros((4, 84, 84), np.uint8)
        self.lives, self.game_return, self.game_length = 0, 0.0, 0
        self.needs_game_reset = True

    def _frame(self) -> np.ndarray:
        pooled = torch.from_numpy(self._screens.max(0)).float()  # max over the last two screens
        return (self._rows @ pooled @ self._cols).round_().to(torch.uint8).numpy()

    def _push(self, frame: np.ndarray) -> np.ndarray:
        self.frames[:-1] = self.frames[1:]
        self.frames[-1] = frame
        return self.frames.copy()

    def reset(self, *, seed: int | None = None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        if self.needs_game_reset:
            self.ale.reset_game()
            self.lives, self.game_return, self.game_length = self.ale.lives(), 0.0, 0
            for _ in range(self.rng.integers(0, self.max_noops + 1)):
                self.ale.act(self.action_set[0])
                if self.ale.game_over():
                    self.ale.reset_game()
            self.needs_game_reset = False
        else:  # continue after a lost life
            self.ale.act(self.action_set[0])
        self.ale.getScreenGrayscale(self._screens[0])
        self._screens[1] = self._screens[0]
        self.frames[:] = 0
        return self._push(self._frame()), {}

    def step(self, action: int):
        ale_action = self.action_set[pad_action(int(action), len(self.action_set))]
        reward = 0.0
        for k in range(self.frame_skip):
            reward += self.ale.act(ale_action)
            if k >= self.frame_skip - 2:  # keep the last two screens for the max-pool
                self.ale.getScreenGrayscale(self._screens[k - self.frame_skip + 2])
            if self.ale.game_over():
                break
        self.game_return += reward
        self.game_length += 1
        game_over = self.ale.game_over()
        lives = self.ale.lives()
        life_lost = self.episodic_life and 0 < lives < self.lives
        self.lives = lives
        truncated = self.game_length >= self.max_episode_steps and not game_over
        info = {}
        if game_over or truncated:
            self.needs_game_reset = True
            info["episode"] = {"r": self.game_return, "l": self.game_length}
        return self._push(self._frame()), reward, game_over or life_lost, truncated, info

    def get_state(self) -> dict:
        """The emulator (with its random state), the no-op generator, the last screens, the frame
        stack and the episode counters, as tensors and plain values (a weights_only checkpoint)."""
        ale_state = self.ale.cloneState(include_rng=True).__getstate__()[0]
        return {"ale": torch.frombuffer(bytearray(ale_state), dtype=torch.uint8), "rng": _generator_state(self.rng),
                "screens": torch.from_numpy(self._screens.copy()), "frames": torch.from_numpy(self.frames.copy()),
                "lives": int(self.lives), "game_return": float(self.game_return), "game_length": int(self.game_length),
                "needs_game_reset": bool(self.needs_game_reset)}

    def set_state(self, state: dict) -> None:
        """Continue exactly where `get_state` was taken (the same game, in another process too)."""
        import ale_py

        ale_state = ale_py.ALEState.__new__(ale_py.ALEState)  # unpickled, as pickle would
        ale_state.__setstate__((state["ale"].numpy().tobytes(),))
        self.ale.restoreState(ale_state)
        _set_generator_state(self.rng, state["rng"])
        self._screens[:] = state["screens"].numpy()
        self.frames[:] = state["frames"].numpy()
        self.lives, self.game_return, self.game_length = state["lives"], state["game_return"], state["game_length"]
        self.needs_game_reset = state["needs_game_reset"]


def _generator_state(rng: np.random.Generator) -> str:
    """A numpy Generator's state as a string (its 128-bit integers stay exact)."""
    return json.dumps(rng.bit_generator.state)


def _set_generator_state(rng: np.random.Generator, state: str) -> None:
    rng.bit_generator.state = json.loads(state)


def make_env(game: str, seed: int, num_actions: int | None = None, episodic_life: bool = True,
             max_noops: int = 30, max_episode_steps: int = 27_000) -> AtariEnv:
    """One game; `num_actions` 18 pads its action set, None keeps the game's own."""
    return AtariEnv(game, seed, num_actions, episodic_life, max_noops, max_episode_steps=max_episode_steps)


# --------------------------------------------------------------------------- several games


class MultiGameEnv(gym.Env):
    """Several games behind one env: at every real game over (or truncation) the next reset picks
    a game at random; after a lost life it continues the same game. `game` is the index (into
    `games`) of the game the next step plays, i.e. which replay buffer its transition belongs to.
    Game g's emulator is seeded with seed + 1000 g; the choice of game with `seed`."""

    def __init__(self, games: list[str] | tuple[str, ...], seed: int, num_actions: int | None = None,
                 max_noops: int = 30, max_episode_steps: int = 27_000):
        self.games = list(games)
        self.envs = [make_env(name, seed + 1000 * g, num_actions, True, max_noops, max_episode_steps)
                     for g, name in enumerate(self.games)]
        self.action_space = self.envs[0].action_space
        self.observation_space = self.envs[0].observation_space
        self.rng = np.random.default_rng(seed)
        self.game = int(self.rng.integers(len(self.games)))

    def reset(self, *, seed: int | None = None, options=None):
        if self.envs[self.game].needs_game_reset:  # a new game, not a lost life: pick one at random
            self.game = int(self.rng.integers(len(self.games)))
        return self.envs[self.game].reset()

    def step(self, action: int):
        return self.envs[self.game].step(action)

    def get_state(self) -> dict:
        """Every game's `AtariEnv.get_state`, the game being played and the generator that picks them."""
        return {"rng": _generator_state(self.rng), "game": self.game, "envs": [env.get_state() for env in self.envs]}

    def set_state(self, state: dict) -> None:
        _set_generator_state(self.rng, state["rng"])
        self.game = state["game"]
        for env, env_state in zip(self.envs, state["envs"], strict=True):
            env.set_state(env_state)


# --------------------------------------------------------------------------- the evaluation protocol


def evaluate_policy(policy: Callable[[np.ndarray], int], game: str, args, num_actions: int, seed: int) -> list[float]:
    """DER's evaluation (van Hasselt et al. 2019; the authors' --eval_eps 0.001): `args.eval_episodes`
    episodes of `game` played to the real game over (no life loss), capped at `args.eval_max_steps` agent
    steps, a random action with probability `args.eval_epsilon`, else `policy(obs)`. Returns the
    unclipped scores."""
    env = make_env(game, seed, num_actions, False, args.max_noops, args.eval_max_steps)
    rng = np.random.default_rng(seed)
    returns = []
    for _ in range(args.eval_episodes):
        obs, _ = env.reset()
        while True:
            action = rng.integers(num_actions) if rng.random() < args.eval_epsilon else policy(obs)
            obs, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                returns.append(info["episode"]["r"])
                break
    return returns


# --------------------------------------------------------------------------- TRY NOT TO MODIFY: running a DER script
# Plumbing shared by the three scripts (rainbow_{mt,reptile,pearl}_atari.py), not the algorithm: flag
# checks, seeds, the output folder, checkpoints, the replay file and the background evaluation.

CHECKPOINT_FORMAT = "finetune-vs-meta-rl"  # must equal finetune.CHECKPOINT_FORMAT
REPLAY = "replay.npz"  # the replay buffers, beside checkpoint.pt: what --resume needs to continue the same run
REPLAY_FIELDS = ("frames", "actions", "rewards", "dones", "timesteps")  # a ReplayBuffer's per-entry arrays
# settings a resumed run may change: the machine's, and where, how often and under which name it saves
RESUME_FREE = run_dir.RESUME_FREE | {"exp_name", "save_replay_every"}


@dataclasses.dataclass
class RunArgs:
    """The flags of a DER run that are not the method's: where it writes, --resume, checkpoints, logging. Each
    script's Args extends it (its --help lists them all)."""

    cuda: bool = False
    """use the GPU if there is one"""
    track: bool = False
    """log to Weights & Biases (wandb is imported only then)"""
    wandb_project_name: str = "finetune-vs-meta-rl"
    """the wandb project, with --track"""
    output_dir: str | None = None
    """TensorBoard logs and checkpoint.pt go here (default runs/{run_name})"""
    resume: bool = False
    """continue the run in --output-dir (required; pass the run's flags again) from its checkpoint.pt and
    replay.npz; without replay.npz the replay starts empty and refills for --learning-starts env steps
    before learning resumes; an older replay.npz is used with its end taken as an episode end; a complete
    run says so and exits (status 0)"""
    save_every: int = 100_000
    """write checkpoint.pt every this many env steps, at the end, and on SIGINT/SIGTERM (then stop)"""
    save_replay_every: int = 100_000
    """also write replay.npz (compressed: 5-40 MB per 100k frames) every this many env steps and on
    SIGINT/SIGTERM, with a checkpoint; deleted when the run completes"""


def check_der_args(args, num_games: int, at_least_one: tuple[str, ...] = ()) -> None:
    """The checks every DER script shares, and that the script's `at_least_one` flags are (one-line errors)."""
    for name in ("total_timesteps", "batch_size", "n_step", "target_network_frequency", "save_every",
                 "save_replay_every", "eval_episodes", "eval_max_steps", "torch_threads", "hidden_size",
                 "max_episode_steps") + at_least_one:
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    for name in ("learning_rate", "adam_eps", "max_grad_norm"):  # a cap <= 0 would zero or flip the gradients
        if not getattr(args, name) > 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be above 0 (got {getattr(args, name)})")
    for name in ("learning_starts", "max_noops"):
        if getattr(args, name) < 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 0 (got {getattr(args, name)})")
    for name in ("gamma", "eval_epsilon", "priority_weight"):
        if not 0 <= getattr(args, name) <= 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be between 0 and 1 (got {getattr(args, name)})")
    if args.num_atoms < 2 or args.v_min >= args.v_max:
        sys.exit(f"error: the return support needs --num-atoms >= 2 and --v-min < --v-max "
                 f"(got {args.num_atoms}, {args.v_min}, {args.v_max})")
    if args.buffer_size // num_games <= args.n_step + 4:
        sys.exit(f"error: --buffer-size {args.buffer_size} leaves {args.buffer_size // num_games} transitions "
                 f"per game; each needs more than --n-step + 4 = {args.n_step + 4}")


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse rather than return it to the OS and page-fault it in
    again at the next update (none to 8% faster, benchmarks/README.md). Does nothing without glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB come from the heap, not from mmap
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap before returning it


def seed_everything(args) -> torch.device:
    """Seeds, threads and the allocator; returns the device."""
    keep_freed_memory()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def load_resume(args, module: str) -> dict | None:
    """With --resume: the run's checkpoint.pt, checked to be one the script `module` wrote with the
    same settings (one-line errors); None for a new run. A complete run (its budget done, no
    evaluation left unfinished) exits with status 0."""
    if not args.resume:
        return None
    ckpt = run_dir.load_resume(args.output_dir, module, dataclasses.asdict(args), RESUME_FREE)
    if "target_model" not in ckpt["resume"]:  # PEARL's adaptation once had a loop (and a checkpoint) of its own
        sys.exit(f"error: --resume: {os.path.join(args.output_dir, run_dir.CHECKPOINT)} is a PEARL adaptation "
                 "checkpoint of an older format, which this script cannot continue; start the adaptation again")
    if ckpt["global_step"] >= args.total_timesteps and not ckpt["resume"].get("evaluations"):
        try:  # a replay file a kill at the run's very end left: removed, unless the run is still finishing
            lock = run_dir.open_output_dir(args.output_dir)
        except SystemExit:
            lock = None
        if lock is not None:
            remove_replay(args.output_dir)
            run_dir.remove_temporaries(os.path.join(args.output_dir, REPLAY))
            lock.close()
        print(f"the run in {args.output_dir} is complete ({ckpt['global_step']} env steps): nothing to resume",
              flush=True)
        raise SystemExit(0)
    return ckpt


def setup(args, run_name: str, module: str):
    """Checks --output-dir (one-line errors before anything is created: never over another run) and
    locks it for this process; then the TensorBoard writer there (and wandb when --track)."""
    from torch.utils.tensorboard import SummaryWriter

    if args.resume and args.output_dir is None:
        sys.exit("error: --resume needs --output-dir: the directory of the run to continue")
    args.output_dir = args.output_dir or os.path.join("runs", run_name)
    run_dir.check_output_dir(args.output_dir, args.resume)
    resume = load_resume(args, module)
    lock = run_dir.open_output_dir(args.output_dir)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name,
                   save_code=True)
    # a resumed run drops the events logged after its checkpoint: the log stays one curve
    writer = SummaryWriter(args.output_dir, purge_step=resume["global_step"] + 1 if resume else None)
    writer.output_dir_lock = lock  # held as long as the writer
    if resume is None:
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return writer


def _plain(value):
    """Tuples become lists so the checkpoint loads with weights_only=True."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def log_speed(writer, global_step: int, start_step: int, start_time: float, update_time: float) -> None:
    """Env steps per second since the run (re)started, and the share of that time spent in updates."""
    elapsed = time.time() - start_time
    sps = int((global_step - start_step) / elapsed)
    print(f"global_step={global_step}, SPS={sps}, update share={update_time / elapsed:.2f}", flush=True)
    writer.add_scalar("charts/SPS", sps, global_step)


def save_checkpoint(path: str, module: str, args, model: torch.nn.Module, optimizer, global_step: int, method: str,
                    train_tasks: list[str], num_actions: int, resume: dict | None = None) -> None:
    """The checkpoint of the script `module`: one file, written to a temporary name of this process
    and renamed; loads with torch.load(weights_only=True). `resume` (`run_state`): what --resume
    needs beyond the model and the optimizer; the random states go with it."""
    ckpt = {
        "format": CHECKPOINT_FORMAT, "format_version": 1, "module": module, "benchmark": "atari",
        "method": method, "train_tasks": list(train_tasks), "args": _plain(dataclasses.asdict(args)),
        "global_step": int(global_step), "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {}, "num_actions": int(num_actions),
    }
    if resume is not None:
        ckpt.update(rng=run_dir.rng_state(), resume=resume)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    run_dir.atomic_save(ckpt, path)


def run_state(target_network: torch.nn.Module, env: MultiGameEnv, obs: np.ndarray, rng: np.random.Generator,
              learning_starts: int, **more) -> dict:
    """What --resume needs beyond the weights and the optimizer: the target network, the envs, the
    observation, the loop's generator, the step learning starts at, and the script's `more`."""
    return {"target_model": target_network.state_dict(), "env": env.get_state(), "obs": torch.from_numpy(obs.copy()),
            "loop_rng": _generator_state(rng), "learning_starts": int(learning_starts), **more}


def restore_run(ckpt: dict, args, model: torch.nn.Module, target_network: torch.nn.Module, optimizer,
                env: MultiGameEnv, rng: np.random.Generator, buffers: list) -> tuple[int, np.ndarray, int]:
    """--resume of a training loop: `run_state` into the run's objects, replay.npz into `buffers`;
    returns (env step, observation, env step learning starts at). The random states come last: the
    run goes on with the numbers it would have drawn."""
    state, step = ckpt["resume"], ckpt["global_step"]
    model.load_state_dict(ckpt["model"])
    target_network.load_state_dict(state["target_model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    env.set_state(state["env"])
    replayed = load_replay(os.path.join(args.output_dir, REPLAY), buffers, step)
    _set_generator_state(rng, state["loop_rng"])
    run_dir.set_rng_state(ckpt["rng"])
    return step, state["obs"].numpy(), state["learning_starts"] if replayed else step + args.learning_starts


def save_replay(path: str, buffers: list, global_step: int, fields: tuple[str, ...] = REPLAY_FIELDS) -> None:
    """Replay buffers (each its `fields` arrays up to its size, its sum tree's levels, counters and
    generator) in one compressed .npz with `run_dir.save_arrays`: a crash never leaves half a file.
    Buffer g's arrays are named "{g}_{name}"."""
    arrays = {"global_step": np.array(global_step), "capacities": np.array([b.capacity for b in buffers])}
    for g, b in enumerate(buffers):
        arrays.update({f"{g}_{name}": getattr(b, name)[:b.size] for name in fields})
        arrays.update({f"{g}_tree{i}": level for i, level in enumerate(b.tree.levels)})
        arrays[f"{g}_counters"] = np.array([b.pos, b.size, b.next_t])
        arrays[f"{g}_max_priority"] = np.array(b.tree.max_priority)
        arrays[f"{g}_rng"] = np.array(_generator_state(b.rng))
    run_dir.save_arrays(path, arrays)


def load_replay(path: str, buffers: list, global_step: int, fields: tuple[str, ...] = REPLAY_FIELDS) -> bool:
    """Fill `buffers` from `save_replay`'s file for a run resumed at `global_step`. One written before
    the checkpoint (on its own interval, or a crash between the two writes) is used with its last
    entry taken as an episode end. Returns False, with a one-line warning, when there is none to use."""
    run_dir.remove_temporaries(path)  # left by a killed run (this run holds the folder's lock)
    problem = "is missing"
    if os.path.isfile(path):
        with np.load(path) as data:
            step = int(data["global_step"])
            if step > global_step:
                problem = f"is from env step {step}, after the checkpoint's {global_step}"
            elif data["capacities"].tolist() != [b.capacity for b in buffers]:
                problem = f"holds buffers of {data['capacities'].tolist()} entries, not {[b.capacity for b in buffers]}"
            else:
                for g, b in enumerate(buffers):
                    b.pos, b.size, b.next_t = (int(x) for x in data[f"{g}_counters"])
                    for name in fields:
                        getattr(b, name)[:b.size] = data[f"{g}_{name}"]
                    for i, level in enumerate(b.tree.levels):
                        level[:] = data[f"{g}_tree{i}"]
                    b.tree.max_priority = float(data[f"{g}_max_priority"])
                    _set_generator_state(b.rng, str(data[f"{g}_rng"]))
                    if step < global_step and b.size:  # the transitions in between are lost: an episode end
                        b.dones[(b.pos - 1) % b.capacity], b.next_t = True, 0
                if step < global_step:
                    print(f"warning: --resume: {path} is from env step {step}, the checkpoint from {global_step}: "
                          f"the {global_step - step} transitions in between are not replayed", file=sys.stderr)
                return True
    print(f"warning: --resume: {path} {problem}: the replay starts empty and learning waits for new transitions",
          file=sys.stderr)
    return False


def remove_replay(output_dir: str) -> None:
    """A completed run's replay file served only --resume: removed."""
    try:
        os.remove(os.path.join(output_dir, REPLAY))
    except FileNotFoundError:
        pass


class Evaluator:
    """Runs the script's `evaluate(q_network, game, args, num_actions, device, seed)` when its train()
    asks and hands log_eval(step, mean, episodes) the scores in step order; nothing without log_eval.
    With --background-eval each evaluation runs in a second process on a snapshot (`evaluate_snapshot`;
    the script's QNetwork class and evaluate function travel by reference) while training goes on
    (same scores: same snapshot, same seeds), and the learner drops to one torch thread meanwhile
    (benchmarks/README.md). `terminate` stops that process at once (a stop, an error); it also dies
    with the learner, kill -9 included (`evaluation_worker_init`)."""

    def __init__(self, log_eval, game: str, args, num_actions: int, device, network_class, evaluate):
        self.log_eval, self.game, self.args, self.num_actions, self.device = log_eval, game, args, num_actions, device
        self.network_class, self.evaluate = network_class, evaluate
        self.pool, self.pending = None, []  # pending: (step, future, snapshot), oldest first
        if log_eval is not None and args.background_eval:
            import concurrent.futures
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                               initializer=evaluation_worker_init,
                                                               initargs=(os.getpid(),))

    def run(self, step: int, q_network: torch.nn.Module, snapshot: dict[str, np.ndarray] | None = None) -> None:
        """Evaluate q_network at env step `step`; or the network of `snapshot` (its state dict as arrays:
        an evaluation a stopped run left unfinished)."""
        seed = self.args.seed + 10_000 + step
        if self.log_eval is None:
            return
        if self.pool is None:
            if snapshot is not None:
                q_network = copy.deepcopy(q_network)
                q_network.load_state_dict({k: torch.from_numpy(v) for k, v in snapshot.items()})
            scores = self.evaluate(q_network, self.game, self.args, self.num_actions, self.device, seed)
            self.log_eval(step, float(np.mean(scores)), len(scores))
            return
        # as numpy arrays: after torch's own pickling of tensors for multiprocessing (shared memory,
        # handed over by a resource-sharer thread) the learner ran 1.8x slower for the rest of the run
        if snapshot is None:
            snapshot = {k: v.detach().cpu().numpy().copy() for k, v in q_network.state_dict().items()}
        future = self.pool.submit(evaluate_snapshot, self.network_class, self.evaluate, snapshot, q_network.bf16,
                                  self.game, self.args, self.num_actions, seed)
        self.pending.append((step, future, snapshot))

    def resume(self, evaluations: list[dict], q_network: torch.nn.Module) -> None:
        """Run again the evaluations a stopped run left unfinished (`unfinished`), from their snapshots."""
        for e in evaluations:
            self.run(e["step"], q_network, {k: v.numpy() for k, v in e["model"].items()})

    def share_cores(self) -> None:
        """One learner thread while an evaluation has the other core."""
        if self.pool is None:
            return
        threads = 1 if any(not future.done() for _, future, _ in self.pending) else self.args.torch_threads
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def log_finished(self) -> None:
        """Hand log_eval the evaluations finished so far, oldest first."""
        while self.pending and self.pending[0][1].done():
            step, future, _ = self.pending.pop(0)
            scores = future.result()
            self.log_eval(step, float(np.mean(scores)), len(scores))

    def unfinished(self) -> list[dict]:
        """The evaluations not logged yet, as {step, model snapshot}: a checkpoint keeps them for --resume."""
        return [{"step": step, "model": {k: torch.from_numpy(v) for k, v in snapshot.items()}}
                for step, _, snapshot in self.pending]

    def close(self, stop=None) -> None:
        """Wait for the evaluations still running and log them; a stop meanwhile leaves them to --resume."""
        import concurrent.futures

        while self.pending and not stop:
            concurrent.futures.wait([self.pending[0][1]], timeout=0.5)
            self.log_finished()
        if self.pool is not None and not stop:
            self.pool.shutdown()
            self.pool = None

    def terminate(self) -> None:
        """Stop the evaluation process now (its unfinished evaluations stay in `pending`)."""
        if self.pool is None:
            return
        for process in list((self.pool._processes or {}).values()):  # no public way before Python 3.14
            process.kill()
        self.pool.shutdown(cancel_futures=True)
        self.pool = None


def evaluate_snapshot(network_class, evaluate, state: dict[str, np.ndarray], bf16: bool, game: str, args,
                      num_actions: int, seed: int) -> list[float]:
    """What the evaluation process runs: `evaluate` on a DER network (`network_class`, the script's
    QNetwork) rebuilt from a state dict of arrays."""
    torch.set_num_threads(1)
    q_network = network_class(num_actions, args.hidden_size, args.num_atoms, args.v_min, args.v_max, args.noisy_std)
    q_network.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    q_network.bf16 = bf16
    return evaluate(q_network, game, args, num_actions, torch.device("cpu"), seed)


def evaluation_worker_init(learner_pid: int) -> None:
    """In the evaluation process: SIGINT and SIGTERM are the learner's to handle (it stops this process),
    and the process dies with the learner however that ends (Linux prctl PR_SET_PDEATHSIG), also when
    the learner died before this ran (a kill -9 while the process was starting: no signal would come)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: `terminate` still stops it on every exit path of train()
    if os.getppid() != learner_pid:  # orphaned already: the learner is gone
        os._exit(1)

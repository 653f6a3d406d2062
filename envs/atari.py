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
"""

from __future__ import annotations

import json
import re
import sys

import gymnasium as gym
import numpy as np
import torch

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

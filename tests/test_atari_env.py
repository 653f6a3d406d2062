"""envs/atari.py: the DER preprocessing, action padding, game names and sets, the multi-game env."""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # the frame resize runs in torch: one thread, as the scripts' evaluation process
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from envs import atari  # noqa: E402


def test_pad_action_maps_padding_to_noop():
    assert [atari.pad_action(a, 6) for a in (0, 5, 6, 17)] == [0, 5, 0, 0]
    assert atari.pad_action(3, 4) == 3 and atari.pad_action(4, 4) == 0


def test_padded_actions_play_noop_in_the_emulator():
    a, b = atari.make_env("Pong", seed=5, num_actions=18), atari.make_env("Pong", seed=5, num_actions=18)
    assert len(a.action_set) == 6 and a.action_space.n == 18
    oa, _ = a.reset()
    ob, _ = b.reset()
    np.testing.assert_array_equal(oa, ob)
    for t in range(60):
        oa, *_ = a.step(17 - t % 12)  # 17..6: all padding
        ob, *_ = b.step(0)  # NOOP
    np.testing.assert_array_equal(oa, ob)
    c = atari.make_env("Pong", seed=5, num_actions=18)
    c.reset()
    for t in range(60):
        oc, *_ = c.step(2)  # RIGHT moves the paddle: a different screen
    assert not np.array_equal(oc, ob)


def test_env_preprocessing_shapes_and_resize():
    env = atari.make_env("MsPacman", seed=0)
    obs, _ = env.reset()
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    np.testing.assert_array_equal(obs[:3], 0)  # stack starts with zeros
    env._screens[:] = 77  # area resize: a constant screen stays constant
    np.testing.assert_array_equal(env._frame(), 77)
    env._screens[0], env._screens[1] = 10, 200  # the max over the last two screens
    np.testing.assert_array_equal(env._frame(), 200)
    assert env.ale.getFloat("repeat_action_probability") == 0.0  # no sticky actions


def test_life_loss_ends_a_learning_episode_but_not_an_evaluation_game():
    learn, play = atari.make_env("Breakout", seed=3), atari.make_env("Breakout", seed=3, episodic_life=False)
    rng = np.random.default_rng(0)
    for env in (learn, play):
        env.reset()
    ends = {"learn": [], "play": []}
    for t in range(400):
        a = int(rng.integers(4))
        for name, env in (("learn", learn), ("play", play)):
            _, _, terminated, truncated, info = env.step(a)
            if terminated or truncated:
                ends[name].append(("episode" in info, env.ale.lives()))
                env.reset()
    assert ends["learn"] and not any(game_over for game_over, _ in ends["learn"][:1])  # first end: a lost life
    assert all(game_over for game_over, _ in ends["play"])  # evaluation ends only at game over


def test_game_names_and_sets():
    assert atari.rom_id("BattleZone") == "battle_zone" and atari.find_rom_id("ALE/Pong-v5") == "pong"
    assert atari.find_rom_id("drawer-open-v3") is None and atari.find_rom_id("NoSuchGame") is None
    with pytest.raises(SystemExit, match="error: unknown Atari game 'NoSuchGame'"):
        atari.rom_id("NoSuchGame")
    assert atari.game_set(5) == ["Breakout", "DemonAttack", "Robotank", "BankHeist", "Solaris"]
    assert atari.game_set(10)[5:] == ["Alien", "Seaquest", "Asteroids", "Krull", "Frostbite"]
    assert atari.game_set(5, ("Pong",)) == ["Pong"]
    with pytest.raises(SystemExit, match="--train-games must be 5 or 10"):
        atari.game_set(3)
    assert atari.num_game_actions("Pong") == 6 and atari.num_game_actions("BattleZone") == 18


def test_multi_game_env_picks_a_game_per_game_over_and_keeps_it_after_a_lost_life():
    env = atari.MultiGameEnv(["Breakout", "Breakout"], seed=0, num_actions=18)  # short games: many game overs
    rng = np.random.default_rng(0)
    env.reset()
    played, switches_without_game_over = set(), 0
    for t in range(1500):
        game = env.game
        played.add(game)
        _, _, terminated, truncated, info = env.step(int(rng.integers(18)))
        if terminated or truncated:
            env.reset()
            if "episode" not in info and env.game != game:
                switches_without_game_over += 1
    assert switches_without_game_over == 0
    assert played == {0, 1}


def test_env_state_continues_the_same_episodes_in_a_new_env(tmp_path):
    """get_state through a weights_only checkpoint into an env built with another seed: the same
    observations, rewards, ends and game choices from there on (the emulator, its random state, the
    no-op generator, the frame stack and the episode counters all travel)."""
    env = atari.MultiGameEnv(["Pong", "Breakout"], seed=3, num_actions=18, max_episode_steps=150)
    rng = np.random.default_rng(0)
    env.reset()
    for _ in range(400):  # past a few game overs and truncations of both games
        _, _, terminated, truncated, _ = env.step(int(rng.integers(18)))
        if terminated or truncated:
            env.reset()
    torch.save(env.get_state(), tmp_path / "env.pt")
    state = torch.load(tmp_path / "env.pt", weights_only=True)
    actions = rng.integers(18, size=600)

    def play(e):
        out = []
        for a in actions:
            obs, reward, terminated, truncated, info = e.step(int(a))
            out.append((obs.tobytes(), reward, terminated, truncated, str(info), e.game))
            if terminated or truncated:
                out.append((e.reset()[0].tobytes(), e.game))
        return out

    other = atari.MultiGameEnv(["Pong", "Breakout"], seed=99, num_actions=18, max_episode_steps=150)
    other.set_state(state)
    expected = play(env)
    assert play(other) == expected
    assert sum(len(x) == 2 for x in expected) >= 2  # resets happened after the state was taken


def test_evaluation_protocol_acts_epsilon_greedy_until_the_step_cap():
    args = SimpleNamespace(eval_episodes=2, eval_max_steps=30, eval_epsilon=0.0, max_noops=0)
    seen = []
    scores = atari.evaluate_policy(lambda obs: seen.append(obs.shape) or 0, "Pong", args, 6, seed=1)
    assert len(scores) == 2 and seen == [(4, 84, 84)] * 60  # a Pong game lasts far longer than 30 steps
    args.eval_epsilon = 1.0  # every action random: the policy is never asked
    assert len(atari.evaluate_policy(lambda obs: seen.append(1) or 0, "Pong", args, 6, seed=1)) == 2
    assert len(seen) == 60


def test_an_evaluation_process_whose_learner_is_already_gone_exits_at_once():
    """kill -9 of the learner while its evaluation process starts: PR_SET_PDEATHSIG comes too late to
    fire, so the process checks that its parent is still the learner (else it would wait forever)."""
    code = "import sys; from envs import atari; atari.evaluation_worker_init(int(sys.argv[1])); print('alive')"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    orphan = subprocess.run([sys.executable, "-c", code, "-1"], cwd=root, capture_output=True, text=True, timeout=300)
    assert (orphan.returncode, orphan.stdout) == (1, "")  # -1: not its parent
    child = subprocess.run([sys.executable, "-c", code, str(os.getpid())], cwd=root, capture_output=True, text=True,
                           timeout=300)
    assert (child.returncode, child.stdout) == (0, "alive\n")

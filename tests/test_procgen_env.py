"""envs/procgen.py: the vectorised CoinRun, the reward normaliser and the evaluation's episode rule."""

import numpy as np
import pytest

from envs.procgen import EvalEpisodes, Episode, ProcgenVecEnv, RunningMeanStd, VecNormalizeReward


class ScriptedVecEnv:
    """Two envs whose rewards and dones are given step by step."""

    num_envs = 2

    def __init__(self, rewards, dones):
        self.rewards, self.dones, self.t = rewards, dones, 0

    def reset(self):
        return np.zeros((2, 64, 64, 3), dtype=np.uint8)

    def step(self, actions):
        reward = np.array(self.rewards[self.t], dtype=np.float32)
        done = np.array(self.dones[self.t])
        self.t += 1
        return np.zeros((2, 64, 64, 3), dtype=np.uint8), reward, done, ["extra"]


def test_vec_normalize_reward_divides_by_the_running_std_of_discounted_returns():
    # gamma 0.5. Discounted returns per env: step 1 [1, 0]; step 2 [0.5 + 1, 0 + 2] = [1.5, 2], then
    # env 0's episode ends; step 3 [0 + 0, 1 + 0] = [0, 1]. The running variance after step 2 is the
    # variance of all returns seen, {1, 0, 1.5, 2}: mean 1.125, var 0.546875.
    venv = ScriptedVecEnv([[1, 0], [1, 2], [0, 0]], [[False, False], [True, False], [False, False]])
    env = VecNormalizeReward(venv, gamma=0.5)
    env.reset()
    _, r1, _, rest = env.step(None)
    assert rest == ["extra"]  # whatever else the wrapped env returns passes through
    np.testing.assert_allclose(r1, [2.0, 0.0], rtol=1e-6)  # std of {1, 0} is 0.5
    _, r2, _, _ = env.step(None)
    assert env.ret_rms.mean == pytest.approx(1.125) and env.ret_rms.var == pytest.approx(0.546875)
    np.testing.assert_allclose(r2, np.array([1.0, 2.0]) / np.sqrt(0.546875), rtol=1e-6)
    np.testing.assert_array_equal(env.get_original_reward(), [1.0, 2.0])
    env.step(None)
    np.testing.assert_allclose(env.returns, [0.0, 1.0])  # env 0's return restarted after its episode ended


def test_vec_normalize_reward_clips_and_can_be_off():
    # equal returns: a running std of ~1e-4 (the prior's weight), so 1 / std far exceeds the clip
    env = VecNormalizeReward(ScriptedVecEnv([[1, 1], [-1, -1]], [[False] * 2] * 2), gamma=0.0)
    assert env.step(None)[1].tolist() == [10.0, 10.0]  # clipped to [-10, 10]
    plain = VecNormalizeReward(ScriptedVecEnv([[3, -2]], [[False, False]]), gamma=0.99, norm_reward=False)
    np.testing.assert_array_equal(plain.step(None)[1], [3.0, -2.0])


def test_running_mean_std_can_be_shared_between_wrappers():
    shared = RunningMeanStd()
    VecNormalizeReward(ScriptedVecEnv([[1, 0]], [[False, False]]), 0.5, ret_rms=shared).step(None)
    second = VecNormalizeReward(ScriptedVecEnv([[1.5, 2]], [[False, False]]), 0.5, ret_rms=shared)
    second.step(None)
    assert shared.var == pytest.approx(np.var([1, 0, 1.5, 2]))


def test_eval_episodes_counts_each_envs_first_episodes():
    assert EvalEpisodes(50, 100).targets.tolist() == [2] * 50  # the authors' 100 episodes on 50 envs
    assert EvalEpisodes(3, 5).targets.tolist() == [1, 2, 2]  # SB3's (n + i) // n_envs, summing to n
    assert EvalEpisodes(4, 2).targets.tolist() == [0, 0, 1, 1]
    counted = EvalEpisodes(2, 3)  # env 0 counts 1 episode, env 1 counts 2
    counted.add([Episode(0, 10.0, 5, 7), Episode(0, 0.0, 3, 7)])  # env 0's second (short) episode is ignored
    assert not counted.complete
    counted.add([Episode(1, 10.0, 50, 7)])
    assert not counted.complete
    counted.add([Episode(1, 0.0, 60, 7), Episode(1, 10.0, 1, 7)])
    assert counted.complete and counted.returns == [10.0, 10.0, 0.0]


def test_states_restore_the_first_frame_of_the_level():
    env = ProcgenVecEnv(2, "coinrun", 1, 10000, "easy", 0, threads=1)
    first = env.reset()
    states = env.get_states()
    rng = np.random.default_rng(0)
    for _ in range(10):
        obs, *_ = env.step(rng.integers(0, 15, 2))
    assert not np.array_equal(obs, first)
    restored = env.set_states(states, fresh_episodes=True)
    np.testing.assert_array_equal(restored, first)
    assert env.returns.tolist() == [0.0, 0.0] and env.lengths.tolist() == [0, 0]
    assert env.level_seeds.tolist() == [10000, 10000]
    env.close()


def test_env_threads_must_be_positive():
    with pytest.raises(SystemExit, match=r"--env-threads must be at least 1 \(got 0\)"):
        ProcgenVecEnv(2, "coinrun", 1, 0, "easy", 0, threads=0)


def test_unknown_game_is_a_one_line_error():
    with pytest.raises(SystemExit, match="unknown Procgen game 'coinrn'"):
        ProcgenVecEnv(2, "coinrn", 1, 0, "easy", 0)

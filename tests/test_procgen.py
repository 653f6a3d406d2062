"""Procgen family: exact checks of GAE, Reptile, RL2 resets and sequence minibatches, plus
smoke runs of every script and finetune path with tiny budgets."""

import argparse
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import finetune
import ppo_mt_procgen as mt
from envs.procgen import VecNormalizeReward
import ppo_reptile_procgen as reptile
import ppo_rl2_procgen as rl2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-levels", "10", "--num-envs", "4", "--num-steps", "32", "--num-minibatches", "2",
        "--total-timesteps", "512"]


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("module", [mt, reptile, rl2])
def test_gae_matches_hand_computation(module):
    # Column 0, gamma 0.9, lambda 0.8, episode ends after t=1:
    #   t=2: delta = 2 + 0.9*3 - 0 = 4.7                 A2 = 4.7
    #   t=1: delta = 0 + 0 (terminal) - 1 = -1            A1 = -1
    #   t=0: delta = 1 + 0.9*1 - 0.5 = 1.4                A0 = 1.4 + 0.9*0.8*(-1) = 0.68
    # Column 1, no terminals, all rewards 1, values 0, last value 0:
    #   A2 = 1, A1 = 1 + 0.72*1 = 1.72, A0 = 1 + 0.72*1.72 = 2.2384
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 1.0]])
    values = torch.tensor([[0.5, 0.0], [1.0, 0.0], [0.0, 0.0]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    adv, ret = module.compute_gae(rewards, values, dones, torch.tensor([3.0, 0.0]), 0.9, 0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.68, 2.2384], [-1.0, 1.72], [4.7, 1.0]]))
    torch.testing.assert_close(ret, adv + values)


# ----------------------------------------------------------------------------- Reptile


def test_reptile_eps_schedule_is_linear_from_start_to_end():
    assert [reptile.reptile_eps(i, 5, 0.0, 1.0) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert reptile.reptile_eps(0, 3, 1.0, 0.0) == 1.0 and reptile.reptile_eps(2, 3, 1.0, 0.0) == 0.0
    assert reptile.reptile_eps(0, 1, 0.3, 1.0) == 0.3


def test_reptile_step_interpolates_toward_inner_weights():
    net = torch.nn.Linear(2, 1)
    meta = {"weight": torch.tensor([[0.0, 2.0]]), "bias": torch.tensor([4.0])}
    with torch.no_grad():  # phi: the weights after the inner loop
        net.weight.copy_(torch.tensor([[1.0, 4.0]]))
        net.bias.copy_(torch.tensor([0.0]))
    reptile.reptile_step(meta, net, 0.25)
    # theta + 0.25 * (phi - theta)
    torch.testing.assert_close(meta["weight"], torch.tensor([[0.25, 2.5]]))
    torch.testing.assert_close(meta["bias"], torch.tensor([3.0]))
    torch.testing.assert_close(net.weight.data, meta["weight"])  # the agent continues from theta
    torch.testing.assert_close(net.bias.data, meta["bias"])


def test_reptile_training_moves_meta_weights_by_eps(tmp_path):
    # eps = 0 throughout: the meta-weights (what the checkpoint stores) never move.
    args = reptile.Args(num_levels=3, num_envs=2, num_steps=8, num_minibatches=1, total_timesteps=32,
                        reptile_k=2, reptile_eps_start=0.0, reptile_eps_end=0.0, output_dir=str(tmp_path),
                        precision="fp32")
    torch.manual_seed(args.seed)
    init = reptile.Agent().state_dict()
    reptile.train(args)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    for name, tensor in init.items():
        torch.testing.assert_close(saved[name], tensor)


# ----------------------------------------------------------------------------- RL2


class ScriptedMetaEnv:
    """Stands in for MetaEpisodeVecEnv with 2 envs: env 0 ends a trial after step 1 (same level)
    and its meta-episode after step 3; env 1 never ends. step -> (obs, reward, meta_done, trial_done, [])."""

    num_envs = 2
    events = {1: ([False, False], [True, False]), 3: ([True, False], [True, False])}

    def __init__(self):
        self.t = 0

    def reset(self):
        return np.zeros((2, 64, 64, 3), dtype=np.uint8)

    def step(self, actions):
        meta_done, trial_done = self.events.get(self.t, ([False, False], [False, False]))
        obs = np.full((2, 64, 64, 3), self.t + 1, dtype=np.uint8)
        reward = np.array([10.0 * (self.t + 1), 0.0], dtype=np.float32)
        self.t += 1
        return obs, reward, np.array(meta_done), np.array(trial_done), []


def test_rl2_hidden_state_resets_at_level_change_not_at_trial_end():
    args = rl2.Args(num_envs=2, num_steps=5)
    agent = rl2.RL2Agent()
    env = VecNormalizeReward(ScriptedMetaEnv(), args.gamma)  # the LSTM must still see the raw rewards
    rollout = rl2.RL2Rollout(agent, env, torch.device("cpu"), args.num_steps)
    batch, _ = rollout.collect(agent, env, args)
    # Reset flag before step t: at t=0 (start) and after the meta-episode ended at t=3, never at the trial end.
    assert batch.resets[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert batch.resets[:, 1].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert batch.trial_starts[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    # Previous reward crosses the trial boundary (the agent learns from it), not the level change.
    assert batch.prev_rewards[:, 0].tolist() == [0.0, 10.0, 20.0, 30.0, 0.0]
    assert batch.prev_actions[0, 0].item() == -1 and batch.prev_actions[4, 0].item() == -1
    assert batch.prev_actions[2, 0].item() == batch.actions[1, 0].item()
    # Returns are cut only at the meta-episode end; the learning signal is the normalised reward.
    assert rollout.dones[:, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert rollout.rewards[0, 0].item() != 10.0


def test_rl2_recurrent_reset_equals_fresh_start():
    torch.manual_seed(0)
    agent = rl2.RL2Agent(lstm_hidden=16, lstm_layers=2)
    T, B = 6, 3
    obs = torch.randint(0, 255, (T, B, 64, 64, 3), dtype=torch.uint8)
    prev_a = torch.randint(-1, 15, (T, B))
    prev_r, start = torch.rand(T, B), torch.zeros(T, B)
    resets = torch.zeros(T, B)
    resets[0] = 1
    resets[2, 0] = 1
    resets[4, 1] = 1
    with torch.no_grad():
        h0 = tuple(torch.randn(2, B, 16) for _ in range(2))  # garbage state must be wiped by resets[0]
        out, _ = agent.recurrent(obs, prev_a, prev_r, start, h0, resets)
        for env, t0 in [(0, 2), (1, 4), (2, 0)]:
            sl = slice(env, env + 1)
            fresh, _ = agent.recurrent(obs[t0:, sl], prev_a[t0:, sl], prev_r[t0:, sl], start[t0:, sl],
                                       agent.initial_state(1, torch.device("cpu")), torch.zeros(T - t0, 1))
            torch.testing.assert_close(out[t0:, sl], fresh)


def test_rl2_meta_episode_env_replays_level_then_changes_it():
    env = rl2.MetaEpisodeVecEnv(2, 2, "coinrun", 1000, 0, "hard", 0)
    first = env.reset()
    level = int(env.level_seeds[0])
    rng = np.random.default_rng(0)
    events = []
    for _ in range(5000):
        obs, _, new_meta, done, finished = env.step(rng.integers(0, 15, 2))
        if done[0]:
            events.append((bool(new_meta[0]), [f for f in finished if f[0] == 0][0]))
            if len(events) == 1:  # trial 0 over: same level from its first frame, no new meta-episode
                assert not new_meta[0]
                assert np.array_equal(obs[0], first[0]) and env.level_seeds[0] == level
            if len(events) == 2:
                break
    assert len(events) == 2
    assert events[0][1][3] == level and events[0][1][4] == 0  # (env, return, length, level, trial)
    assert events[1][0] and events[1][1][3] == level and events[1][1][4] == 1
    env.close()


def test_sequence_minibatches_keep_whole_sequences():
    groups = rl2.sequence_minibatches(8, 4, torch.Generator().manual_seed(0))
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    assert sorted(torch.cat(groups).tolist()) == list(range(8))


def test_rl2_update_replays_rollout_exactly(tmp_path):
    """The first PPO minibatch recomputes the rollout's log-probs from each sequence's stored
    initial state: if minibatches cut sequences or misaligned the state, the KL would not be 0."""
    args = rl2.Args(num_levels=3, num_envs=4, num_steps=16, num_minibatches=2, precision="fp32", norm_reward=False)
    torch.manual_seed(0)
    agent = rl2.RL2Agent(lstm_hidden=32)
    env = VecNormalizeReward(rl2.MetaEpisodeVecEnv(2, 4, "coinrun", 3, 0, "easy", 0), args.gamma, norm_reward=False)
    rollout = rl2.RL2Rollout(agent, env, torch.device("cpu"), args.num_steps)
    rollout.collect(agent, env, args)  # a second rollout starts from a carried, non-zero state
    batch, _ = rollout.collect(agent, env, args)
    assert batch.initial_state[0].abs().sum() > 0
    for envs in rl2.sequence_minibatches(4, 2, torch.Generator().manual_seed(1)):
        mb = rl2.sequence_minibatch(batch, envs)
        with torch.no_grad():
            _, logprob, _, value, _ = agent.get_action_and_value(
                mb.obs, mb.prev_actions, mb.prev_rewards, mb.trial_starts, mb.initial_state, mb.resets, mb.actions)
        torch.testing.assert_close(logprob, batch.logprobs[:, envs], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(value, batch.values[:, envs], atol=1e-5, rtol=1e-5)
    env.close()


# ----------------------------------------------------------------------------- checkpoints and CLI


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny checkpoints of all three scripts, written through their command lines."""
    out = tmp_path_factory.mktemp("procgen")
    paths = {}
    for name in ("ppo_mt_procgen", "ppo_reptile_procgen", "ppo_rl2_procgen"):
        proc = run_script(f"{name}.py", *TINY, "--output-dir", str(out / name))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "SPS=" in proc.stdout
        paths[name] = out / name / "checkpoint.pt"
    return paths


def test_checkpoint_round_trip(pretrained):
    ckpt = finetune.load_checkpoint(str(pretrained["ppo_mt_procgen"]))
    raw = torch.load(pretrained["ppo_mt_procgen"], weights_only=True)
    assert (ckpt["module"], ckpt["benchmark"], ckpt["method"]) == ("ppo_mt_procgen", "procgen", "mt")
    assert ckpt["train_tasks"] == list(range(10)) and ckpt["global_step"] == 512
    assert ckpt["args"]["num_envs"] == 4 and "optimizer" in ckpt
    agent = mt.Agent()
    agent.load_state_dict(ckpt["model"])
    for name, tensor in agent.state_dict().items():
        assert torch.equal(tensor, raw["model"][name])
    assert not any(p.name.endswith(".tmp") for p in pretrained["ppo_mt_procgen"].parent.iterdir())
    for name, method in (("ppo_reptile_procgen", "reptile"), ("ppo_rl2_procgen", "rl2")):
        assert finetune.load_checkpoint(str(pretrained[name]))["method"] == method
    mt.Agent().load_state_dict(finetune.load_checkpoint(str(pretrained["ppo_reptile_procgen"]))["model"])


@pytest.mark.parametrize("source", ["ppo_mt_procgen", "ppo_reptile_procgen", "ppo_rl2_procgen", "scratch"])
def test_finetune_runs_and_writes_eval_csv(pretrained, tmp_path, source):
    src = ["--scratch", "procgen"] if source == "scratch" else ["--checkpoint", str(pretrained[source])]
    out = tmp_path / "ft"
    proc = run_script("finetune.py", *src, "--task", "10000", "--num-envs", "4", "--num-steps", "32",
                      "--num-minibatches", "2", "--total-timesteps", "256", "--eval-every", "256",
                      "--eval-episodes", "1", "--eval-num-envs", "1", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (out / "eval.csv").read_text().splitlines()
    assert rows[0] == "env_step,mean_return,episodes"
    assert rows[1].startswith("0,") and rows[1].endswith(",1")  # the zero-shot point: 1 evaluation episode
    assert rows[-1].startswith("256,") and int(rows[-1].split(",")[2]) >= 1  # a point at the end of the budget
    assert proc.stdout.strip().splitlines()[-1].startswith(("ppo_", "scratch[procgen]"))
    if source != "ppo_rl2_procgen":
        ckpt = finetune.load_checkpoint(str(out / "checkpoint.pt"))
        assert ckpt["train_tasks"] == [10000] and ckpt["args"]["num_levels"] == 1
        assert ckpt["args"]["start_level"] == 10000 and ckpt["args"]["total_timesteps"] == 256
    if source == "ppo_mt_procgen":  # --resume continues only a fine-tuning run of the same kind
        flags = ["--task", "10000", "--num-envs", "4", "--num-steps", "32", "--num-minibatches", "2",
                 "--total-timesteps", "256", "--resume", "--output-dir"]
        message = one_line_error(lambda: finetune.main(["--scratch", "procgen", *flags, str(out)]))
        assert message.endswith("holds a finetune run, not this scratch run; pass the run's own --checkpoint or --scratch")
        pretraining = pretrained["ppo_reptile_procgen"].parent
        message = one_line_error(lambda: finetune.main(["--checkpoint", str(pretrained[source]), *flags, str(pretraining)]))
        assert message == f"--resume: {pretraining} holds a pretraining run of ppo_reptile_procgen, not a fine-tuning run (no eval.csv)"


def test_finetune_overrides_default_to_checkpoint_values(pretrained):
    ckpt = finetune.load_checkpoint(str(pretrained["ppo_mt_procgen"]))
    args = finetune.script_args(mt, ckpt, ["--num-steps", "16"], total_timesteps=2_000_000, num_levels=1)
    assert (args.num_envs, args.num_steps, args.total_timesteps, args.num_levels) == (4, 16, 2_000_000, 1)
    assert args.learning_rate == mt.Args().learning_rate


def test_finetune_rejects_bad_input(pretrained, tmp_path):
    good = pretrained["ppo_mt_procgen"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "finetune-vs-meta-rl", "obj": argparse.Namespace(payload=1)}, unsafe)  # needs code to load
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt"), "--task", "10000"], "checkpoint not found"),
        (["--checkpoint", str(truncated), "--task", "10000"], "cannot read checkpoint"),
        (["--checkpoint", str(unsafe), "--task", "10000"], "cannot read checkpoint"),
        (["--checkpoint", str(foreign), "--task", "10000"], "not a checkpoint of this project"),
        (["--checkpoint", str(pretrained["ppo_mt_procgen"]), "--task", "level-7"], "unknown procgen task"),
        (["--scratch", "procgen", "--task", "abc"], "unknown procgen task"),
        (["--checkpoint", str(pretrained["ppo_mt_procgen"]), "--task", "10000", "--load-encoder-only"],
         "--load-encoder-only needs an MT or Reptile checkpoint of Atari or RLBench"),
    ]
    for argv, message in cases:
        proc = run_script("finetune.py", *argv)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_script_rejects_impossible_flags():
    proc = run_script("ppo_mt_procgen.py", "--num-envs", "3", "--num-steps", "5", "--num-minibatches", "2")
    assert proc.returncode != 0 and "divisible" in proc.stderr.strip().splitlines()[-1]
    proc = run_script("ppo_mt_procgen.py", "--num-envs", "0")
    assert proc.returncode != 0 and "must be at least 1" in proc.stderr.strip().splitlines()[-1]
    proc = run_script("ppo_rl2_procgen.py", "--num-envs", "4", "--num-minibatches", "3")
    assert proc.returncode != 0 and "whole env sequences" in proc.stderr.strip().splitlines()[-1]
    proc = run_script("ppo_reptile_procgen.py", "--env-id", "coinrn", "--num-envs", "2", "--num-steps", "8",
                      "--num-minibatches", "1", "--total-timesteps", "16", "--num-levels", "2")
    assert proc.returncode != 0 and "unknown Procgen game 'coinrn'" in proc.stderr.strip().splitlines()[-1]
    assert not any(name.startswith("coinrn__") for name in os.listdir(os.path.join(ROOT, "runs"))) \
        if os.path.isdir(os.path.join(ROOT, "runs")) else True  # the error comes before any run directory



# ----------------------------------------------------------------------------- PPO loss and initialisation (SB3)


@pytest.mark.parametrize("module", [mt, reptile, rl2], ids=["mt", "reptile", "rl2"])
def test_ppo_loss_is_sb3s_on_a_hand_made_batch(module):
    args = module.Args(norm_adv=False, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5)
    # sample 0: ratio 1.5 with A = +1 -> clipped at 1.2: -min(1.5, 1.2) = -1.2
    # sample 1: ratio 0.5 with A = +2 -> unclipped side is smaller: -min(1.0, 1.6) = -1.0
    logratio = torch.log(torch.tensor([1.5, 0.5]))
    advantages = torch.tensor([1.0, 2.0])
    values, returns = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    entropy = torch.tensor([0.3, 0.5])
    terms = module.ppo_loss(logratio, advantages, values, returns, entropy, args)
    assert terms.pg_loss.item() == pytest.approx(-1.1)  # mean(-1.2, -1.0)
    assert terms.v_loss.item() == pytest.approx(2.5)  # mean((0 - 1)^2, (4 - 2)^2), no 1/2
    assert terms.entropy.item() == pytest.approx(0.4)
    assert terms.loss.item() == pytest.approx(-1.1 - 0.01 * 0.4 + 0.5 * 2.5)


def assert_orthogonal(weight: torch.Tensor, gain: float):
    w = weight.detach().flatten(1)  # conv (out, in, k, k) -> (out, in k k)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    torch.testing.assert_close(gram, gain**2 * torch.eye(gram.shape[0]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("module", [mt, rl2], ids=["mt_reptile", "rl2"])
def test_sb3_ortho_init_gains(module):
    agent = module.Agent() if module is mt else module.RL2Agent()
    layers = [m for m in agent.encoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 1 + 3 * 5  # fc, and per stage one conv plus two residual blocks of two
    features = layers + ([agent.embed] if module is rl2 else [])
    for layer in features:  # SB3: features extractor (and mlp extractor) gain sqrt(2)
        assert_orthogonal(layer.weight, np.sqrt(2))
        assert layer.bias.abs().max() == 0
    assert_orthogonal(agent.actor.weight, 0.01)  # policy head
    assert_orthogonal(agent.critic.weight, 1.0)  # value head
    assert agent.actor.bias.abs().max() == 0 and agent.critic.bias.abs().max() == 0


# ----------------------------------------------------------------------------- the scripts' shape


SHARED_ALL = ["ortho_init", "ResidualBlock", "ConvSequence", "ImpalaEncoder", "compute_gae", "PPOLoss", "ppo_loss",
              "setup"]
SHARED_MT_REPTILE = ["Agent", "Batch", "RolloutBuffer", "ppo_update", "check_args", "log_iteration", "RolloutPolicy"]


@pytest.mark.parametrize("name", SHARED_ALL + SHARED_MT_REPTILE)
def test_duplicated_pieces_are_identical(name):
    import inspect

    others = [reptile, rl2] if name in SHARED_ALL else [reptile]
    for module in others:
        assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(mt, name)), (name, module.__name__)
    for module in (reptile, rl2):
        assert module.LOSS_TAGS is mt.LOSS_TAGS and module.NUM_ACTIONS == mt.NUM_ACTIONS


@pytest.mark.parametrize("module", [mt, reptile, rl2], ids=["mt", "reptile", "rl2"])
def test_every_args_field_has_a_docstring(module):
    import ast
    import dataclasses
    import inspect

    documented = set()
    for cls in filter(dataclasses.is_dataclass, module.Args.__mro__):  # Args and the run's flags (RunArgs)
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for node, after in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str) and after.value.value.strip():
                documented.add(node.target.id)
    missing = [f.name for f in dataclasses.fields(module.Args) if f.name not in documented]
    assert not missing, f"{module.__name__}.Args fields without a docstring: {missing}"


@pytest.mark.parametrize("module", [mt, reptile, rl2], ids=["mt", "reptile", "rl2"])
def test_scripts_are_short_and_open_on_the_algorithm(module):
    import inspect

    lines = inspect.getsource(module).splitlines()
    assert len(lines) <= 700
    first_network_line = min(i for i, line in enumerate(lines) if line.startswith("class ResidualBlock"))
    assert first_network_line < len(lines) / 3


# ----------------------------------------------------------------------------- evaluation on the held-out level


def test_evaluation_runs_the_held_out_level_in_envs_training_never_steps(tmp_path, monkeypatch):
    """Training on level 3, evaluating on level 10000: the evaluation's envs are stepped only inside
    `evaluate` and play only level 10000; the training envs are never stepped there."""
    made = []
    inside = {"eval": False}

    class RecordingEnv(mt.ProcgenVecEnv):
        def __init__(self, num_envs, env_id, num_levels, start_level, *rest):
            super().__init__(num_envs, env_id, num_levels, start_level, *rest)
            self.start_level, self.steps_in_eval, self.steps_in_training, self.levels = start_level, 0, 0, set()
            made.append(self)

        def step(self, actions):
            out = super().step(actions)
            if inside["eval"]:
                self.steps_in_eval += 1
            else:
                self.steps_in_training += 1
            self.levels |= {episode.level for episode in out[3]} | set(self.level_seeds.tolist())
            return out

    plain_evaluate = mt.evaluate

    def recording_evaluate(*a, **k):
        inside["eval"] = True
        try:
            return plain_evaluate(*a, **k)
        finally:
            inside["eval"] = False

    monkeypatch.setattr(mt, "ProcgenVecEnv", RecordingEnv)
    monkeypatch.setattr(mt, "evaluate", recording_evaluate)
    args = mt.Args(num_levels=1, start_level=3, distribution_mode="easy", num_envs=2, num_steps=16, num_minibatches=1,
                   total_timesteps=64, eval_episodes=3, eval_num_envs=2, output_dir=str(tmp_path), precision="fp32",
                   env_threads=1)
    points = []
    mt.train(args, log_eval=lambda step, value, episodes: points.append((step, value, episodes)), eval_every=32,
             eval_level=10000)
    train_env, eval_env = sorted(made, key=lambda env: env.start_level)
    assert (train_env.start_level, eval_env.start_level) == (3, 10000) and eval_env.num_envs == 2
    assert eval_env.steps_in_training == 0 and eval_env.steps_in_eval > 0 and eval_env.levels == {10000}
    assert train_env.steps_in_eval == 0 and train_env.steps_in_training == 64 // 2 and train_env.levels == {3}
    assert [step for step, _, _ in points] == [0, 32, 64]  # step 0, every eval_every, the end
    assert all(episodes == 3 for _, _, episodes in points)


class ScriptedAdaptEnv:
    """Stands in for MetaEpisodeVecEnv in `adapt`: 2 envs, and one episode (env 0, return 10) ends
    at the 12th step, i.e. in the second rollout of 8 steps (16 env steps each)."""

    def __init__(self, num_trials, num_envs, env_id, num_levels, level, *rest):
        self.num_envs, self.level, self.t = num_envs, level, 0

    def reset(self):
        return np.zeros((self.num_envs, 64, 64, 3), dtype=np.uint8)

    def step(self, actions):
        self.t += 1
        done = np.array([self.t == 12, False])
        finished = [rl2.RL2Episode(0, 10.0, 12, self.level, 0)] if self.t == 12 else []
        return self.reset(), np.zeros(2, dtype=np.float32), done, done, finished

    def state_dict(self):  # what adapt's checkpoint stores
        return {"t": self.t}

    def close(self):
        pass


@pytest.mark.parametrize("eval_every", [16, 24, None])
def test_rl2_adapt_logs_a_point_at_every_eval_and_at_the_end(tmp_path, monkeypatch, eval_every):
    """Two rollouts of 16 env steps. The first finishes no episode: its point is a fresh-state
    evaluation (stubbed: 3 episodes of return 7). The second finishes one, of return 10."""
    calls = []

    def stub_evaluate(agent, envs, num_episodes, device):
        calls.append(num_episodes)
        return [rl2.RL2Episode(i, 7.0, 5, 10000, 0) for i in range(num_episodes)]

    monkeypatch.setattr(rl2, "MetaEpisodeVecEnv", ScriptedAdaptEnv)
    monkeypatch.setattr(rl2, "evaluate", stub_evaluate)
    args = rl2.Args(num_envs=2, num_steps=8, num_minibatches=1, total_timesteps=32, eval_episodes=3,
                    lstm_hidden=16, precision="fp32", output_dir=str(tmp_path))
    points = []
    rl2.adapt(args, rl2.RL2Agent(lstm_hidden=16).state_dict(), 10000, eval_every=eval_every,
              log_eval=lambda step, value, episodes: points.append((step, value, episodes)))
    if eval_every == 24:  # 16 < 24: no point after the first rollout; the end point has its episode
        assert points == [(0, 7.0, 3), (32, 10.0, 1)] and calls == [3]
    else:  # every rollout (16 env steps, also the default)
        assert points == [(0, 7.0, 3), (16, 7.0, 3), (32, 10.0, 1)] and calls == [3, 3]


# ----------------------------------------------------------------------------- runs survive: resume, signals, bad input

FAST = ["--num-envs", "4", "--num-steps", "32", "--num-minibatches", "2", "--env-threads", "1", "--precision", "fp32"]
BATCH = 4 * 32


def stop_at_iteration(monkeypatch, module, iteration: int, signum=signal.SIGTERM):
    """Send this process `signum` once the loop has logged `iteration` (as a scheduler or Ctrl-C would)."""
    name = "report" if module is rl2 else "log_iteration"
    plain = getattr(module, name)

    def logging_then_signal(writer, *a):
        plain(writer, *a)
        if (a[1] if module is rl2 else a[0]) == iteration:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(module, name, logging_then_signal)


@pytest.mark.parametrize("module,stop_after", [(mt, 2), (reptile, 3), (rl2, 2)], ids=["mt", "reptile_inside_outer",
                                                                                      "rl2"])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, monkeypatch, module, stop_after):
    """Same seed, CPU: a run stopped (SIGTERM) and resumed ends with exactly the weights, optimizer state
    and random state of a run that never stopped. Checkpoints restore the procgen envs' states, the
    reward normaliser, the minibatch generator and the global random states (and Reptile's level
    generator, phi and the level's envs when stopped inside an outer step)."""
    args = dict(num_levels=10, num_envs=4, num_steps=32, num_minibatches=2, total_timesteps=4 * BATCH, anneal_lr=True,
                distribution_mode="easy", precision="fp32", env_threads=1, save_every=100)
    if module is reptile:
        args.update(reptile_k=2, reptile_eps_start=0.3, reptile_eps_end=0.9)
    if module is rl2:
        args.update(lstm_hidden=16)
    module.train(module.Args(**args, output_dir=str(tmp_path / "plain")))
    stop_at_iteration(monkeypatch, module, stop_after)
    with pytest.raises(SystemExit) as stopped:
        module.train(module.Args(**args, output_dir=str(tmp_path / "stopped")))
    assert stopped.value.code == 128 + signal.SIGTERM
    ckpt = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == stop_after * BATCH
    if module is reptile:
        assert ckpt["resume"]["inner"]["done"] == 1  # stopped inside the second outer step
    monkeypatch.undo()
    module.train(module.Args(**args, output_dir=str(tmp_path / "stopped"), resume=True))
    plain = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert resumed["global_step"] == plain["global_step"] == 4 * BATCH
    for name, tensor in plain["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for i, moments in plain["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][i]["exp_avg"], moments["exp_avg"])
    assert torch.equal(resumed["rng"]["torch"], plain["rng"]["torch"])


def tensorboard_steps(folder, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()  # applies the resumed writer's purge_step, as TensorBoard does
    return [event.step for event in events.Scalars(tag)]


def wait_for(predicate, proc, timeout=240.0):
    import time

    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("timed out")


def checkpoint_step(path) -> int:
    try:
        return torch.load(path, weights_only=True)["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def test_finetune_killed_with_sigkill_resumes_to_the_full_budget(tmp_path):
    """kill -9 after a periodic checkpoint, then --resume: the budget ends where it would have,
    eval.csv has one header and each evaluation step once (one zero-shot row), and TensorBoard's
    curve is continuous (events logged after the checkpoint are purged)."""
    out = tmp_path / "ft"
    argv = [sys.executable, "finetune.py", "--scratch", "procgen", "--task", "10000", *FAST, "--total-timesteps",
            str(8 * BATCH), "--eval-episodes", "1", "--eval-num-envs", "1", "--save-every", "1",
            "--output-dir", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: checkpoint_step(out / "checkpoint.pt") >= 2 * BATCH, proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    killed_at = checkpoint_step(out / "checkpoint.pt")
    assert 2 * BATCH <= killed_at < 8 * BATCH
    resumed = run_script(*argv[1:], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from env step {killed_at}" in resumed.stdout
    assert checkpoint_step(out / "checkpoint.pt") == 8 * BATCH
    rows = (out / "eval.csv").read_text().splitlines()
    steps = [int(row.split(",")[0]) for row in rows[1:]]
    assert rows[0] == "env_step,mean_return,episodes" and "env_step" not in "".join(rows[1:])
    assert steps == [BATCH * i for i in range(9)]  # the zero-shot row once, then every iteration once
    assert tensorboard_steps(out, "eval/mean_return") == steps
    assert tensorboard_steps(out, "losses/policy_loss") == steps[1:]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("events.")) == [".lock", "checkpoint.pt",
                                                                                        "eval.csv"]


@pytest.mark.parametrize("script,signum", [("ppo_mt_procgen.py", signal.SIGINT),
                                           ("ppo_reptile_procgen.py", signal.SIGTERM),
                                           ("finetune.py", signal.SIGTERM)], ids=["mt_sigint", "reptile_sigterm",
                                                                                  "finetune_rl2_sigterm"])
def test_sigint_and_sigterm_write_a_checkpoint_and_resume(tmp_path, pretrained, script, signum):
    """No periodic checkpoint before the end (--save-every 100): the signal's checkpoint is the only
    one; exit 128 + signal, no traceback, one line saying how to resume, and --resume finishes the budget."""
    out = tmp_path / "run"
    total = 4 * BATCH
    flags = [*FAST, "--total-timesteps", str(total), "--save-every", "100", "--output-dir", str(out)]
    if script == "finetune.py":  # RL2's adaptation: a rollout with its recurrent state, no gradient
        argv = [script, "--checkpoint", str(pretrained["ppo_rl2_procgen"]), "--task", "10000", *flags,
                "--eval-episodes", "1", "--eval-num-envs", "1"]
    else:
        argv = [script, "--num-levels", "10", *flags] + (["--reptile-k", "2"] if "reptile" in script else [])
    log = tmp_path / "stdout.txt"
    with open(log, "w") as stdout:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: f"step={BATCH} " in log.read_text(), proc)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    stopped_at = checkpoint_step(out / "checkpoint.pt")
    assert BATCH <= stopped_at < total
    assert last.startswith(f"stopped by {signal.Signals(signum).name} at env step {stopped_at}; checkpoint in ")
    assert last.endswith("--resume")
    resumed = run_script(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint_step(out / "checkpoint.pt") == total


def one_line_error(call) -> str:
    """The one-line message of a SystemExit / FinetuneError raised by `call`."""
    with pytest.raises((SystemExit, finetune.FinetuneError)) as error:
        call()
    message = str(error.value.code if isinstance(error.value, SystemExit) else error.value)
    assert "\n" not in message.strip(), message
    return message


@pytest.mark.parametrize("flags,message", [
    (["--save-every", "0"], "--save-every must be at least 1"),
    (["--save-every", "-3"], "--save-every must be at least 1"),
    (["--start-level", "3000000000"], "--start-level must be in [0, 2**31)"),
    (["--start-level", "-1"], "--start-level must be in [0, 2**31)"),
    (["--num-levels", "-5"], "--num-levels"),  # Reptile: "needs --num-levels >= 1"
    (["--start-level", "2147483000", "--num-levels", "1000"], "--num-levels must be in [0, 2**31 - start level]"),
    (["--distribution-mode", "exploration"], "--distribution-mode exploration"),
    (["--seed", "3000000000"], "--seed must be in [0, 2**30]"),
    (["--learning-rate", "-1"], "--learning-rate must be above 0"),
    (["--update-epochs", "0"], "--update-epochs at least 1"),
    (["--resume"], "--resume needs --output-dir"),
    (["--resume", "--output-dir", "{tmp}/none"], "holds no checkpoint.pt to continue from"),
    (["--output-dir", "{tmp}/a_file"], "is a file, not a directory"),
    (["--output-dir", "{tmp}/a_file/run"], "lies under the file"),
    (["--output-dir", "{tmp}/a_run"], "already holds a run (checkpoint.pt); pass --resume to continue it"),
])
@pytest.mark.parametrize("module", [mt, reptile, rl2], ids=["mt", "reptile", "rl2"])
def test_scripts_reject_bad_input_in_one_line_before_creating_anything(tmp_path, module, flags, message):
    import tyro

    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_run").mkdir()
    (tmp_path / "a_run" / "checkpoint.pt").write_bytes(b"")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = ["--num-levels", "10", *FAST, "--total-timesteps", str(BATCH)]
    args = tyro.cli(module.Args, args=argv + [f.format(tmp=tmp_path) for f in flags])
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a default runs/<run_name> would land here
    try:
        assert message in one_line_error(lambda: module.train(args))
    finally:
        os.chdir(cwd)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_resume_with_other_flags_is_a_one_line_error(pretrained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained["ppo_mt_procgen"].parent, run)
    (run / ".lock").unlink(missing_ok=True)
    before = sorted(run.iterdir())
    args = mt.Args(num_levels=10, num_envs=8, num_steps=32, num_minibatches=2, total_timesteps=512, resume=True,
                   output_dir=str(run))
    assert "--resume: --num-envs is 8 here but 4 in" in one_line_error(lambda: mt.train(args))
    args = reptile.Args(num_levels=10, num_envs=4, num_steps=32, num_minibatches=2, total_timesteps=512, resume=True,
                        output_dir=str(run))
    assert "is not a resumable checkpoint of ppo_reptile_procgen.py" in one_line_error(lambda: reptile.train(args))
    assert sorted(run.iterdir()) == before


def test_a_second_run_into_a_locked_folder_is_a_one_line_error(tmp_path):
    from envs.run_dir import open_output_dir

    lock = open_output_dir(str(tmp_path / "busy"))  # held as a running process would hold it
    proc = run_script("ppo_mt_procgen.py", "--num-levels", "10", *FAST, "--total-timesteps", str(BATCH),
                      "--output-dir", str(tmp_path / "busy"))
    lock.close()
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: --output-dir {tmp_path / 'busy'} is in use by another running process"]
    assert os.listdir(tmp_path / "busy") == [".lock"]


def tampered(pretrained, tmp_path, change) -> str:
    ckpt = torch.load(pretrained["ppo_mt_procgen"], weights_only=True)
    change(ckpt)
    path = tmp_path / "tampered.pt"
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("model"), "lacks the entries model"),
    (lambda c: c.update(model=[1, 2]), "'model' is not a state dict"),
    (lambda c: c["model"].update({"actor.weight": "text"}), "'model' is not a state dict"),
    (lambda c: c.update(args="num_envs=4"), "'args' is not a dict"),
    (lambda c: c["args"].update(num_envs="four"), "args['num_envs'] is 'four', not a value of type int"),
    (lambda c: c["args"].update(distribution_mode="medium"), "args['distribution_mode'] is 'medium'"),
    (lambda c: c.update(method="maml"), "names the unknown method 'maml'"),
    (lambda c: c.update(global_step="10"), "'global_step' is not a non-negative integer"),
])
def test_finetune_validates_the_checkpoint_fully_in_one_line(pretrained, tmp_path, change, message):
    path = tampered(pretrained, tmp_path, change)
    assert message in one_line_error(lambda: finetune.load_checkpoint(path))


def test_finetune_checkpoint_of_another_shape_is_one_line_before_anything_is_made(pretrained, tmp_path):
    def wider_head(ckpt):
        ckpt["model"]["actor.weight"] = torch.zeros(20, 256)

    path = tampered(pretrained, tmp_path, wider_head)
    out = tmp_path / "ft"
    message = one_line_error(lambda: finetune.main(["--checkpoint", path, "--task", "10000", "--output-dir", str(out)]))
    assert message == (f"checkpoint {path} does not fit the IMPALA-CNN agent: 'actor.weight' has shape (20, 256), "
                       "the IMPALA-CNN agent expects (15, 256)")
    path = tampered(pretrained, tmp_path, lambda c: c["model"].pop("critic.bias"))
    assert "it lacks 'critic.bias'" in one_line_error(
        lambda: finetune.main(["--checkpoint", path, "--task", "10000", "--output-dir", str(out)]))
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--task", "99999999999"], "unknown procgen task '99999999999': expected a CoinRun level index in [0, 2**31)"),
    (["--task", "-1"], "unknown procgen task '-1'"),
    (["--task", "10000", "--eval-every", "-1"], "--eval-every must be at least 1 env step"),
    (["--task", "10000", "--eval-every", "0"], "--eval-every must be at least 1 env step"),
    (["--task", "10000", "--resume"], "--resume needs --output-dir"),
    (["--task", "10000", "--resume", "--output-dir", "{tmp}/none"], "holds no checkpoint.pt to continue from"),
    (["--task", "10000", "--output-dir", "{tmp}/ft", "--save-every", "0"], "--save-every must be at least 1"),
    (["--task", "10000", "--output-dir", "{tmp}/ft", "--num-envs", "0"], "must be at least 1"),
])
def test_finetune_rejects_bad_procgen_input_before_anything_is_made(tmp_path, argv, message):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        got = one_line_error(lambda: finetune.main(["--scratch", "procgen", *[a.format(tmp=tmp_path) for a in argv]]))
    finally:
        os.chdir(cwd)
    assert message in got
    assert os.listdir(tmp_path) == []


def test_finetune_warns_when_the_task_is_a_training_level(pretrained, tmp_path):
    proc = run_script("finetune.py", "--checkpoint", str(pretrained["ppo_mt_procgen"]), "--task", "3",
                      "--num-envs", "0", "--output-dir", str(tmp_path / "ft"))  # stops at the flag error
    assert os.listdir(tmp_path) == []
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "warning: level 3 is one of the checkpoint's 10 training levels, not a held-out one"
    assert len(lines) == 2 and "must be at least 1" in lines[1] and "Traceback" not in proc.stderr


def test_finetune_scratch_network_is_drawn_from_the_seed(monkeypatch, tmp_path):
    """--scratch: the fresh network's weights depend on --seed (and only on it)."""
    first_layers = []
    monkeypatch.setattr(mt, "train", lambda args, agent, **kw: first_layers.append(
        next(agent.parameters()).detach().clone()))
    for seed, out in ((1, "a"), (2, "b"), (1, "c")):
        finetune.main(["--scratch", "procgen", "--task", "10000", "--seed", str(seed), "--output-dir",
                       str(tmp_path / out)])
    assert not torch.equal(first_layers[0], first_layers[1]) and torch.equal(first_layers[0], first_layers[2])

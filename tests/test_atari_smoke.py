"""Smoke tests: every Atari script and every finetune.py Atari path, run as a user would (via
subprocess, tiny budgets), plus finetune.py's one-line errors."""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import finetune  # noqa: E402

# one torch thread: on a busy machine a second OpenMP thread waits for a core (and spins)
TINY = ["--total-timesteps", "150", "--learning-starts", "100", "--buffer-size", "1000", "--batch-size", "8",
        "--torch-threads", "1"]
# evaluation episodes can last thousands of steps: one short capped episode per evaluation
TINY_EVAL = ["--eval-every", "75", "--eval-episodes", "1", "--eval-max-steps", "30"]


def run(*cmd, ok=True):
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    procs = {m: subprocess.Popen([sys.executable, f"rainbow_{m}_atari.py", "--train-games", "5", *TINY, "--output-dir",
                                  str(out / m)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for m in ("mt", "reptile", "pearl")}  # in parallel: both cores
    for m, proc in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
    return {m: str(out / m / "checkpoint.pt") for m in procs}


@pytest.mark.parametrize("method", ["mt", "reptile", "pearl"])
def test_pretraining_writes_checkpoint_and_logs(checkpoints, method):
    ckpt = torch.load(checkpoints[method], weights_only=True)
    assert ckpt["module"] == f"rainbow_{method}_atari" and ckpt["method"] == method
    assert ckpt["global_step"] == 150 and ckpt["num_actions"] == 18
    assert ckpt["train_tasks"] == ["Breakout", "DemonAttack", "Robotank", "BankHeist", "Solaris"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.dirname(checkpoints[method])))


def read_eval(path):
    with open(os.path.join(path, "eval.csv")) as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("method", ["mt", "reptile", "pearl"])
def test_finetune_from_checkpoint(checkpoints, method, tmp_path):
    proc = run("finetune.py", "--checkpoint", checkpoints[method], "--task", "Pong", *TINY, *TINY_EVAL,
               "--output-dir", str(tmp_path))
    rows = read_eval(tmp_path)
    # the zero-shot point first, then every --eval-every steps and the end; each point 1 episode
    assert rows[0] == ["env_step", "mean_return", "episodes"]
    assert [(r[0], r[2]) for r in rows[1:]] == [("0", "1"), ("75", "1"), ("150", "1")]
    assert "final mean_return" in proc.stdout.strip().splitlines()[-1]
    if method != "pearl":  # DER fine-tuning writes its own checkpoint, padded to 18 actions
        ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert ckpt["method"] == "finetune" and ckpt["train_tasks"] == ["Pong"] and ckpt["num_actions"] == 18


def test_finetune_encoder_only(checkpoints, tmp_path):
    """Authors' --load_conv_only: the pretrained convs, frozen, under fresh heads over the game's own actions."""
    run("finetune.py", "--checkpoint", checkpoints["mt"], "--task", "Pong", "--load-encoder-only", *TINY, *TINY_EVAL,
        "--output-dir", str(tmp_path))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    pretrained = torch.load(checkpoints["mt"], weights_only=True)["model"]
    assert ckpt["method"] == "finetune" and ckpt["num_actions"] == 6  # Pong's own action set
    assert ckpt["args"]["freeze_encoder"] is True
    for k in ("encoder.conv1.weight", "encoder.conv1.bias", "encoder.conv2.weight", "encoder.conv2.bias"):
        assert torch.equal(ckpt["model"][k], pretrained[k]), k  # 50 updates later: bit-identical
    assert ckpt["model"]["advantage_out.weight_mu"].shape[0] == 6 * 51
    assert not torch.equal(ckpt["model"]["value_hidden.weight_mu"], pretrained["value_hidden.weight_mu"])


@pytest.mark.parametrize("flags, unfreeze_at", [([], None), (["--unfreeze-encoder-at", "50000"], 50000)])
def test_finetune_encoder_only_passes_unfreeze_step(checkpoints, tmp_path, monkeypatch, flags, unfreeze_at):
    """finetune.py's fine-tuning default (never unfreeze) gives way to the user's --unfreeze-encoder-at."""
    import rainbow_mt_atari

    seen = {}
    monkeypatch.setattr(rainbow_mt_atari, "train", lambda args, games, q_network, **kw: seen.update(
        args=args, games=games, q_network=q_network))
    finetune.main(["--checkpoint", checkpoints["mt"], "--task", "Pong", "--load-encoder-only", *flags,
                   "--output-dir", str(tmp_path)])
    args = seen["args"]
    assert args.freeze_encoder is True and args.unfreeze_encoder_at == unfreeze_at
    assert args.pad_actions is False and seen["games"] == ["Pong"]
    assert args.total_timesteps == 100_000 and args.learning_starts == 1600  # the fine-tuning budget
    assert seen["q_network"].advantage_out.weight_mu.shape[0] == 6 * 51  # Pong's own actions


def test_unfreeze_without_frozen_encoder_is_one_line(checkpoints, tmp_path):
    proc = run("finetune.py", "--checkpoint", checkpoints["mt"], "--task", "Pong", *TINY, "--unfreeze-encoder-at", "100",
               "--output-dir", str(tmp_path / "ft"), ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: --unfreeze-encoder-at needs a frozen encoder "
                                                    "(finetune.py --load-encoder-only)")


def test_scratch_uses_the_games_own_actions(tmp_path):
    run("finetune.py", "--scratch", "atari", "--task", "Pong", *TINY, *TINY_EVAL, "--output-dir", str(tmp_path))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "scratch" and ckpt["num_actions"] == 6  # Pong's minimal action set
    assert [r[0] for r in read_eval(tmp_path)[1:]] == ["0", "75", "150"]


# --------------------------------------------------------------------------- errors


def test_unknown_game_in_training_script_is_one_line():
    proc = run("rainbow_mt_atari.py", "--games", "Pong", "NotAGame", ok=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown Atari game 'NotAGame'")
    assert "Traceback" not in proc.stderr


def test_finetune_unknown_game_cli_is_one_line(checkpoints):
    proc = run("finetune.py", "--checkpoint", checkpoints["mt"], "--task", "NotAGame", ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "finetune.py: error: unknown atari task 'NotAGame': expected an Atari game such as Pong"


def test_finetune_error_cases(checkpoints, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(finetune.FinetuneError, match="not a checkpoint of this project"):
        finetune.main(["--checkpoint", str(foreign), "--task", "Pong"])

    truncated = tmp_path / "truncated.pt"
    data = open(checkpoints["mt"], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(finetune.FinetuneError, match="truncated, corrupt or unsafe"):
        finetune.main(["--checkpoint", str(truncated), "--task", "Pong"])

    procgen = tmp_path / "procgen.pt"
    ckpt = torch.load(checkpoints["mt"], weights_only=True)
    ckpt.update(module="ppo_mt_procgen", benchmark="procgen", method="mt", train_tasks=[0])
    torch.save(ckpt, procgen)
    with pytest.raises(finetune.FinetuneError, match="from the procgen benchmark, but task 'Pong' belongs to atari"):
        finetune.main(["--checkpoint", str(procgen), "--task", "Pong", "--output-dir", str(tmp_path / "x")])

    with pytest.raises(finetune.FinetuneError, match="unknown atari task 'Pongg'"):
        finetune.main(["--scratch", "atari", "--task", "Pongg", "--output-dir", str(tmp_path / "y")])


def test_settings_that_cannot_run_are_one_line_errors(tmp_path):
    proc = run("finetune.py", "--scratch", "atari", "--task", "Pong", *TINY, "--batch-size", "0", "--output-dir",
               str(tmp_path / "ft"), ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --batch-size must be at least 1 (got 0)"
    proc = run("rainbow_reptile_atari.py", "--games", "Pong", *TINY, "--buffer-size", "20", ok=False)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: --buffer-size 20 leaves 20 transitions per game; "
                                                    "each needs more than --n-step + 4 = 24")

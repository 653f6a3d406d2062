"""Smoke tests: every Atari script and every finetune.py Atari path, run as a user would (via
subprocess, tiny budgets), plus finetune.py's one-line errors."""

import csv
import os
import signal
import subprocess
import sys
import time

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


# --------------------------------------------------------------------------- stops and resumes


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, proc, timeout=240):
    start = time.time()
    while not condition():
        assert proc.poll() is None, f"the run ended first: {proc.returncode}"
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.05)


def eval_steps(path):
    rows = read_eval(path)
    assert rows[0] == ["env_step", "mean_return", "episodes"] and all(r[0].isdigit() for r in rows[1:])
    return [int(r[0]) for r in rows[1:]]


def logged_steps(path, tag="eval/mean_return"):
    """The steps of one TensorBoard curve as TensorBoard shows it (events after a purge_step dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert not [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]  # one run dir: the output dir
    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    return [e.step for e in accumulator.Scalars(tag)]


# a run of 300 env steps, learning from 200, a checkpoint every 100 and the replay every 200
RESUMABLE = ["--total-timesteps", "300", "--learning-starts", "200", "--buffer-size", "1000", "--batch-size", "8",
             "--torch-threads", "1", "--eval-every", "100", "--eval-episodes", "1", "--eval-max-steps", "30",
             "--save-every", "100", "--save-replay-every", "200"]


def test_kill_9_after_a_checkpoint_then_resume_reaches_the_budget(tmp_path):
    out = tmp_path / "ft"
    cmd = ["finetune.py", "--scratch", "atari", "--task", "Pong", *RESUMABLE, "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: (out / "checkpoint.pt").exists(), proc)
    proc.kill()  # kill -9: no handler runs
    proc.wait()
    killed_at = torch.load(out / "checkpoint.pt", weights_only=True)["global_step"]
    assert 100 <= killed_at < 300
    had_replay = (out / "replay.npz").exists()
    resumed = run(*cmd, "--resume")
    assert f"resuming scratch[atari] on atari task Pong -> {out} from env step {killed_at}" in resumed.stdout
    assert (f"{out / 'replay.npz'} is missing" in resumed.stderr) == (not had_replay)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["global_step"] == 300
    assert eval_steps(out) == [0, 100, 200, 300]  # one header, each point once
    assert logged_steps(out) == [0, 100, 200, 300]  # one continuous curve
    assert not (out / "replay.npz").exists() and not list(out.glob("*.tmp"))


def test_sigterm_stops_finetune_with_its_background_evaluation_and_resume_continues(tmp_path):
    """SIGTERM to the learner alone (as a scheduler sends it): checkpoint, replay, one line, exit 143,
    and the evaluation process (and multiprocessing's resource tracker) gone with it."""
    out = tmp_path / "ft"
    cmd = ["finetune.py", "--scratch", "atari", "--task", "Pong", *RESUMABLE, "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: len(children(proc.pid)) >= 1, proc)  # the background evaluation has started
    kids = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at env step ") and last.endswith(f"--output-dir {out} --resume")
    deadline = time.time() + 10
    while any(alive(k) for k in kids) and time.time() < deadline:
        time.sleep(0.1)
    assert [k for k in kids if alive(k)] == []
    step = torch.load(out / "checkpoint.pt", weights_only=True)["global_step"]
    assert step < 300 and (out / "replay.npz").exists()
    run(*cmd, "--resume")
    assert eval_steps(out) == [0, 100, 200, 300]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["global_step"] == 300


def test_sigint_stops_a_pretraining_script_and_resume_continues(tmp_path):
    out = tmp_path / "mt"
    cmd = ["rainbow_mt_atari.py", "--games", "Pong", "Breakout", "--total-timesteps", "600", "--learning-starts",
           "550", "--buffer-size", "1200", "--batch-size", "8", "--torch-threads", "1", "--save-every", "100",
           "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: (out / "checkpoint.pt").exists(), proc)  # the loop runs (acting only, until 550)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGINT at env step ")
    step = torch.load(out / "checkpoint.pt", weights_only=True)["global_step"]
    assert 100 <= step < 600 and (out / "replay.npz").exists()
    run(*cmd, "--resume")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["global_step"] == 600
    assert len(list(out.glob("events.out.tfevents.*"))) == 2 and not (out / "replay.npz").exists()

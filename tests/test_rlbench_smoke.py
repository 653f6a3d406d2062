"""Smoke runs of the RLBench scripts (Meta-World backend) and finetune.py with tiny budgets."""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# small images, a narrow U-Net and one evaluation episode keep each run to seconds on 2 cores
TINY = ["--demos", "1", "--total-timesteps", "12", "--batch-size", "4", "--image-size", "32", "--unet-width", "4",
        "--eval-episodes", "1"]


def run(*cmd, ok=True):
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"),
               EGL_PLATFORM=os.environ.get("EGL_PLATFORM", "surfaceless"))
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("rlbench")
    paths = {}
    for method in ("mt", "reptile", "pearl"):
        proc = run(f"c2farm_{method}_rlbench.py", "--backend", "metaworld", "--train-tasks", "reach-v3", "push-v3",
                   *TINY, "--output-dir", str(out / method))
        assert "SPS=" in proc.stdout and "success_rate" in proc.stdout
        paths[method] = str(out / method / "checkpoint.pt")
    return out, paths


@pytest.mark.parametrize("method", ["mt", "reptile", "pearl"])
def test_pretraining_checkpoints(checkpoints, method):
    _, paths = checkpoints
    ckpt = torch.load(paths[method], map_location="cpu", weights_only=True)
    assert ckpt["format"] == "finetune-vs-meta-rl" and ckpt["benchmark"] == "rlbench"
    assert ckpt["method"] == method and ckpt["module"] == f"c2farm_{method}_rlbench"
    assert ckpt["train_tasks"] == ["reach-v3", "push-v3"] and ckpt["global_step"] == 12
    assert ckpt["args"]["backend"] == "metaworld" and ckpt["args"]["demos"] == 1
    assert "optimizer" in ckpt and "model" in ckpt
    if method == "pearl":
        assert any(k.startswith("encoder.") for k in ckpt["model"])


@pytest.mark.parametrize("method,demos", [("mt", "1"), ("reptile", "0"), ("pearl", "0"), ("pearl", "1")])
def test_finetune_from_checkpoint(checkpoints, method, demos):
    out, paths = checkpoints
    ft = out / f"ft_{method}_{demos}"
    proc = run("finetune.py", "--checkpoint", paths[method], "--task", "drawer-open-v3", *TINY, "--demos", demos,
               "--eval-every", "6", "--output-dir", str(ft))
    rows = list(csv.reader(open(ft / "eval.csv")))
    assert rows[0] == ["env_step", "success_rate", "episodes"]
    assert all(r[2] == "1" for r in rows[1:])  # --eval-episodes 1 on the one task
    steps = [int(r[0]) for r in rows[1:]]
    # start, then at episode ends once 6 more steps have passed, and at the end
    assert steps[0] == 0 and steps[-1] == 12 and all(6 <= s < 12 for s in steps[1:-1]) and len(steps) <= 4
    assert steps == sorted(steps)
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows[1:])
    assert f"c2farm_{method}_rlbench[{method}] on drawer-open-v3: final success_rate" in proc.stdout.strip().splitlines()[-1]
    if method != "pearl":  # the fine-tuned agent is saved; PEARL takes no gradient step
        ckpt = torch.load(ft / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert ckpt["method"] == "finetune" and ckpt["train_tasks"] == ["drawer-open-v3"]
        assert ckpt["args"]["batch_size"] == 4 and ckpt["args"]["demos"] == int(demos)


def test_finetune_scratch(tmp_path):
    proc = run("finetune.py", "--scratch", "rlbench", "--backend", "metaworld", "--task", "drawer-open-v3", *TINY,
               "--output-dir", str(tmp_path / "scratch"))
    assert "scratch[rlbench] on drawer-open-v3" in proc.stdout.strip().splitlines()[-1]
    rows = list(csv.reader(open(tmp_path / "scratch" / "eval.csv")))
    assert rows[0] == ["env_step", "success_rate", "episodes"] and rows[1] == ["0", rows[1][1], "1"]  # zero-shot point
    ckpt = torch.load(tmp_path / "scratch" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["method"] == "scratch"


def test_finetune_errors(checkpoints, tmp_path):
    _, paths = checkpoints
    cases = [
        (["--checkpoint", paths["mt"], "--task", "no-such-task"], "unknown rlbench task 'no-such-task'"),
        (["--checkpoint", paths["mt"], "--task", "push_button"], "not a task of the metaworld backend"),
        (["--checkpoint", paths["mt"], "--task", "10000"], "belongs to procgen"),
        (["--scratch", "rlbench", "--backend", "rlbench", "--task", "push_button"], "use --backend metaworld"),
        # a network of another size (as a checkpoint of an earlier version would be)
        (["--checkpoint", paths["mt"], "--task", "drawer-open-v3", "--unet-width", "8", "--demos", "0"],
         "does not fit the C2F-ARM agent"),
        (["--checkpoint", paths["pearl"], "--task", "drawer-open-v3", "--unet-width", "8", "--demos", "0"],
         "does not fit this PEARL-C2F-ARM agent"),
    ]
    for i, (argv, message) in enumerate(cases):
        proc = run("finetune.py", *argv, "--output-dir", str(tmp_path / f"err{i}"), ok=False)
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_script_errors(tmp_path):
    proc = run("c2farm_mt_rlbench.py", "--train-tasks", "nope-v3", ok=False)
    assert proc.returncode != 0 and "unknown metaworld task 'nope-v3'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run("c2farm_pearl_rlbench.py", "--backend", "rlbench", "--held-out-task", "push_button",
               "--output-dir", str(tmp_path / "pearl"), ok=False)
    assert proc.returncode != 0 and "use --backend metaworld" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "pearl").exists()  # the error comes before anything is written


def test_finetune_load_encoder_only(checkpoints):
    """--load-encoder-only keeps the Q-attention encoders and re-initialises their Q outputs."""
    out, paths = checkpoints
    ft = out / "ft_encoder_only"
    run("finetune.py", "--checkpoint", paths["mt"], "--task", "drawer-open-v3", *TINY, "--total-timesteps", "2",
        "--learning-starts", "2", "--load-encoder-only", "--output-dir", str(ft))
    before = torch.load(paths["mt"], map_location="cpu", weights_only=True)["model"]
    after = torch.load(ft / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert torch.equal(before["qnets.0.down0.one.0.weight"], after["qnets.0.down0.one.0.weight"])  # no update ran
    assert not torch.equal(before["qnets.1.q_trans.weight"], after["qnets.1.q_trans.weight"])
    assert not torch.equal(before["qnets.1.rot_grip.2.weight"], after["qnets.1.rot_grip.2.weight"])

"""Smoke runs of the RLBench scripts (Meta-World backend) and finetune.py with tiny budgets."""

import csv
import gc
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
# small images, a narrow U-Net and one evaluation episode keep each run to seconds on 2 cores
TINY = ["--demos", "1", "--total-timesteps", "12", "--batch-size", "4", "--image-size", "32", "--unet-width", "4",
        "--eval-episodes", "1"]
# a checkpoint (and the replay buffers) every 4 env steps: what --resume continues from
SAVES = ["--checkpoint-interval", "4", "--replay-save-interval", "4"]
PRETRAIN = ["--backend", "metaworld", "--train-tasks", "reach-v3", "push-v3", *TINY, *SAVES]
ENV = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"),
           EGL_PLATFORM=os.environ.get("EGL_PLATFORM", "surfaceless"))


def run(*cmd, ok=True):
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start_and_wait_for_checkpoint(cmd: list, out_dir) -> subprocess.Popen:
    """Start a run in the background and return once its first periodic checkpoint is written."""
    proc = subprocess.Popen([sys.executable, *cmd, "--output-dir", str(out_dir)], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("rlbench")
    paths = {}
    for method in ("mt", "reptile", "pearl"):
        proc = run(f"c2farm_{method}_rlbench.py", *PRETRAIN, "--output-dir", str(out / method))
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
    assert ckpt["resume"]["finished"] and ckpt["resume"]["global_step"] == 12
    assert sorted(os.listdir(os.path.dirname(paths[method])))[:2] == [".lock", "checkpoint.pt"]
    assert not os.path.exists(os.path.join(os.path.dirname(paths[method]), "replay.npz"))  # gone once finished


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
         "does not fit the PEARL-C2F-ARM agent"),
    ]
    for i, (argv, message) in enumerate(cases):
        proc = run("finetune.py", *argv, "--output-dir", str(tmp_path / f"err{i}"), ok=False)
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert "demos ->" not in proc.stdout and not (tmp_path / f"err{i}").exists()  # checked before demos or files


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


# --------------------------------------------------------------------------- --resume, signals, kill -9


def _same_weights(a: dict, b: dict) -> bool:
    """Networks, target networks and optimizer moments equal, bit for bit."""
    tensors = [(a[k][n], b[k][n]) for k in ("model", "target_model") for n in a[k]]
    tensors += [(x, y) for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
                for x, y in zip(s.values(), t.values())]
    return len(tensors) > 0 and all(torch.equal(x, y) for x, y in tensors)


def _episode_curve(run_dir) -> list:
    """charts/episodic_return as TensorBoard reads the run folder (a resumed run's events included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("charts/episodic_return")]


@pytest.mark.parametrize("method, sig", [("mt", signal.SIGINT), ("reptile", signal.SIGTERM), ("pearl", signal.SIGINT)],
                         ids=["mt-SIGINT", "reptile-SIGTERM", "pearl-SIGINT"])
def test_stop_then_resume_matches_the_uninterrupted_run(checkpoints, tmp_path, method, sig):
    """SIGINT / SIGTERM mid-run: a checkpoint and the replay buffers are written, one line says how to
    resume, the exit is 128 + signal without a traceback. --resume then ends at the budget with the
    uninterrupted run's weights, bit for bit (the episode in progress continues from the saved simulator
    state), one TensorBoard run folder with one curve, and no replay file left."""
    out, paths = checkpoints
    cmd, run_dir = [f"c2farm_{method}_rlbench.py", *PRETRAIN], tmp_path / "run"
    proc = start_and_wait_for_checkpoint(cmd, run_dir)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig and "Traceback" not in stderr, stderr
    assert f"stopped by {sig.name} at env step" in stderr.strip().splitlines()[-1]
    assert stderr.strip().splitlines()[-1].endswith(f"--output-dir {run_dir} --resume")
    stopped = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert 4 <= stopped["global_step"] < 12 and not stopped["resume"]["finished"]
    assert (run_dir / "replay.npz").exists()

    proc = run(*cmd, "--output-dir", str(run_dir), "--resume")
    assert f"replay buffers of env step {stopped['global_step']} from" in proc.stdout and "demos ->" not in proc.stdout
    final = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    reference = torch.load(paths[method], map_location="cpu", weights_only=True)
    assert final["global_step"] == 12 and final["resume"]["finished"]
    assert _same_weights(final, reference) and final["sampling_rng"] == reference["sampling_rng"]
    assert not (run_dir / "replay.npz").exists()
    assert not [p for p in run_dir.iterdir() if p.is_dir()]  # one TensorBoard run: both event files in the folder
    assert _episode_curve(run_dir) == _episode_curve(out / method)  # one continuous curve, the uninterrupted one's


def test_a_stop_on_a_logged_step_keeps_its_events_in_the_resumed_curve(checkpoints, tmp_path, monkeypatch):
    """A stop that lands on step 4, where the uninterrupted run ends an episode and writes its first
    checkpoint: that step's events were logged before the checkpoint, so the resumed run's
    TensorBoard log keeps them (it purges only later steps) and the curve is the uninterrupted one's.
    The first run is in this process, stopped by a SIGTERM sent right after that checkpoint."""
    import tyro

    import c2farm_mt_rlbench as c2f
    from envs import rlbench

    out, _ = checkpoints
    reference = _episode_curve(out / "mt")
    assert 4 in [step for step, _ in reference]  # an episode ends on the checkpoint's step
    run_dir, save_run, sent = tmp_path / "run", rlbench.save_run, []

    def save_then_stop(*a, **k):
        save_run(*a, **k)
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))

    monkeypatch.setattr(rlbench, "save_run", save_then_stop)
    handlers, threads = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)], torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as stopped:
            c2f.main(tyro.cli(c2f.Args, args=[*PRETRAIN, "--output-dir", str(run_dir)]))
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        torch.set_num_threads(threads)
    code = stopped.value.code
    del stopped  # its traceback holds the run's frames, and with them the lock on its folder
    gc.collect()
    assert code == 128 + signal.SIGTERM
    assert torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["global_step"] == 4
    run("c2farm_mt_rlbench.py", *PRETRAIN, "--output-dir", str(run_dir), "--resume")
    assert _episode_curve(run_dir) == reference


def test_kill9_then_resume_finetune(checkpoints, tmp_path):
    """kill -9 after a periodic checkpoint: --resume ends at the full budget with one eval.csv whose rows
    continue (one header, one zero-shot row), equal to an uninterrupted run's, and the same weights."""
    _, paths = checkpoints
    cmd = ["finetune.py", "--checkpoint", paths["mt"], "--task", "drawer-open-v3", *TINY, *SAVES, "--eval-every", "4"]
    run(*cmd, "--output-dir", str(tmp_path / "reference"))
    proc = start_and_wait_for_checkpoint(cmd, tmp_path / "ft")
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(tmp_path / "ft" / "checkpoint.pt", map_location="cpu", weights_only=True)["global_step"]
    assert 4 <= killed_at < 12
    proc = run(*cmd, "--output-dir", str(tmp_path / "ft"), "--resume")
    assert f"from env step {killed_at}" in proc.stdout
    rows = list(csv.reader(open(tmp_path / "ft" / "eval.csv")))
    assert rows == list(csv.reader(open(tmp_path / "reference" / "eval.csv")))
    steps = [int(r[0]) for r in rows[1:]]
    assert rows[0] == ["env_step", "success_rate", "episodes"] and steps[0] == 0 and steps[-1] == 12
    assert steps == sorted(set(steps))
    final = torch.load(tmp_path / "ft" / "checkpoint.pt", map_location="cpu", weights_only=True)
    reference = torch.load(tmp_path / "reference" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 12 and final["method"] == "finetune" and _same_weights(final, reference)
    assert not [p for p in (tmp_path / "ft").iterdir() if p.is_dir()]


def _tree(path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def test_bad_resume_and_output_dir_inputs_are_one_line_errors_that_create_nothing(checkpoints, tmp_path):
    import c2farm_mt_rlbench as c2f
    import finetune

    out, paths = checkpoints
    finished = tmp_path / "finished"
    shutil.copytree(out / "mt", finished)
    stopped = tmp_path / "stopped"  # a run stopped at env step 4 whose replay file is broken
    shutil.copytree(out / "mt", stopped)
    ckpt = torch.load(stopped / "checkpoint.pt", map_location="cpu", weights_only=True)
    ckpt["resume"]["finished"], ckpt["global_step"] = False, 4
    torch.save(ckpt, stopped / "checkpoint.pt")
    (stopped / "replay.npz").write_bytes(b"not a zip file")
    truncated = tmp_path / "truncated"
    shutil.copytree(out / "mt", truncated)
    with open(truncated / "checkpoint.pt", "r+b") as f:
        f.truncate(1000)
    (tmp_path / "afile").write_text("x")
    base = dict(backend="metaworld", train_tasks=["reach-v3", "push-v3"], demos=1, total_timesteps=12, batch_size=4,
                image_size=32, unet_width=4, eval_episodes=1, checkpoint_interval=4, replay_save_interval=4)
    cases = [
        (dict(output_dir=str(tmp_path / "afile")), "--output-dir", "is a file, not a directory"),
        (dict(output_dir=str(tmp_path / "afile" / "run")), "--output-dir", "lies under the file"),
        (dict(output_dir=str(finished)), "already holds a run (checkpoint.pt", "pass --resume to continue it"),
        (dict(resume=True), "--resume needs --output-dir", ""),
        (dict(resume=True, output_dir=str(tmp_path / "empty")), "--resume", "holds no checkpoint.pt"),
        (dict(resume=True, output_dir=str(finished), batch_size=8), "--batch-size is 8 here but 4", "own flags"),
        (dict(resume=True, output_dir=str(out / "reptile")), "is not a resumable checkpoint of c2farm_mt_rlbench", ""),
        (dict(resume=True, output_dir=str(truncated)), "--resume: cannot read", "checkpoint.pt"),
        (dict(resume=True, output_dir=str(stopped)), "replay.npz does not fit this run", "remove it to resume"),
        (dict(replay_save_interval=-1, output_dir=str(tmp_path / "new")), "--replay-save-interval must be 0 or", ""),
    ]
    before = _tree(tmp_path), _tree(out)
    for change, *messages in cases:
        with pytest.raises((c2f.TaskError, SystemExit)) as error:
            c2f.main(c2f.Args(**{**base, **change}))
        text = str(error.value.code if isinstance(error.value, SystemExit) else error.value)
        assert all(m in text for m in messages) and "\n" not in text, (change, text)
    assert (_tree(tmp_path), _tree(out)) == before  # no folder, file, event or demo made, nothing changed
    c2f.main(c2f.Args(**{**base, "resume": True, "output_dir": str(finished)}))  # a finished run: nothing to do
    assert _tree(tmp_path) == before[0]
    # finetune.py --resume of a pretraining run, or of a run with other flags
    with pytest.raises(finetune.FinetuneError) as error:  # finetune.py --resume of a pretraining run
        finetune.main(["--checkpoint", paths["mt"], "--task", "drawer-open-v3", *TINY, *SAVES, "--resume",
                       "--output-dir", str(finished)])
    assert str(error.value) == (f"--resume: {finished} holds a pretraining run of c2farm_mt_rlbench, not a "
                                "fine-tuning run (no eval.csv)")
    assert _tree(tmp_path) == before[0]


def test_cli_bad_flag_is_one_line_and_creates_nothing(tmp_path):
    proc = run("c2farm_reptile_rlbench.py", *PRETRAIN, "--checkpoint-interval", "0", "--output-dir",
               str(tmp_path / "run"), ok=False)
    assert proc.returncode == 1 and proc.stderr.strip() == \
        "c2farm_reptile_rlbench.py: error: --checkpoint-interval must be at least 1 (got 0)"
    proc = run("c2farm_pearl_rlbench.py", *PRETRAIN, "--resume", ok=False)
    assert proc.returncode == 1 and proc.stderr.strip() == \
        "c2farm_pearl_rlbench.py: error: --resume needs --output-dir: the directory of the run to continue"
    assert not list(tmp_path.iterdir())

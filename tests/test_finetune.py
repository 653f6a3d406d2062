"""finetune.py's own command line: --help with the base script's flags, and --output-dir checks."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(ROOT, "finetune.py")


def run_finetune(args, cwd):
    return subprocess.run([sys.executable, FINETUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_without_a_task_shows_finetune_flags_only(tmp_path):
    out = run_finetune(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--load-encoder-only" in out.stdout
    assert "--num-steps" not in out.stdout  # the base script's flags need a task
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("benchmark,task,script_flag", [
    ("procgen", "10000", "--num-envs"),
    ("atari", "Pong", "--buffer-size"),
    ("rlbench", "drawer-open-v3", "--demos"),
])
def test_help_with_a_task_shows_the_base_script_flags(tmp_path, benchmark, task, script_flag):
    out = run_finetune(["--scratch", benchmark, "--task", task, "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--load-encoder-only" in out.stdout  # finetune.py's own flags first
    assert script_flag in out.stdout  # then the base script's
    assert os.listdir(tmp_path) == []  # --help creates nothing


def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    out = run_finetune(["--scratch", "procgen", "--task", "10000", "--output-dir", "taken"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["finetune.py: error: --output-dir taken is a file, not a directory"]
    out = run_finetune(["--scratch", "procgen", "--task", "10000", "--output-dir", "taken/run"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"finetune.py: error: --output-dir taken/run lies under the file {tmp_path / 'taken'}, not a directory"]
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_output_dir_with_a_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "done_run"
    run_dir.mkdir()
    (run_dir / "eval.csv").write_text("env_step,mean_return,episodes\n0,5,100\n")
    out = run_finetune(["--scratch", "procgen", "--task", "10000", "--output-dir", "done_run"], tmp_path)
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("finetune.py: error: --output-dir done_run already holds a run (eval.csv)")
    assert (run_dir / "eval.csv").read_text() == "env_step,mean_return,episodes\n0,5,100\n"
    assert os.listdir(run_dir) == ["eval.csv"]


def test_missing_task_or_source_is_a_usage_error(tmp_path):
    out = run_finetune(["--scratch", "procgen"], tmp_path)
    assert out.returncode == 2 and "--task" in out.stderr
    out = run_finetune(["--task", "10000"], tmp_path)
    assert out.returncode == 2 and "--checkpoint --scratch" in out.stderr


def test_run_creates_nothing_until_used_and_a_resumed_run_continues_eval_csv(tmp_path):
    sys.path.insert(0, ROOT)
    import finetune

    out = tmp_path / "run"
    run = finetune.Run(str(out), "mean_return")
    assert not out.exists()  # a benchmark's flag errors come before anything is made
    for step, value in ((0, 1.0), (10, 2.0), (20, 3.0)):
        run.log_eval(step, value, 5)
    run.close()
    # resumed from a checkpoint at step 10: the row at 20 was logged after it, and is logged again
    (out / "checkpoint.pt").touch()  # Run re-checks the folder: a resume needs a checkpoint there
    run = finetune.Run(str(out), "mean_return", resume=True, resume_step=10)
    run.log_eval(20, 4.0, 5)
    summary = run.close("resumed")
    assert (out / "eval.csv").read_text().splitlines() == ["env_step,mean_return,episodes", "0,1,5", "10,2,5", "20,4,5"]
    assert "over 3 evaluations" in summary  # the curve before the resume counts too


def test_load_state_names_the_mismatched_entry_in_one_line():
    sys.path.insert(0, ROOT)
    import torch

    import finetune

    net = torch.nn.Linear(3, 2)
    good = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(finetune.FinetuneError, match=r"^checkpoint c.pt does not fit the head: 'weight' has shape "
                                                     r"\(4, 3\), the head expects \(2, 3\)$"):
        finetune.load_state(net, {**good, "weight": torch.zeros(4, 3)}, "c.pt", "head")
    with pytest.raises(finetune.FinetuneError, match="it lacks 'bias'"):
        finetune.load_state(net, {"weight": good["weight"]}, "c.pt", "head")
    with pytest.raises(finetune.FinetuneError, match="unexpected entry 'extra'"):
        finetune.load_state(net, {**good, "extra": torch.zeros(1)}, "c.pt", "head")
    missing, unexpected = finetune.load_state(net, {"weight": good["weight"]}, "c.pt", "head", strict=False)
    assert missing == ["bias"] and unexpected == []

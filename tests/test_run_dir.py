"""envs/run_dir.py: output-directory checks, the lock, atomic saves, random states, the stop flag."""

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from envs.run_dir import (CHECKPOINT, StopRequest, atomic_save, check_output_dir, open_output_dir, rng_state,
                          set_rng_state)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_of(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = str(e.value.code)
    assert "\n" not in message and message.startswith("error: ")
    return message


def test_output_dir_that_is_a_file_or_under_one(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    assert "is a file, not a directory" in error_of(check_output_dir, str(f), False)
    assert f"lies under the file {f}" in error_of(check_output_dir, str(f / "run"), False)
    assert os.listdir(tmp_path) == ["f"]


def test_a_folder_holding_a_run_needs_resume(tmp_path):
    check_output_dir(str(tmp_path / "new"), False)  # a new folder is fine, and is not created
    assert not (tmp_path / "new").exists()
    (tmp_path / "log.txt").write_text("study log")  # a study's log alone is not a run
    check_output_dir(str(tmp_path), False)
    (tmp_path / "eval.csv").write_text("env_step\n")
    assert "no checkpoint.pt to resume from" in error_of(check_output_dir, str(tmp_path), False)
    (tmp_path / CHECKPOINT).write_bytes(b"")
    message = error_of(check_output_dir, str(tmp_path), False)
    assert "already holds a run" in message and "--resume" in message and "another --output-dir" in message
    check_output_dir(str(tmp_path), True)
    assert "holds no checkpoint.pt" in error_of(check_output_dir, str(tmp_path / "new"), True)


def test_unwritable_folder(tmp_path, monkeypatch):
    """As a non-root user on a read-only folder (CI runs as root, so os.access is stood in for)."""
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: os.path.abspath(p) != str(tmp_path / "ro"))
    message = error_of(check_output_dir, str(tmp_path / "ro" / "run"), False)
    assert message == f"error: --output-dir {tmp_path / 'ro' / 'run'} is not writable (no write permission on {tmp_path / 'ro'})"


def test_lock_refuses_a_second_process(tmp_path):
    handle = open_output_dir(str(tmp_path / "run"))
    code = ("import sys; sys.path.insert(0, %r); from envs.run_dir import open_output_dir; "
            "open_output_dir(%r)" % (ROOT, str(tmp_path / "run")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: --output-dir {tmp_path / 'run'} is in use by another running process"
    handle.close()  # released: a later run may take it
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_atomic_save_leaves_no_temporary(tmp_path):
    atomic_save({"a": torch.arange(3)}, str(tmp_path / CHECKPOINT))
    assert os.listdir(tmp_path) == [CHECKPOINT]
    assert torch.equal(torch.load(tmp_path / CHECKPOINT, weights_only=True)["a"], torch.arange(3))


def test_random_states_round_trip_through_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian is part of numpy's state
    atomic_save({"rng": rng_state()}, str(tmp_path / "r.pt"))
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_stop_request_turns_a_signal_into_a_flag():
    stop = StopRequest()
    try:
        assert not stop
        signal.raise_signal(signal.SIGTERM)
        assert stop and stop.signum == signal.SIGTERM
        with pytest.raises(SystemExit) as e:
            stop.exit("somewhere", 123)
        assert e.value.code == 128 + signal.SIGTERM
    finally:
        stop.restore()


def test_save_arrays_round_trips_and_leaves_no_temporary(tmp_path):
    from envs.run_dir import remove_temporaries, save_arrays

    path = str(tmp_path / "replay.npz")
    frames = np.arange(3 * 84 * 84, dtype=np.uint8).reshape(3, 84, 84)
    save_arrays(path, {"0/frames": frames, "global_step": np.int64(7), "rng": np.array('{"a": 1}')}, compresslevel=1)
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == ["0/frames", "global_step", "rng"]
        assert np.array_equal(f["0/frames"], frames) and f["0/frames"].dtype == np.uint8
        assert int(f["global_step"]) == 7 and str(f["rng"]) == '{"a": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.npz"]
    (tmp_path / "replay.npz.123.tmp").write_bytes(b"half")
    remove_temporaries(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.npz"]


def test_use_bf16_follows_the_flag_and_in_auto_the_hardware():
    from envs.run_dir import use_bf16

    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu) is True and use_bf16("fp32", cpu) is False
    assert use_bf16("auto", cpu) == bool(torch.backends.mkldnn.is_available()
                                         and torch.ops.mkldnn._is_mkldnn_bf16_supported())

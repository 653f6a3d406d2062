"""The benchmark scripts' own pieces: what they run must exist (they are not run by the suite)."""

import importlib.util
import os
import sys

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_atari_py_shim_finds_kaixhins_games():
    shim = load("benchmarks/atari_py_shim/atari_py.py", "atari_py_shim")
    assert "pong" in shim.list_games() and "space_invaders" in shim.list_games()
    path = shim.get_game_path("pong")
    assert path.endswith("pong.bin") and os.path.isfile(path)
    ale = shim.ALEInterface()
    ale.setInt("frame_skip", 0)
    ale.loadROM(path)
    assert len(ale.getMinimalActionSet()) == 6 and ale.getScreenGrayscale().shape == (210, 160)


def test_der_benchmark_runs_our_script_with_flags_it_has(tmp_path):
    bench = load("benchmarks/bench_der_kaixhin.py", "bench_der_kaixhin")
    sys.path.insert(0, ROOT)
    import rainbow_mt_atari

    cmd = bench.ours(5600, str(tmp_path / "out"))
    args = tyro.cli(rainbow_mt_atari.Args, args=cmd[2:])
    assert (args.games, args.pad_actions, args.buffer_size, args.learning_starts, args.total_timesteps) == (
        ("Pong",), False, 100_000, 1600, 5600)
    # DER's settings, as the Kaixhin/Rainbow side is given them
    assert (args.n_step, args.hidden_size, args.learning_rate, args.target_network_frequency, args.batch_size,
            args.replay_ratio) == (20, 256, 1e-4, 2000, 32, 1)
    theirs = bench.kaixhin(5600, "/k")
    assert theirs[theirs.index("--multi-step") + 1] == "20" and theirs[theirs.index("--T-max") + 1] == "5600"
    assert theirs[theirs.index("--learn-start") + 1] == "1600"
    # the warm-up runs: 1600 env steps and no update on either side
    warm, warm_theirs = tyro.cli(rainbow_mt_atari.Args, args=bench.ours(1600, "o")[2:]), bench.kaixhin(1600, "/k")
    assert (warm.total_timesteps, warm.learning_starts) == (1600, 1601)
    assert warm_theirs[warm_theirs.index("--learn-start") + 1] == "1601"


def test_c2farm_benchmark_runs_on_the_scripts_interface(tmp_path):
    """bench_c2farm.py builds the learner from the script's and envs/rlbench.py's pieces; a tiny run
    of every variant proves the calls still fit (the numbers are not checked: no test times anything)."""
    import subprocess

    env = dict(os.environ, MUJOCO_GL="egl", EGL_PLATFORM="surfaceless", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_c2farm.py"), "--batch-size", "2",
                           "--image-size", "64", "--unet-widths", "8", "--updates", "1", "--env-steps", "2",
                           "--variants", "fp32", "bf16", "channels-last"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for variant in ("fp32", "bf16", "channels-last"):
        assert f"unet_width 8, {variant}: " in proc.stdout
    assert "acting:" in proc.stdout
    assert os.listdir(tmp_path) == []  # nothing written

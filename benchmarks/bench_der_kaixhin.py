"""Data-efficient Rainbow: rainbow_mt_atari.py against Kaixhin/Rainbow, on one CPU, interleaved.

Both learn Pong from scratch with DER's settings (van Hasselt et al. 2019; Kaixhin/Rainbow's
README "data-efficient" options): 100k replay, learning from env step 1600, one update of batch 32
per env step, 20-step returns, target sync every 2000 steps, hidden size 256, learning rate 1e-4,
the game's own 6 actions, no evaluation. The figure is the speed of the 4000 env steps after
learning starts, from whole-process wall times:

    env steps/s = 4000 / (time of a 5600-step run - time of a 1600-step run)

so start-up, imports and the warm-up steps cancel. Runs alternate (ours, theirs, ours warm-up,
theirs warm-up) for --rounds rounds; each figure is printed as it comes, then the medians.

    git clone https://github.com/Kaixhin/Rainbow /path/to/Kaixhin-Rainbow
    pip install opencv-python-headless plotly tqdm     # Kaixhin/Rainbow's imports (not ours)
    python benchmarks/bench_der_kaixhin.py --kaixhin-dir /path/to/Kaixhin-Rainbow --rounds 2

Kaixhin/Rainbow imports `atari_py`, which no longer installs on Python 3.11; its calls map one to
one onto ale-py's `ALEInterface`, and benchmarks/atari_py_shim/atari_py.py provides them. Run on
an otherwise idle machine and name its CPU with the numbers.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(ROOT, "benchmarks", "atari_py_shim")
WARMUP, AFTER = 1600, 4000  # env steps before learning starts, and measured after it

# Kaixhin/Rainbow's env.close() calls cv2.destroyAllWindows(), which a headless OpenCV build cannot
# do; the launcher makes it a no-op and then runs main.py as its own script.
LAUNCHER = ("import os, runpy, sys, cv2; cv2.destroyAllWindows = lambda: None; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')")


def learn_start(steps: int) -> int:
    """The env step of the first update: WARMUP; in the warm-up run one later, so that it runs WARMUP
    env steps and no update (Kaixhin/Rainbow's main.py also divides by T_max - learn_start)."""
    return WARMUP + 1 if steps == WARMUP else WARMUP


def ours(steps: int, out: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "rainbow_mt_atari.py"), "--games", "Pong", "--no-pad-actions",
            "--games-per-batch", "1", "--buffer-size", "100000", "--learning-starts", str(learn_start(steps)),
            "--total-timesteps", str(steps), "--save-every", "1000000", "--save-replay-every", "1000000",
            "--output-dir", out]


def kaixhin(steps: int, kaixhin_dir: str) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, os.path.join(kaixhin_dir, "main.py"), "--game", "pong", "--disable-cuda",
            "--T-max", str(steps), "--learn-start", str(learn_start(steps)), "--memory-capacity", "100000",
            "--replay-frequency", "1", "--multi-step", "20", "--architecture", "data-efficient", "--hidden-size",
            "256", "--learning-rate", "0.0001", "--target-update", "2000", "--evaluation-interval", "1000000"]


def timed(cmd: list[str], cwd: str, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return seconds


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {len(names)} logical cores"
    except (OSError, IndexError):
        return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kaixhin-dir", required=True, help="a clone of github.com/Kaixhin/Rainbow")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (4 runs each)")
    opts = parser.parse_args()
    if not os.path.isfile(os.path.join(opts.kaixhin_dir, "main.py")):
        raise SystemExit(f"error: --kaixhin-dir {opts.kaixhin_dir} has no main.py (a clone of Kaixhin/Rainbow)")
    if opts.rounds < 1:
        raise SystemExit(f"error: --rounds must be at least 1 (got {opts.rounds})")
    their_env = dict(os.environ, PYTHONPATH=os.pathsep.join([SHIM, os.environ.get("PYTHONPATH", "")]))
    print(f"CPU: {cpu_name()}; Pong, {WARMUP} warm-up + {AFTER} learning env steps", flush=True)
    speeds = {"rainbow_mt_atari.py": [], "Kaixhin/Rainbow": []}
    for r in range(opts.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            # Kaixhin/Rainbow writes results/ under its working directory: a fresh one per run
            t = {
                "ours": timed(ours(WARMUP + AFTER, os.path.join(tmp, "full")), tmp, dict(os.environ)),
                "theirs": timed(kaixhin(WARMUP + AFTER, opts.kaixhin_dir), tmp, their_env),
                "ours_warmup": timed(ours(WARMUP, os.path.join(tmp, "warm")), tmp, dict(os.environ)),
                "theirs_warmup": timed(kaixhin(WARMUP, opts.kaixhin_dir), tmp, their_env),
            }
        for name, key in (("rainbow_mt_atari.py", "ours"), ("Kaixhin/Rainbow", "theirs")):
            speeds[name].append(AFTER / (t[key] - t[f"{key}_warmup"]))
            print(f"[round {r + 1}] {name}: {t[key]:.1f} s for {WARMUP + AFTER} steps, {t[f'{key}_warmup']:.1f} s for "
                  f"{WARMUP}: {speeds[name][-1]:.1f} env steps/s after learning starts", flush=True)
    a, b = (statistics.median(v) for v in speeds.values())
    print(f"median: rainbow_mt_atari.py {a:.1f}, Kaixhin/Rainbow {b:.1f} env steps/s; ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()

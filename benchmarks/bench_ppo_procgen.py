"""Steps per second of ppo_mt_procgen.py, optionally next to CleanRL's ppo_procgen.py.

Both run at identical settings: CoinRun, 16 envs x 64 steps, 3 epochs, 4 minibatches,
no KL early stopping (CleanRL's default), reward normalisation on, easy mode with
unlimited levels (CleanRL's hard-coded environment). SPS is each script's own figure:
env steps / wall seconds since its training loop started, read from its last report.

    python benchmarks/bench_ppo_procgen.py --iterations 10
    python benchmarks/bench_ppo_procgen.py --paper --cuda --iterations 10   # 256 envs x 256 steps, on a GPU
    python benchmarks/bench_ppo_procgen.py --cleanrl-script /path/to/cleanrl/ppo_procgen.py \\
        --cleanrl-python /path/to/venv-with-gym-0.23.1/bin/python

CleanRL's script needs gym==0.23.1, which conflicts with nothing here but is not in our
requirements: give it its own virtual environment (`python -m venv --system-site-packages`).
Other processes on the machine distort both numbers; run it on an idle machine.

`--paper` runs ppo_mt_procgen.py alone at its defaults, the paper's settings (hard CoinRun, 1000
levels, 256 envs x 256 steps, 3 epochs, 32 minibatches, KL early stopping); with `--cuda` on a GPU.
At 20,000 SPS the paper's 100M-step pretraining takes about 1.4 hours.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_ENVS, NUM_STEPS, EPOCHS, MINIBATCHES = 16, 64, 3, 4


def last_sps(output: str, pattern: str) -> int:
    found = re.findall(pattern, output)
    if not found:
        raise SystemExit(f"no SPS report in the output:\n{output[-2000:]}")
    return int(found[-1])


def steady_sps(output: str) -> int | None:
    """ppo_mt_procgen.py's SPS after its first iteration (start-up, cuDNN and CUDA-graph warm-up
    left out), from its cumulative reports: iteration i ended at step_i / SPS_i seconds."""
    reports = [(int(step), int(sps)) for step, sps in re.findall(r"step=(\d+) .*SPS=(\d+)", output)]
    if len(reports) < 2:
        return None
    (s1, r1), (sn, rn) = reports[0], reports[-1]
    return round((sn - s1) / (sn / rn - s1 / r1))


def run(cmd: list[str], pattern: str, cwd: str, steady: bool = False):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    sps = last_sps(proc.stdout + proc.stderr, pattern)
    return (sps, steady_sps(proc.stdout)) if steady else sps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10, help="PPO iterations per run (num envs x num steps env steps each)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the runs this many times, report each")
    parser.add_argument("--cleanrl-script", default=None, help="path to CleanRL's cleanrl/ppo_procgen.py")
    parser.add_argument("--cleanrl-python", default=sys.executable, help="interpreter with gym==0.23.1 for CleanRL")
    parser.add_argument("--paper", action="store_true", help="ppo_mt_procgen.py alone at the paper's settings")
    parser.add_argument("--cuda", action="store_true", help="let ppo_mt_procgen.py use CUDA (default: CPU)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra flags for ppo_mt_procgen.py")
    opts = parser.parse_args()
    script = [sys.executable, os.path.join(ROOT, "ppo_mt_procgen.py"), "--cuda" if opts.cuda else "--no-cuda"]
    if opts.paper:
        if opts.cleanrl_script:
            raise SystemExit("error: --paper runs ppo_mt_procgen.py alone; drop --cleanrl-script")
        sys.path.insert(0, ROOT)
        from ppo_mt_procgen import Args

        d = Args()
        steps = opts.iterations * d.num_envs * d.num_steps
        ours_cmd = [*script, "--total-timesteps", str(steps), *opts.extra]
        print(f"settings: the paper's ({d.distribution_mode} {d.env_id}, {d.num_levels} levels, {d.num_envs} envs x "
              f"{d.num_steps} steps, {d.update_epochs} epochs, {d.num_minibatches} minibatches), {steps} env steps "
              f"per run, {'CUDA' if opts.cuda else 'CPU'}")
    else:
        steps = opts.iterations * NUM_ENVS * NUM_STEPS
        common = ["--num-envs", str(NUM_ENVS), "--num-steps", str(NUM_STEPS), "--update-epochs", str(EPOCHS),
                  "--num-minibatches", str(MINIBATCHES), "--total-timesteps", str(steps)]
        ours_cmd = [*script, *common, "--num-levels", "0", "--distribution-mode", "easy", "--target-kl", "None",
                    *opts.extra]
        print(f"settings: coinrun, {NUM_ENVS} envs x {NUM_STEPS} steps, {EPOCHS} epochs, {MINIBATCHES} minibatches, "
              f"{steps} env steps per run, torch threads = {os.cpu_count()} cores")
    results = {"ours": [], "cleanrl": []}
    for r in range(opts.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            sps, steady = run(ours_cmd + ["--output-dir", tmp], r"SPS=(\d+)", tmp, steady=True)
            results["ours"].append(sps)
            print(f"[{r}] ppo_mt_procgen.py: {sps} SPS ({steady} SPS after the first iteration)", flush=True)
            if opts.cleanrl_script:
                cl_cmd = [opts.cleanrl_python, os.path.abspath(opts.cleanrl_script), "--env-id", "coinrun", *common,
                          "--cuda" if opts.cuda else "--no-cuda"]
                results["cleanrl"].append(run(cl_cmd, r"SPS: (\d+)", tmp))
                print(f"[{r}] CleanRL ppo_procgen.py: {results['cleanrl'][-1]} SPS", flush=True)
    ours = statistics.median(results["ours"])
    line = f"median SPS: ppo_mt_procgen.py {ours:.0f}"
    if results["cleanrl"]:
        cl = statistics.median(results["cleanrl"])
        line += f", CleanRL ppo_procgen.py {cl:.0f}, speed-up {ours / cl:.2f}x"
    print(line)


if __name__ == "__main__":
    main()

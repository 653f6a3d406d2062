"""study.py: the grids of the paper presets, run ids, the two-stage DAG, resume after a kill,
--retry-failed, atomic results.csv, both executors, and one real Procgen smoke grid.

Most tests run a stand-in script (written into tmp_path, no torch, a fraction of a second per
run) through a study spec that points at it, so that the runner's logic is tested quickly and
exactly; test_procgen_smoke_grid_end_to_end runs the real scripts."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import study  # noqa: E402

FAKE = r'''
import argparse, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--output-dir", required=True)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--checkpoint")
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--fail-if")
RESUME
args, _ = p.parse_known_args()
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(os.path.basename(args.output_dir) + " " + " ".join(sys.argv[1:]) + "\n")
if args.checkpoint and not os.path.exists(args.checkpoint):
    sys.exit("fake: pretraining checkpoint missing: " + args.checkpoint)
with open(os.path.join(args.output_dir, "events.txt"), "w") as f:
    f.write("started on " + os.environ.get("CUDA_VISIBLE_DEVICES", "cpu") + "\n")
time.sleep(args.sleep)
if args.fail_if and os.path.exists(args.fail_if):
    sys.exit("fake: asked to fail")
with open(os.path.join(args.output_dir, "eval.csv"), "w") as f:
    f.write("env_step,mean_return,episodes\n0,%d,10\n50,5,10\n100,9,10\n" % args.seed)
with open(os.path.join(args.output_dir, "checkpoint.pt"), "w") as f:
    f.write("not a torch file")
print("fake done")
'''


def fake_study(tmp_path, sleep=0.0, resume=False, methods=("mt", "reptile"), seeds=(1, 2), tasks=("a", "b"),
               scratch=True, big=True):
    script = tmp_path / ("fake_resume.py" if resume else "fake.py")
    script.write_text(FAKE.replace("RESUME", 'p.add_argument("--resume", action="store_true")' if resume else ""))
    spec = tmp_path / "fake.toml"
    train_sets = ['{ name = "small", flags = [] }']
    if big:
        train_sets.append(f'{{ name = "big", flags = ["--fail-if", "{tmp_path / "fail-big"}"] }}')
    spec.write_text(f"""
benchmark = "fake"
[scripts]
mt = "{script}"
reptile = "{script}"
finetune = "{script}"
[presets.tiny]
methods = {json.dumps(list(methods))}
scratch = {str(scratch).lower()}
pretrain_seeds = [1]
adapt_seeds = {json.dumps(list(seeds))}
tasks = {json.dumps(list(tasks))}
pretrain_flags = ["--sleep", "{sleep}"]
adapt_flags = ["--sleep", "{sleep}"]
gpu_flags = ["--cuda"]
train_sets = [{", ".join(train_sets)}]
""")
    return spec


def env_for(tmp_path):
    return dict(os.environ, FAKE_LOG=str(tmp_path / "launches.txt"))


def study_cmd(*argv):
    return [sys.executable, os.path.join(ROOT, "study.py"), *map(str, argv)]


def run_study(tmp_path, *argv, ok=True, timeout=240):
    proc = subprocess.run(study_cmd(*argv), cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def results(d):
    with open(os.path.join(d, "results.csv")) as f:
        return list(csv.DictReader(f))


def launches(tmp_path):
    path = tmp_path / "launches.txt"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------- the grids


def grid(benchmark, preset):
    return study.build_grid(study.load_spec(benchmark, preset, None))


def test_procgen_paper_grid_is_the_papers():
    runs = grid("procgen", "paper")
    pre = [r for r in runs if r.stage == "pretrain"]
    adapt = [r for r in runs if r.stage == "adapt" and r.method != "scratch"]
    scratch = [r for r in runs if r.method == "scratch"]
    # 3 methods x 3 training-set sizes; each adapted on 20 levels x 5 seeds; scratch on the same
    assert len(pre) == 9 and len(adapt) == 9 * 20 * 5 == 900 and len(scratch) == 20 * 5 and len(runs) == 1009
    assert {(r.method, r.train_set) for r in pre} == {(m, s) for m in ("mt", "reptile", "rl2")
                                                       for s in ("100", "1000", "10000")}
    levels = {str(level) for level in range(10000, 10020)}
    for p in pre:
        mine = [r for r in adapt if r.pretrain is p]
        assert {(r.task, r.seed) for r in mine} == {(t, s) for t in levels for s in range(1, 6)}
        assert all(r.method == p.method and r.train_set == p.train_set for r in mine)
        assert p.flags["--num-levels"] == (p.train_set,) and p.flags["--start-level"] == ("0",)
    assert {(r.task, r.seed) for r in scratch} == {(t, s) for t in levels for s in range(1, 6)}
    assert all(r.flags["--scratch"] == ("procgen",) for r in scratch)


def test_atari_paper_grid_is_the_papers():
    runs = grid("atari", "paper")
    pre = [r for r in runs if r.stage == "pretrain"]
    adapt = [r for r in runs if r.stage == "adapt" and r.method != "scratch"]
    scratch = [r for r in runs if r.method == "scratch"]
    games = {"Pong", "Assault", "BattleZone", "MsPacman", "BeamRider"}
    # 3 methods x (5 one-game pretrainings + the 5-game + the 10-game set); 3 x 3 sets x 5 games x 10 seeds
    assert len(pre) == 21 and len(adapt) == 3 * 3 * 5 * 10 == 450 and len(scratch) == 5 * 10
    pairs = {"Breakout": "Pong", "DemonAttack": "Assault", "Robotank": "BattleZone", "BankHeist": "MsPacman",
             "Solaris": "BeamRider"}
    for p in pre:
        mine = [r for r in adapt if r.pretrain is p]
        if p.train_set == "1":  # each test game's paired source game, 500k steps, adapted on that game only
            (source,) = p.flags["--games"]
            assert p.flags["--total-timesteps"] == ("500000",)
            assert {r.task for r in mine} == {pairs[source]}
        else:
            assert p.flags["--train-games"] == (p.train_set,) and "--total-timesteps" not in p.flags  # 1M default
            assert {r.task for r in mine} == games
        assert {r.seed for r in mine} == set(range(10))
    assert {(r.task, r.seed) for r in scratch} == {(g, s) for g in games for s in range(10)}
    assert all(r.flags["--eval-every"] == ("5000",) for r in adapt + scratch)


def test_rlbench_paper_grids_are_the_papers():
    runs = grid("rlbench", "paper")
    pre = [r for r in runs if r.stage == "pretrain"]
    adapt = [r for r in runs if r.stage == "adapt" and r.method != "scratch"]
    scratch = [r for r in runs if r.method == "scratch"]
    # leave one out: 3 methods x 5 held-out tasks; each adapted on its task x demos 0/1/2 x 5 seeds
    assert len(pre) == 15 and len(adapt) == 15 * 3 * 5 == 225 and len(scratch) == 5 * 3 * 5
    for p in pre:
        mine = [r for r in adapt if r.pretrain is p]
        (held_out,) = p.flags["--held-out-task"]
        assert {(r.task, r.demos, r.seed) for r in mine} == {(held_out, d, s) for d in "012" for s in range(1, 6)}
        assert p.train_set == f"all-but-{held_out}"
    assert all(r.flags["--scratch"] == ("rlbench",) and r.flags["--backend"] == ("rlbench",) for r in scratch)
    runs = grid("rlbench", "paper-metaworld")
    tasks = {"drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3", "lever-pull-v3"}
    assert sum(r.stage == "pretrain" for r in runs) == 3
    assert {(r.task, r.demos, r.seed) for r in runs if r.method == "mt" and r.stage == "adapt"} == {
        (t, d, s) for t in tasks for d in "012" for s in range(1, 6)}
    assert len(runs) == 3 + 225 + 75


def test_run_ids_are_stable_and_follow_the_configuration():
    a, b = grid("procgen", "smoke"), grid("procgen", "smoke")
    assert [r.run_id for r in a] == [r.run_id for r in b]
    assert len({r.run_id for r in a}) == len(a)
    assert a[0].run_id.startswith("procgen-pretrain-mt-10-s1-")
    adapt = next(r for r in a if r.method == "rl2" and r.stage == "adapt")
    assert adapt.run_id.startswith("procgen-adapt-rl2-10-10000-s1-")
    spec = study.load_spec("procgen", "smoke", None)
    renamed = {**spec, "preset": "another-name", "spec": "/elsewhere/procgen.toml"}
    assert [r.run_id for r in study.build_grid(renamed)] == [r.run_id for r in a]  # preset-independent
    flags = dict(a[0].flags)
    same = study.Run("pretrain", "procgen", "mt", "10", "10", "", "", 1, a[0].script, dict(reversed(flags.items())))
    assert same.run_id == a[0].run_id  # flag order does not matter
    changes = [dict(flags, **{"--total-timesteps": ("1024",)}), dict(flags, **{"--anneal-lr": ()})]
    for changed in changes:
        other = study.Run("pretrain", "procgen", "mt", "10", "10", "", "", 1, a[0].script, changed)
        assert other.run_id != a[0].run_id
    assert study.Run("pretrain", "procgen", "mt", "10", "10", "", "", 2, a[0].script, flags).run_id != a[0].run_id
    # an adaptation's id follows its pretraining run's configuration
    longer = study.Run("pretrain", "procgen", "mt", "10", "10", "", "", 1, a[0].script, changes[0])
    ft = next(r for r in a if r.pretrain is a[0])
    moved = study.Run("adapt", "procgen", "mt", "10", "10", ft.task, "", 1, ft.script, ft.flags, pretrain=longer)
    assert moved.run_id != ft.run_id


def test_flags_later_values_override():
    assert study.merged(study.parse_flags(["--a", 1, "--b"], "x"), study.parse_flags(["--a", 2], "y")) == {
        "--b": (), "--a": ("2",)}
    with pytest.raises(study.StudyError, match="comes before any --flag"):
        study.parse_flags(["7", "--a"], "here")


# --------------------------------------------------------------------------- the runner, with a stand-in script


def test_dag_blocked_and_retry_failed(tmp_path):
    spec, d = fake_study(tmp_path), tmp_path / "study"
    (tmp_path / "fail-big").write_text("")
    proc = run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d, "--workers", "2", ok=False)
    assert proc.returncode == 1, proc.stderr
    rows = {r["run_id"]: r for r in results(d)}
    assert len(rows) == 4 + 4 * 2 * 2 + 2 * 2
    for r in rows.values():
        if r["stage"] == "pretrain":
            assert r["status"] == ("failed" if r["train_set"] == "big" else "done")
        elif r["train_set"] == "big":
            assert r["status"] == "blocked" and r["env_steps"] == ""
        else:  # each adaptation started after its checkpoint existed (the fake exits 1 otherwise)
            assert r["status"] == "done" and r["env_steps"] == "100" and r["final"] == "9.0"
            assert float(r["zero_shot"]) == float(r["seed"]) and float(r["auc"]) == pytest.approx((int(r["seed"]) + 14) / 3)
    failed = [rid for rid, r in rows.items() if r["status"] == "failed"]
    assert json.load(open(d / "runs" / failed[0] / "failed.json"))["exit_code"] == 1
    assert "fake: asked to fail" in (d / "runs" / failed[0] / "log.txt").read_text()
    first = len(launches(tmp_path))
    assert first == 2 + 2 + 8 + 4  # 4 pretrainings, the small set's 8 adaptations, 4 scratch

    proc = run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d, ok=False)
    assert proc.returncode == 1 and len(launches(tmp_path)) == first  # failed runs stay failed, done stay done
    (tmp_path / "fail-big").unlink()
    run_study(tmp_path, "run", "--study-dir", d, "--retry-failed")  # continues from DIR/study.toml
    assert all(r["status"] == "done" for r in results(d))
    assert len(launches(tmp_path)) == first + 2 + 8
    for rid in failed:  # the failed attempt's files are kept aside
        assert (d / "runs" / f"{rid}.failed-1" / "failed.json").exists() and (d / "runs" / rid / "done.json").exists()


def test_a_changed_grid_needs_update_grid_and_keeps_unchanged_runs(tmp_path):
    spec, d = fake_study(tmp_path, methods=("mt",), seeds=(1,), tasks=("a",), big=False), tmp_path / "study"
    run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d)
    first = launches(tmp_path)
    assert len(first) == 3
    spec.write_text(spec.read_text().replace("adapt_seeds = [1]", "adapt_seeds = [1, 2]"))
    proc = run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d, ok=False)
    assert proc.returncode == 2 and "holds a different grid" in proc.stderr and launches(tmp_path) == first
    run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d, "--update-grid")
    assert len(results(d)) == 5 and all(r["status"] == "done" for r in results(d))
    assert sorted(launches(tmp_path)[3:]) == sorted(r["run_id"] for r in results(d) if r["seed"] == "2")
    assert study.tomllib.load(open(d / "study.toml", "rb"))["grid"]["adapt_seeds"] == [1, 2]


def test_resume_after_kill_9_of_the_runner(tmp_path):
    spec, d = fake_study(tmp_path, sleep=1.5, big=False), tmp_path / "study"
    runner = subprocess.Popen(study_cmd("run", "--spec", spec, "--preset", "tiny", "--study-dir", d, "--workers", "2"),
                              cwd=ROOT, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, victims = time.time() + 120, []
    while time.time() < deadline:  # kill once some runs are done and others are mid-run
        done = list(d.glob("runs/*/done.json"))
        victims = [p.parent for p in d.glob("runs/*/running.json") if not (p.parent / "done.json").exists()]
        if len(done) >= 3 and victims:
            break
        time.sleep(0.05)
    runner.kill()
    runner.wait()
    assert victims, "the runner never had a run in flight"
    time.sleep(0.5)
    pids = [json.load(open(v / "running.json"))["pid"] for v in victims if (v / "running.json").exists()]
    for _ in range(100):  # the children die with the runner (PR_SET_PDEATHSIG)
        if not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in pids):
            break
        time.sleep(0.1)
    else:
        pytest.fail("a child outlived its runner")
    done_dirs = [p.parent for p in d.glob("runs/*/done.json")]
    mtimes = {str(f): f.stat().st_mtime_ns for dd in done_dirs for f in dd.iterdir()}
    assert all(r["status"] != "done" or (d / "runs" / r["run_id"] / "done.json").exists() for r in results(d))
    before = launches(tmp_path)

    run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d, "--workers", "2")
    assert all(r["status"] == "done" for r in results(d)) and len(results(d)) == 2 + 8 + 4
    assert {str(f): f.stat().st_mtime_ns for dd in done_dirs for f in dd.iterdir()} == mtimes  # not rerun
    again = launches(tmp_path)[len(before):]
    assert not {dd.name for dd in done_dirs} & set(again)
    assert sorted(again) == sorted(set(again))  # each remaining run once
    for v in victims:  # the interrupted attempt moved aside (the stand-in has no --resume), then run again
        assert (v.parent / f"{v.name}.interrupted-1" / "running.json").exists() and (v / "done.json").exists()


def test_interrupted_run_continues_with_resume_where_the_script_has_it(tmp_path):
    spec, d = fake_study(tmp_path, resume=True, methods=("mt",), seeds=(1,), tasks=("a",), scratch=False,
                         big=False), tmp_path / "study"
    runs = study.build_grid(study.load_spec(None, "tiny", str(spec)))
    pre = runs[0]
    os.makedirs(d / "runs" / pre.run_id)
    (d / "runs" / pre.run_id / "checkpoint.pt").write_text("half-way")
    (d / "runs" / pre.run_id / "log.txt").write_text("first attempt\n")
    run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d)
    config = json.load(open(d / "runs" / pre.run_id / "config.json"))
    assert config["resumed"] and "--resume" in config["argv"]
    assert (d / "runs" / pre.run_id / "log.txt").read_text().startswith("first attempt\n")  # appended to
    assert not list(d.glob("runs/*.interrupted-*"))
    assert all(r["status"] == "done" for r in results(d))


def test_sigint_stops_the_children_and_counts_nothing_done(tmp_path):
    spec, d = fake_study(tmp_path, sleep=30, big=False), tmp_path / "study"
    runner = subprocess.Popen(study_cmd("run", "--spec", spec, "--preset", "tiny", "--study-dir", d, "--workers", "2"),
                              cwd=ROOT, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    for _ in range(600):
        if len(list(d.glob("runs/*/running.json"))) == 2:
            break
        time.sleep(0.05)
    pids = [json.load(open(p))["pid"] for p in d.glob("runs/*/running.json")]
    assert len(pids) == 2
    runner.send_signal(signal.SIGINT)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 130 and "rerun the same command to continue" in out and "Traceback" not in out
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert {r["status"] for r in results(d)} == {"pending"} and not list(d.glob("runs/*/done.json"))


def test_results_csv_is_replaced_atomically(tmp_path, monkeypatch):
    runs = study.build_grid(study.load_spec("procgen", "smoke", None))
    status = {r.run_id: "pending" for r in runs}
    commands = {r.run_id: "cmd" for r in runs}
    study.write_results(str(tmp_path), runs, status, {}, commands)
    before = (tmp_path / "results.csv").read_text()
    assert before.splitlines()[0] == ",".join(study.RESULTS) and len(before.splitlines()) == 1 + len(runs)
    calls = []

    def broken(self, row):
        calls.append(row)
        if len(calls) > 2:
            raise OSError("disk full")
        return original(self, row)

    original = csv.DictWriter.writerow
    monkeypatch.setattr(csv.DictWriter, "writerow", broken)
    with pytest.raises(OSError):
        study.write_results(str(tmp_path), runs, {k: "done" for k in status}, {}, commands)
    assert (tmp_path / "results.csv").read_text() == before  # a crash mid-write leaves the old file whole


def test_only_runs_the_chosen_runs_and_their_pretraining(tmp_path):
    spec, d = fake_study(tmp_path, big=False), tmp_path / "study"
    proc = run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d, "--only", "task=b",
                     "--only", "seed=2", "--only", "method=mt", "--only", "method=scratch")
    assert "3 done, 0 failed, 0 blocked, 0 pending" in proc.stdout  # counts of the chosen runs
    done = [r for r in results(d) if r["status"] == "done"]
    assert {r["status"] for r in results(d) if r not in done} == {"pending"}
    assert sorted((r["stage"], r["method"], r["task"], r["seed"]) for r in done) == [
        ("adapt", "mt", "b", "2"), ("adapt", "scratch", "b", "2"), ("pretrain", "mt", "", "1")]


def test_local_executor_spreads_runs_over_gpus(tmp_path):
    spec, d = fake_study(tmp_path, sleep=0.5, methods=("mt",), seeds=(1, 2), tasks=("a",), big=False), tmp_path / "s"
    run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d, "--gpus", "2", "--runs-per-gpu", "1")
    for cfg in d.glob("runs/*/config.json"):  # the preset's gpu_flags, added where a run gets a GPU
        assert json.load(open(cfg))["argv"][-3] == "--cuda"
    assert all("--cuda" in r["command"] and r["status"] == "done" for r in results(d)) and len(results(d)) == 5
    devices = [(p / "events.txt").read_text().split()[-1] for p in d.glob("runs/*")]
    assert set(devices) == {"0", "1"}  # two workers, one GPU each


def test_ray_executor_on_a_local_ray(tmp_path):
    spec, d = fake_study(tmp_path, methods=("mt",), seeds=(1,), tasks=("a", "b"), big=False), tmp_path / "study"
    proc = run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d, "--executor", "ray",
                     "--workers", "2", timeout=300)
    assert "5 done, 0 failed" in proc.stdout
    rows = results(d)
    assert len(rows) == 1 + 2 + 2 and all(r["status"] == "done" and r["wall_s"] for r in rows)


def test_bad_input_is_one_line_and_creates_nothing(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    spec = fake_study(tmp_path)
    d = tmp_path / "new"
    cases = [
        (["--benchmark", "nope", "--preset", "smoke", "--study-dir", d], "unknown benchmark 'nope'"),
        (["--benchmark", "procgen", "--preset", "huge", "--study-dir", d], "unknown preset 'huge'"),
        (["--benchmark", "procgen", "--study-dir", d], "give --benchmark and --preset"),
        (["--benchmark", "procgen", "--preset", "smoke", "--study-dir", afile], "is a file"),
        (["--benchmark", "procgen", "--preset", "smoke", "--study-dir", d, "--only", "colour=red"], "bad --only"),
        (["--benchmark", "procgen", "--preset", "smoke", "--study-dir", d, "--only", "task=9"], "no run of this grid"),
        (["--benchmark", "procgen", "--preset", "smoke", "--study-dir", d, "--workers", "0"], "at least 1"),
    ]
    for argv, message in cases:
        proc = run_study(tmp_path, "run", *argv, ok=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, argv
    proc = run_study(tmp_path, "status", "--study-dir", d, ok=False)
    assert proc.returncode == 2 and "no study.toml" in proc.stderr
    assert not d.exists()
    # a study directory holds one grid
    run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d, "--only", "method=scratch", ok=False)
    before = sorted(os.listdir(d))
    proc = run_study(tmp_path, "run", "--benchmark", "procgen", "--preset", "smoke", "--study-dir", d, ok=False)
    assert proc.returncode == 2 and "holds a fake study" in proc.stderr
    assert sorted(os.listdir(d)) == before


def test_dry_run_and_status(tmp_path):
    d = tmp_path / "study"
    proc = run_study(tmp_path, "run", "--benchmark", "procgen", "--preset", "paper", "--study-dir", d, "--dry-run",
                     "--only", "method=rl2", "--only", "task=10003")
    lines = proc.stdout.splitlines()
    assert lines[-1] == "18 runs (3 pretraining); nothing started" and not d.exists()
    assert any(line.strip().startswith("python ppo_rl2_procgen.py --distribution-mode hard --num-levels 10000")
               for line in lines)
    spec = fake_study(tmp_path)
    (tmp_path / "fail-big").write_text("")
    run_study(tmp_path, "run", "--spec", spec, "--preset", "tiny", "--study-dir", d, ok=False)
    out = run_study(tmp_path, "status", "--study-dir", d).stdout.splitlines()
    assert out[0].startswith("fake study, preset tiny")
    table, stage = {}, None
    for line in out[1:]:
        words = line.split()
        if words and words[0] in ("pretrain", "adapt"):
            stage = words[0]
            assert words[1:] == ["method", "train_set", "done", "running", "failed", "pending", "blocked", "total"]
        elif words:
            table[(stage, *words[:-6])] = [int(x) for x in words[-6:]]
    # done, running, failed, pending, blocked, total
    assert table[("pretrain", "mt", "big")] == [0, 0, 1, 0, 0, 1]
    assert table[("pretrain", "reptile", "small")] == [1, 0, 0, 0, 0, 1]
    assert table[("adapt", "mt", "big")] == [0, 0, 0, 0, 4, 4]
    assert table[("adapt", "scratch")] == [4, 0, 0, 0, 0, 4]


# --------------------------------------------------------------------------- the real scripts


def test_procgen_smoke_grid_end_to_end(tmp_path):
    d = tmp_path / "procgen"
    proc = run_study(tmp_path, "run", "--benchmark", "procgen", "--preset", "smoke", "--study-dir", d, timeout=600)
    rows = results(d)
    assert [r["status"] for r in rows] == ["done"] * 7, proc.stdout[-2000:]
    assert {(r["stage"], r["method"]) for r in rows} == {("pretrain", m) for m in ("mt", "reptile", "rl2")} | {
        ("adapt", m) for m in ("mt", "reptile", "rl2", "scratch")}
    for r in rows:
        assert float(r["wall_s"]) > 0 and r["git_sha"]
        if r["stage"] == "adapt":
            assert r["zero_shot"] != ""  # the evaluation at step 0
        assert r["env_steps"] == "512"  # every run reaches its budget, RL2's roll-out included (a point at the end)
        run = d / "runs" / r["run_id"]
        assert (run / "log.txt").stat().st_size > 0 and json.load(open(run / "config.json"))["command"] == r["command"]
        if r["stage"] == "adapt":
            assert r["pretrain_run_id"] == ("" if r["method"] == "scratch" else
                                            next(p["run_id"] for p in rows if p["stage"] == "pretrain"
                                                 and p["method"] == r["method"]))
    assert study.tomllib.load(open(d / "study.toml", "rb"))["preset"] == "smoke"

"""Run the whole study, pretraining then adaptation to the held-out tasks, as one resumable command.

    python study.py run --benchmark procgen --preset smoke --study-dir runs/study-procgen-smoke
    python study.py run --benchmark atari --preset paper --study-dir /shared/atari --executor ray --ray-address auto
    python study.py run --benchmark procgen --preset mini --study-dir DIR --only method=mt --dry-run
    python study.py status --study-dir DIR

The grid is data: studies/<benchmark>.toml, presets paper (the study as published), mini (the
same shape for a 2-core CPU) and smoke (minutes; the tests). Stage 1 pretrains each method on
each training set and pretraining seed (`python ppo_mt_procgen.py ...`). Stage 2 adapts every
pretrained checkpoint to each of its held-out tasks x adaptation seed (x demos on RLBench) with
`python finetune.py --checkpoint ...`, and trains the scratch baseline (`finetune.py --scratch`)
on the same tasks, seeds and demos. Seeds: every adaptation seed is crossed with every
pretraining run; the paper pretrains once per method and training set and adapts with five
(Procgen, RLBench) or ten (Atari) seeds, so its presets have one pretraining seed.

Study directory:
    DIR/study.toml       the grid as run: the spec, the preset and its resolved values
    DIR/results.csv      one row per run of the grid (columns in RESULTS), rewritten atomically
    DIR/runs/<run_id>/   the run's --output-dir, with log.txt (stdout and stderr), config.json
                         (its command and full configuration) and study.py's markers:
                         running.json while it runs, then done.json or failed.json

run_id = a readable name (benchmark, stage, method, train set, task, demos, seed) plus a hash
of the run's configuration (script, flags sorted, seed, task, demos, the pretraining run it
starts from; not the preset name or DIR): the same configuration always gets the same id.

Resume: rerun the same command (or `study.py run --study-dir DIR`). A run is done only when
its done.json and outputs (checkpoint.pt, eval.csv) exist. A run with files but no marker was
interrupted: it continues with the script's --resume when the script offers one and a
checkpoint exists; otherwise its directory moves to runs/<id>.interrupted-<n>/ and it starts
again. Failed runs stay failed unless --retry-failed (their directory moves to
runs/<id>.failed-<n>/); the adaptations of a failed pretraining are blocked. Nothing is ever
deleted. Ctrl-C or SIGTERM stops the running children (each runs in its own process group;
studies/executors.py runs them).
On Ray, DIR must be on storage that every node sees, at the same path as this checkout.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field

from studies.executors import EXPECTED, LocalExecutor, RayExecutor, kill_orphan, write_json

ROOT = os.path.dirname(os.path.abspath(__file__))
STUDIES = os.path.join(ROOT, "studies")
RESULTS = ["run_id", "stage", "benchmark", "method", "train_set", "task", "demos", "seed", "status", "env_steps",
           "zero_shot", "final", "auc", "wall_s", "git_sha", "pretrain_run_id", "command"]
ONLY_KEYS = ["run_id", "stage", "method", "train_set", "task", "demos", "seed", "pretrain_run_id"]
PRESET_KEYS = {"inherit", "description", "methods", "scratch", "train_sets", "tasks", "demos", "pretrain_seeds",
               "adapt_seeds", "pretrain_flags", "adapt_flags", "scratch_flags", "method_flags", "gpu_flags",
               "cpus_per_run"}
# An interrupted run continues with this flag where its script's --help lists it (issue 15);
# set RESUME_FLAG = None to always restart interrupted runs in a fresh directory instead.
RESUME_FLAG = "--resume"


class StudyError(Exception):
    """Bad input or a study directory that does not fit: reported as one line."""


# --------------------------------------------------------------------------- the grid


@dataclass
class Run:
    stage: str  # pretrain | adapt
    benchmark: str
    method: str  # mt | reptile | rl2 | pearl | scratch
    train_set: str
    tag: str  # the train set in the run's name (e.g. 1-Breakout)
    task: str
    demos: str
    seed: int
    script: str
    flags: dict  # flag -> tuple of values, in command order
    pretrain: Run | None = None
    run_id: str = field(init=False)

    def __post_init__(self):
        config = {"benchmark": self.benchmark, "stage": self.stage, "method": self.method,
                  "train_set": self.train_set, "task": self.task, "demos": self.demos, "seed": self.seed,
                  "script": self.script, "flags": sorted([k, *v] for k, v in self.flags.items()),
                  "pretrain": self.pretrain.run_id if self.pretrain else ""}
        self.config = config
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        parts = [self.benchmark, self.stage, self.method, self.tag, self.task,
                 f"d{self.demos}" if self.demos != "" else "", f"s{self.seed}", digest]
        self.run_id = "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in parts if p != "")

    def command(self, study_dir: str, extra: list[str] = ()) -> list[str]:
        script = self.script if os.path.isabs(self.script) else os.path.join(ROOT, self.script)
        cmd = [sys.executable, script]
        if self.pretrain is not None:
            cmd += ["--checkpoint", os.path.join(run_dir(study_dir, self.pretrain), "checkpoint.pt")]
        for flag, values in self.flags.items():
            cmd += [flag, *values]
        return cmd + list(extra) + ["--output-dir", run_dir(study_dir, self)]

    def row(self) -> dict:
        return {"run_id": self.run_id, "stage": self.stage, "benchmark": self.benchmark, "method": self.method,
                "train_set": self.train_set, "task": self.task, "demos": self.demos, "seed": str(self.seed),
                "pretrain_run_id": self.pretrain.run_id if self.pretrain else ""}


def display(cmd: list[str]) -> str:
    """The command as a user reruns it by hand from the checkout."""
    shown = ["python"] + [os.path.relpath(cmd[1], ROOT) if cmd[1].startswith(ROOT + os.sep) else cmd[1]] + cmd[2:]
    return shlex.join(shown)


def parse_flags(tokens, where: str) -> dict:
    """["--num-levels", 100, "--no-norm-reward"] -> {"--num-levels": ("100",), "--no-norm-reward": ()}."""
    flags, current = {}, None
    for tok in tokens or []:
        tok = str(tok)
        if tok.startswith("--"):
            current = tok
            flags.pop(tok, None)  # a later value overrides an earlier one and takes its place
            flags[tok] = ()
        elif current is None:
            raise StudyError(f"{where}: value '{tok}' comes before any --flag")
        else:
            flags[current] += (tok,)
    return flags


def merged(*flag_lists) -> dict:
    out = {}
    for flags in flag_lists:
        for k, v in flags.items():
            out.pop(k, None)
            out[k] = v
    return out


def load_spec(benchmark: str | None, preset: str | None, spec_path: str | None) -> dict:
    """Read studies/<benchmark>.toml (or --spec) and resolve the preset: what study.toml records."""
    if spec_path is None:
        known = sorted(f[:-5] for f in os.listdir(STUDIES) if f.endswith(".toml"))
        if benchmark not in known:
            raise StudyError(f"unknown benchmark '{benchmark}': expected one of {', '.join(known)}")
        spec_path = os.path.join(STUDIES, f"{benchmark}.toml")
    try:
        with open(spec_path, "rb") as f:
            spec = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise StudyError(f"cannot read study spec {spec_path}: {e}") from None
    if benchmark is not None and spec.get("benchmark") != benchmark:
        raise StudyError(f"{spec_path} describes benchmark '{spec.get('benchmark')}', not '{benchmark}'")
    presets = spec.get("presets", {})
    if preset not in presets:
        raise StudyError(f"unknown preset '{preset}' for {spec.get('benchmark')}: expected one of {', '.join(presets)}")
    resolved, seen = {}, []
    while preset is not None:  # a preset may inherit another's values and override some of them
        if preset in seen or preset not in presets:
            raise StudyError(f"{spec_path}: preset '{seen[-1]}' inherits '{preset}', which is unknown or a cycle")
        seen.append(preset)
        resolved = {**presets[preset], **resolved}
        preset = presets[preset].get("inherit")
    resolved.pop("inherit", None)
    unknown = set(resolved) - PRESET_KEYS
    if unknown:
        raise StudyError(f"{spec_path}: preset '{seen[0]}' has unknown keys {', '.join(sorted(unknown))}")
    study = {"benchmark": spec["benchmark"], "spec": os.path.abspath(spec_path), "preset": seen[0],
             "scripts": spec.get("scripts", {}), "env": spec.get("env", {}), "grid": resolved}
    build_grid(study)  # validates
    return study


def build_grid(study: dict) -> list[Run]:
    """All runs of the grid: pretraining first, then adaptation (each pretraining run x its
    tasks x demos x adaptation seeds), then scratch on every task of the grid."""
    g, bench, scripts = study["grid"], study["benchmark"], study["scripts"]
    where = f"preset '{study['preset']}'"
    for key in ("methods", "train_sets", "pretrain_seeds", "adapt_seeds"):
        if not g.get(key):
            raise StudyError(f"{where} needs a non-empty '{key}'")
    for m in list(g["methods"]) + ["finetune"]:
        if m not in scripts:
            raise StudyError(f"the spec's [scripts] table has no script for '{m}'")
    method_flags = {m: parse_flags(f, f"{where} method_flags.{m}") for m, f in g.get("method_flags", {}).items()}
    adapt_flags = parse_flags(g.get("adapt_flags"), f"{where} adapt_flags")
    demos_list = [str(d) for d in g.get("demos", [])] or [""]
    pretrains, adapts, all_tasks = [], [], []
    for ts in g["train_sets"]:
        name = str(ts.get("name", ""))
        tasks = [str(t) for t in ts.get("tasks", g.get("tasks", []))]
        if not name or not tasks:
            raise StudyError(f"{where}: every train set needs a 'name' and held-out 'tasks'")
        all_tasks += [t for t in tasks if t not in all_tasks]
        for method in g["methods"]:
            for seed in g["pretrain_seeds"]:
                flags = merged(parse_flags(g.get("pretrain_flags"), f"{where} pretrain_flags"),
                               parse_flags(ts.get("flags"), f"{where} train set {name}"),
                               method_flags.get(method, {}), {"--seed": (str(seed),)})
                pre = Run("pretrain", bench, method, name, str(ts.get("tag", name)), "", "", int(seed),
                          scripts[method], flags)
                pretrains.append(pre)
                for task in tasks:
                    for demos in demos_list:
                        for s in g["adapt_seeds"]:
                            flags = merged({"--task": (task,)}, adapt_flags, _demos(demos), {"--seed": (str(s),)})
                            adapts.append(Run("adapt", bench, method, name, pre.tag, task, demos, int(s),
                                              scripts["finetune"], flags, pretrain=pre))
    if g.get("scratch", True):
        scratch_flags = parse_flags(g.get("scratch_flags"), f"{where} scratch_flags")
        for task in all_tasks:
            for demos in demos_list:
                for s in g["adapt_seeds"]:
                    flags = merged({"--scratch": (bench,), "--task": (task,)}, adapt_flags, scratch_flags,
                                   _demos(demos), {"--seed": (str(s),)})
                    adapts.append(Run("adapt", bench, "scratch", "", "", task, demos, int(s), scripts["finetune"],
                                      flags))
    runs = pretrains + adapts
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise StudyError(f"{where} lists the same run twice (e.g. a repeated seed or task)")
    return runs


def _demos(demos: str) -> dict:
    return {"--demos": (demos,)} if demos != "" else {}


def toml_dumps(data: dict, prefix: str = "") -> str:
    """A small TOML writer for study.toml (strings, numbers, booleans, lists, tables)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        return "[" + ", ".join(value(x) for x in v) + "]"
    lines, tables, arrays = [], [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{json.dumps(k)} = {value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}{json.dumps(k)}"
        out += f"\n[{name}]\n" + toml_dumps(v, name + ".")
    for k, items in arrays:
        name = f"{prefix}{json.dumps(k)}"
        for item in items:
            out += f"\n[[{name}]]\n" + toml_dumps(item, name + ".")
    return out


# --------------------------------------------------------------------------- one run's files


def run_dir(study_dir: str, run: Run) -> str:
    return os.path.join(study_dir, "runs", run.run_id)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_state(study_dir: str, run: Run) -> tuple[str, dict | None]:
    """From the run's files: done, failed, interrupted (files but no marker) or pending (none)."""
    d = run_dir(study_dir, run)
    if not os.path.isdir(d):
        return "pending", None
    done = read_json(os.path.join(d, "done.json"))
    if done is not None and all(os.path.exists(os.path.join(d, f)) for f in EXPECTED[run.stage]):
        return "done", done
    failed = read_json(os.path.join(d, "failed.json"))
    if failed is not None:
        return "failed", failed
    return "interrupted", read_json(os.path.join(d, "running.json"))


_RESUME_CACHE: dict[str, bool] = {}


def supports_resume(script: str) -> bool:
    """Whether `script --help` lists RESUME_FLAG (asked once per script, only when needed)."""
    if RESUME_FLAG is None:
        return False
    if script not in _RESUME_CACHE:
        path = script if os.path.isabs(script) else os.path.join(ROOT, script)
        try:
            out = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=300).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        _RESUME_CACHE[script] = re.search(rf"(^|\s){re.escape(RESUME_FLAG)}\b", out) is not None
    return _RESUME_CACHE[script]


def move_aside(d: str, why: str) -> str:
    n = 1
    while os.path.exists(f"{d}.{why}-{n}"):
        n += 1
    os.rename(d, f"{d}.{why}-{n}")
    return f"{d}.{why}-{n}"


# --------------------------------------------------------------------------- results.csv


def write_results(study_dir: str, runs: list[Run], status: dict, info: dict, commands: dict) -> None:
    """One row per run, written to a temporary file and renamed over results.csv."""
    path = os.path.join(study_dir, "results.csv")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULTS)
        w.writeheader()
        for r in runs:
            meta = info.get(r.run_id) or {}
            keep = status[r.run_id] in ("done", "failed")
            row = {**r.row(), "status": status[r.run_id], "command": commands[r.run_id],
                   **{k: meta.get(k, "") if keep else "" for k in ("env_steps", "zero_shot", "final", "auc",
                                                                   "wall_s", "git_sha")}}
            w.writerow(row)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return sha + ("-dirty" if sha and dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return ""


# --------------------------------------------------------------------------- the runner


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def visible_gpus(requested: int | None) -> list[str]:
    if requested == 0:
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [g for g in env.split(",") if g.strip()]
    else:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            ids = [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU")]
        except (OSError, subprocess.TimeoutExpired):
            ids = []
    if requested is not None:
        ids = ids[:requested] if len(ids) >= requested else [str(i) for i in range(requested)]
    return ids


def select(runs: list[Run], only: list[str]) -> set[str]:
    """--only key=value (AND over keys, OR over values of one key), plus the pretraining runs
    the chosen adaptations start from."""
    wanted: dict[str, set[str]] = {}
    for item in only:
        key, sep, value = item.partition("=")
        if not sep or key not in ONLY_KEYS:
            raise StudyError(f"bad --only '{item}': expected KEY=VALUE with KEY one of {', '.join(ONLY_KEYS)}")
        wanted.setdefault(key, set()).add(value)
    chosen = {r.run_id for r in runs if all(r.row()[k] in v for k, v in wanted.items())}
    if not chosen:
        raise StudyError(f"no run of this grid matches --only {' '.join(only)}")
    return chosen | {r.pretrain.run_id for r in runs if r.run_id in chosen and r.pretrain}


def open_study(args) -> tuple[dict, list[Run]]:
    """The grid to run: from --benchmark/--preset (checked against DIR/study.toml), or from
    DIR/study.toml alone."""
    d = args.study_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise StudyError(f"--study-dir {d} is a file, not a directory")
    stored = None
    if os.path.exists(os.path.join(d, "study.toml")):
        with open(os.path.join(d, "study.toml"), "rb") as f:
            stored = tomllib.load(f)
    if args.preset is None:
        if stored is None:
            raise StudyError(f"{d} holds no study.toml yet: give --benchmark and --preset (paper, mini or smoke)")
        if args.benchmark not in (None, stored["benchmark"]):
            raise StudyError(f"{d} holds a {stored['benchmark']} study, not {args.benchmark}")
        return stored, build_grid(stored)
    if args.benchmark is None and args.spec is None:
        raise StudyError("give --benchmark (or --spec FILE)")
    study = load_spec(args.benchmark, args.preset, args.spec)
    study = tomllib.loads(toml_dumps(study))  # compared as study.toml will read back
    same = stored is not None and {**stored, "spec": ""} == {**study, "spec": ""}  # the grid, wherever its file
    if stored is not None and not same and not args.update_grid:
        what = (f"a {stored['benchmark']} study" if stored["benchmark"] != study["benchmark"]
                else f"preset '{stored['preset']}'" if stored["preset"] != study["preset"] else "a different grid")
        raise StudyError(f"{d} holds {what}; use another --study-dir, or --update-grid to run this grid there "
                         "(runs whose configuration is unchanged keep their results)")
    return study, build_grid(study)


def run_study(args) -> int:
    study, runs = open_study(args)
    chosen = select(runs, args.only)
    g = study["grid"]
    cpus = args.cpus_per_run or int(g.get("cpus_per_run", 1))
    if args.workers is not None and args.workers < 1 or args.runs_per_gpu < 1 or cpus < 1:
        raise StudyError("--workers, --runs-per-gpu and --cpus-per-run must be at least 1")
    d = os.path.abspath(args.study_dir)
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(cpus), "MKL_NUM_THREADS": str(cpus)}
    env = {**env, **{k: str(v) for k, v in study["env"].items()}}
    env = {k: v for k, v in env.items() if k not in os.environ}  # the user's environment wins
    by_id = {r.run_id: r for r in runs}
    states = {r.run_id: run_state(d, r) for r in runs}
    gpu_extra = [str(f) for f in g.get("gpu_flags", [])]
    if args.dry_run:
        gpus = visible_gpus(args.gpus) if args.executor == "local" else []
        for r in runs:
            if r.run_id in chosen:
                print(f"{states[r.run_id][0]:<12} {r.run_id}\n    {display(r.command(d, gpu_extra if gpus else []))}")
        print(f"{len(chosen)} runs ({sum(r.stage == 'pretrain' for r in runs if r.run_id in chosen)} pretraining); "
              f"nothing started")
        return 0
    try:
        os.makedirs(os.path.join(d, "runs"), exist_ok=True)
        lock = open(os.path.join(d, ".lock"), "w")
    except OSError as e:
        raise StudyError(f"cannot create the study directory {d}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise StudyError(f"another study.py run is working in {d}") from None
    with open(os.path.join(d, "study.toml.tmp"), "w") as f:
        f.write("# written by study.py: the grid as run\n" + toml_dumps(study))
    os.replace(os.path.join(d, "study.toml.tmp"), os.path.join(d, "study.toml"))

    if args.executor == "ray":
        executor = RayExecutor(args.ray_address, args.workers, cpus, args.runs_per_gpu)
    else:
        gpus = visible_gpus(args.gpus)
        workers = args.workers or (len(gpus) * args.runs_per_gpu if gpus else max(1, (os.cpu_count() or 1) // cpus))
        executor = LocalExecutor(workers, gpus, args.runs_per_gpu)
    extra = gpu_extra if executor.uses_gpu() else []
    sha = git_sha()
    status = {rid: ("pending" if s == "interrupted" else s) for rid, (s, _) in states.items()}
    info = {rid: meta for rid, (s, meta) in states.items() if s in ("done", "failed")}
    commands = {r.run_id: display(r.command(d, extra)) for r in runs}
    todo = [r for r in runs if r.run_id in chosen and (status[r.run_id] == "pending" or
                                                       status[r.run_id] == "failed" and args.retry_failed)]
    for r in todo:
        if status[r.run_id] == "failed":
            status[r.run_id] = "pending"
    started = time.time()

    def block() -> None:
        for r in runs:
            if r.pretrain and status[r.run_id] in ("pending", "blocked"):
                status[r.run_id] = "blocked" if status[r.pretrain.run_id] == "failed" else "pending"

    def launch(r: Run) -> None:
        rd = run_dir(d, r)
        state, meta = run_state(d, r)
        resume = []
        if state == "interrupted":
            kill_orphan(rd, meta)
            if os.path.exists(os.path.join(rd, "checkpoint.pt")) and supports_resume(r.script):
                resume = [RESUME_FLAG]
            else:
                move_aside(rd, "interrupted")
        elif state == "failed":
            move_aside(rd, "failed")
        os.makedirs(rd, exist_ok=True)
        cmd = r.command(d, extra + resume)
        write_json(os.path.join(rd, "config.json"), {
            "run_id": r.run_id, "command": display(cmd), "argv": cmd, "cwd": ROOT, "env": env, "git_sha": sha,
            "resumed": bool(resume), "config": r.config, "study_dir": d, "preset": study["preset"]})
        executor.start(r.run_id, cmd, rd, env, r.stage, sha)
        status[r.run_id] = "running"

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        block()
        write_results(d, runs, status, info, commands)
        while True:
            ready = [r for r in todo if status[r.run_id] == "pending"
                     and (r.pretrain is None or status[r.pretrain.run_id] == "done")]
            starting = ready[:max(0, executor.free())]
            for r in starting:
                launch(r)
            if starting:
                write_results(d, runs, status, info, commands)
            if not any(status[r.run_id] == "running" for r in runs):
                break
            progress(runs, status, info, chosen, executor.workers, started)
            for run_id, outcome in executor.wait(1.0):
                st = outcome.get("status")
                status[run_id] = st if st in ("done", "failed") else "pending"
                if st in ("done", "failed"):
                    info[run_id] = outcome
                if st == "interrupted":  # a lost task: do not loop on it in this session
                    todo.remove(by_id[run_id])
                block()
                write_results(d, runs, status, info, commands)
    except Interrupted as e:
        for s in old:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        sys.stdout.write("\n")
        print(f"study.py: {e}: stopping {sum(s == 'running' for s in status.values())} running runs", flush=True)
        executor.stop()
        for rid, s in status.items():
            if s == "running":
                st, meta = run_state(d, by_id[rid])
                status[rid] = st if st in ("done", "failed") else "pending"
                if st in ("done", "failed"):
                    info[rid] = meta
        block()
        write_results(d, runs, status, info, commands)
        print(f"study.py: stopped; rerun the same command to continue ({d})", flush=True)
        return 130 if str(e) == "SIGINT" else 143
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    progress(runs, status, info, chosen, executor.workers, started, final=True)
    if args.executor == "ray":
        executor.ray.shutdown()
    counts = {s: sum(status[r] == s for r in chosen) for s in ("done", "failed", "blocked", "pending")}
    print(f"study.py: {counts['done']} done, {counts['failed']} failed, {counts['blocked']} blocked, "
          f"{counts['pending']} pending; results in {os.path.join(d, 'results.csv')}", flush=True)
    return 0 if counts["done"] == len(chosen) else 1


def progress(runs, status, info, chosen, workers, started, final=False) -> None:
    """One live line: counts per status and an ETA from the wall times of finished runs."""
    sel = [r for r in runs if r.run_id in chosen]
    counts = {s: sum(status[r.run_id] == s for r in sel) for s in ("done", "running", "failed", "pending", "blocked")}
    walls = {st: [float(info[r.run_id]["wall_s"]) for r in sel if r.stage == st and status[r.run_id] == "done"
                  and info.get(r.run_id, {}).get("wall_s") not in (None, "")] for st in ("pretrain", "adapt")}
    eta, known, left_all = 0.0, True, counts["running"] + counts["pending"]
    for st in ("pretrain", "adapt"):
        left = sum(r.stage == st and status[r.run_id] in ("running", "pending") for r in sel)
        pool = walls[st] or walls["pretrain"] + walls["adapt"]
        if left and not pool:
            known = False
        elif left:
            eta += left * sum(pool) / len(pool)
    eta_text = f"ETA {fmt_time(eta / max(1, min(workers, left_all)))}" if known else "ETA ?"
    line = (f"[study {fmt_time(time.time() - started)}] " + " ".join(f"{k} {v}" for k, v in counts.items())
            + f" of {len(sel)} | {eta_text}")
    if sys.stdout.isatty() and not final:
        sys.stdout.write("\r" + line.ljust(100))
        sys.stdout.flush()
    elif final or line.split("] ", 1)[1] != getattr(progress, "last", None):
        print(line, flush=True)
    progress.last = line.split("] ", 1)[1]


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def show_status(args) -> int:
    """A table per stage: one line per method and train set, counts by status, from the files."""
    if not os.path.isfile(os.path.join(args.study_dir, "study.toml")):
        raise StudyError(f"{args.study_dir} holds no study.toml (not a study directory)")
    args.preset = None
    study, runs = open_study(args)
    d = os.path.abspath(args.study_dir)
    lock_held = False
    try:
        with open(os.path.join(d, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_held = True  # a runner is at work: runs without a marker are running
    status = {}
    for r in runs:
        s, _ = run_state(d, r)
        status[r.run_id] = ("running" if lock_held else "pending") if s == "interrupted" else s
    for r in runs:
        if r.pretrain and status[r.run_id] == "pending" and status[r.pretrain.run_id] == "failed":
            status[r.run_id] = "blocked"
    cols = ("done", "running", "failed", "pending", "blocked")
    print(f"{study['benchmark']} study, preset {study['preset']}, in {d}")
    for stage in ("pretrain", "adapt"):
        groups: dict = {}
        for r in runs:
            if r.stage == stage:
                groups.setdefault((r.method, r.train_set), []).append(status[r.run_id])
        print(f"\n{stage:<10} {'method':<9} {'train_set':<22}" + "".join(f"{c:>9}" for c in cols) + f"{'total':>9}")
        for (method, ts), sts in groups.items():
            print(f"{'':<10} {method:<9} {ts[:22]:<22}" + "".join(f"{sts.count(c):>9}" for c in cols)
                  + f"{len(sts):>9}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="study.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or continue) a study's grid")
    run.add_argument("--benchmark", help="procgen, atari or rlbench (a file in studies/)")
    run.add_argument("--preset", help="paper, mini or smoke (the spec's [presets]); omit to continue DIR's study")
    run.add_argument("--spec", help="a study spec TOML other than studies/<benchmark>.toml")
    run.add_argument("--study-dir", required=True, help="where study.toml, results.csv and runs/ go")
    run.add_argument("--executor", choices=["local", "ray"], default="local")
    run.add_argument("--workers", type=int,
                     help="runs at once (default: cores / cpus per run, or GPUs x --runs-per-gpu)")
    run.add_argument("--cpus-per-run", type=int, help="threads per run (default: the preset's cpus_per_run, else 1)")
    run.add_argument("--gpus", type=int, help="local: how many GPUs to use (default: all visible; 0: none)")
    run.add_argument("--runs-per-gpu", type=int, default=1, help="runs sharing one GPU (Ray: num_gpus = 1/N)")
    run.add_argument("--ray-address", help="an existing Ray cluster ('auto'); default: start a local Ray")
    run.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                     help=f"run only matching runs (and their pretraining); KEY one of {', '.join(ONLY_KEYS)}")
    run.add_argument("--retry-failed", action="store_true", help="run failed runs again (old files kept aside)")
    run.add_argument("--update-grid", action="store_true", help="accept a grid that differs from DIR/study.toml")
    run.add_argument("--dry-run", action="store_true", help="print the runs and commands; start and create nothing")
    st = sub.add_parser("status", help="a table of the study's runs per stage")
    st.add_argument("--study-dir", required=True)
    st.add_argument("--benchmark")
    args = parser.parse_args(argv)
    try:
        return run_study(args) if args.command == "run" else show_status(args)
    except StudyError as e:
        print(f"study.py: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `--dry-run | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

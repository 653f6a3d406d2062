"""How a study's runs are executed: one command per run, each in its own process group, with the
markers study.py reads (running.json while it runs, then done.json or failed.json), on a pool of
local threads (LocalExecutor) or as Ray tasks (RayExecutor). study.py decides what runs and when.
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: commands run there
EXPECTED = {"pretrain": ["checkpoint.pt"], "adapt": ["eval.csv"]}  # outputs a finished run must leave
STOP_GRACE_S = 30  # SIGTERM, then this long to write a checkpoint, then SIGKILL


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def scores(d: str) -> dict:
    """env_steps, zero_shot (the eval at step 0), final (last eval) and auc (mean of the evals)."""
    points = []
    try:
        with open(os.path.join(d, "eval.csv")) as f:
            for row in list(csv.reader(f))[1:]:
                if len(row) >= 2 and row[0] and row[1]:
                    points.append((int(float(row[0])), float(row[1])))
    except (OSError, ValueError):
        points = []
    out = {"env_steps": "", "zero_shot": "", "final": "", "auc": ""}
    if points:
        values = [v for _, v in points]
        out.update(env_steps=points[-1][0], final=values[-1], auc=sum(values) / len(values))
        if points[0][0] == 0:
            out["zero_shot"] = values[0]
    elif os.path.exists(os.path.join(d, "checkpoint.pt")):
        try:
            import torch

            path = os.path.join(d, "checkpoint.pt")
            out["env_steps"] = int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
        except Exception:  # not one of our checkpoints (e.g. a test's stand-in script): no step count
            pass
    return out


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _child_setup():
    """In the child before exec: SIGTERM when the thread that started it dies (a kill -9 of the
    runner leaves no orphan). Its own session and process group come from start_new_session."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


CHILDREN: dict[str, subprocess.Popen] = {}  # run dir -> child, for the local executor's stop()
STOPPING = threading.Event()


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def execute(cmd: list[str], d: str, env: dict, stage: str, git_sha: str) -> dict:
    """Run one command into its directory and leave the marker that says how it ended. The same
    function serves the local executor (in a thread) and Ray (in a task)."""
    start = time.time()
    env = {**os.environ, **env}
    try:
        with open(os.path.join(d, "log.txt"), "ab") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_child_setup)
    except OSError as e:
        outcome = {"exit_code": None, "wall_s": 0.0, "reason": f"cannot start: {e}", "git_sha": git_sha}
        write_json(os.path.join(d, "failed.json"), outcome)
        return {"status": "failed", **outcome}
    CHILDREN[d] = proc
    write_json(os.path.join(d, "running.json"), {"pid": proc.pid, "host": socket.gethostname(), "started": start})
    try:
        rc = proc.wait()
    except BaseException:  # Ray's cancel or Ctrl-C: stop the child's whole group, leave no marker
        stop_group(proc)
        raise
    finally:
        CHILDREN.pop(d, None)
    wall = round(time.time() - start, 1)
    missing = [f for f in EXPECTED[stage] if not os.path.exists(os.path.join(d, f))]
    if rc == 0 and not missing:
        outcome = {"exit_code": 0, "wall_s": wall, "git_sha": git_sha, **scores(d)}
        write_json(os.path.join(d, "done.json"), outcome)
        status = "done"
    elif STOPPING.is_set():  # stopped by us: interrupted, not failed
        return {"status": "interrupted", "exit_code": rc, "wall_s": wall}
    else:
        reason = f"exit code {rc}" if rc != 0 else f"exit code 0 but no {', '.join(missing)}"
        outcome = {"exit_code": rc, "wall_s": wall, "reason": reason, "git_sha": git_sha}
        write_json(os.path.join(d, "failed.json"), outcome)
        status = "failed"
    try:
        os.remove(os.path.join(d, "running.json"))
    except OSError:
        pass
    return {"status": status, **outcome}


def _ray_execute(root, cmd, d, env, stage, git_sha):
    """The Ray task, sent by value (RayExecutor): imports this module from the checkout on the node."""
    sys.path.insert(0, root)
    from studies.executors import execute

    return execute(cmd, d, env, stage, git_sha)


def kill_orphan(d: str, info: dict | None) -> None:
    """A child of a runner that was killed with -9 may still run (if PDEATHSIG did not reach it):
    stop its group, but only if that pid on this host is still running this run's command."""
    if not info or info.get("host") != socket.gethostname():
        return
    try:
        with open(f"/proc/{int(info['pid'])}/cmdline", "rb") as f:
            if d.encode() not in f.read():
                return
        os.killpg(int(info["pid"]), signal.SIGKILL)
        time.sleep(0.5)
    except (OSError, ValueError, KeyError):
        pass


class LocalExecutor:
    """A pool of `workers` threads, each waiting on one child process. With GPUs, each run gets
    one GPU by CUDA_VISIBLE_DEVICES, at most runs_per_gpu runs per GPU."""

    def __init__(self, workers: int, gpus: list[str], runs_per_gpu: int):
        self.workers, self.gpus, self.runs_per_gpu = workers, gpus, runs_per_gpu
        self.load = {g: 0 for g in gpus}
        self.finished: queue.Queue = queue.Queue()
        self.running = 0

    def free(self) -> int:
        return self.workers - self.running

    def uses_gpu(self) -> bool:
        return bool(self.gpus)

    def start(self, run_id: str, cmd: list[str], d: str, env: dict, stage: str, sha: str) -> None:
        gpu = None
        if self.gpus:
            gpu = min(self.gpus, key=lambda g: self.load[g])
            self.load[gpu] += 1
            env = {**env, "CUDA_VISIBLE_DEVICES": gpu}
        self.running += 1

        def work():
            try:
                outcome = execute(cmd, d, env, stage, sha)
            except BaseException as e:  # never lose a worker's end silently
                outcome = {"status": "interrupted", "reason": repr(e)}
            self.finished.put((run_id, gpu, outcome))

        threading.Thread(target=work, daemon=True).start()

    def wait(self, timeout: float) -> list[tuple[str, dict]]:
        out = []
        try:
            item = self.finished.get(timeout=timeout)
            while True:
                run_id, gpu, outcome = item
                self.running -= 1
                if gpu is not None:
                    self.load[gpu] -= 1
                out.append((run_id, outcome))
                item = self.finished.get_nowait()
        except queue.Empty:
            pass
        return out

    def stop(self) -> None:
        STOPPING.set()
        procs = list(CHILDREN.values())
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        threads = [threading.Thread(target=stop_group, args=(p,)) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.wait(0.5)


class RayExecutor:
    """The same commands as Ray tasks with num_cpus / num_gpus (fractional: runs_per_gpu runs
    share one GPU), on an existing cluster (--ray-address auto) or a local Ray started here."""

    def __init__(self, address: str | None, workers: int | None, cpus_per_run: int, runs_per_gpu: int):
        import ray

        self.ray = ray
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        self.gpu_share = 1.0 / runs_per_gpu if resources.get("GPU", 0) > 0 else 0.0
        cap = int(resources.get("CPU", 1) // cpus_per_run)
        if self.gpu_share:
            cap = min(cap, int(resources["GPU"] * runs_per_gpu))
        self.workers = workers or max(1, cap)  # tasks in flight: queued in Ray would look "running"
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # a node need not import it first
        self.task = ray.remote(_ray_execute).options(num_cpus=cpus_per_run, num_gpus=self.gpu_share, max_retries=0)
        self.inflight: dict = {}

    def free(self) -> int:
        return self.workers - len(self.inflight)

    def uses_gpu(self) -> bool:
        return self.gpu_share > 0

    def start(self, run_id, cmd, d, env, stage, sha) -> None:
        self.inflight[self.task.remote(ROOT, cmd, d, env, stage, sha)] = run_id

    def wait(self, timeout: float) -> list[tuple[str, dict]]:
        if not self.inflight:
            time.sleep(timeout)
            return []
        ready, _ = self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=timeout)
        out = []
        for ref in ready:
            run_id = self.inflight.pop(ref)
            try:
                out.append((run_id, self.ray.get(ref)))
            except Exception as e:  # the task itself died (node lost): the run counts as interrupted
                out.append((run_id, {"status": "interrupted", "reason": str(e).splitlines()[0]}))
        return out

    def stop(self) -> None:
        for ref in list(self.inflight):
            self.ray.cancel(ref)  # KeyboardInterrupt in the task: execute() stops the child's group
        try:
            self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=STOP_GRACE_S + 10)
        finally:
            self.ray.shutdown()

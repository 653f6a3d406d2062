"""A run's directory: where it writes, how it refuses bad input, how it stops and resumes.

Plumbing shared by every script and by finetune.py; no algorithm lives here. A script uses it
in this order (see any `setup` / `train` function):

    check_output_dir(args.output_dir, args.resume)   # one-line errors, nothing created yet
    lock = open_output_dir(args.output_dir)          # makes the folder, locks it for this process
    stop = StopRequest()                             # SIGINT / SIGTERM set a flag instead of killing
    ... in the loop: if stop: save a checkpoint, then stop.exit(...)
    atomic_save(checkpoint, os.path.join(args.output_dir, CHECKPOINT))

The lock is an advisory `fcntl.flock` on `DIR/.lock`, released by the kernel when the process
ends (also on kill -9), so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import random
import shlex
import signal
import sys

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
# Files that mean "a run already wrote here" (a study's log.txt alone does not).
RUN_FILES = (CHECKPOINT, "eval.csv")


def _first_file_above(path: str) -> str | None:
    """The nearest ancestor of `path` (or `path` itself) that exists and is not a folder."""
    p = os.path.abspath(path)
    while True:
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return p


def check_output_dir(path: str, resume: bool, flag: str = "--output-dir") -> None:
    """Refuse, as a one-line SystemExit, an output directory that cannot hold this run. Creates nothing.

    - a file (or a path under a file), or a folder this user cannot write;
    - without `resume`: a folder that already holds a run (its checkpoint or eval.csv): nothing a
      user ran is overwritten without their say;
    - with `resume`: a folder with no checkpoint to continue from.
    """
    blocker = _first_file_above(path)
    if blocker is not None:
        where = "is a file" if os.path.abspath(path) == blocker else f"lies under the file {blocker}"
        raise SystemExit(f"error: {flag} {path} {where}, not a directory")
    existing = _nearest_existing(path)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {flag} {path} is not writable (no write permission on {existing})")
    if resume:
        if not os.path.isfile(os.path.join(path, CHECKPOINT)):
            raise SystemExit(f"error: --resume: {flag} {path} holds no {CHECKPOINT} to continue from")
        return
    taken = [name for name in RUN_FILES if os.path.exists(os.path.join(path, name))]
    if taken:
        how = ("pass --resume to continue it, or choose another " + flag) if CHECKPOINT in taken else \
            f"it has no {CHECKPOINT} to resume from: remove it or choose another {flag}"
        raise SystemExit(f"error: {flag} {path} already holds a run ({', '.join(taken)}); {how}")


def open_output_dir(path: str, flag: str = "--output-dir"):
    """Create the folder and lock it for this process; a second run into it gets a one-line error.
    Keep the returned file object alive for the run's lifetime (the lock dies with it)."""
    os.makedirs(path, exist_ok=True)
    handle = open(os.path.join(path, LOCK), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SystemExit(f"error: {flag} {path} is in use by another running process") from None
    return handle


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary name of this process, then rename into place: a crash never leaves a
    half-written file, and two processes never share a temporary file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_arrays(path: str, arrays: dict, compresslevel: int = 6) -> None:
    """Named numpy arrays in one deflated .npz (what a replay file is), written to a temporary name of
    this process and renamed into place. Large arrays stream into the zip (zip64); level 1 deflates
    about 3x faster than the default 6 for a similar size on frames. Read back with np.load."""
    import zipfile

    tmp = f"{path}.{os.getpid()}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
    os.replace(tmp, path)


def remove_temporaries(path: str) -> None:
    """Delete the temporary files a killed process left beside `path` (call it while holding the
    folder's lock: no live process is writing them)."""
    import glob

    for tmp in glob.glob(f"{glob.escape(path)}.*.tmp"):
        os.remove(tmp)


def rng_state() -> dict:
    """Python's, numpy's and torch's global random states as plain values and tensors
    (loadable with `torch.load(weights_only=True)`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Args that may differ between a run and its --resume: the machine's settings, and where and how often it saves.
RESUME_FREE = frozenset({"resume", "output_dir", "save_every", "cuda", "torch_threads", "env_threads", "precision",
                         "speed_form", "track", "wandb_project_name", "wandb_entity", "torch_deterministic",
                         "background_eval"})


def load_resume(output_dir: str, script: str, args: dict, free=RESUME_FREE) -> dict:
    """--resume: the checkpoint in `output_dir` (weights_only), checked to be one `script` wrote with a
    `resume` entry, by a run with the same settings as `args` (a dict of the Args) except those in
    `free`. Anything else is a one-line SystemExit that names the file or the first differing flag."""
    path = os.path.join(output_dir, CHECKPOINT)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that needs code to load
        raise SystemExit(f"error: --resume: cannot read {path} ({type(e).__name__}: {str(e).strip()[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("module") != script or not isinstance(ckpt.get("resume"), dict) \
            or not isinstance(ckpt.get("args"), dict):
        raise SystemExit(f"error: --resume: {path} is not a resumable checkpoint of {script}.py")
    saved = ckpt["args"]
    for k, v in args.items():
        plain = (lambda x: list(x) if isinstance(x, tuple) else x)  # tuples may come back as lists
        if k not in free and k in saved and plain(v) != plain(saved[k]):
            raise SystemExit(f"error: --resume: --{k.replace('_', '-')} is {v!r} here but {saved[k]!r} in {path}; "
                             "pass the run's own flags")
    return ckpt


def restore(ckpt: dict, model, optimizer=None, generator=None):
    """Load a checkpoint's `model`, `optimizer` and `resume["generator"]` (each where given), then its
    random states (`rng`, last: the run continues with the numbers it would have drawn). Returns
    (global_step, the `resume` dict) for the caller's own counters, envs and schedules."""
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if generator is not None:
        generator.set_state(ckpt["resume"]["generator"])
    set_rng_state(ckpt["rng"])
    return ckpt["global_step"], ckpt["resume"]


def resume_command() -> str:
    """This process's command line with --resume added: what to type to continue the run."""
    argv = [os.path.basename(sys.executable)] + sys.argv
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(argv)


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before preemption) set a flag instead of
    killing the run; the loop checks it (`if stop:`), writes a checkpoint and calls `exit`. A second
    signal while stopping restores the default behaviour (Ctrl-C twice stops at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up on the graceful stop
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after the current step to write a checkpoint",
              file=sys.stderr, flush=True)

    def __bool__(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def exit(self, output_dir: str, global_step: int):
        """After the checkpoint is written: one line on how to resume, and exit with 128 + signal."""
        name = signal.Signals(self.signum).name
        print(f"stopped by {name} at env step {global_step}; checkpoint in {os.path.join(output_dir, CHECKPOINT)}; "
              f"continue with: {resume_command()}", file=sys.stderr, flush=True)
        raise SystemExit(128 + self.signum)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve a script's --precision (auto, bf16, fp32): in auto, bf16 only where the hardware has native
    bfloat16 arithmetic (a CUDA GPU that supports it; a CPU with oneDNN's bf16 support, e.g. AVX512-BF16)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

"""Adapt a pretrained agent to one held-out task, or train the from-scratch baseline.

    python finetune.py --checkpoint runs/mt/checkpoint.pt --task 10000      # Procgen level
    python finetune.py --checkpoint runs/mt_atari/checkpoint.pt --task Pong  # Atari game
    python finetune.py --checkpoint runs/mt_rlb/checkpoint.pt --task drawer-open-v3 --demos 2
    python finetune.py --scratch procgen --task 10000                       # baseline

How a checkpoint adapts depends on the method that wrote it (the study's protocol):
- MT and Reptile: the base RL algorithm (PPO, DER, C2F-ARM) trains the whole network on
  the new task, with the same code the pretraining script uses (imported, not copied).
- RL2: rolls out on the new task with its recurrent state; no gradient step.
- PEARL: infers its latent context from experience on the new task; no gradient step.
- `--scratch BENCHMARK`: the same fine-tuning path from a freshly initialised network.

Any flag of the base script (e.g. `--num-envs 4 --num-steps 32`) overrides its value,
which otherwise defaults to the checkpoint's. Results land in `--output-dir DIR`:
`eval.csv` (env step, evaluation metric), TensorBoard logs, and the fine-tuned
`checkpoint.pt`; the last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import os
import sys
import time
import types
import typing
from typing import Callable

import torch

from envs import run_dir
from envs.run_dir import open_output_dir

# Every checkpoint of this project carries this marker (see each script's save_checkpoint).
CHECKPOINT_FORMAT = "finetune-vs-meta-rl"
CHECKPOINT_KEYS = ("format", "module", "benchmark", "method", "train_tasks", "args", "global_step", "model")
# The script whose base algorithm fine-tunes (and trains from scratch) on each benchmark.
BASE_MODULES = {"procgen": "ppo_mt_procgen", "atari": "rainbow_mt_atari", "rlbench": "c2farm_mt_rlbench"}
# Our scripts, per benchmark: a checkpoint naming any other module is foreign.
KNOWN_MODULES = {
    "procgen": ("ppo_mt_procgen", "ppo_reptile_procgen", "ppo_rl2_procgen"),
    "atari": ("rainbow_mt_atari", "rainbow_reptile_atari", "rainbow_pearl_atari"),
    "rlbench": ("c2farm_mt_rlbench", "c2farm_reptile_rlbench", "c2farm_pearl_rlbench"),
}
# The methods a checkpoint of each benchmark may name ("finetune" / "scratch": written by finetune.py);
# any other method is an error, never silently adapted as MT.
KNOWN_METHODS = {
    "procgen": ("mt", "reptile", "rl2", "finetune", "scratch"),
    "atari": ("mt", "reptile", "pearl", "finetune", "scratch"),
    "rlbench": ("mt", "reptile", "pearl", "finetune", "scratch"),
}


class FinetuneError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def load_checkpoint(path: str) -> dict:
    """Load and validate one of our checkpoints; never unpickles arbitrary objects."""
    if not os.path.isfile(path):
        raise FinetuneError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, or a pickle that needs code to load
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FinetuneError(f"cannot read checkpoint {path} (truncated, corrupt or unsafe file): "
                            f"{reason[:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"{path} is not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' format marker)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise FinetuneError(f"checkpoint {path} lacks the entries {', '.join(missing)}")
    benchmark, module = ckpt["benchmark"], ckpt["module"]
    if not isinstance(benchmark, str) or not isinstance(module, str) or module not in KNOWN_MODULES.get(benchmark, ()):
        raise FinetuneError(f"checkpoint {path} was written by an unknown script '{module}' "
                            f"for benchmark '{benchmark}'")
    if ckpt["method"] not in KNOWN_METHODS[benchmark]:
        raise FinetuneError(f"checkpoint {path} names the unknown method {ckpt['method']!r}: expected one of "
                            f"{', '.join(KNOWN_METHODS[benchmark])} for {benchmark}")
    model = ckpt["model"]
    if not isinstance(model, dict) or not model or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                            for k, v in model.items()):
        raise FinetuneError(f"checkpoint {path}: 'model' is not a state dict (a non-empty dict of named tensors)")
    if not isinstance(ckpt["args"], dict) or not all(isinstance(k, str) for k in ckpt["args"]):
        raise FinetuneError(f"checkpoint {path}: 'args' is not a dict of the script's settings")
    if not isinstance(ckpt["global_step"], int) or isinstance(ckpt["global_step"], bool) or ckpt["global_step"] < 0:
        raise FinetuneError(f"checkpoint {path}: 'global_step' is not a non-negative integer")
    if not isinstance(ckpt["train_tasks"], (list, tuple)):
        raise FinetuneError(f"checkpoint {path}: 'train_tasks' is not a list")
    args_class = importlib.import_module(module).Args
    hints = typing.get_type_hints(args_class)
    for field in dataclasses.fields(args_class):
        if field.name in ckpt["args"] and not _fits(ckpt["args"][field.name], hints[field.name]):
            raise FinetuneError(f"checkpoint {path}: args['{field.name}'] is {ckpt['args'][field.name]!r}, "
                                f"not a value of type {_type_name(hints[field.name])}")
    return ckpt


def _fits(value, tp) -> bool:
    """Whether a checkpoint's plain value can stand for an Args field annotated `tp` (tuples come back as lists)."""
    origin, params = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_fits(value, p) for p in params)
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in params
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        elems = [p for p in params if p is not Ellipsis]
        return len(elems) != 1 or all(_fits(v, elems[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # a type this check does not know: left to the script


def _type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def load_state(module: torch.nn.Module, state: dict, path: str, what: str = "network", strict: bool = True):
    """`module.load_state_dict(state)` with a one-line FinetuneError naming the checkpoint and the first
    entry that does not fit (a missing or unexpected key, a tensor of another shape) instead of a
    RuntimeError. With strict=False, missing and unexpected keys pass (returned as load_state_dict does);
    a shape mismatch never does."""
    own = module.state_dict()
    for key, tensor in state.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise FinetuneError(f"checkpoint {path} does not fit the {what}: '{key}' has shape {tuple(tensor.shape)}, "
                                f"the {what} expects {tuple(own[key].shape)}")
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            which = f"lacks '{missing[0]}'" if missing else f"has the unexpected entry '{unexpected[0]}'"
            more = len(missing) + len(unexpected) - 1
            raise FinetuneError(f"checkpoint {path} does not fit the {what}: it {which}"
                                + (f" (and {more} more mismatched keys)" if more else ""))
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as e:  # anything the checks above did not foresee, still one line
        reason = str(e).strip().splitlines()[0][:200]
        raise FinetuneError(f"checkpoint {path} does not fit the {what}: {reason}") from None


# settings of the machine and the run, not of the agent: a checkpoint's values do not carry over
MACHINE_SETTINGS = {"resume", "cuda", "torch_threads", "env_threads", "precision", "speed_form", "track",
                    "wandb_project_name", "background_eval"}


def script_args(module, ckpt: dict | None, overrides: list[str], **finetune_defaults):
    """The base script's Args: its own defaults, then the checkpoint's values (all but
    MACHINE_SETTINGS), then the fine-tuning defaults, then whatever flags the user passed (same
    names as the script)."""
    import tyro

    names = {f.name for f in dataclasses.fields(module.Args)} - MACHINE_SETTINGS
    saved = {k: v for k, v in (ckpt["args"] if ckpt else {}).items() if k in names}
    types = {f.name: f.type for f in dataclasses.fields(module.Args)}
    for k, v in saved.items():  # lists round-trip from tuples through the checkpoint
        if isinstance(v, list) and "tuple" in str(types[k]).lower():
            saved[k] = tuple(v)
    base = dataclasses.replace(module.Args(), **saved)
    base = dataclasses.replace(base, **finetune_defaults)
    return tyro.cli(module.Args, default=base, args=overrides, prog="finetune.py [finetune flags]")


class Run:
    """Where a fine-tuning run reports: eval.csv, TensorBoard, and the closing summary.

    Nothing is created until the run first uses it (`run.writer`, `run.log_eval` or `run.open()`),
    so a benchmark function checks its flags first and a bad one leaves no folder behind. Opening
    locks the folder for this process (envs.run_dir.open_output_dir)."""

    def __init__(self, output_dir: str, metric: str, resume: bool = False, resume_step: int | None = None):
        """`resume` (`resume_step`: the env step of the run's checkpoint): eval.csv keeps its rows up to
        that step and continues (no second header, no second zero-shot point); TensorBoard purges events
        logged after it, so both stay one continuous curve."""
        self.output_dir, self.metric, self.resume, self.resume_step = output_dir, metric, resume, resume_step
        self.curve: list[tuple[int, float]] = []
        self._writer = self._csv_file = self._lock = None
        self.start = time.time()

    def open(self) -> None:
        """Lock and create the folder, open eval.csv (appending on resume) and the TensorBoard writer."""
        if self._csv_file is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        try:
            self._lock = open_output_dir(self.output_dir)
            run_dir.check_output_dir(self.output_dir, self.resume)  # again, now that no other run can start here
        except SystemExit as e:
            raise FinetuneError(str(e.code).removeprefix("error: ")) from None
        path = os.path.join(self.output_dir, "eval.csv")
        if self.resume and os.path.isfile(path):
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            kept = [r for r in rows[1:] if r and r[0].isdigit() and (self.resume_step is None
                                                                      or int(r[0]) <= self.resume_step)]
            if len(kept) != len(rows) - 1:  # points after the checkpoint: the resumed run logs them again
                with open(path + f".{os.getpid()}.tmp", "w", newline="") as f:
                    csv.writer(f).writerows([rows[0]] + kept)
                os.replace(path + f".{os.getpid()}.tmp", path)
            self.curve = [(int(r[0]), float(r[1])) for r in kept]
        # events at the checkpoint's own step were logged before it was written: purge only later ones
        purge_step = self.resume_step + 1 if self.resume and self.resume_step is not None else None
        self._writer = SummaryWriter(self.output_dir, purge_step=purge_step)
        self._csv_file = open(path, "a" if self.resume else "w", newline="")
        self._csv = csv.writer(self._csv_file)
        if self._csv_file.tell() == 0:
            self._csv.writerow(["env_step", self.metric, "episodes"])
            self._csv_file.flush()

    @property
    def writer(self):
        self.open()
        return self._writer

    def log_eval(self, step: int, value: float, episodes: int | None = None) -> None:
        """One evaluation point: `value` is the mean of `episodes` evaluation episodes."""
        self.open()
        self.curve.append((int(step), float(value)))
        self._csv.writerow([int(step), f"{float(value):.6g}", "" if episodes is None else int(episodes)])
        self._csv_file.flush()
        self.writer.add_scalar(f"eval/{self.metric}", value, step)
        print(f"[eval] step={int(step)} {self.metric}={float(value):.4g}"
              + ("" if episodes is None else f" ({int(episodes)} episodes)"), flush=True)

    def close(self, label: str | None = None) -> str | None:
        """Close the files; with a label, print and return the one-line summary."""
        if self._csv_file is not None:
            self._csv_file.close()
            self._writer.close()
            self._lock.close()  # releases the folder
        if label is None:
            return None
        if self.curve:
            last = self.curve[-1][1]
            best = max(v for _, v in self.curve)
            result = f"final {self.metric} {last:.4g} (best {best:.4g}) over {len(self.curve)} evaluations"
        else:
            result = "no evaluation was recorded (budget too small for one)"
        summary = f"{label}: {result}, {time.time() - self.start:.0f}s; results in {self.output_dir}/eval.csv"
        print(summary, flush=True)
        return summary


# --------------------------------------------------------------------------- Procgen


def is_procgen_task(task: str) -> bool:
    return task.isdigit() and int(task) < 2**31  # procgen's level seeds are 32-bit


def finetune_procgen(ckpt: dict | None, opts: argparse.Namespace, overrides: list[str], run: Run) -> None:
    """MT/Reptile/scratch: PPO on the one level, evaluated on it in separate envs (--eval-episodes on
    --eval-num-envs) at step 0, every --eval-every env steps (default: every PPO iteration, as the
    authors) and at the end. RL2: roll out, no gradient; step 0 from a fresh recurrent state.
    Every flag and the checkpoint's weights are checked before `run` creates anything."""
    level = int(opts.task)
    method = ckpt["method"] if ckpt else "scratch"
    if ckpt is not None and level in ckpt["train_tasks"]:
        print(f"warning: level {level} is one of the checkpoint's {len(ckpt['train_tasks'])} training levels, "
              "not a held-out one", file=sys.stderr, flush=True)
    # 2M steps on the single test level (paper, Sec. 5.1), as for every adaptation method.
    budget = dict(total_timesteps=2_000_000, num_levels=1, start_level=level, output_dir=run.output_dir,
                  resume=opts.resume)
    if method == "rl2":
        rl2 = importlib.import_module("ppo_rl2_procgen")
        args = script_args(rl2, ckpt, overrides, **budget)
        rl2.check_args(args)
        if opts.resume:  # the run's own checkpoint fits these flags: checked before `run` opens anything
            run_dir.load_resume(run.output_dir, rl2.SCRIPT, dataclasses.asdict(args))
        load_state(rl2.RL2Agent(rl2.NUM_ACTIONS, args.lstm_hidden, args.lstm_layers), ckpt["model"], opts.checkpoint,
                   "RL2 network")
        rl2.adapt(args, ckpt["model"], level, writer=run.writer, log_eval=run.log_eval, eval_every=opts.eval_every,
                  train_tasks=ckpt["train_tasks"])
        return
    ppo = importlib.import_module(BASE_MODULES["procgen"])
    args = script_args(ppo, ckpt, overrides, **budget)  # the whole network is fine-tuned
    ppo.check_args(args)
    if opts.resume:
        run_dir.load_resume(run.output_dir, ppo.SCRIPT, dataclasses.asdict(args))
    torch.manual_seed(args.seed)  # a fresh network (scratch) is drawn from --seed, as in a pretraining script
    agent = ppo.Agent(ppo.NUM_ACTIONS)
    if ckpt is not None:
        load_state(agent, ckpt["model"], opts.checkpoint, "IMPALA-CNN agent")
    ppo.train(args, agent=agent, method="finetune" if ckpt else "scratch", train_tasks=[level],
              writer=run.writer, log_eval=run.log_eval, eval_every=opts.eval_every, eval_level=level)


# --------------------------------------------------------------------------- Atari


def is_atari_task(task: str) -> bool:
    return importlib.import_module("envs.atari").find_rom_id(task) is not None


def finetune_atari(ckpt: dict | None, opts: argparse.Namespace, overrides: list[str], run: Run) -> None:
    """MT/Reptile/scratch: DER on the one game for 100k env steps (rainbow_mt_atari.train). PEARL:
    infer z, no gradient (rainbow_pearl_atari.adapt). Both evaluate at step 0, every --eval-every
    env steps (default 5000, the authors' bashes/neurips22/finetune.sh) and at the end, and write
    checkpoint.pt (DER: with replay.npz) every --save-every / --save-replay-every env steps (default
    10000 here), at the end and on SIGINT/SIGTERM; --resume continues from them.
    --load-encoder-only: the pretrained conv encoder, frozen, under fresh heads over the game's own
    action set (authors' --load_conv_only); --unfreeze-encoder-at N lets it train from step N.
    Every check comes before `run` creates anything."""
    if not is_atari_task(opts.task):
        raise FinetuneError(f"unknown Atari game '{opts.task}'")
    method = ckpt["method"] if ckpt else "scratch"
    eval_every = opts.eval_every or 5_000
    if ckpt is not None and not isinstance(ckpt.get("num_actions"), int):
        raise FinetuneError(f"checkpoint {opts.checkpoint} lacks an integer 'num_actions' (Atari checkpoints have one)")
    if ckpt is not None and not opts.help:
        rom_id = importlib.import_module("envs.atari").find_rom_id
        if any(isinstance(t, str) and rom_id(t) == rom_id(opts.task) for t in ckpt["train_tasks"]):
            games = ", ".join(map(str, ckpt["train_tasks"]))
            print(f"warning: {opts.task} is one of the checkpoint's training games ({games}), not a held-out game",
                  file=sys.stderr, flush=True)
    # DER fine-tuning budget (paper, Sec. 5.3): 100k env steps, fresh 100k replay, learning starts 1600;
    # a checkpoint (and the replay) every 10k env steps, so that a killed run loses little.
    budget = dict(total_timesteps=100_000, buffer_size=100_000, learning_starts=1600, games=(opts.task,),
                  save_every=10_000, save_replay_every=10_000, resume=opts.resume, output_dir=run.output_dir)
    if method == "pearl":
        pearl = importlib.import_module("rainbow_pearl_atari")
        args = script_args(pearl, ckpt, overrides, **budget)
        pearl.check_args(args, 1)
        load_state(pearl.PearlAgent(ckpt["num_actions"], args), ckpt["model"], opts.checkpoint, "PEARL agent")
        pearl.atari.load_resume(args, pearl.MODULE)  # --resume: this run's own checkpoint, with the same settings
        pearl.adapt(args, ckpt["model"], opts.task, ckpt["num_actions"], writer=run.writer, eval_every=eval_every,
                    log_eval=_new_points(run), train_tasks=ckpt["train_tasks"])
        return
    der = importlib.import_module(BASE_MODULES["atari"])
    encoder_only = ckpt is not None and opts.load_encoder_only
    # one game per batch; pretrained agents keep their 18 padded actions, scratch and --load-encoder-only
    # use the game's own set
    args = script_args(der, ckpt, overrides, games_per_batch=1, pad_actions=ckpt is not None and not encoder_only,
                       freeze_encoder=encoder_only, unfreeze_encoder_at=None, **budget)
    der.check_args(args, 1)
    q_network = None
    if ckpt is not None:
        num_actions = der.atari.num_game_actions(opts.task) if encoder_only else ckpt["num_actions"]
        torch.manual_seed(args.seed)  # --load-encoder-only's fresh heads are drawn from --seed
        q_network = der.QNetwork(num_actions, args.hidden_size, args.num_atoms, args.v_min, args.v_max, args.noisy_std)
        state = ckpt["model"]
        if encoder_only:  # the heads stay freshly initialised
            state = {k: v for k, v in state.items() if k.startswith("encoder.")}
        load_state(q_network, state, opts.checkpoint, "DER network", strict=not encoder_only)
        for layer in q_network.noisy_layers():  # noisy sigmas re-initialised for the new game
            layer.reset_sigma()
    der.atari.load_resume(args, der.MODULE)  # --resume: this run's own checkpoint, with the same settings
    der.train(args, [opts.task], q_network=q_network, method="finetune" if ckpt else "scratch",
              writer=run.writer, log_eval=_new_points(run), eval_every=eval_every)


def _new_points(run: Run):
    """run.log_eval for the points eval.csv does not hold yet: a resumed run re-runs the evaluations its
    checkpoint left unfinished, and one of them may have been logged after that checkpoint was written."""
    if not getattr(run, "resume", False):
        return run.log_eval
    run.open()
    logged = {step for step, _ in run.curve}
    return lambda step, value, episodes=None: None if step in logged else run.log_eval(step, value, episodes)


# --------------------------------------------------------------------------- RLBench


def is_rlbench_task(task: str) -> bool:
    """The paper's eleven RLBench tasks and the Meta-World stand-in's ML10 tasks."""
    from envs.rlbench import BACKEND_TASKS

    return any(task in tasks for tasks in BACKEND_TASKS.values())


def reset_q_heads(module, net: torch.nn.Module) -> None:
    """--load-encoder-only: one depth's Q-attention network keeps its encoder, and its Q outputs (the
    voxel head; at the last depth also the rotation and gripper head) start anew, initialised as the
    C2F-ARM script `module` initialises them (its `_init`)."""
    module._init(net.q_trans, activation=False)
    if net.rot_grip is not None:
        for block in net.rot_grip[:-1]:
            module._init(block[0], activation=True)
        module._init(net.rot_grip[-1], activation=False)


def finetune_rlbench(ckpt: dict | None, opts: argparse.Namespace, overrides: list[str], run: Run) -> None:
    """MT/Reptile/scratch: C2F-ARM (the MT script's learner and loop) on the new task, whose
    buffer holds `--demos` demos (paper: 0, 1 or 2), batch 60 from it. PEARL: infer the latent
    from the new task's experience with `adapt`, no gradient step. Every flag and checkpoint (with
    --resume the run's own, and its replay.npz) is checked before `run` creates anything and before
    a demo is collected."""
    c2f = importlib.import_module(BASE_MODULES["rlbench"])
    rlb = importlib.import_module("envs.rlbench")  # the scripts' shared plumbing: setup, replay, checkpoints
    method = ckpt["method"] if ckpt else "scratch"
    pearl = method == "pearl"
    module = importlib.import_module("c2farm_pearl_rlbench") if pearl else c2f
    # Paper: fine-tune the whole agent with batch 60 from the new task; 2 demos unless --demos says otherwise.
    # The 10k-step budget and the evaluation every 1000 steps are ours (the paper's RLBench curves give
    # neither in env steps); both are flags. The replay is saved halfway (and at a stop) for --resume.
    args = script_args(module, ckpt, overrides, train_tasks=[opts.task], held_out_task=None, batch_size=60, demos=2,
                       total_timesteps=10_000, replay_save_interval=5_000, output_dir=run.output_dir,
                       resume=opts.resume)
    if args.backend not in c2f.BACKEND_TASKS:
        raise FinetuneError(f"unknown backend '{args.backend}': expected metaworld or rlbench")
    if opts.task not in c2f.BACKEND_TASKS[args.backend]:
        raise FinetuneError(f"task '{opts.task}' is not a task of the {args.backend} backend"
                            + (" this checkpoint was trained on" if ckpt else ""))
    if ckpt is not None and opts.task in ckpt["train_tasks"]:
        print(f"warning: {opts.task} was one of the checkpoint's training tasks", flush=True)
    eval_every = opts.eval_every or 1000
    label = "pearl" if pearl else "finetune" if ckpt else "scratch"  # the method this run's checkpoint names
    path, replay = os.path.join(run.output_dir, run_dir.CHECKPOINT), os.path.join(run.output_dir, rlb.REPLAY)
    stop = None
    try:
        own = run_dir.load_resume(run.output_dir, module.__name__, dataclasses.asdict(args), rlb.RESUME_FREE) \
            if opts.resume else None
        if own is not None and (own["method"] != label or own["train_tasks"] != [opts.task]):
            raise FinetuneError(f"--resume: {path} holds a {own['method']} run on {', '.join(own['train_tasks'])}, "
                                f"not this {label} run on {opts.task}")
        if own is not None and own["resume"]["finished"]:
            run.open()
            print(f"the run in {run.output_dir} is complete ({own['global_step']} env steps): nothing to resume")
            return
        device, tasks, agent = rlb.setup(args, [opts.task], module.check_args, module.make_agent,
                                         latent=args.latent_size if pearl else 0)
        try:
            learner = (module.PEARLLearner if pearl else c2f.C2FARMLearner)(agent, [], args, device)
            loop = rlb.restore(learner, own, path) if own is not None else None
            if own is None and ckpt is not None:  # the pretrained weights (PEARL: the agent and its context encoder)
                load_state(learner.model, ckpt["model"], opts.checkpoint, f"{'PEARL-' if pearl else ''}C2F-ARM agent")
                if opts.load_encoder_only:  # keep the Q-attention encoders, new Q outputs (paper appendix)
                    for net in agent.qnets:
                        reset_q_heads(module, net)
            run.open()  # the folder, its lock, eval.csv and TensorBoard: only now that every check has passed
            stop = run_dir.StopRequest()
            learner.buffers, exact = rlb.make_buffers(args, [opts.task], tasks, agent, module.ReplayBuffer, stop,
                                                      own and replay, own and own["global_step"])
            if loop is not None and not exact:
                loop["done"] = True  # the episode in progress restarts

            def save(step, loop, with_replay):
                rlb.save_run(run.output_dir, module.SCRIPT, label, args, learner, [opts.task], step, loop, with_replay)

            if pearl:
                step = module.adapt(args, learner, tasks, opts.task, run.writer, _new_points(run), eval_every,
                                    save=save, stop=stop, loop=loop)
            else:
                step = c2f.train(args, learner, tasks, [opts.task], run.writer, log_eval=_new_points(run),
                                 eval_every=eval_every, save=save, stop=stop, loop=loop)
        finally:
            for task in tasks:
                task.close()
    except c2f.TaskError as e:  # one class: envs.rlbench.TaskError, for the three scripts
        raise FinetuneError(str(e)) from None
    if stop:
        stop.exit(run.output_dir, step)


# --------------------------------------------------------------------------- main

BENCHMARKS: dict[str, tuple[Callable[[str], bool], Callable, str, str]] = {
    # benchmark: (task check, adaptation, eval metric, what a task is)
    "procgen": (is_procgen_task, finetune_procgen, "mean_return", "a CoinRun level index in [0, 2**31) such as 10000"),
    "atari": (is_atari_task, finetune_atari, "mean_return", "an Atari game such as Pong"),
    "rlbench": (is_rlbench_task, finetune_rlbench, "success_rate", "a task such as drawer-open-v3 or push_button"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description=__doc__.split("\n\n")[0],
        epilog="Any other flag is passed to the base script's Args (e.g. --num-envs 4 --total-timesteps 100000); "
               "`finetune.py --checkpoint X --task T --help` lists them with the values this run would use.",
        add_help=False,  # --help is handled in main, so that it can show the base script's flags too
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help (and, with a checkpoint or "
                        "--scratch and a --task, the base script's flags) and exit")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint.pt written by one of the pretraining scripts")
    src.add_argument("--scratch", choices=sorted(BENCHMARKS), help="train a fresh network on BENCHMARK (the baseline)")
    parser.add_argument("--task", help="held-out task: Procgen level, Atari game, or RLBench/Meta-World task")
    parser.add_argument("--output-dir", default=None,
                        help="where eval.csv, logs and checkpoint.pt go (default runs/finetune_...)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir (required) from its checkpoint.pt: pass the same "
                             "flags again; eval.csv and the TensorBoard log continue, the budget stays the same")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="env steps between evaluations (default: the benchmark's)")
    parser.add_argument("--load-encoder-only", action="store_true",
                        help="Atari/RLBench: keep the pretrained encoder, re-initialise the heads (paper appendix); "
                             "Atari freezes it, unless --unfreeze-encoder-at N lets it train from step N")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    opts, overrides = parser.parse_known_args(argv)
    if opts.help and (opts.task is None or not (opts.checkpoint or opts.scratch)):
        parser.print_help()  # nothing to adapt yet: finetune.py's own flags only
        raise SystemExit(0)
    if not (opts.checkpoint or opts.scratch):
        parser.error("one of the arguments --checkpoint --scratch is required")
    if opts.task is None:
        parser.error("the following arguments are required: --task")
    if opts.resume and opts.output_dir is None:
        raise FinetuneError("--resume needs --output-dir: the directory of the run to continue")
    if opts.eval_every is not None and opts.eval_every < 1:
        raise FinetuneError(f"--eval-every must be at least 1 env step (got {opts.eval_every})")
    return opts, overrides


def check_output_dir(path: str, resume: bool) -> None:
    """envs.run_dir's checks (file, under a file, unwritable, a run there without --resume, --resume
    without a checkpoint), before anything is created, as finetune.py's one-line error."""
    try:
        run_dir.check_output_dir(path, resume)
    except SystemExit as e:
        raise FinetuneError(str(e.code).removeprefix("error: ")) from None


def resume_point(output_dir: str, benchmark: str, method: str) -> int:
    """--resume: the env step of the run's own checkpoint in `output_dir`, validated like any checkpoint.
    It must be a fine-tuning run (its folder has an eval.csv) of this benchmark and of this run's kind
    (`method`: scratch, finetune, or the rl2 / pearl adaptation)."""
    path = os.path.join(output_dir, run_dir.CHECKPOINT)
    own = load_checkpoint(path)
    if own["benchmark"] != benchmark:
        raise FinetuneError(f"--resume: {path} is a run of the {own['benchmark']} benchmark, not of {benchmark}")
    if not os.path.isfile(os.path.join(output_dir, "eval.csv")):
        raise FinetuneError(f"--resume: {output_dir} holds a pretraining run of {own['module']}, not a fine-tuning "
                            "run (no eval.csv)")
    if own["method"] != method:
        raise FinetuneError(f"--resume: {path} holds a {own['method']} run, not this {method} run; pass the run's "
                            "own --checkpoint or --scratch")
    return own["global_step"]


class _HelpRun:
    """Stands in for Run while `--help` asks the base script's parser for its flags: creates nothing."""

    def __init__(self, output_dir: str, metric: str):
        self.output_dir, self.metric, self.writer = output_dir, metric, None


def main(argv: list[str] | None = None) -> str:
    opts, overrides = parse_args(argv)
    ckpt = load_checkpoint(opts.checkpoint) if opts.checkpoint else None
    benchmark = ckpt["benchmark"] if ckpt else opts.scratch
    is_task, adapt, metric, task_kind = BENCHMARKS[benchmark]
    if not is_task(opts.task):
        others = [b for b, (check, *_rest) in BENCHMARKS.items() if b != benchmark and check(opts.task)]
        if others:
            source = f"checkpoint {opts.checkpoint} is from" if ckpt is not None else "--scratch asks for"
            raise FinetuneError(f"{source} the {benchmark} benchmark, but task '{opts.task}' belongs to {others[0]}")
        raise FinetuneError(f"unknown {benchmark} task '{opts.task}': expected {task_kind}")
    if opts.load_encoder_only and (ckpt is None or benchmark == "procgen" or ckpt["method"] in ("rl2", "pearl")):
        raise FinetuneError("--load-encoder-only needs an MT or Reptile checkpoint of Atari or RLBench "
                            "(Procgen fine-tunes the whole network; RL2 and PEARL adapt without gradients)")
    label = f"{ckpt['module']}[{ckpt['method']}]" if ckpt else f"scratch[{benchmark}]"
    method = ckpt["method"] if ckpt else "scratch"
    default_dir = os.path.join("runs", f"finetune_{benchmark}_{method}_{opts.task}_{int(time.time())}")
    output_dir = opts.output_dir or default_dir
    opts.output_dir = output_dir
    if opts.help:  # finetune.py's flags, then the base script's with the values this run would use
        build_parser().print_help()
        print(f"\nFlags of the base script for {label} (defaults: the script's, then the checkpoint's, "
              "then fine-tuning's):\n", flush=True)
        adapt(ckpt, opts, overrides + ["--help"], _HelpRun(output_dir, metric))  # tyro prints and exits
        raise SystemExit(0)
    check_output_dir(output_dir, opts.resume)
    kind = "scratch" if ckpt is None else method if method in ("rl2", "pearl") else "finetune"
    resume_step = resume_point(output_dir, benchmark, kind) if opts.resume else None
    print(f"{'resuming' if opts.resume else 'fine-tuning'} {label} on {benchmark} task {opts.task} -> {output_dir}"
          + (f" from env step {resume_step}" if opts.resume else ""), flush=True)
    run = Run(output_dir, metric, opts.resume, resume_step)  # creates nothing until the benchmark's checks pass
    try:
        adapt(ckpt, opts, overrides, run)
    except BaseException:  # an error (or Ctrl-C) ends the run without a summary line
        run.close()
        raise
    return run.close(f"{label} on {opts.task}")


if __name__ == "__main__":
    try:
        main()
    except FinetuneError as e:
        sys.exit(f"finetune.py: error: {e}")

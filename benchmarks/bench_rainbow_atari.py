"""Speed of DER on the CPU: env steps per second once learning has started, and where the time
goes (emulator, acting, replay, update). Prints numbers; asserts nothing.

    python benchmarks/bench_rainbow_atari.py                      # Pong, 600 learning steps
    python benchmarks/bench_rainbow_atari.py --game Assault --steps 2000 --threads 2
    python benchmarks/bench_rainbow_atari.py --compare            # A/B of the update's speed-ups

The loop is rainbow_mt_atari.train's step (same pieces, imported), with a timer around each part.
`--compare` times one DER update under variants, interleaved so that a busy machine slows
all of them alike: Adam fused vs. per-tensor (foreach=False), frames converted to float by
numpy vs. torch, and 1 vs. 2 torch threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rainbow_mt_atari as der  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--game", default="Pong")
    p.add_argument("--steps", type=int, default=600, help="timed env steps after learning starts")
    p.add_argument("--learning-starts", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compare", action="store_true", help="A/B the update variants instead")
    p.add_argument("--repeats", type=int, default=5, help="--compare: interleaved rounds of 20 updates")
    return p.parse_args()


def full_loop(opts) -> None:
    der.keep_freed_memory()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    args = der.Args(batch_size=opts.batch_size, games_per_batch=1, pad_actions=False)
    env = der.make_env(opts.game, 0, args=args)
    num_actions = len(env.action_set)
    q = der.QNetwork(num_actions)
    target = der.QNetwork(num_actions)
    target.load_state_dict(q.state_dict())
    q.bf16 = target.bf16 = der.use_bf16(opts.precision, torch.device("cpu"))
    optimizer = torch.optim.Adam(q.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    buffer = der.ReplayBuffer(100_000, args.n_step, args.gamma, args.priority_exponent)
    rng = np.random.default_rng(0)
    timers = dict.fromkeys(["emulator", "acting", "replay", "update"], 0.0)
    obs, _ = env.reset()

    def env_step(action):
        nonlocal obs
        t0 = time.perf_counter()
        nxt, r, term, trunc, _ = env.step(action)
        if term or trunc:
            nxt, _ = env.reset()
        t1 = time.perf_counter()
        buffer.add(obs[-1], action, float(np.sign(r)), term or trunc)
        timers["emulator"] += t1 - t0
        timers["replay"] += time.perf_counter() - t1
        obs = nxt

    t_fill = time.perf_counter()
    for _ in range(opts.learning_starts):
        env_step(int(rng.integers(num_actions)))
    fill_sps = opts.learning_starts / (time.perf_counter() - t_fill)
    timers = dict.fromkeys(timers, 0.0)
    start = time.perf_counter()
    for _ in range(opts.steps):
        t0 = time.perf_counter()
        action = der.act(q, obs, "cpu")
        timers["acting"] += time.perf_counter() - t0
        env_step(action)
        t0 = time.perf_counter()
        q.reset_noise()
        batch, parts = der.sample_games([buffer], args, 0.4, rng)
        t1 = time.perf_counter()
        losses = der.optimize(q, target, optimizer, batch, args, "cpu").numpy()
        t2 = time.perf_counter()
        buffer.update_priorities(batch["indices"], losses)
        timers["replay"] += (t1 - t0) + (time.perf_counter() - t2)
        timers["update"] += t2 - t1
    total = time.perf_counter() - start
    sps = opts.steps / total
    print(f"game {opts.game}, batch {opts.batch_size}, torch threads {opts.threads}, {opts.steps} steps after "
          f"learning starts")
    print(f"env steps per second before learning starts (emulator + replay add): {fill_sps:.0f}")
    print(f"env steps per second after learning starts (one update per step):     {sps:.1f}")
    for k, v in timers.items():
        print(f"  {k:9s} {1000 * v / opts.steps:7.2f} ms/step  {100 * v / total:5.1f}% of the time")
    projected = opts.learning_starts / fill_sps + (100_000 - opts.learning_starts) / sps
    print(f"projected 100k-step DER run (without evaluation): {projected / 60:.1f} min")


def compare(opts) -> None:
    args = der.Args(batch_size=opts.batch_size)
    buffer = der.ReplayBuffer(10_000, args.n_step, args.gamma, args.priority_exponent)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        buffer.add(rng.integers(0, 255, (84, 84), dtype=np.uint8), int(rng.integers(6)), 0.0, rng.random() < 0.01)
    batch = buffer.sample(opts.batch_size, 0.4)
    numpy_float, torch_batch = "numpy", "torch"

    def variant(fused: bool, threads: int, frames: str):
        q, t = der.QNetwork(6), der.QNetwork(6)
        opt = torch.optim.Adam(q.parameters(), lr=1e-4, eps=1.5e-4, fused=fused, foreach=None if fused else False)
        return q, t, opt, threads, frames

    variants = {
        "fused Adam, numpy float, 1 thread (ours)": variant(True, 1, numpy_float),
        "per-tensor Adam, numpy float, 1 thread": variant(False, 1, numpy_float),
        "fused Adam, torch float, 1 thread": variant(True, 1, torch_batch),
        "fused Adam, numpy float, 2 threads": variant(True, 2, numpy_float),
    }
    times = {name: [] for name in variants}
    for _ in range(opts.repeats):
        for name, (q, t, opt, threads, frames) in variants.items():
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            # der.optimize converts uint8 frames in numpy (.astype), as training does;
            # the other path hands uint8 tensors to the network, which converts them in torch
            update = _optimize_torch_convert if frames is torch_batch else der.optimize
            for _ in range(20):
                q.reset_noise()
                update(q, t, opt, batch, args, "cpu")
            times[name].append((time.perf_counter() - t0) / 20 * 1000)
    print(f"one DER update, batch {opts.batch_size}, median of {opts.repeats} interleaved rounds of 20:")
    for name, v in times.items():
        print(f"  {name:45s} {np.median(v):6.2f} ms")


def _optimize_torch_convert(q, target, optimizer, batch, args, device):
    """der.optimize, but with the frames handed to the network as uint8 torch tensors."""
    obs, next_obs = torch.from_numpy(batch["obs"]), torch.from_numpy(batch["next_obs"])
    actions = torch.from_numpy(batch["actions"])
    rows = torch.arange(len(actions))
    log_probs = q(obs)[rows, actions]
    with torch.no_grad():
        best = q.q_values(next_obs).argmax(1)
        target.reset_noise()
        probs = target(next_obs).exp()[rows, best]
        m = der.project_distribution(probs, torch.from_numpy(batch["returns"]), torch.from_numpy(batch["discounts"]),
                                     q.support)
    losses = -(m * log_probs).sum(1)
    optimizer.zero_grad()
    (torch.from_numpy(batch["weights"]).float() * losses).mean().backward()
    torch.nn.utils.clip_grad_norm_(q.parameters(), args.max_grad_norm)
    optimizer.step()
    return losses.detach()


if __name__ == "__main__":
    opts = parse()
    compare(opts) if opts.compare else full_loop(opts)

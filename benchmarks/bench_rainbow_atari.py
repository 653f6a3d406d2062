"""Speed of DER on the CPU (or a GPU, --cuda): env steps per second once learning has started, and where the time
goes (emulator, acting, replay, update). Prints numbers; asserts nothing.

    python benchmarks/bench_rainbow_atari.py                      # Pong, 600 learning steps
    python benchmarks/bench_rainbow_atari.py --full-actions       # 18 actions, as in fine-tuning
    python benchmarks/bench_rainbow_atari.py --threads 1          # one torch thread
    python benchmarks/bench_rainbow_atari.py --default-malloc     # glibc's default malloc settings
    python benchmarks/bench_rainbow_atari.py --compare            # A/B of the update's speed-ups
    python benchmarks/bench_rainbow_atari.py --full-actions --cuda  # the learner on a GPU

The loop is rainbow_mt_atari.train's step (same pieces, imported), with a timer around each part;
it leaves out the evaluations, which train() runs in a second process (see envs/atari.py Evaluator).
Before the timed steps the replay is filled to --replay-fill transitions of random frames, the
mean replay size of a 100k-step run: sampling from a large replay is slower (cache misses).
`--compare` times the encoder (forward + backward) and one whole DER update under variants,
interleaved so that a busy machine slows all of them alike: the speed form (step weights, 1/255
folded into conv1, bf16) vs. the plain nn.Conv2d modules, bf16 vs. fp32, fused vs.
per-tensor Adam, 2 vs. 1 torch threads.
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
    p.add_argument("--replay-fill", type=int, default=50_000,
                   help="random-frame transitions put in the replay before the timed steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=der.Args.torch_threads)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--full-actions", action="store_true",
                   help="18 actions, as a network fine-tuned from a pretrained checkpoint has (default: the game's own)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc settings alone (train() keeps freed memory, see keep_freed_memory)")
    p.add_argument("--cuda", action="store_true", help="the networks and the update on the GPU")
    p.add_argument("--no-speed-form", dest="speed_form", action="store_false",
                   help="the plain nn.Conv2d modules instead of the speed form (rainbow_mt_atari --no-speed-form)")
    p.add_argument("--compare", action="store_true", help="A/B the update variants instead")
    p.add_argument("--repeats", type=int, default=5, help="--compare: interleaved rounds of 20 updates")
    return p.parse_args()


def full_loop(opts) -> None:
    if not opts.default_malloc:
        der.keep_freed_memory()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    args = der.Args(batch_size=opts.batch_size, games_per_batch=1, pad_actions=False, torch_threads=opts.threads)
    env = der.atari.make_env(opts.game, 0, max_noops=args.max_noops)
    num_actions = der.FULL_ACTIONS if opts.full_actions else len(env.action_set)
    if opts.cuda and not torch.cuda.is_available():
        raise SystemExit("error: --cuda given but torch sees no CUDA device")
    device = torch.device("cuda" if opts.cuda else "cpu")
    q = der.QNetwork(num_actions).to(device)
    target = der.QNetwork(num_actions).to(device)
    target.load_state_dict(q.state_dict())
    q.bf16 = target.bf16 = der.use_bf16(opts.precision, device)
    optimizer = torch.optim.Adam(q.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    buffer = der.ReplayBuffer(100_000, args.n_step, args.gamma, args.priority_exponent)
    rng = np.random.default_rng(0)
    for _ in range(opts.replay_fill):
        buffer.add(rng.integers(0, 256, (84, 84), dtype=np.uint8), int(rng.integers(num_actions)), 0.0,
                   bool(rng.random() < 0.002))
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
        q.reset_noise()
        weights = der.step_weights(q) if opts.speed_form else None
        action = der.act(q, obs, device, weights)
        timers["acting"] += time.perf_counter() - t0
        env_step(action)
        t0 = time.perf_counter()
        batch, parts = der.sample_games([buffer], args, 0.4, rng)
        t1 = time.perf_counter()
        losses = der.optimize(q, target, optimizer, batch, args, device, weights).cpu().numpy()
        t2 = time.perf_counter()
        buffer.update_priorities(batch.indices, losses)
        timers["replay"] += (t1 - t0) + (time.perf_counter() - t2)
        timers["update"] += t2 - t1
    total = time.perf_counter() - start
    sps = opts.steps / total
    where = torch.cuda.get_device_name() if opts.cuda else f"CPU, torch threads {opts.threads}"
    print(f"game {opts.game}, {num_actions} actions, batch {opts.batch_size}, {where}, speed form {opts.speed_form}, "
          f"bf16 {q.bf16 and opts.speed_form}, "
          f"replay {buffer.size} transitions at the end, {opts.steps} steps after learning starts")
    print(f"env steps per second before learning starts (emulator + replay add): {fill_sps:.0f}")
    print(f"env steps per second after learning starts (one update per step):     {sps:.1f}")
    for k, v in timers.items():
        print(f"  {k:9s} {1000 * v / opts.steps:7.2f} ms/step  {100 * v / total:5.1f}% of the time")
    projected = opts.learning_starts / fill_sps + (100_000 - opts.learning_starts) / sps
    print(f"projected 100k-step DER run (without evaluation): {projected / 60:.1f} min")


def compare(opts) -> None:
    der.keep_freed_memory()
    args = der.Args(batch_size=opts.batch_size)
    buffer = der.ReplayBuffer(10_000, args.n_step, args.gamma, args.priority_exponent)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        buffer.add(rng.integers(0, 255, (84, 84), dtype=np.uint8), int(rng.integers(6)), 0.0, rng.random() < 0.01)
    batch = buffer.sample(opts.batch_size, 0.4)

    def variant(speed_form: bool, bf16: bool, fused: bool = True, threads: int = der.Args.torch_threads):
        q, t = der.QNetwork(6), der.QNetwork(6)
        q.bf16 = t.bf16 = bf16
        opt = torch.optim.Adam(q.parameters(), lr=1e-4, eps=1.5e-4, fused=fused, foreach=None if fused else False)
        return q, t, opt, threads, speed_form

    variants = {
        "speed form, bf16, fused Adam (ours)": variant(True, True),
        "speed form, fp32 (--precision fp32)": variant(True, False),
        "plain modules: nn.Conv2d, fp32 (--no-speed-form)": variant(False, False),
        "speed form, bf16, per-tensor Adam": variant(True, True, fused=False),
        "speed form, bf16, 1 torch thread": variant(True, True, threads=1),
    }
    encoder_times = {name: [] for name in list(variants)[:3]}  # the encoder differs in the first three only
    update_times = {name: [] for name in variants}
    obs = torch.as_tensor(batch.obs)
    for _ in range(opts.repeats):
        for name, (q, t, opt, threads, speed_form) in variants.items():
            torch.set_num_threads(threads)
            if name in encoder_times:  # encoder forward + backward, from uint8 frames
                t0 = time.perf_counter()
                for _ in range(20):
                    q.zero_grad()
                    if speed_form:
                        dtype = torch.bfloat16 if q.bf16 else torch.float32
                        features = der.fast_encoder(obs, der.encoder_weights(q.encoder, dtype))
                    else:
                        features = q.encoder(obs.float() / 255)
                    features.float().sum().backward()
                encoder_times[name].append((time.perf_counter() - t0) / 20 * 1000)
            t0 = time.perf_counter()
            for _ in range(20):
                q.reset_noise()
                der.optimize(q, t, opt, batch, args, "cpu", der.step_weights(q) if speed_form else None)
            update_times[name].append((time.perf_counter() - t0) / 20 * 1000)
    print(f"batch {opts.batch_size}, median of {opts.repeats} interleaved rounds of 20 (ms):")
    print(f"  {'':50s} {'encoder fwd+bwd':>16s} {'whole update':>13s}")
    for name, v in update_times.items():
        enc = f"{np.median(encoder_times[name]):16.2f}" if name in encoder_times else f"{'':16s}"
        print(f"  {name:50s} {enc} {np.median(v):13.2f}")


if __name__ == "__main__":
    opts = parse()
    if opts.compare and opts.cuda:
        raise SystemExit("error: --compare times the CPU variants only; drop --cuda (or --compare for the GPU loop)")
    compare(opts) if opts.compare else full_loop(opts)

"""Speed of C2F-ARM on this machine: learner updates per second at the paper's batch for ARM's
network (--unet-width 64) and a CPU-sized one (16), and Meta-World env steps per second (one
8-D next-best-pose action, low-level control, rendering of front RGB + depth -> point cloud),
with and without the agent's action selection.

    python benchmarks/bench_c2farm.py                       # batch 150, 128x128, widths 64 and 16
    python benchmarks/bench_c2farm.py --batch-size 16 --unet-widths 16 --threads 2
    python benchmarks/bench_c2farm.py --cuda
    python benchmarks/bench_c2farm.py --variants fp32 bf16 channels-last --updates 3   # trials, interleaved

--variants times the same updates in other numeric forms, in turn, for the issue-11 trial:
`bf16` runs each update under CPU/CUDA bf16 autocast (convolutions and matrix products in bf16),
`channels-last` keeps the 3D convolutions' weights in channels_last_3d layout. The scripts train
in fp32; a variant belongs in them only if it is faster here and computes the same within bf16's
precision.
"""

import contextlib

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import c2farm_mt_rlbench as c2f  # noqa: E402
from envs import rlbench as rlb  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=150)  # paper: 15 x 10 tasks
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--unet-widths", type=int, nargs="+", default=[64, 16],
                        help="Q-attention widths to time (64: ARM's network; 16: CPU-sized)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--env-steps", type=int, default=30)
    parser.add_argument("--task", default="pick-place-v3")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--variants", nargs="+", default=["fp32"], choices=["fp32", "bf16", "channels-last"],
                        help="numeric forms of the update to time, in turn (fp32: the scripts' own)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    for width in opts.unet_widths:
        args = c2f.Args(train_tasks=[opts.task], demos=2, image_size=opts.image_size, unet_width=width,
                        batch_size=opts.batch_size, cuda=opts.cuda, torch_threads=opts.threads)
        device, tasks, agent = rlb.setup(args, [opts.task], c2f.check_args, c2f.make_agent)
        buffers, _ = rlb.make_buffers(args, [opts.task], tasks, agent, c2f.ReplayBuffer)
        learner = c2f.C2FARMLearner(agent, buffers, args, device)
        print(f"device={device} torch_threads={torch.get_num_threads()} image={opts.image_size} "
              f"unet_width={width} params={sum(p.numel() for p in agent.parameters()):,}")
        for variant in opts.variants:
            if variant == "channels-last":
                agent.to(memory_format=torch.channels_last_3d)
            autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if variant == "bf16"
                        else contextlib.nullcontext())
            with autocast:
                learner.update(0)  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.time()
                for i in range(opts.updates):
                    learner.update(i)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            dt = time.time() - t0
            if variant == "channels-last":
                agent.to(memory_format=torch.contiguous_format)
            print(f"updates: batch {opts.batch_size}, unet_width {width}, {variant}: {opts.updates / dt:.3f} "
                  f"updates/s ({dt / opts.updates:.2f} s each)", flush=True)
        task = tasks[0]
        if width != opts.unet_widths[-1]:
            task.close()
    rng = np.random.default_rng(0)  # the env and acting timings use the last width
    _, obs = task.reset()
    t0, n = time.time(), 0
    for i in range(opts.env_steps):  # random reachable targets around the hand
        target = np.clip(obs.gripper_pose[:3] + rng.uniform(-0.1, 0.1, 3), task.workspace[0], task.workspace[1])
        obs, _, done = task.step(np.concatenate([target, obs.gripper_pose[3:], [rng.integers(2)]]))
        n += 1
        if done:
            _, obs = task.reset()
    dt = time.time() - t0
    t1 = time.time()
    for _ in range(opts.env_steps):
        task.render()
    render = (time.time() - t1) / opts.env_steps
    print(f"env: {n / dt:.1f} env steps/s (control + render); render alone {render * 1e3:.1f} ms/frame "
          f"(RGB + depth + point cloud, {opts.image_size}x{opts.image_size})")
    t0 = time.time()
    for t in range(opts.env_steps):
        action = learner.act(obs, t % 10, 0, explore=True)
        obs, _, done = task.step(agent.decode_action(action))
        if done:
            _, obs = task.reset()
    dt = time.time() - t0
    print(f"acting: {opts.env_steps / dt:.1f} env steps/s including C2F-ARM action selection")
    task.close()


if __name__ == "__main__":
    main()

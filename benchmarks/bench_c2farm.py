"""Speed of C2F-ARM on this machine: learner updates per second at the paper's batch, and
Meta-World env steps per second (one 8-D next-best-pose action, low-level control, rendering
of front RGB + depth -> point cloud), with and without the agent's action selection.

    python benchmarks/bench_c2farm.py                       # batch 150, 128x128, width 16
    python benchmarks/bench_c2farm.py --batch-size 16 --threads 2
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import c2farm_mt_rlbench as c2f  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=150)  # paper: 15 x 10 tasks
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--unet-width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--env-steps", type=int, default=30)
    parser.add_argument("--task", default="pick-place-v3")
    parser.add_argument("--cuda", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    args = c2f.Args(train_tasks=[opts.task], demos=2, image_size=opts.image_size, unet_width=opts.unet_width,
                    batch_size=opts.batch_size, cuda=opts.cuda, torch_threads=opts.threads)
    device, tasks, agent, buffers = c2f.setup(args, [opts.task])
    learner = c2f.C2FARMLearner(agent, buffers, args, device)
    task = tasks[0]
    print(f"device={device} torch_threads={torch.get_num_threads()} image={opts.image_size} "
          f"unet_width={opts.unet_width} params={sum(p.numel() for p in agent.parameters()):,}")

    learner.update(0)  # warm-up
    t0 = time.time()
    for i in range(opts.updates):
        learner.update(i)
    dt = time.time() - t0
    print(f"updates: batch {opts.batch_size}: {opts.updates / dt:.3f} updates/s ({dt / opts.updates:.2f} s each)")

    rng = np.random.default_rng(0)
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

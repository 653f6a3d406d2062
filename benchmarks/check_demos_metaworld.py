"""Are the Meta-World demos real? Replay each scripted demo's keypoint actions through the
agent's own 8-D next-best-pose interface and print the success rate per task.

    python benchmarks/check_demos_metaworld.py --demos 10

For every ML10 task: collect demos from Meta-World's scripted expert, discover keypoints
(gripper state change or arm at rest, plus the last frame), reset the scene to the demo's
initial state, and execute the keypoint poses with MetaWorldTask.step, twice: the exact
poses ("continuous"), and the poses as C2F-ARM can express them (voxel centre of the last
depth, 5-degree rotation bins: "discretized"). The second column is the ceiling the agent
can reach from its demos.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import c2farm_mt_rlbench as c2f  # noqa: E402
from envs.rlbench import discover_keypoints  # noqa: E402


def replay(task, demo, actions) -> float:
    task.reset_to_demo(demo)
    for action in actions:
        _, reward, terminate = task.step(action)
        if reward > 0:
            return 1.0
        if terminate:
            return 0.0
    return 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demos", type=int, default=10)
    parser.add_argument("--tasks", nargs="*", default=list(c2f.METAWORLD_TRAIN_TASKS + c2f.METAWORLD_TEST_TASKS))
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    agent = c2f.make_agent(c2f.Args(backend="metaworld", unet_width=4))  # only its action encoding is used
    print(f"{'task':28s} {'demos':>5s} {'keypoints':>9s} {'continuous':>10s} {'discretized':>11s} {'time':>6s}")
    rows = []
    for name in opts.tasks:
        t0 = time.time()
        task = c2f.make_task("metaworld", name, image_size=16, seed=opts.seed)
        try:
            demos = task.get_demos(opts.demos, frames=lambda demo: [])  # no images needed here
        except RuntimeError as e:
            print(f"{name:28s} expert failed: {e}", flush=True)
            task.close()
            continue
        cont, disc, nkp = [], [], []
        for demo in demos:
            keypoints = discover_keypoints(demo, "metaworld")
            nkp.append(len(keypoints))
            poses = [np.concatenate([demo[k].gripper_pose, [demo[k].gripper_open]]) for k in keypoints]
            cont.append(replay(task, demo, poses))
            disc.append(replay(task, demo, [agent.decode_action(agent.encode_pose(p[:7], p[7])) for p in poses]))
        task.close()
        rows.append((np.mean(cont), np.mean(disc)))
        print(f"{name:28s} {len(demos):5d} {np.mean(nkp):9.1f} {np.mean(cont):10.2f} {np.mean(disc):11.2f} "
              f"{time.time() - t0:5.0f}s", flush=True)
    print(f"{'mean':28s} {'':5s} {'':9s} {np.mean([r[0] for r in rows]):10.2f} {np.mean([r[1] for r in rows]):11.2f}")


if __name__ == "__main__":
    main()

"""RLBench and its Meta-World stand-in behind one task API, for the C2F-ARM scripts.

    task = make_task("metaworld", "reach-v3", image_size=128, seed=0)   # or ("rlbench", "push_button")
    descriptions, obs = task.reset()
    obs, reward, terminate = task.step(action)   # 8-D: xyz, quaternion xyzw, gripper open (1) / closed (0)
    demos = task.get_demos(5)                    # lists of Observation, successful expert episodes
    state = task.get_state(); obs = task.set_state(state)   # resume mid-episode (Meta-World; RLBench: None)

This is the environment, not the method (as CleanRL takes its environments from gym
wrappers): the two backends (`RLBenchTask`, the paper's; `MetaWorldTask`, pip-installable),
the task lists, the scene bounds of each backend, the pose and camera math they need, and each
backend's rule for a demo's keypoints (ARM's joint-velocity rule on RLBench, end-effector
speed on Meta-World, whose mocap-driven arm never rests).
`c2farm_{mt,reptile,pearl}_rlbench.py` import it.

- RLBench 1.2 (CoppeliaSim through PyRep) is imported only when asked for: pip cannot install
  CoppeliaSim. Motion-planning failures end the episode as a failure instead of the run.
- Meta-World (MuJoCo) stands in for it: the 8-D next-best pose is executed by driving
  Meta-World's low-level controller towards it (the stand-in for RLBench's motion planner),
  a free "front" camera renders RGB and depth, and the depth becomes a world-frame point
  cloud; Meta-World's scripted experts give the demos. Its ML10 split mirrors the study's
  leave-one-out: ten training tasks and five held-out ones.
"""

from __future__ import annotations

import os

# Headless MuJoCo rendering on the CPU (must be set before mujoco is imported).
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("EGL_PLATFORM", "surfaceless")

import dataclasses
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from envs.run_dir import (
    CHECKPOINT, StopRequest, atomic_save, check_output_dir, load_resume, open_output_dir, remove_temporaries,
    rng_state, save_arrays, set_rng_state)

# The paper's eleven RLBench tasks (variation 0).
RLBENCH_TASKS = (
    "pick_up_cup", "phone_on_base", "pick_and_lift", "put_rubbish_in_bin", "push_button", "reach_target",
    "lamp_on", "take_lid_off_saucepan", "stack_wine", "open_door", "take_usb_out_of_computer",
)
# Meta-World ML10 split (v3 names).
METAWORLD_TRAIN_TASKS = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-close-v3", "button-press-topdown-v3",
    "peg-insert-side-v3", "window-open-v3", "sweep-v3", "basketball-v3",
)
METAWORLD_TEST_TASKS = ("drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3", "lever-pull-v3")
BACKEND_TASKS = {"rlbench": RLBENCH_TASKS, "metaworld": METAWORLD_TRAIN_TASKS + METAWORLD_TEST_TASKS}

# Scene bounds [x0, y0, z0, x1, y1, z1] in metres and the half-width of the depth-1 zoom.
# RLBench: the C2F-ARM values (stepjam/ARM conf/config.yaml scene_bounds, C2FARM.yaml
# bounds_offset 0.15). Meta-World: a 0.8 m cube over its table workspace (the hand's mocap range
# is x -0.5..0.5, y 0.4..1.0, z 0.05..0.5; objects and goals lie in x -0.35..0.35, y 0.4..0.95,
# z 0..0.35), with the zoom scaled by 0.8 as well: 0.15 * 0.8 = 0.12.
SCENE_BOUNDS = {
    "rlbench": (-0.3, -0.5, 0.6, 0.7, 0.5, 1.6),
    "metaworld": (-0.4, 0.3, -0.1, 0.4, 1.1, 0.7),
}
ZOOM_HALF_WIDTH = {"rlbench": 0.15, "metaworld": 0.12}


class TaskError(ValueError):
    """Unknown task or unavailable backend: reported as one line."""


def default_tasks(backend: str, train_tasks, held_out: str | None) -> list[str]:
    """The training tasks for a run, validated; raises TaskError with one line."""
    if backend not in BACKEND_TASKS:
        raise TaskError(f"unknown backend '{backend}': expected metaworld or rlbench")
    known = BACKEND_TASKS[backend]
    for t in list(train_tasks) + ([held_out] if held_out else []):
        if t not in known:
            raise TaskError(f"unknown {backend} task '{t}': expected one of {', '.join(known)}")
    tasks = list(train_tasks) or list(RLBENCH_TASKS if backend == "rlbench" else METAWORLD_TRAIN_TASKS)
    return [t for t in tasks if t != held_out]


def make_task(backend: str, name: str, image_size: int = 128, seed: int = 0):
    """The task factory: the agent code is the same for both backends."""
    if backend == "rlbench":
        return RLBenchTask(name, image_size, seed)
    if backend == "metaworld":
        return MetaWorldTask(name, image_size, seed)
    raise TaskError(f"unknown backend '{backend}': expected metaworld or rlbench")


@dataclass
class Observation:
    """The fields of an RLBench Observation that the agent reads (same names)."""

    front_rgb: np.ndarray | None  # (H, W, 3) uint8
    front_point_cloud: np.ndarray | None  # (H, W, 3) world frame, metres
    gripper_pose: np.ndarray  # (7,) xyz + quaternion xyzw
    gripper_open: float  # 1.0 open, 0.0 closed
    gripper_joint_positions: np.ndarray  # (2,)
    joint_velocities: np.ndarray  # (7,)
    misc: dict


# --------------------------------------------------------------------------- observations as the network reads them


def lowdim_state(obs, t: int, episode_length: int) -> np.ndarray:
    """Proprioception: gripper open, gripper pose (7), finger positions (2), time in [-1, 1]."""
    time_left = (1.0 - t / episode_length) * 2.0 - 1.0
    return np.concatenate([[float(obs.gripper_open)], obs.gripper_pose, obs.gripper_joint_positions[:2],
                           [time_left]]).astype(np.float32)


LOWDIM_SIZE = 11


def obs_tensors(obs, t: int, args, device):
    """One observation as the network reads it, a batch of one: points (1, N, 3), colours in [0, 1]
    (1, N, 3), lowdim (1, LOWDIM_SIZE)."""
    points = torch.as_tensor(obs.front_point_cloud, device=device).float().reshape(1, -1, 3)
    colors = torch.as_tensor(obs.front_rgb, device=device).float().reshape(1, -1, 3) / 255.0
    return points, colors, torch.as_tensor(lowdim_state(obs, t, args.episode_length), device=device)[None]


def to_tensors(batch, device, next_obs: bool = False):
    """A replay batch's observations (or, `next_obs`, next observations) -> (points (B,N,3), colours in
    [0,1] (B,N,3), lowdim (B,L)) tensors."""
    pcd, rgb, lowdim = (batch.next_pcd, batch.next_rgb, batch.next_lowdim) if next_obs else (
        batch.pcd, batch.rgb, batch.lowdim)
    points = torch.as_tensor(pcd, device=device).float().flatten(1, 2)
    colors = torch.as_tensor(rgb, device=device).float().flatten(1, 2) / 255.0
    return points, colors, torch.as_tensor(lowdim, device=device)


# --------------------------------------------------------------------------- pose and camera math


def quaternion_to_euler(q: np.ndarray) -> np.ndarray:
    """Unit quaternion xyzw -> extrinsic xyz Euler angles in degrees (R = Rz @ Ry @ Rx)."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1.0, 1.0))
    yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return np.rad2deg([roll, pitch, yaw])


def euler_to_quaternion(euler_deg: np.ndarray) -> np.ndarray:
    """Extrinsic xyz Euler angles in degrees -> unit quaternion xyzw."""
    r, p, y = np.deg2rad(np.asarray(euler_deg, dtype=np.float64)) / 2
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    return np.array([sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy,
                     cr * cp * sy - sr * sp * cy, cr * cp * cy + sr * sp * sy])


def pointcloud_from_depth(depth: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray) -> np.ndarray:
    """World-frame points (H, W, 3) from planar depth (H, W); OpenCV pinhole camera (x right,
    y down, z forward), pixel (row v, column u), camera-to-world 4x4 extrinsics."""
    h, w = depth.shape
    v, u = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    cam = np.stack([(u - cx) * depth / fx, (v - cy) * depth / fy, depth], axis=-1)
    return (cam @ extrinsics[:3, :3].T + extrinsics[:3, 3]).astype(np.float32)


# ----------------------------------------------------------------- the scene's geometry as C2F-ARM discretises it
# A C2F-ARM action is (voxel index per depth (flattened i*V*V + j*V + k), rot x, rot y, rot z bins, gripper open).


def discretize_rotation(q: np.ndarray, resolution: float = 5.0) -> np.ndarray:
    """Quaternion -> one bin per Euler axis: (angle + 180) / resolution, rounded, modulo 360/resolution."""
    bins = int(round(360 / resolution))
    return np.round((quaternion_to_euler(q) + 180.0) / resolution).astype(np.int64) % bins


def undiscretize_rotation(bins: np.ndarray, resolution: float = 5.0) -> np.ndarray:
    """Rotation bins -> quaternion xyzw: angle = bin * resolution - 180."""
    return euler_to_quaternion(np.asarray(bins, dtype=np.float64) * resolution - 180.0)


def point_to_voxel(point: np.ndarray, bounds: np.ndarray, voxels: int) -> np.ndarray:
    """Index (i, j, k) of the voxel containing a point; points outside go to the border voxel."""
    bounds = np.asarray(bounds, dtype=np.float64)
    size = (bounds[3:] - bounds[:3]) / voxels
    return np.clip(np.floor((np.asarray(point) - bounds[:3]) / size), 0, voxels - 1).astype(np.int64)


def voxel_to_point(index: np.ndarray, bounds: np.ndarray, voxels: int) -> np.ndarray:
    """Centre of voxel (i, j, k)."""
    bounds = np.asarray(bounds, dtype=np.float64)
    size = (bounds[3:] - bounds[:3]) / voxels
    return bounds[:3] + (np.asarray(index, dtype=np.float64) + 0.5) * size


def zoom_bounds(center: np.ndarray, half_width: float) -> np.ndarray:
    """Bounds of the next depth: a cube of +-half_width around the previous depth's voxel centre."""
    center = np.asarray(center, dtype=np.float64)
    return np.concatenate([center - half_width, center + half_width])


def voxelize(points: torch.Tensor, colors: torch.Tensor, bounds: torch.Tensor, voxels: int) -> torch.Tensor:
    """Points (B, N, 3), colours in [0, 1] (B, N, 3), bounds (B, 6) -> grid (B, 10, V, V, V).

    Channels: mean xyz of the points in the voxel (3), mean RGB (3), the voxel's normalised
    index (3), occupancy (1). Points outside the bounds are dropped."""
    b, n, _ = points.shape
    lo, hi = bounds[:, None, :3], bounds[:, None, 3:]
    idx = torch.floor((points - lo) / (hi - lo) * voxels).long()
    valid = ((idx >= 0) & (idx < voxels)).all(-1).reshape(-1)
    flat = (torch.arange(b, device=points.device)[:, None] * voxels**3
            + idx[..., 0] * voxels**2 + idx[..., 1] * voxels + idx[..., 2]).reshape(-1)[valid]
    feats = torch.cat([points, colors, torch.ones_like(points[..., :1])], -1).reshape(b * n, 7)[valid]
    sums = torch.zeros(b * voxels**3, 7, device=points.device).index_add_(0, flat, feats)
    count = sums[:, 6:7]
    means = sums[:, :6] / count.clamp(min=1.0)
    occupancy = (count > 0).float()
    grid = torch.cat([means, occupancy], -1).reshape(b, voxels, voxels, voxels, 7).permute(0, 4, 1, 2, 3)
    axis = torch.arange(voxels, device=points.device, dtype=torch.float32) / (voxels - 1)
    index = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), 0).expand(b, 3, voxels, voxels, voxels)
    return torch.cat([grid[:, :6], index, grid[:, 6:]], 1)


def voxel_centers(flat_index: torch.Tensor, bounds: torch.Tensor, voxels: int) -> torch.Tensor:
    """Centres (B, 3) of flat voxel indices i*V*V + j*V + k (B,) in bounds (B, 6): voxel_to_point in torch."""
    v = voxels
    ijk = torch.stack([flat_index // (v * v), (flat_index // v) % v, flat_index % v], -1).float()
    return bounds[:, :3] + (ijk + 0.5) * (bounds[:, 3:] - bounds[:, :3]) / v


def zoom_in(bounds: torch.Tensor, flat_index: torch.Tensor, voxels: int, half_width: float, shift=None) -> torch.Tensor:
    """The next depth's bounds (B, 6): a cube of +-half_width around the centre of the chosen voxel
    (moved by `shift` (B, 3), the crop augmentation of demo transitions)."""
    center = voxel_centers(flat_index, bounds, voxels) + (0.0 if shift is None else shift)
    return torch.cat([center - half_width, center + half_width], 1)


def pose_to_action(pose: np.ndarray, gripper_open: float, bounds: np.ndarray, voxels: int, depths: int, zoom: float,
                   resolution: float, shifts: np.ndarray | None = None) -> np.ndarray:
    """8-D next-best pose (or gripper pose + open state) -> discrete action; depth d + 1 zooms
    around depth d's voxel centre moved by shifts[d] (crop augmentation; none by default)."""
    bounds = np.asarray(bounds, dtype=np.float64)
    indices = []
    for d in range(depths):
        ijk = point_to_voxel(pose[:3], bounds, voxels)
        indices.append(ijk[0] * voxels**2 + ijk[1] * voxels + ijk[2])
        shift = shifts[d] if shifts is not None and d < depths - 1 else 0.0
        bounds = zoom_bounds(voxel_to_point(ijk, bounds, voxels) + shift, zoom)
    rot = discretize_rotation(pose[3:7], resolution)
    return np.array(indices + list(rot) + [int(gripper_open > 0.5)], dtype=np.int64)


def action_to_pose(action: np.ndarray, bounds: np.ndarray, voxels: int, depths: int, zoom: float,
                   resolution: float) -> np.ndarray:
    """Discrete action -> 8-D next-best pose: last depth's voxel centre, quaternion xyzw, gripper."""
    bounds = np.asarray(bounds, dtype=np.float64)
    v = voxels
    for d in range(depths):
        i = int(action[d])
        center = voxel_to_point(np.array([i // (v * v), (i // v) % v, i % v]), bounds, v)
        bounds = zoom_bounds(center, zoom)
    quat = undiscretize_rotation(action[depths:depths + 3], resolution)
    return np.concatenate([center, quat, [float(action[-1])]])


# --------------------------------------------------------------------------- demo keypoints


def discover_keypoints(demo, backend: str = "metaworld") -> list[int]:
    """The demo's keypoints by the backend's rule: ARM's joint-velocity rule on RLBench, where the
    planner stops the arm at every waypoint; an end-effector-speed rule on Meta-World, whose
    mocap-driven arm never comes to rest (its joint velocities are never near 0)."""
    return keypoints_from_joint_velocities(demo) if backend == "rlbench" else keypoints_from_speed(demo)


def keypoints_from_joint_velocities(demo, stopping_delta: float = 0.1) -> list[int]:
    """stepjam/ARM's keypoint discovery (arm/demo_loading_utils.py), as C2F-ARM uses it on RLBench.

    A frame (not the first) is a keypoint when the gripper's open state changes there, when it
    is the last frame, or when the arm has stopped: every joint velocity within +-stopping_delta,
    the gripper state the same from two frames before to the frame after, at least two frames
    before the end, and no stop in the previous four frames. If the last two keypoints are
    neighbours, the second-to-last is dropped. (ARM's index arithmetic wraps around to the demo's
    end for the first two frames; here frames before the first count as absent.)"""
    n, keypoints, since_stop = len(demo), [], 0
    for i, obs in enumerate(demo):
        steady = all(demo[j].gripper_open == obs.gripper_open for j in range(max(0, i - 2), min(n, i + 2)))
        at_rest = np.allclose(obs.joint_velocities, 0, atol=stopping_delta)
        stopped = since_stop <= 0 and at_rest and i < n - 2 and steady
        since_stop = 4 if stopped else since_stop - 1
        if i > 0 and (obs.gripper_open != demo[i - 1].gripper_open or i == n - 1 or stopped):
            keypoints.append(i)
    if len(keypoints) > 1 and keypoints[-1] - 1 == keypoints[-2]:
        keypoints.pop(-2)
    return keypoints


def keypoints_from_speed(demo, rest_fraction: float = 0.5, rest_window: int = 4, settle: float = 5e-4) -> list[int]:
    """Keypoints of a demo: frames where a gripper state change has completed or the arm
    comes to rest, plus the last frame.

    Gripper change: the first frame after `gripper_open` flips at which the fingers have
    stopped moving (finger positions change by less than `settle`), i.e. the grasp or release
    is done. On RLBench the arm is still while the gripper acts, so this is the pose of the
    flip itself; Meta-World's experts close the gripper while still moving, and the pose where
    the fingers settle is the one a move-then-grip action must reach.
    At rest: read from the end effector's speed (central difference of gripper positions): a
    frame whose speed is the minimum within +-`rest_window` frames and below `rest_fraction`
    of the demo's peak speed, gripper steady. RLBench's planner stops at every waypoint (speed
    ~0 there); Meta-World's mocap-driven joints never rest, hence speed rather than ARM's
    joint-velocity threshold (`keypoints_from_joint_velocities`, used on RLBench)."""
    n = len(demo)
    pos = np.array([o.gripper_pose[:3] for o in demo], dtype=np.float64)
    fingers = np.array([o.gripper_joint_positions[:2] for o in demo], dtype=np.float64)
    frames = np.arange(n)
    speed = np.linalg.norm(pos[np.minimum(frames + 1, n - 1)] - pos[np.maximum(frames - 1, 0)], axis=1)
    peak = speed.max() if n else 0.0
    keypoints, pending_change = [], None
    for i in range(1, n - 1):
        if demo[i].gripper_open != demo[i - 1].gripper_open:
            pending_change = i
        # fingers still for two frames, at least two frames after the flip
        settled = i >= 2 and np.abs(np.diff(fingers[i - 2:i + 1], axis=0)).max() < settle
        steady = demo[i + 1].gripper_open == demo[i].gripper_open == demo[i - 1].gripper_open
        window = speed[max(0, i - rest_window):i + rest_window + 1]
        at_rest = steady and speed[i] <= window.min() and speed[i] < rest_fraction * peak
        if pending_change is not None and i - pending_change >= 2 and settled:
            keypoints.append(i)
            pending_change = None
        elif at_rest and i - (keypoints[-1] if keypoints else 0) > rest_window:
            keypoints.append(i)
    keypoints.append(n - 1)
    return keypoints


def demo_chains(keypoints: list[int], every: int = 10) -> list[list[int]]:
    """Demo augmentation: every `every`-th frame before the last keypoint starts a chain of
    frames [start, next keypoint, following keypoints..., last keypoint]."""
    return [[start] + [k for k in keypoints if k > start] for start in range(0, keypoints[-1], every)]


def add_demos(buffer, agent, demos, args, rng: np.random.Generator) -> int:
    """C2F-ARM's demos into a script's replay buffer (its `add_observation` and `add`): keypoint discovery (the
    backend's rule) + demo augmentation (`demo_chains`); returns the transitions added. Each chain is an episode:
    (frame -> keypoint) transitions whose action is the keypoint's gripper pose and open state (the agent's
    `encode_pose`), reward 1 and done at the last keypoint (demos succeed). With --crop-augmentation each
    transition zooms around shifted centres, U(-0.75 zoom, 0.75 zoom) per axis (ARM launch_utils.py)."""
    added, max_shift = 0, 0.75 * agent.zoom if args.crop_augmentation else 0.0
    for demo in demos:
        for chain in demo_chains(discover_keypoints(demo, args.backend), args.demo_augmentation_every):
            prev = buffer.add_observation(demo[chain[0]], 0, args.episode_length)
            for t, k in enumerate(chain[1:], start=1):
                nxt = buffer.add_observation(demo[k], min(t, args.episode_length), args.episode_length)
                shifts = rng.uniform(-max_shift, max_shift, (agent.depths - 1, 3))
                action = agent.encode_pose(demo[k].gripper_pose, demo[k].gripper_open, shifts)
                last = k == chain[-1]
                buffer.add(prev, action, float(last), last, nxt, shifts)
                prev, added = nxt, added + 1
    return added


def demo_frames(demo, every: int = 10, backend: str = "metaworld") -> list[int]:
    """The frames the demo pipeline reads images from (so a backend may render only these)."""
    keypoints = discover_keypoints(demo, backend)
    return sorted({i for chain in demo_chains(keypoints, every) for i in chain})


def collect_demos(task, args):
    """`args.demos` demos from the backend; the Meta-World stand-in renders only the frames we read."""
    return task.get_demos(args.demos, live_demos=True,
                          frames=lambda demo: demo_frames(demo, args.demo_augmentation_every, args.backend))


def evaluate_success(tasks: list, policy: Callable, episodes: int, episode_length: int,
                     stop=None) -> tuple[float, int] | None:
    """The benchmark's measure: the success rate of `policy(obs, t, task_id)` (an 8-D next-best pose) over
    `episodes` episodes of every task, each up to `episode_length` poses and a success if any step's reward
    is 1; returns it with the episode count (None once `stop` is set: a SIGINT / SIGTERM does not wait for a
    long evaluation)."""
    successes = []
    for task_id, task in enumerate(tasks):
        for _ in range(episodes):
            if stop:
                return None
            _, obs = task.reset()
            success = 0.0
            for t in range(episode_length):
                obs, reward, terminate = task.step(policy(obs, t, task_id))
                success = max(success, reward)
                if terminate:
                    break
            successes.append(success)
    return float(np.mean(successes)), len(successes)


# --------------------------------------------------------------------------- Meta-World stand-in


class MetaWorldTask:
    """A Meta-World task behind RLBench's task API.

    The 8-D next-best pose (xyz, quaternion xyzw, gripper open) is executed by driving
    Meta-World's low-level controller (4-D: xyz delta of the mocap, gripper effort) with a
    proportional law until the hand is at the target (the stand-in for RLBench's motion
    planner), then actuating the gripper. A target outside the hand's reachable box is a
    planning failure: the episode ends unsuccessfully. Meta-World's Sawyer keeps a fixed
    hand orientation, so the quaternion is accepted but not executed. Reward is sparse:
    1 and terminate as soon as `info["success"]` holds during the motion.
    """

    # the front camera: a free camera looking at the table from across it, slightly oblique
    CAMERA = dict(lookat=(0.0, 0.65, 0.1), distance=1.25, azimuth=-70.0, elevation=-40.0)
    MOVE_GAIN = 10.0  # the scripted experts' proportional gain (10, 15, 20, 30 tried: 10 replays the most demos)
    MAX_MOVE_STEPS = 60  # low-level steps per arm motion (each moves the mocap <= 1 cm)
    GRIPPER_STEPS = 20  # low-level steps to open/close the fingers
    CLOSED_EFFORT = 0.6  # the scripted experts' grasp effort (a full 1.0 squeezes objects out of the fingers)
    REACH_TOLERANCE = 0.003  # metres: the motion is done
    POST_SUCCESS_STEPS = 20  # expert steps kept after the first success in a demo
    ARM_JOINTS = tuple(f"right_j{i}" for i in range(7))

    def __init__(self, name: str, image_size: int = 128, seed: int = 0):
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
        from metaworld.policies import ENV_POLICY_MAP

        if name not in BACKEND_TASKS["metaworld"]:
            raise TaskError(f"unknown metaworld task '{name}'")
        self.name, self.image_size, self._mj = name, image_size, mujoco
        # goal-observable: the scripted expert can read the goal. Meta-World's constructor freezes the
        # scene it samples first; unfrozen below, every reset draws new object and goal positions from
        # the env's generator (seeded by `seed`), as RLBench randomises its scenes.
        self.env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{name}-goal-observable"](seed=seed)
        self.env.max_path_length = 10**9  # episodes are bounded by the agent's 10 actions instead
        self.env._freeze_rand_vec = False  # a new scene at every reset, as RLBench
        self.env.seeded_rand_vec = True  # drawn from the env's own seeded generator
        self.expert = ENV_POLICY_MAP[name]()
        m = self.env.model
        self._arm_dofs = np.array([m.jnt_dofadr[m.joint(j).id] for j in self.ARM_JOINTS])
        self._finger_qpos = np.array([m.jnt_qposadr[m.joint(j).id] for j in ("r_close", "l_close")])
        self.workspace = (np.array(self.env.mocap_low), np.array(self.env.mocap_high))
        self.renderer = mujoco.Renderer(m, image_size, image_size)
        # cheap rendering: no shadows, reflections or skybox (about 5x faster on the CPU)
        flags = mujoco.mjtRndFlag
        for flag in (flags.mjRND_SHADOW, flags.mjRND_REFLECTION, flags.mjRND_SKYBOX):
            self.renderer.scene.flags[flag] = 0
        self.camera = mujoco.MjvCamera()
        self.camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        self.camera.lookat[:] = self.CAMERA["lookat"]
        self.camera.distance, self.camera.azimuth, self.camera.elevation = (
            self.CAMERA["distance"], self.CAMERA["azimuth"], self.CAMERA["elevation"])
        self.grip_effort = -1.0
        self._raw_obs = None
        self.last_failure: str | None = None

    # -- RLBench-style API
    def reset(self):
        self._raw_obs, _ = self.env.reset()
        self.grip_effort = -1.0
        self.last_failure = None
        return [self.name], self.get_observation()

    def reset_to_demo(self, demo: "list[Observation]"):
        """Reset to the scene a demo started from (its sampled object/goal positions)."""
        env = self.env
        env._last_rand_vec, env._freeze_rand_vec = np.array(demo[0].misc["rand_vec"]), True
        try:
            return self.reset()
        finally:
            env._freeze_rand_vec = False

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        target, gripper_open = action[:3], action[7] > 0.5
        lo, hi = self.workspace
        if np.any(target < lo - 0.02) or np.any(target > hi + 0.02):
            self.last_failure = f"target {np.round(target, 3).tolist()} is outside the reachable workspace"
            return self.get_observation(), 0.0, True
        success = self._move_to(target, self.MAX_MOVE_STEPS)
        new_effort = -1.0 if gripper_open else self.CLOSED_EFFORT
        if not success and new_effort != self.grip_effort:
            self.grip_effort = new_effort
            success = self._move_to(target, self.GRIPPER_STEPS, until_reached=False)
        obs = self.get_observation()
        return obs, float(success), bool(success)

    def _move_to(self, target, steps: int, until_reached: bool = True) -> bool:
        for _ in range(steps):
            hand = self.env.get_endeff_pos()
            if until_reached and np.linalg.norm(target - hand) < self.REACH_TOLERANCE:
                break
            delta = np.clip(self.MOVE_GAIN * (target - hand), -1.0, 1.0)
            self._raw_obs, _, _, _, info = self.env.step(np.append(delta, self.grip_effort).astype(np.float32))
            if info["success"]:
                return True
        return False

    def get_demos(self, amount: int, live_demos: bool = True, frames: Callable | None = None,
                  max_steps: int = 500, max_tries: int | None = None) -> "list[list[Observation]]":
        """Successful demos from Meta-World's scripted expert. Every low-level step is one
        frame; images are rendered (afterwards, from saved simulator states) only for the frames
        `frames(demo)` selects, because rendering dominates the cost (default: all frames)."""
        demos, tries = [], 0
        while len(demos) < amount:
            tries += 1
            if tries > (max_tries or 3 * amount + 3):
                raise RuntimeError(f"the {self.name} expert failed too often ({len(demos)}/{amount} demos)")
            _, obs = self.reset()
            rand_vec = np.array(self.env._last_rand_vec)
            demo, states, success_steps = [obs], [self._sim_state()], 0
            for _ in range(max_steps):
                with warnings.catch_warnings():  # the experts' gains trip a harmless "too high" warning
                    warnings.simplefilter("ignore", UserWarning)
                    a = np.asarray(self.expert.get_action(self._raw_obs), dtype=np.float32)
                self.grip_effort = self.CLOSED_EFFORT if a[3] > 0 else -1.0
                self._raw_obs, _, _, _, info = self.env.step(np.append(a[:3], self.grip_effort).astype(np.float32))
                if success_steps and not info["success"]:
                    break  # keep only frames where the task is (still) solved
                demo.append(self.get_observation(render=False))
                states.append(self._sim_state())
                success_steps += int(bool(info["success"]))
                # Meta-World declares success at a threshold crossing; the expert goes on for a
                # few steps so that the demo's last keypoint lies inside the success region.
                if success_steps > self.POST_SUCCESS_STEPS:
                    break
            if not success_steps:
                continue
            demo[0].misc["rand_vec"] = rand_vec
            wanted = range(len(demo)) if frames is None else frames(demo)
            for i in sorted(set(wanted)):
                self._set_sim_state(states[i])
                demo[i].front_rgb, demo[i].front_point_cloud = self.render()
            self._set_sim_state(states[-1])
            demos.append(demo)
        return demos

    # -- observations
    def get_observation(self, render: bool = True) -> Observation:
        env, d = self.env, self.env.data
        hand_quat_wxyz = d.body("hand").xquat
        rgb, pcd = self.render() if render else (None, None)
        return Observation(
            front_rgb=rgb,
            front_point_cloud=pcd,
            gripper_pose=np.concatenate([env.get_endeff_pos(), hand_quat_wxyz[[1, 2, 3, 0]]]).astype(np.float32),
            gripper_open=float(self.grip_effort < 0),
            gripper_joint_positions=d.qpos[self._finger_qpos].astype(np.float32),
            joint_velocities=d.qvel[self._arm_dofs].astype(np.float32),
            misc={},
        )

    def render(self):
        """Front RGB and a world-frame point cloud from rendered depth (one scene update)."""
        self.renderer.update_scene(self.env.data, camera=self.camera)
        rgb = self.renderer.render().copy()
        self.renderer.enable_depth_rendering()
        depth = self.renderer.render().copy()
        self.renderer.disable_depth_rendering()
        intrinsics, extrinsics = self.camera_matrices()
        return rgb, pointcloud_from_depth(depth, intrinsics, extrinsics)

    def camera_matrices(self):
        """OpenCV-convention intrinsics (3x3) and camera-to-world extrinsics (4x4), as RLBench's misc."""
        # mono rendering uses the average of the scene's two (stereo-eye) cameras
        gl = self._mj.mjv_averageCamera(self.renderer.scene.camera[0], self.renderer.scene.camera[1])
        forward, up = np.array(gl.forward, dtype=np.float64), np.array(gl.up, dtype=np.float64)
        extrinsics = np.eye(4)
        extrinsics[:3, :3] = np.stack([np.cross(forward, up), -up, forward], axis=1)  # x right, y down, z forward
        extrinsics[:3, 3] = gl.pos
        size = self.image_size
        f = 0.5 * size / np.tan(np.deg2rad(self.env.model.vis.global_.fovy) / 2)
        intrinsics = np.array([[f, 0, (size - 1) / 2], [0, f, (size - 1) / 2], [0, 0, 1.0]])
        return intrinsics, extrinsics

    def _sim_state(self):
        d = self.env.data
        return d.qpos.copy(), d.qvel.copy(), d.mocap_pos.copy(), d.mocap_quat.copy()

    # -- resuming a run (a checkpoint holds the state of every task)
    def get_state(self) -> dict:
        """Everything that continues this task exactly, mid-episode included, as tensors and plain
        values (a weights_only checkpoint): the scene's sampled positions, MuJoCo's full integration
        state, the env's random generator and the wrapper's gripper command."""
        import torch

        env, mj = self.env, self._mj
        spec = mj.mjtState.mjSTATE_INTEGRATION
        sim = np.empty(mj.mj_stateSize(env.model, spec))
        mj.mj_getState(env.model, env.data, sim, spec)
        return {"rand_vec": torch.as_tensor(np.array(env._last_rand_vec, np.float64)),
                "freeze_rand_vec": bool(env._freeze_rand_vec), "np_random": env.np_random.bit_generator.state,
                "sim": torch.from_numpy(sim), "prev_obs": torch.as_tensor(np.array(env._prev_obs, np.float64)),
                "path_length": int(env.curr_path_length), "grip_effort": float(self.grip_effort),
                "raw_obs": None if self._raw_obs is None else torch.as_tensor(np.array(self._raw_obs, np.float64))}

    def set_state(self, state: dict) -> Observation:
        """Restore `get_state` and return the observation there (rendered again: rendering is
        deterministic). The reset to the saved scene rebuilds what Meta-World computes at a reset
        (targets, initial positions); MuJoCo's state then overwrites the simulator."""
        env, mj = self.env, self._mj
        env._last_rand_vec, env._freeze_rand_vec = state["rand_vec"].numpy().copy(), True
        self.reset()
        env._freeze_rand_vec = state["freeze_rand_vec"]
        mj.mj_setState(env.model, env.data, state["sim"].numpy(), mj.mjtState.mjSTATE_INTEGRATION)
        mj.mj_forward(env.model, env.data)  # positions, contacts, sensors: what observations and rendering read
        # mj_forward re-solves the contacts and leaves its own solver warm start, which differs from the
        # saved one in the last bits; with objects in contact the next steps would drift: restore it
        mj.mj_setState(env.model, env.data, state["sim"].numpy(), mj.mjtState.mjSTATE_INTEGRATION)
        env.np_random.bit_generator.state = state["np_random"]
        env._prev_obs, env.curr_path_length = state["prev_obs"].numpy().copy(), state["path_length"]
        self.grip_effort = state["grip_effort"]
        self._raw_obs = None if state["raw_obs"] is None else state["raw_obs"].numpy().copy()
        return self.get_observation()

    def _set_sim_state(self, state):
        d = self.env.data
        d.qpos[:], d.qvel[:], d.mocap_pos[:], d.mocap_quat[:] = state
        self._mj.mj_forward(self.env.model, d)

    def close(self):
        self.renderer.close()
        self.env.close()


# --------------------------------------------------------------------------- RLBench (the paper)


class RLBenchTask:
    """The real RLBench 1.2 task (CoppeliaSim through PyRep), imported only when asked for.

    Same API as MetaWorldTask. A motion-planning failure (InvalidActionError, IKError,
    ConfigurationPathError) ends the episode as a failure instead of crashing the run.
    """

    def __init__(self, name: str, image_size: int = 128, seed: int = 0, headless: bool = True):
        try:
            import rlbench.tasks
            from pyrep.errors import ConfigurationPathError, IKError
            from rlbench.action_modes.action_mode import MoveArmThenGripper
            from rlbench.action_modes.arm_action_modes import EndEffectorPoseViaPlanning
            from rlbench.action_modes.gripper_action_modes import Discrete
            from rlbench.backend.exceptions import InvalidActionError
            from rlbench.environment import Environment
            from rlbench.observation_config import CameraConfig, ObservationConfig
        except ImportError as e:
            raise TaskError(f"--backend rlbench needs RLBench 1.2, PyRep and CoppeliaSim, which are not importable "
                            f"here ({e}); install them (see requirements.txt) or use --backend metaworld") from None
        if name not in RLBENCH_TASKS:
            raise TaskError(f"unknown rlbench task '{name}'")
        self.name = name
        self.planning_errors = (InvalidActionError, IKError, ConfigurationPathError)
        obs_config = ObservationConfig()
        obs_config.set_all(False)
        obs_config.front_camera = CameraConfig(rgb=True, depth=False, point_cloud=True, mask=False,
                                               image_size=(image_size, image_size))
        for low_dim in ("gripper_pose", "gripper_open", "gripper_joint_positions", "joint_velocities"):
            setattr(obs_config, low_dim, True)
        self.env = Environment(action_mode=MoveArmThenGripper(EndEffectorPoseViaPlanning(), Discrete()),
                               obs_config=obs_config, headless=headless)
        self.env.launch()
        task_class = getattr(rlbench.tasks, "".join(w.capitalize() for w in name.split("_")))
        self.task = self.env.get_task(task_class)
        self.task.set_variation(0)  # paper: variation 0
        self._last_obs = None
        self.last_failure: str | None = None

    def reset(self):
        descriptions, self._last_obs = self.task.reset()
        self.last_failure = None
        return descriptions, self._last_obs

    def reset_to_demo(self, demo):
        descriptions, self._last_obs = self.task.reset_to_demo(demo)
        return descriptions, self._last_obs

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).copy()
        action[3:7] /= np.linalg.norm(action[3:7])  # RLBench wants a unit quaternion (xyzw)
        action[7] = float(action[7] > 0.5)
        try:
            obs, reward, terminate = self.task.step(action)
        except self.planning_errors as e:
            self.last_failure = f"{type(e).__name__}: {e}"
            return self._last_obs, 0.0, True
        self._last_obs = obs
        return obs, float(reward), bool(terminate)

    def get_demos(self, amount: int, live_demos: bool = True, frames=None):
        """`frames` is accepted for API parity with MetaWorldTask (RLBench renders every frame)."""
        return [list(demo) for demo in self.task.get_demos(amount, live_demos=live_demos)]

    def get_state(self) -> None:
        """CoppeliaSim's scene cannot be saved mid-episode: a resumed run starts a new episode here
        (its random scene sampling draws from numpy's global generator, which the checkpoint holds)."""
        return None

    def set_state(self, state) -> None:
        return None  # no observation to continue from: the caller resets

    def close(self):
        self.env.shutdown()


# ---- running a C2F-ARM script: plumbing shared by the three scripts, not the algorithm
# What `c2farm_{mt,reptile,pearl}_rlbench.py` and finetune.py do alike around the method: argument checks,
# seeding, TensorBoard, checkpoints, the replay file, --resume and the pretraining `main`. Functions that
# need a script's classes take them (or read their attributes): a learner has `model`, `target`,
# `optimizer`, `rng` and `buffers`; a replay buffer has the arrays named in OBS_ARRAYS and TRANSITION_ARRAYS.

CHECKPOINT_FORMAT = "finetune-vs-meta-rl"  # = finetune.CHECKPOINT_FORMAT
REPLAY = "replay.npz"  # the replay buffers, beside checkpoint.pt
OBS_ARRAYS = ("rgb", "pcd", "lowdim", "attention", "shift")  # ReplayBuffer's arrays per observation
TRANSITION_ARRAYS = ("obs_index", "action", "reward", "done", "priority")  # and per transition
# Args a --resume may change (envs.run_dir.load_resume): where and how often it saves, and the machine's
# settings; any other flag must be the run's own (a resumed run is the same run).
RESUME_FREE = frozenset({"resume", "output_dir", "checkpoint_interval", "replay_save_interval", "cuda",
                         "torch_threads", "precision", "track", "wandb_project_name", "wandb_entity"})


@dataclass
class RunArgs:
    """The flags of a C2F-ARM run that are not the method's: where it writes, --resume, logging, evaluation and
    checkpoint cadence, the machine. Each script's Args extends it (its --help lists them all)."""

    cuda: bool = False
    """use the GPU if there is one"""
    track: bool = False
    """log to Weights & Biases (wandb is imported only then)"""
    wandb_project_name: str = "finetune-vs-meta-rl"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    output_dir: str | None = None
    """where checkpoint.pt, replay.npz and TensorBoard logs go (default runs/{run_name})"""
    resume: bool = False
    """continue the run in --output-dir (required) from its checkpoint.pt and replay.npz, with the run's own flags
    (README, "Stopping and resuming a run": what may change, and a resume without replay.npz)"""
    eval_episodes: int = 5
    """greedy episodes per task at each evaluation (ours: neither the paper nor ARM's launch config fixes it)"""
    eval_interval: int = 0
    """env steps between evaluations during pretraining (0: only at the end)"""
    checkpoint_interval: int = 5_000
    """env steps between checkpoints (and one at the end)"""
    replay_save_interval: int = 10_000
    """env steps between saves of the replay buffers (demos and agent transitions) to replay.npz, each with a
    checkpoint; also written at a SIGINT / SIGTERM, removed when the run ends (it only serves --resume).
    About 10 GB at the paper's settings; 0 = only at a stop"""
    torch_threads: int = 1
    """CPU threads for torch (1 is fastest for these small 3D convs on a busy 2-core machine; 0: torch's default)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """the update's Q-attention passes in bf16 autocast (auto: where the hardware has native bf16; see benchmarks/)"""


def check_c2farm_args(args, at_least_one=(), non_negative=(), unit_interval=()) -> None:
    """The settings of every C2F-ARM script that cannot run raise TaskError, which the scripts report as
    one line; a method adds its own flags by name (`at_least_one`, `non_negative`, `unit_interval`)."""
    for name in ("total_timesteps", "batch_size", "image_size", "episode_length", "voxel_size", "depths",
                 "replay_size", "updates_per_step", "eval_episodes", "checkpoint_interval", "unet_width",
                 "demo_augmentation_every", *at_least_one):
        if getattr(args, name) < 1:
            raise TaskError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    for name in ("demos", "learning_starts", "eval_interval", "replay_save_interval", "torch_threads", "weight_decay",
                 "priority_exponent", "importance_exponent", "lambda_trans_qreg", "lambda_rot_qreg", *non_negative):
        if not getattr(args, name) >= 0:
            raise TaskError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(args, name)})")
    for name in ("gamma", "epsilon", *unit_interval):
        if not 0 <= getattr(args, name) <= 1:
            raise TaskError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")
    for name in ("learning_rate", "grad_clip_value"):
        if not getattr(args, name) > 0:
            raise TaskError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if not 0 < args.tau <= 1:
        raise TaskError(f"--tau must be in (0, 1] (got {args.tau})")
    if not 0 < args.rotation_resolution <= 180:
        raise TaskError(f"--rotation-resolution must be in (0, 180] degrees (got {args.rotation_resolution})")
    if args.unet_width % 4:
        raise TaskError(f"--unet-width must be a multiple of 4 (got {args.unet_width})")
    if args.exploration not in ("greedy", "gaussian", "epsilon"):
        raise TaskError(f"--exploration must be greedy, gaussian or epsilon (got {args.exploration})")


def setup(args, task_names: list[str], check_args: Callable, make_agent: Callable, latent: int = 0):
    """Checks (`check_args(args)`), seeds, device, tasks and agent (`make_agent(args, latent)`, drawn after
    seeding): the part every script shares (the replay: `make_buffers`)."""
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    tasks = [make_task(args.backend, name, args.image_size, args.seed + i) for i, name in enumerate(task_names)]
    return device, tasks, make_agent(args, latent).to(device)


def make_buffers(args, task_names: list[str], tasks: list, agent, buffer_class: Callable, stop=None,
                 replay: str | None = None, resume_step: int | None = None) -> tuple[list, bool]:
    """Every task's prioritized replay (`buffer_class`), filled with `--demos` expert demos (`add_demos`), or
    (--resume) loaded from the run's `replay` file. Also returns whether that file is of the checkpoint's env
    step `resume_step` (else the episode in progress cannot continue: its observations are not in it)."""
    buffers = [buffer_class(max(1, args.replay_size // len(tasks)), args.image_size, args.depths + 4,
                            args.priority_exponent) for _ in tasks]
    if replay is not None:
        remove_temporaries(replay)  # a killed save's partial file (the caller holds the folder's lock)
    if replay is not None and os.path.exists(replay):
        step = load_replay(replay, buffers)
        print(f"replay buffers of env step {step} from {replay}", flush=True)
        if step != resume_step:  # killed between the replay's save and the checkpoint's
            print(f"warning: {replay} is of env step {step}, the checkpoint of env step {resume_step}: "
                  "resuming with it; the episode in progress restarts", file=sys.stderr, flush=True)
        return buffers, step == resume_step
    if replay is not None:
        print(f"warning: {replay} is missing: collecting the demos again; the agent's own transitions "
              "before the checkpoint are lost and the episode in progress restarts", file=sys.stderr, flush=True)
    demo_rng = np.random.default_rng(args.seed)
    for name, task, buffer in zip(task_names, tasks, buffers):
        if stop:  # demos take minutes on RLBench: a stop does not wait for all of them
            print(f"stopped by {signal.Signals(stop.signum).name} while collecting demos; nothing new was saved: "
                  "run the same command again", file=sys.stderr, flush=True)
            raise SystemExit(128 + stop.signum)
        if args.demos > 0:
            t0 = time.time()
            n = add_demos(buffer, agent, collect_demos(task, args), args, demo_rng)
            print(f"{name}: {args.demos} demos -> {n} transitions ({time.time() - t0:.1f}s)", flush=True)
    return buffers, False


def make_writer(args, run_dir: str, purge_step: int | None = None):
    """TensorBoard in run_dir; a resumed run (`purge_step`: the step after its checkpoint's) continues
    the same log, TensorBoard dropping what the killed run logged after its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=os.path.basename(run_dir), save_code=True)
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    if purge_step is None:
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return writer


def log_progress(writer, logs: dict, global_step: int, sps: float) -> None:
    """The update's latest losses and the speed (env steps/s, updates and evaluations included)."""
    for k, v in logs.items():
        writer.add_scalar(k, float(v), global_step)  # tensors until here: read only when logged (no host sync)
    writer.add_scalar("charts/SPS", sps, global_step)
    print(f"global_step={global_step} SPS={sps:.2f}", flush=True)


def log_episode(writer, global_step: int, task_name: str, successes: list[float]) -> None:
    """An episode's success (its return: 1 or 0) and the success rate of the last 20 episodes."""
    rate = float(np.mean(successes[-20:]))
    writer.add_scalar("charts/episodic_return", successes[-1], global_step)
    writer.add_scalar(f"charts/success/{task_name}", successes[-1], global_step)
    writer.add_scalar("charts/success_rate", rate, global_step)
    print(f"global_step={global_step} task={task_name} episodic_return={successes[-1]:.0f} "
          f"success_rate(last 20)={rate:.2f}", flush=True)


def learner_state(learner) -> dict:
    """What a checkpoint holds of a learner: its `model` (PEARL: the agent and its context encoder), `target`
    network, `optimizer` and sampling generator `rng`."""
    return {"model": learner.model.state_dict(), "target_model": learner.target.state_dict(),
            "optimizer": learner.optimizer.state_dict(), "sampling_rng": learner.rng.bit_generator.state}


def save_checkpoint(path: str, script: str, method: str, args, learner, train_tasks: list[str], global_step: int,
                    loop: dict | None = None) -> None:
    """Tensors and plain values only (loads with weights_only=True); written atomically. `script`: the
    writing script's module name; `method`: mt, reptile, pearl, or finetune.py's finetune / scratch.
    --resume continues from the learner's state, the random states and `loop` (train's state: "resume")."""
    ckpt = {"format": CHECKPOINT_FORMAT, "format_version": 1, "module": script,
            "benchmark": "rlbench", "method": method, "train_tasks": list(train_tasks),
            "args": dataclasses.asdict(args), "global_step": int(global_step), **learner_state(learner),
            "rng": rng_state(), "resume": loop}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save(ckpt, path)


def save_run(output_dir: str, script: str, method: str, args, learner, train_tasks: list[str], global_step: int,
             loop: dict, with_replay: bool) -> None:
    """`train`'s save: the replay buffers first (`with_replay`), then the checkpoint. A finished run's
    replay file goes: it only serves --resume and is the run's largest file."""
    replay = os.path.join(output_dir, REPLAY)
    if with_replay:
        save_replay(replay, learner.buffers, global_step)
    save_checkpoint(os.path.join(output_dir, CHECKPOINT), script, method, args, learner, train_tasks, global_step, loop)
    if loop["finished"] and os.path.exists(replay):
        os.remove(replay)


def save_replay(path: str, buffers: list, global_step: int) -> None:
    """The filled part of every task's replay arrays (demos, agent transitions, priorities) and its counters
    in one .npz written atomically (envs.run_dir.save_arrays), deflated at level 1."""
    arrays = {"global_step": np.int64(global_step)}
    for i, b in enumerate(buffers):
        arrays[f"{i}/counters"] = np.array([b.size, b.pos, b.obs_size, b.obs_pos], np.int64)
        for name in OBS_ARRAYS:
            arrays[f"{i}/{name}"] = getattr(b, name)[:b.obs_size]
        for name in TRANSITION_ARRAYS:
            arrays[f"{i}/{name}"] = getattr(b, name)[:b.size]
    save_arrays(path, arrays, compresslevel=1)


def load_replay(path: str, buffers: list) -> int:
    """Fill new buffers from `save_replay`'s file; returns its env step. One-line TaskError if it does not fit."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if f"{len(buffers)}/counters" in f.files:
                raise ValueError("it holds more task buffers than this run has")
            for i, b in enumerate(buffers):
                b.size, b.pos, b.obs_size, b.obs_pos = (int(x) for x in f[f"{i}/counters"])
                for name in OBS_ARRAYS:
                    getattr(b, name)[:b.obs_size] = f[f"{i}/{name}"]
                for name in TRANSITION_ARRAYS:
                    getattr(b, name)[:b.size] = f[f"{i}/{name}"]
            return int(f["global_step"])
    except Exception as e:  # truncated, another run's shapes, not an npz
        reason = " ".join(str(e).split())[:120]
        raise TaskError(f"--resume: {path} does not fit this run ({type(e).__name__}: {reason}); remove it to "
                        "resume without it (the demos are collected again, the agent's transitions are lost)") from None


def restore(learner, ckpt: dict, path: str) -> dict:
    """--resume: the learner (networks, optimizer, sampling generator) and the global random states from
    a checkpoint, before any demo or file is made; returns train's loop state. One-line TaskError if it
    does not fit this run."""
    try:
        learner.model.load_state_dict(ckpt["model"])
        learner.target.load_state_dict(ckpt["target_model"])
        learner.optimizer.load_state_dict(ckpt["optimizer"])
        learner.rng.bit_generator.state = ckpt["sampling_rng"]
        set_rng_state(ckpt["rng"])
        return dict(ckpt["resume"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        reason = " ".join(line.strip() for line in str(e).splitlines())[:240]
        raise TaskError(f"--resume: {path} does not fit this run: {reason}") from None


def resume_loop(loop: dict, tasks: list):
    """train's variables at the checkpoint; every task's simulator state restored. The episode in
    progress goes on where its task can continue it (RLBench cannot: a new episode starts)."""
    observations = [task.set_state(state) for task, state in zip(tasks, loop["tasks"])]
    obs = None if loop["done"] else observations[loop["task_id"]]
    return (loop["global_step"], loop["episode"], list(loop["successes"]), loop["next_eval"], obs is None,
            loop["task_id"], obs, loop["obs_i"], loop["t"], loop["success"])


def run_pretraining(args, script: str, method: str, check_args: Callable, make_agent: Callable, learner_class: Callable,
                    buffer_class: Callable, train: Callable, latent: int = 0) -> None:
    """A script's `main`, pretraining with the script's pieces: every input is checked (`check_args`) before
    a folder, file or demo is made; then the tasks and agent (`setup`), the learner (restored with --resume),
    the replay (`make_buffers`), TensorBoard and `train`, saving checkpoints into the run's folder."""
    task_names = default_tasks(args.backend, args.train_tasks, args.held_out_task)
    check_args(args)
    if args.resume and args.output_dir is None:
        raise TaskError("--resume needs --output-dir: the directory of the run to continue")
    run_dir = args.output_dir or os.path.join("runs", f"{args.exp_name}__{args.seed}__{int(time.time())}")
    check_output_dir(run_dir, args.resume)
    path, replay = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, REPLAY)
    ckpt = load_resume(run_dir, script, dataclasses.asdict(args), RESUME_FREE) if args.resume else None
    if ckpt is not None and ckpt["resume"]["finished"]:
        print(f"the run in {run_dir} is complete ({ckpt['global_step']} env steps): nothing to resume", flush=True)
        return
    device, tasks, agent = setup(args, task_names, check_args, make_agent, latent)
    writer = stop = loop = None
    try:
        learner = learner_class(agent, [], args, device)
        loop = restore(learner, ckpt, path) if ckpt is not None else None
        lock = open_output_dir(run_dir)  # noqa: F841  (held while this process runs)
        stop = StopRequest()
        learner.buffers, exact = make_buffers(args, task_names, tasks, agent, buffer_class, stop,
                                              ckpt and replay, ckpt and ckpt["global_step"])
        if loop is not None and not exact:
            loop["done"] = True  # the episode in progress restarts
        # the events of the checkpoint's own step were logged before it was written: only later ones go
        writer = make_writer(args, run_dir, purge_step=loop and loop["global_step"] + 1)

        def log_eval(step, rate, episodes):
            writer.add_scalar("eval/success_rate", rate, step)
            print(f"[eval] global_step={step} success_rate={rate:.3f} ({episodes} episodes)", flush=True)

        def save(step, loop, with_replay):
            save_run(run_dir, script, method, args, learner, task_names, step, loop, with_replay)

        step = train(args, learner, tasks, task_names, writer, log_eval=log_eval, eval_every=args.eval_interval or None,
                     save=save, stop=stop, loop=loop)
    finally:
        for task in tasks:
            task.close()
        if writer is not None:
            writer.close()
    if stop:
        stop.exit(run_dir, step)
    print(f"saved {path}", flush=True)

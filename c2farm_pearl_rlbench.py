"""PEARL over C2F-ARM on RLBench or its Meta-World stand-in.

    python c2farm_pearl_rlbench.py --backend metaworld
    python c2farm_pearl_rlbench.py --backend rlbench --held-out-task push_button   # the paper

A context encoder (a small conv net on the front RGB, plus the action and reward) maps each
transition of a task to a Gaussian over a latent z (size 16); the transitions' Gaussians
are combined by a product of Gaussians into the task posterior, regularised by KL(q || N(0, I))
with weight 1. z is tiled into the depth-0 Q-attention network (its bottleneck, next to the
proprioception). Each task's context is 3 transitions drawn from the most recent 10 of that
task's buffer (demo transitions count). The Q-loss trains the encoder, as in PEARL.

Adaptation (`adapt`, used by finetune.py): on the new task, infer z from the experience
collected there (demos, if any, and the agent's own episodes), with no gradient step.

The file is self-contained (CleanRL style): the backends, geometry, demo processing, C2F-ARM
agent, replay buffer, learner and loop are the same code as in c2farm_mt_rlbench.py, and the
PEARL part sits just before the checkpoint section.
"""

from __future__ import annotations

import os

# Headless MuJoCo rendering on the CPU (must be set before mujoco is imported).
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("EGL_PLATFORM", "surfaceless")

import copy
import dataclasses
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Args:
    exp_name: str = "c2farm_pearl_rlbench"
    seed: int = 1
    cuda: bool = False
    track: bool = False
    wandb_project_name: str = "finetune-vs-meta-rl"
    wandb_entity: str | None = None
    capture_video: bool = False  # accepted for CLI uniformity; RLBench frames are in the replay instead
    output_dir: str | None = None
    """where checkpoint.pt and TensorBoard logs go (default runs/{run_name})"""

    # tasks
    backend: str = "metaworld"
    """`metaworld` (pip-installable stand-in) or `rlbench` (the paper; needs CoppeliaSim + PyRep + RLBench 1.2)"""
    train_tasks: list[str] = field(default_factory=list)
    """training tasks; empty = the backend's default split minus --held-out-task"""
    held_out_task: str | None = None
    """RLBench: leave this task out (paper: train on the other ten)"""
    image_size: int = 128  # paper: front camera 128x128
    episode_length: int = 10  # paper: 10 next-best-pose actions per episode
    demos: int = 5  # paper: 5 demos per training task

    # C2F-ARM (paper / authors' ARM fork)
    total_timesteps: int = 100_000
    """env steps (next-best-pose actions) over all tasks"""
    batch_size: int = 150  # paper: 15 transitions from each of 10 tasks
    learning_rate: float = 5e-4  # C2F-ARM
    gamma: float = 0.99
    tau: float = 0.0025  # soft target update
    replay_size: int = 100_000  # split evenly over the tasks' buffers
    priority_exponent: float = 0.7  # prioritized replay alpha
    importance_exponent: float = 1.0  # IS weights beta
    voxel_size: int = 16  # 16^3 voxels per depth
    depths: int = 2
    rotation_resolution: float = 5.0  # degrees -> 72 bins per axis
    demo_augmentation_every: int = 10  # every 10th demo frame starts a chain to the next keypoints
    unet_width: int = 16
    """channels of the first 3D U-Net level (doubled per level); small for the CPU"""
    learning_starts: int = 0
    """env steps before updates begin (the demo transitions are there from the start)"""
    updates_per_step: int = 1
    epsilon: float = 0.1
    """exploration: chance that each action head (depth-0 voxel, depth-1 voxel, rotation, gripper) acts at random"""
    grad_clip: float = 10.0

    # logging / evaluation
    eval_episodes: int = 5
    """greedy episodes per task at each evaluation"""
    eval_interval: int = 0
    """env steps between evaluations during pretraining (0: only at the end)"""
    checkpoint_interval: int = 5_000
    torch_threads: int = 1
    """CPU threads for torch (1 is fastest for these small 3D convolutions on a busy 2-core machine; 0 = torch's default)"""

    # PEARL
    latent_size: int = 16  # paper: latent of 16
    context_size: int = 3  # paper: 3 transitions per context ...
    context_window: int = 10  # ... drawn from the task's 10 most recent transitions
    kl_weight: float = 1.0  # paper: KL weight 1


# --------------------------------------------------------------------------- tasks

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

# Scene bounds [x0, y0, z0, x1, y1, z1] in metres and the half-width of the depth-1 zoom.
# RLBench: the C2F-ARM values. Meta-World: a 0.8 m cube over its table workspace (the hand's
# mocap range is x -0.5..0.5, y 0.4..1.0, z 0.05..0.5; objects and goals lie in
# x -0.35..0.35, y 0.4..0.95, z 0..0.35), with the zoom scaled by 0.8 as well: 0.15 * 0.8 = 0.12.
SCENE_BOUNDS = {
    "rlbench": (-0.3, -0.5, 0.6, 0.7, 0.5, 1.6),
    "metaworld": (-0.4, 0.3, -0.1, 0.4, 1.1, 0.7),
}
ZOOM_HALF_WIDTH = {"rlbench": 0.15, "metaworld": 0.12}


class TaskError(ValueError):
    """Unknown task or unavailable backend: reported as one line."""


def default_tasks(backend: str, train_tasks, held_out: str | None) -> list[str]:
    """The training tasks for a run, validated; raises TaskError with one line."""
    known = RLBENCH_TASKS if backend == "rlbench" else METAWORLD_TRAIN_TASKS + METAWORLD_TEST_TASKS
    if backend not in SCENE_BOUNDS:
        raise TaskError(f"unknown backend '{backend}': expected metaworld or rlbench")
    for t in list(train_tasks) + ([held_out] if held_out else []):
        if t not in known:
            raise TaskError(f"unknown {backend} task '{t}': expected one of {', '.join(known)}")
    tasks = list(train_tasks) or list(RLBENCH_TASKS if backend == "rlbench" else METAWORLD_TRAIN_TASKS)
    return [t for t in tasks if t != held_out]


# --------------------------------------------------------------------------- backends


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

        if name not in METAWORLD_TRAIN_TASKS + METAWORLD_TEST_TASKS:
            raise TaskError(f"unknown metaworld task '{name}'")
        self.name, self.image_size, self._mj = name, image_size, mujoco
        # goal-observable: object and goal positions are re-sampled on every reset (like RLBench's
        # randomised scenes) and the scripted expert can read the goal.
        self.env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{name}-goal-observable"](seed=seed)
        self.env.max_path_length = 10**9  # episodes are bounded by our 10 actions instead
        self.expert = ENV_POLICY_MAP[name]()
        m = self.env.model
        self._arm_dofs = np.array([m.jnt_dofadr[m.joint(j).id] for j in self.ARM_JOINTS])
        self._finger_qpos = np.array([m.jnt_qposadr[m.joint(j).id] for j in ("r_close", "l_close")])
        self.workspace = (np.array(self.env.mocap_low), np.array(self.env.mocap_high))
        self.renderer = mujoco.Renderer(m, image_size, image_size)
        # cheap rendering: no shadows, reflections or skybox (about 5x faster on the CPU)
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX):
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

    def _set_sim_state(self, state):
        d = self.env.data
        d.qpos[:], d.qvel[:], d.mocap_pos[:], d.mocap_quat[:] = state
        self._mj.mj_forward(self.env.model, d)

    def close(self):
        self.renderer.close()
        self.env.close()


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
        return [list(demo) for demo in self.task.get_demos(amount, live_demos=live_demos)]

    def close(self):
        self.env.shutdown()


def make_task(backend: str, name: str, image_size: int = 128, seed: int = 0):
    """The task factory: the agent code is the same for both backends."""
    if backend == "rlbench":
        return RLBenchTask(name, image_size, seed)
    if backend == "metaworld":
        return MetaWorldTask(name, image_size, seed)
    raise TaskError(f"unknown backend '{backend}': expected metaworld or rlbench")


# --------------------------------------------------------------------------- geometry


def pointcloud_from_depth(depth: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray) -> np.ndarray:
    """World-frame points (H, W, 3) from planar depth (H, W); OpenCV pinhole camera (x right,
    y down, z forward), pixel (row v, column u), camera-to-world 4x4 extrinsics."""
    h, w = depth.shape
    v, u = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    cam = np.stack([(u - cx) * depth / fx, (v - cy) * depth / fy, depth], axis=-1)
    return (cam @ extrinsics[:3, :3].T + extrinsics[:3, 3]).astype(np.float32)


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


def discretize_rotation(q: np.ndarray, resolution: float = 5.0) -> np.ndarray:
    """Quaternion -> one bin per Euler axis: (angle + 180) / resolution, rounded, modulo 360/resolution."""
    bins = int(round(360 / resolution))
    return np.round((quaternion_to_euler(q) + 180.0) / resolution).astype(np.int64) % bins


def undiscretize_rotation(bins: np.ndarray, resolution: float = 5.0) -> np.ndarray:
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


# --------------------------------------------------------------------------- demos


def discover_keypoints(demo, rest_fraction: float = 0.5, rest_window: int = 4, settle: float = 5e-4) -> list[int]:
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
    joint-velocity threshold."""
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
    chains = []
    for start in range(0, keypoints[-1], every):
        chains.append([start] + [k for k in keypoints if k > start])
    return chains


def demo_frames(demo, every: int = 10) -> list[int]:
    """The frames the demo pipeline reads images from (so a backend may render only these)."""
    keypoints = discover_keypoints(demo)
    return sorted({i for chain in demo_chains(keypoints, every) for i in chain})


# --------------------------------------------------------------------------- agent


def lowdim_state(obs, t: int, episode_length: int) -> np.ndarray:
    """Proprioception: gripper open, gripper pose (7), finger positions (2), time in [-1, 1]."""
    time_left = (1.0 - t / episode_length) * 2.0 - 1.0
    return np.concatenate([[float(obs.gripper_open)], obs.gripper_pose, obs.gripper_joint_positions[:2],
                           [time_left]]).astype(np.float32)


LOWDIM_SIZE = 11


class UNet3D(nn.Module):
    """Q-attention for one depth: a small 3D U-Net over the voxel grid (three levels with skip
    connections). The proprioception (and PEARL's latent) is tiled into the bottleneck. Outputs
    one Q-value per voxel and, at the last depth, Q-values for rotation bins and the gripper."""

    def __init__(self, in_channels: int = 10, width: int = 16, lowdim: int = LOWDIM_SIZE, latent: int = 0,
                 rot_grip_outputs: int = 0):
        super().__init__()
        w = width
        act = nn.LeakyReLU(0.02)
        self.inc = nn.Sequential(nn.Conv3d(in_channels, w, 3, padding=1), act, nn.Conv3d(w, w, 3, padding=1), act)
        self.down1 = nn.Sequential(nn.Conv3d(w, 2 * w, 3, stride=2, padding=1), act)  # 16 -> 8
        self.down2 = nn.Sequential(nn.Conv3d(2 * w, 4 * w, 3, stride=2, padding=1), act)  # 8 -> 4
        self.lowdim = nn.Sequential(nn.Linear(lowdim, w), act)
        self.bottleneck = nn.Sequential(nn.Conv3d(4 * w + w + latent, 4 * w, 3, padding=1), act)
        self.up2 = nn.Sequential(nn.Conv3d(4 * w + 2 * w, 2 * w, 3, padding=1), act)
        self.up1 = nn.Sequential(nn.Conv3d(2 * w + w, w, 3, padding=1), act)
        self.q_trans = nn.Conv3d(w, 1, 1)
        self.rot_grip = (nn.Sequential(nn.Linear(4 * w + 2 * w + w, 256), act, nn.Linear(256, rot_grip_outputs))
                         if rot_grip_outputs else None)

    def forward(self, grid, lowdim, latent=None):
        x0 = self.inc(grid)
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        tiles = [self.lowdim(lowdim)] + ([latent] if latent is not None else [])
        tiled = torch.cat(tiles, 1)[:, :, None, None, None].expand(-1, -1, *x2.shape[2:])
        x2 = self.bottleneck(torch.cat([x2, tiled], 1))
        u1 = self.up2(torch.cat([F.interpolate(x2, size=x1.shape[2:], mode="trilinear", align_corners=False), x1], 1))
        u0 = self.up1(torch.cat([F.interpolate(u1, size=x0.shape[2:], mode="trilinear", align_corners=False), x0], 1))
        q = self.q_trans(u0).flatten(1)  # (B, V^3)
        rot_grip = None
        if self.rot_grip is not None:
            pooled = torch.cat([x2.amax((2, 3, 4)), u1.amax((2, 3, 4)), u0.amax((2, 3, 4))], 1)
            rot_grip = self.rot_grip(pooled)
        return q, rot_grip


class C2FARM(nn.Module):
    """Coarse-to-fine Q-attention: depth 0 picks a voxel in the scene bounds, depth d+1 picks a
    voxel in a cube of +-zoom around the centre of depth d's choice; the last depth also picks
    the rotation (one of 72 bins per Euler axis) and the gripper state.

    A discrete action is (voxel index per depth (flattened), rot x, rot y, rot z, gripper)."""

    def __init__(self, scene_bounds, zoom_half_width: float, voxels: int = 16, depths: int = 2, width: int = 16,
                 rotation_resolution: float = 5.0, latent: int = 0):
        super().__init__()
        self.voxels, self.depths, self.zoom, self.resolution = voxels, depths, zoom_half_width, rotation_resolution
        self.rot_bins = int(round(360 / rotation_resolution))
        self.register_buffer("scene_bounds", torch.tensor(scene_bounds, dtype=torch.float32))
        self.qnets = nn.ModuleList(
            UNet3D(10, width, LOWDIM_SIZE, latent if d == 0 else 0,  # PEARL's z goes into depth 0
                   3 * self.rot_bins + 2 if d == depths - 1 else 0)
            for d in range(depths))

    def index_to_center(self, flat_index: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        v = self.voxels
        ijk = torch.stack([flat_index // (v * v), (flat_index // v) % v, flat_index % v], -1).float()
        return bounds[:, :3] + (ijk + 0.5) * (bounds[:, 3:] - bounds[:, :3]) / v

    def forward(self, points, colors, lowdim, voxel_choice=None, latent=None, target: "C2FARM | None" = None):
        """Q-values for every head. `voxel_choice` (B, depths) fixes the voxel whose centre each
        deeper depth zooms around (the stored action); otherwise the greedy choice is used.
        With `target`, the target network is evaluated on the same voxel grids (double Q).
        Returns (per-depth voxel Q list (B, V^3), rot/grip Q (B, 3*bins+2), chosen voxels
        (B, depths), and the same two Q outputs of `target` or None)."""
        b = points.shape[0]
        bounds = self.scene_bounds.expand(b, 6)
        q_voxels, chosen, t_voxels = [], [], []
        rot_grip = t_rot_grip = None
        for d, net in enumerate(self.qnets):
            grid = voxelize(points, colors, bounds, self.voxels)
            z = latent if d == 0 else None
            q, rg = net(grid, lowdim, z)
            q_voxels.append(q)
            if target is not None:
                tq, trg = target.qnets[d](grid, lowdim, z)
                t_voxels.append(tq)
                t_rot_grip = trg if trg is not None else t_rot_grip
            choice = voxel_choice[:, d] if voxel_choice is not None else q.argmax(1)
            chosen.append(choice)
            rot_grip = rg if rg is not None else rot_grip
            center = self.index_to_center(choice, bounds)
            bounds = torch.cat([center - self.zoom, center + self.zoom], 1)
        return q_voxels, rot_grip, torch.stack(chosen, 1), (t_voxels, t_rot_grip) if target is not None else None

    def action_sizes(self) -> list[int]:
        """Number of choices of each head of a discrete action."""
        return [self.voxels**3] * self.depths + [self.rot_bins] * 3 + [2]

    def split_rot_grip(self, rot_grip):
        n = self.rot_bins
        return [rot_grip[:, i * n:(i + 1) * n] for i in range(3)] + [rot_grip[:, 3 * n:]]

    def greedy(self, points, colors, lowdim, latent=None) -> torch.Tensor:
        """Greedy discrete action (B, depths + 4)."""
        _, rot_grip, chosen, _ = self(points, colors, lowdim, latent=latent)
        return torch.cat([chosen, self.greedy_rot_grip(rot_grip)], 1)

    def greedy_rot_grip(self, rot_grip) -> torch.Tensor:
        return torch.stack([h.argmax(1) for h in self.split_rot_grip(rot_grip)], 1)

    # -- discrete <-> continuous (numpy, one action)
    def encode_pose(self, pose: np.ndarray, gripper_open: float) -> np.ndarray:
        """8-D next-best pose (or gripper pose + open state) -> discrete action."""
        bounds = self.scene_bounds.cpu().numpy().astype(np.float64)
        indices = []
        for _ in range(self.depths):
            ijk = point_to_voxel(pose[:3], bounds, self.voxels)
            indices.append(ijk[0] * self.voxels**2 + ijk[1] * self.voxels + ijk[2])
            bounds = zoom_bounds(voxel_to_point(ijk, bounds, self.voxels), self.zoom)
        rot = discretize_rotation(pose[3:7], self.resolution)
        return np.array(indices + list(rot) + [int(gripper_open > 0.5)], dtype=np.int64)

    def decode_action(self, action: np.ndarray) -> np.ndarray:
        """Discrete action -> 8-D next-best pose: last depth's voxel centre, quaternion xyzw, gripper."""
        bounds = self.scene_bounds.cpu().numpy().astype(np.float64)
        v = self.voxels
        for d in range(self.depths):
            i = int(action[d])
            center = voxel_to_point(np.array([i // (v * v), (i // v) % v, i % v]), bounds, v)
            bounds = zoom_bounds(center, self.zoom)
        quat = undiscretize_rotation(action[self.depths:self.depths + 3], self.resolution)
        return np.concatenate([center, quat, [float(action[-1])]])


def make_agent(args: Args, latent: int = 0) -> C2FARM:
    return C2FARM(SCENE_BOUNDS[args.backend], ZOOM_HALF_WIDTH[args.backend], args.voxel_size, args.depths,
                  args.unet_width, args.rotation_resolution, latent)


# --------------------------------------------------------------------------- replay


class ReplayBuffer:
    """One task's prioritized replay (proportional, exponent alpha). Observations are stored
    once (point cloud as float16) and transitions refer to them by index, so a demo chain
    shares its keypoint frames. Arrays are allocated lazily by the OS: memory grows with use."""

    def __init__(self, capacity: int, image_size: int, action_size: int, alpha: float = 0.7):
        self.capacity, self.alpha = capacity, alpha
        obs_capacity = 2 * capacity  # a transition adds at most two observations
        self.rgb = np.empty((obs_capacity, image_size, image_size, 3), np.uint8)
        self.pcd = np.empty((obs_capacity, image_size, image_size, 3), np.float16)
        self.lowdim = np.empty((obs_capacity, LOWDIM_SIZE), np.float32)
        self.obs_index = np.zeros((capacity, 2), np.int64)  # (obs, next obs)
        self.action = np.zeros((capacity, action_size), np.int64)
        self.reward = np.zeros(capacity, np.float32)
        self.done = np.zeros(capacity, np.float32)
        self.priority = np.zeros(capacity, np.float64)
        self.size = self.pos = self.obs_pos = 0
        self.recent: list[int] = []  # transitions in insertion order (PEARL's context window)

    def add_observation(self, obs, t: int, episode_length: int) -> int:
        i = self.obs_pos
        self.rgb[i], self.pcd[i] = obs.front_rgb, obs.front_point_cloud
        self.lowdim[i] = lowdim_state(obs, t, episode_length)
        self.obs_pos = (self.obs_pos + 1) % len(self.rgb)
        return i

    def add(self, obs_i: int, action: np.ndarray, reward: float, done: bool, next_i: int) -> None:
        i = self.pos
        self.obs_index[i] = (obs_i, next_i)
        self.action[i], self.reward[i], self.done[i] = action, reward, float(done)
        self.priority[i] = self.priority[: self.size].max() if self.size else 1.0  # new data: max priority
        self.pos, self.size = (self.pos + 1) % self.capacity, min(self.size + 1, self.capacity)
        self.recent = (self.recent + [i])[-100:]

    def sample(self, n: int, beta: float, rng: np.random.Generator):
        p = self.priority[: self.size] ** self.alpha
        p /= p.sum()
        idx = rng.choice(self.size, n, p=p)
        weights = (self.size * p[idx]) ** (-beta)
        return idx, self.batch(idx), weights / weights.max()

    def batch(self, idx) -> dict[str, np.ndarray]:
        o, n = self.obs_index[idx, 0], self.obs_index[idx, 1]
        return dict(rgb=self.rgb[o], pcd=self.pcd[o], lowdim=self.lowdim[o], action=self.action[idx],
                    reward=self.reward[idx], done=self.done[idx],
                    next_rgb=self.rgb[n], next_pcd=self.pcd[n], next_lowdim=self.lowdim[n])

    def update_priorities(self, idx, td: np.ndarray) -> None:
        self.priority[idx] = np.abs(td) + 1e-6


def add_demos(buffer: ReplayBuffer, agent: C2FARM, demos, args: Args) -> int:
    """Keypoint discovery + demo augmentation into a replay buffer; returns transitions added.
    Each chain is an episode: (frame -> keypoint) transitions whose action is the keypoint's
    gripper pose and open state, reward 1 and done at the last keypoint (demos succeed)."""
    added = 0
    for demo in demos:
        keypoints = discover_keypoints(demo)
        for chain in demo_chains(keypoints, args.demo_augmentation_every):
            prev = buffer.add_observation(demo[chain[0]], 0, args.episode_length)
            for t, k in enumerate(chain[1:], start=1):
                nxt = buffer.add_observation(demo[k], min(t, args.episode_length), args.episode_length)
                action = agent.encode_pose(demo[k].gripper_pose, demo[k].gripper_open)
                last = k == chain[-1]
                buffer.add(prev, action, float(last), last, nxt)
                prev, added = nxt, added + 1
    return added


def collect_demos(task, args: Args):
    """Demos from the backend; the Meta-World stand-in renders only the frames we read."""
    return task.get_demos(args.demos, live_demos=True,
                          frames=lambda demo: demo_frames(demo, args.demo_augmentation_every))


# --------------------------------------------------------------------------- learner


def to_tensors(batch: dict[str, np.ndarray], device, prefix: str = ""):
    """Replay arrays -> (points (B,N,3), colours in [0,1] (B,N,3), lowdim (B,L)) tensors."""
    pcd = torch.as_tensor(batch[prefix + "pcd"], device=device).float().flatten(1, 2)
    rgb = torch.as_tensor(batch[prefix + "rgb"], device=device).float().flatten(1, 2) / 255.0
    return pcd, rgb, torch.as_tensor(batch[prefix + "lowdim"], device=device)


def obs_tensors(obs, t: int, args: Args, device):
    batch = dict(pcd=obs.front_point_cloud[None], rgb=obs.front_rgb[None],
                 lowdim=lowdim_state(obs, t, args.episode_length)[None])
    return to_tensors(batch, device)


class C2FARMLearner:
    """The C2F-ARM update: double Q-learning for every head (voxel per depth, three rotation
    axes, gripper) with soft target updates and prioritized replay over per-task buffers."""

    def __init__(self, agent: C2FARM, buffers: list[ReplayBuffer], args: Args, device):
        self.agent, self.buffers, self.args, self.device = agent, buffers, args, device
        self.target = copy.deepcopy(agent).requires_grad_(False)
        self.optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate)
        self.rng = np.random.default_rng(args.seed)

    def sample(self, task_ids: list[int], per_task: int):
        """An equal share of the batch from each listed task's buffer."""
        parts, meta = [], []
        for t in task_ids:
            idx, batch, w = self.buffers[t].sample(per_task, self.args.importance_exponent, self.rng)
            parts.append(batch)
            meta.append((t, idx, w))
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        batch["weight"] = np.concatenate([w for _, _, w in meta]).astype(np.float32)
        return batch, meta

    def td_errors(self, batch, latent=None, next_latent=None):
        """Per-head TD errors (B, depths + 4) of the batch's actions against double-Q targets."""
        agent, target = self.agent, self.target
        dev, a = self.device, torch.as_tensor(batch["action"], device=self.device)
        d = agent.depths
        points, colors, lowdim = to_tensors(batch, dev)
        q_vox, rot_grip, _, _ = agent(points, colors, lowdim, voxel_choice=a[:, :d], latent=latent)
        heads = q_vox + agent.split_rot_grip(rot_grip)
        q_taken = torch.stack([h.gather(1, a[:, i:i + 1]).squeeze(1) for i, h in enumerate(heads)], 1)
        with torch.no_grad():
            n_points, n_colors, n_lowdim = to_tensors(batch, dev, "next_")
            # double Q: the online network picks the next action (including where to zoom), the
            # target network evaluates it on the same voxel grids
            n_vox, n_rot_grip, n_chosen, (t_vox, t_rot_grip) = agent(n_points, n_colors, n_lowdim,
                                                                     latent=next_latent, target=target)
            next_action = torch.cat([n_chosen, agent.greedy_rot_grip(n_rot_grip)], 1)
            t_heads = t_vox + target.split_rot_grip(t_rot_grip)
            q_next = torch.stack([h.gather(1, next_action[:, i:i + 1]).squeeze(1) for i, h in enumerate(t_heads)], 1)
            reward = torch.as_tensor(batch["reward"], device=dev)[:, None]
            done = torch.as_tensor(batch["done"], device=dev)[:, None]
            y = reward + self.args.gamma * (1.0 - done) * q_next
        return q_taken - y

    def loss(self, batch, latent=None, next_latent=None):
        td = self.td_errors(batch, latent, next_latent)
        weight = torch.as_tensor(batch["weight"], device=self.device)
        per_sample = F.smooth_l1_loss(td, torch.zeros_like(td), reduction="none").sum(1)
        return (weight * per_sample).mean(), td.detach().abs().mean(1).cpu().numpy(), td

    def step_optimizer(self, loss, optimizer=None):
        optimizer = optimizer or self.optimizer
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], self.args.grad_clip)
        optimizer.step()

    def soft_update(self):
        with torch.no_grad():
            for p, tp in zip(self.agent.parameters(), self.target.parameters()):
                tp.lerp_(p, self.args.tau)

    def ready_tasks(self) -> list[int]:
        """Tasks with data to learn from (with --demos 0 a task's buffer fills on its first episode)."""
        return [t for t, buffer in enumerate(self.buffers) if buffer.size > 0]

    def update(self, global_step: int) -> dict[str, float]:
        """One multi-task update: batch_size / num_tasks transitions from every task."""
        tasks = self.ready_tasks()
        batch, meta = self.sample(tasks, max(1, self.args.batch_size // len(self.buffers)))
        loss, priorities, td = self.loss(batch)
        self.step_optimizer(loss)
        self.soft_update()
        offset = 0
        for t, idx, _ in meta:
            self.buffers[t].update_priorities(idx, priorities[offset:offset + len(idx)])
            offset += len(idx)
        return {"losses/td_loss": loss.item(), "losses/q_voxel_depth0_td": td[:, 0].abs().mean().item()}

    def act(self, obs, t: int, task_id: int, explore: bool) -> np.ndarray:
        with torch.no_grad():
            points, colors, lowdim = obs_tensors(obs, t, self.args, self.device)
            action = self.agent.greedy(points, colors, lowdim, latent=self.latent(task_id)).cpu().numpy()[0]
        if explore:
            for i, size in enumerate(self.agent.action_sizes()):
                if self.rng.random() < self.args.epsilon:
                    action[i] = self.rng.integers(size)
        return action

    def latent(self, task_id: int):
        return None  # PEARL overrides: the task's inferred context

    def state(self) -> dict:
        return {"model": self.agent.state_dict(), "target_model": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict()}


# --------------------------------------------------------------------------- loop


def run_episode(task, learner: C2FARMLearner, task_id: int, args: Args, explore: bool,
                buffer: ReplayBuffer | None = None, on_step: Callable[[], bool] | None = None) -> float:
    """One episode of up to `episode_length` next-best-pose actions. Stores transitions when
    given a buffer (time-outs are not terminal: they bootstrap); calls `on_step()` after every
    env step, which may return True to stop early. Returns success (0 or 1)."""
    _, obs = task.reset()
    obs_i = buffer.add_observation(obs, 0, args.episode_length) if buffer is not None else None
    success = 0.0
    for t in range(args.episode_length):
        action = learner.act(obs, t, task_id, explore)
        obs, reward, terminate = task.step(learner.agent.decode_action(action))
        success = max(success, reward)
        if buffer is not None:
            next_i = buffer.add_observation(obs, t + 1, args.episode_length)
            buffer.add(obs_i, action, reward, terminate, next_i)
            obs_i = next_i
        stop = on_step() if on_step is not None else False
        if terminate or stop:
            break
    return success


def evaluate(tasks, learner: C2FARMLearner, args: Args) -> float:
    """Mean greedy success rate over `eval_episodes` episodes of every task."""
    return float(np.mean([np.mean([run_episode(task, learner, i, args, explore=False) for _ in range(args.eval_episodes)])
                          for i, task in enumerate(tasks)]))


def train(args: Args, learner: C2FARMLearner, tasks: list, task_names: list[str], writer,
          log_eval: Callable | None = None, eval_every: int | None = None, save: Callable | None = None) -> int:
    """The C2F-ARM loop shared by pretraining (MT / Reptile / PEARL learners) and fine-tuning:
    round-robin over the tasks, one episode at a time, `updates_per_step` learner updates per
    env step. `log_eval(step, success_rate)` receives evaluations at step 0, at the first
    episode end after every `eval_every` env steps, and at the end; `save(step)` every
    `checkpoint_interval` steps and at the end."""
    state = dict(step=0, updates=0, next_eval=eval_every or None, next_ckpt=args.checkpoint_interval)
    start, successes, episode = time.time(), [], 0

    def on_step() -> bool:
        state["step"] += 1
        step = state["step"]
        logs = {}
        if step > args.learning_starts:
            for _ in range(args.updates_per_step):
                logs = learner.update(step)
                state["updates"] += 1
            if step % 10 == 0:
                for k, v in logs.items():
                    writer.add_scalar(k, v, step)
        if step % 10 == 0:
            sps = step / (time.time() - start)  # env steps/s, updates and evaluations included
            writer.add_scalar("charts/SPS", sps, step)
            print(f"global_step={step} SPS={sps:.2f} updates={state['updates']}", flush=True)
        if save is not None and step >= state["next_ckpt"]:
            save(step)
            state["next_ckpt"] += args.checkpoint_interval
        return step >= args.total_timesteps

    if log_eval is not None and eval_every:
        log_eval(0, evaluate(tasks, learner, args))  # before any update: the starting point of the curve
    while state["step"] < args.total_timesteps:
        tid = episode % len(tasks)
        success = run_episode(tasks[tid], learner, tid, args, explore=True, buffer=learner.buffers[tid],
                              on_step=on_step)
        successes.append(success)
        episode += 1
        step, rate = state["step"], float(np.mean(successes[-20:]))
        writer.add_scalar("charts/episodic_return", success, step)
        writer.add_scalar(f"charts/success/{task_names[tid]}", success, step)
        writer.add_scalar("charts/success_rate", rate, step)
        print(f"global_step={step} task={task_names[tid]} episodic_return={success:.0f} "
              f"success_rate(last 20)={rate:.2f}", flush=True)
        # evaluate between episodes (evaluation resets the tasks), at the end separately below
        if state["next_eval"] is not None and log_eval is not None and args.total_timesteps > step >= state["next_eval"]:
            log_eval(step, evaluate(tasks, learner, args))
            state["next_eval"] += eval_every * ((step - state["next_eval"]) // eval_every + 1)
    if log_eval is not None:
        log_eval(state["step"], evaluate(tasks, learner, args))
    if save is not None:
        save(state["step"])
    return state["step"]


# --------------------------------------------------------------------------- PEARL


def product_of_gaussians(mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine N independent Gaussian factors (N, L) into one: precision-weighted mean."""
    var = var.clamp(min=1e-7)
    post_var = 1.0 / (1.0 / var).sum(0)
    return post_var * (mu / var).sum(0), post_var


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)), summed over the latent dimensions."""
    return 0.5 * (var + mu**2 - 1.0 - torch.log(var)).sum(-1)


class ContextEncoder(nn.Module):
    """One transition (front RGB, discrete action scaled to [0, 1], reward) -> Gaussian (mu, var)."""

    def __init__(self, action_size: int, latent: int = 16, channels: int = 16):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, channels, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(2 * channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(2 * channels * 16 + action_size + 1, 128), nn.ReLU(),
                                 nn.Linear(128, 2 * latent))

    def forward(self, rgb, action, reward):
        h = self.conv(rgb.permute(0, 3, 1, 2).float() / 255.0)
        mu, raw_var = self.mlp(torch.cat([h, action, reward[:, None]], 1)).chunk(2, -1)
        return mu, F.softplus(raw_var) + 1e-4


class PEARLLearner(C2FARMLearner):
    def __init__(self, agent, buffers, args: Args, device):
        super().__init__(agent, buffers, args, device)
        self.action_scale = torch.tensor(agent.action_sizes(), dtype=torch.float32, device=device)
        self.encoder = ContextEncoder(len(self.action_scale), args.latent_size).to(device)
        self.model = nn.ModuleDict({"agent": agent, "encoder": self.encoder})
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.learning_rate)

    def posterior(self, task_id: int):
        """(mu, var) of z from `context_size` of the task's `context_window` latest transitions,
        or the prior N(0, I) when the task has none yet."""
        buffer, args = self.buffers[task_id], self.args
        recent = buffer.recent[-args.context_window:]
        if not recent:
            zeros = torch.zeros(args.latent_size, device=self.device)
            return zeros, zeros + 1.0
        idx = self.rng.choice(recent, args.context_size, replace=len(recent) < args.context_size)
        batch = buffer.batch(idx)
        action = torch.as_tensor(batch["action"], device=self.device).float() / self.action_scale
        mu, var = self.encoder(torch.as_tensor(batch["rgb"], device=self.device), action,
                               torch.as_tensor(batch["reward"], device=self.device))
        return product_of_gaussians(mu, var)

    def update(self, global_step: int) -> dict[str, float]:
        tasks, args = self.ready_tasks(), self.args
        per_task = max(1, args.batch_size // len(self.buffers))
        batch, meta = self.sample(tasks, per_task)
        zs, kls = [], []
        for t in tasks:
            mu, var = self.posterior(t)
            zs.append(mu + var.sqrt() * torch.randn_like(mu))  # reparameterised sample
            kls.append(kl_to_standard_normal(mu, var))
        latent = torch.stack(zs).repeat_interleave(per_task, 0)
        q_loss, priorities, _ = self.loss(batch, latent=latent, next_latent=latent.detach())
        kl = torch.stack(kls).mean()
        self.step_optimizer(q_loss + args.kl_weight * kl)
        self.soft_update()
        offset = 0
        for t, idx, _ in meta:
            self.buffers[t].update_priorities(idx, priorities[offset:offset + len(idx)])
            offset += len(idx)
        return {"losses/td_loss": q_loss.item(), "losses/kl": kl.item()}

    @torch.no_grad()
    def latent(self, task_id: int):
        return self.posterior(task_id)[0][None]  # act with the posterior mean

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "target_model": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict()}


# --------------------------------------------------------------------------- checkpoint


CHECKPOINT_FORMAT = "finetune-vs-meta-rl"  # = finetune.CHECKPOINT_FORMAT


def save_checkpoint(path: str, args: Args, learner: PEARLLearner, train_tasks: list[str], global_step: int,
                    method: str = "pearl") -> None:
    """Tensors and plain values only (loads with weights_only=True); written atomically."""
    ckpt = {"format": CHECKPOINT_FORMAT, "format_version": 1, "module": "c2farm_pearl_rlbench",
            "benchmark": "rlbench", "method": method, "train_tasks": list(train_tasks),
            "args": dataclasses.asdict(args), "global_step": int(global_step), **learner.state()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def check_args(args: Args) -> None:
    """Settings that cannot run raise TaskError, which the scripts report as one line."""
    for name in ("total_timesteps", "batch_size", "image_size", "episode_length", "voxel_size", "depths",
                 "replay_size", "updates_per_step", "eval_episodes", "checkpoint_interval", "unet_width",
                 "latent_size", "context_size"):
        if getattr(args, name) < 1:
            raise TaskError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.demos < 0:
        raise TaskError(f"--demos must be 0 or more (got {args.demos})")
    if not 0 < args.rotation_resolution <= 180:
        raise TaskError(f"--rotation-resolution must be in (0, 180] degrees (got {args.rotation_resolution})")
    if args.context_window < args.context_size:
        raise TaskError(f"--context-window ({args.context_window}) must hold --context-size "
                        f"({args.context_size}) transitions")


def setup(args: Args, task_names: list[str], agent: C2FARM | None = None, latent: int = 0):
    """Seeds, device, tasks, agent and demo-filled buffers: the part every script shares."""
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    tasks = [make_task(args.backend, name, args.image_size, args.seed + i) for i, name in enumerate(task_names)]
    agent = (agent or make_agent(args, latent)).to(device)
    buffers = []
    for name, task in zip(task_names, tasks):
        buffer = ReplayBuffer(max(1, args.replay_size // len(tasks)), args.image_size, args.depths + 4,
                              args.priority_exponent)
        if args.demos > 0:
            t0 = time.time()
            n = add_demos(buffer, agent, collect_demos(task, args), args)
            print(f"{name}: {args.demos} demos -> {n} transitions ({time.time() - t0:.1f}s)", flush=True)
        buffers.append(buffer)
    return device, tasks, agent, buffers


def make_writer(args: Args, run_dir: str):
    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=os.path.basename(run_dir), save_code=True)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


def main(args: Args):
    """Pretraining entry point."""
    task_names = default_tasks(args.backend, args.train_tasks, args.held_out_task)
    run_dir = args.output_dir or os.path.join("runs", f"{args.exp_name}__{args.seed}__{int(time.time())}")
    writer = make_writer(args, run_dir)
    device, tasks, agent, buffers = setup(args, task_names, latent=getattr(args, "latent_size", 0))
    learner = PEARLLearner(agent, buffers, args, device)
    path = os.path.join(run_dir, "checkpoint.pt")

    def save(step):
        save_checkpoint(path, args, learner, task_names, step)

    def log_eval(step, rate):
        writer.add_scalar("eval/success_rate", rate, step)
        print(f"[eval] global_step={step} success_rate={rate:.3f}", flush=True)

    try:
        train(args, learner, tasks, task_names, writer, log_eval=log_eval,
              eval_every=args.eval_interval or None, save=save)
    finally:
        for task in tasks:
            task.close()
        writer.close()
    print(f"saved {path}", flush=True)


def adapt(args: Args, model_state: dict, task_name: str, writer, log_eval: Callable, eval_every: int | None) -> None:
    """PEARL's adaptation to a new task: collect `total_timesteps` env steps there (plus
    `--demos` demos) and act with z inferred from that task's own context; no gradient step."""
    args = dataclasses.replace(args, learning_starts=args.total_timesteps + 1)  # never update
    device, tasks, agent, buffers = setup(args, [task_name], latent=args.latent_size)
    learner = PEARLLearner(agent, buffers, args, device)
    learner.model.load_state_dict(model_state)
    try:
        train(args, learner, tasks, [task_name], writer, log_eval=log_eval, eval_every=eval_every)
    finally:
        for task in tasks:
            task.close()


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except TaskError as e:
        sys.exit(f"c2farm_pearl_rlbench.py: error: {e}")

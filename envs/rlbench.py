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

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

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
        # scene it samples first, so every episode of a task starts with the same object and goal
        # positions (unlike RLBench's randomised scenes; docs/rlbench.md, "What still differs").
        self.env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{name}-goal-observable"](seed=seed)
        self.env.max_path_length = 10**9  # episodes are bounded by the agent's 10 actions instead
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
        mj.mj_forward(env.model, env.data)
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

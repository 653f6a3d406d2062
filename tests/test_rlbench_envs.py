"""Exact checks of envs/rlbench.py: the task lists, the pose and camera math, the Meta-World
stand-in (point cloud against the simulator, unreachable targets, its state for --resume) and
the RLBench adapter against a stand-in of the RLBench 1.2 / PyRep modules (CoppeliaSim cannot be
installed here)."""

import os
import sys
import types

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from envs import rlbench as rlb  # noqa: E402


def test_quaternion_euler_round_trip():
    np.testing.assert_allclose(rlb.quaternion_to_euler(np.array([0, 0, 0, 1.0])), [0, 0, 0], atol=1e-12)
    q = np.array([0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4)])  # 90 degrees about z (xyzw)
    np.testing.assert_allclose(rlb.quaternion_to_euler(q), [0, 0, 90], atol=1e-9)
    np.testing.assert_allclose(rlb.euler_to_quaternion([0, 0, 90]), q, atol=1e-12)
    np.testing.assert_allclose(rlb.quaternion_to_euler(2 * q), [0, 0, 90], atol=1e-9)  # normalised first
    e = np.array([12.5, -33.0, 170.0])
    np.testing.assert_allclose(rlb.quaternion_to_euler(rlb.euler_to_quaternion(e)), e, atol=1e-9)


def test_pointcloud_from_depth_known_camera():
    # camera at (1, 2, 3) looking straight down (-z world); OpenCV axes: x right = world +x,
    # y down = world -y, z forward = world -z
    extrinsics = np.eye(4)
    extrinsics[:3, :3] = np.array([[1, 0, 0], [0, -1, 0], [0, 0, -1]], dtype=float)
    extrinsics[:3, 3] = [1, 2, 3]
    intrinsics = np.array([[10.0, 0, 1.5], [0, 10.0, 1.5], [0, 0, 1]])
    depth = np.full((4, 4), 2.0)
    depth[0, 3] = 1.0
    pcd = rlb.pointcloud_from_depth(depth, intrinsics, extrinsics)
    # pixel (row 0, col 0): camera ((0-1.5)*2/10, (0-1.5)*2/10, 2) = (-0.3, -0.3, 2) -> world (0.7, 2.3, 1)
    np.testing.assert_allclose(pcd[0, 0], [0.7, 2.3, 1.0], atol=1e-6)
    # pixel (row 0, col 3) at depth 1: camera (0.15, -0.15, 1) -> world (1.15, 2.15, 2)
    np.testing.assert_allclose(pcd[0, 3], [1.15, 2.15, 2.0], atol=1e-6)
    # pixel (row 3, col 1): camera (-0.1, 0.3, 2) -> world (0.9, 1.7, 1)
    np.testing.assert_allclose(pcd[3, 1], [0.9, 1.7, 1.0], atol=1e-6)


def test_metaworld_point_cloud_sees_the_scene():
    """The rendered point cloud lands where the simulator says things are, in every new scene: the
    table top at z = 0, the puck's surface seen, and the projection of the puck through the camera
    matrices hits the puck's pixels."""
    task = rlb.make_task("metaworld", "push-v3", image_size=64, seed=0)
    try:
        for _ in range(3):
            _, obs = task.reset()
            pcd = obs.front_point_cloud.reshape(-1, 3)
            puck = task.env._get_pos_objects()[:3]  # its centre; radius 0.02
            assert np.linalg.norm(pcd - puck, axis=1).min() < 0.03
            assert abs(np.median(pcd[:, 2])) < 0.01  # most pixels see the table top at z = 0
            intrinsics, extrinsics = task.camera_matrices()
            cam = np.linalg.inv(extrinsics) @ np.append(puck, 1.0)
            u = intrinsics[0, 0] * cam[0] / cam[2] + intrinsics[0, 2]
            v = intrinsics[1, 1] * cam[1] / cam[2] + intrinsics[1, 2]
            np.testing.assert_allclose(obs.front_point_cloud[int(round(v)), int(round(u))], puck, atol=0.03)
        assert obs.front_rgb.shape == (64, 64, 3) and obs.front_rgb.dtype == np.uint8
        assert obs.gripper_pose.shape == (7,) and obs.gripper_open == 1.0 and obs.joint_velocities.shape == (7,)
    finally:
        task.close()


def test_metaworld_draws_a_new_scene_at_every_reset_from_its_seed():
    """As RLBench: every reset places the objects and the goal anew (Meta-World's constructor would
    freeze its first scene), drawn from the task's own seeded generator, so a seed gives the same
    sequence of scenes and another seed another."""
    def scenes(seed):
        task = rlb.make_task("metaworld", "push-v3", image_size=16, seed=seed)
        try:
            return [np.array(task.env._last_rand_vec) for _ in range(3) if task.reset()]
        finally:
            task.close()

    first, again, other = scenes(3), scenes(3), scenes(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
    assert not np.array_equal(first[0], other[0])


def test_metaworld_unreachable_target_is_a_failure():
    task = rlb.make_task("metaworld", "reach-v3", image_size=16, seed=0)
    try:
        task.reset()
        obs, reward, terminate = task.step(np.array([0.0, 2.0, 0.2, 0, 0, 0, 1, 1]))
        assert (reward, terminate) == (0.0, True) and "outside" in task.last_failure
        _, obs = task.reset()
        target = obs.gripper_pose[:3] + np.array([0.05, 0.0, -0.03])
        obs, reward, terminate = task.step(np.concatenate([target, [0, 0, 0, 1, 1]]))
        assert np.linalg.norm(obs.gripper_pose[:3] - target) < 0.01  # the "planner" got there
    finally:
        task.close()


@pytest.mark.parametrize("name", ["push-v3", "drawer-open-v3"])
def test_metaworld_state_resumes_mid_episode_exactly(name):
    """get_state mid-episode, then set_state on a fresh task (another seed): the same observation and
    the same observations, rewards and ends for the same actions afterwards, bit for bit (push-v3's
    random targets push the puck: contacts, whose solver warm start must be restored too)."""
    rng = np.random.default_rng(0)
    a, b = rlb.make_task("metaworld", name, image_size=16, seed=5), rlb.make_task("metaworld", name, image_size=16, seed=9)
    try:
        lo, hi = a.workspace
        actions = [np.concatenate([rng.uniform(lo, hi), [0, 0, 0, 1], [i % 2]]) for i in range(5)]
        a.reset()
        for action in actions[:2]:
            a.step(action)
        state = a.get_state()
        assert isinstance(state["sim"], torch.Tensor) and isinstance(state["np_random"], dict)
        fields = ("front_rgb", "front_point_cloud", "gripper_pose", "gripper_open", "gripper_joint_positions")
        same = lambda o, p: all(np.array_equal(getattr(o, f), getattr(p, f)) for f in fields)  # noqa: E731
        b.reset()
        assert same(b.set_state(state), a.get_observation())
        for action in actions[2:]:
            (obs_a, *rest_a), (obs_b, *rest_b) = a.step(action), b.step(action)
            assert same(obs_a, obs_b) and rest_a == rest_b
        a.reset(), b.reset()  # the next scene too (Meta-World's generator restored)
        np.testing.assert_array_equal(a.env._last_rand_vec, b.env._last_rand_vec)
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- RLBench adapter (fake API)


class _PlanningError(Exception):
    pass


def _install_fake_rlbench(monkeypatch):
    """A minimal stand-in of the RLBench 1.2 / PyRep modules the adapter imports."""
    calls = {"actions": [], "variation": None, "env_kwargs": None}

    class InvalidActionError(Exception):
        pass

    class IKError(Exception):
        pass

    class ConfigurationPathError(Exception):
        pass

    class FakeObs:
        def __init__(self, i):
            self.front_rgb = np.full((8, 8, 3), i, np.uint8)
            self.front_point_cloud = np.zeros((8, 8, 3), np.float32)
            self.gripper_pose = np.array([0.1, 0.0, 0.8, 0, 0, 0, 1.0])
            self.gripper_open = 1.0
            self.gripper_joint_positions = np.zeros(2)
            self.joint_velocities = np.zeros(7)
            self.misc = {"front_camera_extrinsics": np.eye(4), "front_camera_intrinsics": np.eye(3)}

    class FakeTask:
        def set_variation(self, v):
            calls["variation"] = v

        def reset(self):
            return ["push the button"], FakeObs(0)

        def step(self, action):
            calls["actions"].append(np.array(action))
            if action[2] > 1.5:
                raise IKError("no IK solution")
            if action[2] < 0.0:
                raise ConfigurationPathError("no path")
            if action[2] > 1.4:
                raise InvalidActionError("bad pose")
            return FakeObs(len(calls["actions"])), float(action[0] > 0.5), action[0] > 0.5

        def get_demos(self, n, live_demos=True):
            return [[FakeObs(0), FakeObs(1)] for _ in range(n)]

    class Environment:
        def __init__(self, action_mode, obs_config, headless):
            calls["env_kwargs"] = dict(action_mode=action_mode, obs_config=obs_config, headless=headless)

        def launch(self):
            pass

        def get_task(self, cls):
            calls["task_class"] = cls.__name__
            return FakeTask()

        def shutdown(self):
            pass

    class CameraConfig:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class ObservationConfig:
        def set_all(self, value):
            self.all = value

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        if "." in name:  # as the import system does: the parent package holds the submodule
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, m)
        return m

    class PushButton:
        pass

    module("rlbench")
    module("rlbench.tasks", PushButton=PushButton)
    module("rlbench.environment", Environment=Environment)
    module("rlbench.action_modes")
    module("rlbench.action_modes.action_mode", MoveArmThenGripper=lambda arm, gripper: ("MoveArmThenGripper", arm, gripper))
    module("rlbench.action_modes.arm_action_modes", EndEffectorPoseViaPlanning=lambda: "EndEffectorPoseViaPlanning")
    module("rlbench.action_modes.gripper_action_modes", Discrete=lambda: "Discrete")
    module("rlbench.backend")
    module("rlbench.backend.exceptions", InvalidActionError=InvalidActionError)
    module("rlbench.observation_config", ObservationConfig=ObservationConfig, CameraConfig=CameraConfig)
    module("pyrep")
    module("pyrep.errors", IKError=IKError, ConfigurationPathError=ConfigurationPathError)
    return calls


def test_rlbench_adapter_against_fake_api(monkeypatch):
    calls = _install_fake_rlbench(monkeypatch)
    task = rlb.make_task("rlbench", "push_button", image_size=8)
    assert calls["task_class"] == "PushButton" and calls["variation"] == 0
    kw = calls["env_kwargs"]
    assert kw["action_mode"] == ("MoveArmThenGripper", "EndEffectorPoseViaPlanning", "Discrete") and kw["headless"]
    cam = kw["obs_config"].front_camera
    assert cam.rgb and cam.point_cloud and cam.image_size == (8, 8)
    assert kw["obs_config"].gripper_pose and kw["obs_config"].joint_velocities
    descriptions, obs = task.reset()
    assert descriptions == ["push the button"]
    # the agent's action: 8-D, unit quaternion xyzw, gripper as 0/1
    action = np.concatenate([[0.1, 0.0, 0.8], rlb.euler_to_quaternion([0, 0, 35.0]), [1.0]])
    obs, reward, terminate = task.step(action * np.array([1, 1, 1, 2, 2, 2, 2, 0.7]))  # unnormalised quaternion
    sent = calls["actions"][-1]
    assert sent.shape == (8,) and abs(np.linalg.norm(sent[3:7]) - 1) < 1e-12 and sent[7] == 1.0
    np.testing.assert_allclose(sent[3:7], action[3:7], atol=1e-12)
    assert (reward, terminate) == (0.0, False) and obs.front_rgb[0, 0, 0] == 1
    # planning failures end the episode as a failure, the run goes on
    for z, error in [(1.6, "IKError"), (-0.5, "ConfigurationPathError"), (1.45, "InvalidActionError")]:
        obs, reward, terminate = task.step(np.array([0.1, 0.0, z, 0, 0, 0, 1, 0]))
        assert (reward, terminate) == (0.0, True) and task.last_failure.startswith(error)
        assert obs.front_rgb[0, 0, 0] == 1  # the last good observation
    obs, reward, terminate = task.step(np.array([0.6, 0.0, 0.8, 0, 0, 0, 1, 0.2]))
    assert (reward, terminate) == (1.0, True) and calls["actions"][-1][7] == 0.0
    demos = task.get_demos(2)
    assert len(demos) == 2 and len(demos[0]) == 2
    assert task.get_state() is None and task.set_state(None) is None  # a resumed run restarts RLBench's episode
    task.close()


def test_rlbench_missing_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rlbench", None)  # import fails
    with pytest.raises(rlb.TaskError, match="--backend metaworld"):
        rlb.make_task("rlbench", "push_button")


def test_unknown_tasks():
    with pytest.raises(rlb.TaskError, match="unknown metaworld task 'pick_up_cup'"):
        rlb.default_tasks("metaworld", ["pick_up_cup"], None)
    assert rlb.default_tasks("rlbench", [], "push_button") == [t for t in rlb.RLBENCH_TASKS if t != "push_button"]
    assert len(rlb.default_tasks("rlbench", [], "push_button")) == 10
    assert rlb.default_tasks("metaworld", [], None) == list(rlb.METAWORLD_TRAIN_TASKS)


def _joint_frame(velocity, gripper_open):
    return rlb.Observation(None, None, np.array([0, 0, 0, 0, 0, 0, 1.0]), float(gripper_open), np.zeros(2),
                           np.full(7, velocity), {})


def joint_velocity_demo(reopen_at=None):
    """20 frames: at rest at 0, moving, stopped at 5-7, gripper closes at 12, stopped at 16 and 18,
    last frame 19 (optionally the gripper reopens at `reopen_at`)."""
    frames = []
    for i in range(20):
        velocity = 0.05 if i in (0, 5, 6, 7, 16, 18) else 1.0  # within +-0.1 counts as stopped
        gripper_open = i < 12 or (reopen_at is not None and i >= reopen_at)
        frames.append(_joint_frame(velocity, gripper_open))
    return frames


def test_rlbench_keypoints_from_joint_velocities():
    # 0: at rest but the first frame (arms the 4-frame pause); 5: stopped; 6, 7: within 4 frames of
    # the stop at 5; 12: gripper change; 16: stopped; 18: at rest but one frame before the end; 19: last
    assert rlb.discover_keypoints(joint_velocity_demo(), "rlbench") == [5, 12, 16, 19]
    # a gripper change at 18 gives neighbouring keypoints 18, 19: the second-to-last is dropped
    assert rlb.keypoints_from_joint_velocities(joint_velocity_demo(reopen_at=18)) == [5, 12, 16, 19]
    # a gripper change at 17 is kept; the stop at 16 is not one any more (the gripper changes within a frame)
    assert rlb.keypoints_from_joint_velocities(joint_velocity_demo(reopen_at=17)) == [5, 12, 17, 19]
    # Meta-World's rule reads end-effector speed instead (the arm never rests there): only the last frame here
    assert rlb.discover_keypoints(joint_velocity_demo(), "metaworld")[-1] == 19

"""Exact checks of the C2F-ARM pieces that can be wrong quietly (RLBench / Meta-World part)."""

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import c2farm_mt_rlbench as c2f  # noqa: E402
import c2farm_pearl_rlbench as pearl  # noqa: E402
import c2farm_reptile_rlbench as reptile  # noqa: E402
from envs import rlbench as rlb  # noqa: E402
from envs.run_dir import load_resume, set_rng_state  # noqa: E402

RLB_BOUNDS = np.array([-0.3, -0.5, 0.6, 0.7, 0.5, 1.6])  # 1 m cube, 16 voxels of 0.0625 m


# --------------------------------------------------------------------------- voxels


def test_point_to_voxel_and_back():
    # 0.0625 m voxels starting at (-0.3, -0.5, 0.6)
    assert rlb.point_to_voxel([-0.3, -0.5, 0.6], RLB_BOUNDS, 16).tolist() == [0, 0, 0]
    assert rlb.point_to_voxel([0.0, 0.0, 1.0], RLB_BOUNDS, 16).tolist() == [4, 8, 6]  # 0.3/0.0625=4.8, 8.0, 6.4
    assert rlb.point_to_voxel([0.69, 0.49, 1.59], RLB_BOUNDS, 16).tolist() == [15, 15, 15]
    assert rlb.point_to_voxel([5.0, -5.0, 1.0], RLB_BOUNDS, 16).tolist() == [15, 0, 6]  # outside -> border
    np.testing.assert_allclose(rlb.voxel_to_point([4, 8, 6], RLB_BOUNDS, 16), [-0.01875, 0.03125, 1.00625])
    np.testing.assert_allclose(rlb.voxel_to_point([0, 0, 0], RLB_BOUNDS, 16), [-0.26875, -0.46875, 0.63125])
    # every voxel centre maps back to its own index
    for ijk in [(0, 0, 0), (3, 7, 11), (15, 15, 15), (15, 0, 9)]:
        centre = rlb.voxel_to_point(ijk, RLB_BOUNDS, 16)
        assert tuple(rlb.point_to_voxel(centre, RLB_BOUNDS, 16)) == ijk


def test_depth1_zoom_bounds():
    # depth 0 picks voxel (4, 8, 6): centre (-0.01875, 0.03125, 1.00625); depth 1 is +-0.15 m around it
    centre = rlb.voxel_to_point([4, 8, 6], RLB_BOUNDS, 16)
    np.testing.assert_allclose(rlb.zoom_bounds(centre, 0.15),
                               [-0.16875, -0.11875, 0.85625, 0.13125, 0.18125, 1.15625])
    # the agent encodes a pose through both depths and decodes to the depth-1 voxel centre
    agent = c2f.C2FARM(tuple(RLB_BOUNDS), 0.15, voxels=16, depths=2, width=4)
    pose = np.array([0.005, 0.0, 1.0, 0, 0, 0, 1.0])
    action = agent.encode_pose(pose, gripper_open=1.0)
    assert action[0] == 4 * 256 + 8 * 16 + 6
    # depth-1 voxel size 0.3/16 = 0.01875: (0.005 + 0.16875) / 0.01875 = 9.27, 0.11875 / 0.01875 = 6.33,
    # (1 - 0.85625) / 0.01875 = 7.67
    assert action[1] == 9 * 256 + 6 * 16 + 7
    assert action[-1] == 1
    decoded = agent.decode_action(action)
    np.testing.assert_allclose(decoded[:3], [0.009375, 0.003125, 0.996875], atol=1e-6)  # float32 bounds
    assert np.abs(decoded[:3] - pose[:3]).max() <= 0.01875 / 2 + 1e-12  # within half a depth-1 voxel
    # the batched torch path agrees with the numpy one
    bounds = torch.tensor(RLB_BOUNDS, dtype=torch.float32)[None]
    np.testing.assert_allclose(rlb.voxel_centers(torch.tensor([action[0]]), bounds, 16).numpy()[0], centre, atol=1e-6)


def test_voxelize_features():
    bounds = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    points = torch.tensor([[[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [0.9, 0.9, 0.6], [2.0, 0.5, 0.5]]])
    colors = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]])
    grid = rlb.voxelize(points, colors, bounds, 4)  # 0.25 m voxels
    assert grid.shape == (1, 10, 4, 4, 4)
    # two points share voxel (0, 0, 0): mean xyz and mean colour
    torch.testing.assert_close(grid[0, :6, 0, 0, 0], torch.tensor([0.15, 0.15, 0.15, 0.5, 0.5, 0.0]))
    torch.testing.assert_close(grid[0, :6, 3, 3, 2], torch.tensor([0.9, 0.9, 0.6, 0.0, 0.0, 1.0]))
    # occupancy: exactly two occupied voxels (the out-of-bounds point is dropped)
    assert grid[0, 9].sum().item() == 2.0 and grid[0, 9, 0, 0, 0] == 1 and grid[0, 9, 3, 3, 2] == 1
    # voxel index channels, normalised to [0, 1]
    torch.testing.assert_close(grid[0, 6:9, 3, 1, 2], torch.tensor([1.0, 1 / 3, 2 / 3]))


# --------------------------------------------------------------------------- rotations


def test_quaternion_discrete_euler_round_trip():
    # identity -> euler 0 -> bin (0 + 180) / 5 = 36 on every axis
    assert rlb.discretize_rotation(np.array([0, 0, 0, 1.0])).tolist() == [36, 36, 36]
    # 90 degrees about z (xyzw)
    q = np.array([0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4)])
    np.testing.assert_allclose(rlb.quaternion_to_euler(q), [0, 0, 90], atol=1e-9)
    assert rlb.discretize_rotation(q).tolist() == [36, 36, 54]
    # 180 degrees about x: +-180 both wrap to bin 0
    assert rlb.discretize_rotation(np.array([1.0, 0, 0, 0]))[0] == 0
    # bins -> quaternion -> bins is the identity away from gimbal lock (pitch in (-90, 90))
    rng = np.random.default_rng(0)
    for _ in range(200):
        bins = np.array([rng.integers(72), rng.integers(19, 54), rng.integers(72)])
        q = rlb.undiscretize_rotation(bins)
        assert abs(np.linalg.norm(q) - 1) < 1e-12
        assert rlb.discretize_rotation(q).tolist() == bins.tolist()
    # and euler -> quaternion -> euler on continuous angles
    e = np.array([12.5, -33.0, 170.0])
    np.testing.assert_allclose(rlb.quaternion_to_euler(rlb.euler_to_quaternion(e)), e, atol=1e-9)


# --------------------------------------------------------------------------- demos


def _frame(pos, gripper_open, fingers):
    return rlb.Observation(None, None, np.array(list(pos) + [0, 0, 0, 1.0]), float(gripper_open),
                           np.array([fingers, fingers]), np.zeros(7), {})


def synthetic_demo():
    """30 frames: the arm moves at 1 cm/frame along x, stops at frame 10, moves again, closes the
    gripper at frame 18 (fingers move 0.01 per frame for 3 frames), and ends at frame 29."""
    frames, x, fingers, gopen = [], 0.0, 0.0, 1
    for i in range(30):
        if i == 18:
            gopen = 0
        if 18 <= i <= 20:
            fingers += 0.01
        frames.append(_frame((x, 0.0, 0.0), gopen, fingers))
        if i < 9 or 11 <= i < 29:
            x += 0.01  # still between frames 9 and 11: speed minimum at frame 10
    return frames


def test_keypoint_discovery_synthetic():
    demo = synthetic_demo()
    # rest at 10 (speed 0 there); gripper flips at 18, fingers still from frame 21 on, two still
    # frames after that -> 22; last frame 29
    assert rlb.discover_keypoints(demo) == [10, 22, 29]


def test_demo_augmentation_chains():
    assert rlb.demo_chains([10, 22, 29], every=10) == [[0, 10, 22, 29], [10, 22, 29], [20, 22, 29]]
    assert rlb.demo_chains([25, 40, 59], every=10) == [
        [0, 25, 40, 59], [10, 25, 40, 59], [20, 25, 40, 59], [30, 40, 59], [40, 59], [50, 59]]
    assert rlb.demo_frames(synthetic_demo(), every=10) == [0, 10, 20, 22, 29]


def test_add_demos_rewards_and_actions():
    args = c2f.Args(image_size=4, unet_width=4, crop_augmentation=False)
    demo = synthetic_demo()
    for o in demo:
        o.front_rgb = np.zeros((4, 4, 3), np.uint8)
        o.front_point_cloud = np.zeros((4, 4, 3), np.float32)
    agent = c2f.make_agent(args)
    buffer = c2f.ReplayBuffer(100, 4, 6)
    assert rlb.add_demos(buffer, agent, [demo], args, np.random.default_rng(0)) == 3 + 2 + 2  # chains [0,10,22,29], [10,22,29], [20,22,29]
    assert buffer.reward[:7].tolist() == [0, 0, 1, 0, 1, 0, 1]
    assert buffer.done[:7].tolist() == [0, 0, 1, 0, 1, 0, 1]
    assert buffer.action[1, -1] == 0 and buffer.action[0, -1] == 1  # gripper closed at keypoint 22
    np.testing.assert_array_equal(buffer.action[0], agent.encode_pose(demo[10].gripper_pose, 1.0))


# --------------------------------------------------------------------------- meta-learning pieces


def test_reptile_interpolation_step():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -1.0]]))
        model.bias.copy_(torch.tensor([5.0]))
    theta = [torch.tensor([[1.0, 1.0]]), torch.tensor([1.0])]
    reptile.reptile_interpolate(model, theta, 0.25)  # theta + 0.25 * (phi - theta)
    torch.testing.assert_close(model.weight, torch.tensor([[1.5, 0.5]]))
    torch.testing.assert_close(model.bias, torch.tensor([2.0]))
    assert reptile.reptile_eps(0, 100, 0.9, 1.0) == 0.9
    assert reptile.reptile_eps(50, 100, 0.9, 1.0) == pytest.approx(0.95)
    assert reptile.reptile_eps(100, 100, 0.9, 1.0) == 1.0
    # the defaults reproduce the authors' theta <- phi + e (theta - phi), e: 0.1 -> 0
    args = reptile.Args()
    assert (args.reptile_eps_start, args.reptile_eps_end, args.reptile_k) == (0.9, 1.0, 5)


def test_product_of_gaussians():
    mu = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    var = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    m, v = pearl.product_of_gaussians(mu, var)
    torch.testing.assert_close(m, torch.tensor([2.0, 1.0]))  # equal precisions: plain mean
    torch.testing.assert_close(v, torch.tensor([0.5, 1.0]))
    m, v = pearl.product_of_gaussians(torch.tensor([[0.0], [4.0]]), torch.tensor([[1.0], [3.0]]))
    torch.testing.assert_close(v, torch.tensor([0.75]))  # 1 / (1 + 1/3)
    torch.testing.assert_close(m, torch.tensor([1.0]))  # 0.75 * (0/1 + 4/3)
    torch.testing.assert_close(pearl.kl_to_standard_normal(torch.zeros(3), torch.ones(3)), torch.tensor(0.0))
    torch.testing.assert_close(pearl.kl_to_standard_normal(torch.tensor([1.0]), torch.tensor([1.0])), torch.tensor(0.5))


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip(tmp_path):
    import finetune

    args = reptile.Args(unet_width=4, image_size=4, train_tasks=["reach-v3"])
    agent = c2f.make_agent(args)
    buffer = c2f.ReplayBuffer(10, 4, 6)
    learner = reptile.ReptileLearner(agent, [buffer], args, torch.device("cpu"))
    path = str(tmp_path / "checkpoint.pt")
    rlb.save_checkpoint(path, reptile.SCRIPT, reptile.METHOD, args, learner, ["reach-v3"], 7)
    assert not os.path.exists(path + ".tmp")
    ckpt = finetune.load_checkpoint(path)  # validates; weights_only load
    assert ckpt["format"] == finetune.CHECKPOINT_FORMAT and ckpt["format_version"] == 1
    assert (ckpt["module"], ckpt["benchmark"], ckpt["method"]) == ("c2farm_reptile_rlbench", "rlbench", "reptile")
    assert ckpt["train_tasks"] == ["reach-v3"] and ckpt["global_step"] == 7
    assert ckpt["args"]["reptile_k"] == 5 and ckpt["args"]["train_tasks"] == ["reach-v3"]
    # a Reptile network loads into the MT agent (for fine-tuning)
    mt_agent = c2f.make_agent(c2f.Args(unet_width=4))
    mt_agent.load_state_dict(ckpt["model"])
    for k, v in agent.state_dict().items():
        assert torch.equal(mt_agent.state_dict()[k], v)
    mt_args = dataclasses.replace(c2f.Args(), **{k: v for k, v in ckpt["args"].items() if k in c2f.Args.__dataclass_fields__})
    assert mt_args.unet_width == 4


# --------------------------------------------------------------------------- --resume: replay file, learner state


def _filled_buffer(seed: int, capacity: int = 6, image_size: int = 4, transitions: int = 9) -> c2f.ReplayBuffer:
    """A buffer that has wrapped around (9 transitions in 6 slots), with distinct values everywhere."""
    rng, buffer = np.random.default_rng(seed), c2f.ReplayBuffer(capacity, image_size, 6)
    prev = buffer.add_observation(_obs(image_size, seed), 0, 10)
    for i in range(transitions):
        nxt = buffer.add_observation(_obs(image_size, seed + i + 1), i + 1, 10)
        buffer.add(prev, rng.integers(0, [4096, 4096, 72, 72, 72, 2]), float(i % 2), i % 3 == 0, nxt, rng.uniform(-1, 1, (1, 3)))
        prev = nxt
    buffer.update_priorities(np.arange(3), rng.uniform(0.1, 2.0, 3))
    return buffer


def test_replay_file_round_trip_and_bad_files(tmp_path):
    buffers = [_filled_buffer(0), _filled_buffer(1, transitions=2)]
    assert buffers[0].size == 6 and buffers[0].obs_size == 10 and buffers[1].obs_size == 3
    path = str(tmp_path / rlb.REPLAY)
    rlb.save_replay(path, buffers, global_step=42)
    assert sorted(os.listdir(tmp_path)) == [rlb.REPLAY]  # no temporary file left behind
    loaded = [c2f.ReplayBuffer(6, 4, 6), c2f.ReplayBuffer(6, 4, 6)]
    assert rlb.load_replay(path, loaded) == 42
    for b, c in zip(buffers, loaded):
        assert (b.size, b.pos, b.obs_size, b.obs_pos) == (c.size, c.pos, c.obs_size, c.obs_pos)
        for name in rlb.OBS_ARRAYS:
            np.testing.assert_array_equal(getattr(b, name)[:b.obs_size], getattr(c, name)[:c.obs_size])
        for name in rlb.TRANSITION_ARRAYS:
            np.testing.assert_array_equal(getattr(b, name)[:b.size], getattr(c, name)[:c.size])
        idx = np.arange(b.size)
        for x, y in zip(b.batch(idx), c.batch(idx)):
            np.testing.assert_array_equal(x, y)
    # another run's shapes, another number of tasks, a truncated file: one line naming the file and the way out
    for fresh in ([c2f.ReplayBuffer(6, 8, 6), c2f.ReplayBuffer(6, 8, 6)], [c2f.ReplayBuffer(6, 4, 6)]):
        with pytest.raises(c2f.TaskError, match="replay.npz does not fit this run .*remove it to resume without it"):
            rlb.load_replay(path, fresh)
    with open(path, "r+b") as f:
        f.truncate(200)
    with pytest.raises(c2f.TaskError) as error:
        rlb.load_replay(path, [c2f.ReplayBuffer(6, 4, 6), c2f.ReplayBuffer(6, 4, 6)])
    assert "\n" not in str(error.value) and path in str(error.value)


def test_replay_file_missing_or_of_another_step_warns_in_one_line(tmp_path, capsys):
    args = c2f.Args(unet_width=4, image_size=16, demos=1, train_tasks=["reach-v3"])
    _, tasks, agent = rlb.setup(args, ["reach-v3"], c2f.check_args, c2f.make_agent)
    try:
        buffers, exact = rlb.make_buffers(args, ["reach-v3"], tasks, agent, c2f.ReplayBuffer,
                                          replay=str(tmp_path / rlb.REPLAY), resume_step=8)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "replay.npz is missing: collecting the demos again" in err[0]
        assert buffers[0].size > 0 and not exact  # the demos, and the episode in progress restarts
        # a replay file of another env step than the checkpoint (killed between the two saves): used, with a warning
        rlb.save_replay(str(tmp_path / rlb.REPLAY), buffers, global_step=4)
        for step, warned in ((8, True), (4, False)):
            loaded, exact = rlb.make_buffers(args, ["reach-v3"], tasks, agent, c2f.ReplayBuffer,
                                             replay=str(tmp_path / rlb.REPLAY), resume_step=step)
            assert loaded[0].size == buffers[0].size and exact == (not warned)
            err = capsys.readouterr().err.strip()
            assert ("replay.npz is of env step 4, the checkpoint of env step 8" in err) == warned
    finally:
        tasks[0].close()


@pytest.mark.parametrize("module, learner_class", [(c2f, "C2FARMLearner"), (reptile, "ReptileLearner"),
                                                   (pearl, "PEARLLearner")])
def test_learner_state_restores_exactly_and_refuses_another_network(module, learner_class, tmp_path):
    """A checkpoint's learner state (networks, optimizer, sampling generator, global random states)
    continues the updates bit for bit; a checkpoint of another network size is a one-line TaskError."""
    def make(width=4):
        args = module.Args(unet_width=width, image_size=4, batch_size=4, train_tasks=["reach-v3"])
        agent = module.make_agent(args, getattr(args, "latent_size", 0))
        return getattr(module, learner_class)(agent, [_filled_buffer(3)], args, torch.device("cpu"))

    torch.manual_seed(0)
    a = make()
    a.update(1)
    path = str(tmp_path / "checkpoint.pt")
    rlb.save_checkpoint(path, module.SCRIPT, module.METHOD, a.args, a, ["reach-v3"], 1, loop={"finished": False})
    ckpt = load_resume(str(tmp_path), module.__name__, dataclasses.asdict(a.args), rlb.RESUME_FREE)
    b = make()
    b.buffers = [_filled_buffer(3)]  # the same replay (in a run: from replay.npz)
    b.buffers[0].priority[:] = a.buffers[0].priority
    assert rlb.restore(b, ckpt, path) == {"finished": False}
    for learner in (a, b):  # one process: both continue from the checkpoint's global random state
        set_rng_state(ckpt["rng"])
        learner.update(2)
    for x, y in zip(list(a.model.state_dict().values()) + list(a.target.state_dict().values()),
                    list(b.model.state_dict().values()) + list(b.target.state_dict().values())):
        assert torch.equal(x, y)
    with pytest.raises(rlb.TaskError, match="does not fit this run: .*size mismatch"):
        rlb.restore(make(width=8), ckpt, path)
    with pytest.raises(SystemExit, match="--batch-size is 8 here but 4 in .*pass the run's own flags"):
        load_resume(str(tmp_path), module.__name__, dataclasses.asdict(dataclasses.replace(a.args, batch_size=8)),
                    rlb.RESUME_FREE)
    free = dataclasses.replace(a.args, checkpoint_interval=7, replay_save_interval=0, torch_threads=2)
    load_resume(str(tmp_path), module.__name__, dataclasses.asdict(free), rlb.RESUME_FREE)  # may change


class ScriptedTask:
    """A stand-in task whose episode succeeds at step `succeed_at` (None: never) and ends at success."""

    def __init__(self, succeed_at):
        self.succeed_at, self.t, self.resets = succeed_at, 0, 0

    def reset(self):
        self.t, self.resets = 0, self.resets + 1
        return None, ("obs", 0)

    def step(self, pose):
        self.t += 1
        success = self.t == self.succeed_at
        return ("obs", self.t), float(success), success


def test_success_rate_counts_every_task_and_episode():
    tasks = [ScriptedTask(2), ScriptedTask(None), ScriptedTask(5)]  # 5 is past the 4-step episodes: a failure
    calls = []
    rate, episodes = rlb.evaluate_success(tasks, lambda obs, t, i: calls.append((obs, t, i)) or np.zeros(8), 3, 4)
    assert (rate, episodes) == (1 / 3, 9)
    assert [task.resets for task in tasks] == [3, 3, 3]
    assert calls[:3] == [(("obs", 0), 0, 0), (("obs", 1), 1, 0), (("obs", 0), 0, 0)]  # the first ends at its success
    assert len(calls) == 3 * 2 + 3 * 4 + 3 * 4
    assert rlb.evaluate_success(tasks, lambda obs, t, i: np.zeros(8), 3, 4, stop=True) is None


def test_metaworld_demo_replays_through_action_interface():
    """A scripted reach demo: one keypoint (the last frame); executing it as an 8-D next-best
    pose from the demo's initial scene succeeds, as does its voxel-discretized version."""
    task = c2f.make_task("metaworld", "reach-v3", image_size=16, seed=3)
    try:
        (demo,) = task.get_demos(1, frames=lambda d: [0, len(d) - 1])
        assert demo[0].front_rgb is not None and demo[1].front_rgb is None  # only requested frames rendered
        assert rlb.discover_keypoints(demo) == [len(demo) - 1]
        agent = c2f.make_agent(c2f.Args(unet_width=4))
        pose = np.concatenate([demo[-1].gripper_pose, [demo[-1].gripper_open]])
        for action in (pose, agent.decode_action(agent.encode_pose(pose[:7], pose[7]))):
            task.reset_to_demo(demo)
            assert task.step(action)[1:] == (1.0, True)
    finally:
        task.close()


def test_multitask_batch_has_an_equal_share_per_task():
    args = c2f.Args(unet_width=4, image_size=4, batch_size=6)
    agent = c2f.make_agent(args)
    buffers = [c2f.ReplayBuffer(10, 4, 6), c2f.ReplayBuffer(10, 4, 6)]
    obs = _frame((0, 0.6, 0.1), 1, 0.0)
    obs.front_rgb, obs.front_point_cloud = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)
    for task_id, buffer in enumerate(buffers):
        for _ in range(5):
            i = buffer.add_observation(obs, 0, 10)
            buffer.add(i, np.zeros(6, np.int64), float(task_id), False, i)
    learner = c2f.C2FARMLearner(agent, buffers, args, torch.device("cpu"))
    batch, shares = learner.sample([0, 1], 3)
    assert batch.reward.tolist() == [0, 0, 0, 1, 1, 1]
    assert [t for t, _ in shares] == [0, 1] and batch.weight.shape == (6,)
    logs = learner.update(0)  # batch_size 6 over two tasks: 3 from each
    assert np.isfinite(logs["losses/td_loss"])


@pytest.mark.parametrize("module", [c2f, reptile, pearl])
@pytest.mark.parametrize("change, message", [
    (dict(batch_size=0), "--batch-size must be at least 1 (got 0)"),
    (dict(voxel_size=0), "--voxel-size must be at least 1 (got 0)"),
    (dict(demos=-1), "--demos must be 0 or more (got -1)"),
    (dict(rotation_resolution=0.0), "--rotation-resolution must be in (0, 180] degrees (got 0.0)"),
    (dict(checkpoint_interval=0), "--checkpoint-interval must be at least 1 (got 0)"),
    (dict(checkpoint_interval=-5), "--checkpoint-interval must be at least 1 (got -5)"),
    (dict(replay_save_interval=-1), "--replay-save-interval must be 0 or more (got -1)"),
    (dict(eval_interval=-1), "--eval-interval must be 0 or more (got -1)"),
    (dict(learning_starts=-1), "--learning-starts must be 0 or more (got -1)"),
    (dict(demo_augmentation_every=0), "--demo-augmentation-every must be at least 1 (got 0)"),
    (dict(gamma=1.5), "--gamma must be in [0, 1] (got 1.5)"),
    (dict(epsilon=float("nan")), "--epsilon must be in [0, 1] (got nan)"),
    (dict(tau=0.0), "--tau must be in (0, 1] (got 0.0)"),
    (dict(learning_rate=-1e-4), "--learning-rate must be positive (got -0.0001)"),
    (dict(weight_decay=-1.0), "--weight-decay must be 0 or more (got -1.0)"),
])
def test_settings_that_cannot_run_are_refused(module, change, message):
    with pytest.raises(module.TaskError) as error:
        module.check_args(dataclasses.replace(module.Args(), **change))
    assert str(error.value) == message
    module.check_args(module.Args())  # the defaults pass


@pytest.mark.parametrize("module, change, message", [
    (reptile, dict(reptile_eps_start=1.5), "--reptile-eps-start must be in [0, 1] (got 1.5)"),
    (reptile, dict(reptile_k=0), "--reptile-k must be at least 1 (got 0)"),
    (pearl, dict(kl_weight=-1.0), "--kl-weight must be 0 or more (got -1.0)"),
    (pearl, dict(context_window=2), "--context-window (2) must hold --context-size (3) transitions"),
])
def test_method_settings_that_cannot_run_are_refused(module, change, message):
    with pytest.raises(module.TaskError) as error:
        module.check_args(dataclasses.replace(module.Args(), **change))
    assert str(error.value) == message


# --------------------------------------------------------------------------- the three scripts


SHARED = ("conv3d", "dense", "_init", "Inception3D", "spatial_softmax", "QAttentionNet", "C2FARM", "make_agent", "Batch",
          "ReplayBuffer", "C2FARMLearner", "train")


@pytest.mark.parametrize("name", SHARED)
def test_shared_pieces_are_identical(name):
    """One file per algorithm (CleanRL): the C2F-ARM code repeated in the three scripts stays identical."""
    import inspect

    sources = [inspect.getsource(getattr(m, name)) for m in (c2f, reptile, pearl)]
    assert sources[0] == sources[1] == sources[2], f"{name} differs between the C2F-ARM scripts"


@pytest.mark.parametrize("module", [c2f, reptile, pearl], ids=["mt", "reptile", "pearl"])
def test_scripts_are_short_and_open_on_the_algorithm(module):
    import inspect

    lines = inspect.getsource(module).splitlines()
    assert len(lines) <= 700
    first_network_line = min(i for i, line in enumerate(lines) if line.startswith("def conv3d"))
    assert first_network_line < len(lines) / 3


@pytest.mark.parametrize("module", [c2f, reptile, pearl])
def test_every_args_field_has_a_docstring(module):
    """tyro shows a field's docstring as its --help text: every flag must have one."""
    import ast
    import inspect

    documented = set()
    for cls in filter(dataclasses.is_dataclass, module.Args.__mro__):  # Args and the run's flags (RunArgs)
        body = ast.parse(inspect.getsource(cls)).body[0].body
        documented |= {node.target.id for node, after in zip(body, body[1:] + [None])
                       if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                       and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)}
    missing = [f.name for f in dataclasses.fields(module.Args) if f.name not in documented]
    assert not missing, f"{module.__name__}.Args fields without a docstring: {missing}"


# --------------------------------------------------------------------------- the ARM agent: act, loss, optimizer


def _obs(size=4, seed=0):
    rng = np.random.default_rng(seed)
    obs = _frame((0.0, 0.6, 0.1), 1, 0.0)
    obs.front_rgb = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
    obs.front_point_cloud = rng.uniform(-0.3, 0.9, (size, size, 3)).astype(np.float32)
    return obs


def test_act_is_greedy_by_default_and_draws_no_random_numbers():
    args = c2f.Args(unet_width=4, image_size=4)
    assert args.exploration == "greedy"  # ARM: QAttentionAgent.act forces deterministic = True
    agent = c2f.make_agent(args)
    learner = c2f.C2FARMLearner(agent, [c2f.ReplayBuffer(4, 4, 6)], args, torch.device("cpu"))
    obs = _obs()
    state = learner.rng.bit_generator.state
    a1, a2 = learner.act(obs, 0, 0, explore=True), learner.act(obs, 0, 0, explore=False)
    assert learner.rng.bit_generator.state == state  # no randomness unless --exploration asks for it
    np.testing.assert_array_equal(a1, a2)
    voxels, rot_grip = agent(*rlb.obs_tensors(obs, 0, args, "cpu"))
    np.testing.assert_array_equal(a1, np.concatenate([voxels[0].numpy(), agent.greedy_rot_grip(rot_grip)[0].numpy()]))


class _FixedRng:
    """Stands in for numpy's Generator with the draws a test prescribes."""

    def __init__(self, normal=(), random=(), integers=()):
        self.normals, self.randoms, self.ints = list(normal), list(random), list(integers)

    def normal(self, loc, scale, size):
        return np.array(self.normals.pop(0))

    def random(self):
        return self.randoms.pop(0)

    def integers(self, n):
        return self.ints.pop(0)


def test_gaussian_exploration_follows_arm():
    args = c2f.Args(unet_width=4, image_size=4, exploration="gaussian")
    learner = c2f.C2FARMLearner(c2f.make_agent(args), [c2f.ReplayBuffer(4, 4, 6)], args, torch.device("cpu"))
    # voxel (3, 1, 14) + round(0.4, -1.6, 2.0) = (3, -1, 16) -> clamped to (3, 0, 15)
    learner.rng = _FixedRng(normal=[[0.4, -1.6, 2.0]])
    out = learner.explore_voxel(torch.tensor([3 * 256 + 1 * 16 + 14]), "gaussian")
    assert out.tolist() == [3 * 256 + 0 * 16 + 15]
    # rotation bins (10, 0, 71) + round(0.6, -0.7, 1.2) = (11, -1, 72) -> (11, 0, 71); gripper redrawn (0.1 < 0.2) as 0
    learner.rng = _FixedRng(normal=[[0.6, -0.7, 1.2]], random=[0.1], integers=[0])
    assert learner.explore_rot_grip(np.array([10, 0, 71, 1]), "gaussian").tolist() == [11, 0, 71, 0]
    learner.rng = _FixedRng(normal=[[0.0, 0.0, 0.0]], random=[0.5])  # 0.5 >= 0.2: the gripper stays
    assert learner.explore_rot_grip(np.array([10, 0, 71, 1]), "gaussian").tolist() == [10, 0, 71, 1]
    # epsilon: heads whose draw is below epsilon (0.1) are redrawn
    learner.rng = _FixedRng(random=[0.05, 0.5, 0.5, 0.01], integers=[7, 0])
    assert learner.explore_rot_grip(np.array([10, 0, 71, 1]), "epsilon").tolist() == [7, 0, 71, 0]


class _StubQNet(torch.nn.Module):
    """A Q-attention net whose outputs are parameters, the same for every sample."""

    def __init__(self, q, rot_grip=None):
        super().__init__()
        self.q = torch.nn.Parameter(torch.tensor(q))
        self.rot_grip = None if rot_grip is None else torch.nn.Parameter(torch.tensor(rot_grip))

    def forward(self, grid, lowdim, latent=None):
        b = grid.shape[0]
        return self.q.expand(b, -1), None if self.rot_grip is None else self.rot_grip.expand(b, -1)


def _stub_learner(depths=1, **arg_changes):
    args = c2f.Args(unet_width=4, image_size=2, voxel_size=2, depths=depths, rotation_resolution=120.0, **arg_changes)
    agent = c2f.make_agent(args)  # 2^3 = 8 voxels, 3 rotation bins per axis
    online_q = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]  # online argmax: voxel 7
    online_rg = [0.0, 0.9, 0.0, 0.0, 0.0, 0.9, 0.9, 0.0, 0.0, 0.0, 0.9]  # greedy rotations (1, 2, 0), gripper 1
    agent.qnets = torch.nn.ModuleList(
        [_StubQNet(online_q, online_rg if d == depths - 1 else None) for d in range(depths)])
    learner = c2f.C2FARMLearner(agent, [c2f.ReplayBuffer(4, 2, depths + 4)], args, torch.device("cpu"))
    target_q = [0.3] * 7 + [-0.2]  # the target network values the online choice (voxel 7) at -0.2
    target_rg = [0.0, -0.4, 0.0, 0.0, 0.0, -0.6, -0.2, 0.0, 0.0, 0.0, -0.6]
    learner.target.qnets = torch.nn.ModuleList(
        [_StubQNet(target_q, target_rg if d == depths - 1 else None) for d in range(depths)]).requires_grad_(False)
    return learner


def _batch(n, depths, action, reward, done, weight, next_attention=None, shift=None, next_shift=None):
    z = np.zeros((n, 2, 2, 3))
    no_shift = np.zeros((n, depths - 1, 3), np.float32)
    return c2f.Batch(z.astype(np.uint8), z.astype(np.float16), np.zeros((n, 11), np.float32),
                     np.array(action, np.int64), np.array(reward, np.float32), np.array(done, np.float32),
                     z.astype(np.uint8), z.astype(np.float16), np.zeros((n, 11), np.float32),
                     no_shift if shift is None else np.array(shift, np.float32),
                     np.full((n, depths), -1, np.int64) if next_attention is None else np.array(next_attention),
                     no_shift if next_shift is None else np.array(next_shift, np.float32),
                     np.array(weight, np.float32))


def test_loss_regulariser_and_clamped_target_on_a_hand_made_batch():
    learner = _stub_learner()
    # target: mean of the target network at the online choice, voxel 7 and heads (1, 2, 0, 1):
    # (-0.2 - 0.4 - 0.6 - 0.2 - 0.6) / 5 = -0.4
    # y = max(0, r + 0.99 (1 - done) (-0.4)): r 0 -> 0 (clamped), r 1 done -> 1, r 0.5 -> 0.104
    y = np.array([0.0, 1.0, 0.5 - 0.99 * 0.4])
    action = [[2, 0, 0, 0, 0], [7, 1, 2, 0, 1], [5, 2, 1, 1, 0]]
    # the online Q of the taken heads: voxel q[a], rotation x rg[a], y rg[3 + a], z rg[6 + a], gripper rg[9 + a]
    q_taken = np.array([[0.2, 0.0, 0.0, 0.9, 0.0], [0.7, 0.9, 0.9, 0.9, 0.9], [0.5, 0.0, 0.0, 0.0, 0.0]])
    weight = np.array([1.0, 0.5, 0.25])
    batch = _batch(3, 1, action, [0.0, 1.0, 0.5], [0.0, 1.0, 0.0], weight)
    loss, priorities, logs = learner.loss(batch)
    err = q_taken - y[:, None]
    huber = np.where(np.abs(err) < 1, 0.5 * err**2, np.abs(err) - 0.5).mean(1)
    qreg = 1.0 * np.mean(np.abs([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])) + 1.0 * 3.6 / 11  # L1, trans + rot
    assert loss.item() == pytest.approx(np.mean((huber + qreg) * weight), rel=1e-6)
    np.testing.assert_allclose(priorities, np.abs(err).mean(1), rtol=1e-6)
    assert float(logs["losses/qreg_depth0"]) == pytest.approx(qreg, rel=1e-6)
    # without the regulariser only the Bellman term remains
    learner.args = dataclasses.replace(learner.args, lambda_trans_qreg=0.0, lambda_rot_qreg=0.0)
    assert learner.loss(batch)[0].item() == pytest.approx(np.mean(huber * weight), rel=1e-6)


def test_next_state_zooms_at_its_stored_attention(monkeypatch):
    """Depth 1 of s' is voxelised around the voxel chosen when acting from s' (stored), or the
    online network's choice where none is stored; depth 1 of s around the taken action's voxel."""
    learner = _stub_learner(depths=2)
    seen = []
    monkeypatch.setattr(c2f, "voxelize", lambda p, c, bounds, v: seen.append(bounds.clone()) or torch.zeros(len(p), 10, v, v, v))
    shift = [[[0.01, 0.0, -0.02]], [[0.0, 0.03, 0.0]]]  # crop augmentation of (demo) transitions
    next_shift = [[[0.0, -0.01, 0.0]], [[0.5, 0.5, 0.5]]]  # the second is not stored: ignored
    batch = _batch(2, 2, [[3, 0, 0, 0, 0, 1], [6, 0, 0, 0, 0, 1]], [0, 0], [0, 0], [1, 1],
                   next_attention=[[5, 1], [-1, -1]], shift=shift, next_shift=next_shift)
    learner.loss(batch)
    scene = learner.agent.scene_bounds.expand(2, 6)
    current_d1, next_d1 = seen[2], seen[3]  # order: depth 0 at s, s'; depth 1 at s, s'
    assert len(seen) == 4
    agent = learner.agent
    torch.testing.assert_close(current_d1, rlb.zoom_in(scene, torch.tensor([3, 6]), agent.voxels, agent.zoom,
                                                       torch.tensor(shift)[:, 0]))
    centre = rlb.voxel_centers(torch.tensor([5, 7]), scene, agent.voxels)  # 7: the online argmax
    torch.testing.assert_close(next_d1[:, :3], centre + torch.tensor([[0.0, -0.01, 0.0], [0.0, 0.0, 0.0]]) - 0.12)


def test_optimizer_weight_decay_and_gradient_clipping_by_value():
    learner = _stub_learner()
    assert learner.optimizer.param_groups[0]["weight_decay"] == 1e-6  # ARM lambda_weight_l2
    assert learner.args.grad_clip_value == 0.01  # ARM c2farm/launch_utils.py
    params = list(learner.agent.parameters())
    loss = sum((torch.arange(p.numel()).reshape(p.shape) * 0.003 * p).sum() for p in params)  # grads 0, 0.003, 0.006, ...
    learner.step_optimizer(loss)
    for p in params:
        expected = torch.clamp(torch.arange(p.numel()).reshape(p.shape) * 0.003, max=0.01)
        torch.testing.assert_close(p.grad, expected)


def test_pearl_context_is_drawn_from_the_latest_transitions():
    buffer = _filled_buffer(0)  # 9 transitions into 6 slots: the newest is in slot 2
    np.testing.assert_array_equal(buffer.latest(4), [5, 0, 1, 2])  # oldest first
    np.testing.assert_array_equal(buffer.latest(10), [3, 4, 5, 0, 1, 2])  # no more than it holds
    assert len(c2f.ReplayBuffer(6, 4, 6).latest(3)) == 0
    # a context as large as the window: it must be exactly the window's four transitions, each once
    args = pearl.Args(unet_width=4, image_size=4, context_size=4, context_window=4)
    learner = pearl.PEARLLearner(pearl.make_agent(args, args.latent_size), [buffer, c2f.ReplayBuffer(6, 4, 6)], args,
                                 torch.device("cpu"))
    seen = []
    learner.encoder.forward = lambda rgb, action, reward: seen.append((rgb, reward)) or (torch.zeros(4, 16),
                                                                                         torch.ones(4, 16))
    mu, var = learner.posterior(0)
    window = [5, 0, 1, 2]
    (rgb, reward), = seen
    assert sorted(frame.numpy().tobytes() for frame in rgb) == sorted(
        buffer.rgb[buffer.obs_index[i, 0]].tobytes() for i in window)
    assert sorted(reward.tolist()) == sorted(buffer.reward[window].tolist())
    torch.testing.assert_close((mu, var), (torch.zeros(16), torch.full((16,), 0.25)))  # 4 unit factors: var 1/4
    mu, var = learner.posterior(1)  # no transitions yet: the prior N(0, I)
    torch.testing.assert_close((mu, var), (torch.zeros(16), torch.ones(16)))


def test_pearl_context_action_encoding():
    agent = c2f.C2FARM(tuple(RLB_BOUNDS), 0.15, voxels=16, depths=2, width=4)
    action = agent.encode_pose(np.array([0.005, 0.0, 1.0, 0, 0, 0, 1.0]), gripper_open=1.0)
    action[2:5] = [36, 54, 0]  # rotation angles 0, 90, -180 degrees
    features = pearl.encode_actions(agent, torch.tensor(action)[None])
    # depth-1 voxel centre (0.009375, 0.003125, 0.996875) - (-0.3, -0.5, 0.6), over the 1 m cube
    expected = [0.309375, 0.503125, 0.396875, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 1.0]
    torch.testing.assert_close(features[0], torch.tensor(expected), atol=1e-6, rtol=0)
    assert pearl.ACTION_FEATURES == 10


# --------------------------------------------------------------------------- ARM's Q-attention network


def test_spatial_softmax_expected_positions():
    x = torch.zeros(1, 2, 2, 2, 2)
    x[0, 0, 1, 0, 1] = 1.0  # channel 0 peaks at voxel (1, 0, 1): softmax(x / 0.01) is one-hot to 1e-43
    features = c2f.spatial_softmax(x)
    torch.testing.assert_close(features[0, :3], torch.tensor([1.0, -1.0, 1.0]))  # axes span [-1, 1]
    torch.testing.assert_close(features[0, 3:], torch.zeros(3))  # channel 1 is uniform: the mean position


def test_qattention_network_is_arms():
    net = c2f.QAttentionNet(10, width=64, rot_grip_outputs=3 * 72 + 2)
    inception = net.down1  # 64 -> 128 channels: 1x1 to 64 | 1x1 to 32, 3x3 to 32 | 1x1, 3x3, 3x3 to 32
    assert [inception.one[0].out_channels, inception.three[1][0].out_channels, inception.five[2][0].out_channels] == [
        64, 32, 32]
    assert inception.three[0][0].out_channels == 32  # ARM's inner width 32 at 64 kernels
    assert [net.down0.one[0].in_channels, net.down2.five[2][0].out_channels * 4] == [128, 256]
    dense = [m for m in net.rot_grip.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dense] == [(32 * 64, 128), (128, 128), (128, 218)]
    assert all(m.negative_slope == 0.02 for m in net.modules() if isinstance(m, torch.nn.LeakyReLU))
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in [net.q_trans, net.rot_grip[-1]])  # linear outputs
    assert all(m.padding_mode == "replicate" for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert not any("Norm" in type(m).__name__ for m in net.modules())  # ARM C2FARM.yaml: norm None
    assert c2f.Args().unet_width == 64
    small = c2f.QAttentionNet(10, width=8, latent=3, rot_grip_outputs=218)
    q, rot_grip = small(torch.zeros(2, 10, 16, 16, 16), torch.zeros(2, 11), torch.zeros(2, 3))
    assert q.shape == (2, 4096) and rot_grip.shape == (2, 218)


def test_load_encoder_only_resets_the_q_heads_and_keeps_the_encoder():
    import finetune

    net = c2f.QAttentionNet(10, width=4, rot_grip_outputs=11)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5)
    finetune.reset_q_heads(c2f, net)
    assert (net.down0.one[0].weight == 0.5).all() and (net.final[0].weight == 0.5).all()
    assert not (net.q_trans.weight == 0.5).any() and (net.q_trans.bias == 0).all()
    assert not (net.rot_grip[0][0].weight == 0.5).any() and not (net.rot_grip[-1].weight == 0.5).any()


def test_demo_crop_augmentation():
    """ARM's crop augmentation: a demo transition's depth-1 cube is centred on depth 0's voxel
    centre plus a shift of up to 0.75 x the zoom half-width per axis, and its depth-1 voxel is
    the keypoint's voxel in that shifted cube; the buffer keeps the shift for the loss."""
    args = c2f.Args(image_size=4, unet_width=4)
    assert args.crop_augmentation  # ARM C2FARM.yaml
    demo = synthetic_demo()
    for o in demo:
        o.front_rgb, o.front_point_cloud = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)
    agent = c2f.make_agent(args)
    buffer = c2f.ReplayBuffer(100, 4, 6)
    rlb.add_demos(buffer, agent, [demo], args, np.random.default_rng(0))
    obs_index = buffer.obs_index[0, 0]  # transition 0: frame 0 -> keypoint 10
    shift = buffer.shift[obs_index, 0]
    expected_shift = np.random.default_rng(0).uniform(-0.75 * 0.12, 0.75 * 0.12, (1, 3))[0]
    np.testing.assert_allclose(shift, expected_shift, rtol=1e-6)
    scene = np.array(c2f.SCENE_BOUNDS["metaworld"])
    pose = demo[10].gripper_pose
    depth0 = rlb.point_to_voxel(pose[:3], scene, 16)
    cube = rlb.zoom_bounds(rlb.voxel_to_point(depth0, scene, 16) + expected_shift, 0.12)
    depth1 = rlb.point_to_voxel(pose[:3], cube, 16)
    assert buffer.action[0, 1] == depth1[0] * 256 + depth1[1] * 16 + depth1[2]
    assert buffer.attention[obs_index, 0] == buffer.action[0, 0]
    # agent transitions are not shifted
    i = buffer.add_observation(demo[0], 0, 10)
    buffer.add(i, buffer.action[0], 0.0, False, i)
    assert (buffer.shift[i] == 0).all()


def test_bf16_update_computes_the_fp32_loss_within_bf16_precision():
    """--precision bf16 runs the update's Q-attention passes in bf16 autocast (the speed form measured in
    benchmarks/README.md); on the same batch and weights its loss and priorities match fp32's to bf16's
    precision, and it is really bf16 (the values are not bit-equal)."""
    torch.manual_seed(0)
    args = c2f.Args(unet_width=8, image_size=8, batch_size=6, precision="fp32")
    agent = c2f.make_agent(args)
    buffers = [_filled_buffer(seed, image_size=8) for seed in (3, 4)]
    fp32 = c2f.C2FARMLearner(agent, buffers, args, torch.device("cpu"))
    bf16 = c2f.C2FARMLearner(agent, buffers, dataclasses.replace(args, precision="bf16"), torch.device("cpu"))
    assert (fp32.bf16, bf16.bf16) == (False, True)
    bf16.target.load_state_dict(fp32.target.state_dict())
    batch, _ = fp32.sample([0, 1], 3)
    (loss32, prio32, _), (loss16, prio16, _) = fp32.loss(batch), bf16.loss(batch)
    assert loss32.dtype == loss16.dtype == torch.float32
    assert loss16.item() != loss32.item()
    torch.testing.assert_close(loss16, loss32, rtol=0.03, atol=1e-3)
    np.testing.assert_allclose(prio16, prio32, rtol=0.05, atol=2e-3)

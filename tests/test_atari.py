"""Exact checks of the Atari (DER) pieces that can be wrong quietly. Expected values are worked
out by hand in the comments."""

import ast
import dataclasses
import gc
import inspect
import os
import re
import runpy
import signal
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import finetune  # noqa: E402
import rainbow_mt_atari as mt  # noqa: E402
import rainbow_pearl_atari as pearl  # noqa: E402
import rainbow_reptile_atari as reptile  # noqa: E402
from envs import atari  # noqa: E402

torch.set_num_threads(1)  # the machine may be busy: a second OpenMP thread would wait for a core
SUPPORT = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)  # 5 atoms, spacing 1


# --------------------------------------------------------------------------- C51 projection


def project(probs, ret, disc):
    return mt.project_distribution(torch.tensor([probs], dtype=torch.float64), torch.tensor([ret], dtype=torch.float64),
                                   torch.tensor([disc], dtype=torch.float64), SUPPORT)[0]


def test_projection_splits_mass_between_neighbours():
    # Tz = 0.5 + 0.5 z = [-0.5, 0, 0.5, 1, 1.5], i.e. positions b = [1.5, 2, 2.5, 3, 3.5]:
    # 0.1 -> 0.05/0.05 on atoms 1,2; 0.2 lands on atom 2 exactly; 0.4 -> 0.2/0.2 on 2,3;
    # 0.2 lands on atom 3 exactly; 0.1 -> 0.05/0.05 on 3,4.
    out = project([0.1, 0.2, 0.4, 0.2, 0.1], 0.5, 0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.05, 0.45, 0.45, 0.05], dtype=torch.float64))


def test_projection_terminal_transition_ignores_next_distribution():
    # discount 0 (episode ended): every atom goes to R = 0.75, b = 2.75 -> 0.25 on atom 2, 0.75 on 3
    out = project([0.3, 0.0, 0.0, 0.2, 0.5], 0.75, 0.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.25, 0.75, 0.0], dtype=torch.float64))


def test_projection_l_equals_u_keeps_all_mass():
    # R = 1 exactly on an atom with discount 0: l == u == 3, all mass must stay (a naive
    # (u - b, b - l) split would lose it)
    torch.testing.assert_close(project([0.2] * 5, 1.0, 0.0), torch.tensor([0, 0, 0, 1.0, 0], dtype=torch.float64))
    # clipped at both ends: everything lands on v_max / v_min
    torch.testing.assert_close(project([0.2] * 5, 5.0, 1.0), torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(project([0.2] * 5, -3.0, 0.0), torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("module", [mt, reptile, pearl], ids=["mt", "reptile", "pearl"])
def test_projection_support_end_despite_rounding(module):
    # fp32 support [-1, 1] with 62 atoms: (v_max - v_min) / delta rounds to 61.0000038, so a return
    # at v_max once gave ceil(b) = 62, one past the last atom (an IndexError here, a device-side
    # assert on CUDA). All mass must land on the last atom, and R = v_min on the first.
    support = torch.linspace(-1.0, 1.0, 62)
    for ret, atom in ((1.0, -1), (-1.0, 0)):  # one row each: a spilled index would land in no other row
        probs = torch.zeros(1, 62)
        probs[0, 30] = 1.0  # discount 0: every atom goes to R, so one atom's mass is enough
        out = module.project_distribution(probs, torch.tensor([ret]), torch.zeros(1), support)
        expected = torch.zeros(1, 62)
        expected[0, atom] = 1.0
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_projection_batch_rows_are_independent():
    probs = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1], [0.2] * 5], dtype=torch.float64)
    out = mt.project_distribution(probs, torch.tensor([0.5, 1.0], dtype=torch.float64),
                                  torch.tensor([0.5, 0.0], dtype=torch.float64), SUPPORT)
    torch.testing.assert_close(out[0], project([0.1, 0.2, 0.4, 0.2, 0.1], 0.5, 0.5))
    torch.testing.assert_close(out[1], torch.tensor([0, 0, 0, 1.0, 0], dtype=torch.float64))


# --------------------------------------------------------------------------- n-step returns


def top_left_pixels(obs):
    """(..., 4, 84, 84) observations -> (..., 4): each frame's pixel (0, 0)."""
    return obs[..., 0, 0]


def filled_buffer(rewards, dones, n=3, gamma=0.5, capacity=64):
    buf = mt.ReplayBuffer(capacity, n, gamma, 0.5)
    for t, (r, d) in enumerate(zip(rewards, dones)):
        buf.add(np.full((84, 84), t, np.uint8), t % 4, r, d)
    return buf


def test_nstep_returns_stop_at_episode_end():
    # episode 1: steps 0,1 (done at 1); episode 2: steps 2..7
    buf = filled_buffer([1, 2, 4, 8, 16, 32, 64, 128], [0, 1, 0, 0, 0, 0, 0, 0])
    returns, boot = buf.nstep(np.array([0, 1, 2, 3]))
    # 0: 1 + .5*2 (done at 1, reward 4 belongs to the next episode); 1: 2; 2: 4 + .5*8 + .25*16 = 12
    # 3: 8 + .5*16 + .25*32 = 24; bootstrap gamma^3 = 0.125 only where no episode end in the window
    np.testing.assert_allclose(returns, [2.0, 2.0, 12.0, 24.0])
    np.testing.assert_allclose(boot, [0.0, 0.0, 0.125, 0.125])


def test_nstep_done_on_last_step_of_window():
    buf = filled_buffer([1, 1, 1, 1, 1], [0, 0, 1, 0, 0])
    returns, boot = buf.nstep(np.array([0]))
    np.testing.assert_allclose(returns, [1 + 0.5 + 0.25])
    np.testing.assert_allclose(boot, [0.0])


def test_transition_becomes_sampleable_after_n_more_steps():
    buf = filled_buffer([0] * 5, [0] * 5, n=3)
    # entries 0 and 1 have their 3 successors; 2..4 do not yet
    np.testing.assert_array_equal(buf.tree.get(np.arange(5)) > 0, [True, True, False, False, False])
    batch = buf.sample(16, 0.4)
    assert isinstance(batch, mt.Batch)
    assert set(batch.indices) <= {0, 1}
    np.testing.assert_array_equal(top_left_pixels(batch.next_obs)[:, -1], batch.indices + 3)


def test_multitask_batch_takes_equal_shares_from_distinct_games():
    buffers = [filled_buffer([g] * 10, [0] * 10) for g in range(3)]
    args = mt.Args(batch_size=8, games_per_batch=2)
    rng = np.random.default_rng(0)
    for _ in range(10):
        batch, parts = mt.sample_games(buffers, args, 0.4, rng)
        (g0, n0), (g1, n1) = parts
        assert g0 != g1 and n0 == n1 == 4
        np.testing.assert_array_equal(batch.returns[:4], g0 * (1 + 0.5 + 0.25))  # reward g, n=3, gamma 0.5
        np.testing.assert_array_equal(batch.returns[4:], g1 * (1 + 0.5 + 0.25))
        assert batch.weights.max() == 1.0


# --------------------------------------------------------------------------- sum tree


def test_sum_tree_totals_and_find():
    tree = mt.SumTree(5)  # one block of 64 leaves, 59 unused
    tree.update(np.arange(5), np.array([1.0, 2.0, 3.0, 4.0, 0.0]))
    assert tree.total == 10.0
    # cumulative intervals: leaf0 [0,1), leaf1 [1,3), leaf2 [3,6), leaf3 [6,10)
    values = [0.0, 0.99, 1.0, 2.99, 3.0, 5.99, 6.0, 9.99]
    np.testing.assert_array_equal(tree.find(values), [0, 0, 1, 1, 2, 2, 3, 3])
    tree.update(np.array([2]), np.array([0.5]))
    assert tree.total == 7.5
    assert tree.total == tree.leaves.sum() == tree.levels[1].sum()
    np.testing.assert_array_equal(tree.find([3.0, 3.49, 3.5]), [2, 2, 3])


def test_sum_tree_never_returns_an_empty_leaf():
    tree = mt.SumTree(8)
    tree.update(np.arange(8), np.array([1.0, 1.0, 1.0, 0, 0, 0, 0, 0]))
    # values at or past the total (float round-off) fall back to the last nonzero leaf, never 3..7
    np.testing.assert_array_equal(tree.find([2.5, 3.0, 3.5]), [2, 2, 2])


def assert_levels_sum_their_children(tree):
    for level, below in zip(tree.levels[:-1], tree.levels[1:]):
        sums = below.reshape(-1, 64).sum(1)
        np.testing.assert_array_equal(level[:len(sums)], sums)
        assert not level[len(sums):].any()  # padding nodes stay empty


@pytest.mark.parametrize("module", [mt, reptile, pearl], ids=["mt", "reptile", "pearl"])
def test_sum_tree_with_several_levels_matches_a_flat_search(module):
    # 5000 leaves: 5056 padded leaves, 128 nodes, 64 nodes and the root. Each found leaf must be
    # the one a flat cumulative sum puts the value in (searchsorted, side="right"), with runs of
    # empty leaves (a whole block among them) and values at interval ends included
    rng = np.random.default_rng(0)
    tree = module.SumTree(5000)
    assert [len(level) for level in tree.levels] == [1, 64, 128, 5056]
    priorities = np.round(rng.random(5000) * 4) / 4  # quarters: many exact interval ends, many zeros
    priorities[64 * 10:64 * 11] = 0.0
    priorities[4990:] = 0.0
    tree.update(np.arange(5000), priorities)
    assert tree.total == priorities.sum()
    assert_levels_sum_their_children(tree)
    ends = np.cumsum(priorities)
    values = np.concatenate([rng.random(300) * tree.total, ends[rng.integers(0, 4989, 100)]])
    values = values[values < tree.total]
    np.testing.assert_array_equal(tree.find(values), np.searchsorted(ends, values, side="right"))
    assert tree.find([tree.total])[0] == np.flatnonzero(priorities)[-1]  # past the end: the last nonzero leaf
    # a batch update with a repeated index keeps every level the sum of its children
    tree.update(np.array([7, 7, 4000]), np.array([9.0, 9.0, 2.5]))
    assert_levels_sum_their_children(tree)


def test_sum_tree_stratified_sampling_hits_known_leaves():
    tree = mt.SumTree(8)
    tree.update(np.arange(8), np.array([0, 2, 0, 2, 0, 2, 0, 2.0]))
    rng = np.random.default_rng(0)
    # 4 strata of width 2 over [0, 8): each stratum is exactly one nonzero leaf
    for _ in range(20):
        np.testing.assert_array_equal(tree.sample_stratified(4, rng), [1, 3, 5, 7])


def test_sum_tree_sampling_is_proportional():
    tree = mt.SumTree(4)
    tree.update(np.arange(4), np.array([1.0, 0.0, 3.0, 0.0]))
    rng = np.random.default_rng(1)
    # 4 strata of width 1 over [0, 4): the first is leaf 0, the other three leaf 2 -> 1:3
    for _ in range(20):
        np.testing.assert_array_equal(tree.sample_stratified(4, rng), [0, 2, 2, 2])


def test_importance_weights_and_priority_update():
    buf = filled_buffer([0] * 6, [0] * 6, n=2, capacity=16)  # entries 0..3 valid
    buf.update_priorities(np.array([0, 1, 2, 3]), np.array([1.0, 4.0, 9.0, 16.0]))
    # priority = loss ** 0.5 -> 1, 2, 3, 4 (total 10)
    np.testing.assert_allclose(buf.tree.get(np.arange(4)), [1, 2, 3, 4])
    batch = buf.sample(4, beta=1.0)
    # beta = 1: w = 1 / (N P) with N = 4 valid entries, P = p / 10
    np.testing.assert_allclose(batch.weights, 10.0 / (4 * buf.tree.get(batch.indices)))


# --------------------------------------------------------------------------- frame stacks


def test_frame_stack_does_not_leak_across_episodes():
    # episode A: 5 steps (frames 10..14), episode B: frames 50..54
    buf = mt.ReplayBuffer(32, 2, 0.99, 0.5)
    for t in range(5):
        buf.add(np.full((84, 84), 10 + t, np.uint8), 0, 0.0, t == 4)
    for t in range(5):
        buf.add(np.full((84, 84), 50 + t, np.uint8), 0, 0.0, False)
    obs = top_left_pixels(buf.stacked(np.array([5, 6, 8, 9, 3])))
    # B's first steps see zeros, never A's frames; A's step 3 sees A's frames 10..13
    np.testing.assert_array_equal(obs, [[0, 0, 0, 50], [0, 0, 50, 51], [50, 51, 52, 53], [51, 52, 53, 54],
                                        [10, 11, 12, 13]])


def test_frame_stack_matches_env_across_life_loss_and_wraparound():
    # Breakout: lives are lost quickly under random play; the buffer (small, so it wraps) must
    # rebuild exactly the stacks the env showed, zeros after every episode start included
    env = atari.make_env("Breakout", seed=3, num_actions=18)
    buf = mt.ReplayBuffer(150, 3, 0.99, 0.5)
    rng = np.random.default_rng(0)
    obs, _ = env.reset()
    seen, starts = {}, 0
    for step in range(400):
        a = int(rng.integers(18))
        nxt, r, term, trunc, _ = env.step(a)
        seen[buf.pos] = obs
        buf.add(obs[-1], a, r, term or trunc)
        obs = nxt
        if term or trunc:
            starts += 1
            obs, _ = env.reset()
    assert starts >= 2  # several life losses happened
    live = [(buf.pos - 1 - k) % buf.capacity for k in range(buf.capacity - 4)]  # all but the 4 oldest
    np.testing.assert_array_equal(buf.stacked(np.array(live)), np.stack([seen[i] for i in live]))


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("module", [mt, reptile, pearl], ids=["mt", "reptile", "pearl"])
def test_fast_encoder_equals_the_two_convs(module):
    torch.manual_seed(0)
    encoder = module.Encoder()
    obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    plain = encoder(obs.float() / 255)  # nn.Conv2d, ReLU, nn.Conv2d, ReLU, flatten
    fast = module.fast_encoder(obs, module.encoder_weights(encoder, torch.float32))
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("module", [mt, reptile], ids=["mt", "reptile"])
def test_speed_form_computes_the_plain_network_and_its_gradients(module, mode):
    """fast_forward(obs, step_weights()) (noise added once, 1/255 folded into the first layer)
    computes the plain modules' network, and the gradients reach every mu and sigma."""
    torch.manual_seed(0)
    net = module.QNetwork(6).train(mode == "train")
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    fast = net(obs, module.step_weights(net))
    fast.exp().mul(torch.arange(6.0)[:, None]).sum().backward()
    fast_grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    plain = net(obs)
    plain.exp().mul(torch.arange(6.0)[:, None]).sum().backward()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert bool({k for k in fast_grads if "sigma" in k}) == (mode == "train")  # eval mode: mean weights only
    assert set(fast_grads) == {k for k, p in net.named_parameters() if p.grad is not None}
    for k, p in net.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast_grads[k], p.grad, rtol=1e-4, atol=1e-6)


def test_pearl_speed_form_computes_the_plain_network():
    torch.manual_seed(0)
    agent = pearl.PearlAgent(6, pearl.Args()).eval()
    obs, z = torch.randint(0, 256, (4, 4, 84, 84), dtype=torch.uint8), torch.randn(4, 32)
    plain = agent.q(obs, z), agent.context_encoder(obs, torch.arange(4), torch.ones(4))
    agent.set_speed_form(True, False)
    fast = agent.q(obs, z), agent.context_encoder(obs, torch.arange(4), torch.ones(4))
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_bf16_runs_encoder_and_hidden_layers_only():
    torch.manual_seed(0)
    net = mt.QNetwork(6).eval()
    obs = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    exact = net(obs)
    net.bf16 = True
    weights = mt.step_weights(net)
    bf16, fp32 = torch.bfloat16, torch.float32
    assert {k: (w.dtype, b.dtype) for k, (w, b) in weights.items()} == {
        "conv1": (bf16, bf16), "conv2": (bf16, bf16), "value_hidden": (bf16, bf16),
        "advantage_hidden": (bf16, bf16), "value_out": (fp32, fp32), "advantage_out": (fp32, fp32)}
    assert torch.equal(torch.arange(256.0).to(bf16).float(), torch.arange(256.0))  # raw pixels are exact in bf16
    approx = net(obs, weights)
    assert approx.dtype == fp32
    torch.testing.assert_close(approx.exp(), exact.exp(), rtol=0, atol=1e-4)


def test_the_update_clips_the_gradients_to_one_global_norm():
    """optimize() rescales all gradients together so that their L2 norm is max_grad_norm."""
    torch.manual_seed(0)
    args = dataclasses.replace(mt.Args(), max_grad_norm=1e-3, batch_size=4)
    q_network, target_network = mt.QNetwork(6), mt.QNetwork(6)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=0.0)  # lr 0: the step leaves the gradients to read
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 256, (4, 4, 84, 84), dtype=np.uint8)
    batch = mt.Batch(np.arange(4), obs, np.array([0, 1, 2, 3]), np.ones(4, np.float32), np.full(4, 0.5, np.float32),
                     obs[::-1].copy(), np.ones(4))
    mt.optimize(q_network, target_network, optimizer, batch, args, torch.device("cpu"))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in q_network.parameters()]))
    assert abs(norm.item() - 1e-3) < 1e-8  # the unclipped norm is orders of magnitude larger


def test_network_shapes_and_noisy_eval_mode():
    net = mt.QNetwork(18)
    out = net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8))
    assert out.shape == (2, 18, 51)
    torch.testing.assert_close(out.exp().sum(2), torch.ones(2, 18))
    layer = net.value_hidden
    torch.testing.assert_close(layer.weight_sigma, torch.full_like(layer.weight_sigma, 0.1 / 576**0.5))
    x = torch.randn(3, 576)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ layer.weight_mu.T + layer.bias_mu)


def test_reptile_and_mt_networks_share_state_dict_keys():
    a = mt.QNetwork(18).state_dict()
    b = reptile.QNetwork(18).state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


# --------------------------------------------------------------------------- Reptile


def test_reptile_interpolation_step():
    net = torch.nn.Linear(2, 1, bias=False)
    theta = [torch.tensor([[1.0, 2.0]])]
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 6.0]]))  # phi after the inner loop
    reptile.reptile_step(net, theta, 0.25)  # theta + 0.25 (phi - theta) = [1.5, 3]
    torch.testing.assert_close(net.weight.data, torch.tensor([[1.5, 3.0]]))


def test_reptile_eps_schedule():
    args = reptile.Args(learning_starts=100, total_timesteps=500)
    assert [reptile.reptile_eps(args, s) for s in (50, 100, 300, 500)] == [0.0, 0.0, 0.5, 1.0]
    args = reptile.Args(learning_starts=100, total_timesteps=500, reptile_eps_start=1.0, reptile_eps_end=0.0)
    assert reptile.reptile_eps(args, 200) == 0.75


# --------------------------------------------------------------------------- PEARL


def test_product_of_gaussians():
    mu = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # two factors (rows) over a 2-d latent
    var = torch.tensor([[1.0, 1.0], [1.0, 3.0]])
    m, v = pearl.product_of_gaussians(mu, var)
    # dim 0: precisions 1+1 -> var 1/2, mean (1+3)/2 = 2; dim 1: precision 1+1/3 -> var 3/4,
    # mean 3/4 * (0/1 + 4/3) = 1
    torch.testing.assert_close(m, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(v, torch.tensor([0.5, 0.75]))


def test_kl_to_standard_normal():
    kl = pearl.kl_to_standard_normal(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(kl, torch.tensor([0.0, 0.5]))


def test_pearl_posterior_and_context_window():
    args = pearl.Args(context_size=4, context_window=6)
    buf = pearl.ContextReplayBuffer(32, 3, 0.99, 0.5)
    for t in range(20):
        buf.add(np.full((84, 84), t, np.uint8), t % 18, 1.0, False)
    context = buf.context(args.context_size, args.context_window, "cpu")
    newest = context.obs[:, -1, 0, 0].tolist()  # entry t's newest frame is all t
    assert len(set(newest)) == 4 and set(newest) <= set(range(14, 20))
    assert context.actions.tolist() == [t % 18 for t in newest] and context.rewards.tolist() == [1.0] * 4
    few = pearl.ContextReplayBuffer(32, 3, 0.99, 0.5)
    for t in range(3):
        few.add(np.full((84, 84), t, np.uint8), t, 0.0, False)
    assert sorted(few.context(10, 100, "cpu").actions.tolist()) == [0, 1, 2]  # no more than there is
    agent = pearl.PearlAgent(18, args)
    mu, var = agent.posterior(context)
    assert mu.shape == var.shape == (32,) and bool((var > 0).all())
    z = pearl.infer_z(agent, None, args, "cpu")
    assert z.shape == (1, 32)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("module", [mt, reptile, pearl])
@pytest.mark.parametrize("change, message", [
    (dict(batch_size=0), "error: --batch-size must be at least 1 (got 0)"),
    (dict(total_timesteps=0), "error: --total-timesteps must be at least 1 (got 0)"),
    (dict(n_step=0), "error: --n-step must be at least 1 (got 0)"),
    (dict(buffer_size=48), "leaves 24 transitions per game; each needs more than --n-step + 4 = 24"),
    (dict(num_atoms=1), "needs --num-atoms >= 2 and --v-min < --v-max (got 1, -10.0, 10.0)"),
])
def test_settings_that_cannot_run_are_refused(module, change, message):
    args = dataclasses.replace(module.Args(games=("Pong", "Breakout")), **change)
    with pytest.raises(SystemExit, match=re.escape(message)):
        module.check_args(args, num_games=2)
    module.check_args(module.Args(games=("Pong", "Breakout")), num_games=2)  # the defaults pass


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("module", [mt, reptile, pearl])
def test_checkpoint_round_trip(module, tmp_path):
    args = module.Args(games=("Pong", "Breakout"))
    net = module.PearlAgent(18, args) if module is pearl else module.QNetwork(18)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    opt.zero_grad()
    obs = torch.zeros(1, 4, 84, 84, dtype=torch.uint8)
    (net.q(obs, torch.zeros(1, 32)) if module is pearl else net(obs)).sum().backward()
    opt.step()  # so the optimizer state holds tensors too
    path = str(tmp_path / "checkpoint.pt")
    method = {mt: "mt", reptile: "reptile", pearl: "pearl"}[module]
    atari.save_checkpoint(path, module.MODULE, args, net, opt, 123, method, ["Pong", "Breakout"], 18)
    ckpt = torch.load(path, weights_only=True)
    assert not os.path.exists(path + ".tmp")
    assert ckpt["format"] == finetune.CHECKPOINT_FORMAT and ckpt["format_version"] == 1
    assert ckpt["module"] == module.__name__ and ckpt["benchmark"] == "atari"
    assert ckpt["method"] == {"rainbow_mt_atari": "mt", "rainbow_reptile_atari": "reptile",
                              "rainbow_pearl_atari": "pearl"}[module.__name__]
    assert ckpt["train_tasks"] == ["Pong", "Breakout"] and ckpt["global_step"] == 123
    assert ckpt["args"]["games"] == ["Pong", "Breakout"] and ckpt["num_actions"] == 18
    state = net.state_dict()
    assert list(ckpt["model"]) == list(state)
    for k in state:
        assert torch.equal(ckpt["model"][k], state[k])
    assert finetune.load_checkpoint(path)["module"] == module.__name__


# --------------------------------------------------------------------------- finetune.py


def test_is_atari_task():
    for name in ("Pong", "MsPacman", "BattleZone", "BeamRider", "ms_pacman", "ALE/Pong-v5"):
        assert finetune.is_atari_task(name), name
    for name in ("10000", "drawer-open-v3", "push_button", "Foo", "MsPacMan2", "boxing-v3", "ALE/Foo-v5"):
        assert not finetune.is_atari_task(name), name


def test_finetuning_keeps_the_checkpoints_agent_settings_but_not_its_machine_settings():
    saved = dataclasses.asdict(mt.Args(batch_size=8, learning_rate=3e-4, torch_threads=1, precision="fp32"))
    args = finetune.script_args(mt, {"args": saved}, ["--n-step", "10"], total_timesteps=100_000)
    assert (args.batch_size, args.learning_rate, args.n_step, args.total_timesteps) == (8, 3e-4, 10, 100_000)
    assert (args.torch_threads, args.precision) == (mt.Args.torch_threads, "auto")


def test_unknown_game_exits_with_one_line():
    with pytest.raises(SystemExit) as e:
        mt.rom_id("NoSuchGame")
    assert str(e.value).startswith("error: unknown Atari game 'NoSuchGame'")
    assert mt.rom_id("BattleZone") == "battle_zone"


def test_training_is_repeatable_with_a_seed(tmp_path):
    states = []
    for run in range(2):
        args = mt.Args(games=("Pong",), total_timesteps=130, learning_starts=100, buffer_size=500, batch_size=8,
                       games_per_batch=1, pad_actions=False, output_dir=str(tmp_path / str(run)), seed=7,
                       torch_threads=1)
        states.append(mt.train(args, ["Pong"], method="scratch").state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def tiny(module, tmp_path, **change):
    """Args for a run of a few env steps (one thread: the machine may be busy)."""
    return dataclasses.replace(module.Args(games=("Pong",), total_timesteps=130, learning_starts=100, buffer_size=500,
                                           batch_size=8, pad_actions=False, output_dir=str(tmp_path), torch_threads=1),
                               **change)


def test_adaptation_evaluates_before_the_first_update(tmp_path):
    points = []
    args = tiny(mt, tmp_path, total_timesteps=60, learning_starts=1000, eval_episodes=2, eval_max_steps=5,
                background_eval=False, games_per_batch=1)
    mt.train(args, ["Pong"], method="scratch", log_eval=lambda *p: points.append(p), eval_every=25)
    assert [(step, episodes) for step, _, episodes in points] == [(0, 2), (25, 2), (50, 2), (60, 2)]


def test_reptile_syncs_the_target_on_env_steps(tmp_path, monkeypatch):
    """Target sync when the env step is a multiple of --target-network-frequency (authors'
    main_mt.py), not every that many inner updates: with k = 5 and frequency 10, learning from
    step 100 to 130, the syncs are at env steps 100, 110, 120, 130 (plus the copy at the start),
    not at every 2nd env step (every 10 inner updates)."""
    steps, syncs = [0], []
    step = reptile.atari.MultiGameEnv.step
    monkeypatch.setattr(reptile.atari.MultiGameEnv, "step", lambda self, a: steps.append(steps[-1] + 1) or step(self, a))
    load = reptile.QNetwork.load_state_dict
    monkeypatch.setattr(reptile.QNetwork, "load_state_dict", lambda self, *a, **k: syncs.append(steps[-1]) or load(self, *a, **k))
    reptile.train(tiny(reptile, tmp_path, reptile_k=5, target_network_frequency=10), ["Pong"])
    assert syncs == [0, 100, 110, 120, 130]


def test_reptile_draws_new_noise_every_step_before_learning_starts(tmp_path, monkeypatch):
    draws = []
    reset = reptile.QNetwork.reset_noise
    monkeypatch.setattr(reptile.QNetwork, "reset_noise", lambda self: draws.append(1) or reset(self))
    reptile.train(tiny(reptile, tmp_path, total_timesteps=40), ["Pong"])
    assert len(draws) == 40  # one per env step; no update ran (learning starts at 100)


def test_frozen_encoder_stays_bit_identical_while_the_heads_learn(tmp_path):
    torch.manual_seed(0)
    net = mt.QNetwork(6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    mt.train(tiny(mt, tmp_path / "frozen", freeze_encoder=True, games_per_batch=1), ["Pong"], q_network=net,
             method="finetune")
    after = net.state_dict()
    for k in before:
        if k.startswith("encoder."):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["value_hidden.weight_mu"], after["value_hidden.weight_mu"])
    assert not torch.equal(before["advantage_out.bias_mu"], after["advantage_out.bias_mu"])
    net = mt.QNetwork(6)
    conv = net.encoder.conv1.weight.clone()
    mt.train(tiny(mt, tmp_path / "unfrozen", freeze_encoder=True, unfreeze_encoder_at=110, games_per_batch=1), ["Pong"],
             q_network=net, method="finetune")
    assert not torch.equal(conv, net.encoder.conv1.weight)  # trains from step 110 on


def test_pearl_loss_adds_the_kl_unweighted_to_every_sample():
    ce, kl = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 0.5, 1.0])
    w = torch.tensor([1.0, 0.5, 0.25])
    # mean of 1 * (1 + 0.5), 0.5 * (2 + 0.5), 0.25 * (4 + 1) = (1.5 + 1.25 + 1.25) / 3
    torch.testing.assert_close(pearl.pearl_loss(ce, kl, w, 1.0), torch.tensor(4.0 / 3))
    assert pearl.Args().kl_weight == 1.0


# --------------------------------------------------------------------------- resume, stops, bad inputs


@pytest.fixture
def signal_handlers():
    """train() installs StopRequest's handlers; a run that stops leaves them: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def run_until_stopped(module, args, games, monkeypatch, step: int, signum=signal.SIGTERM) -> int:
    """train(), sent `signum` during env step `step` (what a scheduler's SIGTERM does); returns the exit
    code. On return the stopped run's frames are gone, and with them the lock on its folder."""
    env_step, calls = module.atari.MultiGameEnv.step, []

    def step_and_signal(env, action):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return env_step(env, action)

    with monkeypatch.context() as m:
        m.setattr(module.atari.MultiGameEnv, "step", step_and_signal)
        try:
            module.train(args, games)
        except SystemExit as e:
            code = e.code
        else:
            raise AssertionError("the run did not stop")
    gc.collect()
    return code


@pytest.mark.parametrize("module", [mt, reptile, pearl], ids=["mt", "reptile", "pearl"])
def test_resumed_run_ends_with_the_uninterrupted_runs_weights(module, tmp_path, monkeypatch, signal_handlers):
    """SIGTERM at env step 120 (learning since 100, two games, a target sync at 125), then --resume to
    140: bit for bit the weights of one uninterrupted run with the same seed (CPU, no background
    evaluation)."""
    def args(name, **change):
        return tiny(module, tmp_path / name, games=("Pong", "Breakout"), total_timesteps=140, seed=3,
                    target_network_frequency=25, **({"reptile_k": 2} if module is reptile else {}), **change)

    whole = module.train(args("whole"), ["Pong", "Breakout"]).state_dict()
    assert run_until_stopped(module, args("resumed"), ["Pong", "Breakout"], monkeypatch, 120) == 128 + signal.SIGTERM
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 120 and (tmp_path / "resumed" / "replay.npz").exists()
    resumed = module.train(args("resumed", resume=True), ["Pong", "Breakout"]).state_dict()
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []
    assert not (tmp_path / "resumed" / "replay.npz").exists()  # a complete run keeps no replay


def test_resumed_pearl_adaptation_continues_where_it_stopped(tmp_path, monkeypatch, signal_handlers):
    """adapt() (no gradient; z from the new game's context), SIGTERM at env step 35, --resume to 60: the
    same evaluation points, the same final z and env state as one uninterrupted adaptation."""
    torch.manual_seed(0)
    model = pearl.PearlAgent(6, pearl.Args()).state_dict()
    act, training = pearl.act, []
    monkeypatch.setattr(pearl, "act", lambda agent, *a: training.append(agent.training) or act(agent, *a))

    def adapt(name, points, **change):
        # learning_starts 0: only adaptation itself keeps the loop from updating
        args = tiny(pearl, tmp_path / name, total_timesteps=60, save_every=20, eval_episodes=1, eval_max_steps=5,
                    max_episode_steps=15, learning_starts=0, **change)  # a new z from the context every 15 steps
        return pearl.adapt(args, model, "Pong", 6, log_eval=lambda *p: points.append(p), eval_every=20,
                           train_tasks=["Breakout"])

    whole, parts = [], []
    adapt("whole", whole)
    env_step, calls = pearl.atari.AtariEnv.step, []

    def step_and_stop(env, action):  # counts the adaptation's env (life loss ends its episodes), not evaluations'
        calls.append(env.episodic_life)
        if sum(calls) == 35 and env.episodic_life:
            os.kill(os.getpid(), signal.SIGTERM)
        return env_step(env, action)

    with monkeypatch.context() as m:
        m.setattr(pearl.atari.AtariEnv, "step", step_and_stop)
        with pytest.raises(SystemExit):
            adapt("resumed", parts)
    gc.collect()
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["global_step"] == 35
    adapt("resumed", parts, resume=True)
    assert parts == whole and [p[0] for p in whole] == [0, 20, 40, 60]
    ends = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("whole", "resumed")]
    assert ends[0]["train_tasks"] == ["Breakout"] and ends[0]["method"] == "pearl"
    assert all(torch.equal(ends[0]["model"][k], v) for k, v in model.items())  # no gradient step, no noise drawn
    assert training and not any(training)  # acting and evaluating with the mean weights
    assert torch.equal(ends[0]["resume"]["z"], ends[1]["resume"]["z"])
    assert torch.equal(ends[0]["resume"]["env"]["envs"][0]["ale"], ends[1]["resume"]["env"]["envs"][0]["ale"])


def test_a_signal_during_a_periodic_save_stops_at_the_next_step_with_its_replay(tmp_path, monkeypatch,
                                                                                signal_handlers):
    save, saves = atari.save_checkpoint, []

    def save_and_signal(*a, **k):
        save(*a, **k)
        saves.append(1)
        if len(saves) == 1:  # the periodic save at 105: the signal arrives after the step's decision to stop
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(atari, "save_checkpoint", save_and_signal)
    with pytest.raises(SystemExit):
        mt.train(tiny(mt, tmp_path, total_timesteps=150, save_every=105), ["Pong"])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 106
    assert int(np.load(tmp_path / "replay.npz")["global_step"]) == 106


def test_resuming_a_complete_run_says_so_and_removes_only_a_leftover_replay(tmp_path, capsys):
    args = tiny(mt, tmp_path, total_timesteps=110)
    mt.train(args, ["Pong"])
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    (tmp_path / "replay.npz").write_bytes(b"left by a kill after the last checkpoint")
    (tmp_path / "replay.npz.123.tmp").write_bytes(b"a killed save's partial file")
    with pytest.raises(SystemExit) as stopped:
        mt.train(dataclasses.replace(args, resume=True), ["Pong"])
    assert stopped.value.code == 0
    assert f"the run in {tmp_path} is complete (110 env steps): nothing to resume" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    (tmp_path / "replay.npz").write_bytes(b"the run is still finishing: it holds the folder's lock")
    lock = atari.run_dir.open_output_dir(str(tmp_path))
    with pytest.raises(SystemExit):
        mt.train(dataclasses.replace(args, resume=True), ["Pong"])
    lock.close()
    assert (tmp_path / "replay.npz").exists()


def test_an_old_format_adaptation_checkpoint_is_a_one_line_error(tmp_path):
    """PEARL's adaptation had its own loop, whose checkpoint held no target network (nor the loop's
    other state): resuming one says so instead of a KeyError."""
    args = tiny(pearl, tmp_path, total_timesteps=20, save_every=10)
    pearl.train(args, ["Pong"])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["global_step"], ckpt["resume"] = 10, {"env": ckpt["resume"]["env"], "obs": ckpt["resume"]["obs"]}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit, match="is a PEARL adaptation checkpoint of an older format"):
        pearl.train(dataclasses.replace(args, resume=True), ["Pong"])


def test_a_run_stopped_in_its_last_evaluation_resumes_it_then_is_complete(tmp_path):
    """The final checkpoint is written while the last evaluation still runs in the background
    process; once it is logged the checkpoint is written again without it. A run stopped before
    that (here: the checkpoint put back as it was) runs that evaluation on --resume, then is complete."""
    args = tiny(mt, tmp_path, total_timesteps=60, learning_starts=1000, eval_episodes=1, eval_max_steps=5,
                games_per_batch=1, background_eval=True)
    points, resumed = [], []
    mt.train(args, ["Pong"], method="scratch", log_eval=lambda *p: points.append(p), eval_every=30)
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    assert [p[0] for p in points] == [0, 30, 60] and ckpt["resume"]["evaluations"] == []
    ckpt["resume"]["evaluations"] = [{"step": 60, "model": ckpt["model"]}]
    torch.save(ckpt, path)
    args = dataclasses.replace(args, resume=True, background_eval=False)
    mt.train(args, ["Pong"], method="scratch", log_eval=lambda *p: resumed.append(p), eval_every=30)
    assert resumed == [points[-1]]  # the same snapshot and seed: the same score
    assert torch.load(path, weights_only=True)["resume"]["evaluations"] == []
    with pytest.raises(SystemExit) as complete:
        mt.train(args, ["Pong"], method="scratch", log_eval=lambda *p: resumed.append(p), eval_every=30)
    assert complete.value.code == 0 and len(resumed) == 1


def test_resume_without_the_replay_file_refills_before_learning(tmp_path, monkeypatch, capfd, signal_handlers):
    assert run_until_stopped(mt, tiny(mt, tmp_path, total_timesteps=150), ["Pong"], monkeypatch, 110,
                             signal.SIGINT) == 128 + signal.SIGINT
    os.remove(tmp_path / "replay.npz")
    updates = []
    optimize = mt.optimize
    monkeypatch.setattr(mt, "optimize", lambda *a, **k: updates.append(1) or optimize(*a, **k))
    capfd.readouterr()
    mt.train(tiny(mt, tmp_path, total_timesteps=150, resume=True), ["Pong"])
    warning = [line for line in capfd.readouterr().err.splitlines() if "replay" in line]
    assert warning == [f"warning: --resume: {tmp_path / 'replay.npz'} is missing: the replay starts empty and "
                       "learning waits for new transitions"]
    assert updates == []  # learning waits until step 110 + --learning-starts 100, past the budget
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["resume"]["learning_starts"] == 210


def test_replay_file_round_trip_and_older_or_newer_files(tmp_path, capsys):
    buffer = mt.ReplayBuffer(40, 3, 0.9, 0.5, seed=0)
    for i in range(50):  # wraps around: 40 entries, pos 10
        buffer.add(np.full((84, 84), i, np.uint8), i % 4, float(i % 3 - 1), i % 7 == 6)
    buffer.update_priorities(np.array([1, 2]), np.array([4.0, 9.0]))
    buffer.rng.random(3)
    path = str(tmp_path / "replay.npz")
    atari.save_replay(path, [buffer], 50)
    assert os.listdir(tmp_path) == ["replay.npz"]  # no temporary file left

    same = mt.ReplayBuffer(40, 3, 0.9, 0.5, seed=1)
    assert atari.load_replay(path, [same], 50) and capsys.readouterr().err == ""
    for name in atari.REPLAY_FIELDS:
        assert np.array_equal(getattr(same, name), getattr(buffer, name)), name
    assert all(np.array_equal(a, b) for a, b in zip(same.tree.levels, buffer.tree.levels))
    assert (same.pos, same.size, same.next_t, same.tree.max_priority) == (10, 40, 1, 3.0)
    assert np.array_equal(same.rng.random(5), buffer.rng.random(5))  # the same samples from here on

    older = mt.ReplayBuffer(40, 3, 0.9, 0.5)
    assert atari.load_replay(path, [older], 60)  # a checkpoint 10 steps later: the gap ends an episode
    assert older.dones[9] and not buffer.dones[9] and older.next_t == 0
    assert "is from env step 50, the checkpoint from 60: the 10 transitions" in capsys.readouterr().err

    newer = mt.ReplayBuffer(40, 3, 0.9, 0.5)
    assert not atari.load_replay(path, [newer], 45) and newer.size == 0 and newer.tree.total == 0
    assert "is from env step 50, after the checkpoint's 45: the replay starts empty" in capsys.readouterr().err
    assert not atari.load_replay(path, [mt.ReplayBuffer(30, 3, 0.9, 0.5)], 50)
    assert "holds buffers of [40] entries, not [30]" in capsys.readouterr().err


def test_resume_with_other_settings_is_a_one_line_error(tmp_path):
    args = tiny(mt, tmp_path, total_timesteps=20)
    mt.train(args, ["Pong"])
    with pytest.raises(SystemExit, match=re.escape("error: --resume: --n-step is 10 here but 20 in")):
        atari.load_resume(dataclasses.replace(args, resume=True, n_step=10), mt.MODULE)
    with pytest.raises(SystemExit) as complete:  # settings a resume may change pass; the run is complete
        atari.load_resume(dataclasses.replace(args, resume=True, torch_threads=2, save_every=5), mt.MODULE)
    assert complete.value.code == 0
    reptile_args = tiny(reptile, tmp_path, resume=True)
    with pytest.raises(SystemExit, match="is not a resumable checkpoint of rainbow_reptile_atari.py"):
        atari.load_resume(reptile_args, reptile.MODULE)


@pytest.mark.parametrize("script, flags, message", [
    ("rainbow_mt_atari.py", ["--save-every", "0"], "error: --save-every must be at least 1 (got 0)"),
    ("rainbow_mt_atari.py", ["--eval-max-steps", "-1"], "error: --eval-max-steps must be at least 1 (got -1)"),
    ("rainbow_reptile_atari.py", ["--save-replay-every", "-5"],
     "error: --save-replay-every must be at least 1 (got -5)"),
    ("rainbow_reptile_atari.py", ["--learning-starts", "-1"], "error: --learning-starts must be at least 0 (got -1)"),
    ("rainbow_pearl_atari.py", ["--total-timesteps", "0"], "error: --total-timesteps must be at least 1 (got 0)"),
    ("rainbow_pearl_atari.py", ["--gamma", "1.5"], "error: --gamma must be between 0 and 1 (got 1.5)"),
    ("rainbow_mt_atari.py", ["--learning-rate", "-1"], "error: --learning-rate must be above 0 (got -1.0)"),
    ("rainbow_pearl_atari.py", ["--max-grad-norm", "0"], "error: --max-grad-norm must be above 0 (got 0.0)"),
    ("rainbow_reptile_atari.py", ["--adam-eps", "-1e-4"], "error: --adam-eps must be above 0 (got -0.0001)"),
    ("rainbow_mt_atari.py", ["--resume"], "error: --resume needs --output-dir: the directory of the run to continue"),
    ("rainbow_pearl_atari.py", ["--resume", "--output-dir", "{tmp}/none"],
     "error: --resume: --output-dir {tmp}/none holds no checkpoint.pt to continue from"),
    ("rainbow_reptile_atari.py", ["--output-dir", "{tmp}/file"],
     "error: --output-dir {tmp}/file is a file, not a directory"),
])
def test_bad_flags_are_one_line_errors_before_anything_is_created(script, flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a default runs/ would appear
    if "{tmp}/file" in flags:
        (tmp_path / "file").write_text("")
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(sys, "argv", [script, "--games", "Pong", *[f.format(tmp=tmp_path) for f in flags]])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    assert e.value.code == message.format(tmp=tmp_path)
    assert sorted(os.listdir(tmp_path)) == before


def test_script_never_starts_over_a_run(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["rainbow_mt_atari.py", "--games", "Pong", "--output-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "rainbow_mt_atari.py"), run_name="__main__")
    assert e.value.code == (f"error: --output-dir {tmp_path / 'run'} already holds a run (checkpoint.pt); "
                            "pass --resume to continue it, or choose another --output-dir")
    assert os.listdir(tmp_path / "run") == ["checkpoint.pt"]


def fake_checkpoint(path, train_tasks=("Breakout", "DemonAttack")) -> str:
    """A pretrained-looking MT checkpoint of the default network (18 actions), written in a moment."""
    net = mt.QNetwork(18)
    atari.save_checkpoint(str(path), mt.MODULE, mt.Args(games=tuple(train_tasks)), net,
                          torch.optim.Adam(net.parameters()), 1000, "mt", list(train_tasks), 18)
    return str(path)


@pytest.mark.parametrize("flags, message", [
    (["--eval-every", "-1"], "--eval-every must be at least 1 env step (got -1)"),
    (["--eval-every", "0"], "--eval-every must be at least 1 env step (got 0)"),
    (["--save-every", "0"], "error: --save-every must be at least 1 (got 0)"),
    (["--save-replay-every", "-1"], "error: --save-replay-every must be at least 1 (got -1)"),
    (["--total-timesteps", "0"], "error: --total-timesteps must be at least 1 (got 0)"),
])
def test_finetune_bad_flags_are_one_line_errors_before_anything_is_created(flags, message, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "mt.pt")
    for source in (["--scratch", "atari"], ["--checkpoint", ckpt]):
        with pytest.raises((finetune.FinetuneError, SystemExit)) as e:
            finetune.main([*source, "--task", "Pong", *flags, "--output-dir", str(tmp_path / "ft")])
        assert str(e.value.code if isinstance(e.value, SystemExit) else e.value) == message
        assert sorted(os.listdir(tmp_path)) == ["mt.pt"]


def test_finetune_on_a_training_game_warns_in_one_line(tmp_path, monkeypatch, capsys):
    ckpt = fake_checkpoint(tmp_path / "mt.pt")
    monkeypatch.setattr(mt, "train", lambda *a, **k: None)
    finetune.main(["--checkpoint", ckpt, "--task", "Breakout", "--output-dir", str(tmp_path / "ft")])
    assert capsys.readouterr().err.splitlines() == [
        "warning: Breakout is one of the checkpoint's training games (Breakout, DemonAttack), not a held-out game"]
    finetune.main(["--checkpoint", ckpt, "--task", "Pong", "--output-dir", str(tmp_path / "ft2")])
    assert capsys.readouterr().err == ""


def test_finetune_writes_periodic_checkpoints_by_default(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(mt, "train", lambda args, *a, **k: seen.update(args=args))
    finetune.main(["--scratch", "atari", "--task", "Pong", "--output-dir", str(tmp_path / "ft")])
    assert (seen["args"].save_every, seen["args"].save_replay_every, seen["args"].total_timesteps) == (10_000, 10_000,
                                                                                                       100_000)


# --------------------------------------------------------------------------- the copies stay identical

# the plumbing (checkpoints, replay file, settings, background evaluation) is written once, in envs/atari.py
SHARED = ["NoisyLinear", "Encoder", "SumTree", "Batch", "ReplayBuffer", "project_distribution",
          "encoder_weights", "fast_encoder"]
SHARED_MT_REPTILE = ["QNetwork", "dqn_loss", "optimize", "act", "step_weights", "fast_forward"]
SHARED_MT_PEARL = ["sample_games"]


@pytest.mark.parametrize("other, names", [(reptile, SHARED + SHARED_MT_REPTILE), (pearl, SHARED + SHARED_MT_PEARL)],
                         ids=["reptile", "pearl"])
def test_shared_pieces_are_identical_copies(other, names):
    for name in names:
        assert inspect.getsource(getattr(other, name)) == inspect.getsource(getattr(mt, name)), name


@pytest.mark.parametrize("module", [mt, reptile, pearl], ids=["mt", "reptile", "pearl"])
def test_every_args_field_has_a_docstring(module):
    documented = set()
    for cls in filter(dataclasses.is_dataclass, module.Args.__mro__):  # Args and the run's flags (atari.RunArgs)
        body = ast.parse(inspect.getsource(cls)).body[0].body
        documented |= {stmt.target.id for stmt, nxt in zip(body, body[1:])
                       if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                       and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}
    assert [f.name for f in dataclasses.fields(module.Args) if f.name not in documented] == []


@pytest.mark.parametrize("module", [mt, reptile, pearl], ids=["mt", "reptile", "pearl"])
def test_script_opens_on_the_algorithm(module):
    lines = inspect.getsource(module).splitlines()
    assert len(lines) <= 700
    first = next(i for i, line in enumerate(lines) if line.startswith("class NoisyLinear"))
    assert first < len(lines) / 3, (first, len(lines))

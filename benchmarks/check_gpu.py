"""Do the GPU paths compute what the CPU paths compute? Prints relative differences; asserts nothing.

    python benchmarks/check_gpu.py                  # on a machine with CUDA
    python benchmarks/check_gpu.py --device cpu     # the same code paths against themselves

1. DER (rainbow_mt_atari.py): the same network, target network and noise, the plain modules on
   the CPU against the speed form (what training runs) on `--device`; per-sample C51 loss and the
   gradient of every parameter, in fp32 on both and in bf16 on `--device` against fp32 on the CPU. The batch comes from a replay of random frames
   with rewards in {-1, 0, 1}, so returns reach the support's ends (the clamped projection).
2. PPO (ppo_mt_procgen.py): log-probability, entropy and value of the same actions, fp32 and bf16.
3. RolloutPolicy: on CUDA the rollout's policy step is a CUDA graph. Its log-probability, entropy
   and value of the actions it sampled against the eager agent, before and after an in-place
   weight change (the graph must read the parameters in place), and the time of 256 steps each way.

Relative difference: ||x_device - x_cpu|| / ||x_cpu||. fp32 lands near 1e-6; bf16 near 1e-3 to
1e-2 for outputs; for gradients the worst single parameter tensor is shown (small NoisyNet sigma
gradients make it the loosest number).
"""

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_mt_procgen as ppo  # noqa: E402
import rainbow_mt_atari as der  # noqa: E402


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().float().cpu(), ref.detach().float().cpu()
    return float((x - ref).norm() / ref.norm())


def check_der(device: torch.device) -> None:
    rng = np.random.default_rng(0)
    buffer = der.ReplayBuffer(5000, 20, 0.99, 0.5)
    for _ in range(3000):
        buffer.add(rng.integers(0, 256, (84, 84), dtype=np.uint8), int(rng.integers(18)),
                   float(rng.choice([-1, 0, 1])), bool(rng.random() < 0.01))
    batch = buffer.sample(32, 0.4)
    for bf16 in (False, True):
        q, target = der.QNetwork(18), der.QNetwork(18)
        q.reset_noise()
        target.reset_noise()
        q_dev, target_dev = copy.deepcopy(q).to(device), copy.deepcopy(target).to(device)
        q_dev.bf16 = target_dev.bf16 = bf16
        target.reset_noise = target_dev.reset_noise = lambda: None  # dqn_loss draws target noise: keep the shared one
        loss_cpu = der.dqn_loss(q, target, batch, "cpu")
        loss_cpu.mean().backward()
        loss_dev = der.dqn_loss(q_dev, target_dev, batch, device, der.step_weights(q_dev))  # the speed form
        loss_dev.mean().backward()
        worst = max(rel(p_dev.grad, p.grad) for p, p_dev in zip(q.parameters(), q_dev.parameters()))
        print(f"DER, {'bf16' if bf16 else 'fp32'} on {device}: loss {rel(loss_dev, loss_cpu):.1e}, "
              f"worst parameter gradient {worst:.1e}")


def check_ppo(device: torch.device) -> None:
    agent = ppo.Agent()
    agent_dev = copy.deepcopy(agent).to(device)
    obs = torch.randint(0, 256, (64, 64, 64, 3), dtype=torch.uint8)
    actions = torch.randint(0, ppo.NUM_ACTIONS, (64,))
    for bf16 in (False, True):
        agent_dev.encoder.bf16 = bf16
        with torch.no_grad():
            _, logprob, entropy, value = agent.get_action_and_value(obs, actions)
            _, logprob_d, entropy_d, value_d = agent_dev.get_action_and_value(obs.to(device), actions.to(device))
        print(f"PPO, {'bf16' if bf16 else 'fp32'} on {device}: log-prob {rel(logprob_d, logprob):.1e}, "
              f"entropy {rel(entropy_d, entropy):.1e}, value {rel(value_d, value):.1e}")


def check_rollout_policy(device: torch.device) -> None:
    agent = ppo.Agent().to(device)
    agent.encoder.bf16 = ppo.use_bf16("auto", device)
    policy = ppo.RolloutPolicy(agent, 256, device)
    print(f"RolloutPolicy on {device}: {'CUDA graph' if policy.graph is not None else 'eager (no graph off CUDA)'}")
    for round_ in ("fresh weights", "after an in-place weight change"):
        obs = torch.randint(0, 256, (256, 64, 64, 3), dtype=torch.uint8, device=device)
        with torch.inference_mode():
            action, logprob, entropy, value = (t.clone() for t in policy(obs))
            _, logprob_e, entropy_e, value_e = agent.get_action_and_value(obs, action)
        print(f"  {round_}: log-prob {rel(logprob, logprob_e):.1e}, entropy {rel(entropy, entropy_e):.1e}, "
              f"value {rel(value, value_e):.1e}; {action.unique().numel()} distinct actions of {ppo.NUM_ACTIONS}")
        with torch.no_grad():
            for p in agent.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {}
    for name, step in (("policy", lambda: policy(obs)), ("eager", lambda: agent.get_action_and_value(obs))):
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(256):
                step()
        sync()
        times[name] = time.perf_counter() - t0
    print(f"  256 steps of 256 observations: RolloutPolicy {times['policy']:.3f} s, eager {times['eager']:.3f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: torch sees no CUDA device; use --device cpu to run the code paths on the CPU")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    check_der(device)
    check_ppo(device)
    check_rollout_policy(device)


if __name__ == "__main__":
    main()

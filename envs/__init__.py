"""Environments, one module per benchmark, as CleanRL takes its environments from gym wrappers.

The method scripts import them; copying one algorithm means copying its script and its
benchmark's module here: `envs/procgen.py`, `envs/atari.py`, `envs/rlbench.py`.
"""

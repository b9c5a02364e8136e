"""Sweeps from W&B sweep YAMLs: validation, the local controller (state file, W&B's engine, agents,
packed agents) that runs them offline on one machine, and the hand-off to W&B's server and agent."""

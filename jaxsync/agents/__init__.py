"""Agents trained with jaxsync's sync backends: ``rl`` (pure-JAX envs, PPO, DQN), ``gan``."""

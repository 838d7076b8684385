"""Reinforcement-learning agents: pure-JAX environments, PPO and DQN, data-parallel."""

"""Run an RL agent for several seeds at once (``vmap``), time it, and summarise the curves.

Shared by ``experiments/train_rl.py`` (one configuration, JSONL metrics) and
``experiments/bench_rl.py`` (quality and speed tables). A run is one jitted call of
``vmap(train)(keys)``; its compile time is measured apart from the run itself, so env steps/s are
those of the whole training (rollout + update) after compilation.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from jaxsync import ConfigError, check_at_least
from jaxsync.agents.rl import dqn, ppo
from jaxsync.metrics import MetricsWriter, to_python
from jaxsync.parallel.common import param_checksum

AGENTS = {"ppo": (ppo.PPOConfig, ppo.make_train), "dqn": (dqn.DQNConfig, dqn.make_train)}
SOLVED_RETURN = 475.0  # CartPole-v1's reward threshold (Gymnasium registration)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One experiment: an agent config, how many seeds (vmapped) and where to log."""

    agent: str = "ppo"
    agent_cfg: Any = None
    seeds: int = 1
    seed: int = 0
    repeats: int = 1  # timed runs after compilation; steps/s is their median
    log_every: int = 10_000  # env steps between JSONL records
    metrics_file: str | None = None
    # Checkpoints and resume (see checkpointed.py); "steps" are updates (PPO) or iterations
    # (DQN). The guard's settings live in the agent config (max_nonfinite, nan_at_steps).
    workdir: str | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    resume: bool = True
    tensorboard: bool = False
    quiet: bool = True
    # K >= 1: every K updates and at the end, every device must hold the same bits of the state
    # meant to be replicated (jaxsync.replicas; raises ReplicaDivergence). 0: off.
    check_replicas: int = 0

    # What jaxsync.train's workdir helpers read.
    @property
    def steps(self) -> int:
        from jaxsync.agents.rl.checkpointed import num_updates

        return num_updates(self.agent_cfg)

    @property
    def strategy(self) -> str:
        return self.agent_cfg.strategy

    @property
    def max_nonfinite(self) -> int:
        return self.agent_cfg.max_nonfinite


def agent_config(agent: str, **overrides):
    """The agent's config dataclass with ``overrides`` (None values keep the defaults)."""
    if agent not in AGENTS:
        raise ConfigError(f"unknown agent {agent!r}; choose from {sorted(AGENTS)}")
    cls = AGENTS[agent][0]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k, v in overrides.items() if v is not None and k not in fields)
    if unknown:
        raise ConfigError(f"{agent} has no setting(s) {unknown}")
    return cls(**{k: v for k, v in overrides.items() if v is not None})


def compile_train(agent: str, cfg, seeds: int, seed: int = 0):
    """Compile ``train`` for ``seeds`` keys; returns ``(run, compile_s)`` with ``run() ->
    (params, metrics)`` stacked over seeds and blocked until ready."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    keys = jax.random.split(jax.random.PRNGKey(seed), seeds)
    # Seeds are vmapped on one device. Under shard_map on 8 emulated CPU devices the vmapped
    # program hung in XLA's CPU runtime (jax 0.10.2: all threads idle, no rendezvous waiting;
    # 2 devices were fine), so there the compiled single-seed program runs once per seed.
    vmapped = cfg.strategy == "single"
    train = jax.jit(AGENTS[agent][1](cfg, vmap_seeds=vmapped))
    t0 = time.perf_counter()
    compiled = train.lower(keys if vmapped else keys[0]).compile()
    compile_s = time.perf_counter() - t0

    def run():
        if vmapped:
            return jax.block_until_ready(compiled(keys))
        outs = [jax.block_until_ready(compiled(k)) for k in keys]
        return jax.tree.map(lambda *xs: np.stack(xs), *outs)

    return run, compile_s


def run_seeds(agent: str, cfg, seeds: int, seed: int = 0, repeats: int = 1) -> dict:
    """Compile and run ``train`` for ``seeds`` keys; returns curves and timings.

    Returns a dict with ``metrics`` (numpy arrays ``[seeds, updates]``), ``params`` (seed 0),
    ``compile_s``, ``run_s`` (median over ``repeats``), ``env_steps`` (per seed),
    ``env_steps_per_s`` (one training run's throughput) and ``total_env_steps_per_s`` (all seeds
    together; equal to the former when seeds run one after another).
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    run, compile_s = compile_train(agent, cfg, seeds, seed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        params, metrics = run()
        times.append(time.perf_counter() - t0)
    run_s = float(np.median(times))
    metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    env_steps = int(metrics["env_steps"][0, -1])
    vmapped = cfg.strategy == "single"
    return {
        "metrics": metrics,
        "params": jax.tree.map(lambda x: x[0], params),
        "compile_s": compile_s,
        "run_s": run_s,
        "env_steps": env_steps,
        "env_steps_per_s": env_steps * (1 if vmapped else seeds) / run_s,
        "total_env_steps_per_s": env_steps * seeds / run_s,
    }


def first_solved(env_steps, mean_return, threshold: float = SOLVED_RETURN):
    """Env steps at which the 100-episode mean return first reached ``threshold`` (None: never)."""
    hit = np.nonzero(np.nan_to_num(mean_return, nan=-np.inf) >= threshold)[0]
    return int(env_steps[hit[0]]) if hit.size else None


def summarize(result: dict, threshold: float = SOLVED_RETURN) -> dict:
    """Per-seed final / best 100-episode mean return and when each seed first solved the task."""
    m = result["metrics"]
    final = [float(r[-1]) for r in m["mean_return"]]
    solved_at = [
        first_solved(s, r, threshold)
        for s, r in zip(m["env_steps"], m["mean_return"], strict=False)
    ]
    return {
        "final_mean_return": float(np.mean(final)),
        "final_mean_return_per_seed": final,
        "best_mean_return_per_seed": [float(np.nanmax(r)) for r in m["mean_return"]],
        "solved_at_per_seed": solved_at,
        "seeds_solved": sum(s is not None for s in solved_at),
        "env_steps": result["env_steps"],
        "env_steps_per_s": result["env_steps_per_s"],
        "total_env_steps_per_s": result["total_env_steps_per_s"],
        "compile_s": result["compile_s"],
        "run_s": result["run_s"],
        "param_checksum": param_checksum(result["params"]),
    }


def log_records(writer: MetricsWriter, result: dict, log_every: int) -> None:
    """One JSONL record per ``log_every`` env steps: returns of every seed and their mean."""
    m = result["metrics"]
    steps = m["env_steps"][0]
    last = -log_every
    for i, s in enumerate(steps):
        if s - last < log_every and i != len(steps) - 1:
            continue
        last = s
        returns = m["mean_return"][:, i]  # NaN for a seed with no finished episode yet
        rec = {
            "env_steps": int(s),
            "mean_return": float(np.nanmean(returns)) if np.isfinite(returns).any() else None,
            "mean_return_per_seed": returns,
            "episodes": int(m["episodes"][0, i]),
            "loss": float(np.mean(m["loss"][:, i])),
            "env_steps_per_s": result["env_steps_per_s"],  # the whole run's throughput
        }
        writer.write(to_python(rec))


def train_and_log(cfg: RunConfig) -> dict:
    """Run ``cfg`` and write its JSONL metrics, then the summary as the last line.

    One timed run goes through :func:`checkpointed.train_chunked` (checkpoints, resume, the
    non-finite stop); ``repeats`` > 1 times whole compiled runs, without a workdir.
    """
    if cfg.log_every < 1:
        raise ConfigError(f"--log_every must be >= 1, got {cfg.log_every}")
    check_at_least(cfg, ("check_replicas",), 0)
    if cfg.repeats == 1:
        from jaxsync.agents.rl.checkpointed import train_chunked

        return train_chunked(cfg)
    for flag in ("workdir", "check_replicas"):
        if getattr(cfg, flag):
            raise ConfigError(f"--repeats > 1 reruns whole trainings; it cannot use --{flag}")
    result = run_seeds(cfg.agent, cfg.agent_cfg, cfg.seeds, cfg.seed, cfg.repeats)
    summary = {
        "summary": True,
        "agent": cfg.agent,
        "seeds": cfg.seeds,
        "config": dataclasses.asdict(cfg.agent_cfg),
        **summarize(result),
    }
    writer = MetricsWriter(cfg.metrics_file)
    log_records(writer, result, cfg.log_every)
    writer.write(to_python(summary))
    writer.close()
    return summary

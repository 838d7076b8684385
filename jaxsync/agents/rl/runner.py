"""The one RL run path: an agent for several seeds, chunk by chunk in :func:`jaxsync.loop.run`.

The run is the agent's ``make_chunked(cfg)``: a jitted ``init`` and ``run(state, start, n)`` whose
composition over all updates is ``make_train``'s program. The loop runs it chunk by chunk; a chunk
ends at the next multiple of ``checkpoint_every`` (with a workdir), of ``check_replicas``, or at
the last update, so a resumed run replays the uninterrupted run's chunks exactly (same compiled
programs, same inputs: bitwise the same state and metrics). An "update" is a PPO update (rollout
+ epochs × minibatches) or a DQN iteration (every env steps once); ``run.log_every`` counts env
steps.

The checkpoint (the layout of every run) holds the whole runner state of every seed (parameters,
optimizer state with the guard's counters, env states, last observations, return window, RNG key,
DQN's target network and replay buffer) and, as JSON, what the host accumulates: the last record,
the last logged env step, each seed's best return and first solve.

Non-finite guard: ``run.max_nonfinite`` and ``run.nan_at_steps`` are handed to the agent config;
its optimizer runs under ``optax.apply_if_finite`` and the per-update metric
``nonfinite_consecutive`` (optimizer steps skipped in a row, any seed) reaching the limit (PPO:
``max_nonfinite`` whole updates, DQN: ``max_nonfinite`` gradient steps) stops the run with
:class:`jaxsync.runs.NonFiniteError`; the chunk holding that update is dropped.

``repeats`` > 1 (no workdir, no replica check): after the logged run, the compiled chunks run
``repeats − 1`` more times from a fresh state; the throughput is the median over all runs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsync import ConfigError, loop, runs, simclock
from jaxsync.agents.rl import dqn, ppo
from jaxsync.metrics import to_python
from jaxsync.parallel.common import param_checksum

AGENTS = {"ppo": (ppo.PPOConfig, ppo.make_chunked), "dqn": (dqn.DQNConfig, dqn.make_chunked)}
SOLVED_RETURN = 475.0  # CartPole-v1's reward threshold (Gymnasium registration)
GUARD_FIELDS = ("max_nonfinite", "nan_at_steps")  # the run's, handed to the agent config
_COMPILED = {}  # (agent, agent config, vmapped, seeds, chunk length) -> compiled chunk


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """One experiment: an agent config, how many seeds (vmapped) and the run. ``run.steps`` stays
    0: the updates follow from the agent's ``total_steps`` (env steps)."""

    agent: str = "ppo"
    agent_cfg: Any = None
    seeds: int = 1
    repeats: int = 1  # timed runs; steps/s is their median
    cluster: str = ""  # simulated clock (jaxsync.simclock.for_rl): a cluster preset; "" off
    # log_every: env steps between JSONL records; the guard off by default, as in the agents
    # (it changes XLA's fusion, so rounding); train_rl.py's flags default to RunConfig's 10.
    run: runs.RunConfig = runs.RunConfig(steps=0, log_every=10_000, quiet=True, max_nonfinite=0)


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


def num_updates(agent_cfg) -> int:
    return agent_cfg.num_updates if hasattr(agent_cfg, "num_updates") else agent_cfg.num_iters


def steps_per_update(agent_cfg) -> int:
    if hasattr(agent_cfg, "steps_per_update"):
        return agent_cfg.steps_per_update
    return agent_cfg.steps_per_iter


def nonfinite_limit(agent_cfg) -> int:
    """Skipped optimizer steps in a row that stop the run (0: never)."""
    return agent_cfg.max_nonfinite * getattr(agent_cfg, "opt_steps_per_update", 1)


def guarded_agent(cfg: RLConfig):
    """The agent config with the run's guard settings (what the compiled program sees)."""
    return dataclasses.replace(cfg.agent_cfg, **{k: getattr(cfg.run, k) for k in GUARD_FIELDS})


def _identity(config: dict) -> dict:
    agent_cfg = {k: v for k, v in config.get("agent_cfg", {}).items() if k not in GUARD_FIELDS}
    return {
        "agent": config.get("agent"),
        "seeds": config.get("seeds"),
        "seed": config.get("seed"),
        **agent_cfg,
    }


@functools.lru_cache(maxsize=8)
def _chunked(agent: str, agent_cfg, vmapped: bool):
    """One ``Chunked`` per configuration in a process, so repeated runs reuse its compilations."""
    return AGENTS[agent][1](agent_cfg, vmap_seeds=vmapped)


class Seeds:
    """All seeds' states: one vmapped state (one device) or one state per seed (several devices,
    where the seeds of a data-parallel run run one after another; vmapped seeds on several
    devices once hung, from LAPACK's QR in the initialiser, see ``networks.orthogonal``)."""

    def __init__(self, agent: str, agent_cfg, seeds: int, seed: int):
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        self.vmapped = agent_cfg.strategy == "single"
        self.agent = _chunked(agent, agent_cfg, self.vmapped)
        self.keys = jax.random.split(jax.random.PRNGKey(seed), seeds)
        self.cache_key = (agent, agent_cfg, self.vmapped, seeds)
        self.compile_s = 0.0

    def init(self):
        if self.vmapped:
            return self.agent.init(self.keys)
        return [self.agent.init(k) for k in self.keys]

    def _fn(self, state, start, n):
        key = (*self.cache_key, n)
        if key not in _COMPILED:  # compiled ahead, so run times exclude compilation
            t0 = time.perf_counter()
            one = state if self.vmapped else state[0]
            _COMPILED[key] = self.agent.run.lower(one, start, n).compile()
            self.compile_s += time.perf_counter() - t0
        return _COMPILED[key]

    def run(self, state, start: int, n: int):
        """``(state, metrics as numpy [seeds, n], seconds)``."""
        start = jnp.int32(start)
        fn = self._fn(state, start, n)
        t0 = time.perf_counter()
        if self.vmapped:
            state, metrics = jax.block_until_ready(fn(state, start))
        else:
            outs = [jax.block_until_ready(fn(s, start)) for s in state]
            state = [o[0] for o in outs]
            metrics = jax.tree.map(lambda *xs: np.stack(xs), *[o[1] for o in outs])
        seconds = time.perf_counter() - t0
        return state, {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}, seconds

    def check_replicas(self, state) -> None:
        for s in [state] if self.vmapped else state:
            self.agent.check_replicas(s)

    def params0(self, state):
        if self.vmapped:
            return jax.tree.map(lambda x: x[0], self.agent.params(state))
        return self.agent.params(state[0])


def validate(cfg: RLConfig) -> None:
    runs.validate(cfg.run, min_steps=0)
    if cfg.run.steps:
        raise ConfigError("RL counts updates from the agent's --total_steps; leave run.steps at 0")
    if cfg.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {cfg.repeats}")
    if cfg.repeats > 1:
        for flag in ("workdir", "check_replicas"):
            if getattr(cfg.run, flag):
                raise ConfigError(f"--repeats > 1 reruns whole trainings; it cannot use --{flag}")
    if cfg.agent not in AGENTS:
        raise ConfigError(f"unknown agent {cfg.agent!r}; choose from {sorted(AGENTS)}")
    if cfg.cluster:
        simclock.cluster_for_run(cfg.cluster, cfg.agent_cfg.num_devices)


def train_rl(cfg: RLConfig) -> dict:
    """Train ``cfg`` chunk by chunk (checkpoints in ``run.workdir``); JSONL records every
    ``run.log_every`` env steps, then the summary; returns the summary."""
    validate(cfg)
    agent_cfg = guarded_agent(cfg)
    total = num_updates(agent_cfg)
    build = lambda _: _job(cfg, agent_cfg, total)
    return loop.run(cfg, total=total, strategy=agent_cfg.strategy, identity=_identity, build=build)


def _record(metrics, i: int, update: int, rate: float) -> dict:
    returns = metrics["mean_return"][:, i]  # NaN for a seed with no finished episode yet
    rec = {
        "step": update,
        "env_steps": int(metrics["env_steps"][0, i]),
        "mean_return": float(np.nanmean(returns)) if np.isfinite(returns).any() else None,
        "mean_return_per_seed": returns,
        "episodes": int(metrics["episodes"][0, i]),
        "loss": float(np.mean(metrics["loss"][:, i])),
        "env_steps_per_s": rate,
    }
    if "nonfinite_steps" in metrics:
        rec["nonfinite_steps"] = int(np.max(metrics["nonfinite_steps"][:, i]))
    return to_python(rec)


def _accumulate(host: dict, metrics, upto: int, threshold: float = SOLVED_RETURN) -> None:
    """Fold updates ``0 … upto`` of a chunk into each seed's final / best return and first solve."""
    for s in range(metrics["mean_return"].shape[0]):
        curve, steps = metrics["mean_return"][s, : upto + 1], metrics["env_steps"][s, : upto + 1]
        host["final"][s] = None if np.isnan(curve[-1]) else float(curve[-1])
        if np.isfinite(curve).any():
            best = float(np.nanmax(curve))
            host["best"][s] = best if host["best"][s] is None else max(host["best"][s], best)
        hit = np.flatnonzero(np.nan_to_num(curve, nan=-np.inf) >= threshold)
        if host["solved_at"][s] is None and hit.size:
            host["solved_at"][s] = int(steps[hit[0]])


def _records(cfg, host, chunk, first, upto, force, sim=None) -> list[dict]:
    """Records of updates ``first+1 … first+upto+1``: every ``log_every`` env steps since the last
    record, and the last one when ``force`` (the run's last update, or the one that stopped it);
    with a simulated clock ``sim``, each record's ``sim_time`` (seconds after its update)."""
    metrics, out = chunk["metrics"], []
    for i in range(upto + 1):
        env_steps = int(metrics["env_steps"][0, i])
        if env_steps - host["last_logged"] < cfg.run.log_every and not (force and i == upto):
            continue
        host["last_logged"] = env_steps
        host["record"] = _record(metrics, i, first + i + 1, chunk["rate"])
        if sim is not None:
            host["record"]["sim_time"] = sim(first + i + 1)
        out.append(host["record"])
    return out


def _first_stop(limit: int, metrics) -> int | None:
    """Index in the chunk of the first update that reaches the guard's limit (any seed)."""
    run = metrics.get("nonfinite_consecutive")
    if not limit or run is None:
        return None
    hits = np.flatnonzero((run >= limit).any(0))
    return int(hits[0]) if hits.size else None


def _job(cfg: RLConfig, agent_cfg, total: int) -> loop.Job:
    seeds = Seeds(cfg.agent, agent_cfg, cfg.seeds, cfg.run.seed)
    spu, limit = steps_per_update(agent_cfg), nonfinite_limit(agent_cfg)
    per_run = 1 if seeds.vmapped else cfg.seeds  # seeds one after another share the seconds
    clock = {"start": None, "run_s": 0.0, "rate": float("nan")}  # this process's, not carried
    state0 = seeds.init()
    sim = simclock.for_rl(cfg.cluster, agent_cfg, seeds.params0(state0), cfg.run.seed)

    def advance(tree, inputs, first, n):
        clock["start"] = first if clock["start"] is None else clock["start"]
        state, metrics, seconds = seeds.run(tree["state"], first, n)
        clock["run_s"] += seconds
        clock["rate"] = (first + n - clock["start"]) * spu * per_run / clock["run_s"]
        return {"state": state}, {"metrics": metrics, "rate": clock["rate"]}

    def log(tree, chunk, host, first, n, stop, times):
        host = {k: list(v) if isinstance(v, list) else v for k, v in host.items()}
        upto = n - 1 if stop is None else stop
        last = stop is not None or first + n == total
        records = _records(cfg, host, chunk, first, upto, last, sim)
        _accumulate(host, chunk["metrics"], upto)
        return records, host

    def summary(tree, host, times):
        rate, run_s = clock["rate"], clock["run_s"]
        if cfg.repeats > 1:  # no workdir, no replica check: the whole run was one chunk
            again = [seeds.run(seeds.init(), 0, total)[2] for _ in range(1, cfg.repeats)]
            run_s = float(np.median([run_s, *again]))
            rate = total * spu * per_run / run_s
        out = _summary(cfg, agent_cfg, seeds, tree["state"], host, total * spu, run_s, rate)
        return out if sim is None else {**out, "sim_time": sim(total)}

    none = [None] * cfg.seeds
    host = {"record": {}, "last_logged": -cfg.run.log_every, "final": none, "best": none}
    return loop.Job(
        tree={"state": state0},
        host={**host, "solved_at": none},
        advance=advance,
        stop_at=lambda chunk: _first_stop(limit, chunk["metrics"]),
        log=log,
        summary=summary,
        check_replicas=lambda tree: seeds.check_replicas(tree["state"]),
        headline=lambda record: {"mean_return": record["mean_return"] or float("nan")},
    )


def _summary(cfg, agent_cfg, seeds: Seeds, state, host, env_steps, run_s, rate) -> dict:
    nan = lambda v: float("nan") if v is None else v
    final = [nan(v) for v in host["final"]]
    return to_python(
        {
            "summary": True,
            "agent": cfg.agent,
            "seeds": cfg.seeds,
            "config": dataclasses.asdict(agent_cfg),
            "final_mean_return": float(np.mean(final)),
            "final_mean_return_per_seed": final,
            "best_mean_return_per_seed": [nan(v) for v in host["best"]],
            "solved_at_per_seed": host["solved_at"],
            "seeds_solved": sum(s is not None for s in host["solved_at"]),
            "env_steps": env_steps,
            "nonfinite_steps": host["record"].get("nonfinite_steps", 0),
            "env_steps_per_s": rate,
            "total_env_steps_per_s": rate * cfg.seeds / (1 if seeds.vmapped else cfg.seeds),
            "compile_s": seeds.compile_s,
            "run_s": run_s,
            "param_checksum": param_checksum(seeds.params0(state)),
        }
    )

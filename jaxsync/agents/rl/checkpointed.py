"""RL training in chunks of updates: checkpoints, bitwise resume, the non-finite guard, replicas.

The run is the agent's ``make_chunked(cfg)``: a jitted ``init`` and ``run(state, start, n)`` whose
composition over all updates is ``make_train``'s program. The host runs it chunk by chunk; a chunk
ends at the next multiple of ``checkpoint_every`` (with a workdir) or at the last update, so the
boundaries depend only on the update count and a resumed run replays the uninterrupted run's
chunks exactly (same compiled programs, same inputs: bitwise the same state and metrics).

The checkpoint (``jaxsync.checkpoint``, the layout of ``jaxsync.train``) holds the whole runner
state of every seed (parameters, optimizer state with the guard's counters, env states, last
observations, return window, RNG key, DQN's target network and replay buffer) and, as JSON, what
the host accumulates: the last record, the last logged env step, each seed's best return and
first solve. An "update" is a PPO update (rollout + epochs × minibatches) or a DQN iteration
(every env steps once).

Replica check (``check_replicas`` = K): chunks also end at multiples of K, and after each such
chunk and the last one every device's copy of the replicated state is compared bit for bit
(``Chunked.check_replicas``); a difference raises :class:`jaxsync.replicas.ReplicaDivergence`.

Non-finite guard: the agent's optimizer runs under ``optax.apply_if_finite``; the per-update
metric ``nonfinite_consecutive`` (optimizer steps skipped in a row, any seed) reaching the limit
(PPO: ``max_nonfinite`` whole updates, DQN: ``max_nonfinite`` gradient steps) stops the run with
:class:`jaxsync.runs.NonFiniteError`; the chunk holding that update is dropped, so the last
checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsync import ConfigError, runs
from jaxsync.agents.rl import dqn, ppo
from jaxsync.metrics import Progress, to_python
from jaxsync.parallel.common import param_checksum

CHUNKED = {"ppo": ppo.make_chunked, "dqn": dqn.make_chunked}
# Agent-config fields that may change on resume: the guard, not what the state means.
FREE_FIELDS = ("max_nonfinite", "nan_at_steps")
TIMED = ("env_steps_per_s", "total_env_steps_per_s", "compile_s", "run_s")
_COMPILED = {}  # (agent, agent config, vmapped, seeds, chunk length) -> compiled chunk


@functools.lru_cache(maxsize=8)
def _chunked(agent: str, agent_cfg, vmapped: bool):
    """One ``Chunked`` per configuration in a process, so repeated runs reuse its compilations."""
    return CHUNKED[agent](agent_cfg, vmap_seeds=vmapped)


def num_updates(agent_cfg) -> int:
    return agent_cfg.num_updates if hasattr(agent_cfg, "num_updates") else agent_cfg.num_iters


def steps_per_update(agent_cfg) -> int:
    if hasattr(agent_cfg, "steps_per_update"):
        return agent_cfg.steps_per_update
    return agent_cfg.steps_per_iter


def nonfinite_limit(agent_cfg) -> int:
    """Skipped optimizer steps in a row that stop the run (0: never)."""
    return agent_cfg.max_nonfinite * getattr(agent_cfg, "opt_steps_per_update", 1)


def _identity(config: dict) -> dict:
    agent_cfg = {k: v for k, v in config.get("agent_cfg", {}).items() if k not in FREE_FIELDS}
    return {
        "agent": config.get("agent"),
        "seeds": config.get("seeds"),
        "seed": config.get("seed"),
        **agent_cfg,
    }


def _resume_step(cfg, ckpt) -> int:
    """jaxsync.runs' resume checks, with the RL run's identity (agent, seeds, agent config)."""
    return runs.resume_step(cfg, ckpt, _identity)


class _Seeds:
    """All seeds' states: one vmapped state (one device) or one state per seed (several devices:
    vmap inside shard_map hung on emulated CPU devices, see ``runner.compile_train``)."""

    def __init__(self, cfg):
        self.vmapped = cfg.agent_cfg.strategy == "single"
        if cfg.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {cfg.seeds}")
        self.agent = _chunked(cfg.agent, cfg.agent_cfg, self.vmapped)
        self.keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.seeds)
        self.cache_key = (cfg.agent, cfg.agent_cfg, self.vmapped, cfg.seeds)
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


def train_chunked(cfg) -> dict:
    """Train ``cfg`` (a ``runner.RunConfig``) chunk by chunk with checkpoints in ``cfg.workdir``;
    JSONL records every ``log_every`` env steps, then the summary; returns the summary."""
    ckpt = runs.open_workdir(cfg)
    start = _resume_step(cfg, ckpt)
    writers = []
    try:
        seeds = _Seeds(cfg)
        state, carried = seeds.init(), {}
        if start:  # the fresh state is the template: shardings, seed and device layout
            tree, carried = ckpt.restore(start, template={"state": state})
            state = tree["state"]
        writers = runs.open_writers(cfg, start)
        summary = _loop(cfg, seeds, state, start, carried, ckpt, writers)
        writers[0].write(summary)
        return summary
    finally:
        for w in writers:
            w.close()
        if ckpt is not None:
            ckpt.close()


def _next_stop(cfg, done: int, total: int, checkpoints: bool) -> int:
    """The next chunk boundary: a checkpoint, a replica check, or the last update."""
    every = [cfg.check_replicas] + ([cfg.checkpoint_every] if checkpoints else [])
    return min([total] + [(done // k + 1) * k for k in every if k])


def _first_stop(cfg, metrics) -> int | None:
    """Index in the chunk of the first update that reaches the guard's limit (any seed)."""
    limit = nonfinite_limit(cfg.agent_cfg)
    run = metrics.get("nonfinite_consecutive")
    if not limit or run is None:
        return None
    hits = np.flatnonzero((run >= limit).any(0))
    return int(hits[0]) if hits.size else None


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


def _accumulate(acc: dict, metrics, upto: int, threshold: float) -> None:
    """Fold updates ``0 … upto`` of a chunk into each seed's final / best return and first solve."""
    for s in range(metrics["mean_return"].shape[0]):
        curve, steps = metrics["mean_return"][s, : upto + 1], metrics["env_steps"][s, : upto + 1]
        acc["final"][s] = None if np.isnan(curve[-1]) else float(curve[-1])
        if np.isfinite(curve).any():
            best = float(np.nanmax(curve))
            acc["best"][s] = best if acc["best"][s] is None else max(acc["best"][s], best)
        hit = np.flatnonzero(np.nan_to_num(curve, nan=-np.inf) >= threshold)
        if acc["solved_at"][s] is None and hit.size:
            acc["solved_at"][s] = int(steps[hit[0]])


def _log(cfg, acc, metrics, done, upto, force, rate, writers, progress) -> None:
    """Records of updates ``done+1 … done+upto+1``: every ``log_every`` env steps since the last
    record, and the last one when ``force`` (the run's last update, or the one that stopped it)."""
    for i in range(upto + 1):
        update, env_steps = done + i + 1, int(metrics["env_steps"][0, i])
        if env_steps - acc["last"] < cfg.log_every and not (force and i == upto):
            continue
        acc["last"] = env_steps
        acc["record"] = _record(metrics, i, update, rate)
        for w in writers:
            w.write(acc["record"])
        if not cfg.quiet:
            progress.report(update, {"mean_return": acc["record"]["mean_return"] or float("nan")})


def _loop(cfg, seeds: _Seeds, state, start: int, carried: dict, ckpt, writers) -> dict:
    """Updates ``start+1 … total`` chunk by chunk: run, guard, log, checkpoint; the summary."""
    from jaxsync.agents.rl.runner import SOLVED_RETURN

    total, spu = num_updates(cfg.agent_cfg), steps_per_update(cfg.agent_cfg)
    none = [None] * cfg.seeds
    acc = {
        "record": carried.get("record", {}),
        "last": carried.get("last_logged", -cfg.log_every),
        **{k: list(carried.get(k, none)) for k in ("final", "best", "solved_at")},
    }
    progress, done, run_s, rate = Progress(total, start_step=start), start, 0.0, float("nan")
    per_run = 1 if seeds.vmapped else cfg.seeds  # seeds one after another share run_s
    while done < total:
        count = _next_stop(cfg, done, total, ckpt is not None) - done
        new_state, metrics, seconds = seeds.run(state, done, count)
        run_s += seconds
        rate = (done + count - start) * spu * per_run / run_s
        bad = _first_stop(cfg, metrics)
        upto = count - 1 if bad is None else bad
        force = bad is not None or done + count == total
        _log(cfg, acc, metrics, done, upto, force, rate, writers, progress)
        if bad is not None:  # the chunk's state is dropped: the last checkpoint stays the latest
            runs.stop_nonfinite(cfg, ckpt, done + bad + 1, writers)
        _accumulate(acc, metrics, upto, SOLVED_RETURN)
        state, done = new_state, done + count
        if cfg.check_replicas and (done % cfg.check_replicas == 0 or done == total):
            seeds.check_replicas(state)
        if ckpt is not None and (
            done == total or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        ):
            meta = {"config": runs.config_json(cfg), "data_position": done}
            carry = {"record": acc["record"], "last_logged": acc["last"]}
            carry.update({k: acc[k] for k in ("final", "best", "solved_at")})
            ckpt.save(done, {"state": state}, {**meta, **carry})
    return _summary(cfg, seeds, state, acc, total * spu, run_s, rate)


def _summary(cfg, seeds: _Seeds, state, acc: dict, env_steps: int, run_s: float, rate) -> dict:
    nan = lambda v: float("nan") if v is None else v
    final = [nan(v) for v in acc["final"]]
    return to_python(
        {
            "summary": True,
            "agent": cfg.agent,
            "seeds": cfg.seeds,
            "config": dataclasses.asdict(cfg.agent_cfg),
            "final_mean_return": float(np.mean(final)),
            "final_mean_return_per_seed": final,
            "best_mean_return_per_seed": [nan(v) for v in acc["best"]],
            "solved_at_per_seed": acc["solved_at"],
            "seeds_solved": sum(s is not None for s in acc["solved_at"]),
            "env_steps": env_steps,
            "nonfinite_steps": acc["record"].get("nonfinite_steps", 0),
            "env_steps_per_s": rate,
            "total_env_steps_per_s": rate * cfg.seeds / (1 if seeds.vmapped else cfg.seeds),
            "compile_s": seeds.compile_s,
            "run_s": run_s,
            "param_checksum": param_checksum(seeds.params0(state)),
        }
    )

"""The RL benchmark (``experiments/bench_rl.py``): the whole-program timing harness (one jitted
``vmap(train)(keys)`` per configuration, its compile time apart from its run; training runs with
logs and checkpoints go through ``jaxsync.agents.rl.runner.train_rl``), the quality and speed
configurations, curves, and the tables (the report renders the committed JSON of the full-length
runs with them)."""

from __future__ import annotations

import time

from jaxsync.benchmarks import common

QUALITY_HEADERS = [
    "config",
    "reached 475",
    "solved at end",
    "first reached 475 at (env steps)",
    "final mean return",
    "best",
    "env steps/s (all seeds)",
    "compile s",
]
SPEED_HEADERS = [
    "devices",
    "strategy",
    "rollout (dev x envs x steps)",
    "updates",
    "optimizer steps",
    "env steps/s",
    "vs 1 device",
    "run s",
    "compile s",
]


def _quality_row(r: dict) -> list[str]:
    n = len(r["final_mean_return_per_seed"])
    return [
        r["config"],
        f"{r['seeds_solved']}/{n}",
        f"{r['solved_at_end']}/{n}",
        str(r["solved_at_per_seed"]),
        ", ".join(f"{x:.0f}" for x in r["final_mean_return_per_seed"]),
        ", ".join(f"{x:.0f}" for x in r["best_mean_return_per_seed"]),
        f"{r['total_env_steps_per_s']:,.0f}",
        f"{r['compile_s']:.0f}",
    ]


def _speed_row(r: dict) -> list[str]:
    return [
        str(r["devices"]),
        r["strategy"],
        str(r["rollout"]),
        str(r["updates"]),
        str(r["opt_steps"]),
        f"{r['env_steps_per_s']:,.0f}",
        f"{r['vs_1_device']:.2f}",
        f"{r['run_s']:.1f}",
        f"{r['compile_s']:.0f}",
    ]


def markdown_tables(quality: list[dict], speed: list[dict]) -> str:
    """The quality and speed tables of ``experiments/bench_rl.py``'s JSON rows, as markdown."""
    out = []
    if quality:
        rows = [_quality_row(r) for r in quality]
        out.append("\n" + common.markdown_table(QUALITY_HEADERS, rows))
    if speed:
        out.append("\n" + common.markdown_table(SPEED_HEADERS, [_speed_row(r) for r in speed]))
    return "\n".join(out)


SOLVED_RETURN = 475.0  # CartPole-v1's reward threshold (jaxsync.agents.rl.runner's too)


# --- the whole-program timing harness: one jitted ``vmap(train)(keys)`` per configuration, its
# compile time apart from its run (training runs with logs and checkpoints: runner.train_rl) ---


def compile_train(agent: str, cfg, seeds: int, seed: int = 0):
    """Compile ``train`` for ``seeds`` keys; returns ``(run, compile_s)`` with ``run() ->
    (params, metrics)`` stacked over seeds and blocked until ready."""
    import jax
    import numpy as np

    from jaxsync import ConfigError
    from jaxsync.agents.rl import dqn, ppo

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    keys = jax.random.split(jax.random.PRNGKey(seed), seeds)
    # Seeds are vmapped on one device; on several the compiled single-seed program runs once per
    # seed, as train_rl.py does (vmapped seeds there once hung, from LAPACK's QR in the
    # initialiser: see networks.orthogonal).
    vmapped = cfg.strategy == "single"
    make_train = {"ppo": ppo.make_train, "dqn": dqn.make_train}[agent]
    train = jax.jit(make_train(cfg, vmap_seeds=vmapped))
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
    import jax
    import numpy as np

    from jaxsync import ConfigError

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
    import numpy as np

    hit = np.nonzero(np.nan_to_num(mean_return, nan=-np.inf) >= threshold)[0]
    return int(env_steps[hit[0]]) if hit.size else None


def summarize(result: dict, threshold: float = SOLVED_RETURN) -> dict:
    """Per-seed final / best 100-episode mean return and when each seed first solved the task."""
    import numpy as np

    from jaxsync.parallel.common import param_checksum

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


def quality_configs(total_steps):
    from jaxsync.agents.rl import dqn, ppo

    ppo8 = dict(num_devices=8, num_envs=1, num_steps=64, strategy="psum")
    return {
        "ppo 1 dev (4 envs x 128), terminate (PureJaxRL)": (
            "ppo",
            ppo.PPOConfig(total_steps=total_steps, truncation="terminate"),
        ),
        "ppo 1 dev (4 envs x 128), bootstrap": ("ppo", ppo.PPOConfig(total_steps=total_steps)),
        "ppo 8 dev psum (8 x 1 env x 64), bootstrap": (
            "ppo",
            ppo.PPOConfig(total_steps=total_steps, **ppo8),
        ),
        "dqn 1 dev (10 envs), terminate": (
            "dqn",
            dqn.DQNConfig(total_steps=total_steps, truncation="terminate"),
        ),
        "dqn 1 dev (10 envs), bootstrap": ("dqn", dqn.DQNConfig(total_steps=total_steps)),
    }


def run_quality(total_steps, seeds):

    rows, curves = [], {}
    for name, (agent, cfg) in quality_configs(total_steps).items():
        result = run_seeds(agent, cfg, seeds)
        s = summarize(result)
        final = s["final_mean_return_per_seed"]
        m = result["metrics"]
        curves[name] = (m["env_steps"][0].tolist(), m["mean_return"].tolist())
        rows.append(
            {
                "config": name,
                "truncation": cfg.truncation,
                "solved_at_end": sum(r >= SOLVED_RETURN for r in final),
                **{
                    k: s[k]
                    for k in (
                        "seeds_solved",
                        "solved_at_per_seed",
                        "final_mean_return_per_seed",
                        "best_mean_return_per_seed",
                        "total_env_steps_per_s",
                        "compile_s",
                        "run_s",
                    )
                },
            }
        )
        print(f"done: {name}", flush=True)
    return rows, curves


def run_speed(total_steps, devices, repeats):
    """Compile every configuration first, then time them round-robin, so that load from other
    processes on a shared machine falls on all configurations alike; median of ``repeats``."""
    import numpy as np

    from jaxsync.sync import backend_names

    plan = [(1, "single")] + [(n, "psum") for n in devices if n > 1]
    plan += [(max(devices), s) for s in backend_names() if s != "psum" and max(devices) > 1]
    cfgs = [speed_config(total_steps, n, s) for n, s in plan]
    compiled = [compile_train("ppo", cfg, 1) for cfg in cfgs]
    times = [[] for _ in cfgs]
    for _ in range(repeats):
        for i, (run, _) in enumerate(compiled):
            t0 = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - t0)
    rows = []
    for cfg, (_, compile_s), t in zip(cfgs, compiled, times, strict=True):
        run_s = float(np.median(t))
        steps = cfg.num_updates * cfg.steps_per_update
        rows.append(
            {
                "devices": cfg.num_devices,
                "strategy": cfg.strategy,
                "envs": cfg.num_envs * cfg.num_devices,
                "rollout": f"{cfg.num_devices} x {cfg.num_envs} x {cfg.num_steps}",
                "updates": cfg.num_updates,
                "opt_steps": cfg.num_updates * cfg.opt_steps_per_update,
                "env_steps": steps,
                "env_steps_per_s": steps / run_s,
                "run_s": run_s,
                "compile_s": compile_s,
                "run_s_all": t,
            }
        )
    base = rows[0]["env_steps_per_s"]
    for row in rows:
        row["vs_1_device"] = row["env_steps_per_s"] / base
    return rows


GLOBAL_ROLLOUT = 512  # env steps per PPO update in every speed configuration (PureJaxRL's 4 x 128)


def speed_config(total_steps, n, strategy):
    """PPO on ``n`` devices with PureJaxRL's 512-step global rollout: 4 / n envs × 128 steps per
    device while n <= 4, then 1 env × 512 / n steps, so every row takes the same optimizer steps
    (and minibatch size) per env step."""
    from jaxsync import ConfigError
    from jaxsync.agents.rl import ppo

    envs = max(4 // n, 1)
    if GLOBAL_ROLLOUT % (n * envs) or (GLOBAL_ROLLOUT // (n * envs)) % 4:
        raise ConfigError(f"--speed_devices: {n} devices cannot split a 512-step rollout evenly")
    steps = GLOBAL_ROLLOUT // (n * envs)
    return ppo.PPOConfig(
        total_steps=total_steps, num_devices=n, num_envs=envs, num_steps=steps, strategy=strategy
    )


def thin_curves(curves, max_points: int = 500):
    """Every k-th point of each curve (and the last), at most about ``max_points``, for the JSON:
    DQN logs every iteration (50k points per seed at 500k steps)."""
    out = {}
    for name, (steps, returns) in curves.items():
        idx = sorted(set(range(0, len(steps), max(len(steps) // max_points, 1))) | {len(steps) - 1})
        out[name] = ([steps[i] for i in idx], [[r[i] for i in idx] for r in returns])
    return out


def plot_curves(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (name, (steps, returns)) in zip(axes[0], curves.items(), strict=False):
        for i, r in enumerate(returns):
            ax.plot(steps, r, label=f"seed {i}")
        ax.axhline(475, color="k", ls="--", lw=0.8, label="solved (475)")
        ax.set(
            title=name, xlabel="env steps", ylabel="mean return, last 100 episodes", ylim=(0, 520)
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_tables(quality, speed):

    print(markdown_tables(quality, speed))

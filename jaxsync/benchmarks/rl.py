"""The RL benchmark's tables (``experiments/bench_rl.py`` prints them; the report renders the
committed JSON of the full-length runs with them)."""

from __future__ import annotations

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

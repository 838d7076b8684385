"""Rendering BENCHMARKS.md: one markdown section (tables, PNG plots) per benchmark result.

Every number comes from a section's JSON or from the markdown tables its script printed in the
same run, or, for the full-length runs (:data:`jaxsync.benchmarks.suite.FULL_RUNS`), from
committed JSON named beside its table; nothing here holds a measured figure. Published references
(Goyal et al. 2017) are constants in :mod:`jaxsync.benchmarks.scaling` and are labelled as such.
Columns computed from a formula or a fitted model rather than timed say so in their header
("(model)", "(counted)", "(formula)").
"""

from __future__ import annotations

import json
import os
import re

from jaxsync.benchmarks import allreduce, cluster_validation, common, scaling

SCALING_INTRO = (
    "Synchronous data-parallel training step (MLP on the synthetic teacher set, SGD), timed "
    "after warm-up (median of repeats). Strong scaling fixes the global batch, weak scaling the "
    "per-device batch; throughput X in examples/s (from the wall-clock step time), speedup "
    "X_N/X_1, efficiency E = X_N/(N·X_1); the ideal is linear speedup (E = 1). CPU ms is the "
    "process CPU time per step (all threads), which other jobs on a shared machine disturb less "
    "than wall time. **Caveat:** emulated CPU devices "
    "share the host's cores, so more devices add no compute: E below 1 here is the cost of "
    "splitting and synchronising on a shared CPU, not what the same code does on N accelerators."
)
LSR_INTRO = (
    'Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour": scale the '
    "learning rate linearly with the global batch, η = η₀·B/B₀, and warm it up gradually. Every "
    "run trains the same number of epochs; eval error is on the held-out split. The paper's "
    "ResNet-50/ImageNet numbers are beside ours for the shape of the result (flat error up to "
    "large B with warmup), not for their values. Unlike the paper, the warmup starts from 0 "
    "(jaxsync.optim) rather than from η₀, the rate then decays by a cosine rather than in steps, "
    "and the model is a small MLP on a small data set (see Setup) rather than ResNet-50 on "
    "ImageNet."
)


def render_scaling(result, results_dir, report_dir) -> str:
    rows = result.data["rows"]
    modes = [m for m in (scaling.STRONG, scaling.WEAK) if any(r["mode"] == m for r in rows)]
    parts = []
    for mode in modes:
        parts += [f"{mode.capitalize()} scaling:", scaling.scaling_table(rows, mode)]
    png = os.path.join(results_dir, "scaling_speedup.png")
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        sub = [r for r in rows if r["mode"] == mode]
        ns = sorted({r["devices"] for r in sub})
        ax.plot(ns, [n / ns[0] for n in ns], "k:", label="ideal")
        for strat in dict.fromkeys(r["strategy"] for r in sub):
            pts = [r for r in sub if r["strategy"] == strat]
            ax.plot([r["devices"] for r in pts], [r["speedup"] for r in pts], "o-", label=strat)
        ax.set_title(f"{mode} scaling")
        ax.set_xlabel("devices N")
        ax.set_ylabel("throughput speedup X_N / X_1")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    parts.append(f"![speedup versus devices]({common.rel_path(png, report_dir)})")
    return "\n\n".join(parts)


def render_lsr(result, results_dir, report_dir) -> str:
    rows, cfg = result.data["rows"], result.data["config"]
    seeds = sorted({r["seed"] for r in rows})
    n_test = min(r["n_test"] for r in rows)
    setup = (
        f"{cfg['dataset']}, MLP width {cfg['width']}, {cfg['optimizer']}, {cfg['schedule']} "
        f"schedule, {cfg['epochs']} epochs, warmup {cfg['warmup_epochs']} epochs, "
        f"η₀ = {cfg['base_lr']} at B₀ = {cfg['base_batch']}, strategy {cfg['strategy']}; "
        f"seeds {', '.join(map(str, seeds))} (each its own data split and initialisation); "
        f"{n_test} test examples, so one run's error has a resolution of {100 / n_test:.2g} %."
    )
    diverged = [f"B={r['batch']} {r['variant']} (seed {r['seed']})" for r in rows if r["diverged"]]
    ref = common.markdown_table(
        ["global batch", "learning-rate scheme", "top-1 error %"],
        [list(r) for r in scaling.GOYAL_TABLE],
    )
    png = os.path.join(results_dir, "lsr_error.png")
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, _, _ in scaling.LSR_VARIANTS:
        batches = sorted({r["batch"] for r in rows if r["variant"] == name})
        stats = [
            scaling.mean_se(
                scaling.error_percent([r for r in rows if r["variant"] == name and r["batch"] == b])
                or [float("nan")]
            )
            for b in batches
        ]
        ax.errorbar(
            batches,
            [m for m, _ in stats],
            yerr=[e for _, e in stats],
            fmt="o-",
            capsize=3,
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch B")
    ax.set_ylabel(f"test error % (mean ± s.e., {len(seeds)} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return "\n\n".join(
        [
            f"Setup: {setup}",
            f"Measured (test error %, mean ± standard error over {len(seeds)} seeds, lower is "
            "better):",
            scaling.lsr_table(rows),
            "Diverged (non-finite loss): " + (", ".join(diverged) if diverged else "none") + ".",
            "Published, Goyal et al. 2017, Table 1 (ResNet-50, ImageNet, 90 epochs):",
            ref,
            f"![test error versus batch]({common.rel_path(png, report_dir)})",
        ]
    )


# ---------------------------------------------------------------- other sections


_SEPARATOR = re.compile(r"^\|\s*:?-{3,}")


def _is_caption(lines: list[str], i: int) -> bool:
    """A heading (``#``, ``Table``) or a paragraph of one line (blank lines around it, or a
    table right after it); a run of progress lines (``done: ...``) is neither."""
    line = lines[i].strip()
    if not line or line.startswith("|") or line.startswith("wrote "):
        return False
    if line.startswith(("#", "Table")):
        return True
    before = i == 0 or not lines[i - 1].strip()
    after = i + 1 == len(lines) or not lines[i + 1].strip() or lines[i + 1].strip()[:1] == "|"
    return before and after


def printed_tables(stdout: str) -> list[tuple[str, str]]:
    """``(caption, table)`` for every markdown table in ``stdout`` (a header, a ``|---|``
    separator, rows); the caption is the last heading or one-line paragraph above it, or ''."""
    lines = stdout.splitlines()
    out, i, caption = [], 0, ""
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|") and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1].strip()):
            j = i
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            out.append((caption, "\n".join(ln.strip() for ln in lines[i:j])))
            caption, i = "", j
            continue
        if _is_caption(lines, i):
            caption = line.lstrip("#").strip()
        elif line:
            caption = ""  # progress output between a caption and its table: drop the caption
        i += 1
    return out


QUICK_LABEL = "(quick length: not a result)"


def label_columns(table: str, columns, label: str = QUICK_LABEL) -> str:
    """``table`` with every header cell named in ``columns`` followed by ``label``."""
    lines = table.split("\n")
    cells = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    cells = [f"{c} {label}" if c in columns else c for c in cells]
    return "\n".join(["| " + " | ".join(cells) + " |"] + lines[1:])


def render_generic(result, results_dir, report_dir) -> str:
    tables = printed_tables(result.stdout)
    if not tables:
        return "The script printed no markdown table; its JSON is linked above."
    quick = result.mode != "full" and result.section.quick_columns
    parts = []
    for caption, table in tables:
        if caption:
            parts.append(caption if caption.endswith(":") else caption + ":")
        parts.append(label_columns(table, result.section.quick_columns) if quick else table)
    for name in result.section.pngs:
        path = os.path.join(results_dir, name)
        if os.path.exists(path):
            parts.append(f"![{result.section.key}]({common.rel_path(path, report_dir)})")
    return "\n\n".join(parts)


RENDERERS = {
    "allreduce": allreduce.render,
    "cluster_validation": cluster_validation.render,
    "scaling": render_scaling,
    "lsr": render_lsr,
    "generic": render_generic,
}


def render_section(result, results_dir, report_dir) -> str:
    """The markdown of one section: title, intro, how it ran, then its tables or its error."""
    s = result.section
    head = [
        f"## {s.title}",
        s.intro,
        f"Ran `{' '.join(['python', *result.command[1:]])}` in {result.seconds:.0f} s.",
    ]
    if result.mode != "full" and s.quick_note:
        head.append(f"**{result.mode.capitalize()} mode:** {s.quick_note}")
    if result.status != "ok":
        head.append(f"**{result.status.upper()}** — no numbers: `{result.error}`")
        return "\n\n".join(head)
    try:
        body = RENDERERS[s.render](result, results_dir, report_dir)
    except (KeyError, TypeError, ValueError, IndexError) as e:  # a JSON layout we did not expect
        result.status, result.error = "failed", f"could not render its JSON: {e!r}"
        head.append(f"**FAILED** — no numbers: `{result.error}`")
        return "\n\n".join(head)
    json_path = os.path.join(results_dir, s.json_name)
    head.append(f"Raw results: `{common.rel_path(json_path, report_dir)}`.")
    return "\n\n".join(head + [body])


_EMULATION_NOTE = (
    "On emulated CPU devices all devices share the host's cores: absolute times are not hardware "
    'truths; ratios measured in the same run are (see docs/design.md, "Measuring honestly").'
)


# ---------------------------------------------------------------- full-length runs


def render_gan_full(data, json_path, root, report_dir) -> str:
    """The GAN table of a committed ``bench_gan.py`` JSON, by the GAN module's own renderer."""
    from jaxsync.benchmarks import gan as benchmark

    return benchmark.markdown_table(data["rows"])


def render_rl_full(data, json_path, root, report_dir) -> str:
    """The tables of a committed ``bench_rl.py`` JSON, by the RL module's own renderer."""
    from jaxsync.benchmarks.rl import markdown_tables

    tables = printed_tables(markdown_tables(data.get("quality") or [], data.get("speed") or []))
    if not tables:
        raise ValueError(f"{json_path} holds no quality or speed rows")
    parts = []
    for caption, table in tables:
        parts += ([caption] if caption else []) + [table]
    png = json_path.removesuffix(".json") + "_curves.png"
    if os.path.exists(png):
        parts.append(f"![learning curves]({common.rel_path(png, report_dir)})")
    return "\n\n".join(parts)


FULL_RENDERERS = {"gan": render_gan_full, "rl": render_rl_full}


def render_full_run(run, root: str, report_dir: str) -> str:
    """One committed full-length result: title, what it is, the command and JSON path, the table;
    a clear "not yet run" line when the JSON is absent."""
    path = os.path.join(root, run.json_path)
    head = [f"### {run.title}", run.intro]
    if not os.path.exists(path):
        head.append(
            f"**Not yet run:** `{run.json_path}` does not exist; `{run.command}` writes it."
        )
        return "\n\n".join(head)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        command = data.get("command") or run.command
        body = FULL_RENDERERS[run.render](data, path, root, report_dir)
    except (OSError, KeyError, TypeError, ValueError, IndexError) as e:
        head.append(f"**FAILED** to render `{run.json_path}`: `{e!r}`")
        return "\n\n".join(head)
    head.append(
        f"From `{run.json_path}`, written by `{command}` (committed; this suite does not rerun it)."
    )
    return "\n\n".join(head + [body])


def render_full_runs(runs, root: str, report_dir: str) -> str:
    if not runs:
        return ""
    intro = (
        "Runs too long for the suite, rendered from their committed JSON (their numbers were "
        "measured by the command shown, not by this suite's run)."
    )
    return "\n\n".join(
        ["## Full-length runs", intro] + [render_full_run(r, root, report_dir) for r in runs]
    )


def render_report(
    results, machine, cfg, started, results_dir, revision="unknown", full_runs=()
) -> str:
    """The whole BENCHMARKS.md: title, provenance (command, code, machine, date), status, sections,
    then the committed full-length runs.

    Sections render first: a section whose JSON cannot be rendered turns ``failed`` in the status
    table too.
    """
    report_dir = os.path.dirname(os.path.abspath(cfg.report_path))
    sections = [render_section(r, results_dir, report_dir) for r in results]
    full = render_full_runs(full_runs, cfg.root, report_dir)
    status = common.markdown_table(
        ["section", "status", "seconds", "error"],
        [[r.section.key, r.status, round(r.seconds, 1), r.error or ""] for r in results],
    )
    head = [
        "# jaxsync benchmarks",
        "Generated by the benchmark suite; every number below was measured by the command shown, "
        "in the run that wrote this file, except the full-length runs at the end, which name "
        "their own command and JSON. Do not edit by hand: rerun the command.",
        f"**Command:** `{cfg.command}` (mode: {cfg.mode})",
        f"**Code:** git {revision}; **started:** {started}",
        machine.line(),
        _EMULATION_NOTE,
        "## Sections run",
        status,
    ]
    return "\n\n".join(head + sections + ([full] if full else [])) + "\n"

"""The one run skeleton: workdir → resume → writers → chunks of steps → non-finite stop → summary,
writers and checkpoints closed even on error.

Every run (supervised :mod:`jaxsync.train`, emulated or threaded :mod:`jaxsync.async_ps.train`,
RL :mod:`jaxsync.agents.rl.runner`, GAN :mod:`jaxsync.agents.gan.train`) calls :func:`run` with a
:class:`Job`: its checkpointed pytree and plain functions (no class to inherit from). The loop owns
what they share:

- chunk boundaries: the next multiple of the job's ``periods``, of ``--check_replicas`` and (with a
  workdir) of ``--checkpoint_every``, or the last step. They depend only on the step count, so a
  resumed run replays the uninterrupted run's chunks exactly (same programs, same inputs: bitwise
  the same state and records);
- timing: a chunk length's first run compiles and is not timed; ``times`` holds seconds per step;
- the non-finite stop: the job says at which step of a chunk its guard reached the limit; the
  loop writes that chunk's records up to it, then :func:`jaxsync.runs.stop_nonfinite` (the chunk's
  state is dropped, so the last checkpoint stays the latest);
- the replica check every ``--check_replicas`` steps and at the end;
- records to every writer and a progress line each (unless ``quiet``);
- checkpoints: ``{"config", "data_position", **host}`` beside the job's tree, where ``host`` is the
  job's JSON host state (last record, eval metrics, windows ...), restored on resume.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from jaxsync import runs
from jaxsync.metrics import Progress, to_python


@dataclasses.dataclass
class Job:
    """One run's own parts.

    ``log(tree, chunk, host, first, n, stop, times) -> (records, host)``: the records of steps
    ``first+1 … first+n`` (a chunk) and the new host state; with ``stop`` (the index in the chunk
    of the step where the guard stopped the run) the records up to that step.
    """

    tree: Any  # the checkpointed pytree, fresh; also the template a checkpoint is restored into
    advance: Callable  # (tree, inputs, first, n) -> (tree, chunk), blocked until ready; timed
    log: Callable
    summary: Callable  # (tree, host, times) -> the summary dict (written last)
    host: dict = dataclasses.field(default_factory=dict)  # fresh host state (JSON)
    prepare: Callable = lambda first, n: None  # untimed inputs of a chunk (host batches)
    finish: Callable = lambda tree, chunk: chunk  # untimed host side of a chunk's outputs
    stop_at: Callable = lambda chunk: None  # index in the chunk where the guard stops the run
    periods: tuple = ()  # chunk ends besides replica checks and checkpoints
    check_replicas: Callable | None = None  # (tree) -> None; raises ReplicaDivergence
    restored: Callable = lambda tree: tree  # fix-ups of a restored tree (e.g. re-wrapped keys)
    headline: Callable = lambda record: record  # a record's progress line (None: none)


def due(step: int, every: int, total: int) -> bool:
    """A periodic event (every ``every`` steps, 0: never) happens after ``step``, and at the end."""
    return bool(every) and (step % every == 0 or step == total)


def next_stop(done: int, total: int, periods) -> int:
    """The end of the chunk after step ``done``: the next multiple of a period, or ``total``."""
    return min([total] + [(done // p + 1) * p for p in periods if p])


def boundaries(total: int, periods, start: int = 0) -> list[int]:
    """Every chunk end after ``start``, ending with ``total``."""
    out, done = [], start
    while done < total:
        done = next_stop(done, total, periods)
        out.append(done)
    return out


def run(cfg, *, total: int, strategy: str, build: Callable, identity=runs.identity) -> dict:
    """Run ``build(start) -> Job`` for steps ``start+1 … total`` and return the summary.

    ``cfg`` is the experiment's config (its ``run`` a :class:`jaxsync.runs.RunConfig`); ``total``
    its last step; ``strategy`` the name in the stop record; ``identity`` what a checkpoint must
    match (:func:`jaxsync.runs.resume_step`). Checked before any work: the workdir and resume.
    """
    ckpt = runs.open_workdir(cfg.run)
    start = runs.resume_step(cfg, ckpt, total, identity)
    writers = []
    try:
        job = build(start)
        tree, host = job.tree, dict(job.host)
        if start:  # the fresh tree is the template: the strategy's shardings and layout
            tree, carried = ckpt.restore(start, template=job.tree)
            tree = job.restored(tree)
            host.update({k: carried[k] for k in job.host if k in carried})
        writers = runs.open_writers(cfg.run, start)
        summary = _chunks(cfg, job, tree, host, start, total, strategy, ckpt, writers)
        writers[0].write(summary)
        return summary
    finally:
        for w in writers:
            w.close()
        if ckpt is not None:
            ckpt.close()


def _chunks(cfg, job: Job, tree, host, start, total, strategy, ckpt, writers) -> dict:
    run = cfg.run
    periods = [*job.periods, run.check_replicas]
    if ckpt is not None:
        periods.append(run.checkpoint_every)
    progress, times, compiled, done = Progress(total, start_step=start), [], set(), start

    def write(records):
        for record in records:
            for w in writers:
                w.write(record)
            shown = job.headline(record)
            if not run.quiet and shown is not None:
                progress.report(record["step"], shown)

    while done < total:
        n = next_stop(done, total, periods) - done
        inputs = job.prepare(done, n)
        t0 = time.perf_counter()
        new_tree, chunk = job.advance(tree, inputs, done, n)
        if n in compiled:  # the first chunk of each length compiles
            times.append((time.perf_counter() - t0) / n)
        compiled.add(n)
        chunk = job.finish(new_tree, chunk)
        stop = job.stop_at(chunk)
        if stop is not None:  # the chunk's state is dropped: the last checkpoint stays the latest
            write(job.log(new_tree, chunk, host, done, n, stop, times)[0])
            runs.stop_nonfinite(run, ckpt, done + stop + 1, writers, strategy, total)
        tree, first, done = new_tree, done, done + n
        if job.check_replicas is not None and due(done, run.check_replicas, total):
            job.check_replicas(tree)  # raises ReplicaDivergence naming the leaf
        records, host = job.log(tree, chunk, host, first, n, None, times)
        write(records)
        if ckpt is not None and (done == total or due(done, run.checkpoint_every, total)):
            meta = {"config": runs.config_json(cfg), "data_position": done, **to_python(host)}
            ckpt.save(done, tree, meta)
    return job.summary(tree, host, times)

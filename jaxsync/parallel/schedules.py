"""Pipeline schedules as data: a table of (tick, stage) -> F | B | W on microbatch m.

A schedule for P devices, v virtual stages (model chunks) per device and M microbatches is a
*grid*: ``grid[t][d]`` is the action device d runs at clock tick t, or None (idle). An
:class:`Action` names its kind, its microbatch m and its chunk c; device d's chunk c is virtual
stage k = c·P + d of V = P·v (Megatron-LM's interleaved layout: chunk c of every device, in device
order, then chunk c + 1). The kinds:

- ``F``: forward of virtual stage k on microbatch m (on k = 0 it embeds the tokens first; on
  k = V − 1 it also computes the loss and its gradient with respect to the stage output);
- ``B``: backward of stage k: the gradient with respect to the stage input (sent to stage k − 1),
  and with respect to the stage's weights unless the grid also holds a ``W`` for (m, k);
- ``W``: the weight gradient of stage k on microbatch m, split from B (Qi et al. 2023).

One action takes one tick; at the end of every tick each device sends the activation its F made
to the next device and the input gradient its B made to the previous one (a ring, so device P − 1
feeds chunk c + 1 of device 0). The dependencies a grid must satisfy, checked by
:func:`check_grid`: F(m, k) after F(m, k − 1); B(m, k) after F(m, k) and B(m, k + 1); W(m, k)
after B(m, k); each strictly earlier tick, every action exactly once.

A researcher adds a schedule by writing a grid, or per-device action orders that
:func:`from_orders` turns into a grid by running each device's next action as soon as its inputs
have arrived. :func:`compile_table` assigns every stashed stage input and output gradient a
buffer slot (an interval colouring of their lifetimes) and returns the int32 table the executor in
:mod:`jaxsync.parallel.pipeline` runs. The schedules here:

- ``gpipe`` (Huang et al. 2019): every forward, then every backward;
  bubble (P − 1)/(M + P − 1), M stage inputs stashed on stage 0.
- ``1f1b`` (PipeDream-Flush; Narayanan et al. 2021, "Efficient Large-Scale Language Model
  Training on GPU Clusters Using Megatron-LM", §2.2.1): P − d − 1 warm-up forwards, then one
  forward one backward, then the cool-down backwards; the same bubble as GPipe, at most P − d
  microbatches in flight on stage d.
- ``interleaved`` (ibid. §2.2.2): v chunks per device, microbatches taken in groups of P, each
  group through chunk 0 then chunk 1 …; bubble (P − 1)/(v·M + P − 1) in chunk-sized ticks.
- ``zb_h1`` (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", §3.1): 1F1B's order of F and
  input-gradient B, every W deferred to a tick where the device's next F or B cannot run, and at
  most P microbatches in flight on any stage (1F1B's peak, on its stage 0); with
  T_F = T_B = T_W the bubble is P − 1 ticks of 3M + P − 1 (M >= P), a third of 1F1B's
  3(P − 1) of 3(M + P − 1).

The interleaved formula assumes M divisible by P (Megatron-LM requires it); other M >= P run, with
a last, smaller group and a larger bubble, which the counted idle slots show.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence

import numpy as np

from jaxsync import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb_h1")

# Table columns and action codes of the compiled table the executor runs.
KIND, MB, CHUNK, ASLOT, GSLOT, RECV_A, RECV_G = range(7)
IDLE, FWD, BWD, BWD_INPUT, WGT = range(5)


class ScheduleError(ConfigError):
    """A grid that breaks a dependency, or a (P, M, v) no schedule can run."""


@dataclasses.dataclass(frozen=True)
class Action:
    """One slot of a grid: ``kind`` F | B | W on microbatch ``mb`` of chunk ``chunk``."""

    kind: str
    mb: int
    chunk: int = 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


Grid = list  # list (ticks) of lists (devices) of Action | None


def check_sizes(name: str, stages: int, microbatches: int, chunks: int = 1) -> None:
    """ScheduleError (one line) unless ``name`` can run P stages, M microbatches, v chunks."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown --pipeline_schedule={name!r}; choose from {SCHEDULES}")
    if stages < 1:
        raise ScheduleError(f"--model_parallel must be >= 1 pipeline stages, got {stages}")
    if microbatches < 1:
        raise ScheduleError(f"--microbatches must be >= 1, got {microbatches}")
    if chunks < 1:
        raise ScheduleError(f"--virtual_stages must be >= 1, got {chunks}")
    if chunks > 1 and name != "interleaved":
        raise ScheduleError(
            f"--virtual_stages={chunks} needs --pipeline_schedule=interleaved, not {name}"
        )
    if name == "interleaved" and chunks > 1 and microbatches < stages:
        raise ScheduleError(
            f"the interleaved schedule needs --microbatches >= --model_parallel ({stages}) "
            f"when --virtual_stages > 1, got {microbatches}"
        )


def bubble_formula(name: str, stages: int, microbatches: int, chunks: int = 1) -> float:
    """The analytic idle fraction of a device, in the schedule's own unit ticks.

    GPipe and 1F1B (P − 1)/(M + P − 1); interleaved (P − 1)/(v·M + P − 1); ZB-H1 with equal F, B
    and W ticks (P − 1)/(3M + P − 1) (Qi et al. 2023, Table 1, T_F = T_B = T_W).
    """
    p, m = stages, microbatches
    if name == "zb_h1":
        return (p - 1) / (3 * m + p - 1)
    v = chunks if name == "interleaved" else 1
    return (p - 1) / (v * m + p - 1)


def _orders_1f1b(p: int, m: int, d: int) -> list[Action]:
    warmup = min(p - d - 1, m)
    order = [Action("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [Action("F", warmup + i), Action("B", i)]
    order += [Action("B", i) for i in range(m - warmup, m)]
    return order


def _orders_interleaved(p: int, m: int, v: int, d: int) -> list[Action]:
    """Megatron-LM's interleaved order on device d, microbatches in groups of P (the last group
    may be smaller): forwards through chunk 0 … v − 1, backwards through chunk v − 1 … 0."""
    groups = [range(g, min(g + p, m)) for g in range(0, m, p)]
    fwd = [Action("F", i, c) for g in groups for c in range(v) for i in g]
    bwd = [Action("B", i, c) for g in groups for c in reversed(range(v)) for i in g]
    warmup = min((p - d - 1) + (v - 1) * p, len(fwd))
    order = fwd[:warmup]
    for i in range(len(fwd) - warmup):
        order += [fwd[warmup + i], bwd[i]]
    return order + bwd[len(fwd) - warmup :]


def from_orders(
    stages: int,
    microbatches: int,
    chunks: int,
    orders: Sequence[Sequence[Action]],
    *,
    defer_w: bool = False,
    in_flight: Sequence[int] | None = None,
) -> Grid:
    """Run per-device action orders on the unit-tick clock and return the grid.

    At every tick each device runs the next action of its order if its inputs arrived at an
    earlier tick. With ``defer_w`` every B is input-only and its W waits in a queue: a device runs
    its oldest waiting W whenever its next F or B cannot run, or when an F would hold more than
    ``in_flight[d]`` microbatches (forwarded, W not yet run) on device d; the W left at the end
    run last. ScheduleError if the orders deadlock.
    """
    p, v = stages, chunks
    last = p * v - 1
    done: dict[tuple[str, int, int], int] = {}
    ptr = [0] * p
    waiting: list[deque] = [deque() for _ in range(p)]
    held = [0] * p
    grid: Grid = []
    total = sum(len(o) + (sum(a.kind == "B" for a in o) if defer_w else 0) for o in orders)
    count = 0
    while count < total:
        t = len(grid)
        row: list[Action | None] = [None] * p
        for d in range(p):
            act = orders[d][ptr[d]] if ptr[d] < len(orders[d]) else None
            ok = act is not None and _ready(act, d, p, last, done, t)
            if ok and defer_w and act.kind == "F" and held[d] >= in_flight[d]:
                ok = False
            if ok:
                row[d] = act
                ptr[d] += 1
            elif defer_w and waiting[d]:
                row[d] = waiting[d].popleft()
        for d, act in enumerate(row):
            if act is None:
                continue
            count += 1
            done[(act.kind, act.mb, act.chunk * p + d)] = t
            if defer_w and act.kind == "F":
                held[d] += 1
            elif defer_w and act.kind == "B":
                waiting[d].append(Action("W", act.mb, act.chunk))
            elif defer_w and act.kind == "W":
                held[d] -= 1
        if all(a is None for a in row):
            raise ScheduleError(f"the action orders deadlock at tick {t}")
        grid.append(row)
    return grid


def _ready(act: Action, d: int, p: int, last: int, done: dict, t: int) -> bool:
    k = act.chunk * p + d
    if act.kind == "F":
        needs = [("F", act.mb, k - 1)] if k > 0 else []
    elif act.kind == "B":
        needs = [("F", act.mb, k)] + ([("B", act.mb, k + 1)] if k < last else [])
    else:
        needs = [("B", act.mb, k)]
    return all(done.get(n, t) < t for n in needs)


def make_grid(name: str, stages: int, microbatches: int, chunks: int = 1) -> Grid:
    """The grid of schedule ``name`` (one of :data:`SCHEDULES`) for P, M and v."""
    check_sizes(name, stages, microbatches, chunks)
    p, m = stages, microbatches
    if name == "gpipe":
        orders = [[Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]] * p
        return from_orders(p, m, 1, orders)
    if name == "interleaved":
        return from_orders(p, m, chunks, [_orders_interleaved(p, m, chunks, d) for d in range(p)])
    orders = [_orders_1f1b(p, m, d) for d in range(p)]
    if name == "zb_h1":
        return from_orders(p, m, 1, orders, defer_w=True, in_flight=[p] * p)
    return from_orders(p, m, 1, orders)


def check_grid(grid: Grid, stages: int, microbatches: int, chunks: int = 1) -> None:
    """ScheduleError naming the first broken rule unless ``grid`` is a valid schedule: every
    (m, k) has one F and one B (and at most one W), each after its inputs, on the right device."""
    p, m, v = stages, microbatches, chunks
    last = p * v - 1
    when: dict[tuple[str, int, int], int] = {}
    for t, row in enumerate(grid):
        if len(row) != p:
            raise ScheduleError(f"tick {t} has {len(row)} devices, not {p}")
        for d, act in enumerate(row):
            if act is None:
                continue
            if act.kind not in "FBW" or not 0 <= act.mb < m or not 0 <= act.chunk < v:
                raise ScheduleError(f"tick {t} device {d}: {act!r} is not an action of this grid")
            key = (act.kind, act.mb, act.chunk * p + d)
            if key in when:
                raise ScheduleError(f"{act!r} on device {d} runs twice (ticks {when[key]}, {t})")
            when[key] = t
    for (kind, mb, k), t in sorted(when.items(), key=lambda kv: kv[1]):
        if kind == "F":
            needs = [("F", mb, k - 1)] if k > 0 else []
        elif kind == "B":
            needs = [("F", mb, k)] + ([("B", mb, k + 1)] if k < last else [])
        else:
            needs = [("B", mb, k)]
        for n in needs:
            if when.get(n, t) >= t:
                raise ScheduleError(
                    f"{kind} of microbatch {mb} on virtual stage {k} at tick {t} runs before "
                    f"its input {n[0]} of virtual stage {n[2]}"
                    + (f" (tick {when[n]})" if n in when else " (never)")
                )
    for mb in range(m):
        for k in range(last + 1):
            for kind in "FB":
                if (kind, mb, k) not in when:
                    raise ScheduleError(
                        f"{kind} of microbatch {mb} on virtual stage {k} is missing"
                    )


@dataclasses.dataclass(frozen=True)
class Table:
    """A checked grid compiled for the executor.

    ``table``: int32 (ticks, P, 7), columns KIND, MB, CHUNK, ASLOT, GSLOT, RECV_A, RECV_G (−1:
    none); ``act_slots`` / ``grad_slots``: stash buffers per device (the most stage inputs and
    output gradients any device holds at once); ``idle``: idle (tick, device) slots over all.
    """

    name: str
    stages: int
    microbatches: int
    chunks: int
    table: np.ndarray
    act_slots: int
    grad_slots: int

    @property
    def ticks(self) -> int:
        return self.table.shape[0]

    @property
    def idle(self) -> float:
        return float(np.mean(self.table[:, :, KIND] == IDLE))


def _colour(intervals: dict) -> tuple[dict, int]:
    """Greedy interval colouring by start: ``{key: slot}`` and the slot count. An interval
    ``(start, end)`` uses its slot from half-tick ``start`` to half-tick ``end`` inclusive."""
    slot_of, free_at = {}, []  # free_at[s]: the half tick slot s is last read
    for key, (start, end) in sorted(intervals.items(), key=lambda kv: kv[1]):
        s = next((s for s, f in enumerate(free_at) if f < start), len(free_at))
        if s == len(free_at):
            free_at.append(end)
        slot_of[key] = s
        free_at[s] = end
    return slot_of, len(free_at)


def compile_table(grid: Grid, stages: int, microbatches: int, chunks: int = 1, name="") -> Table:
    """Check ``grid`` and lay it out as the executor's table (see :class:`Table`).

    Device d stashes stage k's input from when it arrives (the half tick after its sender's F;
    on k = 0 the F that embeds it) to the last action that reads it (B, or W when split), and the
    gradient of k's output from when it arrives (after B of k + 1; on the last stage the F that
    computes the loss) to the same point. Half ticks: actions at 2t, arrivals at 2t + 1.
    """
    check_grid(grid, stages, microbatches, chunks)
    p, v = stages, chunks
    last = p * v - 1
    when = {}
    for t, row in enumerate(grid):
        for d, act in enumerate(row):
            if act is not None:
                when[(act.kind, act.mb, act.chunk * p + d)] = t
    split = {(mb, k) for kind, mb, k in when if kind == "W"}
    act_iv = [{} for _ in range(p)]
    grad_iv = [{} for _ in range(p)]
    for (kind, mb, k), t in when.items():
        if kind != "F":
            continue
        d = k % p
        end = 2 * when[("W" if (mb, k) in split else "B", mb, k)]
        start = 2 * t if k == 0 else 2 * when[("F", mb, k - 1)] + 1
        act_iv[d][(mb, k)] = (start, end)
        gstart = 2 * t if k == last else 2 * when[("B", mb, k + 1)] + 1
        grad_iv[d][(mb, k)] = (gstart, end)
    aslot, gslot = [], []
    na = ng = 0
    for d in range(p):
        a, n1 = _colour(act_iv[d])
        g, n2 = _colour(grad_iv[d])
        aslot.append(a)
        gslot.append(g)
        na, ng = max(na, n1), max(ng, n2)
    table = np.full((len(grid), p, 7), -1, np.int32)
    table[:, :, KIND] = IDLE
    for t, row in enumerate(grid):
        for d, act in enumerate(row):
            if act is None:
                continue
            k = act.chunk * p + d
            code = {"F": FWD, "W": WGT}.get(act.kind)
            if code is None:
                code = BWD_INPUT if (act.mb, k) in split else BWD
            table[t, d, KIND : GSLOT + 1] = (
                code,
                act.mb,
                act.chunk,
                aslot[d][(act.mb, k)],
                gslot[d][(act.mb, k)],
            )
            if act.kind == "F" and k < last:
                nd = (d + 1) % p
                table[t, nd, RECV_A] = aslot[nd][(act.mb, k + 1)]
            if act.kind == "B" and k > 0:
                pd = (d - 1) % p
                table[t, pd, RECV_G] = gslot[pd][(act.mb, k - 1)]
    return Table(name, p, microbatches, v, table, na, ng)


def make_table(name: str, stages: int, microbatches: int, chunks: int = 1) -> Table:
    """The compiled table of schedule ``name``."""
    grid = make_grid(name, stages, microbatches, chunks)
    return compile_table(grid, stages, microbatches, chunks, name)


def dense_reference(table: Table) -> Table:
    """The same actions per device packed into consecutive ticks with no idle slot: a timing
    reference that runs every action's compute and a tick's two ``ppermute`` s, but ignores the
    dependencies (its numbers are not a loss). Bubble = 1 − t_dense / t_schedule."""
    t = table.table
    busy = [t[t[:, d, KIND] != IDLE, d] for d in range(table.stages)]
    ticks = max(len(b) for b in busy)
    out = np.full((ticks, table.stages, 7), -1, np.int32)
    out[:, :, KIND] = IDLE
    for d, rows in enumerate(busy):
        out[: len(rows), d] = rows
        out[:, d, RECV_A:] = -1
    return dataclasses.replace(table, name=table.name + "_dense", table=out)


def render(grid: Grid) -> str:
    """The grid as text, one line per device (``.`` idle), for docs and error reports."""
    p = len(grid[0]) if grid else 0
    cells = [[repr(row[d]) if row[d] is not None else "." for row in grid] for d in range(p)]
    width = max((len(c) for line in cells for c in line), default=1)
    return "\n".join(" ".join(c.rjust(width) for c in line) for line in cells)

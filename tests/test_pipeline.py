"""Pipeline schedules: the tables, their checker and the one executor that runs them.

Every schedule's loss and gradients must equal the single-device model's and GPipe's (relative
error <= 1e-5 in float32) for P in {2, 4}, M in {P, 2P, 4P + 1} and v in {1, 2}. The table is an
argument of the compiled executor, so each (P, v) compiles once and runs every schedule and M
(shorter tables padded with idle ticks, fewer microbatches with unused rows of the batch).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxsync import losses
from jaxsync.mesh import make_mesh
from jaxsync.models.transformer import Transformer
from jaxsync.parallel import pipeline, schedules
from jaxsync.parallel.schedules import Action, ScheduleError

TASK = "classification"
B = 2  # examples per microbatch


def rel_err(a, b) -> float:
    errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))), a, b)
    return max(jax.tree.leaves(errs))


def _model(stages):
    return Transformer(vocab=8, d_model=16, num_heads=4, mlp_dim=32, num_layers=2 * stages)


def _tokens(m):
    x = jnp.asarray(np.random.default_rng(0).integers(0, 8, (m * B, 6)), jnp.int32)
    return x, jnp.flip(x, axis=1)


@functools.cache
def _single_fn(stages):
    """The single-device model's parameters and a jitted ``w -> (loss, grads)`` of
    Σ_m w_m · (mean loss of microbatch m): with w_m = 1/M for the first M microbatches, the mean
    over M equal microbatches, i.e. the full-batch mean loss of their examples (one compile
    serves every M)."""
    model = _model(stages)
    x, y = _tokens(4 * stages + 1)
    params = model.init(jax.random.key(0), x)["params"]
    loss_fn = losses.make_loss_fn(model.apply, TASK)
    xs, ys = x.reshape((-1, B) + x.shape[1:]), y.reshape((-1, B) + y.shape[1:])

    def weighted(p, w):
        per_mb = jax.vmap(lambda xm, ym: loss_fn(p, (xm, ym))[0])(xs, ys)
        return jnp.sum(w * per_mb)

    return params, jax.jit(jax.value_and_grad(weighted))


def _single(stages, m):
    """Loss and gradients of the single-device model on the first m microbatches."""
    params, fn = _single_fn(stages)
    w = jnp.where(jnp.arange(4 * stages + 1) < m, 1.0 / m, 0.0)
    loss, grads = fn(params, w)
    return params, loss, grads


def _cases(stages, chunks):
    # (interleaved with v = 1 is 1F1B's table: test_tables_hold_... checks that, not here)
    names = ["interleaved"] if chunks > 1 else ["gpipe", "1f1b", "zb_h1"]
    ms = (stages, 2 * stages, 4 * stages + 1)
    return {(n, m): schedules.make_table(n, stages, m, chunks) for n in names for m in ms}


def _padded(table: schedules.Table, ticks: int) -> np.ndarray:
    out = np.full((ticks, table.stages, 7), -1, np.int32)
    out[:, :, schedules.KIND] = schedules.IDLE
    out[: table.ticks] = table.table
    return out


@pytest.mark.parametrize("stages, chunks", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_every_schedule_matches_single_and_gpipe(stages, chunks):
    model, m_max = _model(stages), 4 * stages + 1
    params = _single(stages, m_max)[0]
    cases = _cases(stages, chunks)
    ticks = max(t.ticks for t in cases.values())
    run = pipeline.make_executor(
        pipeline.transformer_fns(model, TASK),
        microbatches=m_max,
        act_slots=max(t.act_slots for t in cases.values()),
        grad_slots=max(t.grad_slots for t in cases.values()),
    )
    pp = pipeline.to_stages(params, model.num_layers, stages, chunks)
    specs = pipeline.pipeline_specs(pp)
    fn = jax.jit(
        jax.shard_map(
            run,
            mesh=make_mesh(stages, ("model",)),
            in_specs=(specs, P(), P(), P()),
            out_specs=((P(), P()), specs),
            check_vma=False,
        )
    )
    gpipe = {}
    for (name, m), table in cases.items():
        (loss, metrics), grads = fn(pp, _tokens(m_max), _padded(table, ticks), jnp.float32(1 / m))
        grads = pipeline.from_stages(grads)
        _, want_loss, want_grads = _single(stages, m)
        assert abs(float(loss - want_loss)) <= 1e-5 * abs(float(want_loss)), (name, m)
        assert rel_err(grads, want_grads) <= 1e-5, (name, m)
        # v = 1: against GPipe's, the first schedule run for each M; v = 2 runs only the
        # interleaved schedule, compared with GPipe through the single-device reference.
        gpipe.setdefault(m, grads)
        assert rel_err(grads, gpipe[m]) <= 1e-5, (name, m)
        # Idle slots counted by the program that ran: the table's, plus the padding.
        want_idle = (table.idle * table.ticks + (ticks - table.ticks)) / ticks
        assert float(metrics["idle_fraction"]) == pytest.approx(want_idle, rel=1e-6)


def test_any_stack_of_blocks():
    """Not only the transformer: a residual tanh MLP stack with a squared-error head, on 1F1B
    and ZB-H1, against jax.grad of the composed function."""
    stages, m, d = 2, 3, 5
    rng = np.random.default_rng(1)
    fns = pipeline.StageFns(
        embed=lambda p, x: x @ p["w"],
        block=lambda p, h: h + jnp.tanh(h @ p["w"] + p["b"]),
        loss=lambda p, batch: (jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2), {}),
    )
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    params = {
        "embed": {"w": f32(3, d)},
        "stages": {"w": 0.5 * f32(stages, 1, 2, d, d), "b": f32(stages, 1, 2, d)},
        "head": {"w": f32(d, 2)},
    }
    x, y = f32(m * 4, 3), f32(m * 4, 2)

    def single(p):
        h = fns.embed(p["embed"], x)
        blocks = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[3:]), p["stages"])
        h = jax.lax.scan(lambda hh, pl: (fns.block(pl, hh), None), h, blocks)[0]
        # the mean over microbatches of each microbatch's mean loss = the full-batch mean
        return fns.loss(p["head"], (h, y))[0]

    want_loss, want = jax.value_and_grad(single)(params)
    specs = pipeline.pipeline_specs(params)
    for name in ("1f1b", "zb_h1"):
        table = schedules.make_table(name, stages, m)
        fn = jax.jit(
            jax.shard_map(
                pipeline.make_value_and_grad(fns, table),
                mesh=make_mesh(stages, ("model",)),
                in_specs=(specs, P()),
                out_specs=((P(), P()), specs),
                check_vma=False,
            )
        )
        (loss, _), grads = fn(params, (x, y))
        assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
        assert rel_err(grads, want) <= 1e-5, name


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_tables_hold_their_dependencies_bubble_and_stash(name):
    for p in (2, 4):
        for m in (p, 2 * p, 4 * p + 1):
            for v in (1, 2) if name == "interleaved" else (1,):
                grid = schedules.make_grid(name, p, m, v)
                schedules.check_grid(grid, p, m, v)
                table = schedules.compile_table(grid, p, m, v)
                if m % p == 0:  # the formulas' assumption for interleaved (groups of P)
                    formula = schedules.bubble_formula(name, p, m, v)
                    assert table.idle == pytest.approx(formula, rel=1e-9), (p, m, v)
                # Activation stash: GPipe holds all M stage inputs, 1F1B and ZB-H1 at most P.
                want = m if name == "gpipe" else p if name != "interleaved" else None
                if want is not None:
                    assert table.act_slots == want, (p, m)
    if name == "interleaved":  # one chunk per device: 1F1B
        one = schedules.make_table(name, 4, 9, 1).table
        assert np.array_equal(one, schedules.make_table("1f1b", 4, 9).table)
    # ZB-H1: about a third of 1F1B's bubble, counted in the same ticks (B + W = 2 ticks).
    zb = schedules.make_table("zb_h1", 4, 8)
    assert zb.idle * zb.ticks == pytest.approx(3)  # P − 1 idle ticks a device; 1F1B: 3(P − 1)


def _grid(text):
    """``"F0 . B0 | . F0 B0"`` -> a grid, devices separated by ``|``."""
    rows = [line.split() for line in text.split("|")]
    act = lambda c: None if c == "." else Action(c[0], int(c[1:]))  # noqa: E731
    return [[act(rows[d][t]) for d in range(len(rows))] for t in range(len(rows[0]))]


def test_checker_accepts_a_hand_grid_and_rejects_wrong_ones():
    schedules.check_grid(_grid("F0 F1 .  .  B0 B1 | .  F0 F1 B0 B1 . "), 2, 2)
    wrong = [
        # stage 1 runs F0 in the tick stage 0 sends it, not after
        ("F0 F1 . . B0 B1 | F0 . F1 B0 B1 .", 2, "F of microbatch 0 on virtual stage 1 at tick 0"),
        # stage 0's B before stage 1's
        ("F0 . B0 . | . F0 . B0", 1, "B of microbatch 0 on virtual stage 0 at tick 2"),
        ("F0 . . B0 | . F0 B0 F0", 1, "runs twice"),
        ("F0 . . B0 | . F0 B0 .", 2, "F of microbatch 1 on virtual stage 0 is missing"),
        ("F0 W0 . B0 | . F0 B0 .", 1, "W of microbatch 0 on virtual stage 0 at tick 1"),
    ]
    for text, m, match in wrong:
        with pytest.raises(ScheduleError, match=match):
            schedules.check_grid(_grid(text), 2, m)


def test_from_orders_reports_a_deadlock():
    # device 1 wants B0 before it has run F0: nothing can move after tick 0
    orders = [[Action("F", 0), Action("B", 0)], [Action("B", 0), Action("F", 0)]]
    with pytest.raises(ScheduleError, match="deadlock at tick 1"):
        schedules.from_orders(2, 1, 1, orders)

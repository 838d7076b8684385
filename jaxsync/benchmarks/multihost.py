"""The multi-process benchmark (``experiments/bench_multihost.py``): the data-parallel step time of
one job laid out as K processes × M devices (K·M fixed), each layout a real multi-process job on
this machine (``scripts/launch_local.py``: gloo over loopback between processes).
"""

from __future__ import annotations

import json
import os

from jaxsync import ConfigError
from jaxsync.benchmarks import common


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median wall milliseconds of each ``fns[name]()``, the names taking turns within each of
    ``repeats`` rounds (:func:`common.interleaved_times`): the step and the step without sync are
    subtracted from each other, so a burst of load must not land on one of them alone."""
    return {name: t * 1e3 for name, t in common.interleaved_times(fns, repeats)[0].items()}


def parse_layouts(texts, batch_size: int) -> list[tuple[int, int]]:
    """``["1x8", "2x4"]`` -> ``[(1, 8), (2, 4)]``; ConfigError unless every layout has the same
    K·M and it divides ``batch_size``."""
    try:
        layouts = [tuple(int(v) for v in x.lower().split("x")) for x in texts]
    except ValueError:
        raise ConfigError(f"--layouts must look like 2x4, got {list(texts)}") from None
    if not layouts or any(len(lay) != 2 or min(lay) < 1 for lay in layouts):
        raise ConfigError(f"--layouts must look like 2x4, got {list(texts)}")
    if len({k * m for k, m in layouts}) != 1 or batch_size % (layouts[0][0] * layouts[0][1]):
        raise ConfigError("all layouts need the same K·M, and it must divide --batch_size")
    return layouts


# The step without its gradient sync: local SGD whose parameter average is never due within the
# timed steps. Same forward, backward and optimizer per device; only the 4-byte loss mean crosses
# devices. Its time is the compute a step's communication could hide behind.
NO_SYNC = "no sync"
NEVER = 10**9  # local_steps: an average every 10⁹ steps


def worker(path: str, strategies, width: int, batch: int, repeats: int, warmup: int) -> None:
    """One process of a job: time every strategy, and the step without gradient sync
    (:data:`NO_SYNC`), over all devices of all processes; process 0 writes
    ``{strategy: {step_ms, feed_ms}}`` to ``path``."""
    import jax
    import jax.numpy as jnp

    from jaxsync import data, losses, models, optim
    from jaxsync.parallel.data_parallel import make_data_parallel

    ds = data.load_dataset("teacher", 0)
    model = models.make_model("mlp", ds.num_outputs, width)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    tx = optim.make_optimizer(optim.OptimConfig(optimizer="sgd", learning_rate=0.01))
    steps, feeds = {}, {}
    for name in (*strategies, NO_SYNC):
        kw = dict(backend="psum", local_steps=NEVER) if name == NO_SYNC else dict(backend=name)
        s = make_data_parallel(
            loss_fn,
            tx,
            lambda r, x: model.init(r, x)["params"],
            num_devices=jax.device_count(),
            **kw,
        )
        state = s.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))
        host = ds.batch(0, batch, 0)
        dev = s.put_batch(host)
        box = [state]

        def step(box=box, s=s, dev=dev):
            box[0], metrics = s.step(box[0], dev)
            return metrics

        interleaved_ms({name: step}, 1 + warmup)  # compile, then warm up
        steps[name], feeds[name] = step, lambda s=s, host=host: s.put_batch(host)
    step_ms, feed_ms = interleaved_ms(steps, repeats), interleaved_ms(feeds, repeats)
    rows = {name: {"step_ms": step_ms[name], "feed_ms": feed_ms[name]} for name in steps}
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(rows, f)


def report(results: list[dict], first, config: dict, output: str) -> str:
    """Adds each row's step time over the first layout's (same strategy, same run) and its
    exposed-communication fraction (step − step without sync) / step, from the same layout's
    :data:`NO_SYNC` row; writes the JSON to ``output`` and returns the markdown table."""
    layout = lambda r: (r["processes"], r["devices_per_process"])
    base = {r["strategy"]: r["step_ms"] for r in results if layout(r) == tuple(first)}
    compute = {layout(r): r["step_ms"] for r in results if r["strategy"] == NO_SYNC}
    body = []
    for r in results:
        r["ratio_to_first"] = r["step_ms"] / base[r["strategy"]]
        exposed = None
        if r["strategy"] != NO_SYNC and layout(r) in compute:
            exposed = (r["step_ms"] - compute[layout(r)]) / r["step_ms"]
        r["exposed_comm_fraction"] = exposed
        body.append(
            [
                f"{r['processes']} x {r['devices_per_process']}",
                r["strategy"],
                f"{r['step_ms']:.2f}",
                f"{r['feed_ms']:.2f}",
                f"{r['ratio_to_first']:.2f}",
                "" if exposed is None else f"{exposed:.2f}",
            ]
        )
    config = {**config, "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump({"config": config, "results": results}, f, indent=1)
    headers = [
        "processes x devices",
        "strategy",
        "step ms",
        "feed ms",
        "step time / first layout",
        "exposed comm (step − no sync) / step",
    ]
    return common.markdown_table(headers, body)

"""Distributed-optimizer benchmark: memory of sharded optimizer state, and loss against
communicated bytes for local SGD and compressed gradients.

1. Per-device bytes of parameters and optimizer state (Adam), replicated (``psum``) vs sharded
   (``--shard_optimizer``, ZeRO-1/2) for N in --devices, read from the arrays' addressable shards.
2. Local SGD (``ring``, SGD) with H in --local_steps against synchronous SGD: bytes sent per step
   (all devices, 2(N−1)·S per parameter average / H) and the loss after --steps steps.
3. Gradient compression on every backend of jaxsync.sync.BACKENDS that carries compressed
   messages (ring and ps; none | bf16 | top-k with error feedback): bytes sent per step and the
   loss after --steps steps, against uncompressed.

    python experiments/bench_optimizers.py --quick
    python experiments/bench_optimizers.py --steps=300 --width=256

Bytes are counted from the algorithms (jaxsync.sync.gradient_bytes_per_step, padding included),
not measured on a wire, and the tables say "(counted)". XLA:CPU widens bfloat16
collective-permutes to float32, so on emulated CPU devices the bf16 rows still move 4 bytes per
element: the counted saving is not realised there, and the table says so beside the number.
Losses are the train loss of the last step (mean over devices) and the held-out loss of the
(averaged) parameters, on the same global batches for every row. The JSON
also holds each run's median step time (``step_ms``); the tables leave it out, since emulated
devices on a shared CPU say little about a network.
"""

import json
import os

from absl import flags

from jaxsync import cli, runs

_DEVICES = flags.DEFINE_list("devices", ["2", "4", "8"], "Device counts N for the memory table.")
_LOCAL = flags.DEFINE_list("local_steps", ["1", "4", "16"], "Local SGD H values (>= 1).")
_RATIOS = flags.DEFINE_list("topk_ratios", ["0.1", "0.01"], "Top-k ratios, each in (0, 1].")
_N = flags.DEFINE_integer("num_devices", 8, "Devices for the local SGD and compression runs.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per run (>= 16).")
_WIDTH = flags.DEFINE_integer("width", 128, "MLP hidden width (>= 1).")
_LR = flags.DEFINE_float("learning_rate", 0.2, "SGD learning rate (> 0).")
_QUICK = flags.DEFINE_bool("quick", False, "Small run: 48 steps, width 64, one top-k ratio.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_optimizers.json", "JSON results path.")
flags.DEFINE_integer("cpu_devices", 8, "CPU devices to emulate (>= max of --devices).")


def _base(**kw):
    from jaxsync.optim import OptimConfig
    from jaxsync.runs import make
    from jaxsync.train import TrainConfig

    width, steps = (64, 48) if _QUICK.value else (_WIDTH.value, _STEPS.value)
    fields = dict(
        num_devices=_N.value,
        width=width,
        batch_size=256,
        steps=steps,
        quiet=True,
        log_every=steps,
        eval_every=steps,
        optim=OptimConfig("sgd", _LR.value),
    )
    return make(TrainConfig, **{**fields, **kw})


def _param_lengths(cfg, multiple_of):
    """Bucket lengths of the model's parameters as the backends pack them (padding included)."""
    import jax
    import jax.numpy as jnp

    from jaxsync import collectives, data, models

    ds = data.load_dataset(cfg.dataset, cfg.run.seed, cfg.data_dir)
    model = models.make_model(cfg.model, ds.num_outputs, cfg.width)
    params = model.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))["params"]
    buckets, _ = collectives.flatten_to_buckets(
        params, collectives.DEFAULT_BUCKET_BYTES, multiple_of
    )
    return [b.shape[0] for b in buckets]


def memory_rows():
    """Per-device bytes of params + Adam state, replicated vs sharded, from the shards."""
    import jax
    import jax.numpy as jnp

    from jaxsync import data, losses, models, optim
    from jaxsync.parallel.data_parallel import make_data_parallel
    from jaxsync.sync.zero import state_bytes_per_device

    cfg = _base()
    ds = data.load_dataset(cfg.dataset, cfg.run.seed)
    model = models.make_model(cfg.model, ds.num_outputs, cfg.width)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    tx = optim.make_optimizer(optim.OptimConfig("adam", 1e-3))
    rows = []
    for n in sorted(set(cli.int_list("devices", _DEVICES.value))):
        row = {"N": n}
        for label, shard in (("replicated", False), ("sharded", True)):
            strategy = make_data_parallel(
                loss_fn,
                tx,
                lambda r, x: model.init(r, x)["params"],
                backend="psum",
                num_devices=n,
                shard_optimizer=shard,
            )
            state = strategy.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))
            params = max(state_bytes_per_device(state.params).values())
            opt = max(state_bytes_per_device(state.opt_state).values())
            row[f"{label}_params_B"], row[f"{label}_opt_B"] = params, opt
        row["opt_ratio"] = row["sharded_opt_B"] / row["replicated_opt_B"]
        row["total_ratio"] = (row["sharded_params_B"] + row["sharded_opt_B"]) / (
            row["replicated_params_B"] + row["replicated_opt_B"]
        )
        rows.append(row)
    return rows


def _train(cfg):
    from jaxsync.train import train_and_evaluate

    s = train_and_evaluate(cfg)
    return {
        "final_loss": s["final_loss"],
        "eval_loss": s["eval_loss"],
        "step_ms": s["step_time_ms"],
    }


def local_sgd_rows():
    """Synchronous SGD and local SGD with each H: bytes per step and final losses."""
    from jaxsync.sync import allreduce_bytes

    n = _N.value
    param_bytes = 4 * sum(_param_lengths(_base(), 2 * n))
    rows = []
    for h in [0] + sorted({int(v) for v in _LOCAL.value}):
        cfg = _base(strategy="ring", local_steps=h)
        sent = allreduce_bytes(n, param_bytes) / max(h, 1)  # gradients (h=0) or parameters
        rows.append({"H": h or "sync", "bytes_per_step": sent, **_train(cfg)})
    for r in rows:
        r["bytes_vs_sync"] = r["bytes_per_step"] / rows[0]["bytes_per_step"]
    return rows


_BF16_NOTE = "not realised on emulated CPU: XLA:CPU widens bf16 collective-permutes to f32"


def compression_backends(compression) -> list[str]:
    """The backends of jaxsync.sync.BACKENDS that carry ``compression``'s messages."""
    from jaxsync import ConfigError, sync

    out = []
    for name in sync.backend_names():
        try:
            sync.check_options(name, compression=compression)
        except ConfigError:
            continue
        out.append(name)
    return out


def compression_rows():
    """Uncompressed, bf16 and top-k (with error feedback) on every backend that compresses."""
    import jax

    from jaxsync.compression import make_compression
    from jaxsync.sync import gradient_bytes_per_step

    n = _N.value
    ratios = ["0.01"] if _QUICK.value else _RATIOS.value
    variants = [("none", 1.0), ("bf16", 1.0)] + [("topk", float(r)) for r in ratios]
    widened = jax.devices()[0].platform == "cpu"
    rows = []
    for backend in compression_backends(make_compression("bf16", 1.0)):
        lengths = _param_lengths(_base(), 2 * n if backend == "ring" else 1)
        base = None
        for name, ratio in variants:
            cfg = _base(strategy=backend, compression=name, topk_ratio=ratio)
            sent = gradient_bytes_per_step(backend, n, lengths, make_compression(name, ratio))
            row = {
                "backend": backend,
                "compression": name if name != "topk" else f"topk {ratio}",
                "bytes_per_step": sent,
                "note": _BF16_NOTE if name == "bf16" and widened else "",
                **_train(cfg),
            }
            base = base or row
            row["bytes_vs_none"] = sent / base["bytes_per_step"]
            row["loss_vs_none"] = row["final_loss"] / base["final_loss"]
            rows.append(row)
    return rows


def _table(rows, cols):
    """Markdown table of ``rows``; ``cols`` are (header, key) pairs."""

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[k]) for _, k in cols) + " |" for r in rows]
    return "\n".join(lines)


MEMORY_COLUMNS = (
    ("N", "N"),
    ("replicated params B", "replicated_params_B"),
    ("replicated opt B", "replicated_opt_B"),
    ("sharded params B", "sharded_params_B"),
    ("sharded opt B", "sharded_opt_B"),
    ("opt sharded/replicated", "opt_ratio"),
    ("total sharded/replicated", "total_ratio"),
)
LOCAL_SGD_COLUMNS = (
    ("H", "H"),
    ("bytes/step (counted)", "bytes_per_step"),
    ("bytes vs sync (counted)", "bytes_vs_sync"),
    ("final loss", "final_loss"),
    ("eval loss", "eval_loss"),
)
COMPRESSION_COLUMNS = (
    ("backend", "backend"),
    ("compression", "compression"),
    ("bytes/step (counted)", "bytes_per_step"),
    ("bytes vs none (counted)", "bytes_vs_none"),
    ("on this platform", "note"),
    ("final loss", "final_loss"),
    ("loss vs none", "loss_vs_none"),
    ("eval loss", "eval_loss"),
)


def main(argv):
    cli.init_runtime()
    from jaxsync import ConfigError

    if _STEPS.value < 16 or any(int(h) < 1 for h in _LOCAL.value):
        raise ConfigError("--steps must be >= 16 and every --local_steps >= 1")
    results = {
        "memory": memory_rows(),
        "local_sgd": local_sgd_rows(),
        "compression": compression_rows(),
        "config": runs.config_json(_base()),
    }
    steps = results["config"]["steps"]
    print("## Per-device memory, Adam (bytes, read from the arrays' device shards)\n")
    print(_table(results["memory"], MEMORY_COLUMNS))
    print(f"\n## Local SGD, ring, N={_N.value}, {steps} steps\n")
    print(_table(results["local_sgd"], LOCAL_SGD_COLUMNS))
    print(f"\n## Gradient compression, N={_N.value}, {steps} steps\n")
    print(_table(results["compression"], COMPRESSION_COLUMNS))
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)

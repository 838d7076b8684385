"""The distributed-optimizer benchmark (``experiments/bench_optimizers.py``): per-device memory of
sharded optimizer state, and loss against counted bytes for local SGD and compressed gradients."""

from __future__ import annotations

import dataclasses

from jaxsync import cli
from jaxsync.benchmarks import common


@dataclasses.dataclass(frozen=True)
class Settings:
    """The benchmark's flags (see ``experiments/bench_optimizers.py``)."""

    devices: tuple = ("2", "4", "8")
    local_steps: tuple = ("1", "4", "16")
    topk_ratios: tuple = ("0.1", "0.01")
    num_devices: int = 8
    steps: int = 200
    width: int = 128
    learning_rate: float = 0.2
    quick: bool = False


def _base(s, **kw):
    from jaxsync.optim import OptimConfig
    from jaxsync.runs import make
    from jaxsync.train import TrainConfig

    width, steps = (64, 48) if s.quick else (s.width, s.steps)
    fields = dict(
        num_devices=s.num_devices,
        width=width,
        batch_size=256,
        steps=steps,
        quiet=True,
        log_every=steps,
        eval_every=steps,
        optim=OptimConfig("sgd", s.learning_rate),
    )
    return make(TrainConfig, **{**fields, **kw})


def initial_params(cfg):
    """The model's initial parameters (their shapes are what the byte counts need)."""
    import jax
    import jax.numpy as jnp

    from jaxsync import data, models

    ds = data.load_dataset(cfg.dataset, cfg.run.seed, cfg.data_dir)
    model = models.make_model(cfg.model, ds.num_outputs, cfg.width)
    return model.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))["params"]


def _param_lengths(cfg, multiple_of):
    """Bucket lengths of the model's parameters as the backends pack them (padding included)."""
    from jaxsync import collectives

    buckets, _ = collectives.flatten_to_buckets(
        initial_params(cfg), collectives.DEFAULT_BUCKET_BYTES, multiple_of
    )
    return [b.shape[0] for b in buckets]


def memory_rows(s):
    """Per-device bytes of params + Adam state, replicated vs sharded, from the shards."""
    import jax
    import jax.numpy as jnp

    from jaxsync import data, losses, models, optim
    from jaxsync.parallel.data_parallel import make_data_parallel
    from jaxsync.sync.zero import state_bytes_per_device

    cfg = _base(s)
    ds = data.load_dataset(cfg.dataset, cfg.run.seed)
    model = models.make_model(cfg.model, ds.num_outputs, cfg.width)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    tx = optim.make_optimizer(optim.OptimConfig("adam", 1e-3))
    rows = []
    for n in sorted(set(cli.int_list("devices", s.devices))):
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


EASGD_ALPHA = 0.1  # the moving rate of the EASGD rows (β = N·α = 0.8 at N = 8)
STREAMING_FRAGMENTS = 4  # Streaming DiLoCo's P (rows at each H >= P)
STREAMING_QUANTIZE = "e2m1"  # its quantised row (the paper's 4-bit setting), at the largest H


def _fragment_bytes(s, fragments: int, quantize: str) -> list[float]:
    """Counted bytes all devices send for each fragment's outer-gradient all-reduce on the ring:
    its arrays' padded buckets at the format's width, plus one float32 scale per array for the
    scaled formats (:func:`jaxsync.sync.diloco.scale_bytes`)."""
    import jax

    from jaxsync import collectives
    from jaxsync.sync import allreduce_bytes, diloco

    n = s.num_devices
    leaves = jax.tree.leaves(initial_params(_base(s)))
    out = []
    for ks in diloco.fragment_leaves(len(leaves), fragments):
        buckets, _ = collectives.flatten_to_buckets(
            [leaves[k] for k in ks], collectives.DEFAULT_BUCKET_BYTES, 2 * n
        )
        lengths = [b.shape[0] for b in buckets]
        elements = diloco.bytes_per_element(quantize) * sum(lengths)
        out.append(allreduce_bytes(n, elements + diloco.scale_bytes(quantize) * len(ks)))
    return out


def local_sgd_rows(s):
    """Synchronous SGD, and local SGD, DiLoCo (Nesterov outer step, lr 0.7, momentum 0.9),
    Streaming DiLoCo (the same, P = 4 strided fragments at staggered offsets; one row with 4-bit
    e2m1 outer gradients) and EASGD with each H (= τ): bytes per step on average and on the
    busiest step (counted), and final losses. The losses are of the workers' mean."""
    from jaxsync.sync import allreduce_bytes

    n = s.num_devices
    param_bytes = 4 * sum(_param_lengths(_base(s), 2 * n))
    hs = sorted({int(v) for v in s.local_steps})
    p = STREAMING_FRAGMENTS
    rows = []
    for h in [0] + hs:
        full = allreduce_bytes(n, param_bytes)  # gradients (h=0) or parameters, all at once
        nesterov = {"outer_optimizer": "nesterov"}
        methods = [
            ("local SGD", {}, None),
            ("DiLoCo", nesterov, None),
            (f"EASGD α={EASGD_ALPHA:g}", {"elastic_alpha": EASGD_ALPHA}, None),
        ]
        if h >= p:
            methods.insert(
                2, (f"Streaming DiLoCo P={p}", {**nesterov, "diloco_fragments": p}, "none")
            )
        if h >= p and h == hs[-1]:
            q = STREAMING_QUANTIZE
            extra = {**nesterov, "diloco_fragments": p, "outer_quantize": q}
            methods.insert(3, (f"Streaming DiLoCo P={p} {q}", extra, q))
        for method, extra, quantize in methods if h else methods[:1]:
            cfg = _base(s, strategy="ring", local_steps=h, **extra)
            sent, peak = full / max(h, 1), full
            if quantize is not None:
                fragments = _fragment_bytes(s, p, quantize)
                sent, peak = sum(fragments) / h, max(fragments)
            row = {"method": "sync SGD" if h == 0 else method, "H": h or "–"}
            rows.append({**row, "bytes_per_step": sent, "peak_bytes": peak, **_train(cfg)})
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


def compression_rows(s):
    """Uncompressed, bf16 and top-k (with error feedback) on every backend that compresses."""
    import jax

    from jaxsync.compression import make_compression
    from jaxsync.sync import gradient_bytes_per_step

    n = s.num_devices
    ratios = ["0.01"] if s.quick else s.topk_ratios
    variants = [("none", 1.0), ("bf16", 1.0)] + [("topk", float(r)) for r in ratios]
    widened = jax.devices()[0].platform == "cpu"
    rows = []
    for backend in compression_backends(make_compression("bf16", 1.0)):
        lengths = _param_lengths(_base(s), 2 * n if backend == "ring" else 1)
        base = None
        for name, ratio in variants:
            cfg = _base(s, strategy=backend, compression=name, topk_ratio=ratio)
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
        if backend == "ring":
            rows += _powersgd_rows(s, backend, base)
    return rows


POWERSGD_RANKS = (1, 4)


def _powersgd_rows(s, backend, base):
    """PowerSGD at each rank: (m + n)·r numbers per matrix and the vectors, all-reduced by the
    backend (counted as the backend's all-reduce of those float32 bytes)."""
    import jax

    from jaxsync import sync
    from jaxsync.sync.powersgd import message_numbers

    shapes = [p.shape for p in jax.tree.leaves(initial_params(_base(s)))]
    rows = []
    for r in POWERSGD_RANKS:
        sent = sync.get(backend).total_bytes(s.num_devices, 4 * message_numbers(shapes, r))
        row = {
            "backend": backend,
            "compression": f"PowerSGD r={r}",
            "bytes_per_step": sent,
            "note": "two all-reduces of unpadded matrices",
            **_train(_base(s, strategy=backend, powersgd_rank=r)),
        }
        row["bytes_vs_none"] = sent / base["bytes_per_step"]
        row["loss_vs_none"] = row["final_loss"] / base["final_loss"]
        rows.append(row)
    return rows


def table(rows, cols) -> str:
    """Markdown table of ``rows``; ``cols`` are (header, key) pairs."""
    return common.markdown_table([h for h, _ in cols], [[r[k] for _, k in cols] for r in rows], 4)


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
    ("method", "method"),
    ("H", "H"),
    ("bytes/step (counted)", "bytes_per_step"),
    ("bytes vs sync (counted)", "bytes_vs_sync"),
    ("peak bytes/sync step (counted)", "peak_bytes"),
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


def run(s: Settings) -> dict:
    """Every table's rows and the base config, measured in this process."""
    from jaxsync import runs

    return {
        "memory": memory_rows(s),
        "local_sgd": local_sgd_rows(s),
        "compression": compression_rows(s),
        "config": runs.config_json(_base(s)),
    }

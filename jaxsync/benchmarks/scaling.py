"""Data-parallel scaling studies: throughput versus devices, and the linear scaling rule.

1. Strong scaling (global batch B fixed, per-device batch B/N) and weak scaling (per-device batch
   b fixed, global batch b·N) of the synchronous data-parallel step for each sync backend, with
   the parallel efficiency E = (X_N / X_1) / N of the throughput X in examples/s. On emulated CPU
   devices the N devices share the host's cores, so E measures the overhead of splitting and
   synchronising, not a hardware speedup.
2. The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet
   in 1 Hour"): when the minibatch is multiplied by k, multiply the learning rate by k,
   η = η₀ · B / B₀, with a gradual warmup from 0 to η over the first epochs; compared with the
   rule without warmup and with no scaling (η = η₀ at every B), at a fixed number of epochs.
   Every run is repeated over seeds (data split and initialisation); the table gives the mean
   test error ± its standard error, to the resolution the test set supports (1/n_test).
"""

from __future__ import annotations

import dataclasses
import math

from jaxsync import ConfigError, check_at_least, sync
from jaxsync.benchmarks import common

STRONG, WEAK = "strong", "weak"


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """Throughput sweep. ``global_batch`` is B of strong scaling, ``per_device_batch`` b of weak;
    ``strategies`` are sync backend names (default: all of :data:`jaxsync.sync.BACKENDS`)."""

    strategies: tuple[str, ...] = dataclasses.field(default_factory=sync.backend_names)
    devices: tuple[int, ...] = (1, 2, 4, 8)
    modes: tuple[str, ...] = (STRONG, WEAK)
    global_batch: int = 512
    per_device_batch: int = 64
    width: int = 256
    dataset: str = "teacher"
    warmup: int = 3
    repeats: int = 20
    seed: int = 0


def validate_scaling(cfg: ScalingConfig) -> None:
    """Raise ConfigError naming the first bad field."""
    if not cfg.strategies:
        raise ConfigError(f"--strategies takes names from {list(sync.backend_names())}; got none")
    for name in cfg.strategies:
        sync.check_backend(name)
    if not cfg.devices or min(cfg.devices) < 1:
        raise ConfigError(f"--devices must be integers >= 1, got {list(cfg.devices)}")
    if set(cfg.modes) - {STRONG, WEAK} or not cfg.modes:
        raise ConfigError(f"--modes takes strong, weak; got {list(cfg.modes)}")
    if STRONG in cfg.modes and any(cfg.global_batch % n for n in cfg.devices):
        raise ConfigError(
            f"--global_batch={cfg.global_batch} must be divisible by every device "
            f"count {list(cfg.devices)}"
        )
    check_at_least(cfg, ("per_device_batch", "width", "repeats"), 1)
    if cfg.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {cfg.warmup}")


def _time_strategy(cfg, ds, loss_fn, tx, model_init, backend, n, batch_size):
    """:class:`common.Timing` of one data-parallel step on a global batch of ``batch_size``."""
    import jax
    import jax.numpy as jnp

    from jaxsync.parallel.data_parallel import make_data_parallel

    strategy = make_data_parallel(loss_fn, tx, model_init, backend=backend, num_devices=n)
    state = strategy.init(jax.random.key(cfg.seed), jnp.asarray(ds.x_train[:1]))
    batch = strategy.put_batch(ds.batch(0, batch_size, cfg.seed))
    # The first call compiles, so at least one untimed call whatever cfg.warmup says.
    return common.time_calls(
        strategy.step,
        (state, batch),
        warmup=max(cfg.warmup, 1),
        repeats=cfg.repeats,
        feed_back=True,
    )


def run_scaling(cfg: ScalingConfig, log=print) -> list[dict]:
    """One row per (mode, strategy, N): step time, throughput, speedup and efficiency vs N_min."""
    from jaxsync import data, losses, models, optim
    from jaxsync.mesh import check_device_count

    validate_scaling(cfg)
    check_device_count(max(cfg.devices))
    ds = data.load_dataset(cfg.dataset, cfg.seed)
    need = max(cfg.per_device_batch * max(cfg.devices), cfg.global_batch)
    if need > len(ds.x_train):
        raise ConfigError(
            f"a global batch of {need} exceeds the {len(ds.x_train)} training "
            f"examples of {cfg.dataset}"
        )
    model = models.make_model("mlp", ds.num_outputs, cfg.width)
    loss_fn = losses.make_loss_fn(model.apply, ds.task)
    tx = optim.make_optimizer(optim.OptimConfig(optimizer="sgd", learning_rate=0.01))
    model_init = lambda r, x: model.init(r, x)["params"]
    rows = []
    for mode in cfg.modes:
        for backend in cfg.strategies:
            base = None
            for n in sorted(cfg.devices):
                batch = cfg.global_batch if mode == STRONG else cfg.per_device_batch * n
                timing = _time_strategy(cfg, ds, loss_fn, tx, model_init, backend, n, batch)
                sec = timing.seconds
                row = {
                    "mode": mode,
                    "strategy": backend,
                    "devices": n,
                    "global_batch": batch,
                    "per_device_batch": batch // n,
                    "step_ms": sec * 1e3,
                    "cpu_ms": timing.cpu_seconds * 1e3,
                    "examples_per_s": batch / sec,
                }
                base = base or row
                row["speedup"] = row["examples_per_s"] / base["examples_per_s"]
                row["efficiency"] = common.scaling_efficiency(
                    row["examples_per_s"], base["examples_per_s"], n, base["devices"]
                )
                rows.append(row)
                log(
                    f"{mode} {backend} N={n} B={batch}: {row['step_ms']:.2f} ms/step, "
                    f"{row['examples_per_s']:.0f} examples/s, E={row['efficiency']:.2f}"
                )
    return rows


def scaling_table(rows: list[dict], mode: str) -> str:
    """Markdown table of one mode's rows; the ideal (linear) speedup beside the measured one."""
    headers = [
        "strategy",
        "N",
        "global batch",
        "per-device batch",
        "step ms",
        "CPU ms",
        "examples/s",
        "speedup",
        "ideal speedup (N/N₁, formula)",
        "efficiency",
    ]
    body = []
    for r in rows:
        if r["mode"] != mode:
            continue
        base_n = min(x["devices"] for x in rows if x["mode"] == mode)
        body.append(
            [
                r["strategy"],
                r["devices"],
                r["global_batch"],
                r["per_device_batch"],
                r["step_ms"],
                r.get("cpu_ms"),
                r["examples_per_s"],
                r["speedup"],
                r["devices"] / base_n,
                r["efficiency"],
            ]
        )
    return common.markdown_table(headers, body)


@dataclasses.dataclass(frozen=True)
class LSRConfig:
    """Linear-scaling-rule sweep at a fixed number of epochs."""

    batch_sizes: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    base_batch: int = 32
    base_lr: float = 0.01
    epochs: int = 90
    warmup_epochs: int = 5
    optimizer: str = "momentum"
    schedule: str = "cosine"
    dataset: str = "digits"
    width: int = 64
    strategy: str = "single"
    num_devices: int = 1
    seeds: tuple[int, ...] = (0, 1, 2)


# (name, scale the learning rate with B, gradual warmup)
LSR_VARIANTS = (
    ("linear + warmup", True, True),
    ("linear, no warmup", True, False),
    ("no scaling", False, False),
)


def lsr_runs(cfg: LSRConfig, n_train: int) -> list[dict]:
    """The runs of the sweep: batch, variant, learning rate, steps and warmup steps."""
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1 or cfg.base_batch < 1:
        raise ConfigError("--batch_sizes and --base_batch must be >= 1")
    if not cfg.base_lr > 0 or cfg.epochs < 1 or not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise ConfigError("need --base_lr > 0, --epochs >= 1 and 0 <= --warmup_epochs <= --epochs")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"--seeds must be distinct and at least one, got {list(cfg.seeds)}")
    runs = []
    for b in cfg.batch_sizes:
        if b > n_train:
            raise ConfigError(f"batch {b} exceeds the {n_train} training examples")
        per_epoch = n_train // b
        for name, scaled, warm in LSR_VARIANTS:
            runs.append(
                {
                    "batch": b,
                    "variant": name,
                    "lr": cfg.base_lr * (b / cfg.base_batch if scaled else 1.0),
                    "steps": cfg.epochs * per_epoch,
                    "warmup_steps": cfg.warmup_epochs * per_epoch if warm else 0,
                }
            )
    return runs


def run_lsr(cfg: LSRConfig, log=print) -> list[dict]:
    """Train every run of :func:`lsr_runs` for every seed with ``train_and_evaluate``; one row per
    (run, seed) with its final metrics and the test-set size."""
    from jaxsync import data, optim
    from jaxsync.runs import make
    from jaxsync.train import TrainConfig, train_and_evaluate

    rows = []
    for seed in cfg.seeds:
        ds = data.load_dataset(cfg.dataset, seed)
        done = {}  # identical (lr, steps, warmup) runs, e.g. every variant's B = B₀, train once
        for run in lsr_runs(cfg, len(ds.x_train)):
            key = (run["batch"], run["lr"], run["warmup_steps"])
            if key not in done:
                oc = optim.OptimConfig(
                    optimizer=cfg.optimizer,
                    learning_rate=run["lr"],
                    schedule=cfg.schedule,
                    warmup_steps=run["warmup_steps"],
                    total_steps=run["steps"],
                )
                tc = make(
                    TrainConfig,
                    strategy=cfg.strategy,
                    num_devices=cfg.num_devices,
                    model="mlp",
                    width=cfg.width,
                    dataset=cfg.dataset,
                    optim=oc,
                    batch_size=run["batch"],
                    steps=run["steps"],
                    seed=seed,
                    log_every=run["steps"],
                    eval_every=run["steps"],
                    quiet=True,
                    max_nonfinite=0,
                )  # a diverged run is a result, not an error
                done[key] = train_and_evaluate(tc)
            s = done[key]
            finite = all(math.isfinite(s.get(k) or math.nan) for k in ("final_loss", "eval_loss"))
            row = {
                **run,
                "seed": seed,
                "n_test": len(ds.x_test),
                "eval_accuracy": s.get("eval_accuracy"),
                "eval_loss": s.get("eval_loss"),
                "final_loss": s.get("final_loss"),
                "diverged": not finite,
            }
            rows.append(row)
            acc = row["eval_accuracy"]
            log(
                f"seed {seed} B={run['batch']} {run['variant']}: lr {run['lr']:.3g}, "
                f"{run['steps']} steps, eval accuracy "
                f"{'–' if acc is None else f'{acc:.4f}'}{'' if finite else ' (diverged)'}"
            )
    return rows


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / √k; 0 for one value)."""
    k = len(values)
    mean = sum(values) / k
    if k < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (k - 1)
    return mean, math.sqrt(var / k)


def percent_decimals(n: int) -> int:
    """Decimals of a percentage measured on ``n`` examples: its resolution is 100/n %, so
    0 decimals for n <= 100, 1 up to 1,000, 2 up to 10,000."""
    return max(0, math.ceil(-math.log10(100.0 / n) - 1e-9))


def error_percent(rows: list[dict]) -> list[float]:
    """Test error in % of each row that has an accuracy."""
    return [100.0 * (1.0 - r["eval_accuracy"]) for r in rows if r["eval_accuracy"] is not None]


def lsr_table(rows: list[dict]) -> str:
    """Test error (%) per batch size (rows) and variant (columns): mean ± standard error over
    the seeds, to the resolution of the test set, with the steps of each run and the linearly
    scaled rate; ``(k diverged)`` counts seeds whose loss went non-finite."""
    variants = [v[0] for v in LSR_VARIANTS]
    seeds = sorted({r["seed"] for r in rows})
    decimals = percent_decimals(min(r["n_test"] for r in rows))
    headers = ["global batch", "steps", "η (linear)"] + [
        f"{v}: error % ({len(seeds)} seeds)" for v in variants
    ]
    body = []
    for b in sorted({r["batch"] for r in rows}):
        at_b = [r for r in rows if r["batch"] == b]
        lin = next((r for r in at_b if r["variant"] in variants[:2]), None)
        cells = [b, at_b[0]["steps"], lin["lr"] if lin else None]
        for v in variants:
            runs = [r for r in at_b if r["variant"] == v]
            errors = error_percent(runs)
            if not errors:
                cells.append(None)
                continue
            m, se = mean_se(errors)
            cell = (
                f"{m:.{decimals}f} ± {se:.{decimals}f}" if len(errors) > 1 else f"{m:.{decimals}f}"
            )
            diverged = sum(r["diverged"] for r in runs)
            cells.append(cell + (f" ({diverged} diverged)" if diverged else ""))
        body.append(cells)
    return common.markdown_table(headers, body, digits=4)


# Goyal et al. 2017, Table 1 (ResNet-50 on ImageNet, 90 epochs, η = 0.1·kn/256; top-1 validation
# error, mean of 5 runs): the reference beside our error table.
GOYAL_TABLE = (
    ("256", "none (η = 0.1)", "23.60"),
    ("8k", "no warmup (η = 3.2)", "24.84"),
    ("8k", "gradual warmup, 5 epochs", "23.74"),
)

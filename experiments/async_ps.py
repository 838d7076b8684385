"""Asynchronous SGD around a parameter server: emulated stale gradients or real worker threads.

Emulated (jit, seeded, bitwise reproducible), 8 round-robin workers, each gradient 7 versions old:

  python experiments/async_ps.py --mode=emulated --staleness_model=round_robin --num_workers=8

Fixed staleness τ = 4 with the staleness-aware learning rate η/τ (Zhang et al. 2016):

  python experiments/async_ps.py --staleness=4 --staleness_aware_lr

Real threads, 4 workers on 4 emulated CPU devices, one of them 4x slower, FIFO lock:

  python experiments/async_ps.py --mode=threads --num_workers=4 --straggler_fraction=0.25 \
      --straggler_slowdown=4 --lock=fifo --steps=200

DC-ASGD-a (adaptive λ_t, Zheng et al. 2017) at τ = 16, and asynchronous EASGD (Zhang et al.
2015) on 4 worker threads, an elastic exchange every 4 local steps (--steps: local steps in all):

  python experiments/async_ps.py --staleness=16 --dc_lambda=1 --dc_adaptive
  python experiments/async_ps.py --mode=threads --num_workers=4 --elastic_alpha=0.2 \
      --elastic_period=4 --steps=400

The schedule of a described cluster (jaxsync.cluster): 64 workers on 25 GbE, 5 % of them 2x
slower, each gradient 100 MB; sim_time in the log is simulated seconds:

  python experiments/async_ps.py --staleness_model=simulated --cluster=ethernet --steps=200

Checkpointed every 50 updates into a run folder; run the same line again after a crash (even
SIGKILL) to resume from the latest checkpoint, bit for bit (emulated mode only; threads mode rejects
the checkpoint flags, since thread scheduling is not reproducible):

  python experiments/async_ps.py --staleness=4 --steps=400 --workdir=/tmp/async_run \
      --checkpoint_every=50

The summary line carries final_loss, eval metrics, step_time_ms, param_checksum and the staleness
histogram; with ``--staleness=0`` the checksum equals ``experiments/train.py --strategy=single``.
"""

import dataclasses

from absl import flags

from jaxsync import cli
from jaxsync.async_ps.lock import LOCK_POLICIES
from jaxsync.async_ps.staleness import STALENESS_MODELS, StalenessConfig
from jaxsync.async_ps.train import MODES, AsyncConfig
from jaxsync.cluster.spec import PRESETS, parse_cluster
from jaxsync.runs import RunConfig

FLAGS = flags.FLAGS
ASYNC = {  # AsyncConfig field -> help; each default is AsyncConfig's
    "mode": f"{' | '.join(MODES)}: jit staleness replay, or real worker threads.",
    "lock": f"Lock policy of the server update (threads): {' | '.join(LOCK_POLICIES)} (none: "
    "lock-free, Hogwild-style).",
    "staleness_aware_lr": "Divide each gradient's learning rate by max(τ, 1) (Zhang et al. 2016).",
    "dc_lambda": "DC-ASGD (Zheng et al. 2017): compensate each stale gradient, "
    "g + λ·g⊙g⊙(w_now − w_stale); λ >= 0, 0: off.",
    "dc_adaptive": "DC-ASGD-a: element-wise λ_t = λ/sqrt(MeanSquare(t) + ε), MeanSquare the "
    "moving average of g⊙g (needs --dc_lambda > 0 as λ₀).",
    "dc_momentum": "DC-ASGD-a's mean-square decay m, in [0, 1).",
    "elastic_alpha": "Asynchronous EASGD (Zhang et al. 2015, Algorithm 2; --mode=threads): "
    "moving rate α in (0, 1) of each worker's elastic exchange with the center; 0: off.",
    "elastic_period": "Asynchronous EASGD's τ: local steps of a worker between exchanges (>= 1).",
    "timeout_s": "Bound on every wait and on a threads run, seconds (> 0).",
    "fail_worker": "Threads mode demo: make this worker raise after 2 pushes (-1: none).",
}
STALENESS = {  # StalenessConfig field (--staleness_model: model) -> help
    "num_workers": "Workers (>= 1); threads mode needs one device each.",
    "staleness": "Emulated staleness τ in server versions (>= 0): the value "
    "for --staleness_model=fixed, the upper bound for uniform.",
    "staleness_model": f"Emulated staleness: {' | '.join(STALENESS_MODELS)}. round_robin: "
    "τ ≈ num_workers - 1; stragglers: slow workers; transient: any gradient slow with "
    "probability --straggler_fraction; simulated: a described --cluster's compute and links.",
    "straggler_fraction": "Fraction of workers that are slow, in [0, 1].",
    "straggler_slowdown": "How many times slower a straggler is (>= 1).",
    "n_push": "Pushes averaged into one server update (Downpour's n_push, >= 1).",
    "ssp_bound": "Stale Synchronous Parallel bound (round_robin / stragglers / transient / "
    "simulated models, threads mode): max clocks a worker may run ahead of the slowest (>= 0); "
    "-1 = unbounded.",
    "cluster": "With --staleness_model=simulated: the cluster whose timing makes the schedule, "
    f"a preset ({' | '.join(PRESETS)}) optionally followed by :field=value,... (e.g. "
    "ethernet:workers=16,jitter_sigma=0.3); --num_workers defaults to its worker count.",
}
RENAMED = {"staleness_model": "model"}
cli.define_fields(AsyncConfig(), ASYNC)
# StalenessConfig's defaults, but 4 workers on the command line (the library's default is 1).
cli.define_fields(dataclasses.replace(StalenessConfig(), num_workers=4), STALENESS, RENAMED)
cli.define_device_flags()
cli.define_model_data_flags()
cli.define_optim_flags()
# RunConfig's defaults (the guard on, unlike AsyncConfig's library default); steps are updates.
cli.define_run_flags(RunConfig(), omit=("check_replicas",))


def main(argv):
    cli.init_runtime()
    from jaxsync.async_ps.train import train_async

    run = cli.run_config_from_flags()
    if FLAGS.mode == "threads" and not FLAGS["max_nonfinite"].present:
        run = dataclasses.replace(run, max_nonfinite=0)  # the guard's default is emulated-only
    fields = cli.fields_from_flags(STALENESS, RENAMED)
    if FLAGS.cluster and not FLAGS["num_workers"].present:  # the cluster's workers, by default
        fields["num_workers"] = parse_cluster(FLAGS.cluster).workers
    staleness = StalenessConfig(**fields, seed=run.seed)
    cfg = AsyncConfig(
        **cli.fields_from_flags(ASYNC),
        staleness=staleness,
        **cli.model_data_kwargs_from_flags(),
        run=run,
    )
    summary = train_async(cfg)
    print("summary " + " ".join(f"{k}={v}" for k, v in summary.items() if k != "summary"))


if __name__ == "__main__":
    cli.run(main)

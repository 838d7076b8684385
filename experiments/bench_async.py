"""Asynchronous SGD benchmark: how staleness, η/τ and SSP bounds change convergence.

  python experiments/bench_async.py --quick        # 100 updates per run (a few minutes on 2 cores)
  python experiments/bench_async.py                # 300 updates per run

Same model, data and batches for every run (2-layer MLP, width 32, teacher task, SGD, batch 64):
1. sync SGD (``single`` strategy) and emulated async with fixed staleness τ ∈ {0, 1, 4, 16},
   with a fixed learning rate and with the staleness-aware rate η/τ (Zhang et al. 2016), and
   DC-ASGD (constant λ) and DC-ASGD-a (adaptive λ_t, Zheng et al. 2017) at τ ∈ {4, 16};
2. 8 simulated workers with transient stragglers (each gradient 4× slower with probability 1/8):
   BSP (= SSP with s = 0), SSP s ∈ {1, 4} (Ho et al. 2013) and fully async, against updates and
   simulated time;
3. real threads (1 vs 4 workers, ``fifo`` vs ``none`` lock, a 4× straggler, SSP s = 1, and
   asynchronous EASGD at τ ∈ {1, 4}, fifo and lock-free, Zhang et al. 2015): measured
   staleness, pushes/s, lost updates;
4. scaling of the threaded server: pushes/s for 1, 2, 4 and 8 workers, ``fifo`` and ``none``, on
   a compute-bound gradient, beside the gradients/s of the same threads without a server.
Prints markdown tables and writes ``<out>/bench_async.json`` and ``<out>/bench_async.png``.
"""

import json
import os

from absl import flags

from jaxsync import ConfigError, cli

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small run: 100 updates per configuration (else 300).")
flags.DEFINE_float("lr", 0.2, "SGD learning rate of every run (> 0).")
flags.DEFINE_string("out", "results", "Folder for bench_async.json and bench_async.png.")
cli.define_device_flags()


def main(argv):
    if not FLAGS.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {FLAGS.lr}")
    cli.init_runtime()
    from jaxsync.benchmarks import async_ps as bench

    steps = 100 if FLAGS.quick else 300
    runs = bench.run_convergence(steps, FLAGS.lr)
    rows, target, common = bench.report_rows(runs)
    threads = bench.run_threads(steps, FLAGS.lr)
    scaling = bench.run_scaling(pushes=64 if FLAGS.quick else 160)
    os.makedirs(FLAGS.out, exist_ok=True)
    png = os.path.join(FLAGS.out, "bench_async.png")
    bench.plot(runs, png)
    with open(os.path.join(FLAGS.out, "bench_async.json"), "w") as f:
        json.dump(
            {
                "steps": steps,
                "lr": FLAGS.lr,
                "target_eval_loss": target,
                "common_sim_time": common,
                "rows": rows,
                "threads": threads,
                "scaling": scaling,
                "scaling_model": {
                    "width": bench.SCALING_WIDTH,
                    "depth": bench.SCALING_DEPTH,
                    "batch": bench.SCALING_BATCH,
                },
                "curves": {k: r for k, (_, r) in runs.items()},
            },
            f,
            indent=1,
        )
    print(
        f"\n{steps} updates, SGD lr {FLAGS.lr}; target = sync eval loss at half the run "
        f"({target:.4f}); common simulated time t={common:g}\n"
    )
    print(bench.markdown(rows))
    print()
    print(bench.markdown(threads))
    print(
        f"\nThreaded server scaling: a {bench.SCALING_DEPTH}-layer tanh network of width "
        f"{bench.SCALING_WIDTH}, batch {bench.SCALING_BATCH}, SGD; pushes/s are medians of 3 "
        "runs (measured); lost updates and CAS retries are counted\n"
    )
    print(bench.markdown(scaling))
    print(f"\nwrote {FLAGS.out}/bench_async.json and {png}")


if __name__ == "__main__":
    cli.run(main)

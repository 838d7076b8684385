"""Mode-coverage benchmark: seeds × {plain GAN, remedies} on ring8, grid25 and the 8x8 digits.

Seeds train together (vmap) on one device; mean ± standard error beside PacGAN's Table 1. Writes
a markdown table to stdout, JSON to --out and seed 0's picture per cell under --plot_dir:

  python experiments/bench_gan.py                      # ring8, grid25, digits; 5 seeds
  python experiments/bench_gan.py --datasets=grid25 --remedies=pac+r1,r1 --seeds=3
  python experiments/bench_gan.py --quick              # 2 seeds, a quarter of the steps
  python experiments/bench_gan.py --datasets=digits --seeds=3

--keep_existing keeps the cells already in --out (same data set, method, steps and seeds) and
runs only the others, so a remedy can be added to a committed table without rerunning it; the
JSON's "command" is the invocation without that flag, which rewrites the whole file from scratch.
"""

import json
import os
import sys

from absl import flags

from jaxsync import ConfigError, cli

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "datasets", ["ring8", "grid25", "digits"], "Data sets: ring8, grid25, digits (scikit-learn)."
)
flags.DEFINE_integer("seeds", 5, "Seeds per cell (>= 2 for a standard error).")
flags.DEFINE_list(
    "remedies",
    ["pac+r1"],
    "Remedies compared with the plain GAN, each '+'-joined from pac, r1, unroll (e.g. pac+r1).",
)
flags.DEFINE_integer("pac", 2, "PacGAN packing degree m (>= 2) when --remedies has pac.")
flags.DEFINE_float("r1_gamma", None, "R1 weight γ when --remedies has r1; unset: the preset.")
flags.DEFINE_integer("unroll_steps", None, "Unrolled D updates K; unset: the preset.")
flags.DEFINE_integer("steps", 0, "Steps per run; 0 takes the per-data-set preset.")
flags.DEFINE_bool("quick", False, "2 seeds and a quarter of the steps.")
flags.DEFINE_string("out", "results/bench_gan.json", "JSON output path.")
flags.DEFINE_string("plot_dir", "results/bench_gan", "Folder for the PNGs; '' for none.")
flags.DEFINE_bool(
    "keep_existing",
    False,
    "Keep the cells already in --out with the same data set, method, steps and seeds; run only "
    "the missing ones.",
)
cli.define_device_flags(default_devices=1)


def main(argv):
    cli.init_runtime()
    from jaxsync.benchmarks import gan as benchmark

    if "none" in FLAGS.remedies:
        raise ConfigError(
            "--remedies lists remedies (pac, r1, unroll or joined, e.g. pac+r1); the plain GAN "
            "always runs"
        )
    if FLAGS.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {FLAGS.seeds}")
    for dataset in FLAGS.datasets:  # bad names and a missing scikit-learn fail before any run
        benchmark.bench_config(dataset, "none")
        if dataset == "digits":
            from jaxsync.data import digits

            digits(0)
    seeds = list(range(2 if FLAGS.quick else FLAGS.seeds))
    kept = existing_rows() if FLAGS.keep_existing else {}
    rows = []
    for dataset in FLAGS.datasets:
        for remedy in ["none", *FLAGS.remedies]:
            cfg = benchmark.bench_config(
                dataset,
                remedy,
                FLAGS.quick,
                pac=FLAGS.pac,
                r1_gamma=FLAGS.r1_gamma,
                unroll_steps=FLAGS.unroll_steps,
                steps=FLAGS.steps or None,
            )
            method = benchmark.method_name(cfg)
            row = kept.get((dataset, method, cfg.run.steps, len(seeds)))
            if row is None:
                row = benchmark.run_cell(cfg, method, seeds, FLAGS.plot_dir)
            rows.append(row)
            print(benchmark.markdown_table([row]).splitlines()[-1], flush=True)
            write_json(rows, benchmark)  # after every cell: a long run stopped early keeps its rows
    print("\n" + benchmark.markdown_table(rows))
    print(f"wrote {FLAGS.out}")


def existing_rows() -> dict:
    """The rows of the --out JSON by (dataset, method, steps, seeds); none when it is absent."""
    if not os.path.exists(FLAGS.out):
        return {}
    with open(FLAGS.out, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    return {(r["dataset"], r["method"], r["steps"], r["seeds"]): r for r in rows}


def write_json(rows, benchmark):
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    table = benchmark.markdown_table(rows)
    args = [a for a in sys.argv[1:] if a not in ("--keep_existing", "--keep_existing=true")]
    command = " ".join(["python experiments/bench_gan.py", *args])
    with open(FLAGS.out, "w", encoding="utf-8") as f:
        json.dump(
            {"command": command, "rows": rows, "table": table, "published": benchmark.__doc__},
            f,
            indent=1,
        )


if __name__ == "__main__":
    cli.run(main)

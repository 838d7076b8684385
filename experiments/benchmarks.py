"""The benchmark suite: every section's script, then BENCHMARKS.md with tables and plots.

    python experiments/benchmarks.py --quick          # under 10 minutes on an idle 2-core machine
    python experiments/benchmarks.py                  # full sweeps (much longer)
    python experiments/benchmarks.py --sections=lsr,gan  # some sections, full size

The test's run, the smallest: --smoke --sections=allreduce,scaling --report=... --results_dir=...
--allow_dirty.

The report's header names the git revision it measured, so the suite refuses to start (exit 2)
when tracked files have uncommitted changes (its own outputs, --report and --results_dir, aside);
--allow_dirty runs anyway for development and marks the header "not a committed revision".
The full-length RL and GAN runs are rendered from their committed JSON in docs/full_runs/.

Sections (each a subprocess with its own JAX runtime and a bounded timeout): all-reduce,
data-parallel scaling, linear scaling rule, async/staleness, model parallel, distributed
optimizers, RL, GAN, multi-host. A section whose script is missing, fails or times out is
reported with its error line and no numbers, and the suite then exits 1 unless --allow_missing.
"""

import os
import shlex
import sys

from absl import flags

from jaxsync import cli

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Every section's small configuration (--quick).")
flags.DEFINE_bool(
    "smoke",
    False,
    "The smallest configuration of each section (seconds; for tests), overrides --quick.",
)
flags.DEFINE_list(
    "sections",
    None,
    "Sections to run, in the suite's order (default: all): "
    "allreduce, scaling, lsr, async, model_parallel, optimizers, rl, gan, multihost.",
)
flags.DEFINE_string("report", "BENCHMARKS.md", "Path of the markdown report written at the end.")
flags.DEFINE_string("results_dir", "results", "Folder for every section's JSON and the PNG plots.")
flags.DEFINE_float(
    "section_timeout",
    0,
    "Seconds before a section's script is stopped (> 0); "
    "0: 900 with --quick/--smoke, 7200 in full mode.",
)
flags.DEFINE_bool("allow_missing", False, "Exit 0 even when a section is missing or failed.")
flags.DEFINE_bool(
    "allow_dirty",
    False,
    "Run on a tree with uncommitted changes to tracked files (development only: the report's "
    "header then says it is not a committed revision).",
)
flags.DEFINE_integer(
    "cpu_devices",
    8,
    "CPU devices to emulate in this process (the machine line); each section sets its own.",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
    from jaxsync.benchmarks import common
    from jaxsync.benchmarks import suite as benchsuite

    mode = "smoke" if FLAGS.smoke else "quick" if FLAGS.quick else "full"
    timeout = FLAGS.section_timeout or (7200.0 if mode == "full" else 900.0)
    cfg = benchsuite.SuiteConfig(
        mode=mode,
        sections=tuple(FLAGS.sections or benchsuite.SECTION_KEYS),
        report_path=FLAGS.report,
        results_dir=FLAGS.results_dir,
        timeout_s=timeout,
        command=" ".join(["python", "experiments/benchmarks.py", *map(shlex.quote, sys.argv[1:])]),
        root=ROOT,
        allow_dirty=FLAGS.allow_dirty,
    )
    benchsuite.validate(cfg)
    inherited = os.environ.get("XLA_FLAGS")
    cli.init_runtime()
    machine = common.describe_machine()
    # Each section sets its own device count: hand the children the environment we were given.
    if inherited is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = inherited
    results = benchsuite.run_suite(cfg, machine)
    bad = [f"{r.section.key} ({r.status})" for r in results if r.status != "ok"]
    if bad and not FLAGS.allow_missing:
        print(
            f"error: {len(bad)} section(s) without results: {', '.join(bad)}; see "
            f"{FLAGS.report} (--allow_missing to exit 0)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)

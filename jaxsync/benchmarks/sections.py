"""What the benchmark suite runs: one :class:`Section` per benchmark script (arguments per mode,
its JSON), and the committed :data:`FULL_RUNS` too long for the suite."""

from __future__ import annotations

import dataclasses

from jaxsync.benchmarks import allreduce, cluster_validation
from jaxsync.benchmarks import render as benchrender


@dataclasses.dataclass(frozen=True)
class Section:
    """One benchmark script: its arguments per mode and where it writes its JSON.

    ``output_args`` holds ``{results}`` placeholders filled with the results folder; ``render``
    names a function of :mod:`jaxsync.benchmarks.render` (``generic`` embeds the tables it printed).
    """

    key: str
    title: str
    script: str
    intro: str
    args: dict
    output_args: tuple[str, ...]
    json_name: str
    render: str = "generic"
    pngs: tuple[str, ...] = ()
    quick_note: str = ""  # printed in quick/smoke mode, where quality numbers are not results
    quick_columns: tuple[str, ...] = ()  # printed column headers to label "quick length" then


def _same(args):
    return {"smoke": args, "quick": args, "full": []}


SECTIONS = (
    Section(
        "allreduce",
        "All-reduce (nccl-tests style)",
        "experiments/bench_allreduce.py",
        allreduce.INTRO,
        {
            "smoke": [
                "--devices=2",
                "--min_bytes=4K",
                "--max_bytes=16K",
                "--repeats=1",
                "--warmup=0",
                "--rings=1,2",
            ],
            "quick": [
                "--devices=2,4,8",
                "--min_bytes=4K",
                "--max_bytes=1M",
                "--repeats=5",
                "--rings=1,2",
            ],
            "full": ["--devices=2,4,8", "--min_bytes=4K", "--max_bytes=64M", "--rings=1,2"],
        },
        ("--output={results}/bench_allreduce.json",),
        "bench_allreduce.json",
        "allreduce",
    ),
    Section(
        "scaling",
        "Data-parallel scaling",
        "experiments/bench_scaling.py",
        benchrender.SCALING_INTRO,
        {
            "smoke": [
                "--devices=1,2",
                "--strategies=psum,ring",
                "--repeats=1",
                "--warmup=0",
                "--global_batch=64",
                "--per_device_batch=16",
                "--width=16",
            ],
            "quick": ["--quick"],
            "full": [],
        },
        ("--output={results}/bench_scaling.json",),
        "bench_scaling.json",
        "scaling",
    ),
    Section(
        "lsr",
        "Linear scaling rule (Goyal et al. 2017)",
        "experiments/bench_lsr.py",
        benchrender.LSR_INTRO,
        {
            "smoke": ["--batch_sizes=32,64", "--epochs=1", "--warmup_epochs=1", "--width=16"],
            "quick": ["--quick"],
            "full": [],
        },
        ("--output={results}/bench_lsr.json",),
        "bench_lsr.json",
        "lsr",
    ),
    Section(
        "async",
        "Asynchronous SGD and staleness",
        "experiments/bench_async.py",
        "Zhang et al. 2016 (staleness-aware learning rate η/τ) and Ho et al. 2013 (stale "
        "synchronous parallel, SSP): convergence against staleness and bounds.",
        _same(["--quick"]),
        ("--out={results}",),
        "bench_async.json",
        pngs=("bench_async.png",),
    ),
    Section(
        "model_parallel",
        "Model parallelism (tensor, GPipe)",
        "experiments/bench_model_parallel.py",
        "Tensor parallelism and GPipe pipelining (Huang et al. 2019): step time and "
        "per-device parameter bytes versus P; the pipeline bubble beside (P−1)/(M+P−1).",
        _same(["--quick"]),
        ("--output={results}/bench_model_parallel.json",),
        "bench_model_parallel.json",
    ),
    Section(
        "optimizers",
        "Distributed optimizers",
        "experiments/bench_optimizers.py",
        "Sharded optimizer state (ZeRO, Rajbhandari et al. 2020), local SGD and gradient "
        "compression with error feedback: memory and loss against communicated bytes.",
        _same(["--quick"]),
        ("--output={results}/bench_optimizers.json",),
        "bench_optimizers.json",
    ),
    Section(
        "methods",
        "Synchronisation methods beside their papers",
        "experiments/bench_methods.py",
        "Every method on one task (same model, batches, initial parameters and inner SGD): "
        "synchronous SGD, local SGD, DiLoCo (Douillard et al. 2023), Streaming DiLoCo "
        "(Douillard et al. 2025), EASGD (Zhang et al. 2015), PowerSGD (Vogels et al. 2019), "
        "gossip SGD (Lian et al. 2017; Assran et al. 2019) and, emulated, async SGD and DC-ASGD "
        "(Zheng et al. 2017); each paper's headline claim beside this run's numbers. Bytes are "
        "counted, losses measured; 'same direction' means an eval loss within 5% of the "
        "comparator's (a tolerance fixed before the runs).",
        _same(["--quick"]),
        ("--output={results}/bench_methods.json",),
        "bench_methods.json",
        pngs=("bench_methods.png",),
        quick_note="64 steps of a width-64 MLP: the directions are this small run's, not the "
        "papers' settings (billions of tokens, hundreds of GPUs).",
    ),
    Section(
        "cluster",
        "Simulated cluster clock: cost model and event throughput",
        "experiments/bench_cluster.py",
        "The α–β cost (Hockney 1994; Thakur, Rabenseifner & Gropp 2005) of each communication "
        "pattern on the datacenter, ethernet and wan presets (jaxsync.cluster), for a 25M and a "
        "1B-parameter float32 model: modelled seconds, not measurements; and the measured time "
        "to simulate a 1,000-worker asynchronous schedule of 10,000 events (issue #17 asks for "
        "under a second).",
        _same([]),
        ("--output={results}/bench_cluster.json",),
        "bench_cluster.json",
    ),
    Section(
        "cluster_validation",
        "Simulated cluster clock against measured all-reduces and published clusters",
        "experiments/bench_cluster_validation.py",
        cluster_validation.INTRO,
        {
            "smoke": [
                "--processes=2,3",
                "--train_processes=2",
                "--min_bytes=4K",
                "--max_bytes=256K",
                "--shaped_min_bytes=4K",
                "--shaped_max_bytes=256K",
                "--repeats=3",
                "--shaped_repeats=3",
                "--warmup=1",
                "--rounds=1",
            ],
            "quick": ["--quick"],
            "full": [],
        },
        ("--output={results}/bench_cluster_validation.json",),
        "bench_cluster_validation.json",
        "cluster_validation",
    ),
    Section(
        "rl",
        "Reinforcement learning",
        "experiments/bench_rl.py",
        "Pure-JAX environments and agents (PPO, Schulman et al. 2017; DQN): learning curves "
        "and environment steps per second.",
        _same(["--quick"]),
        ("--out={results}/bench_rl",),
        "bench_rl.json",
        pngs=("bench_rl_curves.png",),
        quick_note="20k env steps and 1 seed check the wiring and time the loop; at that length "
        "no agent is expected to solve CartPole, so the solved and return columns are not "
        'results. The 500k-step results are under "Full-length runs" below.',
        quick_columns=("seeds solved", "solved at (env steps)", "final mean return", "best"),
    ),
    Section(
        "gan",
        "GAN mode coverage",
        "experiments/bench_gan.py",
        "Modes recovered and high-quality samples on the 2-D mixtures beside PacGAN (Lin et al. "
        "2018, Table 1), and classifier scores of generated 8x8 digits.",
        _same(["--quick"]),
        ("--out={results}/bench_gan.json", "--plot_dir={results}/bench_gan"),
        "bench_gan.json",
        quick_note="2 seeds and a quarter of the preset steps: the mode and quality columns "
        "show a partly trained GAN, not the method's result. The 5-seed full-length tables are "
        'under "Full-length runs" below.',
        quick_columns=("modes", "HQ %", "reverse KL"),
    ),
    Section(
        "multihost",
        "Multi-process (multi-host) data parallelism",
        "experiments/bench_multihost.py",
        "One job laid out as K processes × M devices over gloo on loopback: step time "
        "against the single-process layout, measured in the same run.",
        _same(["--quick"]),
        ("--output={results}/bench_multihost.json",),
        "bench_multihost.json",
    ),
)
SECTION_KEYS = tuple(s.key for s in SECTIONS)


@dataclasses.dataclass(frozen=True)
class FullRun:
    """A committed result of a run too long for the suite: its JSON, and the command that wrote
    it (a ``command`` key in the JSON, when there is one, takes precedence). ``render`` names a
    function of :mod:`jaxsync.benchmarks.render`."""

    key: str
    title: str
    json_path: str  # relative to the repository root
    command: str
    intro: str
    render: str


_GAN_FULL_INTRO = (
    "5 seeds, mean ± standard error, at the presets' full length (one device, the seeds "
    "trained together with jax.vmap), beside PacGAN's Table 1; pictures and notes in "
    "docs/full_runs/README.md."
)
FULL_RUNS = (
    FullRun(
        "rl_full",
        "Reinforcement learning, 500k env steps",
        "docs/full_runs/bench_rl_quality.json",
        "python experiments/bench_rl.py --parts=quality --out=docs/full_runs/bench_rl_quality",
        "PPO on 1 and 8 devices and DQN on 1 device, 3 seeds, 500k env steps on CartPole-v1; "
        "solved = mean return of the last 100 episodes reached 475.",
        "rl",
    ),
    FullRun(
        "rl_speed_full",
        "Reinforcement learning speed, 500k env steps, equal work per env step",
        "docs/full_runs/bench_rl_speed.json",
        "python experiments/bench_rl.py --parts=speed --out=docs/full_runs/bench_rl_speed",
        "PPO on CartPole-v1 on 1-8 emulated devices with every sync backend: the global rollout "
        "stays 512 env steps per update and each update takes 16 optimizer steps, so every row "
        "does the same work per env step; env steps/s is the median of 3 timed runs after "
        "compilation, and 'vs 1 device' a ratio measured in the same run (8 emulated devices "
        "share 2 cores: not a hardware speedup).",
        "rl",
    ),
    FullRun(
        "gan_ring8_full",
        "GAN mode coverage, ring of 8 Gaussians, 10,000 steps",
        "docs/full_runs/bench_gan_ring8.json",
        "python experiments/bench_gan.py --datasets=ring8 --seeds=5 "
        "--remedies=pac,pac+r1,r1,unroll "
        "--out=docs/full_runs/bench_gan_ring8.json --plot_dir=out/png",
        _GAN_FULL_INTRO,
        "gan",
    ),
    FullRun(
        "gan_grid25_full",
        "GAN mode coverage, grid of 25 Gaussians, 20,000 steps",
        "docs/full_runs/bench_gan_grid25.json",
        "python experiments/bench_gan.py --datasets=grid25 --seeds=5 --remedies=pac,pac+r1,r1 "
        "--out=docs/full_runs/bench_gan_grid25.json --plot_dir=out/pngg",
        _GAN_FULL_INTRO,
        "gan",
    ),
)

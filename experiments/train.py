"""Supervised data-parallel training from the command line.

Default (ring all-reduce on 8 emulated CPU devices, well under a minute on a 2-core laptop):

  python experiments/train.py

Compare sync backends step by step (same global batches, same final parameters up to float error):

  python experiments/train.py --strategy=single --metrics_file=runs/single.jsonl
  python experiments/train.py --strategy=psum   --metrics_file=runs/psum.jsonl
  python experiments/train.py --strategy=ps --frontend=pmap --metrics_file=runs/ps.jsonl

Distributed optimizers (ZeRO sharded Adam; local SGD; k-step accumulation in bf16; top-k):

  python experiments/train.py --strategy=psum --optimizer=adam --learning_rate=0.003 \
      --shard_optimizer
  python experiments/train.py --strategy=ring --local_steps=4
  python experiments/train.py --grad_accum=4 --precision=bfloat16
  python experiments/train.py --strategy=ps --compression=topk --topk_ratio=0.05
"""

from absl import flags

from jaxsync import cli
from jaxsync.sync import backend_names
from jaxsync.train import TrainConfig

FLAGS = flags.FLAGS
# The strategy's flags: TrainConfig field -> help; each default is TrainConfig's.
STRATEGY = {
    "strategy": f"single | {' | '.join(backend_names())} (data parallel, jaxsync.sync.BACKENDS) "
    "| tp (tensor) | pp (pipeline, --pipeline_schedule) | dp_tp / dp_pp (data x tensor / "
    "pipeline mesh with --num_devices / --model_parallel replicas).",
    "frontend": "Front end for data parallelism: shard_map | pmap.",
    "model_parallel": "tp / dp_tp: devices per model replica; pp / dp_pp: pipeline "
    "stages (>= 1; must divide num_heads, 4*width and the 4 layers).",
    "microbatches": "pp / dp_pp: pipeline microbatches per data replica's batch (>= 1, "
    "divides it).",
    "pipeline_schedule": "pp / dp_pp: gpipe | 1f1b | interleaved | zb_h1 "
    "(jaxsync.parallel.schedules; a schedule is a table one executor runs).",
    "virtual_stages": "pp / dp_pp with --pipeline_schedule=interleaved: model chunks per device "
    "(>= 1; --model_parallel x it divides the layers).",
    "tp_collective": "tp / dp_tp all-reduce: psum (XLA) | ring (jaxsync.collectives).",
    "shard_optimizer": "psum | ring: ZeRO-1/2, each device keeps 1/N of the "
    "optimizer state (element-wise optimizers; --clip_norm is applied globally).",
    "local_steps": "0: synchronous SGD; H >= 1: local SGD, each device steps "
    "on its own data; parameters are averaged every H steps by the backend's collective.",
    "average_opt_state": "--local_steps >= 1: also average the optimizer state.",
    "outer_optimizer": "--local_steps=H >= 1: none (local SGD) | sgd | nesterov: DiLoCo, an outer "
    "step on the all-reduced pseudo-gradient every H steps (Douillard et al. 2023).",
    "outer_learning_rate": "DiLoCo outer learning rate (> 0; the paper's 0.7).",
    "outer_momentum": "DiLoCo Nesterov outer momentum in [0, 1) (the paper's 0.9).",
    "diloco_fragments": "Streaming DiLoCo (Douillard et al. 2025): P >= 1 parameter fragments, "
    "each with its outer step every H steps at a staggered offset (1: DiLoCo).",
    "outer_quantize": "DiLoCo outer pseudo-gradient messages: none (float32) or a low-precision "
    "format (jaxsync.sync.diloco.QUANTIZE).",
    "gossip_topology": "Gossip SGD (D-PSGD, Lian et al. 2017): none | ring | torus | exponential | "
    "one_peer_exponential | complete; each device averages with its neighbours by ppermute "
    "every --local_steps (0: every step), no all-reduce.",
    "elastic_alpha": "EASGD (Zhang et al. 2015): moving rate α in (0, 1) of the elastic step "
    "every --local_steps=τ between each worker and a center variable (0: off).",
    "grad_accum": "Microbatches per device per step (>= 1): one step on the "
    "global --batch_size, split k ways (divides --batch_size / --num_devices).",
    "precision": "float32 | bfloat16 (bfloat16 compute, float32 master weights and optimizer "
    "state).",
    "compression": "ring | ps gradient messages: none | bf16 | topk "
    "(largest --topk_ratio of each bucket); both with error feedback.",
    "topk_ratio": "--compression=topk: fraction of each gradient bucket sent, in (0, 1].",
    "cluster": cli.CLUSTER_HELP,
    "powersgd_rank": "PowerSGD (Vogels et al. 2019): rank-r gradient matrices with error "
    "feedback and a warm-started Q, two all-reduces per step, any backend (0: off).",
}
cli.define_fields(TrainConfig(), STRATEGY)
cli.define_device_flags()
cli.define_distributed_flags()
cli.define_model_data_flags()
cli.define_optim_flags()
cli.define_run_flags(TrainConfig().run)


def main(argv):
    cli.init_runtime()
    import jax

    from jaxsync.train import train_and_evaluate

    cfg = TrainConfig(
        num_devices=FLAGS.num_devices,
        **cli.fields_from_flags(STRATEGY),
        **cli.model_data_kwargs_from_flags(),
        run=cli.run_config_from_flags(TrainConfig().run),
    )
    summary = train_and_evaluate(cfg)
    if jax.process_index() == 0:
        print("summary " + " ".join(f"{k}={v}" for k, v in summary.items() if k != "summary"))


if __name__ == "__main__":
    cli.run(main)

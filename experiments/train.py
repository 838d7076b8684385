"""Supervised data-parallel training from the command line.

Default (ring all-reduce on 8 emulated CPU devices, well under a minute on a 2-core laptop):

  python experiments/train.py

Compare sync backends step by step (same global batches, same final parameters up to float error):

  python experiments/train.py --strategy=single --metrics_file=runs/single.jsonl
  python experiments/train.py --strategy=psum   --metrics_file=runs/psum.jsonl
  python experiments/train.py --strategy=ps --frontend=pmap --metrics_file=runs/ps.jsonl
"""

from absl import flags

from jaxsync import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("strategy", "ring", "single | psum | ring | ps.")
flags.DEFINE_string("frontend", "shard_map", "Front end for data parallelism: shard_map | pmap.")
cli.define_device_flags()
cli.define_model_data_flags()
cli.define_optim_flags()
cli.define_logging_flags()


def main(argv):
    cli.init_runtime()
    from jaxsync.train import TrainConfig, train_and_evaluate

    cfg = TrainConfig(
        strategy=FLAGS.strategy,
        frontend=FLAGS.frontend,
        num_devices=FLAGS.num_devices,
        model=FLAGS.model,
        width=FLAGS.width,
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        optim=cli.optim_config_from_flags(),
        batch_size=FLAGS.batch_size,
        steps=FLAGS.steps,
        seed=FLAGS.seed,
        log_every=FLAGS.log_every,
        eval_every=FLAGS.eval_every,
        metrics_file=FLAGS.metrics_file,
    )
    summary = train_and_evaluate(cfg)
    print("summary " + " ".join(f"{k}={v}" for k, v in summary.items() if k != "summary"))


if __name__ == "__main__":
    cli.run(main)

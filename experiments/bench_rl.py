"""RL benchmark: does PPO / DQN solve CartPole-v1 (quality), and how fast is PPO training (speed)?

Quality: PPO on 1 device (PureJaxRL's configuration, 4 envs × 128 steps) with PureJaxRL's
handling of the 500-step time limit (``truncation=terminate``, like for like with PureJaxRL) and
with ours (``bootstrap``: V of the final observation), PPO on 8 devices (1 env × 64 steps each,
the same 512-step global rollout), DQN on 1 device with both truncation modes; 3 seeds each, 500k
env steps. "Reached 475" means the mean return of the last 100 episodes reached 475 (CartPole-v1's
reward threshold) at some point; "solved at end" that it is >= 475 after the last step. Curves go
to a PNG.

Speed: env steps/s of a whole PPO training run after compilation, 500k env steps, on 1, 2, 4, 8
devices with psum and every other backend on the most devices. Every configuration does the same
work per env step: a 512-step global rollout (N devices × E envs × T steps = 512) and 4 epochs ×
4 minibatches, so 16 optimizer steps on 128-sample minibatches per 512 env steps. On emulated CPU
devices all devices share the same cores, so the scaling column measures sync overhead, not
hardware speedup.

  python experiments/bench_rl.py              # full run (tens of minutes on 2 CPU cores)
  python experiments/bench_rl.py --quick      # 20k env steps, 1 seed: checks the wiring
  python experiments/bench_rl.py --parts=quality --out=docs/full_runs/bench_rl_quality
"""

import json
import os
import sys

from absl import flags

from jaxsync import cli

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small run (20k env steps, 1 seed) to check the wiring.")
flags.DEFINE_string("parts", "quality,speed", "Comma-separated parts to run: quality, speed.")
flags.DEFINE_integer("seeds", 3, "Seeds per quality configuration (>= 1).")
flags.DEFINE_integer("total_steps", 500_000, "Env steps per run (all devices together).")
flags.DEFINE_string("speed_devices", "1,2,4,8", "Device counts for the speed table.")
flags.DEFINE_integer("repeats", 3, "Timed speed runs after compilation (median is reported).")
flags.DEFINE_string("out", "results/bench_rl", "Output prefix: <out>.json and <out>_curves.png.")
cli.define_device_flags(default_devices=8)


def main(argv):
    cli.init_runtime()
    from jaxsync import ConfigError
    from jaxsync.benchmarks.rl import plot_curves, print_tables, run_quality, run_speed, thin_curves

    parts = set(FLAGS.parts.split(","))
    if not parts <= {"quality", "speed"}:
        raise ConfigError(f"--parts must be from quality,speed; got {FLAGS.parts!r}")
    total = 20_480 if FLAGS.quick else FLAGS.total_steps
    seeds = 1 if FLAGS.quick else FLAGS.seeds
    devices = cli.int_list("speed_devices", FLAGS.speed_devices)
    quality, curves = run_quality(total, seeds) if "quality" in parts else ([], {})
    speed = run_speed(total, devices, FLAGS.repeats) if "speed" in parts else []
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out + ".json", "w", encoding="utf-8") as f:
        json.dump(
            {
                "total_steps": total,
                "seeds": seeds,
                "command": " ".join(["python", "experiments/bench_rl.py", *sys.argv[1:]]),
                "quality": quality,
                "speed": speed,
                "curves": thin_curves(curves),
            },
            f,
        )
    if curves:
        plot_curves(curves, FLAGS.out + "_curves.png")
    print_tables(quality, speed)


if __name__ == "__main__":
    cli.run(main)

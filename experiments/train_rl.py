"""Train PPO or DQN on a pure-JAX environment, data-parallel over devices, several seeds at once.

PPO on CartPole-v1, one device, 3 seeds vmapped (PureJaxRL's configuration: 4 envs × 128 steps,
4 epochs, 4 minibatches, 500k env steps; all 3 seeds end with a 100-episode mean return ≥ 475,
measured in docs/full_runs/rl.md):

  python experiments/train_rl.py --seeds=3 --metrics_file=runs/ppo.jsonl

Data-parallel PPO on 8 emulated devices with 1 env each, gradients through the ring all-reduce:

  python experiments/train_rl.py --num_devices=8 --num_envs=1 --num_steps=64 --strategy=ring

DQN (CleanRL's CartPole configuration), Double DQN:

  python experiments/train_rl.py --agent=dqn --double_dqn --seeds=3

Checkpoints and resume: with ``--workdir`` the whole runner state of all seeds is saved every
``--checkpoint_every`` updates (PPO updates, DQN iterations) and at the end; running the same
command again resumes from the latest checkpoint, bitwise the uninterrupted run (SIGKILL included):

  python experiments/train_rl.py --workdir=runs/ppo --checkpoint_every=50

NaN/Inf gradient steps are skipped, up to ``--max_nonfinite`` in a row. ``--truncation=terminate``
treats CartPole's time limit as a termination, as PureJaxRL does (default: bootstrap).
``--check_replicas=K`` compares every device's copy bit for bit every K updates. Hyperparameter
flags left unset keep the agent's defaults (``PPOConfig`` / ``DQNConfig``).
"""

from absl import flags

from jaxsync import cli
from jaxsync.agents.rl.runner import RLConfig
from jaxsync.runs import RunConfig
from jaxsync.sync import backend_names

FLAGS = flags.FLAGS
flags.DEFINE_string("agent", "ppo", "Agent: ppo | dqn.")
flags.DEFINE_string(
    "strategy",
    "psum",
    f"Gradient sync: single (1 device, no sync) | {' | '.join(backend_names())} "
    "(jaxsync.sync.BACKENDS).",
)
flags.DEFINE_string("env", "CartPole-v1", "Environment: CartPole-v1 (built in) or a gymnax name.")
flags.DEFINE_integer("total_steps", 500_000, "Env steps over all devices (>= one update).")
flags.DEFINE_integer("seeds", 1, "Seeds trained at once with vmap (>= 1).")
flags.DEFINE_string("cluster", "", cli.CLUSTER_HELP + " A step is a PPO update / DQN iteration.")
flags.DEFINE_integer("repeats", 1, "Timed runs after compilation; env steps/s is their median.")
cli.define_rl_hyperparameter_flags()
cli.define_device_flags(default_devices=1)
# RunConfig's guard default (10; RLConfig's library default is off); log_every in env steps.
cli.define_run_flags(
    RunConfig(steps=0, log_every=RLConfig().run.log_every),
    omit=("steps",),
    seed="Base seed; seed i uses split(PRNGKey(seed), seeds)[i].",
    log_every="Env steps between JSONL records (>= 1).",
    metrics_file="JSONL metrics path (records, then a summary object).",
    nan_at_steps="Fault injection for tests: comma-separated 1-based updates whose gradients "
    "are NaN.",
)
SUMMARY = ("final_mean_return", "final_mean_return_per_seed", "solved_at_per_seed", "env_steps")
SUMMARY += ("env_steps_per_s", "compile_s", "param_checksum")


def main(argv):
    cli.init_runtime()
    from jaxsync import ConfigError
    from jaxsync.agents.rl import runner

    shared, ppo, dqn = (cli.RL_HYPERPARAMETERS[k] for k in ("shared", "ppo", "dqn"))
    own, other = (ppo, dqn) if FLAGS.agent == "ppo" else (dqn, ppo)
    misplaced = [f"--{n}" for n in other if FLAGS[n].present]
    if FLAGS.agent in runner.AGENTS and misplaced:
        raise ConfigError(f"{misplaced} do not apply to --agent={FLAGS.agent}")
    names = ("env", "total_steps", "num_devices", "strategy", *shared, *own)
    agent_cfg = runner.agent_config(FLAGS.agent, **{n: FLAGS[n].value for n in names})
    run = cli.run_config_from_flags(RunConfig(steps=0), quiet=False)
    cfg = RLConfig(
        FLAGS.agent, agent_cfg, FLAGS.seeds, FLAGS.repeats, cluster=FLAGS.cluster, run=run
    )
    summary = runner.train_rl(cfg)
    print(
        "summary " + " ".join(f"{k}={summary[k]}" for k in SUMMARY + ("sim_time",) if k in summary)
    )


if __name__ == "__main__":
    cli.run(main)

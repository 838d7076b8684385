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

Gradient steps with NaN/Inf gradients are skipped; the run stops after ``--max_nonfinite`` in a row
(PPO: whole updates, DQN: gradient steps) with the last checkpoint intact.

At CartPole's 500-step time limit both agents bootstrap from the value of the final observation
(``--truncation=bootstrap``); ``--truncation=terminate`` treats the limit as a termination, as
PureJaxRL does. ``--check_replicas=K`` compares every device's copy of the parameters (and of the
other replicated state) bit for bit every K updates and at the end.

Hyperparameter flags left unset keep the agent's defaults (``PPOConfig`` / ``DQNConfig``).
"""

from absl import flags

from jaxsync import cli
from jaxsync.sync import backend_names

FLAGS = flags.FLAGS
flags.DEFINE_string("agent", "ppo", "Agent: ppo | dqn.")
flags.DEFINE_string("env", "CartPole-v1", "Environment: CartPole-v1 (built in) or a gymnax name.")
flags.DEFINE_string(
    "strategy",
    "psum",
    f"Gradient sync: single (1 device, no sync) | {' | '.join(backend_names())} "
    "(jaxsync.sync.BACKENDS).",
)
flags.DEFINE_string(
    "truncation",
    None,
    "At the time limit: bootstrap (target r + γ·value of the final observation; default) | "
    "terminate (target r, PureJaxRL's behaviour).",
)
flags.DEFINE_integer("num_envs", None, "Environments per device (>= 1); default PPO 4, DQN 10.")
flags.DEFINE_integer("total_steps", 500_000, "Env steps over all devices (>= one update).")
flags.DEFINE_integer("seeds", 1, "Seeds trained at once with vmap (>= 1).")
flags.DEFINE_integer("seed", 0, "Base seed; seed i uses split(PRNGKey(seed), seeds)[i].")
flags.DEFINE_integer("repeats", 1, "Timed runs after compilation; env steps/s is their median.")
flags.DEFINE_integer("log_every", 10_000, "Env steps between JSONL records (>= 1).")
flags.DEFINE_string("metrics_file", None, "JSONL metrics path (records, then a summary object).")
# Shared hyperparameters (unset: the agent's default).
flags.DEFINE_float("learning_rate", None, "Adam learning rate (> 0); default 2.5e-4.")
flags.DEFINE_float("gamma", None, "Discount factor in [0, 1]; default 0.99.")
flags.DEFINE_float("max_grad_norm", None, "Global gradient-norm clip (PPO 0.5, DQN 10; 0 = off).")
# PPO.
flags.DEFINE_integer("num_steps", None, "PPO: rollout length per env per update; default 128.")
flags.DEFINE_integer("update_epochs", None, "PPO: epochs over each rollout; default 4.")
flags.DEFINE_integer(
    "num_minibatches", None, "PPO: minibatches per epoch (divides num_steps); default 4."
)
flags.DEFINE_float("gae_lambda", None, "PPO: GAE λ in [0, 1]; default 0.95.")
flags.DEFINE_float("clip_eps", None, "PPO: ratio / value clip ε; default 0.2.")
flags.DEFINE_float("ent_coef", None, "PPO: entropy bonus coefficient; default 0.01.")
flags.DEFINE_float("vf_coef", None, "PPO: value loss coefficient; default 0.5.")
flags.DEFINE_bool("anneal_lr", None, "PPO: decay the learning rate linearly to 0; default true.")
# DQN.
flags.DEFINE_integer("buffer_size", None, "DQN: replay capacity per device; default 10000.")
flags.DEFINE_integer("batch_size", None, "DQN: replay minibatch per device; default 128.")
flags.DEFINE_float("eps_end", None, "DQN: final ε of the ε-greedy schedule; default 0.05.")
flags.DEFINE_float("eps_fraction", None, "DQN: fraction of total_steps to decay ε; default 0.5.")
flags.DEFINE_integer("learning_starts", None, "DQN: env steps before learning; default 10000.")
flags.DEFINE_integer("train_frequency", None, "DQN: env steps per gradient step; default 10.")
flags.DEFINE_integer(
    "target_update_interval", None, "DQN: env steps between target-network updates; default 500."
)
flags.DEFINE_bool("double_dqn", None, "DQN: Double-DQN targets; default false.")
cli.define_device_flags(default_devices=1)
cli.define_checkpoint_flags()
cli.define_replica_flags()

PPO_FLAGS = (
    "num_steps",
    "update_epochs",
    "num_minibatches",
    "gae_lambda",
    "clip_eps",
    "ent_coef",
    "vf_coef",
    "anneal_lr",
)
DQN_FLAGS = (
    "buffer_size",
    "batch_size",
    "eps_end",
    "eps_fraction",
    "learning_starts",
    "train_frequency",
    "target_update_interval",
    "double_dqn",
)
SHARED = (
    "env",
    "num_envs",
    "total_steps",
    "learning_rate",
    "gamma",
    "max_grad_norm",
    "num_devices",
    "strategy",
    "truncation",
)


def main(argv):
    cli.init_runtime()
    from jaxsync import ConfigError
    from jaxsync.agents.rl import runner

    own, other = (PPO_FLAGS, DQN_FLAGS) if FLAGS.agent == "ppo" else (DQN_FLAGS, PPO_FLAGS)
    misplaced = [f"--{n}" for n in other if FLAGS[n].present]
    if FLAGS.agent in runner.AGENTS and misplaced:
        raise ConfigError(f"{misplaced} do not apply to --agent={FLAGS.agent}")
    ckpt = cli.checkpoint_kwargs_from_flags()
    guard = {k: ckpt.pop(k) for k in ("max_nonfinite", "nan_at_steps")}
    overrides = {n: FLAGS[n].value for n in SHARED + own}
    agent_cfg = runner.agent_config(FLAGS.agent, **overrides, **guard)
    cfg = runner.RunConfig(
        agent=FLAGS.agent,
        agent_cfg=agent_cfg,
        seeds=FLAGS.seeds,
        seed=FLAGS.seed,
        repeats=FLAGS.repeats,
        log_every=FLAGS.log_every,
        metrics_file=FLAGS.metrics_file,
        quiet=False,
        check_replicas=FLAGS.check_replicas,
        **ckpt,
    )
    summary = runner.train_and_log(cfg)
    keys = (
        "final_mean_return",
        "final_mean_return_per_seed",
        "solved_at_per_seed",
        "env_steps",
        "env_steps_per_s",
        "compile_s",
        "param_checksum",
    )
    print("summary " + " ".join(f"{k}={summary[k]}" for k in keys))


if __name__ == "__main__":
    cli.run(main)

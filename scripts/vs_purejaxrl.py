"""PPO's env steps/s beside PureJaxRL's ``ppo.py``, in one process, on one device (#19).

PureJaxRL (Lu et al. 2022) is not a package and its code is not ours to ship, so this script runs
the user's own checkout of it: ``--purejaxrl_dir`` is the folder that holds ``purejaxrl/ppo.py``
(``git clone https://github.com/luchris429/purejaxrl``). Its ``ppo.py`` needs ``distrax`` and
gymnax before 1.0 (it unpacks the five values gymnax 0.0.x's ``step`` returns; gymnax 1.0 returns
six). ``brax``, which its ``wrappers.py`` imports for other environments, is stubbed when absent.

Like for like:
- both run PureJaxRL's CartPole-v1 configuration (4 envs × 128 steps, 4 epochs × 4 minibatches,
  Adam 2.5e-4 annealed, ``--total_steps`` env steps per seed), jaxsync with
  ``truncation=terminate`` (PureJaxRL learns from gymnax's ``done``, time limit included);
- with ``--seeds`` S > 1 both train S seeds at once under ``vmap``;
- PureJaxRL's orthogonal initialiser is replaced by jaxsync's (the same matrices to 1e-5;
  ``jaxsync.agents.rl.networks.orthogonal``): LAPACK's QR under ``vmap`` hangs XLA's CPU runtime
  with jax 0.10.2, and the one-off initialisation is not what is timed.

Timing: each program is compiled and run once, then ``--repeats`` rounds in which each runs once,
in turn (``benchmarks.common.interleaved_times``); env steps/s = total_steps × S / median seconds
(both run ⌊total_steps / 512⌋ updates, 0.06 % fewer steps at 500k: the ratio is unaffected).
Final return: PureJaxRL's, the mean return of the episodes that ended in the last 10 updates;
jaxsync's, the mean of the last 100 finished episodes; both averaged over seeds.

  python scripts/vs_purejaxrl.py --purejaxrl_dir=../purejaxrl --seeds=1,8 --output=vs.json
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import sys
import types

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxsync import ConfigError, cli  # noqa: E402

_DIR = flags.DEFINE_string("purejaxrl_dir", None, "A PureJaxRL checkout (holds purejaxrl/ppo.py).")
_STEPS = flags.DEFINE_integer("total_steps", 500_000, "Env steps per seed (PureJaxRL: 5e5).")
_SEEDS = flags.DEFINE_list("seeds", ["1", "8"], "Seed counts to time; S > 1 is vmapped.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds after the warm-up run.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")

# PureJaxRL's ppo.py __main__ configuration, without its DEBUG printing.
PUREJAXRL_CONFIG = {
    "LR": 2.5e-4,
    "NUM_ENVS": 4,
    "NUM_STEPS": 128,
    "UPDATE_EPOCHS": 4,
    "NUM_MINIBATCHES": 4,
    "GAMMA": 0.99,
    "GAE_LAMBDA": 0.95,
    "CLIP_EPS": 0.2,
    "ENT_COEF": 0.01,
    "VF_COEF": 0.5,
    "MAX_GRAD_NORM": 0.5,
    "ACTIVATION": "tanh",
    "ENV_NAME": "CartPole-v1",
    "ANNEAL_LR": True,
}


def load_purejaxrl(path: str):
    """PureJaxRL's ``ppo`` module from the checkout at ``path`` (ConfigError when it cannot be)."""
    if not path or not os.path.isfile(os.path.join(path, "purejaxrl", "ppo.py")):
        raise ConfigError(f"--purejaxrl_dir={path!r} does not hold purejaxrl/ppo.py")
    try:
        gymnax_version = importlib.metadata.version("gymnax")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("PureJaxRL's ppo.py needs gymnax: pip install 'gymnax<1'") from None
    if int(gymnax_version.split(".")[0]) >= 1:
        raise ConfigError(
            f"gymnax {gymnax_version}: PureJaxRL's ppo.py unpacks gymnax 0.0.x's 5-tuple step; "
            "pip install 'gymnax<1'"
        )
    import flax.linen.initializers
    import jax

    from jaxsync.agents.rl import networks

    if not hasattr(jax, "tree_map"):  # removed from jax; gymnax 0.0.x still calls it
        jax.tree_map = jax.tree.map
    flax.linen.initializers.orthogonal = networks.orthogonal  # before ppo.py imports it
    try:
        importlib.import_module("brax")
    except ImportError:
        stub = types.ModuleType("brax")
        stub.envs = types.ModuleType("brax.envs")
        sys.modules.update({"brax": stub, "brax.envs": stub.envs})
    sys.path.insert(0, os.path.abspath(path))
    try:
        return importlib.import_module("purejaxrl.ppo")
    except ImportError as e:
        raise ConfigError(f"cannot import PureJaxRL's ppo.py: {e}") from None


def compare(pj_ppo, total_steps: int, seeds: int, repeats: int) -> dict:
    """Time both programs for ``seeds`` seeds; env steps/s, their ratio and final returns."""
    import jax
    import numpy as np

    from jaxsync.agents.rl import ppo
    from jaxsync.benchmarks.common import interleaved_times

    vmapped = seeds > 1
    theirs = pj_ppo.make_train(dict(PUREJAXRL_CONFIG, TOTAL_TIMESTEPS=total_steps))
    theirs = jax.jit(jax.vmap(theirs) if vmapped else theirs)
    ours_cfg = ppo.PPOConfig(total_steps=total_steps, truncation="terminate")
    ours = jax.jit(ppo.make_train(ours_cfg, vmap_seeds=vmapped))
    key = jax.random.PRNGKey(0)
    keys = jax.random.split(key, seeds) if vmapped else key
    out_theirs = jax.block_until_ready(theirs(keys))  # compile and warm up
    out_ours = jax.block_until_ready(ours(keys))
    wall, _ = interleaved_times(
        {"purejaxrl": lambda: theirs(keys), "jaxsync": lambda: ours(keys)}, repeats
    )

    info = out_theirs["metrics"]
    done = np.asarray(info["returned_episode"])[..., -10:, :, :].reshape(seeds, -1)
    ret = np.asarray(info["returned_episode_returns"])[..., -10:, :, :].reshape(seeds, -1)
    theirs_return = float(np.mean((ret * done).sum(1) / np.maximum(done.sum(1), 1)))
    ours_return = float(np.mean(np.asarray(out_ours[1]["mean_return"])[..., -1]))
    env_steps = total_steps * seeds
    return {
        "seeds": seeds,
        "env_steps_per_s": {name: env_steps / s for name, s in wall.items()},
        "run_s": wall,
        "ratio": wall["purejaxrl"] / wall["jaxsync"],
        "final_return": {"purejaxrl": theirs_return, "jaxsync": ours_return},
    }


def main(_):
    from jaxsync.benchmarks.common import describe_machine, markdown_table, package_versions

    seeds = cli.int_list("seeds", _SEEDS.value)
    if _STEPS.value < 512 or _REPEATS.value < 1 or not seeds or min(seeds) < 1:
        raise ConfigError("--total_steps must be >= 512 (one update), --repeats and --seeds >= 1")
    pj_ppo = load_purejaxrl(_DIR.value)
    machine = describe_machine()
    rows = [compare(pj_ppo, _STEPS.value, s, _REPEATS.value) for s in seeds]
    print(machine.line())
    print(
        markdown_table(
            [
                "seeds",
                "PureJaxRL env steps/s",
                "jaxsync env steps/s",
                "jaxsync ÷ PureJaxRL",
                "final return PureJaxRL",
                "final return jaxsync",
            ],
            [
                [
                    r["seeds"],
                    f"{r['env_steps_per_s']['purejaxrl']:,.0f}",
                    f"{r['env_steps_per_s']['jaxsync']:,.0f}",
                    f"{r['ratio']:.2f}",
                    f"{r['final_return']['purejaxrl']:.1f}",
                    f"{r['final_return']['jaxsync']:.1f}",
                ]
                for r in rows
            ],
        )
    )
    if _OUTPUT.value:
        config = {"total_steps": _STEPS.value, "repeats": _REPEATS.value, **PUREJAXRL_CONFIG}
        config["purejaxrl_packages"] = package_versions(("gymnax", "distrax"))
        with open(_OUTPUT.value, "w") as f:
            json.dump({"machine": machine.__dict__, "config": config, "rows": rows}, f, indent=1)
        print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)

"""RL checkpoints (jaxsync/agents/rl/runner.py): SIGKILL then resume is bitwise the
uninterrupted run (PPO, 2 vmapped seeds), the same flags give the same run, NaN gradients are
skipped then stop the run with the last checkpoint intact, and DQN resumes its whole state (replay
buffer included) bitwise."""

import dataclasses
import os
import shutil

import killresume as kr
import numpy as np
import pytest

from jaxsync import ConfigError
from jaxsync.agents.rl import dqn, ppo, runner
from jaxsync.checkpoint import Checkpointer
from jaxsync.runs import NonFiniteError, make

# 2 envs × 16 steps, 1 epoch of 2 minibatches: 10 updates of 32 env steps, a checkpoint every 2.
TINY_PPO = dict(num_envs=2, num_steps=16, num_minibatches=2, update_epochs=1, total_steps=320)
FLAGS = [
    "--cpu_devices=8",  # as the in-process reference under tests/conftest.py
    "--strategy=single",
    "--num_envs=2",
    "--num_steps=16",
    "--num_minibatches=2",
    "--update_epochs=1",
    "--total_steps=320",
    "--seeds=2",
    "--log_every=64",
    "--checkpoint_every=2",
    "--keep_checkpoints=2",
]
UNTIMED = ("env_steps_per_s", "total_env_steps_per_s", "compile_s", "run_s")


def _launch(workdir, cache):
    # One compilation for the three processes: JAX's persistent cache (same executable, too).
    return kr.launch(
        "train_rl.py",
        FLAGS,
        workdir,
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    ref_dir, run_dir, cache = str(tmp_path / "ref"), str(tmp_path / "run"), tmp_path / "cache"
    ref = _launch(ref_dir, cache)
    assert ref.wait() == 0, ref.stderr.read()
    resumed_from = kr.kill_after_first_checkpoint(_launch(run_dir, cache), run_dir)
    assert 0 < resumed_from < 10
    resumed = _launch(run_dir, cache)
    assert resumed.wait() == 0, resumed.stderr.read()

    ref = kr.untimed(kr.records(ref_dir), UNTIMED)
    run = kr.untimed(kr.records(run_dir), UNTIMED)
    assert [r.get("step") for r in ref[:-1]] == [0, 1, 3, 5, 7, 9, 10]
    assert len(ref[1]["mean_return_per_seed"]) == 2
    marker = run.index({"event": "resume", "step": resumed_from})
    # The records after the resume point, the summary too: param_checksum, best and final returns.
    assert run[marker + 1 :] == kr.after(ref, resumed_from)
    # Determinism: before the kill, another process with the same flags logged the same numbers.
    before = [r for r in run[1:marker] if r["step"] <= resumed_from]
    assert before and before == [r for r in ref[1:] if 0 < r.get("step", 0) <= resumed_from]
    # The whole runner state of both seeds: params, Adam, env states, obs, window, RNG keys.
    assert kr.trees_equal(kr.checkpointed_state(ref_dir, 10), kr.checkpointed_state(run_dir, 10))
    # A checkpoint only resumes the run it came from; refused before any compilation.
    cfg = make(
        runner.RLConfig,
        agent="ppo",
        agent_cfg=ppo.PPOConfig(**TINY_PPO, strategy="single", clip_eps=0.3),
        seeds=2,
        workdir=ref_dir,
    )
    with pytest.raises(ConfigError, match=r"different run \(--clip_eps=0.2 there, 0.3 now\)"):
        runner.train_rl(cfg)


TINY_DQN = dqn.DQNConfig(
    num_envs=2,
    total_steps=96,
    buffer_size=64,
    batch_size=8,
    learning_starts=16,
    train_frequency=2,
    target_update_interval=8,
    hidden=(16,),
)


def _dqn(workdir):
    # DQN takes one gradient step per iteration from iteration 9 on. Iteration 10 is skipped
    # alone; 13 and 14 make max_nonfinite=2 in a row inside the chunk 13..16, which is dropped.
    cfg = make(
        runner.RLConfig,
        agent="dqn",
        agent_cfg=TINY_DQN,
        seeds=2,
        log_every=2,
        workdir=str(workdir),
        checkpoint_every=4,
        max_nonfinite=2,
        nan_at_steps=(10, 13, 14),
    )
    with pytest.raises(NonFiniteError, match=r"stopped at step 14: .*\(step 12\) is intact"):
        runner.train_rl(cfg)
    return kr.records(workdir)


def test_nan_steps_are_skipped_then_stop_and_dqn_resumes_its_buffer_bitwise(tmp_path):
    records = _dqn(tmp_path / "ref")
    with Checkpointer(str(tmp_path / "ref" / "checkpoints")) as ck:
        assert ck.all_steps() == [4, 8, 12]  # nothing saved at or after the stop
    assert [r.get("step") for r in records] == [0, *range(1, 15), 14]
    assert [r["nonfinite_steps"] for r in records[9:15]] == [0, 1, 1, 1, 2, 3]
    assert records[-1]["stopped"] == "nonfinite"
    # PPO counts whole updates: max_nonfinite updates of epochs × minibatches steps each.
    assert runner.nonfinite_limit(ppo.PPOConfig(**TINY_PPO, max_nonfinite=2)) == 4

    # Resume from iteration 8 (the replay buffer holds 16 of its 64 rows): the same run.
    os.makedirs(tmp_path / "run" / "checkpoints")
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "8", tmp_path / "run" / "checkpoints" / "8")
    resumed = _dqn(tmp_path / "run")
    assert resumed[0] == {"event": "resume", "step": 8}
    later = [r for r in records if r.get("step", 0) > 8]
    assert kr.untimed(resumed[1:], UNTIMED) == kr.untimed(later, UNTIMED)
    ref_state = kr.checkpointed_state(str(tmp_path / "ref"), 12)
    run_state = kr.checkpointed_state(str(tmp_path / "run"), 12)
    assert kr.trees_equal(ref_state, run_state)
    assert run_state["state"]["buffer"]["size"].tolist() == [24, 24]  # seed axis first


@pytest.mark.parametrize("module", [ppo, dqn])
def test_guard_wraps_the_optimizer_unless_max_nonfinite_is_zero(module):
    cfg = module.PPOConfig() if module is ppo else module.DQNConfig()
    params = {"w": np.zeros(2, np.float32)}
    guarded = module.make_optimizer(dataclasses.replace(cfg, max_nonfinite=10)).init(params)
    assert type(guarded).__name__ == "ApplyIfFiniteState"
    plain = module.make_optimizer(cfg).init(params)  # the library default: no guard
    assert type(plain).__name__ != "ApplyIfFiniteState"

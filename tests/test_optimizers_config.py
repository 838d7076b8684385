"""Distributed-optimizer options of the train loop: bad values and combinations are one clear
error; a run with them writes the usual JSONL metrics and summary."""

import json
import os
import subprocess
import sys

import pytest

from jaxsync import ConfigError
from jaxsync.runs import make
from jaxsync.train import TrainConfig, train_and_evaluate, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD = {
    "grad_accum": (dict(grad_accum=0), "--grad_accum must be >= 1"),
    "indivisible": (dict(grad_accum=3, batch_size=64, num_devices=4), "devices x --grad_accum"),
    "precision": (dict(precision="float16"), "unknown precision"),
    "compression": (dict(compression="zip"), "unknown compression"),
    "topk_ratio": (dict(compression="topk", topk_ratio=1.5), "--topk_ratio must be in (0, 1]"),
    "local_steps": (dict(local_steps=-1), "--local_steps must be >= 0"),
    "avg_state": (dict(average_opt_state=True), "--average_opt_state needs --local_steps"),
    "zero_ps": (dict(strategy="ps", shard_optimizer=True), "--shard_optimizer needs"),
    "zero_single": (dict(strategy="single", shard_optimizer=True), "need a data-parallel --strat"),
    "zero_local": (dict(shard_optimizer=True, local_steps=4), "cannot be combined"),
    "psum_comp": (dict(strategy="psum", compression="bf16"), "--compression needs"),
    "local_comp": (dict(local_steps=2, compression="topk"), "cannot be combined"),
    "tp_precision": (dict(strategy="tp", precision="bfloat16"), "not supported by --strategy=tp"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_raise_config_error(case):
    fields, expected = BAD[case]
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        validate(make(TrainConfig, **fields))


def test_run_with_sharded_adam_accumulation_and_bf16_writes_metrics(tmp_path):
    from jaxsync.optim import OptimConfig

    path = tmp_path / "m.jsonl"
    cfg = make(
        TrainConfig,
        strategy="psum",
        num_devices=4,
        width=8,
        batch_size=32,
        steps=2,
        log_every=1,
        eval_every=2,
        metrics_file=str(path),
        quiet=True,
        optim=OptimConfig("adam", learning_rate=0.01, clip_norm=1.0),
        shard_optimizer=True,
        grad_accum=2,
        precision="bfloat16",
    )
    summary = train_and_evaluate(cfg)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records[:-1]] == [1, 2]
    assert records[-1] == json.loads(json.dumps(summary)) and summary["num_devices"] == 4
    assert summary["final_loss"] == records[-2]["loss"]


def test_cli_bad_combination_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "train.py"),
            "--strategy=ps",
            "--shard_optimizer",
            "--cpu_devices=2",
            "--num_devices=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "--shard_optimizer needs --strategy=psum or ring" in lines[0]

"""The train experiment from the command line: default run, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from jaxsync import ConfigError
from jaxsync.optim import OptimConfig
from jaxsync.runs import make

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")


def run_train(*args, timeout=180):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the experiment emulates its own devices
    return subprocess.run(
        [sys.executable, TRAIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_default_run_writes_metrics_and_summary(tmp_path):
    path = tmp_path / "m.jsonl"
    out = run_train(f"--metrics_file={path}", "--steps=40")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in path.read_text().splitlines()]
    summary = records[-1]
    assert summary["summary"] and summary["strategy"] == "ring" and summary["num_devices"] == 8
    for key in ("final_loss", "eval_accuracy", "steps", "step_time_ms", "param_checksum"):
        assert key in summary
    assert [r["step"] for r in records[:-1]] == [20, 40]
    assert records[-1]["final_loss"] < records[0]["loss"] or records[0]["step"] == 40
    assert "steps/s" in out.stdout and "ETA" in out.stdout


# One case per kind of check runs the real command line (one line on stderr, exit 2, nothing
# already written touched); the rest raise the same ConfigError in-process, which cli.run prints.
BAD_CLI = {
    "strategy": ("--strategy=allgather", "unknown strategy"),
    "devices": ("--num_devices=16", "--cpu_devices=16"),
    "missing_dir": ("--dataset=mnist --data_dir=/nonexistent/mnist", "does not exist"),
}
BAD = {
    "optimizer": (dict(optim=OptimConfig("lion9")), "unknown optimizer"),
    "model": (dict(model="resnet"), "unknown model"),
    "dataset": (dict(dataset="imagenet"), "unknown dataset"),
    "indivisible": (dict(batch_size=100), "not divisible"),
    "lr": (dict(optim=OptimConfig(learning_rate=0.0)), "learning_rate"),
    "batch": (dict(batch_size=0), "batch_size"),
    "steps": (dict(steps=-3), "steps"),
    "data_dir": (dict(dataset="mnist"), "--data_dir"),
    "frontend": (dict(frontend="xmap"), "unknown frontend"),
    "check_replicas": (dict(check_replicas=-1), "--check_replicas must be >= 0"),
    # The sync methods' bad values (issue #16): H < 1, α outside (0, 1), rank < 1, a topology
    # that needs more devices.
    "local_steps": (dict(local_steps=-1), "--local_steps must be >= 0"),
    "elastic_alpha": (dict(local_steps=2, elastic_alpha=1.5), "--elastic_alpha must be in (0, 1)"),
    "powersgd_rank": (dict(powersgd_rank=-2), "--powersgd_rank must be >= 1"),
    "gossip_devices": (
        dict(gossip_topology="torus", num_devices=5, batch_size=250),
        "--gossip_topology=torus needs a device count with two factors",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CLI))
def test_bad_input_is_one_line_and_nonzero(case, tmp_path):
    flag, expected = BAD_CLI[case]
    keep = tmp_path / "keep.jsonl"
    keep.write_text("earlier run\n")
    out = run_train(*flag.split(), f"--metrics_file={keep}", timeout=60)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert expected in lines[0] and "Traceback" not in out.stderr
    assert keep.read_text() == "earlier run\n"  # nothing already written is lost


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_raises_one_config_error(case, tmp_path):
    from jaxsync.train import TrainConfig, train_and_evaluate

    fields, expected = BAD[case]
    keep = tmp_path / "keep.jsonl"
    keep.write_text("earlier run\n")
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(make(TrainConfig, **fields, metrics_file=str(keep), quiet=True))
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert keep.read_text() == "earlier run\n"


def test_int_list_parses_lists_and_strings_and_names_a_bad_flag():
    from jaxsync import cli

    assert cli.int_list("devices", ["2", "4"]) == [2, 4]
    assert cli.int_list("speed_devices", "1,2,8") == [1, 2, 8]
    with pytest.raises(ConfigError, match=r"^--devices must be integers, got 1,x$"):
        cli.int_list("devices", "1,x")

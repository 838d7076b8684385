"""The train experiment from the command line: default run, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

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


BAD = {
    "strategy": ("--strategy=allgather", "unknown strategy"),
    "optimizer": ("--optimizer=lion9", "unknown optimizer"),
    "model": ("--model=resnet", "unknown model"),
    "dataset": ("--dataset=imagenet", "unknown dataset"),
    "indivisible": ("--batch_size=100", "not divisible"),
    "devices": ("--num_devices=16", "--cpu_devices=16"),
    "lr": ("--learning_rate=0", "learning_rate"),
    "batch": ("--batch_size=0", "batch_size"),
    "steps": ("--steps=-3", "steps"),
    "data_dir": ("--dataset=mnist", "--data_dir"),
    "missing_dir": ("--dataset=mnist --data_dir=/nonexistent/mnist", "does not exist"),
    "frontend": ("--frontend=xmap", "unknown frontend"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_nonzero(case, tmp_path):
    flag, expected = BAD[case]
    keep = tmp_path / "keep.jsonl"
    keep.write_text("earlier run\n")
    out = run_train(*flag.split(), f"--metrics_file={keep}", timeout=60)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert expected in lines[0] and "Traceback" not in out.stderr
    assert keep.read_text() == "earlier run\n"  # nothing already written is lost


def test_int_list_parses_lists_and_strings_and_names_a_bad_flag():
    from jaxsync import ConfigError, cli

    assert cli.int_list("devices", ["2", "4"]) == [2, 4]
    assert cli.int_list("speed_devices", "1,2,8") == [1, 2, 8]
    with pytest.raises(ConfigError, match=r"^--devices must be integers, got 1,x$"):
        cli.int_list("devices", "1,x")

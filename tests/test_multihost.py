"""Multi-process runs on JAX's distributed runtime, with real processes on loopback (gloo).

2 processes x 2 CPU devices must train to the same parameters as 1 process x 4 devices on the same
global batches, for every backend and for the methods built on them (DiLoCo, Streaming DiLoCo,
EASGD, PowerSGD, gossip SGD, whose messages then cross the process boundary); a killed process
must make the others exit with one clear line, not hang; the launcher must stop the job when a
process fails. Every subprocess is bounded by a timeout. Run as a script, this file is the worker
process of the parity test.
"""

import importlib.util
import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxsync import sync
from jaxsync.runs import make

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "experiments" / "train.py")
# A hang fails a test here, long before CI's limit. Generous: on a loaded 2-core machine one
# 2-process job (JAX start-up and compilation in each process) took over a minute.
JOB_TIMEOUT_S = 240
HEARTBEAT_S = 15
STRATEGIES = sync.backend_names()  # every gradient-sync backend: psum, ring, ps
# The methods built on a backend, each across the process boundary: name -> TrainConfig fields.
METHODS = {
    **{name: dict(strategy=name) for name in STRATEGIES},
    "diloco": dict(strategy="ring", local_steps=2, outer_optimizer="nesterov"),
    "streaming_diloco": dict(
        strategy="psum",
        local_steps=2,
        outer_optimizer="nesterov",
        diloco_fragments=2,
        outer_quantize="e4m3",
    ),
    "easgd": dict(strategy="psum", local_steps=2, elastic_alpha=0.2),
    "powersgd": dict(strategy="psum", powersgd_rank=1),
    "gossip_ring": dict(strategy="psum", gossip_topology="ring"),
    "gossip_one_peer": dict(strategy="psum", gossip_topology="one_peer_exponential"),
}
# Tiny run, with the NaN guard on (its counters live in the ps backend's per-device state).
RUN = dict(
    num_devices=4,
    model="mlp",
    width=16,
    batch_size=32,
    steps=4,
    log_every=2,
    eval_every=4,
    quiet=True,
)


def _load_launcher():
    path = ROOT / "scripts" / "launch_local.py"
    spec = importlib.util.spec_from_file_location("launch_local", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch_local = _load_launcher()


def _worker(process_id: int, num_processes: int, port: int) -> None:
    """One process of the parity job: every strategy in turn, one JSON summary line each."""
    from jaxsync.distributed import DistributedConfig, initialize
    from jaxsync.mesh import set_cpu_devices

    set_cpu_devices(2)
    initialize(
        DistributedConfig(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            init_timeout_s=60,
            heartbeat_timeout_s=HEARTBEAT_S,
        )
    )
    from jaxsync.train import TrainConfig, train_and_evaluate

    for method, fields in METHODS.items():
        summary = train_and_evaluate(make(TrainConfig, **fields, **RUN))
        print("RESULT " + json.dumps({"method": method, **summary}), flush=True)


def _spawn(args, m: int, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        env=launch_local.child_env(m),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _finish(procs, timeout_s=JOB_TIMEOUT_S):
    """``[(returncode, stdout, stderr)]``; kills everything on a timeout and fails the test."""
    deadline = time.monotonic() + timeout_s
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        pytest.fail(f"multi-process job still running after {timeout_s} s (hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


@pytest.fixture(scope="module")
def two_process_results():
    """Summaries of the parity job (2 processes x 2 devices), per process and strategy."""
    port = launch_local.free_port()
    procs = [_spawn([__file__, str(i), "2", str(port)], m=2) for i in range(2)]
    results = []
    for rc, stdout, stderr in _finish(procs):
        assert rc == 0, stderr[-3000:]
        lines = [json.loads(x[7:]) for x in stdout.splitlines() if x.startswith("RESULT ")]
        results.append({r["method"]: r for r in lines})
    return results


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one_process(two_process_results, method):
    from jaxsync.train import TrainConfig, train_and_evaluate

    ref = train_and_evaluate(make(TrainConfig, **METHODS[method], **RUN))  # 4 of this process's 8
    keys = ["param_checksum", "final_loss", "eval_loss"]
    if "consensus_distance" in ref:  # per-device parameters (DiLoCo, EASGD, gossip)
        keys.append("consensus_distance")
    for got in two_process_results:  # every process holds the same replicated parameters
        assert got[method]["num_devices"] == 4
        for key in keys:
            # Only the summation order of the gradient differs (gloo across processes).
            assert got[method][key] == pytest.approx(ref[key], rel=1e-6), key


def test_launcher_runs_experiment_and_only_process_0_writes(tmp_path):
    metrics = tmp_path / "m.jsonl"
    rc = launch_local.launch(
        [
            TRAIN,
            "--strategy=ring",
            "--num_devices=4",
            "--steps=4",
            "--batch_size=32",
            "--width=16",
            "--log_every=2",
            "--eval_every=4",
            f"--metrics_file={metrics}",
            f"--heartbeat_timeout={HEARTBEAT_S}",
        ],
        2,
        2,
        timeout_s=JOB_TIMEOUT_S,
        log_dir=str(tmp_path / "logs"),
    )
    logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    assert rc == 0, logs[0][-2000:] + logs[1][-2000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r.get("step") for r in records] == [2, 4, None]  # one writer: two logs, one summary
    assert records[-1]["summary"] and records[-1]["num_devices"] == 4
    assert "step 4/4" in logs[0] and "step 4/4" not in logs[1]  # progress from process 0 only


def test_killed_process_stops_the_others(tmp_path):
    """SIGKILL process 1 mid-run: process 0 exits non-zero with a clear error, no hang."""
    metrics = tmp_path / "m.jsonl"
    port = launch_local.free_port()
    args = [
        TRAIN,
        "--strategy=psum",
        "--num_devices=4",
        "--steps=100000",
        "--batch_size=32",
        "--width=16",
        "--log_every=5",
        "--eval_every=100000",
        f"--metrics_file={metrics}",
        f"--heartbeat_timeout={HEARTBEAT_S}",
    ]
    procs = [_spawn(launch_local.process_command(args, 2, 2, i, port)[1:], m=2) for i in range(2)]
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert all(p.poll() is None for p in procs), "a process ended before training"
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        (rc, _, stderr), _ = _finish(procs, timeout_s=HEARTBEAT_S + 60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rc != 0
    # Either the next gloo collective fails at once (our one line), or process 0 was blocked in
    # one and JAX's heartbeat check ends it, with its own line (and a C++ stack trace).
    assert ("error: process 0 of 2 stopped" in stderr and "another process died" in stderr) or (
        "JAX distributed service detected fatal errors" in stderr and "another task died" in stderr
    ), stderr[-3000:]


def test_launcher_stops_the_others_when_one_fails():
    code = (
        "import sys, time; i = [a for a in sys.argv if a.startswith('--process_id=')][0]; "
        "sys.exit(3) if i.endswith('=1') else time.sleep(60)"
    )
    t0 = time.monotonic()
    assert launch_local.launch(["-c", code], 2, 1, timeout_s=30, grace_s=2) == 3
    assert time.monotonic() - t0 < 30  # process 0 was stopped, not waited for


def test_unreachable_coordinator_is_one_line():
    port = launch_local.free_port()  # nothing listens there
    proc = _spawn(
        [
            TRAIN,
            "--cpu_devices=2",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            "--process_id=1",
            "--init_timeout=1",
        ],
        m=2,
    )
    ((rc, _, stderr),) = _finish([proc], timeout_s=60)
    assert rc == 2
    assert stderr.strip().splitlines()[-1].startswith("error: cannot reach the coordinator at")
    assert "Traceback" not in stderr


def test_distributed_config_errors():
    from jaxsync import ConfigError
    from jaxsync.distributed import (
        CLUSTER_VARIABLES,
        DistributedConfig,
        detect_cluster,
        initialize,
        parse_address,
    )

    assert parse_address("[::1]:1234") == ("::1", 1234)
    for bad in (
        DistributedConfig(mode="maybe"),
        DistributedConfig(num_processes=0),
        DistributedConfig(num_processes=2, process_id=2),
        DistributedConfig(coordinator_address="localhost"),
    ):
        with pytest.raises(ConfigError):
            initialize(bad)
    with pytest.raises(ConfigError, match="needs --coordinator_address"):
        initialize(DistributedConfig(mode="on"))
    # Nothing set and no cluster: one process, and JAX's distributed runtime untouched.
    assert not initialize(DistributedConfig())
    # The launcher variables of jax 0.10's detectors (jax.distributed.initialize's docs): a SLURM
    # allocation without an srun step is not a job; mpirun's URI is.
    slurm = {k: "0" for k in CLUSTER_VARIABLES["slurm"]}
    assert detect_cluster(slurm) == "slurm" and detect_cluster({}) is None
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) is None
    assert detect_cluster({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5"}) == "ompi"
    assert not initialize(DistributedConfig(mode="off", num_processes=2, process_id=1))


def test_single_process_batch_is_the_global_batch():
    import jax
    import numpy as np

    from jaxsync.mesh import batch_sharded, local_rows, make_mesh, put_global_batch

    sharding = batch_sharded(make_mesh(4))
    x = np.arange(24.0, dtype=np.float32).reshape(8, 3)
    assert local_rows(sharding, x.shape) == slice(0, 8)
    np.testing.assert_array_equal(jax.device_get(put_global_batch(x, sharding)), x)


if __name__ == "__main__":
    _worker(*map(int, sys.argv[1:4]))

"""GPU parity: the numbers jaxsync computes on a GPU against the same computation on the CPU.

Run by ``scripts/gpu_check.sh`` on a machine with a GPU (``JAX_PLATFORMS`` unset or ``cuda``):

1. Single-device training, every model on its data set, ``--steps`` steps: the run on the GPU and
   the same run on the CPU (each a subprocess of ``experiments/train.py`` with
   ``JAX_DEFAULT_MATMUL_PRECISION=highest``, so the GPU does float32 matmuls, not TF32): final
   loss and parameter checksum within ``--rtol``.
2. With >= 2 GPUs, every all-reduce backend in ``jaxsync.sync`` over all GPUs against
   ``lax.psum`` of the same arrays on the GPUs, within ``--rtol``.

Writes ``--output`` (JSON: one row per check, with both numbers and the verdict) and exits 1 if a
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = {  # model -> its data set (the MLP and CNN read digits, the transformer a token task)
    "mlp": "digits",
    "cnn": "digits",
    "transformer": "copy",
}


def _train(platform: str, model: str, dataset: str, steps: int) -> dict:
    """The summary of a single-device run on ``platform``."""
    env = dict(os.environ, JAX_PLATFORMS=platform, JAX_DEFAULT_MATMUL_PRECISION="highest")
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp, "m.jsonl")
        cmd = [
            sys.executable,
            str(ROOT / "experiments/train.py"),
            "--strategy=single",
            "--num_devices=1",
            f"--model={model}",
            f"--dataset={dataset}",
            f"--steps={steps}",
            f"--metrics_file={path}",
        ]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return json.loads(path.read_text().splitlines()[-1])


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def training_rows(steps: int, rtol: float) -> list[dict]:
    rows = []
    for model, dataset in RUNS.items():
        gpu, cpu = _train("cuda", model, dataset, steps), _train("cpu", model, dataset, steps)
        for key in ("final_loss", "param_checksum"):
            err = _rel(gpu[key], cpu[key])
            rows.append(
                {
                    "check": f"single-device {model} on {dataset}, {steps} steps: {key}",
                    "gpu": gpu[key],
                    "cpu": cpu[key],
                    "rel_err": err,
                    "ok": err <= rtol,
                }
            )
    return rows


def allreduce_rows(rtol: float) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxsync import sync

    n = jax.device_count()
    if n < 2:
        return []
    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = jax.make_mesh((n,), ("data",))
    x = jax.random.normal(jax.random.key(0), (n, 4099), jnp.float32)  # a length no ring divides
    x = jax.device_put(x, NamedSharding(mesh, P("data")))

    def run(fn):
        f = jax.shard_map(lambda v: fn(v), mesh=mesh, in_specs=P("data"), out_specs=P("data"))
        return np.asarray(jax.jit(f)(x))

    ref = run(lambda v: lax.psum(v, "data"))
    rows = []
    for name, backend in sync.BACKENDS.items():
        got = run(lambda v, b=backend: b.all_reduce(v, axis_name="data"))
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        rows.append(
            {
                "check": f"all-reduce {name} over {n} GPUs vs lax.psum",
                "gpu": None,
                "cpu": None,
                "rel_err": err,
                "ok": err <= rtol,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--output", default="results/gpu/parity.json")
    args = parser.parse_args()
    rows = training_rows(args.steps, args.rtol) + allreduce_rows(args.rtol)
    for r in rows:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}: rel err {r['rel_err']:.2e}")
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rtol": args.rtol, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

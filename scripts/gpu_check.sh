#!/usr/bin/env bash
# On a machine with a GPU: check that jaxsync runs there and gives the CPU's numbers, then run the
# benchmarks that mean something on real devices, and write every result as JSON.
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: results/gpu
#
# It needs a CUDA build of jax already installed (pip install -e '.[test]' 'jax[cuda12]'); it
# installs nothing and reaches no network. Steps (each one's log is OUT_DIR/<step>.log; a failing
# step is reported and the others still run; the exit status is the number of failed steps):
#   1. devices     - the GPUs JAX sees.
#   2. parity      - scripts/gpu_parity.py: single-device training of each model on GPU against the
#                    same run on CPU (float32, matmul precision "highest"), and, with >= 2 GPUs,
#                    every all-reduce backend against lax.psum on the GPUs.
#   3. tests       - with >= 8 GPUs, the data-parallel and collective parity tests on the GPUs
#                    (the suite's tests need 8 devices); fewer GPUs: skipped, said so.
#   4. allreduce   - bench_allreduce over the GPUs (>= 2 GPUs).
#   5. dp_step     - bench_scaling: the data-parallel MLP step, strong and weak scaling.
#   6. ppo         - bench_rl speed: PPO env steps/s on 1 device (1 and 8 seeds are in its table).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/gpu}"
mkdir -p "$OUT"
export JAX_PLATFORMS=cuda
failed=0

step() {  # step NAME CMD...: run CMD, log to $OUT/NAME.log, count a failure
  local name=$1
  shift
  echo "== $name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok"
  else
    echo "   FAILED (exit $?): tail of $OUT/$name.log"
    tail -5 "$OUT/$name.log" | sed 's/^/   | /'
    failed=$((failed + 1))
  fi
}

if ! python -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
  echo "gpu_check: JAX sees no GPU (JAX_PLATFORMS=cuda); install a CUDA build of jax first" >&2
  exit 2
fi
GPUS=$(python -c "import jax; print(jax.device_count())")

step devices python -c "import jax, json; print(json.dumps([str(d) for d in jax.devices()]))"
cp "$OUT/devices.log" "$OUT/devices.json"
step parity python scripts/gpu_parity.py --output="$OUT/parity.json"
if [ "$GPUS" -ge 8 ]; then
  step tests python -m pytest -p no:cacheprovider -n 0 -q \
    tests/test_data_parallel.py tests/test_collectives.py
else
  echo "== tests: skipped ($GPUS GPU(s); the suite's parity tests need 8 devices)"
fi
if [ "$GPUS" -ge 2 ]; then
  step allreduce python experiments/bench_allreduce.py --devices="$GPUS" --cpu_devices="$GPUS" \
    --output="$OUT/bench_allreduce.json"
else
  echo "== allreduce: skipped (1 GPU)"
fi
DEVICES=$(python -c "n=$GPUS; print(','.join(str(2**i) for i in range(n.bit_length()) if 2**i <= n))")
step dp_step python experiments/bench_scaling.py --devices="$DEVICES" --cpu_devices="$GPUS" \
  --output="$OUT/bench_scaling.json"
step ppo python experiments/bench_rl.py --parts=speed --speed_devices=1 --out="$OUT/bench_rl"
echo "gpu_check: $failed step(s) failed; logs and JSON in $OUT"
exit "$failed"

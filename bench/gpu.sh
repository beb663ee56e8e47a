#!/usr/bin/env bash
# Everything a GPU session measures, in one script (bench/RESULTS.md section 9):
#   bash bench/gpu.sh [SECTION ...]     (default: tests peak check score decode train;
#                                       score-tvq: score without the dense baseline)
# tests: the model's contract tests on this device (float32 at the highest matmul
# precision); then bench/gpu_speed.py section by section, each in its own process
# with its own time limit, appending JSON lines to $OUT/gpu.jsonl.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/tvq-gpu}
mkdir -p "$OUT"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null
declare -A LIMIT=([peak]=60 [check]=90 [score]=400 [score-tvq]=100 [decode]=180 [train]=230)
for section in "${@:-tests peak check score decode train}"; do
  for s in $section; do
    echo "== $s ($(date -u +%H:%M:%S))"
    if [ "$s" = tests ]; then
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout 180 python3 -m pytest -x -q -n 8 \
        -o addopts="" --durations=5 tests/test_parallel.py tests/test_equivalence.py \
        tests/test_causality.py tests/test_decoding.py tests/test_sampling.py \
        tests/test_scoring.py tests/test_default_model.py 2>&1 | tail -15
    else
      args=("${s%-tvq}")
      [ "$s" = score-tvq ] && args+=(--tvq-only)  # tvq alone, no dense baseline
      timeout "${LIMIT[$s]}" python3 bench/gpu_speed.py "${args[@]}" --out "$OUT/gpu.jsonl"
      echo "(exit $?)"
    fi
  done
done

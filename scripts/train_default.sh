#!/usr/bin/env bash
# The shipped default model's recipe, in two stages (under an hour on 2 CPU cores, feature caching included):
#  1. efficientnet-lite0 + minilm-l6, preset "small", every folder of DATA_ROOT that has a dataset.json, 15% of
#     the images of each kept aside for validation and the demo image (COCO 000000358083) held out; 3,500 steps
#     at batch 16 with features cached at 256/320/384 px (configs/cpu-default.toml) -> OUT-base
#  2. fine-tuned from stage 1 for 800 steps at 448 px (lr 2e-4, warm-up 50) with copy-paste at rate 0.5 (so the
#     image encoder runs every step: --no-cache), same data and split -> OUT (COCO's objects are small: training
#     finer paid, also when the model then runs at 320 px, and pasted objects paid again)
# Then `python scripts/ship_default.py OUT --data-root DATA_ROOT --decision relative --image-size 320 --threshold 0.3`
# writes the shipped weights and the model card.
# Usage: scripts/train_default.sh [DATA_ROOT] [OUT] [extra train args, given to both stages]
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/default}
shift $(( $# > 2 ? 2 : $# )) || true
args=()
for d in "$DATA"/*/; do [ -f "$d/dataset.json" ] && args+=(--data "${d%/}"); done
common=(--image-encoder efficientnet-lite0 --text-encoder minilm-l6 --preset small --holdout 000000358083
        --val-fraction 0.15)
fusionseg train "${args[@]}" --out "$OUT-base" "${common[@]}" --steps 3500 "$@"
exec fusionseg train "${args[@]}" --out "$OUT" "${common[@]}" --init "$OUT-base" --size 448 --scales 448 \
    --steps 800 --lr 2e-4 --set warmup=50 --no-cache --copy-paste 0.5 "$@"

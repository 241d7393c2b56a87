#!/usr/bin/env bash
# The GPU benchmarks committed under benchmarks/*-h100, and the CUDA tests: run from the
# repository root with OUT set to a results folder (the lent H100 of this project's sessions).
# Phase "blocks": the blocks table and anchors sweep, the model table in torch's default
# precision; phase "tf32": the model table with TF32 matmuls, and the CUDA tests.
set -euo pipefail
phase=${1:-all}
annseg() { python -m annseg.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt"
if [ "$phase" != tf32 ]; then
  annseg bench blocks --anchors 1,3,6,8 1 1,2 1,2,3,6 1,3,6,8,12 --out "$OUT/blocks-h100" 2>&1 | tee "$OUT/blocks.log"
  annseg bench model --out "$OUT/model-h100" 2>&1 | tee "$OUT/model.log"
fi
if [ "$phase" != blocks ]; then
  annseg bench model --tf32 --out "$OUT/model-h100-tf32" 2>&1 | tee "$OUT/model-tf32.log"
  python -m pytest -q -m "not slow" -p no:cacheprovider tests/layers tests/bench 2>&1 | tee "$OUT/pytest.log"
fi

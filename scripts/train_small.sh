#!/usr/bin/env bash
# Train models/dimoo-small from scratch, with fixed seeds, on the CPU:
#   data (procedural, scripts/shapes_data.py) -> tokenizer -> VQ-VAE -> codes of
#   every render -> VQ decoder fine-tune (codes unchanged) + transformer (in
#   parallel) -> export (+ reference_forward check) -> eval.
#
# Usage: scripts/train_small.sh [OUT_DIR] [WORK_DIR]
# Env: PYTHON (default /opt/torchenv/bin/python), SKIP_EVAL=1 to stop after export.
# About 45-60 minutes on two otherwise idle cores (VQ-VAE ~8 min, transformer
# ~0.55-1 s a step for 3000 steps, eval ~5 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/opt/torchenv/bin/python}
OUT=${1:-models/dimoo-small}
WORK=${2:-/tmp/train}
mkdir -p "$OUT" "$WORK"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=1

run() { "$PY" scripts/train_small.py --threads 1 --out "$OUT" --work "$WORK" "$@"; }

rm -f "$WORK/transformer.pt"
run tokenizer
run vqvae
run encode
# The decoder fine-tune leaves the encoder and codebook alone, so the codes the
# transformer trains on do not depend on it: run both at once.
run vqdec > "$WORK/vqdec.log" 2>&1 &
VQDEC=$!
run transformer --threads 2   # 3000 steps, batch 32, peak lr 2e-3 (the defaults)
wait "$VQDEC"
tail -n 2 "$WORK/vqdec.log"
run export
if [ "${SKIP_EVAL:-0}" != 1 ]; then
  "$PY" scripts/eval_small.py --threads 2 --model "$OUT" --json "$WORK/eval.json" --save-images "$WORK/samples"
fi
du -sh "$OUT"

#!/usr/bin/env bash
# Train models/dimoo-small from scratch, with fixed seeds, on the CPU:
#   data (procedural, scripts/shapes_data.py) -> tokenizer -> VQ-VAE -> codes of
#   every render -> VQ decoder fine-tune (codes unchanged) + transformer (in
#   parallel) -> export (+ reference_forward check) -> eval.
#
# Usage: scripts/train_small.sh [OUT_DIR] [WORK_DIR]
# Env: PYTHON (default /opt/torchenv/bin/python), SKIP_EVAL=1 to stop after export.
# VQ-VAE and codes: ~10 minutes on two cores; transformer: ~6 minutes on one
# H200 (see below); eval ~5 minutes on two cores.
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
# The shipped transformer was trained on one GPU (H200, 348 s):
#   10,500 steps of 512 sequences, peak lr 2e-3, 10 data-loader workers,
#   bf16 autocast, weights' EMA exported. Without a GPU (DEVICE=cpu) the same
#   command runs, but takes days on two cores; TRANSFORMER_ARGS overrides it
#   (e.g. "--steps 3000 --batch 32 --lr 2e-3" for a weaker CPU-hour model).
if [ "${DEVICE:-cuda}" = cuda ]; then
  run transformer --device cuda --workers 10 --batch 512 --lr 2e-3 --steps 10500 ${TRANSFORMER_ARGS:-}
else
  run transformer --threads 2 ${TRANSFORMER_ARGS:---steps 3000 --batch 32 --lr 2e-3}
fi
wait "$VQDEC"
tail -n 2 "$WORK/vqdec.log"
run export
if [ "${SKIP_EVAL:-0}" != 1 ]; then
  "$PY" scripts/eval_small.py --threads 2 --model "$OUT" --json "$WORK/eval.json" --save-images "$WORK/samples"
fi
du -sh "$OUT"

#!/usr/bin/env bash
# Regenerate testdata/ deterministically: small random checkpoints, their
# float64 reference logits (stored float32), and a copy of the official goldens.
# Usage: scripts/gen_testdata.sh   (PYTHON=/path/to/python to override)
set -euo pipefail

PYTHON="${PYTHON:-/opt/torchenv/bin/python}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OFFICIAL_SRC="${OFFICIAL_SRC:-$ROOT/../shared/golden/official-small}"
TD="$ROOT/testdata"
MK="$ROOT/scripts/make_checkpoint.py"
REF="$ROOT/scripts/reference_forward.py"

mkdir -p "$TD"

gen() { # name seed lengths make_checkpoint-args...
  local name=$1 seed=$2 lengths=$3
  shift 3
  rm -rf "${TD:?}/$name"
  "$PYTHON" "$MK" --out "$TD/$name" --seed "$seed" "$@"
  "$PYTHON" "$REF" --model "$TD/$name" --golden-lengths "$lengths" --golden-seed "$seed"
}

gen small-f32 1 1,7,64,300 --layers 2 --d-model 256 --heads 4 --kv-heads 4 --mlp 704 \
  --vocab 1000 --embedding-size 1024 --dtype float32 --shards 2
gen small-bf16 2 1,7,64,300 --layers 2 --d-model 256 --heads 4 --kv-heads 4 --mlp 704 \
  --vocab 1000 --embedding-size 1024 --dtype bfloat16 --shards 2
gen small-gqa-f16 3 1,7,64 --layers 1 --d-model 128 --heads 4 --kv-heads 2 --mlp 256 \
  --vocab 500 --embedding-size 512 --dtype float16 --single-file

# Copy of the official goldens so tests can run without /work/shared.
if [ -d "$OFFICIAL_SRC" ]; then
  rm -rf "$TD/official-small"
  cp -r "$OFFICIAL_SRC" "$TD/official-small"
  chmod -R u+w "$TD/official-small"
else
  echo "note: $OFFICIAL_SRC not found; keeping existing testdata/official-small" >&2
fi

"$PYTHON" "$REF" --check-official "$TD/official-small"

du -sh "$TD"

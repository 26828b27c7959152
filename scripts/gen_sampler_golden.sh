#!/usr/bin/env bash
# Regenerates testdata/sampler/: dimoo's sampler traces at temperature 1 on
# the official small checkpoint, then the decisions of the independent
# PyTorch statement of the samplers (scripts/sampler_reference.py), which
# fails if any step differs from dimoo's. Needs lib/libdimoo.so (make).
set -euo pipefail
PYTHON="${PYTHON:-/opt/torchenv/bin/python}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p testdata/sampler
echo '{}' > testdata/sampler/decisions.json
DIMOO_WRITE_SAMPLER_TRACE=1 go test -count=1 -run TestSamplerReplay ./dimoo >/dev/null || true
"$PYTHON" scripts/sampler_reference.py testdata/sampler/trace.json testdata/sampler/decisions.json
go test -count=1 -run TestSamplerReplay ./dimoo

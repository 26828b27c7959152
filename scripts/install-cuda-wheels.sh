#!/usr/bin/env bash
# Installs a CUDA compiler and the libraries libdimoo links (cudart, cuBLAS,
# cuBLASLt) from PyPI wheels into DEST (default .cuda/), and lays them out as
# a toolkit root that nvcc and CMake's FindCUDAToolkit accept. Used by CI and
# by anyone without a system CUDA toolkit. Prints the toolkit root.
set -euo pipefail
DEST="${1:-.cuda}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
if [ ! -x "$DEST/py/nvidia/cu13/bin/nvcc" ]; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST/py" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 >&2
fi
T="$DEST/py/nvidia/cu13"
# nvcc's profile looks for lib64/, and the linker for unversioned names.
ln -sfn lib "$T/lib64"
for l in cublas cublasLt cudart; do ln -sfn "lib$l.so.13" "$T/lib/lib$l.so"; done
echo "$T"

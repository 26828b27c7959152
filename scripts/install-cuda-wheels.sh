#!/usr/bin/env bash
# Installs a CUDA compiler and the libraries libdimoo links (cudart, cuBLAS,
# cuBLASLt) from PyPI wheels into DEST (default .cuda/), and lays them out as
# a toolkit root that nvcc and CMake's FindCUDAToolkit accept. Also the
# header-only NVTX3 (nvidia-nvtx: include/nvtx3/nvToolsExt.h), which the
# CUDA backend's profiler ranges use when CMake finds it. Used by CI and by
# anyone without a system CUDA toolkit. Prints the toolkit root.
set -euo pipefail
DEST="${1:-.cuda}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
T="$DEST/py/nvidia/cu13"
if [ ! -x "$T/bin/nvcc" ]; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST/py" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
    nvidia-nvtx==13.0.85 >&2
fi
# A toolkit installed before NVTX joined the list: pip --target will not
# merge into the existing nvidia/ folder, so NVTX goes beside it and its
# headers are linked in.
if [ ! -f "$T/include/nvtx3/nvToolsExt.h" ]; then
  [ -f "$DEST/nvtx/nvidia/cu13/include/nvtx3/nvToolsExt.h" ] ||
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST/nvtx" \
      nvidia-nvtx==13.0.85 >&2
  ln -sfn ../../../../nvtx/nvidia/cu13/include/nvtx3 "$T/include/nvtx3" # relative: DEST may move
fi
# nvcc's profile looks for lib64/, and the linker for unversioned names.
ln -sfn lib "$T/lib64"
for l in cublas cublasLt cudart; do ln -sfn "lib$l.so.13" "$T/lib/lib$l.so"; done
echo "$T"

#!/usr/bin/env bash
# Everything GPU-side in one call, for a machine with an NVIDIA GPU and a CUDA
# toolkit (nvcc, cuBLAS) but no Go: builds libdimoo with the CUDA backend for
# Hopper (sm_90a) and sm_80, runs the C++ tests (the CUDA ones run for real
# there) and the Go test binaries built beforehand on a machine with Go:
#
#   here:   scripts/device-check.sh --prepare     (go test -c into build/go-tests/,
#           the CLI into bin/, the CUDA binaries into build/device-prebuilt/)
#   device: scripts/device-check.sh               (carry build/device-carry.tar.xz,
#           which --prepare packs them in: the device tool's 64 MiB; kind
#           nvidia-h200, the card of the issues' targets and of anchors.md)
#
# and prints a short table last. Exits non-zero if anything failed.
#
# Then the CUDA numbers side by side (build-device/dimoo_bench_cuda and
# scripts/bench_torch_reference.py, when the device's python has torch):
# attention TFLOP/s (ours vs torch SDPA cuDNN/flash), GEMMs at the model's
# shapes vs the cuBLAS 8192^3 ceiling, whole forward ms on random weights of
# the real shape (ours vs the reference PyTorch forward). The whole run fits
# in one device command (DEVICE_PHASES below picks the parts).
#
# End to end (the e2e phase): random bf16 weights of the real shape
# written on the device as a checkpoint (scripts/bench_official_pipeline.py
# --write-checkpoint, 16 GB in $DEVICE_E2E_MODEL, default /tmp/dimoo-e2e,
# kept for reruns; written in the background while the tests run), then per size (DEVICE_E2E_SIZES, default "512 1024":
# the cheap one first) `bin/dimoo bench --compare-cache` (without and with
# ML-Cache; its --json document goes to bench.json under --profile) and
# the official PyTorch pipeline on the same weights and sequence lengths (64
# steps, cfg 4), and bench/e2e_compare.py's table last: seconds, the ratio,
# peak memory, the issue's targets. bin/dimoo comes from --prepare (in the
# carried archive); each case's trace.json, cpu.pprof and bench.json land in
# $LOG/e2e-ours-SIZE/ (and in $OUT/logs.tar.gz).
#
# One device command may run 10 minutes and a session has 15 in all,
# machine start included, so plan on one call: `scripts/device-check.sh`
# runs the phases below in order of what they decide (DEVICE_PHASES) and
# stops starting steps at DEVICE_DEADLINE; the table names what was
# skipped and how to run it in a second call, should time be left.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p build/go-tests
  # Stripped (-s -w) like the CLI below: the carry is size-limited.
  go test -c -ldflags="-s -w" -o build/go-tests/dimoo.test ./dimoo
  go test -c -ldflags="-s -w" -o build/go-tests/bench.test ./bench
  # The CLI for the end-to-end benchmark: with cgo (NVML telemetry), and
  # without (a fallback should the device's C library not run the first).
  # Stripped (-s -w): smaller to carry; CPU profiles keep their function names.
  go build -ldflags="-s -w" -o bin/dimoo ./cmd/dimoo
  CGO_ENABLED=0 go build -ldflags="-s -w" -o bin/dimoo-nocgo ./cmd/dimoo
  # The device image has no GoogleTest: carry a source tree for the build there.
  if [ -d /usr/src/googletest ] && [ ! -d build/googletest-src ]; then cp -r /usr/src/googletest build/googletest-src; fi
  # The CUDA build itself, made here with the wheels' nvcc 13.0 (the device
  # has 13.0 too), so the device spends no time compiling: the test and
  # benchmark binaries and libdimoo, stripped, in build/device-prebuilt.
  # The device falls back to building there if they do not run.
  NVCC="${CUDACXX:-$ROOT/.cuda/py/nvidia/cu13/bin/nvcc}"
  if [ -x "$NVCC" ] && [ "${DEVICE_PREBUILD:-1}" = 1 ]; then
    CT="$(cd "$(dirname "$NVCC")/.." && pwd)"
    cmake -S . -B build-prebuilt -G Ninja -DDIMOO_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="80-real;90a-real" \
      -DCUDAToolkit_ROOT="$CT" -DCMAKE_CUDA_COMPILER="$NVCC" -DDIMOO_LIB_DIR="$ROOT/build-prebuilt/lib" >/dev/null || exit 1
    cmake --build build-prebuilt -j "$(nproc)" --target dimoo_tests dimoo_bench_cuda dimoo_cuda_sampler_bench dimoo_vqbench dimoo || exit 1
    rm -rf build/device-prebuilt && mkdir -p build/device-prebuilt
    cp build-prebuilt/dimoo_tests build-prebuilt/dimoo_bench_cuda build-prebuilt/dimoo_cuda_sampler_bench build-prebuilt/dimoo_vqbench \
      build-prebuilt/lib/libdimoo.so build/device-prebuilt/
    strip build/device-prebuilt/*
    git rev-parse HEAD >build/device-prebuilt/COMMIT
    git status --porcelain --untracked-files=no | grep -q . && echo "(with uncommitted changes)" >>build/device-prebuilt/COMMIT
  else
    # Never pack an older build: the device builds instead.
    rm -rf build/device-prebuilt
    echo "no nvcc at $NVCC (scripts/install-cuda-wheels.sh): the device will build libdimoo itself"
  fi
  # One xz archive of it all: what travels to the device (the working tree,
  # untracked files included, plus carried paths) may not pass 64 MiB, and
  # the tracked files alone are over 40. The device unpacks it with python3.
  rm -f build/device-carry.tar.xz
  parts=(build/go-tests bin)
  for d in build/googletest-src build/device-prebuilt; do [ -d "$d" ] && parts+=("$d"); done
  tar -cf - "${parts[@]}" | xz -6 -T0 >build/device-carry.tar.xz || exit 1
  tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
  carry=$(stat -c %s build/device-carry.tar.xz)
  echo "built ${parts[*]}, packed in build/device-carry.tar.xz: carry build/device-carry.tar.xz to the device"
  echo "travel: working tree $((tree >> 20)) MiB + carry $((carry >> 20)) MiB = $(((tree + carry) >> 20)) MiB of 64"
  [ $((tree + carry)) -lt $((64 << 20)) ] || { echo "over the device tool's 64 MiB: carry less"; exit 1; }
  exit 0
fi

# Step logs go to LOG. The device tool brings back at most 8 files from
# $OUT (when it sets OUT), so at the end they travel as one archive,
# $OUT/logs.tar.gz, next to the table and the two benchmark logs.
LOG="${DEVICE_LOGS:-/tmp/device-check-logs}"
rm -rf "$LOG" && mkdir -p "$LOG"
declare -a rows
status=0
# DEVICE_DEADLINE (seconds from the start, default 560): no step runs past
# it (each is cut to the time left, and those after it are skipped), so the
# table still prints inside the device tool's 10-minute command limit.
# The lent machines' memory (128 GiB) may grow as it is used, MemAvailable
# starting far lower (the device library's H200.md): the CPU backend's host
# memory checks take the documented size instead.
export DIMOO_HOST_AVAILABLE_MB="${DIMOO_HOST_AVAILABLE_MB:-120000}"
T_START=$(date +%s)
DEADLINE=${DEVICE_DEADLINE:-560}
step() { # name command...
  local name=$1; shift
  local t0 t1 r left
  left=$(( DEADLINE - ($(date +%s) - T_START) ))
  if [ "$left" -lt 5 ]; then
    rows+=("$(printf '%-22s %-5s %7s  %s' "$name" SKIP - "past DEVICE_DEADLINE=${DEADLINE}s")")
    last=SKIP
    status=1 # not everything ran
    return
  fi
  t0=$(date +%s%N)
  if timeout "$left" "$@" >"$LOG/$name.log" 2>&1; then r=ok; else r=FAIL; status=1; fi
  last=$r
  t1=$(date +%s%N)
  # Tenths of a second in shell arithmetic (the GPU machines have no bc).
  local ds=$(( (t1 - t0) / 100000000 ))
  rows+=("$(printf '%-22s %-5s %5d.%ds  %s' "$name" "$r" $((ds / 10)) $((ds % 10)) "$(tail -n 1 "$LOG/$name.log" | cut -c1-70)")")
}

# The run in phases, in the order of DEVICE_PHASES (default below). The
# first ones decide the most, so a cut at DEVICE_DEADLINE loses the least:
#   core-tests  the sm_90a attention kernels alone, then every C++ test
#   core-bench  dimoo_bench_cuda and bench_torch_reference.py: attention,
#               GEMMs, whole forwards against the PyTorch baselines (issue 12)
#   e2e         whole generations, ours against the official pipeline, per
#               size in DEVICE_E2E_SIZES (issue 13); a size is skipped, not
#               cut, when less time is left than it needs
#   more-tests  the forward per attention kernel, without graphs, the VQ-VAE,
#               compute-sanitizer, the Go tests on the GPU library
#   more-bench  the Go benchmarks, the VQ decode, the samplers, ncu
# A second call on the same warm machine runs what the first skipped, e.g.
# DEVICE_PHASES="e2e more-tests" DEVICE_E2E_SIZES=1024. What core-tests found
# about the sm_90a kernels is kept in $STATE for such a call.
# (Older switches: DEVICE_TESTS=0, DEVICE_BENCH=0, DEVICE_E2E=0 drop the
# test, benchmark or end-to-end phases.)
PHASES="${DEVICE_PHASES:-core-tests core-bench e2e more-tests more-bench}"
[ "${DEVICE_TESTS:-1}" = 1 ] || PHASES=$(echo "$PHASES" | sed 's/core-tests//; s/more-tests//')
[ "${DEVICE_BENCH:-1}" = 1 ] || PHASES=$(echo "$PHASES" | sed 's/core-bench//; s/more-bench//')
[ "${DEVICE_E2E:-1}" = 1 ] || PHASES=$(echo "$PHASES" | sed 's/e2e//')
STATE="${DEVICE_STATE:-/tmp/device-check-state}"
sm90_ok=1 sm90t_ok=1
# shellcheck disable=SC1090
[ -f "$STATE" ] && . "$STATE"
sm90_gate() { # after the sm_90a kernels' tests: what later steps may use
  if [ "$sm90_ok" = 0 ]; then export DIMOO_CUDA_ATTN=sm80; fi
  # The TMA kernels are left out of the benchmark when their test failed or hung.
  [ "$sm90t_ok" = 1 ] || export DIMOO_BENCH_SKIP="${DIMOO_BENCH_SKIP:+$DIMOO_BENCH_SKIP,}sm90t,sm90tp,sm90ts,sm90tps,sm90tw"
}
sm90_gate

# The end-to-end checkpoint (16 GB of random bf16 weights, e2e phase) is
# written in the background from the start, while the build (if any) and
# the tests run, which time nothing: the GPU only generates the weights
# (seconds), then the host copies and writes them. Benchmarks wait for it
# first, so no timing overlaps it.
E2E_MODEL="${DEVICE_E2E_MODEL:-/tmp/dimoo-e2e}"
ckpt_pid=
ckpt_start() {
  case " $PHASES " in *" e2e "*) ;; *) return ;; esac
  [ -f "$E2E_MODEL/model.safetensors.index.json" ] && return
  python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null || return
  ckpt_t0=$(date +%s)
  timeout 240 python3 scripts/bench_official_pipeline.py --write-checkpoint "$E2E_MODEL" >"$LOG/e2e-checkpoint.log" 2>&1 &
  ckpt_pid=$!
}
ckpt_wait() { # its row in the table, once it has ended
  [ -n "$ckpt_pid" ] || return
  local r=ok
  wait "$ckpt_pid" || { r=FAIL; status=1; }
  ckpt_pid=
  rows+=("$(printf '%-22s %-5s %6ds  %s' e2e-checkpoint "$r" $(($(date +%s) - ckpt_t0)) \
    "(background) $(tail -n 1 "$LOG/e2e-checkpoint.log" | cut -c1-57)")")
}

ckpt_start

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$LOG/gpu.txt" 2>&1
# What --prepare packed (carried as build/device-carry.tar.xz), unpacked at
# every call (a few seconds; a warm machine may hold an older unpacking).
if [ -f build/device-carry.tar.xz ]; then
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(".", filter="tar")' build/device-carry.tar.xz ||
    echo "could not unpack build/device-carry.tar.xz" >>"$LOG/gpu.txt"
fi
if [ -z "${DIMOO_CMAKE_ARGS:-}" ] && [ -f build/googletest-src/CMakeLists.txt ]; then
  DIMOO_CMAKE_ARGS="-DDIMOO_GTEST_SOURCE=$ROOT/build/googletest-src"
fi
# DIMOO_CMAKE_ARGS: extra configure arguments (e.g. -DDIMOO_GTEST_SOURCE=DIR where
# GoogleTest is not installed); DEVICE_JOBS: build parallelism.
# The binaries --prepare built (build/device-prebuilt, carried) when they
# run here: cuBLAS from the device's toolkit or its PyTorch's wheels, the
# repo's data through DIMOO_SOURCE_DIR. Otherwise (or DEVICE_REBUILD=1) the
# build happens here.
prebuilt=0
if [ -x build/device-prebuilt/dimoo_tests ] && [ "${DEVICE_REBUILD:-0}" != 1 ]; then
  CUBLAS_DIRS="$(python3 -c 'import nvidia, os; print(":".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null)"
  export LD_LIBRARY_PATH="${CUBLAS_DIRS:+$CUBLAS_DIRS:}/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export DIMOO_SOURCE_DIR="$ROOT"
  mkdir -p build-device lib
  cp build/device-prebuilt/dimoo_tests build/device-prebuilt/dimoo_bench_cuda build/device-prebuilt/dimoo_cuda_sampler_bench \
    build/device-prebuilt/dimoo_vqbench build-device/
  cp build/device-prebuilt/libdimoo.so lib/
  if timeout 60 ./build-device/dimoo_tests --gtest_list_tests >"$LOG/prebuilt.log" 2>&1 &&
    ! ldd lib/libdimoo.so 2>&1 | tee -a "$LOG/prebuilt.log" | grep -q "not found"; then
    prebuilt=1
    rows+=("$(printf '%-22s %-5s %7s  %s' build ok - "carried from --prepare at $(head -c 12 build/device-prebuilt/COMMIT)")")
  else
    rows+=("$(printf '%-22s %-5s %7s  %s' prebuilt no - "carried binaries do not run here (prebuilt.log): building")")
    rm -rf build-device lib/libdimoo.so
  fi
fi
if [ "$prebuilt" = 0 ]; then
  # shellcheck disable=SC2086
  step configure cmake -S . -B build-device -G Ninja -DDIMOO_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="80-real;90a-real" ${DIMOO_CMAKE_ARGS:-}
  step build cmake --build build-device -j "${DEVICE_JOBS:-$(nproc)}"
fi
core_tests() {
  # The sm_90a wgmma attention kernels first, alone (verified on the host
  # emulation only so far). The forward picks the wide pipelined one (sm90w) by
  # default on sm_90 after a start-up check against the reference kernel; should the
  # kernel test fail here, everything after runs with the sm_80 kernel.
  step cpp-sm90-attn timeout 90 ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='*Sm90*:*DefaultAttention*:-*Sm90Tma*'
  if [ "$last" = FAIL ]; then
    sm90_ok=0
    echo "sm90 attention failed: DIMOO_CUDA_ATTN=sm80 from here" >>"$LOG/cpp-sm90-attn.log"
  fi
  # The warp-specialized TMA kernels (sm90t, sm90tp with ping-pong, both on
  # a persistent grid: sm90ts, sm90tps, and sm90tw, sm90tps with 176-key
  # blocks) alone: a wrong mbarrier pipeline hangs, hence the short timeout.
  step cpp-sm90t-attn timeout 60 ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='*Sm90Tma*'
  sm90t_ok=$([ "$last" = ok ] && echo 1 || echo 0)
  echo "sm90_ok=$sm90_ok sm90t_ok=$sm90t_ok" >"$STATE"
  sm90_gate
  step cpp-tests timeout 240 ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='-*Sm90*'
}

core_bench() {
  ckpt_wait
  step bench-cuda timeout 300 ./build-device/dimoo_bench_cuda
  if python3 -c 'import torch' 2>/dev/null; then
    step bench-torch timeout 200 python3 scripts/bench_torch_reference.py
  fi
}

more_tests() {
  # The real shape (the e2e checkpoint, when there): `dimoo logits` on the GPU
  # at T = 129 (not a multiple of 64) against float64 and bf16-pattern PyTorch forwards
  # that stream the weights (scripts/check_forward_large.py).
  local left=$(( DEADLINE - ($(date +%s) - T_START) )) DIMOO_BIN="$ROOT/bin/dimoo"
  "$DIMOO_BIN" version >/dev/null 2>&1 || DIMOO_BIN="$ROOT/bin/dimoo-nocgo"
  if [ -f "$E2E_MODEL/model.safetensors.index.json" ] && [ -x "$DIMOO_BIN" ] && [ "$left" -ge 200 ]; then
    step fwd-real-check timeout 180 env DIMOO_LIBRARY="$ROOT/lib/libdimoo.so" python3 scripts/check_forward_large.py \
      --model "$E2E_MODEL" --T 129 --device cuda --dimoo "$DIMOO_BIN"
  elif [ -f "$E2E_MODEL/model.safetensors.index.json" ]; then
    rows+=("$(printf '%-22s %-5s %7s  %s' fwd-real-check SKIP - "${left}s left, needs ~200s: DEVICE_PHASES=more-tests")")
    status=1
  fi
  # The forward and the decode steps again without CUDA graphs (eager launches).
  step cuda-nographs timeout 240 env DIMOO_CUDA_GRAPHS=0 ./build-device/dimoo_tests --gtest_brief=1 \
    --gtest_filter='CudaForward.*:CudaKept.*:-*Graphs*:*Sm90*'
  # The VQ-VAE decoder on the GPU against the CPU (also in cpp-tests; alone
  # here so its line in the table says whether it ran).
  step cuda-vq timeout 120 ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaVQ.*'
  # The forward with each sm_90a attention kernel (verified on the host
  # emulation only), each in its own process; dimoo_bench_cuda times them.
  step cuda-fwd-sm90attn timeout 120 env DIMOO_CUDA_ATTN=sm90 ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaForward.*'
  step cuda-fwd-sm90p timeout 120 env DIMOO_CUDA_ATTN=sm90p ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaForward.*'
  step cuda-fwd-sm90p2 timeout 120 env DIMOO_CUDA_ATTN=sm90p2 ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaForward.RandomHeadDim128'
  step cuda-fwd-sm90w timeout 120 env DIMOO_CUDA_ATTN=sm90w ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaForward.RandomHeadDim128'
  if [ "$sm90t_ok" = 1 ]; then
    step cuda-fwd-sm90t timeout 120 env DIMOO_CUDA_ATTN=sm90t ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaForward.*'
    step cuda-fwd-sm90tp timeout 120 env DIMOO_CUDA_ATTN=sm90tp ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaForward.RandomHeadDim128'
    step cuda-fwd-sm90ts timeout 120 env DIMOO_CUDA_ATTN=sm90ts ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaForward.RandomHeadDim128:CudaForward.GraphsFollowTheCacheSlots'
    step cuda-fwd-sm90tps timeout 120 env DIMOO_CUDA_ATTN=sm90tps ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaForward.RandomHeadDim128'
    step cuda-fwd-sm90tw timeout 120 env DIMOO_CUDA_ATTN=sm90tw ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaForward.*'
  fi
  # ML-Cache USE forwards through a kernel of their own (DIMOO_CUDA_ATTN_USE;
  # the one-warpgroup wgmma kernel here, 64-row query tiles).
  [ "$sm90_ok" = 1 ] && step cuda-fwd-use-sm90p timeout 120 env DIMOO_CUDA_ATTN_USE=sm90p ./build-device/dimoo_tests \
    --gtest_brief=1 --gtest_filter='CudaForward.*'
  # The CUDA forward again with the reference attention kernel: if the flash
  # kernel is wrong, this tells whether the rest of the forward is right.
  step cuda-fwd-refattn timeout 120 env DIMOO_CUDA_ATTN=ref ./build-device/dimoo_tests --gtest_brief=1 --gtest_filter='CudaForward.*'
  if command -v compute-sanitizer >/dev/null; then
    step memcheck timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 ./build-device/dimoo_tests \
      --gtest_filter='Kernels.*:CudaKernels.*:CudaForward.SmallGqaF16:CudaKept.*:CudaVQ.RandomWithAttentionMatchesCpu:CudaVQ.RefusesBadCodesBeforeRunning:-*Sm90*'
    step racecheck timeout 90 compute-sanitizer --tool racecheck --error-exitcode 1 ./build-device/dimoo_tests \
      --gtest_filter='Kernels.*:CudaKernels.Attention*:-*Sm90*'
    # The sm_90a kernels under memcheck, once their tests passed (a hang there
    # would eat the sanitizer's timeout for nothing).
    if [ "$sm90_ok" = 1 ] && [ "$sm90t_ok" = 1 ]; then
      step memcheck-sm90 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 ./build-device/dimoo_tests \
        --gtest_filter='CudaKernels.AttentionSm90*'
    fi
  fi
  if [ -x build/go-tests/dimoo.test ]; then
    step go-tests env DIMOO_LIBRARY="$ROOT/lib/libdimoo.so" DIMOO_REQUIRE_LIBRARY=1 \
      bash -c "cd dimoo && ../build/go-tests/dimoo.test -test.count=1"
  fi
}

more_bench() {
  if [ -x build/go-tests/bench.test ]; then
    step go-bench env DIMOO_LIBRARY="$ROOT/lib/libdimoo.so" DIMOO_REQUIRE_LIBRARY=1 \
      bash -c "cd bench && ../build/go-tests/bench.test -test.run '^$' -test.bench . -test.benchtime 2s"
  fi
  # aMUSEd-size VQ decode, 32x32 -> 512² and 64x64 -> 1024², GPU ms next to
  # the CPU's in the same run (the relative error too), and the encoder (host).
  step bench-vq timeout 120 ./build-device/dimoo_vqbench --backend cuda --sides 32,64 --reps 3
  [ -x build-device/dimoo_cuda_sampler_bench ] && step bench-sampler timeout 60 ./build-device/dimoo_cuda_sampler_bench
  # Understanding end to end on the e2e checkpoint: the reference's settings
  # (answer 1024 in blocks of 256, 128 steps, greedy) on a synthetic
  # 1024x1024 input, about 5230 tokens a forward; then the official loop
  # (scripts/bench_official_pipeline.py --task understand) on a sequence of
  # the same length, and e2e_compare's understanding table.
  local left=$(( DEADLINE - ($(date +%s) - T_START) ))
  if [ -f "$E2E_MODEL/model.safetensors.index.json" ] && [ -x bin/dimoo ] && [ "$left" -ge 150 ]; then
    step e2e-understand env DIMOO_LIBRARY="$ROOT/lib/libdimoo.so" timeout 80 bin/dimoo bench --task understand \
      --model "$E2E_MODEL" --device cuda --width 1024 --height 1024 --runs 1 --warmup 1 --warmup-steps 4 --force \
      --profile "$LOG/e2e-understand"
    local T
    T=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["cases"][0]["settings"]["sequence_tokens"]["cond"])' \
      "$LOG/e2e-understand/bench.json" 2>/dev/null)
    [ -n "$T" ] && step e2e-official-understand timeout 60 python3 scripts/bench_official_pipeline.py --task understand \
      --seq-tokens "$T" --image-size 1024 --runs 1 --warmup-steps 2
  fi
  # Hardware counters of the flash kernels at B=2, T=4228 (ncu reads them
  # on the Firecracker machines, not on gVisor): for tuning, so a failure
  # here does not fail the run.
  if command -v ncu >/dev/null; then
    local keep_status=$status
    step ncu-attn timeout 150 ncu --clock-control none --kernel-name regex:flash --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
      ./build-device/dimoo_bench_cuda --profile-attn
    status=$keep_status
  fi
}

# End to end: our whole generation against the official pipeline's, on the
# same random weights of the real shape.
E2E_PROMPT="a red fox in the snow at dusk, a lighthouse on the water, two cats and 3 dogs by a small boat; keep the sky at dusk."
# The prompt's and the unconditional prompt's token counts under the
# checkpoint's tokenizer (testdata/official-inputs/tokenizer.json): 64 and 19,
# so T = 4228 at 1024x1024 as in /work/shared/anchors.md. bench/e2e_compare.py
# shows both sides' T and flags a mismatch.
E2E_COND=64 E2E_UNCOND=19
E2E_OURS=(--device cuda --steps 64 --cfg_scale 4 --temperature 1 --runs 1 --warmup 1 --warmup-steps 2
  --compare-cache --use-cache --force)
E2E_OFFICIAL=(--steps 64 --cfg 4 --runs 1 --warmup-steps 2 --cond-tokens "$E2E_COND" --uncond-tokens "$E2E_UNCOND")
e2e() {
  python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null || return
  local DIMOO_BIN="$ROOT/bin/dimoo" size left need
  if ! "$DIMOO_BIN" version >/dev/null 2>&1; then DIMOO_BIN="$ROOT/bin/dimoo-nocgo"; fi
  ckpt_wait
  if [ ! -f "$E2E_MODEL/model.safetensors.index.json" ]; then
    rows+=("$(printf '%-22s %-5s %7s  %s' e2e FAIL - "no checkpoint in $E2E_MODEL: e2e-checkpoint.log says why")")
    status=1
    return
  fi
  for size in ${DEVICE_E2E_SIZES:-512 1024}; do
    # Seconds both sides need, a guess with ~50% to spare: the official
    # pipeline's generations without and with ML-Cache (anchors.md: 35 s at
    # 1024, 14 s at 512) plus its weights (~5 s), ours at most as long plus
    # loading 16 GB (~15 s); a cut run measures nothing.
    need=$((size >= 1024 ? 150 : 80))
    left=$(( DEADLINE - ($(date +%s) - T_START) ))
    if [ "$left" -lt "$need" ]; then
      rows+=("$(printf '%-22s %-5s %7s  %s' "e2e-$size" SKIP - "${left}s left, needs ~${need}s: DEVICE_PHASES=e2e DEVICE_E2E_SIZES=$size")")
      status=1
      continue
    fi
    if [ -x "$DIMOO_BIN" ] && [ -f "$E2E_MODEL/model.safetensors.index.json" ]; then
      step "e2e-ours-$size" env DIMOO_LIBRARY="$ROOT/lib/libdimoo.so" timeout $((size >= 1024 ? 150 : 90)) \
        "$DIMOO_BIN" bench --model "$E2E_MODEL" --prompt "$E2E_PROMPT" --width "$size" --height "$size" \
        "${E2E_OURS[@]}" --profile "$LOG/e2e-ours-$size"
    fi
    step "e2e-official-$size" timeout $((size >= 1024 ? 120 : 60)) python3 scripts/bench_official_pipeline.py \
      --sizes "$size" "${E2E_OFFICIAL[@]}"
  done
}

for phase in $PHASES; do
  case "$phase" in
  core-tests) core_tests ;;
  core-bench) core_bench ;;
  e2e) e2e ;;
  more-tests) more_tests ;;
  more-bench) more_bench ;;
  *) echo "unknown phase $phase (DEVICE_PHASES)"; status=1 ;;
  esac
done

{
echo
echo "GPU: $(cat "$LOG/gpu.txt")"
for f in bench-cuda bench-torch; do
  [ -f "$LOG/$f.log" ] || continue
  if grep -q '== .*summary' "$LOG/$f.log"; then sed -n '/== .*summary/,$p' "$LOG/$f.log"
  else # cut before its summary (a hang, the deadline): its result lines so far
    echo "== $f: no summary (cut short); its lines so far =="
    grep -E '^(gemm|elem|attn|fwd|check|torch|sdpa|ref) ' "$LOG/$f.log" | tail -n 60
  fi
done
[ -f "$LOG/bench-vq.log" ] && grep -E '^(op|decode|encode) ' "$LOG/bench-vq.log"
[ -f "$LOG/e2e-understand.log" ] && grep -E '^ *median|^understand ' "$LOG/e2e-understand.log"
# ncu: per flash kernel its launch line, then time, SM throughput, registers, occupancy.
[ -f "$LOG/ncu-attn.log" ] && grep -E '^  [A-Za-z_].*\(|Duration|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy' \
  "$LOG/ncu-attn.log" | cut -c1-110
printf '%-22s %-5s %8s  %s\n' check result time "last line"
printf '%s\n' "${rows[@]}"
if ls "$LOG"/e2e-* >/dev/null 2>&1; then
  echo
  for f in "$LOG"/e2e-ours-*.log; do [ -f "$f" ] && cat "$f"; done
  python3 bench/e2e_compare.py "$LOG"/e2e-*
fi
} 2>&1 | tee "$LOG/table.txt"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  tar -czf "$OUT/logs.tar.gz" -C "$LOG" . 2>/dev/null
  for f in table.txt bench-cuda.log bench-torch.log; do [ -f "$LOG/$f" ] && cp "$LOG/$f" "$OUT/"; done
fi
exit $status

#!/usr/bin/env bash
# Compile-time checks of the CUDA kernels, no GPU needed:
#  1. ptxas resource report (-Xptxas -v) of each kernels/cuda/*.cu for sm_80
#     and sm_90a: no spill stores/loads and no stack frame in any kernel, and
#     no wgmma serialization notice (C751x);
#  2. SASS from cuobjdump (nvidia-cuda-cuobjdump 13.2.51 from PyPI, installed
#     into build/.sass-tools if not on PATH): no local-memory traffic
#     (LDL/STL) in any kernel, mma.sync (HMMA) and ldmatrix (LDSM) present in
#     the sm80 flash attention kernels, HGMMA in every sm_90a kernel whose
#     name says wgmma (attention_sm90.cu), and in the warp-specialized
#     flash_tma kernel HGMMA, TMA loads (UTMALDG), mbarrier ops (SYNCS) and
#     register reallocation (USETMAXREG; ptxas warning C7508 fails), and
#     16-byte loads (LDG.E.128) in the wide SwiGLU and RMSNorm kernels.
# Prints one line per kernel and arch and a verdict last; exits non-zero on
# any failure. Usage: scripts/check-sass.sh [BUILD_DIR]   (default build)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUILD="${1:-build}"
NVCC="${CUDACXX:-$ROOT/.cuda/py/nvidia/cu13/bin/nvcc}"
TOOLS="$ROOT/build/.sass-tools"
PYTHON="${PYTHON:-python3}"
[ -x "$NVCC" ] || { echo "no nvcc at $NVCC (set CUDACXX)"; exit 2; }

if ! command -v cuobjdump >/dev/null || ! command -v nvdisasm >/dev/null; then
  if [ ! -x "$TOOLS/cuobjdump/nvidia/cu13/bin/cuobjdump" ] || [ ! -x "$TOOLS/nvdisasm/nvidia/cu13/bin/nvdisasm" ]; then
    # The oldest cu13 releases on PyPI; they read nvcc 13.0's cubins (gpu-design.md section 2).
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TOOLS/cuobjdump" \
      nvidia-cuda-cuobjdump==13.2.51 >&2 || { echo "could not install cuobjdump"; exit 2; }
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TOOLS/nvdisasm" \
      nvidia-cuda-nvdisasm==13.2.51 >&2 || { echo "could not install nvdisasm"; exit 2; }
  fi
  export PATH="$TOOLS/cuobjdump/nvidia/cu13/bin:$TOOLS/nvdisasm/nvidia/cu13/bin:$PATH"
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
fail=0
INC="-Iinclude -Icsrc -Ikernels -I$(dirname "$NVCC")/../include"
for src in kernels/cuda/*.cu; do
  name="$(basename "$src" .cu)"
  # shellcheck disable=SC2086
  if ! nice "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr $INC \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
      -Xptxas -v -c "$src" -o "$OUT/$name.o" >"$OUT/$name.ptxas" 2>&1; then
    echo "FAIL $name: does not compile"; cat "$OUT/$name.ptxas"; fail=1; continue
  fi
  # ptxas: "Compiling entry function 'X' for 'sm_NN'" then "N bytes stack frame, N bytes spill stores, N bytes spill loads"
  "$PYTHON" - "$name" "$OUT/$name.ptxas" <<'PY' || fail=1
import re, subprocess, sys
name, path = sys.argv[1], sys.argv[2]
bad = 0
fn = arch = None
for line in open(path):
    # ptxas C7510-C7519: wgmma serialized (an instruction touching a wgmma's
    # registers inside its pipeline stage): correct, but the overlap is gone.
    if re.search(r"\(C751\d\)", line):
        print(f"FAIL ptxas {name:10s} wgmma serialized: {line.strip()[:160]}")
        bad = 1
    # C7508: setmaxnreg ignored (ptxas could not tell the registers at entry).
    if re.search(r"\(C7508\)", line):
        print(f"FAIL ptxas {name:10s} setmaxnreg ignored: {line.strip()[:160]}")
        bad = 1
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
    if m:
        fn, arch = m.group(1), m.group(2)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and fn:
        st, ss, sl = map(int, m.groups())
        dem = subprocess.run(["c++filt"], input=fn, capture_output=True, text=True).stdout.strip() or fn
        short = re.sub(r"\(.*", "", dem.replace("(anonymous namespace)::", "").replace("void ", "").replace("dimoo::", ""))
        ok = st == 0 and ss == 0 and sl == 0
        bad |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} ptxas {name:10s} {arch:7s} {short[:48]:48s} stack {st} spill {ss}/{sl}")
sys.exit(1 if bad else 0)
PY
  for arch in sm_80 sm_90a; do
    cuobjdump -sass -arch "$arch" "$OUT/$name.o" >"$OUT/$name.$arch.sass" 2>&1 || { echo "FAIL cuobjdump $name $arch"; fail=1; continue; }
    "$PYTHON" - "$name" "$arch" "$OUT/$name.$arch.sass" <<'PY' || fail=1
import re, subprocess, sys
name, arch, path = sys.argv[1:4]
funcs, cur = {}, None
for line in open(path):
    m = re.search(r"Function : (\S+)", line)
    if m:
        cur = m.group(1); funcs[cur] = {}
        continue
    if cur:
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([.A-Z0-9_]*)", line)
        if m:
            op = m.group(1)
            funcs[cur][op] = funcs[cur].get(op, 0) + 1
            # 16-byte global loads (LDG.E.128...), the vectorized elementwise kernels' point.
            if op == "LDG" and ".128" in m.group(2):
                funcs[cur]["LDG.128"] = funcs[cur].get("LDG.128", 0) + 1
bad = 0
for fn, ops in funcs.items():
    dem = subprocess.run(["c++filt"], input=fn, capture_output=True, text=True).stdout.strip() or fn
    local = ops.get("LDL", 0) + ops.get("STL", 0)
    need = []
    if "flash_sm80" in dem: need += ["HMMA", "LDSM"]
    if "wgmma" in dem and arch == "sm_90a": need += ["HGMMA"]
    # The warp-specialized kernel: TMA loads, mbarriers, register reallocation.
    if "flash_tma" in dem and arch == "sm_90a": need += ["HGMMA", "UTMALDG", "SYNCS", "USETMAXREG"]
    # The elementwise kernels' wide paths: 16-byte loads, or they are not wide.
    if "swiglu_vec8" in dem or "rmsnorm_f32_bf16_vec" in dem: need += ["LDG.128"]
    missing = [n for n in need if not ops.get(n)]
    ok = local == 0 and not missing
    bad |= not ok
    short = re.sub(r"\(.*", "", dem.replace("(anonymous namespace)::", "").replace("void ", "").replace("dimoo::", ""))[-48:]
    extra = " ".join(f"{k} {ops.get(k, 0)}" for k in ("HMMA", "HGMMA", "LDSM", "UTMALDG", "USETMAXREG", "LDG.128") if ops.get(k))
    print(f"{'ok  ' if ok else 'FAIL'} sass  {name:10s} {arch:7s} {short:48s} LDL/STL {local} {extra}"
          + (f" missing {missing}" if missing else ""))
sys.exit(1 if bad else 0)
PY
  done
done
echo
if [ $fail = 0 ]; then echo "check-sass: PASS (no spills, no stack, no local memory; HMMA/LDSM in flash_sm80, HGMMA in the sm_90a wgmma kernels, TMA and setmaxnreg in flash_tma, 16-byte loads in the wide swiglu/rmsnorm)"; else echo "check-sass: FAIL"; fi
exit $fail

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
#     16-byte loads (LDG.E.128) in the wide SwiGLU and RMSNorm kernels;
#  3. launch resources, which a device would report only as a failed launch
#     or a hang: each kernel's registers (ptxas) times its launch bound
#     (EIATTR_MAX_THREADS, else 1024) fit the SM's 64K, and where it uses
#     setmaxnreg the CTA's register pool covers one warpgroup's DEALLOC plus
#     the others' TRY_ALLOC targets.
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
  "$PYTHON" - "$name" "$OUT/$name.ptxas" "$OUT/$name.regs" <<'PY' || fail=1
import re, subprocess, sys
name, path, regs_out = sys.argv[1], sys.argv[2], sys.argv[3]
bad = 0
fn = arch = None
regs = open(regs_out, "w")  # "arch function registers", for the launch check below
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
    m = re.search(r"Used (\d+) registers", line)
    if m and fn:
        regs.write(f"{arch} {fn} {m.group(1)}\n")
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
    cuobjdump -elf -arch "$arch" "$OUT/$name.o" >"$OUT/$name.$arch.elf" 2>&1 || { echo "FAIL cuobjdump -elf $name $arch"; fail=1; continue; }
    "$PYTHON" - "$name" "$arch" "$OUT/$name.$arch.sass" "$OUT/$name.$arch.elf" "$OUT/$name.regs" <<'PY' || fail=1
import re, subprocess, sys
name, arch, path, elf, regs_path = sys.argv[1:6]
# Registers per thread (ptxas) and the launch bound (EIATTR_MAX_THREADS in the
# function's .nv.info section; none: any block up to 1024 threads).
regs = {f: int(r) for a, f, r in (l.split() for l in open(regs_path)) if a == arch}
bound, cur = {}, None
for line in open(elf):
    m = re.match(r"\.nv\.info\.(\S+)", line)
    if m:
        cur = m.group(1)
    elif cur and "EIATTR_MAX_THREADS" in line:
        bound[cur] = None  # its value is on the next "Value:" line
    elif cur in bound and bound[cur] is None:
        m = re.search(r"Value:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", line)
        if m:
            bound[cur] = int(m.group(1), 16) * int(m.group(2), 16) * int(m.group(3), 16)
funcs, cur = {}, None
for line in open(path):
    m = re.search(r"Function : (\S+)", line)
    if m:
        cur = m.group(1); funcs[cur] = {"alloc": [], "dealloc": []}
        continue
    if cur:
        # setmaxnreg's targets: what a warpgroup gives back or asks for.
        m = re.search(r"USETMAXREG\.(TRY_ALLOC|DEALLOC)\S*\s+(?:U?P\w+,\s*)?(0x[0-9a-f]+)", line)
        if m:
            funcs[cur]["alloc" if m.group(1) == "TRY_ALLOC" else "dealloc"].append(int(m.group(2), 16))
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
    # Launch resources, which only a device would otherwise report (launch
    # failure) or hang on: a block of the bound's threads must fit the SM's
    # 64K registers (allocated per warp, 8 per thread at a time); and with
    # setmaxnreg, one warpgroup's DEALLOC must free what the others'
    # TRY_ALLOC ask for, or they spin on it for ever (the CTA's pool is what
    # it got at launch).
    threads, r = bound.get(fn) or 1024, regs.get(fn, 0)
    pool = (threads + 31) // 32 * 32 * ((r + 7) // 8 * 8)
    launch = [] if fn in regs else ["no register count in the ptxas report (its format changed?)"]
    if pool > 65536:
        launch.append(f"{r} registers x {threads} threads > 64K" + ("" if fn in bound else " (no __launch_bounds__)"))
    if ops["alloc"] or ops["dealloc"]:
        want = 128 * min(ops["dealloc"] or [r]) + (threads - 128) * max(ops["alloc"] or [r])
        if want > pool:
            launch.append(f"setmaxnreg wants {want} registers of a pool of {pool}")
    ok = local == 0 and not missing and not launch
    bad |= not ok
    short = re.sub(r"\(.*", "", dem.replace("(anonymous namespace)::", "").replace("void ", "").replace("dimoo::", ""))[-48:]
    extra = " ".join(f"{k} {ops.get(k, 0)}" for k in ("HMMA", "HGMMA", "LDSM", "UTMALDG", "USETMAXREG", "LDG.128") if ops.get(k))
    print(f"{'ok  ' if ok else 'FAIL'} sass  {name:10s} {arch:7s} {short:48s} LDL/STL {local} regs {r}x{threads} {extra}"
          + (f" missing {missing}" if missing else "") + "".join(f"; {x}" for x in launch))
sys.exit(1 if bad else 0)
PY
  done
done
echo
if [ $fail = 0 ]; then echo "check-sass: PASS (no spills, no stack, no local memory; HMMA/LDSM in flash_sm80, HGMMA in the sm_90a wgmma kernels, TMA and setmaxnreg in flash_tma, 16-byte loads in the wide swiglu/rmsnorm; registers fit each launch bound and setmaxnreg's pool)"; else echo "check-sass: FAIL"; fi
exit $fail

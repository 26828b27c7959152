#!/usr/bin/env bash
# A dry run of scripts/device-check.sh on a machine without a GPU, for CI:
# the device gets one call in a rare session, so the script's own flow
# (phases, the background checkpoint, the deadline, the end-to-end and
# understanding steps, the table) must not be what fails there. In a copy
# of the tree, with stand-ins on PATH for nvidia-smi, cmake (whose "build"
# makes stand-in test and benchmark binaries), PyTorch's scripts and
# bin/dimoo, it checks that every step runs and lands in the table, that
# the end-to-end comparison reads what the stand-ins wrote, and that a short
# DEVICE_DEADLINE skips steps instead of cutting them. Needs bash and
# python3 (standard library) only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REAL_PY="$(command -v python3)"
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/tree" "$T/fake" "$T/logs"
(cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$T/tree"
# A carried archive or prebuilt binaries would change the path under test.
rm -rf "$T/tree/build" "$T/tree/bin"

cat >"$T/fake/nvidia-smi" <<'EOF'
#!/usr/bin/env bash
echo "NVIDIA H200 (stand-in), 143771 MiB, 580.00"
EOF

# cmake: configure makes the folder, build makes the binaries the phases run.
cat >"$T/fake/cmake" <<'EOF'
#!/usr/bin/env bash
if [ "$1" = "--build" ]; then
  mkdir -p "$2" lib
  for b in dimoo_tests dimoo_bench_cuda dimoo_cuda_sampler_bench dimoo_vqbench; do
    printf '#!/usr/bin/env bash\nsleep "${FAKE_STEP_S:-0}"\necho "%s $*"\n' "$b" >"$2/$b"
    chmod +x "$2/$b"
  done
  # The benchmark's summary, which the table shows.
  printf '#!/usr/bin/env bash\necho "== summary =="\necho "attn  fastest at B=2 Tq=Tk=4228: sm90w (0.0 TFLOP/s)"\n' \
    >"$2/dimoo_bench_cuda"
  : >lib/libdimoo.so
  echo "built"
else
  mkdir -p "$(echo "$@" | sed -n 's/.*-B \([^ ]*\).*/\1/p')"
  echo "configured"
fi
EOF

# python3: the torch check passes; PyTorch's benchmark scripts print what
# the real ones print (the JSON lines e2e_compare reads); anything else is
# the real python3 (unpacking, e2e_compare, reading bench.json).
cat >"$T/fake/python3" <<EOF
#!/usr/bin/env bash
case "\$*" in
  *"import torch"*) exit 0 ;;
esac
arg() { # the value after flag \$1 in the arguments that follow
  local f=\$1; shift
  while [ \$# -gt 0 ]; do [ "\$1" = "\$f" ] && { echo "\$2"; return; }; shift; done
}
case "\${1:-}" in
  scripts/bench_torch_reference.py)
    echo "== torch summary (1 s) =="; echo "sdpa cudnn B=2 T=4228 0.0 TFLOP/s"; exit 0 ;;
  scripts/check_forward_large.py)
    [ "\$(arg --device "\$@")" = cuda ] && [ -f "\$(arg --model "\$@")/model.safetensors.index.json" ] || exit 1
    echo "check ok"; exit 0 ;;
  scripts/bench_official_pipeline.py)
    d=\$(arg --write-checkpoint "\$@")
    if [ -n "\$d" ]; then
      sleep \${FAKE_CKPT_S:-1}
      [ -n "\${FAKE_CKPT_FAIL:-}" ] && { echo "OSError: [Errno 28] No space left on device"; exit 1; }
      mkdir -p "\$d"; echo '{}' >"\$d/model.safetensors.index.json"
      echo "wrote \$d: 16.16 GB of bf16 in 1.0 s"; exit 0
    fi
    if [ "\$(arg --task "\$@")" = understand ]; then
      echo "{\"case\": \"official-understand\", \"image_size\": \$(arg --image-size "\$@"), \"sequence_tokens\": \$(arg --seq-tokens "\$@"), \"gen_length\": 1024, \"block_length\": 256, \"steps\": 128, \"cfg_scale\": 0, \"temperature\": 0, \"blocks_decoded\": 4, \"forwards\": 128, \"seconds\": [30.0], \"seconds_median\": 30.0, \"gpu\": \"NVIDIA H200\"}"
      exit 0
    fi
    n=\$(arg --sizes "\$@")
    for uc in false true; do
      echo "{\"case\": \"official\", \"width\": \$n, \"height\": \$n, \"use_cache\": \$uc, \"steps\": 64, \"cfg_scale\": 4, \"sequence_tokens\": {\"cond\": 4228}, \"seconds_median\": 20.0, \"peak_device_used_bytes\": 20000000000, \"gpu\": \"NVIDIA H200\"}"
    done
    exit 0 ;;
esac
exec "$REAL_PY" "\$@"
EOF

# bin/dimoo: bench writes a dimoo-bench/1 document under --profile.
mkdir -p "$T/tree/bin"
cat >"$T/tree/bin/dimoo" <<'EOF'
#!/usr/bin/env bash
[ "$1" = version ] && exit 0
arg() { local f=$1; shift; while [ $# -gt 0 ]; do [ "$1" = "$f" ] && { echo "$2"; return; }; shift; done; }
dir=$(arg --profile "$@"); w=$(arg --width "$@"); mkdir -p "$dir"
if [ "$(arg --task "$@")" = understand ]; then
  cases='[{"settings": {"task": "understand", "width": '$w', "height": '$w', "sequence_tokens": {"cond": 5230}, "steps": 128, "gen_length": 1024, "block_length": 256}, "median": {"steps": 128, "forwards": 128, "decode_ms": 20000, "tokens_per_second": 51.2}}]'
else
  cases=''
  for uc in false true; do
    cases="$cases${cases:+,}"'{"settings": {"task": "t2i", "width": '$w', "height": '$w', "use_cache": '$uc', "sequence_tokens": {"cond": 4228}, "steps": 64, "cfg_scale": 4}, "median": {"decode_ms": 10000, "generate_ms": 10500}}'
  done
  cases="[$cases]"
fi
echo '{"schema": "dimoo-bench/1", "machine": {"backend": "cuda"}, "cases": '"$cases"'}' >"$dir/bench.json"
echo "  median  10000.0  64"
EOF
chmod +x "$T/fake/"* "$T/tree/bin/dimoo"

fail() { echo "test-device-check: $*"; exit 1; }
run() { # DEVICE_* settings...; the output in $T/out
  (cd "$T/tree" && env PATH="$T/fake:$PATH" DEVICE_LOGS="$T/logs" DEVICE_E2E_MODEL="$T/e2e" \
    DEVICE_STATE="$T/state" OUT="$T/o" "$@" \
    bash scripts/device-check.sh >"$T/out" 2>&1) && rc=0 || rc=$?
}

# 1. Every phase, with time for everything: every step ran and passed.
run env
grep -qiE 'unbound variable|syntax error|command not found|unexpected' "$T/out" && fail "the script broke: $(cat "$T/out")"
[ "$rc" = 0 ] || fail "exit $rc with every stand-in passing: $(cat "$T/out")"
for row in configure build cpp-sm90-attn cpp-sm90t-attn cpp-tests e2e-checkpoint bench-cuda bench-torch \
  e2e-ours-512 e2e-official-512 e2e-ours-1024 e2e-official-1024 cuda-nographs cuda-vq cuda-fwd-sm90tw \
  cuda-fwd-refattn bench-vq bench-sampler e2e-understand e2e-official-understand fwd-real-check; do
  grep -qE "^$row +ok " "$T/out" || fail "no passing row for $row: $(cat "$T/out")"
done
grep -q '(background) wrote' "$T/out" || fail "the checkpoint did not run in the background"
grep -q 'attn  fastest' "$T/out" || fail "the benchmark summary is not in the table"
grep -q '== end to end: dimoo bench vs the official pipeline' "$T/out" || fail "no end-to-end table"
grep -qE '1024x1024 +off +4228 +10.00 .* 20.00 +19.60 +2.00x' "$T/out" || fail "the end-to-end row is off: $(cat "$T/out")"
grep -q 'against the official code ours is' "$T/out" || fail "no note against the official code's H200 times"
grep -qE '1024x1024 +5230 +1024/256/128 +51.2 +34.1 +1.50x' "$T/out" ||
  fail "the understanding row is off: $(cat "$T/out")"
[ -f "$T/o/table.txt" ] && [ -f "$T/o/logs.tar.gz" ] || fail "nothing in \$OUT"

# 2. A deadline too short for the rest: steps are skipped (and say how to
#    run them), not cut; the exit status says not everything ran.
rm -rf "$T/e2e"
run env DEVICE_DEADLINE=12 FAKE_CKPT_S=2 FAKE_STEP_S=1
[ "$rc" != 0 ] || fail "exit 0 though steps were skipped"
grep -qE '^e2e-512 +SKIP .*DEVICE_PHASES=e2e DEVICE_E2E_SIZES=512' "$T/out" || fail "e2e-512 not skipped: $(cat "$T/out")"
grep -qE 'SKIP .*past DEVICE_DEADLINE=12s' "$T/out" || fail "no step skipped past the deadline: $(cat "$T/out")"
grep -qE '^e2e-checkpoint +ok' "$T/out" || fail "the background checkpoint did not finish"

# 3. A failed checkpoint write: the end-to-end phase says so, once.
rm -rf "$T/e2e"
run env DEVICE_PHASES="e2e" FAKE_CKPT_FAIL=1
grep -qE '^e2e-checkpoint +FAIL .*No space left' "$T/out" || fail "the failed write has no row: $(cat "$T/out")"
grep -qE '^e2e +FAIL .*no checkpoint' "$T/out" || fail "a failed checkpoint is not reported: $(cat "$T/out")"
[ "$(grep -c 'e2e-ours\|e2e-official' "$T/out")" = 0 ] || fail "end-to-end steps ran without a checkpoint"
echo "test-device-check: ok (every phase, a short deadline, a failed checkpoint)"

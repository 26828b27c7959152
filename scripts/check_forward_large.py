#!/usr/bin/env python3
"""dimoo's logits on a large checkpoint (the real 8B shape: random bf16 weights
from `scripts/bench_official_pipeline.py --device cpu --write-checkpoint DIR`)
against two PyTorch forwards that read the weights shard by shard, so the
check fits in about 10 GB next to nothing else:

  f64   scripts/reference_forward.py's float64 forward (the exact answer up to
        float64 rounding, with the official fp32 RMSNorm and RoPE);
  bf16  scripts/bf16_forward_error.py's forward: the same in float64 but
        rounded to bf16 where a bf16 engine stores activations (GEMM inputs
        and outputs, RoPE'd Q/K, P before P V, the attention output), the
        error any correct bf16 forward has.

It prints ||x - f64|| / ||f64|| for dimoo and for the bf16 forward, per
sequence, and fails when dimoo's error exceeds --factor times the bf16
forward's (plus 1e-3): a bf16 engine lands near the bf16 forward's error,
a wrong one far above it.

dimoo runs first, alone (`dimoo logits`, the weights as the library holds
them: 16 GB for the real shape), then the PyTorch forwards.

Usage:
  python3 scripts/check_forward_large.py --model DIR [--T 64] [--seeds 1]
      [--dimoo bin/dimoo] [--device cpu|cuda] [--threads 2] [--factor 1.5]
scripts/device-check.sh runs it on the GPU (step fwd-real-check) on its
end-to-end checkpoint.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bf16_forward_error as B  # noqa: E402
import reference_forward as R  # noqa: E402


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--T", default="64", help="sequence lengths, comma-separated")
    ap.add_argument("--seeds", type=int, default=1, help="token draws per length (numpy seeds 0..N-1)")
    ap.add_argument("--dimoo", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bin", "dimoo"))
    ap.add_argument("--threads", type=int, default=0, help="dimoo's and PyTorch's threads (0: all cores)")
    ap.add_argument("--device", default="cpu", help="dimoo's backend: cpu or cuda (PyTorch's forwards stay on the CPU)")
    ap.add_argument("--factor", type=float, default=1.5)
    a = ap.parse_args()
    threads = a.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    cfg, w = R.load_model(a.model, lazy=True)
    cases = []
    for T in (int(t) for t in a.T.split(",")):
        for seed in range(a.seeds):
            cases.append((T, seed, [int(t) for t in np.random.RandomState(seed).randint(0, cfg["vocab_size"], T)]))
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        got = {}
        for T, seed, toks in cases:
            out = os.path.join(tmp, f"T{T}_s{seed}.npy")
            t0 = time.perf_counter()
            r = subprocess.run([a.dimoo, "logits", "--model", a.model, "--tokens", ",".join(map(str, toks)),
                                "--out", out, "--threads", str(threads), "--device", a.device],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"dimoo logits failed:\n{r.stderr}")
            got[(T, seed)] = np.load(out).astype(np.float64)
            print(f"dimoo logits T={T} seed {seed}: {time.perf_counter() - t0:.1f} s (load included)", flush=True)
        for T, seed, toks in cases:
            t0 = time.perf_counter()
            ref = R.forward(cfg, w, toks).numpy()
            t1 = time.perf_counter()
            b16 = B.forward_bf16(cfg, w, toks).numpy()
            t2 = time.perf_counter()
            d = got[(T, seed)]
            if d.shape != ref.shape:
                sys.exit(f"shape: dimoo {d.shape}, reference {ref.shape}")
            e_d, e_b, e_db = rel(d, ref), rel(b16, ref), rel(d, b16)
            good = e_d <= a.factor * e_b + 1e-3
            ok &= good
            print(f"T={T} seed {seed}: ||dimoo - f64||/||f64|| {e_d:.3e}, ||bf16 - f64||/||f64|| {e_b:.3e}, "
                  f"||dimoo - bf16||/||bf16|| {e_db:.3e}  {'ok' if good else 'FAIL'} "
                  f"(f64 {t1 - t0:.0f} s, bf16 {t2 - t1:.0f} s)", flush=True)
    print("check", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""PyTorch's bf16 forward of the LLaDA / Lumina-DiMOO transformer on the CPU,
interleaved T by T with dimoo's (build/dimoo_cpupeak --serve), on random
models of the same architecture and shapes.

The PyTorch side is the official model's bf16 arithmetic: RMSNorm normalised
in float32 and cast back, RoPE in float32 and cast back, every Linear in bf16
(oneDNN's AMX or AVX512-BF16 GEMMs, the best the CPU has; ONEDNN_VERBOSE=1
names them), F.scaled_dot_product_attention (no mask) in bf16, gated SiLU MLP, untied head.
Both sides draw their own random weights (N(0, 1/fan_in) matrices), so the
logits differ; the shapes, dtypes and token counts are the same.

Usage:
  python3 scripts/bench_pytorch_cpu.py [--T 64,300,1124] [--reps 3] [--threads 2]
      [--layers 1 --d 4096 --heads 32 --kv-heads 32 --mlp 12288 --vocab 16384]
      [--dimoo build/dimoo_cpupeak]    # '' measures PyTorch alone

Per repetition and T: one timed PyTorch forward (after a warm-up per T),
then one timed dimoo forward in the other process (which sleeps meanwhile);
the table gives medians [min max] over the repetitions of tokens/s and of
the per-repetition ratio dimoo / PyTorch, by wall time and by CPU time.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def build(a):
    g = torch.Generator().manual_seed(1)
    d, kv, mlp, e = a.d, a.d // a.heads * a.kv_heads, a.mlp, a.vocab

    def mat(n, k):
        return (torch.randn(n, k, generator=g) / math.sqrt(k)).to(torch.bfloat16)

    def norm(n):
        return (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    w = {"wte": torch.randn(e, d, generator=g).to(torch.bfloat16), "ln_f": norm(d), "head": mat(e, d), "blocks": []}
    for _ in range(a.layers):
        w["blocks"].append({
            "attn_norm": norm(d), "q": mat(d, d), "k": mat(kv, d), "v": mat(kv, d), "o": mat(d, d),
            "ff_norm": norm(d), "gate": mat(mlp, d), "up": mat(mlp, d), "down": mat(d, mlp),
        })
    return w


def rms_norm(x, weight, eps=1e-5):
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope(x, cos, sin):
    xf = x.to(torch.float32)
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


@torch.inference_mode()
def forward(a, w, ids):
    T = ids.shape[0]
    H, KV, hd = a.heads, a.kv_heads, a.d // a.heads
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos(), ang.sin()
    x = w["wte"][ids]
    for b in w["blocks"]:
        h = rms_norm(x, b["attn_norm"])
        q = F.linear(h, b["q"]).view(T, H, hd).transpose(0, 1)
        k = F.linear(h, b["k"]).view(T, KV, hd).transpose(0, 1)
        v = F.linear(h, b["v"]).view(T, KV, hd).transpose(0, 1)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if KV != H:
            k = k.repeat_interleave(H // KV, dim=0)
            v = v.repeat_interleave(H // KV, dim=0)
        att = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))[0]
        x = x + F.linear(att.transpose(0, 1).reshape(T, a.d), b["o"])
        h = rms_norm(x, b["ff_norm"])
        x = x + F.linear(F.silu(F.linear(h, b["gate"])) * F.linear(h, b["up"]), b["down"])
    return F.linear(rms_norm(x, w["ln_f"]), w["head"]).float()


def cell(v):
    return f"{statistics.median(v):.2f} [{min(v):.2f} {max(v):.2f}]"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", default="64,300,1124")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--mlp", type=int, default=12288)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--dimoo", default="build/dimoo_cpupeak")
    a = p.parse_args()
    Ts = [int(t) for t in a.T.split(",")]
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 on CPU: "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
    w = build(a)
    proc = None
    if a.dimoo:
        cmd = [a.dimoo, "--serve", "--T", a.T, "--threads", str(a.threads), "--layers", str(a.layers),
               "--d", str(a.d), "--heads", str(a.heads), "--kv-heads", str(a.kv_heads), "--mlp", str(a.mlp),
               "--vocab", str(a.vocab)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ids = {T: torch.tensor([(i * 7919) % a.vocab for i in range(T)]) for T in Ts}
    for T in Ts:
        forward(a, w, ids[T])  # warm-up: oneDNN picks and caches its kernels per shape
    res = {T: {"torch": [], "dimoo": [], "ratio": [], "ratio_cpu": []} for T in Ts}
    for rep in range(a.reps):
        for T in Ts:
            t0, c0 = time.perf_counter(), time.process_time()
            forward(a, w, ids[T])
            tt, tc = time.perf_counter() - t0, time.process_time() - c0
            res[T]["torch"].append(T / tt)
            line = {}
            if proc:
                proc.stdin.write(f"{T}\n")
                proc.stdin.flush()
                line = json.loads(proc.stdout.readline())
                if "error" in line:
                    sys.exit(f"dimoo_cpupeak: {line['error']}")
                res[T]["dimoo"].append(line["tokens_per_s"])
                res[T]["ratio"].append(line["tokens_per_s"] * tt / T)
                res[T]["ratio_cpu"].append(tc / line["cpu_seconds"])
            print(json.dumps({"rep": rep, "T": T, "torch_s": tt, "torch_cpu_s": tc, "dimoo": line}), flush=True)
    if proc:
        proc.stdin.close()
        proc.wait()
    print(f"\nbf16 forward, d={a.d} heads={a.heads}/{a.kv_heads} mlp={a.mlp} layers={a.layers} "
          f"vocab={a.vocab}, {a.threads} threads, {a.reps} reps: median [min max]")
    print("dimoo / PyTorch: speed ratio by wall time, and by CPU time (both processes' threads, spinning "
          "included: what is left when other processes share the cores)")
    print(f"{'T':>6} | {'PyTorch tokens/s':<26} | {'dimoo tokens/s':<26} | {'dimoo / PyTorch (wall)':<24} | "
          f"{'dimoo / PyTorch (CPU)':<24}")
    for T in Ts:
        r = res[T]
        print(f"{T:>6} | {cell(r['torch']):<26} | {cell(r['dimoo']) if r['dimoo'] else '-':<26} | "
              f"{cell(r['ratio']) if r['ratio'] else '-':<24} | {cell(r['ratio_cpu']) if r['ratio_cpu'] else '-':<24}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""How far a bf16 forward lands from the float64 forward, per checkpoint.

The CUDA backend computes in bf16 whatever the checkpoint's dtype (weights
rounded to bf16; activations rounded to bf16 where its kernels store them:
GEMM inputs and outputs, RoPE'd Q/K, the attention probabilities fed to the
P V product, the attention output; the residual stream stays fp32). This
script runs that rounding pattern in PyTorch next to scripts/reference_forward.py's
float64 forward and prints ||bf16 - f64|| / ||f64|| of the logits: the error a
correct bf16 implementation has, which the CUDA tests' bounds must allow.

Usage: bf16_forward_error.py [--seeds N] [--lengths 1,7,...] DIR [DIR ...]
  (default lengths 1, 7, 24, 64, 129, 500; token ids from numpy seeds
  0..N-1, N = 8 by default: the median, 99th percentile and largest error
  over the seeds. Short sequences vary the most from draw to draw: a test
  that draws fresh tokens every run needs the tail, so use many seeds.)
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_forward as R  # noqa: E402


def bf(t):
    return t.to(torch.bfloat16).to(torch.float64)


@torch.no_grad()
def forward_bf16(cfg, w, tokens):
    d, H = cfg["d_model"], cfg["n_heads"]
    KV = cfg.get("n_kv_heads") or H
    hd, eps = d // H, cfg.get("rms_norm_eps", 1e-5)
    theta, L, p = float(cfg.get("rope_theta", 10000.0)), cfg["n_layers"], "model.transformer."
    w = w.with_transform(bf) if isinstance(w, R.LazyWeights) else {k: bf(v) for k, v in w.items()}
    T = len(tokens)
    x = w[p + "wte.weight"][torch.as_tensor(tokens)]
    cos, sin = R.rope_tables(T, hd, theta)
    scale = 1.0 / hd ** 0.5
    for i in range(L):
        b = f"{p}blocks.{i}."
        h = bf(R.rms_norm(x, w[b + "attn_norm.weight"], eps))
        q = bf(h @ w[b + "q_proj.weight"].T).view(T, H, hd).transpose(0, 1)
        k = bf(h @ w[b + "k_proj.weight"].T).view(T, KV, hd).transpose(0, 1)
        v = bf(h @ w[b + "v_proj.weight"].T).view(T, KV, hd).transpose(0, 1)
        q, k = bf(R.apply_rope(q, cos, sin)), bf(R.apply_rope(k, cos, sin))
        if KV != H:
            k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
        s = (q @ k.transpose(-1, -2)) * scale
        P = torch.exp(s - s.max(-1, keepdim=True).values)
        a = bf((bf(P) @ v) / P.sum(-1, keepdim=True)).transpose(0, 1).reshape(T, d)
        x = x + a @ w[b + "attn_out.weight"].T
        h = bf(R.rms_norm(x, w[b + "ff_norm.weight"], eps))
        g = torch.nn.functional.silu(bf(h @ w[b + "ff_proj.weight"].T))
        u = bf(h @ w[b + "up_proj.weight"].T)
        x = x + bf(g * u) @ w[b + "ff_out.weight"].T
    x = bf(R.rms_norm(x, w[p + "ln_f.weight"], eps))
    return x @ w[p + "ff_out.weight"].T


def main():
    args = sys.argv[1:]
    seeds, lengths = 8, (1, 7, 24, 64, 129, 500)
    while args and args[0].startswith("--"):
        if args[0] == "--seeds" and len(args) > 1:
            seeds, args = int(args[1]), args[2:]
        elif args[0] == "--lengths" and len(args) > 1:
            lengths, args = tuple(int(x) for x in args[1].split(",")), args[2:]
        else:
            sys.exit(__doc__)
    if not args:
        sys.exit(__doc__)
    for d in args:
        cfg, w = R.load_model(d)
        w = {k: v.double() for k, v in w.items()}
        for T in lengths:
            errs = []
            for seed in range(seeds):
                t = np.random.RandomState(seed).randint(0, cfg["vocab_size"], T)
                ref, got = R.forward(cfg, w, t), forward_bf16(cfg, w, t)
                errs.append(float((got - ref).norm() / ref.norm()))
            print(f"{d} T={T}: bf16 rel err over {seeds} draws: median {np.median(errs):.4f} "
                  f"p99 {np.percentile(errs, 99):.4f} max {max(errs):.4f}")


if __name__ == "__main__":
    main()

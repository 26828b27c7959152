#!/usr/bin/env python3
"""PyTorch side of the device benchmark (scripts/device-check.sh), on the same
shapes as bench/cuda/bench_cuda.cu:

* attention: torch SDPA, non-causal, bf16, (B, 32, T, 128) for T = 1124, 4228,
  8320 and B = 1, 2, with the cuDNN backend and the flash backend separately;
  TFLOP/s = 4 B H T^2 D / time;
* the forward as the reference code does it (the spec in
  /work/shared/dimoo-reference.md section 1, as the official LLaDA-style
  model: bf16 weights, separate q/k/v projections, RMSNorm in fp32, RoPE in
  fp32, SDPA, full-vocabulary logits at every position) on random bf16
  weights of the real shape (d 4096, 32 layers, SwiGLU 12288, vocab 134548),
  generated on the device; T = 1124 and 4228, one branch and two batched.

Inputs are random, never zeros; timings are CUDA events, the median of
several runs after warm-up. Prints a short table last.

    python3 scripts/bench_torch_reference.py [--quick] [--skip-forward]
"""
import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F


def median_ms(fn, warm=3, reps=20):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def bench_attention(rows, quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, D = 32, 128
    shapes = [(b, t) for t in ([1124] if quick else [1124, 4228, 8320]) for b in (1, 2)]
    for B, T in shapes:
        g = torch.Generator(device="cuda").manual_seed(T * 10 + B)
        q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        flop = 4.0 * B * H * T * T * D
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
                line = f"attn  torch-{name:6s} B={B} H={H} T={T:<5d} d=128 {ms:8.3f} ms {flop / ms / 1e9:7.1f} TFLOP/s"
            except Exception as e:  # a backend the build lacks: say so, go on
                line = f"attn  torch-{name:6s} B={B} T={T}: unavailable ({type(e).__name__}: {str(e)[:60]})"
            print(line, flush=True)
            rows.append(line)
        del q, k, v


class RandomModel:
    """LLaDA/DiMOO blocks with random bf16 weights, as the reference computes them."""

    def __init__(self, d, n_layers, n_heads, mlp, vocab, theta=500000.0, eps=1e-5, device="cuda", seed=1):
        self.device = dev = torch.device(device)
        self.d, self.L, self.H, self.mlp, self.vocab, self.eps = d, n_layers, n_heads, mlp, vocab, eps
        self.hd = d // n_heads
        g = torch.Generator(device=dev).manual_seed(seed)

        def mat(o, i):
            return (torch.rand(o, i, device=dev, generator=g, dtype=torch.float32) * 2 - 1).mul_(
                math.sqrt(3.0 / i)).to(torch.bfloat16)

        def vec():
            return (0.9 + 0.2 * torch.rand(d, device=dev, generator=g)).to(torch.bfloat16)

        self.wte = (torch.rand(vocab, d, device=dev, generator=g) * 2 - 1).to(torch.bfloat16)
        self.blocks = []
        for _ in range(n_layers):
            self.blocks.append(dict(attn_norm=vec(), q=mat(d, d), k=mat(d, d), v=mat(d, d), o=mat(d, d),
                                    ff_norm=vec(), ff_proj=mat(mlp, d), up=mat(mlp, d), ff_out=mat(d, mlp)))
        self.ln_f = vec()
        self.head = mat(vocab, d)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.hd, 2, device=dev, dtype=torch.float32) / self.hd))

    def rms(self, x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(torch.bfloat16) * w

    def rope_table(self, T):  # computed once per length, as the reference caches it
        if getattr(self, "_rope_T", None) != T:
            pos = torch.arange(T, device=self.device, dtype=torch.float32)
            ang = torch.outer(pos, self.inv_freq)
            emb = torch.cat([ang, ang], dim=-1)
            self._rope = (emb.cos()[None, None], emb.sin()[None, None])
            self._rope_T = T
        return self._rope

    def rope(self, x, T):  # x (B, H, T, hd), rotate-half, in fp32
        cos, sin = self.rope_table(T)
        xf = x.float()
        x1, x2 = xf[..., : self.hd // 2], xf[..., self.hd // 2:]
        rot = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rot * sin).to(x.dtype)

    @torch.no_grad()
    def forward(self, ids):
        B, T = ids.shape
        x = self.wte[ids]
        for b in self.blocks:
            h = self.rms(x, b["attn_norm"])
            q = (h @ b["q"].T).view(B, T, self.H, self.hd).transpose(1, 2)
            k = (h @ b["k"].T).view(B, T, self.H, self.hd).transpose(1, 2)
            v = (h @ b["v"].T).view(B, T, self.H, self.hd).transpose(1, 2)
            q, k = self.rope(q, T), self.rope(k, T)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, self.d)
            x = x + a @ b["o"].T
            h = self.rms(x, b["ff_norm"])
            x = x + (F.silu(h @ b["ff_proj"].T) * (h @ b["up"].T)) @ b["ff_out"].T
        x = self.rms(x, self.ln_f)
        return x @ self.head.T


def bench_forward(rows, quick):
    if quick:
        m = RandomModel(1024, 4, 8, 3072, 16384)
        Ts = [1124]
    else:
        m = RandomModel(4096, 32, 32, 12288, 134548)
        Ts = [1124, 4228]
    for T in Ts:
        for B in (1, 2):
            g = torch.Generator(device="cuda").manual_seed(T + B)
            ids = torch.randint(0, m.vocab, (B, T), device="cuda", generator=g)
            ms = median_ms(lambda: m.forward(ids), warm=2, reps=5)
            line = f"fwd   torch-reference T={T:<5d} branches={B} (full-vocab logits) {ms:9.2f} ms"
            print(line, flush=True)
            rows.append(line)
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-forward", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device for torch")
        return 2
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}",
          flush=True)
    rows = []
    t0 = time.time()
    bench_attention(rows, args.quick)
    if not args.skip_forward:
        bench_forward(rows, args.quick)
    print(f"\n== torch summary ({time.time() - t0:.0f} s) ==")
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())

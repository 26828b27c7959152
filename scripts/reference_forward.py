#!/usr/bin/env python3
"""Float64 PyTorch reference of the LLaDA / Lumina-DiMOO transformer forward.

Written from docs section 1 of dimoo-reference.md: bidirectional llama-style
blocks, RMSNorm (normalised in float32, as the official code does), rotate-half
RoPE (in float32, as the official code does), gated SiLU MLP, untied output
projection. Everything else runs in float64 on float64-upcast weights.

Usage:
  reference_forward.py --model DIR --tokens 1,2,3 --out logits.npy
  reference_forward.py --check-official DIR   # DIR holds checkpoint/ + forward.json
  reference_forward.py --model DIR --golden-lengths 1,7,64 --golden-seed 3
      # writes DIR/golden/logits_T<T>.npy (float32, computed in float64) and
      # DIR/golden/cases.json for numpy RandomState(seed) token ids in [0, vocab)

Logits have embedding_size columns (the full output projection); columns at or
above vocab_size are padding rows of the embedding/output matrices.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file


class LazyWeights:
    """The checkpoint's tensors read from their shard on each access and
    returned in float64 (after transform, if given), never all held at once:
    a forward of the real 8B model in about one float64 matrix of memory
    (the embedding and output projection: 4.4 GB each)."""

    def __init__(self, model_dir, transform=None):
        from safetensors import safe_open

        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                wm = json.load(f)["weight_map"]
        else:
            single = os.path.join(model_dir, "model.safetensors")
            with safe_open(single, framework="pt") as f:
                wm = {k: "model.safetensors" for k in f.keys()}
        self.dir, self.where, self.transform = model_dir, wm, transform
        self._open = {}
        self._safe_open = safe_open

    def with_transform(self, transform):
        return LazyWeights(self.dir, transform)

    def __contains__(self, name):
        return name in self.where

    def __getitem__(self, name):
        fn = self.where[name]
        if fn not in self._open:
            self._open[fn] = self._safe_open(os.path.join(self.dir, fn), framework="pt")
        t = self._open[fn].get_tensor(name).to(torch.float64)
        return self.transform(t) if self.transform else t


def load_model(model_dir, lazy=False):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if lazy:
        return cfg, LazyWeights(model_dir)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    weights = {}
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        for fn in sorted(set(wm.values())):
            weights.update(load_file(os.path.join(model_dir, fn)))
        missing = set(wm) - set(weights)
        if missing:
            raise ValueError(f"index lists tensors not found in shards: {sorted(missing)}")
    elif os.path.exists(single):
        weights = load_file(single)
    else:
        raise FileNotFoundError(f"no model.safetensors or index in {model_dir}")
    weights = {k: v.to(torch.float64) for k, v in weights.items()}
    return cfg, weights


# The official LLaDA RMSNorm normalises in float32 and casts back to the model
# dtype before the weight scale (spec: "norm in fp32, cast, then scale"). Doing
# the same here makes this reference bit-exact with the official float64 run;
# set NORM_FP32 = False (--norm-fp64) for an all-float64 norm (~1e-7 rel diff).
NORM_FP32 = True


def rms_norm(x, weight, eps):
    xn = x.to(torch.float32) if NORM_FP32 else x
    var = xn.pow(2).mean(-1, keepdim=True)
    return (xn * torch.rsqrt(var + eps)).to(torch.float64) * weight


def rope_tables(T, head_dim, theta):
    """cos/sin tables (T, head_dim) in float32, rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(T, dtype=torch.float32)
    ang = torch.outer(pos, inv_freq)  # (T, head_dim/2), float32
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """x: (H, T, hd) float64. RoPE runs in float32, result cast back to float64."""
    xf = x.to(torch.float32)
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(torch.float64)


@torch.no_grad()
def forward(cfg, w, tokens):
    d = cfg["d_model"]
    H = cfg["n_heads"]
    KV = cfg.get("n_kv_heads") or H
    hd = d // H
    eps = cfg.get("rms_norm_eps", 1e-5)
    theta = float(cfg.get("rope_theta", 10000.0))
    L = cfg["n_layers"]
    p = "model.transformer."

    ids = torch.as_tensor(tokens, dtype=torch.long)
    T = ids.shape[0]
    x = w[p + "wte.weight"][ids]  # (T, d)
    cos, sin = rope_tables(T, hd, theta)
    scale = 1.0 / (hd ** 0.5)

    for i in range(L):
        b = f"{p}blocks.{i}."
        h = rms_norm(x, w[b + "attn_norm.weight"], eps)
        q = (h @ w[b + "q_proj.weight"].T).view(T, H, hd).transpose(0, 1)   # (H, T, hd)
        k = (h @ w[b + "k_proj.weight"].T).view(T, KV, hd).transpose(0, 1)  # (KV, T, hd)
        v = (h @ w[b + "v_proj.weight"].T).view(T, KV, hd).transpose(0, 1)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if KV != H:
            rep = H // KV
            k = k.repeat_interleave(rep, dim=0)
            v = v.repeat_interleave(rep, dim=0)
        s = (q @ k.transpose(-1, -2)) * scale  # (H, T, T), no mask
        a = torch.softmax(s, dim=-1) @ v        # (H, T, hd)
        a = a.transpose(0, 1).reshape(T, d)
        x = x + a @ w[b + "attn_out.weight"].T
        h = rms_norm(x, w[b + "ff_norm.weight"], eps)
        g = torch.nn.functional.silu(h @ w[b + "ff_proj.weight"].T)
        u = h @ w[b + "up_proj.weight"].T
        x = x + (g * u) @ w[b + "ff_out.weight"].T

    x = rms_norm(x, w[p + "ln_f.weight"], eps)
    return x @ w[p + "ff_out.weight"].T  # (T, embedding_size)


def check_official(root):
    ck = os.path.join(root, "checkpoint")
    cfg, w = load_model(ck)
    with open(os.path.join(root, "forward.json")) as f:
        cases = json.load(f)
    ok = True
    for c in cases:
        got = forward(cfg, w, c["tokens"]).numpy()
        ref = np.load(os.path.join(root, c["logits"]))
        if got.shape != ref.shape:
            print(f"{c['logits']}: shape mismatch {got.shape} vs {ref.shape}")
            ok = False
            continue
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        mx = np.abs(got - ref).max()
        good = rel < 1e-6
        ok &= good
        print(f"{c['logits']}: T={len(c['tokens'])} rel_err={rel:.3e} max_abs={mx:.3e} {'OK' if good else 'FAIL'}")
    print("official check:", "PASS" if ok else "FAIL")
    return ok


def make_golden(model_dir, lengths, seed):
    cfg, w = load_model(model_dir)
    out = os.path.join(model_dir, "golden")
    os.makedirs(out, exist_ok=True)
    rs = np.random.RandomState(seed)
    cases = []
    for T in lengths:
        toks = [int(t) for t in rs.randint(0, cfg["vocab_size"], size=T)]
        logits = forward(cfg, w, toks).numpy().astype(np.float32)
        fn = f"logits_T{T}.npy"
        np.save(os.path.join(out, fn), logits)
        cases.append({"tokens": toks, "logits": fn})
        print(f"wrote {os.path.join(out, fn)}: shape {logits.shape}")
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(cases, f)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory")
    ap.add_argument("--tokens", help="comma-separated token ids")
    ap.add_argument("--out", help="output .npy (float64 unless --out-dtype)")
    ap.add_argument("--out-dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--golden-lengths", help="comma-separated sequence lengths: write MODEL/golden/")
    ap.add_argument("--golden-seed", type=int, default=0, help="numpy RandomState seed for golden token ids")
    ap.add_argument("--norm-fp64", action="store_true",
                    help="RMSNorm fully in float64 (default: float32 like the official code)")
    ap.add_argument("--check-official", metavar="DIR", help="compare with official goldens in DIR")
    a = ap.parse_args()

    global NORM_FP32
    NORM_FP32 = not a.norm_fp64
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    if a.check_official:
        sys.exit(0 if check_official(a.check_official) else 1)
    if a.model and a.golden_lengths:
        make_golden(a.model, [int(t) for t in a.golden_lengths.split(",")], a.golden_seed)
        return
    if not (a.model and a.tokens and a.out):
        ap.error("--model, --tokens and --out are required (or --check-official DIR)")
    cfg, w = load_model(a.model)
    toks = [int(t) for t in a.tokens.split(",") if t.strip()]
    logits = forward(cfg, w, toks).numpy().astype(a.out_dtype)
    np.save(a.out, logits)
    print(f"wrote {a.out}: shape {logits.shape} {logits.dtype}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""diffusers' VQModel next to dimoo's VQ-VAE on the CPU: times, and a check of
the results at the real size.

The model is aMUSEd's VQ-GAN (the one DiMOO uses: 5 levels, block_out_channels
128, 256, 256, 512, 768, 2 resnets a level, 64 latent channels, 8192 codes,
GroupNorm of 32 groups, no mid-block attention), with random weights.

Times (--series rounds, alternating): per round diffusers' decode (codes ->
pixels) and encode (pixels -> codes, the nearest-codebook search included)
over --reps runs after a warm-up, in fp32 on --threads threads, then
build/dimoo_vqbench --json with the same shapes and thread count (its own
random weights: the speed does not depend on them). The table gives medians
[min max] over the rounds of each round's median, and diffusers / dimoo.

--check (needs bin/dimoo, `make`): the same weights through the product's
loader: diffusers' save_pretrained into a folder, `dimoo vq-decode` of random
codes into a PNG against diffusers' decode rounded the same way (round half to
even of 255 x the clamped value), and `dimoo vq-encode` of that PNG against
diffusers' encode and nearest-code search of it. The 8-bit pixels may differ by
one level where the float lands next to a rounding boundary; codes may differ
only at near ties.

Usage:
  python3 scripts/bench_vq.py [--sides 32] [--reps 3] [--series 2] [--threads 2]
      [--vqbench build/dimoo_vqbench] [--check [--dimoo bin/dimoo]] [--skip-times]
Needs torch, diffusers, numpy, Pillow (scripts/requirements.txt).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHANNELS = [128, 256, 256, 512, 768]


def make_model(seed=0):
    from diffusers import VQModel

    n = len(CHANNELS)
    torch.manual_seed(seed)
    m = VQModel(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=CHANNELS, layers_per_block=2,
                act_fn="silu", latent_channels=64, sample_size=32, num_vq_embeddings=8192, norm_num_groups=32,
                vq_embed_dim=64, norm_type="group", mid_block_add_attention=False, lookup_from_codebook=True,
                force_upcast=True).eval()
    with torch.no_grad():  # GroupNorm scales and shifts away from 1 and 0
        for mod in m.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(1 + 0.2 * torch.randn_like(mod.weight))
                mod.bias.copy_(0.2 * torch.randn_like(mod.bias))
    return m


def decode(m, codes, side):
    """(side*side,) int64 codes -> (1, 3, 16 side, 16 side) floats."""
    return m.decode(codes.view(1, -1), force_not_quantize=True, shape=(1, side, side, 64)).sample


def encode(m, pix):
    """(1, 3, H, W) in [0, 1] -> (h*w,) codes, row-major."""
    z = m.encode(pix).latents  # (1, 64, h, w), after quant_conv
    flat = z[0].permute(1, 2, 0).reshape(-1, 64)
    cb = m.quantize.embedding.weight
    d = (flat * flat).sum(1, keepdim=True) - 2 * flat @ cb.T + (cb * cb).sum(1)[None]
    return d.argmin(1)


def to8(x):
    """Floats -> uint8 as dimoo writes its PNGs: clamp, x255, round half to even."""
    return np.rint(np.clip(x.astype(np.float64), 0, 1) * 255).astype(np.uint8)


def time_diffusers(m, sides, reps):
    out = {}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for side in sides:
            codes = torch.randint(0, 8192, (side * side,), generator=g)
            ts = []
            for r in range(reps + 1):
                t = time.perf_counter()
                img = decode(m, codes, side)
                if r:
                    ts.append(1e3 * (time.perf_counter() - t))
            out[("decode", side)] = statistics.median(ts)
            pix = (0.5 + 0.1 * img).clamp(0, 1)
            ts = []
            for r in range(reps + 1):
                t = time.perf_counter()
                encode(m, pix)
                if r:
                    ts.append(1e3 * (time.perf_counter() - t))
            out[("encode", side)] = statistics.median(ts)
    return out


def time_dimoo(exe, sides, reps, threads):
    cmd = [exe, "--json", "--sides", ",".join(map(str, sides)), "--reps", str(reps), "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    doc = json.loads(r.stdout)
    return {(c["op"], c["grid"]): c["ms"]["median"] for c in doc["cases"]}, doc


def times(a):
    torch.set_num_threads(a.threads)
    m = make_model()
    rounds = []
    for s in range(a.series):
        d = time_diffusers(m, a.sides, a.reps)
        o, doc = time_dimoo(a.vqbench, a.sides, a.reps, a.threads)
        rounds.append((d, o))
        print(f"round {s + 1}: " + ", ".join(f"{op} {side}: diffusers {d[(op, side)]:.0f} ms, dimoo "
                                            f"{o[(op, side)]:.0f} ms" for op, side in sorted(d)), flush=True)
    print(f"\n{a.threads} threads, {torch.__version__} (fp32), dimoo_vqbench; ms: median [min max] "
          f"over {a.series} rounds of {a.reps} runs")
    print(f"{'op':7} {'grid':6} {'image':6} {'diffusers ms':>22} {'dimoo ms':>22} {'diffusers/dimoo':>22}")

    def fmt(v, p=0):
        return f"{statistics.median(v):.{p}f} [{min(v):.{p}f} {max(v):.{p}f}]"

    for op in ("decode", "encode"):
        for side in a.sides:
            dv = [r[0][(op, side)] for r in rounds]
            ov = [r[1][(op, side)] for r in rounds]
            ratio = [x / y for x, y in zip(dv, ov)]
            print(f"{op:7} {side:<6} {side * 16:<6} {fmt(dv):>22} {fmt(ov):>22} {fmt(ratio, 2):>22}")


def check(a):
    from PIL import Image

    m = make_model(seed=3)
    side = a.sides[0]
    with tempfile.TemporaryDirectory() as tmp:
        d = a.keep or os.path.join(tmp, "vqvae")
        m.save_pretrained(d, safe_serialization=True)
        g = torch.Generator().manual_seed(2)
        codes = torch.randint(0, 8192, (side * side,), generator=g)
        cfile, png = os.path.join(tmp, "codes.txt"), os.path.join(tmp, "dimoo.png")
        with open(cfile, "w") as f:
            for row in codes.view(side, side).tolist():
                f.write(",".join(map(str, row)) + "\n")
        run = [a.dimoo, "vq-decode", "--vqvae", d, "--codes", cfile, "--out", png, "--threads", str(a.threads)]
        subprocess.run(run, check=True, capture_output=True)
        with torch.no_grad():
            want = decode(m, codes, side)[0].permute(1, 2, 0).numpy()
        got8, want8 = np.asarray(Image.open(png).convert("RGB")), to8(want)
        diff = np.abs(got8.astype(int) - want8.astype(int))
        print(f"decode {side}x{side} -> {side * 16}²: 8-bit pixels differing {np.count_nonzero(diff)} of "
              f"{diff.size} ({np.count_nonzero(diff) / diff.size:.2e}), largest difference {diff.max()} level(s)")
        bad = diff.max() > 1 or np.count_nonzero(diff) > 1e-3 * diff.size
        # The encoder on the PNG dimoo wrote.
        out = os.path.join(tmp, "codes-back.txt")
        subprocess.run([a.dimoo, "vq-encode", "--vqvae", d, "--image", png, "--out", out,
                        "--threads", str(a.threads)], check=True, capture_output=True)
        with open(out) as f:
            back = np.array([int(x) for line in f for x in line.strip().split(",") if x])
        pix = torch.from_numpy(got8.astype(np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            ref = encode(m, pix).numpy()
        same = int((back == ref).sum())
        print(f"encode {side * 16}² -> {side}x{side}: codes equal {same} of {ref.size}")
        bad |= same < 0.99 * ref.size
    if bad:
        sys.exit("check FAILED: dimoo and diffusers disagree beyond rounding")
    print("check ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", default="32", help="code grid sides, comma-separated (32: 512x512)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--series", type=int, default=2, help="rounds of diffusers then dimoo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vqbench", default=os.path.join(ROOT, "build", "dimoo_vqbench"))
    ap.add_argument("--dimoo", default=os.path.join(ROOT, "bin", "dimoo"))
    ap.add_argument("--check", action="store_true", help="also check dimoo's results against diffusers'")
    ap.add_argument("--keep", default="", help="--check: save the random VQ-VAE here instead of a temp folder")
    ap.add_argument("--skip-times", action="store_true", help="only --check")
    a = ap.parse_args()
    a.sides = [int(s) for s in a.sides.split(",")]
    if a.check:
        check(a)
    if not a.skip_times:
        times(a)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write small random diffusers VQModel checkpoints and their golden data.

Usage: /opt/torchenv/bin/python scripts/gen_vq_testdata.py [--out testdata/vq]

For each config below, testdata/vq/<name>/ gets what diffusers'
save_pretrained writes (config.json, diffusion_pytorch_model.safetensors, in
the stored dtype) plus golden/ arrays, all float32 .npy, channels last (HWC):

  decode.npy        raw decoder output (before clamping) for the codes in
                    cases.json: VQModel.decode(codes, force_not_quantize=True)
                    with lookup_from_codebook, shape (h*f, w*f, out_channels)
  encode_image.npy  the encoder's input pixels in [0, 1], (H, W, in_channels)
  encode_latent.npy VQModel.encode(image).latents, the pre-quantization
                    latent, (H/f, W/f, vq_embed_dim)

and testdata/vq/cases.json lists, per model, the decode codes, the encode
codes (nearest codebook row, computed in float64) and each encoded cell's
relative distance gap between its best and second-best codebook rows.

The goldens come from diffusers itself run in float64 on the stored weights
(bf16 checkpoints: the bf16-rounded weights, upcast). The script also prints
how far diffusers' own float32 run is from that, the noise floor any fp32
implementation has.

Weights are diffusers' initialisation, made less degenerate: GroupNorm scales
and shifts are randomised (identity otherwise), and the codebook is drawn
from the statistics of real encoder latents (diffusers' uniform(+-1/n) rows
would be near-ties everywhere).
"""

import argparse
import json
import os
import shutil

import numpy as np
import torch
from diffusers import VQModel
from diffusers.utils import logging as dlogging

CONFIGS = [
    dict(
        name="tiny-f32",
        seed=11,
        dtype=torch.float32,
        config=dict(
            block_out_channels=[16, 32],
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=8,
            num_vq_embeddings=64,
            mid_block_add_attention=False,
        ),
        decode_grid=(7, 5),
        encode_size=(16, 12),
    ),
    dict(
        name="attn3-f32",
        seed=12,
        dtype=torch.float32,
        config=dict(
            block_out_channels=[16, 32, 32],
            layers_per_block=2,
            norm_num_groups=8,
            latent_channels=4,
            vq_embed_dim=6,
            num_vq_embeddings=32,
            mid_block_add_attention=True,
        ),
        decode_grid=(5, 4),
        encode_size=(24, 20),
    ),
    dict(
        name="attn2-bf16",
        seed=13,
        dtype=torch.bfloat16,
        config=dict(
            block_out_channels=[32, 32],
            layers_per_block=1,
            norm_num_groups=16,
            latent_channels=8,
            num_vq_embeddings=48,
            mid_block_add_attention=True,
        ),
        decode_grid=(4, 6),
        encode_size=(12, 18),
    ),
]


def make_model(spec):
    cfg = dict(spec["config"])
    n = len(cfg["block_out_channels"])
    cfg.update(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        act_fn="silu",
        sample_size=32,
        norm_type="group",
        lookup_from_codebook=True,
        force_upcast=True,
    )
    torch.manual_seed(spec["seed"])
    model = VQModel(**cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(1 + 0.2 * torch.randn_like(mod.weight))
                mod.bias.copy_(0.2 * torch.randn_like(mod.bias))
    return model


def smooth_image(rng, H, W):
    """A random smooth picture in [0, 1] with some texture."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    img = np.zeros((H, W, 3))
    for c in range(3):
        for _ in range(3):
            fy, fx, ph = rng.uniform(0.05, 0.6), rng.uniform(0.05, 0.6), rng.uniform(0, 6.3)
            img[..., c] += rng.uniform(0.1, 0.3) * np.sin(fy * y + fx * x + ph)
    img += 0.5 + 0.05 * rng.standard_normal((H, W, 3))
    return np.clip(img, 0, 1)


def hwc(t):
    """(1, C, H, W) tensor -> (H, W, C) float32 array."""
    return t[0].permute(1, 2, 0).contiguous().to(torch.float32).numpy()


def nearest(latent, codebook):
    """Nearest codebook rows (float64, ties to the lowest index) and the
    relative gap between the best and second-best squared distances."""
    z = latent.reshape(-1, latent.shape[-1]).astype(np.float64)
    e = codebook.astype(np.float64)
    d = ((z[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    codes = d.argmin(1)
    s = np.sort(d, 1)
    gap = (s[:, 1] - s[:, 0]) / np.maximum(s[:, 1], 1e-300)
    return codes, gap


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def generate(spec, out_root):
    name = spec["name"]
    out = os.path.join(out_root, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    rng = np.random.default_rng(spec["seed"])
    model = make_model(spec)
    f = 2 ** (len(spec["config"]["block_out_channels"]) - 1)
    H, W = spec["encode_size"]
    img = smooth_image(rng, H, W)
    x32 = torch.from_numpy(img).permute(2, 0, 1)[None].to(torch.float32)

    # Codebook rows drawn from the statistics of this model's latents.
    with torch.no_grad():
        lat = model.encode(x32).latents
        flat = lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1])
        mu, sd = flat.mean(0), flat.std(0) + 1e-3
        emb = model.quantize.embedding.weight
        emb.copy_(mu + sd * torch.randn(emb.shape, generator=torch.Generator().manual_seed(spec["seed"])))

    # Store in the checkpoint dtype; the goldens use exactly those weights.
    model = model.to(spec["dtype"])
    model.save_pretrained(out, safe_serialization=True)
    ref64 = model.to(torch.float64)
    ref32 = VQModel.from_pretrained(out).to(torch.float32).eval()

    h, w = spec["decode_grid"]
    D = ref64.config.vq_embed_dim or ref64.config.latent_channels
    codes = rng.integers(0, ref64.config.num_vq_embeddings, size=(h, w))
    idx = torch.from_numpy(codes.reshape(-1)).long()
    with torch.no_grad():
        dec64 = ref64.decode(idx, force_not_quantize=True, shape=(1, h, w, D)).sample
        dec32 = ref32.decode(idx, force_not_quantize=True, shape=(1, h, w, D)).sample
        lat64 = ref64.encode(x32.to(torch.float64)).latents
        lat32 = ref32.encode(x32).latents
        # Check the quantizer path agrees with the float64 nearest search.
        _, _, (_, _, q_idx) = ref64.quantize(lat64)
    dec = hwc(dec64)
    latent = hwc(lat64)
    ecodes, gap = nearest(latent, ref64.quantize.embedding.weight.detach().numpy())
    assert (ecodes == q_idx.reshape(-1).numpy()).all(), "diffusers' quantizer disagrees with the float64 search"

    g = os.path.join(out, "golden")
    os.makedirs(g)
    np.save(os.path.join(g, "decode.npy"), dec)
    np.save(os.path.join(g, "encode_image.npy"), img.astype(np.float32))
    np.save(os.path.join(g, "encode_latent.npy"), latent)
    stats = dict(
        decode_fp32_vs_fp64=rel(hwc(dec32), dec),
        encode_fp32_vs_fp64=rel(hwc(lat32), latent),
        decode_mean=float(dec.mean()),
        decode_std=float(dec.std()),
        decode_in_01=float(((dec >= 0) & (dec <= 1)).mean()),
        min_code_gap=float(gap.min()),
    )
    print(name, json.dumps(stats))
    return dict(
        name=name,
        dir=name,
        dtype={torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[spec["dtype"]],
        factor=f,
        decode=dict(h=h, w=w, codes=codes.reshape(-1).tolist(), pixels="golden/decode.npy"),
        encode=dict(
            H=H,
            W=W,
            image="golden/encode_image.npy",
            latent="golden/encode_latent.npy",
            codes=ecodes.tolist(),
            gap=[float(v) for v in gap],
        ),
        diffusers_fp32_error=dict(decode=stats["decode_fp32_vs_fp64"], encode=stats["encode_fp32_vs_fp64"]),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "testdata", "vq"))
    a = ap.parse_args()
    dlogging.set_verbosity_error()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    os.makedirs(a.out, exist_ok=True)
    cases = [generate(s, a.out) for s in CONFIGS]
    with open(os.path.join(a.out, "cases.json"), "w") as fh:
        json.dump(dict(generator="scripts/gen_vq_testdata.py", models=cases), fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()

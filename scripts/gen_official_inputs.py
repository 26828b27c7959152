#!/usr/bin/env python3
"""Write testdata/official-inputs/: the token sequences the official Lumina-DiMOO
inference scripts feed the model, for every task and guidance branch, from
non-square images. dimoo's Go tests (dimoo/inputs_test.go) build the same
requests and must produce the same sequences, token for token.

    python scripts/gen_official_inputs.py --official DIR [--out testdata/official-inputs]

DIR is a checkout of the official code (never copied into this repository)
holding config.py, utils/image_utils.py, utils/prompt_utils.py and
scripts/inference_t2i.py (the version with --painting_mode), inference_i2i.py,
inference_mmu.py. Needs torch, diffusers, transformers, tokenizers, Pillow.

The scripts run unmodified as __main__ (runpy), with their real argument
parsing, prompt building, image cropping/resizing, VQ-VAE encoding (diffusers'
VQModel and VaeImageProcessor) and tokenizer (transformers' AutoTokenizer).
What is stubbed, and why:
  - the transformer: modules `model` and `models.lumina.modeling_xllmx_dimoo`
    provide an LLaDAForMultiModalGeneration whose from_pretrained returns a
    placeholder; no forward ever runs.
  - the samplers: modules `generators.image_generation_generator`,
    `generators.image_to_image_generator` and
    `generators.text_understanding_generator` record the sequences they are
    called with (that is the golden) and return all-zero image codes /
    the input unchanged.
  - `utils.generation_utils.setup_seed` (unused: every run has seed 0) and
    `utils.constants` (the newer t2i script's name for config.SPECIAL_TOKENS).
  - random.randint returns the middle of its range: the official crop offset
    is random; dimoo's is centred for seed 0 (see dimoo.CropInput).

The tokenizer is the byte-level BPE of testdata/tokenizer/tokenizer.json with
its special tokens moved to the real model's ids (config.py's
SPECIAL_TOKENS; <system>, </system>, <user>, </user> are not in that table
and take free ids next to them). The VQ-VAE is a small random diffusers
VQModel with the real model's factor of 16, run in float64 (its codes are
then the exact nearest codes of the float32 weights' output, which is what
dimoo computes); image seeds are moved on until no cell of an encoded image
is within 3e-5 of a tie between two codes, so float32 rounding cannot pick
the other one. The understanding golden
follows training, not the script, in one respect: the official script
inserts the image's row newlines (and BOI/EOI) a second time; the golden
keeps them once and the script checks that this is the only difference.
"""

import argparse
import hashlib
import json
import os
import random
import runpy
import shutil
import sys
import tempfile
import types

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Real ids (config.py SPECIAL_TOKENS and the LLaDA text specials), keyed by
# the token strings of testdata/tokenizer/tokenizer.json.
REAL_IDS = {
    "<|startoftext|>": 126080,
    "<|endoftext|>": 126081,
    "<|newline|>": 126084,
    "<|mdm_mask|>": 126336,
    "<system>": 126342,
    "</system>": 126343,
    "<user>": 126344,
    "</user>": 126345,
    "<|begin_of_image|>": 126349,
    "<|end_of_image|>": 126350,
    "<uncondition>": 126351,
    "<|begin_of_answer|>": 126354,
    "<|end_of_answer|>": 126355,
}


def build_tokenizer(out_dir):
    with open(os.path.join(REPO, "testdata", "tokenizer", "tokenizer.json")) as f:
        tok = json.load(f)
    # Keep the specials that have a real id; drop the test-only added tokens.
    tok["added_tokens"] = [dict(a, id=REAL_IDS[a["content"]]) for a in tok["added_tokens"]
                           if a["content"] in REAL_IDS]
    # As in the real tokenizer, the specials are entries of the model's vocab
    # too (the library numbers added tokens missing from it sequentially).
    for a in tok["added_tokens"]:
        tok["model"]["vocab"][a["content"]] = a["id"]
    for p in tok["post_processor"]["processors"]:
        for name, st in p.get("special_tokens", {}).items():
            st["ids"] = [REAL_IDS[name]]
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path, "w") as f:
        json.dump(tok, f, ensure_ascii=False, separators=(",", ":"))
    return path


def build_vq(out_dir, seed):
    from diffusers import VQModel
    torch.manual_seed(seed)
    cfg = dict(in_channels=3, out_channels=3, act_fn="silu", layers_per_block=1, latent_channels=4,
               norm_num_groups=4, num_vq_embeddings=64, sample_size=32, mid_block_add_attention=False,
               block_out_channels=[8, 8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 5,
               up_block_types=["UpDecoderBlock2D"] * 5, lookup_from_codebook=True, force_upcast=True)
    vq = VQModel(**cfg).eval()
    with torch.no_grad():
        # A codebook spread like the latents, so codes vary across an image.
        vq.quantize.embedding.weight.normal_(0, 0.5)
    vq.save_pretrained(os.path.join(out_dir, "vqvae"), safe_serialization=True)
    return vq


def pattern(w, h, seed):
    """The test images: integer arithmetic only, repeated by the Go test."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    chans = []
    for c in range(3):
        v = (x * (17 + 2 * c) + y * (31 + 4 * c) + ((x * y) >> (4 + c)) + seed * 37) ^ \
            ((x >> 3) * (y >> 3) * 13 + c * 71)
        chans.append(v & 255)
    return Image.fromarray(np.stack(chans, axis=-1).astype(np.uint8), "RGB")


class Recorder:
    def __init__(self):
        self.calls = []
        self.vq_inputs = []
        self.encoded = []


def install_stubs(rec, official):
    from config import SPECIAL_TOKENS  # noqa: F401 (the official config)

    class LLaDAForMultiModalGeneration:
        @classmethod
        def from_pretrained(cls, *a, **k):
            return cls()

    for name in ["model", "models", "models.lumina", "models.lumina.modeling_xllmx_dimoo"]:
        m = types.ModuleType(name)
        m.LLaDAForMultiModalGeneration = LLaDAForMultiModalGeneration
        sys.modules[name] = m

    gen = types.ModuleType("utils.generation_utils")
    gen.setup_seed = lambda seed: None
    sys.modules["utils.generation_utils"] = gen
    import config
    sys.modules["utils.constants"] = config

    def generate_image(model, prompt, *, seq_len, uncon_ids, code_start, **kw):
        rec.calls.append(dict(kind="t2i", cond=prompt[0].tolist(), uncond=uncon_ids[0].tolist(),
                              code_start=code_start, seq_len=seq_len, newline_every=kw["newline_every"]))
        return torch.full((1, seq_len), 126356, dtype=torch.long)

    def generate_i2i(model, con_input, *, seq_len, uncon_text, uncon_image, code_start, **kw):
        rec.calls.append(dict(kind="i2i", cond=con_input[0].tolist(), uncond_text=uncon_text[0].tolist(),
                              uncond_image=uncon_image[0].tolist(), code_start=code_start, seq_len=seq_len,
                              newline_every=kw["newline_every"]))
        return torch.full((1, seq_len), 126356, dtype=torch.long)

    def generate_text_understanding(model, input_ids, *, code_start, gen_length, block_length, steps, **kw):
        rec.calls.append(dict(kind="mmu", seq=input_ids[0].tolist(), code_start=code_start,
                              gen_length=gen_length, block_length=block_length, steps=steps))
        return input_ids

    for name, fn in [("image_generation_generator", generate_image), ("image_to_image_generator", generate_i2i),
                     ("text_understanding_generator", generate_text_understanding)]:
        m = types.ModuleType("generators." + name)
        setattr(m, fn.__name__, fn)
        sys.modules["generators." + name] = m
    sys.modules["generators"] = types.ModuleType("generators")

    random.randint = lambda a, b: (a + b) // 2

    # Record every image the VQ-VAE encodes (exactly the bytes: the
    # processor feeds pixel/255 in float32) and what encode_img_with_breaks returns.
    from diffusers import VQModel
    orig_encode = VQModel.encode

    def encode(self, x, *a, **k):
        px = torch.round(x[0] * 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        rec.vq_inputs.append(dict(w=px.shape[1], h=px.shape[0], sha256=hashlib.sha256(px.tobytes()).hexdigest()))
        # In float64: the true output of the float32 weights, whose nearest
        # codes dimoo computes exactly (PyTorch's float32 cdist may not).
        self.double()
        out = orig_encode(self, x.double(), *a, **k)
        check_margins(self, out.latents)
        return out
    VQModel.encode = encode

    import utils.image_utils as iu
    orig_ewb = iu.encode_img_with_breaks

    def ewb(*a, **k):
        toks = orig_ewb(*a, **k)
        rec.encoded.append(toks)
        return toks
    iu.encode_img_with_breaks = ewb


class NearTie(Exception):
    pass


def check_margins(vq, latents):
    """dimoo's float32 encoder differs from the float64 one by about 1e-6
    (relative), so a cell whose two nearest codes are nearly tied could get
    either: refuse images with a cell closer to a tie than 3e-5 (the caller
    then tries the next image seed)."""
    z = latents[0].permute(1, 2, 0).reshape(-1, latents.shape[1]).double()
    e = vq.quantize.embedding.weight.double()
    d = (z * z).sum(1, keepdim=True) - 2 * z @ e.T + (e * e).sum(1)[None]
    two = torch.topk(d, 2, dim=1, largest=False).values
    gap = (two[:, 1] - two[:, 0]) / (two[:, 0].abs() + (z * z).sum(1) + 1e-12)
    if gap.min().item() < 3e-5:
        raise NearTie(f"relative gap {gap.min().item():.2e}")


def run_script(official, script, argv, rec):
    rec.calls.clear()
    rec.vq_inputs.clear()
    rec.encoded.clear()
    sys.argv = [script] + argv
    runpy.run_path(os.path.join(official, "scripts", script), run_name="__main__")
    assert len(rec.calls) == 1, rec.calls
    return dict(rec.calls[0]), list(rec.vq_inputs), list(rec.encoded)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="checkout of the official Lumina-DiMOO code")
    ap.add_argument("--out", default=os.path.join(REPO, "testdata", "official-inputs"))
    ap.add_argument("--vq-seed", type=int, default=1)
    args = ap.parse_args()
    official = os.path.abspath(args.official)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    sys.path.insert(0, official)

    tok_path = build_tokenizer(args.out)
    work = tempfile.mkdtemp(prefix="official-inputs-")
    try:
        ckpt = os.path.join(work, "ckpt")
        os.makedirs(ckpt)
        shutil.copy(tok_path, ckpt)
        with open(os.path.join(ckpt, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)
        build_vq(args.out, args.vq_seed)

        rec = Recorder()
        install_stubs(rec, official)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(ckpt)

        def image(name, w, h, seed):
            path = os.path.join(work, name + ".png")
            pattern(w, h, seed).save(path)
            return path, dict(w=w, h=h, seed=seed)

        def retry(fn):
            """Runs fn(seed_offset) with image seeds moved on until no cell of
            any encoded image is near a tie."""
            for k in range(100):
                try:
                    return fn(1000 * k)
                except NearTie as e:
                    print("  near tie, next image seed:", e)
            raise SystemExit("no image seed without near ties")

        common = ["--checkpoint", ckpt, "--vae_ckpt", args.out, "--output_dir", os.path.join(work, "out")]
        cases = []

        # Text-to-image: sizes as given, floored to multiples of 16.
        for prompt, w, h in [("a red fox in the snow", 1536, 768), ("two cats, 3 dogs!", 1000, 600)]:
            call, _, _ = run_script(official, "inference_t2i.py",
                                    common + ["--prompt", prompt, "--width", str(w), "--height", str(h)], rec)
            cases.append(dict(name=f"t2i_{w}x{h}", task="t2i", prompt=prompt, width=w, height=h,
                              branches=[call["cond"], call["uncond"]], code_start=call["code_start"],
                              grid=[call["newline_every"], call["seq_len"] // call["newline_every"]]))

        # Inpainting / outpainting: the image's own size; default and explicit ratios.
        for mode, (w, h, seed), ratios in [("inpainting", (1024, 768, 1), None),
                                          ("outpainting", (1536, 512, 2), (0.5, 0.6)),
                                          ("inpainting", (1000, 700, 3), (0.7, 0.3))]:
            def run(k):
                path, spec = image(f"paint{seed}", w, h, seed + k)
                argv = common + ["--prompt", "a lighthouse at dusk", "--painting_mode", mode, "--painting_image", path]
                if ratios:
                    argv += ["--mask_h_ratio", str(ratios[0]), "--mask_w_ratio", str(ratios[1])]
                return spec, run_script(official, "inference_t2i.py", argv, rec)
            spec, (call, vq_in, _) = retry(run)
            cases.append(dict(name=f"{mode}_{w}x{h}", task=mode, prompt="a lighthouse at dusk", image=spec,
                              mask_h_ratio=ratios[0] if ratios else None, mask_w_ratio=ratios[1] if ratios else None,
                              branches=[call["cond"], call["uncond"]], code_start=call["code_start"],
                              grid=[call["newline_every"], call["seq_len"] // call["newline_every"]],
                              vq_inputs=vq_in))

        # Image-to-image: every dispatch branch, non-square inputs.
        sizes = {"a": (1368, 1024, 4), "b": (3000, 2000, 5), "c": (500, 900, 6)}
        for edit_type, src, ref in [("edit_add", "a", None), ("depth_control", "b", None),
                                    ("subject_driven", "c", None), ("image_ref_transfer", "a", "c"),
                                    ("canny_pred", "b", None), ("normal_dense", "a", None),
                                    ("multi_view_left", "c", None), ("ref_transfer", "b", None)]:
            prompt = "Put a small boat on the water, keep the sky."

            def run(k):
                imgs = {n: image(n, w, h, seed + k) for n, (w, h, seed) in sizes.items()}
                argv = common + ["--prompt", prompt, "--image_path", imgs[src][0], "--edit_type", edit_type]
                if ref:
                    argv += ["--ref_image_path", imgs[ref][0]]
                return imgs, run_script(official, "inference_i2i.py", argv, rec)
            imgs, (call, vq_in, _) = retry(run)
            cases.append(dict(name=f"i2i_{edit_type}", task="i2i", edit_type=edit_type, prompt=prompt,
                              image=imgs[src][1], ref_image=imgs[ref][1] if ref else None,
                              branches=[call["cond"], call["uncond_text"], call["uncond_image"]],
                              code_start=call["code_start"],
                              grid=[call["newline_every"], call["seq_len"] // call["newline_every"]],
                              vq_inputs=vq_in))

        # Understanding: the official defaults (gen_length 1024), non-square inputs.
        from utils.prompt_utils import generate_multimodal_understanding_prompt
        from config import SPECIAL_TOKENS as ST
        from utils.image_utils import add_break_line
        for (w, h, seed), extra in [((640, 480, 7), []), ((900, 1300, 8), ["--gen_length", "64"])]:
            q = "What is in the image? Answer briefly."

            def run(k):
                path, spec = image(f"mmu{seed}", w, h, seed + k)
                return spec, run_script(official, "inference_mmu.py",
                                        common + ["--prompt", q, "--image_path", path] + extra, rec)
            spec, (call, vq_in, enc) = retry(run)
            ids = tokenizer(generate_multimodal_understanding_prompt(q))["input_ids"]
            gen = call["gen_length"]
            tail = [ST["answer_start"]] + gen * [ST["mask_token"]] + [ST["answer_end"]]
            grid = enc[0][1:-1]
            gw = grid.index(ST["newline_token"])
            gh = len(grid) // (gw + 1)
            # The script's sequence: the grid's newlines and BOI/EOI inserted twice.
            # The script's sequence: add_break_line run again over the whole
            # encoded list (BOI, rows with newlines, EOI) and wrapped in BOI/EOI again.
            twice = [ST["boi"]] + add_break_line(enc[0], gh, gw, ST["newline_token"]) + [ST["eoi"]]
            assert call["seq"] == ids[:-1] + twice + ids[-1:] + tail, "unexpected mmu layout"
            seq = ids[:-1] + enc[0] + ids[-1:] + tail
            cases.append(dict(name=f"mmu_{w}x{h}", task="mmu", prompt=q, image=spec, gen_length=gen,
                              block_length=call["block_length"], steps=call["steps"], seq=seq,
                              answer_start=len(seq) - gen - 1, vq_inputs=vq_in))
    finally:
        shutil.rmtree(work)

    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(dict(special_tokens={k: v for k, v in REAL_IDS.items()}, cases=cases), f, separators=(",", ":"))
        f.write("\n")
    for c in cases:
        print(c["name"], "branches" if "branches" in c else "seq",
              [len(b) for b in c.get("branches", [c.get("seq", [])])])


if __name__ == "__main__":
    main()

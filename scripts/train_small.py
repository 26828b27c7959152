#!/usr/bin/env python3
"""Train the small DiMOO that ships under models/dimoo-small (CPU, PyTorch).

Steps (each reproducible from its seed; run them in order, or `all`):
  tokenizer    byte-level BPE (Llama-3 split regex + ByteLevel) with DiMOO's
               special tokens -> OUT/tokenizer.json, OUT/special_tokens.json
  vqvae        diffusers VQModel, downsampling 4 (32x32 -> 8x8 codes), 256
               codes, trained with MSE + codebook/commitment losses
               (straight-through) -> OUT/vqvae/
  encode       VQ codes of every (combination, background, jitter) render
               -> WORK/codes.npz
  transformer  LLaDA-architecture transformer trained with the masked
               diffusion objective on DiMOO's layouts (text-to-image, editing,
               inpainting via partial masking, understanding) -> WORK/transformer.pt
  export       OUT/config.json, OUT/model.safetensors, OUT/dimoo.json,
               OUT/heldout.json; checks the saved files with
               scripts/reference_forward.py

Usage: train_small.py STEP [--out models/dimoo-small] [--work /tmp/train] [--threads 1]
"""

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import shapes_data as sd  # noqa: E402

# ---------------------------------------------------------------------------
# Prompts and special tokens (reference section 2).

SYS_T2I = "Generate an image according to the text prompt."
SYS_EDIT = "Generate an image applying the following editing instruction based on the original image."
SYS_UND = ("You are a multimodal model that can process both text and images. Answer the following "
           "question based on the provided images. Analyze each image and combine relevant details to answer.")

EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"
SPECIALS = [EOS, MASK, "<system>", "</system>", "<user>", "</user>", "<uncondition>",
            "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_answer|>", "<|end_of_answer|>",
            "<|newline|>"]

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CODEBOOK = 512
GRID = 8            # 32x32 pixels / downsampling 4
ANSWER_LEN = 16     # understanding gen length (caption + <|endoftext|> padding)
N_JITTER = 32       # jitter seeds 0..31 per (combination, background)


def prompt_text(system, user):
    return "<system>" + system + "</system>" + "<user>" + user + "</user>"


def uncond_text(system):
    return prompt_text(system, "<uncondition>")


# ---------------------------------------------------------------------------
# Tokenizer.

def train_tokenizer(out_dir):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=1,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = sd.text_corpus() + [SYS_T2I, SYS_EDIT, SYS_UND]
    # Weight the corpus a little so the frequent strings merge first (deterministic).
    lines = []
    for _ in range(4):
        lines += corpus
    tok.train_from_iterator(lines, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    vocab = tok.get_vocab_size(with_added_tokens=True)
    st = {
        "mask": ids[MASK],
        "newline": ids["<|newline|>"],
        "boa": ids["<|begin_of_answer|>"],
        "eoa": ids["<|end_of_answer|>"],
        "boi": ids["<|begin_of_image|>"],
        "eoi": ids["<|end_of_image|>"],
        "uncondition": ids["<uncondition>"],
        "eos": ids[EOS],
        "image_offset": vocab,
        "codebook_size": CODEBOOK,
    }
    with open(os.path.join(out_dir, "special_tokens.json"), "w") as f:
        json.dump(st, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, "dimoo.json"), "w") as f:
        # Sampler settings measured best for the shipped model by scripts/eval_small.py
        # (CFG 0.5 for text-to-image and inpainting, none for editing, tau 0.1).
        # edit_type: the model was trained on the editing system prompt (dimoo's
        # default otherwise is the official canny_pred).
        json.dump({"width": 32, "height": 32, "input_area": 1024, "edit_type": "edit",
                   "sampling": {"timesteps": 16, "temperature": 0.1, "cfg_scale": 0.5, "cfg_text": 0, "cfg_img": 0,
                                "steps": ANSWER_LEN, "gen_length": ANSWER_LEN, "block_length": ANSWER_LEN}},
                  f, indent=1)
        f.write("\n")
    for s in [prompt_text(SYS_T2I, sd.caption("red", "circle", "top left")), prompt_text(SYS_UND, sd.QUESTION)]:
        print(len(tok.encode(s).ids), "tokens:", s[:60])
    print(f"tokenizer: vocab {vocab}, specials {ids}")


class Tok:
    """tokenizers wrapper + special ids."""

    def __init__(self, out_dir):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
        with open(os.path.join(out_dir, "special_tokens.json")) as f:
            self.st = json.load(f)
        for k, v in self.st.items():
            setattr(self, k, v)
        self.vocab = self.image_offset + self.codebook_size
        self._cache = {}

    def encode(self, text):
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok.encode(text, add_special_tokens=False).ids
            self._cache[text] = ids
        return list(ids)

    def decode(self, ids):
        return self.tok.decode([i for i in ids if i < self.image_offset], skip_special_tokens=True)

    def grid(self, codes):
        """BOI + rows of image ids with a newline after each + EOI."""
        out = [self.boi]
        codes = list(codes)
        for r in range(GRID):
            out += [self.image_offset + int(c) for c in codes[r * GRID:(r + 1) * GRID]]
            out.append(self.newline)
        out.append(self.eoi)
        return out


# Layout builders: each returns (ids, target) lists where target[i] >= 0 marks
# an answer position that may be masked (its clean token), -1 elsewhere.

def layout_t2i(tk, caption, codes, uncond=False):
    prompt = tk.encode(uncond_text(SYS_T2I) if uncond else prompt_text(SYS_T2I, caption))
    ans = [tk.boa] + tk.grid(codes) + [tk.eoa]
    ids = prompt + ans
    tgt = [-1] * len(ids)
    for i in range(len(prompt), len(ids)):
        if ids[i] >= tk.image_offset:
            tgt[i] = ids[i]
    return ids, tgt


def layout_edit(tk, instruction, src_codes, codes, mode="cond"):
    """mode: cond, text_uncond (uncond prompt + input image), image_uncond (prompt, no image)."""
    if mode == "text_uncond":
        prompt = tk.encode(uncond_text(SYS_EDIT))
    else:
        prompt = tk.encode(prompt_text(SYS_EDIT, instruction))
    if mode != "image_uncond":
        prompt = prompt[:-1] + tk.grid(src_codes) + prompt[-1:]
    ans = [tk.boa] + tk.grid(codes) + [tk.eoa]
    ids = prompt + ans
    tgt = [-1] * len(ids)
    for i in range(len(prompt), len(ids)):
        if ids[i] >= tk.image_offset:
            tgt[i] = ids[i]
    return ids, tgt


def layout_und(tk, codes, answer_text):
    prompt = tk.encode(prompt_text(SYS_UND, sd.QUESTION))
    prompt = prompt[:-1] + tk.grid(codes) + prompt[-1:]
    ans = tk.encode(answer_text) if answer_text is not None else []
    ans = ans[:ANSWER_LEN] + [tk.eos] * (ANSWER_LEN - len(ans))
    ids = prompt + [tk.boa] + ans + [tk.eoa]
    tgt = [-1] * len(ids)
    for i in range(len(prompt) + 1, len(prompt) + 1 + ANSWER_LEN):
        tgt[i] = ids[i]
    return ids, tgt


# ---------------------------------------------------------------------------
# VQ-VAE.

VQ_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 64],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=16,
    sample_size=32,
    num_vq_embeddings=CODEBOOK,
    norm_num_groups=8,
    vq_embed_dim=None,
    norm_type="group",
    mid_block_add_attention=False,
    lookup_from_codebook=True,
    force_upcast=True,
)


def render_batch(rs, n, combos):
    imgs, labels = [], []
    for _ in range(n):
        c = combos[rs.randint(len(combos))]
        bg = sd.BACKGROUND_NAMES[rs.randint(2)]
        j = rs.randint(N_JITTER)
        imgs.append(sd.render(*c, bg, j))
        labels.append((c, bg, j))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    return x, labels


def vq_encode(vq, x):
    """x: (B, 3, 32, 32) in [0, 1] -> (B, 64) code indices (nearest codebook row)."""
    h = vq.encode(x).latents
    B, C, H, W = h.shape
    z = h.permute(0, 2, 3, 1).reshape(-1, C)
    e = vq.quantize.embedding.weight
    d = (z * z).sum(1, keepdim=True) - 2 * z @ e.T + (e * e).sum(1)[None]
    return d.argmin(1).view(B, H * W)


def vq_decode(vq, codes):
    """codes: (B, 64) -> (B, 3, 32, 32) pixels in [0, 1]."""
    e = vq.quantize.embedding.weight[codes]  # (B, 64, C)
    B = codes.shape[0]
    q = e.view(B, GRID, GRID, -1).permute(0, 3, 1, 2)
    dec = vq.decoder(vq.post_quant_conv(q))
    return dec.clamp(0, 1)


def train_vqvae(out_dir, steps, seed, batch=16):
    from diffusers import VQModel
    torch.manual_seed(seed)
    rs = np.random.RandomState(seed)
    vq = VQModel(**VQ_CONFIG)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    combos = sd.ALL_COMBOS  # the autoencoder sees every combination (it is not told captions)
    emb = vq.quantize.embedding.weight
    usage = torch.zeros(CODEBOOK)
    t0 = time.time()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 100) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        x, _ = render_batch(rs, batch, combos)
        h = vq.encode(x).latents
        B, C, H, W = h.shape
        z = h.permute(0, 2, 3, 1).reshape(-1, C)
        d = (z * z).sum(1, keepdim=True) - 2 * z @ emb.T + (emb * emb).sum(1)[None]
        idx = d.argmin(1)
        zq = emb[idx]
        loss_vq = F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())
        st = (z + (zq - z).detach()).view(B, H, W, C).permute(0, 3, 1, 2)
        dec = vq.decoder(vq.post_quant_conv(st))
        loss_rec = F.mse_loss(dec, x) + 0.1 * F.l1_loss(dec, x)
        loss = loss_rec + loss_vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(idx, minlength=CODEBOOK).float()
        # Restart dead codes on random encoder outputs of this batch.
        if (step + 1) % 100 == 0 and step < steps * 0.8:
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    pick = torch.from_numpy(rs.randint(0, z.shape[0], size=len(dead)))
                    emb[dead] = z.detach()[pick] + 0.01 * torch.randn(len(dead), C)
            usage.zero_()
        if step % 100 == 0 or step == steps - 1:
            print(f"vq step {step} loss_rec {loss_rec.item():.5f} loss_vq {loss_vq.item():.5f} "
                  f"codes used {int((torch.bincount(idx, minlength=CODEBOOK) > 0).sum())} "
                  f"lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
    vq.eval()
    path = os.path.join(out_dir, "vqvae")
    vq.save_pretrained(path, safe_serialization=True)
    print("saved", path)


def finetune_vq_decoder(out_dir, work, steps, seed, batch=32, lr=1e-3):
    """Train only post_quant_conv + decoder on the fixed codes of every render
    (WORK/codes.npz): sharper decoding, and the encoder and codebook -- hence every
    code the transformer trains on -- stay exactly as they are."""
    torch.manual_seed(seed)
    rs = np.random.RandomState(seed)
    vq = load_vq(out_dir)
    codes = torch.from_numpy(np.load(os.path.join(work, "codes.npz"))["codes"].astype(np.int64))
    imgs = np.zeros(codes.shape[:3] + (sd.SIZE, sd.SIZE, 3), dtype=np.uint8)
    for ci, c in enumerate(sd.ALL_COMBOS):
        for bi, bg in enumerate(sd.BACKGROUND_NAMES):
            for j in range(N_JITTER):
                imgs[ci, bi, j] = sd.render(*c, bg, j)
    codes = codes.view(-1, GRID * GRID)
    imgs = torch.from_numpy(imgs).view(-1, sd.SIZE, sd.SIZE, 3)
    params = list(vq.post_quant_conv.parameters()) + list(vq.decoder.parameters())
    for p in vq.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    vq.train()
    t0 = time.time()
    for step in range(steps):
        f = min(1.0, (step + 1) / 50) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.95 + 0.05)
        for g in opt.param_groups:
            g["lr"] = lr * f
        idx = torch.from_numpy(rs.randint(0, codes.shape[0], size=batch))
        x = imgs[idx].permute(0, 3, 1, 2).float() / 255.0
        e = vq.quantize.embedding.weight[codes[idx]].view(batch, GRID, GRID, -1).permute(0, 3, 1, 2)
        dec = vq.decoder(vq.post_quant_conv(e))
        loss = F.mse_loss(dec, x) + 0.1 * F.l1_loss(dec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"vq-decoder step {step} loss {loss.item():.5f} {time.time() - t0:.0f}s", flush=True)
    vq.eval()
    for p in vq.parameters():
        p.requires_grad_(True)
    vq.save_pretrained(os.path.join(out_dir, "vqvae"), safe_serialization=True)
    print("saved", os.path.join(out_dir, "vqvae"))


def load_vq(out_dir):
    from diffusers import VQModel
    vq = VQModel.from_pretrained(os.path.join(out_dir, "vqvae"))
    vq.eval()
    return vq


@torch.no_grad()
def encode_all(out_dir, work):
    """Codes of every (combo, background, jitter) render: codes[combo, bg, jitter, 64]."""
    vq = load_vq(out_dir)
    codes = np.zeros((len(sd.ALL_COMBOS), 2, N_JITTER, GRID * GRID), dtype=np.int16)
    err = 0.0
    for ci, c in enumerate(sd.ALL_COMBOS):
        for bi, bg in enumerate(sd.BACKGROUND_NAMES):
            imgs = np.stack([sd.render(*c, bg, j) for j in range(N_JITTER)])
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
            k = vq_encode(vq, x)
            codes[ci, bi] = k.numpy()
            err += F.mse_loss(vq_decode(vq, k), x).item()
    err /= len(sd.ALL_COMBOS) * 2
    used = len(np.unique(codes))
    np.savez(os.path.join(work, "codes.npz"), codes=codes)
    print(f"encoded {codes.shape}: recon mse {err:.5f}, distinct codes {used}")


# ---------------------------------------------------------------------------
# The transformer (reference section 1), fp32.

MODEL_CONFIG = dict(d_model=256, n_heads=4, n_layers=4, mlp_hidden_size=704, rope_theta=500000.0,
                    rms_norm_eps=1e-5, max_sequence_length=512)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, d, H, mlp, eps):
        super().__init__()
        self.H = H
        self.attn_norm = RMSNorm(d, eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, eps)
        self.ff_proj = nn.Linear(d, mlp, bias=False)
        self.up_proj = nn.Linear(d, mlp, bias=False)
        self.ff_out = nn.Linear(mlp, d, bias=False)

    def forward(self, x, cos, sin, attn_mask):
        B, T, d = x.shape
        hd = d // self.H
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.H, hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.H, hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.H, hd).transpose(1, 2)
        q = rope(q, cos, sin)
        k = rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, T, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Transformer(nn.Module):
    def __init__(self, vocab, d_model, n_heads, n_layers, mlp_hidden_size, rope_theta, rms_norm_eps,
                 max_sequence_length):
        super().__init__()
        self.cfg = dict(vocab=vocab, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                        mlp_hidden_size=mlp_hidden_size, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
                        max_sequence_length=max_sequence_length)
        self.wte = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList([Block(d_model, n_heads, mlp_hidden_size, rms_norm_eps)
                                     for _ in range(n_layers)])
        self.ln_f = RMSNorm(d_model, rms_norm_eps)
        self.ff_out = nn.Linear(d_model, vocab, bias=False)
        hd = d_model // n_heads
        inv = 1.0 / (rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(max_sequence_length, dtype=torch.float32), inv)
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        d = self.cfg["d_model"]
        L = self.cfg["n_layers"]
        nn.init.normal_(self.wte.weight, std=0.02)
        for b in self.blocks:
            for m in (b.q_proj, b.k_proj, b.v_proj, b.ff_proj, b.up_proj):
                nn.init.normal_(m.weight, std=d ** -0.5)
            for m in (b.attn_out, b.ff_out):
                nn.init.normal_(m.weight, std=(m.weight.shape[1] ** -0.5) / math.sqrt(2 * L))
        nn.init.normal_(self.ff_out.weight, std=d ** -0.5)

    def forward(self, ids, pad_mask=None, out_pos=None):
        """ids (B, T); pad_mask (B, T) bool, True = real token (keys that may be attended).
        out_pos: optional bool (B, T): return logits only at those positions (flattened)."""
        B, T = ids.shape
        x = self.wte(ids)
        cos, sin = self.cos[:T], self.sin[:T]
        attn_mask = None
        if pad_mask is not None:
            attn_mask = pad_mask[:, None, None, :]
        for b in self.blocks:
            x = b(x, cos, sin, attn_mask)
        x = self.ln_f(x)
        if out_pos is not None:
            x = x[out_pos]
        return self.ff_out(x)

    def state_dict_hf(self):
        p = "model.transformer."
        out = {p + "wte.weight": self.wte.weight}
        for i, b in enumerate(self.blocks):
            for n in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj",
                      "up_proj", "ff_out"):
                out[f"{p}blocks.{i}.{n}.weight"] = getattr(b, n).weight
        out[p + "ln_f.weight"] = self.ln_f.weight
        out[p + "ff_out.weight"] = self.ff_out.weight
        return {k: v.detach().float().contiguous().clone() for k, v in out.items()}

    @classmethod
    def from_hf(cls, model_dir):
        from safetensors.torch import load_file
        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
        m = cls(c["embedding_size"], c["d_model"], c["n_heads"], c["n_layers"], c["mlp_hidden_size"],
                c["rope_theta"], c["rms_norm_eps"], c["max_sequence_length"])
        w = load_file(os.path.join(model_dir, "model.safetensors"))
        p = "model.transformer."
        with torch.no_grad():
            m.wte.weight.copy_(w[p + "wte.weight"])
            for i, b in enumerate(m.blocks):
                for n in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj",
                          "up_proj", "ff_out"):
                    getattr(b, n).weight.copy_(w[f"{p}blocks.{i}.{n}.weight"])
            m.ln_f.weight.copy_(w[p + "ln_f.weight"])
            m.ff_out.weight.copy_(w[p + "ff_out.weight"])
        m.eval()
        return m


# ---------------------------------------------------------------------------
# Training data sampler.

class TaskSampler:
    """Draws training sequences (ids, targets) with a RandomState."""

    def __init__(self, tk, codes, rs, heldout_seed=sd.HELDOUT_SEED):
        self.tk = tk
        self.codes = codes
        self.rs = rs
        self.train = sd.train_combos(heldout_seed)
        self.train_set = set(self.train)
        self.cidx = {c: i for i, c in enumerate(sd.ALL_COMBOS)}

    def pick(self, combo=None):
        rs = self.rs
        if combo is None:
            combo = self.train[rs.randint(len(self.train))]
        bg = rs.randint(2)
        j = rs.randint(N_JITTER)
        return combo, bg, j

    def code(self, combo, bg, j):
        return self.codes[self.cidx[combo], bg, j]

    def sample(self, task):
        tk, rs = self.tk, self.rs
        if task == "t2i":
            combo, bg, j = self.pick()
            uncond = rs.rand() < 0.1
            return layout_t2i(tk, sd.caption(*combo), self.code(combo, bg, j), uncond)
        if task == "edit":
            while True:
                combo, bg, j = self.pick()
                e = sd.random_edit(combo, rs, self.train_set)
                if e is not None:
                    break
            kind, val, instr, tgt = e
            u = rs.rand()
            mode = "text_uncond" if u < 0.1 else ("image_uncond" if u < 0.2 else "cond")
            return layout_edit(tk, instr, self.code(combo, bg, j), self.code(tgt, bg, j), mode)
        if task == "und":
            combo, bg, j = self.pick()
            return layout_und(tk, self.code(combo, bg, j), sd.caption(*combo))
        raise ValueError(task)


def make_batch(seqs, tk, rs, mask_probs):
    """Pad to the longest, mask targets with per-sequence probability; returns tensors."""
    T = max(len(s[0]) for s in seqs)
    B = len(seqs)
    ids = np.full((B, T), tk.eos, dtype=np.int64)
    pad = np.zeros((B, T), dtype=bool)
    labels = np.full((B, T), -100, dtype=np.int64)
    for b, ((s, tgt), p) in enumerate(zip(seqs, mask_probs)):
        n = len(s)
        s = np.array(s, dtype=np.int64)
        tgt = np.array(tgt, dtype=np.int64)
        cand = np.nonzero(tgt >= 0)[0]
        m = rs.rand(len(cand)) < p
        if not m.any():
            m[rs.randint(len(cand))] = True
        pos = cand[m]
        s[pos] = tk.mask
        ids[b, :n] = s
        pad[b, :n] = True
        labels[b, pos] = tgt[pos]
    return torch.from_numpy(ids), torch.from_numpy(pad), torch.from_numpy(labels)


# Task mix of every batch: text-to-image 45%, editing 25%, understanding 30%.
MIX = [("t2i", 0.45), ("edit", 0.25), ("und", 0.30)]
PROBE = (50, 300)  # steps between which --budget measures the speed
WARMUP = 500  # linear warm-up steps; the cosine decay spans the steps after them


def lr_factor(step, steps):
    """Linear warm-up, then cosine from 1 to 0.05. The first WARMUP steps do not
    depend on `steps`, so a run whose length was chosen after a few hundred
    steps (--budget) is reproduced exactly by passing that length as --steps."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    p = min(1.0, (step - WARMUP) / max(1, steps - WARMUP))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))


def task_counts(batch):
    n = [max(1, int(round(batch * f))) for _, f in MIX]
    n[-1] = max(1, batch - sum(n[:-1]))
    return n


class Batches(torch.utils.data.IterableDataset):
    """Endless training batches (ids, pad, labels, task index per row), all tasks
    mixed in one padded batch. Each data worker draws from its own RandomState
    keyed by (seed, first step, worker), so a run is reproducible for a fixed
    number of workers (the loader takes batches from the workers in turn)."""

    def __init__(self, out_dir, work, seed, batch, first_step):
        self.out_dir, self.work, self.seed, self.batch, self.first_step = out_dir, work, seed, batch, first_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rs = np.random.RandomState([self.seed, self.first_step, wid])
        tk = Tok(self.out_dir)
        codes = np.load(os.path.join(self.work, "codes.npz"))["codes"].astype(np.int64)
        sampler = TaskSampler(tk, codes, rs)
        counts = task_counts(self.batch)
        while True:
            seqs, probs, task = [], [], []
            for ti, ((name, _), n) in enumerate(zip(MIX, counts)):
                seqs += [sampler.sample(name) for _ in range(n)]
                # Mask ratio t ~ U(0, 1), skewed toward high ratios for images (the
                # image sampler starts fully masked).
                t = rs.rand(n)
                if name != "und":
                    t = 1.0 - t ** 1.5
                probs += list(t)
                task += [ti] * n
            ids, pad, labels = make_batch(seqs, tk, rs, probs)
            yield ids, pad, labels, torch.tensor(task, dtype=torch.long)


def train_transformer(out_dir, work, steps, seed, batch, lr, resume=None, device="cpu", workers=0,
                      budget=None, ema_decay=0.999, init=None):
    """Masked-diffusion training. With budget (seconds), the step count is fixed
    after PROBE[1] steps from the measured speed (rounded down to 500, at most
    `steps`) and printed: rerun with --steps N to reproduce it."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    amp = cuda or os.environ.get("DIMOO_TRAIN_AMP") == "1"  # bf16 autocast
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tk = Tok(out_dir)
    model = Transformer(tk.vocab, **MODEL_CONFIG).to(dev)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"transformer: {nparam / 1e6:.2f}M parameters, vocab {tk.vocab}, device {dev}, batch {batch}, "
          f"workers {workers}", flush=True)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8, fused=cuda)
    if init:
        # Continue from exported weights (a second phase with a fresh schedule and optimizer).
        model.load_state_dict(Transformer.from_hf(init).state_dict())
        model.train()
        print("initialised from", init, flush=True)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    start = 0
    if resume and os.path.exists(resume):
        ck = torch.load(resume, weights_only=False, map_location=dev)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if "ema" in ck:
            for e, v in zip(ema, ck["ema"]):
                e.copy_(v)
        start = ck["step"]
        print("resumed at", start)
    loader = torch.utils.data.DataLoader(Batches(out_dir, work, seed, batch, start), batch_size=None,
                                         num_workers=workers, pin_memory=cuda,
                                         prefetch_factor=4 if workers > 0 else None)
    batches = iter(loader)
    fracs = torch.tensor([f for _, f in MIX], device=dev)
    t0 = time.time()
    t_probe = None
    logs = torch.zeros(len(MIX), device=dev)
    n_logs = 0
    model.train()
    ck_path = os.path.join(work, "transformer.pt")

    def save(step_done):
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step_done, "steps": steps,
                    "ema": [e.detach().cpu() for e in ema], "config": model.cfg}, ck_path)

    step = start
    while step < steps:
        f = lr_factor(step, steps)
        for g in opt.param_groups:
            g["lr"] = lr * f
        ids, pad, labels, task = (x.to(dev, non_blocking=True) for x in next(batches))
        sel = labels >= 0
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(ids, pad, out_pos=sel)
        ce = F.cross_entropy(logits.float(), labels[sel], reduction="none")
        tsel = task[:, None].expand_as(labels)[sel]
        tot = torch.zeros(len(MIX), device=dev).index_add_(0, tsel, ce)
        cnt = torch.bincount(tsel, minlength=len(MIX)).clamp_min(1)
        per_task = tot / cnt
        loss = (fracs * per_task).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - d)
            logs += per_task.detach()
        n_logs += 1
        step += 1
        if budget is not None and step == start + PROBE[0]:
            if cuda:
                torch.cuda.synchronize()
            t_probe = time.time()
        if budget is not None and step == start + PROBE[1]:
            if cuda:
                torch.cuda.synchronize()
            rate = (PROBE[1] - PROBE[0]) / (time.time() - t_probe)
            left = budget - (time.time() - t0)
            n = start + PROBE[1] + int(rate * left * 0.97)
            n = max(start + 1000, n // 500 * 500)
            if n < steps:
                steps = n
            print(f"measured {rate:.1f} steps/s: the schedule spans {steps} steps (reproduce with --steps {steps})",
                  flush=True)
        if step % 100 == 0 or step == steps:
            el = time.time() - t0
            l = (logs / n_logs).tolist()
            print(f"step {step} " + " ".join(f"{name} {v:.3f}" for (name, _), v in zip(MIX, l)) +
                  f" lr {lr * f:.2e} {el:.0f}s", flush=True)
            logs.zero_()
            n_logs = 0
        if step % 2000 == 0 or step == steps:
            save(step)
    print(f"trained {steps} steps ({steps - start} here) in {time.time() - t0:.0f}s", flush=True)


# ---------------------------------------------------------------------------
# Export.

def hf_config(model, tk):
    c = model.cfg
    return {
        "d_model": c["d_model"],
        "n_heads": c["n_heads"],
        "n_kv_heads": c["n_heads"],
        "n_layers": c["n_layers"],
        "mlp_hidden_size": c["mlp_hidden_size"],
        "mlp_ratio": 4,
        "vocab_size": tk.vocab,
        "embedding_size": tk.vocab,
        "rope": True,
        "rope_theta": float(c["rope_theta"]),
        "rope_full_precision": True,
        "max_sequence_length": c["max_sequence_length"],
        "layer_norm_type": "rms",
        "rms_norm_eps": c["rms_norm_eps"],
        "block_type": "llama",
        "activation_type": "silu",
        "include_bias": False,
        "include_qkv_bias": False,
        "weight_tying": False,
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "input_emb_norm": False,
        "scale_logits": False,
        "alibi": False,
        "flash_attention": False,
        "block_group_size": 1,
        "mask_token_id": tk.mask,
        "eos_token_id": tk.eos,
        "pad_token_id": tk.eos,
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "torch_dtype": "float32",
    }


def export(out_dir, work, use_raw=False):
    from safetensors.torch import save_file
    tk = Tok(out_dir)
    ck = torch.load(os.path.join(work, "transformer.pt"), weights_only=False, map_location="cpu")
    model = Transformer(**ck["config"])
    model.load_state_dict(ck["model"])
    if "ema" in ck and not use_raw:
        # The exponential moving average of the weights samples better than the last step's.
        with torch.no_grad():
            for p, e in zip(model.parameters(), ck["ema"]):
                p.copy_(e.to(p.device))
    model = model.float().cpu()
    model.eval()
    for f in os.listdir(out_dir):
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, f))
    sdict = model.state_dict_hf()
    save_file({k: sdict[k] for k in sorted(sdict)}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(model, tk), f, indent=1)
        f.write("\n")
    held = sd.heldout_combos()
    with open(os.path.join(out_dir, "heldout.json"), "w") as f:
        json.dump({
            "description": "(color, shape, position) combinations never used in training: no "
                           "text-to-image caption, editing source or target, or understanding image "
                           "has one of them (the VQ-VAE, which sees no captions, saw all renders)",
            "seed": sd.HELDOUT_SEED,
            "count": len(held),
            "total_combinations": len(sd.ALL_COMBOS),
            "fraction": round(len(held) / len(sd.ALL_COMBOS), 4),
            "combinations": [{"color": c, "shape": s, "position": p, "caption": sd.caption(c, s, p)}
                             for c, s, p in held],
        }, f, indent=1)
        f.write("\n")
    # Check: the reference forward on the saved files equals this model's logits.
    import reference_forward as rf
    cfg, w = rf.load_model(out_dir)
    rs = np.random.RandomState(0)
    codes = np.load(os.path.join(work, "codes.npz"))["codes"]
    cases = [layout_t2i(tk, sd.caption("red", "circle", "center"), codes[0, 0, 0])[0],
             layout_und(tk, codes[5, 1, 3], None)[0],
             [int(t) for t in rs.randint(0, tk.vocab, size=37)]]
    worst = 0.0
    for toks in cases:
        ref = rf.forward(cfg, w, toks).numpy()
        with torch.no_grad():
            got = model(torch.tensor([toks]))[0].double().numpy()
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        worst = max(worst, rel)
        print(f"reference_forward check T={len(toks)}: rel err {rel:.2e}, max abs {np.abs(got - ref).max():.2e}")
    assert worst < 1e-4, worst
    total = 0
    for root, _, files in os.walk(out_dir):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    print(f"exported {out_dir}: {total / 1e6:.2f} MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["tokenizer", "vqvae", "encode", "vqdec", "transformer", "export", "all"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "models", "dimoo-small"))
    ap.add_argument("--work", default="/tmp/train")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vq-steps", type=int, default=3000)
    ap.add_argument("--vqdec-steps", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=3000,
                    help="total steps; the cosine schedule spans them (with --resume: a warm restart)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.2e-3)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (transformer step)")
    ap.add_argument("--workers", type=int, default=0, help="data-loader processes (transformer step)")
    ap.add_argument("--budget", type=float,
                    help="seconds for the transformer step: fixes --steps from the speed measured early on")
    ap.add_argument("--init", help="start the transformer from this exported model folder")
    ap.add_argument("--raw-weights", action="store_true", help="export the last step's weights, not their EMA")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    steps = ["tokenizer", "vqvae", "encode", "vqdec", "transformer", "export"] if a.step == "all" else [a.step]
    for s in steps:
        t0 = time.time()
        if s == "tokenizer":
            train_tokenizer(a.out)
        elif s == "vqvae":
            train_vqvae(a.out, a.vq_steps, a.seed + 1)
        elif s == "encode":
            encode_all(a.out, a.work)
        elif s == "vqdec":
            finetune_vq_decoder(a.out, a.work, a.vqdec_steps, a.seed + 3)
        elif s == "transformer":
            train_transformer(a.out, a.work, a.steps, a.seed + 2, a.batch, a.lr,
                              resume=os.path.join(a.work, "transformer.pt") if a.resume else None,
                              device=a.device, workers=a.workers, budget=a.budget,
                              init=a.init)
        elif s == "export":
            export(a.out, a.work, use_raw=a.raw_weights)
        print(f"== {s} done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()

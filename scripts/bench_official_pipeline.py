#!/usr/bin/env python3
"""The official Lumina-DiMOO text-to-image generation loop in PyTorch, timed
end to end on random bf16 weights of the real shape (d 4096, 32 layers, 32
heads, SwiGLU 12288, vocab 134548) generated on the device: the baseline
that `dimoo bench` is compared with (scripts/device-check.sh).

The loop follows the official generator (/work/shared/dimoo-reference.md
sections 3 and 4; the release's generators/image_generation_generator.py):
batch 1, the conditional and the unconditional branch as two forwards per
step, each computing full-vocabulary logits at every position and slicing
the 8192 image columns; MaskGIT cosine schedule (keep_n = floor(N cos(pi/2
(t+1)/S)), at least 1, 0 on the last step); CFG (1+s) l_c - s l_u; Gumbel-max
sampling at temperature tau; confidence = softmax(l)[sampled]; re-masking of
the keep_n lowest log p + tau g' (fresh Gumbel noise). With --cache, the
official ML-Cache: steps t <= floor(w S) or (t - floor(w S)) mod R == 0 are
full ("refresh") steps that drop the cache and rebuild it (per branch and
layer the K and V projections before RoPE, and the logits); after a step
whose successor is cached, each branch's positions whose max image logit is
at or below the (1-r) quantile (torch.quantile, linear; over all positions,
prompt included) are recomputed next step: only they go through the network
as queries, their K/V replace the cached rows, attention runs over all T
keys (RoPE applied to the whole cached K at the true positions), and their
logits replace the cached rows; the other logits come from the cache.

The model code is scripts/bench_torch_reference.py's RandomModel (imported,
not copied) with a device argument and the cached forward added.

Per case one JSON line (wall seconds per generation, CUDA-synchronized, from
the sequences on the device to the final codes; peak memory:
torch.cuda.max_memory_allocated / max_memory_reserved, which include the
~15 GiB of weights, and the device's peak use sampled with cudaMemGetInfo,
which also counts the CUDA context), then a table.

    python3 scripts/bench_official_pipeline.py [--sizes 512,1024] [--cache both|on|off]
        [--steps 64 --cfg 4 --runs 1 --warmup-steps 2 --cond-tokens 64 --uncond-tokens 19]
    python3 scripts/bench_official_pipeline.py --quick           # a small model, 256x256, 8 steps
    python3 scripts/bench_official_pipeline.py --device cpu --tiny   # a tiny model on the CPU
    python3 scripts/bench_official_pipeline.py --task understand [--seq-tokens T --image-size 1024
        --gen-length 1024 --block-length 256 --text-steps 128 --temperature 0 --cfg 0]
        # the reference's understanding loop (section 5) on a random image's codes
    python3 scripts/bench_official_pipeline.py --check-golden testdata/official-small
        # both loops against the official code's traces (float64 reference forward, CPU)
    python3 scripts/bench_official_pipeline.py --write-checkpoint DIR [--tiny]
        # the same random weights as a dimoo checkpoint folder (config.json,
        # sharded bf16 safetensors, the official tokenizer's test copy, a tiny
        # VQ-VAE with 8192 codes), then exit: `dimoo bench --model DIR`.

The sequences: --cond-tokens / --uncond-tokens prompt tokens (random text
ids; the defaults are what dimoo's tokenizer gives for device-check's prompt
and for the unconditional prompt), then BOA, BOI, the grid of MASK with a
newline after each row, EOI, EOA: T = 4228 at 1024x1024 with 64 prompt tokens.
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch_reference import RandomModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lumina-DiMOO's ids (reference section 2).
MASK, NEWLINE, BOI, EOI, BOA, EOA, EOS = 126336, 126084, 126349, 126350, 126354, 126355, 126081
IMAGE_OFFSET, CODEBOOK = 126356, 8192
VOCAB = IMAGE_OFFSET + CODEBOOK  # 134548

# name: (d_model, layers, heads, mlp); the vocabulary is always the real one,
# so the real ids, tokenizer and VQ codebook fit every size.
SHAPES = {
    "real": (4096, 32, 32, 12288),
    "quick": (1024, 4, 8, 3072),
    "tiny": (64, 2, 2, 128),
}


class OfficialModel(RandomModel):
    """RandomModel on any device, plus the ML-Cache forward."""

    def __init__(self, d, n_layers, n_heads, mlp, vocab, device, seed=1, theta=500000.0, eps=1e-5):
        super().__init__(d, n_layers, n_heads, mlp, vocab, theta=theta, eps=eps, device=device, seed=seed)

    def rope_at(self, x, T, idx):  # x (1, H, n, hd) at positions idx of a length-T sequence
        cos, sin = self.rope_table(T)
        cos, sin = cos[:, :, idx], sin[:, :, idx]
        xf = x.float()
        x1, x2 = xf[..., : self.hd // 2], xf[..., self.hd // 2:]
        return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

    @torch.no_grad()
    def forward_cache(self, ids, cache, sel=None):
        """ML-Cache forward of one branch. sel None: a full step that
        rebuilds `cache` (K, V before RoPE per layer, and the logits); else
        only the positions where sel (1, T) is true run as queries."""
        B, T = ids.shape
        full = sel is None
        if full:
            cache.clear()
            cache["k"], cache["v"] = [], []
            x = self.wte[ids]
        else:
            idx = sel[0].nonzero().squeeze(1)
            x = self.wte[ids[:, idx]]
        n = x.shape[1]
        for li, b in enumerate(self.blocks):
            h = self.rms(x, b["attn_norm"])
            q, k, v = h @ b["q"].T, h @ b["k"].T, h @ b["v"].T
            if full:
                cache["k"].append(k)
                cache["v"].append(v)
                q = self.rope(q.view(B, T, self.H, self.hd).transpose(1, 2), T)
            else:
                cache["k"][li][:, idx] = k
                cache["v"][li][:, idx] = v
                q = self.rope_at(q.view(B, n, self.H, self.hd).transpose(1, 2), T, idx)
            K = self.rope(cache["k"][li].view(B, T, self.H, self.hd).transpose(1, 2), T)
            V = cache["v"][li].view(B, T, self.H, self.hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, K, V).transpose(1, 2).reshape(B, n, self.d)
            x = x + a @ b["o"].T
            h = self.rms(x, b["ff_norm"])
            x = x + (F.silu(h @ b["ff_proj"].T) * (h @ b["up"].T)) @ b["ff_out"].T
        x = self.rms(x, self.ln_f)
        logits = x @ self.head.T
        if full:
            cache["logits"] = logits
        else:
            cache["logits"][:, idx] = logits
        return cache["logits"]

    def tensors(self):
        """(name, tensor) in the Hugging Face checkpoint's names."""
        p = "model.transformer."
        yield p + "wte.weight", self.wte
        names = dict(attn_norm="attn_norm", q="q_proj", k="k_proj", v="v_proj", o="attn_out", ff_norm="ff_norm",
                     ff_proj="ff_proj", up="up_proj", ff_out="ff_out")
        for i, b in enumerate(self.blocks):
            for key, name in names.items():
                yield f"{p}blocks.{i}.{name}.weight", b[key]
        yield p + "ln_f.weight", self.ln_f
        yield p + "ff_out.weight", self.head


# --- the official sampler's helpers (reference section 3) ---

def cosine_schedule(t):
    return torch.cos(t * math.pi / 2)


def gumbel_noise(shape, generator, device):
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return -torch.log(-torch.log(u.clamp_(1e-20, 1.0)))


def gumbel_max_sample(logits, temperature, generator):
    if temperature == 0:
        return logits.argmax(dim=-1)
    g = gumbel_noise(logits.shape, generator, logits.device)
    return (logits.float() / temperature + g).argmax(dim=-1)


def mask_by_random_topk(keep_n, probs, temperature, generator):
    """True at the keep_n (per row) positions of lowest log p + tau g'."""
    conf = torch.log(probs.float()) + temperature * gumbel_noise(probs.shape, generator, probs.device)
    sorted_conf = conf.sort(dim=-1).values
    cut = sorted_conf.gather(-1, keep_n.long().view(-1, 1).clamp(max=conf.shape[-1] - 1))
    return conf < cut


@torch.no_grad()
def generate_image(model, prompt, *, uncon_ids, code_start, seq_len, timesteps, temperature, cfg_scale,
                   generator, use_cache, cache_ratio=0.9, refresh_interval=5, warmup_ratio=0.3,
                   mask_token_id=MASK, newline_id=NEWLINE, codebook_size=CODEBOOK, vocab_offset=IMAGE_OFFSET):
    """The official loop (batch 1); returns the codes and the forward counts."""
    x = prompt.clone()
    B = x.shape[0]
    vq_mask = x == mask_token_id
    unknown_cnt = vq_mask.sum(dim=1, keepdim=True)
    vq_len = unknown_cnt
    caches = {"cond": {}, "uncond": {}}
    warmup_step = int(timesteps * warmup_ratio)
    refresh = [not use_cache or s <= warmup_step or (s - warmup_step) % refresh_interval == 0
               for s in range(timesteps)]
    compute_ratio = 1 - cache_ratio
    cond_to_compute = uncond_to_compute = None
    counts = {"full": 0, "cached": 0}

    def forward(ids, cat, to_compute):
        if not use_cache:
            counts["full"] += 1
            return model.forward(ids)
        counts["full" if to_compute is None else "cached"] += 1
        return model.forward_cache(ids, caches[cat], to_compute)

    for step in range(timesteps):
        if unknown_cnt.item() == 0:
            break
        if step < timesteps - 1:
            frac = cosine_schedule(torch.tensor([(step + 1) / timesteps], device=x.device))
            keep_n = (vq_len.float() * frac).floor().clamp_min(1).long()
        else:
            keep_n = torch.zeros_like(unknown_cnt)
        if use_cache and step and refresh[step]:
            caches["cond"].clear()
            caches["uncond"].clear()
        if cfg_scale > 0:
            uncond = torch.cat((uncon_ids, x[:, code_start - 2:]), dim=1)
            uncond_vq_mask = torch.cat((torch.zeros((1, uncon_ids.shape[1]), dtype=torch.bool, device=x.device),
                                        vq_mask[:, code_start - 2:]), dim=1)
            cond_logits = forward(x, "cond", None if refresh[step] else cond_to_compute)[
                ..., vocab_offset:vocab_offset + codebook_size]
            cond_mask_logits = cond_logits[vq_mask].view(B, -1, codebook_size)
            uncond_logits = forward(uncond, "uncond", None if refresh[step] else uncond_to_compute)[
                ..., vocab_offset:vocab_offset + codebook_size]
            uncond_mask_logits = uncond_logits[uncond_vq_mask].view(B, -1, codebook_size)
            logits = (1 + cfg_scale) * cond_mask_logits - cfg_scale * uncond_mask_logits
        else:
            cond_logits = forward(x, "cond", None if refresh[step] else cond_to_compute)[
                ..., vocab_offset:vocab_offset + codebook_size]
            logits = cond_logits[vq_mask].view(B, -1, codebook_size)

        sampled = gumbel_max_sample(logits, temperature, generator)
        sampled_full = sampled + vocab_offset
        probs = torch.softmax(logits, dim=-1)
        conf = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        flat_idx = vq_mask.nonzero(as_tuple=False)[:, 1]
        x.view(-1)[flat_idx] = sampled_full.view(-1)
        mask_sel = mask_by_random_topk(keep_n.squeeze(1), conf, temperature, generator)
        x.view(-1)[flat_idx[mask_sel.view(-1)]] = mask_token_id
        vq_mask = x == mask_token_id
        unknown_cnt = vq_mask.sum(dim=1, keepdim=True)

        if use_cache and step < timesteps - 1 and not refresh[step + 1]:
            cond_conf = cond_logits.max(dim=-1)[0]
            thr = torch.quantile(cond_conf.to(torch.float), compute_ratio, dim=-1, keepdim=True)
            cond_to_compute = cond_conf <= thr
            if cfg_scale > 0:
                uncond_conf = uncond_logits.max(dim=-1)[0]
                thr = torch.quantile(uncond_conf.to(torch.float), compute_ratio, dim=-1, keepdim=True)
                uncond_to_compute = uncond_conf <= thr

    vq_ids = x[0, code_start:-2]
    vq_ids = vq_ids[vq_ids != newline_id].view(1, seq_len)
    return vq_ids, counts


def sequences(width, height, cond_tokens, uncond_tokens, device, seed):
    """Random text ids for the prompts, then the all-MASK answer image."""
    gw, gh = width // 16, height // 16
    g = torch.Generator().manual_seed(seed)
    grid = []
    for _ in range(gh):
        grid += [MASK] * gw + [NEWLINE]
    answer = [BOA, BOI] + grid + [EOI, EOA]
    cond = torch.randint(0, 126000, (cond_tokens,), generator=g).tolist() + answer
    uncond = torch.randint(0, 126000, (uncond_tokens,), generator=g).tolist()
    t = lambda v: torch.tensor([v], dtype=torch.long, device=device)  # noqa: E731
    return t(cond), t(uncond), cond_tokens + 2, gw * gh


@torch.no_grad()
def generate_text(model, x, *, answer_start, gen_length, block_length, steps, temperature, cfg_scale, generator,
                  mask_id=MASK, eos_id=EOS):
    """The reference's text sampler (section 5, LLaDA's low-confidence
    remasking) on x (1, T) in place; returns the blocks decoded and the
    forward count. Per block step: the whole sequence through the model
    (full-vocabulary logits at every position, as the official code), x0 =
    argmax(logits + Gumbel noise in float64) (plain argmax at temperature 0),
    confidence softmax(logits)[x0] in float64, -inf past the block and at
    unmasked positions, and the top-k confident masked positions take their
    x0, k the block's masked count split over its steps (remainder first).
    CFG: an unconditional pass with every prompt position masked, in the same
    batch. Decoding stops after a block that holds the end of text."""
    blocks = gen_length // block_length
    per_block = steps // blocks
    prompt_pos = x != mask_id
    forwards, done = 0, 0
    for b in range(blocks):
        lo, hi = answer_start + b * block_length, answer_start + (b + 1) * block_length
        n = int((x[:, lo:hi] == mask_id).sum())
        k_steps = [n // per_block + (1 if i < n % per_block else 0) for i in range(per_block)]
        for k in k_steps:
            masked = x == mask_id
            if cfg_scale > 0:
                un = x.clone()
                un[prompt_pos] = mask_id
                both = model.forward(torch.cat([x, un], dim=0))
                logits = both[1:] + (cfg_scale + 1) * (both[:1] - both[1:])
            else:
                logits = model.forward(x)
            forwards += 1
            if temperature > 0:
                u = torch.rand(logits.shape, generator=generator, device=x.device, dtype=torch.float64)
                noisy = logits.to(torch.float64) - temperature * torch.log(-torch.log(u.clamp_(1e-300, 1.0)))
                x0 = noisy.argmax(dim=-1)
            else:
                x0 = logits.argmax(dim=-1)
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            conf = p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            conf[:, hi:] = -math.inf
            conf = torch.where(masked, conf, torch.full_like(conf, -math.inf))
            if k > 0:
                sel = conf[0].topk(k).indices
                x[0, sel] = x0[0, sel]
        done += 1
        if bool((x[:, lo:hi] == eos_id).any()):
            break
    return done, forwards


def check_text_golden(root):
    """The stand-in's text sampler against the official code's own trace
    (testdata/official-small/text_temperature0.json: its every forward's
    input and the final sequence), on the float64 reference forward of that
    checkpoint (scripts/reference_forward.py). True if they agree."""
    import reference_forward as ref
    cfg, w = ref.load_model(os.path.join(root, "checkpoint"))
    with open(os.path.join(root, "special_tokens.json")) as f:
        sp = json.load(f)
    with open(os.path.join(root, "text_temperature0.json")) as f:
        tr = json.load(f)
    inputs = []

    class Reference:
        def forward(self, ids):
            inputs.append(ids[0].tolist())
            return torch.stack([ref.forward(cfg, w, row.tolist()) for row in ids])

    x = torch.tensor([tr["sequence"]], dtype=torch.long)
    generate_text(Reference(), x, answer_start=tr["code_start"], gen_length=tr["gen_length"],
                  block_length=tr["block_length"], steps=tr["steps"], temperature=tr["temperature"], cfg_scale=0.0,
                  generator=None, mask_id=sp["mask"], eos_id=sp["eos"])
    want = [c["input"] for c in tr["calls"]]
    same_calls = inputs == want
    same_final = x[0].tolist() == tr["final"]
    print(f"text sampler vs the official trace: {len(inputs)} forwards (official {len(want)}), every input "
          f"{'equal' if same_calls else 'DIFFERENT'}, final sequence {'equal' if same_final else 'DIFFERENT'}")
    return same_calls and same_final


class _Stop(Exception):
    pass


def check_t2i_golden(root):
    """The stand-in's image loop against the official code's own traces
    (testdata/official-small/t2i_temperature0.json) on the float64
    reference forward: the run without ML-Cache whole (every forward's
    input, the final codes); the run with it up to its first cached
    forward, whose recomputed positions must be the official ones (after
    it, the cached logits would need the official cache's K/V, which the
    reference forward does not keep). True if they agree."""
    import reference_forward as ref
    cfg, w = ref.load_model(os.path.join(root, "checkpoint"))
    with open(os.path.join(root, "special_tokens.json")) as f:
        sp = json.load(f)
    with open(os.path.join(root, "t2i_temperature0.json")) as f:
        runs = json.load(f)
    ok = True
    for tr in runs:
        calls = []

        class Reference:
            def forward(self, ids):
                calls.append((ids[0].tolist(), None))
                return torch.stack([ref.forward(cfg, w, row.tolist()) for row in ids])

            def forward_cache(self, ids, cache, sel=None):
                if sel is not None:
                    calls.append((ids[0].tolist(), sel[0].nonzero().squeeze(1).tolist()))
                    raise _Stop
                return self.forward(ids)

        gh, gw = tr["grid"]
        x = torch.tensor([tr["cond_sequence"]], dtype=torch.long)
        codes = None
        try:
            codes, _ = generate_image(Reference(), x, uncon_ids=torch.tensor([tr["uncond_prompt"]]),
                                      code_start=tr["code_start"], seq_len=gh * gw, timesteps=tr["timesteps"],
                                      temperature=tr["temperature"], cfg_scale=tr["cfg_scale"], generator=None,
                                      use_cache=tr["use_cache"], cache_ratio=tr["cache_ratio"],
                                      refresh_interval=tr["refresh_interval"], warmup_ratio=tr["warmup_ratio"],
                                      mask_token_id=sp["mask"], newline_id=sp["newline"],
                                      codebook_size=sp["codebook_size"], vocab_offset=sp["image_offset"])
        except _Stop:
            pass
        want = [(c["input"], c["to_compute"]) for c in tr["calls"]][:len(calls)]
        same = calls == want
        final = codes is not None and codes[0].tolist() == tr["final_codes"]
        whole = codes is not None
        ok &= same and (final or not whole) and (whole or tr["use_cache"])
        print(f"image sampler, ML-Cache {'on' if tr['use_cache'] else 'off'}, vs the official trace: "
              f"{len(calls)} of {len(tr['calls'])} forwards compared, "
              f"{'equal' if same else 'DIFFERENT'}" + (f"; final codes {'equal' if final else 'DIFFERENT'}"
                                                         if whole else " (to the first cached forward)"))
    return ok


def understand_sequence(seq_tokens, image_size, gen_length, device, seed):
    """An understanding sequence of seq_tokens in all (section 2): random
    prompt text ids around a random image's codes (BOI, rows of codes each
    with a newline, EOI; before the prompt's last token), then BOA, the
    masked answer, EOA. Returns it and where the answer starts."""
    g = torch.Generator().manual_seed(seed)
    gw = gh = image_size // 16
    img = [BOI]
    for _ in range(gh):
        img += (IMAGE_OFFSET + torch.randint(0, CODEBOOK, (gw,), generator=g)).tolist() + [NEWLINE]
    img += [EOI]
    n_prompt = seq_tokens - len(img) - gen_length - 2
    if n_prompt < 2:
        raise SystemExit(f"--seq-tokens {seq_tokens} leaves no room for a prompt around a {image_size}^2 image")
    prompt = torch.randint(0, 126000, (n_prompt,), generator=g).tolist()
    seq = prompt[:-1] + img + prompt[-1:] + [BOA] + [MASK] * gen_length + [EOA]
    return torch.tensor([seq], dtype=torch.long, device=device), len(seq) - gen_length - 1


def run_understand(model, device, a):
    x, start = understand_sequence(a.seq_tokens, a.image_size, a.gen_length, device, a.seed)
    kw = dict(answer_start=start, gen_length=a.gen_length, block_length=a.block_length, steps=a.text_steps,
              temperature=a.temperature, cfg_scale=a.cfg)
    if a.warmup_steps > 0:  # one block, a few steps
        w = min(a.warmup_steps, a.text_steps // (a.gen_length // a.block_length))
        generate_text(model, x.clone(), answer_start=start, gen_length=a.block_length, block_length=a.block_length,
                      steps=w, temperature=a.temperature, cfg_scale=a.cfg,
                      generator=torch.Generator(device=device).manual_seed(a.seed))
        sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    secs = []
    with DevicePeak(device) as dp:
        for r in range(a.runs):
            y = x.clone()
            g = torch.Generator(device=device).manual_seed(a.seed + r)
            sync(device)
            t0 = time.perf_counter()
            blocks, forwards = generate_text(model, y, generator=g, **kw)
            sync(device)
            secs.append(time.perf_counter() - t0)
    out = {"case": "official-understand", "image_size": a.image_size, "sequence_tokens": x.shape[1],
           "gen_length": a.gen_length, "block_length": a.block_length, "steps": a.text_steps, "cfg_scale": a.cfg,
           "temperature": a.temperature, "blocks_decoded": blocks, "forwards": forwards, "seconds": secs,
           "seconds_median": sorted(secs)[len(secs) // 2], "device": str(device)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device), peak_device_used_bytes=dp.peak)
    return out


class DevicePeak:
    """The device's peak memory in use (total - free, cudaMemGetInfo),
    sampled in a thread: every process and the CUDA context count, as in
    NVML's figure that dimoo bench reports."""

    def __init__(self, device, interval=0.02):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()
        self._t = None

    def _sample(self):
        free, total = torch.cuda.mem_get_info(self.device)
        self.peak = max(self.peak, total - free)

    def __enter__(self):
        if self.device.type == "cuda":
            self._sample()
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc):
        if self._t is not None:
            self._stop.set()
            self._t.join()
            self._sample()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(model, device, width, height, use_cache, a, first_seed):
    cond, uncond, code_start, n = sequences(width, height, a.cond_tokens, a.uncond_tokens, device, seed=width)
    kw = dict(uncon_ids=uncond, code_start=code_start, seq_len=n, temperature=a.temperature, cfg_scale=a.cfg,
              use_cache=use_cache, cache_ratio=a.cache_ratio, warmup_ratio=a.warmup_ratio,
              refresh_interval=a.refresh_interval)
    if a.warmup_steps > 0:
        g = torch.Generator(device=device).manual_seed(first_seed)
        generate_image(model, cond, timesteps=min(a.warmup_steps, n), generator=g, **kw)
        sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    secs, counts = [], None
    with DevicePeak(device) as dp:
        for r in range(a.runs):
            g = torch.Generator(device=device).manual_seed(first_seed + r)
            sync(device)
            t0 = time.perf_counter()
            codes, counts = generate_image(model, cond, timesteps=min(a.steps, n), generator=g, **kw)
            sync(device)
            secs.append(time.perf_counter() - t0)
    assert codes.shape == (1, n) and int(codes.min()) >= IMAGE_OFFSET, "every code drawn"
    out = {"case": "official", "size": f"{width}x{height}", "width": width, "height": height,
           "steps": min(a.steps, n), "cfg_scale": a.cfg, "temperature": a.temperature, "use_cache": use_cache,
           "cache_ratio": a.cache_ratio, "warmup_ratio": a.warmup_ratio, "refresh_interval": a.refresh_interval,
           "sequence_tokens": {"cond": cond.shape[1], "uncond": uncond.shape[1] + cond.shape[1] - code_start + 2},
           "forwards": counts, "seconds": secs, "seconds_median": sorted(secs)[len(secs) // 2],
           "device": str(device)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device), peak_device_used_bytes=dp.peak)
    return out


# --- a dimoo checkpoint folder of the same weights ---

def write_safetensors(path, items):
    """items: (name, tensor); bf16/f32 tensors written raw (little-endian)."""
    dt = {torch.bfloat16: "BF16", torch.float32: "F32"}
    header, off = {}, 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dt[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, t in items:
            f.write(memoryview(t.detach().contiguous().cpu().view(torch.uint8).numpy()))
    return off


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = []
    for name, m in header.items():
        if name == "__metadata__":
            continue
        assert m["dtype"] == "F32", (name, m["dtype"])
        b, e = m["data_offsets"]
        out.append((name, torch.frombuffer(bytearray(data[b:e]), dtype=torch.float32).view(m["shape"])))
    return out


def write_checkpoint(model, out, max_seq=8192, shard_bytes=4 << 30):
    os.makedirs(os.path.join(out, "vqvae"), exist_ok=True)
    d, L, H, mlp = model.d, model.L, model.H, model.mlp
    config = {"d_model": d, "n_heads": H, "n_kv_heads": H, "n_layers": L, "mlp_hidden_size": mlp,
              "mlp_ratio": 4, "vocab_size": VOCAB, "embedding_size": VOCAB, "rope": True, "rope_theta": 500000.0,
              "rope_full_precision": True, "max_sequence_length": max_seq, "layer_norm_type": "rms",
              "rms_norm_eps": 1e-05, "block_type": "llama", "activation_type": "silu", "include_bias": False,
              "include_qkv_bias": False, "weight_tying": False, "alibi": False, "input_emb_norm": False,
              "scale_logits": False, "mask_token_id": MASK, "eos_token_id": EOS, "pad_token_id": EOS,
              "architectures": ["LLaDAModelLM"], "model_type": "llada", "torch_dtype": "bfloat16"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shards, cur, size = [], [], 0
    for name, t in model.tensors():
        nb = t.numel() * t.element_size()
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += nb
    shards.append(cur)
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(out, fn), items)
        weight_map.update({name: fn for name, _ in items})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    # The official tokenizer's test copy (the special tokens and the words
    # of the test prompts), and the test VQ-VAE with a random 8192-code
    # codebook (factor 16, 8 channels: cheap next to the transformer).
    src = os.path.join(ROOT, "testdata", "official-inputs")
    shutil.copy(os.path.join(src, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    with open(os.path.join(src, "vqvae", "config.json")) as f:
        vq = json.load(f)
    vq["num_vq_embeddings"] = CODEBOOK
    with open(os.path.join(out, "vqvae", "config.json"), "w") as f:
        json.dump(vq, f, indent=1)
    g = torch.Generator().manual_seed(7)
    items = [(n, torch.randn(CODEBOOK, t.shape[1], generator=g) if n == "quantize.embedding.weight" else t)
             for n, t in read_safetensors(os.path.join(src, "vqvae", "diffusion_pytorch_model.safetensors"))]
    write_safetensors(os.path.join(out, "vqvae", "diffusion_pytorch_model.safetensors"), items)
    with open(os.path.join(out, "dimoo.json"), "w") as f:
        json.dump({"note": "random weights from scripts/bench_official_pipeline.py (benchmarks only)"}, f)
    return total


def gib(b):
    return f"{b / (1 << 30):.1f}" if b else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="a small model (d 1024, 4 layers), 256x256, 8 steps")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (d 64, 2 layers), 64x64 and 32x32, 8 steps")
    ap.add_argument("--sizes", default=None, help="square sizes in pixels, in order (default 512,1024)")
    ap.add_argument("--cache", choices=["both", "on", "off"], default="both", help="ML-Cache off, on, or both")
    ap.add_argument("--steps", type=int, default=None, help="decoding steps (default 64)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default 4; understand: 0)")
    ap.add_argument("--temperature", type=float, default=None, help="default 1 (understand: 0, greedy)")
    ap.add_argument("--cache-ratio", type=float, default=0.9)
    ap.add_argument("--warmup-ratio", type=float, default=0.3)
    ap.add_argument("--refresh-interval", type=int, default=5)
    ap.add_argument("--runs", type=int, default=1, help="timed generations per case (the median is reported)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="an untimed generation of this many steps first")
    ap.add_argument("--cond-tokens", type=int, default=64, help="conditional prompt tokens")
    ap.add_argument("--uncond-tokens", type=int, default=19, help="unconditional prompt tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-checkpoint", metavar="DIR", help="write the weights as a dimoo checkpoint and exit")
    ap.add_argument("--check-golden", metavar="DIR", help="check the image and understanding loops against the "
                    "official traces in DIR (testdata/official-small) and exit")
    ap.add_argument("--task", choices=["t2i", "understand"], default="t2i",
                    help="understand: the text sampler on a question about a random image")
    ap.add_argument("--seq-tokens", type=int, default=None,
                    help="understand: the sequence's length (as dimoo bench built it; default: a 64-token prompt)")
    ap.add_argument("--image-size", type=int, default=None, help="understand: the input image's side (default 1024)")
    ap.add_argument("--gen-length", type=int, default=None, help="understand: answer length (default 1024)")
    ap.add_argument("--block-length", type=int, default=None, help="understand: block length (default 256)")
    ap.add_argument("--text-steps", type=int, default=None, help="understand: steps (default 128)")
    a = ap.parse_args()
    if a.check_golden:
        ok = check_t2i_golden(a.check_golden)
        return 0 if check_text_golden(a.check_golden) and ok else 1
    # The official scripts' defaults: text-to-image cfg 4 at temperature 1,
    # understanding greedy without guidance.
    if a.cfg is None:
        a.cfg = 0.0 if a.task == "understand" else 4.0
    if a.temperature is None:
        a.temperature = 0.0 if a.task == "understand" else 1.0
    shape = "tiny" if a.tiny else "quick" if a.quick else "real"
    sizes = a.sizes or {"tiny": "64,32", "quick": "256", "real": "512,1024"}[shape]
    sizes = [int(s.split("x")[0]) for s in sizes.split(",")]
    a.steps = a.steps or (8 if shape != "real" else 64)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device for torch (use --device cpu)")
        return 2

    t0 = time.perf_counter()
    model = OfficialModel(*SHAPES[shape], VOCAB, device)
    sync(device)
    gen_s = time.perf_counter() - t0
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {dev_name}; {shape} model d={model.d} layers={model.L} heads={model.H} "
          f"mlp={model.mlp} vocab={VOCAB}, generated in {gen_s:.1f} s", flush=True)
    if a.write_checkpoint:
        t0 = time.perf_counter()
        total = write_checkpoint(model, a.write_checkpoint)
        print(f"wrote {a.write_checkpoint}: {total / 1e9:.2f} GB of bf16 in {time.perf_counter() - t0:.1f} s",
              flush=True)
        return 0

    if a.task == "understand":
        small = shape != "real"
        a.image_size = a.image_size or (64 if small else 1024)
        a.gen_length = a.gen_length or (32 if small else 1024)
        a.block_length = a.block_length or (16 if small else 256)
        a.text_steps = a.text_steps or (8 if small else 128)
        blocks = a.gen_length // a.block_length
        if a.gen_length % a.block_length or a.text_steps % blocks or a.text_steps > a.gen_length:
            print("gen_length must be a multiple of block_length, steps a multiple of the blocks, at most gen_length")
            return 2
        grid = a.image_size // 16
        a.seq_tokens = a.seq_tokens or 64 + grid * (grid + 1) + 2 + a.gen_length + 2
        r = run_understand(model, device, a)
        r["model"] = shape
        print(json.dumps(r), flush=True)
        print(f"\n== official understanding summary ({dev_name}, {shape} model) ==")
        print(f"{r['image_size']}^2 image, T {r['sequence_tokens']}, answer {a.gen_length} in blocks of "
              f"{a.block_length}, {a.text_steps} steps, cfg {a.cfg}: {r['seconds_median']:.2f} s "
              f"({r['blocks_decoded']} blocks, {r['forwards']} forwards), device peak "
              f"{gib(r.get('peak_device_used_bytes'))} GiB")
        return 0

    modes = {"both": [False, True], "on": [True], "off": [False]}[a.cache]
    rows = []
    for size in sizes:
        for uc in modes:
            r = run_case(model, device, size, size, uc, a, a.seed)
            r["model"] = shape
            print(json.dumps(r), flush=True)
            rows.append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n== official pipeline summary ({dev_name}, {shape} model, {a.steps} steps, cfg {a.cfg}) ==")
    print(f"{'size':>10} {'ML-Cache':>8} {'T':>5} {'s/gen':>8} {'full/cached fwd':>16} "
          f"{'alloc GiB':>9} {'resv GiB':>8} {'device GiB':>10}")
    for r in rows:
        fw = r["forwards"]
        print(f"{r['size']:>10} {'on' if r['use_cache'] else 'off':>8} {r['sequence_tokens']['cond']:>5} "
              f"{r['seconds_median']:>8.2f} {fw['full']:>7d}/{fw['cached']:<8d} "
              f"{gib(r.get('peak_allocated_bytes')):>9} {gib(r.get('peak_reserved_bytes')):>8} "
              f"{gib(r.get('peak_device_used_bytes')):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

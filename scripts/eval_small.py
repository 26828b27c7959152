#!/usr/bin/env python3
"""Evaluate the small DiMOO (models/dimoo-small) with PyTorch samplers.

1. A deterministic pixel checker decides (color, shape, position) of a 32x32
   image: background = most common border colour; shape pixels = those far
   from it; colour = nearest palette colour of their mean; position = the
   centroid's quadrant, or the centre; shape = fill ratio of the bounding box
   (square ~1.0, circle ~0.785, triangle ~0.5). It is validated on the ground
   truth renders (and on VQ-VAE reconstructions of them).
2. The exported checkpoint (loaded from the safetensors files) runs the
   samplers of the reference: MaskGIT cosine schedule with Gumbel sampling and
   classifier-free guidance for images (one guidance for text-to-image and
   inpainting, two for editing), and low-confidence remasking for text.
   Reported: text-to-image accuracy (train and held-out combinations
   separately), editing, inpainting of a masked half, understanding.

Usage: eval_small.py [--model models/dimoo-small] [--quick] [--json out.json]
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import shapes_data as sd  # noqa: E402
import train_small as ts  # noqa: E402

# ---------------------------------------------------------------------------
# Pixel checker.

PALETTE = np.array([sd.COLORS[c] for c in sd.COLOR_NAMES], dtype=np.float64)


def check_details(img):
    """The pixel checker with its intermediates: a dict of the values the Go
    port (internal/shapes) must reproduce bit for bit (floats as repr),
    "stage" naming where it stopped and, when it found a shape, "verdict"
    [color, shape, position]. img: uint8 (32, 32, 3)."""
    im = img.astype(np.float64)
    H, W, _ = im.shape
    border = np.concatenate([im[0], im[-1], im[1:-1, 0], im[1:-1, -1]])
    q = np.round(border / 32.0).astype(np.int64)
    keys = q[:, 0] * 10000 + q[:, 1] * 100 + q[:, 2]
    vals, counts = np.unique(keys, return_counts=True)
    mode = vals[np.argmax(counts)]
    bg = border[keys == mode].mean(0)
    dist = np.sqrt(((im - bg) ** 2).sum(-1))
    m = dist > 60.0
    n = int(m.sum())
    out = {"bg": [repr(float(v)) for v in bg], "mode_key": int(mode), "n": n}
    if n < 12:
        out["stage"] = "few_far_pixels"
        return out
    mean = im[m].mean(0)
    # Colour: mean of the half of the shape pixels farthest from the background
    # (edge pixels blend into it).
    d = dist[m]
    med = np.median(d)
    inner = im[m][d >= med].mean(0)
    # Soft coverage of each pixel (0 = background, 1 = shape colour), so that a
    # slightly blurred edge (VQ decoding) keeps the shape's area.
    fg = mean - bg
    alpha = np.clip(((im - bg) @ fg) / max(fg @ fg, 1e-6), 0.0, 1.0)
    alpha[alpha < 0.1] = 0.0
    core = alpha > 0.5
    out.update({"median": repr(float(med)), "inner": [repr(float(v)) for v in inner],
                "alpha_sum": repr(float(alpha.sum())), "core": int(core.sum())})
    if core.sum() < 12:
        out["stage"] = "small_core"
        return out
    ys, xs = np.nonzero(core)
    w = alpha
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    cy, cx = (w * yy).sum() / w.sum(), (w * xx).sum() / w.sum()
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = alpha[y0:y1, x0:x1].sum() / ((y1 - y0) * (x1 - x0))
    color = sd.COLOR_NAMES[int(np.argmin(((PALETTE - inner) ** 2).sum(-1)))]
    if abs(cy - H / 2) < 4 and abs(cx - W / 2) < 4:
        position = "center"
    else:
        position = ("top" if cy < H / 2 else "bottom") + " " + ("left" if cx < W / 2 else "right")
    shape = "square" if fill > 0.92 else "circle" if fill > 0.69 else "triangle"
    out.update({"stage": "done", "cy": repr(float(cy)), "cx": repr(float(cx)), "fill": repr(float(fill)),
                "box": [int(y0), int(y1), int(x0), int(x1)], "verdict": [color, shape, position]})
    return out


def check_image(img):
    """img: uint8 (32, 32, 3). Returns (color, shape, position) or None when no shape is found."""
    v = check_details(img).get("verdict")
    return None if v is None else tuple(v)


def validate_checker(vq=None):
    """Checker accuracy on every (combo, background, jitter) render [and its VQ reconstruction]."""
    ok = tot = ok_vq = 0
    for c in sd.ALL_COMBOS:
        for bg in sd.BACKGROUND_NAMES:
            imgs = [sd.render(*c, bg, j) for j in range(ts.N_JITTER)]
            for im in imgs:
                ok += check_image(im) == c
                tot += 1
            if vq is not None:
                x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
                with torch.no_grad():
                    rec = to_uint8(ts.vq_decode(vq, ts.vq_encode(vq, x)))
                for im in rec:
                    ok_vq += check_image(im) == c
    return ok / tot, (ok_vq / tot if vq is not None else None), tot


def to_uint8(x):
    """(B, 3, 32, 32) in [0, 1] -> list of uint8 (32, 32, 3)."""
    a = (x.clamp(0, 1) * 255.0 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(a)


# ---------------------------------------------------------------------------
# Samplers.

def pad_batch(seqs, fill):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), fill, dtype=torch.long)
    pad = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        pad[i, :len(s)] = True
    return ids, pad


def code_positions(tk, seq_len):
    """Positions of the 64 answer-grid codes in a sequence that ends with an answer image."""
    start = seq_len - (2 + 2 + ts.GRID * (ts.GRID + 1))  # BOA BOI grid EOI EOA
    base = start + 2
    return [base + r * (ts.GRID + 1) + c for r in range(ts.GRID) for c in range(ts.GRID)]


@torch.no_grad()
def sample_images(model, tk, branches, weights, init_codes=None, steps=16, tau=1.0, gen=None):
    """MaskGIT sampling of B answer grids (reference section 3).

    branches: list of lists of prompt-part sequences (each sequence = prompt ids, the
      answer image part is appended here); branches[0] is the conditional one.
    weights: guidance weights; l = l0 + sum_k w_k (l0 - l_k) for k >= 1
      (one guidance s: l = (1+s) l_c - s l_u).
    init_codes: optional (B, 64) long, -1 = masked (inpainting); default all masked.
    Returns (B, 64) codes.
    """
    B = len(branches[0])
    G = ts.GRID * ts.GRID
    codes = torch.full((B, G), -1, dtype=torch.long) if init_codes is None else init_codes.clone()
    N = (codes < 0).sum(1)  # per sequence
    ans_tmpl = [tk.boa] + tk.grid([0] * G) + [tk.eoa]
    seqs, posl = [], []
    for br in branches:
        for p in br:
            s = list(p) + ans_tmpl
            seqs.append(s)
            posl.append(code_positions(tk, len(s)))
    ids0, pad = pad_batch(seqs, tk.eos)
    pos = torch.tensor(posl)  # (nb*B, 64)
    nb = len(branches)
    lo, hi = tk.image_offset, tk.image_offset + tk.codebook_size
    for t in range(steps):
        masked = codes < 0
        if not masked.any():
            break
        ids = ids0.clone()
        cur = torch.where(masked, torch.full_like(codes, tk.mask), codes + lo).repeat(nb, 1)
        ids.scatter_(1, pos, cur)
        logits = model(ids, pad)  # (nb*B, T, V)
        lg = torch.gather(logits, 1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))[..., lo:hi]
        lg = lg.view(nb, B, G, -1).double()
        l = lg[0].clone()
        for k in range(1, nb):
            l = l + weights[k - 1] * (lg[0] - lg[k])
        if tau > 0:
            g = -torch.log(-torch.log(torch.rand(l.shape, generator=gen, dtype=torch.float64).clamp_min(1e-20)))
            samp = (l / tau + g).argmax(-1)
        else:
            samp = l.argmax(-1)
        logp = torch.log_softmax(l, -1).gather(-1, samp[..., None])[..., 0]
        new = torch.where(masked, samp, codes)
        if t == steps - 1:
            codes = new
            break
        keep = torch.floor(N.double() * math.cos(math.pi / 2 * (t + 1) / steps)).long().clamp_min(1)
        g2 = -torch.log(-torch.log(torch.rand(l.shape[:2], generator=gen, dtype=torch.float64).clamp_min(1e-20)))
        score = logp + tau * g2
        score = torch.where(masked, score, torch.full_like(score, float("inf")))
        order = score.argsort(1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(G).expand(B, -1).contiguous())
        remask = (rank < keep[:, None]) & masked
        codes = torch.where(remask, torch.full_like(new, -1), new)
    return codes


@torch.no_grad()
def sample_text(model, tk, prompts, gen_length=ts.ANSWER_LEN, steps=ts.ANSWER_LEN):
    """Low-confidence remasking (reference section 5), one block, temperature 0.
    prompts: list of prompt sequences (ending before BOA). Returns answer id lists."""
    B = len(prompts)
    seqs = [list(p) + [tk.boa] + [tk.mask] * gen_length + [tk.eoa] for p in prompts]
    ids, pad = pad_batch(seqs, tk.eos)
    pos = torch.tensor([[len(p) + 1 + i for i in range(gen_length)] for p in prompts])
    per_step = [gen_length // steps + (1 if i < gen_length % steps else 0) for i in range(steps)]
    for k in per_step:
        cur = torch.gather(ids, 1, pos)
        masked = cur == tk.mask
        if not masked.any():
            break
        logits = model(ids, pad)
        lg = torch.gather(logits, 1, pos[:, :, None].expand(-1, -1, logits.shape[-1])).double()
        x0 = lg.argmax(-1)
        conf = torch.softmax(lg, -1).gather(-1, x0[..., None])[..., 0]
        conf = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
        top = conf.topk(k, dim=1).indices
        sel = torch.zeros_like(masked)
        sel.scatter_(1, top, True)
        sel &= masked
        cur = torch.where(sel, x0, cur)
        ids.scatter_(1, pos, cur)
    out = []
    for row in torch.gather(ids, 1, pos).tolist():
        if tk.eos in row:
            row = row[:row.index(tk.eos)]
        out.append(row)
    return out


# ---------------------------------------------------------------------------
# Evaluations.

def chunks(n, size):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def decode_check(vq, codes):
    with torch.no_grad():
        imgs = to_uint8(ts.vq_decode(vq, codes))
    return [check_image(im) for im in imgs], imgs


def eval_t2i(model, tk, vq, reps, args, gen, rs):
    held = set(sd.heldout_combos())
    items = [c for c in sd.ALL_COMBOS for _ in range(reps)]
    res = []
    uncond = tk.encode(ts.uncond_text(ts.SYS_T2I))
    for sl in chunks(len(items), args.batch):
        part = items[sl]
        cond = [tk.encode(ts.prompt_text(ts.SYS_T2I, sd.caption(*c))) for c in part]
        codes = sample_images(model, tk, [cond, [uncond] * len(part)], [args.cfg], steps=args.steps,
                              tau=args.tau, gen=gen)
        got, imgs = decode_check(vq, codes)
        res += [(c, g) for c, g in zip(part, got)]
        if args.save_images and sl.start == 0:
            save_grid(imgs, os.path.join(args.save_images, "t2i.png"))
    return summarize(res, held)


def summarize(res, held):
    def acc(rows):
        if not rows:
            return None
        return {"n": len(rows),
                "all": sum(g == c for c, g in rows) / len(rows),
                "color": sum(g is not None and g[0] == c[0] for c, g in rows) / len(rows),
                "shape": sum(g is not None and g[1] == c[1] for c, g in rows) / len(rows),
                "position": sum(g is not None and g[2] == c[2] for c, g in rows) / len(rows)}
    return {"train": acc([r for r in res if r[0] not in held]),
            "heldout": acc([r for r in res if r[0] in held]),
            "overall": acc(res)}


def source_codes(vq, combos, rs):
    imgs, meta = [], []
    for c in combos:
        bg = sd.BACKGROUND_NAMES[rs.randint(2)]
        j = int(rs.randint(ts.N_JITTER))
        imgs.append(sd.render(*c, bg, j))
        meta.append((bg, j))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return ts.vq_encode(vq, x), meta


def eval_edit(model, tk, vq, n, args, gen, rs):
    held = set(sd.heldout_combos())
    train = sd.train_combos()
    items = []
    for i in range(n):
        src = train[rs.randint(len(train))]
        kind, val, instr, tgt = sd.random_edit(src, rs, set(train))
        items.append((src, instr, tgt))
    src_codes, _ = source_codes(vq, [s for s, _, _ in items], rs)
    res = []
    for sl in chunks(len(items), args.batch):
        part = items[sl]
        sc = src_codes[sl]
        cond, tun, iun = [], [], []
        for (src, instr, tgt), k in zip(part, sc):
            g = tk.grid(k.tolist())
            p = tk.encode(ts.prompt_text(ts.SYS_EDIT, instr))
            u = tk.encode(ts.uncond_text(ts.SYS_EDIT))
            cond.append(p[:-1] + g + p[-1:])
            tun.append(u[:-1] + g + u[-1:])
            iun.append(p)
        codes = sample_images(model, tk, [cond, tun, iun], [args.edit_cfg_text, args.edit_cfg_img],
                              steps=args.steps, tau=args.tau, gen=gen)
        got, imgs = decode_check(vq, codes)
        res += [(tgt, g) for (src, instr, tgt), g in zip(part, got)]
        if args.save_images and sl.start == 0:
            save_grid(imgs, os.path.join(args.save_images, "edit.png"))
    return summarize(res, held)


def inpaint_mask(mask_h_ratio=1.0, mask_w_ratio=0.5):
    """Centred rectangle of the pixel image mapped to the code grid (area average > 0.5)."""
    H = W = sd.SIZE
    mh, mw = int(round(H * mask_h_ratio)), int(round(W * mask_w_ratio))
    pm = np.zeros((H, W))
    t, l = (H - mh) // 2, (W - mw) // 2
    pm[t:t + mh, l:l + mw] = 1
    f = H // ts.GRID
    cell = pm.reshape(ts.GRID, f, ts.GRID, f).mean((1, 3))
    return torch.from_numpy((cell > 0.5).reshape(-1))


def eval_inpaint(model, tk, vq, n, args, gen, rs):
    held = set(sd.heldout_combos())
    combos = [sd.ALL_COMBOS[rs.randint(len(sd.ALL_COMBOS))] for _ in range(n)]
    codes0, _ = source_codes(vq, combos, rs)
    m = inpaint_mask()
    uncond = tk.encode(ts.uncond_text(ts.SYS_T2I))
    res = []
    for sl in chunks(n, args.batch):
        part = combos[sl]
        init = codes0[sl].clone()
        init[:, m] = -1
        cond = [tk.encode(ts.prompt_text(ts.SYS_T2I, sd.caption(*c))) for c in part]
        codes = sample_images(model, tk, [cond, [uncond] * len(part)], [args.cfg], init_codes=init,
                              steps=args.steps, tau=args.tau, gen=gen)
        got, imgs = decode_check(vq, codes)
        res += [(c, g) for c, g in zip(part, got)]
        if args.save_images and sl.start == 0:
            save_grid(imgs, os.path.join(args.save_images, "inpaint.png"))
    return summarize(res, held)


def eval_und(model, tk, vq, n, args, rs):
    held = set(sd.heldout_combos())
    combos = [sd.ALL_COMBOS[rs.randint(len(sd.ALL_COMBOS))] for _ in range(n)]
    codes0, _ = source_codes(vq, combos, rs)
    p = tk.encode(ts.prompt_text(ts.SYS_UND, sd.QUESTION))
    rows = []
    for sl in chunks(n, args.batch * 2):
        prompts = [p[:-1] + tk.grid(k.tolist()) + p[-1:] for k in codes0[sl]]
        ans = sample_text(model, tk, prompts)
        for c, a in zip(combos[sl], ans):
            text = tk.decode(a)
            rows.append((c, text, sd.parse_caption(text)))

    def acc(rs_):
        if not rs_:
            return None
        return {"n": len(rs_),
                "color_and_shape": sum(g is not None and g[:2] == c[:2] for c, _, g in rs_) / len(rs_),
                "exact_caption": sum(g == c for c, _, g in rs_) / len(rs_),
                "grammatical": sum(g is not None for _, _, g in rs_) / len(rs_)}
    return {"train": acc([r for r in rows if r[0] not in held]),
            "heldout": acc([r for r in rows if r[0] in held]),
            "overall": acc(rows),
            "examples": [r[1] for r in rows[:5]]}


def save_grid(imgs, path):
    try:
        from PIL import Image
    except ImportError:
        return
    imgs = list(imgs[:32])
    while len(imgs) % 8:
        imgs.append(np.zeros_like(imgs[0]))
    rows = [np.concatenate(imgs[i:i + 8], 1) for i in range(0, len(imgs), 8)]
    a = np.concatenate(rows, 0)
    Image.fromarray(a).resize((a.shape[1] * 4, a.shape[0] * 4), Image.NEAREST).save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(os.path.dirname(HERE), "models", "dimoo-small"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tau", type=float, default=0.1)
    # The shipped model's dimoo.json settings.
    ap.add_argument("--cfg", type=float, default=0.5)
    ap.add_argument("--edit-cfg-text", type=float, default=0.0)
    ap.add_argument("--edit-cfg-img", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--t2i-reps", type=int, default=2, help="samples per combination (105 combinations)")
    ap.add_argument("--n-edit", type=int, default=128)
    ap.add_argument("--n-inpaint", type=int, default=128)
    ap.add_argument("--n-und", type=int, default=210)
    ap.add_argument("--tasks", default="checker,t2i,und,edit,inpaint")
    ap.add_argument("--save-images", help="folder for sample grids (PNG)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tasks = a.tasks.split(",")
    if a.save_images:
        os.makedirs(a.save_images, exist_ok=True)
    tk = ts.Tok(a.model)
    vq = ts.load_vq(a.model)
    model = ts.Transformer.from_hf(a.model)
    out = {"settings": {"steps": a.steps, "tau": a.tau, "cfg": a.cfg, "edit_cfg_text": a.edit_cfg_text,
                        "edit_cfg_img": a.edit_cfg_img, "seed": a.seed}}
    for task in tasks:
        t0 = time.time()
        gen = torch.Generator().manual_seed(a.seed)
        rs = np.random.RandomState(a.seed + 100)
        if task == "checker":
            gt, rec, n = validate_checker(vq)
            out["checker"] = {"ground_truth_renders": gt, "vq_reconstructions": rec, "n": n}
        elif task == "t2i":
            out["t2i"] = eval_t2i(model, tk, vq, a.t2i_reps, a, gen, rs)
        elif task == "edit":
            out["edit"] = eval_edit(model, tk, vq, a.n_edit, a, gen, rs)
        elif task == "inpaint":
            out["inpaint"] = eval_inpaint(model, tk, vq, a.n_inpaint, a, gen, rs)
        elif task == "und":
            out["und"] = eval_und(model, tk, vq, a.n_und, a, rs)
        print(task, json.dumps(out.get(task)), f"({time.time() - t0:.0f}s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

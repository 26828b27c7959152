#!/usr/bin/env python3
"""Write the fixtures of internal/shapes (the Go port of the shapes data set and checker).

Usage: /opt/torchenv/bin/python scripts/gen_shapes_testdata.py [--model models/dimoo-small]
                                                                [--out testdata/shapes]

OUT/renders.json + OUT/renders/NN.png
    40 deterministic (combination, background, jitter_seed) picks: the jitter
    triple of shapes_data.jitter, the render of shapes_data.render (lossless
    PNG) and eval_small.check_image's verdict. The Go renderer must reproduce
    each PNG pixel for pixel from the triple.
OUT/jitter.json
    shapes_data.jitter of a few hundred seeds (the Go MT19937 port must agree).
OUT/verdicts.json + OUT/vq/NN.png
    VQ-VAE reconstructions (models/dimoo-small/vqvae, through
    train_small.vq_encode/vq_decode and eval_small.to_uint8, as
    eval_small.validate_checker does) of renders, plus deliberately hard
    images (blurred, noisy, empty, low contrast, tiny, two-tone with a tied
    border, two shapes). Each entry holds check_image's verdict (null for
    None) and the checker's intermediate values (repr floats, exact), so the
    Go checker can be held to bit-identical arithmetic, not only to equal
    verdicts. The images are C-contiguous arrays (re-read from the PNGs):
    numpy's matmul takes another BLAS path, with other last-bit roundings,
    on the channel-planar views that eval_small.to_uint8 returns.

Everything is deterministic (fixed seeds; the VQ-VAE runs on the CPU in
float32 and only its uint8 output is stored, then re-read from the PNG).
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import eval_small as es  # noqa: E402
import shapes_data as sd  # noqa: E402
import train_small as ts  # noqa: E402


def verdict(img):
    v = es.check_image(img)
    return None if v is None else list(v)


def save_png(img, path):
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), "RGB").save(path, optimize=True)


def load_png(path):
    return np.array(Image.open(path).convert("RGB"), dtype=np.uint8)


def box_blur(img, r=1):
    x = img.astype(np.float64)
    p = np.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    acc = np.zeros_like(x)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            acc += p[dy:dy + x.shape[0], dx:dx + x.shape[1]]
    return np.clip(np.round(acc / (2 * r + 1) ** 2), 0, 255).astype(np.uint8)


def noisy(img, rs, sigma):
    return np.clip(img.astype(np.float64) + rs.randn(*img.shape) * sigma, 0, 255).round().astype(np.uint8)


def hard_images(rs):
    """(name, image, expected combo or None) of images that stress the checker."""
    out = []
    S = sd.SIZE
    out.append(("blur3 red circle center gray", box_blur(sd.render("red", "circle", "center", "gray", 5)),
                ("red", "circle", "center")))
    out.append(("blur5 green square top left", box_blur(sd.render("green", "square", "top left", "black", 7), 2),
                ("green", "square", "top left")))
    out.append(("noise20 blue triangle bottom right",
                noisy(sd.render("blue", "triangle", "bottom right", "black", 3), rs, 20.0),
                ("blue", "triangle", "bottom right")))
    out.append(("noise40 orange circle top right gray",
                noisy(sd.render("orange", "circle", "top right", "gray", 11), rs, 40.0),
                ("orange", "circle", "top right")))
    out.append(("empty black", np.zeros((S, S, 3), np.uint8), None))
    out.append(("empty gray", np.full((S, S, 3), 120, np.uint8), None))
    out.append(("noise only gray", noisy(np.full((S, S, 3), 120, np.uint8), rs, 15.0), None))
    # Two-tone: left half one background, right half the other; the border
    # counts tie (62 each), so np.unique's smallest key (black) must win, even
    # when the first border pixel is gray.
    tt = np.zeros((S, S, 3), np.uint8)
    tt[:, S // 2:] = 120
    out.append(("two-tone black|gray", tt, None))
    out.append(("two-tone gray|black", tt[:, ::-1].copy(), None))
    tt2 = tt.copy()
    tt2[sd.shape_mask("circle", "top left", 4)] = sd.COLORS["yellow"]
    out.append(("two-tone black|gray + yellow circle", tt2, None))
    # Low contrast: a shape closer than 60 to the background is no shape.
    lc = sd.render("white", "square", "center", "gray", 2).copy()
    lc[lc[..., 0] == 245] = (150, 150, 150)
    out.append(("low contrast square", lc, None))
    tiny = np.zeros((S, S, 3), np.uint8)
    tiny[10:13, 20:23] = sd.COLORS["white"]
    out.append(("tiny 3x3 white", tiny, None))
    # Two shapes of different colours.
    two = sd.render("red", "square", "top left", "black", 1).copy()
    two[sd.shape_mask("circle", "bottom right", 9)] = sd.COLORS["blue"]
    out.append(("red square + blue circle", two, None))
    # A half-intensity ring around a square (soft coverage below/above 0.5).
    soft = sd.render("purple", "square", "bottom left", "black", 0).astype(np.float64)
    m = sd.shape_mask("square", "bottom left", 0)
    grown = m.copy()
    grown[1:] |= m[:-1]
    grown[:-1] |= m[1:]
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    soft[grown & ~m] = np.array(sd.COLORS["purple"]) * 0.45
    out.append(("purple square with soft ring", soft.round().astype(np.uint8), ("purple", "square", "bottom left")))
    # Far pixels in opposite directions cancel in the mean: few (or no) pixels
    # keep a coverage above 0.5, so the core is too small.
    opp = np.full((S, S, 3), 120, np.uint8)
    opp[4:9, 4:14] = (190, 120, 120)
    opp[20:25, 4:14] = (50, 120, 120)
    out.append(("opposite pixels cancel (fg = 0)", opp.copy(), None))
    opp[12:13, 20:31] = (120, 190, 120)
    out.append(("opposite pixels + 11 green (small core)", opp, None))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(HERE)
    ap.add_argument("--model", default=os.path.join(root, "models", "dimoo-small"))
    ap.add_argument("--out", default=os.path.join(root, "testdata", "shapes"))
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if os.path.isdir(a.out):
        shutil.rmtree(a.out)
    os.makedirs(os.path.join(a.out, "renders"))
    os.makedirs(os.path.join(a.out, "vq"))

    # (a) Renders: pixel-exact references for the Go renderer.
    rs = np.random.RandomState(20240)
    renders = []
    for i in range(40):
        c = sd.ALL_COMBOS[rs.randint(len(sd.ALL_COMBOS))]
        bg = sd.BACKGROUND_NAMES[rs.randint(2)]
        # Small seeds (the training range) and arbitrary 32-bit ones.
        js = int(rs.randint(ts.N_JITTER)) if i % 2 == 0 else int(rs.randint(0, 2 ** 32, dtype=np.uint64))
        img = sd.render(*c, bg, js)
        name = f"renders/{i:02d}.png"
        save_png(img, os.path.join(a.out, name))
        assert np.array_equal(load_png(os.path.join(a.out, name)), img)
        size, dy, dx = sd.jitter(js)
        renders.append({"file": name, "color": c[0], "shape": c[1], "position": c[2], "background": bg,
                        "jitter_seed": js, "size": size, "dy": dy, "dx": dx, "verdict": verdict(img)})
    with open(os.path.join(a.out, "renders.json"), "w") as f:
        json.dump({"description": "shapes_data.render of (combo, background, jitter_seed) with its jitter "
                                  "triple and eval_small.check_image's verdict; generated by "
                                  "scripts/gen_shapes_testdata.py", "renders": renders}, f, indent=1)
        f.write("\n")

    seeds = list(range(300)) + [int(s) for s in rs.randint(0, 2 ** 32, size=60, dtype=np.uint64)]
    with open(os.path.join(a.out, "jitter.json"), "w") as f:
        json.dump({"description": "shapes_data.jitter(seed) -> [size, dy, dx]",
                   "jitter": [[s, *sd.jitter(s)] for s in seeds]}, f)
        f.write("\n")

    # (b) VQ-VAE reconstructions and hard images, with the Python checker's verdicts.
    vq = ts.load_vq(a.model)
    items = []  # (source description, uint8 image, expected combo or None)
    picks = np.random.RandomState(7)
    for i in range(46):
        c = sd.ALL_COMBOS[(i * 37 + int(picks.randint(5))) % len(sd.ALL_COMBOS)]
        bg = sd.BACKGROUND_NAMES[i % 2]
        js = int(picks.randint(ts.N_JITTER))
        items.append((f"vq render {sd.caption(*c)} on {bg} jitter {js}", sd.render(*c, bg, js), c, True))
    for name, img, exp in hard_images(np.random.RandomState(11)):
        items.append((name, img, exp, False))
    # A few hard images through the VQ-VAE too.
    for name, img, exp in hard_images(np.random.RandomState(12))[:4]:
        items.append(("vq " + name, img, exp, True))

    to_vq = [i for i, it in enumerate(items) if it[3]]
    x = torch.from_numpy(np.stack([items[i][1] for i in to_vq])).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        rec = es.to_uint8(ts.vq_decode(vq, ts.vq_encode(vq, x)))
    imgs = [it[1] for it in items]
    for k, i in enumerate(to_vq):
        imgs[i] = rec[k]

    fixtures = []
    agree = 0
    for i, ((desc, _, exp, _), img) in enumerate(zip(items, imgs)):
        name = f"vq/{i:02d}.png"
        path = os.path.join(a.out, name)
        save_png(img, path)
        back = load_png(path)
        assert np.array_equal(back, img)
        det = es.check_details(back)
        v = det.pop("verdict", None)
        # eval_small hands check_image the channel-planar views of to_uint8;
        # numpy's BLAS path (and so the last bits of the coverage) differs from
        # the contiguous re-read, but the verdict must not.
        assert verdict(img) == v, desc
        agree += exp is not None and v == list(exp)
        fixtures.append({"file": name, "source": desc, "intended": None if exp is None else list(exp),
                         "verdict": v, "details": det})
    with open(os.path.join(a.out, "verdicts.json"), "w") as f:
        json.dump({"description": "eval_small.check_image verdicts (null = None) of VQ-VAE reconstructions "
                                  "and hard images, with the checker's intermediates (repr floats); "
                                  "generated by scripts/gen_shapes_testdata.py",
                   "fixtures": fixtures}, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(a.out) for fn in fns)
    nv = sum(f["verdict"] is None for f in fixtures)
    print(f"wrote {a.out}: {len(renders)} renders, {len(fixtures)} checker fixtures "
          f"({nv} None, {agree} with the intended verdict), {total} bytes")


if __name__ == "__main__":
    main()

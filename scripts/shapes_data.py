#!/usr/bin/env python3
"""Procedural "shapes" data set for the small DiMOO (numpy only, deterministic).

A 32x32 RGB image holds one shape (circle, square or triangle) of one colour on
a plain black or gray background, in one of five positions (the centre of a
quadrant, or the image centre). Its caption is exactly

    a {color} {shape} at the {position}

Everything is a pure function of its arguments: render() of (color, shape,
position, background, jitter_seed), the held-out combination list of a seed,
and the edit instructions of a numpy RandomState.

Usage:
    shapes_data.py --heldout-json models/dimoo-small/heldout.json   # write the held-out list
    shapes_data.py --preview /tmp/train/preview.png                  # a contact sheet (needs PIL)
"""

import argparse
import itertools
import json

import numpy as np

SIZE = 32

COLORS = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 225, 30),
    "purple": (150, 40, 200),
    "orange": (250, 135, 20),
    "white": (245, 245, 245),
}
SHAPES = ["circle", "square", "triangle"]
POSITIONS = ["top left", "top right", "bottom left", "bottom right", "center"]
BACKGROUNDS = {"black": (0, 0, 0), "gray": (120, 120, 120)}

COLOR_NAMES = list(COLORS)
BACKGROUND_NAMES = list(BACKGROUNDS)

# Centre (row, col) of each position, in pixel units (pixel i spans [i, i+1)).
CENTERS = {
    "top left": (8.0, 8.0),
    "top right": (8.0, 24.0),
    "bottom left": (24.0, 8.0),
    "bottom right": (24.0, 24.0),
    "center": (16.0, 16.0),
}

ALL_COMBOS = list(itertools.product(COLOR_NAMES, SHAPES, POSITIONS))  # 105

HELDOUT_SEED = 1234
HELDOUT_COUNT = 16  # 16/105 = 15.2%

# Task prompts (the small model's grammar).
QUESTION = "What is in the image?"


def caption(color, shape, position):
    return f"a {color} {shape} at the {position}"


def parse_caption(text):
    """Inverse of caption(); returns (color, shape, position) or None."""
    t = text.strip()
    for c, s, p in ALL_COMBOS:
        if t == caption(c, s, p):
            return c, s, p
    return None


def jitter(jitter_seed):
    """Shape size (10..12 px) and offset (-1..1 px each axis) of a jitter seed."""
    rs = np.random.RandomState(int(jitter_seed) % (2 ** 32))
    size = int(rs.randint(10, 13))
    dy = int(rs.randint(-1, 2))
    dx = int(rs.randint(-1, 2))
    return size, dy, dx


def shape_mask(shape, position, jitter_seed, size=SIZE):
    """Boolean (size, size) mask of the shape's pixels."""
    s, dy, dx = jitter(jitter_seed)
    cy, cx = CENTERS[position]
    cy, cx = cy + dy, cx + dx
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    top, left = cy - s / 2.0, cx - s / 2.0
    if shape == "square":
        m = (yy >= top) & (yy < top + s) & (xx >= left) & (xx < left + s)
    elif shape == "circle":
        r = s / 2.0
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "triangle":
        # Apex up, base at the bottom: half-width grows linearly down the rows.
        frac = (yy - top) / s
        half = frac * s / 2.0
        m = (yy >= top) & (yy < top + s) & (np.abs(xx - cx) <= half)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def render(color, shape, position, background="black", jitter_seed=0):
    """uint8 (32, 32, 3) image of one shape on a plain background."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = np.array(BACKGROUNDS[background], dtype=np.uint8)
    m = shape_mask(shape, position, jitter_seed)
    img[m] = np.array(COLORS[color], dtype=np.uint8)
    return img


def heldout_combos(seed=HELDOUT_SEED, count=HELDOUT_COUNT):
    """The fixed held-out (color, shape, position) combinations of a seed.

    Drawn without replacement by a seeded permutation, skipping any draw that
    would remove the last training example of a (color, shape), (color,
    position) or (shape, position) pair, so every attribute pair stays seen.
    """
    rs = np.random.RandomState(seed)
    order = rs.permutation(len(ALL_COMBOS))
    chosen = []
    held = set()

    def pair_left(combo):
        c, s, p = combo
        rest = [x for x in ALL_COMBOS if x not in held and x != combo]
        return (any(x[0] == c and x[1] == s for x in rest)
                and any(x[0] == c and x[2] == p for x in rest)
                and any(x[1] == s and x[2] == p for x in rest))

    for i in order:
        combo = ALL_COMBOS[i]
        if pair_left(combo):
            chosen.append(combo)
            held.add(combo)
        if len(chosen) == count:
            break
    return sorted(chosen, key=ALL_COMBOS.index)


def train_combos(seed=HELDOUT_SEED):
    held = set(heldout_combos(seed))
    return [c for c in ALL_COMBOS if c not in held]


# ---------------------------------------------------------------------------
# Editing.

EDIT_KINDS = ["color", "position", "shape"]


def edit_instruction(kind, value):
    if kind == "color":
        return f"change the color to {value}"
    if kind == "position":
        return f"move it to the {value}"
    if kind == "shape":
        return f"make it a {value}"
    raise ValueError(kind)


def apply_edit(combo, kind, value):
    c, s, p = combo
    if kind == "color":
        return (value, s, p)
    if kind == "shape":
        return (c, value, p)
    return (c, s, value)


def random_edit(combo, rs, allowed=None):
    """Pick an edit of combo with a RandomState: (kind, value, instruction, target).

    allowed: optional set of target combos; edits leading elsewhere are not drawn.
    Returns None when no edit is allowed.
    """
    c, s, p = combo
    options = []
    for kind, vals, cur in (("color", COLOR_NAMES, c), ("shape", SHAPES, s), ("position", POSITIONS, p)):
        for v in vals:
            if v == cur:
                continue
            tgt = apply_edit(combo, kind, v)
            if allowed is None or tgt in allowed:
                options.append((kind, v, tgt))
    if not options:
        return None
    # Choose the kind first (uniformly over the kinds that have options), then a value.
    kinds = sorted({o[0] for o in options}, key=EDIT_KINDS.index)
    kind = kinds[rs.randint(len(kinds))]
    opts = [o for o in options if o[0] == kind]
    kind, v, tgt = opts[rs.randint(len(opts))]
    return kind, v, edit_instruction(kind, v), tgt


# ---------------------------------------------------------------------------
# Text corpus (for the tokenizer).

def text_corpus():
    """Every string the small model sees as text, in a fixed order."""
    out = []
    for c, s, p in ALL_COMBOS:
        out.append(caption(c, s, p))
    for c in COLOR_NAMES:
        out.append(edit_instruction("color", c))
    for p in POSITIONS:
        out.append(edit_instruction("position", p))
    for s in SHAPES:
        out.append(edit_instruction("shape", s))
    out.append(QUESTION)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout-json", help="write the held-out combination list here")
    ap.add_argument("--seed", type=int, default=HELDOUT_SEED)
    ap.add_argument("--preview", help="write a PNG contact sheet of renders")
    a = ap.parse_args()
    held = heldout_combos(a.seed)
    if a.heldout_json:
        doc = {
            "description": "(color, shape, position) combinations never seen in training "
                           "(no caption, edit source/target or understanding example uses them)",
            "seed": a.seed,
            "count": len(held),
            "total_combinations": len(ALL_COMBOS),
            "fraction": round(len(held) / len(ALL_COMBOS), 4),
            "combinations": [{"color": c, "shape": s, "position": p, "caption": caption(c, s, p)}
                             for c, s, p in held],
        }
        with open(a.heldout_json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"wrote {a.heldout_json}: {len(held)} held-out combinations")
    if a.preview:
        from PIL import Image
        tiles = []
        for i, (c, s, p) in enumerate(ALL_COMBOS):
            tiles.append(render(c, s, p, BACKGROUND_NAMES[i % 2], i))
        rows = [np.concatenate(tiles[r * 15:(r + 1) * 15], axis=1) for r in range(7)]
        Image.fromarray(np.concatenate(rows, axis=0)).resize((15 * 96, 7 * 96), Image.NEAREST).save(a.preview)
        print("wrote", a.preview)
    if not (a.heldout_json or a.preview):
        for c, s, p in held:
            print(caption(c, s, p))


if __name__ == "__main__":
    main()

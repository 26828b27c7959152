#!/usr/bin/env python3
"""Replays dimoo's sampler decisions with an independent PyTorch statement of
the samplers (reference sections 3 and 5), fed the same counter-based noise.

Input: a trace written by the Go test (DIMOO_WRITE_SAMPLER_TRACE=1 go test
-run SamplerReplay ./dimoo): per step, the branch logits at the positions
being decoded and dimoo's decisions. For every step this script recomputes
guidance, the Gumbel-max draws, the confidences and the keep-masked (image)
or unmask (text) choice, and writes its own decisions. It exits non-zero if
any step differs from dimoo's, so regenerating the golden doubles as a check.

Usage: sampler_reference.py TRACE.json OUT_DECISIONS.json
"""
import json
import math
import sys

import numpy as np
import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF

PURPOSE_IMAGE_SAMPLE, PURPOSE_IMAGE_REMASK, PURPOSE_TEXT_SAMPLE = 1, 2, 3


def philox(c0, c1, c2, c3, seed):
    """Philox4x32-10, vectorised over numpy uint64 arrays; returns the four words."""
    c = [np.asarray(x, dtype=np.uint64) & MASK32 for x in (c0, c1, c2, c3)]
    c = np.broadcast_arrays(*c)
    c = [x.copy() for x in c]
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        p0 = np.uint64(M0) * c[0]
        p1 = np.uint64(M1) * c[2]
        c = [
            ((p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0)) & np.uint64(MASK32),
            p1 & np.uint64(MASK32),
            ((p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1)) & np.uint64(MASK32),
            p0 & np.uint64(MASK32),
        ]
        k0 = (k0 + W0) & MASK32
        k1 = (k1 + W1) & MASK32
    return c


def gumbel(seed, step, pos, purpose, index):
    # One Philox block serves four consecutive indices: word index & 3 of the
    # block at counter (pos, index >> 2, step, purpose).
    index = np.asarray(index, dtype=np.uint64)
    words = philox(pos, index >> np.uint64(2), step, purpose, seed)
    w = np.choose((index & np.uint64(3)).astype(np.int64), words)
    u = (w.astype(np.float64) + 0.5) / 4294967296.0
    return torch.from_numpy(np.atleast_1d(-np.log(-np.log(u))))


def replay_image(tr):
    tau, seed = tr["temperature"], tr["seed"]
    w = torch.tensor(tr["weights"], dtype=torch.float32)
    out, bad = [], 0
    for st in tr["steps"]:
        step, C = st["step"], tr["codebook"]
        branches = [torch.tensor(b, dtype=torch.float32).view(-1, C) for b in st["logits"]]
        guided = sum(w[i] * branches[i] for i in range(len(branches)))  # float32, as dimoo
        n = guided.shape[0]
        sampled, conf = [], []
        for i in range(n):
            row = guided[i].double()
            pos = st["rng_pos"][i]
            score = row / tau + gumbel(seed, step, pos, PURPOSE_IMAGE_SAMPLE, np.arange(C)) if tau > 0 else row
            best = int(torch.argmax(score))
            p = torch.softmax(row, dim=0)[best].item()
            c = math.log(max(p, 1e-20))
            if tau > 0:
                c += tau * float(gumbel(seed, step, pos, PURPOSE_IMAGE_REMASK, 0)[0])
            sampled.append(best)
            conf.append(c)
        keep = st["keep"]
        masked = st["masked"]
        if keep >= n:
            remasked = list(masked)
        else:
            order = sorted(range(n), key=lambda i: (conf[i], i))  # stable: earlier first on ties
            remasked = sorted(masked[i] for i in order[:keep])
        same = sampled == st["sampled"] and remasked == st["remasked"]
        bad += not same
        out.append({"step": step, "sampled": sampled, "remasked": remasked, "same": same})
    return out, bad


def replay_text(tr):
    tau, seed, cfg = tr["temperature"], tr["seed"], tr["cfg_scale"]
    out, bad = [], 0
    for st in tr["steps"]:
        step, pos = st["step"], st["positions"]
        n = len(pos)
        branches = [torch.tensor(b, dtype=torch.float32).view(n, -1).double() for b in st["logits"]]
        logits = branches[0]
        if cfg > 0:
            un = branches[1]
            logits = un + (cfg + 1) * (logits - un)
        V = logits.shape[1]
        chosen, conf = [], []
        for i in range(n):
            row = logits[i]
            score = row + tau * gumbel(seed, step, pos[i], PURPOSE_TEXT_SAMPLE, np.arange(V)) if tau > 0 else row
            best = int(torch.argmax(score))
            chosen.append(best)
            conf.append(torch.softmax(row, dim=0)[best].item())
        k = st["count"]
        order = sorted(range(n), key=lambda i: (-conf[i], i))
        transferred = sorted(pos[i] for i in order[:k])
        same = chosen == st["chosen"] and transferred == st["transferred"]
        bad += not same
        out.append({"step": step, "chosen": chosen, "transferred": transferred, "same": same})
    return out, bad


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    traces = json.load(open(sys.argv[1]))
    result, total_bad = {}, 0
    for name, tr in traces.items():
        fn = replay_image if tr["kind"] == "image" else replay_text
        steps, bad = fn(tr)
        result[name] = steps
        total_bad += bad
        print(f"{name}: {len(steps)} steps, {len(steps) - bad} identical to dimoo")
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
    sys.exit(1 if total_bad else 0)


if __name__ == "__main__":
    main()

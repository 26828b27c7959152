#!/usr/bin/env python3
"""Write a small random LLaDA/DiMOO checkpoint in the Hugging Face layout.

Output directory contents:
  config.json
  model-0000K-of-0000N.safetensors + model.safetensors.index.json   (default)
  model.safetensors                                                  (--single-file)

Tensor names and shapes follow the LLaDA "llama" block (weights stored as
(out_features, in_features)). Initialisation is deterministic for a given
--seed: matrices ~ N(0, 1/fan_in), norm weights 1 + 0.1*N(0,1), embeddings
N(0, 1).
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def build_config(a):
    return {
        "d_model": a.d_model,
        "n_heads": a.heads,
        "n_kv_heads": a.kv_heads,
        "n_layers": a.layers,
        "mlp_hidden_size": a.mlp,
        "mlp_ratio": 4,
        "vocab_size": a.vocab,
        "embedding_size": a.embedding_size,
        "rope": True,
        "rope_theta": float(a.rope_theta),
        "rope_full_precision": True,
        "max_sequence_length": 4096,
        "layer_norm_type": "rms",
        "rms_norm_eps": 1e-05,
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
        "mask_token_id": a.mask_token_id,
        "eos_token_id": a.eos_token_id,
        "pad_token_id": a.eos_token_id,
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "torch_dtype": a.dtype,
    }


def build_tensors(a):
    """Return an ordered list of (name, float32 tensor), generated in a fixed order."""
    g = torch.Generator().manual_seed(a.seed)
    d = a.d_model
    hd = d // a.heads
    kv = a.kv_heads * hd
    out = []

    def mat(rows, cols):
        return torch.randn(rows, cols, generator=g, dtype=torch.float32) / (cols ** 0.5)

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float32)

    p = "model.transformer."
    out.append((p + "wte.weight", torch.randn(a.embedding_size, d, generator=g, dtype=torch.float32)))
    for i in range(a.layers):
        b = f"{p}blocks.{i}."
        out.append((b + "attn_norm.weight", norm(d)))
        out.append((b + "q_proj.weight", mat(d, d)))
        out.append((b + "k_proj.weight", mat(kv, d)))
        out.append((b + "v_proj.weight", mat(kv, d)))
        out.append((b + "attn_out.weight", mat(d, d)))
        out.append((b + "ff_norm.weight", norm(d)))
        out.append((b + "ff_proj.weight", mat(a.mlp, d)))
        out.append((b + "up_proj.weight", mat(a.mlp, d)))
        out.append((b + "ff_out.weight", mat(d, a.mlp)))
    out.append((p + "ln_f.weight", norm(d)))
    out.append((p + "ff_out.weight", mat(a.embedding_size, d)))
    return out


def split_shards(names, sizes, n):
    """Split the (sorted) names into n contiguous, non-empty groups of about equal bytes."""
    n = max(1, min(n, len(names)))
    total = sum(sizes[k] for k in names)
    target = total / n
    groups = [[]]
    acc = 0
    for idx, k in enumerate(names):
        remaining_names = len(names) - idx
        remaining_groups = n - len(groups)
        must_split = remaining_names <= remaining_groups  # keep later shards non-empty
        if groups[-1] and remaining_groups > 0 and (acc + sizes[k] > target * len(groups) or must_split):
            groups.append([])
        groups[-1].append(k)
        acc += sizes[k]
    return groups


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--mlp", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--embedding-size", type=int, default=None, help="default: --vocab")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--single-file", action="store_true", help="write model.safetensors without an index")
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--mask-token-id", type=int, default=None, help="default: vocab-2")
    ap.add_argument("--eos-token-id", type=int, default=None, help="default: vocab-1")
    a = ap.parse_args()

    if a.kv_heads is None:
        a.kv_heads = a.heads
    if a.embedding_size is None:
        a.embedding_size = a.vocab
    if a.d_model % a.heads or (a.d_model // a.heads) % 2:
        sys.exit("d_model must be divisible by heads, with an even head dim")
    if a.heads % a.kv_heads:
        sys.exit("heads must be a multiple of kv-heads")
    if a.embedding_size < a.vocab:
        sys.exit("embedding-size must be >= vocab")
    if a.mask_token_id is None:
        a.mask_token_id = a.vocab - 2
    if a.eos_token_id is None:
        a.eos_token_id = a.vocab - 1

    os.makedirs(a.out, exist_ok=True)
    # Remove stale weight files from an earlier run with a different layout.
    for f in os.listdir(a.out):
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(a.out, f))

    dt = DTYPES[a.dtype]
    tensors = {k: v.to(dt).contiguous() for k, v in build_tensors(a)}
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    names = sorted(tensors)

    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(build_config(a), f, indent=1)
        f.write("\n")

    meta = {"format": "pt"}
    if a.single_file:
        save_file({k: tensors[k] for k in names}, os.path.join(a.out, "model.safetensors"), metadata=meta)
        files = ["model.safetensors"]
    else:
        groups = split_shards(names, sizes, a.shards)
        n = len(groups)
        weight_map = {}
        files = []
        for i, grp in enumerate(groups):
            fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file({k: tensors[k] for k in grp}, os.path.join(a.out, fn), metadata=meta)
            files.append(fn)
            for k in grp:
                weight_map[k] = fn
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {k: weight_map[k] for k in names},
        }
        with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)
            f.write("\n")
    print(f"wrote {a.out}: {len(names)} tensors, {sum(sizes.values())} bytes, {a.dtype}, files {files}")


if __name__ == "__main__":
    main()

"""Where the training gradient of a run's checkpoint goes: the CE gradient's norm on a few
training sequences, and each part of the model's share of its square (embedding, each layer's
norm weights, attention, MLP, the final norm). A removal whose logged ``grad_norm`` jumps (clipped
to ``--grad-clip`` before AdamW, so the rest of the model learns less on those steps) shows here
which part carries it.

    python bench/grad_share.py runs/smol-live6/checkpoints/last.pt \
        --data ../shared/data/corpus/train.jsonl --sequences 8
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from noln.arch import install
from noln.data import load_blocks, separator_id
from noln.loading import load_model


def part(name: str) -> str:
    """A parameter's part: ``embed``, ``final``, ``head`` or ``L{i} norm|attn|mlp``."""
    if "embed" in name or name.endswith("wte.weight") or name.endswith("wpe.weight"):
        return "embed"
    m = re.search(r"\.(?:layers|h)\.(\d+)\.(.*)", name)
    if m is None:
        return "head" if "lm_head" in name else "final"
    rest = m.group(2)
    kind = "norm" if ("norm" in rest or re.search(r"\bln_", rest)) else \
        "attn" if ("attn" in rest or "attention" in rest) else "mlp"
    return f"L{m.group(1)} {kind}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a run folder, a checkpoint file, or any model noln loads")
    ap.add_argument("--data", required=True)
    ap.add_argument("--sequences", type=int, default=8, help="sequences, two per backward pass")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()

    model, tok = load_model(args.model)
    install(model, eot_id=separator_id(tok))  # the FakeNorms as saved, or live ones
    blocks = load_blocks(args.data, tok, args.ctx, max_tokens=args.sequences * args.ctx)
    model.train()
    total_share: dict[str, float] = defaultdict(float)
    print("| sequences | CE | gradient norm | largest parts (share of the squared norm) |")
    print("| --- | ---: | ---: | --- |")
    for b in range(0, args.sequences, 2):
        x = torch.from_numpy(np.asarray(blocks[b : b + 2], np.int64))
        model.zero_grad()
        logits = model(input_ids=x).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
        ce.backward()
        sq: dict[str, float] = defaultdict(float)
        for name, p in model.named_parameters():
            if p.grad is not None:
                sq[part(name)] += p.grad.float().pow(2).sum().item()
        norm2 = sum(sq.values())
        for k, v in sq.items():
            total_share[k] += v / norm2
        top = sorted(sq.items(), key=lambda kv: -kv[1])[: args.top]
        print(f"| {b}-{b + 1} | {ce.item():.3f} | {norm2 ** 0.5:.1f} | "
              + ", ".join(f"{k} {v / norm2:.0%}" for k, v in top) + " |", flush=True)
    n = (args.sequences + 1) // 2
    top = sorted(total_share.items(), key=lambda kv: -kv[1])[: args.top]
    print("\nmean share over the passes: " + ", ".join(f"{k} {v / n:.0%}" for k, v in top))


if __name__ == "__main__":
    main()

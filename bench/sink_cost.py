"""What taking the attention-sink circuit away costs a model before any fine-tuning.

For each variant ``K:F`` the ``K`` neurons per block that write the most into position 0
(``noln.sinks.sink_neurons``, found on the first 8 held-out blocks, as a run finds them) write
``F`` times their output (``F`` = 0: pruned, what ``--prune-sinks K`` does before the first
step; ``0 < F < 1``: a point of ``--prune-fade``). Reported: held-out CE (bf16 autocast where
the CPU has native bf16) and the largest ratio over layers of position 0's residual norm to the
median of the other tokens', the massive activation the circuit builds.

    python bench/sink_cost.py ~/.cache/noln/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data ../shared/data/corpus/val.jsonl --variants 16:0 4:0 2:0 16:0.1 4:0.1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from noln.data import load_blocks
from noln.precision import autocast, resolve_precision
from noln.pretrained import load_pretrained, load_tokenizer
from noln.sinks import scale_neurons, sink_neurons


@torch.no_grad()
def held_out_ce(model: torch.nn.Module, blocks: torch.Tensor, precision: str) -> float:
    total = 0.0
    for i in range(0, len(blocks), 8):
        x = blocks[i:i + 8]
        with autocast(precision, torch.device("cpu")):
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    return total / (len(blocks) * (blocks.shape[1] - 1))


@torch.no_grad()
def position_0_ratio(model: torch.nn.Module, probe: torch.Tensor) -> float:
    hidden = model(input_ids=probe, use_cache=False, output_hidden_states=True).hidden_states
    ratios = []
    for h in hidden[1:]:
        norms = h.float().norm(dim=-1)
        ratios.append((norms[:, 0] / norms[:, 1:].median(dim=1).values).mean().item())
    return max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="held-out text (.jsonl)")
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=["16:0", "4:0", "2:0", "16:0.1"],
                        help="K:F, K neurons per block writing F of their output")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    precision = resolve_precision("auto", torch.device("cpu"))
    tokenizer = load_tokenizer(args.model)
    blocks = torch.from_numpy(np.asarray(
        load_blocks(args.data, tokenizer, args.ctx, args.tokens), np.int64))
    probe = blocks[:8]
    original = load_pretrained(args.model).eval()
    rows = [{"variant": "original", "ce": held_out_ce(original, blocks, precision),
             "position_0_ratio": position_0_ratio(original, probe)}]
    found = {k: sink_neurons(original, probe, k) for k in
             {int(v.split(":")[0]) for v in args.variants}}
    for variant in args.variants:
        k, factor = int(variant.split(":")[0]), float(variant.split(":")[1])
        model = load_pretrained(args.model).eval()
        scale_neurons(model, found[k], factor)
        t0 = time.perf_counter()
        rows.append({"variant": variant, "neurons": sum(map(len, found[k].values())),
                     "ce": held_out_ce(model, blocks, precision),
                     "position_0_ratio": position_0_ratio(model, probe),
                     "seconds": round(time.perf_counter() - t0, 1)})
    print(f"{len(blocks)} x {args.ctx} held-out tokens, {precision}")
    print("| K neurons per block : factor | CE | +CE | position 0 / others |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['variant']} | {row['ce']:.4f} | {row['ce'] - rows[0]['ce']:+.3f} | "
              f"{row['position_0_ratio']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "data": args.data, "tokens": int(blocks.numel()),
                       "precision": precision, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

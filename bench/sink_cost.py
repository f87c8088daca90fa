"""What taking the attention-sink circuit away costs a model before any fine-tuning.

For each variant ``K:F`` the ``K`` neurons per block that write the most into position 0
(``noln.sinks.sink_neurons``, found on the first 8 held-out blocks, as a run finds them) write
``F`` times their output (``F`` = 0: pruned, what ``--prune-sinks K`` does before the first
step; ``0 < F < 1``: a point of ``--prune-fade``); ``K:F@B1,B2`` does so in blocks B1, B2 only
(``prune_blocks=[B1,B2]``). Reported: held-out CE (bf16 autocast where the CPU has native bf16)
and the largest ratio over layers of position 0's residual norm to the median of the other
tokens', the massive activation the circuit builds; ``--per-layer`` prints the ratio after
each block too, which shows the block that writes it (where it jumps).

    python bench/sink_cost.py ~/.cache/noln/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data ../shared/data/corpus/val.jsonl --variants 16:0 4:0 2:0 16:0.1 16:0@11 --per-layer
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
def position_0_ratios(model: torch.nn.Module, probe: torch.Tensor) -> list[float]:
    """After each block: position 0's residual norm over the median of the other tokens',
    averaged over the probe's sequences."""
    hidden = model(input_ids=probe, use_cache=False, output_hidden_states=True).hidden_states
    ratios = []
    for h in hidden[1:]:
        norms = h.float().norm(dim=-1)
        ratios.append((norms[:, 0] / norms[:, 1:].median(dim=1).values).mean().item())
    return ratios


def parse_variant(variant: str) -> tuple[int, float, list[int] | None]:
    """``K:F`` or ``K:F@B1,B2`` -> (K, F, the blocks or None for all)."""
    spec, _, where = variant.partition("@")
    k, factor = spec.split(":")
    return int(k), float(factor), [int(b) for b in where.split(",")] if where else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="held-out text (.jsonl)")
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=["16:0", "4:0", "2:0", "16:0.1"],
                        help="K:F, K neurons per block writing F of their output; K:F@B1,B2 "
                             "in those blocks only")
    parser.add_argument("--per-layer", action="store_true",
                        help="print position 0's ratio after each block for each variant")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    precision = resolve_precision("auto", torch.device("cpu"))
    tokenizer = load_tokenizer(args.model)
    blocks = torch.from_numpy(np.asarray(
        load_blocks(args.data, tokenizer, args.ctx, args.tokens), np.int64))
    probe = blocks[:8]
    original = load_pretrained(args.model).eval()
    ratios = position_0_ratios(original, probe)
    rows = [{"variant": "original", "ce": held_out_ce(original, blocks, precision),
             "position_0_ratio": max(ratios), "position_0_ratios": ratios}]
    for variant in args.variants:
        k, factor, where = parse_variant(variant)
        neurons = sink_neurons(original, probe, k, where)
        model = load_pretrained(args.model).eval()
        scale_neurons(model, neurons, factor)
        t0 = time.perf_counter()
        ratios = position_0_ratios(model, probe)
        rows.append({"variant": variant, "neurons": sum(map(len, neurons.values())),
                     "ce": held_out_ce(model, blocks, precision),
                     "position_0_ratio": max(ratios), "position_0_ratios": ratios,
                     "seconds": round(time.perf_counter() - t0, 1)})
    print(f"{len(blocks)} x {args.ctx} held-out tokens, {precision}")
    print("| K neurons per block : factor | CE | +CE | position 0 / others |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['variant']} | {row['ce']:.4f} | {row['ce'] - rows[0]['ce']:+.3f} | "
              f"{row['position_0_ratio']:.1f} |")
    if args.per_layer:
        print("\nposition 0 / others after each block")
        for row in rows:
            ratios = " ".join(f"{r:.0f}" for r in row["position_0_ratios"])
            print(f"{row['variant']:>10}: {ratios}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "data": args.data, "tokens": int(blocks.numel()),
                       "precision": precision, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

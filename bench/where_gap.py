"""Where a model's CE gap to a reference sits: by position, by token, by chunk.

Both models score the same chunks of each ``--data`` source, token by token; chunks where
either model overflows (a non-finite loss, or a token above ``--max-ce`` nats, which is how an
hf export's eps-trick norm shows an overflow) are left out of both. The gap ``model - reference``
is then reported by position in the chunk, by how hard the reference finds the token (its own
CE), as the share carried by the worst 1% / 5% / 20% of tokens, and per chunk. A gap that sits
in a few tokens or the first positions asks for a targeted fix; one spread over every chunk and
token is a general loss of capability, which more fine-tuning (or a better teacher) recovers.

    python bench/where_gap.py runs/smol runs/smol/control \
        --data val=../shared/data/corpus/val.jsonl --data wiki=../shared/data/corpus/wiki.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from noln.data import load_blocks
from noln.evaluate.loss import token_losses
from noln.loading import load_model
from noln.precision import autocast, resolve_precision

POSITIONS = [(0, 1), (1, 4), (4, 16), (16, 64), (64, 128), (128, None)]
REFERENCE_CE = [(0, 0.1), (0.1, 0.5), (0.5, 2), (2, 5), (5, float("inf"))]


def breakdown(gap: torch.Tensor, reference: torch.Tensor) -> dict:
    """The gap ``[chunks, positions]`` by position, by the reference's CE, by share, by chunk."""
    flat, ref, width = gap.flatten(), reference.flatten(), gap.shape[1]
    worst = flat.sort(descending=True).values
    total = flat.sum()
    return {
        "gap": flat.mean().item(),
        "by_position": {f"{lo + 1}-{min(hi or width, width)}": gap[:, lo:hi].mean().item()
                        for lo, hi in POSITIONS if lo < width},
        "by_reference_ce": {f"[{lo}, {hi})": {"tokens": ((ref >= lo) & (ref < hi)).float()
                                              .mean().item(),
                                              "gap": flat[(ref >= lo) & (ref < hi)].mean().item()}
                            for lo, hi in REFERENCE_CE},
        # (of a positive total gap: a model no worse overall has no share to split)
        "share_of_worst": {f"{q:.0%}": (worst[: int(len(worst) * q)].sum() / total).item()
                           if total > 0 else float("nan") for q in (0.01, 0.05, 0.2)},
        "tokens_worse": (flat > 0).float().mean().item(),
        "median_token_gap": flat.median().item(),
        "chunk_gap": {k: float(v) for k, v in zip(
            ("min", "median", "max"), np.quantile(gap.mean(1).numpy(), [0, 0.5, 1]))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the model whose gap is measured (any name noln loads)")
    parser.add_argument("reference", help="what it is measured against (e.g. the control)")
    parser.add_argument("--data", action="append", required=True, help="NAME=PATH, repeatable")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per source")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--max-ce", type=float, default=50.0,
                        help="a token above this marks its chunk as overflowing")
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 | auto")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    precision = resolve_precision(args.precision, torch.device("cpu"))
    model, tokenizer = load_model(args.model)
    reference, reference_tokenizer = load_model(args.reference)
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"{args.reference} has another tokenizer than {args.model}: the two "
                         "cannot be compared token for token")
    results = {}
    for spec in args.data:
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        blocks = np.asarray(load_blocks(path, tokenizer, args.ctx, args.tokens), np.int64)
        with autocast(precision, torch.device("cpu")):
            ours, theirs = (token_losses(m, blocks) for m in (model, reference))
        sane = [(ce.isfinite() & (ce < args.max_ce)).all(1) for ce in (ours, theirs)]
        keep = sane[0] & sane[1]
        results[name or path] = {"chunks": len(blocks), "overflowing": int((~keep).sum()),
                                 "model_ce": ours[keep].mean().item(),
                                 "reference_ce": theirs[keep].mean().item(),
                                 **breakdown(ours[keep] - theirs[keep], theirs[keep])}
        print(json.dumps({name or path: results[name or path]}, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

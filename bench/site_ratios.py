"""Where a frozen model's token scales run away: each site's input std over its fixed scale,
per token, on held-out blocks, at a given outlier clip.

A frozen site divides every token by one scale ``sigma``; a token whose input std ``s_t`` is
``r = s_t / sigma`` times it leaves the site ``r`` times too large. In a gated MLP (SwiGLU:
``down(silu(gate(x)) * up(x))``, degree 2 in ``x`` for large ``x``) the block's output grows
like ``r**2``, so one token a little above its scale can grow block after block until the
forward overflows. This prints, per site in forward order: position 0's ratio, the ordinary
tokens' median / 99th percentile / maximum, how many exceed ``--above`` and 10x that, whether
the site's output is finite, and the commonest tokens above ``--above``. Run it at the clip the
run trains under (where the outliers are held) and with the clip off (``--clip 0``: where the
cascade starts).

    python bench/site_ratios.py runs/smol/checkpoints/step-2000.pt \\
        --data ../shared/data/corpus/val.jsonl --clip 0
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from noln.arch import install
from noln.data import load_blocks, separator_id
from noln.fakenorm import special_token_mask
from noln.loading import load_model
from noln.precision import autocast, describe, resolve_precision


def measure(model: torch.nn.Module, adapter, x: torch.Tensor, clip: float
            ) -> dict[str, tuple[torch.Tensor, bool]]:
    """Per frozen site, in forward order: ``s_t / sigma`` per token (``[batch, seq]``, or with
    a heads axis for per-head sites) and whether its output was finite, every frozen site
    clipped at ``clip`` (0: off) for this forward."""
    ratios: dict[str, tuple[torch.Tensor, bool]] = {}

    def record(name: str):
        def hook(norm, inputs, output):  # the input std as the site measures it, over sigma
            ratios[name] = (norm.per_token_std(inputs[0]) / norm.sigma.float(),
                            bool(torch.isfinite(output).all()))
        return hook

    handles = []
    for name in adapter.frozen_sites():
        norm = adapter.site(name).norm
        norm.set_clip(clip)
        handles.append(norm.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(input_ids=x)
    finally:
        for h in handles:
            h.remove()
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a run folder or a checkpoint file (its sites frozen)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--clip", type=float, default=0.0,
                    help="outlier clip K set on every frozen site (0: off)")
    ap.add_argument("--above", type=float, default=3.0,
                    help="count tokens whose ratio exceeds this (and 10x this)")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on a CPU with native bf16) | "
                    "bf16 | fp32")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    eot = separator_id(tok)
    adapter = install(model, eot_id=eot)
    frozen = adapter.frozen_sites()
    if not frozen:
        raise SystemExit(f"{args.model} has no frozen site: give a removal run's checkpoint")
    model.eval()
    blocks = load_blocks(args.data, tok, args.ctx, max_tokens=args.blocks * args.ctx)
    x = torch.from_numpy(np.asarray(blocks[: args.blocks], np.int64))
    ordinary = ~special_token_mask(x, eot)

    precision = resolve_precision(args.precision, "cpu")
    with autocast(precision, "cpu"):
        ratios = measure(model, adapter, x, args.clip)

    clip = f"outlier clip {args.clip:g}" if args.clip > 0 else "outlier clip off"
    print(f"{args.model}: {len(frozen)} frozen sites, {clip}, {x.numel()} tokens "
          f"({describe(precision, args.precision, 'cpu')})\n")
    a = args.above
    print(f"| site | position 0 | median | p99 | max | > {a:g} | > {10 * a:g} | finite | "
          f"commonest tokens > {a:g} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    first_over = first_nan = None
    for name, (r, finite) in ratios.items():  # in forward order, as the hooks ran
        # per-head sites: the largest head; NaN (an overflow upstream) counts as infinite
        r = torch.nan_to_num(r.reshape(x.shape[0], x.shape[1], -1).amax(-1), nan=float("inf"))
        q = r[ordinary]
        over = ordinary & (r > a)
        ids, counts = x[over].unique(return_counts=True)
        top = counts.argsort(descending=True)[:3]
        common = " ".join(f"{tok.decode([int(ids[i])])!r}:{int(counts[i])}" for i in top)
        print(f"| {name} | {r[:, 0].median():.3g} | {q.median():.3g} | "
              f"{q.quantile(0.99):.3g} | {q.max():.3g} | {int(over.sum())} | "
              f"{int((q > 10 * a).sum())} | {'yes' if finite else 'NO'} | {common} |")
        if first_over is None and over.any():
            first_over = name
        if first_nan is None and not finite:
            first_nan = name
    print(f"\nfirst site with an ordinary token above {a:g}: {first_over or 'none'}; "
          f"first with a non-finite output: {first_nan or 'none'}")


if __name__ == "__main__":
    main()

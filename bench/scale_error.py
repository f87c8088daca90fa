"""How far each token's input std is from each site's scale, in a run's checkpoint or any model:
the quantity ``--site-aux`` penalises, and the one that decides whether a frozen site is exact.

For every site, the ratio ``s_t / sigma`` over ordinary tokens (position 0 and end-of-text
left out, as the sigma estimate leaves them out) on held-out blocks: median, 99th percentile,
how many tokens are above 3x and 10x, the largest, and position 0's median. A SwiGLU model
breaks where a frozen site's ratio has a tail: the token enters the MLP that many times too
large, and the MLP squares it (docs/BENCHMARKS.md, SmolLM2). ``--outliers SITE`` lists the
tokens above 5x at one site.

    python bench/scale_error.py runs/smol-taper2/checkpoints/prev.pt \
        --data ../shared/data/corpus/val.jsonl --outliers blocks.12.mlp_in
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from noln.arch import install
from noln.data import load_blocks, separator_id
from noln.fakenorm import special_token_mask
from noln.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a run folder, a checkpoint file, or any model noln loads")
    ap.add_argument("--data", required=True)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--outliers", default=None, help="list the tokens above 5x at this site")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    adapter = install(model, eot_id=separator_id(tok))  # the FakeNorms as saved, or live ones
    blocks = load_blocks(args.data, tok, args.ctx, max_tokens=args.blocks * args.ctx)
    x = torch.from_numpy(np.asarray(blocks[: args.blocks], np.int64))
    keep = ~special_token_mask(x, adapter.eot_id)
    with torch.no_grad(), adapter.measuring(capture_std=adapter.norms()):
        logits = model(input_ids=x).logits
        stds = {name: site.norm.input_std.float() for name, site in adapter.sites.items()
                if site.norm.input_std is not None}
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()).item()
    print(f"{args.model}: CE {ce:.4f} on {x.numel()} tokens ({int(keep.sum())} ordinary)")
    print("| site | state | sigma | median | p99 | >3x | >10x | max | position 0 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, site in adapter.sites.items():
        if name not in stds:
            continue
        norm = site.norm
        ratio = stds[name] / norm.sigma
        r = ratio[keep if ratio.dim() == 2 else keep.unsqueeze(-1).expand_as(ratio)]
        state = "live" if not norm.frozen else \
            f"taper {norm.taper:.2f}" if norm.tapering else "frozen"
        print(f"| {name} | {state} | {norm.sigma.item():.4g} | {r.median().item():.3f} | "
              f"{r.quantile(0.99).item():.3f} | {int((r > 3).sum())} | {int((r > 10).sum())} | "
              f"{r.max().item():.3g} | {ratio[:, 0].median().item():.3g} |")
    if args.outliers:
        ratio = stds[adapter.site(args.outliers).name] / adapter.site(args.outliers).norm.sigma
        print(f"\ntokens above 5x at {args.outliers} (ordinary only):")
        for b, t in ((ratio * keep) > 5).nonzero().tolist():
            before = repr(tok.decode([int(x[b, t - 1])])) if t else "-"
            print(f"  block {b} position {t}: {ratio[b, t].item():.1f}x, token "
                  f"{tok.decode([int(x[b, t])])!r} (id {int(x[b, t])}), after {before}")


if __name__ == "__main__":
    main()

"""What freezing each norm site costs a model before any fine-tuning: held-out CE after
freezing the sites one by one in the default removal order, with and without special tokens'
own scale (``--special-scale``), so the sites that break a model show up without a training run.

Each variant: install FakeNorms, estimate every sigma (the EMA, as a run does) from
``--warmup`` training batches in train mode, then freeze site after site and score the probe
blocks after each freeze. With special scales at fade 0 the special tokens keep their own
scale (what a run trains with until the fade); ``--fade 1`` shows what the fade must undo.

    python bench/freeze_cost.py MODEL --data ../shared/data/corpus/train.jsonl \
        --eval-data ../shared/data/corpus/val.jsonl --out docs/benchmarks/freeze_cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from noln.arch import install
from noln.data import load_blocks, separator_id
from noln.fakenorm import special_token_mask
from noln.loading import load_model


@torch.no_grad()
def probe_ce(model, blocks: torch.Tensor) -> float:
    logits = model(input_ids=blocks, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()


@torch.no_grad()
def run_variant(name: str, model_name: str, train: torch.Tensor, probe: torch.Tensor,
                special: bool, fade: float, limit: int | None) -> dict:
    model, tok = load_model(model_name)
    eot = separator_id(tok)
    adapter = install(model, eot_id=eot)
    if special:
        adapter.enable_special_scale()
    model.train()
    for batch in train:  # the EMA of every live site, as a run measures it
        with adapter.measuring(std_mask=~special_token_mask(batch, eot)):
            model(input_ids=batch, use_cache=False)
    model.eval()
    adapter.set_special_fade(fade)
    rows = [{"site": None, "ce": probe_ce(model, probe)}]
    print(f"[{name}] live: {rows[0]['ce']:.4f}", flush=True)
    for i, site in enumerate(adapter.site_names()[:limit]):
        sigma = adapter.freeze(site)
        norm = adapter.site(site).norm
        rows.append({"site": site, "sigma": sigma, "ce": probe_ce(model, probe),
                     "sigma_special": float(norm.sigma_special) if special else None})
        extra = f"special {rows[-1]['sigma_special']:9.4g} " if special else ""
        print(f"[{name}] {i:3d} {site:40s} sigma {sigma:9.4g} {extra}CE {rows[-1]['ce']:.4f}",
              flush=True)
    return {"variant": name, "special_scale": special, "fade": fade, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=4, help="train-mode batches for the EMAs")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--probe", type=int, default=8, help="held-out blocks scored")
    ap.add_argument("--limit", type=int, default=None, help="only the first N sites")
    ap.add_argument("--variants", default="plain,special",
                    help="comma list of plain | special | special-faded")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    _, tok = load_model(args.model)
    train = load_blocks(args.data, tok, args.ctx, max_tokens=args.warmup * args.batch * args.ctx)
    train = torch.from_numpy(np.asarray(train, np.int64)).view(args.warmup, args.batch, -1)
    probe = torch.from_numpy(np.asarray(load_blocks(args.eval_data, tok, args.ctx,
                                                    max_tokens=args.probe * args.ctx), np.int64))
    specs = {"plain": (False, 0.0), "special": (True, 0.0), "special-faded": (True, 1.0)}
    t0 = time.time()
    results = [run_variant(v, args.model, train, probe, *specs[v], args.limit)
               for v in args.variants.split(",")]
    report = {"model": args.model, "ctx": args.ctx, "warmup_batches": args.warmup,
              "batch": args.batch, "probe_blocks": args.probe, "wall_s": time.time() - t0,
              "variants": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

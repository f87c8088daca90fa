"""What freezing norm sites costs right now, before any training: held-out CE of a run's
checkpoint (or any model noln loads) with more sites frozen at their current scales.

``--per-block`` freezes the given roles one block at a time (each alone, then put back) and
prints each block's cost, with where it falls: by position, and the share of the rise carried
by the worst 1% of tokens (near 1: a few tokens; near 0.01: spread over all). Without it, every
site of the given roles is frozen at once (those frozen already keep their scale) and clipped
at each ``--clip`` K in turn (the outlier clip: tokens above K times a site's scale are divided
by std / K, ``outlier_clip``; 0: off). On a run whose sites are all frozen, that is what
lifting its clip would cost now. ``--lift-blocks P,...`` instead lifts the clip block by
block, as ``--clip-lift by_block`` would: for each P, every site of the roles frozen, the
clip off on blocks 0..P-1 and at the first ``--clip`` K on the rest (P = layers + 1: off
everywhere, the final norm included). Special tokens keep the checkpoint's own scales unless
``--fade F`` moves them (1: the shared scale, as at the end of a run). ``--prune-sinks N
--original MODEL`` first zeroes the N MLP neurons per block that write most into position 0
in the original model, on the first 8 blocks of ``--data`` (``noln.sinks``, as
``--prune-sinks`` does in a run), and prints the CE after it.

    python bench/freeze_from_checkpoint.py runs/smol/checkpoints/step-600.pt \\
        --data ../shared/data/corpus/val.jsonl --roles attn_in_qk --per-block --clip 2
    python bench/freeze_from_checkpoint.py runs/smol/checkpoints/step-300.pt \\
        --data ../shared/data/corpus/val.jsonl --roles mlp_in,attn_in_qk,attn_in_v \\
        --clip 1.2,1.5,2
    python bench/freeze_from_checkpoint.py runs/smol/checkpoints/step-2000.pt \\
        --data ../shared/data/corpus/val.jsonl --roles mlp_in,attn_in_qk,attn_in_v,final \\
        --clip 1.2 --lift-blocks 0,5,7,10,31
    python bench/freeze_from_checkpoint.py runs/smol/checkpoints/step-1750.pt \
        --data ../shared/data/corpus/val.jsonl --roles mlp_in,attn_in_qk,attn_in_v,final \
        --clip 0 --prune-sinks 16 --original ~/.cache/noln/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from noln.arch import install
from noln.data import load_blocks, separator_id
from noln.loading import load_model
from noln.precision import autocast, describe, resolve_precision
from noln.sinks import prune_neurons, sink_neurons


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a run folder, a checkpoint file, or any model noln loads")
    ap.add_argument("--data", required=True)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--roles", default="attn_in_qk,attn_in_v",
                    help="comma-separated site roles to freeze (mlp_in, attn_in_qk, attn_in_v, "
                         "final)")
    ap.add_argument("--per-block", action="store_true",
                    help="one block at a time (the roles' sites of that block together)")
    ap.add_argument("--clip", default="0", help="outlier clip K (comma-separated: one row each "
                    "without --per-block; the first with it); 0: off")
    ap.add_argument("--lift-blocks", default=None,
                    help="comma-separated P: the clip off on blocks < P, the first --clip K on "
                         "the rest (the final norm counts as block `layers`)")
    ap.add_argument("--fade", type=float, default=None,
                    help="set every site's special-token fade to F (0-1) before measuring")
    ap.add_argument("--prune-sinks", type=int, default=0,
                    help="zero the N neurons per block that write most into position 0 in "
                         "--original first")
    ap.add_argument("--original", default=None, help="the original model (for --prune-sinks)")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on a CPU with native bf16) | "
                    "bf16 | fp32")
    args = ap.parse_args()
    if args.prune_sinks and not args.original:
        raise SystemExit("--prune-sinks finds the neurons in the original model: give "
                         "--original MODEL")

    model, tok = load_model(args.model)
    adapter = install(model, eot_id=separator_id(tok))  # the FakeNorms as saved, or live ones
    model.eval()
    blocks = load_blocks(args.data, tok, args.ctx, max_tokens=args.blocks * args.ctx)
    x = torch.from_numpy(np.asarray(blocks[: args.blocks], np.int64))
    precision = resolve_precision(args.precision, "cpu")
    roles = args.roles.split(",")
    clips = [float(c) for c in args.clip.split(",")]

    def token_ce() -> torch.Tensor:
        with torch.no_grad(), autocast(precision, "cpu"):
            logits = model(input_ids=x).logits.float()
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                               reduction="none").view(x.shape[0], -1)

    base = token_ce()
    print(f"{args.model}: CE {base.mean():.4f} on {base.numel()} predictions, "
          f"{len(adapter.frozen_sites())} of {len(adapter.sites)} sites frozen "
          f"({describe(precision, args.precision, 'cpu')})")
    if args.prune_sinks:
        sinks = sink_neurons(load_model(args.original)[0], x[:8], args.prune_sinks)
        changed = prune_neurons(model, sinks)
        base = token_ce()
        print(f"pruned {changed} neurons ({args.prune_sinks} per block, the sink circuit of "
              f"{args.original}): CE {base.mean():.4f}")
    live = [n for n, s in adapter.sites.items() if s.role in roles and not s.norm.frozen]
    unmeasured = [n for n in live if int(adapter.site(n).norm.n_updates) == 0]
    if unmeasured:
        raise SystemExit(f"{unmeasured[0]} has no scale yet (no training step measured it): give "
                         "a run's checkpoint, or use bench/freeze_cost.py for a fresh model")
    if args.per_block:
        groups: dict[str, list[str]] = {}
        for name in live:
            groups.setdefault(name.rsplit(".", 1)[0], []).append(name)
        pos = torch.arange(base.shape[1])
        spans = [(0, 4), (4, 32), (32, base.shape[1])]
        at = " / ".join(f"{a}-{b - 1}" for a, b in spans)
        print(f"\n| block | sites | CE | cost | cost at positions {at} | share of the worst 1% |")
        print("| --- | --- | ---: | ---: | --- | ---: |")
        for block, names in groups.items():
            norms = [adapter.site(n).norm for n in names]
            saved = [{k: v.clone() for k, v in norm.state_dict().items()} for norm in norms]
            for norm in norms:
                norm.freeze()
                norm.set_clip(clips[0])
            ce = token_ce()
            for norm, state in zip(norms, saved):  # back to live, as saved
                norm.load_state_dict(state)
            d = ce - base
            where = " / ".join(f"{d[:, (pos >= a) & (pos < b)].mean():+.3f}" for a, b in spans)
            worst = d.flatten().topk(max(1, d.numel() // 100)).values.sum() / d.sum()
            roles_here = ", ".join(adapter.site(n).role for n in names)
            print(f"| {block} | {roles_here} | {ce.mean():.4f} | {ce.mean() - base.mean():+.4f} | "
                  f"{where} | {worst:.2f} |")
        return
    chosen = [n for n, s in adapter.sites.items() if s.role in roles]
    if args.fade is not None:
        adapter.set_special_fade(args.fade)
    fade = f", special fade {args.fade:g}" if args.fade is not None else ""
    print(f"\nall {len(chosen)} sites of {', '.join(roles)} frozen ({len(live)} of them "
          f"now){fade}:")
    if args.lift_blocks is not None:
        for name in chosen:
            if not adapter.site(name).norm.frozen:
                adapter.site(name).norm.freeze()
        print(f"| clip off on blocks (K {clips[0]:g} on the rest) | CE | cost |")
        print("| --- | ---: | ---: |")
        for p in (int(v) for v in args.lift_blocks.split(",")):
            for name in chosen:
                adapter.site(name).norm.set_clip(0.0 if adapter.block_of(name) < p else clips[0])
            ce = token_ce().mean()
            span = "none" if p == 0 else f"0-{p - 1}"
            print(f"| {span} | {ce:.4f} | {ce - base.mean():+.4f} |")
        return
    print("| outlier clip K | CE | cost |")
    print("| ---: | ---: | ---: |")
    for clip in clips:
        for name in chosen:
            norm = adapter.site(name).norm
            if not norm.frozen:
                norm.freeze()
            norm.set_clip(clip)
        ce = token_ce().mean()
        print(f"| {clip:g} | {ce:.4f} | {ce - base.mean():+.4f} |")


if __name__ == "__main__":
    main()

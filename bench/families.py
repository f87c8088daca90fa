"""Norm removal end to end, per model family, on a small model pretrained here.

For ``--family F`` (any name in ``noln.arch.FAMILIES``): pretrain a small F-architecture model
with its norms on corpus/train.jsonl (own BPE tokenizer), then ``remove_with_control`` on the
same data (the with-norm control and the removal run: same steps, data and seed), export the
removal run (hf and clean), check that both exports reproduce the trained model's logits, and
append a section to ``docs/benchmarks/families.md``: CE on corpus/val.jsonl and
corpus/wiki.jsonl for original / control / no-norm, the exports' largest logit difference,
tokens and wall times, with the exact command.

    OMP_NUM_THREADS=1 python bench/families.py --family neox --out runs/families
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = SHARED / "data" / "corpus"
REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks" / "families.md"

HEADER = """# Norm removal per model family (small pretrained models)

`bench/families.py`: for each family, a small model of that architecture is pretrained with its
norms on `corpus/train.jsonl` (own BPE tokenizer), then `noln.remove_with_control` fine-tunes it
twice on the same data, steps and seed: the control keeps the norms, the removal run freezes
every site (adaptive schedule). CE is the mean per-token CE on `corpus/val.jsonl` (the removal's
held-out set) and `corpus/wiki.jsonl`, in chunks of the model's training context, ± 95%
interval. *Export max |Δlogit|*: largest absolute difference between the trained model (its
FakeNorms, all frozen) and each export (`hf`: the family's plain transformers class with the
eps trick; `clean`: norms folded, loaded with `noln.load_clean`) on held-out sequences.
Timings are on a shared 2-core CPU machine with one thread; they are indicative only.
"""


def _ce(d: dict) -> str:
    return f"{d['mean']:.4f} ± {d['ci95']:.4f}"


@torch.no_grad()
def export_diffs(run: Path, blocks: np.ndarray) -> dict[str, float]:
    """Largest |logit difference| of the hf and clean exports against the trained model."""
    from transformers import AutoModelForCausalLM

    import noln

    x = torch.from_numpy(np.asarray(blocks, dtype=np.int64))
    trained, _ = noln.load_model(run)  # latest checkpoint: every site frozen
    ref = trained(input_ids=x).logits
    hf = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    clean = noln.load_clean(run / "model-clean")
    return {"hf": (hf(input_ids=x).logits - ref).abs().max().item(),
            "clean": (clean(input_ids=x).logits - ref).abs().max().item(),
            "max_abs_logit": ref.abs().max().item(), "hf_class": type(hf).__name__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", required=True)
    ap.add_argument("--out", default="runs/families")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=100, help="removal (and control) steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args()

    import noln
    from noln.arch import FAMILIES, supported
    from noln.data import load_blocks
    from noln.pretrain import pretrain

    if args.family not in FAMILIES:
        sys.exit(f"unknown family '{args.family}': one of {supported()}")
    out = Path(args.out) / args.family
    train, val, wiki = (str(CORPUS / f) for f in ("train.jsonl", "val.jsonl", "wiki.jsonl"))
    load = os.getloadavg()[0]
    t0 = time.time()
    pre = pretrain(train, out / "pretrain", arch=args.family, n_layer=args.layers,
                   d_model=args.d_model, n_head=args.heads, ctx=args.ctx,
                   vocab_size=args.vocab_size, steps=args.pretrain_steps,
                   batch_size=args.batch_size, lr=args.pretrain_lr, warmup_steps=20,
                   progress=False)
    t_pre = time.time() - t0
    t1 = time.time()
    res = noln.remove_with_control(
        str(pre.out), train, out / "remove", eval_sets={"wiki": wiki}, eval_data=val,
        eval_tokens=args.eval_tokens, steps=args.steps, batch_size=args.batch_size,
        ctx=args.ctx, lr=args.lr, min_lr=args.lr / 10, warmup_steps=10,
        export_format="both", checkpoint_every=10_000, progress=False)
    t_remove = time.time() - t1
    blocks = load_blocks(val, pre.tokenizer, args.ctx, max_tokens=8 * args.ctx)[:8]
    diffs = export_diffs(out / "remove", blocks)
    total = time.time() - t0

    table, no_ln = res["table"], res["no_ln"]
    cfg = json.loads((pre.out / "config.json").read_text())
    row = {
        "family": args.family, "hf_class": diffs["hf_class"],
        "model": f"{args.layers}L d={args.d_model} h={args.heads} ctx={args.ctx}, "
                 f"{pre.summary['n_params'] / 1e6:.2f}M params",
        "pretrain": f"{pre.summary['steps']} steps, {pre.summary['tokens'] / 1e6:.2f}M tok, "
                    f"{t_pre / 60:.1f} min",
        "removal": f"{no_ln['steps']} steps, {no_ln['tokens'] / 1e6:.2f}M tok, "
                   f"{len(no_ln['frozen'])} sites, last frozen at step "
                   f"{max(e['step'] for e in no_ln['removals'])}",
        "ce": {src: {k: v for k, v in t.items()} for src, t in table.items()},
        "export_max_abs_logit_diff": {"hf": diffs["hf"], "clean": diffs["clean"]},
        "max_abs_logit": diffs["max_abs_logit"],
        "wall_s": {"pretrain": t_pre, "remove_and_control": t_remove, "total": total},
        "load_avg_start": load, "config": {k: cfg.get(k) for k in (
            "model_type", "use_parallel_residual", "tie_word_embeddings", "rope_parameters",
            "num_attention_heads", "num_key_value_heads")
            if k in cfg},
    }
    (out / "families.json").write_text(json.dumps(row, indent=1))

    cmd = "OMP_NUM_THREADS=1 python " + shlex.join(["bench/families.py", *sys.argv[1:]])
    lines = [f"\n## {args.family} ({row['hf_class']}), {date.today().isoformat()}\n",
             f"```\n{cmd}\n```\n",
             f"Model: {row['model']}; pretraining: {row['pretrain']}; removal and control: "
             f"{row['removal']}; lr {args.lr:g} cosine to {args.lr / 10:g}, batch "
             f"{args.batch_size} x {args.ctx}. Wall time {total / 60:.1f} min in all "
             f"(removal + control {t_remove / 60:.1f} min), load average {load:.2f} at start.\n",
             "| data (mean CE, nats) | original | with norms (control) | without norms "
             "| gap to control |", "|---|---:|---:|---:|---:|"]
    for src, t in table.items():
        name = "val" if src == "heldout" else src
        orig, ctrl, noln_ = (t["original"], t["with LN (fine-tuned)"], t["without LN"])
        lines.append(f"| {name} ({orig['n_tokens']:,} tok) | {_ce(orig)} | {_ce(ctrl)} | "
                     f"{_ce(noln_)} | {noln_['mean'] - ctrl['mean']:+.4f} |")
    lines.append(f"\nExport max |Δlogit| vs the trained model (8 x {args.ctx} val tokens, "
                 f"logits up to {diffs['max_abs_logit']:.1f}): hf {diffs['hf']:.2e}, clean "
                 f"{diffs['clean']:.2e}.\n")
    text = "\n".join(lines)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    if not args.doc.exists():
        args.doc.write_text(HEADER)
    with args.doc.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

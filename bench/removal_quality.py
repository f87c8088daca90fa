"""Removal quality on the offline reference model: original vs with-LN control vs no-LN.

Runs the with-LN control once, then each removal variant with the same data, steps and seed,
and evaluates CE on the first 64 x 256 tokens of corpus/val.jsonl and corpus/wiki.jsonl (the
reference README's protocol), printing a Markdown table with the gaps to the control.

    python bench/removal_quality.py --variants fixed,adaptive --out runs/quality
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import noln

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "ref-gpt2-6L"
CORPUS = SHARED / "data" / "corpus"

BASE = dict(batch_size=16, steps=146, lr=3e-4, min_lr=3e-5, warmup_steps=10, grad_clip=1.0,
            eval_tokens=64 * 256, checkpoint_every=1000, export_format="none", progress=False)
# The reference README's naive baseline: every site, one every 4 steps from step 10, no aux loss.
VARIANTS = {
    "fixed": dict(schedule="fixed", aux_weight=0.0,
                  fixed=dict(start=10, gaps={"ln_2": 4, "ln_1_qk": 4, "ln_1_v": 4})),
    "fixed-aux": dict(schedule="fixed", aux_weight=0.1,
                      fixed=dict(start=10, gaps={"ln_2": 4, "ln_1_qk": 4, "ln_1_v": 4})),
    "adaptive": dict(schedule="adaptive"),
    "adaptive-distill": dict(schedule="adaptive", distill=0.5),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="fixed,adaptive")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--steps", type=int, default=None, help="override the 146-step budget")
    ap.add_argument("--set", action="append", default=[], help="extra override KEY=VALUE (json)")
    args = ap.parse_args()
    out = Path(args.out)
    base = dict(BASE, **({"steps": args.steps} if args.steps else {}))
    for kv in args.set:
        k, v = kv.split("=", 1)
        base[k] = json.loads(v)
    common = dict(model=str(MODEL), data=str(CORPUS / "train.jsonl"),
                  eval_data=str(CORPUS / "val.jsonl"),
                  eval_sets={"wiki": str(CORPUS / "wiki.jsonl")})
    rows = {}
    control_dir = out / f"control-{base['steps']}"
    if (control_dir / "summary.json").exists():
        control = json.loads((control_dir / "summary.json").read_text())
    else:
        control = noln.remove_layernorm(out=control_dir, keep_ln=True, **common, **base).summary
    rows["original"] = control["ce_before"]
    rows["with LN (control)"] = control["ce_after"]
    for name in args.variants.split(","):
        t = time.time()
        r = noln.remove_layernorm(out=out / f"{name}-{base['steps']}", **common,
                                  **{**base, **VARIANTS[name]})
        rows[f"no LN: {name}"] = r.summary["ce_after"]
        last = max(e["step"] for e in r.events)
        print(f"{name}: last removal at step {last}, {time.time() - t:.0f}s", flush=True)
    c = rows["with LN (control)"]
    print(f"\n| model ({base['steps']} steps) | val CE | wiki CE |\n|---|---|---|")
    for name, ce in rows.items():
        gap = "" if name in ("original", "with LN (control)") else \
            f" ({ce['heldout']['mean'] - c['heldout']['mean']:+.3f})"
        gap_w = "" if not gap else f" ({ce['wiki']['mean'] - c['wiki']['mean']:+.3f})"
        print(f"| {name} | {ce['heldout']['mean']:.4f}{gap} | {ce['wiki']['mean']:.4f}{gap_w} |")


if __name__ == "__main__":
    main()

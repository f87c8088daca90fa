"""Removal quality on the offline reference model: original vs with-LN control vs no-LN.

For each token budget (steps x 16 x 256 tokens), runs the with-LN control (CE only, as the
papers did, and with the same distillation term as the distilled variants: the fair control for
them), then each removal variant with the same data, steps and seed. Every model is evaluated
on the first 64 x 256 tokens of corpus/val.jsonl and corpus/wiki.jsonl (the reference README's
protocol) and on HellaSwag (acc_norm, all 10,042 items unless --hellaswag-limit). Prints and
writes a Markdown table with the gaps to the control, tokens used and wall time, plus JSON.

    python bench/removal_quality.py --budgets 146 --variants fixed,adaptive,adaptive-distill \\
        --out runs/quality --report docs/benchmarks/removal_quality.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import noln
from noln.evaluate.hellaswag import evaluate_hellaswag, load_hellaswag
from noln.loading import load_model

BASE = dict(batch_size=16, lr=3e-4, min_lr=3e-5, warmup_steps=10, grad_clip=1.0,
            eval_tokens=64 * 256, checkpoint_every=1000, export_format="none", progress=False)
# The reference README's naive baseline: every site, one every 4 steps from step 10, no aux loss
# (for other budgets, start and gaps scale with the number of steps).
FIXED = dict(start=10, gaps={"ln_2": 4, "ln_1_qk": 4, "ln_1_v": 4})
VARIANTS = {
    "control": dict(keep_ln=True),
    "control-distill": dict(keep_ln=True, distill=0.5),
    "fixed": dict(schedule="fixed", aux_weight=0.0, fixed=FIXED),
    "fixed-aux": dict(schedule="fixed", aux_weight=0.1, fixed=FIXED),
    "adaptive": dict(schedule="adaptive"),
    "adaptive-distill": dict(schedule="adaptive", distill=0.5),
    "fixed-distill": dict(schedule="fixed", aux_weight=0.0, fixed=FIXED, distill=0.5),
}


def run(name: str, steps: int, out: Path, common: dict, items, overrides: dict) -> dict:
    """One fine-tuning run (skipped when its results exist) and its evaluation."""
    path = out / f"{name}-{steps}" / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    t = time.time()
    variant = dict(VARIANTS[name])
    if "fixed" in variant and steps != 146:  # the baseline's gaps, stretched to the budget
        k = steps / 146
        variant["fixed"] = dict(start=max(1, round(10 * k)),
                                gaps={s: max(1, round(g * k)) for s, g in FIXED["gaps"].items()})
    r = noln.remove_layernorm(out=path.parent, **common,
                              **{**BASE, "steps": steps, **variant, **overrides})
    wall = time.time() - t
    model, tok = load_model(path.parent)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    hs = evaluate_hellaswag(model, tok, items) if items else None
    result = {"name": name, "steps": steps, "tokens": r.summary["tokens"], "wall_s": wall,
              "train_s": r.summary["train_wall_time_s"],
              "last_removal": max((e["step"] for e in r.events), default=None),
              "ce_before": r.summary["ce_before"], "ce": r.summary["ce_after"],
              "hellaswag": hs.to_dict() if hs else None,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    path.write_text(json.dumps(result, indent=1))
    return result


def fmt_row(label: str, r: dict, control: dict | None, tokens: bool = True) -> str:
    val, wiki = r["ce"]["heldout"]["mean"], r["ce"]["wiki"]["mean"]
    cells = [f"{val:.4f}", f"{wiki:.4f}"]
    if control is not None:
        cells = [f"{val:.4f} ({val - control['ce']['heldout']['mean']:+.4f})",
                 f"{wiki:.4f} ({wiki - control['ce']['wiki']['mean']:+.4f})"]
    hs = r.get("hellaswag")
    cells.append(f"{100 * hs['acc_norm']:.2f} ± {196 * hs['acc_norm_stderr']:.2f}" if hs else "")
    cells += [f"{r['tokens']:,}" if tokens else "", f"{r.get('last_removal') or ''}",
              f"{r['wall_s']:.0f}" if tokens else ""]
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--variants", default="fixed,adaptive,adaptive-distill")
    ap.add_argument("--budgets", default="146", help="comma-separated step counts (16 x 256 "
                    "tokens a step; 146 = the reference README's 598K tokens)")
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--hellaswag-limit", type=int, default=None,
                    help="score only the first N items (0: skip HellaSwag)")
    ap.add_argument("--report", type=Path, default=None, help="write the Markdown table here")
    ap.add_argument("--set", action="append", default=[], help="extra override KEY=VALUE (json)")
    args = ap.parse_args()
    model, corpus = args.shared / "models" / "ref-gpt2-6L", args.shared / "data" / "corpus"
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    common = dict(model=str(model), data=str(corpus / "train.jsonl"),
                  eval_data=str(corpus / "val.jsonl"),
                  eval_sets={"wiki": str(corpus / "wiki.jsonl")})
    items = None
    if args.hellaswag_limit != 0:
        items = load_hellaswag(args.shared / "data" / "hellaswag" / "validation.jsonl",
                               limit=args.hellaswag_limit)
    variants = [v for v in args.variants.split(",") if v]
    needs_distilled_control = any("distill" in v for v in variants)
    results: dict[int, dict[str, dict]] = {}
    original = None
    for steps in (int(b) for b in args.budgets.split(",")):
        names = ["control", *(["control-distill"] if needs_distilled_control else []), *variants]
        results[steps] = {n: run(n, steps, args.out, common, items, overrides) for n in names}
        if original is None:
            ce = results[steps]["control"]["ce_before"]
            m, tok = load_model(model)
            m.to("cuda" if torch.cuda.is_available() else "cpu")
            hs = evaluate_hellaswag(m, tok, items).to_dict() if items else None
            original = {"ce": ce, "hellaswag": hs, "tokens": 0, "wall_s": 0}
        print(f"budget {steps} steps done", flush=True)

    header = ("| model | val CE (gap to control) | wiki CE (gap to control) | HellaSwag acc_norm % "
              "| tokens | last removal (step) | wall (s) |\n| --- | ---: | ---: | ---: | ---: | "
              "---: | ---: |")
    lines = [header, fmt_row("original", original, None, tokens=False)]
    for steps, res in results.items():
        control = res["control"]
        for name, r in res.items():
            ref = None if name == "control" else \
                res["control-distill"] if "distill" in name and name != "control-distill" \
                else control
            label = {"control": "with LN (control)", "control-distill": "with LN (control) + "
                     "distill 0.5"}.get(name, f"no LN: {name}")
            row = fmt_row(f"{label}, {steps} steps", r, ref)
            lines.append(row)
            if "distill" in name and name != "control-distill":  # also vs the CE-only control
                val = r["ce"]["heldout"]["mean"] - control["ce"]["heldout"]["mean"]
                wiki = r["ce"]["wiki"]["mean"] - control["ce"]["wiki"]["mean"]
                lines.append(f"| &nbsp;&nbsp;(same, gap to the CE-only control) | {val:+.4f} | "
                             f"{wiki:+.4f} | | | | |")
    table = "\n".join(lines)
    print(table)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if args.report:
        import sys

        cmd = " ".join(["python bench/removal_quality.py", *sys.argv[1:]])
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(
            f"# Removal quality on ref-gpt2-6L ({device})\n\nCommand: `{cmd}`\n\n"
            "CE: mean per-token cross-entropy (nats) on the first 64 x 256 tokens of "
            "corpus/val.jsonl and corpus/wiki.jsonl; gaps are to the with-LN control of the same "
            "budget (for distilled variants, to the control trained with the same distillation "
            "term, and on the next line to the CE-only control). HellaSwag: acc_norm on "
            f"{len(items) if items else 0} validation items, ± 1.96 standard errors. Wall time: "
            "the whole run (data, training, evaluation of CE).\n\n" + table + "\n")
        (args.report.with_suffix(".json")).write_text(json.dumps(
            {"original": original, "results": results}, indent=1))
        print(f"wrote {args.report}")


if __name__ == "__main__":
    main()

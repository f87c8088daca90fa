"""Check a finished removal run's exports the way a user would meet them (issue 12's Must show).

1. The ``hf`` export loads in a fresh Python process that never imports noln, as the plain
   transformers class (``LlamaForCausalLM`` for a Llama), with every norm's eps >= 1e10 (the
   eps trick), and gives the run's held-out CE (``summary.json``) within ``--tol`` (1e-3):
   where the run's model overflowed on some chunks, on the others, found by loading the run's
   model (and the table gives the plain class's CE on those chunks too).
2. The ``clean`` export (``noln.load_clean``) and the TransformerLens model of the ``hf``
   export (``noln.to_transformer_lens``) give the same logits as that plain model.

    python bench/export_check.py runs/smol --json runs/smol/export_check.json

Exit status 0 when every check holds, 1 otherwise; a table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# Runs in the fresh process: transformers and torch only. It keeps the logits of the chunks
# named in its last argument (the first two the run's own model does not overflow on).
CHILD = r"""
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
folder, blocks_path, out_path, device = sys.argv[1:5]
wanted = [int(r) for r in sys.argv[5].split(",")]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
eps = [float(getattr(m, "variance_epsilon", getattr(m, "eps", 0.0)))
       for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "LayerNorm"))]
x = torch.from_numpy(np.load(blocks_path)).to(device)
per_chunk, first = [], []
with torch.no_grad():
    for i in range(0, len(x), 8):
        logits = model(input_ids=x[i:i + 8]).logits.float()
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[i:i + 8, 1:],
                                               reduction="none").mean(1)
        per_chunk += ce.tolist()
        first += [(i + j, logits[j].cpu().numpy()) for j in range(len(ce)) if i + j in wanted]
np.savez(out_path, first=np.stack([f for _, f in first]), first_rows=[r for r, _ in first],
         per_chunk=np.array(per_chunk), eps=np.array(eps), cls=type(model).__name__,
         noln="noln" in sys.modules)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished noln remove run folder")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest CE difference allowed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import noln
    from noln.config import RemoveConfig
    from noln.data import load_blocks
    from noln.errors import NolnError
    from noln.evaluate.loss import token_losses
    from noln.loading import load_model
    from noln.remove import prepare_data
    from noln.run import RunFolder

    run = RunFolder(args.run)
    summary = run.read_summary()
    if not summary or not summary.get("complete") or "hf" not in summary.get("exports", {}):
        raise NolnError(f"'{args.run}' is not a finished removal with an hf export")
    cfg = RemoveConfig.from_yaml(run.config)
    hf, clean_dir = Path(summary["exports"]["hf"]), summary["exports"].get("clean")
    _, tokenizer = load_model(hf)
    # the held-out blocks the run's summary measured, rebuilt as the run built them (a slice
    # of --data needs the training text tokenised; --eval-data does not)
    if cfg.eval_data:
        blocks = load_blocks(cfg.eval_data, tokenizer, summary["ctx"], max_tokens=cfg.eval_tokens)
    else:
        blocks = prepare_data(cfg, tokenizer, summary["ctx"], summary["steps"])[1]
    # a norm-free model may overflow on a rare chunk: the run's summary counts them and
    # gives the mean over the rest (noln.evaluate.loss), which the plain model must match on
    # the same chunks. Which ones: the run's model, fixed scales and all, loaded by noln. (On
    # them the plain class need not overflow: its eps-trick norm squares the residual, gets
    # inf, and divides by it, giving 0 where the fixed scale gives inf; the clean export and
    # TransformerLens, fixed scales both, overflow there as the run's model does, so their
    # logits are compared on chunks the run's model does not overflow on.)
    run = summary["ce_after"]["heldout"]
    overflowed = int(run.get("overflowed", 0))
    run_ce = run["finite_mean"] if overflowed else run["mean"]
    finite = np.ones(len(blocks), dtype=bool)
    if overflowed:
        own, _ = load_model(args.run)
        finite = np.isfinite(token_losses(own.to(args.device), blocks).double().mean(1).numpy())
        del own
    compared = [int(r) for r in np.flatnonzero(finite)[:2]]
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/blocks.npy", np.asarray(blocks, np.int64))
        subprocess.run([sys.executable, "-c", CHILD, str(hf), f"{tmp}/blocks.npy",
                        f"{tmp}/out.npz", args.device, ",".join(map(str, compared))], check=True)
        child = dict(np.load(f"{tmp}/out.npz"))
    reference = torch.from_numpy(child["first"])
    x = torch.from_numpy(np.asarray(blocks, np.int64)[child["first_rows"]]).to(args.device)
    per_chunk = child["per_chunk"]
    rows = {
        "plain class": str(child["cls"]),
        "noln imported in that process": bool(child["noln"]),
        "norms": int(child["eps"].size),
        "smallest norm eps": float(child["eps"].min()) if child["eps"].size else None,
        "held-out tokens": int(np.asarray(blocks)[:, 1:].size),
        "chunks that overflow: run (summary.json) / run's model here":
            f"{overflowed} / {int((~finite).sum())}",
        "CE of the run (summary.json" + (", chunks that do not overflow)" if overflowed
                                         else ")"): run_ce,
        "CE of the plain model" + (" on those chunks" if overflowed else ""):
            float(per_chunk[finite].mean()),
    }
    if overflowed:
        rows["CE of the plain model on the others"] = float(per_chunk[~finite].mean())
    rows["|CE difference|"] = abs(float(per_chunk[finite].mean()) - run_ce)
    with torch.no_grad():
        if clean_dir is not None:
            clean = noln.load_clean(clean_dir).to(args.device).eval()
            rows["max |logit difference|, clean export"] = \
                (clean(input_ids=x).logits.float().cpu() - reference).abs().max().item()
        tl = noln.to_transformer_lens(hf, device=args.device)
        rows["max |logit difference|, TransformerLens"] = \
            (tl(x).float().cpu() - reference).abs().max().item()
    spread = reference.abs().max().item()
    ok = (not rows["noln imported in that process"] and rows["norms"] > 0
          and overflowed == int((~finite).sum())
          and rows["smallest norm eps"] >= 1e10 and rows["|CE difference|"] <= args.tol
          and all(v <= 1e-3 * max(1.0, spread) for k, v in rows.items()
                  if k.startswith("max |logit")))
    rows["largest |logit| (scale of the differences)"] = spread
    rows["all checks hold"] = ok
    print(f"| {args.run} | |\n| --- | ---: |")
    for k, v in rows.items():
        print(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

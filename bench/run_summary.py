"""A removal run's log as a table of phases: steps, sites removed, the held-out probe CE before
each removal, the training CE, the gradient norm and the site loss (docs/BENCHMARKS.md's
SmolLM2 attempts). Reads ``RUN/log.jsonl`` only, so it works on a run still going. With
``--control DIR`` (a with-norm run on the same batches, e.g. the pair's ``RUN/control``) it adds
the paired training-CE gap over ``--window``-step spans, as far as both runs have got.

    python bench/run_summary.py runs/smol-live5 --sites-per-row 10
    python bench/run_summary.py runs/smol41 --control runs/smol41/control --window 50
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from noln.report import paired_training_gap, training_gap_markdown
from noln.run import RunFolder


def phases(log: list[dict], per_row: int) -> list[dict]:
    """Rows: the steps before the first removal, then every ``per_row`` removals, then the
    steps after the last one."""
    steps = [e for e in log if "loss" in e]
    removals = [e for e in log if e.get("event") == "remove"]
    bounds = [0] + [removals[i]["step"] for i in range(0, len(removals), per_row)]
    bounds.append(steps[-1]["step"] + 1 if steps else 0)
    rows = []
    for lo, hi in zip(bounds, bounds[1:]):
        if hi <= lo:
            continue
        in_row = [e for e in steps if lo <= e["step"] < hi]
        sites = [e for e in removals if lo <= e["step"] < hi]
        rows.append({"steps": f"{lo}-{hi - 1}", "sites": sites, "train": in_row})
    return rows


def describe_sites(sites: list[dict]) -> str:
    if not sites:
        return "none"
    first, last = sites[0]["site"], sites[-1]["site"]
    return f"{len(sites)}: {first}" + (f" .. {last}" if len(sites) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--sites-per-row", type=int, default=10)
    ap.add_argument("--control", type=Path, help="a with-norm run on the same batches")
    ap.add_argument("--window", type=int, default=100, help="steps per span of the paired gap")
    args = ap.parse_args()
    log = RunFolder(args.run).read_log()
    print("| steps | sites removed | probe CE before each removal | train CE (mean) | "
          "gradient norm (median / max) | site loss (mean) | guard events |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: |")
    guards = [e for e in log if e.get("event") == "guard"]
    for row in phases(log, args.sites_per_row):
        train, sites = row["train"], row["sites"]
        probe = [e["probe_before"] for e in sites if "probe_before" in e]
        probe_text = (f"{probe[0]:.3f} -> {probe[-1]:.3f}" if len(probe) > 1
                      else f"{probe[0]:.3f}" if probe else "")
        grad = np.array([e["grad_norm"] for e in train if np.isfinite(e["grad_norm"])])
        aux = [e["site_aux"] for e in train if "site_aux" in e]
        lo, hi = (int(s) for s in row["steps"].split("-"))
        n_guard = sum(lo <= e.get("step", -1) <= hi for e in guards)
        loss = np.mean([e["loss"] for e in train]) if train else float("nan")
        grad_text = f"{np.median(grad):,.0f} / {grad.max():,.0f}" if grad.size else ""
        aux_text = f"{np.mean(aux):.3f}" if aux else ""
        print(f"| {row['steps']} | {describe_sites(sites)} | {probe_text} | {loss:.3f} | "
              f"{grad_text} | {aux_text} | {n_guard} |")
    if args.control:
        print()
        print(training_gap_markdown(paired_training_gap(log, RunFolder(args.control).read_log(),
                                                        args.window)), end="")


if __name__ == "__main__":
    main()

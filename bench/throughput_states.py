"""Steady-state step time of noln's loop per FakeNorm state, vs the plain PyTorch loop.

``bench/throughput.py`` times whole runs, removals included (each removal adds two probe
forward passes). This one isolates what every ordinary step pays: the same model and batch
as ``throughput.py``'s plain loop, and noln's Trainer with no removal event, every site either
live, every site frozen, or *mixed* (each block's first two site kinds frozen, the rest live:
for GPT-2, ln_2 and ln_1's query/key path frozen while its value path and ln_f are live, the
state where ln_1's two paths differ), with and without the aux loss. Median seconds per step
after warm-up, the best of ``--repeat`` alternating rounds; the ratio is plain / noln (1.0 =
no cost).

    OMP_NUM_THREADS=1 python bench/throughput_states.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the plain loop and the model sizes)

STATES = ("live", "mixed", "frozen")


def noln_step_time(base, blocks: np.ndarray, args, device, aux: float, state: str) -> float:
    from noln.arch import install
    from noln.config import make_config
    from noln.schedule import FixedSchedule
    from noln.train import Trainer

    model = copy.deepcopy(base)
    adapter = install(model)
    if state != "live":  # one train-mode pass gives every EMA a value, then freeze
        model.to(device).train()
        model(torch.from_numpy(blocks[:2].astype(np.int64)).to(device))
        kinds = adapter.block_kinds[:2] if state == "mixed" else None
        for name, site in adapter.sites.items():
            if kinds is None or site.kind in kinds:
                adapter.freeze(name)
    out = Path(tempfile.mkdtemp(prefix="noln-states-"))
    cfg = make_config(model="bench", data="bench", out=str(out), steps=args.steps,
                      batch_size=args.batch, micro_batch_size=args.micro, ctx=blocks.shape[1],
                      lr=1e-4, warmup_steps=2, aux_weight=aux, checkpoint_every=10**9,
                      progress=False, precision="bf16" if device.type == "cuda" else "fp32")
    Trainer(cfg, model, blocks, blocks[:1], out, adapter, FixedSchedule([]), eot_id=None).fit()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return float(np.median([r["dt"] for r in log if "dt" in r][args.warmup:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(throughput.SIZES), default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--micro", type=int, default=None)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="append a Markdown table here")
    args = ap.parse_args()
    args.compile = False
    device, base, blocks = throughput.setup(args)
    ctx = blocks.shape[1]
    res: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        times = throughput.plain_loop(copy.deepcopy(base), blocks, args, device)
        res.setdefault("plain", []).append(float(np.median(times[args.warmup:])))
        for aux in (0.0, 0.1):
            for state in STATES:
                key = f"noln, {state if state == 'mixed' else 'every site ' + state}, aux {aux}"
                res.setdefault(key, []).append(
                    noln_step_time(base, blocks, args, device, aux, state))
    plain = min(res["plain"])
    lines = [f"| loop ({args.size}, batch {args.batch} x {ctx}, {device.type}, "
             f"{torch.get_num_threads()} thread(s)) | ms/step (each round) | plain / this |",
             "| --- | --- | ---: |"]
    for key, v in res.items():
        lines.append(f"| {key} | {', '.join(f'{1e3 * x:.0f}' for x in v)} | "
                     f"{plain / min(v):.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        cmd = " ".join(["python bench/throughput_states.py", *sys.argv[1:]])
        with args.out.open("a") as f:
            f.write(f"Command: `{cmd}`\n\n{table}\n\n")


if __name__ == "__main__":
    main()

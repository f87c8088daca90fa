"""A short run saving often, twice in one process: checkpoints written on a background thread
(noln's default) and in the training thread (as before stop 45). Prints each run's ``time_s``
(summary.json) side by side: what the saves cost the run, and whether the steps slowed.

    python bench/checkpoint_overlap.py ~/.cache/noln/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data ../shared/data/corpus/train.jsonl --steps 12 --every 2 --out /root/noln-runs/diag
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial

import noln
import noln.train
from noln.checkpoint import CheckpointWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=2, help="checkpoint_every")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default=None, help="where the runs go (a temp folder inside)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="each round runs both, in the order ABBA... (load drifts)")
    args = parser.parse_args()
    rows = []
    ways = (("background thread", True), ("training thread", False))
    with tempfile.TemporaryDirectory(dir=args.out) as folder:
        for i in range(args.rounds):
            for name, background in ways if i % 2 == 0 else ways[::-1]:
                noln.train.CheckpointWriter = partial(CheckpointWriter, background=background)
                r = noln.remove_layernorm(args.model, args.data, f"{folder}/{i}-{background}",
                                          keep_ln=True, steps=args.steps, ctx=256,
                                          batch_size=args.batch_size, eval_tokens=512,
                                          checkpoint_every=args.every, export_format="hf",
                                          progress=False)
                rows.append((f"{name} (round {i + 1})", r.summary["time_s"]))
    parts = list(rows[0][1])
    print(f"{args.steps} steps of {args.batch_size} x 256 tokens, a checkpoint every "
          f"{args.every} steps (and at step 0), {args.model}")
    print("| checkpoints written on | " + " | ".join(parts) + " |")
    print("| --- |" + " ---: |" * len(parts))
    for name, t in rows:
        print(f"| {name} | " + " | ".join(f"{t[p]:.1f}" for p in parts) + " |")


if __name__ == "__main__":
    main()

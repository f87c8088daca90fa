"""Time one noln checkpoint write of a run's full state, with torch's zip CRC32 (as noln wrote
them before stop 45, and as a plain ``torch.save`` does) and without it (noln now), alternating,
in one process: the serialisation alone (``torch.save`` into /dev/null: the CPU's part, where the
CRC32 is), and the whole ``noln.checkpoint.save_atomic`` (torch.save, fsync, atomic rename),
which adds the disk and so varies with what the disk is still writing back.

The state is a model of ``--params`` float32 parameters in tensors of the shapes of a Llama
block, and AdamW's two moments for each: 1.6 GB for SmolLM2-135M, what a removal saves every
``checkpoint_every`` steps. Both ways load back to the same tensors (checked each round).

    python bench/checkpoint_write.py --params 134.5e6 --rounds 3 --dir /root/noln-runs/diag
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import noln.checkpoint as checkpoint


def run_state(params: float, width: int = 576) -> dict:
    """A run's checkpoint dict: weights and AdamW state, ``params`` numbers each."""
    shapes, total = [], 0
    while total < params:
        shape = (width * 8 // 3, width)  # one MLP matrix of a Llama block
        shapes.append(shape)
        total += shape[0] * shape[1]
    weights = {f"w{i}": torch.randn(s) for i, s in enumerate(shapes)}
    moments = {i: {"step": torch.tensor(100.0), "exp_avg": torch.randn(s),
                   "exp_avg_sq": torch.rand(s)} for i, s in enumerate(shapes)}
    return {"model": weights, "optimizer": {"state": moments, "param_groups": [
        {"params": list(moments), "lr": 3e-4}]}, "step": 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=134.5e6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    state = run_state(args.params)
    size = sum(t.numel() * t.element_size() for t in state["model"].values()) * 3
    ways = {"with CRC32 (torch's default)": lambda: nullcontext(),
            "without (noln)": checkpoint._no_crc32}
    seconds = {(name, part): [] for name in ways for part in ("serialise", "save")}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "last.pt"
        for _ in range(args.rounds):
            for name, switch in ways.items():
                checkpoint._no_crc32 = switch  # the one thing that differs
                start = time.perf_counter()
                with open(os.devnull, "wb") as sink, switch():
                    torch.save(state, sink)
                seconds[name, "serialise"].append(time.perf_counter() - start)
                start = time.perf_counter()
                checkpoint.save_atomic(state, path)
                seconds[name, "save"].append(time.perf_counter() - start)
                back = checkpoint.load_checkpoint(path)
                assert torch.equal(back["model"]["w0"], state["model"]["w0"])
    print(f"checkpoint of {size / 1e9:.2f} GB ({args.params / 1e6:.1f}M parameters, weights + "
          f"AdamW), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    print("| write | part | median s | each round (s) | GB/s |")
    print("| --- | --- | ---: | --- | ---: |")
    for (name, part), times in seconds.items():
        median = statistics.median(times)
        what = {"serialise": "torch.save to /dev/null", "save": "save_atomic to disk"}[part]
        print(f"| {name} | {what} | {median:.2f} | {', '.join(f'{t:.2f}' for t in times)} | "
              f"{size / 1e9 / median:.2f} |")


if __name__ == "__main__":
    main()

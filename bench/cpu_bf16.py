"""What bf16 autocast buys on this CPU: tokens/s of a forward pass and of a training step, fp32
against ``torch.autocast("cpu", dtype=torch.bfloat16)``, alternating in one process.

Whether the CPU multiplies bf16 natively (AMX-BF16 / AVX512-BF16) is what ``--precision auto``
reads (``noln.precision.native_bf16``); without it PyTorch converts bf16 to fp32 around every
matmul. The report also gives how far bf16 moves the model's output (max |logit difference|,
CE difference on the same tokens).

    python bench/cpu_bf16.py --out docs/benchmarks/cpu_bf16.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from noln.data import load_blocks
from noln.loading import load_model
from noln.precision import cpu_flags, native_bf16

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT.parent / "shared" / "data" / "corpus" / "val.jsonl"
MODELS = {"ref-gpt2-6L": (str(ROOT.parent / "shared" / "models" / "ref-gpt2-6L"), 4, 256),
          "SmolLM2-135M": (str(Path.home() / ".cache" / "noln" / "models"
                               / "SmolLM2-135M-Instruct.Q4_1.gguf"), 1, 256)}


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def forward_time(model, ids, bf16: bool) -> float:
    t = time.perf_counter()
    with torch.inference_mode(), autocast(bf16):
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t


def step_time(model, opt, ids, bf16: bool) -> float:
    t = time.perf_counter()
    with autocast(bf16):
        logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=None, help="tokens per sequence (default 256)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per pass")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    cap = torch.backends.cpu.get_cpu_capability()
    auto = "bf16" if native_bf16("cpu") else "fp32"
    header = ("| model | tokens per pass | forward fp32 (tok/s) | forward bf16 (tok/s) | "
              "bf16 / fp32 | train step fp32 (tok/s) | train step bf16 (tok/s) | bf16 / fp32 | "
              "max \\|Δ logit\\| | Δ CE (nats) |")
    lines = ["# bf16 autocast on the CPU", "",
             f"Command: `{shlex.join(['python', *sys.argv])}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"(CPU capability {cap}), {torch.get_num_threads()} threads; relevant CPU flags: "
             f"{', '.join(flags) or 'none'}; native bf16: {native_bf16('cpu')} (so "
             f"`--precision auto` picks {auto} here). Load average at the start "
             f"{os.getloadavg()[0]:.2f}. Median of {args.repeats} alternating runs after one "
             "warm-up run of each.", "", header, "| --- |" + " ---: |" * 9]
    for name in args.models.split(","):
        path, batch, ctx = MODELS[name]
        batch, ctx = args.batch or batch, args.ctx or ctx
        model, tok = load_model(path)
        model.float()
        blocks = load_blocks(str(VAL), tok, ctx, max_tokens=batch * ctx)
        ids = torch.from_numpy(np.asarray(blocks[:batch], dtype=np.int64))
        n = ids.numel()
        model.eval()
        with torch.inference_mode():
            l32 = model(input_ids=ids).logits.float()
            with autocast(True):
                l16 = model(input_ids=ids).logits.float()
        ce = [F.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
              for lg in (l32, l16)]
        dlogit = (l32 - l16).abs().max().item()
        fwd = {False: [], True: []}
        for r in range(args.repeats + 1):
            for bf16 in (False, True):
                dt = forward_time(model, ids, bf16)
                if r:
                    fwd[bf16].append(n / dt)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        step = {False: [], True: []}
        for r in range(args.repeats + 1):
            for bf16 in (False, True):
                dt = step_time(model, opt, ids, bf16)
                if r:
                    step[bf16].append(n / dt)
        f32, f16 = statistics.median(fwd[False]), statistics.median(fwd[True])
        s32, s16 = statistics.median(step[False]), statistics.median(step[True])
        lines.append(f"| {name} | {batch} x {ctx} | {rate(f32)} | {rate(f16)} | {f16 / f32:.2f} | "
                     f"{rate(s32)} | {rate(s16)} | {s16 / s32:.2f} | {dlogit:.3f} | "
                     f"{ce[1] - ce[0]:+.4f} |")
        print(lines[-1], flush=True)
        del model, opt
    lines += ["", f"Load average at the end {os.getloadavg()[0]:.2f}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

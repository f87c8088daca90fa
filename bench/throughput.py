"""Training throughput of noln's removal loop vs a minimal plain PyTorch loop, same model.

Both train the same randomly initialised GPT-2 on the same random tokens with the same global
batch, micro-batch, dtype (bf16 autocast on a GPU, fp32 on CPU), fused AdamW (on a CPU too),
grad clipping and one host sync per step (the loss, for logging). The plain loop is what a
researcher would write by hand around ``GPT2LMHeadModel``; noln's is ``noln.train.Trainer`` with its
FakeNorms installed and a fixed schedule freezing every site in the first half of the timed
steps (the second half runs with no norm left), the aux loss on (``--aux-weight``), nothing
written but the log. The ratio noln / plain is the cost of FakeNorm and the trainer's
bookkeeping (goal: >= 0.95); it is also given over the steps without a removal, since each
removal adds two probe forward passes (the held-out CE before and after it), which a real run
spreads over hundreds of steps.

On a GPU the report adds model FLOP utilisation: (6 N + 12 L d T) FLOPs per token (N the
parameters doing matmuls: all but the position embeddings, the tied unembedding counted once),
over the bf16 dense peak of the card.

    python bench/throughput.py --out docs/benchmarks/throughput.md              # CPU, small
    python bench/throughput.py --size gpt2 --out docs/benchmarks/throughput_gpu.md  # GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZES = {  # name: (layers, d_model, heads, ctx, vocab)
    "tiny": (4, 256, 4, 256, 8192),
    "gpt2": (12, 768, 12, 1024, 50257),
    "gpt2-medium": (24, 1024, 16, 1024, 50257),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build(size: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, d, heads, ctx, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, n_positions=ctx, vocab_size=vocab,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def setup(args) -> tuple[torch.device, torch.nn.Module, np.ndarray]:
    """Device, model and random token blocks for a benchmark's ``args`` (sizes default to
    GPT-2 small on a GPU, the tiny model on CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.size = args.size or ("gpt2" if device.type == "cuda" else "tiny")
    args.batch = args.batch or (32 if device.type == "cuda" else 8)
    args.micro = args.micro or (16 if device.type == "cuda" else 8)
    base = build(args.size)
    ctx, vocab = base.config.n_positions, base.config.vocab_size
    blocks = np.random.default_rng(0).integers(0, vocab, size=(args.steps * args.batch, ctx),
                                               dtype=np.int32)
    return device, base, blocks


def flops_per_token(model) -> float:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.n_positions


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(model, blocks: np.ndarray, args, device: torch.device) -> list[float]:
    """Seconds per step of the loop one would write by hand."""
    from noln.train import param_groups

    model = model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=True)
    fwd = torch.compile(model) if args.compile else model
    bf16 = device.type == "cuda"
    times = []
    for step in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        batch = blocks[step * args.batch:(step + 1) * args.batch]
        for i in range(0, args.batch, args.micro):
            x = torch.from_numpy(batch[i:i + args.micro].astype(np.int64)).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = fwd(input_ids=x).logits[:, :-1].float()
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            (loss / (args.batch // args.micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the one host sync: the logged loss
        times.append(time.perf_counter() - t0)
    sync(device)
    return times


def noln_loop(model, blocks: np.ndarray, args, device: torch.device) -> list[float]:
    """Seconds per step of noln's Trainer (from its log), every site frozen mid-run."""
    from noln.arch import install
    from noln.config import make_config
    from noln.schedule import FixedSchedule
    from noln.train import Trainer

    adapter = install(model)
    sites = adapter.site_names()
    first, last = args.warmup, args.warmup + (args.steps - args.warmup) // 2  # then frozen
    events = [(first + (last - first) * i // max(1, len(sites) - 1), s)
              for i, s in enumerate(sites)]
    out = Path(tempfile.mkdtemp(prefix="noln-throughput-"))
    cfg = make_config(model="bench", data="bench", out=str(out), steps=args.steps,
                      batch_size=args.batch, micro_batch_size=args.micro, ctx=blocks.shape[1],
                      lr=1e-4, warmup_steps=2, aux_weight=args.aux_weight,
                      checkpoint_every=10**9, compile=args.compile, progress=False,
                      precision="bf16" if device.type == "cuda" else "fp32")
    trainer = Trainer(cfg, model, blocks, blocks[:1], out, adapter, FixedSchedule(events),
                      eot_id=None)
    trainer.fit()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(adapter.frozen_sites()) == len(sites), "not every site was frozen"
    noln_loop.event_steps = {r["step"] for r in log if r.get("event") == "remove"}
    return [r["dt"] for r in log if "dt" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default=None,
                    help="model size (default: gpt2 on a GPU, tiny on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--micro", type=int, default=None, help="sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8, help="steps left out of the timing")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each loop")
    ap.add_argument("--aux-weight", type=float, default=0.1)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="append a Markdown report here")
    args = ap.parse_args()
    device, base, blocks = setup(args)
    ctx = blocks.shape[1]
    tokens_per_step = args.batch * ctx
    runs: dict[str, list[float]] = {"plain": [], "noln": []}
    steady: list[float] = []  # noln, steps with no removal event
    event_cost: list[float] = []  # noln, extra seconds of a step with removals, per removal
    for r in range(args.repeat):
        for name, loop in (("plain", plain_loop), ("noln", noln_loop)):
            all_times = loop(copy.deepcopy(base), blocks, args, device)
            times = all_times[args.warmup:]
            tps = tokens_per_step * len(times) / sum(times)
            runs[name].append(tps)
            print(f"run {r} {name:5s}: {tps:12,.0f} tok/s ({np.median(times) * 1e3:.1f} ms/step "
                  "median)", flush=True)
            if name == "noln":
                events = noln_loop.event_steps
                quiet = [t for i, t in enumerate(all_times)
                         if i >= args.warmup and i not in events]
                busy = [t for i, t in enumerate(all_times) if i >= args.warmup and i in events]
                steady.append(tokens_per_step * len(quiet) / sum(quiet))
                if busy:
                    event_cost.append((sum(busy) - len(busy) * float(np.median(quiet)))
                                      / len(events))
                print(f"        noln without removal steps: {steady[-1]:12,.0f} tok/s",
                      flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    best = {k: max(v) for k, v in runs.items()}
    ratio = best["noln"] / best["plain"]
    steady_ratio = max(steady) / best["plain"]
    fpt = flops_per_token(base)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or \
        platform.machine()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = {k: v * fpt / peak for k, v in best.items()} if peak else None
    print(f"noln / plain = {ratio:.3f} (steps without removals: {steady_ratio:.3f})"
          + (f"; MFU plain {mfu['plain']:.1%}, noln "
                                            f"{mfu['noln']:.1%}" if mfu else ""))
    if args.out:
        n_params = sum(p.numel() for p in base.parameters())
        cmd = " ".join(["python bench/throughput.py", *sys.argv[1:]])
        lines = [
            f"### {args.size} ({n_params / 1e6:.0f}M parameters), {device.type}: {name}",
            "",
            f"Command: `{cmd}`; torch {torch.__version__}, "
            f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, batch {args.batch} x "
            f"{ctx} tokens (micro-batch {args.micro}), {args.steps} steps of which the first "
            f"{args.warmup} are not timed, best of {args.repeat} alternating runs, "
            f"compile {'on' if args.compile else 'off'}"
            + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads, load "
               f"average {os.getloadavg()[0]:.1f}") + ".",
            "",
            "| loop | tokens/s (each run) | best | vs plain |"
            + (" MFU |" if mfu else ""),
            "| --- | --- | ---: | ---: |" + (" ---: |" if mfu else ""),
        ]
        for k in ("plain", "noln"):
            each = ", ".join(f"{v:,.0f}" for v in runs[k])
            lines.append(f"| {k} | {each} | {best[k]:,.0f} | {best[k] / best['plain']:.3f} |"
                         + (f" {mfu[k]:.1%} |" if mfu else ""))
        each = ", ".join(f"{v:,.0f}" for v in steady)
        lines.append(f"| noln, steps without a removal | {each} | {max(steady):,.0f} | "
                     f"{steady_ratio:.3f} |" + (f" {max(steady) * fpt / peak:.1%} |" if mfu
                                                 else ""))
        if event_cost:
            cost = min(event_cost)
            lines += ["", "A removal (freeze + the probe batch's CE before and after) adds "
                      + (f"{1e3 * cost:.0f} ms to its step." if cost > 0 else
                         "no time measurable above the step-to-step noise.")]
        if mfu:
            lines += ["", f"FLOPs per token {fpt / 1e9:.3f} G; peak {peak / 1e12:.0f} TFLOP/s "
                      "(bf16 dense)."]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n\n")
        print(f"appended to {args.out}")
    if not math.isfinite(ratio):
        raise SystemExit("no timing")


if __name__ == "__main__":
    main()

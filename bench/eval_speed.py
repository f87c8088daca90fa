"""Evaluation speed on the reference model: HellaSwag items/s and CE tokens/s.

HellaSwag: noln's scorer (the four endings of an item in one right-padded batch with other
items, longest first, only the scored positions through the unembedding) at several batch sizes
and the automatic one, against a naive scorer (one ending per forward pass, full logits), on the
same items. CE: ``token_losses`` at several batch sizes, and the one-pass ``evaluate_blocks``
(CE + residual norms + rare tokens, and with a reference also KL / JS / agreement). Every timing
is the best of ``--repeats`` runs; the machine is shared, so the load average is recorded.

    python bench/eval_speed.py --out docs/benchmarks/eval_speed.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from noln.data import load_blocks
from noln.evaluate.faithfulness import auto_batch_size, evaluate_blocks
from noln.evaluate.hellaswag import batches, encode_items, load_hellaswag, score_items
from noln.evaluate.loss import logits_budget, token_losses
from noln.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REF_MODEL = SHARED / "models" / "ref-gpt2-6L"
HELLASWAG = SHARED / "data" / "hellaswag" / "validation.jsonl"
VAL = SHARED / "data" / "corpus" / "val.jsonl"


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def naive_hellaswag(model, tokenizer, items) -> np.ndarray:
    """One forward pass per ending, full logits: what a first implementation does."""
    out = np.zeros((len(items), 4))
    for i, enc in enumerate(encode_items(items, tokenizer)):
        for j, end in enumerate(enc.endings):
            ids = torch.tensor([(enc.ctx + end)[-257:]])
            logp = F.log_softmax(model(ids[:, :-1]).logits[0].float(), -1)
            targets = ids[0, 1:]
            out[i, j] = logp[torch.arange(len(targets)), targets][-len(end):].sum().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=400, help="HellaSwag items for batched runs")
    ap.add_argument("--naive-items", type=int, default=100, help="items for the naive scorer")
    ap.add_argument("--chunks", type=int, default=64, help="256-token chunks of val.jsonl for CE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    args = ap.parse_args()
    if not REF_MODEL.exists():
        sys.exit(f"needs the reference model at {REF_MODEL} (the ../shared folder)")
    torch.set_num_threads(args.threads)
    model, tok = load_model(REF_MODEL)
    items = load_hellaswag(HELLASWAG)[: args.items]
    vocab = model.config.vocab_size
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    # ------------------------------------------------------------------ HellaSwag
    say("## HellaSwag (reference model, ctx 256, vocab 8,192)")
    say()
    say(f"First {len(items)} validation items (naive: first {args.naive_items}).")
    say()
    say("| scorer | batch (items per forward) | items/s | speed-up vs naive |")
    say("| --- | --- | ---: | ---: |")
    naive_items = items[: args.naive_items]
    t_naive = best_time(lambda: naive_hellaswag(model, tok, naive_items), args.repeats)
    naive_rate = len(naive_items) / t_naive
    say(f"| naive: 1 ending per pass, full logits | 1 ending | {naive_rate:.1f} | 1.00x |")
    check = score_items(model, tok, naive_items).loglik
    diff = np.abs(check - naive_hellaswag(model, tok, naive_items)).max()
    encoded = encode_items(items, tok)
    lengths = [max(len(e.ctx) + len(x) for x in e.endings) - 1 for e in encoded]
    costs = [sum(len(x) for x in e.endings) for e in encoded]
    budget = logits_budget(torch.device("cpu")) // vocab
    auto = [len(b) for b in batches(lengths, costs, None, budget)]
    for bs in (1, 4, 8, 32, None):
        t = best_time(lambda bs=bs: score_items(model, tok, items, batch_size=bs), args.repeats)
        rate = len(items) / t
        label = (f"auto: {min(auto)}-{max(auto)} (logits <= 32 MB)" if bs is None else str(bs))
        say(f"| noln batched | {label} | {rate:.1f} | {rate / naive_rate:.2f}x |")
    say()
    say(f"Largest |batched - naive| summed log-prob on the naive items: {diff:.2e} nats.")
    say()

    # ------------------------------------------------------------------ CE
    blocks = load_blocks(str(VAL), tok, 256)[: args.chunks]
    n_tok = blocks.shape[0] * blocks.shape[1]
    say(f"## Cross-entropy ({blocks.shape[0]} chunks x 256 tokens of corpus/val.jsonl)")
    say()
    say("| what | batch (chunks) | tokens/s |")
    say("| --- | --- | ---: |")
    auto_bs = auto_batch_size(256, vocab, torch.device("cpu"))
    for bs in sorted({1, 8, 32, auto_bs}):
        t = best_time(lambda bs=bs: token_losses(model, blocks, batch_size=bs), args.repeats)
        say(f"| `token_losses` (CE only) | {bs}{' (auto)' if bs == auto_bs else ''} | "
            f"{n_tok / t:,.0f} |")
    t = best_time(lambda: evaluate_blocks({"m": model}, blocks, tokenizer=tok), args.repeats)
    say(f"| `evaluate_blocks`, 1 model (CE + residual norms + rare tokens) | {auto_bs} | "
        f"{n_tok / t:,.0f} |")
    t = best_time(lambda: evaluate_blocks({"ref": model, "m": model}, blocks, reference="ref",
                                          tokenizer=tok), args.repeats)
    say(f"| `evaluate_blocks`, model + reference (adds KL / JS / top-1), per model | {auto_bs} "
        f"| {2 * n_tok / t:,.0f} |")
    say()

    load = os.getloadavg()
    omp = os.environ.get("OMP_NUM_THREADS")
    threads_env = f"OMP_NUM_THREADS={omp} " if omp else ""
    header = [
        "# Evaluation speed",
        "",
        f"Command: `{threads_env}{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s); load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (the machine is shared: absolute rates "
        "vary, ratios less). Best of "
        f"{args.repeats} runs.",
        "",
    ]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header + lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

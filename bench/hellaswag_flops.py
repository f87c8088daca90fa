"""The arithmetic HellaSwag needs under noln's scorer and under lm-evaluation-harness's: an upper
bound on how much faster noln can be at the same precision, whatever its kernels do.

Both score the same items with the same model; they differ in what goes through it:

- lm-eval (``HFLM._loglikelihood_tokens``, 0.4.x): one row per (context, ending) request,
  ``(ctx + ending)[-(n_ctx + 1):][:-1]``, requests sorted by length (longest first),
  ``--batch_size`` rows right-padded to the longest; the whole padded batch goes through the
  body and the unembedding, and ``log_softmax`` runs over every padded position and the whole
  vocabulary (its one-token-continuation cache does not apply: endings are several tokens).
- noln (``noln.evaluate.hellaswag.score_items``): one packed row per item (the context once,
  the four endings after it), batched by noln's own rule; the body sees the packed rows with
  their padding, the unembedding and the log-softmax only the positions that predict an ending
  token.

FLOPs per multiply-add are 2. Body: 2 x (the 2-D weights of the blocks) per input token.
Attention scores and mixing: 4 x d_attn per (query, key) pair, causal for lm-eval (keys up to
the query), the full padded square for noln (an additive 4-D mask; SDPA cannot skip it).
Unembedding: 2 x d x vocab per logit row. Nothing is run: the model is built on the meta device.

    python bench/hellaswag_flops.py --model ../shared/models/ref-gpt2-6L \
        --hellaswag ../shared/data/hellaswag/validation.jsonl --limit 2000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from noln.arch import context_length
from noln.evaluate.hellaswag import (
    _pack,
    _row,
    batches,
    encode_items,
    load_hellaswag,
    token_budget,
)
from noln.evaluate.loss import logits_budget
from noln.pretrained import load_tokenizer


def body_weights(model: torch.nn.Module) -> int:
    """Multiply-adds per token in the blocks' matrices (embeddings and unembedding excluded)."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    skip |= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if p.ndim == 2 and id(p) not in skip)


def count(folder: str, hellaswag: str, limit: int, lm_eval_batch: int) -> dict:
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tokenizer = load_tokenizer(folder)
    n_ctx = context_length(model)
    d = model.get_input_embeddings().weight.shape[1]
    vocab = model.get_output_embeddings().weight.shape[0]
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    d_attn = heads * getattr(config, "head_dim", None) if getattr(config, "head_dim", None) \
        else d
    per_token, per_logit = 2 * body_weights(model), 2 * d * vocab
    per_pair = 4 * d_attn * layers

    items = load_hellaswag(hellaswag, limit=limit)
    encoded = encode_items(items, tokenizer)

    # lm-eval: one row per request, sorted longest first, fixed batches, padded
    rows = sorted((len(whole) - 1 for e in encoded for whole, _ in
                   (_row(e.ctx, end, n_ctx) for end in e.endings)), reverse=True)
    peer = {"rows": len(rows), "real_tokens": sum(rows), "body_tokens": 0, "logit_rows": 0,
            "attn_pairs": 0}
    for i in range(0, len(rows), lm_eval_batch):
        batch = rows[i:i + lm_eval_batch]
        width = batch[0]
        peer["body_tokens"] += width * len(batch)
        peer["logit_rows"] += width * len(batch)
        peer["attn_pairs"] += len(batch) * width * (width + 1) // 2

    # noln: packed rows, its own batching rule (score_items with batch_size None, CPU)
    fits = [len(e.ctx) + max(len(x) for x in e.endings) <= n_ctx + 1 for e in encoded]
    packed = [_pack(e) for e, ok in zip(encoded, fits, strict=True) if ok]
    lengths = [len(p.ids) for p in packed]
    costs = [len(p.scored) for p in packed]
    cpu = torch.device("cpu")
    ours = {"rows": len(packed), "real_tokens": sum(lengths), "body_tokens": 0,
            "logit_rows": sum(costs), "attn_pairs": 0, "unpacked_items": len(encoded) - len(packed)}
    for batch in batches(lengths, costs, None, 8 * (logits_budget(cpu) // vocab),
                         token_budget(cpu)):
        width = max(lengths[i] for i in batch)
        ours["body_tokens"] += width * len(batch)
        ours["attn_pairs"] += len(batch) * width * width

    def flops(c: dict) -> dict:
        parts = {"body": c["body_tokens"] * per_token, "attention": c["attn_pairs"] * per_pair,
                 "unembedding": c["logit_rows"] * per_logit}
        return {**{k: v / 1e9 for k, v in parts.items()}, "total": sum(parts.values()) / 1e9,
                "log_softmax_elements": c["logit_rows"] * vocab}

    result = {"model": folder, "items": len(items), "n_ctx": n_ctx, "d": d, "vocab": vocab,
              "lm_eval": {**peer, **flops(peer)}, "noln": {**ours, **flops(ours)}}
    result["bound"] = result["lm_eval"]["total"] / result["noln"]["total"]
    result["log_softmax_ratio"] = (result["lm_eval"]["log_softmax_elements"]
                                   / result["noln"]["log_softmax_elements"])
    return result


def markdown(results: list[dict]) -> str:
    lines = ["| model | items | scheme | body tokens | logit rows | GFLOP body | attention | "
             "unembedding | total | lm-eval / noln |", "| --- | ---: | --- |" + " ---: |" * 7]
    for r in results:
        for name in ("lm_eval", "noln"):
            c = r[name]
            ratio = f"**{r['bound']:.2f}x**" if name == "noln" else ""
            lines.append(f"| {Path(r['model']).name} | {r['items']:,} | {name} | "
                         f"{c['body_tokens']:,} | {c['logit_rows']:,} | {c['body']:,.0f} | "
                         f"{c['attention']:,.0f} | {c['unembedding']:,.0f} | {c['total']:,.0f} | "
                         f"{ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True,
                    help="a Hugging Face folder (repeatable; a GGUF: its noln cache folder)")
    ap.add_argument("--hellaswag", required=True)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--lm-eval-batch", type=int, default=32)
    args = ap.parse_args()
    results = [count(m, args.hellaswag, args.limit, args.lm_eval_batch) for m in args.model]
    print(markdown(results))
    for r in results:
        print(f"{Path(r['model']).name}: log-softmax elements lm-eval / noln "
              f"{r['log_softmax_ratio']:.2f}x; padding lm-eval "
              f"{1 - r['lm_eval']['real_tokens'] / r['lm_eval']['body_tokens']:.1%}, noln "
              f"{1 - r['noln']['real_tokens'] / r['noln']['body_tokens']:.1%}; "
              "items noln scores unpacked: "
              f"{r['noln']['unpacked_items']}")


if __name__ == "__main__":
    main()

"""How closely a model follows a reference model on the same tokens, and where it does not.

One pass over the token blocks runs every model on each batch and collects:

- per-token cross-entropy of each model (the same numbers as ``loss.token_losses``);
- against the reference: mean KL(reference || model), Jensen-Shannon divergence, top-1
  agreement, and the CE difference at each position of the chunk;
- the residual-stream L2 norm per layer at position 0 and at the other positions (GPT-2's first
  token carries a residual norm tens of times the typical one; a no-LN model should lose it);
- a rare-token report: the target tokens with the highest mean CE, the ones that add most to the
  gap to the reference (paper 2: a handful of tokens unseen in fine-tuning, CE > 50, dominated
  the no-LN model's mean), and the median next to the mean.

A model with fixed scales for its norms can overflow (inf/nan) on a rare chunk. Its CE says how
many and the mean over the rest (``CEResult``); faithfulness, residual norms and rare tokens are
taken over the chunks that *every* model keeps finite, and each model's CE over those chunks is
recorded too (``CEResult.shared_mean``), so models are compared on the same text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from noln.arch import final_norm
from noln.data import check_blocks
from noln.errors import NolnError
from noln.evaluate.hellaswag import accepts
from noln.evaluate.loss import CEResult, logits_budget, model_device, summarize
from noln.progress import token_progress

ROWS_BUDGET = 2**22  # elements per slice in the divergence arithmetic, to bound temporaries


def auto_batch_size(ctx: int, vocab: int, device: torch.device) -> int:
    """Chunks per forward pass so that one model's logits stay within ``logits_budget``."""
    return max(1, min(256, logits_budget(device) // (ctx * vocab)))


# ----------------------------------------------------------------------------- results


@dataclass
class ResidualNorms:
    """Mean L2 norm of the residual stream per layer, at position 0 and at positions 1..ctx-1."""
    labels: list[str]  # "embed", "block 1", ..., "block L" (the residual entering the final norm)
    pos0: list[float]
    rest: list[float]

    @property
    def ratio(self) -> list[float]:
        return [a / b if b else float("nan") for a, b in zip(self.pos0, self.rest, strict=True)]

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Faithfulness:
    """Agreement of a model with the reference, averaged over every predicted token (of the
    chunks every model keeps finite, where one overflows on some: ``n_tokens`` says how many)."""
    kl: float  # KL(reference || model), nats
    js: float  # Jensen-Shannon divergence, nats (at most ln 2)
    top1: float  # fraction of positions where both models' most likely next token is the same
    ce_diff: float  # mean CE(model) - CE(reference), nats
    ce_diff_ci95: float  # half-width, from per-chunk paired differences
    ce_diff_by_position: list[float]  # mean CE difference at each predicted position 1..ctx-1
    n_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenStat:
    id: int
    token: str
    count: int
    ce: float  # mean CE of this target token in the model
    ce_reference: float | None  # ... and in the reference
    contribution: float  # nats this token adds to the mean CE (or to the gap to the reference)


@dataclass
class RareTokenReport:
    mean: float
    median: float
    max: float
    n_above: int  # predicted tokens with CE above ``threshold``
    threshold: float
    reference_mean: float | None = None
    reference_median: float | None = None
    reference_max: float | None = None
    reference_n_above: int | None = None
    highest: list[TokenStat] = field(default_factory=list)  # by mean CE in the model
    largest_gap: list[TokenStat] = field(default_factory=list)  # by contribution to the gap

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BlockReport:
    """Everything measured for one model on one set of token blocks."""
    ce: CEResult
    rare_tokens: RareTokenReport
    norms: ResidualNorms | None = None
    faithfulness: Faithfulness | None = None  # None for the reference itself

    def to_dict(self) -> dict:
        return {"ce": self.ce.to_dict(), "rare_tokens": self.rare_tokens.to_dict(),
                "residual_norms": self.norms.to_dict() if self.norms else None,
                "faithfulness": self.faithfulness.to_dict() if self.faithfulness else None}


# ----------------------------------------------------------------------------- forward


def _forward(model: torch.nn.Module, ids: torch.Tensor,
             hidden: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Logits ``[B, T, V]`` and, if asked, the residual stream per layer."""
    captured: list[torch.Tensor] = []
    # the final norm's input is the last residual; HF's last hidden state is its *output*,
    # which hides the residual's scale
    norm = final_norm(model) if hidden else None
    handle = None
    if norm is not None:
        handle = norm.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    kwargs = {"use_cache": False, "output_hidden_states": hidden}
    kwargs = {k: v for k, v in kwargs.items() if accepts(model, k) and (v or k == "use_cache")}
    try:
        out = model(input_ids=ids, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    logits = out.logits if hasattr(out, "logits") else out
    states = getattr(out, "hidden_states", None) if hidden else None
    if states is not None:
        states = list(states)
        if captured:
            states[-1] = captured[-1]  # the residual entering the final norm, not its output
    return logits, states


def _divergences(logp_ref: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(ref || model) and JS divergence, in slices to bound the temporaries."""
    rows = max(1, ROWS_BUDGET // logp.shape[-1])
    kl, js = [], []
    for i in range(0, len(logp), rows):
        a, b = logp_ref[i : i + rows], logp[i : i + rows]
        pa, pb = a.exp(), b.exp()
        log_m = torch.logaddexp(a, b) - math.log(2)
        kl.append((pa * (a - b)).sum(-1))
        js.append(0.5 * (pa * (a - log_m)).sum(-1) + 0.5 * (pb * (b - log_m)).sum(-1))
    return torch.cat(kl), torch.cat(js)


# ----------------------------------------------------------------------------- the pass


def _rare_tokens(targets: torch.Tensor, ce: torch.Tensor, ce_ref: torch.Tensor | None,
                 tokenizer, top_k: int, threshold: float) -> RareTokenReport:
    ids = targets.flatten().long()
    n = len(ids)
    vocab = int(ids.max()) + 1
    count = torch.bincount(ids, minlength=vocab)
    seen = count > 0

    def per_token(losses: torch.Tensor) -> torch.Tensor:
        return torch.bincount(ids, weights=losses.flatten().double(), minlength=vocab)

    total = per_token(ce)
    total_ref = per_token(ce_ref) if ce_ref is not None else None
    unseen = torch.tensor(-math.inf, dtype=total.dtype)
    mean_tok = torch.where(seen, total / count.clamp(min=1), unseen)

    def stat(t: int, contribution: float) -> TokenStat:
        token = tokenizer.decode([t]) if tokenizer is not None else str(t)
        if "\ufffd" in token:  # a lone byte of a multi-byte character: show the BPE symbol
            token = tokenizer.convert_ids_to_tokens(t)
        return TokenStat(id=t, token=token, count=int(count[t]), ce=float(total[t] / count[t]),
                         ce_reference=float(total_ref[t] / count[t]) if total_ref is not None
                         else None, contribution=contribution)

    k = min(top_k, int(seen.sum()))
    highest = [stat(t, float(total[t]) / n) for t in mean_tok.topk(k).indices.tolist()]
    report = RareTokenReport(mean=float(ce.double().mean()), median=float(ce.median()),
                             max=float(ce.max()), n_above=int((ce > threshold).sum()),
                             threshold=threshold, highest=highest)
    if ce_ref is not None:
        gap = torch.where(seen, (total - total_ref) / n, unseen)
        report.largest_gap = [stat(t, float(gap[t])) for t in gap.topk(k).indices.tolist()]
        report.reference_mean = float(ce_ref.double().mean())
        report.reference_median = float(ce_ref.median())
        report.reference_max = float(ce_ref.max())
        report.reference_n_above = int((ce_ref > threshold).sum())
    return report


@torch.inference_mode()
def evaluate_blocks(models: dict[str, torch.nn.Module], blocks: np.ndarray | torch.Tensor,
                    reference: str | None = None, tokenizer=None, batch_size: int | None = None,
                    norms: bool = True, top_k: int = 10, threshold: float = 20.0,
                    progress: bool = False, description: str = "") -> dict[str, BlockReport]:
    """CE, rare tokens, residual norms and (against ``models[reference]``) faithfulness of every
    model on the same ``[n, ctx]`` blocks, each batch run through all models in turn."""
    if reference is not None and reference not in models:
        raise NolnError(f"reference '{reference}' is not one of the models ({', '.join(models)})")
    blocks = torch.from_numpy(check_blocks(blocks, models))
    n, ctx = blocks.shape
    if batch_size is None:
        vocab = max(getattr(getattr(m, "config", None), "vocab_size", 0) or 50257
                    for m in models.values())
        batch_size = auto_batch_size(ctx, vocab, model_device(next(iter(models.values()))))
    names = list(models)
    others = [m for m in names if m != reference] if reference is not None else []
    was_training = {m: models[m].training for m in names}
    for m in names:
        models[m].eval()

    ce: dict[str, list[torch.Tensor]] = {m: [] for m in names}
    # sums per chunk (a model that overflows on some is compared on the others), kept on each
    # model's device: no host sync per batch
    kl: dict[str, list[torch.Tensor]] = {m: [] for m in others}
    js: dict[str, list[torch.Tensor]] = {m: [] for m in others}
    agree: dict[str, list[torch.Tensor]] = {m: [] for m in others}
    norm_pos0: dict[str, list[torch.Tensor]] = {m: [] for m in names}  # [layers, chunks]
    norm_rest: dict[str, list[torch.Tensor]] = {m: [] for m in names}

    total = n * ctx * len(names)  # tokens through a model
    with token_progress(description or "evaluating", total, enabled=progress) as bar:
        for i in range(0, n, batch_size):
            x = blocks[i : i + batch_size]
            targets = x[:, 1:].flatten()
            ref_logp = ref_top = None
            for m in [reference, *others] if reference is not None else names:
                device = model_device(models[m])
                logits, states = _forward(models[m], x.to(device), hidden=norms)
                logits = logits[:, :-1].flatten(0, 1)
                # bf16 -> fp32
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                logp = F.log_softmax(logits, dim=-1)
                del logits
                nll = -logp.gather(1, targets.to(device)[:, None])[:, 0]
                ce[m].append(nll.view(len(x), -1).cpu())
                if states is not None:
                    h = torch.stack([s.float().norm(dim=-1) for s in states]).double().cpu()
                    norm_pos0[m].append(h[:, :, 0])
                    norm_rest[m].append(h[:, :, 1:].sum(2))
                if m == reference:
                    ref_logp, ref_top = logp, logp.argmax(-1)
                elif ref_logp is not None:
                    kl_rows, js_rows = _divergences(ref_logp.to(device), logp)
                    kl[m].append(kl_rows.double().view(len(x), -1).sum(1))
                    js[m].append(js_rows.double().view(len(x), -1).sum(1))
                    agree[m].append((logp.argmax(-1) == ref_top.to(device)).view(len(x), -1)
                                    .sum(1))
            bar.advance(len(x) * ctx * len(names))

    for m in names:
        models[m].train(was_training[m])
    losses = {m: torch.cat(ce[m]) for m in names}
    # a fixed-scale model can overflow on a rare chunk (inf/nan): what compares or averages
    # models is taken over the chunks every model keeps finite (all of them, where none
    # overflows; where every chunk overflows in some model, over all, and so nan)
    shared = torch.stack([torch.isfinite(losses[m]).all(1) for m in names]).all(0)
    rows = shared if shared.any() else torch.ones_like(shared)
    k = int(rows.sum())
    n_pred = k * (ctx - 1)
    reports = {}
    for m in names:
        model_norms = None
        if norm_pos0[m]:
            pos0, rest = torch.cat(norm_pos0[m], 1)[:, rows], torch.cat(norm_rest[m], 1)[:, rows]
            labels = ["embed", *[f"block {i}" for i in range(1, len(pos0))]]
            model_norms = ResidualNorms(labels=labels, pos0=(pos0.sum(1) / k).tolist(),
                                        rest=(rest.sum(1) / (k * (ctx - 1))).tolist())
        faith = None
        if m in others:
            diff = (losses[m].double() - losses[reference].double())[rows]
            per_chunk = diff.mean(1)
            ci = 1.96 * per_chunk.std().item() / math.sqrt(k) if k > 1 else float("nan")

            def over_rows(sums: list[torch.Tensor]) -> float:
                return torch.cat(sums).cpu()[rows].sum().item() / n_pred

            faith = Faithfulness(kl=over_rows(kl[m]), js=over_rows(js[m]),
                                 top1=over_rows(agree[m]), ce_diff=diff.mean().item(),
                                 ce_diff_ci95=ci, ce_diff_by_position=diff.mean(0).tolist(),
                                 n_tokens=n_pred)
        ref_losses = losses[reference][rows] if m in others else None
        reports[m] = BlockReport(
            ce=summarize(losses[m], shared), norms=model_norms, faithfulness=faith,
            rare_tokens=_rare_tokens(blocks[rows][:, 1:], losses[m][rows], ref_losses,
                                     tokenizer, top_k, threshold))
    return reports


def faithfulness(model: torch.nn.Module, reference: torch.nn.Module,
                 blocks: np.ndarray | torch.Tensor, batch_size: int | None = None) -> Faithfulness:
    """KL, JS, top-1 agreement and CE difference of ``model`` against ``reference``."""
    reports = evaluate_blocks({"reference": reference, "model": model}, blocks,
                              reference="reference", batch_size=batch_size, norms=False)
    return reports["model"].faithfulness

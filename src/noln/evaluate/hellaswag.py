"""HellaSwag zero-shot, scored the way lm-evaluation-harness scores it.

Each item is a context and four endings. An ending is scored as a continuation of the context
with a leading space: ``acc`` picks the ending with the largest sum of token log-probs,
``acc_norm`` the largest sum divided by the ending's length in UTF-8 bytes (without the leading
space; lm-evaluation-harness divides by ``len(ending)``, which is the same for the 99.5% of
endings that are ASCII). No BOS is prepended; a context too long for the model is cut from the
left, as the harness does.

Speed: the four endings of an item sit in one right-padded batch with several other items
(sorted by length so padding is small). Right padding needs no attention mask in a causal model:
pad tokens come after every real token, so no real position can see them.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from noln.data import encode_batch, is_local, read_jsonl
from noln.errors import NolnError
from noln.evaluate.loss import logits_budget, model_device

HUB_NAME = "Rowan/hellaswag"  # what lm-evaluation-harness loads ("hellaswag" redirects here)
HUB_ALIASES = ("hf", "hub", "hellaswag", HUB_NAME)
N_ENDINGS = 4


@dataclass
class Item:
    ind: int
    ctx: str
    endings: list[str]
    label: int


# ----------------------------------------------------------------------------- loading


def preprocess(text: str) -> str:
    """lm-evaluation-harness's cleaning of the raw Hub text (WikiHow ``[header]``-style tags)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _item(record: object, where: str, index: int, raw: bool) -> Item:
    """One validated item; ``raw`` records (the Hub's) get the harness's query construction."""
    if not isinstance(record, dict):
        raise NolnError(f"{where}: expected a JSON object with ctx, endings and label")
    for field in ("ctx", "endings", "label"):
        if field not in record:
            raise NolnError(f"{where}: field '{field}' is missing: each HellaSwag item needs "
                            "'ctx', 'endings' (4 strings) and 'label' (0-3)")
    endings = record["endings"]
    if (not isinstance(endings, list) or len(endings) != N_ENDINGS
            or not all(isinstance(e, str) and e.strip() for e in endings)):
        raise NolnError(f"{where}: field 'endings' must be a list of {N_ENDINGS} non-empty "
                        "strings")
    if not isinstance(record["ctx"], str):
        raise NolnError(f"{where}: field 'ctx' must be a string")
    label = record["label"]
    try:
        label = int(label)  # the Hub stores labels as strings ("3")
    except (TypeError, ValueError):
        label = None
    if label is None or isinstance(record["label"], bool) or not 0 <= label < N_ENDINGS:
        raise NolnError(f"{where}: field 'label' is {record['label']!r}, out of range: it must be "
                        f"an integer 0-{N_ENDINGS - 1} (the index of the right ending)")
    if raw and "ctx_a" in record:
        ctx = record["ctx_a"] + " " + str(record.get("ctx_b", "")).capitalize()
        ctx = preprocess(f"{record.get('activity_label', '')}: {ctx}")
        endings = [preprocess(e) for e in endings]
    else:
        ctx = record["ctx"]
    ind = record.get("ind", index)
    return Item(ind=ind if isinstance(ind, int) else index, ctx=ctx, endings=list(endings),
                label=label)


def _read_jsonl(path: Path) -> list[Item]:
    if not path.is_file():
        raise NolnError(f"HellaSwag file '{path}' does not exist: check the path, or pass 'hf' "
                        f"for the Hugging Face '{HUB_NAME}' validation split")
    items = []
    for lineno, record in read_jsonl(path, "one HellaSwag item per line"):
        items.append(_item(record, f"{path}:{lineno}", len(items), raw=False))
    if not items:
        raise NolnError(f"HellaSwag file '{path}' has no items")
    return items


def _read_hub(name: str, split: str) -> list[Item]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, missing split: one fix for the user
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise NolnError(f"cannot load HellaSwag '{name}' (split '{split}') from the Hugging Face "
                        f"Hub ({msg}); offline, pass --hellaswag PATH to a local "
                        "validation.jsonl") from None
    return [_item(r, f"{name}[{split}] row {i}", i, raw=True) for i, r in enumerate(ds)]


def load_hellaswag(source: str | Path | None = None, limit: int | None = None,
                   split: str = "validation") -> list[Item]:
    """Items from a local ``.jsonl`` (used as written) or a Hub dataset (default
    ``Rowan/hellaswag``, cleaned and joined as lm-evaluation-harness does)."""
    source = HUB_NAME if source is None or str(source) in HUB_ALIASES else str(source)
    items = _read_jsonl(Path(source)) if is_local(source) else _read_hub(source, split)
    return items[:limit] if limit is not None else items


# ----------------------------------------------------------------------------- scoring


@dataclass
class Encoded:
    """Token ids of one item: the context, and each ending with its leading space."""
    ctx: list[int]
    endings: list[list[int]]


def encode_items(items: list[Item], tokenizer) -> list[Encoded]:
    """Context and ``" " + ending`` encoded separately, no special tokens (the harness moves a
    context's trailing space onto the continuation, so we strip it)."""
    ctxs = encode_batch(tokenizer, [it.ctx.rstrip() for it in items])
    ends = encode_batch(tokenizer, [" " + e for it in items for e in it.endings])
    eot = tokenizer.eos_token_id
    out = []
    for i, ctx in enumerate(ctxs):
        if not ctx:  # nothing to condition on: the harness uses end-of-text as the context
            if eot is None:
                raise NolnError("a HellaSwag item has an empty context and the tokenizer has no "
                                "end-of-text token to stand in for it")
            ctx = [eot]
        out.append(Encoded(ctx=ctx, endings=ends[N_ENDINGS * i : N_ENDINGS * (i + 1)]))
    return out


def model_context(model: torch.nn.Module) -> int:
    """The longest input the model takes (GPT-2: ``n_positions``)."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise NolnError(f"cannot tell the context length of {type(model).__name__}: its config has no "
                    "n_positions or max_position_embeddings")


def _row(ctx: list[int], ending: list[int], n_ctx: int) -> tuple[list[int], int]:
    """Context + ending, cut to the harness's last ``n_ctx + 1`` tokens (the final token is only
    a target, never an input), and the input position that predicts the ending's first token."""
    if len(ending) > n_ctx:
        raise NolnError(f"a HellaSwag ending has {len(ending)} tokens, more than the model's "
                        f"context of {n_ctx}: use a model with a longer context")
    whole = (ctx + ending)[-(n_ctx + 1):]
    return whole, len(whole) - 1 - len(ending)


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` (custom, non-HF models may not)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _slices_by_mask(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes a boolean ``logits_to_keep`` (transformers >= 5 models do)."""
    from transformers import modeling_utils

    return (type(model).__module__.startswith("transformers.") and accepts(model, "logits_to_keep")
            and hasattr(modeling_utils, "slice_logits_to_keep"))


def scored_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[mask.sum(), vocab]`` at the ``True`` positions of ``mask``, row by row. Where the
    model allows, only those positions go through the unembedding (half the time of a small model
    is its vocabulary projection)."""
    kwargs = {"use_cache": False} if accepts(model, "use_cache") else {}
    if _slices_by_mask(model):
        kwargs["logits_to_keep"] = mask
    out = model(input_ids=ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    return logits if logits.ndim == 2 else logits[mask]


@dataclass
class Scores:
    """Per item and ending: summed log-prob, token count and byte length of the ending."""
    loglik: np.ndarray  # [n, 4] float64
    n_tokens: np.ndarray  # [n, 4]
    n_bytes: np.ndarray  # [n, 4]
    labels: np.ndarray  # [n]

    @property
    def pred(self) -> np.ndarray:
        return self.loglik.argmax(axis=1)

    @property
    def pred_norm(self) -> np.ndarray:
        return (self.loglik / self.n_bytes).argmax(axis=1)


def batches(lengths: list[int], costs: list[int], batch_size: int | None,
            budget: int) -> Iterable[list[int]]:
    """Item indices, longest first, ``batch_size`` items at a time, or (``None``) as many as keep
    the batch's logits (``costs``: positions per item that reach the unembedding) x vocab under
    ``budget``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    used = 0
    for i in order:
        full = len(batch) >= batch_size if batch_size is not None else used + costs[i] > budget
        if batch and full:
            yield batch
            batch, used = [], 0
        batch.append(i)
        used += costs[i]
    if batch:
        yield batch


@torch.inference_mode()
def score_items(model: torch.nn.Module, tokenizer, items: list[Item],
                batch_size: int | None = None, progress: bool = False) -> Scores:
    """Log-likelihood of every ending, ``batch_size`` items (4 rows each) per forward pass;
    ``None`` fits as many as keep the logits within ``logits_budget``."""
    from rich.progress import track

    was_training = model.training
    model.eval()
    device = model_device(model)
    n_ctx = model_context(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    encoded = encode_items(items, tokenizer)
    rows = [[_row(e.ctx, end, n_ctx) for end in e.endings] for e in encoded]
    lengths = [max(len(whole) - 1 for whole, _ in r) for r in rows]
    sliced = _slices_by_mask(model)  # then only the ending positions get logits
    costs = [sum(len(end) for end in e.endings) if sliced else N_ENDINGS * n
             for e, n in zip(encoded, lengths, strict=True)]

    n = len(items)
    loglik = np.zeros((n, N_ENDINGS))
    n_tokens = np.array([[len(end) for end in e.endings] for e in encoded])
    groups = list(batches(lengths, costs, batch_size, logits_budget(device) // vocab))
    for batch in track(groups, description="HellaSwag", disable=not progress, transient=True):
        flat = [(whole, start, len(end)) for i in batch
                for (whole, start), end in zip(rows[i], encoded[i].endings, strict=True)]
        width = max(len(whole) for whole, _, _ in flat)
        full = torch.full((len(flat), width), pad, dtype=torch.long)
        for r, (whole, _, _) in enumerate(flat):
            full[r, : len(whole)] = torch.tensor(whole)
        ids = full[:, :-1]
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for r, (_, start, k) in enumerate(flat):
            mask[r, start : start + k] = True
        targets = full[:, 1:][mask]  # row by row, position by position: the order of the logits
        logits = scored_logits(model, ids.to(device), mask.to(device))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logp = F.log_softmax(logits, dim=-1).gather(1, targets.to(device)[:, None])[:, 0]
        row_idx = mask.nonzero()[:, 0]
        sums = torch.zeros(len(flat), dtype=torch.float64).index_add_(
            0, row_idx, logp.double().cpu())
        loglik[batch] = sums.view(len(batch), N_ENDINGS).numpy()

    model.train(was_training)
    n_bytes = np.array([[len(e.encode("utf-8")) for e in it.endings] for it in items])
    return Scores(loglik=loglik, n_tokens=n_tokens, n_bytes=n_bytes,
                  labels=np.array([it.label for it in items]))


# ----------------------------------------------------------------------------- results


@dataclass
class HellaSwagResult:
    acc: float
    acc_norm: float
    acc_stderr: float  # standard error of the mean (sample std, as the harness reports)
    acc_norm_stderr: float
    n: int
    source: str = ""

    def to_dict(self) -> dict:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "acc_stderr": self.acc_stderr,
                "acc_norm_stderr": self.acc_norm_stderr, "n": self.n, "source": self.source}

    def __str__(self) -> str:
        return (f"acc {100 * self.acc:.2f}% ± {196 * self.acc_stderr:.2f}, acc_norm "
                f"{100 * self.acc_norm:.2f}% ± {196 * self.acc_norm_stderr:.2f} "
                f"(95% intervals, {self.n:,} items)")


def _mean_stderr(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    se = float(np.std(x, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return float(np.mean(x)), se


def summarize(scores: Scores, source: str = "") -> HellaSwagResult:
    acc, acc_se = _mean_stderr((scores.pred == scores.labels).astype(np.float64))
    norm, norm_se = _mean_stderr((scores.pred_norm == scores.labels).astype(np.float64))
    return HellaSwagResult(acc=acc, acc_norm=norm, acc_stderr=acc_se, acc_norm_stderr=norm_se,
                           n=len(scores.labels), source=source)


def evaluate_hellaswag(model: torch.nn.Module, tokenizer,
                       items: list[Item] | str | Path | None = None,
                       batch_size: int | None = None, limit: int | None = None,
                       progress: bool = False) -> HellaSwagResult:
    """``acc`` and ``acc_norm`` of ``model`` on ``items`` or a source (see ``load_hellaswag``)."""
    source = "" if isinstance(items, list) else str(items or HUB_NAME)
    if not isinstance(items, list):
        items = load_hellaswag(items, limit=limit)
    elif limit is not None:
        items = items[:limit]
    return summarize(score_items(model, tokenizer, items, batch_size, progress), source)

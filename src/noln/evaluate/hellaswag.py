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

import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import modeling_utils

from noln.arch import context_length
from noln.data import encode_batch, is_local, read_jsonl
from noln.errors import NolnError
from noln.evaluate.loss import accepts, logits_budget, model_device
from noln.hub import offline_reason, offline_unless_reachable
from noln.precision import compute_dtype
from noln.progress import token_progress

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
    offline_unless_reachable()
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, missing split: one fix for the user
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if offline_reason() is not None:
            msg += f"; the Hub is not reachable: {offline_reason()}"
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


def check_endings_fit(items: list[Item], tokenizer, n_ctx: int) -> None:
    """Every ending within the model's context: checked before a removal pair trains, whose
    table scores HellaSwag only at its end."""
    for e in encode_items(items, tokenizer):
        for ending in e.endings:
            _row(e.ctx, ending, n_ctx)


def _row(ctx: list[int], ending: list[int], n_ctx: int) -> tuple[list[int], int]:
    """Context + ending, cut to the harness's last ``n_ctx + 1`` tokens (the final token is only
    a target, never an input), and the input position that predicts the ending's first token."""
    if len(ending) > n_ctx:
        raise NolnError(f"a HellaSwag ending has {len(ending)} tokens, more than the model's "
                        f"context of {n_ctx}: use a model with a longer context")
    whole = (ctx + ending)[-(n_ctx + 1):]
    return whole, len(whole) - 1 - len(ending)


def _slices_by_mask(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes a boolean ``logits_to_keep`` (transformers >= 5 models do)."""
    return (type(model).__module__.startswith("transformers.") and accepts(model, "logits_to_keep")
            and hasattr(modeling_utils, "slice_logits_to_keep"))


def scored_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  **inputs: torch.Tensor) -> torch.Tensor:
    """Logits ``[mask.sum(), vocab]`` at the ``True`` positions of ``mask``, row by row. Where the
    model allows, only those positions go through the unembedding (half the time of a small model
    is its vocabulary projection). ``inputs``: more keyword inputs (position ids, a mask)."""
    kwargs = {"use_cache": False, **inputs} if accepts(model, "use_cache") else dict(inputs)
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
        return _choice(self.loglik)

    @property
    def pred_norm(self) -> np.ndarray:
        return _choice(self.loglik / self.n_bytes)

    @property
    def overflowed(self) -> int:
        """Items with an ending whose log-likelihood is not finite (the model overflowed)."""
        return int((~np.isfinite(self.loglik)).any(axis=1).sum())


def _choice(scores: np.ndarray) -> np.ndarray:
    """The best ending per item. An ending the model overflows on (nan: a norm-free model's
    forward past float range) is never its choice, and an item where every ending overflows
    gets none (-1, counted wrong); a plain argmax would pick the first nan."""
    scores = np.where(np.isnan(scores), -np.inf, scores)
    return np.where(np.isneginf(scores).all(axis=1), -1, scores.argmax(axis=1))


def batches(lengths: list[int], costs: list[int], batch_size: int | None,
            budget: int, token_budget: int | None = None) -> Iterable[list[int]]:
    """Item indices, longest first, ``batch_size`` items at a time, or (``None``) as many as keep
    the batch's logits (``costs``: positions per item that reach the unembedding) x vocab under
    ``budget`` and, if given, its padded input (items x the longest) under ``token_budget``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    used = 0
    for i in order:
        if batch_size is not None:
            full = len(batch) >= batch_size
        else:  # longest first: the batch's width is its first item's
            full = used + costs[i] > budget or (
                token_budget is not None and batch != []
                and (len(batch) + 1) * lengths[batch[0]] > token_budget)
        if batch and full:
            yield batch
            batch, used = [], 0
        batch.append(i)
        used += costs[i]
    if batch:
        yield batch


def _packs(model: torch.nn.Module) -> bool:
    """Whether the model takes the position ids and the 4-D attention mask that packing needs
    (transformers causal LMs do; a bare ``forward(input_ids)`` does not)."""
    return (type(model).__module__.startswith("transformers.")
            and accepts(model, "position_ids") and accepts(model, "attention_mask"))


@dataclass
class _Packed:
    """One item as a single row: the context, then each ending without its last token (that
    token is only a target). Ending j's tokens see the context and the ending's own earlier
    tokens, at positions ``len(ctx), len(ctx) + 1, ...``: exactly what they see unpacked."""
    ids: list[int]
    segment: list[int]  # 0 context, j + 1 ending j
    position: list[int]
    # every scored token: (index into ids of the position that predicts it, target, ending)
    scored: list[tuple[int, int, int]]


def _pack(e: Encoded) -> _Packed:
    c = len(e.ctx)
    ids, segment, position = list(e.ctx), [0] * c, list(range(c))
    scored = []
    for j, end in enumerate(e.endings):
        start = len(ids)
        scored.append((c - 1, end[0], j))  # the context's last token predicts every first token
        scored.extend((start + t - 1, end[t], j) for t in range(1, len(end)))
        ids += end[:-1]
        segment += [j + 1] * (len(end) - 1)
        position += range(c, c + len(end) - 1)
    return _Packed(ids, segment, position, scored)


def _packed_mask(rows: list[_Packed], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask ``[B, 1, width, width]``: 0 where a query may look, the dtype's
    minimum elsewhere (additive works with eager and SDPA attention alike). Query q sees key
    k <= q of the context or of its own ending; padding sees only itself."""
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, p in enumerate(rows):
        seg[r, : len(p.segment)] = torch.tensor(p.segment)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)  # [B, q, k]
    allowed = causal & same & (seg[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows: no fully masked softmax
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _score_packed(model: torch.nn.Module, packed: list[_Packed],
                  device: torch.device) -> np.ndarray:
    """Summed log-probs ``[len(packed), 4]`` of a batch of packed items, one forward pass.
    A padding position sees only itself at position 0, and holds its row's first token: it
    computes what the row's first position does. A padding token of its own (eos) at position
    0 can overflow in a norm-free model (SmolLM2's ``<|im_end|>`` did), and the real positions
    then get 0 x inf = nan from it in the attention's weighted sum, masked or not."""
    width = max(len(p.ids) for p in packed)
    ids = torch.zeros((len(packed), width), dtype=torch.long)
    pos = torch.zeros((len(packed), width), dtype=torch.long)
    keep = torch.zeros((len(packed), width), dtype=torch.bool)
    for r, p in enumerate(packed):
        ids[r] = p.ids[0]
        ids[r, : len(p.ids)] = torch.tensor(p.ids)
        pos[r, : len(p.ids)] = torch.tensor(p.position)
        keep[r, [i for i, _, _ in p.scored]] = True
    # logits come out row by row, position by position: map each kept position to its row
    row_of = torch.full(keep.shape, -1, dtype=torch.long)
    row_of[keep] = torch.arange(int(keep.sum()))
    at = torch.tensor([row_of[r, i] for r, p in enumerate(packed) for i, _, _ in p.scored])
    targets = torch.tensor([t for p in packed for _, t, _ in p.scored])
    ending = torch.tensor([N_ENDINGS * r + j for r, p in enumerate(packed) for _, _, j in p.scored])
    dtype = next(model.parameters()).dtype
    logits = scored_logits(model, ids.to(device), keep.to(device),
                           position_ids=pos.to(device),
                           attention_mask=_packed_mask(packed, width, dtype).to(device))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = F.log_softmax(logits, dim=-1)[at.to(device), targets.to(device)]
    sums = torch.zeros(N_ENDINGS * len(packed), dtype=torch.float64).index_add_(
        0, ending, logp.double().cpu())
    return sums.view(len(packed), N_ENDINGS).numpy()


def _score_rows(model: torch.nn.Module, rows: list[list[tuple[list[int], int]]],
                encoded: list[Encoded], device: torch.device) -> np.ndarray:
    """Summed log-probs ``[len(rows), 4]``: each (context + ending) its own row, padded on the
    right with its own first token (``_score_packed``: no padding token of its own)."""
    flat = [(whole, start, len(end)) for r, e in zip(rows, encoded, strict=True)
            for (whole, start), end in zip(r, e.endings, strict=True)]
    width = max(len(whole) for whole, _, _ in flat)
    full = torch.zeros((len(flat), width), dtype=torch.long)
    for r, (whole, _, _) in enumerate(flat):
        full[r] = whole[0]
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
    sums = torch.zeros(len(flat), dtype=torch.float64).index_add_(0, row_idx, logp.double().cpu())
    return sums.view(len(rows), N_ENDINGS).numpy()


# packed and unpacked scores of one item must agree to this (nats; float32 measured ~1e-6,
# bf16 autocast 3e-2 on the reference model: the two round differently); a model
# that ignores the 4-D mask or the position ids is off by whole nats
PACK_CHECK_TOL = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 0.25}


def token_budget(device: torch.device) -> int:
    """Input tokens (items x padded width) per packed forward pass: on the CPU 4,096 (measured
    on the reference model: 2,048-8,192 within 5%), on a GPU 64K."""
    return 2**16 if device.type == "cuda" else 2**12


@torch.inference_mode()
def score_items(model: torch.nn.Module, tokenizer, items: list[Item],
                batch_size: int | None = None, progress: bool = False,
                share_context: bool | None = None) -> Scores:
    """Log-likelihood of every ending, ``batch_size`` items per forward pass; ``None`` fits as
    many as keep the logits within ``logits_budget`` (and packed inputs within
    ``token_budget``).

    ``share_context`` (default: wherever the model takes position ids and a 4-D attention mask,
    i.e. transformers causal LMs) packs an item into one row, the context once and the four
    endings after it, each ending masked from the others and given the positions it has
    unpacked, and computes logits only where an ending token is predicted: ~1.9x fewer tokens
    through the model than one row per ending. Items the model's context would cut from the
    left are scored unpacked (the harness cuts each ending's row on its own). The first packed
    item is also scored unpacked, and a difference above ``PACK_CHECK_TOL`` switches packing
    off with a warning.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    n_ctx = context_length(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
    encoded = encode_items(items, tokenizer)
    rows = [[_row(e.ctx, end, n_ctx) for end in e.endings] for e in encoded]
    n = len(items)
    loglik = np.zeros((n, N_ENDINGS))
    n_tokens = np.array([[len(end) for end in e.endings] for e in encoded])

    share = _packs(model) if share_context is None else share_context
    fits = [len(e.ctx) + max(len(end) for end in e.endings) <= n_ctx + 1 for e in encoded]
    packed = {i: _pack(encoded[i]) for i in range(n) if share and fits[i]}
    if packed:
        first = next(iter(packed))
        check = _score_packed(model, [packed[first]], device)
        plain = _score_rows(model, [rows[first]], [encoded[first]], device)
        tol = PACK_CHECK_TOL.get(compute_dtype(next(model.parameters())), 0.1)
        if np.abs(check - plain).max() > tol:
            warnings.warn(f"{type(model).__name__} scores a packed HellaSwag item "
                          f"{np.abs(check - plain).max():.2g} nats away from the unpacked "
                          "item (it ignores the 4-D attention mask or the position ids?): "
                          "scoring every ending on its own row instead", stacklevel=2)
            packed = {}
    unpacked = [i for i in range(n) if i not in packed]

    sliced = _slices_by_mask(model)  # then only the ending positions get logits
    pk = list(packed)
    p_len = [len(packed[i].ids) for i in pk]
    p_cost = [len(packed[i].scored) if sliced else len(packed[i].ids) for i in pk]
    u_len = [max(len(whole) - 1 for whole, _ in rows[i]) for i in unpacked]
    u_cost = [sum(n_tokens[i]) if sliced else N_ENDINGS * u_len[k]
              for k, i in enumerate(unpacked)]
    budget = logits_budget(device) // vocab
    # packed rows reach the unembedding only where an ending token is predicted, and the body
    # dominates: 8x the budget (256 MB on CPU) measured 1.4-2x faster on SmolLM2-135M (vocab
    # 49K: 1 item per batch at 1x), the token budget still bounding the batch
    groups = ([("packed", [pk[k] for k in b])
               for b in batches(p_len, p_cost, batch_size, 8 * budget, token_budget(device))]
              + [("rows", [unpacked[k] for k in b])
                 for b in batches(u_len, u_cost, batch_size, budget)])
    weight = {i: len(packed[i].ids) if i in packed else N_ENDINGS * max(len(w) for w, _ in rows[i])
              for i in range(n)}
    with token_progress("HellaSwag", sum(weight.values()), enabled=progress) as bar:
        for kind, batch in groups:
            if kind == "packed":
                loglik[batch] = _score_packed(model, [packed[i] for i in batch], device)
            else:
                loglik[batch] = _score_rows(model, [rows[i] for i in batch],
                                            [encoded[i] for i in batch], device)
            bar.advance(sum(weight[i] for i in batch))

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
    overflowed: int = 0  # items with an ending the model overflowed on (never its choice)

    def to_dict(self) -> dict:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "acc_stderr": self.acc_stderr,
                "acc_norm_stderr": self.acc_norm_stderr, "n": self.n, "source": self.source,
                "overflowed": self.overflowed}

    def __str__(self) -> str:
        note = f"; {self.overflowed:,} overflow" if self.overflowed else ""
        return (f"acc {100 * self.acc:.2f}% ± {196 * self.acc_stderr:.2f}, acc_norm "
                f"{100 * self.acc_norm:.2f}% ± {196 * self.acc_norm_stderr:.2f} "
                f"(95% intervals, {self.n:,} items{note})")


def _mean_stderr(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    se = float(np.std(x, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return float(np.mean(x)), se


def summarize(scores: Scores, source: str = "") -> HellaSwagResult:
    acc, acc_se = _mean_stderr((scores.pred == scores.labels).astype(np.float64))
    norm, norm_se = _mean_stderr((scores.pred_norm == scores.labels).astype(np.float64))
    return HellaSwagResult(acc=acc, acc_norm=norm, acc_stderr=acc_se, acc_norm_stderr=norm_se,
                           n=len(scores.labels), source=source, overflowed=scores.overflowed)


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

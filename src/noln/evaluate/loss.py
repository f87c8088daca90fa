"""Mean per-token cross-entropy over fixed-length chunks (paper 2's protocol: no BOS prepended).

Each chunk of ``ctx`` tokens predicts its last ``ctx - 1`` tokens; the mean is over all predicted
tokens, and the 95% interval comes from the spread of per-chunk means (chunks are the
independent-ish units, tokens within one are not).

A model with fixed scales for norms can overflow on a rare chunk (a SwiGLU MLP squares an
oversized token block after block, to inf): the mean is then nan, as it must be, and the result
says how many chunks overflowed and what the others give, so a nan is a measurement, not a
dead end.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from noln.data import check_blocks


@dataclass
class CEResult:
    mean: float
    ci95: float  # half-width of the 95% interval of the mean
    median: float  # median per-token CE: robust to the few rare tokens that can dominate a mean
    n_tokens: int  # predicted tokens
    n_chunks: int
    ctx: int
    overflowed: int = 0  # chunks with an inf/nan loss (the model overflowed on them)
    finite_mean: float | None = None  # the mean over the other chunks, where some overflowed
    # measured beside other models where some model overflowed: the chunks every model keeps
    # finite, and this model's mean over them (the fair comparison: the same chunks for all)
    shared_chunks: int | None = None
    shared_mean: float | None = None
    shared_median: float | None = None  # the median per-token CE over those chunks
    # mean CE of each chunk (nan where it overflowed): two measurements of the same chunks
    # (a run's CE before and after) compare on the chunks both keep finite
    chunk_means: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def overflow_note(self) -> str:
        """'' or how many chunks overflowed and the mean over the rest."""
        if not self.overflowed:
            return ""
        rest = f"{self.finite_mean:.4f}" if self.finite_mean is not None else "none left"
        return (f"{self.overflowed} of {self.n_chunks} chunks overflow (inf/nan); the rest: "
                f"{rest}")

    def __str__(self) -> str:
        note = f"; {self.overflow_note()}" if self.overflowed else ""
        return (f"{self.mean:.4f} ± {self.ci95:.4f} nats ({self.n_tokens:,} tokens in "
                f"{self.n_chunks} chunks of {self.ctx}{note})")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` (custom, non-HF models may not)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def logits_budget(device: torch.device) -> int:
    """Float32 logits per forward pass for automatic batch sizes. On a CPU small batches are
    fastest (a 256 MB logits tensor runs out of cache: measured 30% slower than 32 MB); on a GPU
    larger ones keep it busy."""
    return 2**28 if device.type == "cuda" else 2**23


@torch.inference_mode()
def token_losses(model: torch.nn.Module, blocks: np.ndarray | torch.Tensor,
                 batch_size: int = 16) -> torch.Tensor:
    """Per-token CE ``[n_chunks, ctx - 1]`` (float32, on CPU) of ``model`` on ``blocks``."""
    blocks = torch.from_numpy(check_blocks(blocks, {type(model).__name__: model}))
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        out.append(loss.view(x.shape[0], -1).cpu())
    model.train(was_training)
    return torch.cat(out)


def summarize(losses: torch.Tensor, shared: torch.Tensor | None = None) -> CEResult:
    """``losses`` ``[n_chunks, ctx - 1]`` summarised; ``shared`` (bool ``[n_chunks]``): the
    chunks every model of a comparison keeps finite, recorded where it is not all of them."""
    per_chunk = losses.double().mean(dim=1)
    n = len(per_chunk)
    sem = per_chunk.std().item() / math.sqrt(n) if n > 1 else float("nan")
    finite = torch.isfinite(per_chunk)
    overflowed = int((~finite).sum())
    finite_mean = None
    if overflowed and finite.any():
        finite_mean = losses[finite].double().mean().item()
    result = CEResult(mean=losses.double().mean().item(), ci95=1.96 * sem,
                      median=losses.median().item(), n_tokens=losses.numel(), n_chunks=n,
                      ctx=losses.shape[1] + 1, overflowed=overflowed, finite_mean=finite_mean,
                      chunk_means=per_chunk.tolist())
    if shared is not None and not shared.all():
        result.shared_chunks = int(shared.sum())
        result.shared_mean = losses[shared].double().mean().item() if shared.any() else None
        result.shared_median = losses[shared].median().item() if shared.any() else None
    return result


def cross_entropy(model: torch.nn.Module, blocks: np.ndarray | torch.Tensor,
                  batch_size: int = 16) -> CEResult:
    """Mean per-token CE of ``model`` on ``[n, ctx]`` token blocks."""
    return summarize(token_losses(model, blocks, batch_size))

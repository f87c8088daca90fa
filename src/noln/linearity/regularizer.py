"""The linearity paper's pretraining regulariser: pull consecutive layers' token embeddings
together, ``L_cos = lambda * sum_i (1 - cos(h_i, h_{i-1}))`` (mean over tokens), or the MSE
variant ``lambda * sum_i mean ||h_i - h_{i-1}||^2 / d``. The paper found lambda = 0.5 best.

Hugging Face's last hidden state comes after the final norm, which is not a layer's residual
update, so it is left out unless asked for (the linearity scores skip that pair too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cosine_regularizer(hidden_states: Sequence[torch.Tensor], lam: float = 0.5, kind: str = "cos",
                       include_final: bool = False,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``lam`` x the summed dissimilarity of consecutive hidden states ``[batch, seq, d]``.

    ``hidden_states`` is a model output's ``hidden_states`` tuple (embeddings first). ``kind``:
    ``'cos'`` (1 - cosine) or ``'mse'`` (mean squared difference per element). Each pair's term is
    averaged over tokens (those where ``attention_mask`` is 1, when given).
    """
    if kind not in ("cos", "mse"):
        raise ValueError(f"kind must be 'cos' or 'mse', not {kind!r}")
    hs = list(hidden_states) if include_final else list(hidden_states)[:-1]
    if len(hs) < 2:
        raise ValueError(f"need at least two hidden states for a consecutive-layer term, got "
                         f"{len(hs)} (include_final={include_final})")
    weight = None
    if attention_mask is not None:
        weight = attention_mask.to(hs[0].dtype)
        weight = weight / weight.sum().clamp_min(1)
    total = hs[0].new_zeros((), dtype=torch.float32)
    for prev, cur in zip(hs[:-1], hs[1:], strict=True):
        if kind == "cos":
            per_token = 1 - F.cosine_similarity(cur.float(), prev.float(), dim=-1, eps=1e-8)
        else:
            per_token = (cur.float() - prev.float()).square().mean(-1)
        total = total + (per_token.mean() if weight is None else (per_token * weight).sum())
    return lam * total

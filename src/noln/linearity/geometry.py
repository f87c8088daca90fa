"""Companion measures of the residual stream's shape: anisotropy and intrinsic dimension.

Anisotropy is the share of the variance on the top principal direction, ``sigma_1^2 / sum
sigma_i^2`` of the centred embeddings. It is read off the covariance that the linearity pass
already accumulates (exact, with ``eigvalsh``), or by power iteration on it (the paper's fast
approximation). Intrinsic dimension is TwoNN (Facco et al. 2017) as the official notebook does
it: float64, ratio of 2nd to 1st nearest-neighbour distance, a line through the origin fitted on
the smallest 20% of ratios. TwoNN is O(m^2), so it runs on a random subsample of m tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def anisotropy(cov: torch.Tensor, method: str = "exact", iters: int = 200, tol: float = 1e-10,
               seed: int = 0) -> float:
    """``lambda_max / trace`` of a covariance (or scatter) matrix."""
    cov = cov.to(torch.float64)
    total = cov.trace()
    if total <= 0:
        return math.nan
    if method == "exact":
        return float(torch.linalg.eigvalsh(cov)[-1] / total)
    if method != "power":
        raise ValueError(f"method must be 'exact' or 'power', not {method!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(cov.shape[0], generator=g, dtype=torch.float64).to(cov.device)
    lam = 0.0
    for _ in range(iters):
        w = cov @ v
        new = float(v @ w) / float(v @ v)
        v = w / w.norm()
        if abs(new - lam) <= tol * abs(new):
            lam = new
            break
        lam = new
    return float(lam / total)


def twonn_dimension(x: torch.Tensor | np.ndarray, fraction: float = 0.2, eps: float = 1e-8,
                    chunk: int = 1024) -> float:
    """TwoNN intrinsic dimension of the rows of ``x`` ([m, d]).

    Points whose two neighbours are equidistant (ratio 1) are left out of the fit but still count
    in the empirical CDF, as in the official code; duplicated points (nearest neighbour closer
    than eps after scaling to unit mean length) are left out altogether, where the official code
    counted them in the CDF too, which shifts the estimate by the share of duplicates.
    """
    x = torch.as_tensor(x).to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    x = x / x.norm(dim=1).mean().clamp_min(1e-300)
    m = len(x)
    sq = x.square().sum(1)
    r1 = torch.empty(m, dtype=torch.float64, device=x.device)
    r2 = torch.empty_like(r1)
    for start in range(0, m, chunk):
        rows = slice(start, start + chunk)
        d2 = (sq[rows, None] + sq[None, :] - 2 * x[rows] @ x.T).clamp_min(0)
        idx = torch.arange(start, min(start + chunk, m), device=x.device)
        d2[idx - start, idx] = math.inf  # not your own neighbour
        two = d2.topk(2, dim=1, largest=False).values.sqrt()
        r1[rows], r2[rows] = two[:, 0], two[:, 1]
    mu = (r2 / r1)[r1 >= eps]  # a duplicate point has no defined ratio: leave it out
    mu = mu.sort().values
    useless = int((mu <= 1 + eps).sum())  # ties: the smallest ratios, kept in the CDF
    mu = mu[useless:]
    n = len(mu)
    if n < 2:
        return math.nan
    f_emp = torch.arange(1 + useless, n + 1 + useless, dtype=torch.float64,
                         device=x.device) / (n + useless)
    k = max(1, min(int(n * fraction), n - 1))
    log_mu = mu.log()[:k]
    log_f = -torch.log1p(-f_emp)[:k]
    return float((log_mu * log_f).sum() / log_mu.square().sum())


class TokenSample:
    """A seeded uniform subsample of about ``m`` of ``n_total`` tokens, kept for every state.

    Each token is kept with probability m / n_total, so the sample streams with the batches.
    """

    def __init__(self, shape: Sequence[int], m: int, seed: int = 0):
        n_total = int(np.prod(shape))
        self.p = min(1.0, m / max(n_total, 1))
        self.rng = np.random.default_rng(seed)
        self.kept: dict[int, list[torch.Tensor]] = {}

    def add(self, states: Sequence[torch.Tensor]) -> None:
        d = states[0].shape[-1]
        n = states[0].numel() // d
        keep = torch.from_numpy(self.rng.random(n) < self.p)
        if not keep.any():
            return
        for k, h in enumerate(states):
            rows = h.reshape(-1, d)[keep.to(h.device)]
            self.kept.setdefault(k, []).append(rows.float().cpu())

    def states(self, k: int) -> torch.Tensor:
        parts = self.kept.get(k, [])
        return torch.cat(parts) if parts else torch.zeros(0, 0)

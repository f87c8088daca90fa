"""Linearity scores of transformer layers (Razzhigaev et al. 2024, "Your Transformer is
Secretly Linear").

For consecutive hidden states ``X = H[l]`` and ``Y = H[l+1]`` (n tokens x d), centred over tokens
and divided by their Frobenius norms, the score is ``1 - min_A ||X A - Y||_F^2``: the pooled
in-sample R^2 of the least-squares fit of Y on X. "Without residual" fits the block's update
``Y = H[l+1] - H[l]`` on the same X.

The paper stores every token's hidden states and takes an SVD of each X. Here the score is a
closed form in second moments, so one pass over the data accumulates, in float64,
``sum h``, ``H[l]^T H[l]`` and ``H[l]^T H[l+1]`` per layer: memory is O(d^2) per layer whatever
the number of tokens. Sequences alternate between two halves, which gives a held-out score
(fit on one half, score on the other, both ways, pooled) from the same sums. An in-sample R^2
has a chance floor of about ``d / (n - 1)``; the held-out score does not.

The last HF hidden state is taken after the final norm, so the last block's pair is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from noln.data import check_blocks
from noln.errors import NolnError
from noln.evaluate.loss import accepts, model_device
from noln.linearity.geometry import TokenSample, anisotropy, twonn_dimension
from noln.precision import autocast, resolve_precision

# Eigenvalues of the (diagonally scaled) Gram matrix below RCOND x the largest are treated as
# zero: 1e-12 on eigenvalues is 1e-6 on singular values, well above float32 rounding of the
# hidden states, well below any direction that carries signal.
RCOND = 1e-12


# ----------------------------------------------------------------------------- accumulation


@dataclass
class Centred:
    """Centred second moments of one set of tokens: scatter matrices, not divided by n."""

    n: int
    mean: dict[int, torch.Tensor]  # state k -> [d]
    cov: dict[int, torch.Tensor]  # state k -> sum_t (h_k - mean_k)^T (h_k - mean_k), [d, d]
    cross: dict[int, torch.Tensor]  # pair k -> sum_t (h_k - mean_k)^T (h_{k+1} - mean_{k+1})


class StreamingMoments:
    """Running float64 sums over tokens for a chain of hidden states h_0, h_1, ..., in two halves.

    ``pairs`` are the k whose cross moment ``h_k^T h_{k+1}`` is kept; ``states`` (default: the
    ends of the pairs) get a Gram matrix and a sum. Sums are taken around a fixed shift (the first
    batch's mean) so the centring at the end does not cancel large means catastrophically.
    ``precision='mixed'`` takes each batch's products in float32 (of the shifted values) and
    still sums batches in float64: the moments cost ~1.5x less on CPU and the scores stay within
    ~1e-7 of float64 on ordinary states, but not where one token's residual is 100x the others'
    (massive activations) and a block's update is small beside it: the without-residual score
    comes from differences of nearly equal moments and was 7e-4 off in a test of that shape.
    """

    def __init__(self, d: int, pairs: Sequence[int], states: Sequence[int] = (),
                 device: torch.device | str | None = None, precision: str = "float64"):
        if precision not in ("float64", "mixed"):
            raise NolnError(f"unknown precision '{precision}': use float64 (exact products) or "
                            "mixed (float32 products per batch, float64 sums)")
        self.d = d
        self.precision = precision
        self.pairs = sorted(set(pairs))
        self.states = sorted(set(states) | {k for p in self.pairs for k in (p, p + 1)})
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.n = [0, 0]
        self.shift: dict[int, torch.Tensor] | None = None

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=self.device)

        self.sum = [{k: zeros(d) for k in self.states} for _ in range(2)]
        self.gram = [{k: zeros(d, d) for k in self.states} for _ in range(2)]
        self.cross = [{p: zeros(d, d) for p in self.pairs} for _ in range(2)]

    @torch.no_grad()
    def update(self, states: Sequence[torch.Tensor], half: int = 0) -> None:
        """Add a batch: ``states[k]`` is hidden state k, shape ``[..., d]`` (any float dtype)."""
        flat = {k: states[k].reshape(-1, self.d) for k in self.states}
        n = flat[self.states[0]].shape[0]
        if n == 0:
            return
        work = torch.float32 if self.precision == "mixed" else torch.float64
        if self.shift is None:  # any fixed shift is exact: the same one goes into every sum
            self.shift = {k: v.to(self.device, work).mean(0) for k, v in flat.items()}
        prev_k, prev_x = None, None
        for k in self.states:
            # mixed: shift and products in float32 (the shift removes the mean, so float32 loses
            # ~1e-7 of the centred values, not of the mean), sums across batches in float64
            x = flat[k].to(self.device, work, copy=True).sub_(self.shift[k])
            self.sum[half][k] += x.sum(0, dtype=torch.float64)
            self._add(self.gram[half][k], x, x)
            if prev_k == k - 1 and prev_k in self.cross[half]:
                self._add(self.cross[half][prev_k], prev_x, x)
            prev_k, prev_x = k, x
        self.n[half] += n

    @staticmethod
    def _add(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.dtype == torch.float64:
            acc.addmm_(a.T, b)
        else:
            acc += (a.T @ b).double()

    def centred(self, halves: Sequence[int] = (0, 1),
                pairs: Sequence[int] | None = None) -> Centred:
        """Means and centred scatter matrices of the tokens in ``halves`` (both: all tokens), for
        ``pairs`` and their states only if given (each call makes O(d^2) copies)."""
        n = sum(self.n[h] for h in halves)
        if n == 0 or self.shift is None:
            raise ValueError("no tokens accumulated")
        pairs = self.pairs if pairs is None else list(pairs)
        states = self.states if pairs is self.pairs else sorted({j for p in pairs
                                                                 for j in (p, p + 1)})
        m = {k: sum(self.sum[h][k] for h in halves) / n for k in states}  # shifted means
        cov = {k: sum(self.gram[h][k] for h in halves) - n * torch.outer(m[k], m[k])
               for k in states}
        cross = {p: sum(self.cross[h][p] for h in halves) - n * torch.outer(m[p], m[p + 1])
                 for p in pairs}
        mean = {k: m[k] + self.shift[k].double() for k in states}
        return Centred(n=n, mean=mean, cov=cov, cross=cross)

    def covariance(self, k: int) -> torch.Tensor:
        """Centred scatter matrix of state ``k`` over all tokens."""
        n = sum(self.n)
        m = (self.sum[0][k] + self.sum[1][k]) / n
        return self.gram[0][k] + self.gram[1][k] - n * torch.outer(m, m)


# ----------------------------------------------------------------------------- least squares


def pair_moments(c: Centred, k: int, residual: bool = True):
    """``(cxx, cxy, cyy, mean_x, mean_y)`` for X = h_k and Y = h_{k+1} (or h_{k+1} - h_k)."""
    cxx, cxy, cyy = c.cov[k], c.cross[k], c.cov[k + 1]
    mx, my = c.mean[k], c.mean[k + 1]
    if not residual:  # Y - X: expand the products instead of storing the update's moments
        cyy = cyy - cxy - cxy.T + cxx
        cxy = cxy - cxx
        my = my - mx
    return cxx, cxy, cyy, mx, my


class PseudoInverse:
    """``cxx^+ = W W^T`` for a symmetric PSD scatter matrix (float64), applied without forming it.

    ``cxx`` is Jacobi-scaled first (a few residual dimensions of real models carry 100x the
    variance of the rest). When the scaled matrix is safely positive definite (Cholesky succeeds
    and a power-iteration estimate of its condition number is below ``MAX_COND``),
    ``W = S L^-T``, ~10x cheaper than an eigendecomposition; otherwise ``eigh``, dropping
    eigenvalues below ``rcond`` x the largest. Where both apply they agree to rounding.
    """

    MAX_COND = 1e8  # 1e4 below 1 / RCOND: the estimate may be low, the eigh cut-off is not

    def __init__(self, cxx: torch.Tensor, rcond: float = RCOND):
        diag = cxx.diagonal().clamp_min(0)
        keep = diag > diag.max() * 1e-30  # constant dimensions carry nothing
        self.scale = torch.where(keep, diag.clamp_min(1e-300).rsqrt(), torch.zeros_like(diag))
        m = cxx * self.scale[:, None] * self.scale[None, :]
        self.chol: torch.Tensor | None = None
        if bool(keep.all()):
            chol, info = torch.linalg.cholesky_ex(m)
            if int(info) == 0 and _condition_estimate(m, chol) < self.MAX_COND:
                self.chol = chol
        if self.chol is None:
            w, v = torch.linalg.eigh(m)
            big = w > w.max() * rcond
            self.factor = v[:, big] * w[big].rsqrt()

    def wt(self, b: torch.Tensor) -> torch.Tensor:
        """``W^T b``: whitened coordinates of ``b``'s columns."""
        sb = self.scale[:, None] * b
        if self.chol is not None:
            return torch.linalg.solve_triangular(self.chol, sb, upper=False)
        return self.factor.T @ sb

    def w(self, z: torch.Tensor) -> torch.Tensor:
        if self.chol is not None:
            return self.scale[:, None] * torch.linalg.solve_triangular(self.chol.T, z, upper=True)
        return self.scale[:, None] * (self.factor @ z)

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``cxx^+ b``."""
        return self.w(self.wt(b))


def _condition_estimate(m: torch.Tensor, chol: torch.Tensor, iters: int = 30) -> float:
    """lambda_max / lambda_min of ``m`` by power iteration on ``m`` and on ``m^-1`` (O(d^2))."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(m.shape[0], 1, generator=g, dtype=m.dtype).to(m.device)
    u = v.clone()
    for _ in range(iters):
        v = m @ v
        v = v / v.norm()
        u = torch.cholesky_solve(u, chol)
        u = u / u.norm()
    lam_max = float((v.T @ m @ v).squeeze())
    lam_min = float((u.T @ m @ u).squeeze())
    return lam_max / lam_min if lam_min > 0 else math.inf


def lstsq_map(cxx: torch.Tensor | PseudoInverse, cxy: torch.Tensor,
              rcond: float = RCOND) -> torch.Tensor:
    """The minimum-norm least-squares ``A`` of ``Xc A ~ Yc`` from centred moments."""
    inv = cxx if isinstance(cxx, PseudoInverse) else PseudoInverse(cxx, rcond)
    return inv.solve(cxy)


def in_sample_r2(cxx: torch.Tensor | PseudoInverse, cxy: torch.Tensor, cyy: torch.Tensor,
                 rcond: float = RCOND) -> float:
    """``||P_X Yn||_F^2``: the paper's score, 1 minus the least-squares error of normalised Y."""
    inv = cxx if isinstance(cxx, PseudoInverse) else PseudoInverse(cxx, rcond)
    return float(inv.wt(cxy).square().sum() / cyy.trace())


def heldout_error(fit: Centred, test: Centred, k: int, residual: bool,
                  rcond: float = RCOND,
                  inv: PseudoInverse | None = None) -> tuple[float, float]:
    """``(squared error, total sum of squares)`` on ``test`` of the affine map fitted on ``fit``.

    The map keeps the fit half's intercept; the test half's sum of squares is about its own mean,
    so ``1 - error / total`` is an honest out-of-sample R^2 (it can be negative). ``inv``: the
    fit half's ``PseudoInverse(fit.cov[k])``, if already made.
    """
    fxx, fxy, _, fmx, fmy = pair_moments(fit, k, residual)
    txx, txy, tyy, tmx, tmy = pair_moments(test, k, residual)
    a = lstsq_map(inv if inv is not None else fxx, fxy, rcond)
    shift = (tmx - fmx) @ a - (tmy - fmy)  # the intercept's error on the test half
    err = ((txx @ a) * a).sum() - 2 * (a * txy).sum() + tyy.trace() + test.n * shift.square().sum()
    return float(err), float(tyy.trace())


# ----------------------------------------------------------------------------- scores


@dataclass
class LayerScore:
    """Linearity of block ``layer``: H[layer] -> H[layer + 1]."""

    layer: int
    with_residual: float
    without_residual: float
    with_residual_heldout: float | None  # None when a half has no more tokens than the width
    without_residual_heldout: float | None
    n_tokens: int
    chance_floor: float  # d / (n - 1): what in-sample R^2 gives for unrelated X and Y
    anisotropy: float | None = None  # of the block's input H[layer], see geometry.py
    anisotropy_power: float | None = None
    intrinsic_dim: float | None = None


def check_tokens(n: int, d: int) -> None:
    """An in-sample fit with n <= d tokens is exact whatever the layer does."""
    if n <= d:
        raise NolnError(f"too few tokens for width: {n:,} tokens for hidden size {d} make the "
                        f"least-squares fit exact, so the score would be meaningless; give "
                        f"--tokens > {d} (20x the width, {20 * d:,}, keeps the chance floor "
                        "d/(n-1) near 0.05)")


def score_pairs(moments: StreamingMoments, rcond: float = RCOND) -> list[LayerScore]:
    """In-sample and held-out scores, with and without residual, for every pair in ``moments``."""
    n, d = sum(moments.n), moments.d
    check_tokens(n, d)
    heldout = min(moments.n) > d
    out = []
    for k in moments.pairs:  # one pair at a time keeps the working set at a few d x d matrices
        both = moments.centred(pairs=[k])
        halves = (moments.centred([0], [k]), moments.centred([1], [k])) if heldout else None
        row: dict[str, float | None] = {}
        inv = PseudoInverse(both.cov[k], rcond)  # X is the same with and without residual
        inv_half = [PseudoInverse(h.cov[k], rcond) for h in halves] if halves else []
        for name, residual in (("with_residual", True), ("without_residual", False)):
            _, cxy, cyy, _, _ = pair_moments(both, k, residual)
            row[name] = in_sample_r2(inv, cxy, cyy)
            if halves is not None:
                e01, t1 = heldout_error(halves[0], halves[1], k, residual, inv=inv_half[0])
                e10, t0 = heldout_error(halves[1], halves[0], k, residual, inv=inv_half[1])
                row[f"{name}_heldout"] = 1 - (e01 + e10) / (t0 + t1)
            else:
                row[f"{name}_heldout"] = None
        out.append(LayerScore(layer=k, n_tokens=n, chance_floor=d / (n - 1), **row))
    return out


def linearity_scores(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                     chunk: int = 4096, rcond: float = RCOND,
                     precision: str = "float64") -> LayerScore:
    """Scores of one in-memory pair ``x -> y`` ([n, d] each), streamed in chunks of tokens.

    Chunks alternate between the two halves of the held-out score.
    """
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must both be [n, d], got {tuple(x.shape)} and {tuple(y.shape)}")
    m = StreamingMoments(x.shape[1], pairs=[0], device=x.device, precision=precision)
    for i, start in enumerate(range(0, len(x), chunk)):
        m.update([x[start:start + chunk], y[start:start + chunk]], half=i % 2)
    return score_pairs(m, rcond)[0]


# ----------------------------------------------------------------------------- models


def num_layers(model: torch.nn.Module) -> int:
    n = getattr(model.config, "num_hidden_layers", None)
    if not n:
        raise NolnError(f"cannot tell how many layers {type(model).__name__} has (its config has "
                        "no num_hidden_layers): linearity needs a standard transformers causal LM")
    return int(n)


def hidden_size(model: torch.nn.Module) -> int:
    d = getattr(model.config, "hidden_size", None)
    return int(d) if d else int(model.get_input_embeddings().weight.shape[1])


def scorable_layers(n_layers: int, layers: Sequence[int] | None = None) -> list[int]:
    """Blocks with a score: all but the last, whose output HF only gives after the final norm."""
    last = n_layers - 2
    if last < 0:
        raise NolnError(f"the model has {n_layers} block(s): a linearity profile needs at least 2 "
                        "(the last block's pair includes the final norm and is skipped)")
    if layers is None:
        return list(range(last + 1))
    bad = [i for i in layers if not 0 <= i <= last]
    if bad:
        raise NolnError(f"layer {bad[0]} requested but the model has {n_layers} blocks, so "
                        f"scorable layers are 0-{last} (the last block's pair includes the final "
                        f"norm and is skipped): pass --layers within 0-{last}")
    return sorted(set(layers))


def token_batches(blocks: np.ndarray, batch_size: int,
                  device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """``(index of the first sequence, int64 ids on device)`` per batch of ``blocks``."""
    for i in range(0, len(blocks), batch_size):
        yield i, torch.from_numpy(np.asarray(blocks[i:i + batch_size], dtype=np.int64)).to(device)


def halves(states: Sequence[torch.Tensor],
           start: int) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """``(half, states of its sequences)`` of a batch whose first sequence is ``start``: a
    sequence's half is the parity of its index in ``blocks``."""
    for half in (0, 1):
        rows = slice((half - start) % 2, None, 2)
        yield half, [h[rows] for h in states]


@torch.inference_mode()
def stream_hidden_states(model: torch.nn.Module, blocks: np.ndarray, consume: Callable,
                         batch_size: int = 8,
                         progress: Callable[[int, int], None] | None = None,
                         forward: str = "fp32") -> None:
    """Run ``model`` over ``blocks`` and call ``consume(hidden_states, half)`` per half-batch.

    Sequences alternate between halves 0 and 1 (even and odd block index). ``forward="bf16"``
    runs the model under bf16 autocast (its matmuls in bf16; the residual stream, and so the
    hidden states, stay float32); ``consume`` runs outside it, in its own precision.
    """
    was_training = model.training
    model.eval()
    expected = num_layers(model) + 1
    # only the hidden states are read: the unembedding runs on one position, not all (a third
    # of the reference model's forward time, a fifth of SmolLM2-135M's)
    kwargs = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    try:
        for i, ids in token_batches(blocks, batch_size, model_device(model)):
            with autocast(forward, ids.device):
                out = model(input_ids=ids, output_hidden_states=True, use_cache=False, **kwargs)
            hs = getattr(out, "hidden_states", None)
            if hs is None or len(hs) != expected:
                got = "none" if hs is None else len(hs)
                raise NolnError(f"{type(model).__name__} returned {got} hidden states for "
                                f"{expected - 1} layers (expected {expected}): linearity needs a "
                                "causal LM whose forward supports output_hidden_states")
            for half, states in halves(hs, i):
                consume(states, half)
            if progress is not None:
                progress(min(i + batch_size, len(blocks)), len(blocks))
    finally:
        model.train(was_training)


@dataclass
class LinearityProfile:
    """Everything ``noln linearity`` reports for one model."""

    model: str
    n_tokens: int
    d_model: int
    n_layers: int
    chance_floor: float
    layers: list[LayerScore]
    hidden_states: list[dict] = field(default_factory=list)  # geometry of H[0..n_layers]
    heldout: str = ("two-fold: sequences alternate between halves; the affine map fitted on one "
                    "half is scored on the other, errors pooled over both directions")
    # the same scores with position 0 of every sequence left out: in real LLMs its massive
    # activation (SmolLM2-135M: 150x the median norm) dominates the centred Frobenius norm and
    # pins the with-residual score near 1 whatever the other tokens do
    layers_without_first: list[LayerScore] = field(default_factory=list)
    forward: str = "fp32"  # what the model's forward pass computed in (bf16: autocast)

    def to_dict(self) -> dict:
        return asdict(self)


def linearity_profile(model: torch.nn.Module, blocks: np.ndarray, *,
                      layers: Sequence[int] | None = None, batch_size: int = 8,
                      geometry: bool = True, id_tokens: int = 2048, seed: int = 0,
                      rcond: float = RCOND, precision: str = "float64", name: str = "",
                      progress: Callable[[int, int], None] | None = None,
                      without_first: bool = False, forward: str = "fp32") -> LinearityProfile:
    """Linearity scores (and, with ``geometry``, anisotropy and intrinsic dimension) per layer.

    ``blocks`` is ``[n_sequences, ctx]`` token ids; every position of every sequence is a token.
    ``without_first``: also score every layer with position 0 left out (same forward pass,
    second set of moments), in ``layers_without_first``. ``forward``: the model's forward pass
    in ``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 where the device has it natively);
    ``precision`` is that of the moments.
    """
    forward = resolve_precision(forward, model_device(model))
    blocks = check_blocks(blocks, {name or type(model).__name__: model},
                          min_ctx=2 if without_first else 1)
    n_layers, d = num_layers(model), hidden_size(model)
    check_tokens(blocks.size, d)
    pairs = scorable_layers(n_layers, layers)
    states = range(n_layers + 1) if geometry else ()
    moments = StreamingMoments(d, pairs, states, device=model_device(model), precision=precision)
    sample = TokenSample(blocks.shape, id_tokens, seed) if geometry else None
    rest = None
    if without_first:
        check_tokens(blocks.shape[0] * (blocks.shape[1] - 1), d)
        rest = StreamingMoments(d, pairs, device=model_device(model), precision=precision)

    def consume(hs: list[torch.Tensor], half: int) -> None:
        moments.update(hs, half)
        if rest is not None:
            rest.update([h[:, 1:] for h in hs], half)  # [batch, ctx - 1, d]: position 0 out
        if sample is not None:
            sample.add(hs)

    stream_hidden_states(model, blocks, consume, batch_size, progress, forward)
    scores = score_pairs(moments, rcond)
    scores_rest = score_pairs(rest, rcond) if rest is not None else []
    geo: list[dict] = []
    if geometry:
        for k in moments.states:
            x, cov = sample.states(k), moments.covariance(k)
            geo.append({"hidden_state": k,
                        "anisotropy": anisotropy(cov),
                        "anisotropy_power": anisotropy(cov, method="power", seed=seed),
                        "intrinsic_dim": twonn_dimension(x) if len(x) > 2 else math.nan,
                        "id_tokens": len(x)})
        for s in scores:
            g = geo[s.layer]
            s.anisotropy, s.anisotropy_power = g["anisotropy"], g["anisotropy_power"]
            s.intrinsic_dim = g["intrinsic_dim"]
    n = sum(moments.n)
    return LinearityProfile(model=name, n_tokens=n, d_model=d, n_layers=n_layers,
                            chance_floor=d / (n - 1), layers=scores, hidden_states=geo,
                            layers_without_first=scores_rest, forward=forward)

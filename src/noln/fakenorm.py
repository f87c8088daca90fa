"""FakeLayerNorm / FakeRMSNorm: a norm whose per-token division can be frozen to one scalar.

Live, the module computes the real norm and tracks ``sigma``, an exponential moving average of
the batch-mean per-token std (RMS for RMSNorm). Frozen, it divides by that fixed ``sigma``:
``(x - mean(x)) / sigma * weight + bias`` — linear in ``x``, so foldable into the next layer.

Mode and sigma are buffers, so checkpoints carry them. The Python-side ``frozen`` flag mirrors
the ``is_frozen`` buffer so the forward pass never syncs with the device to read it.

In a multi-process (DDP) run each update all-reduces the batch statistics, so every rank keeps
the sigma that one process training on the whole global batch would have.

**Special tokens** (position 0 and end-of-text) carry the massive activations of real LLMs:
SmolLM2-135M's residual at position 0 is ~150x the median token's from layer 15 on, and an
end-of-text token mid-sequence ~100x. One frozen sigma that fits ordinary tokens multiplies
their normalised output by ~100 and breaks the model (the attention sink). With
``special_scale`` on, a site also tracks ``sigma_special`` (the EMA of the special tokens' std)
and, frozen, divides special tokens by

    sigma_special ** (1 - fade) * sigma ** fade,

``fade`` going 0 -> 1 at the end of the run (``noln.train``), so the model has time to learn to
shrink its special tokens' residuals before every token shares one sigma. At ``fade = 1`` the
site is the plain fixed scale again (exportable). Which tokens are special is set per forward
pass from ``input_ids`` by the adapter (``special_mask``, ``[batch, seq]`` bool), indexed by
position, never by channel (METHODS.md section 3: paper 1's code rescaled hidden channel 0).

**Taper.** Freezing switches a site's divisor from each token's own std ``s_t`` to ``sigma`` in
one step; a token whose residual is 10x the typical one then enters the next layer 10x larger.
In a SwiGLU model that error grows quadratically block after block (docs/BENCHMARKS.md,
SmolLM2). With a taper the frozen site divides by

    s_t ** (1 - w) * sigma ** w,

``w`` (``taper_weight``) rising from 0 to 1 over ``taper`` training steps (``noln.train``), so
the fine-tuning can shrink the outliers while they are still partly normalised. The blend is
geometric: a token at ``k`` times the typical std reaches the next layer at ``k ** w`` times
its normalised size. ``sigma`` stays the EMA frozen at the removal step; at ``w = 1`` the site
is the plain fixed scale. Gradients flow through ``s_t ** (1 - w)`` as through a live norm.

**Outlier clip.** Real LLMs put massive activations on ordinary tokens too, which no fixed set
of special tokens catches (SmolLM2-135M: a lone space at ~200x the typical std from layer 12
on, ~1% of tokens at 3-29x in layers 3-9; docs/BENCHMARKS.md). With ``outlier_clip`` K > 0 a
frozen site divides token t by

    max(d_t, s_t / K),

``d_t`` its divisor above: a token enters the next layer at most K times the size a typical
one does, so no token can feed a SwiGLU MLP an outlier that grows block after block. ``K``
rises as ``K / (1 - fade)`` over the special fade (``noln.train``) and the clip is off at
``fade = 1``: the plain fixed scale again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointed forwards are recomputed)."""
    return torch._C._current_graph_task_id() != -1


def _data_parallel() -> bool:
    """True in a multi-process run (``accelerate launch``/torchrun: DDP), where each process
    sees only its slice of the batch."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def special_token_mask(ids: torch.Tensor, eot_id: int | None) -> torch.Tensor:
    """``[batch, seq]`` True for special tokens: position 0 and end-of-text (``eot_id``)."""
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    if eot_id is not None:
        special |= ids == eot_id
    return special


def batch_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The (masked) mean of ``values`` over the micro-batch; in a multi-process run over every
    process's share of it: the value one process holding the whole global micro-batch would
    compute, identical on every rank. One all-reduce of (sum, count) there; every rank must
    call it the same number of times, in the same order."""
    if not _data_parallel():
        if mask is None:
            return values.mean()
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    if mask is None:
        stats = torch.stack([values.sum(), values.new_full((), float(values.numel()))])
    else:
        stats = torch.stack([(values * mask).sum(), mask.sum()])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return stats[0] / stats[1].clamp_min(1.0)


class FakeNorm(nn.Module):
    """Shared machinery; subclasses say whether the mean is subtracted (LayerNorm) or not (RMS)."""

    center: bool = True

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, eps: float,
                 momentum: float = 0.9):
        super().__init__()
        self.weight = weight  # shared with any sibling site reading the same original norm
        self.bias = bias
        self.eps = eps
        self.momentum = momentum
        self.register_buffer("sigma", torch.ones((), dtype=torch.float32))
        self.register_buffer("is_frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))
        # special tokens' own scale (module docstring); off unless enable_special_scale()
        self.register_buffer("special_on", torch.zeros((), dtype=torch.bool))
        self.register_buffer("sigma_special", torch.ones((), dtype=torch.float32))
        self.register_buffer("special_fade", torch.zeros((), dtype=torch.float32))
        # weight of the fixed scale in a frozen site's divisor (module docstring: taper);
        # 1 unless the site was frozen with a taper
        self.register_buffer("taper_weight", torch.ones((), dtype=torch.float32))
        # K of the outlier clip (module docstring); 0: off
        self.register_buffer("outlier_clip", torch.zeros((), dtype=torch.float32))
        self.special = False  # mirrors special_on, read without a device sync
        self.fade = 0.0  # mirrors special_fade
        self.taper = 1.0  # mirrors taper_weight
        self.clip = 0.0  # mirrors outlier_clip
        self.special_mask: torch.Tensor | None = None  # [batch, seq], set by the adapter's hook
        self.frozen = False
        # Set by the trainer for one forward pass: which tokens count in the sigma estimate
        # ([batch, seq] bool; position 0 / EOT excluded), and whether to keep per-token std.
        self.std_mask: torch.Tensor | None = None
        self.capture_std = False
        self.input_std: torch.Tensor | None = None

    @property
    def normalized_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def freeze(self, sigma: float | torch.Tensor | None = None, taper: bool = False) -> None:
        """Replace the per-token division by the current EMA (or a given value) from now on;
        with ``taper``, gradually: ``set_taper`` moves the divisor from each token's std to it."""
        if sigma is not None:
            self.sigma.fill_(float(sigma))
        self.is_frozen.fill_(True)
        self.frozen = True
        self.set_taper(0.0 if taper else 1.0)

    def set_taper(self, weight: float) -> None:
        self.taper_weight.fill_(weight)
        self.taper = float(weight)

    def set_clip(self, k: float) -> None:
        self.outlier_clip.fill_(k)
        self.clip = float(k)

    @property
    def clipping(self) -> bool:
        """Frozen, with tokens above ``clip`` times the fixed scale divided by their own std."""
        return self.frozen and self.clip > 0

    @property
    def tapering(self) -> bool:
        """Frozen, but still dividing partly by each token's own std (module docstring)."""
        return self.frozen and self.taper < 1.0

    def enable_special_scale(self) -> None:
        """Give special tokens their own sigma (module docstring); before training starts."""
        self.special_on.fill_(True)
        self.special = True

    @property
    def special_divisor(self) -> torch.Tensor:
        """What a frozen site divides special tokens by: sigma_special faded into sigma."""
        fade = self.special_fade
        return self.sigma_special.pow(1 - fade) * self.sigma.pow(fade)

    def set_special_fade(self, fade: float) -> None:
        self.special_fade.fill_(fade)
        self.fade = float(fade)

    @property
    def special_pending(self) -> bool:
        """True while special tokens still have a scale of their own (fade below 1)."""
        return self.special and self.fade < 1.0

    @property
    def pending(self) -> bool:
        """Frozen, but not yet one fixed scale for every token (a taper or a special scale
        still running): no plain model class can express the site."""
        return self.frozen and (self.tapering or self.special_pending or self.clip > 0)

    # buffers added after the first releases: checkpoints from before them lack these, and
    # their defaults (special scales off, no taper) are what those runs trained with
    OPTIONAL_BUFFERS = ("special_on", "sigma_special", "special_fade", "taper_weight",
                        "outlier_clip")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name in self.OPTIONAL_BUFFERS:
            if prefix + name not in state_dict and prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
        self.frozen = bool(self.is_frozen)
        self.special = bool(self.special_on)
        self.fade = float(self.special_fade)
        self.taper = float(self.taper_weight)
        self.clip = float(self.outlier_clip)

    def _centered(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=-1, keepdim=True) if self.center else x

    @torch.no_grad()
    def _update_sigma(self, std: torch.Tensor) -> None:
        if _in_backward():  # gradient checkpointing re-runs the forward: count each batch once
            return
        std = std.squeeze(-1).float()
        mask = None
        if self.std_mask is not None:
            # per-head norms (Qwen3 q_norm / k_norm) see [batch, seq, heads]: mask each head
            mask = self._expand(self.std_mask.to(std.dtype), std)
        batch_std = batch_mean(std, mask)
        first = self.n_updates == 0
        ema = self.momentum * self.sigma + (1 - self.momentum) * batch_std
        self.sigma.copy_(torch.where(first, batch_std, ema))
        if self.special and self.special_mask is not None:
            special_std = batch_mean(std, self._expand(self.special_mask, std).to(std.dtype))
            ema = self.momentum * self.sigma_special + (1 - self.momentum) * special_std
            self.sigma_special.copy_(torch.where(first, special_std, ema))
        self.n_updates.add_(1)

    @staticmethod
    def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A ``[batch, seq]`` mask broadcast over any trailing per-head axes of ``like``
        (``[batch, seq]`` or ``[batch, seq, heads]``)."""
        return mask.reshape(*mask.shape, *(1,) * (like.dim() - mask.dim())).expand_as(like)

    def _per_token_special(self) -> bool:
        return self.frozen and self.special_pending and self.special_mask is not None

    def frozen_divisor(self, x: torch.Tensor) -> torch.Tensor:
        """What a frozen site divides ``x`` by: ``sigma``, or per token (``[..., 1]``) while
        special tokens still have a scale of their own, a taper runs or the outlier clip is on
        (module docstring)."""
        divisor = self.sigma
        if self._per_token_special():
            mask = self._expand(self.special_mask, x[..., 0]).unsqueeze(-1)  # [B, T(, H), 1]
            divisor = torch.where(mask, self.special_divisor, self.sigma)
        if self.taper < 1.0 or self.clip > 0:
            xc = self._centered(x.float())
            std = (xc.pow(2).mean(dim=-1, keepdim=True) + self.eps).sqrt()
            if self.taper < 1.0:
                divisor = std.pow(1.0 - self.taper) * divisor.pow(self.taper)
            if self.clip > 0:
                divisor = torch.maximum(divisor, std / self.clip)
        return divisor

    def per_token_std(self, x: torch.Tensor) -> torch.Tensor:
        """``s_t``, each token's std as this norm measures it (``[batch, seq]``)."""
        return (self._centered(x.float()).pow(2).mean(dim=-1) + self.eps).sqrt()

    def scale_error(self, special_own: bool = True) -> torch.Tensor:
        """``log(s_t / d_t)`` per token of the last captured forward (``capture_std``): how far
        each token's input std is from the fixed scale the site divides it by once every
        taper and fade is done: ``sigma``, or a special token's own scale while it has one
        (with ``special_own``; else ``sigma`` for every token, the scale the fade ends at).
        Zero everywhere means the frozen site computes exactly the real norm (``site_aux``).
        On a live site ``sigma`` is the running estimate it would freeze (``site_aux_live``)."""
        target = self.sigma
        if special_own and self.special and self.special_mask is not None:
            mask = self._expand(self.special_mask, self.input_std)
            target = torch.where(mask, self.special_divisor, self.sigma)
        return self.input_std.log() - target.detach().log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.capture_std and not self._per_token_special() and not self.tapering \
                and not self.clipping:
            fast = self._fast_forward(x)
            if fast is not None:
                return fast
        xf = x.float()  # norms run in float32 under autocast, as torch's own LayerNorm does
        xc = self._centered(xf)
        if self.frozen:
            y = xc / self.frozen_divisor(xc)
            if self.capture_std:
                self.input_std = (xc.pow(2).mean(dim=-1) + self.eps).sqrt()
        else:
            std = (xc.pow(2).mean(dim=-1, keepdim=True) + self.eps).sqrt()
            if self.training:
                self._update_sigma(std.detach())
            if self.capture_std:
                self.input_std = std.squeeze(-1)
            y = xc / std
        return self._affine(y, x)

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The same function in fewer kernels (training speed), or None where a subclass has
        no fast path. The std for the EMA is measured without autograd."""
        return None

    def _affine(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Scale (and shift) the normalised float32 ``y``, back in ``x``'s dtype."""
        y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        state = f"frozen, sigma={self.sigma.item():.4g}" if self.frozen else "live"
        if self.tapering:
            state += f", taper {self.taper:.2f}"
        if self.clipping:
            state += f", outlier clip {self.clip:.3g}"
        if self.special:
            state += (f", special tokens sigma={self.sigma_special.item():.4g} "
                      f"fade={self.special_fade.item():.2f}")
        return f"{tuple(self.weight.shape)}, eps={self.eps}, {state}"


class FakeLayerNorm(FakeNorm):
    """LayerNorm whose division by the per-token std can be frozen to a fixed scalar."""

    center = True

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm, momentum: float = 0.9) -> FakeLayerNorm:
        return cls(ln.weight, ln.bias, ln.eps, momentum)

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        xf = x.float()
        if self.frozen:  # (x - mean) * (gamma / sigma) + beta: one reduction, two pointwise ops
            xc = xf - xf.mean(dim=-1, keepdim=True)
            scale = self.weight.float() / self.sigma
            y = xc * scale if self.bias is None else torch.addcmul(self.bias.float(), xc, scale)
            return y.to(x.dtype)
        weight = self.weight.float()
        bias = self.bias.float() if self.bias is not None else None
        # the fused kernel also returns 1/std per token: the EMA's input, at no extra pass
        y, _, rstd = torch.native_layer_norm(xf, self.normalized_shape, weight, bias, self.eps)
        if self.training:
            self._update_sigma(1.0 / rstd.detach())
        return y.to(x.dtype)


class FakeRMSNorm(FakeNorm):
    """RMSNorm whose division by the per-token RMS can be frozen to a fixed scalar.

    Live it is HF's ``LlamaRMSNorm`` (also Mistral's, Qwen2's, Qwen3's): float32 statistics,
    the normalised value cast back to the input dtype *before* the weight multiplies it.
    """

    center = False

    @classmethod
    def from_rmsnorm(cls, norm: nn.Module, momentum: float = 0.9) -> FakeRMSNorm:
        eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
        return cls(norm.weight, None, float(eps), momentum)

    def _affine(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.weight * y.to(x.dtype)  # as HF: no float32 upcast of the weight product

"""FakeLayerNorm / FakeRMSNorm: a norm whose per-token division can be frozen to one scalar.

Live, the module computes the real norm and tracks ``sigma``, an exponential moving average of
the batch-mean per-token std (RMS for RMSNorm). Frozen, it divides by that fixed ``sigma``:
``(x - mean(x)) / sigma * weight + bias`` — linear in ``x``, so foldable into the next layer.

Mode and sigma are buffers, so checkpoints carry them. The Python-side ``frozen`` flag mirrors
the ``is_frozen`` buffer so the forward pass never syncs with the device to read it.

In a multi-process (DDP) run each update all-reduces the batch statistics, so every rank keeps
the sigma that one process training on the whole global batch would have.
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
        self.frozen = False
        # Set by the trainer for one forward pass: which tokens count in the sigma estimate
        # ([batch, seq] bool; position 0 / EOT excluded), and whether to keep per-token std.
        self.std_mask: torch.Tensor | None = None
        self.capture_std = False
        self.input_std: torch.Tensor | None = None

    @property
    def normalized_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def freeze(self, sigma: float | torch.Tensor | None = None) -> None:
        """Replace the per-token division by the current EMA (or a given value) from now on."""
        if sigma is not None:
            self.sigma.fill_(float(sigma))
        self.is_frozen.fill_(True)
        self.frozen = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.frozen = bool(self.is_frozen)

    def _centered(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=-1, keepdim=True) if self.center else x

    @torch.no_grad()
    def _update_sigma(self, std: torch.Tensor) -> None:
        if _in_backward():  # gradient checkpointing re-runs the forward: count each batch once
            return
        std = std.squeeze(-1).float()
        mask = None
        if self.std_mask is not None:
            mask = self.std_mask.to(std.dtype)
            # per-head norms (Qwen3 q_norm / k_norm) see [batch, seq, heads]: mask each head
            mask = mask.reshape(*mask.shape, *(1,) * (std.dim() - mask.dim())).expand_as(std)
        batch_std = batch_mean(std, mask)
        first = self.n_updates == 0
        ema = self.momentum * self.sigma + (1 - self.momentum) * batch_std
        self.sigma.copy_(torch.where(first, batch_std, ema))
        self.n_updates.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.capture_std:
            fast = self._fast_forward(x)
            if fast is not None:
                return fast
        xf = x.float()  # norms run in float32 under autocast, as torch's own LayerNorm does
        xc = self._centered(xf)
        if self.frozen:
            y = xc / self.sigma
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

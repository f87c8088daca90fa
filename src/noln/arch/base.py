"""What every model family's adapter provides: its removal sites, and plain / clean exports.

A *site* is one place where a per-token normalisation happens and can be frozen on its own.
Sites are named by *role*, the same in every family: per block ``mlp_in`` (the norm before
the MLP), ``attn_in_qk`` / ``attn_in_v`` (the attention's input norm as read by the query/key
projections and by the value projection), ``q_norm`` / ``k_norm`` where the attention has
per-head norms (Qwen3); and ``final``, the norm before the unembedding. Sites are named
``blocks.{i}.{role}``, the final norm ``final``. Each family maps its own modules to roles in
its adapter (GPT-2: ``ln_2`` -> ``mlp_in``, ...), and its old per-family site names stay
accepted as ``aliases``. The default removal order is role-major, block-minor: every block's
first role, then every block's second role, ..., ``final`` last.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from noln.errors import NolnError
from noln.fakenorm import FakeLayerNorm, FakeNorm, special_token_mask

# the roles of removal sites, in every family's default removal order (a family has a subset)
MLP_IN, ATTN_IN_QK, ATTN_IN_V, Q_NORM, K_NORM, FINAL = (
    "mlp_in", "attn_in_qk", "attn_in_v", "q_norm", "k_norm", "final")
ROLES = (MLP_IN, ATTN_IN_QK, ATTN_IN_V, Q_NORM, K_NORM, FINAL)

# The hf export's eps trick: sqrt(var + 1e12) ~ 1e6 for every token, so a norm weight
# gamma * 1e6 / sigma makes the plain class's norm a fixed scale gamma / sigma.
EPS_TRICK = 1e12
EPS_SCALE = 1e6


class SplitNorm(nn.Module):
    """One norm as two removal sites over the same parameters: the path feeding queries and
    keys (``qk``) and the path feeding values (``v``). While both are live their outputs are
    identical, so it returns the d-wide normed input and the model runs unchanged; once they
    differ, ``split`` gives both paths side by side (2d wide) for projections that read them
    apart (a family may override it)."""

    def __init__(self, qk: FakeNorm, v: FakeNorm):
        super().__init__()
        self.weight, self.bias = qk.weight, qk.bias  # the original norm's, under its names
        self.qk, self.v = qk, v

    def forward(self, resid_pre: torch.Tensor) -> torch.Tensor:
        if not self.qk.frozen and not self.v.frozen:
            normed = self.qk(resid_pre)
            if self.training:  # v sees the same input: keep its EMA in step without recomputing
                self.v.sigma.copy_(self.qk.sigma)
                self.v.sigma_special.copy_(self.qk.sigma_special)
                self.v.n_updates.copy_(self.qk.n_updates)
            if self.v.capture_std:  # the same input: the site loss reads it for both sites
                self.v.input_std = self.qk.input_std if self.qk.capture_std else \
                    self.v.per_token_std(resid_pre)
            return normed
        return self.split(resid_pre)

    def split(self, resid_pre: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.qk(resid_pre), self.v(resid_pre)], dim=-1)


class SplitLayerNorm(SplitNorm):
    """A LayerNorm as two removal sites (``attn_in_qk`` and ``attn_in_v``; GPT-2, GPT-NeoX).
    ``fused_v=False``: once the paths differ, both side by side (2d wide) for a projection
    that reads them apart (NeoX). ``fused_v=True``: the Q/K path's output only, with the
    per-token ratio rho = divisor_qk / divisor_v left in ``v_ratio`` for a fused projection
    that corrects its V columns (GPT-2's ``c_attn``; see ``noln.arch.gpt2``)."""

    def __init__(self, ln: nn.LayerNorm, momentum: float, fused_v: bool = False):
        super().__init__(FakeLayerNorm(ln.weight, ln.bias, ln.eps, momentum),
                         FakeLayerNorm(ln.weight, ln.bias, ln.eps, momentum))
        self.fused_v = fused_v
        self.v_ratio: torch.Tensor | None = None  # rho for the reader, set by every forward

    def forward(self, resid_pre: torch.Tensor) -> torch.Tensor:
        self.v_ratio = None
        return super().forward(resid_pre)

    def split(self, resid_pre: torch.Tensor) -> torch.Tensor:
        if not self.fused_v:
            return super().split(resid_pre)
        std = None
        if not (self.qk.frozen and self.v.frozen):  # one path live: its divisor is per token
            xf = resid_pre.float()
            std = (xf.var(dim=-1, unbiased=False, keepdim=True) + self.v.eps).sqrt()
            if self.training and not self.v.frozen:
                self.v._update_sigma(std.detach())
        u = self.qk(resid_pre)
        if self.v.capture_std:  # the V site never runs on its own here: measure for it
            if std is None:  # both paths frozen: not measured above
                xf = resid_pre.float()
                std = (xf.var(dim=-1, unbiased=False, keepdim=True) + self.v.eps).sqrt()
            self.v.input_std = std.squeeze(-1)
        self.v_ratio = ((self.qk.frozen_divisor(resid_pre) if self.qk.frozen else std)
                        / (self.v.frozen_divisor(resid_pre) if self.v.frozen else std))
        return u


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its parts, as module paths from the ``...ForCausalLM`` model:
    the decoder-layer ModuleList, the final norm (None: none), and whether a decoder layer
    returns a tuple whose first element is the hidden state."""

    layers: str
    final_norm: str | None
    returns_tuple: bool = False


@dataclass(frozen=True)
class MlpNeurons:
    """Where a decoder layer keeps its MLP's hidden neurons, as parameter paths from the layer,
    each with the dim that indexes the neurons: ``make``, every parameter that computes a
    neuron's activation (input weights, their biases), and ``write``, the weight that adds the
    activation to the residual stream (its module's input is the activations)."""

    make: tuple[tuple[str, int], ...]
    write: tuple[str, int]


@dataclass(frozen=True)
class Site:
    name: str  # blocks.{layer}.{role}, or the role alone for the final norm
    kind: str  # the role: mlp_in, attn_in_qk, attn_in_v, q_norm, k_norm or final
    layer: int | None  # None for the final norm
    norm: FakeNorm

    @property
    def role(self) -> str:
        return self.kind


def canonical_name(name: str, aliases: dict[str, str]) -> str:
    """``name`` (a site or a bare role) with an old per-family kind replaced by its role."""
    head, _, kind = str(name).rpartition(".")
    role = aliases.get(kind, kind)
    return f"{head}.{role}" if head else role


class NormAdapter:
    """Swaps a model's norms for FakeNorms (in place) and knows how to export the result."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    layout: ClassVar[Layout]
    block_kinds: ClassVar[tuple[str, ...]]  # per-block roles, in removal order
    mlp_neurons: ClassVar[MlpNeurons]  # the MLP's hidden neurons (noln.sinks)
    final_kind: ClassVar[str] = FINAL
    # the family's site kinds before sites were named by role (old runs, schedule files)
    aliases: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module, momentum: float = 0.9, eot_id: int | None = None):
        self.model = model
        self.momentum = momentum
        # end-of-text: a special token (with position 0) for special scales; a second adapter
        # on the same model keeps the first one's unless it is told another
        self.eot_id = eot_id if eot_id is not None else getattr(model, "_noln_eot_id", None)
        model._noln_eot_id = self.eot_id
        self.install()
        self.sites: dict[str, Site] = {s.name: s for s in self.ordered(self.collect_sites())}
        # special tokens are found from each forward's input_ids (noln.fakenorm); the hook
        # does nothing unless a site has special_scale on. One per model, the newest adapter's.
        # The mask stays until the next forward: activation checkpointing re-runs the blocks'
        # forwards in the backward pass, and they must divide by the same per-token scales
        for handle in getattr(model, "_noln_hooks", ()):
            handle.remove()
        model._noln_hooks = (
            model.register_forward_pre_hook(self._mark_special_tokens, with_kwargs=True),)

    def _special_norms(self) -> list[FakeNorm]:
        return [n for n in self.norms() if n.special]

    def _mark_special_tokens(self, module, args, kwargs) -> None:
        norms = self._special_norms()
        if not norms:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = None if ids is None else special_token_mask(ids, self.eot_id)
        for norm in norms:
            norm.special_mask = mask

    def enable_special_scale(self) -> None:
        """Every site gives position 0 and end-of-text tokens a scale of their own, faded into
        the shared sigma by ``set_special_fade`` (noln.fakenorm)."""
        for norm in self.norms():
            norm.enable_special_scale()

    def set_special_fade(self, fade: float) -> None:
        for norm in self._special_norms():
            norm.set_special_fade(fade)

    # -- family-specific ------------------------------------------------------------------
    def install(self) -> None:
        """Replace the model's norms by FakeNorms; a no-op where they are already installed."""
        raise NotImplementedError

    def collect_sites(self) -> list[Site]:
        raise NotImplementedError

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights for the family's plain HF class: real norms if no site is frozen, else the
        eps trick (every norm ~ a fixed scale; ``hf_config_overrides`` gives the eps)."""
        raise NotImplementedError

    def hf_config_overrides(self) -> dict:
        raise NotImplementedError

    def clean_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights for ``build_clean_model``: norms folded into the layers that read them."""
        raise NotImplementedError

    @staticmethod
    def build_clean_model(config) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def build_small_model(vocab_size: int, n_layer: int, d_model: int, n_head: int, ctx: int,
                          eot_id: int) -> nn.Module:
        """A randomly initialised model of this family with real norms, for ``noln pretrain``."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The swapped model's tensors under the plain HF class's names: without the FakeNorms'
        buffers and without each split norm's per-path names for its shared weight and bias."""
        paths = tuple(f"{name}.{path}." for name, module in self.model.named_modules()
                      if isinstance(module, SplitNorm) for path in ("qk", "v"))
        buffers = (".sigma", ".is_frozen", ".n_updates",
                   *(f".{b}" for b in FakeNorm.OPTIONAL_BUFFERS))
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()
                if not k.startswith(paths) and not k.endswith(buffers)}

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers (``layout.layers``), in order."""
        return self.model.get_submodule(self.layout.layers)

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def ordered(self, sites: list[Site]) -> list[Site]:
        rank = {k: i for i, k in enumerate(self.block_kinds)}
        blocks = sorted((s for s in sites if s.layer is not None),
                        key=lambda s: (rank[s.kind], s.layer))
        return blocks + [s for s in sites if s.layer is None]

    def site_names(self) -> list[str]:
        return list(self.sites)

    def site_kinds(self) -> dict[str, str]:
        """Each site's role (``mlp_in``, ``attn_in_qk`` ..., ``final``), as schedules read it."""
        return {name: site.kind for name, site in self.sites.items()}

    def canonical(self, name: str) -> str:
        """``name`` with an old per-family kind (``ln_2``, ``blocks.3.ln_1_v``) as its role."""
        return canonical_name(name, self.aliases)

    def block_of(self, name: str) -> int:
        """The block a site sits in, in forward order; the final norm after the last block
        (``n_layers``)."""
        layer = self.site(name).layer
        return self.n_layers if layer is None else layer

    def site(self, name: str) -> Site:
        canonical = self.canonical(name)
        if canonical not in self.sites:
            raise NolnError(f"no removal site '{name}' in this {self.family} model with "
                            f"{self.n_layers} blocks: sites are blocks.0..{self.n_layers - 1}."
                            f"{{{','.join(self.block_kinds)}}} and {self.final_kind}")
        return self.sites[canonical]

    def norms(self) -> list[FakeNorm]:
        return [s.norm for s in self.sites.values()]

    @property
    def final_norm(self) -> FakeNorm:
        return self.sites[self.final_kind].norm

    def freeze(self, name: str) -> float:
        """Freeze one site at its current sigma; returns that sigma."""
        norm = self.site(name).norm
        norm.freeze()
        return float(norm.sigma)

    def frozen_sites(self) -> list[str]:
        return [n for n, s in self.sites.items() if s.norm.frozen]

    def all_frozen(self) -> bool:
        """Whether every site is removed (a taper, a clip or a special scale may remain)."""
        return all(s.norm.frozen for s in self.sites.values())

    def sigmas(self) -> dict[str, float]:
        return {n: float(s.norm.sigma) for n, s in self.sites.items()}

    @contextmanager
    def measuring(self, std_mask: torch.Tensor | None = None,
                  capture_std: Sequence[FakeNorm] = ()) -> Iterator[None]:
        """For the forward passes inside: ``std_mask`` (``[batch, seq]`` bool) says which
        tokens count in every live site's sigma estimate, and each norm in ``capture_std``
        keeps its input's per-token std as ``norm.input_std`` (the aux loss reads it). Reset
        on exit, exception or not, as TransformerLens scopes its hooks."""
        norms = self.norms()
        for norm in norms:
            norm.std_mask = std_mask
        for norm in capture_std:
            norm.capture_std = True
        try:
            yield
        finally:
            for norm in norms:
                norm.std_mask, norm.capture_std, norm.input_std = None, False, None

    def export_state(self) -> str:
        """'none' (nothing frozen), 'all' (every site frozen, tapers done, special tokens'
        scales faded into the shared sigma) or 'mixed'."""
        n = len(self.frozen_sites())
        if any(norm.pending for norm in self.norms()):
            return "mixed"  # a per-token divisor: no plain class can express it
        return "none" if n == 0 else "all" if n == len(self.sites) else "mixed"

    def require_export_state(self, allowed: tuple[str, ...]) -> str:
        state = self.export_state()
        if state == "none" and state not in allowed:  # the clean format's fold needs frozen sites
            raise NolnError(f"no norm of this model is removed (all {len(self.sites)} sites "
                            "live: a with-norm control, or a run before its first removal), so "
                            "there is no fixed scale to fold: export it with its norms "
                            "(--format hf)")
        if state not in allowed:
            live = [n for n in self.sites if n not in self.frozen_sites()]
            raise NolnError(f"cannot export or convert a partly removed model ({len(live)} of "
                            f"{len(self.sites)} sites still live, e.g. {live[0]}): finish the "
                            "run with --resume, or use a checkpoint from before the removals")
        return state


def fold_scale_into_rows(weight_in_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``diag(scale) @ W`` for a ``[d_in, d_out]`` weight, then centred over ``d_in`` so the
    layer ignores the mean of its input, as the mean subtraction it replaces did."""
    w = weight_in_out.double() * scale.double()[:, None]
    return w - w.mean(dim=0, keepdim=True)

"""What every model family's adapter provides: its removal sites, and plain / clean exports.

A *site* is one place where a per-token normalisation happens and can be frozen on its own
(GPT-2 has four kinds: ``ln_2``, ``ln_1_qk``, ``ln_1_v``, ``ln_f``). Sites are named
``blocks.{i}.{kind}`` or, for the final norm, by its kind alone. The default removal order is
kind-major, block-minor: every block's first kind, then every block's second kind, ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from noln.errors import NolnError
from noln.fakenorm import FakeNorm, special_token_mask

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
            return normed
        return self.split(resid_pre)

    def split(self, resid_pre: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.qk(resid_pre), self.v(resid_pre)], dim=-1)


@dataclass(frozen=True)
class Site:
    name: str
    kind: str
    layer: int | None  # None for the final norm
    norm: FakeNorm


class NormAdapter:
    """Swaps a model's norms for FakeNorms (in place) and knows how to export the result."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    block_kinds: ClassVar[tuple[str, ...]]  # per-block site kinds, in removal order
    final_kind: ClassVar[str]

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
                   *(f".{b}" for b in FakeNorm.SPECIAL_BUFFERS))
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()
                if not k.startswith(paths) and not k.endswith(buffers)}

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

    def site(self, name: str) -> Site:
        if name not in self.sites:
            raise NolnError(f"no removal site '{name}' in this {self.family} model with "
                            f"{self.n_layers} blocks: sites are blocks.0..{self.n_layers - 1}."
                            f"{{{','.join(self.block_kinds)}}} and {self.final_kind}")
        return self.sites[name]

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
        """'none' (nothing frozen), 'all' (every site frozen, special tokens' scales faded
        into the shared sigma) or 'mixed'."""
        n = len(self.frozen_sites())
        if n and any(norm.special_pending for norm in self.norms()):
            return "mixed"  # a fixed scale per token kind: no plain class can express it
        return "none" if n == 0 else "all" if n == len(self.sites) else "mixed"

    def require_export_state(self, allowed: tuple[str, ...]) -> str:
        state = self.export_state()
        if state not in allowed:
            live = [n for n in self.sites if n not in self.frozen_sites()]
            raise NolnError(f"cannot export a partly removed model ({len(live)} of "
                            f"{len(self.sites)} sites still live, e.g. {live[0]}): finish the "
                            "run with --resume, or export a checkpoint from before the removals")
        return state


def fold_scale_into_rows(weight_in_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``diag(scale) @ W`` for a ``[d_in, d_out]`` weight, then centred over ``d_in`` so the
    layer ignores the mean of its input, as the mean subtraction it replaces did."""
    w = weight_in_out.double() * scale.double()[:, None]
    return w - w.mean(dim=0, keepdim=True)

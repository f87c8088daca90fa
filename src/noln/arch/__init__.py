"""One adapter per model family; nothing outside this package knows which family it handles.

Sites are named by role (``blocks.{i}.mlp_in``, ``blocks.{i}.attn_in_qk``, ..., ``final``; see
``noln.arch.base``); ``canonical_site`` maps the old per-family names to them. The layout
registry (``noln.arch.layout``) says where any known model keeps its decoder layers and final
norm, and how long its context is.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from noln.arch.base import FINAL, ROLES, Layout, NormAdapter, Site, canonical_name
from noln.arch.layout import (
    ADAPTER_CLASSES,
    LAYOUTS,
    context_length,
    decoder_layers,
    final_norm,
    layout,
    transformer_lens_config_keys,
)
from noln.errors import NolnError
from noln.trust import trust_remote_code

ADAPTERS: dict[str, type[NormAdapter]] = {
    t: cls for cls in ADAPTER_CLASSES for t in cls.model_types
}


# `noln pretrain --arch NAME`: the family names users type
FAMILIES: dict[str, type[NormAdapter]] = {cls.family: cls for cls in ADAPTERS.values()}


def _all_aliases() -> dict[str, str]:
    aliases: dict[str, str] = {}
    for cls in ADAPTER_CLASSES:
        for old, role in cls.aliases.items():
            if aliases.setdefault(old, role) != role:  # one old name, one role, in every family
                raise RuntimeError(f"site alias '{old}' means two roles")
    return aliases


# old per-family site kind -> role (GPT-2's ln_2 -> mlp_in, Llama's norm -> final, ...)
ALIASES: dict[str, str] = _all_aliases()


def canonical_site(name: str) -> str:
    """A site name (``blocks.3.ln_1_v``) or a bare kind (``ln_2``) from a user or an old run,
    with any old per-family kind replaced by its role (``blocks.3.attn_in_v``, ``mlp_in``);
    role names come back as they are."""
    return canonical_name(name, ALIASES)


def role_of(site: str) -> str:
    """The role of a site name, old names included (``blocks.0.ln_2`` -> ``mlp_in``)."""
    return canonical_site(site).rsplit(".", 1)[-1]


def supported() -> str:
    return ", ".join(sorted({cls.family for cls in ADAPTERS.values()}))


def check_supported(config) -> type[NormAdapter]:
    """The adapter class for ``config``, or a clear error naming the families noln supports."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        archs = ",".join(getattr(config, "architectures", None) or []) or "?"
        raise NolnError(f"unsupported architecture '{model_type}' ({archs}): noln removes norms "
                        f"from these families: {supported()}")
    return ADAPTERS[model_type]


def install(model: nn.Module, momentum: float = 0.9, eot_id: int | None = None) -> NormAdapter:
    """Swap ``model``'s norms for FakeNorms in place and return its adapter."""
    return check_supported(model.config)(model, momentum, eot_id)


def skeleton(config) -> NormAdapter:
    """The adapter of a weightless model built from ``config`` (on the meta device: no memory,
    a fraction of a second): its sites' names, roles and order, as the loaded model's will be,
    for checks that must come before a large model's weights load."""
    check_supported(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code())
    return install(model)


__all__ = ["ADAPTERS", "ALIASES", "FAMILIES", "FINAL", "LAYOUTS", "ROLES", "Layout",
           "NormAdapter", "Site", "canonical_site", "check_supported", "context_length",
           "decoder_layers", "final_norm", "install", "layout", "role_of", "skeleton", "supported",
           "transformer_lens_config_keys"]

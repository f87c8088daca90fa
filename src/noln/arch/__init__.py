"""One adapter per model family; nothing outside this package knows which family it handles."""

from __future__ import annotations

from torch import nn

from noln.arch.base import NormAdapter, Site
from noln.arch.gpt2 import GPT2Adapter
from noln.arch.llama import LlamaAdapter
from noln.arch.neox import NeoXAdapter
from noln.errors import NolnError

ADAPTERS: dict[str, type[NormAdapter]] = {
    t: cls for cls in (GPT2Adapter, NeoXAdapter, LlamaAdapter) for t in cls.model_types
}


# `noln pretrain --arch NAME`: the family names users type
FAMILIES: dict[str, type[NormAdapter]] = {cls.family: cls for cls in ADAPTERS.values()}


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


__all__ = ["ADAPTERS", "FAMILIES", "NormAdapter", "Site", "check_supported", "install", "supported"]

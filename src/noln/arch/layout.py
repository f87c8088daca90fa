"""One layout registry: for a model (or its config), its decoder-layer ModuleList, its final
norm, whether a decoder layer returns a tuple, and its context length.

Families noln removes norms from take their layout from their adapter (``NormAdapter.layout``);
the others listed here are layout-only: linear replacement and evaluation work on them, norm
removal does not. Module paths checked against transformers 5.23's modeling files.
"""

from __future__ import annotations

from torch import nn

from noln.arch.base import Layout, NormAdapter
from noln.arch.gpt2 import GPT2Adapter
from noln.arch.llama import LlamaAdapter
from noln.arch.neox import NeoXAdapter
from noln.errors import NolnError

ADAPTER_CLASSES: tuple[type[NormAdapter], ...] = (GPT2Adapter, NeoXAdapter, LlamaAdapter)

# model types noln reads but does not remove norms from: (decoder layers, final norm, tuple)
LAYOUT_ONLY: dict[str, Layout] = {
    "gpt_bigcode": Layout("transformer.h", "transformer.ln_f"),
    "opt": Layout("model.decoder.layers", "model.decoder.final_layer_norm"),
    **{t: Layout("model.layers", "model.norm") for t in (
        "gemma", "gemma2", "phi3", "olmo", "olmo2", "stablelm", "starcoder2")},
    "phi": Layout("model.layers", "model.final_layernorm"),
    **{t: Layout("transformer.h", "transformer.ln_f", returns_tuple=True)
       for t in ("gpt_neo", "gptj", "bloom", "falcon", "codegen")},
}

LAYOUTS: dict[str, Layout] = {
    **{t: cls.layout for cls in ADAPTER_CLASSES for t in cls.model_types}, **LAYOUT_ONLY}

# config keys holding the context length, first found wins (GPT-2 and its kin name it
# n_positions; transformers maps max_position_embeddings to it there too)
CTX_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len")

# the final norm's attribute on the base model, for a model type outside the registry
FINAL_NORM_NAMES = ("ln_f", "norm", "final_layer_norm")


def _config(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def model_type(model_or_config) -> str | None:
    return getattr(_config(model_or_config), "model_type", None)


def layout(model_or_config) -> Layout:
    """The registered layout of ``model_or_config``'s model type, or a clear error."""
    kind = model_type(model_or_config)
    if kind not in LAYOUTS:
        raise NolnError(f"cannot find the decoder layers of model type '{kind}': noln knows "
                        f"{', '.join(sorted(LAYOUTS))}; add the family to LAYOUT_ONLY in "
                        "noln/arch/layout.py (or give it an adapter)")
    return LAYOUTS[kind]


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, bool]:
    """``(the decoder layers of model, whether each returns a tuple)``."""
    lay = layout(model)
    return model.get_submodule(lay.layers), lay.returns_tuple


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm before the unembedding, whose input is the last residual (None if the model has
    none). Where the registered path is missing (a model type outside the registry, a base
    model without its head): the base model's ``ln_f``, ``norm`` or ``final_layer_norm``."""
    path = LAYOUTS[kind].final_norm if (kind := model_type(model)) in LAYOUTS else None
    if path:
        try:
            return model.get_submodule(path)
        except AttributeError:  # not the ...ForCausalLM class, or a model without one
            pass
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def context_length(model_or_config, default: int | None = None) -> int:
    """The longest input the model takes (its config's ``CTX_KEYS``, first positive one);
    ``default`` where the config has none (without one, an error)."""
    config = _config(model_or_config)
    for key in CTX_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if default is not None:
        return default
    raise NolnError(f"cannot tell the context length of {type(model_or_config).__name__}: its "
                    f"config has none of {', '.join(CTX_KEYS)}")


def transformer_lens_config_keys(config: dict) -> dict:
    """Config keys TransformerLens reads that transformers no longer writes: GPT-2's context
    length as ``n_ctx`` (its published config.json has it)."""
    return {"n_ctx": config["n_positions"]} if "n_positions" in config else {}

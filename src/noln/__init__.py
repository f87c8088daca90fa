"""noln: remove normalisation from pretrained transformers, evaluate, measure linearity.

The Python API below is loaded on first use (PEP 562), so ``import noln`` and the ``noln``
command start without torch and transformers; ``noln.remove_layernorm`` then imports
``noln.remove`` as a plain import would.
"""

from importlib import import_module

from noln.errors import NolnError

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    "export_model": "noln.export", "load_clean": "noln.export",
    "FakeLayerNorm": "noln.fakenorm", "FakeRMSNorm": "noln.fakenorm",
    "to_nnsight": "noln.interop", "to_transformer_lens": "noln.interop",
    "load_model": "noln.loading",
    "RemovalResult": "noln.remove", "remove_layernorm": "noln.remove",
    "remove_with_control": "noln.remove",
}
__all__ = ["NolnError", *sorted(_API)]


def __getattr__(name: str):
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value  # looked up once
        return value
    try:  # a submodule, as the README writes them: noln.evaluate.cross_entropy, noln.arch ...
        return import_module(f"noln.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"noln.{name}":  # the submodule exists and lacks a package: say so
            raise
    raise AttributeError(f"module 'noln' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})

"""noln: remove normalisation from pretrained transformers, evaluate, measure linearity."""

from noln.errors import NolnError
from noln.export import export_model, load_clean
from noln.fakenorm import FakeLayerNorm, FakeRMSNorm
from noln.interop import to_nnsight, to_transformer_lens
from noln.loading import load_model
from noln.remove import RemovalResult, remove_layernorm, remove_with_control

__version__ = "0.1.0"
__all__ = ["FakeLayerNorm", "FakeRMSNorm", "NolnError", "RemovalResult", "export_model",
           "load_clean", "load_model", "remove_layernorm", "remove_with_control", "to_nnsight",
           "to_transformer_lens"]

"""noln.precision: auto picks bf16 only where the hardware multiplies bf16 natively."""
import pytest
import torch

from noln import precision
from noln.errors import NolnError


def test_resolve_explicit_and_unknown():
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(NolnError, match="unknown precision"):
        precision.resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("flags, native", [
    ({"avx2", "fma"}, False),                      # AMD EPYC Zen 3 (this dev box): emulated
    ({"avx512f", "avx512bw"}, False),              # AVX-512 without the bf16 dot product
    ({"avx512f", "avx512_bf16"}, True),            # Cooper Lake, Zen 4
    ({"amx_tile", "amx_bf16", "avx512_bf16"}, True),  # Sapphire Rapids
    ({"fp", "asimd", "bf16"}, True),               # Arm with FEAT_BF16
])
def test_cpu_flags_decide_auto(monkeypatch, flags, native):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    precision._cpu_native_bf16.cache_clear()
    try:
        assert precision.native_bf16("cpu") is native
        assert precision.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    finally:
        precision._cpu_native_bf16.cache_clear()


def test_cuda_follows_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve_precision("auto", "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_precision("auto", "cuda:0") == "bf16"
    assert precision.native_bf16("meta") is False


def test_this_machine_reads_its_flags():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    assert precision.native_bf16("cpu") == bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})

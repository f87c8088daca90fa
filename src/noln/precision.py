"""Which float format to compute in: bf16 where the hardware does it natively, fp32 elsewhere.

``--precision auto`` means bf16 autocast on a device that multiplies bf16 natively and fp32
everywhere else. Natively means: a CUDA GPU that supports bf16 (Ampere and later), or a CPU
with AMX-BF16 (Intel Sapphire Rapids and later) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4
and later), or an Arm CPU with the BF16 extension. On other CPUs (AVX2 only, e.g. AMD EPYC
Zen 3) PyTorch emulates bf16 matmuls by converting to fp32, which is slower than fp32 itself
(docs/BENCHMARKS.md, "bf16 autocast"), so auto stays fp32 there.

Training (``noln remove``, ``--precision``, default auto) and scoring (``noln eval`` and
``compare`` with ``--precision``, ``noln linearity`` with ``--forward-precision``; default fp32
so that a table means the same on every machine) resolve the name here and compute under
:func:`autocast`.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .errors import NolnError

PRECISIONS = ("auto", "fp32", "bf16")

# /proc/cpuinfo flags (x86: "flags", Arm: "Features") that mean bf16 dot products in hardware
_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


@functools.lru_cache(maxsize=1)
def _cpu_native_bf16() -> bool:
    # no /proc/cpuinfo (macOS, Windows): fp32; Apple M2+ has BF16 but torch's CPU matmuls
    # do not use it
    return bool(cpu_flags() & _BF16_CPU_FLAGS)


def native_bf16(device: torch.device | str | None = None) -> bool:
    """True where bf16 autocast runs on hardware bf16 units: a CUDA GPU with bf16 support, or a
    CPU with AMX-BF16 / AVX512-BF16 (x86) or BF16 (Arm) in its feature flags. ``device`` None
    means the device noln would pick (CUDA when available, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_native_bf16()
    return False


def resolve_precision(name: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16` holds for ``device``, else ``fp32``;
    ``fp32`` and ``bf16`` are returned as given (an explicit bf16 on a CPU without native bf16
    runs emulated: allowed, only slower)."""
    if name not in PRECISIONS:
        raise NolnError(f"unknown precision '{name}': use one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def autocast(precision: str, device: torch.device | str) -> torch.autocast:
    """The context a resolved ``precision`` computes in on ``device``: bf16 autocast for
    ``bf16`` (matmuls in bf16; softmax, norms and losses in fp32, as torch's autocast lists
    them), nothing for ``fp32``."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def describe(precision: str, asked: str, device: torch.device | str) -> str:
    """One line saying what ``asked`` resolved to and why, e.g. "precision bf16 on cpu (native
    bf16)"; ``noln remove``, ``eval`` and ``compare`` print it (linearity records it in its
    JSON and table)."""
    why = ("as asked" if asked != "auto" else
           "native bf16" if precision == "bf16" else "no native bf16 on this device")
    return f"precision {precision} on {torch.device(device).type} ({why})"


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``tensor`` (a weight) computes in here: the autocast dtype when
    autocast is on for its device type, else its own dtype."""
    kind = tensor.device.type
    if torch.is_autocast_enabled(kind) and tensor.dtype == torch.float32:
        return torch.get_autocast_dtype(kind)
    return tensor.dtype

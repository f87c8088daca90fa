"""Atomic checkpoints: a run killed at any moment leaves its last good checkpoint intact.

Each save writes ``last.pt.tmp``, flushes it to disk, keeps the previous checkpoint as
``prev.pt`` and renames the new file over ``last.pt`` (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from noln.errors import NolnError


def save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, path.with_name("prev.pt"))
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint dict; a torn or foreign file is a clear error naming the fallback."""
    path = Path(path)
    if not path.is_file():
        raise NolnError(f"checkpoint '{path}' does not exist: was the run started with this --out?")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        prev = path.with_name("prev.pt")
        hint = f"resume from '{prev}' instead" if prev.exists() and prev != path else \
            "delete it and start the run again"
        raise NolnError(f"checkpoint '{path}' is corrupt or truncated ({type(e).__name__}): "
                        f"{hint}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        raise NolnError(f"'{path}' is not a noln checkpoint (no model state or step)")
    return ckpt


def latest_checkpoint(run_dir: Path) -> Path:
    """``last.pt``, or ``prev.pt`` where ``last.pt`` is unreadable (killed mid-rename)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    last, prev = ckpt_dir / "last.pt", ckpt_dir / "prev.pt"
    if last.exists():
        try:
            load_checkpoint(last)
            return last
        except NolnError:
            if not prev.exists():
                raise
            return prev
    if prev.exists():
        return prev
    raise NolnError(f"no checkpoint in '{ckpt_dir}': nothing to resume; start a new run")


def load_run_model(path: Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a run folder's latest checkpoint (or a checkpoint file), with
    its FakeNorms in the state they were saved in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from noln.arch import install
    from noln.loading import load_tokenizer

    path = Path(path)
    ckpt_path = path if path.is_file() else latest_checkpoint(path)
    run_dir = ckpt_path.parent.parent
    ckpt = load_checkpoint(ckpt_path)
    config = AutoConfig.from_pretrained(run_dir / "base")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install(model)
    model.load_state_dict(ckpt["model"])
    return model, load_tokenizer(run_dir / "base")

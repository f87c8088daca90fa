"""What ``noln eval`` / ``noln compare`` and the ``--control`` table share: naming text sources
and models, choosing a device, loading models onto it, and the chunk length every model reads."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from noln.arch import context_length
from noln.config import check_eval_numbers
from noln.data import check_source, is_local
from noln.errors import NolnError
from noln.loading import fuse_activations, load_model, model_kind
from noln.outputs import check_distinct_outputs, check_output_dir, check_output_file
from noln.pretrained import check_models_exist


def parse_sources(specs: list[str]) -> dict[str, str]:
    """``["val=corpus/val.jsonl", "wiki.jsonl"]`` -> ``{"val": ..., "wiki": "wiki.jsonl"}``."""
    sources: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        named = sep and re.fullmatch(r"[\w.\-]+", name) and not Path(spec).exists()
        if named and not source.strip():  # (it was read as a Hub dataset named 'x=')
            raise NolnError(f"--data '{spec}' names a source '{name}' but gives none: write "
                            f"--data {name}=PATH (a file, a folder or a Hub dataset)")
        if not (named and source):
            source = spec
            name = Path(spec).stem if is_local(spec) else spec.rstrip("/").split("/")[-1]
            name = name.split(":")[0]
        if name in sources:
            raise NolnError(f"two --data sources are named '{name}': name them, as "
                            f"--data {name}2={source}")
        sources[name] = source
    return sources


def short_names(models: list[str]) -> dict[str, str]:
    """Column names for models: a local path's last part (``runs/a/model`` -> ``model``), or
    as many of its last parts as tell it from the others (two runs' checkpoints at one step:
    ``a/checkpoints/step-500.pt``, ``b/checkpoints/step-500.pt``); a Hub id as given."""
    parts = [Path(m).parts if is_local(m) and Path(m).name else (m,) for m in models]
    for n in range(1, max(len(p) for p in parts) + 1):
        shorts = [str(Path(*p[-n:])) if len(p) > 1 else p[0] for p in parts]
        if len(set(shorts)) == len(shorts):
            return dict(zip(shorts, models, strict=True))
    return dict(zip(models, models, strict=True))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise NolnError(f"unknown --device '{device}': use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise NolnError(f"--device {device} but no CUDA GPU is visible: use --device cpu")
    return resolved


def load_models(names: dict[str, str], device: torch.device) -> dict[str, tuple]:
    """``{key: (model, tokenizer)}`` on ``device``, for scoring (``fuse_activations``). Every
    local path is checked first: a typo in the last model is one line, not a wait for the
    others to load."""
    check_models_exist(*names.values())
    loaded = {}
    for key, name in names.items():
        model, tok = load_model(name)
        fuse_activations(model)
        loaded[key] = (model.to(device), tok)
    return loaded


def chunk_length(models: list[torch.nn.Module], ctx: int | None) -> int:
    shortest = min(context_length(m) for m in models)  # every model must read the chunk
    if ctx is None:
        return shortest
    if ctx < 2:
        raise NolnError(f"--ctx {ctx} is too short: a chunk needs at least 2 tokens")
    if ctx > shortest:
        raise NolnError(f"--ctx {ctx} is longer than a model's context of {shortest}: give "
                        f"--ctx {shortest} or less")
    return ctx


def check_options(*, tokens: int | None = None, ctx: int | None = None,
                  batch_size: int | None = None, hellaswag_limit: int | None = None,
                  json_out: Path | None = None, out: Path | None = None,
                  out_files: list[str] = (), sources: dict[str, str] | None = None,
                  split: str = "train") -> None:
    """Numbers in range, outputs writable and ``sources`` there (local paths; Hub names with
    ``split``, asked last: it takes the network), before any model loads: ``out_files`` are
    the names the command may write in ``out`` (none of them the user's own file)."""
    check_eval_numbers(tokens, ctx, batch_size, hellaswag_limit)
    check_distinct_outputs([("--json", json_out)], [("--out", out, out_files)])
    check_output_file(json_out, "--json", kind="json")
    check_output_dir(out, "--out")
    if out is not None and (kind := model_kind(out)) is not None:
        raise NolnError(f"--out '{out}' holds {kind}: reports go in a folder of their own "
                        "(e.g. --out reports/NAME)")
    for name in out_files if out is not None else ():
        check_output_file(Path(out) / name, "--out")
    check_source(*(sources or {}).values(), split=split)



"""Write a trained model so other tools load it without noln.

- ``hf``: the family's plain Hugging Face class. Every frozen norm becomes a real norm with
  eps = 1e12 and weight ``gamma * 1e6 / sigma``: ``(x - mu) / sqrt(var + 1e12) * gamma * 1e6 /
  sigma ~= (x - mu) * gamma / sigma`` (relative error ~ var / 2e12). Weights ~1e6-1e7 overflow
  fp16, so fp16 is refused. A run that froze nothing (the ``--keep-ln`` control) exports as is.
- ``clean``: norms folded into the layers that read them; no norm module is left. Load it with
  ``noln.load_clean``.

Both write ``noln.json`` beside the weights: format, family, every sigma, the removal events, and
the files the export holds (a file added later makes a new export into that folder refuse).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from noln.arch import ADAPTERS, NormAdapter, canonical_site
from noln.errors import NolnError
from noln.outputs import export_file_name
from noln.pretrained import load_config, read_json
from noln.progress import transformers_bars_off
from noln.run import is_run_folder

FP16_MAX = 65504.0


def check_dtype(state: dict[str, torch.Tensor], dtype: torch.dtype, fmt: str) -> None:
    if dtype != torch.float16:
        return
    name, big = max(((k, v.abs().max().item()) for k, v in state.items() if v.is_floating_point()),
                    key=lambda kv: kv[1])
    if big > FP16_MAX:
        hint = " (eps-trick norm scales ~1e6/sigma)" if fmt == "hf" else ""
        raise NolnError(f"fp16 cannot hold this {fmt} export: weight '{name}' reaches "
                        f"{big:.3g}{hint}, above fp16's {FP16_MAX:.0f}; export as float32 or "
                        "bfloat16" + (", or use --format clean" if fmt == "hf" else ""))


EXPORT_FORMATS = ("hf", "clean")


def check_export_target(out: Path, source: Path | None = None) -> None:
    """``out`` may take an export: new, empty, or a previous noln export (``noln.json`` with an
    hf/clean format and, since noln lists them, no file beside those it wrote), which is
    replaced. Anything else is refused: an export never deletes what noln did not write, and
    never the run it comes from."""
    out = Path(out)
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or dst in src.parents:
            raise NolnError(f"--out '{out}' is the run folder itself (or holds it): export into a "
                            "new folder, e.g. --out RUN/model")
    if out.exists() and not out.is_dir():
        raise NolnError(f"--out '{out}' is a file, not a folder: give a new folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    meta = out / "noln.json"
    try:
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        fmt, written = info.get("format"), set(info.get("files") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        fmt, written = None, set()
    if fmt not in EXPORT_FORMATS:
        raise NolnError(f"--out '{out}' is not empty and is not a noln export (no noln.json of "
                        "an hf or clean export): noln replaces only its own exports; choose a "
                        "new or empty folder")
    # another run's export (a run's model/, perhaps the model a run was trained from) is that
    # run's: an export replaces only one of its own run (older exports name no run: a run
    # folder's model/ or model-clean/ is its run's)
    owner = info.get("run")
    owner = Path(owner) if isinstance(owner, str) else \
        out.resolve().parent if is_run_folder(out.resolve().parent) else None
    src = Path(source).resolve() if source is not None else None
    # (a run's own model/ is its own, though the run folder was moved since)
    if src is not None and owner not in (None, src) and out.resolve().parent != src:
        raise NolnError(f"--out '{out}' holds the export of another run ('{owner}'): export into "
                        "a new folder (noln replaces an export only with one of the same run)")
    # an export from before noln listed its files: what an hf/clean export writes, no more
    ours = (lambda name: name in written) if written else export_file_name
    added = sorted(p.name for p in out.iterdir() if not ours(p.name))
    if added:
        raise NolnError(f"--out '{out}' is a noln export that now also holds what noln did "
                        f"not write ({', '.join(added[:3])}{' ...' if len(added) > 3 else ''})"
                        ": move it out first, or export to a new folder")


def _write_dir(out: Path, write, source: Path | None = None) -> None:
    """Write into a fresh temporary folder beside ``out`` and rename it into place: a killed
    export never leaves a half folder, and what ``out`` held (a previous export, checked by
    ``check_export_target``) goes only once the new one is complete."""
    check_export_target(out, source=source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.noln-tmp-", dir=out.parent))
    try:
        write(tmp)
        # the export lists what it holds, so a later export replaces only these files
        meta = json.loads((tmp / "noln.json").read_text())
        meta["files"] = sorted(p.name for p in tmp.iterdir())
        (tmp / "noln.json").write_text(json.dumps(meta, indent=1))
        _usual_modes(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.noln-old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # made by this call
        raise
    if old is not None:
        shutil.rmtree(old)  # the previous noln export (check_export_target), moved aside


def _usual_modes(folder: Path) -> None:
    """The modes a folder and its files get from ``mkdir`` and ``open`` under the user's umask
    (``mkdtemp`` makes the folder 0700): an export others may read where the run's files are."""
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _umask() -> int:
    """The process's umask, read where Linux says it (setting it to read it races with threads
    that create files meanwhile), else by setting it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def plain_model(adapter: NormAdapter, dtype: torch.dtype = torch.float32) -> nn.Module:
    """In memory, what the ``hf`` export of ``adapter.model`` loads as: the family's plain Hugging
    Face class (eval mode) with real norms, eps-trick weights where sites are frozen."""
    config = adapter.model.config.__class__.from_dict(adapter.model.config.to_dict())
    state = adapter.hf_state_dict()
    check_dtype(state, dtype, "hf")
    for k, v in adapter.hf_config_overrides().items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False)
    missing = set(model.state_dict()) - set(state)
    if any(not k.endswith("lm_head.weight") for k in missing):
        raise NolnError(f"internal: hf export misses weights {sorted(missing)[:3]}")
    return model.to(dtype).eval()


def clean_model(adapter: NormAdapter, dtype: torch.dtype = torch.float32) -> nn.Module:
    """In memory, what ``load_clean`` gives for a ``clean`` export of ``adapter.model`` (every
    site must be frozen): no norm module at all, eval mode."""
    config = adapter.model.config.__class__.from_dict(adapter.model.config.to_dict())
    model = type(adapter).build_clean_model(config)
    model.load_state_dict(adapter.clean_state_dict(), strict=True)
    return model.to(dtype).eval()


def export_model(adapter: NormAdapter, tokenizer, out: Path, fmt: str = "hf",
                 dtype: torch.dtype = torch.float32, events: list[dict] | None = None,
                 source: Path | None = None) -> Path:
    """Export ``adapter.model`` to ``out`` as ``hf`` or ``clean``; returns ``out``. ``source``:
    the run folder it comes from, kept in ``noln.json`` (``run``), so that a later export
    replaces it only from the same run."""
    out = Path(out)
    config = adapter.model.config.__class__.from_dict(adapter.model.config.to_dict())
    # a run's removal events, from a log.jsonl written before sites were named by role too
    events = [{**e, "site": canonical_site(e["site"])} if "site" in e else e
              for e in events or []]
    meta = {"format": fmt, "family": adapter.family, "sigmas": adapter.sigmas(),
            "frozen": adapter.frozen_sites(), "events": events}
    if source is not None:
        meta["run"] = str(Path(source).resolve())
    if fmt == "hf":
        model = plain_model(adapter, dtype)
        meta["note"] = ("plain checkpoint: norms use eps=1e12, weight=gamma*1e6/sigma"
                        if adapter.export_state() == "all" else "norms kept (nothing frozen)")

        def write(d: Path) -> None:
            with transformers_bars_off():  # its shard writer's bar, for one file
                model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            (d / "noln.json").write_text(json.dumps(meta, indent=1))
    elif fmt == "clean":
        state = {k: v.to(dtype).contiguous() for k, v in adapter.clean_state_dict().items()}
        check_dtype(state, dtype, fmt)
        config.tie_word_embeddings = False

        def write(d: Path) -> None:
            config.save_pretrained(d)
            save_file(state, str(d / "model.safetensors"))
            tokenizer.save_pretrained(d)
            (d / "noln.json").write_text(json.dumps(meta, indent=1))
    else:
        raise NolnError(f"unknown export format '{fmt}': use hf or clean")
    _write_dir(out, write, source)
    return out


def load_clean(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A ``clean`` export as a model with no norm module at all (eval mode)."""
    path = Path(path)
    meta_path = path / "noln.json"
    if not meta_path.is_file():
        raise NolnError(f"'{path}' is not a noln export (no noln.json): export it with "
                        "`noln export RUN --format clean`")
    meta = read_json(meta_path)
    if meta.get("format") != "clean":
        raise NolnError(f"'{path}' is a '{meta.get('format')}' export: load it with "
                        "transformers' from_pretrained, not load_clean")
    config = load_config(path)
    adapter_cls = next((c for c in ADAPTERS.values() if c.family == meta["family"]), None)
    if adapter_cls is None:
        raise NolnError(f"'{path}' holds an unsupported family '{meta['family']}'")
    model = adapter_cls.build_clean_model(config)
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:
        raise NolnError(f"cannot read '{path / 'model.safetensors'}' ({type(e).__name__}): the "
                        "export is corrupt; export it again") from None
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()

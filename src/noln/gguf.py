"""GGUF in: a llama.cpp ``.gguf`` file, or a folder holding one, is a model like any other.

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package) and dequantises every tensor to float32, but it parses the file once for the config,
once for the tokenizer and once for the weights (~5 s each for SmolLM2-135M's 98 MB). noln
converts a GGUF once into a plain Hugging Face folder in its cache (``config.json``, the
tokenizer, ``model.safetensors`` in float32), keyed by the file's sha256, so every later command
loads it in about a second, and everything downstream (a run's ``base/``, ``--resume``, exports,
TransformerLens, nnsight) sees an ordinary folder. The user's file is only read.

The cache lives in ``$NOLN_CACHE/gguf`` (default ``~/.cache/noln/gguf``); deleting it is safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from noln.errors import NolnError
from noln.progress import transformers_bars_off

SUFFIX = ".gguf"


def cache_root() -> Path:
    root = os.environ.get("NOLN_CACHE") or Path.home() / ".cache" / "noln"
    return Path(root) / "gguf"


def find_gguf(name: str | Path) -> Path | None:
    """The GGUF file ``name`` points at: ``name`` itself if it is a ``.gguf`` file, the one
    ``.gguf`` in a folder that has no ``config.json``; else None (not a GGUF source)."""
    path = Path(str(name)).expanduser()
    if str(name).endswith(SUFFIX):
        if not path.is_file():
            raise NolnError(f"GGUF file '{name}' does not exist: check the path")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob(f"*{SUFFIX}"))
    if len(found) > 1:
        raise NolnError(f"folder '{name}' holds {len(found)} GGUF files "
                        f"({', '.join(p.name for p in found[:4])}): pass one of them as MODEL")
    return found[0] if found else None


def _architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF, read from its header (a truncated or foreign file is
    a one-line error, before anything is dequantised)."""
    try:
        import gguf
    except ImportError:
        raise NolnError("reading a .gguf model needs the 'gguf' package: "
                        "pip install 'noln[gguf]'") from None
    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        expected = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except KeyError:
        raise NolnError(f"'{path}' has no general.architecture: not a model GGUF") from None
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors ... on junk
        raise NolnError(f"'{path}' is not a readable GGUF file ({type(e).__name__}: "
                        f"{str(e)[:80]}): is it truncated? download it again") from None
    if expected > path.stat().st_size:
        raise NolnError(f"GGUF file '{path}' is truncated ({path.stat().st_size:,} of "
                        f"{expected:,} bytes): download it again")
    return arch


def declared_name(path: Path) -> str | None:
    """The model a GGUF says it is, as ``organization/basename-size`` from its ``general.*``
    header fields (SmolLM2's file: ``HuggingFaceTB/smollm2-135M``); None where it does not say.
    A claim of the file's maker, for a hint, never for choosing settings by itself."""
    try:
        import gguf

        fields = gguf.GGUFReader(path).fields
        parts = [bytes(fields[k].parts[fields[k].data[0]]).decode()
                 for k in ("general.organization", "general.basename", "general.size_label")]
    except Exception:  # (a missing field; a bad file was refused by _architecture already)
        return None
    return f"{parts[0]}/{parts[1]}-{parts[2]}"


def readable_architectures() -> list[str]:
    """The GGUF architectures this transformers dequantises into a causal LM."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def hf_folder(path: Path, progress: bool = True) -> Path:
    """A plain Hugging Face folder holding ``path``'s model and tokenizer (float32), converted
    on first use and cached by content hash. Concurrent first uses each convert into their own
    temporary folder; the first rename wins and the others discard theirs."""
    path = Path(path).expanduser().resolve()
    target = cache_root() / f"{path.stem}-{_sha256(path)[:16]}"
    if (target / "config.json").is_file():  # this exact content converted before
        return target
    arch = _architecture(path)
    known = readable_architectures()
    if arch not in known:
        raise NolnError(f"GGUF architecture '{arch}' of '{path.name}' is not one transformers can "
                        f"read: {', '.join(known)}")

    if progress:
        Console(stderr=True).print(f"converting {path.name} ({arch}) to a float32 Hugging Face "
                                   f"folder in {target} (once)", highlight=False)
    with transformers_bars_off():  # its per-tensor bars and its shard writer's
        return _convert(path, target)


def _convert(path: Path, target: Path) -> Path:
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its tokenizer notes
    try:
        # a GGUF file carries tensors and metadata, never code: nothing here may run any
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                  trust_remote_code=False)
        # its per-tensor bar is a bare tqdm that no transformers setting turns off
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         trust_remote_code=False,
                                                         dtype=torch.float32)
    except Exception as e:
        raise NolnError(f"transformers could not read '{path.name}' ({type(e).__name__}: "
                        f"{str(e)[:120]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # the dequantised model still carries transformers' GGUF quantizer, which refuses to save:
    # rebuild it as the plain float32 model it is
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(config),
                                             dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "noln-source.txt").write_text(f"{path}\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its conversion there first: use that one
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # this call's own temporary folder, if left
    return target


def resolve(name: str | Path, progress: bool = True) -> str:
    """``name`` as something ``from_pretrained`` reads: a GGUF source becomes its converted
    folder, anything else is returned as it was."""
    found = find_gguf(name)
    return str(hf_folder(found, progress)) if found is not None else str(name)

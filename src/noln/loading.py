"""Load any model noln handles by one name: a Hub id, a Hugging Face folder, a noln export
(``hf`` or ``clean``) or a ``noln remove`` run folder / checkpoint file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from noln.errors import NolnError


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).exists() or name.count("/") > 1


def load_tokenizer(name: str | Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(name))
    except Exception as e:
        raise NolnError(f"cannot load a tokenizer for '{name}' ({type(e).__name__}): the folder "
                        "needs tokenizer files, or pass a Hub id with network access") from None
    tok.model_max_length = int(1e9)  # we chunk ourselves; silence length warnings
    return tok


def load_pretrained(name: str | Path, dtype: torch.dtype = torch.float32,
                    check_family: bool = True):
    """A causal LM from the Hub or a plain Hugging Face folder, with a clear error if missing.
    ``check_family``: refuse families noln cannot remove norms from (analysis needs no such
    check: it reads hidden states and logits, which every causal LM has)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = str(name)
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise NolnError(f"model '{name}' does not exist: check the path, or give a Hub id such "
                        "as 'gpt2'")
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as e:
        raise NolnError(f"cannot load model '{name}' ({type(e).__name__}): not a local folder with "
                        "config.json and not reachable on the Hugging Face Hub (offline?); pass "
                        "a local folder") from None
    if check_family:
        from noln.arch import check_supported

        check_supported(config)
    return AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype)


def load_model(name: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for anything noln can name, in eval mode.

    - a noln ``clean`` export folder (``noln.json`` says ``"format": "clean"``): no norm modules;
    - a noln run folder (has ``checkpoints/``) or a checkpoint file: the model as trained, with
      its FakeNorms in whatever state they were;
    - a folder written by ``noln linearize``: the base model with its blocks replaced;
    - anything else: ``AutoModelForCausalLM.from_pretrained`` (``hf`` exports load this way),
      of any family ``transformers`` knows, not only those noln removes norms from.
    """
    from noln.linearity.replace import is_linearized, load_linearized

    path = Path(str(name)).expanduser()
    meta = path / "noln.json"
    if is_linearized(path):
        model, tok = load_linearized(path, dtype=dtype)
    elif meta.is_file() and json.loads(meta.read_text()).get("format") == "clean":
        from noln.export import load_clean

        model = load_clean(path, dtype=dtype)
        tok = load_tokenizer(path)
    elif (path / "checkpoints").is_dir() or (path.is_file() and path.suffix == ".pt"):
        from noln.checkpoint import load_run_model

        model, tok = load_run_model(path, dtype=dtype)
    else:
        model = load_pretrained(name, dtype=dtype, check_family=False)
        tok = load_tokenizer(name)
    model.eval()
    return model, tok

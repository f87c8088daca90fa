"""Open any model noln handles by one name: a Hub id, a Hugging Face folder, a llama.cpp
``.gguf`` file (``noln.pretrained``), a noln export (``hf`` or ``clean``), a ``noln remove`` run
folder or checkpoint file (``noln.run``), or a ``noln linearize`` folder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

from noln.arch import install
from noln.checkpoint import load_checkpoint
from noln.export import load_clean
from noln.linearity.replace import META_FILE, is_linearized, load_linearized
from noln.pretrained import load_config, load_pretrained, load_tokenizer, read_json
from noln.run import RunFolder, load_latest_checkpoint
from noln.sinks import fade_at, scale_neurons


def load_run_model(path: Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a run folder's latest checkpoint (or a checkpoint file), with
    its FakeNorms in the state they were saved in, and sink neurons saved mid-fade
    (``prune_fade``) writing what they wrote at that step."""
    path = Path(path)
    ckpt_path, ckpt = (path, load_checkpoint(path)) if path.is_file() else \
        load_latest_checkpoint(path)
    run = RunFolder(ckpt_path.parent.parent)
    model = AutoModelForCausalLM.from_config(load_config(run.base), dtype=dtype)
    install(model)
    model.load_state_dict(ckpt["model"])
    fade, neurons = ckpt.get("config", {}).get("prune_fade", 0), ckpt.get("extra", {}).get(
        "sink_neurons")
    if neurons and ckpt["step"] < fade:  # saved mid-fade: what the sink neurons wrote then
        scale_neurons(model, neurons, fade_at(ckpt["step"], fade))
    return model, load_tokenizer(run.base)


def load_model(name: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for anything noln can name, in eval mode.

    - a noln ``clean`` export folder (``noln.json`` says ``"format": "clean"``): no norm modules;
    - a noln run folder (has ``checkpoints/``) or a checkpoint file: the model as trained, with
      its FakeNorms in whatever state they were;
    - a folder written by ``noln linearize``: the base model with its blocks replaced;
    - anything else: ``AutoModelForCausalLM.from_pretrained`` (``hf`` exports load this way),
      of any family ``transformers`` knows, not only those noln removes norms from.
    """
    path = Path(str(name)).expanduser()
    meta = path / "noln.json"
    if is_linearized(path):
        model, tok = load_linearized(path, load_model, dtype=dtype)
    elif meta.is_file() and read_json(meta).get("format") == "clean":
        model = load_clean(path, dtype=dtype)
        tok = load_tokenizer(path)
    elif RunFolder(path).checkpoints.is_dir() or (path.is_file() and path.suffix == ".pt"):
        model, tok = load_run_model(path, dtype=dtype)
    else:
        model = load_pretrained(name, dtype=dtype, check_family=False)
        tok = load_tokenizer(name)
    model.eval()
    return model, tok


def _config_folder(name: str | Path) -> str | Path:
    """Where the model ``load_model(name)`` opens keeps its config and tokenizer: a run's
    ``base/`` for a run folder or checkpoint file, else the name itself."""
    path = Path(str(name)).expanduser()
    if RunFolder(path).checkpoints.is_dir():
        return RunFolder(path).base
    if path.is_file() and path.suffix == ".pt":
        return RunFolder(path.parent.parent).base
    return name


def model_tokenizer(name: str | Path):
    """The tokenizer of the model ``load_model(name)`` opens, without its weights: for checks
    of token positions and targets before a large model loads."""
    return load_tokenizer(_config_folder(name))


def model_depth(name: str | Path) -> int | None:
    """How many decoder blocks the model ``load_model(name)`` opens has, read from its config
    without loading weights (None where the config does not say): for checks that must come
    before a large model loads."""
    path = Path(str(name)).expanduser()
    if is_linearized(path):
        return int(read_json(path / META_FILE)["n_layers"])
    n = getattr(load_config(_config_folder(name)), "num_hidden_layers", None)
    return int(n) if n else None


def model_kind(path: str | Path) -> str | None:
    """What model, if any, the local folder ``path`` holds, in words (None: none noln reads):
    where reports must not go, beside the files a later load reads."""
    path = Path(str(path)).expanduser()
    if not path.is_dir():
        return None
    if is_linearized(path):
        return "a noln linearize output"
    if RunFolder(path).is_run():
        return "a noln run folder"
    if (path / "noln.json").is_file():
        return "a noln export"
    if (path / "config.json").is_file() or any(path.glob("*.gguf")) or \
            any(path.glob("*.safetensors")):
        return "a model"
    return None


# the tanh approximation of GELU written as six elementwise ops (GPT-2's gelu_new, gelu_fast)
TANH_GELU_IN_OPS = (NewGELUActivation, FastGELUActivation)


def fuse_activations(model: nn.Module) -> int:
    """Run every tanh-approximated GELU written out in elementwise ops (GPT-2's ``gelu_new``)
    as torch's one fused kernel of the same function, ``gelu(x, approximate="tanh")``:
    transformers' own ``gelu_pytorch_tanh``, which it documents as equivalent, "not an exact
    numerical match due to rounding errors" (float32: ~1e-7 relative). For scoring only: six
    passes over the MLP's 4d-wide activations were 29% of HellaSwag scoring on GPT-2
    (docs/BENCHMARKS.md). Returns how many modules it replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in TANH_GELU_IN_OPS:
                setattr(parent, name, GELUTanh())
                replaced += 1
    return replaced

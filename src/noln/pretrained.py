"""Pretrained models, configs and tokenizers from the Hub, a Hugging Face folder or a llama.cpp
``.gguf`` file (or a folder holding one; see ``noln.gguf``): code-free unless the user passes
``--trust-remote-code``, one clear line for every way a name or a folder can be wrong.
``noln.loading.load_model`` builds on these to open anything noln writes as well."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from noln.arch import check_supported
from noln.config import looks_local
from noln.errors import NolnError
from noln.gguf import resolve as resolve_gguf
from noln.hub import offline_reason, offline_unless_reachable
from noln.progress import transformers_bars_off
from noln.trust import trust_remote_code

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors: the error lives in the compiled module
    from safetensors._safetensors_rust import SafetensorError

def _raise_remote_code(name, e: Exception) -> None:
    """transformers' refusal to run a repository's code, as noln's one line."""
    if "custom code" in str(e) or "trust_remote_code" in str(e):
        raise NolnError(f"'{name}' needs its own Python code to load (auto_map): noln runs a "
                        "model's code only with --trust-remote-code; check the code first") \
            from None


def read_json(path: Path) -> dict:
    """A JSON object file noln reads (noln.json, linearized.json, config.json): unreadable or
    not a JSON object is one error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NolnError(f"'{path}' is not a readable JSON file ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]}): the file is corrupt; restore or "
                        "re-create it") from None
    if not isinstance(data, dict):
        raise NolnError(f"'{path}' is not a JSON object: the file is corrupt")
    return data


def read_config_json(folder: Path) -> dict:
    """A local model folder's ``config.json``; missing, unreadable or not JSON is one error
    naming the file."""
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise NolnError(f"'{folder}' has no config.json: not a Hugging Face model folder (nor a "
                        "noln run or export); check the path")
    return read_json(path)


def load_config(name: str | Path):
    """``AutoConfig`` of a Hub id or local folder, code-free unless --trust-remote-code: a
    folder whose config names its own code (``auto_map``) and a model type transformers does not
    know is refused with the flag to pass, before anything is imported from it. A ``.gguf``
    source reads its converted folder."""
    name = str(resolve_gguf(name))
    local = Path(name).expanduser()
    if not local.exists():  # a Hub id: where the Hub cannot be reached, its cache only
        offline_unless_reachable()
    if local.is_dir():
        raw = read_config_json(local)
        if "auto_map" in raw and not trust_remote_code() and \
                raw.get("model_type") not in CONFIG_MAPPING_NAMES:
            raise NolnError(f"'{name}' needs its own Python code to load (config.json auto_map, "
                            f"model type {raw.get('model_type')!r}): noln runs a model's code "
                            "only with --trust-remote-code; check the code first")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code())
    except Exception as e:  # noqa: BLE001 - transformers raises anything for a bad folder
        _raise_remote_code(name, e)
        if local.is_dir():
            raise NolnError(f"cannot read the config of '{name}' ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:160]})") from None
        raise NolnError(_hub_failure(name, e)) from None


def _hub_failure(name: str, e: BaseException) -> str:
    """Why a name that is no local folder did not load from the Hub, and what to do: the error
    transformers raises wraps huggingface_hub's, which says which way it failed."""
    causes = []
    while e is not None and len(causes) < 8:
        causes.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(c, GatedRepoError) for c in causes):
        return (f"'{name}' is a gated model on the Hugging Face Hub: accept its terms at "
                f"https://huggingface.co/{name} and log in (`hf auth login`)")
    if any(isinstance(c, RepositoryNotFoundError) for c in causes):
        return (f"model '{name}' is neither a local path nor a model on the Hugging Face Hub: "
                "check the spelling (a Hub id such as 'gpt2' or 'HuggingFaceTB/SmolLM2-135M'; "
                "a private model needs `hf auth login`)")
    if any(isinstance(c, HFValidationError) for c in causes):
        return (f"model '{name}' is neither a local path nor a valid Hugging Face Hub id: check "
                "it (a Hub id is NAME or ORG/NAME, such as 'gpt2' or "
                "'HuggingFaceTB/SmolLM2-135M'; a folder must exist)")
    if offline_reason() is not None:  # noln read the cache only: the Hub cannot be reached
        return (f"cannot load model '{name}': it is not a local path nor in the Hub cache, and "
                f"the Hugging Face Hub is not reachable ({offline_reason()}: offline?): check "
                "the spelling, or pass a local folder")
    if hf_constants.HF_HUB_OFFLINE:
        return (f"model '{name}' is neither a local path nor in the Hub cache, and HF_HUB_OFFLINE "
                "keeps noln off the Hub: check the spelling, pass a local folder, or unset "
                "HF_HUB_OFFLINE to download it")
    if any(_unreachable(c) for c in causes):
        return (f"cannot load model '{name}': it is not a local path and the Hugging Face Hub is "
                "not reachable (offline?): check the spelling, pass a local folder, or set "
                "HF_HUB_OFFLINE=1 to read only the Hub cache (no waiting on the Hub's retries)")
    # the Hub answered, with something else (no config.json, a server error ...): its words
    said = next((line for line in str(causes[0]).splitlines() if line.strip()),
                type(causes[0]).__name__)
    return (f"cannot load model '{name}' from the Hugging Face Hub ({' '.join(said.split())[:200]}"
            "): check the name, or pass a local folder")


def _unreachable(e: BaseException) -> bool:
    """Whether ``e`` says the Hub could not be reached (no network, a timeout), as
    huggingface_hub, httpx, requests or transformers put it."""
    names = {k.__name__ for k in type(e).__mro__}
    return isinstance(e, ConnectionError | TimeoutError | LocalEntryNotFoundError) or \
        bool(names & {"ConnectError", "ConnectionError", "TimeoutException", "Timeout",
                      "TransportError"}) or "couldn't connect" in str(e)


def check_causal(config, name) -> None:
    """Refuse a model that does not predict the next token from the left alone (BERT and other
    encoders see the future, so their "CE" means nothing), from its config, before weights."""
    causal_classes = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal_classes.update(v if isinstance(v, list | tuple) else [v])
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return
    if archs:
        causal = any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel"))
                     for a in archs)
    else:
        causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if causal and model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and \
            not getattr(config, "is_decoder", False):
        causal = False  # an encoder family: its causal head needs is_decoder
    if not causal:
        what = archs[0] if archs else model_type
        raise NolnError(f"'{name}' is a {what}, not a causal language model (it sees the tokens "
                        "it predicts): noln takes models that predict the next token, such as "
                        "GPT-2, Pythia or Llama")


def load_tokenizer(name: str | Path):
    name = resolve_gguf(name)
    if not Path(name).expanduser().exists():
        offline_unless_reachable()
    try:
        tok = AutoTokenizer.from_pretrained(str(name), trust_remote_code=trust_remote_code())
    except Exception as e:  # noqa: BLE001 - transformers raises anything for a bad folder
        _raise_remote_code(name, e)
        if offline_reason() is not None and not Path(name).expanduser().exists():
            raise NolnError(f"cannot load the tokenizer of '{name}': it is not in the Hub cache, "
                            f"and the Hugging Face Hub is not reachable ({offline_reason()}: "
                            "offline?): pass a local folder") from None
        raise NolnError(f"cannot load a tokenizer for '{name}' ({type(e).__name__}): the folder "
                        "needs tokenizer files, or pass a Hub id with network access") from None
    tok.model_max_length = int(1e9)  # we chunk ourselves; silence length warnings
    return tok


def check_models_exist(*names: str | Path) -> None:
    """Every name that is a local path exists: a typo is one line before the first model
    loads (a command reading several models would find it only after the others' work)."""
    for name in names:
        if not str(name).strip():  # (Path('') is '.', which it was read as)
            raise NolnError("a model name is empty: give a Hub id such as 'gpt2', a model "
                            "folder, a .gguf file or a noln run folder")
        path = Path(str(name)).expanduser()
        if looks_local(str(name)) and not path.exists():
            raise NolnError(f"model '{name}' does not exist: check the path, or give a Hub id "
                            "such as 'gpt2'")
        if path.is_file() and path.suffix not in (".gguf", ".pt"):  # (a data file, a config)
            raise NolnError(f"model '{name}' is a file, not a model: give a model folder, a "
                            ".gguf file, a run folder or a checkpoint .pt, or a Hub id")


def load_pretrained(name: str | Path, dtype: torch.dtype = torch.float32,
                    check_family: bool = True):
    """A causal LM from the Hub or a plain Hugging Face folder, with a clear error if missing.
    ``check_family``: refuse families noln cannot remove norms from (analysis needs no such
    check: it reads hidden states and logits, which every causal LM has)."""
    name = resolve_gguf(name)  # a .gguf file (or a folder holding one): its converted folder
    check_models_exist(name)
    config = load_config(name)
    check_causal(config, name)
    if check_family:
        check_supported(config)
    try:
        with transformers_bars_off():
            model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype,
                                                         trust_remote_code=trust_remote_code())
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        _raise_remote_code(name, e)
        if offline_reason() is not None and not Path(name).expanduser().exists():
            raise NolnError(f"cannot load the weights of '{name}': its config is in the Hub "
                            "cache but its weights are not, and the Hugging Face Hub is not "
                            f"reachable ({offline_reason()}: offline?): pass a local folder, or "
                            "download it where the Hub is reachable") from None
        first = " ".join(str(e).split())[:200]
        hint = ("the weights file is corrupt or truncated; copy or download it again"
                if isinstance(e, SafetensorError | OSError) else "is the folder complete?")
        raise NolnError(f"cannot read the weights of '{name}' ({type(e).__name__}: {first}): "
                        f"{hint}") from None
    return aligned(model)


# bytes: what PyTorch's CPU allocator gives every new tensor
ALIGNMENT = 64


def aligned(model: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer in memory of its own, ``ALIGNMENT``-aligned.
    ``from_pretrained`` may leave tensors at 8-byte offsets of the weights file, and CPU
    kernels round differently on unaligned memory (GPT-2's V-path ``addmv``: a bias gradient
    1 ulp off), so a run resumed into a model built from its config, whose tensors are
    aligned, drifted ~1e-7 from the run that never stopped (docs/BENCHMARKS.md). Tied
    weights stay tied: a shared parameter is one object, copied once."""
    copies: dict[int, torch.Tensor] = {}  # a buffer two modules share stays shared
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.data_ptr() % ALIGNMENT:
                    p.data = p.data.clone()
            for name, b in module.named_buffers(recurse=False):
                if b.data_ptr() % ALIGNMENT:
                    module._buffers[name] = copies.setdefault(id(b), b.clone())
    return model

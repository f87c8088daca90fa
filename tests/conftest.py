"""Shared fixtures: a tiny GPT-2 with its own tokenizer (no network, no ../shared needed) and
the offline reference data in ../shared (tests that need it skip with a clear message)."""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"

# before any test module imports noln (and with it huggingface_hub, which reads these once, at
# import): a Hub id the tests give fails at once instead of after the Hub client's retries
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["NOLN_CACHE"] = str(tmp_path_factory.mktemp("noln-cache"))
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _hub_name_resolves(request, monkeypatch):
    """Where a test switches the Hub back on, the resolver of the machine it runs on does not
    decide what noln does (noln.hub): as if the Hub's name resolved. A test marked
    ``hub_resolver`` decides it itself."""
    import noln.hub

    monkeypatch.setattr(noln.hub, "_offline_reason", None)
    if request.node.get_closest_marker("hub_resolver") is None:
        monkeypatch.setattr(noln.hub, "unresolved_host", lambda: None)


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the offline data at {path} (the ../shared folder beside the repo)")
    return path


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    """~200 documents of the standard library's docstrings as a .jsonl file."""
    from noln.data import builtin_documents

    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    with path.open("w") as f:
        for i, doc in enumerate(builtin_documents()):
            if i >= 400:
                break
            f.write(json.dumps({"text": doc}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, text_jsonl) -> Path:
    """A randomly initialised 2-layer GPT-2 (d=32) with a 512-token BPE, as a HF folder."""
    from noln.pretrain import build_model, train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(str(text_jsonl), vocab_size=512)
    model = build_model("gpt2", len(tok), n_layer=2, d_model=32, n_head=2, ctx=64,
                        eot_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def need_transformer_lens() -> None:
    try:
        version = metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        pytest.skip("transformer-lens is not installed (pip install 'noln[interop]')")
    if not version.startswith("3."):
        pytest.skip(f"noln supports TransformerLens 3.x, found {version}")


def freeze_all(model, tokens: torch.Tensor, spread: float = 0.1):
    """Every site frozen at its EMA sigma after one train-mode pass, scaled per site so the
    Q/K and V paths of ln_1 differ (the hard case for the exports)."""
    from noln.arch import install

    adapter = install(model)
    model.train()
    with torch.no_grad():
        model(tokens)
    model.eval()
    for i, name in enumerate(adapter.site_names()):
        norm = adapter.site(name).norm
        norm.freeze(float(norm.sigma) * (1 + spread * (i % 3)))
    return adapter


def frozen_exports(model_dir: Path, root: Path, seed: int) -> SimpleNamespace:
    """The model in ``model_dir`` with every site frozen (``freeze_all`` on random tokens drawn
    after ``torch.manual_seed(seed)``), and its ``hf`` and ``clean`` exports under ``root``."""
    from transformers import AutoModelForCausalLM

    from noln.export import export_model
    from noln.pretrained import load_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    adapter = freeze_all(model, torch.randint(0, len(tok), (4, 32)))
    return SimpleNamespace(model=model, tok=tok, hf=export_model(adapter, tok, root / "hf", "hf"),
                           clean=export_model(adapter, tok, root / "clean", "clean"))


def assert_run_matches_its_exports(result, vocab: int) -> None:
    """A finished removal run's ``hf`` and ``clean`` exports, and its run folder, give the
    trained model's logits."""
    from transformers import AutoModelForCausalLM

    import noln

    run = result.out
    x = torch.randint(0, vocab, (2, 30))
    plain = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    clean = noln.load_clean(run / "model-clean")
    loaded, _ = noln.load_model(run)  # a run folder loads as the model it trained
    with torch.no_grad():
        ref = result.model(x).logits
        torch.testing.assert_close(plain(x).logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(clean(x).logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(x).logits, ref)



def overflow_on(model, block, token: int, when=lambda: True, factor: float = torch.inf) -> None:
    """Hooks that send ``token``'s residual to inf after ``block`` (a module of ``model``)
    while ``when()`` holds: a model that overflows on one token, as a runaway norm-free
    SwiGLU model does on a rare one. A finite ``factor`` multiplies it instead: the blocks
    after it grow it further (a SwiGLU MLP squares it), as a runaway token's do."""
    seen = {}

    def runaway(module, args, out):
        if not when():
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        hit = (seen["ids"] == token)[..., None]
        hidden = hidden.masked_fill(hit, torch.inf) if factor == torch.inf else \
            torch.where(hit, hidden * factor, hidden)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    model.register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__(
        "ids", kwargs["input_ids"]), with_kwargs=True)
    block.register_forward_hook(runaway)

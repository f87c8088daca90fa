"""Shared fixtures: a tiny GPT-2 with its own tokenizer (no network, no ../shared needed) and
the offline reference data in ../shared (tests that need it skip with a clear message)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    import os

    os.environ["NOLN_CACHE"] = str(tmp_path_factory.mktemp("noln-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    torch.set_num_threads(2)


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

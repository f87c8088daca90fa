"""GGUF in: a tiny Llama written as GGUF here (llama.cpp's layout: Q/K rows permuted for its
rotary), read back through noln, must give the original model's logits; bad files are one
clear line. The real SmolLM2 file is used when it is present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

gguf = pytest.importorskip("gguf")

SMOLLM2 = Path(os.environ.get("NOLN_SMOLLM2", Path.home() / ".cache/noln/models/"
                              "SmolLM2-135M-Instruct.Q4_1.gguf"))


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert script reorders each Q/K head's rows from HF's rotate-half layout
    to interleaved pairs; transformers undoes it when it reads a GGUF."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_llama_gguf(path: Path, model, tokenizer, named: tuple[str, str, str] | None = None
                     ) -> None:
    """``model`` (a LlamaForCausalLM, tied embeddings) and its byte-level BPE as an F32 GGUF;
    ``named``: the organization, base name and size label its header says it is."""
    cfg = model.config
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {t["content"] for t in spec["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    if named is not None:
        writer.add_organization(named[0])
        writer.add_basename(named[1])
        writer.add_size_label(named[2])
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges(merges)
    eot = vocab["<|endoftext|>"]
    writer.add_bos_token_id(eot)
    writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        w = sd[hf]
        if gg.endswith("attn_q.weight"):
            w = _permute(w, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            w = _permute(w, cfg.num_key_value_heads)
        writer.add_tensor(gg, np.ascontiguousarray(w.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, text_jsonl):
    from transformers import LlamaConfig, LlamaForCausalLM

    from noln.pretrain import train_tokenizer

    tok = train_tokenizer(str(text_jsonl), vocab_size=384)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_llama_gguf(path, model, tok)
    return path, model, tok


def test_gguf_file_and_folder_load_to_the_original_logits(tiny_gguf):
    from noln.loading import load_model

    path, original, tok = tiny_gguf
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        want = original(ids).logits
    for name in (path, path.parent):  # the file, and a folder holding one
        model, tokenizer = load_model(name)
        assert tokenizer("The quick brown fox")["input_ids"] == tok("The quick brown fox")[
            "input_ids"]
        with torch.no_grad():
            got = model(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # converted once, then read from the cache: the user's folder is left as it was
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_loading_shows_none_of_transformers_bars(tiny_gguf, tmp_path, monkeypatch, capfd):
    """A conversion and a load print no transformers bar (per-tensor conversion, "Loading
    weights", shard writing): noln shows its own, and --quiet means none. The user's setting
    is left as it was."""
    from transformers.utils import logging as hf_logging

    from noln.pretrained import load_pretrained

    monkeypatch.setenv("NOLN_CACHE", str(tmp_path / "cache"))  # converted here, then loaded
    path, _, _ = tiny_gguf
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    load_pretrained(path)
    err = capfd.readouterr().err
    assert "converting tiny-llama.F32.gguf" in err  # noln's own line: it did convert here
    for bar in ("Converting", "Loading weights", "Writing", "it/s"):
        assert bar not in err, err
    assert hf_logging.is_progress_bar_enabled()


def test_gguf_removal_sites_and_export(tiny_gguf, tmp_path):
    from noln.arch import install
    from noln.pretrained import load_pretrained

    path, _, _ = tiny_gguf
    adapter = install(load_pretrained(path))
    assert len(adapter.site_names()) == 2 * 3 + 1
    # the config alone, as `--control --hellaswag` reads it before training
    from noln.pretrained import load_config

    assert load_config(path).num_hidden_layers == 2


def test_a_gguf_naming_a_preset_model_is_told_the_preset(tiny_gguf, text_jsonl, tmp_path):
    """A GGUF whose header says it is SmolLM2-135M (as the real file's does) gets the
    small-model preset, never the SmolLM2 one by its claim alone, and a note naming
    ``--preset``; a GGUF that names no such model, or a run given --preset, gets no note."""
    path, model, tok = tiny_gguf
    named = tmp_path / "named.gguf"
    write_llama_gguf(named, model, tok, named=("HuggingFaceTB", "smollm2", "135M"))
    args = ["--data", str(text_jsonl), "--steps", "10", "--schedule", "fixed", "--batch-size",
            "2", "--ctx", "32", "--format", "none", "--quiet"]
    r = _cli("remove", str(named), "--out", str(tmp_path / "a"), *args)
    assert r.returncode == 0, r.stderr
    assert "note: 'named.gguf' says it is HuggingFaceTB/smollm2-135M: `--preset " \
        "HuggingFaceTB/SmolLM2-135M-Instruct` starts from the settings measured on it " \
        "(presets: HuggingFaceTB/SmolLM2-135M, HuggingFaceTB/SmolLM2-135M-Instruct)" in \
        " ".join(r.stderr.split()), r.stderr
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["preset"] is None and saved["prune_blocks"] is None  # not SmolLM2's recipe
    r = _cli("remove", str(path), "--out", str(tmp_path / "b"), *args)
    assert r.returncode == 0 and "--preset" not in r.stderr, r.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "noln.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "NOLN_DEBUG": ""}, timeout=300)


def test_bad_gguf_files_are_one_clear_line(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    other = tmp_path / "rwkv.gguf"  # an architecture transformers does not read
    writer = gguf.GGUFWriter(str(other), "rwkv6")
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"")
    cases = {truncated: "truncated", junk: "not a readable GGUF", other: "architecture 'rwkv6'",
             two: "holds 2 GGUF files", tmp_path / "missing.gguf": "does not exist"}
    for bad, message in cases.items():
        r = _cli("sites", str(bad))
        assert r.returncode == 2, (bad, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"needs SmolLM2's GGUF at {SMOLLM2} "
                    "(../shared/models/smollm2/fetch.sh fetches it)")
def test_real_smollm2_gguf():
    """SmolLM2-135M-Instruct (Q4_1): Llama, 30 layers, 91 removal sites, the pretraining's
    document separator, and a sensible next-token loss on plain English."""
    from noln.arch import install
    from noln.data import separator_id
    from noln.loading import load_model

    model, tok = load_model(SMOLLM2)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert separator_id(tok) == 0 and tok.eos_token_id == 2  # <|endoftext|>, <|im_end|>
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of"
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert tok.decode(logits[0, -1].argmax()).strip() == "Italy" or \
        torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]) < 3.0
    assert len(install(model).site_names()) == 91


@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"needs SmolLM2's GGUF at {SMOLLM2} "
                    "(../shared/models/smollm2/fetch.sh fetches it)")
def test_real_smollm2_norm_free_exports_and_interop(tmp_path):
    """SmolLM2 with all 91 sites frozen (at 2x their EMA sigmas: at 1x, the norm-free model's
    SwiGLU blocks blow a 16-token input up to inf without fine-tuning) exports to plain
    LlamaForCausalLM (every RMSNorm eps >= 1e10) and to the clean model, and TransformerLens and
    nnsight give the same logits."""
    from transformers import AutoModelForCausalLM

    import noln
    from noln.arch import install
    from noln.data import separator_id
    from noln.export import export_model
    from noln.fakenorm import special_token_mask
    from noln.loading import load_model

    model, tok = load_model(SMOLLM2)
    eot = separator_id(tok)
    adapter = install(model, eot_id=eot)
    texts = ["The quick brown fox jumps over the lazy dog. It was a sunny day in the park",
             "In 1905, Einstein published four papers that changed physics forever. The"]
    ids = torch.tensor([tok(t)["input_ids"][:16] for t in texts])
    model.train()
    with torch.no_grad(), adapter.measuring(std_mask=~special_token_mask(ids, eot)):
        model(input_ids=ids)
    model.eval()
    for name in adapter.site_names():
        adapter.freeze(name)
        adapter.site(name).norm.sigma.mul_(2.0)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert torch.isfinite(want).all() and want.std() > 0.05
    hf = export_model(adapter, tok, tmp_path / "hf", "hf")
    clean = export_model(adapter, tok, tmp_path / "clean", "clean")
    plain = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.rms_norm_eps >= 1e10
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(noln.load_clean(clean)(ids).logits, want, rtol=1e-4,
                                   atol=1e-4)
    tl = noln.to_transformer_lens(hf)
    with torch.no_grad():
        torch.testing.assert_close(tl(ids), want, rtol=1e-4, atol=1e-4)
    nm = noln.to_nnsight(hf)
    with nm.trace(ids):
        logits = nm.output.logits.save()
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)

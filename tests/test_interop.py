"""Interop: TransformerLens 3.x and nnsight views of a no-LN model, lm-eval on its hf export.

Tolerance for logits: rtol = atol = 1e-4 (float32 rounding of folded weights; the hf export's
eps trick is off by ~var/2e12 relative). Residual-stream sums: rtol = atol = 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import noln
from noln.errors import NolnError
from noln.export import export_model
from noln.pretrained import load_tokenizer

from .conftest import freeze_all, frozen_exports, need_transformer_lens, shared_path

TEXT = "The module defines a function that returns the value of the argument"


@pytest.fixture(scope="module")
def no_ln(tiny_model_dir, tmp_path_factory):
    """The tiny GPT-2 with every site frozen, its hf and clean exports, and logits to match."""
    frozen = frozen_exports(tiny_model_dir, tmp_path_factory.mktemp("interop"), seed=0)
    frozen.ids = torch.tensor([frozen.tok(TEXT)["input_ids"][:24]])
    with torch.no_grad():
        frozen.logits = frozen.model(frozen.ids).logits
    return frozen


def test_transformer_lens_from_every_form_has_no_norm_and_the_same_logits(no_ln):
    need_transformer_lens()
    for source in (no_ln.model, no_ln.hf, no_ln.clean):
        tl = noln.to_transformer_lens(source, tokenizer=no_ln.tok)
        assert tl.cfg.normalization_type is None
        assert not any(".ln" in name or "ln_final" in name for name in tl.hook_dict)
        assert all(type(b.ln1).__name__ == "Identity" for b in tl.blocks)
        with torch.no_grad():
            torch.testing.assert_close(tl(no_ln.ids), no_ln.logits, rtol=1e-4, atol=1e-4)
    assert tl.tokenizer is not None and tl.to_tokens(TEXT).shape[1] > 1  # offline tokenizer


def test_run_with_cache_residuals_are_exact_linear_sums_of_components(no_ln):
    need_transformer_lens()
    tl = noln.to_transformer_lens(no_ln.clean)
    with torch.no_grad():
        logits, cache = tl.run_with_cache(no_ln.ids)
        hidden = noln.load_clean(no_ln.clean)(no_ln.ids, output_hidden_states=True).hidden_states
    n = tl.cfg.n_layers

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    for layer in range(n + 1):
        parts = cache.get_full_resid_decomposition(layer=layer, expand_neurons=False)
        target = cache["resid_pre", layer] if layer < n else cache["resid_post", n - 1]
        close(parts.sum(0), target)  # embed + pos_embed + heads + MLPs + biases
        assert cache.apply_ln_to_stack(parts, layer=layer) is parts  # no norm to apply
        if layer < n:
            mid = cache.get_full_resid_decomposition(layer=layer, mlp_input=True,
                                                     expand_neurons=False)
            close(mid.sum(0), cache["resid_mid", layer])
            close(cache["resid_mid", layer], cache["resid_pre", layer] + cache["attn_out", layer])
            close(cache["resid_post", layer], cache["resid_mid", layer] + cache["mlp_out", layer])
        close(target, hidden[layer])  # the residual stream is the model's own
    # the readout is linear: logits = resid @ W_U + b_U, nothing in between
    close(logits, cache["resid_post", n - 1] @ tl.W_U + tl.b_U)


def test_models_with_layernorm_and_transformer_lens_4_are_refused(tiny_model_dir, monkeypatch):
    need_transformer_lens()
    with pytest.raises(NolnError, match="still has its LayerNorm"):
        noln.to_transformer_lens(tiny_model_dir)
    # allowed on request (noln attribute's original model): norms kept, folded as LNPre
    from noln.interop import hooked_transformer

    tl = hooked_transformer(tiny_model_dir, allow_ln=True)
    assert tl.cfg.normalization_type == "LNPre"
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, plain.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(tl(ids), plain(ids).logits, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr("noln.interop.metadata.version", lambda name: "4.3.0")
    with pytest.raises(NolnError, match=r"TransformerLens 3\.x, found 4\.3\.0.*removed "
                                        r"HookedTransformer.*transformer-lens>=3,<4"):
        noln.to_transformer_lens(tiny_model_dir)


def test_nnsight_reads_and_patches_a_residual_activation(no_ln):
    pytest.importorskip("nnsight")
    need_transformer_lens()
    nm = noln.to_nnsight(no_ln.model, tokenizer=no_ln.tok)  # the run's model -> its clean form
    assert not any("Norm" in type(m).__name__ for m in nm._module.modules())
    tl = noln.to_transformer_lens(no_ln.hf)
    source, other = no_ln.ids, torch.roll(no_ln.ids, 3, dims=1)
    with torch.no_grad():
        with nm.trace(source):
            resid = nm.transformer.h[0].output.save()
            logits = nm.lm_head.output.save()
        with nm.trace(other):
            nm.transformer.h[0].output[:, -1, :] = resid[:, -1, :]
            patched = nm.lm_head.output.save()
        _, cache = tl.run_with_cache(source)

        def patch(x, hook):
            x[:, -1, :] = cache["resid_post", 0][:, -1, :]
            return x

        expected = tl.run_with_hooks(other, fwd_hooks=[("blocks.0.hook_resid_post", patch)])
        unpatched = tl(other)
    torch.testing.assert_close(resid, cache["resid_post", 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, no_ln.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-4)
    assert (patched[0, -1] - unpatched[0, -1]).abs().max() > 1e-3  # the patch did something
    torch.testing.assert_close(patched[0, :-1], unpatched[0, :-1], rtol=1e-4, atol=1e-4)


ITEMS = [
    ("The function returns", ["a list of values.", "the sky at night.", "nothing at all.",
                              "an integer or None."], 0),
    ("To open a file, call", ["open with a path.", "the dog twice.", "it a day.",
                              "the module by name."], 0),
    ("A class can define", ["methods and attributes.", "the rain.", "a red apple.",
                            "its own exceptions."], 3),
    ("The argument must be", ["a string.", "blue and green.", "an integer.", "very tall."], 2),
    ("This module provides", ["functions for paths.", "a nice garden.", "support for tests.",
                              "the weather."], 1),
    ("If the value is None,", ["the default is used.", "cats sleep.", "an error is raised.",
                               "the moon."], 2),
]


def test_lm_eval_scores_the_hf_export_with_the_shipped_task(no_ln, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from noln.evaluate.hellaswag import evaluate_hellaswag
    from noln.lm_eval_tasks import TASKS_DIR, hellaswag_dataset

    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join(json.dumps({"ind": i, "ctx": c, "endings": e, "label": lab}) + "\n"
                            for i, (c, e, lab) in enumerate(ITEMS)))
    with pytest.raises(ValueError, match="--metadata"):
        hellaswag_dataset()
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={no_ln.hf},dtype=float32", tasks=["noln_hellaswag"],
        task_manager=TaskManager(include_path=str(TASKS_DIR), metadata={"hellaswag": str(path)}),
        device="cpu", batch_size=4, limit=len(ITEMS))
    got = out["results"]["noln_hellaswag"]
    plain = AutoModelForCausalLM.from_pretrained(no_ln.hf).eval()  # no custom code either way
    want = evaluate_hellaswag(plain, no_ln.tok, str(path))
    assert out["n-samples"]["noln_hellaswag"]["effective"] == len(ITEMS) == want.n
    assert got["acc,none"] == pytest.approx(want.acc)
    assert got["acc_norm,none"] == pytest.approx(want.acc_norm)


def test_reference_no_ln_export_round_trips_through_every_loader(tmp_path):
    """ref-gpt2-6L made LN-free (every site frozen at its EMA sigma, no fine-tuning: enough to
    test the plumbing), exported both ways, read back by transformers, load_clean,
    TransformerLens, nnsight and lm-eval's HF model: the same logits everywhere."""
    need_transformer_lens()
    from noln.data import load_blocks

    ref = shared_path("models", "ref-gpt2-6L")
    val = shared_path("data", "corpus", "val.jsonl")
    model = AutoModelForCausalLM.from_pretrained(ref).eval()
    tok = load_tokenizer(ref)
    blocks = torch.tensor(load_blocks(str(val), tok, 128, max_tokens=5 * 128).astype("int64"))
    adapter = freeze_all(model, blocks[:4], spread=0.05)
    hf = export_model(adapter, tok, tmp_path / "hf", "hf")
    clean = export_model(adapter, tok, tmp_path / "clean", "clean")
    ids = blocks[4:5]
    with torch.no_grad():
        want = model(ids).logits
        got = {"transformers (hf)": AutoModelForCausalLM.from_pretrained(hf).eval()(ids).logits,
               "load_clean": noln.load_clean(clean)(ids).logits,
               "TransformerLens (hf)": noln.to_transformer_lens(hf)(ids),
               "TransformerLens (clean)": noln.to_transformer_lens(clean)(ids)}
    if _installed("nnsight"):
        nm = noln.to_nnsight(hf)
        with torch.no_grad(), nm.trace(ids):
            out = nm.lm_head.output.save()
        got["nnsight (hf)"] = out
    if _installed("lm_eval"):
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=1)
        with torch.no_grad():
            got["lm-eval HFLM (hf)"] = lm._model_call(ids)
    scale = want.abs().max().item()
    for name, logits in got.items():
        err = (logits - want).abs().max().item()
        print(f"{name}: max |logit difference| {err:.2e} (max |logit| {scale:.1f})")
        assert err < 1e-5 * scale + 1e-4, f"{name}: max logit difference {err:.2e}"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_per_head_qk_norms_fold_too():
    """Qwen3's per-head q_norm / k_norm at their frozen scale fold into W_Q / W_K (grouped-query
    attention), for the run's model and for the hf export's eps-trick weights."""
    need_transformer_lens()
    from transformers import Qwen3Config

    from noln.export import plain_model

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    adapter = freeze_all(model, torch.randint(0, 300, (4, 32)))
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        want = model(ids).logits
        for source in (model, plain_model(adapter)):
            tl = noln.to_transformer_lens(source)
            assert not tl.cfg.use_qk_norm and tl.cfg.normalization_type is None
            torch.testing.assert_close(tl(ids), want, rtol=1e-4, atol=1e-4)

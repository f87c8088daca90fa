"""`noln attribute`: direct logit attribution, exact without LayerNorm (components sum to the
logit within 1e-4 in float32, each DLA checked against the HF model's own tensors), and the
frozen-LN-scale approximation's error reported for a model with LayerNorm."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from noln.arch import FAMILIES
from noln.attribute import ATTN_BIAS, UNEMBED_BIAS, attribute_logit
from noln.cli.attribute import attribute_cmd
from noln.errors import NolnError
from noln.export import export_model
from noln.pretrained import load_tokenizer

from .conftest import freeze_all, frozen_exports, need_transformer_lens, shared_path

TEXT = "The module defines a function that returns the value"


@pytest.fixture(scope="module")
def no_ln_dirs(tiny_model_dir, tmp_path_factory):
    frozen = frozen_exports(tiny_model_dir, tmp_path_factory.mktemp("attr"), seed=1)
    return frozen.hf, frozen.clean, frozen.tok


def _ids(tok, text=TEXT):
    return torch.tensor([[tok.eos_token_id, *tok(text)["input_ids"]]])


def test_dla_of_a_no_ln_model_is_exact_and_matches_the_model_tensors(no_ln_dirs):
    need_transformer_lens()
    import noln

    hf, clean_dir, tok = no_ln_dirs
    ids = _ids(tok)
    pos, target = ids.shape[1] - 2, int(ids[0, -1])
    a = attribute_logit(noln.to_transformer_lens(hf), ids, target, pos)
    assert not a.has_ln
    assert abs(a.sum_error) < 1e-4 and abs(a.additivity_error) < 1e-4
    assert a.dla == a.direct and max(abs(e) for e in a.errors) == 0
    layers, heads = 2, 2
    assert len(a.labels) == layers * heads + layers + 4  # heads, MLPs, embeds, 2 biases
    got = dict(zip(a.labels, a.dla))
    # independent check on the clean model: its own weights and activations
    clean = noln.load_clean(clean_dir)
    w_u, b_u = clean.lm_head.weight[target].double(), clean.lm_head.bias[target].item()
    tf = clean.transformer
    outs = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: outs.__setitem__(k, o))
             for k, m in [*((f"MLP{i}", b.mlp) for i, b in enumerate(tf.h)),
                          *((f"attn{i}", b.attn) for i, b in enumerate(tf.h))]]
    with torch.no_grad():
        logit = clean(ids).logits[0, pos, target].item()
    for h in hooks:
        h.remove()

    def dla(v):
        return (v[0, pos].double() @ w_u).item() if v.dim() == 3 else (v.double() @ w_u).item()

    assert got["embed"] == pytest.approx(dla(tf.wte.weight[ids[0, pos]]), abs=1e-5)
    assert got["pos_embed"] == pytest.approx(dla(tf.wpe.weight[pos]), abs=1e-5)
    assert got[UNEMBED_BIAS] == pytest.approx(b_u, abs=1e-6)
    for i in range(layers):
        assert got[f"MLP{i}"] == pytest.approx(dla(outs[f"MLP{i}"]), abs=1e-5)
    attn = sum(dla(outs[f"attn{i}"][0]) for i in range(layers))
    heads_and_biases = sum(v for k, v in got.items() if k.startswith("L") or k == ATTN_BIAS)
    assert heads_and_biases == pytest.approx(attn, abs=1e-5)
    assert a.logit == pytest.approx(logit, abs=1e-4)


def test_dla_with_layernorm_sums_but_misses_each_direct_effect(tiny_model_dir):
    need_transformer_lens()
    from noln.interop import hooked_transformer

    tok = load_tokenizer(tiny_model_dir)
    ids = _ids(tok)
    pos, target = ids.shape[1] - 2, int(ids[0, -1])
    a = attribute_logit(hooked_transformer(tiny_model_dir, allow_ln=True), ids, target, pos)
    assert a.has_ln
    assert abs(a.sum_error) < 1e-4  # the frozen scale is this input's own: the sum is exact
    assert max(abs(e) for e in a.errors) > 1e-4  # ... but not each component's direct effect
    # the exact direct effect of the token embedding, from the HF model with a hook that takes
    # it out of the residual entering ln_f (the norm recomputed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    emb = model.transformer.wte.weight[ids[0, pos]].detach()

    def remove_embed(_m, args):
        x = args[0].clone()
        x[0, pos] -= emb
        return (x,)

    with torch.no_grad():
        full = model(ids).logits[0, pos, target].item()
        handle = model.transformer.ln_f.register_forward_pre_hook(remove_embed)
        without = model(ids).logits[0, pos, target].item()
        handle.remove()
    direct = dict(zip(a.labels, a.direct))
    assert direct["embed"] == pytest.approx(full - without, abs=1e-4)
    assert a.logit == pytest.approx(full, abs=1e-4)


def _cli():
    app = typer.Typer()
    app.command("attribute")(attribute_cmd)
    app.command("noop")(lambda: None)  # keep typer from collapsing to a single command
    return app


def run(*args: str):
    return CliRunner().invoke(_cli(), ["attribute", *args], catch_exceptions=True)


def test_attribute_command_table_json_and_plot(no_ln_dirs, tiny_model_dir, tmp_path):
    need_transformer_lens()
    hf, _, tok = no_ln_dirs
    target = tok.decode([tok(TEXT)["input_ids"][-1]])  # one token
    out, png = tmp_path / "dla.json", tmp_path / "dla.png"
    r = run(str(hf), str(tiny_model_dir), "--text", TEXT, "--target", target, "--json",
            str(out), "--plot", str(png), "--top", "5")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "DLA (exact)" in r.output and "frozen LN" in r.output and "logit − sum" in r.output
    doc = json.loads(out.read_text())
    assert doc["tokens"][0] == tok.eos_token and doc["position"] == len(doc["tokens"]) - 1
    no_ln, ln = doc["models"]["hf"], doc["models"][tiny_model_dir.name]
    assert not no_ln["has_layernorm"] and ln["has_layernorm"]
    assert abs(no_ln["sum_error"]) < 1e-4 and no_ln["approximation_error"]["max_abs"] == 0
    assert abs(ln["sum_error"]) < 1e-4 and ln["approximation_error"]["max_abs"] > 1e-4
    names = [c["name"] for c in no_ln["components"]]
    assert {"embed", "pos_embed", "L0H0", "L1H1", "MLP0", "MLP1", ATTN_BIAS, UNEMBED_BIAS} <= \
        set(names)
    assert png.stat().st_size > 5000
    # default target: the model's top prediction; an explicit position
    r = run(str(hf), "--text", TEXT, "--position", "2", "--no-bos", "--json", str(out))
    assert r.exit_code == 0, r.output + repr(r.exception)
    doc = json.loads(out.read_text())
    assert doc["position"] == 2 and doc["tokens"][0] != tok.eos_token and doc["target"]


def test_attribute_command_errors(no_ln_dirs, monkeypatch):
    """A --target of several tokens and a --position past the text: one error, from the
    tokenizer, before any model loads (the patched loader would fail loudly)."""
    need_transformer_lens()
    import noln.interop

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(noln.interop, "hooked_transformer", no_loading)
    hf, _, _ = no_ln_dirs
    r = run(str(hf), "--text", TEXT, "--target", " functionality of modules")
    assert isinstance(r.exception, NolnError) and "not one" in str(r.exception)
    r = run(str(hf), "--text", TEXT, "--position", "999")
    assert isinstance(r.exception, NolnError) and "outside the" in str(r.exception)


def test_reference_model_dla_exact_without_ln_and_approximate_with_it(tmp_path):
    """ref-gpt2-6L and an LN-free version of it (sites frozen at their EMA sigmas, exported):
    exact DLA for the no-LN model, the frozen-LN-scale error for the original."""
    need_transformer_lens()
    import noln
    from noln.interop import hooked_transformer

    ref = shared_path("models", "ref-gpt2-6L")
    tok = load_tokenizer(ref)
    model = AutoModelForCausalLM.from_pretrained(ref).eval()
    text = "The president said that the government would"
    ids = _ids(tok, text)
    adapter = freeze_all(model, ids.repeat(2, 1), spread=0.0)
    hf = export_model(adapter, tok, tmp_path / "hf", "hf")
    target = tok(" not")["input_ids"][0]
    exact = attribute_logit(noln.to_transformer_lens(hf), ids, target, -1)
    approx = attribute_logit(hooked_transformer(ref, allow_ln=True), ids, target, -1)
    assert abs(exact.sum_error) < 1e-4 and exact.errors == [0.0] * len(exact.errors)
    assert abs(approx.sum_error) < 1e-4
    errs = [abs(e) for e in approx.errors]
    print(f"\nref-gpt2-6L, DLA of ' not': no-LN |logit - sum| {abs(exact.sum_error):.1e}; "
          f"original frozen-LN-scale error max {max(errs):.4f}, mean {sum(errs) / len(errs):.4f}, "
          f"direct effects miss the logit by {approx.additivity_error:+.4f}")
    assert max(errs) > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_converts_and_attributes_exactly_without_family_code(family):
    """The TransformerLens view and the DLA know no family: each adapter's small model, every
    site frozen, matches its TransformerLens view and its DLA sums to the logit."""
    need_transformer_lens()
    import noln
    from noln.export import plain_model

    torch.manual_seed(0)
    model = FAMILIES[family].build_small_model(vocab_size=300, n_layer=2, d_model=64, n_head=4,
                                               ctx=64, eot_id=0).eval()
    adapter = freeze_all(model, torch.randint(0, 300, (4, 32)))
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        want = model(ids).logits
    for source in (model, plain_model(adapter)):  # the run's model; the hf export's weights
        tl = noln.to_transformer_lens(source)
        assert tl.cfg.normalization_type is None
        with torch.no_grad():
            torch.testing.assert_close(tl(ids), want, rtol=1e-4, atol=1e-4)
        a = attribute_logit(tl, ids, 5, -1)
        assert abs(a.sum_error) < 1e-4 and a.logit == pytest.approx(want[0, -1, 5].item(),
                                                                     abs=1e-4)


def test_a_linearized_model_is_refused_before_anything_loads(tiny_model_dir, tmp_path,
                                                             monkeypatch):
    """TransformerLens has no block for a linear map: `noln attribute` of a `noln linearize`
    folder, and the library's conversion of that folder or of its model, are one error naming
    the base model to attribute instead, given before any model of the command is loaded."""
    import numpy as np

    import noln
    import noln.interop
    from noln.linearity.replace import fit_layers, save_linearized, swap_layer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    blocks = np.random.default_rng(0).integers(1, model.config.vocab_size, size=(16, 16))
    for i, m in fit_layers(model, blocks, [0], batch_size=4).items():
        swap_layer(model, i, m)
    lin = save_linearized(model, load_tokenizer(tiny_model_dir), str(tiny_model_dir),
                          tmp_path / "lin")
    loaded = []
    real = noln.interop.plain_view
    monkeypatch.setattr(noln.interop, "plain_view",
                        lambda *a, **k: loaded.append(a[0]) or real(*a, **k))
    r = run(str(tiny_model_dir), str(lin), "--text", TEXT)  # the linearized one second
    assert isinstance(r.exception, NolnError), r.output + repr(r.exception)
    message = str(r.exception)
    assert "replaced by linear maps" in message and "TransformerLens cannot represent" in message
    assert f"before linearizing instead (its base model, '{tiny_model_dir.resolve()}')" in message
    assert loaded == []  # not even the first model
    for source in (lin, model):
        with pytest.raises(NolnError, match="TransformerLens cannot represent"):
            noln.to_transformer_lens(source)
    assert loaded == []

"""The family contract: every model family noln removes norms from passes the same suite.

For each family (one line in ``FAMILIES_UNDER_TEST``): installing FakeNorms keeps the
function; the sites are named by role, in role-major order, and each role is the family's own
module (its old site names are aliases); each role freezes on its own to a fixed scale; the hf
and clean exports give the FakeNorm model's logits; a checkpoint restores the frozen sites and
the schedule state, also from a run that named sites the old way. Adding a family: one adapter
file in ``noln/arch`` and one line here.

Also here: the family boundary (no module outside ``noln/arch`` names a family's modules or
config keys) and the layout registry the rest of noln reads.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from noln.arch import (
    ADAPTERS,
    ALIASES,
    FAMILIES,
    LAYOUTS,
    ROLES,
    canonical_site,
    context_length,
    decoder_layers,
    final_norm,
    install,
    role_of,
)
from noln.config import AdaptiveConfig, FixedConfig
from noln.errors import NolnError
from noln.export import clean_model, export_model, load_clean, plain_model
from noln.schedule import build_schedule

V = 101


class _Tok:  # the exports only need save_pretrained from a tokenizer
    def save_pretrained(self, path):
        pass


@dataclass(frozen=True)
class Family:
    """One model family (or one shape of it) under test: its HF model type and config
    (on top of ``BASE``), the config key of its norms' eps, and which module plays each role
    (``{i}``: the block)."""

    id: str
    model_type: str
    family: str
    eps: str
    modules: dict[str, str]
    config: dict = field(default_factory=dict)


BASE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, initializer_range=0.1, bos_token_id=0, eos_token_id=0)
GPT2 = {"mlp_in": "transformer.h.{i}.ln_2", "attn_in_qk": "transformer.h.{i}.ln_1.qk",
        "attn_in_v": "transformer.h.{i}.ln_1.v", "final": "transformer.ln_f"}
NEOX = {"mlp_in": "gpt_neox.layers.{i}.post_attention_layernorm",
        "attn_in_qk": "gpt_neox.layers.{i}.input_layernorm.qk",
        "attn_in_v": "gpt_neox.layers.{i}.input_layernorm.v",
        "final": "gpt_neox.final_layer_norm"}
LLAMA = {"mlp_in": "model.layers.{i}.post_attention_layernorm",
         "attn_in_qk": "model.layers.{i}.input_layernorm.qk",
         "attn_in_v": "model.layers.{i}.input_layernorm.v", "final": "model.norm"}
QWEN3 = {**LLAMA, "q_norm": "model.layers.{i}.self_attn.q_norm",
         "k_norm": "model.layers.{i}.self_attn.k_norm"}
GQA = dict(intermediate_size=96, num_key_value_heads=2, attention_dropout=0.0,
           initializer_range=0.04)  # logits O(1-10): RMSNorm models grow them faster
NEOX_CFG = dict(intermediate_size=256, rotary_pct=0.25, hidden_dropout=0.0,
                attention_dropout=0.0, tie_word_embeddings=False)

FAMILIES_UNDER_TEST = [
    Family("gpt2", "gpt2", "gpt2", "layer_norm_epsilon", GPT2,
           dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    Family("neox", "gpt_neox", "neox", "layer_norm_eps", NEOX,
           dict(NEOX_CFG, use_parallel_residual=True, attention_bias=True)),
    Family("neox-sequential", "gpt_neox", "neox", "layer_norm_eps", NEOX,
           dict(NEOX_CFG, use_parallel_residual=False, attention_bias=True)),
    Family("neox-no-bias", "gpt_neox", "neox", "layer_norm_eps", NEOX,
           dict(NEOX_CFG, use_parallel_residual=True, attention_bias=False)),
    Family("llama", "llama", "llama", "rms_norm_eps", LLAMA, dict(GQA, tie_word_embeddings=False)),
    Family("llama-tied", "llama", "llama", "rms_norm_eps", LLAMA,
           dict(GQA, tie_word_embeddings=True)),
    Family("qwen2", "qwen2", "llama", "rms_norm_eps", LLAMA,  # q/k/v biases
           dict(GQA, tie_word_embeddings=False)),
    Family("qwen3", "qwen3", "llama", "rms_norm_eps", QWEN3,  # per-head q_norm / k_norm
           dict(GQA, head_dim=16, tie_word_embeddings=False)),
    Family("qwen3-tied", "qwen3", "llama", "rms_norm_eps", QWEN3,
           dict(GQA, head_dim=16, tie_word_embeddings=True)),
    Family("mistral", "mistral", "llama", "rms_norm_eps", LLAMA,
           dict(GQA, tie_word_embeddings=False)),
    # SmolLM2's shape: tied embeddings, grouped-query attention 3:1 (9 heads over 3 there)
    Family("smollm2", "llama", "llama", "rms_norm_eps", LLAMA,
           dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=128, tie_word_embeddings=True, attention_dropout=0.0,
                initializer_range=0.03)),
]


def tiny(fam: Family, seed: int = 0) -> torch.nn.Module:
    """2 blocks; weights large enough that logits are O(1), norm weights away from 1 and
    biases away from 0, so a wrong fold or a wrong site cannot hide below the tolerance."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(fam.model_type, **{**BASE, **fam.config})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in type(model.get_submodule(name.rsplit(".", 1)[0])).__name__.lower():
                p.normal_(1.0, 0.3) if name.endswith("weight") else p.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model.eval()


def _ids(n: int = 3, t: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _trained_sigmas(model):
    """Installed, with every EMA moved by one train-mode pass."""
    adapter = install(model)
    model.train()
    with torch.no_grad():
        model(_ids(4, 16, seed=2))
    model.eval()
    return adapter


def _frozen_with_distinct_sigmas(model):
    """Every site frozen at its own sigma, so the Q/K and V paths of the attention's input norm
    (and q_norm vs k_norm) really differ: the hard case for the exports."""
    adapter = _trained_sigmas(model)
    for i, name in enumerate(adapter.site_names()):
        norm = adapter.site(name).norm
        norm.freeze(float(norm.sigma) * (0.8 + 0.15 * (i % 4)))  # O(1) logits stay O(1)
    return adapter


def _roles(fam: Family) -> list[str]:
    return [r for r in ROLES if r in fam.modules and r != "final"]


def _expected_sites(fam: Family, n_layers: int = 2) -> list[str]:
    return [f"blocks.{i}.{r}" for r in _roles(fam) for i in range(n_layers)] + ["final"]


def _module(model, fam: Family, name: str):
    layer, _, role = name.rpartition(".")
    return model.get_submodule(fam.modules[role].format(i=layer.rpartition(".")[-1]))


families = pytest.mark.parametrize("fam", FAMILIES_UNDER_TEST, ids=lambda f: f.id)


# ----------------------------------------------------------------------------- install, sites


@families
def test_install_keeps_the_function_in_train_and_eval(fam):
    model = tiny(fam)
    x = _ids(2, 12)
    with torch.no_grad():
        before = model(x).logits
        adapter = install(model)
        assert before.abs().max() > 0.5  # a meaningful comparison, not tiny logits
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
        model.train()
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    assert adapter.export_state() == "none"
    assert adapter.family == fam.family and FAMILIES[fam.family] is type(adapter)
    assert ADAPTERS[fam.model_type] is type(adapter)


@families
def test_sites_are_roles_in_removal_order_on_the_family_modules(fam):
    model = tiny(fam)
    adapter = install(model)
    assert adapter.site_names() == _expected_sites(fam)
    for name, site in adapter.sites.items():
        assert site.norm is _module(model, fam, name), name
        assert site.role == name.rsplit(".", 1)[-1] and site.layer == (
            None if name == "final" else int(name.split(".")[1]))
    assert adapter.final_norm is _module(model, fam, "final")
    # the layout registry agrees with the adapter
    assert final_norm(model) is adapter.final_norm
    assert decoder_layers(model)[0] is model.get_submodule(type(adapter).layout.layers)
    assert len(decoder_layers(model)[0]) == 2 and decoder_layers(model)[1] is False


@families
def test_old_site_names_are_aliases(fam):
    """Runs and schedule files from before the role names: the family's old site names find
    the same sites, in the adapter and through ``canonical_site``."""
    adapter = install(tiny(fam))
    aliases = type(adapter).aliases
    assert set(aliases.values()) == {r for r in fam.modules if r not in ("q_norm", "k_norm")}
    for old, role in aliases.items():
        for name in ([old] if role == "final" else [f"blocks.{i}.{old}" for i in range(2)]):
            new = name.replace(old, role)
            assert canonical_site(name) == new and role_of(name) == role
            assert adapter.site(name) is adapter.site(new)
    with pytest.raises(NolnError, match=r"no removal site 'blocks.7.mlp_in'.*2 blocks: sites are "
                                        r"blocks.0..1.\{mlp_in,attn_in_qk,attn_in_v.*\} and final"):
        adapter.freeze("blocks.7.mlp_in")


# ----------------------------------------------------------------------------- freezing


@families
@pytest.mark.parametrize("role", ROLES)
def test_each_role_freezes_on_its_own_to_a_fixed_scale(fam, role):
    if role not in fam.modules:
        pytest.skip(f"{fam.id} has no {role} sites")
    model = tiny(fam)
    adapter = _trained_sigmas(model)
    x = _ids()
    with torch.no_grad():
        live = model(x).logits
    name = "final" if role == "final" else "blocks.0." + role
    sigma = adapter.freeze(name)
    norm = adapter.site(name).norm
    assert sigma == pytest.approx(float(norm.sigma)) and norm.frozen
    assert adapter.frozen_sites() == [name] and adapter.export_state() == "mixed"
    with torch.no_grad():
        if role == "attn_in_qk" and "q_norm" in fam.modules:
            # Qwen3: the live per-head q_norm / k_norm after the projections divide the
            # per-token scale out again (up to their eps)
            torch.testing.assert_close(model(x).logits, live, rtol=1e-4, atol=1e-4)
        else:
            assert not torch.allclose(model(x).logits, live, atol=1e-4)  # a new function
        # a fixed scale: linear in its input (up to the bias), f(2x) - b = 2 (f(x) - b)
        h = torch.randn(2, 5, norm.weight.numel()) * 3 + 1
        b = 0 if norm.bias is None else norm.bias
        torch.testing.assert_close(norm(2 * h) - b, 2 * (norm(h) - b), rtol=1e-5, atol=1e-5)
        other = {"attn_in_qk": "attn_in_v", "attn_in_v": "attn_in_qk"}.get(role)
        if other:  # the other path of the same norm is still live
            assert not adapter.site(f"blocks.0.{other}").norm.frozen


# ----------------------------------------------------------------------------- exports


@families
@pytest.mark.parametrize("fmt", ["hf", "clean"])
def test_all_frozen_exports_give_the_fakenorm_models_logits(fam, fmt, tmp_path):
    model = tiny(fam)
    adapter = _frozen_with_distinct_sigmas(model)
    assert adapter.export_state() == "all"
    assert adapter.site("blocks.0.attn_in_qk").norm.sigma != \
        adapter.site("blocks.0.attn_in_v").norm.sigma
    x = _ids()
    with torch.no_grad():
        expected = model(x).logits
        in_memory = (plain_model if fmt == "hf" else clean_model)(adapter)
        # float32 rounding of folded weights; hf: eps trick, relative error ~ mean(x^2)/2e12
        torch.testing.assert_close(in_memory(x).logits, expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().max() > 0.5  # O(1) logits: the 1e-4 tolerance is ~1e-4 relative
    path = export_model(adapter, _Tok(), tmp_path / fmt, fmt)
    loaded = (AutoModelForCausalLM.from_pretrained(path) if fmt == "hf"
              else load_clean(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-4, atol=1e-4)
    meta = json.loads((path / "noln.json").read_text())
    assert meta["family"] == fam.family and len(meta["frozen"]) == len(adapter.sites)
    assert meta["frozen"] == _expected_sites(fam)
    if fmt == "hf":
        assert type(loaded).__name__ == type(model).__name__
        assert getattr(loaded.config, fam.eps) == 1e12
    else:
        assert [m for m in loaded.modules() if "Norm" in type(m).__name__] == []
        assert not torch.equal(loaded.get_output_embeddings().weight,
                               loaded.get_input_embeddings().weight)


@families
def test_nothing_frozen_exports_the_plain_model(fam, tmp_path):
    model = tiny(fam)
    x = _ids(2, 10)
    with torch.no_grad():
        expected = model(x).logits
    adapter = _trained_sigmas(model)  # sigmas move, but nothing is frozen
    path = export_model(adapter, _Tok(), tmp_path / "plain", "hf")
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert getattr(loaded.config, fam.eps) == getattr(model.config, fam.eps)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)


@families
def test_partly_frozen_export_is_refused(fam, tmp_path):
    adapter = install(tiny(fam))
    adapter.freeze("blocks.0.mlp_in")
    with pytest.raises(NolnError, match="partly removed model.*still live"):
        export_model(adapter, _Tok(), tmp_path / "x", "hf")
    assert not (tmp_path / "x").exists()
    # nothing frozen (a with-norm control): the clean fold has no scale to fold, hf fits
    with pytest.raises(NolnError, match="no norm of this model is removed.*--format hf"):
        export_model(install(tiny(fam)), _Tok(), tmp_path / "x", "clean")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- resume


@families
def test_resume_restores_frozen_sites_and_the_schedule_state(fam, tmp_path):
    """A checkpoint (weights with the FakeNorm buffers, the schedule's state) restores the frozen
    sites, their sigmas and the logits; an old run's schedule, written with the family's old
    site names, resumes at the same next site."""
    model = tiny(fam)
    adapter = _trained_sigmas(model)
    kinds = {n: s.kind for n, s in adapter.sites.items()}
    cfg = AdaptiveConfig(tolerance=0.05, window=1, min_gap=1, max_gap=50)
    fixed = FixedConfig(start=1)
    schedule = build_schedule("adaptive", adapter.site_names(), kinds, 100, fixed, cfg)
    losses = [3.0, 3.1, 3.0, 2.9, 2.95, 3.3, 3.0]
    for t in range(len(losses)):
        for name in schedule.due(t, losses[:t]):
            adapter.freeze(name)
    assert 1 < len(adapter.frozen_sites()) < len(adapter.sites)
    torch.save({"model": model.state_dict(), "schedule": schedule.state_dict()},
               tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh = tiny(fam, seed=1)
    resumed = install(fresh)
    fresh.load_state_dict(ckpt["model"])
    assert resumed.frozen_sites() == adapter.frozen_sites()
    assert resumed.sigmas() == adapter.sigmas()
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)

    old = {role: o for o, role in type(adapter).aliases.items()}
    old_names = [n.replace(role_of(n), old.get(role_of(n), role_of(n)))
                 for n in adapter.site_names()]
    assert old_names != adapter.site_names()
    spec = tmp_path / "old.yaml"
    spec.write_text(yaml.safe_dump({"type": "adaptive", "order": old_names}))
    again = build_schedule(str(spec), resumed.site_names(), kinds, 100, fixed, cfg)
    again.load_state_dict(ckpt["schedule"])
    assert again.order == schedule.order and again.remaining() == schedule.remaining()
    more = losses + [2.8, 2.7, 2.6]
    assert [again.due(t, more[:t]) for t in range(7, 10)] == \
        [schedule.due(t, more[:t]) for t in range(7, 10)]


# ------------------------------------------------------------------ the sink circuit (noln.sinks)

# each family's MLP and the weight that writes its hidden neurons (the dim indexing them)
MLP_WRITE = {"gpt2": ("transformer.h.{i}.mlp", "c_proj", 0),  # Conv1D: [in, out]
             "neox": ("gpt_neox.layers.{i}.mlp", "dense_4h_to_h", 1),
             "llama": ("model.layers.{i}.mlp", "down_proj", 1)}


@families
def test_sink_neurons_are_those_whose_ablation_moves_position_0_most(fam):
    """``sink_neurons``' top k per block are the neurons whose removal (its write weight
    zeroed, one at a time) changes the MLP's output at position 0 the most, on average."""
    from noln.sinks import sink_neurons

    model, x, k = tiny(fam), _ids(3, 12), 3
    sinks = sink_neurons(model, x, k)
    assert sorted(sinks) == [0, 1]
    path, write, dim = MLP_WRITE[fam.family]
    for block in (0, 1):
        mlp = model.get_submodule(path.format(i=block))
        inputs = []  # the MLP's input in the whole model's forward
        hook = mlp.register_forward_pre_hook(lambda m, a, seen=inputs: seen.append(a[0].detach()))
        with torch.no_grad():
            model(x)
            hook.remove()
            base = mlp(inputs[0])[:, 0]
            weight = mlp.get_submodule(write).weight
            moved = []
            for n in range(weight.shape[dim]):
                kept = weight.clone()
                weight.index_fill_(dim, torch.tensor([n]), 0.0)
                moved.append((base - mlp(inputs[0])[:, 0]).norm(dim=-1).mean())
                weight.copy_(kept)
        expected = torch.stack(moved).topk(k).indices.sort().values.tolist()
        assert sinks[block] == expected


@families
def test_pruned_neurons_are_zero_and_stay_zero_through_adamw(fam):
    """``prune_neurons`` zeroes the neurons' activations (every input weight and bias) and
    write weights, and their AdamW moments, so training steps after it leave them at zero;
    it counts what it changed, and a second call changes nothing."""
    from noln.sinks import prune_neurons

    model, x = tiny(fam).train(), _ids(4, 12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step():
        optimizer.zero_grad()
        model(x, labels=x).loss.backward()
        optimizer.step()

    step()
    step()  # moments are nonzero everywhere
    neurons = {0: [1, 5], 1: [0, 7, 9]}
    assert prune_neurons(model, neurons, optimizer) == 5
    for _ in range(3):
        step()
    acts = {}
    path, write, dim = MLP_WRITE[fam.family]
    hooks = [model.get_submodule(path.format(i=b)).get_submodule(write).register_forward_pre_hook(
        lambda m, a, b=b: acts.__setitem__(b, a[0].detach())) for b in neurons]
    with torch.no_grad():
        model(x)
    [h.remove() for h in hooks]
    for block, idx in neurons.items():
        weight = model.get_submodule(path.format(i=block)).get_submodule(write).weight
        assert (weight.index_select(dim, torch.tensor(idx)) == 0).all()
        assert (acts[block][..., idx] == 0).all()
        others = [n for n in range(acts[block].shape[-1]) if n not in idx]
        assert (acts[block][..., others] != 0).float().mean() > 0.5  # only those are zero
    assert prune_neurons(model, neurons, optimizer) == 0


@families
def test_faded_neurons_write_the_factor_of_their_output_and_zero_is_pruned(fam):
    """``fade_neurons``: inside it, the given neurons' activations reach their writing weight
    times ``factor`` (read at each forward) and every other neuron's unchanged, and they
    learn while the factor is above 0; at factor 0 the logits are those of the model with the
    neurons pruned; outside it the model is the original again."""
    from noln.sinks import fade_neurons, prune_neurons

    model, x = tiny(fam).eval(), _ids(2, 12)
    neurons = {0: [1, 5], 1: [0, 7, 9]}
    path, write, _ = MLP_WRITE[fam.family]

    def reads() -> dict[int, torch.Tensor]:
        """What each block's writing weight reads (a hook registered last runs last)."""
        seen: dict[int, torch.Tensor] = {}
        hooks = [model.get_submodule(path.format(i=b)).get_submodule(write)
                 .register_forward_pre_hook(lambda m, a, b=b: seen.__setitem__(b, a[0].detach()))
                 for b in neurons]
        with torch.no_grad():
            model(x)
        [h.remove() for h in hooks]
        return seen

    with torch.no_grad():
        plain_logits = model(x).logits
    plain = reads()
    factor = torch.tensor(0.25)
    with fade_neurons(model, neurons, factor):
        faded = reads()
        factor.fill_(0.0)  # (changed in place between forwards, as the trainer does)
        with torch.no_grad():
            off_logits = model(x).logits
    for block, idx in neurons.items():
        # block 0's neurons change block 1's input, so only block 0 compares whole
        others = [n for n in range(faded[block].shape[-1]) if n not in idx]
        if block == 0:
            expected = plain[0].clone()
            expected[..., idx] *= 0.25
            torch.testing.assert_close(faded[0], expected, rtol=0, atol=0)
        else:
            assert not torch.equal(faded[block][..., others], plain[block][..., others])
    pruned = tiny(fam).eval()
    prune_neurons(pruned, neurons)
    with torch.no_grad():
        torch.testing.assert_close(off_logits, pruned(x).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x).logits, plain_logits, rtol=0, atol=0)  # hooks gone
    # a faded neuron still learns (its write weight gets a gradient), one faded out does not
    weight = model.get_submodule(path.format(i=0)).get_submodule(write).weight
    _, _, dim = MLP_WRITE[fam.family]
    index = torch.tensor(neurons[0])

    def write_grad(f: float) -> torch.Tensor:
        model.zero_grad()
        with fade_neurons(model, {0: neurons[0]}, torch.tensor(f)):
            model(x, labels=x).loss.backward()
        return weight.grad.index_select(dim, index).clone()

    assert (write_grad(0.5) != 0).all() and (write_grad(0.0) == 0).all()
    # a checkpoint saved mid-fade is read back as that weight edit: the same logits
    from noln.sinks import scale_neurons

    edited = tiny(fam).eval()
    scale_neurons(edited, neurons, 0.25)
    with fade_neurons(model, neurons, torch.tensor(0.25)), torch.no_grad():
        torch.testing.assert_close(edited(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_export_names_an_old_logs_removals_by_role(tmp_path):
    """``noln export`` of a run started before the rename: its log's removal events name the
    old sites; the export's noln.json names them by role."""
    fam = FAMILIES_UNDER_TEST[0]
    adapter = _frozen_with_distinct_sigmas(tiny(fam))
    events = [{"event": "remove", "step": 3 + i, "site": n, "sigma": 1.0}
              for i, n in enumerate(["blocks.0.ln_2", "blocks.1.ln_1_v", "ln_f"])]
    path = export_model(adapter, _Tok(), tmp_path / "hf", "hf", events=events)
    meta = json.loads((path / "noln.json").read_text())
    assert [e["site"] for e in meta["events"]] == ["blocks.0.mlp_in", "blocks.1.attn_in_v", "final"]
    assert [e["step"] for e in meta["events"]] == [3, 4, 5]


def test_a_run_started_with_old_site_names_resumes_to_the_same_model(tiny_model_dir, text_jsonl,
                                                                      tmp_path, monkeypatch):
    """A run from before the rename (schedule file and log.jsonl in GPT-2's old site names),
    killed at step 16, resumes to the uninterrupted run's sigmas, and exports role names."""
    import noln
    import noln.train

    old = [f"blocks.{i}.{k}" for k in ("ln_2", "ln_1_qk", "ln_1_v") for i in range(2)] + ["ln_f"]
    spec = tmp_path / "old.yaml"
    spec.write_text(yaml.safe_dump({"events": [{"step": 3 + 4 * j, "site": s}
                                               for j, s in enumerate(old)]}))
    fast = dict(schedule=str(spec), steps=30, batch_size=4, ctx=32, lr=1e-3, warmup_steps=2,
                eval_tokens=256, checkpoint_every=10, progress=False, export_format="hf")
    full = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "full", **fast)
    assert full.adapter.frozen_sites() == [canonical_site(s) for s in old]

    log = noln.train.Trainer.log

    def killed_at_16(self, record):
        log(self, record)
        if record.get("step") == 16 and "loss" in record and "event" not in record:
            raise KeyboardInterrupt

    monkeypatch.setattr(noln.train.Trainer, "log", killed_at_16)
    with pytest.raises(KeyboardInterrupt):
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run", **fast)
    monkeypatch.undo()
    # what the run wrote before the rename: its removals under the old names
    log_path = tmp_path / "run" / "log.jsonl"
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    old_of = {canonical_site(s): s for s in old}
    records = [{**r, "site": old_of[r["site"]]} if r.get("event") == "remove" else r
               for r in records]
    assert sum(r.get("event") == "remove" for r in records) == 4
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    r = noln.remove_layernorm(resume=tmp_path / "run", progress=False)
    assert r.summary["complete"] and r.adapter.sigmas() == full.adapter.sigmas()
    meta = json.loads((tmp_path / "run" / "model" / "noln.json").read_text())
    assert [e["site"] for e in meta["events"]] == full.adapter.site_names()
    # the summary and the result speak roles too, the old run's removals among them
    assert [e["site"] for e in r.summary["removals"]] == full.adapter.site_names()
    assert [e["site"] for e in r.events] == full.adapter.site_names()


# ----------------------------------------------------------------------------- layout registry


def test_every_adapter_family_is_under_test_and_in_the_layout_registry():
    assert {f.model_type for f in FAMILIES_UNDER_TEST} == set(ADAPTERS)
    assert set(ADAPTERS) <= set(LAYOUTS)
    assert all(set(cls.aliases.values()) <= set(ROLES) for cls in ADAPTERS.values())
    assert set(ALIASES.values()) <= set(ROLES)


def test_context_length_is_one_rule_for_every_family():
    for fam in FAMILIES_UNDER_TEST:
        config = AutoConfig.for_model(fam.model_type, **{**BASE, **fam.config})
        assert context_length(config) == 64 and context_length(tiny(fam)) == 64
    config = SimpleNamespace(model_type="custom", max_seq_len=0)  # no usable key
    assert context_length(config, default=1024) == 1024
    assert context_length(SimpleNamespace(n_ctx=32, max_seq_len=16)) == 32  # first key wins
    with pytest.raises(NolnError, match="cannot tell the context length"):
        context_length(config)


def test_unregistered_model_types_are_a_clear_error_for_layers():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32,
                                       num_attention_heads=2, intermediate_size=64))
    with pytest.raises(NolnError, match=r"cannot find the decoder layers of model type 'bert'.*"
                                        r"gpt2.*LAYOUT_ONLY"):
        decoder_layers(model)


def test_report_colours_every_role():
    from noln.report import ROLE_COLOURS

    assert set(ROLE_COLOURS) == set(ROLES)


# ----------------------------------------------------------------------------- the boundary

SRC = Path(__file__).resolve().parents[1] / "src" / "noln"

# family module names and config keys, beyond those derived from the adapters and the registry
FORBIDDEN = {"ln_1", "ln_2", "ln_f", "post_attention_layernorm", "input_layernorm",
             "final_layer_norm", "final_layernorm", "n_positions", "max_position_embeddings",
             "n_embd", "layer_norm_epsilon", "layer_norm_eps",
             "rms_norm_eps", "c_attn", "c_fc", "c_proj", "query_key_value", "dense_h_to_4h",
             "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "self_attn",
             "embed_tokens", "embed_out", "wte", "wpe", "gpt_neox", "transformer.h",
             "model.layers", "model.norm"}

# (file, name): named outside noln/arch on purpose
ALLOWED = {
    # interop converts to and from TransformerLens, whose modules are not a family's: a norm
    # is found there by its class name (LayerNorm, RMSNorm, FakeNorm ...), whatever the family
    ("interop.py", "norm"),
}


def _forbidden() -> tuple[set[str], set[str]]:
    """(single names, dotted paths): the explicit list, every adapter's old site names, every
    registered model type that is not a family name, and every registered module path."""
    single = {n for n in FORBIDDEN if "." not in n} | set(ALIASES)
    single |= set(LAYOUTS) - set(FAMILIES)
    dotted = {n for n in FORBIDDEN if "." in n}
    for lay in LAYOUTS.values():
        for path in filter(None, (lay.layers, lay.final_norm)):
            dotted.add(path)
            last = path.rsplit(".", 1)[-1]
            if "_" in last:  # a distinctive module name (ln_f), not a word (norm, h, layers)
                single.add(last)
    return single, dotted


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def boundary_hits() -> list[tuple[str, str, str]]:
    """``(file name, forbidden name, where)`` for every family name outside ``noln/arch``."""
    single, dotted = _forbidden()
    token = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "arch":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or \
                    id(node) in docs:
                continue
            for tok in token.findall(node.value):
                # a plain word (norm, opt, phi) counts only as the whole string: in a message it
                # is English; a name with '_', '.' or a digit counts anywhere in the string
                if re.fullmatch(r"[a-z]+", tok) and tok != node.value:
                    continue
                hits = {p for p in tok.split(".") if p in single}
                hits |= {d for d in dotted if f".{d}." in f".{tok}."}
                found += [(rel.name, h, f"{rel}:{node.lineno}: {h!r} in {node.value[:60]!r}")
                          for h in hits]
    return found


def boundary_violations() -> list[str]:
    return [where for name, hit, where in boundary_hits() if (name, hit) not in ALLOWED]


def test_nothing_outside_arch_names_a_family_module_or_config_key():
    assert boundary_violations() == []
    stale = ALLOWED - {(name, hit) for name, hit, _ in boundary_hits()}
    assert not stale, f"no longer named outside noln/arch: delete {sorted(stale)} from ALLOWED"


def test_the_boundary_scan_catches_family_names(tmp_path, monkeypatch):
    bad = tmp_path / "noln"
    (bad / "arch").mkdir(parents=True)
    (bad / "arch" / "gpt2.py").write_text("X = 'ln_f'\n")  # inside arch: fine
    (bad / "leak.py").write_text('"""Docstrings may say ln_f."""\n'
                                 "A = getattr(m, 'ln_f')\nB = f'transformer.h.{i}.ln_2'\n"
                                 "C = config.get('max_position_embeddings')\nD = 'norm'\n"
                                 "E = 'the final norm'\n")
    monkeypatch.setitem(globals(), "SRC", bad)
    found = boundary_violations()
    assert len(found) == 5 and all(f.startswith("leak.py:") for f in found)
    assert any("'transformer.h'" in f for f in found) and any("'ln_2'" in f for f in found)

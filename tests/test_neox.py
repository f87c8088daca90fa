"""GPT-NeoX / Pythia adapter, what is its own: a frozen site is a fixed scale (Q/K and V apart,
through the per-head [q, k, v] layout, parallel residual or not), the EMAs, and the removal
loop, pretraining and linearity on the family. The family contract (sites, freezing, exports,
resume) is tests/test_families.py."""


import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import noln
from noln.arch import install
from tests.conftest import assert_run_matches_its_exports

V, D, H = 101, 64, 4


def tiny_neox(parallel: bool = True, attention_bias: bool = True, seed: int = 0):
    """2 layers, d=64, 4 heads; norms with random gamma/beta and weights large enough that the
    logits are O(1), so a wrong fold cannot hide below the tolerance."""
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                        intermediate_size=4 * D, max_position_embeddings=64, rotary_pct=0.25,
                        use_parallel_residual=parallel, attention_bias=attention_bias,
                        hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.1,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    return model


def _ids(n=3, t=20, seed=1):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _frozen_with_distinct_sigmas(model):
    adapter = install(model)
    model.train()
    with torch.no_grad():
        model(_ids(4, 16, seed=2))
    model.eval()
    for i, name in enumerate(adapter.site_names()):
        adapter.site(name).norm.freeze(0.5 + 0.37 * i)
    return adapter


def _fixed(ln: torch.nn.LayerNorm, sigma: float):
    return lambda x: (x - x.mean(-1, keepdim=True)) / sigma * ln.weight + ln.bias


class _RefQKV(torch.nn.Module):
    """Reference for one layer's attention input, written against the HF layout directly: the
    projection reads the *raw* residual and applies the Q/K norm to q, k and the V norm to v."""

    def __init__(self, qkv: torch.nn.Linear, norm_qk, norm_v):
        super().__init__()
        self.qkv, self.norm_qk, self.norm_v = qkv, norm_qk, norm_v

    def forward(self, x):
        a = self.qkv(self.norm_qk(x)).view(*x.shape[:-1], H, 3, D // H)
        b = self.qkv(self.norm_v(x)).view(*x.shape[:-1], H, 3, D // H)
        return torch.cat([a[..., :2, :], b[..., 2:, :]], dim=-2).reshape(*x.shape[:-1], 3 * D)


@pytest.mark.parametrize("parallel", [True, False])
def test_frozen_sites_are_fixed_scales(parallel):
    """Freeze V of block 0 (Q/K live), both of block 1 and block 0's MLP norm: equal to the
    plain model with those norms replaced by fixed scales by hand."""
    model, ref = tiny_neox(parallel), tiny_neox(parallel)
    adapter = install(model)
    adapter.site("blocks.0.attn_in_v").norm.freeze(2.0)
    adapter.site("blocks.1.attn_in_qk").norm.freeze(0.7)
    adapter.site("blocks.1.attn_in_v").norm.freeze(1.3)
    adapter.site("blocks.0.mlp_in").norm.freeze(3.0)
    adapter.site("final").norm.freeze(1.7)
    for i, (s_qk, s_v) in enumerate([(None, 2.0), (0.7, 1.3)]):
        layer = ref.gpt_neox.layers[i]
        ln = layer.input_layernorm
        layer.attention.query_key_value = _RefQKV(
            layer.attention.query_key_value, ln if s_qk is None else _fixed(ln, s_qk),
            _fixed(ln, s_v))
        layer.input_layernorm = torch.nn.Identity()
    ln_post = ref.gpt_neox.layers[0].post_attention_layernorm
    ref.gpt_neox.layers[0].post_attention_layernorm = _FixedModule(ln_post, 3.0)
    ref.gpt_neox.final_layer_norm = _FixedModule(ref.gpt_neox.final_layer_norm, 1.7)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
        # and freezing the V path alone really changes the function
        live = tiny_neox(parallel)
        assert not torch.allclose(live(x).logits, model(x).logits, atol=1e-3)


class _FixedModule(torch.nn.Module):
    def __init__(self, ln, sigma):
        super().__init__()
        self.f = _fixed(ln, sigma)

    def forward(self, x):
        return self.f(x)


def test_live_sigma_tracks_the_batch_std():
    model = tiny_neox()
    adapter = install(model)
    model.train()
    x = _ids(4, 16)
    captured = {}
    h = model.gpt_neox.final_layer_norm.register_forward_pre_hook(
        lambda _, a: captured.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    xf = captured["x"]
    std = (xf.var(-1, unbiased=False) + 1e-5).sqrt().mean()
    assert adapter.sigmas()["final"] == pytest.approx(float(std), rel=1e-5)
    # the V site's EMA follows the Q/K site's while both are live
    assert adapter.sigmas()["blocks.1.attn_in_v"] == adapter.sigmas()["blocks.1.attn_in_qk"] \
        != 1.0


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory, text_jsonl):
    """A random 2-layer Pythia-shaped model (d=64) with a 512-token BPE, as a HF folder."""
    from noln.pretrain import build_model, train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(str(text_jsonl), vocab_size=512)
    model = build_model("neox", len(tok), n_layer=2, d_model=64, n_head=4, ctx=64,
                        eot_id=tok.eos_token_id)
    assert type(model) is GPTNeoXForCausalLM
    cfg = model.config
    assert (cfg.use_parallel_residual, cfg.tie_word_embeddings, cfg.intermediate_size) == \
        (True, False, 256)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25 and cfg.hidden_dropout == 0
    path = tmp_path_factory.mktemp("neox") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_removal_run_freezes_every_site_and_exports(neox_dir, text_jsonl, tmp_path):
    r = noln.remove_layernorm(str(neox_dir), str(text_jsonl), tmp_path / "run",
                              schedule="fixed", export_format="both", steps=16, batch_size=4,
                              ctx=32, lr=1e-3, warmup_steps=2, eval_tokens=256,
                              checkpoint_every=8, progress=False)
    assert r.adapter.family == "neox" and r.adapter.export_state() == "all"
    assert [e["site"] for e in r.events] == r.adapter.site_names()
    assert_run_matches_its_exports(r, vocab=500)


def test_linearity_profile_runs_on_neox():
    from noln.linearity.score import linearity_profile

    model = tiny_neox()
    blocks = np.random.default_rng(0).integers(1, V, size=(16, 16))
    p = linearity_profile(model, blocks, id_tokens=128, batch_size=4)
    assert [s.layer for s in p.layers] == [0] and len(p.hidden_states) == 3
    assert all(0 < s.with_residual <= 1 + 1e-9 for s in p.layers)
    _frozen_with_distinct_sigmas(model)  # and on the model with its norms removed
    q = linearity_profile(model, blocks, geometry=False, batch_size=4)
    assert q.n_tokens == blocks.size and 0 < q.layers[0].with_residual <= 1 + 1e-9


def test_pretrain_smoke(text_jsonl, tmp_path):
    from noln.pretrain import pretrain

    r = pretrain(str(text_jsonl), tmp_path / "pre", arch="neox", n_layer=2, d_model=32,
                 n_head=2, ctx=32, vocab_size=300, steps=6, batch_size=4, warmup_steps=2,
                 progress=False)
    assert type(r.model) is GPTNeoXForCausalLM
    assert r.summary["arch"] == "neox" and np.isfinite(r.summary["val_ce"]["mean"])
    assert not any("Fake" in type(m).__name__ for m in r.model.modules())

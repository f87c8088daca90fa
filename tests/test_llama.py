"""Llama-family adapter (Llama, Qwen2, Qwen3; Mistral shares Llama's modules), what is its own:
the split input_layernorm, bfloat16 bit for bit, frozen sites as fixed scales on their own path
(Qwen3's per-head norms), and removal, pretraining and linearity end to end on tiny random
models. The family contract (sites, freezing, exports, resume) is tests/test_families.py."""


import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import noln
from noln.arch import install
from noln.arch.llama import LlamaAdapter, SplitRMSNorm
from noln.config import make_config
from noln.errors import NolnError
from noln.export import load_clean
from noln.fakenorm import FakeRMSNorm
from noln.train import lifted_clip
from tests.conftest import assert_run_matches_its_exports, overflow_on

VOCAB = 101


def tiny(kind: str, tie: bool = False, vocab: int = VOCAB, init: float = 0.1):
    """2 layers, d=64, 4 query heads over 2 K/V heads (GQA), weights large enough that logits
    are O(1), norm weights away from 1 so a wrong fold shows (``init=0.02``: HF's default init,
    norms at 1, for training)."""
    import transformers as tf

    torch.manual_seed(0)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=tie, initializer_range=init, bos_token_id=0, eos_token_id=0)
    config, cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),  # q/k/v biases
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),  # per-head q_norm / k_norm
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[kind]
    if kind == "qwen3":
        kw["head_dim"] = 16
    model = cls(config(**kw))
    if init != 0.1:
        return model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model.eval()


def test_input_layernorm_becomes_a_split_rmsnorm_read_by_path_linears():
    """How the attention input splits into its Q/K and V sites (the function is the
    contract suite's)."""
    model = tiny("qwen2")
    install(model)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, SplitRMSNorm)
    attn = layer.self_attn
    assert [(type(m).__name__, m.path) for m in (attn.q_proj, attn.k_proj, attn.v_proj)] == \
        [("PathLinear", "qk"), ("PathLinear", "qk"), ("PathLinear", "v")]
    assert attn.q_proj.bias is not None  # Qwen2's biases stay on the projections


def test_live_matches_hf_rmsnorm_in_bfloat16_bit_for_bit():
    model = tiny("qwen3").to(torch.bfloat16)
    x = torch.randint(0, VOCAB, (2, 12))
    before = model(x).logits
    install(model)
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)


def test_frozen_sites_are_fixed_scales_on_their_own_path():
    model = tiny("qwen3")
    adapter = install(model)
    layer = model.model.layers[0]
    attn = layer.self_attn
    seen = {}
    hooks = [getattr(attn, n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
        for n in ("v_proj", "q_norm", "q_proj")]
    x = torch.randint(0, VOCAB, (2, 12))
    live = model(x, output_hidden_states=True)
    adapter.site("blocks.0.attn_in_v").norm.freeze(3.0)
    adapter.site("blocks.0.q_norm").norm.freeze(5.0)
    out = model(x, output_hidden_states=True)
    for h in hooks:
        h.remove()
    assert adapter.frozen_sites() == ["blocks.0.attn_in_v", "blocks.0.q_norm"]
    resid = out.hidden_states[0]  # the embeddings enter block 0
    w = layer.input_layernorm.weight
    v_in = seen["v_proj"][0][..., 64:]  # v_proj reads the second half of the 2d-wide input
    torch.testing.assert_close(v_in, resid * w / 3.0)
    q_in = seen["q_proj"][0][..., :64]  # q/k still read the live (real RMSNorm) path
    torch.testing.assert_close(q_in, resid * torch.rsqrt(resid.pow(2).mean(-1, keepdim=True)
                                                         + model.config.rms_norm_eps) * w)
    q_pre, q_post = seen["q_norm"]
    torch.testing.assert_close(q_post, q_pre * attn.q_norm.weight / 5.0)
    assert not torch.allclose(out.logits, live.logits, atol=1e-4)


def test_head_norm_sigma_ignores_masked_tokens():
    model = tiny("qwen3")
    adapter = install(model)
    norm = adapter.site("blocks.0.k_norm").norm
    seen = []
    h = norm.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, 0] = False
    model.train()
    with adapter.measuring(std_mask=mask):
        model(x)
    assert norm.std_mask is None  # scoped to the forward passes inside
    h.remove()
    k = seen[0].float()  # [batch, seq, kv_heads, head_dim]
    rms = (k.pow(2).mean(-1) + norm.eps).sqrt()[:, 1:]
    assert norm.sigma.item() == pytest.approx(rms.mean().item(), rel=1e-5)


def test_build_small_model_uses_gqa_and_an_untied_unembedding():
    model = LlamaAdapter.build_small_model(300, n_layer=2, d_model=64, n_head=4, ctx=32,
                                           eot_id=0)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads == 2
    assert cfg.intermediate_size == 192 and not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module")
def tokenizer(text_jsonl):
    from noln.pretrain import train_tokenizer

    return train_tokenizer(str(text_jsonl), vocab_size=512)


FAST = dict(steps=24, batch_size=4, ctx=64, lr=1e-3, warmup_steps=2, eval_tokens=512,
            checkpoint_every=12, progress=False)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_removal_run_exports_and_profiles(kind, tokenizer, text_jsonl, tmp_path):
    model = tiny(kind, vocab=len(tokenizer), init=0.02)
    model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    r = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "run",
                              schedule="fixed", export_format="both", **FAST)
    assert r.adapter.export_state() == "all"
    assert [e["site"] for e in r.events] == r.adapter.site_names()
    assert_run_matches_its_exports(r, vocab=len(tokenizer))

    from noln.linearity.score import linearity_profile

    blocks = np.random.default_rng(0).integers(1, len(tokenizer), size=(8, 32))
    for m in (r.model, load_clean(tmp_path / "run" / "model-clean")):
        p = linearity_profile(m, blocks, id_tokens=128, batch_size=4)
        assert [s.layer for s in p.layers] == [0] and p.n_tokens == blocks.size
        assert all(0 < s.with_residual <= 1 + 1e-9 for s in p.layers)


def test_pretrain_llama(text_jsonl, tmp_path):
    from noln.pretrain import pretrain

    res = pretrain(str(text_jsonl), tmp_path / "pre", arch="llama", n_layer=2, d_model=64,
                   n_head=4, ctx=32, vocab_size=512, steps=6, batch_size=4, warmup_steps=2,
                   progress=False)
    assert res.summary["arch"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(res.out)
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 2
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"  # a plain HF folder, real norms
    assert isinstance(install(model).final_norm, FakeRMSNorm)


def test_special_scale_run_fades_into_one_sigma_and_exports(tokenizer, text_jsonl, tmp_path):
    """With --special-scale, every site keeps a scale of its own for position 0 and
    end-of-text while the removals run, fades it into the shared sigma at the end, and ends as
    a plain fixed-scale model whose exports give its logits."""
    model = tiny("llama", vocab=len(tokenizer), init=0.02)
    model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    r = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "run",
                              schedule="fixed", export_format="both", special_scale=True,
                              special_fade=(0.5, 0.9), fixed={"finish_by": 0.4}, **FAST)
    assert r.summary["complete"] and r.adapter.export_state() == "all"
    norms = r.adapter.norms()
    assert all(n.special and n.fade == 1.0 for n in norms)
    # special tokens were measured apart from the ordinary ones
    assert any(abs(float(n.sigma_special) - float(n.sigma)) > 1e-3 * float(n.sigma)
               for n in norms)
    faded = [e for e in r.log if e.get("event") == "special_faded"]
    last_removal = max(e["step"] for e in r.events)
    assert len(faded) == 1 and faded[0]["step"] > last_removal and faded[0]["step"] < 24
    assert_run_matches_its_exports(r, vocab=len(tokenizer))


def test_run_that_ends_with_the_fade_unfinished_says_so(tokenizer, text_jsonl, tmp_path):
    model = tiny("llama", vocab=len(tokenizer), init=0.02)
    model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    names = install(tiny("llama", vocab=len(tokenizer))).site_names()
    events = tmp_path / "late.yaml"  # the last site freezes at step 20 of 24: no time to fade
    events.write_text(yaml.safe_dump({"events": [{"step": 2 + 3 * i, "site": name}
                                                 for i, name in enumerate(names)]}))
    r = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "run",
                              schedule=str(events), export_format="hf", special_scale=True,
                              special_fade=(0.5, 0.9), **FAST)
    assert not r.summary["complete"] and "faded" in r.summary["unfinished"]
    assert "--resume" in r.summary["unfinished"] and r.summary["exports"] == {}
    from noln.cli import _print_summary
    from noln.errors import NolnError

    with pytest.raises(NolnError, match="removal unfinished"):  # `noln remove` exits 2
        _print_summary(r.summary)
    # resumed with more steps, it finishes and exports
    r2 = noln.remove_layernorm(resume=tmp_path / "run", steps=40, progress=False)
    assert r2.summary["complete"] and r2.summary["exports"]


def test_the_clip_lift_rises_from_k_to_off():
    """--clip-lift: inverse K / (1 - f) (2.4 at half the lift for K 1.2), geometric
    K ** (1 / (1 - f)) (1.44), both rising to off (0) at the lift's end; by_block, one
    block's sites after another's, each inverse over its share."""
    fades = [0.0, 0.25, 0.5, 0.75, 0.9, 0.99]
    inverse = [lifted_clip(1.2, f) for f in fades]
    geometric = [lifted_clip(1.2, f, "geometric") for f in fades]
    assert inverse[:4] == pytest.approx([1.2, 1.6, 2.4, 4.8])
    assert geometric[:4] == pytest.approx([1.2, 1.2 ** (4 / 3), 1.44, 1.2 ** 4])
    assert all(a < b for a, b in zip(inverse, inverse[1:]))
    assert all(a < b for a, b in zip(geometric, geometric[1:])) and geometric[-1] > 1e7
    assert lifted_clip(1.2, 1.0) == lifted_clip(1.2, 1.0, "geometric") == 0.0
    # by_block, 3 blocks (2 layers and the final norm): each in its own third of the lift
    by_block = [lifted_clip(1.2, f, "by_block", b, 3)
                for f in (0.0, 1 / 6, 1 / 3, 0.5, 5 / 6, 1.0) for b in range(3)]
    assert by_block == pytest.approx([1.2, 1.2, 1.2, 2.4, 1.2, 1.2, 0.0, 1.2, 1.2,
                                      0.0, 2.4, 1.2, 0.0, 0.0, 2.4, 0.0, 0.0, 0.0])
    with pytest.raises(NolnError, match="stays 1 for --outlier-clip 1"):
        make_config(model="gpt2", outlier_clip=1.0, clip_lift="geometric", steps=10)
    # a ceiling C: K rises to C, stays there once a block's share is over, and every clip
    # goes off only at the lift's end
    ceiled = [lifted_clip(1.2, f, "by_block", b, 3, ceiling=2.0)
              for f in (0.0, 1 / 6, 1 / 3, 5 / 6, 0.999, 1.0) for b in range(3)]
    assert ceiled == pytest.approx([1.2, 1.2, 1.2, 2.0, 1.2, 1.2, 2.0, 1.2, 1.2,
                                    2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0])
    assert [lifted_clip(1.2, f, ceiling=2.0) for f in (0.25, 0.5, 0.99, 1.0)] == \
        pytest.approx([1.6, 2.0, 2.0, 0.0])
    with pytest.raises(NolnError, match="needs an outlier clip below it"):
        make_config(model="gpt2", outlier_clip=2.0, clip_ceiling=2.0, steps=10)
    with pytest.raises(NolnError, match="needs an outlier clip below it"):
        make_config(model="gpt2", clip_ceiling=10.0, steps=10)


def _clips_by_block(r, run: Path) -> list[tuple[int, list[float]]]:
    """(step, [K of block 0, block 1, the final norm]) from every kept checkpoint of ``run``
    with every site frozen (a tiny two-layer llama; a block's sites lift together)."""
    blocks = [["blocks.0.attn_in_qk", "blocks.0.attn_in_v", "blocks.0.mlp_in"],
              ["blocks.1.attn_in_qk", "blocks.1.attn_in_v", "blocks.1.mlp_in"], ["final"]]
    seen = []
    for path in sorted((run / "checkpoints").glob("step-*.pt"),
                       key=lambda p: int(p.stem.removeprefix("step-"))):
        r.model.load_state_dict(torch.load(path, weights_only=True)["model"])
        if all(r.adapter.site(n).norm.frozen for names in blocks for n in names):
            clips = [{r.adapter.site(n).norm.clip for n in names} for names in blocks]
            assert all(len(c) == 1 for c in clips)  # a block's sites lift together
            seen.append((int(path.stem.removeprefix("step-")), [c.pop() for c in clips]))
    return seen


def test_by_block_clip_lift_lifts_one_block_after_another(tokenizer, text_jsonl, tmp_path):
    """--clip-lift by_block: read back from every step's checkpoint, the lifted blocks are
    always a prefix in forward order (block 0, block 1, the final norm), a block's K rises
    while the next still clips at K, and the run ends with every clip off."""
    model = tiny("llama", vocab=len(tokenizer), init=0.02)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    r = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "run",
                              outlier_clip=1.0, clip_lift="by_block", schedule="fixed",
                              special_fade=(0.5, 0.9), fixed={"finish_by": 0.4},
                              export_format="none",
                              **{**FAST, "lr": 1e-4, "checkpoint_every": 1, "checkpoint_keep": 1})
    assert r.summary["complete"] and all(n.clip == 0.0 for n in r.adapter.norms())
    seen = [k for _, k in _clips_by_block(r, tmp_path / "run")]  # once every site is frozen
    lifted = [[kk == 0.0 for kk in k] for k in seen]
    assert all(flags == sorted(flags, reverse=True) for flags in lifted)  # a prefix, in order
    assert seen[0] == [1.0, 1.0, 1.0] and seen[-1] == [0.0, 0.0, 0.0]
    assert any(k[0] > 1.0 and k[1:] == [1.0, 1.0] for k in seen)  # block 0 rises alone
    assert any(k[0] == 0.0 and k[1] > 1.0 and k[2] == 1.0 for k in seen)  # then block 1


def test_a_clip_ceiling_holds_lifted_blocks_until_the_lift_ends(tokenizer, text_jsonl, tmp_path):
    """--clip-ceiling C: a by_block lift stops each block's K at C instead of off, so no token
    passes C x its scale anywhere until the lift's end, when every clip goes off together; a
    run resumed with a ceiling puts the blocks it had already lifted back under it."""
    from noln.run import branch_run

    model = tiny("llama", vocab=len(tokenizer), init=0.02)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    args = dict(outlier_clip=1.0, clip_lift="by_block", schedule="fixed",
                special_fade=(0.5, 0.9), fixed={"finish_by": 0.4}, export_format="none",
                **{**FAST, "lr": 1e-4, "checkpoint_every": 1, "checkpoint_keep": 1})
    r = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "ceiled",
                              clip_ceiling=3.0, **args)
    assert r.summary["complete"] and all(n.clip == 0.0 for n in r.adapter.norms())
    seen = [k for _, k in _clips_by_block(r, tmp_path / "ceiled")]
    assert seen[0] == [1.0, 1.0, 1.0] and seen[-1] == [0.0, 0.0, 0.0]
    end = seen.index([0.0, 0.0, 0.0])  # off all at once, then stays off
    assert all(0 < kk <= 3.0 for k in seen[:end] for kk in k) and \
        all(k == [0.0, 0.0, 0.0] for k in seen[end:])
    assert any(k[0] == 3.0 and 1.0 < k[1] < 3.0 for k in seen)  # block 0 held, block 1 rising
    assert [3.0, 3.0, 3.0] in seen  # the final norm's share ended: all at C, then all off
    # without a ceiling, branched where block 0 is off and block 1 lifts: resumed with one,
    # block 0 goes back under it
    plain = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "plain",
                                  **args)
    step = next(s for s, k in _clips_by_block(plain, tmp_path / "plain")
                if k[0] == 0.0 and k[1] > 1.0)
    branch_run(tmp_path / "plain", step, tmp_path / "branch")
    resumed = noln.remove_layernorm(resume=tmp_path / "branch", clip_ceiling=3.0)
    after = dict(_clips_by_block(resumed, tmp_path / "branch"))
    assert after[step + 1][0] == 3.0 and 1.0 < after[step + 1][1] <= 3.0
    assert after[max(after)] == [0.0, 0.0, 0.0]


def rare_token_of_a_late_batch(base: Path, text_jsonl: Path, args: dict, step: int = 20
                               ) -> tuple[int, list]:
    """A token of ``step``'s batch (its first sequence) that few training sequences hold, and
    the sequences, drawn as a run of ``args`` draws them (seed 0, epoch 0)."""
    from noln.config import RemoveConfig
    from noln.pretrained import load_tokenizer
    from noln.remove import prepare_data

    cfg = RemoveConfig(model=str(base), data=str(text_jsonl), out=base.parent / "x", **args)
    blocks, _ = prepare_data(cfg, load_tokenizer(base), 64, 24)
    perm = np.random.default_rng([0, 0]).permutation(len(blocks))
    holders = {t: sum(t in b for b in blocks) for t in
               set(blocks[perm[step * cfg.batch_size]].tolist())}
    token = min(holders, key=lambda t: (holders[t], t))
    assert holders[token] < len(blocks) / 10
    return token, blocks


def runaway_once_norm_free(monkeypatch, token: int, factor: float = torch.inf,
                           times: int | None = None, lifted: bool = True) -> None:
    """Runs install a hook on block 0 that sends ``token`` away (``overflow_on``) once the
    model is norm-free: every site frozen, its clip lifted (a clip set after that, by
    --overflow-clip, does not stop it); ``times``: for that many forwards holding the token,
    then never again; ``lifted`` False: from the last removal on, the lift not yet over."""
    import noln.remove

    def install_with_a_runaway(net, *a, **kwargs):
        adapter = install(net, *a, **kwargs)
        hits = []

        def active() -> bool:
            return all(n.frozen and (n.fade >= 1 or not lifted) for n in adapter.norms()) \
                and (times is None or len(hits) <= times)

        def count(module, args, kwargs):
            if active() and (kwargs["input_ids"] == token).any():
                hits.append(1)

        net.register_forward_pre_hook(count, with_kwargs=True)
        overflow_on(net, net.model.layers[0], token, factor=factor,
                    when=lambda: active() and (times is None or len(hits) <= times))
        return adapter

    monkeypatch.setattr(noln.remove, "install", install_with_a_runaway)


OVERFLOW_ARGS = dict(outlier_clip=1.0, schedule="fixed", special_fade=(0.4, 0.6),
                     fixed={"finish_by": 0.3}, export_format="none", aux_weight=0.0,
                     max_retries=2, **{**FAST, "lr": 1e-4})


def test_skip_overflow_drops_the_sequences_the_norm_free_model_overflows_on(
        tokenizer, text_jsonl, tmp_path, monkeypatch):
    """--skip-overflow: once every clip is off, a step whose batch holds a sequence the model
    overflows on (here: a hook sends one token's residual to inf once the model is
    norm-free) drops that sequence for the rest of the run and redoes the step; the run
    finishes with no guard restore and lists what it dropped. Without it the guard gives
    up on that batch."""
    model = tiny("llama", vocab=len(tokenizer), init=0.02)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    token, blocks = rare_token_of_a_late_batch(tmp_path / "base", text_jsonl, OVERFLOW_ARGS)
    runaway_once_norm_free(monkeypatch, token)
    r = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "run",
                              skip_overflow=True, **OVERFLOW_ARGS)
    skipped = [e for e in r.log if e.get("event") == "skipped"]
    assert r.summary["complete"] and not r.summary["guard_events"] and skipped
    assert all(e["step"] >= 14 for e in skipped)  # after the lift: round(0.6 * 24)
    dropped = r.summary["skipped_sequences"]
    assert dropped == [i for e in skipped for i in e["sequences"]]
    assert all(token in blocks[i] for i in dropped)
    with pytest.raises(NolnError, match="diverged.*norm-free, so --resume with --skip-overflow"):
        noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "plain",
                              **OVERFLOW_ARGS)


def test_skip_overflow_hands_a_model_that_overflows_everywhere_to_the_guard(
        tokenizer, text_jsonl, tmp_path, monkeypatch):
    """A norm-free model that overflows on sequence after sequence at one step is broken, not
    held back by a few sequences (SmolLM2 attempt 28 dropped 120 in a row at one step, and
    would have gone through the whole training set): --skip-overflow drops no more than twice
    a batch at one step, then the guard restores the last checkpoint at half the lr, and
    gives up with a message that says it is the model."""
    import noln.remove

    model = tiny("llama", vocab=len(tokenizer), init=0.02)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    real_install = noln.remove.install

    def install_broken_once_norm_free(net, *a, **kwargs):
        adapter = real_install(net, *a, **kwargs)

        def broken(module, args, out):
            if all(n.frozen and n.fade >= 1 for n in adapter.norms()):
                return (out[0] * torch.inf, *out[1:]) if isinstance(out, tuple) else \
                    out * torch.inf
            return out
        net.model.layers[0].register_forward_hook(broken)
        return adapter

    monkeypatch.setattr(noln.remove, "install", install_broken_once_norm_free)
    with pytest.raises(NolnError, match="overflows on sequence after sequence at step 13 "
                       r"\(12 in a row there\): the model, not a few sequences"):
        noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "run",
                              skip_overflow=True, **OVERFLOW_ARGS)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text()
           .splitlines()]
    gave_up = [e for e in log if e.get("event") == "skip_gave_up"]
    guards = [e for e in log if e.get("event") == "guard"]
    # the last try (a restore truncates the log after its checkpoint): the batch's 4 dropped,
    # the next 4, then 4 more is past 2 x 4
    assert [(e["step"], e["overflowed"]) for e in gave_up] == [(13, 12)]
    assert [g["lr_scale"] for g in guards] == [0.5, 0.25]


def test_overflow_clip_trains_an_overflowing_sequence_clipped_until_it_needs_no_clip(
        tokenizer, text_jsonl, tmp_path, monkeypatch):
    """--overflow-clip K: a sequence the norm-free model overflows on (here one token's
    residual x1e15 after block 0, which block 1's SwiGLU MLP squares past float range, so
    the site loss's std is inf) trains with every site clipped at K, where it is finite,
    instead of being dropped, and comes back each step (--replay). Once the runaway is gone
    (the hook stops after 5 of its forwards), a clipped forward keeps every ordinary token
    below K and the sequence trains unclipped again. Without the clip the same sequences are
    dropped, and a run that dropped them, resumed with the clip, takes them back clipped."""
    model = tiny("llama", vocab=len(tokenizer), init=0.02)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    args = {**OVERFLOW_ARGS, "site_aux": 1.0, "skip_overflow": True, "replay": 4}
    token, blocks = rare_token_of_a_late_batch(tmp_path / "base", text_jsonl, args)
    runs = {}
    for clip in (0.0, 10.0):
        runaway_once_norm_free(monkeypatch, token, factor=1e15, times=5)
        runs[clip] = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl),
                                           tmp_path / f"run{clip:g}", overflow_clip=clip,
                                           **args)
    dropped = runs[0.0].summary["skipped_sequences"]
    assert dropped and all(token in blocks[i] for i in dropped)
    r = runs[10.0]
    assert r.summary["complete"] and not r.summary["guard_events"]
    assert not r.summary["skipped_sequences"]  # trained clipped, none dropped
    clipped = [i for e in r.log if e.get("event") == "clipped" for i in e["sequences"]]
    assert set(clipped) == set(dropped)  # the very sequences the plain skip dropped
    unclipped = [e for e in r.log if e.get("event") == "unclipped"]
    assert unclipped and all(e["reach"] < 10 for e in unclipped)
    assert sorted(i for e in unclipped for i in e["sequences"]) == \
        sorted(r.summary["unclipped_sequences"])
    assert not set(r.summary["clipped_sequences"]) & set(r.summary["unclipped_sequences"])
    # the plain run, resumed with the clip (a branch of it would be too): what it dropped
    # comes back, to train clipped
    resumed = noln.remove_layernorm(resume=tmp_path / "run0", overflow_clip=10.0)
    retried = [e for e in resumed.log if e.get("event") == "clipped" and e.get("retried")]
    assert [(e["step"], e["sequences"]) for e in retried] == [(24, dropped)]
    assert retried[0]["replay"] == min(4, len(dropped))  # and replayed, as outliers
    assert not resumed.summary["skipped_sequences"]
    assert resumed.summary["clipped_sequences"] == dropped
    # saved at once: a guard restore to the last checkpoint keeps them clipped
    from noln.checkpoint import load_checkpoint
    saved = load_checkpoint(tmp_path / "run0" / "checkpoints" / "last.pt")["state"]
    assert saved["clipped"] == dropped and not saved["skipped"]


@pytest.mark.parametrize("settings, message", [
    ({"overflow_clip": 10.0}, "--overflow-clip 10 clips.*give --skip-overflow"),
    ({"skip_overflow": True, "overflow_clip": 1.0}, "--overflow-clip 1 would clip typical"),
    ({"skip_overflow": True, "overflow_clip": 10.0, "fsdp": True}, "--overflow-clip runs .*fsdp"),
    ({"skip_spikes": 100.0}, "--skip-spikes 100 searches.*give --skip-overflow"),
    ({"skip_overflow": True, "skip_spikes": 1.0}, "--skip-spikes 1 would search every other"),
    ({"skip_overflow": True, "skip_spikes": 100.0, "fsdp": True}, "--skip-spikes measures.*fsdp"),
])
def test_overflow_options_are_checked_before_anything_loads(settings, message):
    """--overflow-clip and --skip-spikes work on what --skip-overflow finds, above 1, and on
    one process's own gradients: each misuse is one line."""
    with pytest.raises(NolnError, match=message):
        make_config(model="m", data="d", steps=10, **settings)


@pytest.mark.parametrize("factor, lifted", [(100.0, True), (1e3, True), (100.0, False)])
def test_skip_spikes_drops_a_sequence_whose_gradient_dwarfs_the_run(
        factor, lifted, tokenizer, text_jsonl, tmp_path, monkeypatch):
    """--skip-spikes F: once every site is frozen, a step whose gradient norm is over F x
    the median of the steps before it (here a hook multiplies one rare token's residual
    after block 0: the loss stays finite, the gradient is 100x the run's) is searched as an
    overflowing one is; the sequence that holds the token, over the line on its own, is
    dropped and the step runs again without it, so no step the run takes is over its line.
    Without it the run takes that step (x100), or, where the loss passes the guard's line
    (x1000: a finite loss, so --skip-overflow alone finds no sequence), stops. The same
    while the special scales still fade (``lifted`` False: the runaway from the last
    removal, step 7, on; the lift ends at step 14)."""
    from statistics import median

    model = tiny("llama", vocab=len(tokenizer), init=0.02)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    # while the lift lasts, no outlier clip (it would hold the runaway): the special scales'
    # fade is the lift then
    args = {**OVERFLOW_ARGS, "skip_overflow": True} | \
        ({} if lifted else {"outlier_clip": 0.0, "special_scale": True})
    token, blocks = rare_token_of_a_late_batch(tmp_path / "base", text_jsonl, args,
                                               step=20 if lifted else 11)

    def run(name: str, spikes: float):
        runaway_once_norm_free(monkeypatch, token, factor=factor, lifted=lifted)
        return noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / name,
                                     skip_spikes=spikes, **args)

    def over_the_line(r) -> list[int]:
        steps = [e for e in r.log if "loss" in e and "event" not in e]
        return [e["step"] for i, e in enumerate(steps) if i >= 10 and e["grad_norm"] > 20 *
                median(s["grad_norm"] for s in steps[max(0, i - 100):i])]

    if factor < 1e3:
        plain = run("plain", 0.0)
        assert over_the_line(plain) and min(over_the_line(plain)) >= (14 if lifted else 7)
        assert not plain.summary["skipped_sequences"]  # finite: skip_overflow sees nothing
    else:
        with pytest.raises(NolnError, match="breaks the model at any lr.*--skip-spikes 100 "
                           "too: this loss is finite"):
            run("plain", 0.0)
    searched = run("searched", 20.0)
    skipped = [e for e in searched.log if e.get("event") == "skipped"]
    assert skipped and all(e["step"] >= 7 and e["grad_norm_over"] > 0 for e in skipped)
    assert (min(e["step"] for e in skipped) >= 14) == lifted
    dropped = searched.summary["skipped_sequences"]
    assert dropped == [i for e in skipped for i in e["sequences"]]
    assert all(token in blocks[i] for i in dropped)
    assert searched.summary["complete"] and not searched.summary["guard_events"]
    assert not over_the_line(searched)


@pytest.mark.parametrize("how", ["hub id", "--preset"])
def test_the_smollm2_preset_is_attempt_46bs_recipe(how, monkeypatch, tmp_path):
    """SmolLM2-135M's Hub ids, or ``preset`` for a local copy (the GGUF), get every setting of
    ``docs/benchmarks/smollm2/smol-c46b.yaml`` (the recipe the README's table measures) but
    where the data is, how much is held out and how many checkpoints are kept; its schedule
    file's hand-written order is the preset's ``order`` (test_schedule checks the two expand
    to the same 91 sites); its stage at step 620 is the preset's at 62% of the run. A folder
    named like the Hub id gets no preset by itself."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the file's schedule path is relative to the repository
    recipe = yaml.safe_load((root / "docs/benchmarks/smollm2/smol-c46b.yaml").read_text())
    mine = dict(data="builtin", eval_data=None, eval_sets={}, out="runs/x")
    measured = make_config(**{**recipe, **mine, "model": "m"})
    if how == "hub id":
        cfg = make_config(model="HuggingFaceTB/SmolLM2-135M-Instruct", **mine)
    else:
        cfg = make_config(model="SmolLM2-135M-Instruct.Q4_1.gguf", preset=
                          "HuggingFaceTB/SmolLM2-135M-Instruct", **mine)
    own = {"model", "preset", "tokens", "steps", "schedule", "order", "eval_tokens",
           "checkpoint_keep"}
    assert cfg.model_dump(exclude=own) == measured.model_dump(exclude=own)
    assert cfg.resolved_steps(cfg.ctx) == measured.resolved_steps(measured.ctx) == 1000
    assert yaml.safe_load(Path(measured.schedule).read_text())["type"] == cfg.schedule
    assert cfg.order == ["mlp_in", "attn_in_qk+attn_in_v", "final"]
    longer = make_config(model="HuggingFaceTB/SmolLM2-135M", steps=2000, **mine)
    assert [s.step for s in longer.stages] == [1240]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "HuggingFaceTB" / "SmolLM2-135M").mkdir(parents=True)
    assert make_config(model="HuggingFaceTB/SmolLM2-135M", **mine).steps == 146  # small-model


def test_scale_noise_draws_outliers_on_ordinary_tokens_by_the_step():
    """The draw of --scale-noise P,F: about P of the ordinary tokens, none of the others,
    factors log-uniform in [1, F] (their logs uniform: mean log(F) / 2), one block in range;
    the same seed draws the same."""
    from noln.train import draw_scale_noise

    keep = torch.ones(64, 256, dtype=torch.bool)
    keep[:, 0] = False  # position 0, as special_token_mask marks it
    index, factor = draw_scale_noise(keep, 0.1, 4.0, 30, torch.Generator().manual_seed(3))
    hit = factor != 1
    assert 0 <= index < 30 and not hit[:, 0].any()
    assert hit.float().mean().item() == pytest.approx(0.1 * 255 / 256, abs=0.01)
    assert factor.min() >= 1 and factor.max() <= 4
    assert factor[hit].log().mean().item() == pytest.approx(np.log(4) / 2, abs=0.03)
    again = draw_scale_noise(keep, 0.1, 4.0, 30, torch.Generator().manual_seed(3))
    assert again[0] == index and torch.equal(again[1], factor)


def test_scale_noise_redoes_a_step_its_outliers_overflow(tokenizer, text_jsonl, tmp_path,
                                                          monkeypatch):
    """scale_noise: the run trains with the made outliers (its losses differ from the run
    without them, and two runs with them are equal: drawn by the step). A step that overflows
    under them (here a hook sends a token to inf whenever noise is on, from step 16) is
    logged (`noise_overflow`) and redone without them: the run finishes with no guard
    restore and no sequence dropped."""
    import noln.train

    model = tiny("llama", vocab=len(tokenizer), init=0.02)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    args = {**OVERFLOW_ARGS, "site_aux": 1.0, "skip_overflow": True}
    runs = {name: noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl),
                                        tmp_path / name, **args, **extra)
            for name, extra in (("plain", {}), ("noise", {"scale_noise": (0.2, 4.0)}),
                                ("again", {"scale_noise": (0.2, 4.0)}))}

    def losses(r):
        return [e["loss"] for e in r.log if "loss" in e and "event" not in e]

    assert losses(runs["noise"]) == losses(runs["again"]) != losses(runs["plain"])

    noisy, real = {}, noln.train.Trainer.scale_noise

    @contextmanager
    def watched(self, keep):
        noisy["on"] = bool(self.noise_blocks) and self.noise_off_step != self.state.step and \
            self.state.step >= 16
        with real(self, keep):
            yield
        noisy["on"] = False

    monkeypatch.setattr(noln.train.Trainer, "scale_noise", watched)

    def install_overflowing_under_noise(net, *a, **kwargs):
        adapter = install(net, *a, **kwargs)
        overflow_on(net, net.model.layers[0], int(tokenizer.encode(" the")[0]),
                    when=lambda: noisy.get("on", False))
        return adapter

    monkeypatch.setattr(noln.remove, "install", install_overflowing_under_noise)
    r = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "over",
                              **args, scale_noise=(0.2, 4.0))
    redone = [e["step"] for e in r.log if e.get("event") == "noise_overflow"]
    assert redone and min(redone) >= 16
    steps = [e["step"] for e in r.log if "loss" in e and "event" not in e]
    assert steps == list(range(24))  # each redone step logged once, after its redo
    assert r.summary["complete"] and not r.summary["guard_events"]
    assert not r.summary["skipped_sequences"]
    with pytest.raises(NolnError, match="scale_noise scales .*--grad-checkpointing"):
        make_config(model="m", data="d", steps=10, scale_noise=(0.1, 4.0),
                    grad_checkpointing=True)


def test_outlier_clip_run_lifts_the_clip_and_exports(tokenizer, text_jsonl, tmp_path):
    """With --outlier-clip K, each site is clipped from its removal (the run differs from an
    unclipped one), K rises over the special fade once every site is frozen, and the run ends
    with every clip off: a plain fixed-scale model whose exports give its logits."""
    model = tiny("llama", vocab=len(tokenizer), init=0.02)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    args = dict(schedule="fixed", export_format="both", special_fade=(0.5, 0.9),
                fixed={"finish_by": 0.4}, **FAST)
    r = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "run",
                              outlier_clip=1.0, eval_data=str(text_jsonl), **args)
    assert r.summary["complete"] and r.adapter.export_state() == "all"
    assert all(n.clip == 0.0 and not n.pending for n in r.adapter.norms())
    faded = [e for e in r.log if e.get("event") == "special_faded"]
    assert len(faded) == 1 and faded[0]["step"] > max(e["step"] for e in r.events)
    assert_run_matches_its_exports(r, vocab=len(tokenizer))
    # the Must-show check a user runs on a finished run: a fresh process, no noln, eps >= 1e10
    script = Path(__file__).parents[1] / "bench" / "export_check.py"
    done = subprocess.run([sys.executable, str(script), str(r.out), "--device", "cpu",
                           "--json", str(tmp_path / "check.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["plain class"] == "LlamaForCausalLM" and not check["noln imported in that process"]
    assert check["smallest norm eps"] >= 1e10 and check["|CE difference|"] < 1e-4
    plain = noln.remove_layernorm(str(tmp_path / "base"), str(text_jsonl), tmp_path / "plain",
                                  **args)
    assert [e["site"] for e in plain.events] == [e["site"] for e in r.events]
    assert plain.summary["ce_after"]["heldout"]["mean"] != \
        pytest.approx(r.summary["ce_after"]["heldout"]["mean"], abs=1e-4)

import pytest
import torch
from torch import nn

from noln.fakenorm import FakeLayerNorm, FakeRMSNorm


def _ln(d=16):
    torch.manual_seed(0)
    ln = nn.LayerNorm(d)
    nn.init.normal_(ln.weight, 1.0, 0.2)
    nn.init.normal_(ln.bias, 0.0, 0.2)
    return ln


def test_live_equals_real_layernorm_in_train_and_eval():
    ln = _ln()
    fake = FakeLayerNorm.from_layernorm(ln)
    x = torch.randn(3, 5, 16) * 4 + 1
    for mode in (True, False):
        fake.train(mode)
        torch.testing.assert_close(fake(x), ln(x), rtol=1e-5, atol=1e-6)


def test_live_equals_real_rmsnorm():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16))
    fake = FakeRMSNorm(w, None, eps=1e-6)
    x = torch.randn(2, 7, 16) * 3
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(fake(x), expected, rtol=1e-5, atol=1e-6)


def test_frozen_is_a_fixed_scale():
    ln = _ln()
    fake = FakeLayerNorm.from_layernorm(ln)
    fake.freeze(2.5)
    x = torch.randn(4, 6, 16) * 10
    expected = (x - x.mean(-1, keepdim=True)) / 2.5 * ln.weight + ln.bias
    torch.testing.assert_close(fake(x), expected)
    # linear in x (up to the bias): f(2x) - b = 2 (f(x) - b)
    torch.testing.assert_close(fake(2 * x) - ln.bias, 2 * (fake(x) - ln.bias))


def test_rms_frozen_has_no_mean_subtraction():
    w = nn.Parameter(torch.ones(8))
    fake = FakeRMSNorm(w, None, eps=1e-6)
    fake.freeze(2.0)
    x = torch.randn(3, 8) + 5
    torch.testing.assert_close(fake(x), x / 2.0)


def test_sigma_is_an_ema_of_batch_mean_std_first_value_taken_whole():
    fake = FakeLayerNorm.from_layernorm(_ln(), momentum=0.9).train()
    x1, x2 = torch.randn(2, 4, 16) * 3, torch.randn(2, 4, 16) * 7
    std = lambda x: (x.var(-1, unbiased=False) + 1e-5).sqrt().mean()  # noqa: E731
    fake(x1)
    assert fake.sigma.item() == pytest.approx(std(x1).item(), rel=1e-5)
    fake(x2)
    assert fake.sigma.item() == pytest.approx(0.9 * std(x1).item() + 0.1 * std(x2).item(),
                                              rel=1e-5)
    fake.eval()
    fake(x2 * 100)  # evaluation never moves sigma
    assert fake.sigma.item() == pytest.approx(0.9 * std(x1).item() + 0.1 * std(x2).item(),
                                              rel=1e-5)


def test_std_mask_excludes_outlier_tokens_from_sigma():
    fake = FakeLayerNorm.from_layernorm(_ln()).train()
    x = torch.randn(2, 6, 16)
    x[:, 0] *= 100  # a huge position-0 residual, as in GPT-2
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 0] = False
    fake.std_mask = mask
    fake(x)
    typical = (x[:, 1:].var(-1, unbiased=False) + 1e-5).sqrt().mean()
    assert fake.sigma.item() == pytest.approx(typical.item(), rel=1e-5)


def test_frozen_state_and_sigma_survive_state_dict_round_trip():
    ln = _ln()
    a = FakeLayerNorm.from_layernorm(ln)
    a.freeze(3.25)
    b = FakeLayerNorm.from_layernorm(_ln())
    assert not b.frozen
    b.load_state_dict(a.state_dict())
    assert b.frozen and b.sigma.item() == 3.25
    x = torch.randn(2, 16)
    torch.testing.assert_close(a(x), b(x))


def test_gradient_checkpointing_counts_each_batch_once_in_the_ema():
    """A checkpointed forward is re-run in backward; the EMA must not see that batch twice."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from noln.arch import install
    from noln.train import enable_activation_checkpointing

    def run(checkpointing: bool):
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
        adapter = install(model)
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        x = torch.randint(0, 97, (4, 16))
        out = model(x, labels=x)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return adapter, grads

    plain, g_plain = run(False)
    ckpt, g_ckpt = run(True)
    for name in plain.site_names():
        a, b = plain.site(name).norm, ckpt.site(name).norm
        assert int(b.n_updates) == int(a.n_updates) == 1, name
        assert float(b.sigma) == pytest.approx(float(a.sigma), rel=1e-6), name
    for a, b in zip(g_plain, g_ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- special tokens' own scale (position 0 and end-of-text) ------------------------------------


def _special_batch():
    """[2, 5, 16]: position 0 of each row and one end-of-text token (row 1, position 3) are
    ~100x the others, as in real LLMs' massive activations."""
    from noln.fakenorm import special_token_mask

    torch.manual_seed(1)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 9]])
    mask = special_token_mask(ids, eot_id=0)
    x = torch.randn(2, 5, 16)
    x[mask] *= 100.0
    return x, mask


@pytest.mark.parametrize("cls", [FakeLayerNorm, FakeRMSNorm])
def test_special_scale_tracks_and_divides_special_tokens_by_position(cls):
    x, mask = _special_batch()
    assert mask.tolist() == [[True, False, False, False, False], [True, False, False, True, False]]
    norm = cls(nn.Parameter(torch.ones(16)), nn.Parameter(torch.zeros(16)) if cls is
               FakeLayerNorm else None, eps=1e-5)
    norm.enable_special_scale()
    norm.train()
    norm.std_mask, norm.special_mask = ~mask, mask
    norm(x)
    xc = x - x.mean(-1, keepdim=True) if cls is FakeLayerNorm else x
    std = (xc.pow(2).mean(-1) + 1e-5).sqrt()
    torch.testing.assert_close(norm.sigma, std[~mask].mean())
    torch.testing.assert_close(norm.sigma_special, std[mask].mean())
    norm.freeze()
    norm.eval()
    s, s_special = float(norm.sigma), float(norm.sigma_special)
    assert s_special > 50 * s
    for fade, divisor in ((0.0, s_special), (0.5, (s_special * s) ** 0.5), (1.0, s)):
        norm.set_special_fade(fade)
        y = norm(x)
        # by position: the special tokens' rows, every channel; the others by sigma
        torch.testing.assert_close(y[mask], xc[mask] / divisor, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y[~mask], xc[~mask] / s, rtol=1e-5, atol=1e-6)
    norm.special_mask = None  # nothing marked: every token by sigma (the plain fixed scale)
    norm.set_special_fade(0.0)
    torch.testing.assert_close(norm(x), xc / s, rtol=1e-5, atol=1e-6)


def test_state_dicts_without_special_buffers_still_load():
    """Checkpoints written before special scales existed resume with them off."""
    norm = FakeRMSNorm(nn.Parameter(torch.ones(8)), None, eps=1e-6)
    norm.freeze(3.0)
    old = {k: v for k, v in norm.state_dict().items() if "special" not in k and "taper" not in k}
    fresh = FakeRMSNorm(nn.Parameter(torch.ones(8)), None, eps=1e-6)
    fresh.load_state_dict(old)  # strict
    assert fresh.frozen and not fresh.special and float(fresh.sigma) == 3.0
    assert not fresh.tapering and not fresh.pending  # no taper: the plain fixed scale
    norm.enable_special_scale()
    norm.set_special_fade(0.25)
    fresh.load_state_dict(norm.state_dict())
    assert fresh.special and fresh.fade == 0.25 and fresh.special_pending


def test_adapter_marks_special_tokens_of_each_forward():
    """The model's hook finds position 0 and end-of-text in each forward's input_ids (kept
    until the next forward, for activation checkpointing's recomputation); without special
    scales it does nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from noln.arch import install

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    adapter = install(model, eot_id=0)
    seen = []
    norm = adapter.final_norm
    norm.register_forward_pre_hook(lambda m, a: seen.append(m.special_mask))
    ids = torch.tensor([[3, 4, 0, 5]])
    model(ids)
    assert seen == [None]  # special scales off: no mask
    adapter.enable_special_scale()
    model(input_ids=ids)
    assert seen[-1].tolist() == [[True, False, True, False]]
    model(torch.tensor([[7, 0]]))
    assert norm.special_mask.tolist() == [[True, True]]
    again = install(model)  # a second adapter keeps the end-of-text id and one pair of hooks
    model(ids)
    assert again.eot_id == 0 and seen[-1].tolist() == [[True, False, True, False]]
    for name in adapter.site_names():
        adapter.freeze(name)
    assert adapter.export_state() == "mixed"  # special scales not faded: not exportable
    adapter.set_special_fade(1.0)
    assert adapter.export_state() == "all"


def test_special_scales_survive_activation_checkpointing():
    """Checkpointed blocks re-run their forward in the backward pass: they must divide special
    tokens by the same per-token scales, so the gradients equal the uncheckpointed ones."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from noln.arch import install
    from noln.train import enable_activation_checkpointing

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))
    ids = torch.randint(1, 50, (2, 12))
    ids[1, 5] = 0
    grads = []
    for checkpointed in (False, True):
        model = copy.deepcopy(base)
        adapter = install(model, eot_id=0)
        adapter.enable_special_scale()
        for i, name in enumerate(adapter.site_names()):
            norm = adapter.site(name).norm
            norm.sigma_special.fill_(20.0 + i)
            adapter.freeze(name)
        adapter.set_special_fade(0.3)
        if checkpointed:
            enable_activation_checkpointing(model)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


@pytest.mark.parametrize("cls", [FakeLayerNorm, FakeRMSNorm])
def test_taper_blends_each_tokens_std_into_the_fixed_scale(cls):
    """Frozen with a taper, a site divides token t by s_t ** (1 - w) * sigma ** w: the live norm
    at w = 0, the fixed scale at w = 1, and the gradient reaches x through s_t in between."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(16))
    bias = nn.Parameter(torch.randn(16)) if cls is FakeLayerNorm else None
    norm = cls(weight, bias, eps=1e-5).train()
    x = torch.randn(2, 6, 16) * torch.tensor([1.0, 10.0, 1.0, 3.0, 0.5, 1.0])[None, :, None]
    live = norm(x).detach()
    norm.freeze(taper=True)
    sigma = float(norm.sigma)
    assert norm.tapering and norm.pending and norm.taper == 0.0
    xc = x - x.mean(-1, keepdim=True) if cls is FakeLayerNorm else x
    s_t = (xc.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()

    def expected(w, x_in):
        xc_in = x_in - x_in.mean(-1, keepdim=True) if cls is FakeLayerNorm else x_in
        s_in = (xc_in.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        y = xc_in / (s_in ** (1 - w) * sigma ** w) * weight
        return y + bias if bias is not None else y

    torch.testing.assert_close(norm(x), live, rtol=1e-5, atol=1e-5)
    norm.set_clip(2.0)  # clipped too (the trainer skips the probe after such a removal)
    torch.testing.assert_close(norm(x), live, rtol=1e-5, atol=1e-5)
    norm.set_clip(0.0)
    norm.set_taper(0.5)
    torch.testing.assert_close(norm(x), xc / (s_t * sigma).sqrt() * weight +
                               (bias if bias is not None else 0), rtol=1e-5, atol=1e-5)
    assert float(norm.sigma) == sigma, "the fixed scale stays the EMA at the removal step"
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(norm(xg).pow(2).sum(), xg)[0]
    xr = x.clone().requires_grad_(True)
    want = torch.autograd.grad(expected(0.5, xr).pow(2).sum(), xr)[0]
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5)
    norm.set_taper(1.0)
    assert not norm.tapering and not norm.pending
    torch.testing.assert_close(norm(x), expected(1.0, x), rtol=1e-5, atol=1e-5)
    # the taper's state is a buffer: a checkpoint taken mid-taper resumes mid-taper
    norm.set_taper(0.25)
    fresh = cls(nn.Parameter(weight.detach().clone()), None if bias is None else
                nn.Parameter(bias.detach().clone()), eps=1e-5)
    fresh.load_state_dict(norm.state_dict())
    assert fresh.tapering and fresh.taper == 0.25
    torch.testing.assert_close(fresh(x), norm(x))


@pytest.mark.parametrize("cls", [FakeLayerNorm, FakeRMSNorm])
def test_outlier_clip_caps_each_tokens_size_at_k_times_the_fixed_scale(cls):
    """With the outlier clip K a frozen site divides token t by max(sigma, s_t / K): typical
    tokens see the fixed scale, a token at 10x enters the next layer at K times a typical
    one's normalised size; the clip is a buffer, pending until it is off, and off it is the
    plain fixed scale."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(16))
    bias = nn.Parameter(torch.randn(16)) if cls is FakeLayerNorm else None
    norm = cls(weight, bias, eps=1e-5).train()
    x = torch.randn(2, 6, 16) * torch.tensor([1.0, 10.0, 1.0, 3.0, 0.5, 40.0])[None, :, None]
    norm(x)
    norm.freeze()
    plain = norm(x).detach()
    sigma = float(norm.sigma)
    xc = x - x.mean(-1, keepdim=True) if cls is FakeLayerNorm else x
    s_t = (xc.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    norm.set_clip(4.0)
    assert norm.clipping and norm.pending
    want = xc / torch.maximum(torch.tensor(sigma), s_t / 4.0) * weight
    want = want + bias if bias is not None else want
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)
    clipped = s_t.squeeze(-1) > 4.0 * sigma
    assert clipped.any() and (~clipped).any()
    torch.testing.assert_close(norm(x)[~clipped], plain[~clipped])
    # a clipped token's normalised size is K, whatever its own std
    y = norm(x).detach() - (bias if bias is not None else 0)
    size = ((y / weight).pow(2).mean(-1) + 0).sqrt()
    torch.testing.assert_close(size[clipped], torch.full_like(size[clipped], 4.0), rtol=1e-4,
                               atol=1e-4)
    fresh = cls(nn.Parameter(weight.detach().clone()), None if bias is None else
                nn.Parameter(bias.detach().clone()), eps=1e-5)
    fresh.load_state_dict(norm.state_dict())
    assert fresh.clipping and fresh.clip == 4.0
    torch.testing.assert_close(fresh(x), norm(x))
    norm.set_clip(0.0)
    assert not norm.clipping and not norm.pending
    torch.testing.assert_close(norm(x), plain)

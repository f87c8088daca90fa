"""GPT-2 adapter, what is its own: the fused c_attn split equals two separate inputs; and the
exports' refusals. The family contract (sites, freezing, exports, resume) is
tests/test_families.py."""

import pytest
import torch
from transformers import BertConfig

from noln.arch import install
from noln.errors import NolnError
from noln.export import export_model


class _Tok:  # the exports only need save_pretrained from a tokenizer
    def save_pretrained(self, path):
        pass


def _frozen_with_distinct_sigmas(model):
    """Train-mode passes to move every EMA, then freeze each site at a different sigma so the
    Q/K and V paths of ln_1 really differ (the hard case for the hf export)."""
    adapter = install(model)
    model.train()
    model(torch.randint(0, 97, (4, 16)))
    model.eval()
    for i, name in enumerate(adapter.site_names()):
        adapter.site(name).norm.freeze(0.5 + 0.37 * i)
    return adapter


class _TwoInputQKV(torch.nn.Module):
    """The direct reading of the split: Q/K from the first d inputs, V from the second d."""

    def __init__(self, conv):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x):
        d = self.weight.shape[0]
        qk = x[..., :d] @ self.weight[:, : 2 * d] + self.bias[: 2 * d]
        v = x[..., d:] @ self.weight[:, 2 * d :] + self.bias[2 * d :]
        return torch.cat([qk, v], dim=-1)


@pytest.mark.parametrize("frozen", [("ln_1_qk",), ("ln_1_v",), ("ln_1_qk", "ln_1_v")])
def test_single_matmul_split_equals_two_separate_inputs(tiny_gpt2, frozen):
    """Training runs one d-wide QKV matmul and corrects V by rho; that must be the same
    function, and the same gradients, as feeding Q/K and V their own normed inputs."""
    import copy

    adapter = install(tiny_gpt2)
    tiny_gpt2.train()
    for m in tiny_gpt2.modules():  # train mode for the EMAs, without dropout's randomness
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tiny_gpt2(torch.randint(0, 97, (4, 16)))  # move the EMAs
    for i, block in enumerate(tiny_gpt2.transformer.h):
        for kind in frozen:
            getattr(block.ln_1, kind.split("_")[-1]).freeze(0.6 + 0.5 * i + 0.3 * len(kind))
    reference = copy.deepcopy(tiny_gpt2)
    for block in reference.transformer.h:
        block.ln_1.fused_v = False
        block.attn.c_attn = _TwoInputQKV(block.attn.c_attn)
    x = torch.randint(0, 97, (3, 16))
    out, ref = tiny_gpt2(x, labels=x), reference(x, labels=x)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), q in zip(tiny_gpt2.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # the live path's EMA still moves in training
    live = [k for k in ("qk", "v") if f"ln_1_{k}" not in frozen]
    for k in live:
        ema = getattr(tiny_gpt2.transformer.h[0].ln_1, k).sigma
        assert float(ema) == pytest.approx(float(getattr(reference.transformer.h[0].ln_1, k)
                                                     .sigma), rel=1e-6)
    assert adapter.frozen_sites()


def test_fp16_hf_export_is_refused_with_the_reason(tiny_gpt2, tmp_path):
    adapter = _frozen_with_distinct_sigmas(tiny_gpt2)
    with pytest.raises(NolnError, match=r"fp16 cannot hold this hf export.*65504.*float32 or "
                                        r"bfloat16.*--format clean"):
        export_model(adapter, _Tok(), tmp_path / "fp16", "hf", dtype=torch.float16)
    assert not (tmp_path / "fp16").exists()


@pytest.mark.parametrize("fmt", ["hf", "clean"])
def test_an_export_has_the_modes_of_the_users_umask(tiny_gpt2, tmp_path, fmt):
    """Written in a temporary folder (``mkdtemp``: 0700) and renamed into place, an export used
    to be readable by its owner alone; it gets the modes the user's umask gives any folder."""
    import os
    import stat

    adapter = _frozen_with_distinct_sigmas(tiny_gpt2)
    umask = os.umask(0o022)
    try:
        out = export_model(adapter, _Tok(), tmp_path / fmt, fmt)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "noln.json" in modes and set(modes.values()) == {0o644}, modes


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import BertForMaskedLM

    model = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                       intermediate_size=64))
    with pytest.raises(NolnError, match=r"unsupported architecture 'bert'.*gpt2"):
        install(model)


def test_unknown_site_is_a_clear_error(tiny_gpt2):
    adapter = install(tiny_gpt2)
    with pytest.raises(NolnError, match=r"no removal site 'blocks.7.ln_2'.*2 blocks"):
        adapter.freeze("blocks.7.ln_2")



"""GPT-2: four removal sites per block layout. Roles: ``mlp_in`` is ``ln_2``, ``attn_in_qk`` /
``attn_in_v`` are ``ln_1`` as read by Q/K and by V, ``final`` is ``ln_f`` (the old site names
``ln_2``, ``ln_1_qk``, ``ln_1_v``, ``ln_f`` are aliases).

To freeze ln_1 separately for queries/keys and values, ``block.ln_1`` becomes a
``SplitLayerNorm`` (``noln.arch.base``) holding two FakeLayerNorms over the same weight and
bias, and ``attn.c_attn`` becomes ``GPT2FusedQKV``. While both sites are live their outputs are
identical, so ln_1 returns the d-wide tensor and c_attn runs the original single matmul.

Once they differ, the two paths differ only in the per-token divisor (sigma when frozen, the
token's std when live): with u the Q/K path's output, the V path's input is
``rho (u - beta) + beta``, rho = divisor_qk / divisor_v, so the V columns of the one matmul
``u W + b`` need only ``V = rho V_u + (1 - rho) (beta W_v + b_v)``. ln_1 leaves rho in
``v_ratio`` for c_attn: training keeps the original single d-wide matmul (the ``hf`` export
folds the same algebra into the weights). ``SplitLayerNorm(fused_v=False)`` instead returns
both paths side by side, 2d wide, for adapters whose projection reads them apart (NeoX).

State-dict keys of the swapped model are a superset of the original's (``ln_1.weight``,
``attn.c_attn.weight`` ... keep their names), plus ``sigma``/``is_frozen`` buffers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from noln.arch.base import (
    ATTN_IN_QK,
    ATTN_IN_V,
    EPS_SCALE,
    EPS_TRICK,
    FINAL,
    MLP_IN,
    Layout,
    MlpNeurons,
    NormAdapter,
    Site,
    SplitLayerNorm,
    fold_scale_into_rows,
)
from noln.fakenorm import FakeLayerNorm, FakeNorm


class GPT2FusedQKV(nn.Module):
    """GPT-2's fused ``c_attn`` (Conv1D, weight ``[d, 3d]``) with the V columns corrected by
    its ln_1's ``v_ratio`` (see the module docstring)."""

    def __init__(self, conv: nn.Module, ln: SplitLayerNorm):
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.nx, self.nf = conv.weight.shape
        self._ln = [ln]  # a reference, not a submodule (its parameters belong to the block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.nx
        qkv = torch.addmm(self.bias, x.reshape(-1, d), self.weight).view(*x.shape[:-1], -1)
        ln = self._ln[0]
        rho = ln.v_ratio
        if rho is None:
            return qkv
        w_v, b_v = self.weight[:, 2 * d :], self.bias[2 * d :]
        c = torch.addmv(b_v, w_v.T, ln.bias) if ln.bias is not None else b_v
        v = (rho * qkv[..., 2 * d :] + (1 - rho) * c.to(qkv.dtype)).to(qkv.dtype)
        if rho.requires_grad:  # a live path: rho's gradient needs the uncorrected V
            return torch.cat([qkv[..., : 2 * d], v], dim=-1)
        qkv[..., 2 * d :] = v  # in place (addmm's backward does not need its output)
        return qkv


class GPT2Adapter(NormAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    layout = Layout("transformer.h", "transformer.ln_f")
    # Conv1D weights are [in, out]
    mlp_neurons = MlpNeurons(make=(("mlp.c_fc.weight", 1), ("mlp.c_fc.bias", 0)),
                             write=("mlp.c_proj.weight", 0))
    block_kinds = (MLP_IN, ATTN_IN_QK, ATTN_IN_V)
    aliases = {"ln_2": MLP_IN, "ln_1_qk": ATTN_IN_QK, "ln_1_v": ATTN_IN_V, "ln_f": FINAL}

    @staticmethod
    def build_small_model(vocab_size: int, n_layer: int, d_model: int, n_head: int, ctx: int,
                          eot_id: int) -> nn.Module:
        config = GPT2Config(vocab_size=vocab_size, n_positions=ctx, n_embd=d_model,
                            n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=eot_id, eos_token_id=eot_id,
                            tie_word_embeddings=True)
        return GPT2LMHeadModel(config)

    def install(self) -> None:
        tf = self.model.transformer
        for block in tf.h:
            if not isinstance(block.ln_1, SplitLayerNorm):
                block.ln_1 = SplitLayerNorm(block.ln_1, self.momentum, fused_v=True)
                block.attn.c_attn = GPT2FusedQKV(block.attn.c_attn, block.ln_1)
            if not isinstance(block.ln_2, FakeNorm):
                block.ln_2 = FakeLayerNorm.from_layernorm(block.ln_2, self.momentum)
        if not isinstance(tf.ln_f, FakeNorm):
            tf.ln_f = FakeLayerNorm.from_layernorm(tf.ln_f, self.momentum)

    def collect_sites(self) -> list[Site]:
        sites = [Site(FINAL, FINAL, None, self.model.transformer.ln_f)]
        for i, block in enumerate(self.layers):
            sites += [Site(f"blocks.{i}.{role}", role, i, norm) for role, norm in (
                (MLP_IN, block.ln_2), (ATTN_IN_QK, block.ln_1.qk), (ATTN_IN_V, block.ln_1.v))]
        return sites

    # -- exports ---------------------------------------------------------------------------
    def hf_config_overrides(self) -> dict:
        return {"layer_norm_epsilon": EPS_TRICK} if self.export_state() == "all" else {}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.require_export_state(("none", "all"))
        sd = self.plain_state_dict()
        if state == "none":
            return sd
        d = self.model.config.n_embd
        for i, block in enumerate(self.layers):
            p = f"transformer.h.{i}."
            ln1 = block.ln_1
            g, beta = ln1.weight.detach().double(), ln1.bias.detach().double()
            s_qk, s_v = ln1.qk.sigma.double(), ln1.v.sigma.double()
            sd[p + "ln_1.weight"] = (g * EPS_SCALE / s_v).float()
            # ln_1 now emits the V path's scale; Q/K columns take the ratio and a bias fix:
            # ((x-mu) g/s_qk + beta) W = r ((x-mu) g/s_v + beta) W + (1-r) beta W, r = s_v/s_qk
            r = s_v / s_qk
            w = block.attn.c_attn.weight.detach().double()
            b = block.attn.c_attn.bias.detach().double().clone()
            w_qk = w[:, : 2 * d]
            b[: 2 * d] += (1 - r) * (beta @ w_qk)
            w = torch.cat([w_qk * r, w[:, 2 * d :]], dim=1)
            sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = w.float(), b.float()
            ln2 = block.ln_2
            sd[p + "ln_2.weight"] = (ln2.weight.detach().double() * EPS_SCALE / ln2.sigma).float()
        ln_f = self.model.transformer.ln_f
        sd["transformer.ln_f.weight"] = (ln_f.weight.detach().double() * EPS_SCALE
                                         / ln_f.sigma).float()
        return sd

    def clean_state_dict(self) -> dict[str, torch.Tensor]:
        self.require_export_state(("all",))
        sd = {k: v for k, v in self.plain_state_dict().items() if ".ln_" not in k}
        d = self.model.config.n_embd
        for i, block in enumerate(self.layers):
            p = f"transformer.h.{i}."
            ln1, ln2, attn = block.ln_1, block.ln_2, block.attn.c_attn
            g, beta = ln1.weight.detach().double(), ln1.bias.detach().double()
            w = attn.weight.detach().double()
            w_qk = fold_scale_into_rows(w[:, : 2 * d], g / ln1.qk.sigma.double())
            w_v = fold_scale_into_rows(w[:, 2 * d :], g / ln1.v.sigma.double())
            sd[p + "attn.c_attn.weight"] = torch.cat([w_qk, w_v], dim=1).float()
            sd[p + "attn.c_attn.bias"] = (attn.bias.detach().double() + beta @ w).float()
            fc = block.mlp.c_fc
            g2, beta2 = ln2.weight.detach().double(), ln2.bias.detach().double()
            sd[p + "mlp.c_fc.weight"] = fold_scale_into_rows(
                fc.weight.detach().double(), g2 / ln2.sigma.double()).float()
            sd[p + "mlp.c_fc.bias"] = (fc.bias.detach().double()
                                       + beta2 @ fc.weight.detach().double()).float()
        # ln_f cannot fold into the tied embedding: the clean model gets its own unembedding
        ln_f = self.model.transformer.ln_f
        w_e = self.model.lm_head.weight.detach().double()  # [vocab, d]
        w_u = fold_scale_into_rows(w_e.T, ln_f.weight.detach().double() / ln_f.sigma.double())
        sd["lm_head.weight"] = w_u.T.contiguous().float()
        sd["lm_head.bias"] = (w_e @ ln_f.bias.detach().double()).float()
        return sd

    @staticmethod
    def build_clean_model(config) -> nn.Module:
        config.tie_word_embeddings = False
        model = GPT2LMHeadModel(config)
        for block in model.transformer.h:
            block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
        model.transformer.ln_f = nn.Identity()
        model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=True)
        return model

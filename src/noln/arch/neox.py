"""GPT-NeoX / Pythia: four removal sites per block layout. Roles: ``mlp_in`` is
``post_attention_layernorm``, ``attn_in_qk`` / ``attn_in_v`` are ``input_layernorm`` as read by
Q/K and by V, ``final`` is ``final_layer_norm`` (old site names ``ln_post``, ``ln_in_qk``,
``ln_in_v``, ``ln_f`` are aliases).

A GPT-NeoX layer reads its residual through two LayerNorms: ``input_layernorm`` feeds attention,
``post_attention_layernorm`` feeds the MLP. With ``use_parallel_residual`` (Pythia's default)
both read the same residual; without it the MLP's norm reads the residual after attention.
Either way each norm feeds exactly one layer, so the folding is the same.

As for GPT-2, ``input_layernorm`` becomes a ``SplitLayerNorm`` (Q/K and V sites over the same
weight) and ``attention.query_key_value`` a ``NeoXSplitQKV``. The fused projection's output is
per head ``[q, k, v]`` (transformers views it as ``[..., heads, 3 * head_size]``), so the Q/K
rows are the first two thirds of every head's block, not of the whole output.

The unembedding ``lm_head`` (``embed_out`` in old checkpoints) is untied from the embedding in
Pythia, so the final norm folds straight into it; a clean export still gives it a bias (from
the norm's beta). Rotary embeddings act after the projection and are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

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


def qk_v_rows(n_heads: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the fused ``query_key_value`` weight ``[3d, d]`` that make Q/K and V."""
    j = torch.arange(3 * head_size)
    base = torch.arange(n_heads)[:, None] * 3 * head_size
    qk = (base + j[: 2 * head_size]).flatten()
    v = (base + j[2 * head_size :]).flatten()
    return qk, v


class NeoXSplitQKV(nn.Module):
    """GPT-NeoX's fused ``query_key_value`` (Linear ``[3d, d]``) taking Q/K and V inputs apart:
    a ``2d``-wide input is ``[Q/K input, V input]``; a ``d``-wide one is the plain Linear."""

    def __init__(self, linear: nn.Linear, n_heads: int):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features = linear.in_features
        self.n_heads = n_heads
        self.head_size = linear.out_features // (3 * n_heads)
        qk, v = qk_v_rows(n_heads, self.head_size)
        self.register_buffer("qk_rows", qk, persistent=False)
        self.register_buffer("v_rows", v, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.in_features
        if x.shape[-1] == d:
            return F.linear(x, self.weight, self.bias)
        b = self.bias
        qk = F.linear(x[..., :d], self.weight[self.qk_rows],
                      None if b is None else b[self.qk_rows])
        v = F.linear(x[..., d:], self.weight[self.v_rows], None if b is None else b[self.v_rows])
        lead, hs = x.shape[:-1], self.head_size
        out = torch.cat([qk.view(*lead, self.n_heads, 2 * hs), v.view(*lead, self.n_heads, hs)],
                        dim=-1)
        return out.view(*lead, 3 * d)


class NeoXAdapter(NormAdapter):
    family = "neox"
    model_types = ("gpt_neox",)
    layout = Layout("gpt_neox.layers", "gpt_neox.final_layer_norm")
    mlp_neurons = MlpNeurons(make=(("mlp.dense_h_to_4h.weight", 0), ("mlp.dense_h_to_4h.bias", 0)),
                             write=("mlp.dense_4h_to_h.weight", 1))
    block_kinds = (MLP_IN, ATTN_IN_QK, ATTN_IN_V)
    aliases = {"ln_post": MLP_IN, "ln_in_qk": ATTN_IN_QK, "ln_in_v": ATTN_IN_V, "ln_f": FINAL}

    @staticmethod
    def build_small_model(vocab_size: int, n_layer: int, d_model: int, n_head: int, ctx: int,
                          eot_id: int) -> nn.Module:
        # Pythia's shape: parallel residual, rotary on a quarter of each head, untied unembedding
        config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model,
                               num_hidden_layers=n_layer, num_attention_heads=n_head,
                               intermediate_size=4 * d_model, max_position_embeddings=ctx,
                               rotary_pct=0.25, rotary_emb_base=10000, hidden_dropout=0.0,
                               attention_dropout=0.0, use_parallel_residual=True,
                               tie_word_embeddings=False, bos_token_id=eot_id,
                               eos_token_id=eot_id)
        return GPTNeoXForCausalLM(config)

    def install(self) -> None:
        n_heads = self.model.config.num_attention_heads
        for layer in self.layers:
            if not isinstance(layer.input_layernorm, SplitLayerNorm):
                layer.input_layernorm = SplitLayerNorm(layer.input_layernorm, self.momentum)
                layer.attention.query_key_value = NeoXSplitQKV(
                    layer.attention.query_key_value, n_heads)
            if not isinstance(layer.post_attention_layernorm, FakeNorm):
                layer.post_attention_layernorm = FakeLayerNorm.from_layernorm(
                    layer.post_attention_layernorm, self.momentum)
        base = self.model.gpt_neox
        if not isinstance(base.final_layer_norm, FakeNorm):
            base.final_layer_norm = FakeLayerNorm.from_layernorm(base.final_layer_norm,
                                                                 self.momentum)

    def collect_sites(self) -> list[Site]:
        sites = [Site(FINAL, FINAL, None, self.model.gpt_neox.final_layer_norm)]
        for i, layer in enumerate(self.layers):
            sites += [Site(f"blocks.{i}.{role}", role, i, norm) for role, norm in (
                (MLP_IN, layer.post_attention_layernorm), (ATTN_IN_QK, layer.input_layernorm.qk),
                (ATTN_IN_V, layer.input_layernorm.v))]
        return sites

    # -- exports ---------------------------------------------------------------------------
    @property
    def _has_attention_bias(self) -> bool:
        return self.layers[0].attention.query_key_value.bias is not None

    def hf_config_overrides(self) -> dict:
        if self.export_state() != "all":
            return {}
        # the Q/K-vs-V correction needs a bias on query_key_value (Pythia has one)
        return {"layer_norm_eps": EPS_TRICK,
                **({} if self._has_attention_bias else {"attention_bias": True})}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.require_export_state(("none", "all"))
        sd = self.plain_state_dict()
        if state == "none":
            return sd
        cfg = self.model.config
        qk_rows, _ = qk_v_rows(cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)
        for i, layer in enumerate(self.layers):
            p = f"gpt_neox.layers.{i}."
            ln_in = layer.input_layernorm
            g, beta = ln_in.weight.detach().double(), ln_in.bias.detach().double()
            s_qk, s_v = ln_in.qk.sigma.double(), ln_in.v.sigma.double()
            sd[p + "input_layernorm.weight"] = (g * EPS_SCALE / s_v).float()
            # the norm now emits the V path's scale; Q/K rows take the ratio and a bias fix:
            # W((x-mu) g/s_qk + beta) = r W((x-mu) g/s_v + beta) + (1-r) W beta, r = s_v/s_qk
            r = s_v / s_qk
            qkv = layer.attention.query_key_value
            w = qkv.weight.detach().double().clone()
            b = (qkv.bias.detach().double().clone() if qkv.bias is not None
                 else torch.zeros(w.shape[0], dtype=torch.float64))
            b[qk_rows] += (1 - r) * (w[qk_rows] @ beta)
            w[qk_rows] *= r
            sd[p + "attention.query_key_value.weight"] = w.float()
            sd[p + "attention.query_key_value.bias"] = b.float()
            if layer.attention.dense.bias is None:  # attention_bias=True adds it: zero
                sd[p + "attention.dense.bias"] = torch.zeros(cfg.hidden_size)
            ln_post = layer.post_attention_layernorm
            sd[p + "post_attention_layernorm.weight"] = (
                ln_post.weight.detach().double() * EPS_SCALE / ln_post.sigma).float()
        ln_f = self.model.gpt_neox.final_layer_norm
        sd["gpt_neox.final_layer_norm.weight"] = (ln_f.weight.detach().double() * EPS_SCALE
                                                  / ln_f.sigma).float()
        return sd

    def clean_state_dict(self) -> dict[str, torch.Tensor]:
        self.require_export_state(("all",))
        norm_keys = ("input_layernorm", "post_attention_layernorm", "final_layer_norm")
        sd = {k: v for k, v in self.plain_state_dict().items()
              if not any(n in k for n in norm_keys)}
        cfg = self.model.config
        qk_rows, v_rows = qk_v_rows(cfg.num_attention_heads,
                                    cfg.hidden_size // cfg.num_attention_heads)
        for i, layer in enumerate(self.layers):
            p = f"gpt_neox.layers.{i}."
            ln_in, ln_post = layer.input_layernorm, layer.post_attention_layernorm
            qkv = layer.attention.query_key_value
            g, beta = ln_in.weight.detach().double(), ln_in.bias.detach().double()
            w = qkv.weight.detach().double()  # [3d, d]
            folded = torch.empty_like(w)
            for rows, sigma in ((qk_rows, ln_in.qk.sigma), (v_rows, ln_in.v.sigma)):
                folded[rows] = fold_scale_into_rows(w[rows].T, g / sigma.double()).T
            bias = qkv.bias.detach().double() if qkv.bias is not None else 0.0
            sd[p + "attention.query_key_value.weight"] = folded.float()
            sd[p + "attention.query_key_value.bias"] = (bias + w @ beta).float()
            fc = layer.mlp.dense_h_to_4h
            g2, beta2 = ln_post.weight.detach().double(), ln_post.bias.detach().double()
            w_fc = fc.weight.detach().double()
            sd[p + "mlp.dense_h_to_4h.weight"] = fold_scale_into_rows(
                w_fc.T, g2 / ln_post.sigma.double()).T.contiguous().float()
            sd[p + "mlp.dense_h_to_4h.bias"] = (fc.bias.detach().double() + w_fc @ beta2).float()
        ln_f = self.model.gpt_neox.final_layer_norm
        w_u = self.model.lm_head.weight.detach().double()  # [vocab, d]; untied in Pythia
        sd["lm_head.weight"] = fold_scale_into_rows(
            w_u.T, ln_f.weight.detach().double() / ln_f.sigma.double()).T.contiguous().float()
        sd["lm_head.bias"] = (w_u @ ln_f.bias.detach().double()).float()
        return sd

    @staticmethod
    def build_clean_model(config) -> nn.Module:
        config.tie_word_embeddings = False
        model = GPTNeoXForCausalLM(config)
        d = config.hidden_size
        for layer in model.gpt_neox.layers:
            layer.input_layernorm = nn.Identity()
            layer.post_attention_layernorm = nn.Identity()
            if layer.attention.query_key_value.bias is None:  # folding beta gives it a bias
                layer.attention.query_key_value = nn.Linear(d, 3 * d, bias=True)
        model.gpt_neox.final_layer_norm = nn.Identity()
        model.lm_head = nn.Linear(d, config.vocab_size, bias=True)
        return model

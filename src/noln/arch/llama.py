"""Llama-style RMSNorm models: Llama, Mistral, Qwen2, Qwen3 (``model.layers[i]`` with
``input_layernorm`` -> ``self_attn`` -> ``post_attention_layernorm`` -> ``mlp``, ``model.norm``).

Sites per block, in removal order, by role: ``mlp_in`` (``post_attention_layernorm``, before
the MLP), ``attn_in_qk`` (``input_layernorm`` as read by ``q_proj``/``k_proj``), ``attn_in_v``
(read by ``v_proj``) and, for Qwen3, ``q_norm`` and ``k_norm`` (RMSNorm over ``head_dim`` of
each query / key head, after the projection); then ``final`` (``model.norm``). The old site
names ``post_attention_layernorm``, ``input_layernorm_qk``, ``input_layernorm_v`` and ``norm``
are aliases.
A FakeRMSNorm has no mean subtraction; its sigma is the EMA of the per-token RMS
``sqrt(mean(x^2) + eps)`` (per token and head for ``q_norm``/``k_norm``).

To freeze ``input_layernorm`` separately for Q/K and V, it becomes ``SplitRMSNorm`` (two
FakeRMSNorms over the same weight) and the three projections become ``PathLinear``: with
both sites live the norm returns the d-wide tensor and every projection reads it as is; once
either is frozen it returns ``cat([qk_path, v_path], -1)`` (2d wide) and ``q_proj``/``k_proj``
read the first half, ``v_proj`` the second. The attention only uses ``shape[:-1]`` of its input,
so grouped-query attention and biases (Qwen2) need nothing more. State-dict keys keep the
original names, plus ``input_layernorm.{qk,v}.*`` and the ``sigma``/``is_frozen`` buffers.

Exports (``rms_norm_eps`` is one config value shared by every norm, ``q_norm``/``k_norm``
included):

- ``hf`` with every site frozen, the eps trick. HF computes
  ``RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w``; with ``eps = 1e12`` and ``w = g * 1e6 / sigma``
  that is ``x * g / sigma * (1 + mean(x^2) / 1e12) ** -0.5 ~= x * g / sigma`` (relative error
  ``~ mean(x^2) / 2e12``). ``input_layernorm`` takes the V path's sigma; ``q_proj``/``k_proj``
  weights are multiplied by ``sigma_v / sigma_qk`` (no norm bias, so nothing else changes).
- ``clean``: every norm module is ``nn.Identity``; ``g / sigma`` is folded into the input columns
  of the layers reading the norm (``q/k/v_proj``, ``gate/up_proj``, ``lm_head``), and
  ``q_norm``/``k_norm``'s ``g / sigma``, tiled over heads, into the output rows (and bias) of
  ``q_proj``/``k_proj``. No centring: RMSNorm never subtracted the mean. ``lm_head`` gets its
  own weight (untied), since the final norm cannot fold into a tied embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from noln.arch.base import (
    ATTN_IN_QK,
    ATTN_IN_V,
    EPS_SCALE,
    EPS_TRICK,
    FINAL,
    K_NORM,
    MLP_IN,
    Q_NORM,
    Layout,
    MlpNeurons,
    NormAdapter,
    Site,
    SplitNorm,
)
from noln.fakenorm import FakeNorm, FakeRMSNorm

BLOCK_KINDS = (MLP_IN, ATTN_IN_QK, ATTN_IN_V)
QK_NORM_KINDS = (Q_NORM, K_NORM)  # roles named as the attention's own modules


class SplitRMSNorm(SplitNorm):
    """``input_layernorm`` as two removal sites (Q/K path and V path); see the module docstring."""

    def __init__(self, norm: nn.Module, momentum: float):
        super().__init__(FakeRMSNorm.from_rmsnorm(norm, momentum),
                         FakeRMSNorm.from_rmsnorm(norm, momentum))


class PathLinear(nn.Linear):
    """A projection reading one path of ``SplitRMSNorm``'s output: the first ``in_features``
    columns (``path='qk'``) or the last (``path='v'``) of a 2d-wide input; a d-wide input as is."""

    def __init__(self, linear: nn.Linear, path: str):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.in_features
        if x.shape[-1] != d:
            x = x[..., :d] if self.path == "qk" else x[..., d:]
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, path={self.path}"


def _w(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


class LlamaAdapter(NormAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layout = Layout("model.layers", "model.norm")
    # SwiGLU: down(silu(gate x) * up x)
    mlp_neurons = MlpNeurons(make=(("mlp.gate_proj.weight", 0), ("mlp.up_proj.weight", 0)),
                             write=("mlp.down_proj.weight", 1))
    block_kinds = BLOCK_KINDS  # + q_norm, k_norm where the attention has them (Qwen3)
    aliases = {"post_attention_layernorm": MLP_IN, "input_layernorm_qk": ATTN_IN_QK,
               "input_layernorm_v": ATTN_IN_V, "norm": FINAL}

    @property
    def has_qk_norm(self) -> bool:
        return all(hasattr(layer.self_attn, "q_norm") for layer in self.layers)

    @staticmethod
    def build_small_model(vocab_size: int, n_layer: int, d_model: int, n_head: int, ctx: int,
                          eot_id: int) -> nn.Module:
        """A Llama with grouped-query attention (half as many K/V heads, when even), SwiGLU
        width ~8/3 d (a multiple of 32) and an untied unembedding."""
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model,
                             intermediate_size=32 * math.ceil(8 * d_model / 3 / 32),
                             num_hidden_layers=n_layer, num_attention_heads=n_head,
                             num_key_value_heads=n_head // 2 if n_head % 2 == 0 else n_head,
                             max_position_embeddings=ctx, bos_token_id=eot_id,
                             eos_token_id=eot_id, pad_token_id=None, tie_word_embeddings=False,
                             attention_dropout=0.0)
        return LlamaForCausalLM(config)

    def install(self) -> None:
        for layer in self.layers:
            attn = layer.self_attn
            if not isinstance(layer.input_layernorm, SplitRMSNorm):
                layer.input_layernorm = SplitRMSNorm(layer.input_layernorm, self.momentum)
                attn.q_proj = PathLinear(attn.q_proj, "qk")
                attn.k_proj = PathLinear(attn.k_proj, "qk")
                attn.v_proj = PathLinear(attn.v_proj, "v")
            if not isinstance(layer.post_attention_layernorm, FakeNorm):
                layer.post_attention_layernorm = FakeRMSNorm.from_rmsnorm(
                    layer.post_attention_layernorm, self.momentum)
            for name in QK_NORM_KINDS:
                norm = getattr(attn, name, None)
                if isinstance(norm, nn.Module) and not isinstance(norm, FakeNorm):
                    setattr(attn, name, FakeRMSNorm.from_rmsnorm(norm, self.momentum))
        if not isinstance(self.model.model.norm, FakeNorm):
            self.model.model.norm = FakeRMSNorm.from_rmsnorm(self.model.model.norm, self.momentum)
        self.block_kinds = BLOCK_KINDS + (QK_NORM_KINDS if self.has_qk_norm else ())

    def collect_sites(self) -> list[Site]:
        sites = [Site(FINAL, FINAL, None, self.model.model.norm)]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            sites += [Site(f"blocks.{i}.{role}", role, i, norm) for role, norm in (
                (MLP_IN, layer.post_attention_layernorm), (ATTN_IN_QK, layer.input_layernorm.qk),
                (ATTN_IN_V, layer.input_layernorm.v))]
            if self.has_qk_norm:
                sites += [Site(f"blocks.{i}.{k}", k, i, getattr(attn, k)) for k in QK_NORM_KINDS]
        return sites

    # -- exports ---------------------------------------------------------------------------
    def hf_config_overrides(self) -> dict:
        return {"rms_norm_eps": EPS_TRICK} if self.export_state() == "all" else {}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Real norms if nothing is frozen; else the eps trick: ``rms_norm_eps = 1e12`` and
        every norm weight ``g * 1e6 / sigma``, so ``x / sqrt(mean(x^2) + 1e12) * g * 1e6 / sigma
        ~= x * g / sigma``; ``q_proj``/``k_proj`` carry ``sigma_v / sigma_qk``."""
        state = self.require_export_state(("none", "all"))
        sd = self.plain_state_dict()
        if state == "none":
            return sd

        def trick(norm: FakeNorm) -> torch.Tensor:
            return (_w(norm.weight) * EPS_SCALE / norm.sigma.double()).float()

        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            ln, attn = layer.input_layernorm, layer.self_attn
            sd[p + "input_layernorm.weight"] = trick(ln.v)
            ratio = ln.v.sigma.double() / ln.qk.sigma.double()
            for proj in ("q_proj", "k_proj"):
                sd[p + f"self_attn.{proj}.weight"] = (_w(getattr(attn, proj).weight)
                                                      * ratio).float()
            sd[p + "post_attention_layernorm.weight"] = trick(layer.post_attention_layernorm)
            if self.has_qk_norm:
                for k in QK_NORM_KINDS:
                    sd[p + f"self_attn.{k}.weight"] = trick(getattr(attn, k))
        sd["model.norm.weight"] = trick(self.model.model.norm)
        return sd

    def clean_state_dict(self) -> dict[str, torch.Tensor]:
        self.require_export_state(("all",))
        norm_keys = ("input_layernorm.weight", "post_attention_layernorm.weight",
                     "q_norm.weight", "k_norm.weight")
        sd = {k: v for k, v in self.plain_state_dict().items()
              if not k.endswith(norm_keys) and k != "model.norm.weight"}

        def scale(norm: FakeNorm) -> torch.Tensor:
            return _w(norm.weight) / norm.sigma.double()

        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            ln, attn, mlp = layer.input_layernorm, layer.self_attn, layer.mlp
            for proj, site in (("q_proj", ln.qk), ("k_proj", ln.qk), ("v_proj", ln.v)):
                lin = getattr(attn, proj)
                w = _w(lin.weight) * scale(site)[None, :]  # the norm before: input columns
                b = _w(lin.bias) if lin.bias is not None else None
                head_norm = getattr(attn, proj[0] + "_norm", None) if proj != "v_proj" else None
                if head_norm is not None:  # the per-head norm after: output rows (and bias)
                    rows = scale(head_norm).repeat(w.shape[0] // head_norm.weight.numel())
                    w = w * rows[:, None]
                    b = b * rows if b is not None else None
                sd[p + f"self_attn.{proj}.weight"] = w.float()
                if b is not None:
                    sd[p + f"self_attn.{proj}.bias"] = b.float()
            for proj in ("gate_proj", "up_proj"):
                sd[p + f"mlp.{proj}.weight"] = (_w(getattr(mlp, proj).weight) * scale(
                    layer.post_attention_layernorm)[None, :]).float()
        w_u = _w(self.model.lm_head.weight) * scale(self.model.model.norm)[None, :]
        sd["lm_head.weight"] = w_u.float().contiguous()
        return sd

    @staticmethod
    def build_clean_model(config) -> nn.Module:
        config.tie_word_embeddings = False
        model = AutoModelForCausalLM.from_config(config)
        for layer in model.model.layers:
            layer.input_layernorm = nn.Identity()
            layer.post_attention_layernorm = nn.Identity()
            for k in QK_NORM_KINDS:
                if hasattr(layer.self_attn, k):
                    setattr(layer.self_attn, k, nn.Identity())
        model.model.norm = nn.Identity()
        return model

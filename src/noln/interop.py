"""Hand a no-LN model to other interpretability tools, offline.

- ``to_transformer_lens``: a TransformerLens 3.x ``HookedTransformer`` with no norm at all.
  METHODS.md's recipe, "fold, then identity": load with ``fold_ln=True`` (every fixed norm scale
  and bias folded into the weights that read the residual stream, which TransformerLens also
  centres), ``center_unembed=False`` (logits stay the model's own), ``center_writing_weights=
  False`` (the residual stream stays the model's own), then drop every norm
  (``normalization_type=None``). Dropping the mean subtraction is exact because every reading
  weight is centred. Per-head query/key norms (Qwen3) are fixed diagonal maps: folded into
  ``W_Q``/``W_K``. The config comes from the model's own Hugging Face config through
  TransformerLens's converter, written to a temporary folder: nothing is fetched from the Hub.
- ``to_nnsight``: an nnsight model (``TransformersModel`` with the text-generation task, what
  nnsight 0.8 calls ``LanguageModel``) over the model itself, offline.

Both take a folder (noln ``hf`` or ``clean`` export, a run folder, any Hugging Face folder) or a
model object. The eps trick of the ``hf`` export (norm weight ``gamma * sqrt(eps) / sigma`` with
``eps = 1e12``) is undone exactly: TransformerLens gets ``gamma / sigma``.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from noln.arch import install, transformer_lens_config_keys
from noln.errors import NolnError
from noln.export import clean_model, plain_model
from noln.fakenorm import FakeNorm
from noln.linearity.replace import META_FILE, AffineBlock, SkipBlock, is_linearized
from noln.loading import load_model, load_tokenizer
from noln.pretrained import read_json

EPS_TRICK_MIN = 1e6  # a norm eps this large means the eps trick: a fixed scale, not a norm
TL_NORM_WEIGHTS = (".ln1.w", ".ln2.w", "ln_final.w")  # TransformerLens's names, every family


@dataclass
class Plain:
    """A model as the family's plain Hugging Face class with its norm modules, and what they are.

    ``norms``: ``"live"`` (a model with LayerNorm), ``"fixed"`` (eps trick: each norm is the fixed
    scale ``weight / sqrt(eps)``), or ``"none"`` (a clean model: ``model`` has unit norms and
    ``unembed_bias`` holds the clean unembedding bias). ``source`` is the model whose logits a
    conversion must reproduce (the clean model itself for ``"none"``).
    """

    model: nn.Module
    source: nn.Module
    tokenizer: object | None
    norms: str
    name: str
    unembed_bias: torch.Tensor | None = None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, FakeNorm) or "norm" in type(module).__name__.lower()


def _norm_params(model: nn.Module) -> set[str]:
    return {f"{name}.{p}" if name else p for name, m in model.named_modules() if _is_norm(m)
            for p, _ in m.named_parameters(recurse=False)}


def _load(model_or_dir, tokenizer) -> tuple[nn.Module, object | None, str]:
    if isinstance(model_or_dir, nn.Module):
        source = str(getattr(model_or_dir.config, "_name_or_path", "") or "")
        if tokenizer is None and source and Path(source).is_dir():  # the folder it came from
            try:
                tokenizer = load_tokenizer(source)
            except NolnError:
                pass
        return model_or_dir, tokenizer, Path(source).name or "model"

    path = Path(str(model_or_dir)).expanduser()
    model, tok = load_model(str(model_or_dir))
    return model, tokenizer or tok, path.name or str(model_or_dir)


def _unfold_clean(model: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
    """A clean model (no norm modules) as its plain class with unit norms, and the unembedding
    bias that the plain class has no room for."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    plain = AutoModelForCausalLM.from_config(config).to(next(model.parameters()).dtype)
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    bias = getattr(head, "bias", None)
    state = {k: v for k, v in model.state_dict().items() if k != f"{head_name}.bias"}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = set(missing) - _norm_params(plain)
    if unexpected or missing:
        raise NolnError(f"cannot map this norm-free {type(model).__name__} onto its plain class "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): "
                        "pass the hf export or the run folder instead")
    with torch.no_grad():
        for m in plain.modules():
            if _is_norm(m):
                for p, t in m.named_parameters(recurse=False):
                    t.fill_(1.0 if p == "weight" else 0.0)
    return plain.eval(), None if bias is None else bias.detach().clone()


def plain_view(model_or_dir, tokenizer=None) -> Plain:
    """Any model noln can load, as its plain Hugging Face class with real norm modules."""
    model, tok, name = _load(model_or_dir, tokenizer)
    if any(isinstance(m, FakeNorm) for m in model.modules()):  # a run's model (FakeNorms)
        adapter = install(model)
        state = adapter.require_export_state(("none", "all"))
        if state == "none":
            plain = plain_model(adapter)
            return Plain(plain, plain, tok, "live", name)
        model = clean_model(adapter)
    model.eval()
    if not any(_is_norm(m) for m in model.modules()):  # clean: norms folded away
        plain, bias = _unfold_clean(model)
        return Plain(plain, model, tok, "none", name, bias)
    norms = "fixed" if _norm_eps(model) >= EPS_TRICK_MIN else "live"
    return Plain(model, model, tok, norms, name)


def _norm_eps(model: nn.Module) -> float:
    """The eps of the model's norm modules (the eps trick sets them all alike)."""
    eps = [float(getattr(m, "eps", getattr(m, "variance_epsilon", 0.0)) or 0.0)
           for m in model.modules() if _is_norm(m)]
    return min(eps) if eps else 0.0


# ----------------------------------------------------------------------------- TransformerLens


def _transformer_lens():
    try:
        version = metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        raise NolnError("TransformerLens is not installed: pip install 'transformer-lens<4' "
                        "(or noln's extra: pip install 'noln[interop]')") from None
    major = int(version.split(".")[0])
    if major != 3:
        raise NolnError(f"noln.to_transformer_lens needs TransformerLens 3.x, found {version}: "
                        + ("TransformerLens 4 removed HookedTransformer (it became "
                           "TransformerBridge); " if major >= 4 else "")
                        + "pip install 'transformer-lens>=3,<4'")
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    return HookedTransformer, loading


def check_transformer_lens_model(model_or_dir) -> None:
    """Refuse a model with blocks that ``noln linearize`` replaced by linear maps (or dropped):
    TransformerLens builds every block from the family's attention and MLP weights, which such a
    block has none of. A folder is told by its ``linearized.json``, so nothing loads first."""
    if isinstance(model_or_dir, nn.Module):
        if not any(isinstance(m, AffineBlock | SkipBlock) for m in model_or_dir.modules()):
            return
        where, base = "this model", None
    else:
        path = Path(str(model_or_dir)).expanduser()
        if not is_linearized(path):
            return
        meta = read_json(path / META_FILE)
        where = f"'{model_or_dir}'"
        base = path / meta["base_copy"] if meta.get("base_copy") else meta.get("base_model")
    raise NolnError(f"{where} has blocks replaced by linear maps (noln linearize), which "
                    "TransformerLens cannot represent: attribute or convert the model before "
                    "linearizing instead" + (f" (its base model, '{base}')" if base else ""))


def _tl_config(plain: nn.Module, loading, tmp: Path, device, dtype):
    """TransformerLens's config for ``plain``, from its HF config saved in ``tmp`` (offline)."""
    config = plain.config.to_dict()
    if not config.get("architectures"):
        config["architectures"] = [type(plain).__name__]
    # keys TransformerLens reads that transformers no longer writes (GPT-2's ``n_ctx``)
    for key, value in transformer_lens_config_keys(config).items():
        config.setdefault(key, value)
    (tmp / "config.json").write_text(json.dumps(config))
    try:
        return loading.get_pretrained_model_config(str(tmp), hf_cfg=config, fold_ln=True,
                                                   device=device, dtype=dtype)
    except (ValueError, KeyError, AttributeError, NotImplementedError) as e:
        raise NolnError(f"TransformerLens cannot convert a {config['architectures'][0]} "
                        f"({type(e).__name__}: {str(e)[:150]})") from None


def hooked_transformer(model_or_dir, *, tokenizer=None, device: str | torch.device | None = None,
                       dtype: torch.dtype = torch.float32, allow_ln: bool = False,
                       check: bool = True):
    """``to_transformer_lens``, also for a model that still has its LayerNorm when ``allow_ln``
    (then loaded as TransformerLens loads it, ``fold_ln=True``: norms stay as ``LNPre``, a
    centring and a division by the token's own scale, with the same centring choices as the
    no-LN case). Returns the ``HookedTransformer``; ``model.cfg.normalization_type`` is ``None``
    exactly when the model has no norm."""
    check_transformer_lens_model(model_or_dir)  # before TransformerLens and the model load
    HookedTransformer, loading = _transformer_lens()
    view = plain_view(model_or_dir, tokenizer)
    if view.norms == "live" and not allow_ln:
        raise NolnError(f"'{view.name}' still has its LayerNorm (norm eps "
                        f"{_norm_eps(view.model):g}): to_transformer_lens takes a no-LN model (a "
                        "noln export, a finished run folder); load a model with LayerNorm with "
                        "HookedTransformer's own loader")
    plain = view.model
    device = device if device is not None else next(plain.parameters()).device
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _tl_config(plain, loading, Path(tmp), device, dtype)
        state = loading.get_pretrained_state_dict(tmp, cfg, plain, dtype=dtype)
    state = {k: v.detach().clone() for k, v in state.items()}
    if view.norms == "fixed":  # eps trick: norm(x) ~ (x - mean) * w / sqrt(eps), exactly so here
        scale = math.sqrt(cfg.eps)
        for k in state:
            if k.endswith(TL_NORM_WEIGHTS):
                state[k] = (state[k].double() / scale).to(state[k].dtype)
    if view.norms != "live" and getattr(cfg, "use_qk_norm", False):
        _fold_qk_norms(state, math.sqrt(cfg.eps) if view.norms == "fixed" else 1.0)
        cfg.use_qk_norm = False
    cfg.model_name = view.name
    cfg.tokenizer_name = None  # never fetch a tokenizer; the model's own is passed in
    with warnings.catch_warnings():  # 3.x deprecates HookedTransformer in favour of 4.x's bridge
        warnings.simplefilter("ignore", DeprecationWarning)
        tl = HookedTransformer(cfg, tokenizer=view.tokenizer, move_to_device=False)
    tl.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=True)
    if view.norms != "live":
        _drop_norms(tl)
        if view.unembed_bias is not None:
            with torch.no_grad():
                tl.unembed.b_U += view.unembed_bias.to(tl.unembed.b_U)
    tl.to(device, print_details=False).eval()
    if check:
        _check_logits(tl, view)
    return tl


def to_transformer_lens(model_or_dir, *, tokenizer=None, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, check: bool = True):
    """A TransformerLens 3.x ``HookedTransformer`` of a no-LN model: every norm an identity
    (``cfg.normalization_type = None``, so ``ActivationCache.apply_ln_to_stack`` is a no-op),
    logits equal to the model's (``check`` verifies that on a probe input), nothing fetched.

    ``model_or_dir``: a noln ``hf`` or ``clean`` export folder, a finished run folder, or a model
    object (the run's model with frozen FakeNorms, ``noln.load_clean``'s model, an ``hf``
    export). Raises ``NolnError`` for a model that still has LayerNorm, for one with blocks
    replaced by linear maps (``noln linearize``), and for TransformerLens 4.x (which removed
    ``HookedTransformer``: install ``transformer-lens<4``)."""
    return hooked_transformer(model_or_dir, tokenizer=tokenizer, device=device, dtype=dtype,
                              check=check)


def _fold_qk_norms(state: dict[str, torch.Tensor], scale: float) -> None:
    """Per-head query/key norms (Qwen3's ``q_norm`` / ``k_norm``) at a fixed scale are a
    diagonal map on each head's query or key: fold ``w / scale`` into ``W_Q``/``b_Q`` (``W_K``/
    ``b_K``, ``_W_K`` under grouped-query attention) and drop them."""
    for key in [k for k in state if k.endswith(("attn.q_norm.w", "attn.k_norm.w"))]:
        prefix, which = key[: -len("q_norm.w")], key[-len("q_norm.w")].upper()
        diag = state.pop(key).double() / scale  # [d_head]
        for name in (f"W_{which}", f"_W_{which}", f"b_{which}", f"_b_{which}"):
            if prefix + name in state:
                t = state[prefix + name]
                state[prefix + name] = (t.double() * diag).to(t.dtype)


def _drop_norms(tl) -> None:
    """Fold, then identity: the folded ``LNPre``/``RMSPre`` modules go, nothing replaces them."""
    tl.cfg.normalization_type = None
    for block in tl.blocks:
        block.normalization_type = None
        block.ln1 = nn.Identity()
        if hasattr(block, "ln2"):
            block.ln2 = nn.Identity()
    if hasattr(tl, "ln_final"):
        del tl.ln_final
    tl.setup()  # rebuild the hook dictionary without the norms' hook points


def _check_logits(tl, view: Plain) -> None:
    """The converted model must give the source model's logits on a probe input (to float32
    rounding; an eps-trick source is itself off by ~var/2e12 relative)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, tl.cfg.d_vocab, (1, min(tl.cfg.n_ctx, 16)), generator=gen)
    device = next(view.source.parameters()).device
    with torch.no_grad():
        want = view.source(tokens.to(device)).logits.double().cpu()
        got = tl(tokens.to(tl.cfg.device)).double().cpu()
    err = (got - want).abs().max().item()
    rtol = 1e-4 if tl.cfg.dtype in (torch.float32, torch.float64) else 3e-2  # bf16 / fp16
    if not err <= rtol * max(1.0, want.abs().max().item()):
        raise NolnError(f"TransformerLens's conversion of '{view.name}' does not reproduce its "
                        f"logits (max difference {err:.3g}): this model family is not supported "
                        "by noln.to_transformer_lens yet")


# ----------------------------------------------------------------------------- nnsight


def to_nnsight(model_or_dir, *, tokenizer=None):
    """An nnsight model over the no-LN model (offline: the loaded model and its tokenizer are
    handed to nnsight). nnsight 0.8's ``TransformersModel(..., task="text-generation")``, which
    0.8 prefers to its deprecated ``LanguageModel`` alias (used for older nnsight).

    A run folder or a run's model with every FakeNorm frozen becomes its clean model first (no
    norm module; module paths are the family's own, e.g. ``model.transformer.h[3]``); exports
    and other models are wrapped as loaded."""
    try:
        import nnsight  # noqa: F401
    except ImportError:
        raise NolnError("nnsight is not installed: pip install nnsight (or noln's extra: "
                        "pip install 'noln[interop]')") from None

    model, tok, _ = _load(model_or_dir, tokenizer)
    if any(isinstance(m, FakeNorm) for m in model.modules()):
        adapter = install(model)
        if adapter.require_export_state(("none", "all")) == "all":
            model = clean_model(adapter)
    if tok is None:
        raise NolnError("to_nnsight needs a tokenizer: pass tokenizer= with a model object")
    try:
        from nnsight import TransformersModel
    except ImportError:  # nnsight < 0.8
        from nnsight import LanguageModel

        return LanguageModel(model.eval(), tokenizer=tok)
    return TransformersModel(model.eval(), tokenizer=tok, task="text-generation")

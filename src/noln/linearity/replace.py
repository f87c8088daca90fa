"""Replace transformer blocks by affine maps (the pruning experiment of "Your Transformer is
Secretly Linear").

A block ``h -> block(h)`` becomes ``h -> h A + b`` with ``A`` (d x d) and ``b`` the least-squares
fit on the model's own hidden states: a closed form in the same float64 moments the linearity
score uses. Optionally the maps are then distilled, training only them, with a layer-wise MSE
against the original model's block outputs (so a map can also correct what earlier replacements
broke). ``greedy_linearize`` replaces the most linear block (highest held-out with-residual
score, re-scored on the partly linearised model) one at a time and reports the cross-entropy of
three variants after each step: drop the blocks, linear maps, linear maps + distillation.

A linearised model is the base model with some entries of its decoder-layer list swapped for
``AffineBlock`` (or ``SkipBlock``) modules. It saves as a folder: ``linearized.json`` (base model
reference and which layers are replaced), ``maps.safetensors`` and the tokenizer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from noln.arch import decoder_layers
from noln.data import check_blocks
from noln.errors import NolnError
from noln.evaluate.loss import cross_entropy, model_device
from noln.linearity.score import (
    RCOND,
    StreamingMoments,
    check_tokens,
    halves,
    hidden_size,
    lstsq_map,
    score_pairs,
    token_batches,
)
from noln.outputs import save_figure
from noln.pretrained import load_tokenizer, read_json

FORMAT = "noln-linearized"
META_FILE = "linearized.json"
MAPS_FILE = "maps.safetensors"

# ----------------------------------------------------------------------------- modules


class AffineBlock(nn.Module):
    """Stands in for a decoder layer: ``h -> h @ weight + bias``, same output format."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, returns_tuple: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states @ self.weight + self.bias
        return (out, None) if self.returns_tuple else out


class SkipBlock(nn.Module):
    """A dropped decoder layer: passes the residual stream through unchanged."""

    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states, None) if self.returns_tuple else hidden_states


def _keep_hidden_state_capture(model: nn.Module, module: nn.Module) -> None:
    """transformers >= 5 records ``hidden_states`` with hooks on modules of the decoder-layer
    class; a swapped-in module is not of that class, so it gets the same hook."""
    try:
        from transformers.utils.output_capturing import (
            install_output_capuring_hook,
            maybe_install_capturing_hooks,
        )
    except ImportError:  # transformers 4: the model's own loop collects the hidden states
        return
    maybe_install_capturing_hooks(model)  # hook the other layers now, before a lazy install
    if not getattr(module, "_noln_capture_hook", False):  # a module swapped in twice: one hook
        install_output_capuring_hook(module, "hidden_states", 0)
        module._noln_capture_hook = True


def swap_layer(model: nn.Module, index: int, module: nn.Module) -> nn.Module:
    """Put ``module`` at position ``index`` of the decoder layers; returns the old layer."""
    layers, _ = decoder_layers(model)
    old = layers[index]
    layers[index] = module.to(model_device(model))
    _keep_hidden_state_capture(model, module)
    return old


@contextmanager
def swapped(model: nn.Module, modules: dict[int, nn.Module]) -> Iterator[nn.Module]:
    """``model`` with ``modules`` in place of some layers for the ``with`` body, then restored."""
    old = {i: swap_layer(model, i, m) for i, m in modules.items()}
    try:
        yield model
    finally:
        layers, _ = decoder_layers(model)
        for i, m in old.items():
            layers[i] = m


def replaced_layers(model: nn.Module) -> dict[int, str]:
    """Which layers are replaced, and how: ``{index: 'linear' | 'drop'}``."""
    layers, _ = decoder_layers(model)
    kinds = {AffineBlock: "linear", SkipBlock: "drop"}
    return {i: kinds[type(m)] for i, m in enumerate(layers) if type(m) in kinds}


# ----------------------------------------------------------------------------- hidden states


@contextmanager
def record_block_states(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """During a forward, fills a list with [input of block 0, output of block 0, ..., output of
    the last block]: the residual stream before the final norm, whatever modules the layers are.

    The caller clears the list between forwards.
    """
    layers, _ = decoder_layers(model)
    states: list[torch.Tensor] = []

    def pre(_module, args, kwargs):
        states.clear()
        states.append(args[0] if args else kwargs["hidden_states"])

    def post(_module, _args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [layer.register_forward_hook(post) for layer in layers]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def block_moments(model: nn.Module, blocks: np.ndarray, layers: Sequence[int],
                  batch_size: int = 8) -> StreamingMoments:
    """float64 moments of each listed block's input and output (sequences alternate halves)."""
    d = hidden_size(model)
    blocks = check_blocks(blocks, {type(model).__name__: model}, min_ctx=1)
    check_tokens(blocks.size, d)
    moments = StreamingMoments(d, pairs=layers, device=model_device(model))
    was_training = model.training
    model.eval()
    try:
        with record_block_states(model) as states:
            for i, ids in token_batches(blocks, batch_size, model_device(model)):
                model(input_ids=ids, use_cache=False)
                for half, part in halves(states, i):
                    moments.update(part, half)
    finally:
        model.train(was_training)
    return moments


def affine_fit(moments: StreamingMoments, layer: int,
               rcond: float = RCOND) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``(A, b)`` (float64) with ``out ~= in @ A + b`` for block ``layer``."""
    c = moments.centred(pairs=[layer])
    a = lstsq_map(c.cov[layer], c.cross[layer], rcond)
    return a, c.mean[layer + 1] - c.mean[layer] @ a


def affine_block(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> AffineBlock:
    _, returns_tuple = decoder_layers(model)
    dtype = next(model.parameters()).dtype
    return AffineBlock(a.to(dtype), b.to(dtype), returns_tuple)


def fit_layers(model: nn.Module, blocks: np.ndarray, layers: Sequence[int], batch_size: int = 8,
               rcond: float = RCOND) -> dict[int, AffineBlock]:
    """Affine replacements for ``layers``, fitted in ascending order, each on the model with the
    earlier ones already replaced (so each map sees the inputs it will get)."""
    maps: dict[int, AffineBlock] = {}
    for layer in sorted(layers):
        with swapped(model, maps):
            moments = block_moments(model, blocks, [layer], batch_size)
        maps[layer] = affine_block(model, *affine_fit(moments, layer, rcond))
    return maps


# ----------------------------------------------------------------------------- distillation


def distill(model: nn.Module, maps: dict[int, AffineBlock], blocks: np.ndarray, steps: int = 100,
            lr: float = 1e-3, batch_size: int = 8,
            progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Train only ``maps`` so the linearised model's block outputs match the original's.

    Loss: sum over blocks at or after the first replaced one of the MSE between student and
    teacher outputs, each divided by the teacher output's variance (so no layer dominates by
    scale). The teacher is ``model`` itself with its original layers. Returns the loss per step.
    """
    device = model_device(model)
    first = min(maps)
    params = [p for m in maps.values() for p in m.parameters()]
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    was_training = model.training
    model.eval()
    losses: list[float] = []
    order = np.random.default_rng(0).permutation(len(blocks))
    try:
        for step in range(steps):
            idx = order[(step * batch_size + np.arange(batch_size)) % len(blocks)]
            ids = torch.from_numpy(np.asarray(blocks[np.sort(idx)], dtype=np.int64)).to(device)
            with torch.no_grad(), record_block_states(model) as states:
                model(input_ids=ids, use_cache=False)
                teacher = [s.detach() for s in states[first + 1:]]
            with swapped(model, maps), record_block_states(model) as states:
                model(input_ids=ids, use_cache=False)
                student = states[first + 1:]
                loss = sum(F.mse_loss(s.float(), t.float())
                           / t.float().var(dim=(0, 1)).mean().clamp_min(1e-12)
                           for s, t in zip(student, teacher, strict=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, steps, losses[-1])
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return losses


# ----------------------------------------------------------------------------- greedy pruning


def parse_layers(spec: str, n_layers: int | None) -> list[int] | None:
    """``'auto'`` -> None; ``'3,4'`` -> [3, 4], checked against the model's depth
    (``n_layers`` None: the syntax only, before the model loads)."""
    if spec.strip().lower() == "auto":
        return None
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise NolnError(f"--layers '{spec}' is neither 'auto' nor a comma-separated list of "
                        "block indices such as '3,4'") from None
    if not layers:
        raise NolnError("--layers is empty: give 'auto' or block indices such as '3,4'")
    bad = [i for i in layers if n_layers is not None and not 0 <= i < n_layers]
    if bad:
        raise NolnError(f"layer {bad[0]} requested but the model has {n_layers} blocks "
                        f"(0-{n_layers - 1}): pass --layers within 0-{n_layers - 1}")
    return layers


def greedy_linearize(model: nn.Module, fit_blocks: np.ndarray, eval_blocks: np.ndarray,
                     max_blocks: int, *, distill_steps: int = 100, distill_lr: float = 1e-3,
                     batch_size: int = 8, rcond: float = RCOND,
                     log: Callable[[dict], None] | None = None) -> tuple[list[dict], dict]:
    """Replace up to ``max_blocks`` blocks, most linear first; CE after each step, 3 variants.

    At each step every remaining block is scored on the current (partly linearised) model; the
    one with the highest held-out with-residual score (its unexplained variance is what linear
    replacement loses) is replaced by its least-squares fit. The same order is used to drop
    blocks and to distil. Returns the table rows and ``{'lstsq': maps, 'distill': maps}`` of the
    last step. All but the last block are candidates: HF gives the last block's output only
    after the final norm, and scores skip that pair.
    """
    layers, returns_tuple = decoder_layers(model)
    n_layers = len(layers)
    if not 1 <= max_blocks <= n_layers - 1:
        raise NolnError(f"--max-blocks {max_blocks} is out of range: the model has {n_layers} "
                        f"blocks and the last is never a candidate, so give 1-{n_layers - 1}")
    base = cross_entropy(model, eval_blocks, batch_size).mean
    rows = [{"step": 0, "block": None, "score": None, "score_heldout": None,
             "ce_drop": base, "ce_linear": base, "ce_distill": base}]
    if log is not None:
        log(rows[0])
    maps: dict[int, AffineBlock] = {}
    distilled: dict[int, AffineBlock] = {}
    for step in range(1, max_blocks + 1):
        candidates = [i for i in range(n_layers - 1) if i not in maps]
        with swapped(model, maps):
            moments = block_moments(model, fit_blocks, candidates, batch_size)
        scores = {s.layer: s for s in score_pairs(moments, rcond)}
        key = {i: (s.with_residual_heldout if s.with_residual_heldout is not None
                   else s.with_residual) for i, s in scores.items()}
        best = max(candidates, key=lambda i: key[i])
        maps[best] = affine_block(model, *affine_fit(moments, best, rcond))
        with swapped(model, {i: SkipBlock(returns_tuple) for i in maps}):
            ce_drop = cross_entropy(model, eval_blocks, batch_size).mean
        with swapped(model, maps):
            ce_linear = cross_entropy(model, eval_blocks, batch_size).mean
        distilled = {i: affine_block(model, m.weight.detach().double(), m.bias.detach().double())
                     for i, m in maps.items()}
        ce_distill = math.nan
        if distill_steps > 0:
            distill(model, distilled, fit_blocks, distill_steps, distill_lr, batch_size)
            with swapped(model, distilled):
                ce_distill = cross_entropy(model, eval_blocks, batch_size).mean
        row = {"step": step, "block": best, "score": scores[best].with_residual,
               "score_heldout": scores[best].with_residual_heldout, "ce_drop": ce_drop,
               "ce_linear": ce_linear, "ce_distill": ce_distill}
        rows.append(row)
        if log is not None:
            log(row)
    return rows, {"lstsq": maps, "distill": distilled}


def plot_curve(rows: list[dict], path: Path, title: str = "") -> Path:
    """CE against the number of blocks replaced, one line per variant."""
    matplotlib.use("Agg")

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("ce_drop", "drop block", "o-"),
                              ("ce_linear", "linear (least squares)", "s-"),
                              ("ce_distill", "linear + distil", "^-")):
        ys = [r[key] for r in rows]
        if not all(math.isnan(y) for y in ys):
            ax.plot(steps, ys, style, label=label)
    ax.axhline(rows[0]["ce_linear"], color="grey", ls=":", label="original")
    labels = ["0"] + [f"{r['step']}\n(b{r['block']})" for r in rows[1:]]
    ax.set_xticks(steps, labels)
    ax.set_xlabel("blocks replaced (block index)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "Greedy replacement of the most linear blocks")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- save / load


def save_linearized(model: nn.Module, tokenizer, base: str, out: Path, extra: dict | None = None,
                    base_copy: str | None = None) -> Path:
    """Write the maps and a reference to the base model so ``load_linearized(out)`` rebuilds
    ``model``. ``base_copy``: a subfolder of ``out`` already holding the base model's weights
    (``save_pretrained`` of the unmodified model), used instead of the reference."""
    layers, _ = decoder_layers(model)
    kinds = replaced_layers(model)
    if not kinds:
        raise NolnError("nothing to save: no block of the model is replaced")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{name}": p.detach().cpu().contiguous()
               for i, kind in kinds.items() if kind == "linear"
               for name, p in layers[i].named_parameters()}
    if tensors:
        save_file(tensors, str(out / MAPS_FILE))
    local = Path(base).expanduser()
    meta = {"format": FORMAT, "version": 1,
            "base_model": str(local.resolve()) if local.exists() else base,
            "base_copy": base_copy,
            "layers": {str(i): kind for i, kind in sorted(kinds.items())},
            "n_layers": len(layers), "d_model": hidden_size(model),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **(extra or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def is_linearized(path: str | Path) -> bool:
    return (Path(path).expanduser() / META_FILE).is_file()


def load_linearized(path: str | Path, load_base, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a folder written by ``save_linearized``; ``load_base(name,
    dtype=)`` opens its base model (``noln.loading.load_model``: any model noln names)."""


    path = Path(path).expanduser()
    meta = read_json(path / META_FILE)
    if meta.get("format") != FORMAT:
        raise NolnError(f"{path / META_FILE} is not a noln linearised model (format "
                        f"{meta.get('format')!r}): point at a folder written by noln linearize")
    base = path / meta["base_copy"] if meta.get("base_copy") else meta["base_model"]
    if meta.get("base_copy") is None and (Path(base).is_absolute() and not Path(base).exists()):
        raise NolnError(f"the base model of {path} was '{base}', which no longer exists: restore "
                        "it, or re-run noln linearize with --copy-base")
    model, tokenizer = load_base(str(base), dtype=dtype)
    layers, returns_tuple = decoder_layers(model)
    if len(layers) != meta["n_layers"]:
        raise NolnError(f"the base model '{base}' has {len(layers)} blocks but {path} was made "
                        f"for {meta['n_layers']}: the base model changed; re-run noln linearize")
    tensors = load_file(str(path / MAPS_FILE)) if (path / MAPS_FILE).exists() else {}
    for key, kind in meta["layers"].items():
        i = int(key)
        if kind == "linear":
            module: nn.Module = AffineBlock(tensors[f"{i}.weight"].to(dtype),
                                            tensors[f"{i}.bias"].to(dtype), returns_tuple)
        else:
            module = SkipBlock(returns_tuple)
        swap_layer(model, i, module)
    if (path / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(path)
    model.config.use_cache = False  # a replaced layer keeps no KV cache; generate without one
    model.eval()
    return model, tokenizer

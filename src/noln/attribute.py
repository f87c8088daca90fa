"""``noln attribute``: direct logit attribution (DLA) of one logit to every model component.

The residual stream entering the unembedding is a sum of component outputs: the token and
positional embeddings, every attention head (``L{l}H{h}``, its value-weighted output through
W_O, no bias), every MLP (``MLP{l}``, bias included), and the attention output biases
(``attn biases``: every b_O, with the value biases folded in). The logit of the target token
``t`` at position ``p`` is ``unembed(norm(resid)) [t]``.

- Without LayerNorm the readout is linear: ``logit = sum_c c . W_U[:, t] + b_U[t]``. Each
  component's DLA ``c . W_U[:, t]`` is its exact direct effect (what removing it from the
  final residual alone changes), and the DLAs plus ``b_U[t]`` sum to the logit exactly.
- With LayerNorm, the usual approximation freezes the final norm's scale at the value it had
  on this input: ``DLA_c = (c - mean(c)) / scale . W_U[:, t]``. These still sum to the logit, but
  each is not the component's direct effect: removing ``c`` changes the scale too. noln shows
  the exact direct effect ``logit(resid) - logit(resid - c)`` (norm recomputed) beside it and
  the difference as the approximation's error.

The decomposition is TransformerLens's (``ActivationCache.get_full_resid_decomposition``), so
no family-specific code lives here: a model is loaded with ``noln.interop.hooked_transformer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from noln.errors import NolnError
from noln.outputs import save_figure

matplotlib.use("Agg")  # files only, never a window

UNEMBED_BIAS = "unembed bias"
ATTN_BIAS = "attn biases"


@dataclass
class Attribution:
    """One model's attribution of ``logit`` to components (``labels[i]`` -> ``dla[i]``)."""

    model: str
    has_ln: bool
    logit: float
    labels: list[str]
    dla: list[float]  # with LN: the frozen-LN-scale approximation
    direct: list[float]  # exact direct effect (final norm recomputed); == dla without LN
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.dla))

    @property
    def sum_error(self) -> float:
        """``logit - sum(DLA)``: float rounding only, with or without LN."""
        return self.logit - self.total

    @property
    def errors(self) -> list[float]:
        """Per component: DLA minus the exact direct effect (0 without LN)."""
        return [d - e for d, e in zip(self.dla, self.direct)]

    @property
    def additivity_error(self) -> float:
        """``logit - sum(direct effects)``: how far the exact direct effects are from adding up
        to the logit (float rounding without LN; the norm's non-linearity with it)."""
        return self.logit - float(sum(self.direct))

    def to_dict(self) -> dict:
        errs = [abs(e) for e in self.errors]
        return {"model": self.model, "has_layernorm": self.has_ln, "logit": self.logit,
                "sum_of_components": self.total, "sum_error": self.sum_error,
                "sum_of_direct_effects": float(sum(self.direct)),
                "additivity_error": self.additivity_error,
                "approximation_error": {"max_abs": max(errs), "mean_abs": sum(errs) / len(errs)},
                "components": [{"name": n, "dla": d, "direct_effect": e, "error": d - e}
                               for n, d, e in zip(self.labels, self.dla, self.direct)],
                **self.extra}


def _label(tl_label: str) -> str:
    if tl_label.endswith("_mlp_out"):
        return f"MLP{tl_label.split('_')[0]}"
    return {"bias": ATTN_BIAS}.get(tl_label, tl_label)


@torch.no_grad()
def attribute_logit(tl, tokens: torch.Tensor, target_id: int, position: int = -1,
                    name: str = "model") -> Attribution:
    """DLA of ``logits[0, position, target_id]`` for a ``HookedTransformer`` ``tl`` (from
    ``noln.interop.hooked_transformer``) on ``tokens`` (``[1, n]``)."""
    tokens = tokens.to(tl.cfg.device)
    logits, cache = tl.run_with_cache(tokens)
    stack, labels = cache.get_full_resid_decomposition(
        layer=-1, expand_neurons=False, apply_ln=False, pos_slice=position, return_labels=True)
    stack = stack[:, 0].double()  # [component, d_model]
    w_u = tl.W_U[:, target_id].double()
    b_u = float(tl.b_U[target_id])
    has_ln = tl.cfg.normalization_type is not None
    if has_ln:
        normed = cache.apply_ln_to_stack(stack[:, None].float(), layer=-1,
                                         pos_slice=position)[:, 0].double()
        dla = normed @ w_u
        resid = stack.sum(0)
        ln = tl.ln_final
        full = ln(resid[None, None].float())[0, 0].double() @ w_u
        without = ln((resid[None] - stack)[:, None].float())[:, 0].double() @ w_u
        direct = full - without
    else:
        dla = direct = stack @ w_u
    labels = [_label(t) for t in labels] + [UNEMBED_BIAS]
    dla = [*dla.tolist(), b_u]
    direct = [*direct.tolist(), b_u]
    logit = float(logits[0, position, target_id])
    return Attribution(model=name, has_ln=has_ln, logit=logit, labels=labels, dla=dla,
                       direct=direct)


# ----------------------------------------------------------------------------- output


def _top(results: list[Attribution], k: int) -> list[int]:
    """Indices of the ``k`` components with the largest |DLA| or |direct effect| anywhere."""
    size = [max(max(abs(r.dla[i]), abs(r.direct[i])) for r in results)
            for i in range(len(results[0].labels))]
    return sorted(range(len(size)), key=lambda i: -size[i])[:k]


def table_rows(results: list[Attribution], top: int) -> tuple[list[str], list[list[str]]]:
    header = ["component"]
    for r in results:
        if r.has_ln:
            header += [f"{r.model}\nDLA, frozen LN scale", f"{r.model}\nexact direct effect",
                       f"{r.model}\nerror"]
        else:
            header += [f"{r.model}\nDLA (exact)"]
    idx = _top(results, top)
    rows = []
    for i in idx:
        row = [results[0].labels[i]]
        for r in results:
            row += ([f"{r.dla[i]:+.4f}", f"{r.direct[i]:+.4f}", f"{r.errors[i]:+.4f}"]
                    if r.has_ln else [f"{r.dla[i]:+.4f}"])
        rows.append(row)
    rest = [i for i in range(len(results[0].labels)) if i not in idx]
    if rest:
        row = [f"({len(rest)} more, summed)"]
        for r in results:
            s_d, s_e = sum(r.dla[i] for i in rest), sum(r.direct[i] for i in rest)
            row += [f"{s_d:+.4f}", f"{s_e:+.4f}", f"{s_d - s_e:+.4f}"] if r.has_ln else \
                [f"{s_d:+.4f}"]
        rows.append(row)
    summary = [("sum of components", lambda r: [r.total, sum(r.direct),
                                                r.total - sum(r.direct)], "+.4f"),
               ("logit", lambda r: [r.logit, r.logit, None], "+.4f"),
               ("logit − sum", lambda r: [r.sum_error, r.additivity_error, None], "+.1e")]
    for label, get, fmt in summary:
        row = [label]
        for r in results:
            cells = get(r) if r.has_ln else get(r)[:1]
            row += ["" if v is None else f"{v:{fmt}}" for v in cells]
        rows.append(row)
    return header, rows


def plot_attribution(results: list[Attribution], path: Path, top: int, title: str) -> Path:
    """Horizontal bars of the top components' DLA per model; a black tick marks the exact
    direct effect where it differs (models with LN)."""
    idx = _top(results, top)[::-1]
    labels = [results[0].labels[i] for i in idx]
    n = len(results)
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(idx) * max(1, n * 0.7) + 1.4))
    y = np.arange(len(idx))
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for k, r in enumerate(results):
        pos = y + ((n - 1) / 2 - k) * height
        what = "DLA (frozen LN scale)" if r.has_ln else "DLA (exact)"
        ax.barh(pos, [r.dla[i] for i in idx], height=height, color=colours[k % 4],
                label=f"{r.model}: {what}")
        if r.has_ln:
            ax.scatter([r.direct[i] for i in idx], pos, marker="|", s=120, color="black",
                       zorder=3, label=f"{r.model}: exact direct effect")
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("contribution to the logit")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- inputs


def encode_text(tokenizer, text: str, bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos:
        bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else \
            tokenizer.eos_token_id
        if bos_id is None:
            raise NolnError("the tokenizer has no BOS or end-of-text token: use --no-bos")
        ids = [bos_id, *ids]
    return ids


def single_token_id(tokenizer, target: str) -> int:
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise NolnError(f"--target {target!r} is {len(ids)} tokens {pieces}, not one: give a "
                        "single token (words inside a text usually start with a space, as in "
                        "--target ' the')")
    return ids[0]

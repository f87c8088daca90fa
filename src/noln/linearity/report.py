"""Linearity profiles for people: run one over a model and some text, and show it as a table,
a CSV and a plot (``noln linearity`` is this plus its options)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from noln import outputs
from noln.arch import context_length
from noln.data import load_blocks
from noln.errors import NolnError
from noln.linearity.score import LinearityProfile, check_tokens, hidden_size, linearity_profile
from noln.loading import fuse_activations, load_model
from noln.outputs import save_figure
from noln.progress import token_progress

matplotlib.use("Agg")  # files only, never a window
console = Console()


def sequence_length(model, ctx: int | None = None, cap: int = 1024) -> int:
    """Tokens per sequence: ``ctx`` if given (checked), else the model's context, at most cap."""
    try:
        limit = context_length(model)
    except NolnError:  # no context length in the config: assume cap
        limit = cap
    if ctx is None:
        return min(int(limit), cap)
    if not 2 <= ctx <= limit:
        raise NolnError(f"--ctx {ctx} is out of range for this model (2-{limit} tokens)")
    return ctx


def fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def parse_layer_list(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        return sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise NolnError(f"--layers '{spec}' is not a comma-separated list of block indices such "
                        "as '0,3'") from None


def depth(layer: int, n_layers: int) -> float:
    """Normalised depth of block ``layer``: the middle of its slot in [0, 1]."""
    return (layer + 0.5) / n_layers


# ----------------------------------------------------------------------------- linearity


def short_name(name: str) -> str:
    """A model's label in tables and legends: the folder name for local paths."""
    path = Path(name).expanduser()
    return path.name if path.exists() and path.name else name


def profile_table(p: LinearityProfile) -> Table:
    t = Table(title=escape(f"Linearity of {short_name(p.model)} ({p.n_tokens:,} tokens, "
                           f"d={p.d_model}, chance floor d/(n-1) = {p.chance_floor:.4f})"))
    for col in ("block", "depth", "with res", "held-out", "w/o res", "held-out", "aniso", "ID"):
        t.add_column(col, justify="right")
    rest = {s.layer: s for s in p.layers_without_first}
    if rest:
        for col in ("with res\nno pos 0", "w/o res\nno pos 0"):
            t.add_column(col, justify="right")
    for s in p.layers:
        extra = [fmt(rest[s.layer].with_residual), fmt(rest[s.layer].without_residual)] \
            if s.layer in rest else []
        t.add_row(str(s.layer), f"{depth(s.layer, p.n_layers):.2f}", fmt(s.with_residual),
                  fmt(s.with_residual_heldout), fmt(s.without_residual),
                  fmt(s.without_residual_heldout), fmt(s.anisotropy, 3),
                  fmt(s.intrinsic_dim, 1), *extra)
    caption = (f"block l scores H[l] -> H[l+1]; the last block ({p.n_layers - 1}) is skipped "
               "(HF's last hidden state is after the final norm); anisotropy and TwoNN intrinsic "
               "dimension (ID) are of the block's input H[l]")
    if rest:
        gap = max(abs(s.with_residual - rest[s.layer].with_residual) for s in p.layers
                  if s.layer in rest)
        caption += (f"; 'no pos 0': position 0 of every sequence left out (largest change of "
                    f"the with-residual score: {gap:.3f}"
                    + (": position 0 dominates the score" if gap > 0.01 else "") + ")")
    if p.forward != "fp32":
        caption += f"; the model's forward pass in {p.forward} autocast"
    t.caption = escape(caption)
    return t


def plot_profiles(profiles: list[LinearityProfile], path: Path) -> Path:
    """Scores (in-sample solid, held-out dashed), anisotropy and intrinsic dimension against
    normalised depth, one colour per model."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("with_residual", "with residual: H[l] -> H[l+1]"),
              ("without_residual", "without residual: H[l] -> H[l+1] - H[l]")]
    for i, p in enumerate(profiles):
        color, label = f"C{i}", short_name(p.model)
        xs = [depth(s.layer, p.n_layers) for s in p.layers]
        for ax, (key, title) in zip(axes[0], panels, strict=True):
            ax.plot(xs, [getattr(s, key) for s in p.layers], "o-", color=color,
                    label=f"{label} in-sample")
            held = [getattr(s, f"{key}_heldout") for s in p.layers]
            if all(h is not None for h in held):
                ax.plot(xs, held, "s--", color=color, alpha=0.8, label=f"{label} held-out")
            if key == "without_residual":  # with residual, scores sit far above the floor
                ax.axhline(p.chance_floor, color=color, ls=":", lw=1)
            ax.set_title(title)
            ax.set_ylabel("linearity score")
        if p.hidden_states:
            gx = [g["hidden_state"] / p.n_layers for g in p.hidden_states]
            axes[1][0].plot(gx, [g["anisotropy"] for g in p.hidden_states], "o-", color=color,
                            label=label)
            axes[1][1].plot(gx, [g["intrinsic_dim"] for g in p.hidden_states], "o-",
                            color=color, label=label)
    axes[1][0].set_title("anisotropy of H[k] (top PC variance share)")
    axes[1][1].set_title("intrinsic dimension of H[k] (TwoNN)")
    for ax in axes[1]:
        ax.set_xlabel("normalised depth k / n_layers (1 = after final norm)")
    for ax in axes[0]:
        ax.set_xlabel("normalised depth of the block ((l + 1/2) / n_layers)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    floors = ", ".join(dict.fromkeys(f"{p.chance_floor:.4f}" for p in profiles))
    fig.suptitle(f"Layer linearity ({profiles[0].n_tokens:,} tokens; solid in-sample, dashed "
                 f"held-out; dotted: chance floor d/(n-1) = {floors})")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# the CSV's header, which is also how noln knows a CSV as its own (noln.outputs)
CSV_COLUMNS = ("model", "positions", "layer", "depth", "with_residual", "with_residual_heldout",
               "without_residual", "without_residual_heldout", "n_tokens", "chance_floor",
               "anisotropy", "anisotropy_power", "intrinsic_dim")


def write_csv(profiles: list[LinearityProfile], path: Path) -> None:
    rows = []
    for p in profiles:
        for positions, scores in (("all", p.layers), ("without_first", p.layers_without_first)):
            for s in scores:
                row = {**s.__dict__, "model": p.model, "positions": positions,
                       "depth": depth(s.layer, p.n_layers)}
                rows.append(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])
    outputs.write_csv(CSV_COLUMNS, rows, path)


def run_profile(name: str, data: str, tokens: int, ctx: int | None, layers: list[int] | None,
                geometry: bool, id_tokens: int, batch_size: int, seed: int,
                precision: str = "float64", without_first: bool = False,
                forward: str = "fp32") -> tuple[LinearityProfile, dict]:
    """Load ``name``, tokenise ``data`` with its tokenizer and profile it."""
    model, tok = load_model(name)
    fuse_activations(model)
    ctx = sequence_length(model, ctx)
    check_tokens(tokens, hidden_size(model))  # before tokenising and running anything
    blocks = load_blocks(data, tok, ctx, max_tokens=tokens)
    with token_progress(f"linearity of {short_name(name)}", blocks.size,
                        console=console) as bar:
        profile = linearity_profile(
            model, blocks, layers=layers, batch_size=batch_size, geometry=geometry,
            id_tokens=id_tokens, seed=seed, precision=precision, name=name,
            progress=lambda done, total: bar.update(done * blocks.shape[1]),
            without_first=without_first, forward=forward)
    return profile, {"data": data, "ctx": ctx, "precision": precision,
                     "forward_precision": profile.forward}



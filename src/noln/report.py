"""Tables and plots: the CE table of a run, the loss curve marking every removal, and a
pair's training CE on the same batches."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from rich.table import Table

from noln.arch import role_of
from noln.outputs import figure_metadata

# by role (noln.arch.base); a log from before sites were named by role maps through
# canonical_site to the same colours
ROLE_COLOURS = {"mlp_in": "tab:orange", "attn_in_qk": "tab:green", "attn_in_v": "tab:purple",
                "q_norm": "tab:cyan", "k_norm": "tab:olive", "final": "tab:red"}


def plot_loss(log: list[dict], path: Path, control_log: list[dict] | None = None,
              title: str = "") -> Path:
    """Training loss (raw and smoothed) with a vertical line at each removal, by site role."""
    matplotlib.use("Agg")

    def curve(records):
        steps = [r["step"] for r in records if "loss" in r and "event" not in r]
        losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
        smooth, ema = [], None
        for v in losses:
            ema = v if ema is None else 0.8 * ema + 0.2 * v
            smooth.append(ema)
        return steps, losses, smooth

    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps, losses, smooth = curve(log)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(steps, smooth, color="tab:blue", lw=1.6, label="removal run (EMA)")
    if control_log:
        c_steps, _, c_smooth = curve(control_log)
        ax.plot(c_steps, c_smooth, color="grey", lw=1.4, ls="--", label="with-LN control (EMA)")
    seen = set()
    for r in log:
        if r.get("event") == "remove":
            kind = role_of(r["site"])
            ax.axvline(r["step"], color=ROLE_COLOURS.get(kind, "black"), lw=0.7, alpha=0.6,
                       label=f"freeze {kind}" if kind not in seen else None)
            seen.add(kind)
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy (nats)")
    if losses:
        lo, hi = min(smooth), max(smooth)
        ax.set_ylim(lo - 0.1 * (hi - lo + 0.1), hi + 0.25 * (hi - lo + 0.1))
    ax.set_title(title or "LayerNorm removal")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)  # a run folder's own file (run.py): replaced on a remake, marked
    fig.savefig(path, dpi=120, metadata=figure_metadata(path))
    plt.close(fig)
    return path


# events after which the removal's step did not train on the control's batch as it was
CHANGED_BATCH = ("skipped", "clipped", "guard")


def paired_training_gap(log: list[dict], control_log: list[dict],
                        window: int) -> list[dict]:
    """The removal's training CE minus its control's, as means over ``window``-step spans. Both
    runs read the same batches in the same order (one seed), so this is the removal's cost on
    the same text, step by step, with none of a held-out set's sampling noise. A step is left
    out where the removal's batch was not the control's: a sequence dropped or trained clipped
    (``skipped``, ``clipped``), a guard restore, or replayed sequences added (``replay``). A
    step logged twice (a resume, a restore) counts as it was last trained.

    ``[{"first": step, "last": step, "steps": n, "no_ln": mean, "with_ln": mean, "gap": mean}]``.
    """
    def losses(records: list[dict]) -> dict[int, dict]:
        return {r["step"]: r for r in records if "event" not in r and "loss" in r}

    removal, control = losses(log), losses(control_log)
    changed = {r.get("step") for r in log if r.get("event") in CHANGED_BATCH}
    spans: dict[int, list[tuple[float, float]]] = {}
    for step in sorted(removal.keys() & control.keys()):
        a, b = removal[step], control[step]
        if step in changed or a.get("replay") or b.get("replay") or \
                not (math.isfinite(a["loss"]) and math.isfinite(b["loss"])):
            continue
        spans.setdefault(step // window, []).append((a["loss"], b["loss"]))
    rows = []
    for span, pairs in sorted(spans.items()):
        no_ln = sum(a for a, _ in pairs) / len(pairs)
        with_ln = sum(b for _, b in pairs) / len(pairs)
        rows.append({"first": span * window, "last": span * window + window - 1,
                     "steps": len(pairs), "no_ln": no_ln, "with_ln": with_ln,
                     "gap": no_ln - with_ln})
    return rows


def training_gap_markdown(rows: list[dict]) -> str:
    """``paired_training_gap``'s rows as a Markdown section."""
    lines = ["**Training CE on the same batches** (means over spans of steps; a step where the "
             "removal's batch differed from the control's is left out)", "",
             "| steps | steps kept | no LN | with LN (fine-tuned) | no LN − with LN |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['first']}-{r['last']} | {r['steps']} | {r['no_ln']:.4f} | "
              f"{r['with_ln']:.4f} | {r['gap']:+.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def _ce_cell(result: dict) -> str:
    """``mean ± ci95``; where chunks overflowed, how many and the mean over the rest."""
    if result.get("overflowed"):
        rest = result.get("finite_mean")
        return (f"nan ({result['overflowed']}/{result['n_chunks']} chunks overflow; rest "
                f"{rest:.4f})" if rest is not None else "nan (every chunk overflows)")
    return f"{result['mean']:.4f} ± {result['ci95']:.4f}"


def _delta_cell(result: dict, control: dict) -> str:
    """``result``'s mean CE minus ``control``'s; where either overflowed on some chunks, over
    the chunks both keep finite (the same text for both), and how many those are."""
    if not (result.get("overflowed") or control.get("overflowed")):
        return f"{result['mean'] - control['mean']:+.4f}"
    pairs = [(a, b) for a, b in zip(result.get("chunk_means") or [],
                                    control.get("chunk_means") or [])
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if not pairs or result["n_chunks"] != control["n_chunks"] or \
            len(result.get("chunk_means") or []) != result["n_chunks"] or \
            len(control.get("chunk_means") or []) != control["n_chunks"]:
        return "— (overflow)"  # measured before chunks were recorded, or nothing shared
    diff = sum(a - b for a, b in pairs) / len(pairs)  # chunks of equal length: token means
    return f"{diff:+.4f} ({len(pairs)}/{result['n_chunks']} chunks)"


def ce_rows(results: dict[str, dict[str, dict]], reference: str | None,
            control: str | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of ``{source: {model: CEResult-dict}}``, with a delta column."""
    models = list(next(iter(results.values())))
    header = ["data (mean CE, nats)", *models]
    delta = None
    if control and control in models and len(models) > 1:
        delta = [m for m in models if m not in (control, reference)]
        header += [f"{m} − {control}" for m in delta]
    rows = []
    for source, per_model in results.items():
        row = [f"{source} ({per_model[models[0]]['n_tokens']:,} tok)"]
        row += [_ce_cell(per_model[m]) for m in models]
        if delta:
            row += [_delta_cell(per_model[m], per_model[control]) for m in delta]
        rows.append(row)
    return header, rows


def rich_table(header: list[str], rows: list[list[str]], title: str = "") -> Table:
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def json_safe(obj: object) -> object:
    """NaN / inf as null (strict JSON has no NaN): an interval from one chunk, TwoNN on too
    few points."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj

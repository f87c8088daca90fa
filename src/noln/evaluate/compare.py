"""The papers' comparison table: original vs fine-tuned with LN vs without LN (or any models).

Rows are metrics (CE per dataset with its 95% interval, median CE, HellaSwag acc / acc_norm,
faithfulness to the reference, residual norm of position 0, rare tokens), columns are models,
and in the three-model form a last column holds no-LN minus the with-LN control: the fair
comparison, since both saw the same fine-tuning data and steps. ``noln compare``, ``noln eval``
and ``noln remove``'s end-of-run summary all build a ``ComparisonResult`` with
``compare_models``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from noln.errors import NolnError
from noln.evaluate.faithfulness import BlockReport, evaluate_blocks
from noln.evaluate.hellaswag import HellaSwagResult, Item, evaluate_hellaswag, load_hellaswag
from noln.evaluate.loss import model_device
from noln.outputs import save_figure, write_json, write_markdown
from noln.precision import autocast, resolve_precision
from noln.report import json_safe

ORIGINAL, WITH_LN, NO_LN = "original", "finetuned_with_ln", "no_ln"
DISPLAY = {ORIGINAL: "original", WITH_LN: "fine-tuned with LN", NO_LN: "no LN"}


def display(name: str) -> str:
    return DISPLAY.get(name, name)


@dataclass
class ModelReport:
    path: str | None = None
    blocks: dict[str, BlockReport] = field(default_factory=dict)  # per text source
    hellaswag: HellaSwagResult | None = None

    def to_dict(self) -> dict:
        def per_source(get: Callable[[BlockReport], object]) -> dict:
            out = {s: get(b) for s, b in self.blocks.items()}
            return {s: v.to_dict() for s, v in out.items() if v is not None}

        return {"path": self.path,
                "ce": per_source(lambda b: b.ce),
                "hellaswag": self.hellaswag.to_dict() if self.hellaswag else None,
                "faithfulness": per_source(lambda b: b.faithfulness),
                "residual_norms": per_source(lambda b: b.norms),
                "rare_tokens": per_source(lambda b: b.rare_tokens)}


@dataclass
class Row:
    """One metric across models; ``errors`` are 95% half-widths, ``scale`` turns 0.29 into 29."""
    label: str
    values: dict[str, float | None]
    errors: dict[str, float | None] = field(default_factory=dict)
    fmt: str = ".4f"
    scale: float = 1.0

    def cell(self, model: str) -> str:
        v = self.values.get(model)
        if v is None:
            return "—"
        text = f"{v * self.scale:{self.fmt}}"
        e = self.errors.get(model)
        return f"{text} ± {e * self.scale:{self.fmt}}" if e is not None else text

    def delta(self, a: str, b: str) -> float | None:
        va, vb = self.values.get(a), self.values.get(b)
        return None if va is None or vb is None else va - vb

    def delta_cell(self, a: str, b: str) -> str:
        d = self.delta(a, b)
        return "—" if d is None else f"{d * self.scale:+{self.fmt}}"


@dataclass
class ComparisonResult:
    models: dict[str, ModelReport]
    reference: str | None = None
    delta: tuple[str, str] | None = None  # (a, b): the last column is a - b
    sources: dict[str, str] = field(default_factory=dict)  # name -> what it was loaded from
    hellaswag_source: str | None = None
    precision: str = "fp32"  # what the forward passes computed in (bf16: autocast)

    # ------------------------------------------------------------------ the table

    def source_names(self) -> list[str]:
        names: list[str] = []
        for report in self.models.values():
            names += [s for s in report.blocks if s not in names]
        return names

    def rows(self) -> list[Row]:
        models = self.models
        rows: list[Row] = []

        def add(label: str, get: Callable[[ModelReport], tuple[float | None, float | None]],
                fmt: str = ".4f", scale: float = 1.0) -> None:
            got = {m: get(r) for m, r in models.items()}
            if all(v is None for v, _ in got.values()):
                return
            rows.append(Row(label, {m: v for m, (v, _) in got.items()},
                            {m: e for m, (_, e) in got.items()}, fmt, scale))

        def block(s: str, r: ModelReport) -> BlockReport | None:
            return r.blocks.get(s)

        sources = self.source_names()
        for s in sources:
            add(f"CE {s} (nats)", lambda r, s=s: (b.ce.mean, b.ce.ci95) if (b := block(s, r))
                else (None, None))
        for s in sources:  # a fixed-scale model can overflow on a rare chunk: how many, and
            # every model's CE on the chunks none overflows on (rows only where one did)
            if any((b := block(s, r)) and b.ce.overflowed for r in models.values()):
                add(f"chunks that overflow {s}", lambda r, s=s: (b.ce.overflowed, None)
                    if (b := block(s, r)) else (None, None), ",.0f")
                add(f"CE {s}, the chunks no model overflows on", lambda r, s=s: (
                    _shared_ce(b.ce), None) if (b := block(s, r)) else (None, None))
        for s in sources:  # (where a model overflowed, over the chunks none overflows on)
            some = any((b := block(s, r)) and b.ce.overflowed for r in models.values())
            add(f"median CE {s}" + (", the chunks no model overflows on" if some else ""),
                lambda r, s=s: (_shared_median(b.ce), None) if (b := block(s, r))
                else (None, None))
        add("HellaSwag acc (%)", lambda r: (r.hellaswag.acc, 1.96 * r.hellaswag.acc_stderr)
            if r.hellaswag else (None, None), ".2f", 100)
        add("HellaSwag acc_norm (%)",
            lambda r: (r.hellaswag.acc_norm, 1.96 * r.hellaswag.acc_norm_stderr)
            if r.hellaswag else (None, None), ".2f", 100)
        if any(r.hellaswag and r.hellaswag.overflowed for r in models.values()):
            add("HellaSwag items that overflow", lambda r: (r.hellaswag.overflowed, None)
                if r.hellaswag else (None, None), ",.0f")

        def faith(s: str, r: ModelReport):
            b = block(s, r)
            return b.faithfulness if b is not None else None

        for s in sources:
            add(f"KL(ref ‖ model) {s}", lambda r, s=s: (f.kl, None) if (f := faith(s, r))
                else (None, None), ".5f")
            add(f"JS divergence {s}", lambda r, s=s: (f.js, None) if (f := faith(s, r))
                else (None, None), ".5f")
            add(f"top-1 agreement {s} (%)", lambda r, s=s: (f.top1, None) if (f := faith(s, r))
                else (None, None), ".2f", 100)
            add(f"CE − ref {s}", lambda r, s=s: (f.ce_diff, f.ce_diff_ci95) if (f := faith(s, r))
                else (None, None))
        for s in sources:
            add(f"‖resid‖ pos 0 / rest, max over layers {s}",
                lambda r, s=s: (max(b.norms.ratio), None) if (b := block(s, r)) and b.norms
                else (None, None), ".2f")
            add(f"worst token's mean CE {s}",
                lambda r, s=s: (b.rare_tokens.highest[0].ce, None)
                if (b := block(s, r)) and b.rare_tokens.highest else (None, None), ".2f")
            add(f"tokens with CE > 20 {s}",
                lambda r, s=s: (b.rare_tokens.n_above, None) if (b := block(s, r))
                else (None, None), ",.0f")
        return rows

    def columns(self) -> list[str]:
        cols = [display(m) for m in self.models]
        if self.delta:
            cols.append(f"{display(self.delta[0])} − {display(self.delta[1])}")
        return cols

    def _cells(self, row: Row) -> list[str]:
        cells = [row.cell(m) for m in self.models]
        if self.delta:
            cells.append(row.delta_cell(*self.delta))
        return cells

    def token_counts(self) -> list[str]:
        """One line per source: chunk count and length, predicted tokens (per tokenizer)."""
        lines = []
        for s in self.source_names():
            seen = {}
            for m, r in self.models.items():
                if s in r.blocks:
                    ce = r.blocks[s].ce
                    seen.setdefault((ce.n_chunks, ce.ctx, ce.n_tokens), []).append(display(m))
            for (n_chunks, ctx, n_tokens), names in seen.items():
                who = f" [{', '.join(names)}]" if len(seen) > 1 else ""
                origin = f" = {self.sources[s]}" if s in self.sources else ""
                lines.append(f"{s}{origin}: {n_chunks:,} chunks of {ctx} tokens "
                             f"({n_chunks * ctx:,} tokens, {n_tokens:,} predicted; no BOS "
                             f"prepended){who}")
        for s in self.source_names():
            shared = {(b.ce.n_chunks, b.ce.shared_chunks) for r in self.models.values()
                      if (b := r.blocks.get(s)) is not None and b.ce.shared_chunks is not None}
            for n_chunks, kept in sorted(shared):
                lines.append(f"{s}: {n_chunks - kept:,} of {n_chunks:,} chunks overflow in some "
                             f"model; KL / JS / agreement / CE − ref, residual norms and rare "
                             f"tokens are over the other {kept:,}, as is 'CE {s}, the chunks no "
                             "model overflows on'")
        if self.hellaswag_source is not None:
            ns = {r.hellaswag.n for r in self.models.values() if r.hellaswag}
            counts = ", ".join(f"{n:,}" for n in ns)
            lines.append(f"HellaSwag = {self.hellaswag_source}: {counts} items "
                         "(± is the 95% interval, 1.96 standard errors)")
        if self.reference:
            lines.append(f"reference for KL / JS / agreement / CE − ref: {display(self.reference)}")
        if self.precision != "fp32":
            lines.append(f"computed in {self.precision} autocast (matmuls in {self.precision}, "
                         "losses in fp32)")
        return lines

    # ------------------------------------------------------------------ outputs

    def to_dict(self) -> dict:
        rows = self.rows()
        return {
            "reference": self.reference,
            "delta": {"of": self.delta[0], "minus": self.delta[1]} if self.delta else None,
            "sources": self.sources,
            "hellaswag_source": self.hellaswag_source,
            "precision": self.precision,
            "models": {m: r.to_dict() for m, r in self.models.items()},
            "table": [{"metric": row.label, "values": row.values, "ci95": row.errors,
                       "delta": row.delta(*self.delta) if self.delta else None} for row in rows],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        doc = json_safe(self.to_dict())
        if path is not None:
            write_json(doc, Path(path), default=_json_default)
        return json.dumps(doc, indent=2, default=_json_default)

    def to_markdown(self) -> str:
        cols = ["metric", *self.columns()]
        lines = ["| " + " | ".join(cols) + " |", "| --- |" + " ---: |" * (len(cols) - 1)]
        lines += ["| " + " | ".join([row.label, *self._cells(row)]) + " |" for row in self.rows()]
        lines += ["", *[f"- {line}" for line in self.token_counts()]]
        for m, r in self.models.items():
            for s, b in r.blocks.items():
                if b.faithfulness is None or not b.rare_tokens.largest_gap:
                    continue
                lines += ["", f"**{display(m)}, {s}: tokens adding most to the CE gap to the "
                          f"reference** (mean {b.rare_tokens.mean:.4f} vs "
                          f"{b.rare_tokens.reference_mean:.4f}, median {b.rare_tokens.median:.4f}"
                          f" vs {b.rare_tokens.reference_median:.4f})", "",
                          "| token | id | count | CE | CE ref | adds (nats) |",
                          "| --- | ---: | ---: | ---: | ---: | ---: |"]
                lines += [f"| `{_show(t.token)}` | {t.id} | {t.count} | {t.ce:.2f} | "
                          f"{t.ce_reference:.2f} | {t.contribution:+.5f} |"
                          for t in b.rare_tokens.largest_gap]
        return "\n".join(lines) + "\n"

    def table(self):
        table = Table(title="noln comparison", show_lines=False)
        table.add_column("metric")
        for c in self.columns():
            table.add_column(c, justify="right")
        for row in self.rows():
            table.add_row(row.label, *self._cells(row))
        return table

    def print(self, console=None, rare_tokens: int = 5) -> None:
        console = console or Console()
        console.print(self.table())
        for line in self.token_counts():
            console.print(f"  {line}", highlight=False)
        for m, r in self.models.items():
            for s, b in r.blocks.items():
                if b.faithfulness is None or not b.rare_tokens.largest_gap:
                    continue
                t = Table(title=f"{display(m)}, {s}: tokens adding most to the CE gap")
                for c in ("token", "id", "count", "CE", "CE ref", "adds (nats)"):
                    t.add_column(c, justify="left" if c == "token" else "right")
                for tok in b.rare_tokens.largest_gap[:rare_tokens]:
                    t.add_row(repr(tok.token), str(tok.id), str(tok.count), f"{tok.ce:.2f}",
                              f"{tok.ce_reference:.2f}", f"{tok.contribution:+.5f}")
                console.print(t)

    def plot(self, out_dir: str | Path) -> list[Path]:
        """PNGs per source: residual norm by layer (position 0 solid, the rest dashed, log
        scale) and, with a reference, the CE difference by position."""
        matplotlib.use("Agg")

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []

        def finish(fig, ax, title: str, filename: str) -> None:
            ax.set_title(title)
            ax.legend(fontsize=8)
            fig.tight_layout()
            written.append(save_figure(fig, out_dir / filename))
            plt.close(fig)

        for s in self.source_names():
            reports = {m: r.blocks[s] for m, r in self.models.items() if s in r.blocks}
            with_norms = {m: b for m, b in reports.items() if b.norms is not None}
            if with_norms:
                fig, ax = plt.subplots(figsize=(7, 4.5))
                for k, (m, b) in enumerate(with_norms.items()):
                    color = f"C{k}"
                    x = range(len(b.norms.labels))
                    name = display(m)
                    ax.plot(x, b.norms.pos0, "-o", color=color, label=f"{name}: position 0")
                    ax.plot(x, b.norms.rest, "--s", color=color, label=f"{name}: positions 1+")
                labels = next(iter(with_norms.values())).norms.labels
                ax.set_xticks(range(len(labels)), labels, rotation=30)
                ax.set_yscale("log")
                ax.set_ylabel("mean residual L2 norm")
                finish(fig, ax, f"Residual-stream norm by layer ({s})",
                       f"residual_norms_{_slug(s)}.png")
            faithful = {m: b for m, b in reports.items() if b.faithfulness is not None}
            if faithful:
                fig, ax = plt.subplots(figsize=(7, 4))
                for m, b in faithful.items():
                    d = b.faithfulness.ce_diff_by_position
                    ax.plot(range(1, len(d) + 1), d, label=display(m), lw=1)
                ax.axhline(0, color="grey", lw=0.5)
                ax.set_xlabel("predicted position")
                ax.set_ylabel(f"CE − CE({display(self.reference)}) (nats)")
                finish(fig, ax, f"CE difference to the reference by position ({s})",
                       f"ce_diff_by_position_{_slug(s)}.png")
        return written

    def save(self, out_dir: str | Path) -> list[Path]:
        """``comparison.md``, ``comparison.json`` and the plots in ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_markdown(self.to_markdown(), out_dir / "comparison.md")
        self.to_json(out_dir / "comparison.json")
        return [out_dir / "comparison.md", out_dir / "comparison.json", *self.plot(out_dir)]

    def merge(self, other: ComparisonResult) -> ComparisonResult:
        """Both results' models in one table (``noln eval`` runs one per tokenizer)."""
        clash = set(self.models) & set(other.models)
        if clash:
            raise NolnError(f"model name(s) {', '.join(sorted(clash))} given twice: name each "
                            "model once")
        return ComparisonResult(models={**self.models, **other.models},
                                reference=self.reference or other.reference,
                                delta=self.delta or other.delta,
                                sources={**self.sources, **other.sources},
                                hellaswag_source=self.hellaswag_source or other.hellaswag_source,
                                precision=self.precision)


def _shared_ce(ce) -> float | None:
    """A model's CE over the chunks every model of its comparison keeps finite."""
    if ce.shared_chunks is not None:
        return ce.shared_mean
    return ce.finite_mean if ce.overflowed else ce.mean


def _shared_median(ce) -> float | None:
    """A model's median per-token CE over the chunks every model of its comparison keeps
    finite (a median over all chunks, where some overflowed, is nan)."""
    return ce.shared_median if ce.shared_chunks is not None else ce.median


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def report_files(source_names) -> list[str]:
    """The files ``ComparisonResult.save`` may write in its folder, for sources so named."""
    return ["comparison.md", "comparison.json",
            *(f"{kind}_{_slug(s)}.png" for s in source_names
              for kind in ("residual_norms", "ce_diff_by_position"))]


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "data"


def _show(token: str) -> str:
    return repr(token)[1:-1].replace("|", "\\|").replace("`", "'")


# ----------------------------------------------------------------------------- the entry point


def compare_models(models: dict[str, torch.nn.Module], tokenizer,
                   sources: dict[str, np.ndarray],
                   hellaswag: list[Item] | str | Path | None = None,
                   reference: str | None = None, delta: tuple[str, str] | str | None = "auto",
                   batch_size: int | None = None, hellaswag_batch_size: int | None = None,
                   hellaswag_limit: int | None = None, hellaswag_name: str | None = None,
                   top_k: int = 10,
                   paths: dict[str, str] | None = None,
                   source_specs: dict[str, str] | None = None,
                   progress: bool = True, precision: str = "fp32") -> ComparisonResult:
    """Evaluate ``models`` (all sharing ``tokenizer``) on each ``[n, ctx]`` token-block set in
    ``sources`` and optionally on HellaSwag; with a ``reference`` (a key of ``models``), also
    their faithfulness to it. ``delta="auto"`` adds a no-LN − with-LN column when ``models`` has
    the keys ``no_ln`` and ``finetuned_with_ln``; pass ``(a, b)`` for any other pair, or None.
    ``hellaswag_name`` labels HellaSwag items passed as a list (default: "items given").
    ``precision`` (``fp32``, ``bf16`` or ``auto``: bf16 where the models' device multiplies it
    natively) is what the forward passes compute in; the result records the resolved one."""
    if not models:
        raise NolnError("no models to compare")
    device = model_device(next(iter(models.values())))
    precision = resolve_precision(precision, device)
    if delta == "auto":
        delta = (NO_LN, WITH_LN) if NO_LN in models and WITH_LN in models else None
    if delta is not None and any(m not in models for m in delta):
        raise NolnError(f"delta column {delta} names a model not in {list(models)}")
    reports = {m: ModelReport(path=(paths or {}).get(m)) for m in models}
    for s, blocks in sources.items():
        with autocast(precision, device):
            per_model = evaluate_blocks(models, blocks, reference=reference, tokenizer=tokenizer,
                                        batch_size=batch_size, top_k=top_k, progress=progress,
                                        description=f"{s}")
        for m, block_report in per_model.items():
            reports[m].blocks[s] = block_report
    hellaswag_source = None
    if hellaswag is not None:
        items = hellaswag if isinstance(hellaswag, list) else load_hellaswag(hellaswag)
        items = items[:hellaswag_limit] if hellaswag_limit is not None else items
        hellaswag_source = hellaswag_name or ("items given" if isinstance(hellaswag, list)
                                              else str(hellaswag))
        for m, model in models.items():
            with autocast(precision, device):
                reports[m].hellaswag = evaluate_hellaswag(model, tokenizer, items,
                                                          batch_size=hellaswag_batch_size,
                                                          progress=progress)
            reports[m].hellaswag.source = hellaswag_source
    return ComparisonResult(models=reports, reference=reference, delta=delta,
                            sources=dict(source_specs or {}), hellaswag_source=hellaswag_source,
                            precision=precision)

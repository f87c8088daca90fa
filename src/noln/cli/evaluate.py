"""``noln eval`` and ``noln compare``: typer command functions (``noln.cli`` registers them).

Both load each model with ``noln.loading.load_model`` (Hub id, HF folder, noln export or run
folder), cut every ``--data`` source into fixed-length chunks with no BOS prepended, and build
one ``ComparisonResult``; errors a user can fix are raised as ``NolnError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from noln.config import check_eval_numbers
from noln.errors import NolnError

if TYPE_CHECKING:  # annotations only: the command imports the library when it runs
    import torch

    from noln.evaluate.compare import ComparisonResult
    from noln.evaluate.hellaswag import Item

DataOpt = Annotated[list[str] | None, typer.Option(
    "--data", "-d", help="text to measure CE on: NAME=SOURCE or SOURCE (name = file stem); a "
    "local .jsonl/.txt file or folder, 'builtin', or a Hugging Face dataset name; repeatable")]
HellaSwagOpt = Annotated[str | None, typer.Option(
    "--hellaswag", help="also score HellaSwag: 'hf' for the Hub's Rowan/hellaswag validation "
    "split, another Hub dataset name, or a local .jsonl with ctx / endings / label")]
TokensOpt = Annotated[int | None, typer.Option(
    "--tokens", help="at most N tokens per source (default: all of it)")]
CtxOpt = Annotated[int | None, typer.Option(
    "--ctx", help="chunk length in tokens (default: the models' context length)")]
SplitOpt = Annotated[str, typer.Option(
    "--split", help="split of Hub datasets given to --data")]
BatchOpt = Annotated[int | None, typer.Option(
    "--batch-size", help="chunks per forward pass (default: ~32 MB of logits on CPU, 1 GB on "
    "GPU)")]
LimitOpt = Annotated[int | None, typer.Option(
    "--hellaswag-limit", help="score only the first N HellaSwag items")]
JsonOpt = Annotated[Path | None, typer.Option(
    "--json", help="write every result here as JSON")]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", help="folder for comparison.md, comparison.json and the PNG plots")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ...")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="fp32 | bf16 (autocast: matmuls in bf16, losses in fp32) | auto (bf16 "
    "where the device multiplies bf16 natively: a GPU, a CPU with AMX / AVX512-BF16)")]


def note_checkpoints(*names: str | Path | None) -> None:
    """Say on stderr which step each unfinished run (or checkpoint file) in ``names`` is read
    at: a run still training gives its last checkpoint, not its end."""
    from noln.run import checkpoint_note

    for name in dict.fromkeys(n for n in names if n is not None):
        if (note := checkpoint_note(name)) is not None:
            typer.echo(note, err=True)


def check_hellaswag_limit(hellaswag: str | None, limit: int | None) -> None:
    if limit is not None and hellaswag is None:
        raise NolnError("--hellaswag-limit limits --hellaswag, which is not given: add "
                        "--hellaswag (hf or PATH), or leave the limit out")


def _hellaswag_items(source: str | None, limit: int | None) -> list[Item] | None:
    from noln.evaluate.hellaswag import load_hellaswag

    return None if source is None else load_hellaswag(source, limit=limit)


def _precision(asked: str, device: str, quiet: bool) -> tuple[torch.device, str]:
    """The device and the resolved precision, checked before any model loads; said unless
    --quiet."""
    from noln.evaluate.inputs import resolve_device
    from noln.precision import describe, resolve_precision

    resolved_device = resolve_device(device)
    precision = resolve_precision(asked, resolved_device)
    if not quiet:
        typer.echo(describe(precision, asked, resolved_device))
    return resolved_device, precision


def _load_inputs(names: dict[str, str], data: list[str] | None, hellaswag: str | None,
                 hellaswag_limit: int | None, *, tokens: int | None, ctx: int | None,
                 batch_size: int | None, split: str, json_out: Path | None, out: Path | None,
                 precision: str, device: str, quiet: bool,
                 ) -> tuple[dict[str, str], list[Item] | None, str, dict[str, tuple]]:
    """What ``eval`` and ``compare`` read, in the order that names a bad input before any
    weights load: the --data sources and the options against them, the device and precision,
    the HellaSwag items; then the models ``names`` (``{column: model}``), each unfinished
    run's step said first. Returns the sources, the items, the precision and ``{column:
    (model, tokenizer)}``."""
    from noln.evaluate.compare import report_files
    from noln.evaluate.inputs import check_options, load_models, parse_sources

    sources = parse_sources(data or [])
    check_options(tokens=tokens, ctx=ctx, batch_size=batch_size, hellaswag_limit=hellaswag_limit,
                  json_out=json_out, out=out, out_files=report_files(sources),
                  sources=sources, split=split)
    where, precision = _precision(precision, device, quiet)
    items = _hellaswag_items(hellaswag, hellaswag_limit)
    note_checkpoints(*names.values())
    return sources, items, precision, load_models(names, where)


def _finish(result: ComparisonResult, json_out: Path | None, out: Path | None) -> None:
    result.print()
    if out is not None:
        for path in result.save(out):
            typer.echo(f"wrote {path}")
    if json_out is not None:
        result.to_json(json_out)
        typer.echo(f"wrote {json_out}")


def _check_first(nothing: str, data, hellaswag, hellaswag_limit, tokens, ctx,
                 batch_size) -> None:
    """What ``eval`` and ``compare`` answer before the library's imports: something to
    measure, and numbers in range."""
    if not data and hellaswag is None:
        raise NolnError(f"{nothing}: give --data SOURCE and/or --hellaswag (hf or PATH)")
    check_hellaswag_limit(hellaswag, hellaswag_limit)
    check_eval_numbers(tokens, ctx, batch_size, hellaswag_limit)


# ----------------------------------------------------------------------------- commands


def eval_cmd(
    models: Annotated[list[str], typer.Argument(
        help="models: Hub id, Hugging Face folder, noln export or noln run folder",
        show_default=False)],
    data: DataOpt = None,
    hellaswag: HellaSwagOpt = None,
    tokens: TokensOpt = None,
    ctx: CtxOpt = None,
    reference: Annotated[str | None, typer.Option(
        "--reference", help="also measure KL / JS / agreement to this model (one of MODELS, "
        "or another)")] = None,
    split: SplitOpt = "train",
    batch_size: BatchOpt = None,
    hellaswag_limit: LimitOpt = None,
    json_out: JsonOpt = None,
    out: OutOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    quiet: QuietOpt = False,
) -> None:
    """Cross-entropy per --data source (95% interval over chunks, median, rare tokens) and
    HellaSwag acc / acc_norm, for each MODEL."""
    _check_first("nothing to evaluate", data, hellaswag, hellaswag_limit, tokens, ctx,
                 batch_size)
    if len(set(models)) != len(models):
        raise NolnError("a model is named twice: give each model once")
    from noln.data import load_blocks, tokenizer_fingerprint
    from noln.evaluate.compare import compare_models
    from noln.evaluate.inputs import chunk_length, short_names

    names = short_names([*models, *([reference] if reference and reference not in models
                                    else [])])
    reference = next((k for k, v in names.items() if v == reference), None)
    sources, items, precision, loaded = _load_inputs(
        names, data, hellaswag, hellaswag_limit, tokens=tokens, ctx=ctx, batch_size=batch_size,
        split=split, json_out=json_out, out=out, precision=precision, device=device, quiet=quiet)
    ctx = chunk_length([m for m, _ in loaded.values()], ctx)

    # models sharing a tokenizer share token blocks; faithfulness needs the same tokens
    groups: dict[str, list[str]] = {}
    for key, (_, tok) in loaded.items():
        groups.setdefault(tokenizer_fingerprint(tok), []).append(key)
    if reference is not None and len(groups) > 1:
        raise NolnError(f"--reference {reference} needs every model to use its tokenizer; "
                        "evaluate models with other tokenizers separately")
    result: ComparisonResult | None = None
    for keys in groups.values():
        tok = loaded[keys[0]][1]
        blocks = {s: load_blocks(src, tok, ctx, max_tokens=tokens, split=split)
                  for s, src in sources.items()}
        part = compare_models({k: loaded[k][0] for k in keys}, tok, blocks, hellaswag=items,
                              reference=reference, delta=None, batch_size=batch_size,
                              hellaswag_name=hellaswag, paths={k: names[k] for k in keys},
                              source_specs=sources, progress=not quiet, precision=precision)
        result = part if result is None else result.merge(part)
    _finish(result, json_out, out)


def compare_cmd(
    original: Annotated[str, typer.Argument(help="the pretrained model", show_default=False)],
    finetuned_with_ln: Annotated[str, typer.Argument(
        help="the control: fine-tuned on the same data and steps with LayerNorm kept",
        show_default=False)],
    no_ln: Annotated[str, typer.Argument(help="the model with LayerNorm removed",
                                         show_default=False)],
    data: DataOpt = None,
    hellaswag: HellaSwagOpt = None,
    tokens: TokensOpt = None,
    ctx: CtxOpt = None,
    split: SplitOpt = "train",
    batch_size: BatchOpt = None,
    hellaswag_limit: LimitOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    quiet: QuietOpt = False,
) -> None:
    """The papers' table: ORIGINAL vs FINETUNED_WITH_LN vs NO_LN on every --data source and
    HellaSwag, faithfulness to ORIGINAL, and the no-LN − with-LN difference."""
    _check_first("nothing to compare on", data, hellaswag, hellaswag_limit, tokens, ctx,
                 batch_size)
    from noln.data import load_blocks, tokenizer_fingerprint
    from noln.evaluate.compare import NO_LN, ORIGINAL, WITH_LN, compare_models
    from noln.evaluate.inputs import chunk_length

    names = {ORIGINAL: original, WITH_LN: finetuned_with_ln, NO_LN: no_ln}
    sources, items, precision, loaded = _load_inputs(
        names, data, hellaswag, hellaswag_limit, tokens=tokens, ctx=ctx, batch_size=batch_size,
        split=split, json_out=json_out, out=out, precision=precision, device=device, quiet=quiet)
    tok = loaded[ORIGINAL][1]
    fingerprint = tokenizer_fingerprint(tok)
    for key, (_, other) in loaded.items():
        if tokenizer_fingerprint(other) != fingerprint:
            raise NolnError(f"'{names[key]}' has a different tokenizer from '{original}': "
                            "the three models must share one to be compared on the same tokens")
    ctx = chunk_length([m for m, _ in loaded.values()], ctx)
    blocks = {s: load_blocks(src, tok, ctx, max_tokens=tokens, split=split)
              for s, src in sources.items()}
    result = compare_models({k: m for k, (m, _) in loaded.items()}, tok, blocks, hellaswag=items,
                            reference=ORIGINAL, delta=(NO_LN, WITH_LN), batch_size=batch_size,
                            hellaswag_name=hellaswag, paths=names, source_specs=sources,
                            progress=not quiet, precision=precision)
    _finish(result, json_out, out)

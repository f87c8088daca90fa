"""``noln linearity`` and ``noln linearize`` (registered in ``noln.cli``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from noln.cli.evaluate import note_checkpoints
from noln.config import check_numbers
from noln.errors import NolnError

console = Console()


def linearity_cmd(
    model: Annotated[str, typer.Argument(help="Hub id, local HF folder, noln export/run folder or "
                                         "noln linearize folder")],
    data: Annotated[str, typer.Option(help="text to run: local .jsonl/.txt/folder, HF dataset "
                                      "name, or 'builtin'")],
    tokens: Annotated[int, typer.Option(help="tokens to score (must exceed the width; the paper "
                                        "used ~14k)")] = 16384,
    ctx: Annotated[int | None, typer.Option(help="tokens per sequence (default: the model's "
                                            "context, at most 1024)")] = None,
    layers: Annotated[str | None, typer.Option(help="blocks to score, e.g. '0,3' (default: all "
                                               "but the last)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the profile as JSON")] =
    None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="write one row per block")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG of the profiles by depth")] = None,
    compare: Annotated[list[str] | None, typer.Option(help="another model to profile on the "
                                                      "same text and overlay (e.g. its no-LN "
                                                      "version); repeatable")] = None,
    geometry: Annotated[bool, typer.Option("--geometry/--no-geometry", help="anisotropy and "
                                           "TwoNN intrinsic dimension too")] = True,
    id_tokens: Annotated[int, typer.Option(help="tokens subsampled for TwoNN (O(m^2))")] = 2048,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    seed: Annotated[int, typer.Option(help="seed of the TwoNN subsample")] = 0,
    precision: Annotated[str, typer.Option(help="float64 (exact) | mixed (float32 products per "
                                           "batch, float64 sums: faster, ~1e-7, but up to ~1e-3 "
                                           "without residual on models with massive "
                                           "activations)")] = "float64",
    forward_precision: Annotated[str, typer.Option(
        help="the model's forward pass: fp32 | bf16 (autocast: matmuls in bf16, hidden states "
        "float32) | auto (bf16 where the device multiplies bf16 natively)")] = "fp32",
    without_first: Annotated[bool, typer.Option(
        "--without-first/--all-positions-only", help="also score every block with position 0 "
        "left out (its massive activation in real LLMs pins the paper's score near 1)")] = True,
) -> None:
    """How linear each block is (Razzhigaev et al. 2024), with and without the residual, in-sample
    and held-out, streamed in float64."""
    # (before the library's imports: a number out of range is answered at once)
    check_numbers(("--tokens", tokens, 1, 16384), ("--batch-size", batch_size, 1, 8),
                  ("--ctx", ctx, 2, 1024))
    if geometry and id_tokens < 3:  # (it blanked the geometry columns without a word)
        raise NolnError(f"--id-tokens {id_tokens} is too few for TwoNN, which needs 3 or more: "
                        "give e.g. --id-tokens 2048, or --no-geometry to leave anisotropy and "
                        "intrinsic dimension out")
    if precision not in ("float64", "mixed"):
        raise NolnError(f"--precision '{precision}' is unknown: use float64 or mixed")
    from noln.data import check_source
    from noln.linearity.report import (
        CSV_COLUMNS,
        parse_layer_list,
        plot_profiles,
        profile_table,
        run_profile,
        write_csv,
    )
    from noln.linearity.score import scorable_layers
    from noln.loading import model_depth
    from noln.outputs import (
        check_distinct_outputs,
        check_figure_file,
        check_output_file,
        write_json,
    )
    from noln.precision import PRECISIONS
    from noln.pretrained import check_models_exist
    from noln.report import json_safe

    if forward_precision not in PRECISIONS:
        raise NolnError(f"--forward-precision '{forward_precision}' is unknown: use "
                        f"{', '.join(PRECISIONS)}")
    check_source(data)
    check_distinct_outputs([("--json", json_out), ("--csv", csv_out), ("--plot", plot)])
    check_output_file(json_out, "--json", kind="json")
    check_output_file(csv_out, "--csv", csv_header=CSV_COLUMNS)
    check_figure_file(plot, "--plot")
    layer_list = parse_layer_list(layers)
    check_models_exist(model, *(compare or []))
    for name in [model, *(compare or [])] if layer_list else []:  # from configs, no weights
        if (n := model_depth(name)) is not None:
            try:
                scorable_layers(n, layer_list)
            except NolnError as e:
                raise NolnError(f"{name}: {e}" if compare else str(e)) from None
    note_checkpoints(model, *(compare or []))
    profiles, metas = [], []
    for name in [model, *(compare or [])]:
        p, meta = run_profile(name, data, tokens, ctx, layer_list, geometry,
                              id_tokens, batch_size, seed, precision, without_first,
                              forward_precision)
        console.print(profile_table(p))
        profiles.append(p)
        metas.append(meta)
    if json_out is not None:
        doc = {**profiles[0].to_dict(), **metas[0]}
        if compare:
            doc["compare"] = [{**p.to_dict(), **m} for p, m in zip(profiles[1:], metas[1:],
                                                                   strict=True)]
        write_json(json_safe(doc), json_out, allow_nan=False)
        console.print(f"wrote {json_out}")
    if csv_out is not None:
        write_csv(profiles, csv_out)
        console.print(f"wrote {csv_out}")
    if plot is not None:
        console.print(f"wrote {plot_profiles(profiles, plot)}")


# ----------------------------------------------------------------------------- linearize


def linearize_cmd(
    model: Annotated[str, typer.Argument(help="Hub id, local HF folder or noln export/run folder")],
    out: Annotated[Path, typer.Option(help="folder for the linearised model, table and plot")],
    layers: Annotated[str, typer.Option(help="'auto' (greedy, most linear first) or block "
                                        "indices such as '3,4'")] = "auto",
    fit: Annotated[str, typer.Option(help="lstsq (closed form) | distill (lstsq, then "
                                     "layer-wise MSE training of the maps only)")] = "lstsq",
    data: Annotated[str, typer.Option(help="text to fit on: local .jsonl/.txt/folder, HF "
                                      "dataset, or 'builtin'")] = "openwebtext",
    eval_data: Annotated[str | None, typer.Option(help="text for the CE table (default: a slice "
                                                  "of --data held back from fitting)")] = None,
    tokens: Annotated[int, typer.Option(help="fitting tokens")] = 16384,
    eval_tokens: Annotated[int, typer.Option(help="CE tokens")] = 16384,
    max_blocks: Annotated[int | None, typer.Option(help="auto: blocks to replace (default: half "
                                                   "of them)")] = None,
    distill_steps: Annotated[int, typer.Option(help="distillation steps")] = 100,
    distill_lr: Annotated[float, typer.Option(help="distillation learning rate (Adam)")] = 1e-3,
    ctx: Annotated[int | None, typer.Option(help="tokens per sequence (default: the model's "
                                            "context, at most 1024)")] = None,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    copy_base: Annotated[bool, typer.Option("--copy-base", help="store the base model's "
                                            "weights in OUT/base instead of a reference")] = False,
) -> None:
    """Replace blocks by least-squares affine maps (optionally distilled) and report CE."""
    from noln.data import check_source, load_blocks
    from noln.evaluate.loss import cross_entropy
    from noln.linearity.replace import (
        SkipBlock,
        decoder_layers,
        distill,
        fit_layers,
        greedy_linearize,
        is_linearized,
        parse_layers,
        plot_curve,
        save_linearized,
        swap_layer,
        swapped,
    )
    from noln.linearity.report import fmt, sequence_length, short_name
    from noln.linearity.score import check_tokens, hidden_size
    from noln.loading import load_model, model_depth
    from noln.outputs import check_output_dir, write_json
    from noln.pretrained import check_models_exist
    from noln.progress import counting_forwards, token_progress, transformers_bars_off
    from noln.report import json_safe

    if fit not in ("lstsq", "distill"):
        raise NolnError(f"--fit '{fit}' is unknown: use lstsq or distill")
    if fit == "distill" and distill_steps < 1:
        raise NolnError("--fit distill needs --distill-steps >= 1")
    check_numbers(("--tokens", tokens, 1, 16384), ("--eval-tokens", eval_tokens, 1, 16384),
                  ("--batch-size", batch_size, 1, 8), ("--ctx", ctx, 2, 1024),
                  ("--max-blocks", max_blocks, 1, 2), ("--distill-steps", distill_steps, 0, 100))
    if not (math.isfinite(distill_lr) and distill_lr > 0):
        raise NolnError(f"--distill-lr {distill_lr} is invalid: must be a finite number > 0; "
                        "e.g. --distill-lr 1e-3")
    check_source(data, eval_data)
    parse_layers(layers, None)  # its syntax; its depth below, once the outputs are checked
    check_output_dir(out, "--out")
    if Path(model).expanduser().exists() and Path(model).expanduser().resolve() == out.resolve():
        raise NolnError(f"--out '{out}' is the model it reads: give a new folder")
    if out.is_dir() and any(out.iterdir()) and not is_linearized(out):
        # the model's files (tokenizer, maps, base/) would land among the user's own
        raise NolnError(f"--out '{out}' holds files and is not a noln linearize output: give a "
                        "new or empty folder (a previous `noln linearize --out` folder is "
                        "written over)")
    check_models_exist(model)
    parse_layers(layers, model_depth(model))  # the depth from the model's config: no weights
    note_checkpoints(model)
    net, tok = load_model(model)
    block_list, returns_tuple = decoder_layers(net)
    chosen = parse_layers(layers, len(block_list))
    ctx = sequence_length(net, ctx)
    check_tokens(tokens, hidden_size(net))
    n_fit, n_eval = max(1, tokens // ctx), max(1, eval_tokens // ctx)
    if eval_data is None:
        blocks = load_blocks(data, tok, ctx, max_tokens=(n_fit + n_eval) * ctx)
        if len(blocks) < n_fit + n_eval:
            raise NolnError(f"'{data}' has only {len(blocks) * ctx:,} tokens, fewer than --tokens "
                            f"+ --eval-tokens = {(n_fit + n_eval) * ctx:,}: lower them or give "
                            "--eval-data")
        fit_blocks, eval_blocks = blocks[:n_fit], blocks[n_fit:]
    else:
        fit_blocks = load_blocks(data, tok, ctx, max_tokens=n_fit * ctx)
        eval_blocks = load_blocks(eval_data, tok, ctx, max_tokens=n_eval * ctx)
    check_tokens(fit_blocks.size, hidden_size(net))
    out.mkdir(parents=True, exist_ok=True)
    if copy_base:
        foreign = {type(m).__module__ for m in net.modules()
                   if not type(m).__module__.startswith(("transformers.", "torch."))}
        if foreign:
            raise NolnError(f"--copy-base stores plain transformers models only, and {model} has "
                            f"modules from {', '.join(sorted(foreign))}: drop --copy-base (the "
                            "folder then refers to the base model by path)")
        with transformers_bars_off():
            net.save_pretrained(out / "base")
        tok.save_pretrained(out / "base")

    per_distill = 2 * distill_steps * batch_size * ctx  # teacher and student forwards
    if chosen is None:
        k = max_blocks if max_blocks is not None else max(1, len(block_list) // 2)
        work = eval_blocks.size + k * (fit_blocks.size + 2 * eval_blocks.size + (
            per_distill + eval_blocks.size if distill_steps > 0 else 0))
    else:
        work = 3 * eval_blocks.size + len(chosen) * fit_blocks.size + (
            per_distill + eval_blocks.size if fit == "distill" else 0)
    with token_progress(f"linearize {short_name(model)}", work, console=console) as bar, \
            counting_forwards(net, bar):
        if chosen is None:
            table = Table(title=f"Greedy linearisation of {model}: CE on {eval_blocks.size:,} "
                                "tokens")
            for col in ("step", "block", "score", "held-out", "drop", "linear", "linear+distil"):
                table.add_column(col, justify="right")

            def log(row: dict) -> None:
                console.print(f"step {row['step']}: block {row['block']}, CE drop "
                              f"{fmt(row['ce_drop'])} / linear {fmt(row['ce_linear'])} / distil "
                              f"{fmt(row['ce_distill'])}")

            rows, maps = greedy_linearize(net, fit_blocks, eval_blocks, k,
                                          distill_steps=distill_steps, distill_lr=distill_lr,
                                          batch_size=batch_size, log=log)
            for r in rows:
                table.add_row(str(r["step"]), "—" if r["block"] is None else str(r["block"]),
                              fmt(r["score"]), fmt(r["score_heldout"]), fmt(r["ce_drop"]),
                              fmt(r["ce_linear"]), fmt(r["ce_distill"]))
            console.print(table)
            final = maps["distill" if fit == "distill" else "lstsq"]
            report = {"model": model, "data": data, "eval_data": eval_data or f"{data} (held back)",
                      "fit_tokens": int(fit_blocks.size), "eval_tokens": int(eval_blocks.size),
                      "distill_steps": distill_steps, "distill_lr": distill_lr, "steps": rows}
            write_json(json_safe(report), out / "linearize.json")
            console.print(f"wrote {out / 'linearize.json'} and "
                          f"{plot_curve(rows, out / 'linearize_curve.png', short_name(model))}")
        else:
            base_ce = cross_entropy(net, eval_blocks, batch_size)
            with swapped(net, {i: SkipBlock(returns_tuple) for i in chosen}):
                drop_ce = cross_entropy(net, eval_blocks, batch_size)
            final = fit_layers(net, fit_blocks, chosen, batch_size)
            with swapped(net, final):
                lin_ce = cross_entropy(net, eval_blocks, batch_size)
            rows = [("original", base_ce.mean), ("drop blocks", drop_ce.mean),
                    ("linear (least squares)", lin_ce.mean)]
            if fit == "distill":
                distill(net, final, fit_blocks, distill_steps, distill_lr, batch_size)
                with swapped(net, final):
                    ce = cross_entropy(net, eval_blocks, batch_size).mean
                    rows.append(("linear + distil", ce))
            table = Table(title=f"{model} with blocks {','.join(map(str, chosen))} replaced: CE on "
                                f"{eval_blocks.size:,} tokens")
            table.add_column("variant")
            table.add_column("CE", justify="right")
            table.add_column("vs original", justify="right")
            for name, ce in rows:
                table.add_row(name, f"{ce:.4f}", f"{ce - base_ce.mean:+.4f}")
            console.print(table)
            report = {"model": model, "layers": chosen, "fit": fit, "data": data,
                      "eval_data": eval_data or f"{data} (held back)",
                      "fit_tokens": int(fit_blocks.size), "eval_tokens": int(eval_blocks.size),
                      "ce": {name: ce for name, ce in rows}}
            write_json(report, out / "linearize.json")

    for i, m in final.items():
        swap_layer(net, i, m)
    save_linearized(net, tok, model, out,
                    extra={"fit": fit, "fit_data": data, "fit_tokens": int(fit_blocks.size)},
                    base_copy="base" if copy_base else None)
    console.print(f"saved the linearised model ({fit}, blocks "
                  f"{','.join(map(str, sorted(final)))}) to {out}; load it with "
                  "noln.linearity.load_linearized")

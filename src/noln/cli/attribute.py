"""``noln attribute``: direct logit attribution of one logit, for one or more models
(registered in ``noln.cli``; the maths is ``noln.attribute``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from noln.cli.evaluate import note_checkpoints
from noln.errors import NolnError


def attribute_cmd(
    models: Annotated[list[str], typer.Argument(
        help="one or more models: noln export or run folder (no LN), or any Hugging Face folder "
        "(with LN: the frozen-LN-scale approximation and its error are shown)",
        show_default=False)],
    text: Annotated[str, typer.Option("--text", help="the input text", show_default=False)],
    target: Annotated[str | None, typer.Option(
        "--target", help="the token whose logit to attribute, e.g. ' mat' (default: the first "
        "model's top prediction)")] = None,
    position: Annotated[int, typer.Option(
        "--position", help="token position to read the logit at (negative: from the end)")] = -1,
    bos: Annotated[bool, typer.Option("--bos/--no-bos", help="prepend the BOS / end-of-text "
                                      "token")] = True,
    top: Annotated[int, typer.Option("--top", help="components shown in the table and plot")]
    = 15,
    plot: Annotated[Path | None, typer.Option("--plot", help="write a bar chart of the top "
                                              "components here (PNG)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every component's "
                                                  "attribution here as JSON")] = None,
    device: Annotated[str, typer.Option("--device", help="'auto', 'cpu', 'cuda', ...")] = "cpu",
) -> None:
    """Direct logit attribution of one logit to every component (embeddings, each head, each
    MLP, biases). Exact for a no-LN model; for a model with LN, shows the usual frozen-LN-scale
    approximation next to each component's exact direct effect."""
    import torch

    from noln.attribute import (
        attribute_logit,
        encode_text,
        plot_attribution,
        single_token_id,
        table_rows,
    )
    from noln.evaluate.inputs import resolve_device, short_names
    from noln.interop import check_transformer_lens_model, hooked_transformer
    from noln.loading import model_tokenizer
    from noln.outputs import (
        check_distinct_outputs,
        check_figure_file,
        check_output_file,
        write_json,
    )
    from noln.report import json_safe, rich_table

    if len(set(models)) != len(models):
        raise NolnError("a model is named twice: give each model once")
    if top < 1:
        raise NolnError(f"--top {top}: show at least 1 component")
    check_distinct_outputs([("--plot", plot), ("--json", json_out)])
    check_figure_file(plot, "--plot")
    check_output_file(json_out, "--json", kind="json")
    dev = resolve_device(device)
    names = short_names(models)
    for path in names.values():  # every model, before the first one loads
        check_transformer_lens_model(path)
    # the text, --position and --target with the models' tokenizers, before any weights load
    tok = model_tokenizer(models[0])
    ids = encode_text(tok, text, bos)
    for name in models[1:]:
        if encode_text(model_tokenizer(name), text, bos) != ids:
            raise NolnError(f"'{name}' tokenizes the text differently from "
                            f"'{models[0]}': attribute models that share a tokenizer together")
    if not -len(ids) <= position < len(ids):
        raise NolnError(f"--position {position} is outside the {len(ids)} tokens of the text "
                        f"(use 0..{len(ids) - 1}, or -1 for the last)")
    pos = position % len(ids)
    target_id = None if target is None else single_token_id(tok, target)
    note_checkpoints(*names.values())
    tls = {key: hooked_transformer(path, device=dev, allow_ln=True)
           for key, path in names.items()}
    first = next(iter(tls.values()))
    n_ctx = min(tl.cfg.n_ctx for tl in tls.values())
    if len(ids) > n_ctx:
        raise NolnError(f"the text is {len(ids)} tokens, longer than the context of {n_ctx}: "
                        "shorten it")
    tokens = torch.tensor([ids])
    if target_id is None:
        with torch.no_grad():
            target_id = int(first(tokens.to(first.cfg.device))[0, pos].argmax())
        target = tok.decode([target_id])
    results = [attribute_logit(tl, tokens, target_id, pos, name=key) for key, tl in tls.items()]
    pieces = tok.convert_ids_to_tokens(ids)
    at = tok.decode([ids[pos]])
    title = (f"Direct logit attribution of {target!r} (id {target_id}) at position {pos} "
             f"({at!r})")
    console = Console()
    console.print(rich_table(*table_rows(results, top), title=title))
    for r in results:
        if r.has_ln:
            errs = [abs(e) for e in r.errors]
            console.print(
                f"[bold]{r.model}[/] (with LN): frozen-LN-scale DLA sums to the logit "
                f"(|logit − sum| {abs(r.sum_error):.1e}), but per component it is off from the "
                f"exact direct effect by up to {max(errs):.4f} (mean {sum(errs) / len(errs):.4f} "
                f"over {len(errs)} components); the exact direct effects sum to "
                f"{sum(r.direct):+.4f}, not the logit {r.logit:+.4f}.", highlight=False)
        else:
            console.print(f"[bold]{r.model}[/] (no LN): exact; components sum to the logit "
                          f"{r.logit:+.4f} within {abs(r.sum_error):.1e}.", highlight=False)
    if plot is not None:
        console.print(f"wrote {plot_attribution(results, plot, top, title)}")
    if json_out is not None:
        doc = {"text": text, "tokens": pieces, "token_ids": ids, "position": pos,
               "target": target, "target_id": target_id, "bos": bos,
               "models": {r.model: {"path": names[r.model], **r.to_dict()} for r in results}}
        write_json(json_safe(doc), json_out, indent=1)
        console.print(f"wrote {json_out}")

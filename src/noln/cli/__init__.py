"""The ``noln`` command: demo, pretrain, remove, export, sites, eval, compare, linearity,
linearize, attribute. Every user-fixable problem is one red line and exit code 2."""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from noln.cli.attribute import attribute_cmd
from noln.cli.evaluate import check_hellaswag_limit, compare_cmd, eval_cmd, note_checkpoints
from noln.cli.linearity import linearity_cmd, linearize_cmd
from noln.cli.schema import command_line_settings, with_settings
from noln.config import (
    PretrainConfig,
    RemoveConfig,
    check_one_length,
    flag_name,
    make_config,
    merge_layers,
    read_config_file,
)
from noln.errors import Interrupted, NolnError, raise_interrupt
from noln.trust import set_trust_remote_code

app = typer.Typer(help="Remove normalisation from pretrained transformers, evaluate what is "
                  "left, and measure layer linearity.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console()


@app.callback()
def _options(
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="run Python code shipped with a model folder or Hub repo "
        "(config.json auto_map); off by default, so such a model is refused. Any position: "
        "`noln eval MODEL --trust-remote-code` works too")] = False,
) -> None:
    set_trust_remote_code(trust_remote_code)


# the folder of the run a command is training, once the command has resolved it (from --out,
# --resume, a --config file's `out` or the default runs/MODEL), for the Ctrl-C hint
_RUN_FOLDER: dict[str, Path] = {}
# the step a training loop saved when Ctrl-C stopped it between steps (typer turns the
# exception into exit code 130, so the hint finds it here)
_INTERRUPTED: list[Interrupted] = []


def _noting_interrupts(command: Callable) -> Callable:
    """``command``, keeping the ``Interrupted`` it stops with for the Ctrl-C hint."""
    @functools.wraps(command)
    def run(**values: Any) -> Any:
        try:
            return command(**values)
        except Interrupted as e:
            _INTERRUPTED.append(e)
            raise
    return run


def remove(
    model: Annotated[str | None, typer.Argument(
        help="Hub id (gpt2, gpt2-medium ...), local Hugging Face folder or .gguf file")] = None,
    settings: Annotated[list[str] | None, typer.Argument(
        metavar="[KEY=VALUE]...", show_default=False,
        help="any setting of the run as key=value, nested ones by dots: fixed.gaps.mlp_in=4 "
        "adaptive.tolerance=0.02 betas=[0.9,0.99] (merge order: preset < --config < command "
        "line)")] = None,
    control: Annotated[bool, typer.Option("--control", help="also run the --keep-ln control "
                                          "(OUT/control) and print the 3-column table")] = False,
    control_only: Annotated[bool, typer.Option(
        "--control-only", help="with --resume RUN: train only the pair's control, here, while "
        "its removal trains in another process (a second GPU or CPU core); whichever ends last "
        "makes the table")] = False,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this folder")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of settings (the command line "
                                                "overrides it)")] = None,
    eval: Annotated[list[str] | None, typer.Option(help="extra NAME=SOURCE text for the CE "
                                                   "table (repeatable)")] = None,
    hellaswag: Annotated[str | None, typer.Option(
        help="with --control: also score HellaSwag ('hf' or bare flag: the Hub's validation "
        "split; or a local .jsonl)")] = None,
    hellaswag_limit: Annotated[int | None, typer.Option(help="only the first N items")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the noln run already in "
                                            "--out (only the files noln wrote)")] = False,
    **flags: Any,
) -> None:
    """Fine-tune MODEL on --data while removing every norm; export and evaluate it.

    Every setting has a flag or is given as KEY=VALUE (the README: "Settings").
    With --resume RUN, the run keeps its model, data, ctx, batch size, seed and schedule;
    --lr, --steps/--tokens, --checkpoint-every, --format and the precision/memory options may
    change (a new --lr also resets the guard's lowered one)."""
    settings = list(settings or [])
    if model is not None and "=" in model and model.split("=", 1)[0].split(".")[0] in \
            RemoveConfig.model_fields and not Path(model).exists():
        settings.insert(0, model)  # `noln remove --resume RUN lr=1e-4`: no model, a setting
        model = None
    overrides = command_line_settings(RemoveConfig, flags, settings)
    check_one_length(overrides)
    if model is not None:
        overrides["model"] = model
    if control_only:
        if resume is None:
            raise NolnError("--control-only trains the control of a pair already begun: "
                            "`noln remove --resume RUN --control-only` (RUN: the folder of "
                            "`noln remove ... --control`, once its removal has started)")
        given = sorted({"steps", "tokens", "keep_ln"} & set(overrides))
        if given:  # the control trains as the removal does, which this process does not touch
            raise NolnError(f"--control-only takes no {flag_name((given[0],))}: the control "
                            "trains the removal's length with LN kept; lengthen the pair with "
                            "`noln remove --resume RUN --control --steps N`")
        control = True
    check_hellaswag_limit(hellaswag, hellaswag_limit)
    if hellaswag is not None and not control:
        raise NolnError("--hellaswag goes with --control (the 3-model table); for one model use "
                        "`noln eval MODEL --hellaswag`")
    if hellaswag_limit is not None and hellaswag_limit < 1:
        raise NolnError(f"--hellaswag-limit {hellaswag_limit} is invalid: must be >= 1; e.g. "
                        "--hellaswag-limit 1000")
    if resume is not None:
        if overwrite:
            raise NolnError("--resume continues a run and --overwrite replaces one: give one "
                            "of them")
        if config is not None:
            raise NolnError("--resume takes its settings from the run's config.yaml: drop "
                            "--config (flags such as --lr may still change, see --help)")
        out = overrides.pop("out", None)
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise NolnError(f"--out {out} differs from --resume {resume}: a resumed run stays "
                            "in its folder; drop --out")
        model, data = overrides.pop("model", None), overrides.pop("data", None)
        _RUN_FOLDER["remove"] = Path(resume)
        remove_layernorm, remove_with_control, sets = _removal(eval, overrides)
        if control:
            _control_done(remove_with_control(model, data, resume, resume=True, eval_sets=sets,
                                              hellaswag=hellaswag,
                                              hellaswag_limit=hellaswag_limit,
                                              control_only=control_only, **overrides))
            return
        result = remove_layernorm(model, data, resume=resume, eval_sets=sets, **overrides)
        _print_summary(result.summary)
        return
    if config is not None:  # the file's values under the command line's
        overrides = merge_layers(read_config_file(config), overrides)
    if overrides.get("model") is None:
        raise NolnError("no model given: `noln remove gpt2 --data openwebtext --out runs/gpt2`")
    overrides.setdefault("out", Path("runs") / Path(str(overrides["model"])).name)
    cfg = make_config(**overrides)  # every value checked now, before anything loads
    _RUN_FOLDER["remove"] = Path(cfg.out)
    remove_layernorm, remove_with_control, sets = _removal(eval, overrides)
    if control:
        model, data, out = overrides.pop("model"), overrides.pop("data", None), \
            overrides.pop("out")
        _control_done(remove_with_control(model, data, out, eval_sets=sets, hellaswag=hellaswag,
                                          hellaswag_limit=hellaswag_limit, overwrite=overwrite,
                                          **overrides))
        return
    result = remove_layernorm(config=cfg, eval_sets=sets, overwrite=overwrite)
    _print_summary(result.summary)


app.command("remove")(_noting_interrupts(with_settings(remove, RemoveConfig, skip=("model",))))


def _removal(eval_specs: list[str] | None, overrides: dict):
    """The removal entry points and the texts to evaluate on: the library, loaded once the
    settings are known to be valid (so a bad value is answered at once, before torch loads).
    The sets of ``overrides`` (a --config file's ``eval_sets``, or an ``eval_sets=`` setting)
    move into the returned ones, under --eval's, so each reaches the library once."""
    from noln.evaluate.inputs import parse_sources
    from noln.remove import remove_layernorm, remove_with_control

    sets = {**(overrides.pop("eval_sets", None) or {}), **parse_sources(eval_specs or [])}
    return remove_layernorm, remove_with_control, sets


def _control_done(result: dict) -> None:
    """A --control pair that stopped at its unfinished removal exits as `noln remove` does."""
    if "no_ln" in result and "control" not in result:
        _print_summary(result["no_ln"])
    elif "control" in result and "no_ln" not in result:  # --control-only, the removal not done
        _print_summary(result["control"])


def _print_summary(summary: dict) -> None:
    from noln.report import ce_rows, rich_table

    table = {k: {"before": summary["ce_before"][k], "after": v}
             for k, v in summary["ce_after"].items() if k in summary["ce_before"]}
    if table:
        header, rows = ce_rows(table, reference=None, control="before")
        console.print(rich_table(header, rows, title="Cross-entropy before / after fine-tuning"))
    console.print(f"{len(summary['frozen'])} sites frozen, {summary['tokens']:,} tokens, "
                  f"{summary['train_wall_time_s']:.0f}s training; exports: "
                  f"{', '.join(summary['exports'].values()) or 'none'}")
    if parts := summary.get("time_s"):  # where this command's time went besides its steps
        console.print(f"this command: {parts['wall']:,.0f}s = " + ", ".join(
            f"{name} {seconds:,.0f}s" for name, seconds in parts.items() if name != "wall"),
            highlight=False, soft_wrap=True)
    if summary.get("unfinished"):  # the run is kept, but it did not do what was asked
        raise NolnError(summary["unfinished"])


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="run folder or checkpoint .pt file")],
    out: Annotated[Path, typer.Option(help="folder to write")],
    format: Annotated[str, typer.Option(help="hf (eps trick) | clean (norms folded)")] = "hf",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
) -> None:
    """Export a run's model for plain transformers (hf) or with the norms folded away (clean)."""
    import torch

    from noln.arch import install
    from noln.export import EXPORT_FORMATS, check_export_target, export_model
    from noln.loading import load_run_model
    from noln.outputs import check_output_dir
    from noln.run import RunFolder

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise NolnError(f"unknown --dtype '{dtype}': use {', '.join(dtypes)}")
    if format not in EXPORT_FORMATS:
        raise NolnError(f"unknown --format '{format}': use {' or '.join(EXPORT_FORMATS)}")
    run = RunFolder(checkpoint if checkpoint.is_dir() else checkpoint.parent.parent)
    check_export_target(out, source=run.root)  # before loading anything
    check_output_dir(out.parent, "--out")
    note_checkpoints(checkpoint)
    model, tok = load_run_model(checkpoint)
    adapter = install(model)
    events = [r for r in run.read_log() if r.get("event") == "remove"]
    path = export_model(adapter, tok, out, format, dtypes[dtype], events, source=run.root)
    console.print(f"wrote {format} export ({dtype}) to {path}")


@app.command()
def branch(
    run: Annotated[Path, typer.Argument(help="the run folder to branch from (only read)")],
    step: Annotated[int, typer.Option(help="the step of a checkpoint it kept "
                                      "(checkpoint_keep=N keeps every N-th), or of its last "
                                      "one (a finished run's end)")],
    out: Annotated[Path, typer.Option(help="the new run folder")],
    settings: Annotated[list[str] | None, typer.Argument(
        help="KEY=VALUE: a new schedule, fixed.*, taper, taper_shape or outlier_clip for the "
             "removals still to come (those the checkpoint made stand)")] = None,
) -> None:
    """A new run that goes on from a kept checkpoint of RUN, to try something else from there:
    continue it with `noln remove --resume OUT` and any setting --resume may change."""
    from noln.config import parse_settings
    from noln.run import branch_run

    given = parse_settings(settings or [])
    new = branch_run(run, step, out, given)
    changed = "".join(f", {k} {v}" for k, v in given.items())
    console.print(f"{new.root}: {run} as it was at step {step}{changed}; continue it with "
                  f"`noln remove --resume {new.root}` (and any setting --resume may change)",
                  highlight=False, soft_wrap=True)


@app.command()
def sites(model: Annotated[str, typer.Argument(
        help="Hub id, local folder, .gguf file or noln run folder")],
          preset: Annotated[str | None, typer.Option(
              help="the order of this preset's schedule (a Hub id, as `noln remove --preset`)"
          )] = None) -> None:
    """List a model's removal sites in the order a run removes them (from its config: no
    weights load): the family's default; a preset's (the model's Hub id's, or --preset); a run
    folder's own (its order and schedule file)."""
    from noln.arch import skeleton
    from noln.config import preset_for, read_config_file
    from noln.pretrained import check_models_exist, load_config
    from noln.run import RunFolder
    from noln.schedule import removal_order

    run = RunFolder(model)
    settings = preset_for(model, preset)
    if run.config.is_file():  # a run folder: the sites of the model it removes from
        if preset is not None:
            raise NolnError("--preset is for a model; a run folder removes in its own order")
        settings = read_config_file(run.config)
        model = str(settings["model"])
    check_models_exist(model)
    shell = skeleton(load_config(model))
    order = removal_order(str(settings.get("schedule", "adaptive")), shell.site_names(),
                          shell.site_kinds(), settings.get("order"))
    for i, name in enumerate(order):
        console.print(f"{i:3d}  {name}")


@app.command()
def status(run: Annotated[Path, typer.Argument(
        help="a run folder (`noln remove --out`, `noln pretrain --out`)", show_default=False)],
           ) -> None:
    """Where a run stands, without loading it: training now or stopped, step of steps, sites
    frozen, recent loss and speed, time left, stages; a pair's control and table too."""
    from noln.run import run_status

    for line in status_lines(run_status(run)):
        console.print(line, highlight=False, soft_wrap=True)


def status_lines(st: dict, indent: str = "") -> list[str]:
    """``noln status``'s lines for ``noln.run.run_status``'s dict (markup escaped)."""
    total = st["total_steps"]
    of = f" of {total:,} ({100 * st['step'] / total:.0f}%)" if total else ""
    state = {"training": f"training now ({escape(str(st['holder']))})", "stopped": "stopped",
             "finished": "finished", "ended unfinished": "ended unfinished (sites still live)",
             "not begun": "not begun"}[st["state"]]
    what = {"control": "with-norm control"}.get(st["kind"], st["kind"])
    lines = [f"{indent}[bold]{escape(st['run'])}[/]: {what}, {state}, at step {st['step']:,}{of}"]
    sub = indent + "  "
    if st["model"]:
        lines.append(f"{sub}{escape(str(st['model']))} on {escape(str(st['data']))}")
    if st["sites"] and st["kind"] == "removal" and st["frozen"] is not None:
        lines.append(f"{sub}{st['frozen']} of {st['sites']} norm sites frozen")
    if st["train_loss"] is not None:
        pace = f", {st['seconds_per_step']:.1f} s a step" if st["seconds_per_step"] else ""
        left = st["seconds_left"]
        eta = f": ~{left / 3600:.1f} h to go at that pace" if left and left >= 3600 else \
            f": ~{left / 60:.0f} min to go at that pace" if left and left >= 60 else \
            ": under a minute to go" if left else ""
        lines.append(f"{sub}train CE {st['train_loss']:.3f}{pace} (the last "
                     f"{st['recent_steps']} steps){eta}")
    if st["checkpoint_step"] is not None and st["state"] in ("training", "stopped"):
        lines.append(f"{sub}last checkpoint at step {st['checkpoint_step']:,}")
    if st["resume"]:
        lines.append(f"{sub}continue it with {escape(st['resume'])}")
    for stage in st["stages"]:
        settings = ", ".join(f"{k}={v}" for k, v in (stage["set"] or {}).items())
        lines.append(f"{sub}stage at step {stage['step']:,} ({escape(settings)}): "
                     + ("done" if stage["done"] else "to come"))
    ce = ((st["summary"] or {}).get("ce_after") or {}).get("heldout") or {}
    if "mean" in ce:
        lines.append(f"{sub}held-out CE {ce['mean']:.4f} at the end")
    if "control" in st:
        lines += status_lines(st["control"], sub)
        lines.append(f"{sub}table: " + (escape(str(Path(st["run"]) / "table.md")) if st["table"]
                                        else "not yet (made once both runs are done)"))
    return lines


def pretrain(
    settings: Annotated[list[str] | None, typer.Argument(
        metavar="[KEY=VALUE]...", show_default=False,
        help="any setting as key=value, e.g. betas=[0.9,0.99] (the flags are the same "
        "settings)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue a killed run in OUT")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the pretraining run "
                                            "already in --out (only the files noln wrote)")] =
    False,
    **flags: Any,
) -> None:
    """Pretrain a small model with its norms from scratch (own BPE tokenizer)."""
    from noln.pretrain import pretrain as run_pretrain

    given = command_line_settings(PretrainConfig, flags, list(settings or []))
    check_one_length(given)
    if "data" not in given or "out" not in given:
        raise NolnError("noln pretrain needs --data SOURCE and --out FOLDER (the model is "
                        "written to OUT/model)")
    r = run_pretrain(given.pop("data"), given.pop("out"), resume=resume, overwrite=overwrite,
                     **given)
    ce = r.summary["val_ce"]
    console.print(f"pretrained {r.summary['n_params']:,} parameters on {r.summary['tokens']:,} "
                  f"tokens; val CE {ce['mean']:.4f} ± {ce['ci95']:.4f}; model in {r.out}")


app.command("pretrain")(_noting_interrupts(with_settings(pretrain, PretrainConfig)))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for models, logs and plots")] =
    Path("noln-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="a much smaller run (for tests)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Offline, end to end: pretrain a tiny model on Python's own docs, remove its LayerNorm."""
    from noln.demo import run_demo

    run_demo(out, quick=quick, progress=not quiet)


app.command("eval")(eval_cmd)
app.command("compare")(compare_cmd)
app.command("linearity")(linearity_cmd)
app.command("linearize")(linearize_cmd)
app.command("attribute")(attribute_cmd)
# the list of commands in `noln --help` shows each docstring's first paragraph as one line
# (its hard line breaks were kept, breaking sentences mid-way)
for _command in app.registered_commands:
    if _command.short_help is None and _command.callback.__doc__:
        _command.short_help = " ".join(_command.callback.__doc__.split("\n\n")[0].split())


# options whose value may be left out: a bare `--hellaswag` means the Hub's HellaSwag
OPTIONAL_VALUES = {"--hellaswag": "hf"}


def fill_optional_values(argv: list[str]) -> list[str]:
    """Give a bare optional-value option (last, or followed by another option) its default;
    click has no optional values for string options."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in OPTIONAL_VALUES and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUES[arg])
    return out


def _interrupt_hint(argv: list[str], e: BaseException | None = None) -> str:
    """What to do after Ctrl-C: a training command names the way to continue it (and the step
    it saved, where the loop stopped between steps: ``Interrupted``)."""
    command = next((a for a in argv if not a.startswith("-")), "")

    def value(flag: str) -> str | None:
        return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag), None)

    e = e if isinstance(e, Interrupted) else next(reversed(_INTERRUPTED), None)
    kept = f"saved at step {e.step}" if e is not None else "the run keeps its last checkpoint"
    if command == "remove":
        from noln.run import RunFolder

        run = _RUN_FOLDER.get("remove") or value("--resume") or value("--out")
        if e is None and run and not RunFolder(Path(run)).has_checkpoint():
            # stopped while loading or measuring the original (minutes on a real model): the
            # run removed what it had begun, and there is nothing to continue
            return "interrupted before the run's first checkpoint: nothing was kept; run the " \
                "same command again"
        resume = f"noln remove --resume {shlex.quote(str(run)) if run else 'OUT'}"
        pair = next((a for a in ("--control", "--control-only") if a in argv), None)
        if pair is not None:  # the pair goes on as it was asked for, table included
            resume += f" {pair}" + "".join(f" {flag} {shlex.quote(v)}" for flag in (
                "--hellaswag", "--hellaswag-limit") if (v := value(flag)) is not None)
        return f"interrupted: {kept}; continue it with `{resume}`"
    if command == "pretrain":
        return f"interrupted: {kept}; add --resume to the same command"
    return "interrupted"


def _expected(e: BaseException) -> str | None:
    """One line for failures a user can act on that are not NolnErrors (disk, memory)."""
    import torch

    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return ("out of memory: lower --batch-size / --micro-batch-size or --ctx, or use "
                "--grad-checkpointing (details: NOLN_DEBUG=1)")
    if isinstance(e, OSError) and e.errno is not None:
        where = f" ('{e.filename}')" if e.filename else ""
        return f"{e.strerror or type(e).__name__}{where}: check the path, its permissions and " \
            "free disk space"
    return None


def main(argv: list[str] | None = None) -> None:
    """The ``noln`` entry point: every failure is one line on stderr (exit 2 for anything the
    user can fix, 1 for a bug, 130 for Ctrl-C); ``NOLN_DEBUG=1`` prints the whole traceback."""
    argv = fill_optional_values(sys.argv[1:] if argv is None else argv)
    _INTERRUPTED.clear()  # (one process may call main more than once: tests, notebooks)
    if "--trust-remote-code" in argv:  # a global option, accepted after the command too
        argv = ["--trust-remote-code", *(a for a in argv if a != "--trust-remote-code")]
    debug = os.environ.get("NOLN_DEBUG", "") not in ("", "0")
    err = Console(stderr=True)
    if threading.current_thread() is threading.main_thread():
        # `kill` and cluster schedulers stop a run with SIGTERM; a shell's background job
        # ignores SIGINT: both end the run as Ctrl-C does, with the command that resumes it
        signal.signal(signal.SIGTERM, raise_interrupt)

    def fail(message: str, code: int, e: BaseException | None = None) -> None:
        if debug and e is not None:
            chain = e
            while chain is not None:  # show the context noln's `from None` hid
                chain.__suppress_context__ = False
                chain = chain.__cause__ or chain.__context__
            traceback.print_exception(e)
        err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(code)

    try:
        # standalone_mode=False: exceptions reach us (typer would turn Ctrl-C into exit 130
        # before noln could say how to continue)
        code = app(args=argv, prog_name="noln", standalone_mode=False)
    except NolnError as e:
        fail(str(e), 2, e)
    except typer.Abort:
        err.print("[yellow]aborted[/]")
        sys.exit(1)
    except KeyboardInterrupt as e:
        err.print(f"[yellow]{escape(_interrupt_hint(argv, e))}[/]", highlight=False,
                  soft_wrap=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last resort: one line, never a traceback
        if hasattr(e, "exit_code") and hasattr(e, "format_message"):  # click's usage errors
            message = e.format_message()
            ctx = getattr(e, "ctx", None)
            if not message and ctx is not None:  # a command given no arguments: its help
                typer.echo(ctx.get_help())
                sys.exit(e.exit_code)
            command = f"noln {ctx.command_path.split(' ', 1)[1]}" if ctx is not None and \
                " " in ctx.command_path else "noln"
            fail(f"{message} (see `{command} --help`)", e.exit_code)
        expected = _expected(e)
        if expected is not None:
            fail(expected, 2, e)
        fail(f"internal error ({type(e).__name__}: {' '.join(str(e).split())[:300]}): please "
             "report it; NOLN_DEBUG=1 shows the traceback", 1, e)
    if code == 130:  # typer's own handling of Ctrl-C in a command
        err.print(f"[yellow]{escape(_interrupt_hint(argv))}[/]", highlight=False, soft_wrap=True)
    if isinstance(code, int) and code:
        sys.exit(code)

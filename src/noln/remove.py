"""The removal recipe: ``remove_layernorm`` = preflight -> ``setup`` -> ``train`` -> ``finish``.

- preflight: the run's settings (``noln.config``: preset < ``--config`` file < arguments; or
  the run's own on ``--resume``), every value checked before anything loads, and the run folder
  claimed (``noln.run``);
- ``setup``: the model (pretrained, or rebuilt from the run's ``base/`` on resume) with its
  FakeNorms, the schedule, the token blocks, the run's files and the CE before training;
- ``train``: ``noln.train.Trainer`` to the last step (checkpoints, resume, guard);
- ``finish``: CE after, exports, ``summary.json`` and ``loss.png``.

``remove_with_control`` runs the with-norm control beside the removal and builds the papers'
table. Where each file lives is ``noln.run.RunFolder``'s business.
"""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from rich.console import Console
from rich.markup import escape
from torch import nn
from transformers import AutoModelForCausalLM

from noln.arch import NormAdapter, canonical_site, context_length, install, skeleton
from noln.config import (
    HELDOUT,
    RemoveConfig,
    Stage,
    check_stages_reached,
    looks_local,
    make_config,
    merge_layers,
    presets_named,
    prune_fade_problem,
    read_config_file,
    resume_config,
    settings_change,
    stage_due,
    validate_config,
)
from noln.data import (
    BUILTIN,
    check_source,
    is_local,
    load_blocks,
    load_tokens,
    pack,
    separator_id,
)
from noln.errors import NolnError
from noln.evaluate.compare import NO_LN, ORIGINAL, WITH_LN, compare_models
from noln.evaluate.hellaswag import check_endings_fit, load_hellaswag
from noln.evaluate.inputs import load_models, resolve_device
from noln.evaluate.loss import cross_entropy
from noln.export import check_export_target, export_model
from noln.gguf import declared_name, find_gguf
from noln.loading import load_model
from noln.outputs import marked_json, marked_markdown
from noln.precision import describe
from noln.pretrained import check_models_exist, load_config, load_pretrained, load_tokenizer
from noln.report import (
    json_safe,
    paired_training_gap,
    plot_loss,
    rich_table,
    training_gap_markdown,
)
from noln.run import RunClaim, RunFolder, claim_run_folder, lock_holder, torn_checkpoint_note
from noln.schedule import Schedule, build_schedule, check_gap_roles
from noln.sharding import full_model_state_dict
from noln.sinks import sink_neurons
from noln.train import Trainer, TrainState, timed

console = Console(stderr=True)


@dataclass
class RemovalResult:
    model: nn.Module  # the trained model, its FakeNorms frozen (or live for a control)
    adapter: NormAdapter
    log: list[dict]
    summary: dict
    out: Path

    @property
    def events(self) -> list[dict]:
        return [r for r in self.log if r.get("event") == "remove"]


def check_disk_space(out: Path, model: nn.Module, export_formats: int, kept: int = 0) -> None:
    """A checkpoint holds the weights and AdamW's two moments (float32); at a save ``last.pt``,
    ``prev.pt`` and the new ``last.pt.tmp`` coexist; ``checkpoint_keep`` keeps ``kept`` more
    to the end (each its own file once ``last.pt`` moves on); each export is another copy of
    the weights. Refuse to start a run the disk cannot hold to the end."""
    n_params = sum(p.numel() for p in model.parameters())
    per_checkpoint = n_params * 4 * 3
    need = per_checkpoint * (3 + kept) + n_params * 4 * export_formats + (64 << 20)
    free = shutil.disk_usage(out).free
    if free < need:
        keeps = f", {kept} kept by checkpoint_keep" if kept else ""
        raise NolnError(f"output folder '{out}' has {free / 2**30:.2f} GiB free but the run needs "
                        f"about {need / 2**30:.2f} GiB (3 checkpoints of weights + optimizer "
                        f"state{keeps}, exports): free disk space"
                        f"{', keep fewer checkpoints' if kept else ''} or choose another --out")


def model_ctx(config, cfg: RemoveConfig) -> int:
    """Tokens per training sequence: ``--ctx``, else 1024 or the model's context if shorter.
    A ``--ctx`` past the model's context is an error (it was cut silently, and config.yaml
    kept the value that did not run)."""
    longest = context_length(config, default=1024)
    if cfg.ctx is not None and cfg.ctx > longest:
        raise NolnError(f"--ctx {cfg.ctx} is longer than the model's context of {longest} "
                        f"tokens: give --ctx {longest} or less")
    return min(cfg.ctx or 1024, longest)


def check_taper(cfg: RemoveConfig, schedule, steps: int, resuming: bool = False) -> None:
    """A taper that cannot end within the run: its last site would never be a fixed scale
    (or, where the schedule's last removal is itself past the end, never frozen). The advice
    is what can change: ``--taper`` is fixed on resume, and an adaptive schedule whose
    deadline is the run's last step (``finish_by`` 1) gains nothing from more steps."""
    if not cfg.taper or cfg.keep_ln:
        return
    events = getattr(schedule, "events", None)
    last = events[-1][0] if events else getattr(schedule, "deadline", None)
    if last is None or last + cfg.taper <= steps:
        return
    longer = "more --steps/--tokens"
    if last > steps:
        raise NolnError(f"the schedule's last removal comes at step {last}, not within the run's "
                        f"{steps} steps: give {longer}, or a schedule that starts earlier "
                        "(adaptive.start, fixed.start)")
    if not events and cfg.adaptive.finish_by >= 1:
        longer = "adaptive.finish_by below 1 (e.g. 0.75)"
    fixes = [longer] if resuming or last == steps else [f"--taper {steps - last} or less",
                                                         longer]
    raise NolnError(f"--taper {cfg.taper} does not fit: the last removal comes at step {last} of "
                    f"{steps}, so its taper would end at step {last + cfg.taper}; give "
                    f"{' or '.join(fixes)}")


def prepare_data(cfg: RemoveConfig, tokenizer, ctx: int, steps: int):
    """Train blocks and held-out blocks (``--eval-data``, or a random slice of ``--data``).

    Local text is tokenised whole (once, then cached) so training samples every part of it,
    whatever order its documents are in; a Hub dataset is streamed only as far as needed.
    """
    need = steps * cfg.batch_size * ctx + (0 if cfg.eval_data else cfg.eval_tokens) + 2 * ctx
    cap = None if cfg.data == BUILTIN or is_local(cfg.data) else need
    blocks = pack(load_tokens(cfg.data, tokenizer, max_tokens=cap), ctx)
    if cfg.eval_data:
        return blocks, load_blocks(cfg.eval_data, tokenizer, ctx, max_tokens=cfg.eval_tokens)
    if len(blocks) < 2:
        raise NolnError(f"data '{cfg.data}' gives {len(blocks)} block(s) of {ctx} tokens: "
                        "too little to train and hold out; give more text")
    n_eval = max(1, min(cfg.eval_tokens // ctx, len(blocks) // 10))
    heldout = np.random.default_rng(1234).permutation(len(blocks))[:n_eval]
    train_mask = np.ones(len(blocks), dtype=bool)
    train_mask[heldout] = False
    return blocks[train_mask], blocks[np.sort(heldout)]


def evaluation_sets(cfg: RemoveConfig, heldout: np.ndarray, tokenizer,
                    ctx: int) -> dict[str, np.ndarray]:
    """The token blocks a run's CE table reports: ``heldout`` and each of ``cfg.eval_sets``."""
    sets = {HELDOUT: heldout}
    for name, source in cfg.eval_sets.items():
        sets[name] = load_blocks(source, tokenizer, ctx, max_tokens=cfg.eval_tokens)
    return sets


def _from_run_config(run: RunFolder) -> nn.Module:
    """The run's architecture (``base/``), randomly initialised: weights come from a
    checkpoint."""
    return AutoModelForCausalLM.from_config(load_config(run.base), dtype=torch.float32)


def _build(cfg: RemoveConfig, resume: bool) -> nn.Module:
    """The model: the pretrained one, or on resume the run's own architecture (its weights
    come from a checkpoint)."""
    return _from_run_config(RunFolder(cfg.out)) if resume else load_pretrained(cfg.model)


def remove_layernorm(model: str | None = None, data: str | None = None,
                     out: str | Path | None = None, *, resume: str | Path | None = None,
                     config: RemoveConfig | None = None, eval_sets: dict[str, str] | None = None,
                     overwrite: bool = False, **overrides) -> RemovalResult:
    """Fine-tune ``model`` on ``data`` while freezing every norm; export and evaluate it.

    ``overrides`` are ``RemoveConfig`` fields (``tokens=``, ``schedule=``, ``keep_ln=`` ...).
    ``resume=DIR`` continues a killed run from its last checkpoint with the run's own config;
    ``overrides`` may change what ``noln.config.resume_config`` allows (lr, steps, guard ...).
    ``eval_sets`` adds ``{name: source}`` texts to the before/after CE table (the config's
    ``eval_sets``; on resume, added to the run's). ``out`` must be
    new, empty, or (with ``overwrite``) a previous run, whose noln files are then replaced.
    """
    ranks = _ranks()
    if resume is not None:
        if overwrite:
            raise NolnError("--resume continues a run and --overwrite replaces one: give one "
                            "of them")
        run = RunFolder(resume)
        if not run.config.is_file() and run.checkpoints.is_dir():
            raise NolnError(f"'{run.root}' is a `noln pretrain` run (checkpoints, no "
                            "config.yaml): continue it with `noln pretrain --resume --data "
                            f"SOURCE --out {shlex.quote(str(run.root))}`")
        if not run.config.is_file():
            raise NolnError(f"'{run.root}' is not a noln run folder (no config.yaml): check "
                            "--resume")
        cfg, changed, notes, change = resumed_config(run, {
            "model": model, "data": data, "eval_sets": eval_sets or None, **overrides})
        check_not_spent(run, changed)
        if cfg.stages:  # before anything is written: a stage the run has already passed
            state = run.load_latest_checkpoint()[1]["state"]
            check_stages_reached(cfg.stages, int(state["step"]), int(state.get("stage", 0)))
        if torn := torn_checkpoint_note(run.root, read="resumed"):  # (it went on silently)
            notes = [*notes, torn]
        for note in notes if ranks.is_main_process else []:
            console.print(f"[yellow]{escape(note)}[/]", highlight=False, soft_wrap=True)
    else:
        sets = {"eval_sets": {**(config.eval_sets if config else {}), **eval_sets}} \
            if eval_sets else {}
        cfg = validate_config({**config.model_dump(), **sets}) \
            if config is not None else \
            make_config(model=model, data=data, out=out, **sets, **overrides)
        changed, change = {}, None
    resuming, stage, t_start = resume is not None, None, time.time()
    timings: Counter[str] = Counter()  # this command's seconds by what they went to (time_s)
    writes: Counter[str] = Counter()  # its checkpoints, by the thread that wrote them
    while True:  # once, or once per stage of the config (each a resume with its settings)
        with claim_run_folder(Path(cfg.out), resume=resuming, overwrite=overwrite,
                              main=ranks.is_main_process) as claim:
            removal = setup(cfg, resuming, ranks, timings)
            # a new --lr replaces the guard's lowered one (the guard's advice: lower --lr,
            # --resume); a clip given now gives the sequences dropped before it a try, clipped
            trainer, state = train(removal, resuming, claim, reset_guard="lr" in changed,
                                   retry_skipped="overflow_clip" in changed and
                                   cfg.overflow_clip > 0, stage=stage, change=change)
            timings.update(trainer.seconds)
            writes.update(trainer.writer.writes)
            stage = stage_due(cfg.stages, state.step, state.stage)
            if stage is None or state.step >= trainer.total_steps:
                return finish(removal, trainer, state, ranks, t_start, timings, writes)
        run = removal.run
        del removal, trainer  # the model of this stretch, before the next one loads
        if ranks.is_main_process and not run.first_config.exists():
            shutil.copyfile(run.config, run.first_config)  # the control starts from it
        cfg, changed, _, change = resumed_config(run, stage.set)
        if ranks.is_main_process:
            console.print(f"step {stage.step}, the config's stage: " + ", ".join(
                f"{k} {v}" for k, v in stage.set.items()), highlight=False, soft_wrap=True)
        resuming = True


def resumed_config(run: RunFolder, given: dict
                   ) -> tuple[RemoveConfig, dict, list[str], dict | None]:
    """``config.resume_config`` of the run's saved settings and ``given``, and what changed as
    its log records it (``config.settings_change``)."""
    saved = read_config_file(run.config)
    cfg, changed, notes = resume_config(run.root, saved, given)
    return cfg, changed, notes, settings_change(saved, cfg, changed)


def check_not_spent(run: RunFolder, changed: dict) -> None:
    """A run that ended unfinished (sites still live) at its last step has nothing to resume
    unless it is lengthened: said now, not after loading the model and evaluating it."""
    if {"steps", "tokens"} & set(changed) or not run.finished():
        return
    try:
        summary = run.read_summary()
    except (OSError, ValueError):
        return
    saved = (run.latest_progress() or (None, None))[1]
    if not isinstance(summary, dict) or summary.get("complete", True) or saved is None or \
            saved["total_steps"] is None or saved["step"] < saved["total_steps"]:
        return
    why = str(summary.get("unfinished") or "removal unfinished").split(";")[0]
    pair = " --control" if run.control.is_run() else ""  # (both runs lengthened, as a pair)
    raise NolnError(f"'{run.root}' ended at its last step ({saved['step']:,}), {why}: a resume "
                    "of the same length has nothing to train; lengthen it, e.g. `noln remove "
                    f"--resume {shlex.quote(str(run.root))}{pair} --steps "
                    f"{max(saved['step'] + 1, saved['step'] * 3 // 2)}`")


def _lengthened(run: RunFolder, overrides: dict) -> bool:
    """``--steps``/``--tokens`` given on the resume of a finished run, other than what it
    trained: the run goes on to the new length (a pair's two runs both do)."""
    done = run.read_summary()
    return any(overrides.get(k) is not None and overrides[k] != done.get(k)
               for k in ("steps", "tokens"))


def _ranks():
    """The processes of a launcher (one without): files are written by the main process only
    (same state as the Trainer's Accelerator: CPU processes when ACCELERATE_USE_CPU is set or
    there is no GPU)."""
    return PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
                        or not torch.cuda.is_available())


# more passes over the training text than this is a mistake (--tokens far beyond the data)
MAX_EPOCHS = 1000


def check_epochs(cfg: RemoveConfig, steps: int, n_train: int, ctx: int, main: bool) -> None:
    """A note when the run passes over its data more than once; an error past MAX_EPOCHS."""
    epochs = steps * cfg.batch_size / max(1, n_train)
    what = (f"{steps:,} steps x {cfg.batch_size} sequences of {ctx} tokens is {epochs:,.1f} "
            f"passes over the {n_train:,} training sequences of '{cfg.data}'")
    if epochs > MAX_EPOCHS:
        raise NolnError(f"{what}, more than {MAX_EPOCHS}: lower --tokens/--steps or give more "
                        "text")
    if epochs > 1 and main:
        console.print(f"[yellow]note: {escape(what)}[/]", highlight=False, soft_wrap=True)


@dataclass
class Removal:
    """Everything a removal run trains with, built by ``setup`` before its first step."""

    cfg: RemoveConfig
    run: RunFolder
    model: nn.Module
    tokenizer: object
    adapter: NormAdapter
    schedule: Schedule
    ctx: int
    train_blocks: np.ndarray
    heldout: np.ndarray
    eval_sets: dict[str, np.ndarray]  # the CE table's token blocks, "heldout" first
    teacher: nn.Module | None = None  # the original model, for --distill
    ce_before: dict | None = None  # None on resume: the checkpoint holds it
    sinks: dict[int, list[int]] | None = None  # prune_sinks: block -> neurons to zero


def preset_note(model: str) -> str | None:
    """A note for a local GGUF that names itself as a model noln has a preset for: it gets the
    small-model preset unless ``--preset`` says what it is (a file's name for itself is a
    claim, so it only suggests)."""
    path = find_gguf(model) if looks_local(model) else None
    name = declared_name(path) if path is not None else None
    presets = presets_named(name) if name else []
    if not presets:
        return None
    return (f"note: '{path.name}' says it is {name}: `--preset {presets[-1]}` starts from the "
            f"settings measured on it (presets: {', '.join(presets)}); what this run does not "
            "set comes from the small-model preset")


def export_formats(cfg: RemoveConfig) -> list[str]:
    """The formats a run exports at its end, from ``export_format``."""
    formats = {"both": ["hf", "clean"], "none": []}.get(cfg.export_format, [cfg.export_format])
    return [f for f in formats if f == "hf"] if cfg.keep_ln else formats  # a control: no fold


# what a removal command's wall time goes to, in the summary's time_s (with "wall" and "other":
# the stage changes, the summary, the plot, imports before the run began)
TIME_PARTS = ("loading", "evaluation", "steps", "checkpoints", "export")


def setup(cfg: RemoveConfig, resuming: bool, ranks,
          timings: Counter[str] | None = None) -> Removal:
    """Model, FakeNorms, schedule and data; the run's config and base model written; the CE
    before training measured (a new run only). Every check that needs the model runs here,
    before training. ``timings`` gets the seconds spent ("evaluation": the CE before; "loading":
    the rest)."""
    timings = Counter() if timings is None else timings
    start = time.perf_counter()
    run = RunFolder(cfg.out)
    check_source(cfg.data, cfg.eval_data, *cfg.eval_sets.values())
    check_gap_roles(cfg.fixed)
    if not resuming:
        check_models_exist(cfg.model)
    # --ctx past the model's context, and the data (too little, a bad line, too many passes
    # over it): from the model's config and tokenizer, before the weights load
    config = load_config(run.base if resuming else cfg.model)
    if not resuming and not cfg.keep_ln and cfg.preset is None and ranks.is_main_process and \
            (note := preset_note(cfg.model)):
        console.print(f"[yellow]{escape(note)}[/]", highlight=False, soft_wrap=True)
    ctx = model_ctx(config, cfg)
    tokenizer = load_tokenizer(run.base if resuming else cfg.model)
    steps = cfg.resolved_steps(ctx)
    train_blocks, heldout = prepare_data(cfg, tokenizer, ctx, steps)
    check_epochs(cfg, steps, len(train_blocks), ctx, ranks.is_main_process)
    sets = evaluation_sets(cfg, heldout, tokenizer, ctx)
    if cfg.teacher is not None and not cfg.distill and not resuming:  # (a resume may set
        # --distill 0 to end the distillation: the teacher then stands unused)
        raise NolnError(f"--teacher {cfg.teacher} is what --distill pulls towards: give "
                        "--distill W too (e.g. 0.5)")
    if cfg.teacher is not None and cfg.distill > 0:
        try:
            check_models_exist(cfg.teacher)
        except NolnError as e:
            raise NolnError(f"--teacher: {e}") from None
    formats = export_formats(cfg)
    if resuming:  # the exports a resumed run replaces at its end: refused now, not then
        for fmt in formats:
            check_export_target(run.export(fmt, len(formats)))
    # the schedule against the model's sites (a schedule file's names, the taper's fit) and
    # the disk against its size: from a weightless copy of the model, before the weights load
    shell = skeleton(config)
    sites = shell.sites
    kept = run.kept_to_come(steps, cfg.checkpoint_keep, cfg.checkpoint_every, resuming)
    check_disk_space(run.root, shell.model, 0 if resuming else len(formats), kept)
    schedule = build_schedule(cfg.schedule, list(sites), shell.site_kinds(), steps, cfg.fixed,
                              cfg.adaptive, keep_ln=cfg.keep_ln, probe_every=cfg.probe_every,
                              order=cfg.order)
    check_taper(cfg, schedule, steps, resuming)
    if not cfg.keep_ln and (problem := prune_fade_problem(cfg, steps)):
        raise NolnError(problem)
    if past := [b for b in cfg.prune_blocks or () if b >= shell.n_layers]:
        raise NolnError(f"prune_blocks names block {past[0]}, which this model does not have: "
                        f"its blocks are 0..{shell.n_layers - 1}")
    if problem := cfg.lr_restart_problem(steps):
        raise NolnError(problem)
    if not cfg.keep_ln and len(set(schedule.order)) < len(sites) and \
            cfg.export_format in ("hf", "clean", "both"):
        console.print(f"[yellow]note: the schedule freezes {len(set(schedule.order))} of "
                      f"{len(sites)} sites; the export needs all of them[/]")
    late = [stage.step for stage in cfg.stages if stage.step >= steps]
    if late and ranks.is_main_process:
        console.print(f"[yellow]note: the stage at step {late[0]} is at or past the run's end "
                      f"({steps:,} steps): it is never made[/]", highlight=False)
    net = _build(cfg, resuming)
    teacher = None
    if cfg.distill > 0 and cfg.teacher is not None:
        teacher = load_teacher(cfg.teacher, net, tokenizer, ctx, blocks=cfg.distill_hidden > 0)
    elif cfg.distill > 0:  # the original model, before any change
        teacher = copy.deepcopy(net) if not resuming else load_pretrained(cfg.model)
    adapter = install(net, cfg.momentum, separator_id(tokenizer))
    assert adapter.site_names() == list(sites)  # (the schedule was built on the skeleton's)
    if cfg.special_scale and not cfg.keep_ln and not resuming:  # (a checkpoint carries it)
        adapter.enable_special_scale()
    if ranks.is_main_process:  # on resume: the settings the command line changed
        cfg.to_yaml(run.config)
    if not resuming and ranks.is_main_process:
        net.config.save_pretrained(run.base)
        tokenizer.save_pretrained(run.base)
    ranks.wait_for_everyone()
    evaluating = time.perf_counter()
    ce_before = None if resuming else {k: cross_entropy(net, b).to_dict()
                                       for k, b in sets.items()}
    evaluated = time.perf_counter() - evaluating
    timings["evaluation"] += evaluated
    sinks = None
    if cfg.prune_sinks and not cfg.keep_ln:  # found in the original model, on the probe
        original = teacher if teacher is not None and cfg.teacher is None else (
            load_pretrained(cfg.model) if resuming else net)
        sinks = sink_neurons(original, torch.from_numpy(
            np.asarray(heldout[: cfg.probe_blocks], np.int64)), cfg.prune_sinks,
            cfg.prune_blocks)  # (the other blocks keep their neurons)
    timings["loading"] += time.perf_counter() - start - evaluated
    return Removal(cfg, run, net, tokenizer, adapter, schedule, ctx, train_blocks, heldout,
                   sets, teacher, ce_before, sinks)


def load_teacher(name: str, model: nn.Module, tokenizer, ctx: int,
                 blocks: bool = False) -> nn.Module:
    """The model ``--distill`` pulls ``model`` towards, by any name noln loads
    (``noln.loading``); refused unless its logits cover the same vocabulary, token for token,
    and it reads sequences of the run's ``ctx`` tokens; with ``blocks`` (--distill-hidden),
    unless it has the model's blocks and residual width too."""
    try:
        teacher, teacher_tokenizer = load_model(name)
    except NolnError as e:
        raise NolnError(f"--teacher: {e}") from None
    ours, theirs = (m.get_output_embeddings().weight.shape[0] for m in (model, teacher))
    if ours != theirs or teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        sizes = (f"predicts {theirs:,} tokens and the model {ours:,}" if ours != theirs else
                 "has another tokenizer than the model's")
        raise NolnError(f"--teacher {name} {sizes}: distillation compares the two "
                        "distributions token for token; give a teacher with the model's "
                        "tokenizer (e.g. one fine-tuned from it)")
    shapes = [(c.num_hidden_layers, c.hidden_size) for c in (
        m.config.get_text_config() for m in (model, teacher))]
    if blocks and shapes[0] != shapes[1]:
        (n, d), (tn, td) = shapes
        raise NolnError(f"--teacher {name} has {tn} blocks of width {td} and the model {n} of "
                        f"width {d}: --distill-hidden compares their outputs block by block; "
                        "give a teacher of the model's shape, or --distill-hidden 0")
    if (longest := context_length(teacher.config, default=ctx)) < ctx:
        raise NolnError(f"--teacher {name} reads at most {longest} tokens and the run's "
                        f"sequences are {ctx}: give --ctx {longest} or less, or another teacher")
    return teacher


def train(r: Removal, resuming: bool, claim: RunClaim, reset_guard: bool = False,
          retry_skipped: bool = False, stage: Stage | None = None, change: dict | None = None
          ) -> tuple[Trainer, TrainState]:
    """The loop (``noln.train``), from step 0 or the run's last checkpoint, to the end; the
    folder's claim learns when training starts (before it, a failed run cleans up)."""
    cfg = r.cfg
    extra = {} if r.ce_before is None else {"ce_before": r.ce_before}
    trainer = Trainer(cfg, r.model, r.train_blocks, r.heldout[: cfg.probe_blocks], r.run.root,
                      r.adapter, r.schedule, eot_id=separator_id(r.tokenizer),
                      extra_state=extra, teacher=r.teacher, sink_neurons=r.sinks)
    if cfg.progress and trainer.acc.is_main_process:
        console.print(describe(trainer.precision, cfg.precision, trainer.acc.device),
                      highlight=False)
    if cfg.fsdp and not trainer.sharded:
        console.print("[yellow]note: --fsdp shards over the processes of a launcher (accelerate "
                      "launch, torchrun); this run has one process, so nothing is sharded[/]")
    claim.started()
    state = trainer.fit(resume=resuming, reset_guard=reset_guard, retry_skipped=retry_skipped,
                        stage=stage, change=change)
    return trainer, state


def finish(r: Removal, trainer: Trainer, state: TrainState, ranks,
           t_start: float, timings: Counter[str], writes: Counter[str]) -> RemovalResult:
    """CE after training, the exports (a finished removal only), ``summary.json`` and
    ``loss.png``, written by the main process. The summary's ``time_s`` splits this command's
    wall time by what it went to (``timings``, with the CE after and the exports timed here);
    ``checkpoint_writes``, how many checkpoints each thread wrote (``writes``)."""
    cfg, run, adapter = r.cfg, r.run, r.adapter
    net = trainer.acc.unwrap_model(trainer.model)
    if trainer.sharded:  # measure and export a plain copy, gathered on the main process
        full = full_model_state_dict(net)
        if ranks.is_main_process:
            net = _from_run_config(run)
            adapter = install(net, cfg.momentum, separator_id(r.tokenizer))
            net.load_state_dict(full)
            net.to(trainer.acc.device)
    net.eval()
    if not ranks.is_main_process:  # the main process measures, exports and writes the summary
        ranks.wait_for_everyone()
        return RemovalResult(net, adapter, run.read_log(), run.read_summary(), run.root)
    # a run begun before sites were named by role logged the old names: report roles
    log = [{**e, "site": canonical_site(e["site"])} if "site" in e else e
           for e in run.read_log()]
    events = [e for e in log if e.get("event") == "remove"]
    unfinished = None if cfg.keep_ln else unfinished_removal(adapter, trainer.schedule, run.root)
    if unfinished:  # (the reason is the summary's "unfinished", which `noln remove` ends with)
        console.print("[yellow]note: the removal ended unfinished: its CE is measured and the "
                      "run kept; summary.json says why and how to go on[/]")
    with timed(timings, "evaluation"):
        ce_after = {k: cross_entropy(net, b).to_dict() for k, b in r.eval_sets.items()}
    formats = export_formats(cfg)
    exported = {}
    with timed(timings, "export"):
        for fmt in formats:
            if adapter.export_state() == "mixed":
                console.print(f"[yellow]not exporting {fmt}: the removal is unfinished[/]")
                continue
            exported[fmt] = str(export_model(adapter, r.tokenizer,
                                             run.export(fmt, len(formats)), fmt, events=events,
                                             source=run.root))
    wall = time.time() - t_start
    time_s = {part: round(timings[part], 3) for part in TIME_PARTS if part in timings}
    time_s = {"wall": round(wall, 3), **time_s,
              "other": round(max(0.0, wall - sum(timings.values())), 3)}
    summary = {
        "model": cfg.model, "data": cfg.data, "keep_ln": cfg.keep_ln, "schedule": cfg.schedule,
        "steps": state.step, "tokens": state.step * cfg.batch_size * r.ctx, "ctx": r.ctx,
        "train_wall_time_s": state.wall_time, "wall_time_s": wall, "time_s": time_s,
        "checkpoint_writes": dict(writes),
        "ce_before": trainer.extra_state.get("ce_before", {}), "ce_after": ce_after,
        "removals": events, "frozen": adapter.frozen_sites(), "sigmas": adapter.sigmas(),
        "guard_events": [e for e in log if e.get("event") == "guard"], "exports": exported,
        "skipped_sequences": state.skipped,
        # overflow_clip: those clipped at the end, and those the clip was no longer needed for
        "clipped_sequences": state.clipped,
        "unclipped_sequences": [i for e in log if e.get("event") == "unclipped"
                                for i in e["sequences"]],
        "precision": trainer.precision, "world_size": trainer.acc.num_processes,
        "sharded": trainer.sharded, "pid": os.getpid(),
        "complete": unfinished is None, "unfinished": unfinished,
    }
    run.write_summary(summary)
    plot_loss(log, run.loss_plot, title=f"{Path(cfg.model).name}: "
              f"{'control (LN kept)' if cfg.keep_ln else 'LayerNorm removal'}")
    ranks.wait_for_everyone()
    return RemovalResult(net, adapter, log, summary, run.root)


def unfinished_removal(adapter: NormAdapter, schedule, out: Path) -> str | None:
    """Why a removal run ended with its model not norm-free (None when it is), and how to go
    on: a schedule that waited on a diverging model, or special scales still fading."""
    resume = f"the checkpoint is kept: `noln remove --resume {out} --steps N` with more steps"
    live = [n for n in adapter.site_names() if n not in adapter.frozen_sites()]
    if live:
        why = ""
        if getattr(schedule, "stall", None):
            st = schedule.stall
            rule = "adaptive.max_rise above its level before the first" if "max_rise" in st \
                else "adaptive.diverged above its level before the last"
            why = (f"; from step {st['step']} the schedule waited: the probe loss stood at "
                   f"{st['level']:.3f}, more than {rule} removal ({st['reference']:.3f})")
        budget = (f", or a larger budget (adaptive.max_rise={2 * st['max_rise']:g} or null)"
                  if why and st.get("max_rise") else "")
        return (f"removal unfinished: {len(live)} of {len(adapter.sites)} sites still live "
                f"(next {live[0]}){why}; {resume}, or a lower --lr{budget}")
    tapering = [n for n in adapter.site_names() if adapter.site(n).norm.tapering]
    if tapering:
        w = adapter.site(tapering[0]).norm.taper
        return (f"removal unfinished: every site is frozen but {len(tapering)} still taper "
                f"(e.g. {tapering[0]} at {w:.0%} of its fixed scale; --taper); {resume}")
    fading = [n for n in adapter.norms() if n.special_pending or n.clip > 0]
    if fading:
        what = "special tokens' scales are {:.0%} faded into the shared sigma" \
            if fading[0].special_pending else "the outlier clip is {:.0%} lifted"
        return (f"removal unfinished: every site is frozen but "
                f"{what.format(fading[0].fade)} (special_fade); {resume}")
    return None


def remove_with_control(model: str | None = None, data: str | None = None,
                        out: str | Path | None = None, *, resume: bool = False,
                        eval_sets: dict[str, str] | None = None,
                        hellaswag: str | None = None, hellaswag_limit: int | None = None,
                        overwrite: bool = False, control_only: bool = False,
                        **overrides) -> dict:
    """The removal run (``out``), then the with-LN control (``out/control``) on the same data,
    steps and seed, then the papers' table from ``noln.evaluate.compare_models``: original /
    fine-tuned with LN / without LN on the held-out text, each of ``eval_sets`` and optionally
    HellaSwag, with faithfulness to the original. Written to ``out/table.md``,
    ``out/comparison.json`` (``table``: the CE numbers; ``compare``: everything) and
    ``out/compare/`` (plots).

    The removal goes first: if it ends unfinished (a stalled schedule, a fade still running),
    the control's compute is not spent and ``{"no_ln": summary}`` is returned. The control's
    settings are the removal run's own ``config.yaml`` with ``keep_ln`` (a staged removal's
    first settings, ``config.first.yaml``, and the control makes the same stages), so
    ``resume=True`` also adds a control to a run begun without one.

    ``control_only`` (with ``resume``): train only the control, here, while the removal trains
    in another process (a second GPU, a second CPU core): the two share no state. Whichever
    ends last makes the table; a removal that ends while the control trains elsewhere says so
    and returns ``{"no_ln": summary}``, a control that ends first returns ``{"control":
    summary}``."""
    overrides.pop("keep_ln", None)  # each run sets its own
    pair = RunFolder(out or make_config(model=model, **overrides).out)
    out = pair.root
    if resume and pair.config.is_file() and read_config_file(pair.config).get("keep_ln"):
        # a with-norm run as a pair's removal: its "control" would be a control of a control,
        # and the table would call a model with its norms "without LN"
        parent = out.parent
        if out.name == "control" and RunFolder(parent).is_run():
            raise NolnError(f"'{out}' is the control of the pair '{parent}': continue the pair "
                            f"with `noln remove --resume {shlex.quote(str(parent))} "
                            + ("--control-only`" if control_only else "--control`"))
        raise NolnError(f"'{out}' is a with-norm run (keep_ln), not a removal: it has no "
                        f"control; continue it with `noln remove --resume "
                        f"{shlex.quote(str(out))}`")
    # read before training: a missing or malformed HellaSwag is an error now, not after two runs
    items = None if hellaswag is None else load_hellaswag(hellaswag, limit=hellaswag_limit)
    if items is not None:  # its tokenizer and config: no weights yet
        name = model or next((read_config_file(run.config).get("model") for run in
                              (pair, pair.control) if run.config.is_file()), None)
        if name is not None:
            check_endings_fit(items, load_tokenizer(name), context_length(load_config(name)))
    if control_only and not resume:
        raise NolnError("control_only trains the control of a pair already begun: resume it "
                        "(`noln remove --resume RUN --control-only`)")
    results: dict[str, dict] = {}
    runs = {"no_ln": pair.root, "control": pair.control.root}
    parts = [("no_ln", pair, False), ("control", pair.control, True)]
    hint = ("`noln remove --resume " + escape(shlex.quote(str(out))) + " --control" + escape(
        "".join(f" {flag} {shlex.quote(str(v))}" for flag, v in (
            ("--hellaswag", hellaswag), ("--hellaswag-limit", hellaswag_limit))
            if v is not None)) + "`")  # the pair goes on as it was asked for
    # the pair's folder: refused or replaced as a whole, then each run claims its own part
    # (only the control: the removal's process holds the pair; the control claims its own)
    with (nullcontext(RunClaim()) if control_only else
          claim_run_folder(out, resume=resume, overwrite=overwrite,
                           main=_ranks().is_main_process)) as claim:
        claim.started()  # from here on each run cleans up after itself
        for name, run, keep in parts:
            if name == "no_ln" and control_only:
                continue  # (the removal trains in its own process, or it waits for one)
            done = run.finished() and run.read_summary().get("complete", True)
            if name == "control" and not control_only and \
                    (holder := lock_holder(run.root)) is not None:
                console.print(f"[yellow]the control trains in another process ({holder}): "
                              "whichever ends last makes the table (or, once both are done, "
                              f"{hint})[/]", highlight=False, soft_wrap=True)
                return {"no_ln": results["no_ln"]}
            # (a control trained meanwhile by `--control-only`, in another process, while this
            # one trained the removal of a new pair: it goes on as on a resume)
            going_on = resume or (keep and run.is_run())
            if going_on and done and not _lengthened(run, overrides):
                results[name] = run.read_summary()
            elif going_on and run.has_checkpoint():
                results[name] = remove_layernorm(model, data, resume=run.root,
                                                 eval_sets=eval_sets, keep_ln=keep,
                                                 **overrides).summary
            elif keep or resume:  # not begun: the other run's settings, as it ran them
                # (a removal not begun: a pair from before the removal went first)
                other = pair if keep else pair.control
                if not other.config.is_file():
                    raise NolnError(f"'{out}' is not a noln run folder (no config.yaml): "
                                    "check --resume")
                # (a staged removal: the settings it started with; the control makes the
                # same stages at the same steps)
                settings = read_config_file(other.config)
                if other.first_config.is_file():  # its length as it stands (a resume may
                    now = {k: settings[k] for k in ("steps", "tokens")}  # have changed it)
                    settings = {**read_config_file(other.first_config), **now}
                cfg = make_config(**merge_layers(settings, {**overrides, "out": str(run.root),
                                                            "keep_ln": keep}))
                # a control killed before its first checkpoint cannot be resumed: it starts
                # again (only noln's files in out/control are replaced; never the removal's,
                # whose folder holds the control)
                again = going_on and keep and run.is_run()
                if again:
                    console.print(f"[yellow]{run.root} has no checkpoint: starting it again[/]",
                                  highlight=False, soft_wrap=True)
                results[name] = remove_layernorm(config=cfg, eval_sets=eval_sets,
                                                 overwrite=again).summary
            else:
                results[name] = remove_layernorm(model, data, run.root, eval_sets=eval_sets,
                                                 keep_ln=False, **overrides).summary
            if not results[name].get("complete", True):
                elsewhere = lock_holder(pair.control.root)
                console.print(
                    "[yellow]" + (f"the removal is unfinished (above), while its control "
                                  f"trains in another process ({elsewhere}): once the removal "
                                  f"is done, {hint} makes the table"
                                  if elsewhere is not None else
                                  "the control was not run, as the removal is unfinished "
                                  f"(above): once it is done, {hint} runs the control and the "
                                  "table") + "[/]", highlight=False, soft_wrap=True)
                return {"no_ln": results[name]}
    if control_only:  # the removal as it stands now that the control is done: it may have
        # begun, or ended, in its own process while the control trained (hours on SmolLM2)
        removal_at_work = lock_holder(pair.root)
        if removal_at_work is None and pair.finished() and \
                pair.read_summary().get("complete", True):
            results["no_ln"] = pair.read_summary()
    if "no_ln" not in results:  # control_only, the removal not done
        console.print(
            "[yellow]the control is done; " + (
                f"the removal trains in another process ({removal_at_work}): if that is the "
                f"pair's (--control), it makes the table when it ends; else, then, {hint} "
                "makes it" if removal_at_work is not None else
                f"the removal is not, and no process trains it: {hint} goes on with it and "
                "makes the table") + "[/]", highlight=False, soft_wrap=True)
        return {"control": results["control"]}
    if not PartialState().is_main_process:  # under a launcher, one process evaluates (the
        # state already exists: remove_layernorm made it)
        return {}
    # (a set added on --resume has no CE before; a set only the removal measured, no control)
    table = {source: {"original": results["no_ln"]["ce_before"].get(source),
                      "with LN (fine-tuned)": results["control"]["ce_after"].get(source),
                      "without LN": results["no_ln"]["ce_after"][source]}
             for source in results["no_ln"]["ce_after"]}

    # the same held-out blocks the runs measured, now through the shared evaluation code
    cfg = RemoveConfig.from_yaml(pair.config, out=str(out))
    # (sets given now, to a pair whose removal had finished, are the table's too)
    cfg = cfg.model_copy(update={"eval_sets": {**cfg.eval_sets, **(eval_sets or {})}})
    tokenizer = load_tokenizer(pair.base)
    ctx = results["no_ln"]["ctx"]
    _, heldout = prepare_data(cfg, tokenizer, ctx, results["no_ln"]["steps"])
    sources = evaluation_sets(cfg, heldout, tokenizer, ctx)
    paths = {ORIGINAL: str(cfg.model), WITH_LN: str(runs["control"]), NO_LN: str(runs["no_ln"])}
    models = {k: m for k, (m, _) in load_models(paths, resolve_device("auto")).items()}
    result = compare_models(models, tokenizer, sources, hellaswag=items, reference=ORIGINAL,
                            hellaswag_name=hellaswag, hellaswag_limit=hellaswag_limit,
                            progress=cfg.progress, paths=paths,
                            source_specs={HELDOUT: cfg.eval_data or f"slice of {cfg.data}",
                                          **cfg.eval_sets})
    result.print(console)
    result.save(pair.compare)
    # the removal's cost on the very batches its control trained on, span by span (a tenth of
    # the run each)
    log, control_log = pair.read_log(), pair.control.read_log()
    gap = paired_training_gap(log, control_log,
                              window=max(1, round(results["no_ln"]["steps"] / 10)))
    console.print(rich_table(["steps", "steps kept", "no LN", "with LN", "no LN − with LN"],
                             [[f"{r['first']}-{r['last']}", str(r["steps"]), f"{r['no_ln']:.4f}",
                               f"{r['with_ln']:.4f}", f"{r['gap']:+.4f}"] for r in gap],
                             title="Training CE on the same batches"))
    # the run folder's own files (run.py), replaced on a remake, marked as every report is
    pair.table.write_text(marked_markdown(result.to_markdown() + "\n" +
                                          training_gap_markdown(gap)))
    combined = {"table": table, "compare": result.to_dict(), "training_gap": gap,
                "control": results["control"],
                "no_ln": results["no_ln"]}
    pair.comparison.write_text(marked_json(json_safe(combined), indent=1))
    plot_loss(log, pair.loss_plot, control_log=control_log,
              title=f"{Path(str(results['no_ln']['model'])).name}: LayerNorm removal vs control")
    return combined

"""Typed run configuration, per-model presets, YAML in and out.

Presets hold the anchors' hyperparameters (METHODS.md section 1) for GPT-2 small..XL; any other
model gets the ``default`` preset, whose fixed schedule is scaled to its depth and step count.

Every setting of a run is validated here, once, before any model loads: ranges are pydantic
``Field`` constraints, a schedule file's keys and values are checked by ``ScheduleFile``, and
each error becomes one ``NolnError`` naming the flag (or config key) and a valid value.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from noln.errors import NolnError

Fraction = Annotated[float, Field(ge=0, lt=1)]
Gap = Annotated[int, Field(ge=1)]


# the name of the run's own held-out text in its CE table (the --eval sets come after it)
HELDOUT = "heldout"

class AdaptiveConfig(BaseModel):
    """Remove the next site once the loss is back near its level before the previous removal.

    ``signal: probe`` (default) measures CE on a fixed held-out batch, the same tokens before
    and after each removal, so the test is free of batch-to-batch noise; ``signal: train``
    uses the mean training loss over the last ``window`` steps instead.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    signal: Literal["probe", "train"] = "probe"
    start: int | None = Field(None, ge=0)  # no removal before this step; None: 7% of the run
    # nats above the pre-removal loss that count as "recovered" (negative: must improve on it)
    tolerance: float = 0.01
    window: int = Field(4, ge=1)  # steps averaged for signal=train
    min_gap: int = Field(2, ge=1)  # never remove two sites closer than this
    max_gap: int = Field(40, ge=1)  # remove anyway after this many steps
    # every site removed by this fraction of the run, unless the model is diverging
    finish_by: float = Field(0.6, gt=0, le=1)
    # a removal is never forced (by max_gap or finish_by) while the probe loss is more than
    # this many nats above its level before the previous removal: the schedule waits for the
    # model to recover, and a run that ends still waiting stops with the sites left and why
    diverged: float = Field(0.5, gt=0)
    # no removal at all (due or forced) while the loss is more than this many nats above its
    # level before the first removal: a budget for slow drift, where
    # each removal costs less than `diverged` but they add up (SmolLM2 with the outlier clip:
    # 5.3 -> 7.2 in 0.1-0.4 steps); None: no budget
    max_rise: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _gaps(self) -> AdaptiveConfig:
        if self.min_gap > self.max_gap:
            raise ValueError(f"adaptive min_gap {self.min_gap} is above max_gap {self.max_gap}: "
                             "make min_gap <= max_gap")
        return self


class FixedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    start: int | None = Field(None, ge=0)  # first removal step; None: 7% of the run
    gaps: dict[str, Gap] | None = None  # steps between removals, per site kind; None: even gaps
    # with gaps=None, the last removal falls at this fraction of the run
    finish_by: float = Field(0.55, gt=0, le=1)


class ScheduleEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    step: int = Field(ge=0)
    site: str


class ScheduleFile(BaseModel):
    """What a ``--schedule FILE.yaml`` may hold: explicit ``events``, or a ``type`` (fixed or
    adaptive) with that type's settings. Strict: a typo'd key or a quoted number is an error
    (YAML reads ``1e-2`` as text; write ``0.01``)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    type: Literal["fixed", "adaptive", "events"] | None = None
    events: list[ScheduleEvent] | None = None
    order: list[str] | None = None
    start: int | None = Field(None, ge=0)
    gaps: dict[str, Gap] | None = None  # fixed
    finish_by: float | None = Field(None, gt=0, le=1)  # fixed and adaptive
    signal: Literal["probe", "train"] | None = None  # adaptive from here on
    tolerance: float | None = None
    window: int | None = Field(None, ge=1)
    min_gap: int | None = Field(None, ge=1)
    max_gap: int | None = Field(None, ge=1)
    diverged: float | None = Field(None, gt=0)
    max_rise: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleFile:
        kind = self.type or ("events" if self.events is not None else "fixed")
        if kind == "events" and self.events is None:
            raise ValueError("type 'events' needs an 'events' list of {step: N, site: NAME}")
        own = {"events": {"type", "events"}, "fixed": {"type", "order", "start", "gaps",
                                                        "finish_by"},
               "adaptive": {"type", "order", "start", "finish_by", "signal", "tolerance",
                            "window", "min_gap", "max_gap", "diverged", "max_rise"}}[kind]
        foreign = sorted(self.model_fields_set - own)
        if foreign:
            raise ValueError(f"'{foreign[0]}' is not a setting of a {kind} schedule (its keys: "
                             f"{', '.join(sorted(own))})")
        if kind == "adaptive":
            try:
                AdaptiveConfig(**self.model_dump(include=set(AdaptiveConfig.model_fields),
                                                 exclude_none=True))
            except ValidationError as e:
                raise ValueError(describe(e, _dotted, lambda loc: None)) from None
        return self


def check_schedule_file(path: str | Path) -> ScheduleFile:
    """Read and validate a schedule file (sites and steps are checked against the model later,
    in ``noln.schedule.build_schedule``, still before training)."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise NolnError(f"cannot read schedule file '{path}' ({why}): --schedule takes fixed, "
                        "adaptive or a YAML file") from None
    except yaml.YAMLError as e:
        raise NolnError(f"schedule file '{path}' is not valid YAML "
                        f"({' '.join(str(e).split())})") from None
    if not isinstance(spec, dict):
        raise NolnError(f"schedule file '{path}' must be a mapping with 'events' or 'type' "
                        "(see the README's schedule example)")
    try:
        return ScheduleFile(**spec)
    except ValidationError as e:
        raise NolnError(f"schedule file '{path}': {describe(e, _dotted, lambda loc: None)}") \
            from None


def describe_field(text: str, **extra: Any) -> dict:
    """``Field`` keywords for a setting's one description (``--help`` and the README read it;
    ``flag`` names a command-line flag other than ``--field-name``)."""
    return {"description": text, **({"json_schema_extra": extra} if extra else {})}


def _check_keep(cfg: TrainConfig) -> None:
    """A kept checkpoint is one the run saves: ``checkpoint_keep`` a multiple of
    ``checkpoint_every``."""
    keep, every = cfg.checkpoint_keep, cfg.checkpoint_every
    if keep is not None and every and keep % every:
        raise ValueError(f"checkpoint_keep {keep} is not a multiple of --checkpoint-every "
                         f"{every}: the run saves only every {every}th step; give "
                         f"checkpoint_keep={every * max(1, round(keep / every))}")


class TrainConfig(BaseModel):
    """What every training run has (``noln remove`` and ``noln pretrain``): output, budget and
    batch, optimiser (nanoGPT / paper 1), precision and memory, checkpoints and the guard.

    Each field is declared once, with its type, range and description: the command line's
    options and ``key=value`` overrides are generated from it (``noln.cli``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    out: Path = Field(Path("runs/noln"), **describe_field("run folder"))
    tokens: int | None = Field(None, ge=1, **describe_field("training tokens (sets the steps)"))
    # steps and tokens are one setting, the run's length: a layer (preset, --config file,
    # command line) that gives one clears the other (merge_layers); a saved config shows which
    steps: int | None = Field(300, ge=1, **describe_field("optimiser steps (unless --tokens)"))
    batch_size: int = Field(32, ge=1, **describe_field(
        "sequences per optimiser step (all processes together)"))
    micro_batch_size: int | None = Field(None, ge=1, **describe_field(
        "sequences per forward pass; the rest is gradient accumulation"))
    ctx: int | None = Field(None, ge=2, **describe_field(
        "tokens per sequence (default: the model's context, at most 1024)"))
    lr: float = Field(6e-4, gt=0, **describe_field("peak learning rate"))
    min_lr: float = Field(6e-5, ge=0, **describe_field("learning rate at the end of the cosine"))
    warmup_steps: int = Field(10, ge=0, **describe_field("linear warmup steps"))
    lr_restart: int | None = Field(None, ge=1, **describe_field(
        "step at which the warmup and the cosine from lr to min_lr begin again, over the rest "
        "of the run (a warm restart: a run or branch trained on at a new rate); none: step 0"))
    weight_decay: float = Field(0.1, ge=0, **describe_field("AdamW weight decay (2-D weights)"))
    betas: tuple[Fraction, Fraction] = Field((0.9, 0.95), **describe_field("AdamW betas"))
    grad_clip: float = Field(1.0, gt=0, **describe_field("gradient norm clip"))
    grad_clip_late: tuple[Annotated[int, Field(ge=0)], Annotated[float, Field(gt=0)]] | None = \
        Field(None, **describe_field(
            "[step, clip]: from this step on, clip the gradient norm at clip instead of "
            "grad_clip (SmolLM2: 1 while the sinks shrink and the MLP inputs go, where block "
            "0's norm weights carry half the gradient, then 10000)"))
    cos_reg: float = Field(0.0, ge=0, **describe_field(
        "weight of the linearity paper's cosine regulariser between layers"))
    seed: int = Field(0, ge=0, **describe_field("seed of the data order and initialisation"))
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", **describe_field(
        "auto (bf16 where the device has it natively) | fp32 | bf16"))
    compile: bool = Field(False, **describe_field("torch.compile each transformer block"))
    grad_checkpointing: bool = Field(False, **describe_field(
        "recompute activations in the backward pass (less memory, ~30% slower)"))
    fsdp: bool = Field(False, **describe_field(
        "under a launcher: shard weights, gradients and AdamW state over the processes (FSDP2) "
        "instead of replicating them (DDP)"))
    checkpoint_every: int = Field(50, ge=1, **describe_field("steps between checkpoints"))
    checkpoint_keep: int | None = Field(None, ge=1, **describe_field(
        "also keep the checkpoint of every N-th step (checkpoints/step-N.pt, a hard link where "
        "the disk allows) to branch the run from it: `noln branch RUN --step N --out NEW`"))
    guard_factor: float = Field(3.0, gt=1, **describe_field(
        "a loss above this many times its recent mean counts as exploding"))
    max_retries: int = Field(3, ge=0, **describe_field(
        "restarts from the last checkpoint (at half the lr) before the run stops"))
    progress: bool = Field(True, **describe_field("progress bar", flag="--quiet"))

    def clip_at(self, step: int) -> float:
        """The gradient-norm clip at ``step``: ``grad_clip``, then ``grad_clip_late``'s."""
        late = self.grad_clip_late
        return late[1] if late is not None and step >= late[0] else self.grad_clip

    def resolved_steps(self, ctx: int) -> int:
        """Optimiser steps: ``tokens`` rounded up to whole batches, else ``steps`` (a run
        config from before ``merge_layers`` may hold both: its tokens set its length)."""
        if self.tokens is not None:
            return max(1, -(-self.tokens // (self.batch_size * ctx)))
        if self.steps is None:
            raise NolnError("the run has no length: give --steps N or --tokens N")
        return self.steps

    def lr_restart_problem(self, steps: int) -> str | None:
        """Why ``lr_restart`` cannot be met by a run of ``steps`` steps (None: it can)."""
        if self.lr_restart is not None and self.lr_restart >= steps:
            return (f"--lr-restart {self.lr_restart} is not before the run's end (step {steps}): "
                    f"give a step below {steps}, or lengthen the run (--tokens, --steps)")
        return None


class Stage(BaseModel):
    """A change a run makes to itself at a step, as stopping there and ``noln remove --resume
    RUN KEY=VALUE ...`` would: a recipe's phases (a lift that ends at once, a loss switched
    off) in one config, so the whole run is one command and its control follows it."""

    model_config = ConfigDict(extra="forbid")

    step: int | None = Field(None, ge=1, **describe_field(
        "the training step at which the change applies"))
    at: float | None = Field(None, gt=0, lt=1, **describe_field(
        "or the fraction of the run at which it applies (as special_fade's), made a step once "
        "the run's length is known: a recipe's phases then move with --tokens"))
    set: dict[str, Any] = Field(min_length=1, **describe_field(
        "settings --resume may change (lr, aux_weight, special_fade, skip_overflow ...)"))

    @model_validator(mode="after")
    def _one_place(self) -> Stage:
        if (self.step is None) == (self.at is None):
            raise ValueError("a stage is at a step (step: 620) or at a fraction of the run "
                             "(at: 0.62): give one of them")
        return self


class RemoveConfig(TrainConfig):
    """A removal run (``noln remove``): the training settings, plus the model, its data, the
    schedule, the objective and the export."""

    model: str = Field(min_length=1, **describe_field(
        "Hub id (gpt2, gpt2-medium ...), local Hugging Face folder or .gguf file"))
    preset: str | None = Field(None, **describe_field(
        "the settings to start from, named by the Hub id they were measured on (gpt2 ... "
        "gpt2-xl, HuggingFaceTB/SmolLM2-135M-Instruct): for a local copy of that model; "
        "default: the model's own Hub id's, else the small-model preset"))
    data: str = Field("openwebtext", min_length=1, **describe_field(
        "HF dataset name, local .jsonl/.txt/folder, or 'builtin'"))
    eval_data: str | None = Field(None, **describe_field(
        "held-out text (default: a slice of --data)"))
    eval_tokens: int = Field(65_536, ge=1, **describe_field("held-out tokens for the CE table"))
    eval_sets: dict[str, str] = Field(default_factory=dict, **describe_field(
        "more texts for the CE table, NAME: SOURCE (the command line's --eval NAME=SOURCE); "
        "kept in the run, so --resume measures them too"))
    probe_blocks: int = Field(8, ge=1, **describe_field(
        "held-out sequences measuring each removal's cost (and recovery)"))
    probe_every: int = Field(1, ge=1, **describe_field(
        "the adaptive schedule, waiting for recovery, measures the probe every N steps after "
        "min_gap (each is a forward pass of probe_blocks: a large share of a small step)"))
    # removal
    keep_ln: bool = Field(False, **describe_field("the control: fine-tune, remove nothing"))
    schedule: str = Field("adaptive", min_length=1, **describe_field(
        "fixed | adaptive | FILE.yaml"))
    order: list[str] | None = Field(None, **describe_field(
        "the removal order, in sites and roles (a role: all its sites, block 0 first; roles "
        "joined by + go block by block: [mlp_in, attn_in_qk+attn_in_v, final]); a schedule "
        "file's own order replaces it; default: the family's (`noln sites`)"))
    fixed: FixedConfig = Field(default_factory=FixedConfig, **describe_field(
        "the fixed schedule's settings (fixed.start, fixed.gaps.ROLE, fixed.finish_by)"))
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig, **describe_field(
        "the adaptive schedule's settings (adaptive.tolerance, .min_gap, .max_gap, ...)"))
    taper: int = Field(0, ge=0, **describe_field(
        "steps over which each removed site's division moves from every token's own std to "
        "its fixed scale (0: at once, as the papers)"))
    taper_shape: Literal["linear", "cosine"] = Field("linear", **describe_field(
        "how a taper's weight of the fixed scale rises over its steps: linear, or cosine "
        "(slow at both ends, as TaperNorm's gate)"))
    momentum: Fraction = Field(0.9, **describe_field("EMA momentum of the per-token std"))
    exclude_special: bool = Field(True, **describe_field(
        "position 0 and end-of-text tokens do not count in sigma's estimate"))
    special_scale: bool = Field(False, **describe_field(
        "position 0 and end-of-text tokens keep a frozen scale of their own, faded into the "
        "shared one at the end of the run (real LLMs' massive activations)"))
    outlier_clip: float = Field(0.0, ge=0, **describe_field(
        "a frozen site divides a token whose std is above K x its scale by std / K: no token "
        "enters the next layer above K times the typical size (massive activations on "
        "ordinary tokens); lifted over special_fade once every site is frozen; 0: off"))
    special_fade: tuple[Annotated[float, Field(ge=0, le=1)],
                        Annotated[float, Field(ge=0, le=1)]] = Field((0.6, 0.9), **describe_field(
                            "fractions of the run between which special tokens' scales fade "
                            "into the shared one and the outlier clip lifts (once every site "
                            "is frozen)"))
    clip_lift: Literal["inverse", "geometric", "by_block"] = Field("inverse", **describe_field(
        "how the outlier clip's K rises over special_fade, f from 0 to 1: inverse, K / (1 - f); "
        "geometric, K ** (1 / (1 - f)), slower while K is small, where most clipped tokens sit "
        "(K 1.2 at half the fade: 1.44, against 2.4); by_block, one block after another in "
        "forward order (the final norm last), each inverse over its own share of the fade "
        "while the blocks after it still clip at K"))
    clip_ceiling: float = Field(0.0, ge=0, **describe_field(
        "the lifting clip's K stops at this value until the lift's end, when every clip goes "
        "off at once: a token that runs away through the unclipped blocks stays finite, so "
        "the site loss can pull it in instead of the run overflowing; 0: the lift runs to off"))
    aux_weight: float = Field(0.1, ge=0, **describe_field(
        "weight of paper 2's loss pulling every token's residual std at the final norm to the "
        "typical token's, (s_t - s*)^2 on the raw std: it overflows once one token's residual "
        "passes ~1e19 (SmolLM2 with its clip lifted), so set it to 0 there and let site_aux, "
        "in log space, pull the final norm's tokens"))
    site_aux: float = Field(0.0, ge=0, **describe_field(
        "weight of a loss pulling each token's input std at every removed site to the site's "
        "fixed scale: sum over removed sites of the token mean of log(s_t / sigma)^2 (for "
        "SwiGLU models, where an outlier grows block after block)"))
    site_aux_power: float = Field(2.0, ge=1, le=8, **describe_field(
        "the site loss's power p: mean_t |log(s_t / sigma)|^p; above 2 it pulls the rare "
        "outlier tokens harder than the many near their scale (4: a token at 14x pulls ~14x "
        "harder than at p = 2, one at 1.5x ~3x less)"))
    site_aux_live: bool = Field(False, **describe_field(
        "the site loss also pulls every live site's tokens to its running scale, from step 0: "
        "outliers shrink while the real norms still carry them, before any removal "
        "(start the schedule late, e.g. adaptive.start=150)"))
    site_aux_special: Literal["own", "shared"] = Field("own", **describe_field(
        "what the site loss pulls position 0 and end-of-text towards under --special-scale: "
        "their own scale while they have one (own), or the shared one the fade ends at "
        "(shared: with --site-aux-live they shrink under the live norms, before any removal)"))
    prune_sinks: int = Field(0, ge=0, **describe_field(
        "zero the N MLP neurons of each block that write the most into position 0's residual "
        "in the original model (its attention-sink circuit, noln.sinks) before training, and "
        "keep them at zero: in a no-norm SwiGLU model the circuit fires on ordinary tokens "
        "and grows them block after block; 0: off"))
    prune_blocks: list[Annotated[int, Field(ge=0)]] | None = Field(None, **describe_field(
        "with prune_sinks: only these blocks' sink neurons (e.g. [11]), the others keep "
        "theirs; the block whose MLP writes position 0's massive activation is where its ratio "
        "to the other tokens jumps (python bench/sink_cost.py MODEL --data TEXT --per-layer "
        "prints it block by block); None: every block"))
    prune_fade: int = Field(0, ge=0, **describe_field(
        "with prune_sinks: fade those neurons out over the run's first N steps (each one's "
        "output times 1 - step/N, so the model learns to do without them) and zero them at "
        "step N; 0: zeroed before the first step"))
    skip_overflow: bool = Field(False, **describe_field(
        "once the model is norm-free (every site frozen, no clip, no special scale left), a "
        "step whose loss or gradient is inf/nan drops the training sequences the model "
        "overflows on, one by one, for the rest of the run and redoes the step; they are "
        "logged and counted in the summary. Without it the guard restores and lowers the lr, "
        "which cannot help a sequence that overflows at any lr"))
    overflow_clip: float = Field(0.0, ge=0, **describe_field(
        "with --skip-overflow: a sequence the norm-free model overflows on is trained with an "
        "outlier clip at K on every site (tokens above K x a site's scale divided by their own "
        "std) instead of dropped, so the site loss can pull its runaway tokens in; it trains "
        "unclipped again once a clipped forward no longer reaches K anywhere (the clip did "
        "nothing), and is dropped only if it overflows even clipped; 0: drop them"))
    skip_spikes: float = Field(0.0, ge=0, **describe_field(
        "with --skip-overflow: once every site is frozen (the special scales may still be "
        "fading), a step whose gradient norm is over F x the median of the last 100 steps' "
        "is searched as an overflowing one is: each of "
        "its sequences whose own gradient norm is over that line is dropped (or, with "
        "--overflow-clip, trained clipped) and the step runs again without them (SmolLM2: one "
        "sequence at 3e6 against a median of 4, replayed every step through the lifted "
        "gradient clip, held a run at 10 nats); 0: off"))
    scale_noise: tuple[Annotated[float, Field(gt=0, le=0.5)],
                       Annotated[float, Field(gt=1, le=100)]] | None = Field(None, **describe_field(
        "P,F: in each training forward a fraction P of the ordinary tokens enter one random "
        "block with their residual multiplied by a factor drawn log-uniformly from [1, F]: "
        "the outliers a norm-free SwiGLU model squares block after block, made on purpose on "
        "ordinary text, so the site loss and CE teach the blocks after them to shrink them "
        "back (a step that overflows under it is redone without it); None: off"))
    replay: int = Field(0, ge=0, **describe_field(
        "keep up to N training sequences in which an ordinary token entered a removed site "
        "above replay_margin x its scale, and put one of them in place of each batch's last "
        "sequence until none does: the rare contexts (URLs, HTML) whose outliers grow block "
        "after block in a SwiGLU model come back until they are learnt, instead of once an "
        "epoch; 0: off"))
    replay_margin: float = Field(3.0, gt=1, **describe_field(
        "the factor above a removed site's scale at which a token makes its sequence replayed "
        "(--replay)"))
    distill: float = Field(0.0, ge=0, le=1, **describe_field(
        "weight of KL to the teacher, the original model unless --teacher (the rest is CE)"))
    distill_hidden: float = Field(0.0, ge=0, **describe_field(
        "weight of a layer-wise loss pulling every block's output on ordinary tokens towards "
        "the teacher's: the mean over blocks of sum_t |h_t - h*_t|^2 / sum_t |h*_t|^2, "
        "position 0, end-of-text and the teacher's massive activations (above 4x the "
        "block's median) left out; a removal setting, the control does not read it; needs "
        "--distill (its teacher)"))
    teacher: str | None = Field(None, **describe_field(
        "the model --distill pulls towards, instead of the original: a Hub id, Hugging Face "
        "folder, .gguf, noln export or run folder (its last checkpoint) with the model's "
        "vocabulary, e.g. a with-norm control trained first on the same data; it is loaded "
        "again by this name on --resume"))
    export_format: Literal["hf", "clean", "both", "none"] = Field("hf", **describe_field(
        "export: hf | clean | both | none", flag="--format"))
    stages: list[Stage] = Field(default_factory=list, **describe_field(
        "changes the run makes to itself at given steps, each as a --resume with those "
        "settings there: [{step: 2000, set: {skip_overflow: true}}, ...] (steps rising)"))

    @field_validator("model", "data", "eval_data", "schedule", "teacher")
    @classmethod
    def _anchor(cls, value: str | None) -> str | None:
        return None if value is None else anchored(value)

    @field_validator("eval_sets")
    @classmethod
    def _anchor_sets(cls, sets: dict[str, str]) -> dict[str, str]:
        if HELDOUT in sets:  # the table would pair two texts under one name
            raise ValueError(f"--eval {HELDOUT}={sets[HELDOUT]}: '{HELDOUT}' names the run's own "
                             "held-out text (--eval-data, or a slice of --data); give this "
                             "text another name")
        return {name: anchored(source) for name, source in sets.items()}

    @model_validator(mode="after")
    def _combinations(self) -> RemoveConfig:
        _check_keep(self)
        micro = self.micro_batch_size
        if micro is not None and self.batch_size % micro:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of micro batch "
                             f"{micro}: give --micro-batch-size {_divisor(self.batch_size, micro)}"
                             f" or --batch-size {micro * max(1, round(self.batch_size / micro))}")
        if not self.special_fade[0] < self.special_fade[1]:
            raise ValueError(f"special_fade {list(self.special_fade)} must rise: give two "
                             "fractions of the run, start < end (e.g. [0.6, 0.9])")
        if 0 < self.outlier_clip < 1:
            raise ValueError(f"--outlier-clip {self.outlier_clip:g} is below 1: it would divide "
                             "typical tokens by more than the fixed scale; give K >= 1 (e.g. 4)"
                             " or 0 (off)")
        if self.clip_lift == "geometric" and self.outlier_clip == 1:
            raise ValueError("--clip-lift geometric raises K as K ** (1 / (1 - f)), which stays 1 "
                             "for --outlier-clip 1: give a clip above 1, or --clip-lift inverse")
        if self.clip_ceiling and (not self.outlier_clip or self.clip_ceiling <= self.outlier_clip):
            raise ValueError(f"--clip-ceiling {self.clip_ceiling:g} needs an outlier clip below "
                             f"it (--outlier-clip {self.outlier_clip:g}): give a ceiling above K "
                             "(e.g. 10) or 0 (off)")
        if self.overflow_clip and not self.skip_overflow:
            raise ValueError(f"--overflow-clip {self.overflow_clip:g} clips the sequences "
                             "--skip-overflow finds: give --skip-overflow too, or 0 (off)")
        if self.scale_noise and self.grad_checkpointing:
            raise ValueError("scale_noise scales a block's input in the forward only, so a "
                             "recomputed forward (--grad-checkpointing) would differ: use one "
                             "of them")
        if self.overflow_clip and self.fsdp:
            raise ValueError("--overflow-clip runs a clipped sequence's forward on its own "
                             "process only, which --fsdp's shared forwards cannot: use one "
                             "of them")
        if self.skip_spikes and not self.skip_overflow:
            raise ValueError(f"--skip-spikes {self.skip_spikes:g} searches a step as "
                             "--skip-overflow does: give --skip-overflow too, or 0 (off)")
        if 0 < self.skip_spikes <= 1:
            raise ValueError(f"--skip-spikes {self.skip_spikes:g} would search every other "
                             "step: give F well above 1 (e.g. 100) or 0 (off)")
        if self.skip_spikes and self.fsdp:
            raise ValueError("--skip-spikes measures one sequence's gradient norm on its own "
                             "process, which --fsdp's sharded gradients cannot: use one of them")
        if 0 < self.overflow_clip <= 1:
            raise ValueError(f"--overflow-clip {self.overflow_clip:g} would clip typical tokens "
                             "too: give K above 1 (e.g. 10) or 0 (off)")
        if self.teacher is not None and _inside(self.teacher, self.out):
            raise ValueError(f"--teacher {self.teacher} lies in this run's own folder: a run "
                             "cannot distil from itself (a pair's control included); give a "
                             "model trained before it")
        if self.distill_hidden and not self.distill:
            raise ValueError(f"--distill-hidden {self.distill_hidden:g} pulls towards the "
                             "teacher --distill loads: give --distill W too (e.g. 0.5)")
        if self.prune_fade and not self.prune_sinks:
            raise ValueError(f"--prune-fade {self.prune_fade} fades the neurons --prune-sinks "
                             "finds: give --prune-sinks N too (e.g. 16), or 0 (off)")
        if self.prune_blocks is not None and not self.prune_sinks:
            raise ValueError(f"prune_blocks={self.prune_blocks} names the blocks whose sink "
                             "neurons --prune-sinks zeroes: give --prune-sinks N too (e.g. 16)")
        if self.prune_blocks is not None and (
                not self.prune_blocks or len(set(self.prune_blocks)) < len(self.prune_blocks)):
            raise ValueError(f"prune_blocks={self.prune_blocks}: name each block once, at "
                             "least one (or drop it: every block)")
        if self.prune_fade and (self.tokens is not None and self.ctx or
                                self.tokens is None and self.steps):
            if problem := prune_fade_problem(self, self.resolved_steps(self.ctx)):
                raise ValueError(problem)  # (else once the model's context is known)
        if self.site_aux_live and not self.site_aux:
            raise ValueError("--site-aux-live needs the site loss on: give --site-aux W "
                             "(e.g. 0.1)")
        if any(stage.at is not None for stage in self.stages):
            if self.tokens is not None and not self.ctx:
                raise ValueError("a stage at a fraction of the run (at: ...) needs the run's "
                                 "length in steps: give --ctx with --tokens, or --steps")
            total = self.resolved_steps(self.ctx or 1)
            self.stages = [stage if stage.at is None else
                           Stage(step=max(1, round(stage.at * total)), set=stage.set)
                           for stage in self.stages]
        steps = [stage.step for stage in self.stages]
        if steps != sorted(set(steps)):
            raise ValueError(f"stages at steps {steps}: give each step once, in rising order")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr:g} is above --lr {self.lr:g}: the cosine "
                             f"would rise; give min_lr <= {self.lr:g}")
        if self.tokens is not None and self.ctx or self.tokens is None and self.steps:
            if problem := self.lr_restart_problem(self.resolved_steps(self.ctx)):
                raise ValueError(problem)  # (else once the model's context is known)
        return self

    def to_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> RemoveConfig:
        """The settings of a config file under ``overrides`` (``--steps`` replaces the file's
        ``tokens``, as on the command line)."""
        return make_config(**merge_layers(read_config_file(path), overrides))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a ``--config`` YAML file (keys are checked by ``make_config``)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise NolnError(f"cannot read config '{path}' ({why}): check the path") from None
    except yaml.YAMLError as e:
        raise NolnError(f"config '{path}' is not valid YAML ({' '.join(str(e).split())})") \
            from None
    if not isinstance(data, dict):
        raise NolnError(f"config '{path}' must be a mapping of RemoveConfig fields "
                        "(model: gpt2, data: ..., lr: ...)")
    return data


# Anchors: paper 2 (Baroni et al.) for small..XL; batch 512 x 1024 tokens, 300 steps. Gaps are
# per site role (noln.arch): ln_2 -> mlp_in, ln_1 Q/K -> attn_in_qk, ln_1 V -> attn_in_v.
_PAPER2_GAPS = {"mlp_in": 2, "attn_in_qk": 2, "attn_in_v": 3}
_GPT2 = {
    "gpt2": dict(batch_size=512, micro_batch_size=16, ctx=1024, steps=300, lr=6e-4, min_lr=3e-4,
                 warmup_steps=25, aux_weight=0.1, fixed=dict(start=20, gaps=_PAPER2_GAPS)),
    "gpt2-medium": dict(batch_size=512, micro_batch_size=8, ctx=1024, steps=300, lr=3e-4,
                        min_lr=1e-4, warmup_steps=25, aux_weight=0.05,
                        fixed=dict(start=20, gaps=_PAPER2_GAPS)),
    "gpt2-large": dict(batch_size=512, micro_batch_size=4, ctx=1024, steps=300, lr=2e-4,
                       min_lr=4e-5, warmup_steps=25, aux_weight=0.03,
                       fixed=dict(start=20, gaps=_PAPER2_GAPS)),
    "gpt2-xl": dict(batch_size=512, micro_batch_size=2, ctx=1024, steps=300, lr=1e-4,
                    min_lr=2e-5, warmup_steps=25, aux_weight=0.01,
                    fixed=dict(start=20, gaps=_PAPER2_GAPS)),
}
# SmolLM2-135M (Llama family, a 152x residual at position 0): attempt 46b's recipe (docs/
# BENCHMARKS.md; docs/benchmarks/smollm2/smol-c46b.yaml), measured on the Instruct model's GGUF:
# 1,000 steps of 4 x 256 tokens (a GPU takes --batch-size 16, as attempt G1); the MLP inputs,
# then each block's two attention inputs, adaptively by 60% of the run, with the massive
# activations clipped (outlier_clip) and position 0 / end-of-text on scales of their own, both
# lifted by 85%; the sink circuit pruned in block 11, where the massive activation is written;
# the per-site loss, half distillation, replay of sequences that overflow; once every site is
# frozen the raw-std loss off, a ceiling on the lift, sequences that overflow or whose gradient
# dwarfs the run's dropped.
_SMOLLM2_135M = dict(
    steps=1000, batch_size=4, ctx=256, lr=3e-4, min_lr=3e-5, warmup_steps=10,
    grad_clip_late=(210, 1e4), checkpoint_every=25, probe_every=3,
    schedule="adaptive", order=["mlp_in", "attn_in_qk+attn_in_v", "final"],
    adaptive=dict(start=50, min_gap=3, max_gap=10, finish_by=0.6, max_rise=0.3),
    taper=24, taper_shape="cosine", special_scale=True, outlier_clip=1.2,
    special_fade=(0.6, 0.85), clip_lift="by_block", aux_weight=0.1, site_aux=1.0,
    site_aux_live=True, site_aux_special="shared", distill=0.5, prune_sinks=16,
    prune_blocks=[11], replay=32, export_format="both",
    stages=[dict(at=0.62, set=dict(aux_weight=0.0, clip_ceiling=10.0, skip_overflow=True,
                                   skip_spikes=100))])
_SMOLLM2 = {f"HuggingFaceTB/SmolLM2-135M{kind}": _SMOLLM2_135M for kind in ("", "-Instruct")}
# by exact Hub id (both of GPT-2's names), or by --preset; a local folder never gets one by
# itself, whatever its name
PRESETS: dict[str, dict] = {**_GPT2, **{f"openai-community/{k}": v for k, v in _GPT2.items()},
                            **_SMOLLM2}
# everything else: small models trained briefly on CPU (the offline reference's baseline budget)
DEFAULT_PRESET = dict(batch_size=16, steps=146, lr=3e-4, min_lr=3e-5, warmup_steps=10,
                      aux_weight=0.1)


def preset_for(model: str, name: str | None = None) -> dict:
    """The settings of preset ``name`` (a key of ``PRESETS``) where one is named, else the
    anchors' settings for the Hub id ``model`` they were published for, else
    ``DEFAULT_PRESET``. Never by a folder's name: ``runs/gpt2`` is not GPT-2 small."""
    if name is not None:
        if name not in PRESETS:
            raise NolnError(f"--preset {name}: no such preset; presets are "
                            f"{', '.join(sorted(PRESETS, key=str.lower))}")
        return PRESETS[name]
    if Path(str(model)).expanduser().exists():
        return DEFAULT_PRESET
    return PRESETS.get(str(model), DEFAULT_PRESET)


def presets_named(name: str) -> list[str]:
    """The presets for the Hub id ``name`` and its variants (``-Instruct``), by name alone and
    in any case: what to suggest for a local copy that calls itself ``name``."""
    return sorted(k for k in PRESETS if k.lower().startswith(name.lower()))


class PretrainConfig(TrainConfig):
    """A small model with its norms, trained from scratch (``noln pretrain``); the training
    defaults suit a model of a few million parameters on a CPU."""

    data: str = Field(min_length=1, **describe_field(
        "local .jsonl/.txt/folder, HF dataset, or 'builtin'"))
    arch: str = Field("gpt2", min_length=1, **describe_field("model family: gpt2 | neox | llama"))
    n_layer: int = Field(4, ge=1, **describe_field("transformer blocks", flag="--layers"))
    d_model: int = Field(128, ge=1, **describe_field("residual stream width"))
    n_head: int = Field(4, ge=1, **describe_field("attention heads", flag="--heads"))
    vocab_size: int = Field(4096, ge=260, **describe_field("BPE vocabulary to train"))
    steps: int | None = Field(600, ge=1, **describe_field("optimiser steps (unless --tokens)"))
    batch_size: int = Field(32, ge=1, **describe_field("sequences per optimiser step"))
    ctx: int = Field(128, ge=2, **describe_field("tokens per sequence (the model's context)"))
    lr: float = Field(1e-3, gt=0, **describe_field("peak learning rate"))
    min_lr: float | None = Field(None, ge=0, **describe_field(
        "learning rate at the end of the cosine (default: lr / 10)"))
    warmup_steps: int = Field(50, ge=0, **describe_field("linear warmup steps"))
    checkpoint_every: int | None = Field(None, ge=1, **describe_field(
        "steps between checkpoints (default: a quarter of the run, at least 50)"))

    @model_validator(mode="after")
    def _derived(self) -> PretrainConfig:
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if self.checkpoint_every is None:
            self.checkpoint_every = max(50, self.resolved_steps(self.ctx) // 4)
        _check_keep(self)
        if self.d_model % self.n_head:
            raise ValueError(f"--d-model {self.d_model} is not divisible by --heads "
                             f"{self.n_head}")
        return self


# the plain types a setting needs for a flag of its own; the others (nested settings, pairs)
# are given as key=value (fixed.gaps.mlp_in=4, betas=[0.9,0.99]) on the command line or in a
# --config file
FLAG_TYPES = (bool, int, float, str, Path)


def option_type(annotation: Any) -> type | None:
    """The type of a setting's flag: ``int | None`` -> int, a Literal of strings -> str, None
    where the setting has no flag (a nested setting or a pair)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return str
    if origin in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return option_type(args[0]) if len(args) == 1 else None
    return annotation if annotation in FLAG_TYPES else None


def flag_of(name: str, cls: type[BaseModel] = RemoveConfig) -> str | None:
    """The command-line flag of setting ``name`` (``--batch-size``, ``--format``), or None
    where it is given as ``name=value``."""
    field = cls.model_fields.get(name)
    if field is None:
        return None
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "flag" in extra:
        return str(extra["flag"])
    return "--" + name.replace("_", "-") if option_type(field.annotation) else None


def flag_name(loc: tuple, cls: type[BaseModel] = RemoveConfig) -> str:
    """How a user sets the setting at ``loc``: its flag (``--batch-size``) or, for nested
    settings and pairs, ``setting 'fixed.start'`` (key=value or a --config file)."""
    if not loc:
        return "config"
    flag = flag_of(str(loc[0]), cls) if len(loc) == 1 else None
    return flag or f"setting '{_dotted(loc)}'"


def _dotted(loc: tuple) -> str:
    return ".".join(str(x) for x in loc)


def _divisor(n: int, near: int) -> int:
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= near)


_RULES = {
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}", "less_than": "must be < {lt}",
    "finite_number": "must be a finite number", "literal_error": "must be {expected}",
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number", "float_type": "must be a number",
    "float_parsing": "must be a number", "bool_type": "must be true or false",
    "bool_parsing": "must be true or false", "string_type": "must be text",
    "string_too_short": "must not be empty", "dict_type": "must be a mapping",
    "list_type": "must be a list", "tuple_type": "must be a list",
    "missing": "is required",
}


def describe(e: ValidationError, name, example) -> str:
    """One line for the first error of ``e``: what is wrong with which setting, and a valid
    value. ``name(loc)`` says how the user sets it, ``example(loc)`` a valid value or None."""
    err = e.errors()[0]
    loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
    if kind == "value_error":  # our own model validators: the message is complete
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        if ":" in str(loc[-1]):  # YAML reads `{at:0.5}` as the key "at:0.5": no space, no pair
            key, _, value = str(loc[-1]).partition(":")
            return (f"unknown setting '{_dotted(loc)}': YAML needs a space after the colon "
                    f"(`{key}: {value}`)")
        return f"unknown setting '{_dotted(loc)}': check its spelling"
    rule = _RULES.get(kind, str(err["msg"]).lower()).format(**ctx)
    if kind == "float_type" and isinstance(err.get("input"), str):
        rule += ", not text (YAML reads 1e-2 and quoted numbers as text: write 0.01)"
    where, good = name(loc), example(loc)
    shown = f" {err['input']!r}" if kind != "missing" else ""
    if where.startswith("--"):
        return f"{where}{shown} is invalid: {rule}" + (f"; e.g. {where} {good}" if good is not
                                                       None else "")
    return f"{where} ={shown} is invalid: {rule}" + (f" (e.g. {_dotted(loc)}: {good})" if good is
                                                     not None else "")


EXAMPLES = {"ctx": 1024, "tokens": 50_000_000, "micro_batch_size": 4}


def _example(loc: tuple, preset: dict) -> Any:
    """A valid value for the field at ``loc``: the preset's, else the field's default."""
    if not loc or loc[0] not in RemoveConfig.model_fields:
        return None
    if len(loc) == 1:
        value = preset.get(loc[0], RemoveConfig.model_fields[loc[0]].get_default(
            call_default_factory=True))
        value = EXAMPLES.get(str(loc[0]), value) if value is None else value
        return value if isinstance(value, int | float | str) and not isinstance(value, bool) \
            else None
    sub = {"fixed": FixedConfig, "adaptive": AdaptiveConfig}.get(str(loc[0]))
    if sub is not None and loc[1] in sub.model_fields:
        value = sub.model_fields[loc[1]].default
        return value if isinstance(value, int | float | str) else None
    return None


def check_numbers(*specs: tuple[str, int | None, int, int]) -> None:
    """Each ``(flag, value, least, example)``: a given value below ``least`` is an error naming
    the flag and a valid value, raised before anything loads."""
    for flag, value, least, example in specs:
        if value is not None and value < least:
            raise NolnError(f"{flag} {value} is invalid: must be >= {least}; e.g. {flag} "
                            f"{example}")


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; nested settings (``fixed``, ``adaptive``) merge key by key,
    so ``fixed.gaps.mlp_in=4`` changes one gap of a preset's schedule, not the whole of it."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def merge_layers(lower: dict, upper: dict) -> dict:
    """``upper``'s settings on top of ``lower``'s (``deep_merge``), where ``steps`` and
    ``tokens`` are one setting, the run's length: a layer that gives one of them (not None)
    clears the other, so ``--steps 500`` over a file's ``tokens: 2000000`` is a 500-step run."""
    merged = deep_merge(lower, upper)
    gives = {k for k in ("steps", "tokens") if upper.get(k) is not None}
    if len(gives) == 1:
        merged["tokens" if gives == {"steps"} else "steps"] = None
    return merged


def prune_fade_problem(cfg: RemoveConfig, steps: int) -> str | None:
    """Why ``prune_fade`` does not fit a run of ``steps``: it must end within it, or the model
    the run exports would not be the one it trained. Checked with the config, or once the
    model's context sets a ``--tokens`` run's length."""
    if cfg.prune_fade and cfg.prune_fade >= steps:
        return (f"--prune-fade {cfg.prune_fade} does not end within the run's {steps:,} steps, "
                f"so its model would not be the one exported: give --prune-fade below "
                f"{steps:,}, or a longer run")
    return None


def check_eval_numbers(tokens: int | None = None, ctx: int | None = None,
                       batch_size: int | None = None, hellaswag_limit: int | None = None) -> None:
    """The evaluation options in range (``noln eval``, ``noln compare``; torch-free, so the
    command line answers before the library loads)."""
    check_numbers(("--tokens", tokens, 1, 65536), ("--ctx", ctx, 2, 1024),
                  ("--batch-size", batch_size, 1, 8), ("--hellaswag-limit", hellaswag_limit, 1,
                                                       1000))


def check_one_length(given: dict) -> None:
    """One command line gives the run's length once: ``--steps`` or ``--tokens``."""
    if given.get("steps") is not None and given.get("tokens") is not None:
        raise NolnError(f"--steps {given['steps']} and --tokens {given['tokens']} both set the "
                        "run's length: give one of them")


def _value(raw: str) -> Any:
    """A command-line value: a number, true/false, null, a YAML list/mapping, else the text."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def parse_settings(items: list[str], cls: type[BaseModel] = RemoveConfig) -> dict[str, Any]:
    """torchtune-style ``key=value`` overrides, nested by dots: ``["fixed.gaps.mlp_in=4",
    "lr=1e-4"]`` -> ``{"fixed": {"gaps": {"mlp_in": 4}}, "lr": 0.0001}``. Values are read as
    numbers, true/false, or YAML (``special_fade=[0.5,0.9]``); the keys are checked against the
    schema now, the values when the config is built."""
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise NolnError(f"'{item}' is not a setting: give KEY=VALUE, e.g. lr=1e-4 or "
                            "fixed.gaps.mlp_in=4")
        if path[0] not in cls.model_fields:
            raise NolnError(f"unknown setting '{path[0]}' in '{item}': settings are "
                            f"{', '.join(cls.model_fields)}")
        node = settings
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise NolnError(f"'{item}' sets inside '{part}', which is given a value too")
        if path[-1] in node:
            raise NolnError(f"setting '{key}' is given twice: give it once")
        node[path[-1]] = _value(raw)
    return settings


def make_pretrain_config(**kwargs) -> PretrainConfig:
    """A ``noln pretrain`` config from ``kwargs`` (None values are ignored), every value checked
    before anything is built."""
    kwargs = merge_layers({}, {k: v for k, v in kwargs.items() if v is not None})
    try:
        return PretrainConfig(**kwargs)
    except ValidationError as e:
        def name(loc: tuple) -> str:
            return flag_name(loc, PretrainConfig)

        def example(loc: tuple) -> Any:
            field = PretrainConfig.model_fields.get(str(loc[0])) if loc else None
            value = None if field is None else field.get_default(call_default_factory=True)
            return value if isinstance(value, int | float | str) and \
                not isinstance(value, bool) else None

        raise NolnError(describe(e, name, example)) from None


def make_config(**kwargs) -> RemoveConfig:
    """A config from the model's preset, overridden by ``kwargs`` (None values are ignored;
    nested settings merge key by key). The one merge order: preset < ``--config`` file <
    command line (``noln.cli`` merges the last two before calling this).

    Every value is checked here, before anything is loaded. A learning rate given without
    ``min_lr`` below the preset's ``min_lr`` scales the preset's ``min_lr`` with it (the cosine
    keeps its shape instead of rising)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "model" not in kwargs:
        raise NolnError("no model given: pass a Hub id such as 'gpt2' or a local folder")
    preset = preset_for(str(kwargs["model"]), kwargs.get("preset"))
    merged = merge_layers(preset, kwargs)
    lr, min_lr = merged.get("lr"), merged.get("min_lr")
    if "min_lr" not in kwargs and isinstance(lr, float | int) and isinstance(min_lr, float) \
            and 0 < lr < min_lr:
        merged["min_lr"] = min_lr * lr / preset.get("lr", lr)
    try:
        cfg = RemoveConfig(**merged)
    except ValidationError as e:
        raise NolnError(describe(e, flag_name, lambda loc: _example(loc, preset))) from None
    if cfg.steps is None and cfg.tokens is None:
        raise NolnError("the run has no length: give --steps N or --tokens N")
    if cfg.schedule not in ("fixed", "adaptive"):
        check_schedule_file(cfg.schedule)
    staged_configs(cfg)
    return cfg


def validate_config(values: dict[str, Any]) -> RemoveConfig:
    """``RemoveConfig(**values)``, a bad value one ``NolnError`` line naming its flag."""
    try:
        return RemoveConfig.model_validate(values)
    except ValidationError as e:
        raise NolnError(describe(e, flag_name, lambda loc: _example(loc, {}))) from None


def staged_configs(cfg: RemoveConfig) -> list[RemoveConfig]:
    """The run's config after each of its ``stages``, every change checked as ``--resume``
    checks it (``resume_config``), so a bad stage is refused before anything loads."""
    configs, saved = [], {**cfg.model_dump(mode="json"), "stages": []}
    for stage in cfg.stages:
        where = f"stages: at step {stage.step}:"
        fixed = sorted(({"stages", "out"} | set(RESUME_FIXED)) & set(stage.set))
        if fixed:
            raise NolnError(f"{where} '{fixed[0]}' is fixed for the whole run; a stage sets what "
                            "--resume may change (lr, aux_weight, special_fade, skip_overflow ...)")
        unknown = sorted(set(stage.set) - set(RemoveConfig.model_fields))
        if unknown:
            raise NolnError(f"{where} unknown setting '{unknown[0]}'")
        try:
            staged, _, _ = resume_config(Path(cfg.out or "."), saved, stage.set)
        except NolnError as e:
            raise NolnError(f"{where} {e}") from None
        configs.append(staged)
        saved = staged.model_dump(mode="json")
    return configs


def settings_change(saved: dict[str, Any], cfg: TrainConfig, changed: dict[str, Any]
                    ) -> dict[str, dict[str, Any]] | None:
    """What a resume or a stage changed, for its log event: ``set``, the whole top-level
    settings it changed as the run has them from now on, and ``was``, as it had them before
    (``steps`` and ``tokens`` together, ``min_lr`` with the ``lr`` that scales it), so a branch
    of an earlier step undoes it by replacement (``settings_before``). None: nothing the
    training sees changed (``progress`` aside)."""
    keys = set(changed) - {"progress"}
    if keys & {"steps", "tokens"}:
        keys |= {"steps", "tokens"}
    if "lr" in keys:
        keys.add("min_lr")
    now = cfg.model_dump(mode="json")
    return {"set": {k: now.get(k) for k in sorted(keys)},
            "was": {k: saved.get(k) for k in sorted(keys)}} if keys else None


def settings_before(now: dict[str, Any], events: list[dict]) -> dict[str, Any] | None:
    """A run's settings before the ``stage`` and ``resume`` events of its log ``events`` (those
    after a step): its settings ``now`` with each one's ``was`` put back, last first. None
    where one of them says not what it replaced (a stage logged before noln kept it)."""
    changes = [e for e in events if e.get("event") in ("stage", "resume")]
    if not all("was" in e for e in changes):
        return None
    settings = dict(now)
    for event in reversed(changes):
        settings.update(event["was"])
    return settings


def config_at_stage(first: dict[str, Any], stage: int) -> dict[str, Any]:
    """The settings of a run that started with ``first`` once it has made the stages of its
    config up to the one at step ``stage`` (0: none)."""
    cfg = make_config(**first)
    made = [c for s, c in zip(cfg.stages, staged_configs(cfg)) if s.step <= stage]
    return {**made[-1].model_dump(mode="json"), "stages": first.get("stages", [])} if made \
        else first


def stage_due(stages: list[Stage], step: int, applied: int) -> Stage | None:
    """The stage the run makes at ``step`` (None: none), unless it is at or before the last
    stage already ``applied`` (its step; 0: none yet)."""
    due = next_stage_step(stages, step, applied) == step
    return next(s for s in stages if s.step == step) if due else None


def check_stages_reached(stages: list[Stage], step: int, applied: int) -> None:
    """A run resumed at ``step`` that has made its stages up to ``applied`` cannot make one
    between them (given on --resume after the run passed it)."""
    missed = [s.step for s in stages if applied < s.step < step]
    if missed:
        raise NolnError(f"the run's checkpoint is at step {step}, after its stage at step "
                        f"{missed[0]}, which it never made: give that stage's settings to "
                        "--resume, or a later step")


def next_stage_step(stages: list[Stage], step: int, applied: int) -> int | None:
    """Where the run must stop to make its next stage: the first one not yet ``applied``
    at or after ``step``."""
    return next((s.step for s in stages if s.step >= step and s.step > applied), None)


# --resume: what a run fixes and what the command line may change (nanoGPT's rule)
RESUME_FIXED = ("model", "data", "eval_data", "eval_tokens", "probe_blocks", "ctx",
                "batch_size", "seed", "preset", "keep_ln", "schedule", "order", "fixed", "taper",
                "taper_shape", "momentum", "exclude_special", "special_scale", "outlier_clip")
RESUME_MAY_CHANGE = ("lr", "min_lr", "warmup_steps", "lr_restart", "tokens", "steps",
                     "guard_factor", "special_fade", "probe_every", "eval_sets", "max_retries",
                     "checkpoint_every", "checkpoint_keep", "progress", "export_format",
                     "precision", "compile", "grad_checkpointing", "fsdp", "micro_batch_size",
                     "stages")
# may change, but the loss the run optimises changes with them: applied with a warning
RESUME_CHANGES_OBJECTIVE = ("aux_weight", "site_aux", "site_aux_power", "site_aux_live",
                            "site_aux_special", "cos_reg", "distill", "distill_hidden", "teacher",
                            "weight_decay", "betas", "grad_clip", "grad_clip_late", "replay",
                            "replay_margin", "prune_sinks", "prune_blocks", "prune_fade",
                            "skip_overflow", "overflow_clip", "skip_spikes",
                            "scale_noise")
# may change, and the removals still to come follow them (those made stand): with a warning.
# The adaptive schedule decides each removal from the probe as it goes, so a budget that holds a
# run (adaptive.max_rise) can be relaxed on --resume; a fixed schedule's steps are laid out
# over the run's length at its start, so it stays fixed
RESUME_CHANGES_SCHEDULE = ("adaptive", "clip_lift", "clip_ceiling")


# what `noln branch RUN --step S --out NEW KEY=VALUE` may set besides --resume's settings: how
# the removals still to come are made (those the checkpoint made stand)
BRANCH_MAY_CHANGE = ("schedule", "order", "fixed", "taper", "taper_shape", "outlier_clip")


def branch_config(saved: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The config of a branch: the run's ``saved`` settings with ``settings`` (of
    ``BRANCH_MAY_CHANGE``) merged in, every value checked (a schedule file read) before
    anything is written."""
    other = sorted(set(settings) - set(BRANCH_MAY_CHANGE))
    if other:
        raise NolnError(f"a branch sets only {', '.join(BRANCH_MAY_CHANGE)}; give "
                        f"'{other[0]}' to `noln remove --resume` of the branch")
    merged = merge_layers(saved, settings)
    make_config(**merged)
    return merged


def _was(saved: Any, given: Any) -> Any:
    """The run's value of what ``given`` sets: for nested settings, only the keys given."""
    if isinstance(saved, dict) and isinstance(given, dict):
        return {k: _was(saved.get(k), v) for k, v in given.items() if k in saved}
    return saved


def looks_local(name: str) -> bool:
    """Whether a model name is a path on this machine rather than a Hub id ('gpt2',
    'owner/name'): it exists, starts like a path, has more than one '/', or is 'folder/name'
    where 'folder' is a folder here (`models/mine` misspelt is a path, not a Hub repo)."""
    return (name.startswith(("/", ".", "~")) or Path(name).exists() or name.count("/") > 1
            or (name.count("/") == 1 and Path(name.split("/")[0]).is_dir()))


def _inside(path: str, folder: str | Path) -> bool:
    """Whether the model name ``path``, read as a path, is ``folder`` or lies inside it. A Hub
    id ('gpt2') read as a path lies in the current folder: it counts only where ``folder`` is
    below the current folder, or where the name looks local."""
    here, there = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    if here != there and there not in here.parents:
        return False
    cwd = Path.cwd().resolve()
    return looks_local(path) or (there != cwd and there not in cwd.parents)


def anchored(value: str) -> str:
    """A relative path that exists, as an absolute one: a run's config.yaml then means the same
    files from any folder (``--resume`` from elsewhere). A Hub id, a dataset name, 'builtin',
    'adaptive' or a path that does not exist stay as written."""
    path = Path(value)
    return str(path.resolve()) if not path.is_absolute() and path.exists() else value


def same_setting(field: str, saved: Any, given: Any) -> bool:
    """A run's saved value and a resume's given one are the same setting: a local file however
    it is spelt (the run may have been begun from another folder), a pair as list or tuple."""
    if field in ("model", "data", "eval_data", "schedule", "teacher") and \
            isinstance(saved, str) and \
            isinstance(given, str) and Path(saved).exists() and Path(given).exists():
        return Path(saved).resolve() == Path(given).resolve()
    if isinstance(saved, list | tuple) and isinstance(given, list | tuple):
        return list(saved) == list(given)
    return saved == given


def _lays_out_by_length(schedule: str) -> bool:
    """A fixed schedule places its removals by the run's length (start, even gaps)."""
    if schedule in ("fixed", "adaptive"):
        return schedule == "fixed"
    try:
        spec = check_schedule_file(schedule)
    except NolnError:
        return False  # reported when the schedule is built
    return (spec.type or ("events" if spec.events is not None else "fixed")) == "fixed"


def with_added_settings(saved: dict[str, Any], given: dict[str, Any],
                        schema: type[BaseModel]) -> dict[str, Any]:
    """A run's saved settings, with the default of each setting ``given`` that the run does not
    record (added to noln after it started: it ran with the default of the day) and without
    those since dropped from ``schema``, so they compare and merge as the run ran."""
    fields = schema.model_fields
    return {**{k: f.get_default(call_default_factory=True) for k, f in fields.items()
               if k in given and k not in saved},
            **{k: v for k, v in saved.items() if k in fields}}


def scaled_min_lr(saved: dict[str, Any], changed: dict[str, Any]) -> dict[str, float]:
    """``{"min_lr": ...}`` where a resume changes ``lr`` and not ``min_lr``: the run's floor
    scaled by new lr / old lr, so the cosine keeps its shape; else nothing."""
    if "lr" not in changed or "min_lr" in changed or not saved.get("lr"):
        return {}
    return {"min_lr": float(saved.get("min_lr") or 0.0) * float(changed["lr"])
            / float(saved["lr"])}


def resume_config(run: Path, saved: dict[str, Any], given: dict[str, Any]
                  ) -> tuple[RemoveConfig, dict[str, Any], list[str]]:
    """The config of ``noln remove --resume RUN`` from the run's settings ``saved`` (its
    ``config.yaml``) and the command-line values ``given`` (None: not given), the values that
    changed, and notes saying what was kept and what changed. A value
    of ``RESUME_FIXED`` that differs from the run's is an error; ``RESUME_MAY_CHANGE`` values
    replace the run's; ``RESUME_CHANGES_OBJECTIVE`` values replace them with a warning. A new
    ``lr`` scales the run's ``min_lr`` with it unless ``min_lr`` is given too (the cosine keeps
    its shape)."""
    run = Path(run)
    given = {k: v for k, v in given.items() if v is not None and k != "out"}
    check_one_length(given)
    saved = with_added_settings(saved, given, RemoveConfig)
    for field in RESUME_FIXED:
        if field in given and not same_setting(field, saved.get(field), given[field]):
            raise NolnError(
                f"{flag_name((field,))} {given[field]} differs from the run's {saved.get(field)}: "
                f"--resume keeps {', '.join(RESUME_FIXED[:8])} ... from the run; drop the flag, "
                "or start a new run with another --out")
    for name, source in (given.get("eval_sets") or {}).items():
        was = (saved.get("eval_sets") or {}).get(name)
        # the table pairs the CE before training with the CE after by name
        if was is not None and anchored(str(was)) != anchored(str(source)):
            raise NolnError(f"--eval {name}={source}: the run measured '{name}' on {was} before "
                            f"training; give this text another name, e.g. --eval {name}2={source}")
    unknown = sorted(set(given) - set(RESUME_FIXED) - set(RESUME_MAY_CHANGE)
                     - set(RESUME_CHANGES_OBJECTIVE) - set(RESUME_CHANGES_SCHEDULE))
    if unknown:
        raise NolnError(f"unknown setting '{unknown[0]}' for --resume")
    changed = {k: v for k, v in given.items() if k not in RESUME_FIXED
               and not same_setting(k, saved.get(k), deep_merge(saved[k], v)
                             if isinstance(v, dict) and isinstance(saved.get(k), dict) else v)}
    schedule = str(saved.get("schedule", "adaptive"))
    if {"steps", "tokens"} & set(changed) and _lays_out_by_length(schedule):
        raise NolnError(f"--steps/--tokens cannot change on --resume of a run with the {schedule} "
                        "schedule: its removal steps are laid out over the run's length; resume "
                        "without them (an adaptive or explicit-events schedule may be extended)")
    # --steps replaces a token budget
    merged = {**merge_layers(saved, changed), "out": str(run), **scaled_min_lr(saved, changed)}
    cfg = make_config(**merged)
    shown = {k: v for k, v in changed.items() if k != "progress"}
    notes = [f"resuming {run}: keeps {', '.join(RESUME_FIXED[:8])} and the schedule from the "
             "run; " + ("takes " + ", ".join(f"{flag_name((k,))} {v} (was {_was(saved.get(k), v)})"
                                             for k, v in shown.items()) + " from the command line"
                        if shown else "nothing changed on the command line")]
    for k in shown:
        if k in RESUME_CHANGES_OBJECTIVE:
            notes.append(f"warning: {flag_name((k,))} changes the loss the run optimises from "
                         "here on; the run is no longer one continuous experiment")
        if k in RESUME_CHANGES_SCHEDULE:
            notes.append(f"warning: {flag_name((k,))} changes the rule for the removals still to "
                         "come (those made stand); the run is no longer one continuous "
                         "experiment")
    return cfg, changed, notes

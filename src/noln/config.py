"""Typed run configuration, per-model presets, YAML in and out.

Presets hold the anchors' hyperparameters (METHODS.md section 1) for GPT-2 small..XL; any other
model gets the ``default`` preset, whose fixed schedule is scaled to its depth and step count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from noln.errors import NolnError


class AdaptiveConfig(BaseModel):
    """Remove the next site once the loss is back near its level before the previous removal.

    ``signal: probe`` (default) measures CE on a fixed held-out batch, the same tokens before
    and after each removal, so the test is free of batch-to-batch noise; ``signal: train``
    uses the mean training loss over the last ``window`` steps instead.
    """

    model_config = ConfigDict(extra="forbid")
    signal: Literal["probe", "train"] = "probe"
    tolerance: float = 0.01  # nats above the pre-removal loss that count as "recovered"
    window: int = 4  # steps averaged for signal=train
    min_gap: int = 2  # never remove two sites closer than this
    max_gap: int = 40  # remove anyway after this many steps
    finish_by: float = 0.6  # every site removed by this fraction of the run, whatever the loss


class FixedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: int | None = None  # first removal step; None: 7% of the run
    gaps: dict[str, int] | None = None  # steps between removals, per site kind; None: even gaps
    finish_by: float = 0.55  # with gaps=None, the last removal falls at this fraction of the run


class RemoveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    data: str = "openwebtext"
    eval_data: str | None = None  # held-out text; None: a slice held back from --data
    eval_tokens: int = 65_536
    probe_blocks: int = 8  # held-out sequences measuring each removal's cost (and recovery)
    out: Path = Path("runs/noln")
    # budget and batch
    tokens: int | None = None  # training tokens; overrides steps
    steps: int = 300
    batch_size: int = 32  # sequences per optimiser step (all processes together)
    micro_batch_size: int | None = None  # per forward pass; the rest is gradient accumulation
    ctx: int | None = None  # None: the model's context, at most 1024
    # optimiser (nanoGPT / paper 1)
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # removal
    keep_ln: bool = False  # the control: same run, no norm ever frozen
    schedule: str = "adaptive"  # fixed | adaptive | path/to/schedule.yaml
    fixed: FixedConfig = Field(default_factory=FixedConfig)
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)
    momentum: float = 0.9  # EMA of the per-token std
    exclude_special: bool = True  # position 0 and EOT tokens do not count in sigma's estimate
    aux_weight: float = 0.1  # paper 2's std-equalising loss on the residual entering ln_f
    cos_reg: float = 0.0  # linearity paper's cosine regulariser between consecutive layers
    distill: float = 0.0  # loss = (1 - distill) CE + distill KL(original || model); 0: pure CE
    # runtime
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    fsdp: bool = False  # shard weights, grads, AdamW state over the processes (FSDP2)
    checkpoint_every: int = 50
    guard_factor: float = 3.0  # a loss above this many times its recent mean counts as exploding
    max_retries: int = 3
    export_format: Literal["hf", "clean", "both", "none"] = "hf"
    progress: bool = True

    def resolved_steps(self, ctx: int) -> int:
        if self.tokens is not None:
            return max(1, -(-self.tokens // (self.batch_size * ctx)))
        return self.steps

    def to_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> RemoveConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise NolnError(f"cannot read config '{path}': {e}") from None
        return make_config(**{**data, **overrides})


# Anchors: paper 2 (Baroni et al.) for small..XL; batch 512 x 1024 tokens, 300 steps.
PRESETS: dict[str, dict] = {
    "gpt2": dict(batch_size=512, micro_batch_size=16, ctx=1024, steps=300, lr=6e-4, min_lr=3e-4,
                 warmup_steps=25, aux_weight=0.1,
                 fixed=dict(start=20, gaps={"ln_2": 2, "ln_1_qk": 2, "ln_1_v": 3})),
    "gpt2-medium": dict(batch_size=512, micro_batch_size=8, ctx=1024, steps=300, lr=3e-4,
                        min_lr=1e-4, warmup_steps=25, aux_weight=0.05,
                        fixed=dict(start=20, gaps={"ln_2": 2, "ln_1_qk": 2, "ln_1_v": 3})),
    "gpt2-large": dict(batch_size=512, micro_batch_size=4, ctx=1024, steps=300, lr=2e-4,
                       min_lr=4e-5, warmup_steps=25, aux_weight=0.03,
                       fixed=dict(start=20, gaps={"ln_2": 2, "ln_1_qk": 2, "ln_1_v": 3})),
    "gpt2-xl": dict(batch_size=512, micro_batch_size=2, ctx=1024, steps=300, lr=1e-4,
                    min_lr=2e-5, warmup_steps=25, aux_weight=0.01,
                    fixed=dict(start=20, gaps={"ln_2": 2, "ln_1_qk": 2, "ln_1_v": 3})),
    # small models trained briefly on CPU (the offline reference): ref README's baseline budget
    "default": dict(batch_size=16, steps=146, lr=3e-4, min_lr=3e-5, warmup_steps=10,
                    aux_weight=0.1),
}


def preset_for(model: str) -> dict:
    name = Path(model).name if Path(model).exists() else model.split("/")[-1]
    return PRESETS.get(name, PRESETS["default"])


def make_config(**kwargs) -> RemoveConfig:
    """A config from the model's preset, overridden by ``kwargs`` (None values are ignored)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "model" not in kwargs:
        raise NolnError("no model given: pass a Hub id such as 'gpt2' or a local folder")
    merged = {**preset_for(str(kwargs["model"])), **kwargs}
    try:
        return RemoveConfig(**merged)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise NolnError(f"bad config value for '{where}': {err['msg']}") from None

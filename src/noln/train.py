"""The fine-tuning loop: freeze norm sites on a schedule while training on next-token loss.

Plain PyTorch on ``accelerate`` (device placement, DDP) or FSDP2 (``noln.sharding``), bf16
autocast where the device has native bf16 (``noln.precision``), read in order:
removals due -> tapers -> special scales' fade -> micro-batches (CE + aux std losses) -> clip ->
guard (a blown-up loss restores the last checkpoint before the optimiser can step on it) -> AdamW
step -> log -> checkpoint. Everything a resumed run needs (weights, optimiser, sigmas, schedule
position, loss history, RNG, data position = the step) is in the checkpoint, so a killed run
resumes to the same final weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, median

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast, gather_object
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from noln.arch import NormAdapter
from noln.checkpoint import CheckpointWriter, stop_after_step
from noln.config import RemoveConfig, Stage, TrainConfig, next_stage_step
from noln.errors import Interrupted, NolnError
from noln.fakenorm import batch_mean, special_token_mask
from noln.linearity.regularizer import cosine_regularizer
from noln.precision import autocast, resolve_precision
from noln.run import RunFolder, keep_checkpoint, load_latest_checkpoint
from noln.schedule import FixedSchedule, Schedule
from noln.sharding import (
    fsdp_requested,
    full_model_state_dict,
    full_optimizer_state_dict,
    load_full_state_dicts,
    shard,
    transformer_blocks,
)
from noln.sinks import fade_at, fade_neurons, prune_neurons


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine from ``lr`` to ``min_lr`` over the rest of the run.

    With ``lr_restart`` R both begin again at step R and span steps R .. total_steps (SGDR's
    warm restart): a branch of a run whose cosine had nearly ended trains on at a rate of its
    own, not at the tail of a cosine stretched over the whole run. Steps before R follow the
    schedule without the restart."""
    if cfg.lr_restart is not None and step >= cfg.lr_restart:
        step, total_steps = step - cfg.lr_restart, total_steps - cfg.lr_restart
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# a taper's weight of the fixed scale after a fraction p of its steps, and back (noln.fakenorm)
TAPER_SHAPES = {
    "linear": (lambda p: p, lambda w: w),
    "cosine": (lambda p: 0.5 - 0.5 * math.cos(math.pi * p),
               lambda w: math.acos(1 - 2 * w) / math.pi),
}


def next_taper_weight(weight: float, steps: int, shape: str = "linear") -> float:
    """The taper weight one step after ``weight``, for a taper of ``steps`` steps: the step
    count is recovered from the weight (the FakeNorm's buffer is the taper's only state)."""
    to_weight, to_fraction = TAPER_SHAPES[shape]
    done = round(to_fraction(min(max(weight, 0.0), 1.0)) * steps) + 1
    return 1.0 if done >= steps else to_weight(done / steps)


def adamw(groups: list[dict], cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW, ``fused`` (one kernel over all parameters) where this torch has the kernel for
    their device: on a CPU core it steps SmolLM2-135M in 0.15 s instead of 0.41 s for the
    per-parameter loop (torch >= 2.4; older ones have it for GPUs only, and get the loop). Not
    for parameters FSDP2 shards over CPU processes, where the loop is what is tested."""
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
        except RuntimeError:  # "fused=True requires ... supported devices"
            pass
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on 2-D weights only (matrices and embeddings), as nanoGPT and paper 1 do."""
    params = [p for p in model.parameters() if p.requires_grad]  # shared tensors counted once
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (recent transformers call it ``activation_``,
    older releases ``gradient_``). FakeNorms skip the EMA update in the recomputed forward."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each transformer block in place (regional compilation). Every removal
    changes one FakeNorm's mode, which a compiled graph is specialised on: compiled whole, the
    model would recompile after each removal (49 for GPT-2 small, past dynamo's limit of 8,
    after which it silently runs eagerly); compiled per block, blocks in the same state share a
    graph, so a run compiles one per combination of its sites' modes (about 4)."""
    import torch._dynamo

    blocks = transformer_blocks(model)
    if not blocks:
        raise NolnError(f"--compile: {type(model).__name__} names no transformer block class "
                        "(_no_split_modules): run without --compile")
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 64)  # a safety margin (see docstring)
    for block in blocks:
        block.compile()


@dataclass
class TrainState:
    step: int = 0  # the next step to run
    losses: list[float] = field(default_factory=list)  # CE per completed step
    lr_scale: float = 1.0  # lowered by the guard after a blow-up
    failures: int = 0
    wall_time: float = 0.0
    log_lines: int = 0
    # training sequences (indices) whose outliers come back (replay), oldest first
    replay: list[int] = field(default_factory=list)
    # training sequences the norm-free model overflows on, dropped (skip_overflow)
    skipped: list[int] = field(default_factory=list)
    # those it overflows on that train under the outlier clip instead (overflow_clip)
    clipped: list[int] = field(default_factory=list)
    stage: int = 0  # the step of the last of the config's stages made (0: none)
    # the gradient norms of the last SPIKE_WINDOW steps taken, before clipping (skip_spikes)
    grad_norms: list[float] = field(default_factory=list)


SPIKE_WINDOW = 100  # steps whose median gradient norm sets skip_spikes' line


def worst_ordinary(norms: list, keep: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """``[batch]``: each sequence's largest ``log(s_t / sigma)`` (``absolute``: its size, a
    token below its scale too) over ``norms``' last captured forward and the ordinary tokens
    ``keep`` marks (0 for the others); a per-head norm counts its largest head."""
    errors = [n.scale_error().detach().reshape(*keep.shape, -1) for n in norms]
    return torch.stack([((e.abs() if absolute else e).amax(-1) * keep).amax(-1)
                        for e in errors]).amax(0)


def hidden_distance(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                    keep: torch.Tensor, outlier: float = 4.0) -> torch.Tensor:
    """The layer-wise distillation loss (``distill_hidden``): over the blocks' output
    residuals ``h`` (Hugging Face ``hidden_states[1:-1]``: the embeddings are the same in both
    models and the last entry is after the final norm), the mean of

        sum_t |h_t - h*_t|^2 / sum_t |h*_t|^2

    over the ordinary tokens ``t`` (``keep``) whose teacher residual ``h*_t`` is at most
    ``outlier`` times the block's median size. A real LLM's massive activations (position 0's
    attention sink, 150x the typical token in SmolLM2, and a few ordinary tokens) are what a
    norm-free model must not copy; every other token's residual carries what the teacher's
    blocks compute, d numbers a token where the logits' KL gives one distribution. Each
    block weighs the same, whatever its residual's size."""
    terms = []
    for h, ref in zip(student[1:-1], teacher[1:-1], strict=True):
        ref = ref.float()
        size = ref.pow(2).sum(-1)  # [batch, seq]
        typical = size.masked_fill(~keep, math.nan).nanmedian()  # (no host sync; none kept: nan)
        weight = (keep & (size <= outlier ** 2 * typical)).to(size.dtype)
        error = (h.float() - ref).pow(2).sum(-1)
        terms.append((error * weight).sum() / (size * weight).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


class _NextTokenLoss(torch.autograd.Function):
    """``(1 - w) CE + w KL(p || q)`` of logits ``z`` ``[N, V]`` (``q = softmax(z)``) against
    ``targets`` ``[N]`` (-100: no target) and a teacher's logits ``[N, V]`` (``p``; None with
    ``w`` 0), as the mean over the tokens with a target, with its gradient made in the same
    pass, ``dL/dz = (q - (1 - w) onehot(y) - w p) / N``, ``chunk`` tokens at a time: no float32
    tensor of the whole batch's logits is kept for the backward pass (a 49K vocabulary makes
    one 200 MB at 4 x 256 tokens). Returns the loss, the CE and the KL (those two detached)."""

    @staticmethod
    def forward(ctx, logits, targets, ref, w, chunk):
        grad = torch.zeros_like(logits)
        sums = torch.zeros(2, dtype=torch.float32, device=logits.device)  # CE, KL
        n = (targets >= 0).sum().clamp_min(1).float()  # (a tensor: no GPU sync for it)
        for i in range(0, len(logits), chunk):
            y = targets[i:i + chunk]
            valid = (y >= 0).unsqueeze(-1)
            logq = F.log_softmax(logits[i:i + chunk].float(), dim=-1)
            g = logq.exp()  # q, then the gradient's numerator
            picked = y.clamp_min(0).unsqueeze(-1)
            sums[0] -= (logq.gather(-1, picked) * valid).sum()
            g.scatter_add_(-1, picked, torch.full_like(logq[:, :1], -(1.0 - w)))
            if ref is not None and w > 0:
                logp = F.log_softmax(ref[i:i + chunk].float(), dim=-1)
                p = logp.exp()
                sums[1] += (p * (logp - logq) * valid).sum()
                g.sub_(w * p)
            grad[i:i + chunk] = (g * valid / n).to(grad.dtype)
        ctx.save_for_backward(grad)
        ce, kl = sums / n
        loss = (1.0 - w) * ce + w * kl
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, ref: torch.Tensor | None = None,
                    w: float = 0.0, chunk: int = 64
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loss of ``logits`` ``[batch, seq, V]`` on the tokens ``ids`` ``[batch,
    seq]``: ``(1 - w)`` x next-token CE + ``w`` x KL to ``ref``'s distribution (the teacher's
    logits, same shape), means over the ``batch x (seq - 1)`` predicted tokens; returns the
    loss, the CE and the KL (``_NextTokenLoss``)."""
    targets = F.pad(ids[:, 1:], (0, 1), value=-100).flatten()  # the last position: no target
    return _NextTokenLoss.apply(logits.flatten(0, 1), targets,
                                None if ref is None else ref.flatten(0, 1), float(w), chunk)


def draw_scale_noise(keep: torch.Tensor, p: float, f: float, blocks: int,
                     rng: torch.Generator) -> tuple[int, torch.Tensor]:
    """``scale_noise``'s draw for one forward: a block index in ``[0, blocks)`` and a
    ``[batch, seq]`` factor, 1 except for a fraction ``p`` of the tokens ``keep`` marks,
    where it is ``exp(u log f)``, u uniform in [0, 1): log-uniform in [1, f]."""
    index = int(torch.randint(blocks, (), generator=rng))
    hit = (torch.rand(keep.shape, generator=rng) < p).to(keep.device) & keep
    factor = torch.exp(torch.rand(keep.shape, generator=rng) * math.log(f)).to(keep.device)
    return index, torch.where(hit, factor, 1.0)


def lifted_clip(k: float, fade: float, shape: str = "inverse", block: int = 0,
                blocks: int = 1, ceiling: float = 0.0) -> float:
    """The outlier clip's K at ``fade`` f of the lift (0 at its start, 1: off, returned as 0):
    ``inverse``, ``K / (1 - f)``; ``geometric``, ``K ** (1 / (1 - f))``, which stays near K
    while f is small (SmolLM2 at K 1.2: all 90 sites at once cost 0.5 nats at K 1.2, 1.2 at
    1.5, 5.6 at 2, docs/BENCHMARKS.md). ``by_block``: the sites of ``block`` (of ``blocks``
    in forward order, the final norm last) lift alone in their own ``1 / blocks`` of the fade,
    ``K / (1 - g)`` with ``g = clamp(f * blocks - block, 0, 1)``: at K before it, off after
    it. The sites downstream of a lifting block still clip, so an outlier it lets through
    cannot grow further than the next block (SwiGLU squares it block after block).

    ``ceiling`` C > 0: K stops at C until the whole lift ends (``fade`` 1), when every clip
    goes off at once. A token past C x its scale is still divided back to C there, so one
    that runs away through the unclipped blocks stays finite and the site loss can pull it in
    (SmolLM2, attempt 19: a passage of *Emma* overflowed the forward pass at every lr
    without it, and stayed finite at 540x its scale with C 10)."""
    if fade >= 1.0:
        return 0.0
    if shape == "by_block":
        g = min(1.0, max(0.0, fade * blocks - block))
        if g >= 1.0:
            return ceiling
        k = k / (1 - g)
    else:
        k = k ** (1 / (1 - fade)) if shape == "geometric" else k / (1 - fade)
    return min(k, ceiling) if ceiling > 0 else k


@contextmanager
def timed(seconds: Counter[str], part: str) -> Iterator[None]:
    """The block's wall time added to ``seconds[part]``, however it ends."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[part] += time.perf_counter() - start


class Trainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, train_blocks: np.ndarray,
                 probe_blocks: np.ndarray, out: Path, adapter: NormAdapter,
                 schedule: Schedule | None = None, eot_id: int | None = None,
                 accelerator: Accelerator | None = None, extra_state: dict | None = None,
                 teacher: nn.Module | None = None,
                 sink_neurons: dict[int, list[int]] | None = None):
        self.cfg, self.out, self.adapter, self.eot_id = cfg, Path(out), adapter, eot_id
        self.sink_neurons = sink_neurons  # zeroed before the first step (prune_sinks)
        # this process's seconds by what they went to ("steps", "checkpoints", "loading" a
        # checkpoint): the summary's time_s, where a run's time goes besides its steps
        self.seconds: Counter[str] = Counter()
        # checkpoints go to disk on a thread while the next steps train (fit waits for the last)
        self.writer = CheckpointWriter()
        self.sinks_zeroed = False  # (until a restore brings back a checkpoint's weights)
        # the removal's settings (schedule, objective): None while norms only train (pretraining,
        # a --keep-ln control)
        self.removal = cfg if isinstance(cfg, RemoveConfig) and not cfg.keep_ln else None
        self.schedule = schedule or FixedSchedule([])
        self.extra_state = extra_state or {}  # saved with checkpoints (e.g. CE before training)
        if sink_neurons:  # (a checkpoint from mid-fade is read back as the model it trained)
            self.extra_state["sink_neurons"] = sink_neurons
        self.ctx = train_blocks.shape[1]
        self.total_steps = cfg.resolved_steps(self.ctx)
        if problem := cfg.lr_restart_problem(self.total_steps):
            raise NolnError(problem)
        self.train_blocks, self.probe_blocks = train_blocks, probe_blocks
        # a loss worse than a uniform guess (ln V) and guard_factor x the run's first steps'
        # means a broken model, however slowly it got there: a trailing mean follows a slow rise
        # (SmolLM2 attempt 8, forced past its schedule's hold: 4 -> 44 nats in 60 steps, never
        # 3x its last ten steps); the start's level keeps a random model's CE from tripping it
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self.uniform_ce = math.log(vocab) if isinstance(vocab, int) and vocab > 1 else math.inf
        # bf16 autocast is ours, not accelerate's: accelerate's would also wrap the model's
        # forward to copy every output (the whole logits tensor) to float32
        # no DDP buffer broadcast: every FakeNorm all-reduces its own sigma update (identical
        # on every rank), so rank 0's buffers need not overwrite the others' at each forward
        self.acc = accelerator or Accelerator(mixed_precision="no", kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False)])
        # auto: bf16 where the device multiplies bf16 natively (a GPU, a CPU with AMX or
        # AVX512-BF16), fp32 elsewhere (emulated bf16 on an AVX2 CPU is slower than fp32)
        self.precision = resolve_precision(cfg.precision, self.acc.device)
        # what fading sink neurons write of their output (prune_fade), set at each step
        self.fade_factor = torch.ones((), device=self.acc.device)
        world = self.acc.num_processes
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() != world:  # each would train the whole batch
            raise NolnError(f"{torch.distributed.get_world_size()} processes were launched but "
                            f"accelerate trains on {world}: on CPUs set ACCELERATE_USE_CPU=1 "
                            "for torchrun")
        micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
        if cfg.batch_size % (micro * world):
            raise NolnError(f"--batch-size {cfg.batch_size} is not a multiple of micro batch "
                            f"{micro} x {world} processes: change one of them")
        self.micro, self.accum = micro, cfg.batch_size // (micro * world)
        torch.manual_seed(cfg.seed + self.acc.process_index)  # dropout masks differ by rank
        if cfg.grad_checkpointing:
            enable_activation_checkpointing(model)
        # FSDP2 (noln.sharding) replaces the parameters: shard first, then build the optimizer
        self.sharded = fsdp_requested(cfg.fsdp) and world > 1
        mesh = shard(model, self.acc.device) if self.sharded else None
        self.optimizer = adamw(param_groups(model, cfg.weight_decay), cfg,
                               fused=torch.cuda.is_available() or not self.sharded)
        if self.sharded:
            self.model = model
        else:
            self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.teacher = None
        self.distill = cfg.distill if isinstance(cfg, RemoveConfig) else 0.0
        if teacher is not None and self.distill > 0:  # the original model, frozen
            self.teacher = teacher.to(self.acc.device).eval().requires_grad_(False)
            if self.sharded:
                shard(self.teacher, self.acc.device, mesh)
        # the layer-wise pull (a removal setting: a control's loss does not have it)
        self.distill_hidden = self.removal.distill_hidden \
            if self.removal is not None and self.teacher is not None else 0.0
        if cfg.compile:
            compile_blocks(model)
        # scale_noise: the blocks whose inputs it scales, and the step it is off for (redone)
        self.noise_blocks = transformer_blocks(model) \
            if self.removal is not None and self.removal.scale_noise else []
        self.noise_rng, self.noise_off_step = torch.Generator(), -1
        self.spike_off_step = -1  # a step whose spike no single sequence explained
        self.state = TrainState()
        self._perms: dict[int, np.ndarray] = {}
        # the auxiliary losses of this step so far, by name (logged)
        self.terms: dict[str, torch.Tensor] = {}
        self.outliers: list[torch.Tensor] = []  # replay: this step's [micro] worst log-ratios
        # this process's guard restores: logged again after a restore truncates the log, and
        # read to tell a batch that fails at every lr from an lr that is too high
        self.guard_events: list[dict] = []
        self.skips_at = (-1, 0)  # (step, sequences skip_overflow dropped at it)
        self.run = RunFolder(self.out)
        self.log_path = self.run.log

    def autocast(self):
        return autocast(self.precision, self.acc.device)

    # -- data: the batch of a step is a pure function of (seed, step) -----------------------
    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.cfg.seed, epoch])
            self._perms[epoch] = rng.permutation(len(self.train_blocks))
        return self._perms[epoch]

    def batch_indices(self, step: int) -> np.ndarray:
        """The step's training sequences: the next ``batch_size`` of the epoch's permutation
        (a dropped one, ``skip_overflow``, replaced by the first sequence kept at the same
        place of the next epochs' permutations), the last one replaced by a replayed sequence
        (``replay``, chosen by the step among those kept: the checkpoint holds both lists, so
        a resumed run draws the same)."""
        n = len(self.train_blocks)
        pos = np.arange(step * self.cfg.batch_size, (step + 1) * self.cfg.batch_size)
        idx = np.array([self._perm(p // n)[p % n] for p in pos])
        if self.state.skipped:
            dropped = set(self.state.skipped)
            idx = np.array([i if i not in dropped else self._kept_at(p, dropped)
                            for i, p in zip(idx, pos)])
        if self.state.replay:
            idx[-1] = self.state.replay[step % len(self.state.replay)]
        return idx

    def _kept_at(self, p: int, dropped: set[int]) -> int:
        """The first sequence not ``dropped`` at place ``p`` of the epochs' permutations after
        ``p``'s own: a random one, not the next block, since blocks are packed in the data's
        order and the next one is the same document's next text, which overflows as often."""
        n = len(self.train_blocks)
        return next(i for epoch in range(p // n + 1, p // n + 1000)
                    if (i := self._perm(epoch)[p % n]) not in dropped)

    def micro_batches(self, step: int):
        """``(indices, tokens)`` of each of this process's micro-batches."""
        idx = self.batch_indices(step)
        rank, world = self.acc.process_index, self.acc.num_processes
        idx = idx[rank::world]  # each process its share of the global batch
        for i in range(0, len(idx), self.micro):
            chunk = np.sort(idx[i : i + self.micro])
            block = np.asarray(self.train_blocks[chunk], np.int64)
            yield torch.from_numpy(chunk), torch.from_numpy(block).to(self.acc.device)

    # -- loss ------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, reach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of the token block ``x`` and its CE. ``reach``: also note in
        ``self.reach`` each sequence's largest input std over every frozen site's scale,
        ordinary tokens (``overflow_clip``: the clip did nothing to them below K)."""
        keep = ~special_token_mask(x, self.eot_id)  # ordinary tokens: their residual std is
        # the one to estimate; position 0's and end-of-text's are outliers
        aux_weight = self.removal.aux_weight if self.removal is not None else 0.0
        aux_on = aux_weight > 0
        exclude = self.cfg.exclude_special if isinstance(self.cfg, RemoveConfig) else True
        final = self.adapter.final_norm
        site_aux = self.removal.site_aux if self.removal is not None else 0.0
        hidden = self.distill_hidden
        # the sites whose tokens the site loss pulls: the removed ones, or with site_aux_live
        # every site (a live one towards its running scale: outliers shrink under real norms)
        pulled = [n for n in self.adapter.norms() if n.frozen or self.removal.site_aux_live] \
            if site_aux > 0 else []
        # replay: how far each sequence's ordinary tokens are from every removed site's scale
        watched = [n for n in self.adapter.norms() if n.frozen] \
            if self.removal is not None and self.removal.replay else []
        frozen = [n for n in self.adapter.norms() if n.frozen] if reach else []
        capture = list({id(n): n for n in ([final] if aux_on else []) + pulled + watched
                        + frozen}.values())
        with self.adapter.measuring(std_mask=keep if exclude else None, capture_std=capture), \
                self.scale_noise(keep):
            with self.autocast():
                out = self.model(input_ids=x, use_cache=False,
                                 output_hidden_states=self.cfg.cos_reg > 0 or hidden > 0)
            input_std = final.input_std  # [batch, seq] at the final norm, with its gradient
            # each pulled site's distance from its scale, before measuring() resets it
            scale_errors = [n.scale_error(special_own=self.removal.site_aux_special == "own")
                            for n in pulled]
            if watched:  # each sequence's worst ordinary token over the removed sites
                self.outliers.append(worst_ordinary(watched, keep, absolute=True))
            if frozen:  # ordinary tokens: a special one far from the shared scale is the
                # same in every sequence, and the model does not overflow on it unclipped
                self.reach.append(worst_ordinary(frozen, keep).exp())
        taught = None
        if self.teacher is not None:
            # stay close to the original's whole distribution, not only the data's next token
            with torch.no_grad(), self.autocast():
                taught = self.teacher(input_ids=x, use_cache=False,
                                      output_hidden_states=hidden > 0)
        loss, ce, _ = next_token_loss(out.logits, x, None if taught is None else taught.logits,
                                      self.distill if taught is not None else 0.0)
        if taught is not None:
            if hidden > 0:  # and every block's output, not only the last one's logits
                term = hidden * hidden_distance(out.hidden_states, taught.hidden_states, keep)
                self.add_term("distill_hidden", term)
                loss = loss + term
        if aux_on:
            # paper 2: pull every token's residual std at ln_f towards the typical token's
            s_star = batch_mean(input_std.detach(), keep.to(input_std.dtype))  # global micro
            loss = loss + aux_weight * (input_std - s_star).pow(2).mean()
        if scale_errors:
            # a removed site is exact where every token's std equals its fixed scale; summed
            # over sites, so each site's pull does not shrink as more sites are removed. A
            # power above 2 weighs the few outlier tokens over the many near their scale
            power = self.removal.site_aux_power
            term = site_aux * sum(e.abs().pow(power).mean() for e in scale_errors)
            self.add_term("site_aux", term)
            loss = loss + term
        if self.cfg.cos_reg > 0:
            loss = loss + cosine_regularizer(out.hidden_states, self.cfg.cos_reg)
        return loss, ce.detach()

    def add_term(self, name: str, term: torch.Tensor) -> None:
        """Count an auxiliary loss of this forward in the step's log (detached)."""
        self.terms[name] = self.terms.get(name, 0.0) + term.detach()

    def logged_terms(self) -> list[str]:
        """The auxiliary losses this run's steps log, in a fixed order."""
        site_aux = self.removal is not None and self.removal.site_aux > 0
        return [name for name, on in (("site_aux", site_aux),
                                      ("distill_hidden", self.distill_hidden > 0)) if on]

    @contextmanager
    def scale_noise(self, keep: torch.Tensor):
        """``scale_noise`` (P, F): inside the block, one random transformer block's input has a
        fraction P of the ordinary tokens (``keep``) multiplied by factors log-uniform in
        [1, F], drawn from ``noise_rng`` (seeded by the step, so a resumed run draws the
        same). Off where the config has none, and for a step redone after it overflowed."""
        if not self.noise_blocks or self.noise_off_step == self.state.step:
            yield
            return
        index, factor = draw_scale_noise(keep, *self.removal.scale_noise,
                                         len(self.noise_blocks), self.noise_rng)
        block, factor = self.noise_blocks[index], factor[..., None]

        def scale(module, args, kwargs):  # a decoder layer's hidden_states, given either way
            if args:
                return (args[0] * factor.to(args[0].dtype), *args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": hidden * factor.to(hidden.dtype)}

        handle = block.register_forward_pre_hook(scale, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def probe_loss(self) -> float:
        """CE on a fixed held-out batch: measures what one removal costs, on the same tokens."""
        model = self.acc.unwrap_model(self.model)
        was = model.training
        model.eval()
        x = torch.from_numpy(np.asarray(self.probe_blocks, np.int64)).to(self.acc.device)
        with self.autocast():
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        model.train(was)
        ce = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        if self.acc.num_processes > 1:  # removal decisions must agree on every rank
            ce = broadcast(ce.reshape(1), from_process=0)[0]
        return ce.item()

    @property
    def prune_fade(self) -> int:
        return self.removal.prune_fade if self.removal is not None else 0

    def prune_sinks_due(self, step: int) -> None:
        """The sink neurons (``prune_sinks``) at ``step``: fading, they write ``1 - step /
        prune_fade`` of their output; from the fade's end (at once without one) they are
        zeroed, once, and again after a guard restore to a checkpoint from before it."""
        if not self.sink_neurons:
            return
        self.fade_factor.fill_(fade_at(step, self.prune_fade) if self.prune_fade else 0.0)
        if step < self.prune_fade or self.sinks_zeroed:
            return
        changed = prune_neurons(self.acc.unwrap_model(self.model), self.sink_neurons,
                                self.optimizer)
        self.sinks_zeroed = True
        if changed:
            self.log({"event": "pruned_sinks", "step": step, "neurons": changed})

    def fading_sinks(self):
        """While training, the sink neurons write ``fade_factor`` of their output
        (``noln.sinks.fade_neurons``), set at each step by ``prune_sinks_due``."""
        if not self.sink_neurons or not self.prune_fade:
            return nullcontext()
        return fade_neurons(self.acc.unwrap_model(self.model), self.sink_neurons,
                            self.fade_factor)

    def remove_due(self, step: int) -> None:
        """Freeze the sites the schedule asks for, logging each one's cost on the probe batch."""
        current: list[float] = []  # the probe loss in the model's present state, once computed

        def probe() -> float:
            if not current:
                current.append(self.probe_loss())
            return current[0]

        for site in self.schedule.due(step, self.state.losses, probe):
            before = probe()
            sigma = self.adapter.freeze(site)
            if self.removal is not None and self.removal.taper:
                self.adapter.site(site).norm.freeze(taper=True)
            if self.removal is not None and self.removal.outlier_clip:
                self.adapter.site(site).norm.set_clip(self.removal.outlier_clip)
            if not (self.removal is not None and self.removal.taper):
                # (a taper starts at the live norm, clipped or not: nothing changed to measure)
                current[:] = [self.probe_loss()]
            self.log({"event": "remove", "step": step, "site": site, "sigma": sigma,
                      "probe_before": before, "probe_after": current[0]})

    def advance_tapers(self, step: int) -> None:
        """Every tapering site (``taper``, noln.fakenorm) moves one of its ``taper`` steps from
        its tokens' own std to its fixed sigma (``taper_shape``: linear or cosine in the
        step), once per training step, including its removal step; the weights live in the
        FakeNorms' buffers, so checkpoints carry them."""
        for name, site in self.adapter.sites.items():
            norm = site.norm
            if norm.tapering:
                norm.set_taper(next_taper_weight(norm.taper, self.removal.taper,
                                                 self.removal.taper_shape))
                if not norm.tapering:
                    self.log({"event": "tapered", "step": step, "site": name})

    def fade_special(self, step: int) -> None:
        """Special tokens' own scales (``special_scale``) move to the shared sigma, and the
        outlier clip's K rises until it is off (``outlier_clip``, ``lifted_clip``), one
        equal step of the fade per training step from ``special_fade[0]`` of the run to
        ``special_fade[1]``, and never before every site is frozen and done tapering. The fade
        lives in the FakeNorms' buffers (``special_fade``, ``outlier_clip``), so checkpoints
        carry it."""
        fading = [n for n in self.adapter.norms() if n.special_pending or n.clip > 0]
        if not fading or self.removal is None:
            return
        start, end = (round(f * self.total_steps) for f in self.removal.special_fade)
        if step < start or not self.adapter.all_frozen() or \
                any(n.tapering for n in self.adapter.norms()):
            return
        fade = min(1.0, fading[0].fade + 1.0 / max(1, end - start))
        blocks = self.adapter.n_layers + 1  # clip_lift by_block: the final norm lifts last
        for name, site in self.adapter.sites.items():
            norm = site.norm
            if not (norm.special_pending or norm.clip > 0):
                continue
            norm.set_special_fade(fade)  # the fade's position, also for clip-only sites
            if norm.clip > 0:
                norm.set_clip(lifted_clip(self.removal.outlier_clip, fade, self.removal.clip_lift,
                                          self.adapter.block_of(name), blocks,
                                          self.removal.clip_ceiling))
        if fade >= 1.0:
            self.log({"event": "special_faded", "step": step})

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, wait: bool = True) -> None:
        """The run's state as its last checkpoint: on disk when this returns, or (``wait``
        False: the loop's own saves) written on a thread while the next steps train."""
        with timed(self.seconds, "checkpoints"):
            self._save()
            if wait:
                self.writer.wait()

    def _save(self) -> None:
        if self.sharded:  # every rank takes part in gathering the shards
            model_sd = full_model_state_dict(self.model)
            optimizer_sd = full_optimizer_state_dict(self.model, self.optimizer)
        elif self.acc.is_main_process:
            model_sd = self.acc.unwrap_model(self.model).state_dict()
            optimizer_sd = self.optimizer.state_dict()
        if not self.acc.is_main_process:
            return
        last, step, keep = self.run.last_checkpoint, self.state.step, self.cfg.checkpoint_keep
        kept = (lambda: keep_checkpoint(last, self.run.kept_checkpoint(step))) \
            if keep and step % keep == 0 else None
        self.writer.write({
            "model": model_sd,
            "optimizer": optimizer_sd,
            "step": self.state.step,
            "total_steps": self.total_steps,  # so a note on an unfinished run can say "of N"
            "state": self.state.__dict__.copy(),
            "schedule": self.schedule.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "extra": self.extra_state,
            "config": self.cfg.model_dump(mode="json"),
        }, last, then=kept)

    def wait_for_checkpoint(self) -> None:
        """Until the checkpoint in flight is on disk (its write's error, if it failed), timed as
        the checkpoints' share of the run."""
        with timed(self.seconds, "checkpoints"):
            self.writer.wait()

    def restore(self, ckpt: dict) -> None:
        if self.sharded:
            load_full_state_dicts(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"])
        else:
            self.acc.unwrap_model(self.model).load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        self.schedule.load_state_dict(ckpt["schedule"], self.adapter.frozen_sites())
        if self.removal is not None:  # a branch may set a new outlier clip (noln branch)
            for norm in self.adapter.norms():
                if norm.frozen and norm.fade == 0 and norm.clip != self.removal.outlier_clip:
                    norm.set_clip(self.removal.outlier_clip)
                # or a clip ceiling, which holds the sites lifted before it until the lift ends
                elif norm.frozen and 0 < norm.fade < 1 and norm.clip == 0 and \
                        self.removal.clip_ceiling:
                    norm.set_clip(self.removal.clip_ceiling)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.extra_state = ckpt.get("extra", {})
        self.skips_at, self.spike_off_step = (-1, 0), -1
        saved = self.extra_state.get("sink_neurons")
        if self.sink_neurons and saved and \
                all(len(v) == len(self.sink_neurons.get(k, ())) for k, v in saved.items()):
            self.sink_neurons = saved  # those the run found at its start, not found again
        if self.sink_neurons:
            self.extra_state["sink_neurons"] = self.sink_neurons
        self.sinks_zeroed = False

    def log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.state.log_lines += 1

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint we resume from."""
        if not self.log_path.exists() or not self.acc.is_main_process:
            return
        lines = self.log_path.read_text().splitlines(keepends=True)[: self.state.log_lines]
        self.log_path.write_text("".join(lines))

    # -- the loop --------------------------------------------------------------------------
    def fit(self, resume: bool = False, reset_guard: bool = False,
            retry_skipped: bool = False, stage: Stage | None = None,
            change: dict | None = None) -> TrainState:
        """Train to the end (from the last checkpoint with ``resume``), or to the step of the
        config's next stage (``stages``), saved there: the caller makes the stage's changes
        and resumes. ``reset_guard``: the resumed run has a new learning rate, which replaces
        the one the guard lowered. ``retry_skipped``: the resumed run has a new
        ``overflow_clip``, so the sequences it dropped (``skip_overflow``) come back, clipped.
        ``stage``: the resumed run has just made this stage of its config (at its step).
        ``change``: the settings the resume (or the stage) changed, ``config.settings_change``,
        logged with it so that a branch of an earlier step can undo it. It returns, or raises,
        once the last checkpoint is on disk."""
        try:
            state = self._fit(resume, reset_guard, retry_skipped, stage, change)
        except BaseException:
            self.wait_for_checkpoint()  # (a failed write is the error to see: it comes first)
            raise
        self.wait_for_checkpoint()
        return state

    def _fit(self, resume: bool, reset_guard: bool, retry_skipped: bool, stage: Stage | None,
             change: dict | None) -> TrainState:
        self.out.mkdir(parents=True, exist_ok=True)
        stages = getattr(self.cfg, "stages", [])
        if resume:
            with timed(self.seconds, "loading"):
                self.restore(load_latest_checkpoint(self.out)[1])
            self._truncate_log()
            if stage is not None:
                self.state.stage = stage.step
                self.log({"event": "stage", "step": self.state.step, "set": stage.set,
                          "was": change["was"] if change else {}})
            elif change:  # settings the resume changed: a branch of an earlier step undoes it
                self.log({"event": "resume", "step": self.state.step, **change})
            if reset_guard:
                self.state.lr_scale, self.state.failures = 1.0, 0
            retry_skipped = retry_skipped and bool(self.state.skipped)
            if retry_skipped:
                retried, self.state.skipped = self.state.skipped, []
                self.state.clipped += retried
                if self.removal.replay:  # outliers all: as update_replay would keep them, or
                    # they come back only with the next epoch
                    keep = self.state.replay + [i for i in retried if i not in self.state.replay]
                    self.state.replay = keep[-self.removal.replay:]
                self.log({"event": "clipped", "step": self.state.step, "sequences": retried,
                          "clip": self.removal.overflow_clip, "clipped": len(self.state.clipped),
                          "replay": len(self.state.replay), "retried": True})
            if reset_guard or retry_skipped or stage is not None:
                self.save(wait=False)  # a guard restore goes back to the run as changed
        else:
            self.log_path.unlink(missing_ok=True)
        # at every start (a resumed or branched run may have just set it), or once the fade ends
        self.prune_sinks_due(self.state.step)
        if not resume:
            self.save(wait=False)  # step 0: the guard always has a good state to go back to
        progress = _Progress(self.cfg.progress and self.acc.is_main_process, self.total_steps,
                             self.state.step)
        tokens_per_step = self.cfg.batch_size * self.ctx
        stage_step = next_stage_step(stages, self.state.step, self.state.stage)
        end = self.total_steps if stage_step is None else min(stage_step, self.total_steps)
        model = self.model
        model.train()
        # Ctrl-C or SIGTERM: the step in progress ends and is saved before the run stops
        with progress, stop_after_step() as asked, self.fading_sinks():
            while self.state.step < end:
                step, t0 = self.state.step, time.perf_counter()
                self.noise_rng.manual_seed(self.cfg.seed * 1_000_003 + step)
                self.prune_sinks_due(step)
                self.remove_due(step)
                self.advance_tapers(step)
                self.fade_special(step)
                lr = lr_at(step, self.cfg, self.total_steps) * self.state.lr_scale
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                ce_sum = torch.zeros((), device=self.acc.device)
                self.terms = {}
                self.outliers, self.reach = [], []
                batches = list(self.micro_batches(step))
                rows, clipped_rows = [], []  # the sequences of each loss, as self.outliers
                for i, (indices, x) in enumerate(batches):
                    parts = self.clip_parts(indices, x)
                    for j, (part, xp, k) in enumerate(parts):
                        sync = i == len(batches) - 1 and j == len(parts) - 1
                        share = len(part) / len(indices)  # of the micro-batch's mean
                        terms_before = dict(self.terms)
                        with self._gradient_sync(sync), self.clipped(k):
                            loss, ce = self.loss(xp, reach=True) if k > 0 else self.loss(xp)
                            self.acc.backward(loss * share / len(batches))
                        ce_sum += ce * share / len(batches)
                        self.terms = {name: terms_before.get(name, 0.0) + (
                            term - terms_before.get(name, 0.0)) * share
                            for name, term in self.terms.items()}
                        rows.append(part)
                        if k > 0:
                            clipped_rows.append(part)
                grad_norm = self.acc.clip_grad_norm_(model.parameters(), self.cfg.clip_at(step))
                if hasattr(grad_norm, "full_tensor"):  # sharded: a DTensor
                    grad_norm = grad_norm.full_tensor()
                # with the loss, whether any process was asked to stop: all stop at one step
                ce_mean, stop = self.acc.reduce(torch.stack([ce_sum, torch.tensor(
                    float(bool(asked)), device=ce_sum.device)]), reduction="mean").unbind()
                names = self.logged_terms()  # the step's numbers in one sync
                ce_val, grad_norm, stop, *terms = torch.stack([ce_mean, torch.as_tensor(
                    grad_norm, device=ce_mean.device, dtype=ce_mean.dtype), stop, *(
                        torch.as_tensor(self.terms.get(name, 0.0), device=ce_mean.device,
                                        dtype=ce_mean.dtype) for name in names)]).tolist()
                # a finite loss can still come with inf/nan gradients (an activation past
                # float range in the backward pass); clipping would turn them into nan weights
                if self._exploded(ce_val) or not math.isfinite(grad_norm):
                    if self.noise_blocks and self.noise_off_step != step:
                        # the made outliers overflowed: nothing to learn from an inf; the
                        # step again without them
                        self.optimizer.zero_grad(set_to_none=True)
                        self.noise_off_step = step
                        self.log({"event": "noise_overflow", "step": step, "loss": ce_val})
                        continue
                    if self.skip_overflowing(step, batches, self.spike_line(step)):
                        continue  # the same step again, without them
                    self._recover(step, ce_val, grad_norm)
                    progress.reset(self.state.step)
                    continue
                if grad_norm > (line := self.spike_line(step)):
                    if not self.skip_overflowing(step, batches, line):
                        # no sequence spikes alone (its gradient was cleared in the search):
                        # the step again, taken as it is
                        self.spike_off_step = step
                        self.log({"event": "spike", "step": step, "grad_norm": grad_norm,
                                  "line": line})
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.grad_norms = [*self.state.grad_norms[1 - SPIKE_WINDOW:], grad_norm]
                if self.outliers:
                    self.update_replay(step, torch.cat(rows), torch.cat(self.outliers))
                if clipped_rows:
                    self.update_clipped(step, torch.cat(clipped_rows), torch.cat(self.reach))
                dt = time.perf_counter() - t0
                self.state.losses.append(ce_val)
                self.state.wall_time += dt
                self.seconds["steps"] += dt
                self.state.step += 1
                record = {"step": step, "loss": ce_val, "lr": lr, "grad_norm": grad_norm,
                          "tokens": self.state.step * tokens_per_step,
                          "frozen": len(self.adapter.frozen_sites()), "dt": dt}
                if self.removal is not None and self.removal.replay:
                    record["replay"] = len(self.state.replay)
                for name, term in zip(names, terms, strict=True):
                    # this process's share, summed over micro-batches, in the loss's units:
                    # site_aux, how far the removed sites' inputs are from their fixed scales
                    record[name] = term / len(batches)
                self.log(record)
                progress.update(self.state.step, ce_val, lr, tokens_per_step / dt,
                                self.schedule.next_label(self.state.step))
                if self.state.step % self.cfg.checkpoint_every == 0 or \
                        self.state.step in (self.total_steps, stage_step) or stop:
                    self.save(wait=False)
                if stop:
                    raise Interrupted(self.state.step)
        return self.state

    def update_replay(self, step: int, indices: torch.Tensor, worst: torch.Tensor) -> None:
        """Keep the sequences of this step whose worst ordinary token is above
        ``replay_margin`` x a removed site's scale (``worst``: log-ratios), the newest
        ``replay`` of them; drop those that are back under it. Every process sees the whole
        batch, so all keep the same list."""
        indices = self.acc.gather(indices.to(self.acc.device)).tolist()
        worst = self.acc.gather(worst).tolist()
        keep, limit = self.state.replay, math.log(self.removal.replay_margin)
        added, dropped = [], []
        for i, w in zip(indices, worst):
            if w > limit and i not in keep:
                keep.append(i)
                added.append(i)
            elif w <= limit and i in keep:
                keep.remove(i)
                dropped.append(i)
        dropped += keep[: max(0, len(keep) - self.removal.replay)]
        del keep[: max(0, len(keep) - self.removal.replay)]
        if added or dropped:
            self.log({"event": "replay", "step": step, "added": added, "dropped": dropped,
                      "worst": round(math.exp(max(worst)), 3)})

    def clip_parts(self, indices: torch.Tensor, x: torch.Tensor) -> list:
        """``(indices, tokens, K)`` of a micro-batch: its sequences that train under the
        outlier clip (``overflow_clip``, K) apart from the others (K 0)."""
        if not self.state.clipped:
            return [(indices, x, 0.0)]
        clip = torch.tensor([int(i) in self.state.clipped for i in indices])
        return [(indices[m], x[m.to(x.device)], k)
                for m, k in ((~clip, 0.0), (clip, self.removal.overflow_clip)) if m.any()]

    @contextmanager
    def clipped(self, k: float):
        """Every frozen site clips at ``k`` inside the block (0: as it is), then is as it was."""
        norms = [n for n in self.adapter.norms() if n.frozen] if k > 0 else []
        before = [n.clip for n in norms]
        for norm in norms:
            norm.set_clip(k)
        try:
            yield
        finally:
            for norm, clip in zip(norms, before):
                norm.set_clip(clip)

    def update_clipped(self, step: int, indices: torch.Tensor, reach: torch.Tensor) -> None:
        """The clipped sequences of this step whose tokens all stayed below K times every
        site's scale (``reach``): the clip did nothing to them, so they train unclipped
        from the next step."""
        pairs = gather_object(list(zip(indices.tolist(), reach.tolist())))  # uneven shares
        indices, reach = [i for i, _ in pairs], [r for _, r in pairs]
        done = {i: r for i, r in zip(indices, reach)
                if r < self.removal.overflow_clip and i in self.state.clipped}
        if done:
            self.state.clipped = [i for i in self.state.clipped if i not in done]
            self.log({"event": "unclipped", "step": step, "sequences": sorted(done),
                      "reach": round(max(done.values()), 3), "clipped": len(self.state.clipped)})

    def _gradient_sync(self, sync: bool):
        """Gradients cross processes once per step, at the last micro-batch."""
        if self.sharded:
            self.model.set_requires_gradient_sync(sync)
            return nullcontext()
        return nullcontext() if sync else self.acc.no_sync(self.model)

    # -- guard -----------------------------------------------------------------------------
    def _exploded(self, loss: float) -> bool:
        """Whether this step's ``loss`` (CE) means a broken model: not finite; above
        ``guard_factor`` x the last ten steps' mean (a spike); above both a uniform guess's CE
        (ln V) and ``guard_factor`` x the first ten steps' mean (a slow rise); or, once the
        model had learnt to predict (below ln V / 2), above ln V, or past halfway from its
        level to ln V three steps in a row (a collapse: SmolLM2 attempt 45 went from 3.8 to
        10.4 nats in one step, under 3x, and stayed at 10-14 while its pruned start's high
        loss held the slow-rise line at 15; a hard batch is one step, not three)."""
        losses, uniform = self.state.losses, self.uniform_ce
        if not math.isfinite(loss):
            return True
        if losses[:10] and loss > max(uniform, self.cfg.guard_factor * fmean(losses[:10])):
            return True
        if losses[-10:] and loss > self.cfg.guard_factor * fmean(losses[-10:]):
            return True
        if loss > uniform and min(losses, default=math.inf) < uniform / 2:
            return True
        before = losses[-12:-2]  # the level before the last three steps
        if len(before) < 10 or (level := fmean(before)) >= uniform / 2:
            return False
        return min([*losses[-2:], loss]) > (level + uniform) / 2

    def spike_line(self, step: int) -> float:
        """``skip_spikes`` F: the gradient norm over which a step is searched for the
        sequences behind it, F x the median of the last ``SPIKE_WINDOW`` steps' (inf: off,
        before ten steps, before every site is frozen, or at a step already searched in vain).
        From the last removal on, not only once norm-free: SmolLM2 attempt 46 replayed a
        sequence at 53x a site's scale, with 40-900x the median gradient, for the last 50
        steps of its special scales' fade."""
        spikes = self.removal.skip_spikes if self.removal is not None else 0.0
        norms = self.state.grad_norms
        if not spikes or len(norms) < 10 or step == self.spike_off_step or \
                not self.removal.skip_overflow or not self.adapter.all_frozen():
            return math.inf
        return spikes * median(norms)

    def skip_overflowing(self, step: int, batches: list, line: float = math.inf) -> bool:
        """``skip_overflow``: after a step with an inf/nan loss or gradient in the norm-free
        model, or one with a gradient norm over ``line`` (``skip_spikes``, under which an
        overflowing step is searched too once every site is frozen, the lift not yet over),
        find the sequences of its batch that overflow on their own (loss or gradient not
        finite, or gradient norm over ``line``). With ``overflow_clip`` K, one that does not
        overflow under the clip at K trains clipped from now on; the others are dropped for
        the rest of the run (and from the replay and clipped lists). Says whether there were
        any (False: the guard's business, as before the model was norm-free)."""
        if self.removal is None or not self.removal.skip_overflow or \
                (self.adapter.export_state() != "all" and not math.isfinite(line)):
            return False
        self.optimizer.zero_grad(set_to_none=True)
        k = self.removal.overflow_clip
        bad, rescued = [], []
        for indices, x in batches:
            for i, seq in zip(indices.tolist(), x):
                clipped = i in self.state.clipped
                if self._overflows(seq, k if clipped else 0.0, line):
                    if clipped or not k or self._overflows(seq, k, line):
                        bad.append(i)
                    else:
                        rescued.append(i)
        bad, rescued = (sorted(set(gather_object(found))) for found in (bad, rescued))
        if not bad and not rescued:
            return False
        # one bad sequence after another at the same step is the model, not the data (each
        # replacement is a random sequence, so these are unrelated texts): the guard's business
        count = self.skips_at[1] + len(bad) if self.skips_at[0] == step else len(bad)
        self.skips_at = (step, count)
        if count > self.skip_limit:
            self.log({"event": "skip_gave_up", "step": step, "overflowed": count})
            return False
        if rescued:
            self.state.clipped += rescued
            self.log({"event": "clipped", "step": step, "sequences": rescued, "clip": k,
                      "clipped": len(self.state.clipped)})
        if bad:
            self.state.skipped += bad
            self.state.replay = [i for i in self.state.replay if i not in bad]
            self.state.clipped = [i for i in self.state.clipped if i not in bad]
            self.log({"event": "skipped", "step": step, "sequences": bad,
                      "total": len(self.state.skipped)}
                     | ({"grad_norm_over": line} if math.isfinite(line) else {}))
        return True

    @property
    def skip_limit(self) -> int:
        """More sequences than this overflowing at one step (``skip_overflow``): the model."""
        return max(4, 2 * self.cfg.batch_size)

    def _overflows(self, seq: torch.Tensor, clip: float, line: float = math.inf) -> bool:
        """Whether one sequence's loss or gradient is inf/nan, or its gradient norm over
        ``line``, every frozen site clipped at ``clip`` (0: as the model is). Leaves no
        gradient behind."""
        self.outliers, self.reach = [], []
        self.terms = {}
        with self._gradient_sync(False), self.clipped(clip):
            loss, _ = self.loss(seq[None])
            finite = bool(torch.isfinite(loss))
            if finite:
                self.acc.backward(loss)
                # the step's own measure (clip_grad_norm_), at no clip: its gradient is dropped
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), math.inf)
                finite = bool(torch.isfinite(norm) and norm <= line)
        self.optimizer.zero_grad(set_to_none=True)
        return not finite

    def _recover(self, step: int, loss: float, grad_norm: float | None = None) -> None:
        """Back to the last good checkpoint with half the learning rate, or stop for good."""
        self.optimizer.zero_grad(set_to_none=True)
        self.wait_for_checkpoint()  # (the one in flight is the last good one)
        path, ckpt = load_latest_checkpoint(self.out)
        failures = self.state.failures + 1
        what = f"loss {loss:.4g}" if grad_norm is None or math.isfinite(grad_norm) else \
            f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
        if failures > self.cfg.max_retries and self.skips_at[0] == step and \
                self.skips_at[1] > self.skip_limit:
            raise NolnError(
                f"training diverged {failures} times (last at step {step}): the norm-free model "
                f"overflows on sequence after sequence at step {step} ({self.skips_at[1]} in a "
                "row there): the model, not a few sequences, so --skip-overflow cannot help; "
                f"the last good checkpoint is kept at {path}: go on from an earlier one "
                "(`noln branch RUN --step N --out NEW`) with a lower --lr or a slower lift")
        if failures > self.cfg.max_retries:
            scales = [self.state.lr_scale]  # of the last tries, those that all failed here
            for event in reversed(self.guard_events):
                if event["step"] != step:
                    break
                scales.insert(0, 2 * event["lr_scale"])  # a restore halves the try's scale
            lrs = [lr_at(step, self.cfg, self.total_steps) * scale for scale in scales]
            if len(lrs) > 1:
                # the same batch broke the model at every lr the guard tried: data, not the lr
                # (SmolLM2: one HTML token grown to 1e30 through the SwiGLU blocks)
                seqs = ", ".join(str(i) for i in sorted(self.batch_indices(step)))
                raise NolnError(
                    f"training diverged {failures} times, the last {len(lrs)} at step {step} "
                    f"(last: {what}), at lr {lrs[0]:.3g} down to {lrs[-1]:.3g}: that step's "
                    f"batch (training sequences {seqs}) breaks the model at any lr, so a lower "
                    f"--lr will not help; the last good checkpoint is kept at {path}: "
                    + (("the model is norm-free, so --resume with --skip-overflow to drop the "
                        "sequences it overflows on" + (
                            " (--skip-spikes 100 too: this loss is finite, so --skip-overflow "
                            "alone finds none)" if math.isfinite(loss) and (
                                grad_norm is None or math.isfinite(grad_norm)) and
                            not self.removal.skip_spikes else ""))
                       if self.adapter.export_state() == "all" else
                       "find the token that overflows in those sequences, or go on from an "
                       "earlier checkpoint with a slower schedule"))
            raise NolnError(f"training diverged {failures} times (last: {what} at step {step}); "
                            f"the last good checkpoint is kept at {path}: lower --lr or "
                            "lengthen the schedule's gaps, then --resume")
        lr_scale = self.state.lr_scale * 0.5
        self.restore(ckpt)
        self._truncate_log()
        # the earlier restores to this checkpoint were logged after it: keep them in the log
        for event in self.guard_events:
            if event["restored_step"] == self.state.step:
                self.log(event)
        self.state.failures, self.state.lr_scale = failures, lr_scale
        self.guard_events.append({"event": "guard", "step": step, "loss": loss,
                                  "grad_norm": grad_norm, "restored_step": self.state.step,
                                  "lr_scale": lr_scale, "failures": failures})
        self.log(self.guard_events[-1])


class _Progress:
    """A rich progress bar with loss, LR, tokens/s and the next removal (or nothing)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled = enabled
        if enabled:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  "
                                           "{task.fields[tps]} tok/s  next: {task.fields[nxt]}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-",
                                          lr="-", tps="-", nxt="-")

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tps: float, nxt: str) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                            tps=f"{tps:,.0f}", nxt=nxt)

    def reset(self, step: int) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=step)

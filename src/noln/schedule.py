"""When each norm site is frozen: fixed gaps, adaptive (loss recovered), or read from YAML.

A schedule sees the step and the recent training losses and answers which sites to freeze now.
Its whole state is a small dict, saved in every checkpoint so a resumed run continues it.

Sites and gap keys are named by role (``blocks.3.attn_in_v``, ``mlp_in``; see ``noln.arch``);
the old per-family names (``blocks.3.ln_1_v``, ``ln_2``, ``input_layernorm_qk`` ...) are read
as their roles, so schedule files and runs from before the rename keep working.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from noln.arch import ROLES, canonical_site
from noln.config import AdaptiveConfig, FixedConfig
from noln.errors import NolnError


class Schedule:
    order: list[str]

    def _over_budget(self, level: float) -> bool:
        """More than ``max_rise`` above the level before the first removal."""
        return self.cfg.max_rise is not None and level > self.baseline + self.cfg.max_rise

    def due(self, step: int, losses: Sequence[float],
            probe: Callable[[], float] | None = None) -> list[str]:
        """Sites to freeze before training step ``step``. ``losses``: every past step's training
        loss; ``probe()``: held-out CE on fixed tokens now (computed only when called)."""
        raise NotImplementedError

    def next_label(self, step: int) -> str:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, frozen: Sequence[str] | None = None) -> None:
        """Continue from a checkpoint's ``state``; ``frozen``: the sites the checkpoint's model
        has frozen (a branch with a new schedule continues from them, ``noln branch``)."""


class FixedSchedule(Schedule):
    """Explicit (step, site) events."""

    def __init__(self, events: list[tuple[int, str]]):
        self.events = sorted((t, canonical_site(s)) for t, s in events)
        self.order = [s for _, s in self.events]
        self.done: set[str] = set()

    def due(self, step: int, losses: Sequence[float],
            probe: Callable[[], float] | None = None) -> list[str]:
        return [s for t, s in self.events if t == step and s not in self.done]

    def load_state_dict(self, state: dict, frozen: Sequence[str] | None = None) -> None:
        # a branch's new events may name a site its checkpoint froze already: it stays as it is
        self.done = set(frozen or ())

    def next_label(self, step: int) -> str:
        upcoming = [(t, s) for t, s in self.events if t > step]
        return f"{upcoming[0][1]} @ {upcoming[0][0]}" if upcoming else "-"


class AdaptiveSchedule(Schedule):
    """Freeze the next site once the loss is back within ``tolerance`` of its level just before
    the previous removal: held-out CE on fixed tokens (``signal: probe``) or the mean training
    loss over ``window`` steps (``signal: train``). Never sooner than ``min_gap`` steps, never
    later than ``max_gap``, and every site gone by ``finish_by`` of the run (the longest wait
    shrinks to make it) -- unless the model is diverging: while the loss is more than
    ``diverged`` nats above its level before the previous removal, no removal is forced; the
    schedule waits for the model to recover (``stall`` records the last such wait), and a run
    that ends waiting keeps its sites live and says so rather than freezing into a broken
    model (SmolLM2-135M at 20K tokens: the deadline froze one site a step while the held-out
    loss rose from 5.3 to 12.7). ``max_rise`` holds every removal, due or forced, while the loss is
    that far above its level before the first removal, so removals that each cost less than
    ``diverged`` cannot add up to a broken model."""

    def __init__(self, order: list[str], cfg: AdaptiveConfig, start: int, total_steps: int,
                 probe_every: int = 1):
        self.order, self.cfg, self.start = [canonical_site(s) for s in order], cfg, start
        # signal=probe: between min_gap and max_gap, the probe is measured every probe_every
        # steps only (a removal can then come only on those steps)
        self.probe_every = probe_every if cfg.signal == "probe" else 1
        self.deadline = max(start + 1, int(cfg.finish_by * total_steps))
        self.next_idx = 0
        self.last_step = -1
        self.reference: float | None = None
        self.baseline: float | None = None  # the level before the first removal
        self.stall: dict | None = None  # the last forced removal declined: step, level, reference

    def _level(self, losses: Sequence[float], probe: Callable[[], float] | None) -> float:
        if self.cfg.signal == "probe" and probe is not None:
            return probe()
        recent = losses[-self.cfg.window :]
        return sum(recent) / len(recent)

    def due(self, step: int, losses: Sequence[float],
            probe: Callable[[], float] | None = None) -> list[str]:
        if self.next_idx >= len(self.order) or step < self.start or not losses:
            return []
        since = step - self.last_step
        remaining = len(self.order) - self.next_idx
        max_gap = min(self.cfg.max_gap, max(1, (self.deadline - step) // remaining))
        level = None
        if self.next_idx > 0 and self.reference is not None:
            if since < max_gap:
                min_gap = max(self.cfg.min_gap,
                              self.cfg.window if self.cfg.signal == "train" else 1)
                if since < min_gap or (since - min_gap) % self.probe_every:
                    return []
                level = self._level(losses, probe)
                if level > self.reference + self.cfg.tolerance or self._over_budget(level):
                    return []
            else:
                level = self._level(losses, probe)
                if level > self.reference + self.cfg.diverged:
                    self.stall = {"step": step, "level": level, "reference": self.reference}
                    return []  # due by the clock, but the model has not recovered: wait
                if self._over_budget(level):
                    self.stall = {"step": step, "level": level, "reference": self.baseline,
                                  "max_rise": self.cfg.max_rise}
                    return []  # the removals so far cost more than the run's budget: wait
        self.reference = level if level is not None else self._level(losses, probe)
        if self.baseline is None:
            self.baseline = self.reference
        self.last_step = step
        self.next_idx += 1
        return [self.order[self.next_idx - 1]]

    def next_label(self, step: int) -> str:
        if self.next_idx >= len(self.order):
            return "-"
        if self.reference is None:
            return self.order[self.next_idx]
        return f"{self.order[self.next_idx]} at loss<={self.reference + self.cfg.tolerance:.3f}"

    def remaining(self) -> list[str]:
        return self.order[self.next_idx :]

    def state_dict(self) -> dict:
        return {"next_idx": self.next_idx, "last_step": self.last_step, "reference": self.reference,
                "baseline": self.baseline, "stall": self.stall}

    def load_state_dict(self, state: dict, frozen: Sequence[str] | None = None) -> None:
        # no site names in the state: a run from before the role names resumes as it was.
        # A fixed schedule's state is empty: a branch from one starts this schedule afresh
        self.next_idx, self.last_step = state.get("next_idx", 0), state.get("last_step", -1)
        self.reference, self.stall = state.get("reference"), state.get("stall")
        # runs from before max_rise have no baseline: their first removal's is unknown
        self.baseline = state.get("baseline", self.reference)
        done = [canonical_site(s) for s in frozen] if frozen is not None else None
        if done is not None and set(done) != set(self.order[: self.next_idx]):
            stand = set(done)
            # a branch with a new order (``noln branch ... schedule=FILE``): what it froze
            # stands, the rest follow this order from the next site
            self.order = done + [s for s in self.order if s not in stand]
            self.next_idx = len(done)


def check_gap_roles(cfg: FixedConfig) -> None:
    """Every key of ``fixed.gaps`` is a site role (or an old per-family kind): one that is not
    would be ignored, its sites given a gap of 1. Checked whatever the schedule, before the
    model loads: a typo in a config is refused, not kept silently for a later fixed run."""
    unknown = [k for k in cfg.gaps or {} if canonical_site(k) not in ROLES]
    if unknown:
        raise NolnError(f"unknown site role '{unknown[0]}' in fixed.gaps: the roles are "
                        f"{', '.join(ROLES)}")


def fixed_events(order: list[str], kind_of: dict[str, str], cfg: FixedConfig,
                 total_steps: int) -> list[tuple[int, str]]:
    """Anchors' fixed gaps (per site role) or, without gaps, even spacing to ``finish_by``.
    An old per-family kind (``ln_2``) is read as its role and wins over the role's own key:
    presets key gaps by role, so an old name comes from the user or an old run's config.yaml
    merged over a preset."""
    start = cfg.start if cfg.start is not None else max(1, round(0.07 * total_steps))
    if cfg.gaps is None:
        span = max(0, int(cfg.finish_by * total_steps) - start)
        gap = max(1, span // max(1, len(order) - 1))
        return [(start + i * gap, s) for i, s in enumerate(order)]
    check_gap_roles(cfg)
    gaps = {k: v for k, v in cfg.gaps.items() if canonical_site(k) == k}
    gaps.update({canonical_site(k): v for k, v in cfg.gaps.items() if canonical_site(k) != k})
    events, step = [], start
    for i, site in enumerate(order):
        events.append((step, site))
        if i + 1 < len(order):
            step += gaps.get(kind_of[site], 1)
    return events


def read_schedule_file(path: Path) -> dict:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except OSError:
        raise NolnError(f"schedule file '{path}' does not exist: give fixed, adaptive or a "
                        "YAML file") from None
    except yaml.YAMLError as e:
        raise NolnError(f"schedule file '{path}' is not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise NolnError(f"schedule file '{path}' must be a mapping with 'events' or 'type'")
    return spec


def roles_of(kind_of: dict[str, str]) -> set[str]:
    """The roles that stand for several sites (``final`` is a site and a role: a site)."""
    return set(kind_of.values()) - set(kind_of)


def expand_roles(order: list[str], site_names: list[str], kind_of: dict[str, str]) -> list[str]:
    """A schedule's ``order`` where a role (``mlp_in``, ``attn_in_v`` ...) stands for all its
    sites, block 0 first: ``[mlp_in, attn_in_v, attn_in_qk, final]`` changes the order of the
    phases without naming every site. Roles joined by ``+`` go block by block, in the order
    named within each block: ``[mlp_in, attn_in_qk+attn_in_v, final]`` removes every MLP input,
    then block 0's two attention inputs, block 1's, and so on. A site named twice is an error.

    ``site_names`` are in forward order (as ``Adapter.site_names`` gives them), so a role's
    sites, in the order they appear there, are block 0's first."""
    roles = roles_of(kind_of)

    def sites_of(name: str) -> list[str]:
        if "+" not in name:
            return [s for s in site_names if kind_of[s] == name] if name in roles else [name]
        parts = name.split("+")
        if bad := [p for p in parts if p not in roles]:
            raise NolnError(f"schedule order '{name}': '{bad[0]}' is not a role of this model "
                            f"(roles joined by + go block by block; its roles: "
                            f"{', '.join(sorted(roles))})")
        per_role = [[s for s in site_names if kind_of[s] == p] for p in parts]
        if len({len(sites) for sites in per_role}) > 1:
            raise NolnError(f"schedule order '{name}': its roles do not have a site in the same "
                            "blocks, so they cannot go block by block: name them apart")
        return [s for block in zip(*per_role, strict=True) for s in block]

    out = [site for name in order for site in sites_of(name)]
    twice = sorted({s for s in out if out.count(s) > 1})
    if twice:
        raise NolnError(f"schedule order names site '{twice[0]}' twice (a role stands for all "
                        "its sites): name each site or role once")
    return out


def removal_order(spec: str, site_names: list[str], kind_of: dict[str, str],
                  order: list[str] | None = None) -> list[str]:
    """The sites in the order a run with schedule ``spec`` and ``order`` removes them
    (``noln sites``): a fixed or adaptive schedule's order, a schedule file's events by step.
    The adaptive schedule decides when, never what comes next, so the order is known now."""
    far = 1 << 40  # (no run length: every event fits)
    return build_schedule(spec, site_names, kind_of, far, FixedConfig(), AdaptiveConfig(),
                          order=order).order


def build_schedule(spec: str, site_names: list[str], kind_of: dict[str, str], total_steps: int,
                   fixed: FixedConfig, adaptive: AdaptiveConfig, keep_ln: bool = False,
                   probe_every: int = 1, order: list[str] | None = None) -> Schedule:
    """Validate and build the schedule; every error is raised here, before training starts.
    ``site_names``: the model's sites in default order; ``kind_of``: each one's role;
    ``order``: the config's removal order (sites and roles, ``expand_roles``), which a schedule
    file's own ``order`` replaces. Names read from a schedule file may be old per-family ones
    (``canonical_site``)."""
    if keep_ln:
        return FixedSchedule([])
    order = expand_roles(order, site_names, kind_of) if order else list(site_names)
    file_spec: dict = {}
    if spec not in ("fixed", "adaptive"):
        file_spec = read_schedule_file(Path(spec))
        spec = file_spec.get("type", "events" if "events" in file_spec else "fixed")
        if "order" in file_spec:
            order = expand_roles([str(s) for s in file_spec["order"]], site_names, kind_of)
    unknown = [s for s in order if canonical_site(s) not in kind_of]
    order = [canonical_site(s) for s in order]
    if spec == "events":
        try:
            events = [(int(e["step"]), str(e["site"])) for e in file_spec["events"]]
        except (KeyError, TypeError, ValueError):
            raise NolnError("schedule 'events' must be a list of {step: N, site: NAME}") from None
        unknown += [s for _, s in events if canonical_site(s) not in kind_of]
    if unknown:
        roles = sorted(roles_of(kind_of))
        raise NolnError(f"schedule names site '{unknown[0]}', which this model does not have: "
                        f"sites are {site_names[0]} ... {site_names[-1]} "
                        f"({len(site_names)} in all; see `noln sites MODEL`), roles "
                        f"{', '.join(roles)}")
    if spec == "events":
        late = [(t, s) for t, s in events if not 0 <= t < total_steps]
        if late:
            raise NolnError(f"schedule freezes {late[0][1]} at step {late[0][0]}, outside the "
                            f"run's {total_steps} steps: lengthen it (--steps/--tokens) or move it")
        return FixedSchedule(events)
    if spec == "fixed":
        fixed = fixed.model_copy(update={k: v for k, v in file_spec.items()
                                         if k in FixedConfig.model_fields})
        events = fixed_events(order, kind_of, fixed, total_steps)
        if events and events[-1][0] >= total_steps:
            raise NolnError(f"fixed schedule ends at step {events[-1][0]} but the run has "
                            f"{total_steps} steps: shorten the gaps or lengthen the run")
        return FixedSchedule(events)
    if spec == "adaptive":
        adaptive = adaptive.model_copy(update={k: v for k, v in file_spec.items()
                                               if k in AdaptiveConfig.model_fields})
        # fixed.start too: configs from before adaptive.start set the adaptive start there
        start = adaptive.start if adaptive.start is not None else fixed.start
        start = start if start is not None else max(1, round(0.07 * total_steps))
        return AdaptiveSchedule(order, adaptive, start, total_steps, probe_every)
    raise NolnError(f"unknown schedule type '{spec}': use fixed, adaptive or a YAML file")

from pathlib import Path

import pytest

from noln.config import AdaptiveConfig, FixedConfig
from noln.errors import NolnError
from noln.schedule import AdaptiveSchedule, build_schedule

SITES = [f"blocks.{i}.{k}" for k in ("mlp_in", "attn_in_qk", "attn_in_v")
         for i in range(2)] + ["final"]
KINDS = {s: s.rsplit(".", 1)[-1] for s in SITES}


def _build(spec, steps=100, **fixed):
    return build_schedule(spec, SITES, KINDS, steps, FixedConfig(**fixed), AdaptiveConfig())


EVENTS = [(10, "blocks.0.mlp_in"), (12, "blocks.1.mlp_in"), (14, "blocks.0.attn_in_qk"),
          (17, "blocks.1.attn_in_qk"), (20, "blocks.0.attn_in_v"), (25, "blocks.1.attn_in_v"),
          (30, "final")]


def test_fixed_gaps_per_kind_in_kind_major_order():
    s = _build("fixed", start=10, gaps={"mlp_in": 2, "attn_in_qk": 3, "attn_in_v": 5})
    assert s.events == EVENTS
    assert s.due(17, []) == ["blocks.1.attn_in_qk"] and s.due(18, []) == []


@pytest.mark.parametrize("gaps", [{"ln_2": 2, "ln_1_qk": 3, "ln_1_v": 5},  # GPT-2's old names
                                  {"ln_post": 2, "ln_in_qk": 3, "ln_in_v": 5},  # NeoX's
                                  {"post_attention_layernorm": 2, "input_layernorm_qk": 3,
                                   "input_layernorm_v": 5},  # Llama's
                                  {"mlp_in": 7, "ln_2": 2, "ln_1_qk": 3, "attn_in_v": 5}])
def test_old_site_kinds_are_gap_keys_for_their_roles(gaps):
    """Old runs' config.yaml and old config files key gaps by the old per-family kinds. Merged
    over a preset (keyed by role), the old name is the user's: it wins over the role's key."""
    assert _build("fixed", start=10, gaps=gaps).events == EVENTS


def test_fixed_without_gaps_spreads_evenly_to_finish_by():
    s = _build("fixed", steps=200, start=10, finish_by=0.5)
    steps = [t for t, _ in s.events]
    assert steps[0] == 10 and steps[-1] <= 100 and len(set(b - a for a, b in
                                                              zip(steps, steps[1:]))) == 1


def test_fixed_schedule_past_the_end_is_rejected_before_training():
    with pytest.raises(NolnError, match="ends at step 610 but the run has 100 steps"):
        _build("fixed", start=10, gaps={"mlp_in": 100, "attn_in_qk": 100, "attn_in_v": 100})


def test_keep_ln_removes_nothing():
    s = build_schedule("adaptive", SITES, KINDS, 100, FixedConfig(), AdaptiveConfig(),
                       keep_ln=True)
    assert all(s.due(t, [1.0] * (t + 1)) == [] for t in range(100))


def _drive(schedule, losses_fn, steps):
    """Run a schedule against a synthetic loss curve; returns {step: site}."""
    fired, losses = {}, []
    for t in range(steps):
        for site in schedule.due(t, losses):
            fired[t] = site
        losses.append(losses_fn(t, len(fired)))
    return fired


def test_adaptive_waits_for_recovery_then_removes_next():
    cfg = AdaptiveConfig(signal="train", tolerance=0.02, window=2, min_gap=2, max_gap=50,
                         finish_by=1.0)
    sched = AdaptiveSchedule(SITES, cfg, start=5, total_steps=1000)

    def loss(t, n_removed):  # each removal: +0.5 nats, recovering 0.1 per step
        last = max([k for k in fired] or [0])
        return 3.0 + (max(0.0, 0.5 - 0.1 * (t - last)) if n_removed else 0.0)

    fired = {}
    losses = []
    for t in range(200):
        for site in sched.due(t, losses):
            fired[t] = site
        losses.append(loss(t, len(fired)))
    steps = sorted(fired)
    assert fired[steps[0]] == SITES[0] and steps[0] == 5
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    # recovery takes 5 steps to fall below +0.02 and the window needs 2 more: gaps of ~7, not 2
    assert all(6 <= g <= 8 for g in gaps), gaps
    assert [fired[t] for t in steps] == SITES


def test_adaptive_probe_signal_compares_held_out_loss_before_and_after():
    """Probe: the same held-out tokens; the site fires as soon as the probe is back."""
    cfg = AdaptiveConfig(tolerance=0.01, min_gap=1, max_gap=100, finish_by=1.0)
    sched = AdaptiveSchedule(SITES[:3], cfg, start=2, total_steps=1000)
    probe_values = {2: 3.00, 3: 3.30, 4: 3.05, 5: 3.005, 6: 3.2, 7: 2.9}
    calls = []

    def probe_at(t):
        def probe():
            calls.append(t)
            return probe_values[t]
        return probe

    fired = {t: sched.due(t, [9.9] * t, probe_at(t)) for t in range(2, 8)}
    # step 2: first site, reference 3.00; 3 and 4 above 3.01; 5 recovered -> second site,
    # new reference 3.005; 6 above; 7 below -> third site
    assert fired == {2: [SITES[0]], 3: [], 4: [], 5: [SITES[1]], 6: [], 7: [SITES[2]]}
    assert sched.due(8, [1.0] * 8, probe_at(99)) == [] and 99 not in calls  # done: no probe


def test_adaptive_max_gap_and_deadline_force_progress():
    cfg = AdaptiveConfig(tolerance=0.0, window=2, min_gap=2, max_gap=10, finish_by=0.5)
    sched = AdaptiveSchedule(SITES, cfg, start=0, total_steps=60)
    # never recovers, but each removal costs 0.2 nats: below `diverged` (0.5), so it is forced
    fired = _drive(sched, lambda t, n: 5.0 + 0.2 * n, 60)
    assert len(fired) == len(SITES)
    assert max(fired) <= 30  # all removed by finish_by * steps
    assert all(b - a <= 10 for a, b in zip(sorted(fired), sorted(fired)[1:]))
    assert sched.stall is None and sched.remaining() == []


def test_adaptive_does_not_force_removals_into_a_diverging_model():
    """The deadline must not freeze one site a step while the loss climbs (SmolLM2 at 20K
    tokens went from 5.3 to 12.7 that way): past `diverged` nats above the level before the
    last removal, the schedule waits; once the loss comes back, removals resume."""
    cfg = AdaptiveConfig(signal="train", tolerance=0.0, window=1, min_gap=1, max_gap=4,
                         finish_by=0.5, diverged=0.5)
    sched = AdaptiveSchedule(SITES, cfg, start=0, total_steps=40)
    # the second removal breaks the model (+2 nats) until step 30, when it recovers
    fired = _drive(sched, lambda t, n: 5.0 + (2.0 if n >= 2 and t < 30 else 0.0) + 0.1 * n, 40)
    steps = sorted(fired)
    assert len(steps) >= 2 and not any(30 > t > steps[1] for t in steps)  # waited, no freezing
    assert sched.stall is not None and sched.stall["level"] - sched.stall["reference"] > 0.5
    assert len(fired) == len(SITES) and max(steps) >= 30  # then finished after recovery

    never = AdaptiveSchedule(SITES, cfg, start=0, total_steps=40)
    fired = _drive(never, lambda t, n: 5.0 + (2.0 if n >= 2 else 0.0), 40)
    assert len(fired) == 2 and never.remaining() == SITES[2:]  # stops rather than diverging
    state = never.state_dict()
    again = AdaptiveSchedule(SITES, cfg, start=0, total_steps=40)
    again.load_state_dict(state)
    assert again.stall == never.stall and again.remaining() == never.remaining()


def test_adaptive_state_round_trip_continues_identically():
    cfg = AdaptiveConfig(window=2, min_gap=2)
    a = AdaptiveSchedule(SITES, cfg, start=1, total_steps=100)
    losses = [3.0, 3.1, 3.0, 2.9, 2.95, 3.3, 3.0]
    for t in range(len(losses)):
        a.due(t, losses[:t])
    b = AdaptiveSchedule(SITES, cfg, start=1, total_steps=100)
    b.load_state_dict(a.state_dict())
    more = losses + [2.8, 2.7]
    assert [a.due(t, more[:t]) for t in range(7, 9)] == [b.due(t, more[:t]) for t in range(7, 9)]


def test_schedule_file_events_and_validation(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("events:\n  - {step: 3, site: blocks.1.mlp_in}\n  - {step: 1, site: final}\n")
    s = _build(str(f))
    assert s.events == [(1, "final"), (3, "blocks.1.mlp_in")]
    f.write_text("events:\n  - {step: 3, site: blocks.9.mlp_in}\n")
    with pytest.raises(NolnError, match=r"names site 'blocks.9.mlp_in', which this model does "
                                        r"not have: sites are blocks.0.mlp_in \.\.\. final"):
        _build(str(f))
    f.write_text("events:\n  - {step: 300, site: final}\n")
    with pytest.raises(NolnError, match="at step 300, outside the run's 100 steps"):
        _build(str(f))
    f.write_text("type: adaptive\ntolerance: 0.5\norder: [final, blocks.0.mlp_in]\n")
    s = _build(str(f))
    assert isinstance(s, AdaptiveSchedule) and s.order == ["final", "blocks.0.mlp_in"]
    assert s.cfg.tolerance == 0.5
    with pytest.raises(NolnError, match="does not exist"):
        _build(str(tmp_path / "missing.yaml"))


def test_a_schedule_order_may_name_roles(tmp_path):
    """``order: [mlp_in, attn_in_v, attn_in_qk, final]``: the phases reordered, each role's
    sites block 0 first; roles and sites mix, and a site named twice is an error."""
    f = tmp_path / "s.yaml"
    f.write_text("type: adaptive\norder: [mlp_in, attn_in_v, attn_in_qk, final]\n")
    assert _build(str(f)).order == ["blocks.0.mlp_in", "blocks.1.mlp_in", "blocks.0.attn_in_v",
                                    "blocks.1.attn_in_v", "blocks.0.attn_in_qk",
                                    "blocks.1.attn_in_qk", "final"]
    f.write_text("type: fixed\norder: [blocks.1.attn_in_v, mlp_in, final]\n")
    assert [site for _, site in _build(str(f)).events] == \
        ["blocks.1.attn_in_v", "blocks.0.mlp_in", "blocks.1.mlp_in", "final"]
    f.write_text("type: adaptive\norder: [mlp_in, blocks.0.mlp_in]\n")
    with pytest.raises(NolnError, match="names site 'blocks.0.mlp_in' twice"):
        _build(str(f))
    f.write_text("type: adaptive\norder: [mlp_in, attn_out]\n")
    with pytest.raises(NolnError, match="names site 'attn_out', which this model does not have"
                       r".*roles attn_in_qk, attn_in_v, mlp_in$"):
        _build(str(f))


def test_roles_joined_by_plus_go_block_by_block(tmp_path):
    """``attn_in_qk+attn_in_v``: block 0's two attention inputs, then block 1's, in the order
    named within a block; the same order given as the config's ``order`` (no file) or in a
    file, where the file's replaces the config's; a part that is not a role, or roles that
    do not share their blocks, is one line."""
    by_block = ["blocks.0.mlp_in", "blocks.1.mlp_in", "blocks.0.attn_in_v",
                "blocks.0.attn_in_qk", "blocks.1.attn_in_v", "blocks.1.attn_in_qk", "final"]
    order = ["mlp_in", "attn_in_v+attn_in_qk", "final"]
    built = build_schedule("adaptive", SITES, KINDS, 100, FixedConfig(), AdaptiveConfig(),
                           order=order)
    assert built.order == by_block
    fixed = build_schedule("fixed", SITES, KINDS, 100, FixedConfig(), AdaptiveConfig(),
                           order=order)
    assert [site for _, site in fixed.events] == by_block
    f = tmp_path / "s.yaml"
    f.write_text("type: adaptive\norder: [final, mlp_in+attn_in_qk, attn_in_v]\n")
    assert build_schedule(str(f), SITES, KINDS, 100, FixedConfig(), AdaptiveConfig(),
                          order=order).order == \
        ["final", "blocks.0.mlp_in", "blocks.0.attn_in_qk", "blocks.1.mlp_in",
         "blocks.1.attn_in_qk", "blocks.0.attn_in_v", "blocks.1.attn_in_v"]
    with pytest.raises(NolnError, match="'attn_out' is not a role of this model"):
        build_schedule("adaptive", SITES, KINDS, 100, FixedConfig(), AdaptiveConfig(),
                       order=["mlp_in+attn_out"])
    with pytest.raises(NolnError, match="not a role of this model"):  # final is a site
        build_schedule("adaptive", SITES, KINDS, 100, FixedConfig(), AdaptiveConfig(),
                       order=["attn_in_v+final"])
    uneven = {**KINDS, "blocks.1.q_norm": "q_norm"}
    with pytest.raises(NolnError, match="do not have a site in the same blocks"):
        build_schedule("adaptive", [*SITES, "blocks.1.q_norm"], uneven, 100, FixedConfig(),
                       AdaptiveConfig(), order=["mlp_in+q_norm"])


def test_block_by_block_order_equals_attempt_12s_file_on_smollm2():
    """``[mlp_in, attn_in_qk+attn_in_v, final]`` on SmolLM2's 91 sites (a 30-block llama
    skeleton, no weights) is, site for site, the order written out by hand in
    ``docs/benchmarks/smollm2/order-by-block.yaml`` (attempts 12-46b)."""
    import yaml
    from transformers import LlamaConfig

    from noln.arch import skeleton
    from noln.schedule import expand_roles

    shell = skeleton(LlamaConfig(num_hidden_layers=30, hidden_size=64, intermediate_size=128,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=32))
    names = shell.site_names()
    kinds = {name: site.kind for name, site in shell.sites.items()}
    root = Path(__file__).resolve().parents[1]
    written = yaml.safe_load((root / "docs/benchmarks/smollm2/order-by-block.yaml").read_text())
    assert len(names) == 91
    assert expand_roles(["mlp_in", "attn_in_qk+attn_in_v", "final"], names, kinds) == \
        expand_roles(written["order"], names, kinds)


def test_schedule_files_with_old_site_names_still_work(tmp_path):
    """A schedule file written before sites were named by role: its events and order name the
    old per-family sites, and they freeze the same sites under their role names."""
    f = tmp_path / "old.yaml"
    f.write_text("events:\n  - {step: 3, site: blocks.1.ln_2}\n  - {step: 1, site: ln_f}\n"
                 "  - {step: 2, site: blocks.0.input_layernorm_v}\n")
    s = _build(str(f))
    assert s.events == [(1, "final"), (2, "blocks.0.attn_in_v"), (3, "blocks.1.mlp_in")]
    assert s.due(2, []) == ["blocks.0.attn_in_v"]
    f.write_text("type: adaptive\norder: [norm, blocks.0.ln_in_qk, blocks.1.ln_1_v]\n")
    assert _build(str(f)).order == ["final", "blocks.0.attn_in_qk", "blocks.1.attn_in_v"]
    f.write_text("events:\n  - {step: 3, site: blocks.9.ln_2}\n")
    with pytest.raises(NolnError, match="names site 'blocks.9.ln_2', which this model does not"):
        _build(str(f))


def test_adaptive_state_from_a_run_with_old_names_resumes(tmp_path):
    """A checkpoint's schedule state from a run started with old site names (its schedule file
    ordered by them) continues in a schedule built with role names: same next site, same
    decisions."""
    f = tmp_path / "old.yaml"
    old = [f"blocks.{i}.{k}" for k in ("ln_2", "ln_1_qk", "ln_1_v") for i in range(2)] + ["ln_f"]
    f.write_text("type: adaptive\norder: [" + ", ".join(old) + "]\n")
    cfg = AdaptiveConfig(tolerance=0.05, window=1, min_gap=1, max_gap=50)
    a = AdaptiveSchedule(old, cfg, start=1, total_steps=100)  # as built before the rename
    losses = [3.0, 3.1, 3.0, 2.9, 2.95, 3.3, 3.0]
    for t in range(len(losses)):
        a.due(t, losses[:t])
    state = {"next_idx": a.next_idx, "last_step": a.last_step, "reference": a.reference,
             "stall": a.stall}  # what an old checkpoint holds
    b = build_schedule(str(f), SITES, KINDS, 100, FixedConfig(), cfg)
    b.load_state_dict(state)
    assert b.order == SITES and b.remaining()[0] == SITES[a.next_idx]
    more = losses + [2.8, 2.7, 2.6]
    assert [a.due(t, more[:t]) for t in range(7, 10)] == [b.due(t, more[:t])
                                                          for t in range(7, 10)]


def test_an_old_gap_key_over_a_preset_keyed_by_role_is_the_users():
    """GPT-2's preset keys gaps by role; an old run's config.yaml (or an old config file) gives
    ``ln_2``: merged over the preset, the user's value is the one the schedule uses."""
    from noln.config import make_config

    cfg = make_config(model="gpt2", data="builtin", out="run", fixed={"gaps": {"ln_2": 4}})
    assert cfg.fixed.gaps["mlp_in"] == 2 and cfg.fixed.gaps["ln_2"] == 4  # both, merged
    s = build_schedule("fixed", SITES, KINDS, 100, cfg.fixed, AdaptiveConfig())
    assert [t for t, _ in s.events] == [20, 24, 28, 30, 32, 35, 38]


def test_adaptive_max_rise_stops_slow_drift_that_diverged_lets_through():
    """Each removal costs 0.2 nats and never recovers: below `diverged`, so the deadline forces
    them all; with max_rise 0.5 the schedule stops once the loss is 0.5 above its level before
    the first removal, says why, and keeps that through a checkpoint."""
    drift = lambda t, n: 5.0 + 0.2 * n  # noqa: E731
    base = dict(tolerance=0.0, window=2, min_gap=2, max_gap=10, finish_by=0.5)
    free = AdaptiveSchedule(SITES, AdaptiveConfig(**base), start=0, total_steps=60)
    assert len(_drive(free, drift, 60)) == len(SITES)
    capped = AdaptiveSchedule(SITES, AdaptiveConfig(**base, max_rise=0.5), start=0,
                              total_steps=60)
    fired = _drive(capped, drift, 60)
    assert len(fired) == 3  # levels before them 5.0, 5.2, 5.4; 5.6 is over 5.0 + 0.5
    assert capped.stall["max_rise"] == 0.5 and capped.stall["reference"] == 5.0
    assert capped.stall["level"] == pytest.approx(5.6)
    again = AdaptiveSchedule(SITES, AdaptiveConfig(**base, max_rise=0.5), start=0,
                             total_steps=60)
    again.load_state_dict(capped.state_dict())
    assert again.baseline == 5.0 and again.remaining() == capped.remaining()


def test_adaptive_max_rise_also_holds_removals_that_are_due():
    """A model that recovers to its last reference each time but drifts above its start (the
    reference ratchets by `tolerance` per removal) is held by max_rise too, without a stall:
    the schedule is waiting, not forcing."""
    cfg = AdaptiveConfig(signal="train", tolerance=0.2, window=1, min_gap=1, max_gap=100,
                         finish_by=1.0, max_rise=0.3)
    sched = AdaptiveSchedule(SITES, cfg, start=0, total_steps=200)
    fired = _drive(sched, lambda t, n: 5.0 + 0.14 * n, 40)  # within tolerance: always due
    assert len(fired) == 3 and sched.stall is None  # 5.0, 5.14, 5.28; 5.42 is over 5.3


def test_adaptive_start_is_its_own_setting(tmp_path):
    """``adaptive.start`` sets the first step an adaptive schedule may remove at, in the config
    or a schedule file; ``fixed.start`` (where older configs put it) is the fallback, then 7%."""
    def start(adaptive=None, file=None, **fixed):
        spec = "adaptive"
        if file is not None:
            spec = str(tmp_path / "s.yaml")
            (tmp_path / "s.yaml").write_text(file)
        return build_schedule(spec, SITES, KINDS, 1000, FixedConfig(**fixed),
                              AdaptiveConfig(**(adaptive or {}))).start

    assert start() == 70
    assert start(start=30) == 30
    assert start(adaptive={"start": 150}, start=30) == 150
    assert start(file="type: adaptive\nstart: 200\n", adaptive={"start": 150}) == 200


def test_probe_every_measures_the_probe_less_often():
    """``probe_every=N``: between min_gap and max_gap the probe is measured only every N steps
    after min_gap, so removals land on those steps; forced removals at max_gap still measure."""
    def run(every):
        cfg = AdaptiveConfig(tolerance=0.02, min_gap=2, max_gap=50, finish_by=1.0)
        sched = AdaptiveSchedule(SITES, cfg, start=5, total_steps=1000, probe_every=every)
        calls, fired = [], {}

        def probe(t):  # each removal costs 0.5 nats, recovered at 0.1 a step
            calls.append(t)
            return 5.0 + max(0.0, 0.5 - 0.1 * (t - max(fired))) if fired else 5.0

        for t in range(100):
            for site in sched.due(t, [5.0], lambda t=t: probe(t)):
                fired[t] = site
        return fired, calls

    every1, calls1 = run(1)
    every3, calls3 = run(3)
    assert list(every1) == list(range(5, 5 + 5 * len(SITES), 5))  # recovered 5 steps on
    # measured at 2, 5, 8 ... steps after a removal: recovery seen at 5 steps, so same here
    assert list(every3) == list(every1)
    # after each removal: measured 2, 3, 4 and 5 steps on, against 2 and 5 steps on
    assert len(calls1) == 1 + 4 * (len(SITES) - 1) and len(calls3) == 1 + 2 * (len(SITES) - 1)
    assert all((t - max(s for s in every3 if s < t)) % 3 == 2 for t in calls3 if t > 5)
    every4, _ = run(4)  # measured at 2, 6, 10 ...: recovery first seen 6 steps on
    assert list(every4)[:3] == [5, 11, 17]


def test_a_run_held_by_its_budget_says_how_to_relax_it(tmp_path):
    """The message of a run that ended waiting on adaptive.max_rise names the budget it can be
    resumed with (resume_config lets the adaptive settings change); one that waited on
    adaptive.diverged does not."""
    from types import SimpleNamespace

    from noln.remove import unfinished_removal

    adapter = SimpleNamespace(site_names=lambda: ["a", "b", "c"], frozen_sites=lambda: ["a"],
                              sites=[1, 2, 3])
    held = SimpleNamespace(stall={"step": 40, "level": 5.6, "reference": 5.3, "max_rise": 0.3})
    msg = unfinished_removal(adapter, held, tmp_path)
    assert "2 of 3 sites still live (next b)" in msg and "adaptive.max_rise" in msg
    assert "adaptive.max_rise=0.6 or null" in msg and f"--resume {tmp_path}" in msg
    waited = SimpleNamespace(stall={"step": 40, "level": 5.9, "reference": 5.3})
    msg = unfinished_removal(adapter, waited, tmp_path)
    assert "adaptive.diverged" in msg and "max_rise=" not in msg


def test_a_new_order_continues_from_the_sites_a_checkpoint_froze():
    """A branch with a new schedule (`noln branch --schedule`): the sites the checkpoint froze
    stand, the next removal is the new order's first live site, and an unchanged order resumes
    exactly as it was."""
    cfg = AdaptiveConfig(signal="train", tolerance=1.0, window=1, min_gap=1, max_gap=50)
    old = AdaptiveSchedule(SITES, cfg, start=0, total_steps=100)
    _drive(old, lambda t, n: 3.0, 4)  # blocks.0/1.mlp_in and blocks.0.attn_in_qk frozen
    frozen = SITES[:3]
    assert old.remaining() == SITES[3:]
    by_block = ["blocks.0.mlp_in", "blocks.1.mlp_in", "blocks.0.attn_in_v",
                "blocks.0.attn_in_qk", "blocks.1.attn_in_v", "blocks.1.attn_in_qk", "final"]
    new = AdaptiveSchedule(by_block, cfg, start=0, total_steps=100)
    new.load_state_dict(old.state_dict(), frozen)
    assert new.remaining() == ["blocks.0.attn_in_v", "blocks.1.attn_in_v",
                               "blocks.1.attn_in_qk", "final"]
    assert new.due(4, [3.0] * 4) == ["blocks.0.attn_in_v"]  # min_gap after step 3's
    same = AdaptiveSchedule(SITES, cfg, start=0, total_steps=100)
    same.load_state_dict(old.state_dict(), frozen)
    assert same.order == SITES and same.remaining() == old.remaining()
    # from a fixed schedule's (empty) state: the adaptive one starts at its first live site
    fresh = AdaptiveSchedule(by_block, cfg, start=0, total_steps=100)
    fresh.load_state_dict({}, frozen)
    assert fresh.due(5, [3.0] * 5) == ["blocks.0.attn_in_v"]

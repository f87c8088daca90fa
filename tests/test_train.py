"""The removal loop on a tiny model: full run, resume after SIGKILL, guard, bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
import yaml

import noln
from noln.checkpoint import load_checkpoint
from noln.errors import NolnError
from tests.conftest import assert_run_matches_its_exports

FAST = dict(steps=30, batch_size=4, ctx=64, lr=1e-3, warmup_steps=2, eval_tokens=512,
            checkpoint_every=5, progress=False)


def test_full_removal_run_freezes_every_site_and_exports(tiny_model_dir, text_jsonl, tmp_path):
    r = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              schedule="adaptive", export_format="both", **FAST)
    assert r.adapter.export_state() == "all" and len(r.events) == 7
    assert [e["site"] for e in r.events] == r.adapter.site_names()
    for name in ("log.jsonl", "summary.json", "loss.png", "config.yaml", "model/noln.json"):
        assert (tmp_path / "run" / name).exists(), name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tokens"] == 30 * 4 * 64 and len(summary["removals"]) == 7
    assert all(e["probe_after"] > 0 for e in summary["removals"])
    # where the command's time went: each part measured, together no more than the wall; the
    # steps' part is the log's own per-step times (on a GPU run, checkpoints and loading took
    # most of the wall time, which the steps alone did not show)
    parts = summary["time_s"]
    assert list(parts) == ["wall", "loading", "evaluation", "steps", "checkpoints", "export",
                           "other"]
    assert all(v > 0 for k, v in parts.items() if k != "other") and parts["other"] >= 0
    assert sum(v for k, v in parts.items() if k != "wall") == pytest.approx(parts["wall"],
                                                                            abs=0.01)
    assert parts["steps"] == pytest.approx(sum(e["dt"] for e in r.log if "dt" in e), abs=0.01)
    # its 7 checkpoints (step 0, every 5 steps) on the background thread, where RAM is known
    from noln.checkpoint import memory_available
    assert sum(summary["checkpoint_writes"].values()) == 7
    if memory_available() is not None:
        assert summary["checkpoint_writes"] == {"background": 7}
    assert_run_matches_its_exports(r, vocab=500)


def test_taper_run_moves_each_site_to_its_fixed_scale_and_exports(tiny_model_dir, text_jsonl,
                                                                    tmp_path):
    """With --taper N, each removed site reaches its fixed scale N steps after its removal
    (a 'tapered' event), and the finished run exports like any other; with the site loss on,
    each step logs it: zero before the first removal, positive after."""
    r = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              schedule="fixed", export_format="both", taper=4, site_aux=0.1,
                              fixed={"finish_by": 0.6}, **FAST)
    first = min(e["step"] for e in r.events)
    steps = [e for e in r.log if "event" not in e]
    assert all(e["site_aux"] == 0.0 for e in steps if e["step"] < first)
    assert all(e["site_aux"] > 0.0 for e in steps if e["step"] >= first)
    removed = {e["site"]: e["step"] for e in r.log if e.get("event") == "remove"}
    tapered = {e["site"]: e["step"] for e in r.log if e.get("event") == "tapered"}
    assert set(removed) == set(tapered) == set(r.adapter.site_names())
    assert all(tapered[s] == removed[s] + 3 for s in removed), (removed, tapered)
    # at its removal step a tapering site is still the live norm (test_fakenorm), so the probe
    # is not measured a second time: the value before is the value after
    assert all(e["probe_after"] == e["probe_before"] for e in r.events)
    assert r.adapter.export_state() == "all" and r.summary["complete"]
    assert_run_matches_its_exports(r, vocab=500)


@pytest.mark.parametrize("shape, weights", [
    ("linear", [0.25, 0.5, 0.75, 1.0]),
    ("cosine", [0.1464466, 0.5, 0.8535534, 1.0])])  # 1/2 - cos(pi k/4)/2
def test_taper_shapes_reach_the_fixed_scale_in_their_steps(shape, weights):
    from noln.train import next_taper_weight

    w, seen = 0.0, []
    for _ in range(5):
        w = next_taper_weight(w, 4, shape)
        seen.append(w)
    assert seen == pytest.approx([*weights, 1.0], abs=1e-6)
    # from a float32 buffer (a resumed run), the same next step
    assert next_taper_weight(float(torch.tensor(weights[1], dtype=torch.float32)), 4, shape) == \
        pytest.approx(weights[2], abs=1e-6)


def test_taper_that_cannot_end_in_the_run_fails_before_training(tiny_model_dir, text_jsonl,
                                                                 tmp_path):
    with pytest.raises(NolnError, match="--taper 40 does not fit.*give --taper 1[0-9] or less"):
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              schedule="fixed", taper=40, **FAST)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # an adaptive schedule that starts after the run's end: the start is what to change
    with pytest.raises(NolnError, match="last removal comes at step 31, not within the run's "
                                        "30 steps: give more --steps/--tokens, or a schedule "
                                        "that starts earlier"):
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              schedule="adaptive", taper=4, adaptive={"start": 30}, **FAST)
    # a deadline at the run's last step: more steps never make room for the taper
    with pytest.raises(NolnError, match="taper would end at step 34; give adaptive.finish_by "
                                        "below 1"):
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              schedule="adaptive", taper=4,
                              adaptive={"start": 2, "finish_by": 1.0}, **FAST)


# bit-identical results across processes: one thread, and MKL's reproducible code paths (its
# default picks kernels by memory alignment, which differs between processes: ~1e-7 drift)
DETERMINISTIC = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}


def _cli(*args):
    return [sys.executable, "-c", "from noln.cli import main; main()", *args]


def _run_args(model, data, out):
    return ["remove", str(model), "--data", str(data), "--out", str(out), "--steps", "24",
            "--batch-size", "4", "--ctx", "64", "--lr", "1e-3", "--schedule", "fixed",
            "--checkpoint-every", "4", "--format", "none", "--quiet"]


def _steps_logged(log) -> int:
    """Training steps a run's log.jsonl holds so far (0 before it exists)."""
    return sum(1 for line in log.read_text().splitlines()
               if '"loss"' in line and '"event"' not in line) if log.exists() else 0


def _resume_and_compare(killed, whole, env):
    """Resume the killed run; it must end with the uninterrupted run's exact weights and a log
    holding each step once."""
    subprocess.run(_cli("remove", "--resume", str(killed), "--quiet"), check=True, env=env)
    a = load_checkpoint(whole / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 24
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()
             if '"event"' not in line]
    assert steps == list(range(24)), "the resumed log has each step exactly once"


def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, text_jsonl, tmp_path):
    env = DETERMINISTIC
    whole = tmp_path / "whole"
    subprocess.run(_cli(*_run_args(tiny_model_dir, text_jsonl, whole)), check=True, env=env)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*_run_args(tiny_model_dir, text_jsonl, killed)), env=env)
    log = killed / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once it is past the second checkpoint (step 8)
        if _steps_logged(log) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert 0 < ckpt["step"] < 24, "the kill should land mid-run"
    _resume_and_compare(killed, whole, env)


def test_sigterm_saves_the_step_in_progress_and_says_so(tiny_model_dir, text_jsonl, tmp_path):
    """`kill` (SIGTERM, as a cluster's scheduler stops a job) mid-run: the step in progress
    ends and is saved before the run stops, so the checkpoint holds every logged step (not the
    last multiple of --checkpoint-every), the message names that step, and the resumed run
    ends with the uninterrupted run's exact weights."""
    env = DETERMINISTIC
    whole = tmp_path / "whole"
    subprocess.run(_cli(*_run_args(tiny_model_dir, text_jsonl, whole)), check=True, env=env)
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(_cli(*_run_args(tiny_model_dir, text_jsonl, stopped)), env=env,
                            stderr=subprocess.PIPE, text=True)
    log = stopped / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and _steps_logged(log) < 9:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    step = load_checkpoint(stopped / "checkpoints" / "last.pt")["step"]
    assert 9 <= step < 24 and step == _steps_logged(log), "the checkpoint holds each logged step"
    assert f"interrupted: saved at step {step}; continue it with `noln remove --resume " \
        f"{stopped}`" in stderr and "Traceback" not in stderr
    _resume_and_compare(stopped, whole, env)


@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_ends_the_step_and_saves_and_a_second_stops_at_once(
        tiny_model_dir, text_jsonl, tmp_path, monkeypatch, one_thread, signals):
    """In the loop, a Ctrl-C lets the step in progress end and saves it (Interrupted, with
    the step), and the resumed run ends bitwise where the uninterrupted one ends; a second
    Ctrl-C stops at once, and the run keeps its last checkpoint."""
    from noln.errors import Interrupted
    from noln.train import Trainer

    model, data = str(tiny_model_dir), str(text_jsonl)
    base = dict(schedule="fixed", export_format="none", **{**FAST, "steps": 12})
    whole = noln.remove_layernorm(model, data, tmp_path / "whole", **base)
    real_loss = Trainer.loss

    def loss(self, *args, **kwargs):
        if self.state.step == 7 and not sent:
            sent.append(True)
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, mid-step
        return real_loss(self, *args, **kwargs)

    sent: list[bool] = []
    monkeypatch.setattr(Trainer, "loss", loss)
    # as in a terminal: a suite started in the background inherits SIGINT ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            noln.remove_layernorm(model, data, tmp_path / "run", **base)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    if signals == 2:
        assert not isinstance(stopped.value, Interrupted) and last["step"] == 5
        return
    assert isinstance(stopped.value, Interrupted) and stopped.value.step == last["step"] == 8
    monkeypatch.setattr(Trainer, "loss", real_loss)
    noln.remove_layernorm(resume=tmp_path / "run")
    a = load_checkpoint(whole.out / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


def test_guard_restores_checkpoint_and_lowers_lr_after_a_nan(tiny_model_dir, text_jsonl,
                                                             tmp_path, monkeypatch):
    from noln import train

    real_loss = train.Trainer.loss
    calls = {"n": 0}

    def flaky(self, x):
        loss, ce = real_loss(self, x)
        calls["n"] += 1
        if self.state.step == 12 and self.state.failures == 0:
            return loss * float("nan"), ce * float("nan")
        return loss, ce

    monkeypatch.setattr(train.Trainer, "loss", flaky)
    r = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              export_format="none", **FAST)
    guard = [e for e in r.log if e.get("event") == "guard"]
    assert len(guard) == 1 and guard[0]["step"] == 12 and guard[0]["restored_step"] == 10
    assert guard[0]["lr_scale"] == 0.5
    steps = [e for e in r.log if "event" not in e]
    assert [e["step"] for e in steps] == list(range(30))
    assert steps[-1]["lr"] == pytest.approx(0.5 * train.lr_at(29, r_cfg(r), 30))


def test_guard_catches_nan_gradients_under_a_finite_loss(tiny_model_dir, text_jsonl, tmp_path,
                                                          monkeypatch):
    """An activation past float range in the backward pass gives inf/nan gradients while the
    loss is finite; clipping would step nan into every weight. The guard restores instead."""
    from noln import train

    real_loss = train.Trainer.loss

    poisoned = []

    def nan_gradients(self, x):
        loss, ce = real_loss(self, x)
        if self.state.step == 12 and not poisoned:  # once: the first try of step 12
            poisoned.append(True)
            weight = next(p for p in self.model.parameters() if p.requires_grad)
            handle = weight.register_hook(lambda g: (handle.remove(), g * float("nan"))[1])
        return loss, ce

    monkeypatch.setattr(train.Trainer, "loss", nan_gradients)
    r = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              export_format="none", **FAST)
    guard = [e for e in r.log if e.get("event") == "guard"]
    assert len(guard) == 1 and guard[0]["step"] == 12 and guard[0]["restored_step"] == 10
    assert math.isfinite(guard[0]["loss"]) and not math.isfinite(guard[0]["grad_norm"])
    assert all(torch.isfinite(p).all() for p in r.model.parameters())


def r_cfg(r):
    from noln.config import RemoveConfig

    return RemoveConfig.from_yaml(r.out / "config.yaml")


def test_repeated_divergence_stops_and_keeps_the_checkpoint(tiny_model_dir, text_jsonl,
                                                            tmp_path, monkeypatch):
    from noln import train
    from noln.config import RemoveConfig

    real_loss = train.Trainer.loss

    def always_nan_after_6(self, x):
        loss, ce = real_loss(self, x)
        bad = self.state.step >= 6
        return (loss * float("nan"), ce * float("nan")) if bad else (loss, ce)

    monkeypatch.setattr(train.Trainer, "loss", always_nan_after_6)
    with pytest.raises(NolnError, match=r"diverged 4 times.*last good checkpoint is kept") as e:
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              export_format="none", **FAST)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 5
    # each restore truncates the log to the checkpoint's lines: the earlier guards stay in it
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    guard = [e for e in log if e.get("event") == "guard"]
    assert [(e["step"], e["failures"], e["lr_scale"]) for e in guard] == \
        [(6, 1, 0.5), (6, 2, 0.25), (6, 3, 0.125)]
    # every try failed on the batch of step 6, at four lrs: the lr is not the cause
    msg = str(e.value)
    assert "the last 4 at step 6" in msg and "a lower --lr will not help" in msg
    lr = train.lr_at(6, RemoveConfig.from_yaml(tmp_path / "run" / "config.yaml"), 30)
    assert f"at lr {lr:.3g} down to {lr / 8:.3g}" in msg
    assert "lower --lr or" not in msg


def test_divergence_at_different_steps_says_to_lower_the_lr(tiny_model_dir, text_jsonl,
                                                            tmp_path, monkeypatch):
    """Tries that fail at a later step each time (the lowered lr got further): the lr is the
    advice, not the batch."""
    from noln import train

    real_loss = train.Trainer.loss

    def nan_further_each_try(self, x):
        loss, ce = real_loss(self, x)
        bad = self.state.step >= 6 + self.state.failures
        return (loss * float("nan"), ce * float("nan")) if bad else (loss, ce)

    monkeypatch.setattr(train.Trainer, "loss", nan_further_each_try)
    with pytest.raises(NolnError, match=r"diverged 4 times \(last: loss nan.* at step 9\).*"
                                        r"lower --lr or"):
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              export_format="none", **FAST)


def test_guard_catches_a_slow_rise_past_a_uniform_guess(tiny_model_dir, text_jsonl, tmp_path,
                                                       monkeypatch):
    """A loss that climbs 20% a step never exceeds 3x its last ten steps' mean, but once it is
    above a uniform guess's cross-entropy (ln V) and 3x the run's first ten steps' mean, the
    model is broken: the guard restores the last checkpoint, as for a spike."""
    from noln import train

    real_loss = train.Trainer.loss
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    first: list[float] = []
    seen: dict[int, float] = {}  # the CE each step reported, before any restore

    def rising_from_11(self, x):  # 1.2x a step from step 11
        loss, ce = real_loss(self, x)
        if len(first) < 10:
            first.append(float(ce.detach()))
        if self.state.failures:
            return loss, ce
        factor = 1.0
        if self.state.step >= 11:
            factor = sum(first) / 10 * 1.2 ** (self.state.step - 10) / float(ce.detach())
        seen[self.state.step] = float(ce.detach()) * factor
        return loss * factor, ce * factor

    monkeypatch.setattr(train.Trainer, "loss", rising_from_11)
    r = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              export_format="none", **FAST)
    broken = max(math.log(vocab), 3 * sum(first) / 10)
    first_bad = min(s for s, v in seen.items() if v > broken)
    guard = [e for e in r.log if e.get("event") == "guard"]
    assert len(guard) == 1 and guard[0]["step"] == first_bad == 17
    assert guard[0]["loss"] > math.log(vocab) and guard[0]["restored_step"] == 15
    # the rise itself stayed under the spike rule: 3x the mean of the ten steps before
    before = [seen[s] for s in range(first_bad - 10, first_bad)]
    assert guard[0]["loss"] < 3 * sum(before) / len(before)


@pytest.mark.parametrize("level,jump,steps,caught", [
    (2.5, lambda uniform: uniform + 0.3, (12,), 12),  # worse than a uniform guess: at once
    (2.0, lambda uniform: 5.0, (12, 13, 14), 14),  # past halfway to it, three steps running
    (2.0, lambda uniform: 5.0, (12, 14), None),  # a hard batch now and then is not broken
])
def test_guard_catches_a_collapse_after_the_model_had_learnt(
        tiny_model_dir, text_jsonl, tmp_path, monkeypatch, level, jump, steps, caught):
    """A model at ``level`` nats whose CE jumps to ``jump`` at ``steps`` is broken, although
    the jump is under 3x its last ten steps' mean and the first steps' high loss puts the
    slow-rise line above it (SmolLM2 attempt 45, with its sink neurons cut at step 0)."""
    from noln import train

    real_loss = train.Trainer.loss
    uniform = math.log(json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"])
    bad = jump(uniform)
    seen: dict[int, float] = {}

    def learnt_then_broken(self, x):  # the model's own CE for 3 steps, then level, then bad
        loss, ce = real_loss(self, x)
        step = self.state.step
        target = None if step < 3 else bad if step in steps and not self.state.failures \
            else level
        factor = 1.0 if target is None else target / float(ce.detach())
        seen.setdefault(step, float(ce.detach()) * factor)
        return loss * factor, ce * factor

    monkeypatch.setattr(train.Trainer, "loss", learnt_then_broken)
    r = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              export_format="none", **{**FAST, "steps": 16})
    guard = [e for e in r.log if e.get("event") == "guard"]
    assert r.summary["steps"] == 16
    if caught is None:
        assert not guard
        return
    assert len(guard) == 1 and guard[0]["step"] == caught and guard[0]["restored_step"] == 10
    # neither older rule would have: under 3x the last ten steps' mean, and under 3x the first
    # ten steps' mean (which the first three steps' high CE lift above ln V)
    assert guard[0]["loss"] < 3 * sum(seen[s] for s in range(caught - 10, caught)) / 10
    assert guard[0]["loss"] < 3 * sum(seen[s] for s in range(10)) / 10


def test_corrupt_checkpoint_message(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(NolnError, match=r"last.pt' is corrupt or truncated.*start the run "
                       r"again \(`--overwrite` replaces only the files noln wrote\)"):
        load_checkpoint(path)
    (path.parent / "step-8.pt").write_bytes(b"x")
    with pytest.raises(NolnError, match=r"a kept checkpoint \('.*step-8.pt'\) can be branched"):
        load_checkpoint(path)
    (path.parent / "prev.pt").write_bytes(b"x")
    with pytest.raises(NolnError, match=r"resume from .*prev.pt"):
        load_checkpoint(path)
    (path.parent / "prev.pt").unlink()  # a torn kept checkpoint is not its own fallback
    with pytest.raises(NolnError, match=r"step-8.pt' is corrupt or truncated.*start the run "
                       r"again"):
        load_checkpoint(path.parent / "step-8.pt")
    summary = tmp_path / "summary.json"  # not a checkpoint at all
    summary.write_text('{"steps": 3}')
    with pytest.raises(NolnError, match=r"summary.json' is not a checkpoint: give a run folder"):
        load_checkpoint(summary)


def test_bad_inputs_fail_before_training(tiny_model_dir, text_jsonl, tmp_path):
    cases = [
        (dict(model=str(tmp_path / "missing-model")), "does not exist"),
        (dict(data=str(tmp_path / "missing.jsonl")), "does not exist"),
        (dict(schedule="fixed", fixed=dict(start=50)), "ends at step"),
        (dict(batch_size=6, micro_batch_size=4), "not a multiple of micro batch"),
    ]
    for override, message in cases:
        kwargs = {"model": str(tiny_model_dir), "data": str(text_jsonl), "out": tmp_path / "r",
                  **FAST, **override}
        with pytest.raises(NolnError, match=message):
            noln.remove_layernorm(**kwargs)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(NolnError, match="has no text"):
        noln.remove_layernorm(str(tiny_model_dir), str(empty), tmp_path / "r2", **FAST)
    with pytest.raises(NolnError, match="not a noln run folder"):
        noln.remove_layernorm(resume=tmp_path / "nothing")


def test_unwritable_output_fails_first(tiny_model_dir, text_jsonl, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(NolnError, match="is not writable"):
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), blocker / "run", **FAST)


def test_full_disk_fails_before_training(tiny_model_dir, text_jsonl, tmp_path, monkeypatch):
    import shutil

    import noln.remove

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the disk was checked")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 << 20))
    monkeypatch.setattr(noln.remove, "load_pretrained", no_loading)  # (sized from the config)
    with pytest.raises(NolnError, match=r"has 0.01 GiB free but the run needs about"):
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run", **FAST)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_the_disk_check_counts_the_checkpoints_a_run_will_keep(tiny_model_dir, text_jsonl,
                                                               tmp_path, monkeypatch):
    """checkpoint_keep=N keeps a file every N steps to the end (steps 0, 10, 20, 30 here):
    SmolLM2 runs kept 28 of 1.6 GB and filled a disk mid-run. Room for the three rotating
    checkpoints and the export, but not for the kept ones, is refused before training."""
    import shutil

    from transformers import AutoModelForCausalLM

    from noln.remove import check_disk_space

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = sum(p.numel() for p in model.parameters())
    usage = shutil.disk_usage(tmp_path)
    free = n * 4 * (3 * 3 + 1) + (64 << 20) + 1000  # three checkpoints and one export fit
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=free))
    check_disk_space(tmp_path, model, 1)
    with pytest.raises(NolnError, match=r"\(3 checkpoints .*, 4 kept by checkpoint_keep, "
                                        r"exports\): free disk space, keep fewer checkpoints"):
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              **{**FAST, "checkpoint_keep": 10})
    assert not (tmp_path / "run" / "log.jsonl").exists()
    # a resume counts only those still to come: after the last one kept, or (none kept: a
    # branch) after the last step logged. This run kept 0, 10, 20 (and 30); with its kept
    # files gone and 10 more steps, 2 are to come (30, 40), not the 5 of a count from 0
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage)
    run = tmp_path / "kept"
    noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), run,
                          **{**FAST, "checkpoint_keep": 10, "export_format": "none"})
    for path in (run / "checkpoints").glob("step-*.pt"):
        path.unlink()
    room = n * 4 * 3 * 5 + (64 << 20) + 1000  # three rotating + two kept, no export
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=room))
    resumed = noln.remove_layernorm(resume=run, steps=40)
    assert resumed.summary["complete"]
    short = n * 4 * 3 * 4 + (64 << 20) - 1000  # three rotating, not a fourth
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=short))
    with pytest.raises(NolnError, match=r", 1 kept by checkpoint_keep"):
        noln.remove_layernorm(resume=run, steps=50)  # 50 more: one (50) after the 40 kept


# Kill the run during its third checkpoint save (step 8): half-way through writing
# last.pt.tmp, or between moving last.pt to prev.pt and renaming the new file over last.pt.
_KILL_DURING_SAVE = """
import io, os, signal, sys
import torch
mode, n = sys.argv[1], int(sys.argv[2])
calls = [0]
real_save, real_replace = torch.save, os.replace
def save(obj, f, *a, **k):
    calls[0] += 1
    if mode == "write" and calls[0] == n:
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
def replace(a, b):
    real_replace(a, b)
    if mode == "rename" and calls[0] == n and str(b).endswith("prev.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
torch.save, os.replace = save, replace
from noln.cli import main
sys.argv = ["noln", *sys.argv[3:]]
main()
"""


@pytest.mark.parametrize("mode", ["write", "rename"])
def test_kill_during_checkpoint_write_resumes_from_the_last_good_one(tiny_model_dir, text_jsonl,
                                                                    tmp_path, mode):
    env = DETERMINISTIC
    whole = tmp_path / "whole"
    subprocess.run(_cli(*_run_args(tiny_model_dir, text_jsonl, whole)), check=True, env=env)
    killed = tmp_path / "killed"
    p = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, mode, "3",
                        *_run_args(tiny_model_dir, text_jsonl, killed)], env=env)
    assert p.returncode == -signal.SIGKILL
    ckpts = killed / "checkpoints"
    assert (ckpts / "last.pt.tmp").exists()  # the interrupted write
    if mode == "write":  # last.pt is still the previous save, intact
        assert load_checkpoint(ckpts / "last.pt")["step"] == 4
    else:  # killed between the two renames: last.pt is gone, prev.pt holds step 4
        assert not (ckpts / "last.pt").exists()
        assert load_checkpoint(ckpts / "prev.pt")["step"] == 4
    _resume_and_compare(killed, whole, env)


def test_cli_prints_one_line_errors(tmp_path):
    p = subprocess.run(_cli("remove", str(tmp_path / "nope"), "--data", "x.jsonl", "--out",
                            str(tmp_path / "o")), capture_output=True, text=True)
    assert p.returncode == 2
    assert "error:" in p.stderr and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_distill_loss_is_kl_to_the_original(tiny_model_dir, tmp_path):
    """With distill=1 and an identical teacher the loss is KL = 0 while CE is not; with
    distill=0.5 it is the even mix, and the KL grows once a site is frozen."""
    import copy

    import numpy as np

    from noln.arch import install
    from noln.config import make_config
    from noln.pretrained import load_pretrained
    from noln.train import Trainer

    model = load_pretrained(tiny_model_dir)
    teacher = copy.deepcopy(model)
    adapter = install(model)
    blocks = np.random.default_rng(0).integers(0, 500, size=(8, 64))
    x = torch.from_numpy(blocks[:4])
    for w in (1.0, 0.5):
        cfg = make_config(model=str(tiny_model_dir), out=tmp_path, distill=w, aux_weight=0.0,
                          progress=False, batch_size=4)
        trainer = Trainer(cfg, model, blocks, blocks[:2], tmp_path, adapter, teacher=teacher)
        model.eval()  # no EMA updates: the student is exactly the teacher
        loss, ce = trainer.loss(x)
        assert ce.item() > 1.0
        assert loss.item() == pytest.approx((1 - w) * ce.item(), abs=1e-5)
    adapter.site("ln_f").norm.freeze(0.3)
    loss, ce = trainer.loss(x)
    assert loss.item() > 0.5 * ce.item() + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_next_token_loss_and_its_gradient_equal_autograds(dtype, w):
    """The chunked CE + KL, its gradient made in the forward pass, against the plain autograd
    formula (float32 logits, log_softmax, the last position predicting nothing)."""
    from noln.train import next_token_loss

    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(3, 20, 97, generator=g)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(3, 20, 97, generator=g)).to(dtype)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    logits = z[:, :-1].float()
    ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    ref = F.log_softmax(teacher[:, :-1].float(), dim=-1)
    kl = (ref.exp() * (ref - F.log_softmax(logits, dim=-1))).sum(-1).mean()
    ((1 - w) * ce + w * kl).backward()
    expected, z.grad = z.grad.clone(), None
    loss, got_ce, got_kl = next_token_loss(z, ids, teacher if w else None, w, chunk=7)
    (3 * loss).backward()  # the upstream gradient scales it
    assert loss.item() == pytest.approx(((1 - w) * ce + w * kl).item(), abs=2e-6)
    assert got_ce.item() == pytest.approx(ce.item(), abs=2e-6) and not got_ce.requires_grad
    assert got_kl.item() == pytest.approx(kl.item() if w else 0.0, abs=2e-6)
    assert z.grad.dtype == dtype
    torch.testing.assert_close(z.grad.float() / 3, expected.float(), atol=1e-7, rtol=1e-2)


def test_hidden_distance_is_the_relative_error_of_ordinary_tokens_block_by_block():
    """distill_hidden's loss against a plain loop over tokens in float64: the embeddings and
    the last (post-norm) entry are left out, position 0 / end-of-text (``keep``) and the
    teacher's massive activations too, and each block weighs the same whatever its size."""
    from noln.train import hidden_distance

    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 6, 4, generator=g) for _ in range(4)]
    student = [t + 0.3 * torch.randn(2, 6, 4, generator=g) for t in teacher]
    teacher[1][0, 3] *= 20  # a massive activation on an ordinary token, in block 0's output
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 4] = False  # an end-of-text token

    def reference(student, teacher):
        per_block = []
        for h, ref in zip(student[1:-1], teacher[1:-1]):
            sizes = {(b, t): float((ref[b, t].double() ** 2).sum())
                     for b in range(2) for t in range(6) if keep[b, t]}
            typical = float(torch.tensor(list(sizes.values())).median())
            used = [bt for bt, size in sizes.items() if size <= 16 * typical]
            error = sum(float(((h[bt] - ref[bt]).double() ** 2).sum()) for bt in used)
            per_block.append(error / sum(sizes[bt] for bt in used))
        return sum(per_block) / len(per_block)

    value = hidden_distance(student, teacher, keep).item()
    assert value == pytest.approx(reference(student, teacher), rel=1e-5)
    assert value > 0.01
    assert hidden_distance(teacher, teacher, keep).item() == 0.0
    # what the loss leaves out changes nothing: position 0, end-of-text, the massive token,
    # the embeddings and the last entry
    moved = [h.clone() for h in student]
    moved[1][:, 0] += 100
    moved[2][1, 4] -= 50
    moved[1][0, 3] += 1e3
    moved[0] += 7
    moved[3] += 7
    assert hidden_distance(moved, teacher, keep).item() == pytest.approx(value, rel=1e-6)
    # a block 100x larger in both models weighs the same
    scaled = [h * (100 if i == 2 else 1) for i, h in enumerate(student)]
    scaled_teacher = [h * (100 if i == 2 else 1) for i, h in enumerate(teacher)]
    assert hidden_distance(scaled, scaled_teacher, keep).item() == pytest.approx(value, rel=1e-5)


def test_distill_hidden_adds_the_block_outputs_distance_and_the_control_ignores_it(
        tiny_model_dir, tmp_path):
    """The removal's loss is the distill loss plus W x hidden_distance of the two models' hidden
    states on ordinary tokens (0 while the student is the teacher); the control's loss (keep_ln)
    does not read it."""
    import copy

    import numpy as np

    from noln.arch import install
    from noln.config import make_config
    from noln.fakenorm import special_token_mask
    from noln.pretrained import load_pretrained
    from noln.train import Trainer, hidden_distance

    model = load_pretrained(tiny_model_dir)
    teacher = copy.deepcopy(model).eval()
    adapter = install(model)
    blocks = np.random.default_rng(0).integers(1, 500, size=(8, 64))
    x = torch.from_numpy(blocks[:4])

    def losses(**settings):
        out = []
        for w in (0.0, 2.0):
            cfg = make_config(model=str(tiny_model_dir), out=tmp_path, distill=0.5,
                              distill_hidden=w, aux_weight=0.0, progress=False, batch_size=4,
                              precision="fp32",
                              **settings)
            trainer = Trainer(cfg, model, blocks, blocks[:2], tmp_path, adapter,
                              teacher=teacher)
            out.append(trainer.loss(x)[0].item())
        return out, trainer

    model.eval()  # no EMA updates
    (plain, hidden), _ = losses()
    assert hidden == pytest.approx(plain, abs=1e-6)  # the student is the teacher
    adapter.site("blocks.0.mlp_in").norm.freeze(0.01)  # a fixed scale in block 0
    (plain, hidden), trainer = losses()
    with torch.no_grad():
        h = model(input_ids=x, output_hidden_states=True).hidden_states
        ref = teacher(input_ids=x, output_hidden_states=True).hidden_states
    expected = 2.0 * hidden_distance(h, ref, ~special_token_mask(x, trainer.eot_id)).item()
    assert expected > 1e-3
    assert hidden - plain == pytest.approx(expected, rel=1e-4)
    assert trainer.logged_terms() == ["distill_hidden"]
    (plain, hidden), trainer = losses(keep_ln=True)
    assert hidden == plain and trainer.logged_terms() == []


def test_distill_hidden_is_logged_at_every_step(tiny_model_dir, text_jsonl, tmp_path):
    run = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "r",
                                distill=0.5, distill_hidden=1.0, **{**FAST, "steps": 12})
    steps = [e for e in map(json.loads, (tmp_path / "r" / "log.jsonl").read_text().splitlines())
             if "event" not in e]
    assert len(steps) == 12 and run.summary["steps"] == 12
    assert all(math.isfinite(e["distill_hidden"]) and e["distill_hidden"] >= 0 for e in steps)
    assert steps[-1]["frozen"] > 0 and steps[-1]["distill_hidden"] > 0


def _perturbed_copy(model_dir, out, vocab: int | None = None, tokenizer=None, ctx: int = 64,
                    n_layer: int = 2):
    """``model_dir``'s model with every weight moved (or a new one with ``vocab`` tokens,
    ``ctx`` positions and ``n_layer`` blocks), saved with the same tokenizer at ``out`` (or
    ``tokenizer``)."""
    from transformers import AutoTokenizer

    from noln.pretrain import build_model
    from noln.pretrained import load_pretrained

    torch.manual_seed(1)
    model = load_pretrained(model_dir) if vocab is None else build_model(
        "gpt2", vocab, n_layer=n_layer, d_model=32, n_head=2, ctx=ctx, eot_id=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    (tokenizer or AutoTokenizer.from_pretrained(model_dir)).save_pretrained(out)
    return model.eval()


def test_teacher_replaces_the_original_in_the_kl(tiny_model_dir, text_jsonl, tmp_path,
                                                 monkeypatch):
    """--teacher: the KL pulls towards that model, loaded by name (a folder, a run folder's last
    checkpoint), not towards the original, on a new run and on --resume; the sink neurons are
    still found in the original; --resume --distill 0 ends the distillation."""
    import noln.remove
    from noln.config import RemoveConfig, make_config
    from noln.loading import load_model
    from noln.pretrained import load_pretrained
    from noln.remove import _ranks, setup

    other = _perturbed_copy(tiny_model_dir, tmp_path / "teacher")
    original = load_pretrained(tiny_model_dir).eval()
    x = torch.arange(1, 33)[None]

    def logits(model):
        with torch.no_grad():
            return model(input_ids=x).logits

    searched = []  # the model the sink neurons are looked for in
    monkeypatch.setattr(noln.remove, "sink_neurons",
                        lambda model, probe, k, blocks=None: searched.append(logits(model)) or {})
    cfg = make_config(model=str(tiny_model_dir), data=str(text_jsonl), out=tmp_path / "r",
                      distill=0.5, teacher=str(tmp_path / "teacher"), prune_sinks=1, **FAST)
    (tmp_path / "r").mkdir()
    removal = setup(cfg, False, _ranks())
    assert torch.allclose(logits(removal.teacher), logits(other), atol=1e-6)
    assert not torch.allclose(logits(removal.teacher), logits(original), atol=1e-2)
    assert torch.allclose(searched[0], logits(original), atol=1e-6)

    run = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                                distill=0.5, teacher=str(tmp_path / "teacher"),
                                **{**FAST, "steps": 10})
    assert run.summary["steps"] == 10
    resumed = RemoveConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert resumed.teacher == str(tmp_path / "teacher")
    assert torch.allclose(logits(setup(resumed, True, _ranks()).teacher), logits(other),
                          atol=1e-6)
    # a run folder as the teacher: the model its last checkpoint holds
    cfg = make_config(model=str(tiny_model_dir), data=str(text_jsonl), out=tmp_path / "s",
                      distill=1.0, teacher=str(tmp_path / "run"), **FAST)
    (tmp_path / "s").mkdir()
    assert torch.allclose(logits(setup(cfg, False, _ranks()).teacher),
                          logits(load_model(tmp_path / "run")[0]), atol=1e-6)
    longer = noln.remove_layernorm(resume=tmp_path / "run", steps=14, distill=0.0)
    assert longer.summary["steps"] == 14


def test_bad_teachers_are_refused_before_training(tiny_model_dir, text_jsonl, tmp_path,
                                                  monkeypatch):
    import noln.remove
    from noln.pretrain import train_tokenizer

    started = []
    monkeypatch.setattr(noln.remove, "Trainer", lambda *a, **k: started.append(1))
    _perturbed_copy(tiny_model_dir, tmp_path / "wide", vocab=600)
    _perturbed_copy(tiny_model_dir, tmp_path / "short", vocab=512, ctx=32)
    other = train_tokenizer(str(text_jsonl), vocab_size=512, max_docs=60)  # other merges
    _perturbed_copy(tiny_model_dir, tmp_path / "other-tokens", tokenizer=other)
    _perturbed_copy(tiny_model_dir, tmp_path / "deeper", vocab=512, n_layer=3)
    monkeypatch.chdir(tmp_path)
    run = dict(model=str(tiny_model_dir), data=str(text_jsonl), out="r", **FAST)
    cases = [
        (dict(teacher=str(tmp_path / "t")), "give --distill W too"),
        (dict(distill=0.5, teacher=str(tmp_path / "missing")),
         "--teacher: model .*missing' does not exist"),
        (dict(distill=0.5, teacher=str(tmp_path / "r" / "control")), "distil from itself"),
        (dict(distill=0.5, teacher="r/control"), "lies in this run's own folder"),
        (dict(distill=0.5, teacher="./r/../r"), "lies in this run's own folder"),
        (dict(distill=0.5, teacher=str(tmp_path / "wide")), "predicts 600 tokens"),
        (dict(distill=0.5, teacher=str(tmp_path / "other-tokens")), "has another tokenizer"),
        (dict(distill=0.5, teacher=str(tmp_path / "short")), "reads at most 32 tokens"),
        (dict(distill_hidden=1.0), "give --distill W too"),
        (dict(distill=0.5, distill_hidden=1.0, teacher=str(tmp_path / "deeper")),
         "has 3 blocks of width 32 and the model 2 of width 32: --distill-hidden"),
    ]
    for override, message in cases:
        with pytest.raises(NolnError, match=message):
            noln.remove_layernorm(**{**run, **override})
    assert not started and not (tmp_path / "r").exists()
    from noln.config import make_config  # a Hub id never lies in the run folder, even '.'
    assert make_config(model="gpt2", out=".", distill=0.5, teacher="gpt2").teacher == "gpt2"


def test_cos_reg_adds_the_linearity_regulariser_to_the_loss(tiny_model_dir, tmp_path):
    import numpy as np

    from noln.arch import install
    from noln.config import make_config
    from noln.linearity.regularizer import cosine_regularizer
    from noln.pretrained import load_pretrained
    from noln.train import Trainer

    model = load_pretrained(tiny_model_dir).eval()
    adapter = install(model)
    blocks = np.random.default_rng(0).integers(0, 500, size=(8, 64))
    x = torch.from_numpy(blocks[:4])
    losses = {}
    for lam in (0.0, 0.5):
        cfg = make_config(model=str(tiny_model_dir), out=tmp_path, cos_reg=lam, aux_weight=0.0,
                          progress=False, batch_size=4)
        trainer = Trainer(cfg, model, blocks, blocks[:2], tmp_path, adapter)
        losses[lam] = trainer.loss(x)
    with torch.no_grad():
        reg = cosine_regularizer(model(x, output_hidden_states=True).hidden_states, 0.5)
    assert reg.item() > 0
    assert losses[0.5][0].item() == pytest.approx(losses[0.0][0].item() + reg.item(), rel=1e-5)


def test_adamw_is_fused_where_torch_has_the_kernel(tiny_model_dir, tmp_path, monkeypatch):
    """The trainer's AdamW is one fused kernel on a CPU too (the per-parameter loop took 0.41 s
    a step for SmolLM2-135M, fused 0.15 s) and steps as the loop does; where torch lacks the
    kernel for the device (torch < 2.4 on a CPU), the loop."""
    import numpy as np

    from noln.arch import install
    from noln.config import make_config
    from noln.pretrained import load_pretrained
    from noln.train import Trainer, adamw, param_groups

    model = load_pretrained(tiny_model_dir)
    adapter = install(model)
    blocks = np.random.default_rng(0).integers(0, 500, size=(8, 64))
    cfg = make_config(model=str(tiny_model_dir), out=tmp_path, progress=False, batch_size=4)
    trainer = Trainer(cfg, model, blocks, blocks[:2], tmp_path, adapter)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrap
    assert optimizer.defaults["fused"] is True
    # the same step as the loop's
    steps = {}
    for fused in (True, False):
        torch.manual_seed(0)
        net = torch.nn.Linear(8, 8)
        opt = adamw(param_groups(net, 0.1), cfg, fused=fused)
        assert bool(opt.defaults.get("fused")) is fused
        for _ in range(3):
            net(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        steps[fused] = net.weight.detach().clone()
    torch.testing.assert_close(steps[True], steps[False], rtol=1e-5, atol=1e-7)
    real = torch.optim.AdamW

    def no_kernel(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point "
                               "Tensors of supported devices: ['cuda']")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_kernel)
    assert not adamw(param_groups(net, 0.1), cfg, fused=True).defaults.get("fused")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_run_matches_eager(tiny_model_dir, text_jsonl, tmp_path):
    """``--compile`` compiles each block (a removal changes the graph, see compile_blocks) and
    trains the eager run's model: same removals, weights to float rounding (measured 9e-7, and
    1.2e-5 on one element of a c_attn bias once loading aligned the eager run's memory: Adam
    turns a rounding-level gradient near zero into an update of lr's size)."""
    import torch._dynamo

    args = dict(steps=24, batch_size=8, micro_batch_size=4, ctx=64, lr=1e-3, warmup_steps=2,
                eval_tokens=512, schedule="fixed", precision="fp32", export_format="none",
                checkpoint_every=100, progress=False)
    eager = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "eager",
                                  **args)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl),
                                         tmp_path / "compiled", compile=True, **args)
        frames = dict(torch._dynamo.utils.counters["frames"])
    finally:
        torch._dynamo.reset()
    assert frames.get("ok", 0) > 0, "nothing was compiled"
    assert [(e["step"], e["site"]) for e in compiled.events] == \
        [(e["step"], e["site"]) for e in eager.events] and len(eager.events) == 7
    a = load_checkpoint(tmp_path / "eager" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=5e-5, msg=k)


def test_site_aux_adds_each_removed_sites_log_scale_error(tiny_model_dir, tmp_path):
    """``site_aux`` adds w * sum over removed sites of mean_t log(s_t / sigma)^2, s_t measured
    here by a hook on each site's input, independently of the FakeNorm; live sites add
    nothing, and a special token is measured against its own scale while it has one."""
    import numpy as np

    from noln.arch import install
    from noln.config import make_config
    from noln.pretrained import load_pretrained
    from noln.train import Trainer

    model = load_pretrained(tiny_model_dir).eval()  # eval: no EMA updates between passes
    adapter = install(model)
    blocks = np.random.default_rng(0).integers(0, 500, size=(8, 64))
    x = torch.from_numpy(blocks[:4])

    def losses(w, power=2.0):
        cfg = make_config(model=str(tiny_model_dir), out=tmp_path, site_aux=w, aux_weight=0.0,
                          site_aux_power=power, progress=False, batch_size=4)
        return Trainer(cfg, model, blocks, blocks[:2], tmp_path, adapter).loss(x)[0].item()

    assert losses(0.5) == pytest.approx(losses(0.0), abs=1e-6)  # nothing removed yet
    inputs = {}
    names = ["blocks.0.mlp_in", "blocks.1.attn_in_v"]
    # GPT-2's fused QKV never calls the V site on its own: hook the layer norm it splits
    readers = [adapter.site(names[0]).norm, model.transformer.h[1].ln_1]
    hooks = [m.register_forward_pre_hook(
        lambda m, a, n=n: inputs.__setitem__(n, a[0].detach().double()))
        for n, m in zip(names, readers)]
    for name, sigma in zip(names, (0.7, 2.5)):
        adapter.site(name).norm.freeze(sigma)
    base = losses(0.0)
    expected, quartic = 0.0, 0.0
    for name, sigma in zip(names, (0.7, 2.5)):
        xc = inputs[name] - inputs[name].mean(-1, keepdim=True)
        std = (xc.pow(2).mean(-1) + adapter.site(name).norm.eps).sqrt()
        expected += (std / sigma).log().pow(2).mean().item()
        quartic += (std / sigma).log().abs().pow(4).mean().item()
    assert expected > 0.01 and abs(quartic - expected) > 0.01
    assert losses(0.3) == pytest.approx(base + 0.3 * expected, rel=1e-4)
    assert losses(0.3, power=4.0) == pytest.approx(base + 0.3 * quartic, rel=1e-4)

    [h.remove() for h in hooks]

    # with special scales, position 0 is measured against its own scale (the adapter marks
    # special tokens from input_ids: position 0 here, end-of-text is outside these ids)
    norm = adapter.site(names[0]).norm
    norm.enable_special_scale()
    norm.sigma_special.fill_(40.0)
    with adapter.measuring(capture_std=[norm]):
        model(input_ids=x)
        error = norm.scale_error().double()
    xc = inputs[names[0]] - inputs[names[0]].mean(-1, keepdim=True)
    std = (xc.pow(2).mean(-1) + norm.eps).sqrt()
    target = torch.full_like(std, 0.7)
    target[:, 0] = 40.0
    torch.testing.assert_close(error, (std / target).log(), rtol=1e-4, atol=1e-5)


def test_site_aux_live_pulls_every_live_site_to_its_running_scale(tiny_model_dir, tmp_path):
    """With ``site_aux_live`` the site loss covers live sites too: w * sum over every site of
    mean_t log(s_t / sigma)^2, sigma the running estimate, s_t measured by hooks on the
    norms' inputs (the V site reads the Q/K site's input: one LayerNorm while both live);
    without it a model with nothing removed adds nothing."""
    import numpy as np

    from noln.arch import install
    from noln.config import make_config
    from noln.pretrained import load_pretrained
    from noln.train import Trainer

    model = load_pretrained(tiny_model_dir).eval()  # eval: the running scales stay put
    adapter = install(model)
    blocks = np.random.default_rng(0).integers(0, 500, size=(8, 64))
    x = torch.from_numpy(blocks[:4])
    sigmas = {name: 0.5 + 0.25 * i for i, name in enumerate(adapter.sites)}
    for name, sigma in sigmas.items():
        adapter.site(name).norm.sigma.fill_(sigma)

    def losses(w, live, special="own"):
        cfg = make_config(model=str(tiny_model_dir), out=tmp_path, site_aux=w, aux_weight=0.0,
                          site_aux_live=live, site_aux_special=special, progress=False,
                          batch_size=4)
        trainer = Trainer(cfg, model, blocks, blocks[:2], tmp_path, adapter)
        model.eval()  # the trainer sets training mode; the scales must not move here
        return trainer.loss(x)[0].item()

    base = losses(0.0, False)
    assert losses(0.5, False) == pytest.approx(base, abs=1e-6)
    inputs = {}

    def reader(name):
        site = adapter.site(name)
        return adapter.site(name.replace("attn_in_v", "attn_in_qk")).norm \
            if site.kind == "attn_in_v" else site.norm

    hooks = [reader(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.__setitem__(n, a[0].detach().double())) for n in sigmas]
    value = losses(0.3, True)
    [h.remove() for h in hooks]
    assert set(inputs) == set(sigmas)  # every site measured, the V sites included
    expected = 0.0
    for name, sigma in sigmas.items():
        xc = inputs[name] - inputs[name].mean(-1, keepdim=True)
        std = (xc.pow(2).mean(-1) + adapter.site(name).norm.eps).sqrt()
        expected += (std / sigma).log().pow(2).mean().item()
    assert expected > 0.1
    assert value == pytest.approx(base + 0.3 * expected, rel=1e-4)

    # special scales on: position 0 is pulled to its own scale, or with "shared" to sigma
    for name in sigmas:
        adapter.site(name).norm.enable_special_scale()
        adapter.site(name).norm.sigma_special.fill_(40.0)
    assert losses(0.3, True, "shared") == pytest.approx(value, rel=1e-4)
    own = 0.0
    for name, sigma in sigmas.items():
        xc = inputs[name] - inputs[name].mean(-1, keepdim=True)
        std = (xc.pow(2).mean(-1) + adapter.site(name).norm.eps).sqrt()
        target = torch.full_like(std, sigma)
        target[:, 0] = 40.0
        own += (std / target).log().pow(2).mean().item()
    assert abs(own - expected) > 0.1
    assert losses(0.3, True, "own") == pytest.approx(base + 0.3 * own, rel=1e-4)


def test_replay_keeps_the_sequences_whose_tokens_pass_the_margin(tiny_model_dir, tmp_path):
    """``replay``: a sequence whose worst ordinary token (position 0 excluded) is above
    ``replay_margin`` x a removed site's scale, measured here by a hook on the site's input,
    is kept and put in place of the last sequence of later batches; one back under the
    margin is dropped; the newest ``replay`` are kept; a checkpoint carries the list."""
    import numpy as np

    from noln.arch import install
    from noln.checkpoint import load_checkpoint
    from noln.config import make_config
    from noln.pretrained import load_pretrained
    from noln.train import Trainer

    model = load_pretrained(tiny_model_dir).eval()
    adapter = install(model)
    blocks = np.random.default_rng(0).integers(0, 500, size=(8, 64))
    name = "blocks.0.mlp_in"
    inputs = []
    hook = adapter.site(name).norm.register_forward_pre_hook(
        lambda m, a: inputs.append(a[0].detach().double()))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(blocks))
    hook.remove()
    xc = inputs[0] - inputs[0].mean(-1, keepdim=True)
    std = (xc.pow(2).mean(-1) + adapter.site(name).norm.eps).sqrt()[:, 1:]  # not position 0
    sigma = float(std.median())
    worst = (std / sigma).log().abs().amax(-1)  # [8]: each sequence's worst token
    margin = float(worst.sort().values[4:6].mean().exp())  # between the 5th and 6th sequence
    expected = [i for i in range(8) if worst[i] > math.log(margin)]
    assert len(expected) == 3
    adapter.site(name).norm.freeze(sigma)

    cfg = make_config(model=str(tiny_model_dir), out=tmp_path, replay=8, replay_margin=margin,
                      aux_weight=0.0, progress=False, batch_size=4)
    trainer = Trainer(cfg, model, blocks, blocks[:2], tmp_path, adapter)
    model.eval()
    trainer.outliers = []
    with torch.no_grad():
        for i in range(0, 8, 4):
            trainer.loss(torch.from_numpy(blocks[i : i + 4]))
    measured = torch.cat(trainer.outliers)
    torch.testing.assert_close(measured.double(), worst, rtol=1e-3, atol=1e-4)  # float32
    trainer.update_replay(0, torch.arange(8), measured)
    assert trainer.state.replay == expected
    for step in range(6):  # the step picks the replayed sequence; the others come in order
        idx = trainer.batch_indices(step)
        assert idx[-1] == expected[step % 3]
        order = np.concatenate([trainer._perm(e) for e in range(3)])  # epochs in a row
        assert list(idx[:-1]) == list(order[4 * step : 4 * step + 3])
    trainer.save()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["state"]["replay"] == expected

    # back under the margin: dropped; over the limit: the oldest go
    trainer.update_replay(1, torch.tensor([expected[0]]), torch.tensor([0.0]))
    assert trainer.state.replay == expected[1:]
    trainer.removal = trainer.cfg = cfg.model_copy(update={"replay": 1})
    new = next(i for i in range(8) if i not in expected)
    trainer.update_replay(2, torch.tensor([new, expected[2]]), torch.tensor([9.0, 0.0]))
    assert trainer.state.replay == [new]  # expected[2] back under, expected[1] the oldest
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["added"] for e in events] == [expected, [], [new]]
    assert [e["dropped"] for e in events] == [[], [expected[0]], [expected[2], expected[1]]]


def test_a_dropped_sequence_gives_its_place_to_a_random_one_not_the_next_block(
        tiny_model_dir, tmp_path):
    """skip_overflow: blocks are packed in the data's order, so the block after a dropped one
    is the same document's next text (SmolLM2 attempt 29 dropped blocks 250-253 of one Firefox
    bug list at one step); its place goes to the sequence at the same place of the next
    epoch's permutation that is kept, the same on every call (a resumed run draws the same)."""
    import numpy as np

    from noln.arch import install
    from noln.config import make_config
    from noln.pretrained import load_pretrained
    from noln.train import Trainer

    model = load_pretrained(tiny_model_dir)
    adapter = install(model)
    blocks = np.random.default_rng(0).integers(0, 500, size=(100, 16))
    cfg = make_config(model=str(tiny_model_dir), out=tmp_path, aux_weight=0.0, progress=False,
                      batch_size=4)
    trainer = Trainer(cfg, model, blocks, blocks[:2], tmp_path, adapter)
    first = trainer.batch_indices(0)
    dropped = [int(first[0]) + k for k in range(4)] + [int(trainer._perm(1)[0])]
    trainer.state.skipped = dropped
    idx = trainer.batch_indices(0)
    later = [int(trainer._perm(e)[0]) for e in range(2, 6)]
    assert idx[0] == next(i for i in later if i not in dropped) != first[0] + 4
    assert list(idx[1:]) == list(first[1:])
    assert list(trainer.batch_indices(0)) == list(idx)
    drawn = np.concatenate([trainer.batch_indices(step) for step in range(60)])  # 2.4 epochs
    assert not set(drawn.tolist()) & set(dropped)


def test_prune_sinks_zeroes_the_originals_sink_neurons_for_the_whole_run(tiny_model_dir,
                                                                         text_jsonl, tmp_path):
    """``prune_sinks=N``: the N neurons per block that write most into position 0 in the
    original model (on the run's probe blocks) are zero before the first step and still at
    the end, and no other neuron is; the log says how many; a resume has nothing to prune."""
    import numpy as np

    from noln.config import RemoveConfig
    from noln.pretrained import load_pretrained, load_tokenizer
    from noln.remove import prepare_data
    from noln.sinks import sink_neurons

    r = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                              export_format="none", prune_sinks=3, **FAST)
    events = [e for e in r.log if e.get("event") == "pruned_sinks"]
    assert events == [{"event": "pruned_sinks", "step": 0, "neurons": 6}]
    cfg = RemoveConfig.from_yaml(r.out / "config.yaml")
    _, heldout = prepare_data(cfg, load_tokenizer(tiny_model_dir), 64, cfg.resolved_steps(64))
    probe = torch.from_numpy(np.asarray(heldout[: cfg.probe_blocks], np.int64))
    sinks = sink_neurons(load_pretrained(tiny_model_dir), probe, 3)
    for block, layer in enumerate(r.model.transformer.h):
        zero = (layer.mlp.c_proj.weight == 0).all(dim=1).nonzero().flatten().tolist()
        assert zero == sinks[block]  # Conv1D [in, out]: neuron n writes row n
    noln.remove_layernorm(resume=tmp_path / "run", steps=35)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e.get("event") == "pruned_sinks"] == [0]


def test_prune_blocks_cuts_the_sink_circuit_in_the_blocks_named_only(tiny_model_dir,
                                                                     text_jsonl, tmp_path):
    """``prune_blocks=[1]``: block 1's ``prune_sinks`` neurons are zeroed (the same ones a
    prune of every block zeroes there), block 0 keeps all of its neurons. A block the model
    lacks is refused before anything is made, as is the setting without ``prune_sinks``, or
    with a block named twice."""
    from noln.config import RemoveConfig

    fast = {**FAST, "steps": 6, "export_format": "none", "prune_sinks": 3}
    everywhere = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "all",
                                       **fast)
    one = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "one",
                                prune_blocks=[1], **fast)
    assert [e["neurons"] for e in one.log if e.get("event") == "pruned_sinks"] == [3]

    def zero_rows(layer):  # Conv1D [in, out]: neuron n writes row n
        return (layer.mlp.c_proj.weight == 0).all(dim=1).nonzero().flatten().tolist()

    first, second = one.model.transformer.h
    assert zero_rows(first) == []
    assert zero_rows(second) == zero_rows(everywhere.model.transformer.h[1])
    assert len(zero_rows(second)) == 3
    with pytest.raises(NolnError, match=r"prune_blocks names block 2, which this model does "
                       r"not have: its blocks are 0\.\.1"):
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "past",
                              prune_blocks=[0, 2], **fast)
    assert not (tmp_path / "past").exists()
    with pytest.raises(ValueError, match="give --prune-sinks N too"):
        RemoveConfig(model="gpt2", steps=100, prune_blocks=[1])
    with pytest.raises(ValueError, match="name each block once"):
        RemoveConfig(model="gpt2", steps=100, prune_sinks=4, prune_blocks=[1, 1])


def test_prune_fade_takes_the_sink_neurons_away_over_its_steps(tiny_model_dir, text_jsonl,
                                                               tmp_path, monkeypatch):
    """``prune_fade=N``: the sink neurons write ``1 - step/N`` of their output at each step
    (the probe's forwards at that step included), so step 0 trains the original model, and
    they are zeroed, once, at step N; the run ends with the same neurons zero as a run that
    pruned them at once. Refused without prune_sinks, or where it would not end in the run."""
    import noln.train
    from noln.config import RemoveConfig

    factors: list[float] = []  # the factor at each forward through the faded neurons
    real_fade = noln.train.fade_neurons

    @contextmanager
    def recording(model, neurons, factor):
        with real_fade(model, neurons, factor):
            handle = model.transformer.h[next(iter(neurons))].mlp.c_proj \
                .register_forward_pre_hook(lambda m, a: factors.append(float(factor)))
            try:
                yield
            finally:
                handle.remove()

    monkeypatch.setattr(noln.train, "fade_neurons", recording)
    fast = {**FAST, "steps": 12, "export_format": "none", "prune_sinks": 3}
    faded = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "faded",
                                  prune_fade=8, **fast)
    assert factors == sorted(factors, reverse=True)  # it only falls, step after step
    assert sorted(set(factors), reverse=True) == [1 - s / 8 for s in range(8)] + [0.0]
    assert [(e["step"], e["neurons"]) for e in faded.log if e.get("event") == "pruned_sinks"] \
        == [(8, 6)]
    plain = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "plain",
                                  **{**fast, "prune_sinks": 0})
    at_once = noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "once",
                                    **fast)
    losses = {name: [e["loss"] for e in r.log if "loss" in e and "event" not in e]
              for name, r in (("faded", faded), ("plain", plain), ("once", at_once))}
    assert losses["faded"][0] == losses["plain"][0] != losses["once"][0]
    for a, b in zip(faded.model.transformer.h, at_once.model.transformer.h):
        zero = (a.mlp.c_proj.weight == 0).all(dim=1)
        assert zero.any() and torch.equal(zero, (b.mlp.c_proj.weight == 0).all(dim=1))
    with pytest.raises(ValueError, match="--prune-sinks N too"):
        RemoveConfig(model="gpt2", steps=100, prune_fade=10)
    with pytest.raises(ValueError, match="does not end within the run's 100 steps, so its "
                       "model would not be the one exported: give --prune-fade below 100, or a "
                       "longer run"):
        RemoveConfig(model="gpt2", steps=100, prune_sinks=4, prune_fade=100)
    # --tokens without --ctx: the run's length waits for the model's context (no crash)
    RemoveConfig(model="gpt2", tokens=100_000, steps=None, prune_sinks=4, prune_fade=10)
    with pytest.raises(NolnError, match="does not end within the run's 8 steps"):
        noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "short",
                              **{**fast, "steps": None, "tokens": 8 * 4 * 64, "ctx": None,
                                 "prune_fade": 8})
    assert not (tmp_path / "short").exists()


def test_a_checkpoint_saved_mid_fade_is_the_model_it_trained(tiny_model_dir, text_jsonl,
                                                              tmp_path):
    """Read back (``noln eval RUN``, ``load_run_model``), a checkpoint from step k of a
    ``prune_fade=S`` run has its sink neurons writing ``1 - k/S`` of their output, as they
    did when it was saved (the checkpoint names them); one from after the fade, zero."""
    from noln.loading import load_run_model

    run = tmp_path / "run"
    fast = {**FAST, "steps": 12, "export_format": "none", "prune_sinks": 3, "prune_fade": 8,
            "checkpoint_every": 4, "checkpoint_keep": 4}
    noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), run, **fast)
    ckpt = torch.load(run / "checkpoints" / "step-4.pt", weights_only=True)
    assert sorted(ckpt["extra"]["sink_neurons"]) == [0, 1]
    model, _ = load_run_model(run / "checkpoints" / "step-4.pt")
    write = model.transformer.h[0].mlp.c_proj.weight
    for block, idx in ckpt["extra"]["sink_neurons"].items():
        saved = ckpt["model"][f"transformer.h.{block}.mlp.c_proj.weight"]
        torch.testing.assert_close(model.transformer.h[block].mlp.c_proj.weight[idx],
                                   saved[idx] * 0.5, rtol=0, atol=0)
    assert write.abs().sum() > 0
    last, _ = load_run_model(run)  # past the fade: pruned, read as saved
    assert (last.transformer.h[0].mlp.c_proj.weight[ckpt["extra"]["sink_neurons"][0]] == 0).all()


def test_a_failed_resume_leaves_config_yaml_as_it_was(tiny_model_dir, text_jsonl, tmp_path,
                                                      monkeypatch):
    """A resume that fails before it saves a checkpoint puts ``config.yaml`` back: the
    settings it was given never trained, and the next plain resume must not take them up. One
    that saved a checkpoint first keeps them (its checkpoint was made with them)."""
    import noln.train
    from noln.errors import NolnError

    run = tmp_path / "run"
    noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), run, export_format="none",
                          **{**FAST, "steps": 10})
    config = (run / "config.yaml").read_bytes()

    def failing(self, *args, **kwargs):
        raise NolnError("the checkpoint could not be read")
    monkeypatch.setattr(noln.train.Trainer, "fit", failing)
    with pytest.raises(NolnError, match="could not be read"):
        noln.remove_layernorm(resume=run, steps=20, lr=5e-4)
    assert (run / "config.yaml").read_bytes() == config

    def saving_then_failing(self, *args, **kwargs):
        (run / "checkpoints" / "last.pt").touch()  # a checkpoint saved, then a failure
        raise NolnError("the disk is full")
    monkeypatch.setattr(noln.train.Trainer, "fit", saving_then_failing)
    with pytest.raises(NolnError, match="disk is full"):
        noln.remove_layernorm(resume=run, steps=20, lr=5e-4)
    kept = yaml.safe_load((run / "config.yaml").read_text())
    assert (kept["steps"], kept["lr"]) == (20, 5e-4)


def test_grad_clip_late_changes_the_clip_from_its_step(tiny_model_dir, text_jsonl, tmp_path,
                                                       monkeypatch):
    """``grad_clip_late=[N, C]``: steps before N clip the gradient norm at ``grad_clip``, steps
    from N on at C; the logged gradient norm is the one before clipping either way."""
    import accelerate

    real_clip = accelerate.Accelerator.clip_grad_norm_
    clips: list[float] = []

    def recording(self, parameters, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", recording)
    fast = {**FAST, "steps": 12}
    noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run",
                          export_format="none", grad_clip=0.5, grad_clip_late=(7, 1e4), **fast)
    assert clips == [0.5] * 7 + [1e4] * 5


def test_grad_clip_late_is_checked_before_any_work():
    from noln.config import RemoveConfig

    cfg = RemoveConfig(model="gpt2", grad_clip=1.0, grad_clip_late=(200, 1e4))
    assert [cfg.clip_at(s) for s in (0, 199, 200, 900)] == [1.0, 1.0, 1e4, 1e4]
    assert RemoveConfig(model="gpt2").clip_at(10**6) == 1.0
    with pytest.raises(ValueError, match="grad_clip_late"):
        RemoveConfig(model="gpt2", grad_clip_late=(200, 0))
    with pytest.raises(ValueError, match="grad_clip_late"):
        RemoveConfig(model="gpt2", grad_clip_late=(-1, 10.0))


@pytest.fixture
def one_thread():
    """Bitwise-equal runs in this process: one thread sums in one order (the subprocess tests
    use DETERMINISTIC)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_staged_run_equals_stopping_there_and_resuming_with_the_stage(
        tiny_model_dir, text_jsonl, tmp_path, one_thread):
    """``stages``: a run that lowers its lr and turns its site loss off by itself at step 10
    ends with the exact weights of the same run branched at step 10 and resumed there with
    those settings (`noln branch`, `noln remove --resume KEY=VALUE`), the way a recipe's
    phases were run by hand. The run keeps the settings it started with beside the ones it
    ends with, and a branch of it takes those of its step."""
    import yaml

    from noln.config import RemoveConfig
    from noln.run import branch_run

    model, data = str(tiny_model_dir), str(text_jsonl)
    base = dict(schedule="fixed", export_format="none", site_aux=0.1, seed=1,
                checkpoint_keep=5, **{**FAST, "steps": 20})
    change = {"lr": 3e-4, "site_aux": 0.0}
    staged = noln.remove_layernorm(model, data, tmp_path / "staged",
                                   stages=[{"step": 10, "set": change}], **base)
    noln.remove_layernorm(model, data, tmp_path / "plain", **base)
    branch_run(tmp_path / "plain", 10, tmp_path / "by-hand")
    noln.remove_layernorm(resume=tmp_path / "by-hand", **change)
    a = load_checkpoint(tmp_path / "staged" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "by-hand" / "checkpoints" / "last.pt")
    c = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 20 and a["state"]["stage"] == 10
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    steps = [e for e in staged.log if "event" not in e]
    assert [e["step"] for e in steps] == list(range(20)), "each step logged once"
    # each says what it replaced (a new lr scales min_lr with it), so a branch can undo it
    min_lr = RemoveConfig.from_yaml(tmp_path / "staged" / "config.first.yaml").min_lr
    was = {"lr": 1e-3, "min_lr": min_lr, "site_aux": 0.1}
    assert [e for e in staged.log if e.get("event") == "stage"] == \
        [{"event": "stage", "step": 10, "set": change, "was": was}]
    by_hand = noln.run.read_log(tmp_path / "by-hand" / "log.jsonl")
    assert [e for e in by_hand if e.get("event") == "resume"] == [{
        "event": "resume", "step": 10, "was": was,
        "set": {**change, "min_lr": pytest.approx(was["min_lr"] * 0.3)}}]
    lr = {e["step"]: e["lr"] for e in steps}
    first_cfg = RemoveConfig.from_yaml(tmp_path / "staged" / "config.first.yaml")
    assert lr[9] == pytest.approx(noln.train.lr_at(9, first_cfg, 20))
    assert lr[10] == pytest.approx(noln.train.lr_at(10, r_cfg(staged), 20))
    assert lr[10] < 0.5 * lr[9]
    assert steps[9]["site_aux"] > 0 and not any("site_aux" in e for e in steps[10:])
    first = yaml.safe_load((tmp_path / "staged" / "config.first.yaml").read_text())
    last = yaml.safe_load((tmp_path / "staged" / "config.yaml").read_text())
    assert (first["lr"], first["site_aux"], last["lr"], last["site_aux"]) == (1e-3, 0.1, 3e-4, 0)
    for step, lr_then in ((5, 1e-3), (15, 3e-4)):  # a branch: the settings of its step
        branch_run(tmp_path / "staged", step, tmp_path / f"branch-{step}")
        cfg = yaml.safe_load((tmp_path / f"branch-{step}" / "config.yaml").read_text())
        assert cfg["lr"] == lr_then and cfg["stages"] == first["stages"]
    noln.remove_layernorm(resume=tmp_path / "branch-5")  # it makes the stage at step 10 itself
    d = load_checkpoint(tmp_path / "branch-5" / "checkpoints" / "last.pt")
    assert d["state"]["stage"] == 10
    # (resumed at step 5, with sites frozen on both sides of it: bitwise only because the
    # pretrained model's tensors are aligned as a rebuilt one's are, noln.pretrained.aligned)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], d["model"][k], rtol=0, atol=0, msg=k)


def test_a_pretrained_model_is_loaded_into_aligned_memory(tiny_model_dir):
    """Every tensor of a loaded model in memory of its own, aligned as a model rebuilt on
    --resume is (the staged-run test above is bitwise because of it); tied weights stay one."""
    from noln.pretrained import ALIGNMENT, load_pretrained

    model = load_pretrained(str(tiny_model_dir))
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_warm_restart_begins_the_warmup_and_cosine_again_at_its_step():
    """lr_restart R: steps before R follow the run's cosine as if there were none; from R the
    warmup and the cosine from lr to min_lr span R .. the end, as a run of that length would."""
    from noln.config import TrainConfig
    from noln.train import lr_at

    plain = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, steps=30)
    restarted = plain.model_copy(update={"lr_restart": 20})
    short = plain.model_copy(update={"steps": 10})  # the restart's 10 steps, as a run
    for step in range(20):
        assert lr_at(step, restarted, 30) == lr_at(step, plain, 30)
    for step in range(20, 30):
        assert lr_at(step, restarted, 30) == pytest.approx(lr_at(step - 20, short, 10))
    assert lr_at(20, restarted, 30) == pytest.approx(5e-4)  # warmup again: 1e-3 x 1/2
    assert lr_at(21, restarted, 30) == pytest.approx(1e-3)
    end = 1e-4 + 0.45e-3 * (1 + math.cos(math.pi * 7 / 8))
    assert lr_at(29, restarted, 30) == pytest.approx(end)
    assert lr_at(21, plain, 30) < 0.4 * lr_at(21, restarted, 30)  # the long cosine's tail


def test_a_branch_trains_on_at_a_new_rate_from_a_warm_restart(tiny_model_dir, text_jsonl, tmp_path):
    """A finished 20-step run (a with-norm control, as attempt 38's) branched at its end and
    lengthened to 30 steps with --lr-restart 20 warms up to the new lr again; a restart at or
    past the run's end is refused with the fix before the model loads."""
    from noln.run import branch_run

    base = dict(keep_ln=True, export_format="none", checkpoint_keep=5,
                **{**FAST, "steps": 20})
    noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run", **base)
    branch_run(tmp_path / "run", 20, tmp_path / "branch")
    with pytest.raises(NolnError, match=r"--lr-restart 30 is not before the run's end \(step 30\)"):
        noln.remove_layernorm(resume=tmp_path / "branch", steps=30, lr_restart=30)
    result = noln.remove_layernorm(resume=tmp_path / "branch", steps=30, lr=5e-4, min_lr=5e-5,
                                   lr_restart=20)
    lr = {e["step"]: e["lr"] for e in result.log if "event" not in e}
    assert sorted(lr) == list(range(30))
    assert lr[19] < 2e-4  # the first run's cosine, near its end
    assert lr[20] == pytest.approx(5e-4 / FAST["warmup_steps"]) and lr[21] == pytest.approx(5e-4)
    assert lr[29] == pytest.approx(5e-5 + 0.5 * 4.5e-4 * (1 + math.cos(math.pi * 7 / 8)))


def test_a_branch_takes_the_settings_its_step_trained_with_across_resumes(tiny_model_dir,
                                                                          text_jsonl, tmp_path):
    """A run resumed with a new rate and length logs what it replaced; a branch of a step
    before that resume trains on as the run did then (its old rate and length), one of a
    step after it with the new ones. (Branches took the run's first settings, and attempt
    38's would have gone on at attempt 36's rate had its command not given every one again.)"""
    import yaml

    from noln.run import branch_run

    base = dict(keep_ln=True, export_format="none", checkpoint_keep=5, **{**FAST, "steps": 10})
    noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run", **base)
    noln.remove_layernorm(resume=tmp_path / "run", steps=20, lr=5e-4)
    resumes = [e for e in noln.run.read_log(tmp_path / "run" / "log.jsonl")
               if e.get("event") == "resume"]
    assert [(e["step"], e["set"]["lr"], e["was"]["lr"], e["set"]["steps"], e["was"]["steps"])
            for e in resumes] == [(10, 5e-4, 1e-3, 20, 10)]
    for step, lr, steps in ((5, 1e-3, 10), (15, 5e-4, 20)):
        branch_run(tmp_path / "run", step, tmp_path / f"branch-{step}")
        cfg = yaml.safe_load((tmp_path / f"branch-{step}" / "config.yaml").read_text())
        assert (cfg["lr"], cfg["steps"]) == (lr, steps), step
    now = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (now["lr"], now["steps"]) == (5e-4, 20)

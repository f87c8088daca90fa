"""Reliability, as a hostile user meets it: runs never lose files, folders never run code, and
every bad input is one line on stderr with exit code 2 (no traceback) before any work is done.

Messages that matter are checked through the real entry point: a subprocess
(``python -m noln.cli``) where the process matters (signals, exit codes, a crafted pickle), else
``noln.cli.main`` in-process (same code path, without paying for a new interpreter).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    RepositoryNotFoundError,
)

import noln
import noln.evaluate.inputs
import noln.loading
import noln.remove
from noln import pretrained
from noln.cli import main
from noln.errors import NolnError
from noln.fakenorm import FakeNorm
from noln.loading import load_run_model
from noln.pretrained import load_tokenizer
from noln.run import checkpoint_note

SRC = Path(__file__).resolve().parents[1] / "src" / "noln"
RUN_ARGS = ["--steps", "12", "--batch-size", "4", "--ctx", "64", "--lr", "1e-3", "--schedule",
            "fixed", "--checkpoint-every", "4", "--format", "none", "--quiet"]


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "noln.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def run_main(capsys, *args, out: bool = False) -> tuple[int, str]:
    """``noln ARGS`` in this process: (exit code, stderr, or stdout with ``out``)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out if out else captured.err


def one_error_line(code: int, stderr: str, *needles: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line, holding every needle."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, text_jsonl, tmp_path_factory) -> Path:
    """A finished 12-step removal run (every site frozen), made through the CLI."""
    run = tmp_path_factory.mktemp("finished") / "run"
    p = cli("remove", tiny_model_dir, "--data", text_jsonl, "--out", run, *RUN_ARGS)
    assert p.returncode == 0, p.stderr[-2000:]
    return run


def fake_run(folder: Path, model: str = "some/other-model") -> Path:
    """A folder that looks like a noln run of another model (what the refusal reads)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model: {model}\ndata: builtin\n")
    (folder / "checkpoints" / "last.pt").write_bytes(b"weeks of training")
    return folder


def test_a_finished_removal_says_where_its_time_went(capsys, finished_run):
    """The closing lines of `noln remove`: besides the training steps' seconds, what the rest
    of the command's wall time went to (on a lent H200, G1's steps were ~40% of it)."""
    from noln.cli import _print_summary

    summary = json.loads((finished_run / "summary.json").read_text())
    _print_summary(summary)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("this command: "))
    assert line == "this command: " + f"{summary['time_s']['wall']:,.0f}s = " + ", ".join(
        f"{k} {v:,.0f}s" for k, v in summary["time_s"].items() if k != "wall")
    for part in ("loading", "evaluation", "steps", "checkpoints", "export", "other"):
        assert f" {part} " in line, line


# ----------------------------------------------------------------------------- 1. data loss


def test_remove_refuses_another_run_and_a_foreign_folder(capsys, tiny_model_dir, tmp_path):
    other = fake_run(tmp_path / "other")
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", "builtin", "--out", other,
                         *RUN_ARGS)
    one_error_line(code, err, "already holds a run of some/other-model", "--resume",
                   "--overwrite")
    assert (other / "checkpoints" / "last.pt").read_bytes() == b"weeks of training"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not lose me")
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", "builtin", "--out", mine,
                         "--overwrite", *RUN_ARGS)
    one_error_line(code, err, "not a noln run folder", "thesis.tex")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_overwrite_replaces_only_what_noln_wrote(capsys, tiny_model_dir, text_jsonl, tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "notes.md").write_text("my notes")
    (run / "log.jsonl").write_text('{"step": 0, "loss": 99.0}\n')
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out", run,
                         "--overwrite", *RUN_ARGS)
    assert code == 0, err
    assert (run / "notes.md").read_text() == "my notes"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "event" not in r] == list(range(12))
    assert not (run / ".noln.lock").exists()


def test_overwrite_refuses_a_run_whose_own_folders_hold_a_users_files(capsys, finished_run,
                                                                       tiny_model_dir, tmp_path):
    """--overwrite deletes noln's subfolders (checkpoints/, base/ ...) whole: a file of the
    user's put inside one is named and the run refused, before anything is deleted."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for rel in ("base/my_notes.md", "checkpoints/my.pt"):
        (run / rel).write_text("mine")
        before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
        code, err = run_main(capsys, "remove", tiny_model_dir, "--data", "builtin", "--out", run,
                             "--overwrite", *RUN_ARGS)
        one_error_line(code, err, "--overwrite would delete what noln did not write", rel)
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
        (run / rel).unlink()
    from noln.run import foreign_entries

    assert foreign_entries(run) == []  # noln's own files only: --overwrite may go on


def test_a_live_lock_names_its_holder_and_a_stale_one_is_taken_over(capsys, tiny_model_dir,
                                                                     tmp_path):
    from noln.run import LOCK, acquire_lock, lock_holder, release_lock

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        code, err = run_main(capsys, "remove", tiny_model_dir, "--data", "builtin", "--out",
                             out, *RUN_ARGS)
        one_error_line(code, err, f"in use by another noln process (PID {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert acquire_lock(out)  # the holder is gone: its lock is stale and taken over
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    release_lock(out)
    assert not (out / LOCK).exists()
    # a lock file nobody could have written (a pid past any system's, a host that is no name,
    # not a JSON object) holds nothing: taken over, never a traceback
    for content in ('{"pid": 1e999}', '{"pid": 99999999999}', '{"pid": 7, "host": null}',
                    '[1, 2]', '{"pid": "x"}', ""):
        (out / LOCK).write_text(content)
        assert lock_holder(out) is None, content
        assert acquire_lock(out), content
        release_lock(out)
    assert sorted(p.name for p in out.iterdir()) == []  # nothing of the lock's left behind
    # ... and what a kill between its steps might leave is no one's file: the folder is empty
    from noln.run import check_run_target

    (out / f"{LOCK}.x1y2.tmp").write_text("{}")
    (out / f"{LOCK}.stale-abc").write_text("{}")
    check_run_target(out, overwrite=False)


def test_two_processes_taking_over_one_stale_lock_leave_it_to_one(monkeypatch, tmp_path):
    """Where a process saw the lock stale, but another took it over first, the lock it moves
    away is the other's new one: it sees that, puts it back and is refused. A lock that cannot
    be read is an error, not a free folder."""
    import noln.run
    from noln.run import LOCK, acquire_lock

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = json.dumps({"pid": holder.pid, "host": socket.gethostname()})
    real = noln.run.lock_holder
    seen = []

    def stale_at_first(folder):  # what this process read before the other took the lock
        seen.append(folder)
        return None if len(seen) == 1 else real(folder)

    monkeypatch.setattr(noln.run, "lock_holder", stale_at_first)
    try:
        (out / LOCK).write_text(live)
        with pytest.raises(NolnError, match=f"in use by another noln process \\(PID {holder.pid}"):
            acquire_lock(out)
        assert (out / LOCK).read_text() == live  # the other's lock, back in place
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    finally:
        holder.kill()
        holder.wait()
    (out / LOCK).unlink()
    (out / LOCK).mkdir()  # a lock this process cannot read
    with pytest.raises(NolnError, match="is a folder where noln keeps its lock file"):
        acquire_lock(out)
    assert (out / LOCK).is_dir()
    (out / LOCK).rmdir()
    (out / LOCK).write_text(live)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))  # (root reads any file: its error, made)
    with pytest.raises(NolnError, match="cannot read the lock file .* another user's noln"):
        acquire_lock(out)
    monkeypatch.undo()
    assert (out / LOCK).read_text() == live


def test_two_runs_into_one_folder_the_second_is_refused(tiny_model_dir, text_jsonl, tmp_path):
    out = tmp_path / "run"
    args = ["remove", tiny_model_dir, "--data", text_jsonl, "--out", out, *RUN_ARGS]
    args[args.index("--steps") + 1] = "400"
    first = subprocess.Popen([sys.executable, "-m", "noln.cli", *map(str, args)],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = cli(*args)
        one_error_line(second.returncode, second.stderr, f"PID {first.pid}")
    finally:
        first.kill()
        first.wait()


def test_a_run_that_fails_before_training_leaves_no_folder(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "new" / "run"
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", tmp_path / "missing.jsonl",
                         "--out", out, *RUN_ARGS)
    one_error_line(code, err, "does not exist")
    assert not out.exists()


def test_export_never_deletes_what_it_did_not_write(capsys, finished_run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "paper.pdf").write_bytes(b"%PDF")
    code, err = run_main(capsys, "export", finished_run, "--out", mine)
    one_error_line(code, err, "not a noln export")
    assert (mine / "paper.pdf").read_bytes() == b"%PDF"
    code, err = run_main(capsys, "export", finished_run, "--out", finished_run)
    one_error_line(code, err, "run folder itself")
    assert (finished_run / "checkpoints" / "last.pt").exists()
    # a previous export of its own is replaced, in either format
    target = tmp_path / "export"
    for fmt in ("hf", "clean", "hf"):
        code, err = run_main(capsys, "export", finished_run, "--out", target, "--format", fmt)
        assert code == 0, err
        assert json.loads((target / "noln.json").read_text())["format"] == fmt
    assert not [p for p in tmp_path.iterdir() if "noln-tmp" in p.name or "noln-old" in p.name]
    # ... but not once the user has put a file of their own into it
    (target / "notes.md").write_text("mine")
    code, err = run_main(capsys, "export", finished_run, "--out", target)
    one_error_line(code, err, "not write (notes.md)")
    assert (target / "notes.md").read_text() == "mine"
    assert (target / "model.safetensors").exists()
    # an export from before noln listed its files: only an export's own file names are replaced
    meta = json.loads((target / "noln.json").read_text())
    (target / "noln.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    code, err = run_main(capsys, "export", finished_run, "--out", target)
    one_error_line(code, err, "not write (notes.md)")
    (target / "notes.md").unlink()
    code, err = run_main(capsys, "export", finished_run, "--out", target)
    assert code == 0, err
    # another run's export is that run's (it once replaced the model a run was trained from)
    import shutil

    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    code, err = run_main(capsys, "export", other, "--out", target)
    one_error_line(code, err, f"holds the export of another run ('{finished_run.resolve()}')")
    pre = tmp_path / "pre"  # an export that names no run, in a run folder's model/
    (pre / "checkpoints").mkdir(parents=True)
    shutil.copytree(target, pre / "model")
    meta = json.loads((pre / "model" / "noln.json").read_text())
    (pre / "model" / "noln.json").write_text(json.dumps({**meta, "run": None}))
    code, err = run_main(capsys, "export", finished_run, "--out", pre / "model")
    one_error_line(code, err, f"holds the export of another run ('{pre.resolve()}')")
    assert json.loads((pre / "model" / "noln.json").read_text())["run"] is None
    # a run's own model/, the run folder moved since: its own
    code, err = run_main(capsys, "export", other, "--out", other / "model")
    assert code == 0, err
    moved = tmp_path / "moved"
    other.rename(moved)
    code, err = run_main(capsys, "export", moved, "--out", moved / "model", "--format", "clean")
    assert code == 0, err


def test_delete_calls_touch_only_noln_files():
    """Every rmtree in the package names what it deletes as noln's own (a comment on the line,
    or the line before, says why), and no torch.load runs with weights_only=False."""
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            assert "weights_only=False" not in line, f"{path}:{i + 1}"
            if "rmtree(" in line:
                assert "#" in line or "#" in lines[i - 1], \
                    f"{path}:{i + 1}: say why this rmtree deletes only noln's files"


# ----------------------------------------------------------------------------- 2. code


_EVIL = """
import os, pickle, sys
path, marker, how = sys.argv[1:]
class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))
obj = {"model": {}, "step": 1, "x": Evil()}
if how == "torch":  # inside torch's zip format, as torch.save writes it
    import torch
    torch.save(obj, path)
else:  # a bare pickle
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
"""


@pytest.mark.parametrize("how", ["torch", "raw"])
def test_a_crafted_checkpoint_does_not_run(finished_run, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / "last.pt"
    (run / "checkpoints" / "prev.pt").unlink(missing_ok=True)
    subprocess.run([sys.executable, "-c", _EVIL, ckpt, marker, how], check=True)
    for args in (["eval", run, "--data", "builtin", "--tokens", "256"],
                 ["export", run, "--out", tmp_path / "x"],
                 ["remove", "--resume", run, "--quiet"]):
        p = cli(*args)
        one_error_line(p.returncode, p.stderr, str(ckpt))
        assert not marker.exists(), f"{args[0]} ran the pickle's code"


def test_a_folder_with_its_own_code_is_refused_without_the_flag(capsys, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "noln-evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for command in (["eval", folder, "--data", "builtin"], ["sites", folder],
                    ["linearity", folder, "--data", "builtin"]):
        code, err = run_main(capsys, *command)
        one_error_line(code, err, "--trust-remote-code", "auto_map")
        assert not marker.exists()


def test_every_hub_load_passes_trust_remote_code():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"(AutoConfig|AutoTokenizer|AutoModelForCausalLM)\.from_pretrained\(",
                             text):
            end = text.find("\n\n", m.end())  # the statement's paragraph (or the file's end)
            call = text[m.end(): end if end >= 0 else len(text)]
            assert "trust_remote_code=" in call.split(")\n")[0], \
                f"{path}: {m.group(0)} without trust_remote_code"


# ----------------------------------------------------------------------------- 3. options


def test_config_file_and_a_runs_own_config_yaml_work(capsys, tiny_model_dir, text_jsonl,
                                                     tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {text_jsonl}\nsteps: 8\nbatch_size: 4\n"
                   "ctx: 64\nschedule: fixed\nexport_format: none\nkeep_ln: false\n")
    first = tmp_path / "first"
    code, err = run_main(capsys, "remove", "--config", cfg, "--out", first, "--quiet")
    assert code == 0, err
    # the run's own resolved config.yaml (every field, its out included) starts a new run
    second = tmp_path / "second"
    code, err = run_main(capsys, "remove", "--config", first / "config.yaml", "--out", second,
                         "--steps", "10", "--quiet")
    assert code == 0, err
    summary = json.loads((second / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["ctx"] == 64


def test_steps_and_tokens_are_one_setting_the_last_layer_gives(capsys, tmp_path):
    """The run's length is given once: a layer that names --steps or --tokens replaces the other
    (a --config file's tokens under a command line's --steps: a --steps run), the saved config
    shows which one set it, and one command line naming both is a one-line error."""
    from noln.config import RemoveConfig, make_config, merge_layers, resume_config

    cfg = make_config(model="gpt2", data="builtin", tokens=40_000)  # the preset gives steps
    assert cfg.steps is None and cfg.resolved_steps(64) == 40_000 // (512 * 64) + 1
    file = {"model": "gpt2", "data": "builtin", "tokens": 2_000_000, "steps": None}
    cfg = make_config(**merge_layers(file, {"steps": 50}))
    assert cfg.tokens is None and cfg.resolved_steps(1024) == 50
    cfg = make_config(**merge_layers({**file, "tokens": None, "steps": 50}, {"tokens": 65_536}))
    assert cfg.steps is None and cfg.resolved_steps(64) == 65_536 // (512 * 64)
    # a run's config.yaml from before this rule holds both: its tokens set its length
    old = {**file, "steps": 146, "batch_size": 512, "out": str(tmp_path)}
    assert RemoveConfig(**old).resolved_steps(256) == 16  # 2M / (512 x 256), rounded up
    cfg, changed, _ = resume_config(tmp_path, old, {"steps": 300})
    assert changed == {"steps": 300} and cfg.tokens is None and cfg.resolved_steps(256) == 300
    with pytest.raises(Exception, match="--steps 10 and --tokens 5000 both set the run's length"):
        resume_config(tmp_path, old, {"steps": 10, "tokens": 5000})
    code, err = run_main(capsys, "remove", "gpt2", "--steps", "10", "--tokens", "5000")
    one_error_line(code, err, "--steps 10 and --tokens 5000 both set the run's length: give one")
    # noln pretrain: the same rule, and its checkpoints every quarter of the run it will train
    from noln.config import make_pretrain_config

    cfg = make_pretrain_config(data="builtin", out=str(tmp_path), tokens=32 * 128 * 400)
    assert cfg.steps is None and cfg.resolved_steps(cfg.ctx) == 400 and cfg.checkpoint_every == 100
    code, err = run_main(capsys, "pretrain", "--data", "builtin", "--out", tmp_path / "p",
                         "--steps", "10", "--tokens", "5000")
    one_error_line(code, err, "--steps 10 and --tokens 5000 both set the run's length")


def test_resume_takes_a_new_lr_and_keeps_the_run(capsys, finished_run, tmp_path):
    from noln.config import RemoveConfig
    from noln.train import lr_at

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ckpts = run / "checkpoints"
    os.replace(ckpts / "prev.pt", ckpts / "last.pt")  # back to step 8, as if killed there
    (run / "summary.json").unlink()
    log_before = (run / "log.jsonl").read_text().splitlines()
    code, err = run_main(capsys, "remove", "--resume", run, "--ctx", "32")
    one_error_line(code, err, "--ctx 32 differs from the run's 64")
    # the export it replaces at its end (one of noln's, as listed in its noln.json) now holds a
    # file of the user's: refused up front, the run untouched
    (run / "model").mkdir()
    (run / "model" / "noln.json").write_text(json.dumps({"format": "hf", "files": ["noln.json"]}))
    (run / "model" / "notes.md").write_text("mine")
    code, err = run_main(capsys, "remove", "--resume", run, "--lr", "2e-4", "--format", "hf")
    one_error_line(code, err, "not write (notes.md)")
    assert (run / "log.jsonl").read_text().splitlines() == log_before
    (run / "model" / "notes.md").unlink()
    code, err = run_main(capsys, "remove", "--resume", run, "--lr", "2e-4", "--format", "hf",
                         "--quiet")
    assert code == 0, err
    assert "takes --lr 0.0002 (was 0.001)" in err and "keeps model, data" in err
    files = json.loads((run / "model" / "noln.json").read_text())["files"]  # replaced, listed
    assert {"noln.json", "config.json", "model.safetensors"} <= set(files)
    assert sorted(p.name for p in (run / "model").iterdir()) == files
    cfg = RemoveConfig.from_yaml(run / "config.yaml")
    assert cfg.lr == 2e-4 and cfg.min_lr == pytest.approx(3e-5 * 0.2)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "event" not in r]
    assert [r["step"] for r in steps] == list(range(12))
    for r in steps[8:]:
        assert r["lr"] == pytest.approx(lr_at(r["step"], cfg, 12))
    assert steps[7]["lr"] == pytest.approx(lr_at(7, cfg.model_copy(update={
        "lr": 1e-3, "min_lr": 3e-5}), 12))


def test_resume_measures_the_eval_sets_the_run_began_with(capsys, tiny_model_dir, text_jsonl,
                                                         tmp_path):
    """--eval sets live in the run's config: a resumed run's CE table keeps them without being
    told again, and --resume --eval adds one (measured after; its CE before is unknown)."""
    run = tmp_path / "run"
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out", run,
                         "--eval", f"other={text_jsonl}", *RUN_ARGS)
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["eval_sets"] == {"other": str(text_jsonl)}

    def back_to_step_8():  # as if killed there
        os.replace(run / "checkpoints" / "prev.pt", run / "checkpoints" / "last.pt")
        (run / "summary.json").unlink()

    back_to_step_8()
    code, err = run_main(capsys, "remove", "--resume", run, "--quiet")
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["ce_before"]) == set(summary["ce_after"]) == {"heldout", "other"}
    back_to_step_8()
    code, err = run_main(capsys, "remove", "--resume", run, "--eval", f"more={text_jsonl}",
                         "--quiet")
    assert code == 0, err
    assert "(was {})" in " ".join(err.split())  # the run had no set of that name
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["ce_after"]) == {"heldout", "other", "more"}
    assert set(summary["ce_before"]) == {"heldout", "other"}
    after = summary["ce_after"]
    assert after["more"]["mean"] == pytest.approx(after["other"]["mean"])


def test_a_branch_goes_on_from_a_kept_checkpoint(capsys, tiny_model_dir, text_jsonl, tmp_path):
    """checkpoint_keep=4 keeps steps 0, 4, 8, 12; `noln branch RUN --step 8` makes a new run of
    RUN as it was then, which --resume continues with a new setting; RUN is only read. The
    step of a run's last checkpoint can be branched too, kept or not (to train a finished
    run further)."""
    run, new = tmp_path / "run", tmp_path / "branch"
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out", run,
                         *RUN_ARGS, "checkpoint_keep=6")
    one_error_line(code, err, "checkpoint_keep 6 is not a multiple of --checkpoint-every 4")
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out", run,
                         *RUN_ARGS, "checkpoint_keep=4")
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["last.pt", "prev.pt", "step-0.pt", "step-12.pt", "step-4.pt", "step-8.pt"]
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    log = (run / "log.jsonl").read_text().splitlines()
    code, err = run_main(capsys, "branch", run, "--step", "5", "--out", new)
    one_error_line(code, err, "kept no checkpoint of step 5: it kept steps 0, 4, 8, 12, and "
                   "its last checkpoint is of step 12")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.md").write_text("mine")
    code, err = run_main(capsys, "branch", run, "--step", "8", "--out", tmp_path / "taken")
    one_error_line(code, err, "exists and is not empty")
    code, err = run_main(capsys, "branch", run, "--step", "8", "--out", run / "sub")
    one_error_line(code, err, "is inside the run")
    assert not (run / "sub").exists()
    code, err = run_main(capsys, "branch", run, "--step", "8", "--out", new)
    assert code == 0, err
    def steps(folder):  # the log's step records
        return [r for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines())
                if "event" not in r]

    assert [r["step"] for r in steps(new)] == list(range(8))
    assert yaml.safe_load((new / "config.yaml").read_text())["out"] == str(new)
    code, err = run_main(capsys, "remove", "--resume", new, "--lr", "2e-4", "--quiet")
    assert code == 0, err
    branched, original = steps(new), steps(run)
    assert branched[:8] == original[:8] and [r["step"] for r in branched[8:]] == [8, 9, 10, 11]
    assert branched[8]["lr"] != original[8]["lr"]  # the branch's own lr
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    # a run that kept no step: its last checkpoint (the end of the run) can be branched
    plain, end = tmp_path / "plain", tmp_path / "end"
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out", plain,
                         *RUN_ARGS)
    assert code == 0, err
    code, err = run_main(capsys, "branch", plain, "--step", "8", "--out", end)
    one_error_line(code, err, "kept no checkpoint of step 8: it kept none (start a run with "
                   "checkpoint_keep=N to keep every N-th step's), and its last checkpoint is of "
                   "step 12")
    code, err = run_main(capsys, "branch", plain, "--step", "12", "--out", end)
    assert code == 0, err
    assert [r["step"] for r in steps(end)] == list(range(12))
    assert (end / "checkpoints" / "last.pt").read_bytes() == \
        (plain / "checkpoints" / "last.pt").read_bytes()
    assert (run / "log.jsonl").read_text().splitlines() == log

    # a branch with a new schedule: what step 4 froze stands, the rest follow the new one
    def removals(folder, after=0):
        return [(r["step"], r["site"]) for r in map(json.loads, (folder / "log.jsonl")
                .read_text().splitlines()) if r.get("event") == "remove" and r["step"] >= after]

    frozen_at_4 = {site for step, site in removals(run) if step < 4}
    live = [site for _, site in removals(run) if site not in frozen_at_4]
    assert frozen_at_4 and len(live) >= 2
    plan = tmp_path / "plan.yaml"
    plan.write_text("events:\n" + "".join(f"  - {{step: {5 + i}, site: {site}}}\n"
                                          for i, site in enumerate([*frozen_at_4, *live[::-1]])))
    for bad, needles in [(f"schedule={tmp_path / 'nope.yaml'}", ["cannot read schedule file"]),
                         ("outlier_clip=-1", ["--outlier-clip -1 is invalid"]),
                         ("lr=1", ["a branch sets only", "noln remove --resume"])]:
        code, err = run_main(capsys, "branch", run, "--step", "4", "--out", tmp_path / "bad", bad)
        one_error_line(code, err, *needles)
        assert not (tmp_path / "bad").exists()  # refused before anything was written
    code, err = run_main(capsys, "branch", run, "--step", "4", "--out", tmp_path / "b2",
                         f"schedule={plan}", "outlier_clip=1.5")
    assert code == 0, err
    code, err = run_main(capsys, "remove", "--resume", tmp_path / "b2", "--quiet")
    # the clip's lift (special_fade) starts once every site is frozen: one step of four is done
    one_error_line(code, err, "removal unfinished", "the outlier clip is 25% lifted")
    n = len(frozen_at_4)  # the plan's events for sites already frozen are skipped
    assert removals(tmp_path / "b2", after=4) == \
        [(5 + n + i, site) for i, site in enumerate(live[::-1])]
    model, _ = load_run_model(tmp_path / "b2")  # the new clip on every site, frozen before or not
    clips = [float(m.outlier_clip) for m in model.modules() if isinstance(m, FakeNorm)]
    assert clips == pytest.approx([1.5 / (1 - 0.25)] * len(clips))


def test_resume_refuses_a_longer_fixed_schedule(capsys, finished_run):
    code, err = run_main(capsys, "remove", "--resume", finished_run, "--steps", "20")
    one_error_line(code, err, "fixed schedule")


# ----------------------------------------------------------------------------- 4. numbers


@pytest.mark.parametrize("flag,value,rule", [
    ("--steps", "0", ">= 1"), ("--tokens", "0", ">= 1"), ("--batch-size", "0", ">= 1"),
    ("--batch-size", "-4", ">= 1"), ("--ctx", "0", ">= 2"), ("--ctx", "-1", ">= 2"),
    ("--distill", "2", "<= 1"), ("--aux-weight", "-1", ">= 0"), ("--lr", "nan", "finite"),
    ("--lr", "0", "> 0"), ("--checkpoint-every", "0", ">= 1"), ("--seed", "-1", ">= 0"),
    ("--micro-batch-size", "3", "not a multiple"), ("--outlier-clip", "0.5", "below 1"),
    ("--site-aux", "-1", ">= 0"), ("--distill-hidden", "-1", ">= 0"),
    ("--distill-hidden", "1", "give --distill W too"),
])
def test_remove_numbers_are_checked_before_anything_loads(capsys, tmp_path, flag, value, rule):
    out = tmp_path / "out"
    code, err = run_main(capsys, "remove", "no/such-model", "--data", "builtin", "--out", out,
                         flag, value)
    line = one_error_line(code, err, flag, rule)
    assert "e.g." in line or "give" in line  # a valid value
    assert not out.exists()


def test_site_aux_live_without_the_site_loss_is_refused(capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run_main(capsys, "remove", "no/such-model", "--data", "builtin", "--out", out,
                         "--site-aux-live")
    one_error_line(code, err, "--site-aux-live", "--site-aux W")
    assert not out.exists()


def test_bad_numbers_of_the_other_commands(capsys, tmp_path):
    cases = [
        (["eval", "m", "--data", "builtin", "--batch-size", "0"], "--batch-size 0"),
        (["eval", "m", "--hellaswag", "x.jsonl", "--hellaswag-limit", "0"], "--hellaswag-limit"),
        (["compare", "a", "b", "c", "--data", "builtin", "--tokens", "0"], "--tokens 0"),
        (["pretrain", "--data", "builtin", "--out", tmp_path / "p", "--heads", "0"], "--heads 0"),
        (["pretrain", "--data", "builtin", "--out", tmp_path / "p", "--d-model", "100",
          "--heads", "3"], "not divisible"),
        (["linearity", "m", "--data", "builtin", "--id-tokens", "-1"], "--id-tokens"),
        # (0-2 tokens blanked the geometry columns without a word)
        (["linearity", "m", "--data", "builtin", "--id-tokens", "0"], "too few for TwoNN"),
        (["linearity", "m", "--data", "builtin", "--forward-precision", "fp16"],
         "--forward-precision 'fp16' is unknown"),
        (["eval", "m", "--data", "builtin", "--precision", "half"], "unknown precision 'half'"),
        (["linearize", "m", "--out", tmp_path / "l", "--distill-lr", "nan"], "--distill-lr"),
        (["remove", "m", "--hellaswag-limit", "0", "--control", "--hellaswag", "x"],
         "--hellaswag-limit"),
        (["remove", "--resume", tmp_path / "r", "--overwrite"],
         "--resume continues a run and --overwrite replaces one"),
        (["export", tmp_path / "nope", "--out", tmp_path / "e"], "does not exist"),
        (["export", tmp_path, "--out", tmp_path / "e"], "is not a noln run folder"),
    ]
    for args, needle in cases:
        code, err = run_main(capsys, *args)
        one_error_line(code, err, needle)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("text,needle", [
    ("type: adaptive\ntolerence: 0.02\n", "unknown setting 'tolerence'"),
    ("type: adaptive\ntolerance: high\n", "tolerance = 'high' is invalid: must be a number"),
    ("type: adaptive\ntolerance: 1e-2\n", "write 0.01"),
    ("type: fixed\ntolerance: 0.1\n", "not a setting of a fixed schedule"),
    ("events:\n  - {step: -1, site: ln_f}\n", "events.0.step = -1"),
    ("type: adaptive\nmin_gap: 9\nmax_gap: 2\n", "min_gap <= max_gap"),
])
def test_schedule_files_are_validated_before_loading(capsys, tmp_path, text, needle):
    schedule = tmp_path / "s.yaml"
    schedule.write_text(text)
    code, err = run_main(capsys, "remove", "no/such-model", "--data", "builtin", "--out",
                         tmp_path / "o", "--schedule", schedule)
    one_error_line(code, err, "schedule file", needle)


def test_tokens_far_beyond_the_data_is_an_error(capsys, tiny_model_dir, text_jsonl, tmp_path):
    out = tmp_path / "out"
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out", out,
                         "--tokens", str(10**12), "--batch-size", "4", "--ctx", "64", "--quiet")
    one_error_line(code, err, "passes over the", "lower --tokens")
    assert not out.exists()


# ----------------------------------------------------------------------------- 5. files


def test_files_that_are_not_what_they_claim(capsys, tiny_model_dir, tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "caf\xe9"}\n')
    listed = tmp_path / "list.jsonl"
    listed.write_text('{"text": "fine"}\n{"text": ["a", "b"]}\n')
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    for path, needle in ((latin1, "latin1.jsonl:1 is not UTF-8"),
                         (listed, "list.jsonl:2: 'text' is a list"),
                         (binary, "binary.txt' is not a text file")):
        code, err = run_main(capsys, "eval", tiny_model_dir, "--data", path)
        one_error_line(code, err, needle)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = run_main(capsys, "eval", truncated, "--data", "builtin")
    one_error_line(code, err, str(truncated), "corrupt or truncated")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text('{"model_type": "gpt2", ')
    code, err = run_main(capsys, "eval", broken, "--data", "builtin")
    one_error_line(code, err, "config.json' is not a readable JSON file")


# ----------------------------------------------------------------------------- 6. fail early


def test_unwritable_outputs_fail_before_the_work(capsys, finished_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = blocker / "out.json"
    cases = [
        ["eval", "no/such-model", "--data", "builtin", "--json", bad],
        ["eval", "no/such-model", "--data", "builtin", "--out", blocker],
        ["compare", "a", "b", "c", "--data", "builtin", "--json", bad],
        ["linearity", "no/such-model", "--data", "builtin", "--plot", bad],
        ["linearity", "no/such-model", "--data", "builtin", "--csv", bad],
        ["linearize", "no/such-model", "--out", blocker / "lin"],
        ["attribute", "no/such-model", "--text", "hi", "--json", bad],
        ["export", finished_run, "--out", blocker],
    ]
    for args in cases:
        code, err = run_main(capsys, *args)
        line = one_error_line(code, err)
        assert "a-file" in line and "no/such-model" not in line, line


def test_reports_carry_noln_mark_and_a_foreign_file_is_never_replaced(tmp_path):
    """Each report writer's file is known as noln's afterwards; a file without the mark (the
    user's) is refused by the up-front check and by the writer itself, and left as it was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from noln.outputs import (
        check_output_file,
        save_figure,
        write_csv,
        write_json,
        write_markdown,
        written_by_noln,
    )

    header = ("model", "layer", "score")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ours = [write_json({"a": 1}, tmp_path / "r.json"), write_markdown("# t\n", tmp_path / "t.md"),
            write_csv(header, [("m", 0, 0.5)], tmp_path / "p.csv"),
            *(save_figure(fig, tmp_path / f"f.{ext}") for ext in ("png", "pdf", "svg"))]
    for path in ours:
        assert written_by_noln(path, header if path.suffix == ".csv" else None), path
        check_output_file(path, "--out", header if path.suffix == ".csv" else None)  # replaceable
    assert json.loads((tmp_path / "r.json").read_text()) == {"noln": {"version": noln.__version__},
                                                            "a": 1}
    assert not written_by_noln(tmp_path / "p.csv", ("model", "layer"))  # another CSV's header
    jpg = save_figure(fig, tmp_path / "f.jpg")  # a format without metadata: never replaced
    plt.close(fig)
    foreign = {"data.json": '{"rows": [1, 2]}', "notes.md": "# mine\n", "mine.csv": "a,b\n1,2\n",
               "fig.png": "not a png", "f.jpg": None}
    for name, text in foreign.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        before = path.read_bytes()
        assert not written_by_noln(path, header if name.endswith(".csv") else None), name
        with pytest.raises(NolnError, match="already exists and is not a noln report"):
            check_output_file(path, "--json", header if name.endswith(".csv") else None)
        with pytest.raises(NolnError, match="nothing was written over it"):
            {".json": lambda p: write_json({}, p), ".md": lambda p: write_markdown("x", p),
             ".csv": lambda p: write_csv(header, [], p),
             ".png": lambda p: save_figure(fig, p), ".jpg": lambda p: save_figure(fig, p),
             }[path.suffix](path)
        assert path.read_bytes() == before, name
    assert jpg.exists()
    # a report of noln's is replaced only by one of its kind: --json never names a run's
    # loss.png or a table (it used to write JSON over the figure)
    for path in (tmp_path / "f.png", tmp_path / "t.md"):
        before = path.read_bytes()
        with pytest.raises(NolnError, match="is another of noln's files, not a JSON report"):
            check_output_file(path, "--json", kind="json")
        with pytest.raises(NolnError, match="nothing was written over it"):
            write_json({}, path)
        assert path.read_bytes() == before, path
    with pytest.raises(NolnError, match="nothing was written over it"):
        write_markdown("x", tmp_path / "r.json")


def test_commands_refuse_to_write_over_a_users_file_before_loading(capsys, tmp_path):
    """--json / --csv / --plot naming the user's own file: one line before any model loads (the
    model here does not exist: the error is about the file), and the file is untouched."""
    mine = {ext: tmp_path / f"mine.{ext}" for ext in ("json", "csv", "png")}
    for path in mine.values():
        path.write_text("the user's own file\n")
    cases = [
        ["eval", "no/such-model", "--data", "builtin", "--json", mine["json"]],
        ["compare", "a", "b", "c", "--data", "builtin", "--json", mine["json"]],
        ["linearity", "no/such-model", "--data", "builtin", "--json", mine["json"]],
        ["linearity", "no/such-model", "--data", "builtin", "--csv", mine["csv"]],
        ["linearity", "no/such-model", "--data", "builtin", "--plot", mine["png"]],
        ["attribute", "no/such-model", "--text", "hi", "--json", mine["json"]],
        ["attribute", "no/such-model", "--text", "hi", "--plot", mine["png"]],
        ["eval", "no/such-model", "--data", "mine=builtin", "--out", tmp_path],  # a plot's name
    ]
    (tmp_path / "residual_norms_mine.png").write_text("the user's own file\n")
    project = tmp_path / "project"  # a folder of the user's: linearize would put a model in it
    project.mkdir()
    (project / "tokenizer.json").write_text("the user's own file\n")
    cases.append(["linearize", "no/such-model", "--out", project])
    for args in cases:
        code, err = run_main(capsys, *args)
        line = one_error_line(code, err)
        assert "is not a noln report" in line or "is not a noln linearize output" in line, line
        assert "no/such-model" not in line, line
    assert all(p.read_text() == "the user's own file\n" for p in mine.values())
    assert (tmp_path / "residual_norms_mine.png").read_text() == "the user's own file\n"
    assert (project / "tokenizer.json").read_text() == "the user's own file\n"


def test_a_hellaswag_limit_without_hellaswag_is_refused(capsys, tmp_path):
    """--hellaswag-limit alone limited nothing and was ignored without a word; it is one line
    before any model loads (the model here does not exist)."""
    for args in (["eval", "no/such-model", "--data", "builtin"],
                 ["compare", "a", "b", "c", "--data", "builtin"],
                 ["remove", "no/such-model", "--data", "builtin", "--out", tmp_path / "run"],
                 ["remove", "no/such-model", "--data", "builtin", "--out", tmp_path / "run",
                  "--control"]):
        code, err = run_main(capsys, *args, "--hellaswag-limit", "5")
        one_error_line(code, err, "--hellaswag-limit limits --hellaswag, which is not given")
    assert not (tmp_path / "run").exists()


def test_two_outputs_naming_one_path_are_refused_before_loading(capsys, tmp_path):
    """Two output flags on one path (or a file where another flag puts its folder) used to be
    found only when the second report met the first, after the work, with a message about a
    folder; now one line names both flags before any model loads."""
    x = tmp_path / "x"
    cases = [
        (["eval", "no/such-model", "--data", "builtin", "--json", x, "--out", x],
         "is the folder --out writes into"),
        (["compare", "a", "b", "c", "--data", "builtin", "--json", x / "comparison.json",
          "--out", x], "is a file --out writes too"),
        (["eval", "no/such-model", "--data", "builtin", "--json", x / "r.json",
          "--out", x / "r.json" / "deeper"], "is the folder --out writes into"),
        (["linearity", "no/such-model", "--data", "builtin", "--json", x, "--csv", x],
         "--json and --csv both name"),
        (["linearity", "no/such-model", "--data", "builtin", "--csv", x,
          "--plot", tmp_path / "." / "x"], "--csv and --plot both name"),
        (["attribute", "no/such-model", "--text", "hi", "--json", x, "--plot", x],
         "--plot and --json both name"),
    ]
    for args, needle in cases:
        code, err = run_main(capsys, *args)
        line = one_error_line(code, err, needle)
        assert "no/such-model" not in line, line
    assert not x.exists()


def test_remove_refuses_a_ctx_past_the_models_context(capsys, tiny_model_dir, text_jsonl,
                                                     tmp_path):
    """It was cut to the model's 64 while config.yaml kept 1000."""
    args = [a for a in RUN_ARGS if a not in ("--ctx", "64")]
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out",
                         tmp_path / "run", *args, "--ctx", "1000")
    one_error_line(code, err, "--ctx 1000 is longer than the model's context of 64",
                   "--ctx 64 or less")
    assert not (tmp_path / "run").exists()


def test_a_misspelt_gap_role_is_refused_and_a_stage_past_the_end_noted(capsys, tiny_model_dir,
                                                                 text_jsonl, tmp_path):
    """A misspelt role was ignored (its sites got a gap of 1)."""
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out",
                         tmp_path / "run", *RUN_ARGS, "fixed.gaps.mlp_inn=3")
    one_error_line(code, err, "unknown site role 'mlp_inn' in fixed.gaps", "mlp_in")
    assert not (tmp_path / "run").exists()  # refused before training, its folder removed
    # a stage past the end is not refused (a run may be lengthened to it later): it is noted
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out",
                         tmp_path / "run", *RUN_ARGS, "stages=[{step: 12, set: {lr: 1e-4}}]")
    assert code == 0 and "note: the stage at step 12 is at or past the run's end" in err, err


def test_inputs_found_wrong_by_an_audit_are_refused_before_any_weights_load(
        capsys, monkeypatch, tiny_model_dir, text_jsonl, tmp_path):
    """A bad-input audit found these refused only after a model had loaded (or, for a
    misspelt gap role under the default adaptive schedule, never): each is now one line
    before any weights are read, which the patched loaders below would make fail loudly."""
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was refused")

    monkeypatch.setattr(noln.remove, "load_pretrained", no_loading)
    monkeypatch.setattr(noln.evaluate.inputs, "load_model", no_loading)
    monkeypatch.setattr(noln.loading, "load_model", no_loading)  # (linearize imports it late)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # so 'models/gone' is a misspelt path, not a Hub repo
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    tiny_text = tmp_path / "tiny.jsonl"
    tiny_text.write_text(json.dumps({"text": "a few words"}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    plan = tmp_path / "plan.yaml"  # the tiny model has 2 blocks
    plan.write_text("events:\n  - {step: 2, site: blocks.0.mlp_in}\n"
                    "  - {step: 4, site: blocks.7.mlp_in}\n")
    args = [a for a in RUN_ARGS if a not in ("--schedule", "fixed", "--ctx", "64")]
    remove = ["remove", tiny_model_dir, "--data", text_jsonl, *args]
    cases = [
        ([*remove, "--out", "run", "--ctx", "1000"], "longer than the model's context of 64"),
        ([*remove, "--out", "run", "fixed.gaps.foo=3"], "unknown site role 'foo' in fixed.gaps"),
        ([*remove, "--out", a_file], "is a file, not a folder"),
        # the data: read with the tokenizer before the weights (a big model loads for minutes)
        (["remove", tiny_model_dir, "--data", tiny_text, *args, "--out", "run"],
         "fewer than one block of 64"),
        (["remove", tiny_model_dir, "--data", broken, *args, "--out", "run"],
         "broken.jsonl:2 is not valid JSON"),
        (["remove", tiny_model_dir, "--data", text_jsonl, "--tokens", str(10**12), "--batch-size",
          "4", "--quiet", "--out", "run"], "passes over the"),
        (["remove", tiny_model_dir, "--data", text_jsonl, "--eval-data", broken, *args, "--out",
          "run"], "broken.jsonl:2 is not valid JSON"),
        # the schedule against the model's sites: from its config, no weights (`noln sites` too)
        ([*remove, "--out", "run", "--schedule", plan],
         "schedule names site 'blocks.7.mlp_in', which this model does not have"),
        ([*remove, "--out", "run", "--taper", "40"], "--taper 40 does not fit"),
        (["remove", text_jsonl, "--data", text_jsonl, *args, "--out", "run"],
         "is a file, not a model"),
        (["eval", tiny_model_dir, "--data", text_jsonl, "--reference", "models/gone"],
         "model 'models/gone' does not exist"),
        (["compare", tiny_model_dir, tiny_model_dir, "models/gone", "--data", text_jsonl],
         "model 'models/gone' does not exist"),
        (["eval", tiny_model_dir, text_jsonl, "--data", text_jsonl], "is a file, not a model"),
        (["eval", "", "--data", text_jsonl], "a model name is empty"),  # (was read as '.')
        (["eval", tiny_model_dir, "--data", "x="], "names a source 'x' but gives none"),
        (["linearize", tiny_model_dir, "--out", "run", "--layers", "abc", "--data", text_jsonl],
         "--layers 'abc' is neither 'auto' nor"),
        # block indices past the model's depth: from its config (the tiny model has 2 blocks)
        (["linearize", tiny_model_dir, "--out", "run", "--layers", "5", "--data", text_jsonl],
         "--layers"),
        (["linearity", tiny_model_dir, "--layers", "0,5", "--data", text_jsonl],
         "layer 5 requested but the model has 2 blocks"),
        (["linearity", tiny_model_dir, "--compare", tiny_model_dir, "--layers", "3", "--data",
          text_jsonl], "model has 2 blocks"),
    ]
    for command, needle in cases:
        code, err = run_main(capsys, *command)
        one_error_line(code, err, needle)
    assert not (tmp_path / "run").exists()
    code, listed = run_main(capsys, "sites", tiny_model_dir, out=True)
    assert code == 0 and listed.split()[-2:] == [str(len(listed.splitlines()) - 1), "final"]
    assert a_file.read_text() == "mine"


def test_sites_lists_a_presets_order_and_refuses_a_preset_for_a_run(capsys, tiny_model_dir,
                                                                     finished_run):
    """``noln sites MODEL --preset P``: the order a run from that preset removes in (SmolLM2's:
    every MLP input, then block by block the two attention inputs); a run folder has its own
    order, so --preset with one, or a preset noln lacks, is one line."""
    code, listed = run_main(capsys, "sites", tiny_model_dir, "--preset",
                            "HuggingFaceTB/SmolLM2-135M", out=True)
    assert code == 0
    assert [line.split()[1] for line in listed.splitlines()] == [
        "blocks.0.mlp_in", "blocks.1.mlp_in", "blocks.0.attn_in_qk", "blocks.0.attn_in_v",
        "blocks.1.attn_in_qk", "blocks.1.attn_in_v", "final"]
    code, err = run_main(capsys, "sites", finished_run, "--preset", "gpt2")
    one_error_line(code, err, "--preset is for a model; a run folder removes in its own order")
    code, err = run_main(capsys, "sites", tiny_model_dir, "--preset", "smol")
    one_error_line(code, err, "--preset smol: no such preset")


def test_a_models_depth_is_read_from_its_config_whatever_noln_name_it_has(finished_run,
                                                                          tiny_model_dir):
    """What the linearity commands check --layers against before any weights load."""
    from noln.loading import model_depth

    assert model_depth(tiny_model_dir) == 2
    assert model_depth(finished_run) == 2  # a run folder: its base/ config
    assert model_depth(finished_run / "checkpoints" / "last.pt") == 2


def test_a_figure_in_a_format_matplotlib_cannot_write_is_refused_before_loading(capsys):
    for command in (["linearity", "no/such-model", "--data", "builtin"],
                    ["attribute", "no/such-model", "--text", "hi"]):
        code, err = run_main(capsys, *command, "--plot", "figure.txt")
        line = one_error_line(code, err, "--plot 'figure.txt': a figure is written as", "png")
        assert "no/such-model" not in line


def test_linearity_names_a_missing_compare_model_before_profiling_the_first(
        capsys, tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["linearity", str(tiny_model_dir), "--data", "builtin", "--compare",
              str(tmp_path / "gone")])
    captured = capsys.readouterr()
    one_error_line(stop.value.code, captured.err, "gone' does not exist")
    assert "Linearity of" not in captured.out  # no table: nothing was profiled


def test_reports_never_land_in_a_model_or_run_folder(capsys, finished_run, tiny_model_dir,
                                                     tmp_path):
    """eval / compare --out beside a model's files (a later load reads that folder) or in a
    run (whose own comparison.json the report would replace): refused before loading."""
    lin = tmp_path / "lin"
    lin.mkdir()
    (lin / "linearize.json").write_text("{}")
    from noln.linearity.replace import META_FILE

    (lin / META_FILE).write_text("{}")
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "m.gguf").write_bytes(b"GGUF")
    for folder, kind in [(tiny_model_dir, "a model"), (finished_run, "a noln run folder"),
                         (lin, "a noln linearize output"), (gguf, "a model")]:
        before = sorted(p.name for p in Path(folder).iterdir())
        for command in (["eval", "no/such-model"], ["compare", "a", "b", "c"]):
            code, err = run_main(capsys, *command, "--data", "builtin", "--out", folder)
            one_error_line(code, err, f"holds {kind}", "a folder of their own")
        assert sorted(p.name for p in Path(folder).iterdir()) == before
    code, err = run_main(capsys, "linearize", tiny_model_dir, "--data", "builtin", "--out",
                         tiny_model_dir)
    one_error_line(code, err, "is the model it reads")
    reports = tmp_path / "reports"  # a user's folder of other things is fine
    reports.mkdir()
    (reports / "notes.md").write_text("mine")
    from noln.evaluate.inputs import check_options

    check_options(out=reports, out_files=["comparison.md"])


def test_a_run_still_training_says_which_step_it_is_read_at(capsys, tiny_model_dir, text_jsonl,
                                                            tmp_path):
    """eval / export / linearity of a run that has not finished read its last checkpoint: the
    command says which step that is (and of how many), on stderr; a finished run says
    nothing."""
    import shutil

    run = tmp_path / "run"
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out", run,
                         *RUN_ARGS, "checkpoint_keep=4")
    assert code == 0, err
    code, err = run_main(capsys, "eval", run, "--data", text_jsonl, "--tokens", "256",
                         "--quiet")
    assert code == 0 and "has not finished" not in err and "note:" not in err, err
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "complete": False}))
    code, err = run_main(capsys, "eval", run, "--data", text_jsonl, "--tokens", "256",
                         "--quiet")  # a run that ended with sites still live
    assert code == 0 and f"the run '{run}' ended unfinished (" in err, err
    (run / "summary.json").unlink()  # as a run still training (or stopped) looks
    shutil.copy(run / "checkpoints" / "step-8.pt", run / "checkpoints" / "last.pt")
    code, err = run_main(capsys, "eval", run, "--data", text_jsonl, "--tokens", "256",
                         "--quiet")
    assert code == 0, err
    assert f"the run '{run}' has not finished: it is read as saved at step 8 of 12" in err, err
    code, err = run_main(capsys, "linearity", run / "checkpoints" / "step-4.pt", "--data",
                         text_jsonl, "--tokens", "256", "--ctx", "64", "--no-geometry")
    assert code == 0, err
    assert "was saved at step 4 of 12" in err, err
    saved = torch.load(run / "checkpoints" / "step-4.pt", weights_only=True)
    assert saved["total_steps"] == 12  # the run's length, as the trainer resolved it
    del saved["total_steps"]  # a checkpoint from before noln saved it: read from its config
    torch.save(saved, run / "checkpoints" / "step-5.pt")
    assert "was saved at step 4 of 12 " in checkpoint_note(run / "checkpoints" / "step-5.pt")
    saved["config"] = {**saved["config"], "ctx": None, "tokens": None, "steps": 12}
    torch.save(saved, run / "checkpoints" / "step-5.pt")  # (a length in steps, the model's ctx)
    assert "was saved at step 4 of 12 " in checkpoint_note(run / "checkpoints" / "step-5.pt")
    code, err = run_main(capsys, "export", run, "--out", tmp_path / "exported")
    assert code == 0, err
    assert "it is read as saved at step 8 of 12" in err, err
    assert "Writing model shards" not in err, err  # transformers' own bar: noise here
    # a torn last.pt (a copy cut short, a full disk): loading falls back to prev.pt, which
    # is an earlier step, and says so (export read the earlier step without a word)
    shutil.copy(run / "checkpoints" / "step-4.pt", run / "checkpoints" / "prev.pt")
    whole = (run / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(whole[:1000])
    code, err = run_main(capsys, "eval", run, "--data", text_jsonl, "--tokens", "256",
                         "--quiet")
    assert code == 0, err
    assert "last.pt' is unreadable (torn or truncated)" in err, err
    assert "read from prev.pt, saved at step 4 of 12" in err, err
    # and --resume, which goes on from there (it did so without a word)
    code, said = run_main(capsys, "remove", "--resume", run, "--quiet")
    said = " ".join(said.split())
    assert code == 0 and "is resumed from prev.pt, saved at step 4 of 12" in said, said


def test_a_model_name_that_does_not_load_says_why(capsys, monkeypatch):
    """A name that is no local path and did not come from the Hub: one line that tells a typo
    (no such model), a gated model, the Hub switched off (HF_HUB_OFFLINE, as in these tests)
    and an unreachable Hub apart, read from the error huggingface_hub raised."""
    code, err = run_main(capsys, "eval", "gtp2", "--data", "builtin")  # offline here: no wait
    one_error_line(code, err, "model 'gtp2' is neither a local path nor in the Hub cache, and "
                   "HF_HUB_OFFLINE")

    def failing(cause):
        def from_pretrained(name, **kwargs):
            if cause is None:
                raise OSError("We couldn't connect to 'https://huggingface.co'")
            error = cause.__new__(cause)  # (its __init__ wants an HTTP response)
            raise OSError(f"{name} is not a local folder") from error
        return from_pretrained

    for cause, offline, needle in (
            (RepositoryNotFoundError, False, "neither a local path nor a model on the Hugging "
             "Face Hub: check the spelling"),
            (GatedRepoError, False, "is a gated model on the Hugging Face Hub"),
            (None, False, "the Hugging Face Hub is not reachable (offline?)"),
            (HFValidationError, False, "is neither a local path nor a valid Hugging Face Hub "
             "id: check it"),
            (EntryNotFoundError, False, "cannot load model 'org/gtp2' from the Hugging Face Hub "
             "(org/gtp2 is not a local folder): check the name")):
        monkeypatch.setattr(pretrained.AutoConfig, "from_pretrained", failing(cause))
        monkeypatch.setattr(pretrained.hf_constants, "HF_HUB_OFFLINE", offline)
        with pytest.raises(NolnError, match=re.escape(needle)):
            pretrained.load_config("org/gtp2")


@pytest.mark.hub_resolver
def test_a_hub_whose_name_does_not_resolve_is_read_from_its_cache_at_once(
        capsys, monkeypatch, tmp_path, tiny_model_dir):
    """Where the Hub's host name does not resolve (no network) and no proxy is set, noln reads
    only the Hub cache, as HF_HUB_OFFLINE=1 would: a cached model still loads, and an uncached
    one is one line at once that says why, not ~25 s of the Hub client's retries per file."""
    import socket
    import time

    import datasets
    from huggingface_hub import constants as hf_constants

    import noln.hub as hub

    # the resolver's answer decides, and a proxy (which resolves names itself) overrides it
    answers: dict[str, socket.gaierror] = {}
    asked: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        asked.append(host)
        if host in answers:
            raise answers[host]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 443))]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for variable in [v for v in os.environ if v.lower().endswith("_proxy")]:
        monkeypatch.delenv(variable)
    for resolves, proxy, bypass, expected in (
            (False, None, None, "huggingface.co"), (True, None, None, None),
            (False, ("Https_Proxy", "http://proxy:3128"), None, None),
            (False, ("all_proxy", "socks5://proxy:1080"), None, None),
            (False, ("HTTPS_PROXY", "http://proxy:3128"), "huggingface.co", "huggingface.co")):
        answers.clear()
        if not resolves:
            answers["huggingface.co"] = socket.gaierror(socket.EAI_NONAME, "no such name")
        if proxy:
            monkeypatch.setenv(*proxy)
        if bypass:  # (NO_PROXY: the Hub is asked directly, so the resolver decides)
            monkeypatch.setenv("NO_PROXY", bypass)
        hub.unresolved_host.cache_clear()
        assert hub.unresolved_host() == expected, (proxy, bypass)
        for variable in [v for v in os.environ if v.lower().endswith("_proxy")]:
            monkeypatch.delenv(variable)

    # unresolved: a model in the Hub cache loads, one not there is an error at once
    answers["huggingface.co"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure")
    hub.unresolved_host.cache_clear()
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    asked.clear()
    assert pretrained.load_config("org/tiny").n_layer == 2
    assert hf_constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    started = time.monotonic()
    with pytest.raises(NolnError, match=re.escape(
            "cannot load model 'org/gtp2': it is not a local path nor in the Hub cache, and the "
            "Hugging Face Hub is not reachable (its name huggingface.co does not resolve: "
            "offline?)")):
        pretrained.load_config("org/gtp2")
    assert time.monotonic() - started < 10
    assert asked == ["huggingface.co"]  # noln's one question; the Hub client asked nothing
    with pytest.raises(NolnError, match=re.escape(
            "cannot load the tokenizer of 'org/gtp2': it is not in the Hub cache, and the "
            "Hugging Face Hub is not reachable (its name huggingface.co does not resolve")):
        pretrained.load_tokenizer("org/gtp2")
    # a config cached without its weights (`noln sites` reads only the config)
    config_only = cache / "models--org--bare" / "snapshots" / ("1" * 40)
    config_only.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", config_only)
    (cache / "models--org--bare" / "refs").mkdir()
    (cache / "models--org--bare" / "refs" / "main").write_text("1" * 40)
    with pytest.raises(NolnError, match=re.escape(
            "cannot load the weights of 'org/bare': its config is in the Hub cache but its "
            "weights are not, and the Hugging Face Hub is not reachable")):
        pretrained.load_pretrained("org/bare")
    hub.unresolved_host.cache_clear()


def test_status_says_where_a_run_stands_without_loading_it(capsys, tiny_model_dir, text_jsonl,
                                                           tmp_path):
    """`noln status RUN`: finished, stopped (with the command that continues it) or training
    now (its lock's PID), step of steps, sites frozen, recent loss and pace, time left,
    stages; for a pair, its control and whether the table is made. One line for a folder
    that is no run."""
    import shutil

    run = tmp_path / "run"
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out", run,
                         *RUN_ARGS, "checkpoint_keep=4", "stages=[{step: 6, set: {lr: 0.0005}}]")
    assert code == 0, err
    sites = len(json.loads((run / "summary.json").read_text())["frozen"])
    code, out = run_main(capsys, "status", run, out=True)
    assert code == 0, out
    assert f"{run}: removal, finished, at step 12 of 12 (100%)" in out, out
    assert f"{sites} of {sites} norm sites frozen" in out and "held-out CE" in out, out
    assert "stage at step 6 (lr=0.0005): done" in out and "to go" not in out, out
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # its process holds the pair's folder still (it trains the control): finished
        lock = run / ".noln.lock"
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        written = (run / "summary.json").stat().st_mtime
        os.utime(lock, (written - 60, written - 60))  # taken before the summary was written
        code, out = run_main(capsys, "status", run, out=True)
        assert f"{run}: removal, finished, at step 12 of 12" in out, out
        os.utime(lock, (written + 60, written + 60))  # taken since: a resume (lengthened)
        code, out = run_main(capsys, "status", run, out=True)
        assert f"{run}: removal, training now (PID {holder.pid})" in out, out
    finally:
        holder.kill()
        holder.wait()
        (run / ".noln.lock").unlink()
    log = (run / "log.jsonl").read_text()
    (run / "log.jsonl").write_text(log[:len(log) // 3])  # a log torn short: the summary's end
    code, out = run_main(capsys, "status", run, out=True)
    assert code == 0 and f"{run}: removal, finished, at step 12 of 12" in out, out
    (run / "log.jsonl").write_text(log)
    (run / "summary.json").write_text('{"torn')  # (killed while writing it)
    code, out = run_main(capsys, "status", run, out=True)
    assert code == 0 and f"{run}: removal, finished, at step 12 of 12" in out, out
    # stopped at step 8: its checkpoint, its log up to step 10 (killed between checkpoints;
    # a resume goes on from step 8)
    (run / "summary.json").unlink()
    shutil.copy(run / "checkpoints" / "step-8.pt", run / "checkpoints" / "last.pt")
    lines = (run / "log.jsonl").read_text().splitlines(keepends=True)
    (run / "log.jsonl").write_text("".join(
        line for line in lines if json.loads(line).get("step", 0) < 10))
    code, out = run_main(capsys, "status", run, out=True)
    assert f"{run}: removal, stopped, at step 8 of 12 (67%)" in out, out
    assert "last checkpoint at step 8" in out and "under a minute to go" in out, out
    assert f"continue it with `noln remove --resume {run}`" in out, out
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live process holds the lock: training now
        (run / ".noln.lock").write_text(json.dumps({"pid": holder.pid,
                                                    "host": socket.gethostname()}))
        code, out = run_main(capsys, "status", run, out=True)
        # (at work: it has logged past its checkpoint)
        assert f"training now (PID {holder.pid}), at step 10 of 12" in out, out
        assert "last checkpoint at step 8" in out, out
        assert "continue it with" not in out, out
    finally:
        holder.kill()
        holder.wait()
        (run / ".noln.lock").unlink()
    # as a pair: a control beside it (here the same run, read as the control)
    shutil.copytree(run, run / "control", ignore=shutil.ignore_patterns("control"))
    config = run / "control" / "config.yaml"
    config.write_text(config.read_text() + "keep_ln: true\n")
    code, out = run_main(capsys, "status", run, out=True)
    assert f"continue it with `noln remove --resume {run} --control`" in out, out
    assert f"{run / 'control'}: with-norm control, stopped, at step 8 of 12" in out, out
    assert f"continue it with `noln remove --resume {run} --control-only`" in out, out
    assert "table: not yet (made once both runs are done)" in out, out
    assert out.count("norm sites frozen") == 1, out  # not said of the control
    code, out = run_main(capsys, "status", run / "control", out=True)  # asked by its folder
    assert f"continue it with `noln remove --resume {run} --control-only`" in out, out
    alone = tmp_path / "ctl"  # a control of its own (`--keep-ln`), not a pair's: resumed as is
    shutil.copytree(run / "control", alone)
    code, out = run_main(capsys, "status", alone, out=True)
    assert f"{alone}: with-norm control, stopped" in out, out
    assert f"continue it with `noln remove --resume {alone}`" in out, out
    code, err = run_main(capsys, "status", tmp_path)
    one_error_line(code, err, "is not a noln run folder")
    code, err = run_main(capsys, "status", tmp_path / "gone")
    one_error_line(code, err, "does not exist")
    code, err = run_main(capsys, "status", run / "log.jsonl")
    one_error_line(code, err, "is a file, not a run folder")
    pre = tmp_path / "pre"  # a pretraining run: no config.yaml, its checkpoint says what it is
    code, err = run_main(capsys, "pretrain", "--data", "builtin", "--out", pre, "--layers", "1",
                         "--d-model", "32", "--steps", "3", "--quiet")
    assert code == 0, err
    code, out = run_main(capsys, "status", pre, out=True)
    assert f"{pre}: pretraining, finished, at step 3 of 3 (100%)" in out, out
    code, err = run_main(capsys, "remove", "--resume", pre)  # not a removal: what goes on with it
    one_error_line(code, err, f"'{pre}' is a `noln pretrain` run (checkpoints, no config.yaml): "
                   f"continue it with `noln pretrain --resume --data SOURCE --out {pre}`")
    assert "gpt2 on builtin" in out and "norm sites" not in out, out


def test_a_missing_data_file_is_named_before_any_model_loads(capsys, tmp_path):
    """Every command that reads text checks its local sources first: the model here does not
    exist, so an error about the data file shows it was checked before the model was looked at
    (a removal used to load and dequantise a GGUF before finding --data missing)."""
    gone = str(tmp_path / "gone.jsonl")
    here = str(tmp_path / "here.jsonl")
    Path(here).write_text('{"text": "a b c"}\n')
    cases = [
        ["eval", "no/such-model", "--data", f"val={gone}"],
        ["compare", "a", "b", "c", "--data", gone],
        ["linearity", "no/such-model", "--data", gone],
        ["linearize", "no/such-model", "--data", gone, "--out", tmp_path / "lin"],
        ["linearize", "no/such-model", "--data", here, "--eval-data", gone,
         "--out", tmp_path / "lin"],
        ["remove", "no/such-model", "--data", gone, "--out", tmp_path / "run"],
        ["remove", "no/such-model", "--data", here, "--eval-data", gone, "--out", tmp_path / "run"],
        ["remove", "no/such-model", "--data", here, "--eval", f"wiki={gone}",
         "--out", tmp_path / "run"],
    ]
    for args in cases:
        code, err = run_main(capsys, *args)
        line = one_error_line(code, err, "gone.jsonl", "does not exist")
        assert "no/such-model" not in line, (args, line)
    assert not (tmp_path / "run").exists() and not (tmp_path / "lin").exists()


def test_a_hub_dataset_the_hub_does_not_have_is_named_before_any_model_loads(
        capsys, tmp_path, monkeypatch, tiny_model_dir):
    """A Hub dataset name the Hub says does not exist (a typo), is gated, is no valid name, or
    lacks the config or split asked for, is one line before any model is looked at, from
    every command that reads text. A Hub that cannot answer (offline), or another complaint,
    leaves it to the read; a source read before (cached) is not asked about, nor one asked
    about already in this process."""
    from types import SimpleNamespace

    import datasets

    asked = []

    def builder(name, config=None):
        asked.append((name, config))
        if " " in name:
            raise HFValidationError("Repo id must use alphanumeric chars")
        if name == "opnwebtext":
            raise DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        if name == "org/gated":
            # (as datasets raises it: its cause dropped, `raise e1 from None`)
            raise DatasetNotFoundError(f"Dataset '{name}' is a gated dataset on the Hub. Visit "
                                       "the dataset page to ask for access.") from None
        if config == "nope":
            raise ValueError("BuilderConfig 'nope' not found. Available: ['raw', 'clean']")
        if name == "wikitext" and config is None:
            raise ValueError("Config name is missing. Please pick one among the available "
                             "configs: ['raw', 'clean']")
        if name == "org/odd":
            raise ValueError("Couldn't infer the same data file format for all splits")
        if name == "org/books":
            return SimpleNamespace(info=SimpleNamespace(splits={"train": 1, "test": 1}))
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # (the tests run offline)
    monkeypatch.setattr(noln.data, "_UNREACHABLE", {})
    monkeypatch.setattr(noln.data, "_ASKED", set())
    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    for args in (["eval", "no/such-model", "--data", "val=opnwebtext"],
                 ["compare", "a", "b", "c", "--data", "opnwebtext"],
                 ["linearity", "no/such-model", "--data", "opnwebtext"],
                 ["remove", "no/such-model", "--data", "opnwebtext", "--out", tmp_path / "run"]):
        code, err = run_main(capsys, *args)
        line = one_error_line(code, err, "dataset 'opnwebtext' is not on the Hugging Face Hub "
                              "(nor a local path): check the name")
        assert "no/such-model" not in line, (args, line)
    for source, needle in (
            ("wikitext:nope", "dataset 'wikitext' has no config 'nope' (BuilderConfig 'nope' "
             "not found. Available: ['raw', 'clean']): give one as wikitext:CONFIG"),
            ("wikitext", "dataset 'wikitext' has several configs (Config name is missing."),
            ("my corpus", "'my corpus' is neither a local path nor a Hugging Face dataset name"),
            ("org/gated", "dataset 'org/gated' is gated on the Hugging Face Hub: ask for access "
             "at https://huggingface.co/datasets/org/gated and log in (`hf auth login`)")):
        code, err = run_main(capsys, "eval", "no/such-model", "--data", source)
        one_error_line(code, err, needle)
    code, err = run_main(capsys, "eval", "no/such-model", "--data", "org/odd")
    one_error_line(code, err, "model 'no/such-model'")  # another complaint: the read says it
    code, err = run_main(capsys, "eval", "no/such-model", "--data", "org/books", "--split",
                         "validation")
    one_error_line(code, err, "dataset 'org/books' has no split 'validation': it has test, "
                   "train; choose one with --split")
    code, err = run_main(capsys, "compare", "a", "b", "c", "--data", "org/books", "--split",
                         "test")
    one_error_line(code, err, "model 'a'")  # a split it has: on to the models
    for _ in range(2):  # asked once
        code, err = run_main(capsys, "eval", "no/such-model", "--data", "wikitext:raw")
        one_error_line(code, err, "model 'no/such-model'")  # no answer: on to the model
    assert asked.count(("wikitext", "raw")) == 1 and not (tmp_path / "run").exists()
    marker = noln.data._hub_read_marker("org/cached", "train")  # as a read leaves it
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    code, err = run_main(capsys, "eval", "no/such-model", "--data", "org/cached")
    one_error_line(code, err, "model 'no/such-model'")
    assert ("org/cached", None) not in asked
    # ... and the read, needing the Hub, gives that answer at once (no second round of retries)
    reads = []

    def load_dataset(name, config=None, **kwargs):
        reads.append(name)
        if name == "org/stream":
            return iter([{"text": "a read from the Hub"}])
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(NolnError, match=r"cannot load dataset 'wikitext' \(split 'train'\) "
                       r"from the Hugging Face Hub \(Couldn't reach 'wikitext'"):
        next(noln.data.iter_documents("wikitext:raw"))
    assert reads == []
    # ... for a while: a read some minutes later asks the Hub again
    monkeypatch.setattr(noln.data, "_UNREACHABLE_FOR", 0.0)
    with pytest.raises(NolnError, match="Couldn't reach 'wikitext'"):
        next(noln.data.iter_documents("wikitext:raw"))
    assert reads == ["wikitext"]
    # blocks cached before noln kept its marker: a read from the cache leaves the marker
    tok = load_tokenizer(tiny_model_dir)
    noln.data.load_tokens("org/stream", tok)
    marker = noln.data._hub_read_marker("org/stream", "train")
    marker.unlink()
    noln.data.load_tokens("org/stream", tok)
    assert marker.exists() and reads == ["wikitext", "org/stream"]


def test_control_with_a_missing_hellaswag_fails_before_training(capsys, tiny_model_dir,
                                                                text_jsonl, tmp_path):
    out = tmp_path / "out"
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", text_jsonl, "--out", out,
                         "--control", "--hellaswag", tmp_path / "missing.jsonl", *RUN_ARGS)
    one_error_line(code, err, "missing.jsonl' does not exist")
    assert not out.exists()


# ----------------------------------------------------------------------------- 7. models


def test_non_causal_models_are_refused(capsys, tmp_path):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
               intermediate_size=64, architectures=["BertForMaskedLM"]).save_pretrained(bert)
    for args in (["eval", bert, "--data", "builtin"], ["compare", bert, bert, bert, "--data",
                                                        "builtin"],
                 ["linearity", bert, "--data", "builtin"]):
        code, err = run_main(capsys, *args)
        one_error_line(code, err, "BertForMaskedLM, not a causal language model")


# ----------------------------------------------------------------------------- 8. smaller


@pytest.mark.parametrize("where, sig", [("--out", signal.SIGINT), ("--config", signal.SIGINT),
                                        ("--out", signal.SIGTERM)])
def test_ctrl_c_says_how_to_resume(tiny_model_dir, text_jsonl, tmp_path, where, sig):
    """The hint names the run's folder, wherever it was given (a --config file's `out` too);
    SIGTERM (`kill`, a cluster's scheduler) stops a run as Ctrl-C does."""
    out = tmp_path / "run"
    args = ["remove", tiny_model_dir, "--data", text_jsonl, "--out", out, *RUN_ARGS]
    args[args.index("--steps") + 1] = "400"
    if where == "--config":
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": str(text_jsonl),
                                          "out": str(out)}))
        args = ["remove", "--config", config, *RUN_ARGS]
        args[args.index("--steps") + 1] = "400"
    # a shell's background jobs inherit SIGINT ignored (nohup, `&`): give the child the default
    # handler, as a terminal would, so Python turns the signal into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "noln.cli", *map(str, args)],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "log.jsonl").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"noln remove --resume {out}" in stderr and "Traceback" not in stderr
    assert not (out / ".noln.lock").exists()


def test_the_resume_hint_of_a_control_pair_is_the_whole_command(monkeypatch, tmp_path):
    """A pair stopped by Ctrl-C goes on with its control and HellaSwag table as asked, all
    inside the quoted command, with the step the loop saved; a run stopped before its first
    checkpoint (loading a model, measuring the original) is not told to resume."""
    from noln import cli
    from noln.errors import Interrupted
    from noln.run import RunFolder

    monkeypatch.setattr(cli, "_RUN_FOLDER", {})
    argv = ["remove", "--resume", "runs/smol", "--control", "--hellaswag", "my data/hs.jsonl",
            "--hellaswag-limit", "2000"]
    assert cli._interrupt_hint(argv, Interrupted(1162)) == (
        "interrupted: saved at step 1162; continue it with `noln remove --resume runs/smol "
        "--control --hellaswag 'my data/hs.jsonl' --hellaswag-limit 2000`")
    run = RunFolder(tmp_path / "g")
    argv = ["remove", "gpt2", "--out", str(run.root)]
    assert cli._interrupt_hint(argv, KeyboardInterrupt()) == (
        "interrupted before the run's first checkpoint: nothing was kept; run the same command "
        "again")
    run.last_checkpoint.parent.mkdir(parents=True)
    run.last_checkpoint.write_bytes(b"")
    assert cli._interrupt_hint(argv, KeyboardInterrupt()) == (
        "interrupted: the run keeps its last checkpoint; continue it with `noln remove "
        f"--resume {run.root}`")


def test_ctrl_c_during_a_checkpoint_save_finishes_the_save_first(tmp_path, monkeypatch):
    """torch's zip writer turns a KeyboardInterrupt inside it into a RuntimeError; a Ctrl-C
    during a save is held until the checkpoint is whole, then raised as itself."""
    from noln import checkpoint

    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives mid-save
        time.sleep(0.05)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", interrupted_save)
    # as in a terminal: a suite started in the background (nohup, `&`) inherits SIGINT ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        path = tmp_path / "checkpoints" / "last.pt"
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save_atomic({"model": {"w": torch.ones(3)}, "step": 7}, path)
        assert checkpoint.load_checkpoint(path)["step"] == 7  # whole, in place
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigterm_during_a_checkpoint_save_finishes_the_save_first(tmp_path, monkeypatch):
    """Under the CLI, SIGTERM is Ctrl-C: held during a save, raised after it."""
    from noln import checkpoint
    from noln.errors import raise_interrupt

    real_save = torch.save

    def terminated_save(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", terminated_save)
    before = signal.signal(signal.SIGTERM, raise_interrupt)  # as noln.cli.main installs it
    try:
        path = tmp_path / "checkpoints" / "last.pt"
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save_atomic({"model": {"w": torch.ones(3)}, "step": 7}, path)
        assert checkpoint.load_checkpoint(path)["step"] == 7
        assert signal.getsignal(signal.SIGTERM) is raise_interrupt
    finally:
        signal.signal(signal.SIGTERM, before)


def test_noln_debug_shows_the_whole_chain(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    p = cli("remove", "--config", bad)
    one_error_line(p.returncode, p.stderr, "is not valid YAML")
    p = cli("remove", "--config", bad, env={**os.environ, "NOLN_DEBUG": "1"})
    assert p.returncode == 2 and "Traceback" in p.stderr
    assert "yaml" in p.stderr.lower() and "During handling" in p.stderr  # the hidden cause too


def test_usage_errors_stay_one_line_with_clicks_exit_code(capsys):
    code, err = run_main(capsys, "remove", "--no-such-flag")
    one_error_line(code, err, "--no-such-flag", "noln remove --help")
    code, _ = run_main(capsys, "--help")
    assert code == 0


def test_checkpoints_hold_only_plain_state(finished_run):
    """What a run saves loads with weights_only=True (no numpy scalars, no objects)."""
    ckpt = torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 12 and "ce_before" in ckpt["extra"]


def test_resume_reads_a_setting_added_after_the_run_as_its_default(tmp_path):
    """A run's config.yaml from before a setting existed ran with that setting's default: giving
    the default on --resume changes nothing, another value says what it was."""
    from noln.config import make_config, resume_config

    saved = make_config(model="gpt2", data="builtin", out=str(tmp_path)).model_dump(mode="json")
    del saved["site_aux_power"]
    _, changed, notes = resume_config(tmp_path, saved, {"site_aux_power": 2.0})
    assert changed == {} and "nothing changed" in notes[0]
    _, changed, notes = resume_config(tmp_path, saved, {"site_aux_power": 4.0})
    assert changed == {"site_aux_power": 4.0}
    assert "--site-aux-power 4.0 (was 2.0)" in notes[0] and notes[1].startswith("warning")


def test_resume_keeps_what_each_eval_name_measured(capsys, tmp_path):
    """An --eval set the run already has, named again with another text on --resume, is one
    line: the table pairs the CE before training with the CE after by name, so the two must
    come from the same text. A new name, or the same text again, is taken."""
    from noln.config import make_config, resume_config

    saved = make_config(model="gpt2", data="builtin", out=str(tmp_path),
                        eval_sets={"wiki": "wiki.jsonl"}).model_dump(mode="json")
    with pytest.raises(NolnError, match="--eval wiki=val.jsonl: the run measured 'wiki' on "
                                        "wiki.jsonl before training; give this text another "
                                        "name, e.g. --eval wiki2=val.jsonl"):
        resume_config(tmp_path, saved, {"eval_sets": {"wiki": "val.jsonl"}})
    cfg, _, _ = resume_config(tmp_path, saved, {"eval_sets": {"wiki": "wiki.jsonl",
                                                              "val": "val.jsonl"}})
    assert cfg.eval_sets == {"wiki": "wiki.jsonl", "val": "val.jsonl"}


def test_resume_may_change_probe_every_without_a_warning(tmp_path):
    """``--probe-every`` changes when the schedule looks, not what the run optimises."""
    from noln.config import make_config, resume_config

    saved = make_config(model="gpt2", data="builtin", out=str(tmp_path)).model_dump(mode="json")
    del saved["probe_every"]  # a run from before the setting
    cfg, changed, notes = resume_config(tmp_path, saved, {"probe_every": 3})
    assert changed == {"probe_every": 3} and cfg.probe_every == 3
    assert "--probe-every 3 (was 1)" in notes[0] and len(notes) == 1


def test_resume_may_relax_the_adaptive_schedule_with_a_warning(tmp_path):
    """A run held by its ``adaptive.max_rise`` budget can go on with another budget: the key
    given replaces the run's, the other adaptive settings stay, and a warning says the run is
    no longer one experiment. A fixed schedule's settings stay fixed."""
    from noln.config import make_config, resume_config

    saved = make_config(model="gpt2", data="builtin", out=str(tmp_path), schedule="adaptive",
                        adaptive={"max_rise": 0.3, "min_gap": 2}).model_dump(mode="json")
    cfg, changed, notes = resume_config(tmp_path, saved, {"adaptive": {"max_rise": None}})
    assert cfg.adaptive.max_rise is None and cfg.adaptive.min_gap == 2
    assert set(changed) == {"adaptive"} and "warning: setting 'adaptive'" in notes[1]
    assert "setting 'adaptive' {'max_rise': None} (was {'max_rise': 0.3})" in notes[0]
    assert "removals still to come" in notes[1]
    # the run's own value given again: nothing changes, no warning
    cfg, changed, notes = resume_config(tmp_path, saved, {"adaptive": {"min_gap": 2}})
    assert changed == {} and len(notes) == 1 and cfg.adaptive.max_rise == 0.3
    with pytest.raises(NolnError, match="differs from the run's"):
        resume_config(tmp_path, saved, {"fixed": {"finish_by": 0.5}})


def a_good_checkpoint(tmp_path: Path) -> tuple[Path, bytes]:
    """A run's last.pt of step 1, written by noln, and its bytes."""
    import noln.checkpoint as checkpoint

    last = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_atomic({"step": 1}, last)
    return last, last.read_bytes()


def torn_save(obj, f) -> None:
    """torch.save as it fails on a full disk: part of the file written, then its zip error."""
    f.write(b"x" * 1000)
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 900")


def test_a_checkpoint_write_that_fails_names_the_full_disk_and_removes_its_partial_file(
        tmp_path, monkeypatch):
    """SmolLM2's 1.6 GB checkpoints filled a disk mid-run: torch's zip writer raised
    "unexpected pos ..." and the user got an internal error with a partial last.pt.tmp left
    behind. Now: one line saying the disk is full and which checkpoint is still good, and the
    partial file (noln's own) removed; last.pt untouched."""
    from collections import namedtuple

    import noln.checkpoint as checkpoint

    last, good = a_good_checkpoint(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 400_000, 400_000))
    with pytest.raises(NolnError) as info:
        checkpoint.save_atomic({"step": 2}, last)
    message = str(info.value)
    assert "\n" not in message and "the disk is full" in message
    assert f"the last good checkpoint is kept at '{last}'" in message and "--resume" in message
    assert not last.with_name("last.pt.tmp").exists() and last.read_bytes() == good
    # on a disk with room, the same failure is not blamed on space
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**13, 0, 10**13))
    with pytest.raises(NolnError) as info:
        checkpoint.save_atomic({"step": 2}, last)
    assert "disk is full" not in str(info.value) and "unexpected pos" in str(info.value)


def test_a_checkpoint_is_written_without_torchs_crc32_and_reads_back_the_same(tmp_path):
    """torch's CRC32 of each zip record costs 0.7 s of CPU a 1.6 GB SmolLM2 save (against 0.02 s
    to serialise without it) and torch.load never checks it: noln writes without it, only inside
    its own save (a user's torch.save elsewhere in the process is as torch sets it)."""
    import zipfile

    import noln.checkpoint as checkpoint

    if checkpoint.serialization_config is None:
        pytest.skip(f"torch {torch.__version__} always writes the CRC32 (the switch is >= 2.6)")
    last = tmp_path / "checkpoints" / "last.pt"
    weights = torch.randn(64, 64)
    checkpoint.save_atomic({"model": {"w": weights}, "step": 3}, last)
    records = [r for r in zipfile.ZipFile(last).infolist() if "/data/" in r.filename]
    assert records and all(r.CRC == 0 for r in records)
    ckpt = checkpoint.load_checkpoint(last)
    assert ckpt["step"] == 3 and torch.equal(ckpt["model"]["w"], weights)
    assert checkpoint.serialization_config.save.compute_crc32  # torch's own default, restored
    torch.save({"w": weights}, tmp_path / "users.pt")
    assert all(r.CRC != 0 for r in zipfile.ZipFile(tmp_path / "users.pt").infolist()
               if "/data/" in r.filename)


def test_a_background_checkpoint_is_the_state_as_it_was_handed_over(tmp_path):
    """The loop's checkpoints go to disk on a thread while training goes on (the disk's ~9 s
    a SmolLM2 save on this CPU box): what lands is the state at the save, not as the next
    steps change it in place (weights, AdamW's moments, the run's lists)."""
    import noln.checkpoint as checkpoint

    writer = checkpoint.CheckpointWriter()
    weights, replay = torch.zeros(256, 256), [1, 2]
    last = tmp_path / "checkpoints" / "last.pt"
    kept = []
    writer.write({"model": {"w": weights}, "state": {"replay": replay}, "step": 5}, last,
                 then=lambda: kept.append(last.exists()))
    weights.add_(1.0)  # the next optimizer step, in place
    replay.append(3)
    writer.wait()
    ckpt = checkpoint.load_checkpoint(last)
    assert ckpt["step"] == 5 and ckpt["state"]["replay"] == [1, 2]
    assert torch.equal(ckpt["model"]["w"], torch.zeros(256, 256))
    assert kept == [True]  # `then` (the kept step's link) runs once the file is there
    copy = checkpoint.snapshot({"a": [weights], "b": (replay,)})
    weights.add_(1.0)
    replay.append(4)
    assert torch.equal(copy["a"][0], torch.ones(256, 256)) and copy["b"] == ([1, 2, 3],)


def test_a_background_checkpoint_that_fails_is_the_next_waits_one_line_error(tmp_path,
                                                                            monkeypatch):
    """A write that fails on its thread (a full disk) is raised where the run next waits for
    it, as the same one-line error a write in the training thread gives; the last good
    checkpoint stays."""
    import noln.checkpoint as checkpoint

    last, good = a_good_checkpoint(tmp_path)
    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    writer = checkpoint.CheckpointWriter()
    writer.write({"step": 2, "w": torch.ones(4)}, last)  # returns: the write is on its thread
    with pytest.raises(NolnError) as info:
        writer.wait()
    assert "\n" not in str(info.value) and "could not write checkpoint" in str(info.value)
    assert f"the last good checkpoint is kept at '{last}'" in str(info.value)
    assert last.read_bytes() == good and not last.with_name("last.pt.tmp").exists()
    writer.wait()  # raised once


def test_a_checkpoint_too_big_for_the_ram_left_is_written_in_the_training_thread(
        tmp_path, monkeypatch):
    """The background write needs a copy of the state in RAM: where twice its size is not
    available it is written as before, in the caller's thread, on disk when write returns."""
    import noln.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "memory_available", lambda: 1000)  # 1 kB free
    writer = checkpoint.CheckpointWriter()
    last = tmp_path / "last.pt"
    writer.write({"model": {"w": torch.ones(1000)}, "step": 3}, last)  # 4 kB of tensors
    assert writer._thread is None and checkpoint.load_checkpoint(last)["step"] == 3
    assert writer.writes == {"training thread": 1}  # (summary.json's checkpoint_writes)


@pytest.mark.parametrize("stages, needle", [
    ("[{step: 4, set: {ctx: 32}}]", "stages: at step 4: 'ctx' is fixed for the whole run"),
    ("[{step: 8, set: {lr: 1.0e-4}}, {step: 4, set: {lr: 2.0e-4}}]",
     "stages at steps [8, 4]: give each step once, in rising order"),
    ("[{step: 4, set: {stages: []}}]", "'stages' is fixed for the whole run"),
    ("[{step: 0, set: {lr: 0.1}}]", "'stages.0.step' = 0 is invalid: must be >= 1"),
    ("[{step: 4, set: {lr: -1}}]", "stages: at step 4: --lr -1 is invalid: must be > 0"),
    ("[{step: 4, set: {bogus: 1}}]", "stages: at step 4: unknown setting 'bogus'"),
    ("[{step: 4, set: {steps: 20}}]", "cannot change on --resume of a run with the fixed"),
    ("[{step: 4, set: {overflow_clip: 2}}]", "--overflow-clip 2 clips the sequences"),
    ("[{step: 4, at: 0.5, set: {lr: 0.1}}]", "a stage is at a step (step: 620) or at a "
     "fraction of the run (at: 0.62): give one of them"),
    ("[{set: {lr: 0.1}}]", "give one of them"),
    ("[{at: 1.5, set: {lr: 0.1}}]", "'stages.0.at' = 1.5 is invalid: must be < 1"),
    ("[{at: 0.25, set: {lr: 0.1}}, {step: 3, set: {lr: 0.2}}]",
     "stages at steps [3, 3]: give each step once"),
    ("[{at:0.5, set: {lr: 0.1}}]", "unknown setting 'stages.0.at:0.5': YAML needs a space "
     "after the colon (`at: 0.5`)"),
])
def test_a_bad_stage_is_one_line_before_anything_loads(capsys, tmp_path, stages, needle):
    """Each stage is checked as --resume would check it, every value and every combination,
    before the model loads or the run folder exists."""
    out = tmp_path / "run"
    code, err = run_main(capsys, "remove", tmp_path / "no-model", "--data", "builtin",
                         "--out", out, *RUN_ARGS, f"stages={stages}")
    one_error_line(code, err, needle)
    assert not out.exists()


def test_a_stage_at_a_fraction_is_a_step_of_the_run_as_long_as_it_is(tmp_path):
    """``at: 0.62`` is 62% of the run's steps, however its length is given (steps, or tokens
    with the context), and the config the run writes holds the step: a resume never moves it.
    Tokens without a context (the model's, not known yet) cannot place it: one line."""
    from noln.config import make_config

    stage = [{"at": 0.62, "set": {"lr": 1e-4}}]
    assert make_config(model="m", steps=1000, stages=stage).stages[0].step == 620
    cfg = make_config(model="m", tokens=2_048_000, batch_size=4, ctx=256, stages=stage)
    assert cfg.stages[0].step == 1240 and cfg.stages[0].at is None
    cfg.to_yaml(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["stages"][0]["step"] == 1240
    with pytest.raises(NolnError, match="needs the run's length in steps: give --ctx with "
                       "--tokens, or --steps"):
        make_config(model="m", tokens=2_048_000, stages=stage)


@pytest.mark.parametrize("args, needle", [
    (["--preset", "smollm2"], "--preset smollm2: no such preset; presets are gpt2, gpt2-large, "
     "gpt2-medium, gpt2-xl, HuggingFaceTB/SmolLM2-135M, HuggingFaceTB/SmolLM2-135M-Instruct"),
    (["order=[mlp_in+attn_out]"], "'attn_out' is not a role of this model"),
])
def test_a_bad_preset_or_order_is_one_line_before_the_weights_load(capsys, tiny_model_dir,
                                                                  tmp_path, args, needle):
    """An unknown preset is refused with the config; an order naming a role the model lacks,
    from its config, before the weights load (the run folder is not made)."""
    out = tmp_path / "run"
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", "builtin", "--out", out,
                         *RUN_ARGS, *args)
    one_error_line(code, err, needle)
    assert not out.exists()


def test_resume_adds_stages_to_come_and_refuses_one_the_run_has_passed(capsys, finished_run,
                                                                       tmp_path):
    """--resume may give the run stages: those after its checkpoint are made when it gets
    there; one before it was never made, and the run says how to make it now."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ckpts = run / "checkpoints"
    os.replace(ckpts / "prev.pt", ckpts / "last.pt")  # back to step 8, as if killed there
    (run / "summary.json").unlink()
    config = (run / "config.yaml").read_text()
    code, err = run_main(capsys, "remove", "--resume", run, "stages=[{step: 4, set: {lr: 1.0e-4}}]")
    one_error_line(code, err, "checkpoint is at step 8, after its stage at step 4, which it "
                   "never made: give that stage's settings to --resume")
    assert (run / "config.yaml").read_text() == config  # refused before anything is written
    code, err = run_main(capsys, "remove", "--resume", run,
                         "stages=[{step: 10, set: {lr: 1.0e-4}}, {step: 40, set: {lr: 1.0e-5}}]")
    assert code == 0, err
    assert "note: the stage at step 40 is at or past the run's end (12 steps)" in err
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "event" not in e] == list(range(12))
    assert [e["step"] for e in log if e.get("event") == "stage"] == [10]
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 1e-4


def test_a_run_made_with_relative_paths_resumes_from_another_folder(capsys, tiny_model_dir,
                                                                    text_jsonl, tmp_path,
                                                                    monkeypatch):
    """A run's config.yaml keeps its local files as absolute paths, so `noln remove --resume`
    works from any folder (a config of paths relative to the repository, resumed elsewhere,
    once failed on its schedule file). Hub ids and names stay as written."""
    import shutil

    work = tmp_path / "work"
    (work / "plans").mkdir(parents=True)
    shutil.copy(text_jsonl, work / "text.jsonl")
    sites = ["blocks.0.mlp_in", "blocks.1.mlp_in", "blocks.0.attn_in_qk", "blocks.1.attn_in_qk",
             "blocks.0.attn_in_v", "blocks.1.attn_in_v", "final"]
    sites = sites[::-1]  # not the default order: `noln sites RUN` lists the run's own
    (work / "plans" / "all.yaml").write_text("events:\n" + "".join(
        f"  - {{step: {1 + i}, site: {site}}}\n" for i, site in enumerate(sites)))
    monkeypatch.chdir(work)
    code, err = run_main(capsys, "remove", tiny_model_dir, "--data", "text.jsonl", "--eval",
                         "again=text.jsonl", "--schedule", "plans/all.yaml", "--out", "run",
                         "--steps", "8", "--batch-size", "4", "--ctx", "64", "--format", "none",
                         "--quiet")
    assert code == 0, err
    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert saved["data"] == str(work / "text.jsonl")
    assert saved["schedule"] == str(work / "plans" / "all.yaml")
    assert saved["eval_sets"] == {"again": str(work / "text.jsonl")}
    monkeypatch.chdir(tmp_path)
    main(["sites", str(work / "run")])  # a run folder: the sites of the model it removes from
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == sites
    code, err = run_main(capsys, "remove", "--resume", work / "run", "--steps", "10", "--quiet")
    assert code == 0, err
    assert json.loads((work / "run" / "summary.json").read_text())["steps"] == 10
    from noln.config import make_config

    named = make_config(model="gpt2", data="builtin", schedule="adaptive")
    assert (named.model, named.data, named.schedule) == ("gpt2", "builtin", "adaptive")


def test_pretrain_resume_keeps_the_runs_shape_and_refuses_another(capsys, text_jsonl, tmp_path):
    """`noln pretrain --resume` builds the model the run saved (a Llama, though --arch's default
    is gpt2) and goes on from its checkpoint; a shape setting that differs from the run's is one
    error line, refused before anything trains."""
    import torch

    out = tmp_path / "p1"
    tiny = ["--layers", "1", "--d-model", "32", "--heads", "2", "--ctx", "32", "--vocab-size",
            "512", "--batch-size", "4", "--warmup-steps", "1", "--quiet"]
    code, err = run_main(capsys, "pretrain", "--arch", "llama", "--data", text_jsonl, "--out",
                         out, "--steps", "4", *tiny)
    assert code == 0, err
    last = out / "checkpoints" / "last.pt"
    before = last.stat().st_mtime_ns

    code, err = run_main(capsys, "pretrain", "--data", text_jsonl, "--out", out, "--resume",
                         "--ctx", "64")
    one_error_line(code, err, "--ctx 64 differs from the run's 32", "drop --ctx")
    assert last.stat().st_mtime_ns == before  # refused before training

    # no --arch, --layers ...: the run's own; --steps may change (the run goes on to step 6)
    code, err = run_main(capsys, "pretrain", "--data", text_jsonl, "--out", out, "--resume",
                         "--steps", "6", "--quiet")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["arch"], summary["n_layer"], summary["ctx"], summary["steps"]) == \
        ("llama", 1, 32, 6)
    assert torch.load(last, weights_only=True)["config"]["arch"] == "llama"

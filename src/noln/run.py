"""The run folder: its layout, who may write it, and what is read back from it.

One module owns every path in a run folder (``RunFolder``): ``config.yaml`` (the run's
settings), ``base/`` (the model's config and tokenizer, to rebuild it on resume),
``config.first.yaml`` (the settings it started with, kept once a stage of its config has
changed them), ``checkpoints/last.pt`` and ``prev.pt`` (and ``step-N.pt``, kept with
``checkpoint_keep``),
``log.jsonl`` (one record per step or event),
``summary.json``, ``loss.png``, ``model/`` and ``model-clean/`` (exports); a ``--control`` pair
adds ``control/`` (a run folder of its own), ``table.md``, ``comparison.json``, ``compare/``.

- ``claim_run_folder``: a new run starts only in a new or empty folder, or over a previous noln
  run with ``overwrite`` (which deletes only the files noln writes, ``NOLN_OUTPUTS``); the folder
  is locked (``.noln.lock`` holds the writer's PID) for as long as the run writes to it, and a
  run that fails before training removes what it wrote and the folder if it made it; a resume
  that fails before it saves a checkpoint puts ``config.yaml`` back as it was (the settings it
  was given were never trained with, so the next resume does not take them up unasked).
(Report files written where the user says, ``--json`` and the like: ``noln.outputs``.)
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import socket
import statistics
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from noln.checkpoint import UnsafeCheckpoint, load_checkpoint
from noln.config import TrainConfig, branch_config, config_at_stage, settings_before
from noln.errors import NolnError
from noln.outputs import export_file_name, written_by_noln

LOCK = ".noln.lock"
# everything noln writes in a run folder (remove, --control, pretrain); nothing else is deleted
NOLN_OUTPUTS = ("config.yaml", "config.first.yaml", "base", "checkpoints", "log.jsonl",
                "summary.json", "loss.png", "model", "model-clean", "control", "table.md",
                "comparison.json", "compare", LOCK)


@dataclass(frozen=True)
class RunFolder:
    """Where each part of a run lives (module docstring); the only place that spells them."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    first_config = property(lambda self: self.root / "config.first.yaml")
    base = property(lambda self: self.root / "base")
    checkpoints = property(lambda self: self.root / "checkpoints")
    last_checkpoint = property(lambda self: self.checkpoints / "last.pt")
    log = property(lambda self: self.root / "log.jsonl")
    summary = property(lambda self: self.root / "summary.json")
    loss_plot = property(lambda self: self.root / "loss.png")
    control = property(lambda self: RunFolder(self.root / "control"))
    table = property(lambda self: self.root / "table.md")
    comparison = property(lambda self: self.root / "comparison.json")
    compare = property(lambda self: self.root / "compare")

    def export(self, fmt: str, n_formats: int = 1) -> Path:
        """``model/`` for the hf export (or the only one), ``model-{fmt}/`` beside it."""
        return self.root / ("model" if fmt == "hf" or n_formats == 1 else f"model-{fmt}")

    def kept_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}.pt"

    def kept_steps(self) -> list[int]:
        """The steps whose checkpoints ``checkpoint_keep`` kept, in order."""
        return sorted(int(p.stem.removeprefix("step-")) for p in self.checkpoints.glob("step-*.pt")
                      if p.stem.removeprefix("step-").isdigit())

    def kept_to_come(self, steps: int, keep: int, every: int, resuming: bool) -> int:
        """How many more checkpoints ``checkpoint_keep`` (``keep``) will keep by step ``steps``:
        the multiples of ``keep`` after the last one kept, or on a resume (a branch keeps
        none yet) after the last step logged less the ``every`` steps a checkpoint may lag."""
        if not keep:
            return 0
        done = max(self.kept_steps(), default=-1)
        if resuming:
            logged = [r["step"] for r in self.read_log() if "event" not in r]
            done = max(done, max(logged, default=0) - every)
        return steps // keep - done // keep

    def is_run(self) -> bool:
        return is_run_folder(self.root)

    def has_checkpoint(self) -> bool:
        return self.last_checkpoint.exists()

    def finished(self) -> bool:
        return self.summary.exists()

    def read_log(self) -> list[dict]:
        return read_log(self.log)

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())

    def write_summary(self, summary: dict) -> None:
        self.summary.write_text(json.dumps(summary, indent=1))

    def load_latest_checkpoint(self) -> tuple[Path, dict]:
        return load_latest_checkpoint(self.root)

    def saved_checkpoints(self) -> list[Path]:
        """``last.pt`` and ``prev.pt``, those that exist, latest first."""
        return [p for p in (self.last_checkpoint, self.checkpoints / "prev.pt") if p.is_file()]

    def latest_progress(self) -> tuple[Path, dict] | None:
        """The latest checkpoint whose progress reads (``saved_progress``, no weights loaded),
        and that progress: ``last.pt``, or ``prev.pt`` where ``last.pt`` is torn (killed
        mid-rename), as a resume reads them; None without either."""
        return next(((p, progress) for p in self.saved_checkpoints()
                     if (progress := saved_progress(p)) is not None), None)


def read_log(path: Path) -> list[dict]:
    """The records of a run's ``log.jsonl``; a line torn by a kill mid-write is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    return parse_log(path.read_text(encoding="utf-8", errors="replace").splitlines())


def parse_log(lines: Iterable[str]) -> list[dict]:
    """The records of log lines (``read_log``); a line torn by a kill mid-write is skipped."""
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict)]


def load_latest_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """The run's latest checkpoint and its contents: ``last.pt``, or ``prev.pt`` where
    ``last.pt`` is unreadable (killed mid-rename). Read once: reading is how ``last.pt`` is
    known to be whole, and a SmolLM2 checkpoint with its AdamW state takes seconds to read."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    last, prev = ckpt_dir / "last.pt", ckpt_dir / "prev.pt"
    if last.exists():
        try:
            return last, load_checkpoint(last)
        except UnsafeCheckpoint:
            raise  # never quietly step around a crafted file
        except NolnError:
            if not prev.exists():
                raise
            return prev, load_checkpoint(prev)
    if prev.exists():
        return prev, load_checkpoint(prev)
    if not Path(run_dir).exists():
        raise NolnError(f"'{run_dir}' does not exist: check the path of the run folder")
    if not ckpt_dir.is_dir():
        raise NolnError(f"'{run_dir}' is not a noln run folder (no checkpoints/): give the folder "
                        "`noln remove --out` or `noln pretrain --out` wrote")
    raise NolnError(f"no checkpoint in '{ckpt_dir}': nothing to resume; start a new run")


def torn_checkpoint_note(path: str | Path, read: str = "read") -> str | None:
    """Where the run folder ``path``'s ``last.pt`` is unreadable, that it is and which
    checkpoint the run is ``read`` from instead (``prev.pt``, as loading falls back to it)."""
    path = Path(str(path)).expanduser()
    torn = RunFolder(path).last_checkpoint if path.is_dir() else None
    if torn is None or not torn.is_file() or saved_progress(torn) is not None:
        return None
    latest = RunFolder(path).latest_progress()
    if latest is None:
        return None
    step, total = latest[1]["step"], latest[1]["total_steps"]
    of = f" of {total:,}" if total else ""
    return (f"note: '{torn}' is unreadable (torn or truncated): the run '{path}' is {read} "
            f"from {latest[0].name}, saved at step {step:,}{of}")


def checkpoint_note(path: str | Path) -> str | None:
    """Which step a command reads where ``path`` is a run that has not finished (still
    training, or stopped) or one checkpoint file, or that a run ended unfinished (sites still
    live); None for anything else, a completed run included. The step is read without
    loading the weights (``mmap``)."""
    path = Path(str(path)).expanduser()
    if note := torn_checkpoint_note(path):
        return note
    if path.is_dir() and RunFolder(path).finished():
        try:
            summary = RunFolder(path).read_summary()
        except (OSError, ValueError):
            return None
        if summary.get("complete", True):
            return None
        frozen = len(summary.get("frozen") or [])
        return (f"note: the run '{path}' ended unfinished ({frozen} sites frozen, the others "
                "still live): it is read as it ended, its norms partly removed")
    if path.is_file() and path.suffix == ".pt":
        ckpt, run = path, RunFolder(path.parent.parent)
        if (progress := saved_progress(ckpt)) is None:  # only a note; loading says why
            return None
    elif path.is_dir() and RunFolder(path).checkpoints.is_dir() and not RunFolder(path).finished():
        run = RunFolder(path)
        if (latest := run.latest_progress()) is None:
            return None
        ckpt, progress = latest
    else:
        return None
    step, total = progress["step"], progress["total_steps"]
    of = f" of {total:,}" if total else ""
    if path.is_file():
        return f"note: '{path}' was saved at step {step:,}{of} of the run '{run.root}'"
    return (f"note: the run '{path}' has not finished: it is read as saved at step "
            f"{step:,}{of} ({ckpt.name})")


def saved_progress(checkpoint: Path) -> dict | None:
    """How far the run had come when it saved ``checkpoint``, read with ``mmap`` (no weights
    loaded, so it costs a fraction of a second on SmolLM2): ``step`` (steps done),
    ``total_steps`` (the run's length; None where the checkpoint does not say), ``sites``
    (the model's norm sites) and ``config``. None for a file that is not a readable
    checkpoint."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        step, total = int(saved["step"]), saved.get("total_steps")
        cfg = dict(saved.get("config") or {})
        sites = sum(1 for k in saved.get("model", {}) if k.endswith(".is_frozen"))
    except Exception:  # noqa: BLE001 - any unreadable file is "no progress known"
        return None
    if total is None:  # a checkpoint from before noln saved its run's length
        try:
            total = cfg.get("steps") if cfg.get("tokens") is None else \
                TrainConfig.model_construct(**cfg).resolved_steps(int(cfg["ctx"]))
        except Exception:  # noqa: BLE001 - a length the config does not give (tokens, the
            total = None  # model's ctx) is not known
    return {"step": step, "total_steps": total, "sites": sites, "config": cfg}


def run_status(path: str | Path, recent: int = 50, *, pair: Path | None = None) -> dict:
    """Where a run folder stands, read without loading any weights (``noln status``): whether
    a process trains it now (its lock), has stopped, or has finished; the step reached (the
    log's last, and the last checkpoint's) of the run's length; sites frozen of the model's;
    the training loss and seconds a step over the last ``recent`` steps, and the time left
    at that pace; its config's stages, done or to come; the command that continues it. A
    ``--control`` pair adds ``control`` (the same for its control run; ``pair``: its pair's
    folder) and ``table`` (whether the table is made)."""
    run = RunFolder(Path(str(path)).expanduser())
    if run.root.is_file():
        raise NolnError(f"'{path}' is a file, not a run folder: give the folder `noln remove "
                        "--out` or `noln pretrain --out` wrote")
    if not run.root.is_dir():
        raise NolnError(f"'{path}' does not exist: give a run folder (`noln remove --out`)")
    if not run.is_run():
        raise NolnError(f"'{path}' is not a noln run folder (no config.yaml or checkpoints/): "
                        "give the folder `noln remove --out` or `noln pretrain --out` wrote")
    holder = lock_holder(run.root)  # before the summary: a run that ends between the two
    # reads is then "training" (true a moment ago), never "stopped" with a resume to follow
    ckpt = next(iter(run.saved_checkpoints()), None)
    progress = (run.latest_progress() or (None, None))[1]
    try:
        cfg = yaml.safe_load(run.config.read_text()) if run.config.is_file() else None
    except (OSError, yaml.YAMLError):
        cfg = None
    cfg = cfg if isinstance(cfg, dict) else (progress or {}).get("config") or {}
    log = run.read_log()
    rows = [r for r in log if "event" not in r and isinstance(r.get("step"), int)]
    events = [r for r in log if "event" in r]
    last = rows[-recent:]
    losses = [r["loss"] for r in last if isinstance(r.get("loss"), int | float) and
              math.isfinite(r["loss"])]  # (a step that overflowed logs no finite loss)
    try:
        summary = run.read_summary() if run.finished() else None
    except (OSError, ValueError):  # a torn summary.json: finished, its numbers unread
        summary = {}
    summary = summary if isinstance(summary, dict) or summary is None else {}
    total = (progress or {}).get("total_steps") or (summary or {}).get("steps")
    saved_step = (progress or {}).get("step")
    # a removal whose summary was written while its process held the folder has ended (that
    # process trains the pair's control next); a lock newer than the summary is a resume (a
    # lengthened run: its old summary stays until it ends again)
    ended = summary is not None and (holder is None or _mtime(run.summary) >= _mtime(run.root /
                                                                                  LOCK))
    if holder is not None and not ended:
        state = "training"
    elif summary is not None:
        state = "finished" if summary.get("complete", True) else "ended unfinished"
    else:
        state = "stopped" if ckpt is not None else "not begun"
    # a stopped run goes on from its checkpoint (a resume cuts the log back to it); a run at
    # work has logged further than its last checkpoint
    logged = rows[-1]["step"] + 1 if rows else None
    done = saved_step if state == "stopped" and saved_step is not None else \
        max(x for x in (logged, saved_step, 0) if x is not None)  # (a log torn short)
    if state in ("finished", "ended unfinished") and isinstance((summary or {}).get("steps"),
                                                                  int):
        done = summary["steps"]
    times = [r["dt"] for r in last if isinstance(r.get("dt"), int | float)]
    per_step = float(statistics.median(times)) if times else None
    applied = {e.get("step") for e in events if e.get("event") == "stage"}
    kind = "pretraining" if not run.config.is_file() else \
        "control" if cfg.get("keep_ln") else "removal"
    if pair is None and kind == "control" and run.root.name == "control" and \
            RunFolder(run.root.parent).is_run():
        pair = run.root.parent  # a pair's control, asked about by its own folder
    quoted = shlex.quote(str(pair or run.root))
    resume = {"pretraining": "the same `noln pretrain` command with --resume",
              # (a control of its own, `--keep-ln`, not a pair's: resumed as any run)
              "control": f"`noln remove --resume {quoted}"
                         + (" --control-only`" if pair is not None else "`"),
              "removal": f"`noln remove --resume {quoted}"
                         + (" --control`" if run.control.is_run() else "`")}[kind]
    status = {
        "run": str(run.root), "kind": kind, "state": state,
        "holder": holder if state == "training" else None,
        # (one that ended unfinished at its last step goes on only lengthened)
        "resume": resume if state == "stopped" else
        resume[:-1] + f" --steps {max(done + 1, done * 3 // 2)}`" if state == "ended unfinished" and
        kind == "removal" and done else None,
        "model": cfg.get("model") or cfg.get("arch"), "data": cfg.get("data"),
        "keep_ln": bool(cfg.get("keep_ln", False)),
        "step": done, "total_steps": total,
        "checkpoint_step": saved_step,
        "sites": (progress or {}).get("sites") or None,
        "frozen": rows[-1].get("frozen") if rows else None,
        "recent_steps": len(last),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "seconds_per_step": per_step,
        "seconds_left": per_step * (total - done) if per_step and total and
        state in ("training", "stopped") else None,
        "stages": [{"step": st.get("step"), "set": st.get("set"),
                    "done": st.get("step") in applied} for st in cfg.get("stages") or []
                   if isinstance(st, dict)],
        "summary": summary,
    }
    if run.control.is_run():
        status["control"] = run_status(run.control.root, recent, pair=run.root)
        status["table"] = run.table.is_file()
    return status


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -math.inf


def keep_checkpoint(checkpoint: Path, kept: Path) -> None:
    """``kept`` becomes ``checkpoint`` as it is now: a hard link (checkpoints are never written
    in place, only replaced by rename, so the link keeps this step's file), else a copy."""
    kept.unlink(missing_ok=True)  # (a kept step-N.pt of this run, saved again after a resume)
    try:
        os.link(checkpoint, kept)
    except OSError:  # a file system without hard links
        shutil.copyfile(checkpoint, kept)


def branch_run(source: Path, step: int, out: Path, settings: dict | None = None) -> RunFolder:
    """A new run folder ``out`` that goes on from ``source``'s kept checkpoint of ``step``: its
    config (``out`` changed), ``base/``, its log up to that checkpoint, and the checkpoint as
    ``last.pt``. ``noln remove --resume OUT`` then continues it, with any setting --resume may
    change; ``source`` is only read. ``settings`` (``config.BRANCH_MAY_CHANGE``: the
    schedule, taper, outlier clip) replace the run's for the removals still to come: the sites
    the checkpoint froze stay frozen, the others follow the new schedule (an adaptive order
    from its next site, a fixed one's events by step)."""
    src, dst = RunFolder(source), RunFolder(out)
    if not src.config.is_file():
        raise NolnError(f"'{source}' is not a noln run folder (no config.yaml): give the run "
                        "to branch from")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NolnError(f"--out '{out}' exists and is not empty: a branch goes in a new folder")
    if Path(source).resolve() in (Path(out).resolve(), *Path(out).resolve().parents):
        raise NolnError(f"--out '{out}' is inside the run '{source}', which a branch only reads: "
                        "give a folder outside it")
    ckpt = src.kept_checkpoint(step)
    # or the run's last checkpoint, where it is of that step (a finished run's end)
    last = load_checkpoint(src.last_checkpoint)["state"] if not ckpt.is_file() and \
        src.last_checkpoint.is_file() else None
    if last is not None and int(last["step"]) == step:
        ckpt = src.last_checkpoint
    elif not ckpt.is_file():
        kept = src.kept_steps()
        raise NolnError(f"'{source}' kept no checkpoint of step {step}: " + (
            f"it kept steps {', '.join(map(str, kept))}" if kept else
            "it kept none (start a run with checkpoint_keep=N to keep every N-th step's)")
            + (f", and its last checkpoint is of step {last['step']}" if last else ""))
    state = last if ckpt == src.last_checkpoint else load_checkpoint(ckpt)["state"]
    log_lines = int(state["log_lines"])  # the log as it was then
    lines = src.log.read_text().splitlines(keepends=True) if src.log.exists() else []
    # the run's settings as they were at that step: its settings now with the changes its
    # log records after the step (stages, resumes with new settings) undone, or, where the
    # log predates their record, a staged run's first settings with its stages made
    first = yaml.safe_load(src.first_config.read_text()) if src.first_config.is_file() else None
    now = yaml.safe_load(src.config.read_text())
    saved = settings_before(now, parse_log(lines[log_lines:]))
    if saved is None:
        saved = now if first is None else config_at_stage(first, int(state.get("stage", 0)))
    config = branch_config(saved, settings or {})
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src.base, dst.base)
    dst.config.write_text(yaml.safe_dump({**config, "out": str(out)}, sort_keys=False))
    if first is not None:  # its control starts from the lineage's first settings
        dst.first_config.write_text(yaml.safe_dump({**first, "out": str(out)}, sort_keys=False))
    dst.log.write_text("".join(lines[:log_lines]))
    dst.checkpoints.mkdir()
    keep_checkpoint(ckpt, dst.last_checkpoint)
    return dst


def _entries(folder: Path) -> list[str]:
    # (a write test's file, and the lock's own transient files, are no one's entries)
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.startswith((".noln-write-test", f"{LOCK}.")))


def is_run_folder(folder: Path) -> bool:
    """A folder a noln run wrote: a removal run (``config.yaml``) or any run's checkpoints."""
    return (folder / "config.yaml").is_file() or (folder / "checkpoints").is_dir()


def _describe_run(folder: Path) -> str:
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        what = f"a run of {cfg.get('model')} on {cfg.get('data')}"
    except Exception:  # noqa: BLE001 - only a description; the folder is refused either way
        what = "a noln run"
    state = "finished" if (folder / "summary.json").exists() else "unfinished"
    return f"{what} ({state})"


_CHECKPOINT_NAME = re.compile(r"(last|prev|step-\d+)\.pt(\.tmp)?")


def foreign_entries(folder: Path) -> list[str]:
    """What ``remove_noln_outputs`` would delete that noln did not write: files of the user's
    inside noln's own subfolders (``checkpoints/``, ``base/``, the exports, ``compare/``,
    ``control/``), as paths relative to ``folder``. The folder's other files are never
    deleted, so they are not listed."""
    folder = Path(folder)
    found: list[str] = []
    for name in NOLN_OUTPUTS:
        sub = folder / name
        if not sub.is_dir() or sub.is_symlink():
            continue
        if name == "control":
            found += [f"control/{e}" for e in foreign_entries(sub)]
            continue
        for path in sorted(sub.rglob("*")):
            rel = path.relative_to(sub)
            if path.is_dir():
                continue
            if name == "checkpoints":
                ours = len(rel.parts) == 1 and _CHECKPOINT_NAME.fullmatch(rel.name) is not None
            elif name in ("base", "model", "model-clean"):
                ours = len(rel.parts) == 1 and export_file_name(rel.name)
            else:  # compare/: the table's reports, each with noln's mark
                ours = written_by_noln(path)
            if not ours:
                found.append(f"{name}/{rel}")
    return found


def remove_noln_outputs(folder: Path, names: Iterable[str] = NOLN_OUTPUTS) -> None:
    """Delete what noln writes in a run folder (``NOLN_OUTPUTS``, or those of ``names``) and
    nothing else; never the lock, and a symlink only as a link."""
    for name in names:
        path = folder / name
        if name == LOCK or name not in NOLN_OUTPUTS:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # a folder of noln's own layout (checkpoints, model, base ...)
        elif path.exists() or path.is_symlink():
            path.unlink()


def check_run_target(out: Path, overwrite: bool, flag: str = "--out",
                     resume_hint: str = "`noln remove --resume {out}`") -> None:
    """Refuse to start a run over another run or over files noln did not write."""
    if not out.is_dir():
        return
    entries = [e for e in _entries(out) if e != LOCK]
    # a --control run's removal run lives in the same folder as its control (DIR/control)
    rest = [e for e in entries if not (e == "control" and is_run_folder(out / "control"))]
    if not entries or (not rest and not overwrite):
        return
    if is_run_folder(out):
        if overwrite:
            foreign = foreign_entries(out)
            if foreign:
                shown = ", ".join(f"'{e}'" for e in foreign[:3]) + (" ..." if len(foreign) > 3
                                                                    else "")
                raise NolnError(f"--overwrite would delete what noln did not write in '{out}' "
                                f"({shown}): move it out first, or choose another folder")
            remove_noln_outputs(out)
            return
        raise NolnError(f"{flag} '{out}' already holds {_describe_run(out)}: continue it with "
                        f"{resume_hint.format(out=out)}, pass --overwrite to replace it, or "
                        "choose another folder")
    shown = ", ".join(f"'{e}'" for e in rest[:3]) + (" ..." if len(rest) > 3 else "")
    raise NolnError(f"{flag} '{out}' is not empty and not a noln run folder (it holds {shown}): "
                    "noln starts a run only in a new or empty folder; choose another")


# ----------------------------------------------------------------------------- lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _lock_owner(folder: Path) -> tuple[int, str] | None:
    """``(pid, host)`` of ``folder``'s lock file; None without one, or with torn or foreign
    content (nobody holds that lock: ``acquire_lock`` writes a lock whole, never torn). A lock
    that cannot be read (another user's) is an error, not a free folder."""
    return _read_lock(Path(folder) / LOCK)


def _read_lock(path: Path) -> tuple[int, str] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise NolnError(f"'{path}' is a folder where noln keeps its lock file (noln never makes "
                        "one): move it away") from None
    except OSError as e:
        raise NolnError(f"cannot read the lock file {path} ({e.strerror}): another user's noln "
                        "may be using the folder; ask them, or choose another folder") from None
    try:
        holder = json.loads(text)
        pid, host = int(holder["pid"]), holder.get("host", socket.gethostname())
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return None
    return (pid, host) if 0 < pid < 2**31 and isinstance(host, str) else None


def lock_holder(folder: Path) -> str | None:
    """Who holds ``folder``'s lock, if another live process does: ``"PID 4242"`` (``" on host
    h"`` where it is another machine's); None when free, stale or this process's own."""
    owner = _lock_owner(folder)
    if owner is None:
        return None
    pid, host = owner
    if pid == os.getpid() and host == socket.gethostname() or not _holds(pid, host):
        return None
    return f"PID {pid}" + ("" if host == socket.gethostname() else f" on host {host}")


def _holds(pid: int, host: str) -> bool:
    """Whether a lock of ``pid`` on ``host`` is held: its process is alive, or it is another
    machine's (which cannot be asked, so it is taken to be)."""
    return host != socket.gethostname() or _alive(pid)


def acquire_lock(folder: Path) -> bool:
    """Create ``folder/.noln.lock`` holding this process's PID. A lock whose process is alive
    (on this machine) is an error naming it; a stale one (its process is gone) is taken over;
    this process's own lock is re-entrant. True when this call took it (and must release it).

    The lock appears whole: written to a file of this process's own and hard-linked into place
    (``link`` fails where the name exists), so no other process reads it empty and takes it
    over. A stale lock is renamed away before it is deleted, and what was renamed is looked
    at again: where two processes take over the same stale lock, the second moves the first's
    new lock, sees it is alive, and puts it back."""
    path = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(5):
        fd, name = tempfile.mkstemp(prefix=f"{LOCK}.", suffix=".tmp", dir=folder)  # its own
        mine = Path(name)
        os.fchmod(fd, 0o644)  # (readable as the lock always was: others may ask who holds it)
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            os.link(mine, path)
            return True
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: created, then written
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                return True
        finally:
            mine.unlink(missing_ok=True)
        owner = _lock_owner(folder)
        if owner == (me["pid"], me["host"]):
            return False
        holder = lock_holder(folder)
        if holder is not None:
            raise NolnError(f"'{folder}' is in use by another noln process ({holder}, lock "
                            f"file {path}): wait for it to finish or stop it; if that "
                            "process is gone, delete the lock file") from None
        # stale (its process gone), torn or foreign: moved to a name of this call's own
        moved = folder / f"{LOCK}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(path, moved)
        except FileNotFoundError:
            continue  # another process took it over first
        taken = _read_lock(moved)
        if taken is not None and taken != (me["pid"], me["host"]) and _holds(*taken):
            try:  # not the stale lock: another process's new one, put back
                os.link(moved, path)
            except FileExistsError:
                pass
            except OSError:  # (no hard links here)
                if not path.exists():
                    os.replace(moved, path)
        moved.unlink(missing_ok=True)
    raise NolnError(f"cannot take the lock {path}: another process keeps taking it")


def release_lock(folder: Path) -> None:
    """Remove ``folder/.noln.lock`` if this process holds it."""
    path = folder / LOCK
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


# ----------------------------------------------------------------------------- runs


def check_writable(out: Path, flag: str = "--out") -> None:
    """Fail before training, not after an hour of it."""
    if out.exists() and not out.is_dir():
        raise NolnError(f"output folder '{out}' is a file, not a folder: choose another {flag}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".noln-write-test-{os.getpid()}"  # one per process under a launcher
        probe.write_bytes(b"\0" * 1024)
        probe.unlink()
    except OSError as e:
        raise NolnError(f"output folder '{out}' is not writable ({e.strerror}): choose another "
                        f"{flag} or free disk space") from None


def _saved_settings(out: Path) -> tuple[bytes | None, list[tuple[str, int]]]:
    """A resumed run's ``config.yaml`` as it is, and its checkpoints' names and times: a
    failed resume that saved no checkpoint since puts the first back (``claim_run_folder``)."""
    run = RunFolder(out)
    try:
        config = run.config.read_bytes()
    except OSError:
        config = None
    try:
        marks = sorted((p.name, p.stat().st_mtime_ns) for p in run.checkpoints.iterdir())
    except OSError:
        marks = []
    return config, marks


def _put_back_config(out: Path, config: bytes | None) -> None:
    path = RunFolder(out).config
    try:
        if config is not None and path.read_bytes() != config:
            path.write_bytes(config)
    except OSError:
        pass  # the error that ended the run is the one to report


class RunClaim:
    """What ``claim_run_folder`` hands the run: call ``started()`` once training begins."""

    def __init__(self) -> None:
        self.training = False

    def started(self) -> None:
        self.training = True


@contextmanager
def claim_run_folder(out: Path, *, resume: bool, overwrite: bool = False, main: bool = True,
                     flag: str = "--out", resume_hint: str = "`noln remove --resume {out}`"
                     ) -> Iterator[RunClaim]:
    """Own ``out`` for the length of a run (see the module docstring). Only the main process of
    a launcher checks, locks and cleans; the others only check that they can write."""
    out = Path(out)
    created = not out.exists()
    claim = RunClaim()
    check_writable(out, flag)
    if not main:
        yield claim
        return
    before: set[str] | None = None
    settings = None
    fresh = False
    try:
        fresh = acquire_lock(out)  # before looking: a live run's files are never touched
        if not resume:
            check_run_target(out, overwrite, flag, resume_hint)
        before = set(_entries(out))
        settings = _saved_settings(out) if resume else None
        yield claim
    except BaseException:
        if before is not None and not claim.training and not resume:
            # nothing trained: remove what this run wrote (it was not there before), only that
            remove_noln_outputs(out, [name for name in NOLN_OUTPUTS if name not in before])
        elif settings is not None and _saved_settings(out)[1] == settings[1]:
            _put_back_config(out, settings[0])  # no checkpoint since the claim
        raise
    finally:
        if fresh:
            release_lock(out)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()

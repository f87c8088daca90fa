"""Atomic checkpoints: a run killed at any moment leaves its last good checkpoint intact.

Each save writes ``last.pt.tmp``, flushes it to disk, keeps the previous checkpoint as
``prev.pt`` and renames the new file over ``last.pt`` (``os.replace`` is atomic on POSIX).
A Ctrl-C during a save waits for the save to end: torch's zip writer would turn the interrupt
into a RuntimeError, and the user would get an internal error instead of how to resume.

The zip records are written without their CRC32 (torch >= 2.6: ``compute_crc32``): torch
computes it on one thread over the whole file (0.7 s of CPU for SmolLM2-135M's 1.6 GB here,
against 0.02 s to serialise without it: ``bench/checkpoint_write.py``) and ``torch.load`` never
checks it, so it guarded nothing. A torn file never carries a checkpoint's name: the atomic
rename above is what guards against that.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import signal
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from noln.errors import NolnError, raise_interrupt

try:
    from torch.utils.serialization import config as serialization_config
except ImportError:  # torch < 2.6
    serialization_config = None


class UnsafeCheckpoint(NolnError):
    """A checkpoint that only unpickling arbitrary objects could read: refused, never loaded."""


def _map_leaves(obj, leaf):
    """``obj`` with new dicts, lists and tuples, and ``leaf`` of everything else in them."""
    if isinstance(obj, dict):
        return {k: _map_leaves(v, leaf) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_map_leaves(v, leaf) for v in obj)
    return leaf(obj)


def _leaves(obj) -> Iterator:
    """Everything in ``obj``'s dicts, lists and tuples that is none of them."""
    if isinstance(obj, dict | list | tuple):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from _leaves(v)
    else:
        yield obj


def _plain_leaf(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def plain(obj):
    """``obj`` with numpy scalars and arrays made Python numbers and tensors, tuples kept: what
    ``torch.load(weights_only=True)`` reads without unpickling any class."""
    return _map_leaves(obj, _plain_leaf)


def _interrupting() -> dict:
    """The signals whose handler now stops noln as Ctrl-C does, with that handler: SIGINT's
    default, SIGTERM as the CLI installs it, or either inside ``stop_after_step``. Empty off
    the main thread (only it receives signals); a signal ignored (a shell's background job
    ignores SIGINT) or handled by someone else is not one."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: raise_interrupt}
    current = {sig: signal.getsignal(sig) for sig in ours}
    return {sig: h for sig, h in current.items()
            if h is ours[sig] or getattr(h, "stops_after_step", False)}


@contextmanager
def ctrl_c_after() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT), or a SIGTERM handled as one, that arrives inside the block and
    hand it to the handler it was held from when the block ends: raised as KeyboardInterrupt,
    or in a training loop noted to stop after the step (``stop_after_step``). Only the main
    thread receives signals; elsewhere, and for a signal ignored or handled by someone else,
    the block runs as it is."""
    held: list[int] = []
    saved = _interrupting()
    for sig in saved:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    for sig in held:
        saved[sig](sig, None)


@contextmanager
def stop_after_step() -> Iterator[list[int]]:
    """Inside the block (a training loop), a first Ctrl-C, or SIGTERM handled as one, is noted
    in the yielded list instead of raised: the loop finishes its step, saves and stops
    (``noln.errors.Interrupted``). A second one raises KeyboardInterrupt at once, and the run
    keeps its last checkpoint. A save (``ctrl_c_after``) still holds either until it ends."""
    asked: list[int] = []

    def ask(signum: int, frame) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)

    ask.stops_after_step = True
    saved = _interrupting()
    for sig in saved:
        signal.signal(sig, ask)
    try:
        yield asked
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _no_crc32():
    """torch's zip writer without the CRC32 of each record, where torch can say so (>= 2.6)."""
    if serialization_config is None:  # an older torch: it computes the CRC32
        return nullcontext()
    return serialization_config.patch({"save.compute_crc32": False})


def save_atomic(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` as the module docstring says. A write that fails (a full disk:
    torch's zip writer reports it as a RuntimeError) removes its own ``.tmp`` and is a one-line
    error naming the free space and the checkpoint that is still good."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with ctrl_c_after():
        try:
            with open(tmp, "wb") as f, _no_crc32():
                torch.save(plain(obj), f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            written = tmp.stat().st_size if tmp.exists() else 0
            tmp.unlink(missing_ok=True)  # noln's own partial file
            free = shutil.disk_usage(path.parent).free
            kept = f"the last good checkpoint is kept at '{path}'" if path.exists() else \
                "no checkpoint of this run was kept yet"
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            full = getattr(e, "errno", None) == errno.ENOSPC or free < max(written, 2**30)
            raise NolnError(
                f"could not write checkpoint '{tmp}' after {written / 2**30:.2f} GiB "
                f"({'the disk is full: ' if full else ''}{free / 2**30:.2f} GiB free there; "
                f"{why}): free space (or keep fewer: checkpoint_keep=0 keeps none), then --resume; "
                f"{kept}") from e
        if path.exists():
            os.replace(path, path.with_name("prev.pt"))
        os.replace(tmp, path)


def _copied_leaf(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    return _plain_leaf(obj)  # (a numpy array copied as a tensor; numbers, strings: immutable)


def snapshot(obj):
    """``obj`` as it is now, sharing nothing that training changes in place: every tensor copied
    to the CPU, every dict, list and tuple new (a run's state holds lists that grow each step),
    and already ``plain``."""
    return _map_leaves(obj, _copied_leaf)


def memory_available() -> int | None:
    """Bytes of RAM the system can give without swapping (Linux's MemAvailable), None where it
    cannot say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def state_bytes(obj) -> int:
    """The bytes of the tensors in ``obj`` (a checkpoint dict), wherever they live."""
    return sum(x.numel() * x.element_size() for x in _leaves(obj) if isinstance(x, torch.Tensor))


class CheckpointWriter:
    """Checkpoints written on a background thread while training goes on: ``write`` takes a
    ``snapshot`` of the state (a copy in RAM, a fraction of a second) and returns; the thread
    runs ``save_atomic`` (the disk's seconds: ~9 s for SmolLM2-135M's 1.6 GB on this project's
    CPU box, most of a GPU run's time between steps at 50 steps a save) and then ``then``
    (e.g. the kept step's hard link). One write at a time: the next ``write`` waits for the
    last, and so must anything that reads a checkpoint (``wait``). A failed write is raised by
    the next ``wait``/``write``, as the one-line error ``save_atomic`` makes.

    Where the copy would not fit in the RAM available (twice its size: the copy and torch's
    buffers), or ``background`` is off, ``write`` is ``save_atomic`` in the caller's thread. A
    run killed mid-write keeps its previous checkpoint whole, as before: the rename comes last."""

    def __init__(self, background: bool = True):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # how many went each way ("background", "training thread"): a machine short of RAM
        # (a VM whose memory grows as it is used) shows here why its saves cost the run
        self.writes: Counter[str] = Counter()

    def write(self, obj: dict, path: Path, then=None) -> None:
        self.wait()
        room = memory_available()
        if not self.background or room is None or 2 * state_bytes(obj) > room:
            self.writes["training thread"] += 1
            save_atomic(obj, path)
            if then is not None:
                then()
            return
        copy = snapshot(obj)
        self.writes["background"] += 1

        def run() -> None:
            try:
                save_atomic(copy, path)
                if then is not None:
                    then()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name="noln-checkpoint")
        self._thread.start()

    def wait(self) -> None:
        """Until the write in flight is on disk under its name; its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_checkpoint(path: Path) -> dict:
    """A checkpoint dict; a torn or foreign file is a clear error naming the fallback.

    Loaded with ``weights_only=True``: tensors, numbers, strings and containers only, so a
    crafted file cannot run code. A file that needs more (a checkpoint from before noln kept
    its state plain, or a pickle with objects in it) is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise NolnError(f"checkpoint '{path}' does not exist: was the run started with this --out?")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol is not news
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused is None:  # an opcode torch's safe unpickler does not read: not a checkpoint
            raise NolnError(_corrupt(path, e)) from None
        raise UnsafeCheckpoint(
            f"checkpoint '{path}' holds a Python object ({refused.group(1)}) that noln will not "
            "unpickle, since unpickling can run code: it is not a checkpoint this noln wrote (or "
            "one from an older noln); start the run again, or load it yourself only if you trust "
            "its source") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a torn zip
        raise NolnError(_corrupt(path, e)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        raise NolnError(f"'{path}' is not a noln checkpoint (no model state or step)")
    return ckpt


def _corrupt(path: Path, e: Exception) -> str:
    if path.suffix != ".pt":  # (a summary.json, a log given where a checkpoint goes)
        return (f"'{path}' is not a checkpoint: give a run folder, or one of its "
                "checkpoints/*.pt files")
    prev = path.with_name("prev.pt")
    kept = sorted((p for p in path.parent.glob("step-*.pt")
                   if p != path and p.stem[5:].isdigit()), key=lambda p: int(p.stem[5:]))
    hint = f"resume from '{prev}' instead" if prev.exists() and prev != path else \
        f"a kept checkpoint ('{kept[-1]}') can be branched from (`noln branch`), or start " \
        "the run again (`--overwrite` replaces only the files noln wrote)" if kept else \
        "start the run again (`--overwrite` replaces only the files noln wrote)"
    return f"checkpoint '{path}' is corrupt or truncated ({type(e).__name__}): {hint}"

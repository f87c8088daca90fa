"""One progress bar for the long analysis commands (eval, compare, linearity, linearize): done /
total in tokens, tokens/s, elapsed and ETA, on stderr, gone when the work ends."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from transformers.utils import logging as hf_logging


class _Rate(ProgressColumn):
    """Tokens per second since the bar started (rich's own speed column smooths over the last
    few updates only, which jumps about when batches differ in size)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 and task.completed else None
        return Text("- tok/s" if rate is None else f"{rate:,.0f} tok/s")


class TokenProgress:
    """``with token_progress("HellaSwag", total) as bar: ... bar.advance(tokens)``; a no-op when
    disabled. ``describe(text)`` changes the label (e.g. which model or block is running)."""

    def __init__(self, description: str, total: int, enabled: bool = True,
                 console: Console | None = None):
        self.enabled = enabled and total > 0
        self.start = time.perf_counter()
        if self.enabled:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                TaskProgressColumn(),
                                TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"),
                                _Rate(), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(),
                                console=console or Console(stderr=True), transient=True)
            self.task = self.bar.add_task(description, total=total)

    def __enter__(self) -> TokenProgress:
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

    def advance(self, tokens: int) -> None:
        if self.enabled:
            self.bar.advance(self.task, tokens)

    def update(self, completed: int) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=completed)

    def describe(self, description: str) -> None:
        if self.enabled:
            self.bar.update(self.task, description=description)


def token_progress(description: str, total: int, enabled: bool = True,
                   console: Console | None = None) -> TokenProgress:
    return TokenProgress(description, total, enabled, console)


@contextmanager
def counting_forwards(model: torch.nn.Module, bar: TokenProgress):
    """Advance ``bar`` by the tokens of every top-level forward of ``model`` (for commands whose
    passes are spread over helpers that take no progress callback)."""

    def count(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            bar.advance(ids.numel())

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield bar
    finally:
        handle.remove()


@contextmanager
def transformers_bars_off():
    """transformers' own bars ("Loading weights", GGUF's per-tensor conversion) off while
    noln loads a model: noln shows one bar for the work itself, and ``--quiet`` means none.
    The user's setting is restored after."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()

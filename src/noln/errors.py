"""One exception type for every problem a user can fix; the CLI prints its message on one line.
And one way to stop: SIGTERM raised as Ctrl-C, which a training loop takes after its step,
saved (``Interrupted``)."""


class NolnError(Exception):
    """A user-facing error: the message names the problem and the fix."""


def raise_interrupt(signum: int, frame) -> None:
    """SIGTERM as Ctrl-C (``noln.cli`` installs it): a scheduler's or ``kill``'s stop ends a
    run the way Ctrl-C does, between steps or after a checkpoint save, with the resume hint."""
    raise KeyboardInterrupt


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) taken between two training steps: the step in progress finished and
    the run saved a checkpoint at ``step`` before stopping, so nothing is lost."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step

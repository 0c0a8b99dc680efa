"""Errors that are the user's to fix.

Anything raised as `UserError` is printed by the CLI as one line on stderr and
exits with status 2, without a traceback. Everything else is a bug (status 1,
traceback shown).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it.

    Library code names settings as the Python API spells them (`stride`, `data.encoding`)
    and lists them in `settings`; the CLI adds the command-line flags that set them.
    """

    def __init__(self, message: str, *, settings: tuple[str, ...] = ()):
        super().__init__(message)
        self.settings = settings


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training; with `resumable`, its state was saved first."""

    def __init__(self, out, step: int, resumable: bool = True, mid_step: bool = False):
        super().__init__(out, step, resumable)
        self.out, self.step, self.resumable, self.mid_step = out, step, resumable, mid_step

    def __str__(self) -> str:
        if self.mid_step:  # a second signal cut a step: its half-done state was not saved
            return (f"Training stopped at once during step {self.step + 1}; nothing after the last saved "
                    f"state was kept: --resume continues from it ({self.out}).")  # fmt: skip
        if self.resumable:
            return f"Training interrupted at step {self.step}; its state is saved in {self.out}."
        return f"Training interrupted at step {self.step}; the best checkpoint so far is in {self.out}."


def require(module: str, extra: str, what: str) -> None:
    """A one-line error, not an ImportError, when an optional dependency is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the {module} package: pip install 'lmforge[{extra}]'.")

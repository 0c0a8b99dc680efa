"""Errors that are the user's to fix.

Anything raised as `UserError` is printed by the CLI as one line on stderr and
exits with status 2, without a traceback. Everything else is a bug (status 1,
traceback shown).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: message says what is wrong and how to fix it."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training; with `resumable`, its state was saved first."""

    def __init__(self, out, step: int, resumable: bool = True):
        super().__init__(out, step, resumable)
        self.out, self.step, self.resumable = out, step, resumable

    def __str__(self) -> str:
        if self.resumable:
            return f"Training interrupted at step {self.step}; its state is saved in {self.out}."
        return f"Training interrupted at step {self.step}; the best checkpoint so far is in {self.out}."

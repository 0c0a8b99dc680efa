"""Errors that are the user's to fix.

Anything raised as `UserError` is printed by the CLI as one line on stderr and
exits with status 2, without a traceback. Everything else is a bug (status 1,
traceback shown).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: message says what is wrong and how to fix it."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training after its state was saved; `lmforge train --resume` continues."""

    def __init__(self, out, step: int):
        super().__init__(f"Training interrupted at step {step}; its state is saved in {out}.")
        self.out, self.step = out, step

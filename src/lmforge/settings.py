"""Settings with their ranges: the one validation layer of every config dataclass.

A field declared with `option(default, help, ge=..., le=...)` carries what it means and
which values it takes. `check_fields(obj)` checks every such field of a dataclass (a finite
number within its range; whole numbers for int fields), and names the setting and the fix.
The run config (`config.py`), the generation settings (`generation_config.py`), the CLI
flags and the server's request fields all read these declarations. No torch here.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import field, fields, is_dataclass
from typing import Any

from lmforge.errors import UserError

WORDS = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}


def option(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, api: bool = True) -> Any:  # fmt: skip
    """A setting: its default, what it does and its valid range (`api=False`: not a field of the
    server's requests, whose protocol has its own way to say it)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"help": help, "bounds": bounds, "api": api})


def out_of_bounds(value: float, bounds: dict[str, float]) -> str | None:
    """None when `value` is a finite number within `bounds`, else what it must be."""
    ok = math.isfinite(value) and all(
        {"ge": value >= b, "gt": value > b, "le": value <= b, "lt": value < b}[k] for k, b in bounds.items()
    )
    if ok:
        return None
    return " and ".join(f"{WORDS[k]} {b:g}" for k, b in bounds.items()) or "a finite number"


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolving the annotations is slow (~0.4 ms); a GenerationConfig is checked for every row of
    # every decode step in the server (its sampling key), so each class is resolved once.
    return typing.get_type_hints(cls)


def check_fields(obj: Any, prefix: str = "", label: str = "") -> None:
    """Every declared range of dataclass `obj` (and of dataclasses inside it), or a UserError
    naming the first setting out of range: `optim.lr must be above 0, not -1.0` (`label` goes
    before the name in the message only)."""
    hints = _type_hints(type(obj))
    for f in fields(obj):
        value, name = getattr(obj, f.name), prefix + f.name
        if is_dataclass(value):
            check_fields(value, name + ".", label)
            continue
        kind = hints[f.name]
        wrong_type = {
            bool: not isinstance(value, bool), str: not isinstance(value, str),
            int: isinstance(value, bool) or not isinstance(value, int | float),
            float: isinstance(value, bool) or not isinstance(value, int | float),
        }.get(kind, False)  # fmt: skip
        if wrong_type:  # (a foreign or damaged config: "true" for a switch, "512" for a width)
            kind_name = {bool: "true or false", str: "text", int: "a whole number", float: "a number"}[kind]
            raise UserError(f"{label}{name} must be {kind_name}, not {value!r}.", settings=(name,))
        if value is None or isinstance(value, bool | str | tuple | list | dict):
            continue
        if kind is int and not isinstance(value, int):
            raise UserError(f"{label}{name} must be a whole number, not {value!r}.", settings=(name,))
        bounds = f.metadata.get("bounds", {})
        problem = out_of_bounds(value, bounds) if isinstance(value, int | float) else None
        if problem:
            raise UserError(f"{label}{name} must be {problem}, not {value!r}.", settings=(name,))

"""The ``allowed`` rules of config keys (a range, a set of choices, ``auto`` or a range) and ``key``, the schema
field that carries one: declared in :mod:`acon.config_schema`, checked by :func:`acon.validate.check_schema`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass(frozen=True)
class Range:
    """Numbers between ``low`` and ``high`` (either may be open or absent)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def accepts(self, value: Any) -> bool:
        """True when ``value`` is a number of the right kind inside the range."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        """What is allowed, in words: ``an integer > 0``, ``a number in [0, 1)``."""
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return kind


@dataclass(frozen=True)
class OneOf:
    """One of fixed ``choices``, or of the sequence named by ``source`` (``module:NAME``, imported late)."""

    choices: tuple = ()
    source: str | None = None

    def options(self) -> tuple:
        """The valid values."""
        if self.source is None:
            return self.choices
        module, name = self.source.split(":")
        found = getattr(importlib.import_module(module), name)
        return tuple(found() if callable(found) else found)

    def accepts(self, value: Any) -> bool:
        """True when ``value`` is one of the options."""
        return value in self.options()

    def describe(self) -> str:
        """``one of: a, b, c``, booleans as YAML writes them (``true``, ``false``)."""
        return "one of: " + ", ".join(
            str(o).lower() if isinstance(o, bool) else str(o) for o in self.options()
        )


POSITIVE_INT = Range(0, low_open=True, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1, high_open=True)  # [0, 1)


@dataclass(frozen=True)
class AutoOr:
    """``auto`` or a value ``rule`` allows (``trainer.threads``, ``data.num_workers``)."""

    rule: Range

    def accepts(self, value: Any) -> bool:
        """True for ``auto`` and for what ``rule`` accepts."""
        return value == "auto" or self.rule.accepts(value)

    def describe(self) -> str:
        """``an integer >= 0 or auto``."""
        return f"{self.rule.describe()} or auto"


def key(default: Any = MISSING, allowed: Range | OneOf | AutoOr | None = None) -> Any:
    """A schema field with its default and its ``allowed`` rule (read by ``acon.validate``)."""
    meta = {"allowed": allowed} if allowed else {}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)

"""argparse ``type=`` functions that check a numeric option's range while parsing.

Every numeric option of every verb uses one of these instead of a bare ``int`` or
``float``, so an out-of-range value (``--lr -1``, ``--steps 0``, ``--ratio 1.5``,
``--lr nan``) is refused in one line, before any model is loaded. argparse turns the
:class:`argparse.ArgumentTypeError` into ``spectrakit VERB: argument --lr: …``; the
command line prints that and exits 2. Each checker names its range in the message and
carries an out-of-range example (``.invalid``), which the tests feed to every option.

>>> positive_float("0.5")
0.5
>>> positive_float("-1")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: expected a number > 0, got '-1'
>>> fraction = float_in(0.0, 1.0, low_open=True, high_open=True)
>>> fraction("0.3"), fraction.invalid
(0.3, '0')
>>> int_at_least(2)("1")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: expected an integer ≥ 2, got '1'
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


class RangeChecker:
    """A callable ``type=`` for argparse: parses the text and checks its range.

    Args:
        convert: ``int`` or ``float``.
        low, high: the bounds (``None``: unbounded on that side).
        low_open, high_open: whether the bound itself is excluded.
        name: what argparse calls the type in its own messages.
    """

    def __init__(self, convert: Callable[[str], Any], low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, name: str = "") -> None:
        self.convert = convert
        self.low, self.high = low, high
        self.low_open, self.high_open = low_open, high_open
        self.__name__ = name or f"{convert.__name__}_in_range"

    @property
    def description(self) -> str:
        """The accepted range in words, e.g. ``"a number in (0, 1]"``."""
        noun = "an integer" if self.convert is int else "a number"
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{_plain(self.low)}, "
                    f"{_plain(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '≥'} {_plain(self.low)}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '≤'} {_plain(self.high)}"
        return f"{noun}"

    @property
    def invalid(self) -> str:
        """An out-of-range value (for tests that feed one to every option)."""
        if self.low is not None:
            return _plain(self.low if self.low_open else self.low - 1)
        if self.high is not None:
            return _plain(self.high if self.high_open else self.high + 1)
        return "nan"

    def __call__(self, text: str) -> Any:
        """The parsed value of ``text``; raises :class:`argparse.ArgumentTypeError` when it
        is not a number of the right kind, not finite, or out of range."""
        try:
            value = self.convert(text)
        except (TypeError, ValueError):
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or not self._within(value):
            raise argparse.ArgumentTypeError(f"expected {self.description}, got {text!r}")
        return value

    def _within(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(float(number))


def int_at_least(low: int) -> RangeChecker:
    """Integers ``≥ low`` (args: ``low``, the smallest accepted value)."""
    return RangeChecker(int, low, name=f"int_at_least_{low}")


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> RangeChecker:
    """Finite floats between ``low`` and ``high`` (``None``: unbounded), each bound
    excluded when ``low_open`` / ``high_open``."""
    return RangeChecker(float, low, high, low_open=low_open, high_open=high_open, name="float_in_range")


positive_int = RangeChecker(int, 1, name="positive_int")
"""Integers ≥ 1 (counts, ranks, steps, workers)."""
nonneg_int = RangeChecker(int, 0, name="nonneg_int")
"""Integers ≥ 0 (seeds, optional counts)."""
positive_float = RangeChecker(float, 0.0, low_open=True, name="positive_float")
"""Finite floats > 0 (learning rates, tolerances)."""
nonneg_float = RangeChecker(float, 0.0, name="nonneg_float")
"""Finite floats ≥ 0 (penalty weights)."""
open_fraction = RangeChecker(float, 0.0, 1.0, low_open=True, high_open=True, name="open_fraction")
"""Floats strictly between 0 and 1 (a ratio removed)."""
unit_fraction = RangeChecker(float, 0.0, 1.0, low_open=True, name="unit_fraction")
"""Floats in (0, 1] (a fraction kept)."""
closed_fraction = RangeChecker(float, 0.0, 1.0, name="closed_fraction")
"""Floats in [0, 1] (a similarity threshold)."""

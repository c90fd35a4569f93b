"""One rule set for every number a user gives, wherever it enters (a CLI option, a config file, a
Python argument, lm-eval's ``model_args``, a file a loader reads): finite, within its range, an
integer where a count is meant. A value that breaks its rule is an
:class:`~svdecode_pl.utils.errors.OptionError` naming the option and the value, raised before any
work starts. NaN and infinity are refused everywhere: a NaN strength makes every score NaN, and a
NaN row ranks its first answer highest (a silent "100%")."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from svdecode_pl.utils.errors import OptionError


@dataclass(frozen=True)
class Rule:
    """What a value must be: a finite number (or an integer), within ``[low, high]`` (an end
    excluded where ``*_open``), or None where ``optional``."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def or_none(self) -> Rule:
        return replace(self, optional=True)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            kind += f" in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"
        elif self.low is not None:
            kind += f" {'>' if self.low_open else '>='} {_fmt(self.low)}"
        elif self.high is not None:
            kind += f" {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return kind + (" (or null)" if self.optional else "")

    def problem(self, value: Any) -> str | None:
        """None when ``value`` keeps the rule, else what it should be."""
        if value is None:
            return None if self.optional else f"expected {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {self.describe()}"
        if self.integer and not isinstance(value, int):
            return f"expected {self.describe()}"
        if not math.isfinite(value):
            return f"expected {self.describe()}, not {'NaN' if math.isnan(value) else 'infinity'}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"expected {self.describe()}" if too_low or too_high else None


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


FINITE = Rule()
POSITIVE = Rule(low=0, low_open=True)
NON_NEGATIVE = Rule(low=0)
#: a share that must leave something: [0, 1) (a confidence threshold of 1 filters every entry)
FRACTION = Rule(low=0, high=1, high_open=True)
UNIT_INTERVAL = Rule(low=0, high=1)
POSITIVE_INT = Rule(integer=True, low=1)
COUNT = Rule(integer=True, low=0)


def check_value(name: str, value: Any, rule: Rule) -> Any:
    """``value`` when it keeps ``rule``; else an OptionError ``"<name> <value>: expected ..."``."""
    problem = rule.problem(value)
    if problem is not None:
        raise OptionError(f"{name} {value!r}: {problem}")
    return value


def check_values(prefix: str, values: dict[str, Any], rules: dict[str, Rule]) -> None:
    """Each of ``values`` that has a rule, named ``<prefix><name>`` (``--steering.`` + ``mu``)."""
    for name, value in values.items():
        rule = rules.get(name)
        if rule is None:
            continue
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                check_value(f"{prefix}{name}[{index}]", item, rule)
        else:
            check_value(f"{prefix}{name}", value, rule)

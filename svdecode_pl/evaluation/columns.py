"""The one owner of result columns: which (metric, variant or scored candidate) a value of the
per-question table is, how an evaluation record becomes a table row, and the column's text key
(``mc1/plain``, ``mc1/c3``) where a string is needed. Nothing else builds or parses those keys.

>>> Column("mc1", variant="plain").key, Column.from_key("acc/boolq/c2")
('mc1/plain', Column(metric='acc/boolq', variant=None, candidate=2))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from svdecode_pl.evaluation.items import VARIANTS, Record


@dataclass(frozen=True)
class Column:
    """One column: a metric, plain or steered (``variant``), or at the steering grid's ``candidate``-th entry."""

    metric: str
    variant: str | None = None
    candidate: int | None = None

    def __post_init__(self) -> None:
        one = (self.variant is None) != (self.candidate is None)
        if not self.metric or not one or self.variant not in (None, *VARIANTS):
            raise ValueError(f"a column is a metric with one variant {VARIANTS} or one candidate index: {self}")

    @property
    def key(self) -> str:
        """``<metric>/<variant>`` or ``<metric>/c<index>`` (a metric name may itself hold ``/``)."""
        return f"{self.metric}/{self.variant}" if self.variant is not None else f"{self.metric}/c{self.candidate}"

    @classmethod
    def from_key(cls, key: str) -> Column:
        metric, _, last = key.rpartition("/")
        if last in VARIANTS:
            return cls(metric, variant=last)
        if not metric or not last.startswith("c") or not last[1:].isdigit():
            raise ValueError(f"not a result column key: {key!r}")
        return cls(metric, candidate=int(last[1:]))


def table_columns(metric_names: list[str], candidates: int) -> list[Column]:
    """A test table's columns: every metric plain and steered, then at each of ``candidates`` grid entries."""
    columns = [Column(name, variant=variant) for name in metric_names for variant in VARIANTS]
    return columns + [Column(name, candidate=i) for name in metric_names for i in range(candidates)]


def record_row(record: Record) -> dict[Column, float]:
    """A record's values by column (a variant not evaluated, or a metric an item lacks: no entry)."""
    row = {Column(name, variant=variant): value for variant, values in record.metrics.items()
           for name, value in (values or {}).items()}
    for index, values in enumerate(record.grid_metrics or []):
        row.update({Column(name, candidate=index): value for name, value in values.items()})
    return row


def row_values(row: dict[Column, float], columns: list[Column]) -> list[float]:
    """The row's values in the order of ``columns`` (NaN where it has none)."""
    return [row.get(column, math.nan) for column in columns]

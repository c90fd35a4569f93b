"""Result columns have one owner (svdecode_pl/evaluation/columns.py): records become rows there, and
no other module builds or parses a ``<metric>/<variant>`` or ``<metric>/c<i>`` key."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from svdecode_pl.evaluation.columns import Column, record_row, row_values, table_columns
from svdecode_pl.evaluation.items import Record

PACKAGE = Path(__file__).resolve().parents[1] / "svdecode_pl"


@pytest.mark.parametrize("column", [Column("mc1", variant="plain"), Column("mc2", variant="steered"),
                                    Column("acc/boolq", candidate=3), Column("bleu_acc", candidate=0)])
def test_a_key_round_trips(column):
    assert Column.from_key(column.key) == column


@pytest.mark.parametrize("bad", ["mc1", "mc1/mu3", "mc1/c", "/plain", "mc1/cx"])
def test_a_key_that_is_no_column_is_refused(bad):
    with pytest.raises(ValueError):
        Column.from_key(bad)


def test_a_column_is_one_variant_or_one_candidate():
    for bad in ({}, {"variant": "plain", "candidate": 1}, {"variant": "mu3"}):
        with pytest.raises(ValueError):
            Column("mc1", **bad)


def test_a_record_becomes_a_table_row():
    record = Record(uid=7, id="q7", group="g", metrics={"plain": {"mc1": 1.0, "mc2": 0.5}, "steered": None},
                    grid_metrics=[{"mc1": 0.0}, {"mc1": 1.0, "mc2": 0.25}])
    columns = table_columns(["mc1", "mc2"], 2)
    assert [c.key for c in columns] == ["mc1/plain", "mc1/steered", "mc2/plain", "mc2/steered",
                                        "mc1/c0", "mc1/c1", "mc2/c0", "mc2/c1"]
    values = row_values(record_row(record), columns)
    assert values[0] == 1.0 and values[2] == 0.5 and values[4:] == [0.0, 1.0, values[6], 0.25]
    assert math.isnan(values[1]) and math.isnan(values[3]) and math.isnan(values[6])


def test_no_other_module_builds_or_parses_a_column_key():
    pattern = re.compile(r'/(plain|steered)"|/c\{|\}/\{variant\}|split\("/"\)\[-1\]')
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "columns.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


"""The ``>>>`` examples in the package's docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import svdecode_pl

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(svdecode_pl.__path__, "svdecode_pl.")
    if ">>>" in (importlib.util.find_spec(info.name).loader.get_source(info.name) or "")
)


def test_examples_exist():
    assert "svdecode_pl.scoring.packing" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0

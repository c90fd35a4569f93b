"""Shared fixtures: tiny real HF models built offline, small data files, the shared data dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_DATA_REASON = (
    f"real benchmark data not found at {SHARED_DATA} (CI has it; a user's clone does not: "
    "place the shared/ folder beside the repository to run these tests)"
)


def real_data(*parts: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(REAL_DATA_REASON)
    return path


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory) -> Path:
    """Built-in tiny models are built once per session, in a private cache."""
    cache = Path(os.environ.get("SVDECODE_TEST_CACHE", tmp_path_factory.mktemp("svdecode_cache")))
    os.environ["SVDECODE_CACHE"] = str(cache)
    return cache


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def mc_records(n: int = 6) -> list[dict]:
    """Small records in the official mc_task.json form."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "question": f"What happens if you break mirror number {i}?",
                "mc1_targets": {"Nothing happens.": 1, "Bad luck for years.": 0, "You die.": 0},
                "mc2_targets": {"Nothing happens.": 1, "Nothing in particular.": 1, "Bad luck for years.": 0,
                                "You die.": 0},
            }
        )
    return rows


@pytest.fixture
def mc_task_file(tmp_path) -> Path:
    path = tmp_path / "mc_task.json"
    path.write_text(json.dumps(mc_records()))
    return path


@pytest.fixture(autouse=True)
def _no_debug_environment():
    """``svdecode --debug`` sets SVDECODE_DEBUG in the process for the ranks it starts: a test that
    runs it in-process must not leave the next test printing tracebacks instead of one line."""
    os.environ.pop("SVDECODE_DEBUG", None)
    yield
    os.environ.pop("SVDECODE_DEBUG", None)

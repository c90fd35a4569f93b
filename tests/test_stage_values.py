"""Values, not shared mutable state, across stages: a steering vector with another strength or record is
a new vector, evaluation settings are replaced (frozen), and no module writes either in place."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "svdecode_pl"


def test_vectors_and_settings_are_values():
    """A strength or a record is a new vector; settings are replaced, never written in place."""
    import dataclasses

    import torch

    from svdecode_pl.evaluation.settings import EvaluationSettings
    from svdecode_pl.steering.vector import SteeringVector

    vector = SteeringVector(torch.ones(4), 1.0, metadata={"a": 1})
    moved, noted = vector.with_mu(3.0), vector.with_metadata(b=2)
    assert (vector.mu, vector.metadata) == (1.0, {"a": 1, "vocab_size": 4})
    assert moved.mu == 3.0 and noted.metadata == {"a": 1, "vocab_size": 4, "b": 2}
    settings = EvaluationSettings()
    steered = settings.with_steering(vector)
    assert settings.steering.vector is None and steered.steering.vector is vector
    with pytest.raises(dataclasses.FrozenInstanceError):
        steered.scoring.chunk_tokens = 1


def test_no_module_writes_a_vector_or_settings_in_place():
    pattern = re.compile(r"\.metadata\[[^]]+\] = |\.metadata\.update\(|vector\.(mu|choice|direction) = |"
                         r"\.evaluation\.\w+ = |\.use_steering\(")
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "vector.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []

"""The effect shows (issue 18, item 5): on the pre-trained miniature after a short warm-start,
steering (static, at the default strength choice) raises the held-out MC2 over plain, in each of 3 seeds.

The test can fail: set ``SVDECODE_EFFECT_BREAK`` to break the pipeline on purpose and run it again
(README, "Which strength", records the numbers):

- ``base``: the base logits of calibration taken from the adapted model (the adapter is not turned
  off), so the direction is the zero vector;
- ``negate``: the direction negated after the strength was chosen (the strength held fixed).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from svdecode_pl.cli.entry import run_cli

ROOT = Path(__file__).resolve().parents[1]
BREAK = os.environ.get("SVDECODE_EFFECT_BREAK", "")


def _break_pipeline(monkeypatch) -> None:
    """The deliberate faults: only when SVDECODE_EFFECT_BREAK names one."""
    from svdecode_pl.recipes.callbacks.steering import SteeringVectorCallback
    from svdecode_pl.steering import calibration

    if BREAK == "base":
        monkeypatch.setattr(calibration, "adapter_disabled", lambda model: contextlib.nullcontext())
    elif BREAK == "negate":
        choose = SteeringVectorCallback.choose

        def negated(self, trainer, pl_module, vector, fits):
            chosen = choose(self, trainer, pl_module, vector, fits)
            chosen.direction = -chosen.direction  # after the strength was chosen: it stays
            return chosen

        monkeypatch.setattr(SteeringVectorCallback, "choose", negated)
    elif BREAK:
        raise ValueError(f"SVDECODE_EFFECT_BREAK={BREAK!r}: expected 'base' or 'negate'")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_steering_at_the_default_estimate_beats_plain_on_held_out_questions(tmp_path, monkeypatch, seed):
    _break_pipeline(monkeypatch)
    common = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(tmp_path),
              "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
              "--trainer.callbacks", "[]", "--steering.mode", "static"]
    run_cli(["fit", *common])  # the quickstart's short warm-start (20 steps): part of the way
    run_cli(["test", *common, "--model.adapter_path", str(tmp_path / "adapter")])
    results = json.loads((tmp_path / "results.json").read_text())
    mc2 = results["metrics"]["mc2"]
    print(f"seed {seed} ({BREAK or 'intact'}): strength {results['steering']['choice']['rule']} "
          f"mu={results['steering']['mu']:.4g}, MC2 plain {100 * mc2['plain']:.2f} steered {100 * mc2['steered']:.2f}")
    assert mc2["steered"] > mc2["plain"] + 0.005, f"seed {seed}: steering did not raise held-out MC2: {mc2}"

"""MC1/MC2/MC3 on hand-computed cases, and deduplication of questions seen twice."""

from __future__ import annotations

import math

import pytest
import torch

from svdecode_pl.metrics.choice import mc1_score, mc2_score, mc3_score
from svdecode_pl.metrics.per_question import PerQuestionMean


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_mc1():
    assert mc1_score(t(-1.0, -2.0, -3.0), torch.tensor([1, 0, 0])) == 1.0
    assert mc1_score(t(-2.0, -1.0, -3.0), torch.tensor([1, 0, 0])) == 0.0
    # a tie goes to the first answer, as lm-eval's argmax does
    assert mc1_score(t(-1.0, -1.0), torch.tensor([1, 0])) == 1.0


def test_mc2_hand_computed():
    scores, labels = t(math.log(0.2), math.log(0.1), math.log(0.3)), torch.tensor([1, 1, 0])
    assert mc2_score(scores, labels) == pytest.approx(0.3 / 0.6)
    # shifting all log-likelihoods (long answers underflowing exp) changes nothing
    assert mc2_score(scores - 2000.0, labels) == pytest.approx(0.5)


def test_mc3_hand_computed():
    scores, labels = t(-1.0, -5.0, -2.0, -3.0), torch.tensor([1, 1, 1, 0])
    assert mc3_score(scores, labels) == pytest.approx(2 / 3)
    assert mc3_score(t(-3.0, -1.0), torch.tensor([1, 0])) == 0.0
    assert mc3_score(t(-1.0, -1.0), torch.tensor([1, 0])) == 0.0  # strictly above


def test_per_question_mean_counts_each_question_once():
    metric = PerQuestionMean()
    metric.update(torch.tensor([0, 1]), t(1.0, 0.0))
    metric.update(torch.tensor([2, 0]), t(1.0, 1.0))  # question 0 again (padding sampler)
    assert float(metric.compute()) == pytest.approx(2 / 3)
    assert metric.num_questions == 3

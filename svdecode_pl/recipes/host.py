"""What the LightningModule lends the steering callback: the narrow interface of the fit end.

The callback extracts the vector, scores the strength estimates and writes the run's artifacts
through this record alone, so it never reaches into the module (and the module never needs to know
in which order Lightning calls the two). The record is taken at the fit end, while the strategy still
holds the model on the device it trained on: ``device`` is that device, where every metric state the
extraction gathers must live (NCCL gathers CUDA tensors only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdecode_pl.evaluation.settings import EvaluationSettings
from svdecode_pl.steering.strength import Candidate
from svdecode_pl.steering.vector import SteeringVector


@dataclass(frozen=True)
class SteeringHost:
    """The model the vector is extracted from, and what the callback may do with it."""

    model: nn.Module
    """The (PEFT) model, on ``device``; under ZeRO-3 its parameters are shards (forward passes on
    every process gather them)."""
    vocab_size: int
    """Logits per position (the output head's rows)."""
    device: torch.device
    """The device the model trained on; extraction, estimates and their metric states run here."""
    tokenizer: Any
    evaluation: EvaluationSettings
    """The module's evaluation settings when the record was taken (scoring options, the attached steering)."""
    metadata: dict[str, Any]
    """What a steering vector records of the model it was extracted from (name, adapter type, vocabulary
    size, tokenizer fingerprint)."""
    attach_steering: Callable[[SteeringVector | None, dict[str, list[float]], list[Candidate]], None]
    """Has the module replace its evaluation settings by ones steering with this vector, its strength
    curves (mode -> strengths) and further candidates (the module is their one owner)."""
    save_adapter: Callable[[str | Path], None]
    """Writes the adapter in PEFT's format into a directory: every process calls it (collective under
    ZeRO-3), the first one writes."""

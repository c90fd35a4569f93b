"""How generation decodes: the settings a task or a user gives, and the sampling warpers they imply."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from svdecode_pl.utils.errors import OptionError

#: Beam search's length penalty and early stopping, for ``generate`` and the dynamic loop alike
#: (transformers' defaults: finished beams score sum(log p) / length; the heuristic early stop).
BEAM_LENGTH_PENALTY = 1.0
BEAM_EARLY_STOPPING: bool | str = False


@dataclass
class GenerationSettings:
    """How to decode; the same settings give the same tokens, whatever the checkpoint's defaults."""

    max_new_tokens: int = 256
    """Most tokens generated per prompt."""
    do_sample: bool = False
    """Sample from the (warped) distribution; False: greedy, or beam search with num_beams > 1."""
    temperature: float = 1.0
    """Sampling temperature (sampling only)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1.0: off)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: off)."""
    num_beams: int = 1
    """Beam search with this many beams (1: off); with any steering, static or dynamic."""
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    """Stop strings (lm-eval truthfulqa_gen's ``until``): the text is cut at the first one; EOS always stops."""
    seed: int | None = None
    """Sampling seed: the same seed gives the same samples (None: the global generator as it is)."""
    compile: bool | Literal["auto"] = "auto"
    """Compiled decoding: a static KV cache and a ``torch.compile``'d step (CUDA graphs on a GPU);
    ``auto``: on CUDA only (the device default, printed and recorded in results.json)."""
    merge_adapter: bool = True
    """Plain and static-steered decoding of a LoRA / IA3 model on the adapter merged into the weights
    (restored exactly afterwards); dynamic steering always runs unmerged."""

    def __post_init__(self) -> None:
        """A bad value is the user's (``OptionError``: one line from ``svdecode``, exit status 2)."""
        problems = [
            (self.max_new_tokens < 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.do_sample and not self.temperature > 0.0, f"sampling needs temperature > 0, got {self.temperature}"),
            (not math.isfinite(self.temperature), f"temperature must be a finite number, got {self.temperature}"),
            (not 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k < 0, f"top_k must be >= 0 (0: off), got {self.top_k}"),
            (self.num_beams < 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (not (self.compile == "auto" or isinstance(self.compile, bool)),
             f"compile must be auto, true or false, got {self.compile!r}"),
        ]
        for failed, message in problems:
            if failed:
                raise OptionError(f"generation settings: {message}")
        self.stop = list(self.stop)


def sampling_warpers(settings: GenerationSettings, min_tokens_to_keep: int = 1) -> LogitsProcessorList:
    """The warpers ``generate`` applies when sampling, in its order (temperature, top-k, top-p);
    beam sampling keeps ``#EOS + 1`` tokens, as ``generate`` does."""
    warpers = LogitsProcessorList()
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=settings.top_k, min_tokens_to_keep=min_tokens_to_keep))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=settings.top_p, min_tokens_to_keep=min_tokens_to_keep))
    return warpers

"""Steered decoding with any transformers ``generate``: a LogitsProcessor.

    processor = SteeringLogitsProcessor(SteeringVector.load("runs/x/steering"))
    model.generate(**inputs, logits_processor=[processor])

Under beam search transformers hands the processors log-probabilities, not logits: the processor
detects them (every row's maximum <= 0 and log-sum-exp 0) and renormalises after steering, so
steered beams rank by log_softmax(z + mu*d), not by log_softmax(z) + mu*d, with no flag to
remember. Greedy decoding and sampling see raw logits (a positive maximum: one reduction, the
check ends there) and are left as they are.

Dynamic steering needs the pre-trained model's logits of each step: pass ``base_model`` (for a
PeftModel, the processor runs the same model with the adapter disabled, keeping its own cache).
:func:`svdecode_pl.decoding.generation.generate_texts` runs dynamic steering in its own two-cache loop instead.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LogitsProcessor

from svdecode_pl.models.heads import adapter_disabled
from svdecode_pl.steering.vector import SteeringVector


def are_log_probabilities(scores: torch.Tensor, tolerance: float = 1e-3) -> bool:
    """Are these scores normalised log-probabilities (what beam search hands its processors)?

    Raw logits almost always have a positive maximum: then one max-reduction answers. Scores
    whose every row is <= 0 are log-probabilities when each row's log-sum-exp is 0 (rows of
    -inf only, such as masked ones, are left out). A row of raw logits that happens to pass is
    harmless: greedy choice and sampling are unchanged by renormalising.
    """
    if bool((scores.amax(dim=-1) > 0).any()):
        return False
    totals = torch.logsumexp(scores.float(), dim=-1)
    finite = torch.isfinite(totals)
    return bool(finite.any()) and bool((totals[finite].abs() < tolerance).all())


class SteeringLogitsProcessor(LogitsProcessor):
    """Replaces each step's scores z_phi by z_phi + mu * delta_z.

    Put it first in the processor list: it expects raw logits, before temperature or top-k.
    """

    def __init__(
        self,
        steering_vector: SteeringVector,
        base_model: nn.Module | None = None,
        attention_mask: torch.Tensor | None = None,
        log_probs: bool | None = None,
    ) -> None:
        """
        Args:
            steering_vector: The fitted vector (static or dynamic).
            base_model: Dynamic mode only: the model whose adapter-disabled logits are p_theta
                (a PeftModel; any other model is used as it is).
            attention_mask: Dynamic mode with a left-padded batch: the prompt's attention mask.
            log_probs: Kept for compatibility: True renormalises after steering at every step;
                None or False detect log-probabilities (beam search) step by step.
        """
        if steering_vector.needs_base_logits and base_model is None:
            raise ValueError("dynamic steering needs base_model to compute the pre-trained logits")
        self.steering_vector = steering_vector
        self.base_model = base_model
        self.prompt_mask = attention_mask
        self.log_probs = log_probs
        self._shift: torch.Tensor | None = None  # static mu * d, on the scores' device
        self._cache = None
        self._seen = 0

    def reset(self) -> None:
        """Forget the base model's cache (call between unrelated ``generate`` calls)."""
        self._cache, self._seen = None, 0

    @torch.no_grad()
    def _base_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._seen > input_ids.shape[1] or (self._seen and self._cache is None):
            self.reset()
        if self.prompt_mask is not None:
            extra = input_ids.shape[1] - self.prompt_mask.shape[1]
            mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(input_ids.shape[0], extra)], dim=1)
        else:
            mask = torch.ones_like(input_ids)
        new = input_ids[:, self._seen :]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, self._seen :]
        with adapter_disabled(self.base_model):
            out = self.base_model(
                input_ids=new, attention_mask=mask, position_ids=positions, past_key_values=self._cache, use_cache=True,
            )
        self._cache, self._seen = out.past_key_values, input_ids.shape[1]
        return out.logits[:, -1].float()

    def _static_shift(self, scores: torch.Tensor) -> torch.Tensor:
        """mu * d, computed once (as :meth:`SteeringVector.shift` does) on the scores' device."""
        if self._shift is None or self._shift.device != scores.device:
            self._shift = self.steering_vector.shift(scores[:1])[0].contiguous()
        return self._shift

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vector = self.steering_vector
        normalised = not self.log_probs and vector.mu != 0.0 and are_log_probabilities(scores)
        if vector.needs_base_logits:
            steered = vector.steer(scores, self._base_logits(input_ids))
        else:
            if scores.shape[-1] != vector.vocab_size:
                raise ValueError(
                    f"scores have {scores.shape[-1]} vocabulary entries, the steering vector {vector.vocab_size}"
                )
            # transformers hands processors a fresh float32 copy of the step's logits (or
            # log-probabilities): steer it in place, no (B, V) tensor per step
            steered = scores.add_(self._static_shift(scores)) if scores.dtype == torch.float32 else vector.steer(scores)
        if vector.mu != 0.0 and (self.log_probs or normalised):  # a zero shift leaves them normalised
            steered = torch.log_softmax(steered, dim=-1)
        return steered.to(scores.dtype)

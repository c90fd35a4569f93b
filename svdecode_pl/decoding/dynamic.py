"""Dynamic steering's own decoding loop: the adapted and the base model side by side (:mod:`.streams`;
LoRA: as one doubled batch, :mod:`.mixed_dynamic`), with their key/value caches (dynamic, or static with
compiled steps, :mod:`.compiled`), the direction recomputed from both logits at every step; greedy,
sampling, or beam search (:mod:`.beams`, the caches reordered with the beams)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers import (
    LogitsProcessorList,
    StoppingCriteriaList,
)

from svdecode_pl.decoding.beams import beam_search
from svdecode_pl.decoding.mixed_dynamic import RowMaskUnsupported, mixed_streams
from svdecode_pl.decoding.settings import GenerationSettings, sampling_warpers
from svdecode_pl.decoding.streams import Streams, TwoStreams
from svdecode_pl.models.heads import hf_model
from svdecode_pl.steering.vector import SteeringVector


@dataclass
class DynamicDecodeOutput:
    """What :func:`dynamic_steered_decode` produced."""

    sequences: torch.Tensor
    """(B, L + new) prompt and generated ids (pad after a row ends)."""
    adapted_logits: list[torch.Tensor] = field(default_factory=list)
    """Per step, the adapted model's (B, V) float32 logits (with ``keep_logits`` only)."""
    base_logits: list[torch.Tensor] = field(default_factory=list)
    """Per step, the pre-trained model's (B, V) float32 logits (with ``keep_logits`` only)."""


@torch.no_grad()
def dynamic_steered_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    steering: SteeringVector,
    criteria: StoppingCriteriaList,
    pad_id: int,
    keep_logits: bool = False,
    one_pass: bool = True,
    compiled: bool = False,
) -> DynamicDecodeOutput:
    """Greedy, sampled or beam-search decoding of a left-padded batch with steering recomputed at every step.

    Per step the adapted and the pre-trained model each run once on the new token with their
    own KV cache (no re-encoding); the output head maps both states' hidden states in one matrix
    product (its weights are read once: at a 152k vocabulary the head is most of a small
    model's step), and the token is chosen from ``steering.steer(adapted, base)``
    as ``generate`` would choose it from logits (same warpers, same ``multinomial`` draw, pad
    after a row has stopped; under beam search, the same scoring of log_softmax of the steered
    logits, see :mod:`.beams`), so a zero ``mu`` gives ``generate``'s tokens. With
    ``one_pass`` and a LoRA adapter both states run in one forward of a doubled batch, each LoRA
    layer's update masked per row (:mod:`.mixed_dynamic`). ``compiled``: static caches and
    compiled steps (:mod:`.compiled`). With beams, ``keep_logits`` keeps each step's logits of the
    running beams (B * num_beams rows).
    """
    if settings.num_beams > 1:  # every prompt once per beam, as ``generate`` expands its inputs
        input_ids = input_ids.repeat_interleave(settings.num_beams, dim=0)
        attention_mask = attention_mask.repeat_interleave(settings.num_beams, dim=0)
    max_length = input_ids.shape[1] + settings.max_new_tokens
    decode = partial(_decode, model, input_ids=input_ids, settings=settings, steering=steering, criteria=criteria,
                     pad_id=pad_id, keep_logits=keep_logits)
    if one_pass:
        try:
            with mixed_streams(model, attention_mask, max_length, compiled) as mixed:
                if mixed is not None:
                    return decode(mixed)
        except RowMaskUnsupported:  # found in the prefill, before any token was drawn
            pass
    return decode(TwoStreams(model, attention_mask, max_length, compiled))


def _decode(model: nn.Module, streams: Streams, *, input_ids: torch.Tensor, settings: GenerationSettings,
            steering: SteeringVector, criteria: StoppingCriteriaList, pad_id: int,
            keep_logits: bool) -> DynamicDecodeOutput:
    """The token loop of :func:`dynamic_steered_decode` over either kind of streams."""
    head = hf_model(model).get_output_embeddings()
    batch = input_ids.shape[0]
    output = DynamicDecodeOutput(input_ids)

    def logits_of(hidden: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(torch.cat(hidden)).float()
        return logits[:batch], logits[batch:]

    def record(adapted: torch.Tensor, base: torch.Tensor) -> None:
        output.adapted_logits.append(adapted.clone())
        output.base_logits.append(base.clone())

    if settings.num_beams > 1:
        def advance(tokens: torch.Tensor | None, beam_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            if tokens is None:
                return logits_of(streams.prefill(input_ids))
            streams.reorder(beam_idx)
            return logits_of(streams.step(tokens))

        output.sequences = beam_search(advance, input_ids, settings, steering, criteria, pad_id,
                                       record if keep_logits else None)
        return output
    warpers = sampling_warpers(settings) if settings.do_sample else LogitsProcessorList()
    adapted, base = logits_of(streams.prefill(input_ids))
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    pad_eos = any(hasattr(c, "eos_token_id") for c in criteria)
    sequences = input_ids
    while True:
        if keep_logits:
            record(adapted, base)
        scores = steering.steer(adapted, base)
        if settings.do_sample:
            probs = torch.softmax(warpers(sequences, scores), dim=-1)
            tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if pad_eos:
            tokens = tokens * unfinished + pad_id * (1 - unfinished)
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~criteria(sequences, None)
        if unfinished.max() == 0:
            break
        adapted, base = logits_of(streams.step(tokens))
    output.sequences = sequences
    return output

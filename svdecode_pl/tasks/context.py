"""Inputs that fit the model's context: a prompt longer than the model reads at once is cut from the
left, as lm-evaluation-harness does (the last ``max_length`` tokens are kept), with one warning line
that says how many; one whose answer alone does not fit is refused in one line. Beyond its context a
model still runs (rotary positions extrapolate), so without this such questions were scored silently."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from svdecode_pl.evaluation.items import ChoiceItem, EvalItem, GenerationItem
from svdecode_pl.models.loading import resolve_name_or_path
from svdecode_pl.utils.errors import DataFormatError, user_warning

#: config fields that give a model's context length, by architecture
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@functools.lru_cache(maxsize=16)
def model_context_limit(name_or_path: str) -> int | None:
    """The most tokens ``name_or_path`` reads at once, from its config alone (None: not recorded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_name_or_path(name_or_path)).get_text_config()
    except (OSError, ValueError):
        return None  # the model's own loading reports a bad name in one line
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _overflow(item: EvalItem, limit: int, new_tokens: int) -> tuple[int, int]:
    """(tokens the item needs besides its prompt, tokens too many) for ``limit``."""
    if isinstance(item, ChoiceItem):
        # the model reads context + answer but its last token (lm-eval: (context + continuation)[-(L+1):][:-1])
        need = max((len(c) for c in item.continuation_ids), default=0) - 1
    elif isinstance(item, GenerationItem):
        need = item.max_new_tokens or new_tokens
    else:
        need = 0
    return need, len(item.context_ids) + need - limit


def fit_items_to_context(items: list[EvalItem], limit: int | None, new_tokens: int, where: str) -> list[EvalItem]:
    """Evaluation items whose prompt (plus its longest answer, or the tokens to generate) exceeds
    ``limit``, with the prompt cut from the left; one warning line when any was cut."""
    if limit is None:
        return items
    cut = 0
    for item in items:
        need, over = _overflow(item, limit, new_tokens)
        if over <= 0:
            continue
        if over >= len(item.context_ids):
            raise DataFormatError(f"{where}: question {item.id!r}: its answer needs {need} tokens, the model's "
                                  f"context holds {limit}: shorten it or use a model with a longer context")
        item.context_ids = item.context_ids[over:]
        cut += 1
    if cut:
        user_warning(f"{where}: {cut} of {len(items)} questions exceed the model's context of {limit} tokens: their "
                     "prompts are cut from the left to fit, as lm-eval does")
    return items


def fit_examples_to_context(examples: list[Any], limit: int | None, where: str) -> list[Any]:
    """Warm-start and calibration sequences (:class:`~svdecode_pl.tasks.base.LMExample`) of at most
    ``limit`` tokens, cut from the left; one warning line when any was cut."""
    if limit is None:
        return examples
    fitted, cut = [], 0
    for index, example in enumerate(examples):
        over = len(example.input_ids) - limit
        if over > 0:
            if over >= example.num_context:
                raise DataFormatError(f"{where}: example {index}: its target alone has "
                                      f"{len(example.input_ids) - example.num_context} tokens, the model's context "
                                      f"holds {limit}")
            example = replace(example, input_ids=example.input_ids[over:], num_context=example.num_context - over)
            cut += 1
        fitted.append(example)
    if cut:
        user_warning(f"{where}: {cut} of {len(examples)} sequences exceed the model's context of {limit} tokens: "
                     "their prompts are cut from the left to fit")
    return fitted

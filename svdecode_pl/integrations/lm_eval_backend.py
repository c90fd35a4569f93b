"""SVDecode steering inside lm-evaluation-harness (0.4.x): a model class for any lm-eval task.

lm-eval is an optional extra (``pip install svdecode-pl[lm-eval]``); this module imports it at the
top, so import it only when lm-eval is wanted (``svdecode lm-eval`` does).

Hook points of ``lm_eval.models.huggingface.HFLM`` (0.4.13), the same two that lm-eval's own
activation-steering class (``hf_steered.py``) overrides:

* ``_model_call(inps, attn_mask, labels) -> logits``: every log-likelihood request
  (``loglikelihood``, ``loglikelihood_rolling``) goes through it, right before lm-eval's
  ``log_softmax``. We return z_phi + mu * delta_z (float32); dynamic steering runs a second pass
  with the adapter disabled for the base logits, as our own scorer does.
* ``_model_generate(context, max_length, stop, **kw)``: every ``generate_until`` batch; we put
  :class:`SteeringLogitsProcessor` first in ``logits_processor``.

Steering off (no vector, or mu == 0) calls HFLM's methods untouched: HFLM's numbers exactly.

    lm = SteeredHFLM(pretrained=..., peft=..., steering=..., batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["truthfulqa_mc2"])
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import LogitsProcessorList

from svdecode_pl.models.heads import adapter_disabled, is_peft_model, output_vocab_size
from svdecode_pl.steering.processor import SteeringLogitsProcessor
from svdecode_pl.steering.values import check_steering_values
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.errors import OptionError

#: the name lm-eval's registry (and ``--model``) knows the class by
MODEL_NAME = "svdecode"


def load_steering(steering: str | Path | SteeringVector | None) -> SteeringVector | None:
    """A vector from its directory, or from an artifact directory holding it in ``steering/``."""
    if steering is None or steering == "" or isinstance(steering, SteeringVector):
        return steering or None
    path = Path(steering)
    if not (path / "steering_vector.json").exists() and (path / "steering" / "steering_vector.json").exists():
        path = path / "steering"
    return SteeringVector.load(path)


@register_model(MODEL_NAME, "svdecode-steered")
class SteeredHFLM(HFLM):
    """HFLM whose logits are z_phi + mu * delta_z (static or dynamic SVDecode steering).

    Model args besides HFLM's own (e.g. ``peft=<adapter dir>``):
      steering: a steering vector directory (or an artifact directory with ``steering/``)
      mu: override the vector's strength (0 gives HFLM's numbers); mu_scale: multiply it
      steer_generation: steer ``generate_until`` too (default True)
    """

    def __init__(self, pretrained: Any = None, steering: Any = None, mu: float | None = None, mu_scale: float = 1.0,
                 steer_generation: bool = True, **kwargs: Any) -> None:
        if pretrained is None:
            raise OptionError("model_args: pretrained=<hub id or model directory> is missing")
        check_steering_values("model_args ", mu=mu, mu_scale=mu_scale)
        with model_args_checked(kwargs):
            super().__init__(pretrained=pretrained, **kwargs)
        vector = load_steering(steering)
        if vector is not None:
            if mu is not None or float(mu_scale) != 1.0:
                vector = vector.with_mu((vector.mu if mu is None else float(mu)) * float(mu_scale))
            vector.check_compatible(output_vocab_size(self.model), None, source=f"steering={steering}")
            if vector.needs_base_logits and not is_peft_model(self.model):
                raise OptionError("model_args 'steering': a dynamic vector needs a PEFT adapter (peft=...): "
                                  "without one the base and adapted logits are the same")
        self.steering = vector
        self.steer_generation = str(steer_generation).lower() not in ("false", "0", "no")

    @property
    def steering_active(self) -> bool:
        return self.steering is not None and self.steering.mu != 0.0

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = super()._model_call(inps, attn_mask, labels)
        if not self.steering_active:
            return logits
        base = None
        if self.steering.needs_base_logits:
            with adapter_disabled(self.model):
                base = super()._model_call(inps, attn_mask, labels)
            if base.shape[1] != logits.shape[1]:  # prompt learning: virtual tokens in front
                virtual = logits.shape[1] - base.shape[1]
                out = logits.float().clone()
                out[:, virtual:] = self.steering.steer(logits[:, virtual:], base)
                return out
        return self.steering.steer(logits, base)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        if self.steering_active and self.steer_generation:
            base = self.model if self.steering.needs_base_logits else None
            mask = generation_kwargs.get("attention_mask") if base is not None else None
            processor = SteeringLogitsProcessor(self.steering, base_model=base, attention_mask=mask,
                                                log_probs=(generation_kwargs.get("num_beams") or 1) > 1)
            others = list(generation_kwargs.pop("logits_processor", None) or [])
            generation_kwargs["logits_processor"] = LogitsProcessorList([processor, *others])
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


@contextlib.contextmanager
def model_args_checked(kwargs: dict[str, Any]) -> Iterator[None]:
    """HFLM hands ``model_args`` it does not know to ``from_pretrained``, where a misspelt one ends in
    a TypeError deep in the model class; here it is one line naming it, with the closest valid names."""
    try:
        yield
    except TypeError as error:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unexpected is None or unexpected.group(1) not in kwargs:
            raise
        name = unexpected.group(1)
        known = [*inspect.signature(SteeredHFLM.__init__).parameters, *inspect.signature(HFLM.__init__).parameters]
        close = difflib.get_close_matches(name, [k for k in known if k not in ("self", "kwargs")], n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise OptionError(f"model_args '{name}': not an argument of the svdecode model, HFLM or the model's "
                          f"from_pretrained{hint}") from error


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's ``run`` argv with ``--model svdecode`` unless the user named a model."""
    args = list(args[1:] if args[:1] == ["run"] else args)
    if "--model" not in args and not any(a.startswith("--model=") for a in args):
        args = ["--model", MODEL_NAME, *args]
    return ["lm-eval", "run", *args]

"""SVDecode steered decoding for transformers' ``custom_generate`` (written by svdecode-pl).

    model.generate(**inputs, custom_generate="<artifact dir or Hub repo>", trust_remote_code=True)

transformers copies this file into its module cache, so the artifact's location is written in
below (``ARTIFACT_DIR``, ``REPO_ID``); ``steering=<dir>`` and ``steering_mu=<float>`` override.
Only installed packages may be imported here: torch, transformers, safetensors (huggingface_hub
for a Hub repo). Static steering only: dynamic steering needs the adapter switched off at every
step, which the PeftModel does (``svdecode_pl.integrations.artifact.load_steered``).
"""

import json
import os

import torch
from transformers import LogitsProcessor, LogitsProcessorList

ARTIFACT_DIR = None
REPO_ID = None


def steering_dir(steering=None):
    """The steering vector's directory: given, beside the artifact, or downloaded from the Hub."""
    if steering:
        return steering
    if ARTIFACT_DIR and os.path.isfile(os.path.join(ARTIFACT_DIR, "steering", "steering_vector.json")):
        return os.path.join(ARTIFACT_DIR, "steering")
    if REPO_ID:
        from huggingface_hub import snapshot_download

        return os.path.join(snapshot_download(REPO_ID, allow_patterns=["steering/*"]), "steering")
    raise ValueError("custom_generate: no steering vector found (pass steering=<directory>)")


class StaticSteering(LogitsProcessor):
    """scores + mu * d (renormalised when the scores are log-probabilities, under beam search)."""

    def __init__(self, shift, log_probs=False):
        self.shift, self.log_probs = shift, log_probs

    def __call__(self, input_ids, scores):
        steered = scores.float() + self.shift.to(scores.device)
        if self.log_probs:
            steered = torch.log_softmax(steered, dim=-1)
        return steered.to(scores.dtype)


def generate(model, *args, steering=None, steering_mu=None, **kwargs):
    """``model.generate`` with the artifact's static steering first among the logits processors."""
    from safetensors.torch import load_file

    path = steering_dir(steering)
    with open(os.path.join(path, "steering_vector.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta["mode"] != "static":
        raise ValueError("custom_generate: dynamic steering is not supported here; use "
                         "svdecode_pl.integrations.artifact.load_steered")
    mu = float(meta["mu"] if steering_mu is None else steering_mu)
    direction = load_file(os.path.join(path, "steering_vector.safetensors"))["direction"]
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    config = kwargs.get("generation_config") or model.generation_config
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    processors = LogitsProcessorList([StaticSteering(mu * direction, beams > 1),
                                      *(kwargs.pop("logits_processor", None) or [])])
    return model.generate(*args, logits_processor=processors, **kwargs)

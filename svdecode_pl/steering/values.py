"""The rules of every steering value, the same wherever it enters: the steering callback's options
(CLI and config file), :class:`~svdecode_pl.steering.vector.SteeringVector` and its artifact
loader, :func:`~svdecode_pl.integrations.artifact.load_steered`, lm-eval's ``model_args`` and
``svdecode logit-bias``."""

from __future__ import annotations

from typing import Any

from svdecode_pl.utils.validation import FINITE, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Rule, check_values

STEERING_RULES: dict[str, Rule] = {
    "mu": FINITE.or_none(),
    "strength": FINITE,  # a fixed strength; a rule's name is checked by the callback
    "mu_scale": FINITE,
    "confidence_threshold": FRACTION,
    "filter_threshold": FRACTION,
    "min_gain": FRACTION,
    "eps": NON_NEGATIVE,
    "mu_grid": FINITE,
    "clamp": POSITIVE,
    "max_entries": POSITIVE_INT.or_none(),
}


def check_steering_values(prefix: str, **values: Any) -> None:
    """Each steering value named ``<prefix><name>`` (``--steering.mu``, ``load_steered: mu``)."""
    check_values(prefix, values, STEERING_RULES)

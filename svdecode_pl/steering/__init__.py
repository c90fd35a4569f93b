"""Stage 4, the method (plain torch, no Lightning): the steering direction, mu*, the vector artifact,
the strength choice, the calibration statistics and pass, and the logits processor. May import stages 0-3.

>>> import torch
>>> from svdecode_pl.steering import steering_direction
>>> adapted, base = torch.tensor([[2.0, 0.0, 0.0]]), torch.zeros(1, 3)  # the warm-start favours token 0
>>> steering_direction(adapted, base)  # points back toward the base model: less of token 0
tensor([[-0.3353,  0.1676,  0.1676]])
"""

from svdecode_pl.steering.strength import Candidate, ModeEstimates, StrengthChoice
from svdecode_pl.steering.vector import (
    FORMAT_VERSION,
    SteeringMode,
    SteeringVector,
    fine_tuning_gradient,
    optimal_strength,
    steering_direction,
    steering_sums,
    steering_vector_from_sums,
)

__all__ = [
    "FORMAT_VERSION",
    "Candidate",
    "ModeEstimates",
    "StrengthChoice",
    "SteeringMode",
    "SteeringVector",
    "fine_tuning_gradient",
    "optimal_strength",
    "steering_direction",
    "steering_sums",
    "steering_vector_from_sums",
]

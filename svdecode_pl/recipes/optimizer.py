"""The warm-start's optimizer: torch's AdamW or SGD, or DeepSpeed's CPU AdamW under
ZeRO-Offload (DeepSpeed refuses a torch optimizer there)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from svdecode_pl.models.zero import offloads_optimizer

OptimizerName = Literal["adamw", "sgd"]


def build_optimizer(
    params: list[nn.Parameter], name: OptimizerName, learning_rate: float, weight_decay: float, trainer: Any = None
) -> torch.optim.Optimizer:
    """The optimizer ``name`` in the form the strategy can run.

    ``sgd`` is plain SGD (no momentum), whose update is proportional to the gradient. Under
    ZeRO-Offload DeepSpeed refuses torch optimizers ("ZeRO-Offload with a client provided
    optimizer"): ``adamw`` is then DeepSpeed's ``DeepSpeedCPUAdam`` in AdamW mode (same update as
    ``torch.optim.AdamW``; its C++ op is compiled on first use), and there is no CPU SGD.
    """
    if offloads_optimizer(trainer):
        if name != "adamw":
            raise ValueError(f"optimizer {name!r} cannot run under ZeRO-Offload (offload_optimizer): use 'adamw'")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=learning_rate, weight_decay=weight_decay, adamw_mode=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (expected 'adamw' or 'sgd')")

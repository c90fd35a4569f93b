"""Decoding on merged adapter weights, restored bit for bit afterwards.

Where one model state decodes (plain, or steered by a static vector) a LoRA / IA3 layer costs the
same as the frozen layer once its update is merged into the weights: no extra kernels per layer,
which is most of an unmerged model's step at batch 1 on a GPU. PEFT's ``merge_adapter`` does the
arithmetic; undoing it by PEFT's ``unmerge_adapter`` alone would leave ``(W + dW) - dW``, which is not
``W`` in floating point and would drift a little further with every batch, into the scores and the
dynamic loop's base model (adapter off) of later passes. So the touched weights are copied first,
PEFT's own bookkeeping is undone by ``unmerge_adapter``, and the copies are written back into the
weights' original storage (the same addresses, which compiled CUDA graphs depend on), also when
decoding raises. The copies live on the weights' device when they fit in :data:`BACKUP_SHARE` of its
free memory, else in (pinned) host memory: at 7B on a small GPU a second copy of the weights would
not fit beside the decoding batch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from svdecode_pl.models.peft_methods import lacks

#: Frozen layer types whose merge is plain arithmetic on dense weights (a quantized base layer would
#: be dequantized and requantized: lossy, so such a model decodes unmerged).
_DENSE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
#: Largest share of a GPU's free memory the weights' copies may take there (else they go to the host).
BACKUP_SHARE = 0.25


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def merge_support(model: nn.Module) -> tuple[bool, str]:
    """(mergeable, why not): a PeftModel whose adapter layers wrap dense, unpartitioned, unmerged weights."""
    why_not = lacks(model, "mergeable")
    if why_not is not None:
        return False, why_not
    layers = _tuner_layers(model)
    if not layers:
        return False, "no adapter layers"
    from transformers.pytorch_utils import Conv1D

    for layer in layers:
        base = layer.get_base_layer()
        if not isinstance(base, (*_DENSE, Conv1D)):
            return False, f"{type(base).__name__}: not a dense layer (quantized?)"
        if layer.merged:
            return False, "already merged"
        if any(hasattr(p, "ds_id") for p in base.parameters(recurse=False)):
            return False, "weights partitioned (DeepSpeed ZeRO-3)"
    return True, ""


@contextlib.contextmanager
def merged_adapter(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within: the active adapter merged into the weights (yields True), or the model as it is
    (yields False: disabled, or :func:`merge_support` says no). Afterwards every weight is again
    exactly what it was, in the same storage, and PEFT's layers are unmerged."""
    if not enabled or not merge_support(model)[0]:
        yield False
        return
    params = [p for layer in _tuner_layers(model) for p in layer.get_base_layer().parameters(recurse=False)]
    host = _backup_on_host(params)
    saved = [(p, p.data, _copy(p.data, host)) for p in params]
    try:
        with torch.no_grad():
            model.merge_adapter()
            for param, storage, _ in saved:  # IA3 merges into new tensors: back into the original storage
                if param.data.data_ptr() != storage.data_ptr():
                    storage.copy_(param.data)
                    param.data = storage
        yield True
    finally:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unmerge result can be inaccurate")  # IA3's; the copies are exact
            if any(layer.merged for layer in _tuner_layers(model)):
                model.unmerge_adapter()  # PEFT's bookkeeping (merged_adapters, DoRA's caches)
            for param, storage, original in saved:
                storage.copy_(original)
                param.data = storage


def _copy(tensor: torch.Tensor, host: bool) -> torch.Tensor:
    if not host:
        return tensor.clone()
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)


def _backup_on_host(params: list[nn.Parameter]) -> bool:
    """Whether the weights' copies go to host memory: on CUDA, when they would take more than
    :data:`BACKUP_SHARE` of the device's free memory."""
    device = params[0].device if params else torch.device("cpu")
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(p.numel() * p.element_size() for p in params) > BACKUP_SHARE * free

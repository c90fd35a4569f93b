"""Streaming, process-synchronised estimation of a steering vector.

A torchmetrics Metric holds the sufficient statistics (sums only), so torchmetrics reduces them
across processes by addition and the result is the same on 1 and on N processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torchmetrics import Metric

from svdecode_pl.models.heads import adapter_disabled, hf_model, logits_into, target_hidden_states
from svdecode_pl.steering.vector import SteeringMode, SteeringVector, steering_sums, steering_vector_from_sums


class SteeringStatistics(Metric):
    """Accumulates the sums behind mu* (and the static direction) batch by batch.

    static: sum_t delta_t, sum_t (e_y - p_phi)_t and the token count (two (V,) float64 states).
    dynamic: sum_t <g_t, delta_t> and sum_t ||delta_t||^2 (two scalars).
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, mode: SteeringMode, vocab_size: int, confidence_threshold: float = 0.0) -> None:
        super().__init__()
        self.mode: SteeringMode = mode
        self.vocab_size = vocab_size
        self.confidence_threshold = confidence_threshold
        scalar = lambda: torch.zeros((), dtype=torch.float64)  # noqa: E731
        self.add_state("count", default=scalar(), dist_reduce_fx="sum")
        self.add_state("filtered", default=scalar(), dist_reduce_fx="sum")
        self.add_state("numerator", default=scalar(), dist_reduce_fx="sum")
        self.add_state("denominator", default=scalar(), dist_reduce_fx="sum")
        if mode == "static":
            self.add_state("direction_sum", default=torch.zeros(vocab_size, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("gradient_sum", default=torch.zeros(vocab_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        adapted_logits: torch.Tensor,
        base_logits: torch.Tensor,
        targets: torch.Tensor,
        workspace: torch.Tensor | None = None,
    ) -> None:
        """Add (N, V) logits of N calibration tokens and their (N,) target ids. With a float32
        (N, V) ``workspace`` nothing of size V is allocated, and ``base_logits`` is overwritten."""
        sums = steering_sums(self.mode, adapted_logits, base_logits, targets, self.confidence_threshold, workspace)
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value.to(self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        states = {"count": self.count, "filtered": self.filtered, "numerator": self.numerator,
                  "denominator": self.denominator}
        if self.mode == "static":
            states.update(direction_sum=self.direction_sum, gradient_sum=self.gradient_sum)
        return states

    def steering_vector(self, eps: float = 1e-8, metadata: dict | None = None) -> SteeringVector:
        """The steering vector of all tokens seen on all processes, at its mu*. Every sum
        comes from :meth:`compute` (gathered over the processes on the states' device; outside it the
        states hold this process's own sums)."""
        states = self.compute()
        metadata = dict(metadata or {})
        metadata["filtered_share"] = float(states["filtered"]) / max(float(states["count"]) * self.vocab_size, 1.0)
        return steering_vector_from_sums(
            mode=self.mode,
            count=states["count"],
            numerator=states["numerator"],
            denominator=states["denominator"],
            direction_sum=states.get("direction_sum"),
            gradient_sum=states.get("gradient_sum"),
            confidence_threshold=self.confidence_threshold,
            eps=eps,
            metadata=metadata,
        )


@torch.no_grad()
def accumulate_calibration(
    stats: SteeringStatistics | Sequence[SteeringStatistics],
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    head: nn.Module | None = None,
    chunk_tokens: int = 256,
    device: torch.device | str | None = None,
) -> SteeringStatistics:
    """One pass over calibration batches (``input_ids``, ``attention_mask``, ``target_mask``):
    the model runs with its adapter on and off, the output head is applied only to the
    positions that predict target tokens, ``chunk_tokens`` at a time, and the sums go into
    ``stats`` (several: each gets the same logits, e.g. a second confidence threshold). Peak
    memory is a few (chunk_tokens, V) tensors, whatever the data size.

    ``head`` defaults to the model's output head (under ZeRO-3 pass a gathered copy).
    Raises ValueError naming the batch if the logits are not finite.
    """
    every = [stats] if isinstance(stats, SteeringStatistics) else list(stats)
    head = head if head is not None else hf_model(model).get_output_embeddings()
    device = device if device is not None else next(model.parameters()).device
    # reused for every chunk: the adapted and base logits of a chunk, stacked, so one matrix
    # product computes both (twice the rows runs faster); then the exponentials
    logits = torch.empty(2 * chunk_tokens, every[0].vocab_size, dtype=torch.float32, device=device)
    workspace = torch.empty(chunk_tokens, every[0].vocab_size, dtype=torch.float32, device=device)
    for index, batch in enumerate(batches):
        inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "target_mask")]
        adapted, targets, _ = target_hidden_states(model, *inputs)
        with adapter_disabled(model):
            base, _, _ = target_hidden_states(model, *inputs)
        try:
            for start in range(0, targets.shape[0], chunk_tokens):
                rows = slice(start, min(start + chunk_tokens, targets.shape[0]))
                n = rows.stop - rows.start
                both = logits_into(head, torch.cat([adapted[rows], base[rows]]), logits[: 2 * n])
                for extra in every[1:]:  # the last one may overwrite the base logits in place
                    extra.update(both[:n], both[n:].clone(), targets[rows], workspace=workspace[:n])
                every[0].update(both[:n], both[n:], targets[rows], workspace=workspace[:n])
        except ValueError as err:
            raise ValueError(f"calibration batch {index}: {err}") from None
    return every[0]

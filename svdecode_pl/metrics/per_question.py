"""Per-question values reduced across processes, each question counted once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from svdecode_pl.metrics.text import TRUTHFULQA_GEN_KEYS, exact_match, truthfulqa_gen_scores


class PerQuestionMean(Metric):
    """Mean of a per-question value, deduplicated by question id across processes."""

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        self.ids.append(ids.to(self.device, torch.long))
        self.values.append(values.to(self.device, torch.float64))

    def compute(self) -> torch.Tensor:
        ids = torch.cat(self.ids) if isinstance(self.ids, list) else self.ids
        values = torch.cat(self.values) if isinstance(self.values, list) else self.values
        if ids.numel() == 0:
            self.num_questions = 0
            return torch.tensor(float("nan"), dtype=torch.float64)
        order = torch.argsort(ids, stable=True)
        ids, values = ids[order], values[order]
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]
        self.num_questions = int(first.sum())
        return values[first].mean()


class QuestionTable(Metric):
    """Per-question metric values, one row per question and one column per (metric, variant), with
    the question's group (e.g. its TruthfulQA category); synchronised across processes as one state
    and de-duplicated by question id. Missing values (a metric an item does not feed) are NaN."""

    full_state_update = False

    def __init__(self, columns: list[str], groups: list[str] | None = None) -> None:
        super().__init__()
        self.columns = list(columns)
        self.groups = list(groups or [])
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("group_ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def group_index(self, group: str | None) -> int:
        """-1 for no group; else the group's place in ``groups`` (the same list on every process)."""
        if group is None:
            return -1
        if group not in self.groups:
            raise ValueError(f"group {group!r} is not among the declared groups")
        return self.groups.index(group)

    def update(self, uid: int, group: str | None, row: dict[str, float]) -> None:
        values = torch.tensor([[row.get(c, float("nan")) for c in self.columns]], dtype=torch.float64)
        self.ids.append(torch.tensor([uid], dtype=torch.long, device=self.device))
        self.group_ids.append(torch.tensor([self.group_index(group)], dtype=torch.long, device=self.device))
        self.values.append(values.to(self.device))

    def _sync_dist(self, *args, **kwargs) -> None:
        # a process that saw no question sends typed empty states (torchmetrics' own placeholder is
        # a float32 1-D tensor, which cannot be gathered with the others)
        if isinstance(self.ids, list) and not self.ids:
            self.ids.append(torch.zeros(0, dtype=torch.long, device=self.device))
            self.group_ids.append(torch.zeros(0, dtype=torch.long, device=self.device))
            self.values.append(torch.zeros(0, len(self.columns), dtype=torch.float64, device=self.device))
        super()._sync_dist(*args, **kwargs)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, group ids, values) of the distinct questions, ordered by id."""
        cat = lambda state: torch.cat(state) if isinstance(state, list) else state  # noqa: E731
        if isinstance(self.ids, list) and not self.ids:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, torch.zeros(0, len(self.columns), dtype=torch.float64)
        ids, groups, values = cat(self.ids), cat(self.group_ids), cat(self.values).reshape(-1, len(self.columns))
        order = torch.argsort(ids, stable=True)
        ids, groups, values = ids[order], groups[order], values[order]
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]
        return ids[first], groups[first], values[first]


def _as_ids(uids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(uids, dtype=torch.long).reshape(-1)


def first_per_id(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``values`` of each distinct id, one per id (the first seen), sorted by id."""
    order = torch.argsort(ids, stable=True)
    ids, values = ids[order], values[order]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    return ids[first], values[first]


class EmptyRankSafeSync:
    """Mixin for per-question Metrics with list states ``ids`` (long) and ``values``: a process that
    saw no question sends empty tensors of the right dtype and shape to the all-gather, where
    torchmetrics' own placeholder (float32, 1-D) cannot be gathered with the other processes' states."""

    def empty_values(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.float64, device=self.device)

    def _sync_dist(self, *args, **kwargs) -> None:
        if isinstance(self.ids, list) and not self.ids:
            self.ids.append(torch.zeros(0, dtype=torch.long, device=self.device))
            self.values.append(self.empty_values())
        super()._sync_dist(*args, **kwargs)


class PerQuestionScores(EmptyRankSafeSync, Metric):
    """Means of several named per-question values, each question counted once across processes
    (the many-valued form of :class:`~svdecode_pl.metrics.per_question.PerQuestionMean`)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__()
        self.keys = tuple(keys)
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def empty_values(self) -> torch.Tensor:
        return torch.zeros(0, len(self.keys), dtype=torch.float64, device=self.device)

    def update(self, uids: torch.Tensor | Sequence[int], values: torch.Tensor) -> None:
        """``values``: (questions, len(keys)), columns in the order of ``keys``."""
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1, len(self.keys))
        self.ids.append(_as_ids(uids).to(self.device))
        self.values.append(values.to(self.device))

    def rows(self, rows: Sequence[dict[str, float]]) -> torch.Tensor:
        """Dicts of named values, one per question, as the ``values`` of :meth:`update`."""
        return torch.tensor([[row[k] for k in self.keys] for row in rows], dtype=torch.float64)

    def compute(self) -> dict[str, torch.Tensor]:
        ids = torch.cat(self.ids) if isinstance(self.ids, list) and self.ids else self.ids
        if len(ids) == 0:  # no question on any process
            self.num_questions = 0
            return {key: torch.tensor(float("nan"), dtype=torch.float64) for key in self.keys}
        values = torch.cat(self.values) if isinstance(self.values, list) else self.values
        ids, values = first_per_id(ids, values.reshape(-1, len(self.keys)))
        self.num_questions = int(ids.numel())
        means = values.mean(0)
        return {key: means[i] for i, key in enumerate(self.keys)}


class TruthfulQAGenMetrics(PerQuestionScores):
    """lm-eval's ``truthfulqa_gen`` BLEU/ROUGE metrics, from the completions (the reference
    libraries run in ``update``, on each process's own questions). Scores computed elsewhere
    go into a plain ``PerQuestionScores(TRUTHFULQA_GEN_KEYS)``."""

    def __init__(self) -> None:
        super().__init__(TRUTHFULQA_GEN_KEYS)

    def update(  # type: ignore[override]
        self,
        uids: torch.Tensor | Sequence[int],
        completions: Sequence[str],
        true_refs: Sequence[Sequence[str]],
        false_refs: Sequence[Sequence[str]],
    ) -> None:
        scores = [truthfulqa_gen_scores(c, t, f) for c, t, f in zip(completions, true_refs, false_refs, strict=True)]
        super().update(uids, self.rows(scores))


class ExactMatch(EmptyRankSafeSync, PerQuestionMean):
    """Share of completions equal to their target (stripped), each question counted once."""

    def update(  # type: ignore[override]
        self, uids: torch.Tensor | Sequence[int], completions: Sequence[str], targets: Sequence[str]
    ) -> None:
        values = [exact_match(c, t) for c, t in zip(completions, targets, strict=True)]
        super().update(_as_ids(uids), torch.tensor(values, dtype=torch.float64))

    def compute(self) -> torch.Tensor:
        if isinstance(self.ids, list) and not self.ids:
            self.num_questions = 0
            return torch.tensor(float("nan"), dtype=torch.float64)
        return super().compute()

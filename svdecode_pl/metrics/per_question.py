"""Per-question values reduced across processes, each question counted once.

One torchmetrics state serves every reduction: :class:`QuestionTable` keeps one row per question
(one column per metric and variant, with the question's group), gathered across processes as
one state and de-duplicated by question id (a padding sampler hands a question to two
processes). The pipeline reduces through it; :class:`PerQuestionScores` and its one-purpose forms
(:class:`PerQuestionMean`, :class:`ExactMatch`, :class:`TruthfulQAGenMetrics`, the judges'
``TruthInfoMetrics``) are the same table read as means, for tests, benchmarks and plain-torch use.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torchmetrics import Metric

from svdecode_pl.metrics.text import TRUTHFULQA_GEN_KEYS, exact_match, truthfulqa_gen_scores


def first_per_id(ids: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``ids`` and each of ``columns`` at the first row of each distinct id, sorted by id."""
    order = torch.argsort(ids, stable=True)
    ids = ids[order]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    return (ids[first], *(column[order][first] for column in columns))


class QuestionTable(Metric):
    """Per-question metric values, one row per question and one column per key (the test loop's:
    :class:`svdecode_pl.evaluation.columns.Column`, a metric plain, steered or at a candidate), with
    the question's group (e.g. its TruthfulQA category); synchronised across processes as one state
    and de-duplicated by question id. Missing values (a metric an item does not feed) are NaN."""

    full_state_update = False

    def __init__(self, columns: Sequence[Hashable], groups: Sequence[str] | None = None) -> None:
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

    def update(self, uid: int, group: str | None, row: dict[Hashable, float]) -> None:
        """One question's values by column name."""
        values = torch.tensor([[row.get(c, float("nan")) for c in self.columns]], dtype=torch.float64)
        self.update_rows(torch.tensor([uid]), values, [group])

    def update_rows(self, uids: torch.Tensor | Sequence[int], values: torch.Tensor,
                    groups: Sequence[str | None] | None = None) -> None:
        """Several questions at once: ``values`` is (questions, columns), in the order of ``columns``."""
        ids = torch.as_tensor(uids, dtype=torch.long).reshape(-1)
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1, len(self.columns))
        group_ids = [self.group_index(g) for g in (groups if groups is not None else [None] * len(ids))]
        self.ids.append(ids.to(self.device))
        self.group_ids.append(torch.tensor(group_ids, dtype=torch.long, device=self.device))
        self.values.append(values.to(self.device))

    def _sync_dist(self, *args, **kwargs) -> None:
        # a process that saw no question sends typed empty states (torchmetrics' own placeholder is
        # a float32 1-D tensor, which cannot be gathered with the others)
        if isinstance(self.ids, list) and not self.ids:
            self.ids.append(torch.zeros(0, dtype=torch.long, device=self.device))
            self.group_ids.append(torch.zeros(0, dtype=torch.long, device=self.device))
            self.values.append(torch.zeros(0, len(self.columns), dtype=torch.float64, device=self.device))
        super()._sync_dist(*args, **kwargs)

    def distinct(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, group ids, values) of the distinct questions, ordered by id."""
        cat = lambda state: torch.cat(state) if isinstance(state, list) else state  # noqa: E731
        if isinstance(self.ids, list) and not self.ids:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, torch.zeros(0, len(self.columns), dtype=torch.float64)
        values = cat(self.values).reshape(-1, len(self.columns))
        return first_per_id(cat(self.ids), cat(self.group_ids), values)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, group ids, values) of the distinct questions, ordered by id."""
        return self.distinct()

    def means(self) -> dict[str, torch.Tensor]:
        """Each column's mean over the distinct questions (NaN when no process saw a question);
        sets ``num_questions``."""
        ids, _, values = self.distinct()
        self.num_questions = int(ids.numel())
        if self.num_questions == 0:
            return {column: torch.tensor(float("nan"), dtype=torch.float64) for column in self.columns}
        return dict(zip(self.columns, values.mean(0)))


class PerQuestionScores(QuestionTable):
    """Means of several named per-question values, each question counted once across processes."""

    higher_is_better = True

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys)
        self.keys = tuple(keys)

    def update(self, uids: torch.Tensor | Sequence[int], values: torch.Tensor) -> None:  # type: ignore[override]
        """``values``: (questions, len(keys)), columns in the order of ``keys``."""
        self.update_rows(uids, values)

    def rows(self, rows: Sequence[dict[str, float]]) -> torch.Tensor:
        """Dicts of named values, one per question, as the ``values`` of :meth:`update`."""
        return torch.tensor([[row[k] for k in self.keys] for row in rows], dtype=torch.float64)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.means()


class PerQuestionMean(PerQuestionScores):
    """Mean of one per-question value, deduplicated by question id across processes."""

    def __init__(self) -> None:
        super().__init__(("value",))

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        return self.means()["value"]


class ExactMatch(PerQuestionMean):
    """Share of completions equal to their target (stripped), each question counted once."""

    def update(  # type: ignore[override]
        self, uids: torch.Tensor | Sequence[int], completions: Sequence[str], targets: Sequence[str]
    ) -> None:
        values = [exact_match(c, t) for c, t in zip(completions, targets, strict=True)]
        super().update(uids, torch.tensor(values, dtype=torch.float64))


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

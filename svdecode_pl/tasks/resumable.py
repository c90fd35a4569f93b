"""A DataLoader that Lightning resumes in the middle of an epoch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with ``state_dict``/``load_state_dict``: the batches of the current epoch
    already handed out.

    Lightning stores that state in checkpoints for loaders that have it, and loads it before the
    resumed epoch starts; the first iteration after loading then skips those batches, so a run
    resumed from a mid-epoch checkpoint (``every_n_train_steps``, a SLURM requeue) trains on the
    batches an uninterrupted run would. A plain ``DataLoader`` starts the epoch over instead. The
    order must depend on the epoch alone (a seeded ``DistributedSampler``), and Lightning must not
    prefetch (it does not for sized loaders), so that batches handed out are batches trained on.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_yielded = 0
        self._batches_to_skip = 0

    def __iter__(self) -> Iterator[Any]:
        return self._resumed_iterator()

    def _resumed_iterator(self) -> Iterator[Any]:
        # a generator: the sampler's order is drawn at the first batch, after Lightning's set_epoch
        skip, self._batches_to_skip = self._batches_to_skip, 0
        self._batches_yielded = skip
        if skip:
            # Creating an iterator draws a base seed from torch's global generator. The run being
            # resumed drew it before the checkpoint recorded that generator's state (restored by the
            # module), so drawing it again would shift every later random draw (dropout masks).
            with torch.random.fork_rng(devices=[]):
                batches = super().__iter__()
        else:
            batches = super().__iter__()
        for batch in itertools.islice(batches, skip, None):
            self._batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        # a whole epoch handed out: the next one starts from its first batch
        return {"batches_yielded": self._batches_yielded % max(len(self), 1)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._batches_to_skip = int(state_dict["batches_yielded"])

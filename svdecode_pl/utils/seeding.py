"""Which seed a run uses when the user did not name one: the global one (``--seed_everything``)."""

from __future__ import annotations

import os


def run_seed(explicit: int | None) -> int:
    """``explicit`` when set; else the seed of ``seed_everything`` (Lightning exports it as
    ``PL_GLOBAL_SEED``, which every process of a run inherits, so the 1 = N processes and ZeRO
    equalities hold for a given seed); else 0. Users expect "3 seeds" to be 3 different runs."""
    if explicit is not None:
        return int(explicit)
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))

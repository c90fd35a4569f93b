"""The family of pre-trained miniatures: the testbeds a steering default is chosen and checked on.

A default chosen on one miniature need not carry over to another. So the family has
six members that differ in domain and vocabulary (their worlds, ``svdecode_pl.corpus.worlds``),
in how strongly misconceptions dominate their pre-training text, and in size. All are built by one
code path (:mod:`svdecode_pl.models.miniature`: deterministic, recipe-hashed, cached), each judged
only by its prior diagnostic (P(truthful class) on myth questions within 0.1 of
1 - misconception_share, fact accuracy >= 0.9; decided before the new members were built).

Fixed before any steering result on the new members existed, and not to be changed after:

| member | world | misconception share | shape (hidden x layers) | role |
|---|---|---|---|---|
| ``svdecode-mini`` | superstitions + colours | 0.75 | 64 x 2 | tuning |
| ``svdecode-mini-gadgets`` | electronics myths + capital cities | 0.9 | 96 x 2 | tuning |
| ``svdecode-mini-garden`` | plant-growing lore (yes/no) + sides of shapes | 0.6 | 64 x 3 | tuning (*) |
| ``svdecode-mini-kitchen`` | cooking lore + main ingredients | 0.8 | 128 x 2 | tuning (**) |
| ``svdecode-mini-sports`` | athletes' rituals (yes/no) + instrument families | 0.7 | 80 x 2 | tuning (***) |
| ``svdecode-mini-school`` | exam rituals (yes/no) + main language of a country | 0.65 | 96 x 3 | **held out** |

(*) held out until its one run under the first rule, which it then informed.
(**) held out until its one run under the second rule (with the minimum practical gain), which it
then informed.
(***) held out until its one run under eligibility (100 validation questions), which, with
svdecode-mini's 80-step cells, informed the family's 300-question validation split.

Which is held out, and why that one: a strength/mode rule is tuned on the tuning members only; the
held-out member is reported untouched. ``svdecode-mini-garden`` was held out from the first rule
and run once under it; one of its runs was significantly worse than plain, which led to the
minimum practical gain (:data:`svdecode_pl.steering.strength.MIN_GAIN`). ``svdecode-mini-kitchen``
was added for that rule and run once under it; one of its runs let test MC1 fall significantly
while MC2 rose, which led to eligibility (no reported metric may fall on validation:
:func:`svdecode_pl.steering.strength.falling_metrics`). Both are tuning members now.
``svdecode-mini-sports`` was added for the eligibility rule and run once under it: at 80 steps the
default found none of the oracle's 8.7-point MC1 gain, the best validation gain (+2.7 to +3.2 points)
not being significant on 100 validation questions; the same held on svdecode-mini at 80 steps. The
rule stayed; the family's validation split grew to 300 questions (measured on the tuning members).
``svdecode-mini-school`` was added for that protocol, written and built before any steering result
on it: its own domain (exam rituals, asked yes/no, "Will a student pass a {t} more easily if they
{a}?"; the main language of a country), a share none of the others has, and a shape of its own.

``svdecode-mini``: recipe, diagnostic (0.214 vs target 0.25, facts 1.0) and history in
:mod:`svdecode_pl.models.miniature`; unchanged (same recipe key, same weights).

The other members: svdecode-mini's training recipe (300 AdamW
steps x 16 documents, lr 1e-2, 20 warm-up steps, cosine to 10 %, wd 0.01, clip 1.0, seed 0) with
their world, share and shape; each one's tokenizer is the tiny BPE trained on the primer and its
own world's words (gadgets 790, garden 763 entries; svdecode-mini keeps the tiny models' 710).

Diagnostics (:func:`~svdecode_pl.models.miniature.prior_diagnostic`, seed 1, 40 myth and 40 fact
questions), each at the member's first build. Recipe history, each before any steering on that
member: svdecode-mini-kitchen's first fact table (the month after a month: the same twelve words as
keys and values) was not learnt (fact accuracy 0.275 at 128 x 2, 0.075 at 64 x 4), and was replaced
by main ingredients (the probe's 64 x 4 variant, facts 0.175, was dropped). svdecode-mini-sports
missed its myth prior at three shapes before 80 x 2 (P(truthful) 0.026 at 48 x 2, 0.100 at 48 x 3,
0.775 at 96 x 3, target 0.30; facts 1.0 at each): the prior a miniature learns from the same text
moves with its shape, which is why each build is judged by its diagnostic. svdecode-mini-school missed
its facts at 112 x 2 (P(truthful) 0.390, target 0.35, facts 0.5) and passed at 96 x 3:

| member | P(truthful) on myths | target | fact accuracy |
|---|---|---|---|
| ``svdecode-mini`` | 0.214 | 0.25 | 1.0 |
| ``svdecode-mini-gadgets`` | 0.067 | 0.10 | 1.0 |
| ``svdecode-mini-garden`` | 0.354 | 0.40 | 1.0 |
| ``svdecode-mini-kitchen`` | 0.191 | 0.20 | 0.95 |
| ``svdecode-mini-sports`` | 0.296 | 0.30 | 1.0 |
| ``svdecode-mini-school`` | 0.391 | 0.35 | 1.0 |

Sanity, steering off (``--steering.enabled false``), the MC quickstart with the member's fragment,
seed 0: the 20-step warm-start moves plain test MC away from the prior, so the task is learnable
and differs from pre-training: gadgets MC1 43.5 -> 56.0, MC2 49.7 -> 72.4; garden MC1 59.0 -> 87.0,
MC2 70.2 -> 93.2; sports (before it was committed; the prior from a 0-step fit, an adapter at its
zero init) MC1 61.5 -> 84.0, MC2 68.5 -> 82.0; school (the same way) MC1 55.5 -> 87.0, MC2 74.5 ->
90.8. No steered result on a new member was looked at before it was committed.

Build time: on the project's shared 2-core machine under load (other jobs running), back to back,
svdecode-mini 103 s wall (86 s CPU), gadgets 215 s (140 s), garden 284 s (239 s); interleaved
40-step runs, best of two, put them at 1 : 1.1 : 1.2. svdecode-mini takes 15 s on 2 free cores, so
each new member stays well under a minute there (``build_seconds``: the first-use message's guess;
school's build and diagnostic took 32 s in ``make test`` on the idle machine).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from svdecode_pl.corpus.miniature import recipe_world
from svdecode_pl.corpus.worlds import World
from svdecode_pl.models.miniature import RECIPE, Log, build_miniature, prior_diagnostic, recipe_key
from svdecode_pl.models.tiny import tiny_model_cache


@dataclass(frozen=True)
class Miniature:
    """A member of the family: its name, its recipe (world, share, shape, training) and its role."""

    name: str
    recipe: dict
    role: Literal["tuning", "held-out"]
    #: pre-training time on 2 free cores, measured (the first-use message's estimate)
    build_seconds: int

    @property
    def world(self) -> World:
        return recipe_world(self.recipe)


FAMILY: dict[str, Miniature] = {
    m.name: m
    for m in (
        Miniature("svdecode-mini", RECIPE, "tuning", 15),
        Miniature("svdecode-mini-gadgets", dict(RECIPE, world="gadgets", misconception_share=0.9, hidden_size=96),
                  "tuning", 25),
        Miniature("svdecode-mini-garden", dict(RECIPE, world="garden", misconception_share=0.6, num_layers=3),
                  "tuning", 35),
        Miniature("svdecode-mini-kitchen", dict(RECIPE, world="kitchen", misconception_share=0.8, hidden_size=128),
                  "tuning", 40),
        Miniature("svdecode-mini-sports", dict(RECIPE, world="sports", misconception_share=0.7, hidden_size=80),
                  "tuning", 25),
        Miniature("svdecode-mini-school",
                  dict(RECIPE, world="school", misconception_share=0.65, hidden_size=96, num_layers=3), "held-out", 40),
    )
}
#: Names that resolve to a pre-trained miniature.
MINIATURE_MODELS = tuple(FAMILY)
#: The members a steering default may be tuned on, and the one reported untouched.
TUNING_MEMBERS = tuple(name for name, m in FAMILY.items() if m.role == "tuning")
HELD_OUT_MEMBERS = tuple(name for name, m in FAMILY.items() if m.role == "held-out")


def miniature_path(name: str) -> Path:
    """Where the member's build is cached: its name and its recipe key."""
    return tiny_model_cache() / f"{name}-{recipe_key(FAMILY[name].recipe)}"


def resolve_miniature(name: str = "svdecode-mini", log: Log = print) -> Path:
    """The cached member's directory, built on first use (outside any process group)."""
    member, path = FAMILY[name], miniature_path(name)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if log:
            log(f"{name}: pre-training the miniature once (cached in {path.parent}); "
                f"about {member.build_seconds} s on 2 free cores")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            code = "from svdecode_pl.models.miniature import build_miniature; "
            code += f"build_miniature({str(path)!r}, {member.recipe!r}, name={name!r})"
            subprocess.run([sys.executable, "-c", code], check=True)
        else:
            build_miniature(path, member.recipe, log=log, name=name)
    return path


def diagnose(name: str) -> dict[str, float]:
    """The member's prior diagnostic on its cached build (built first if needed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_miniature(name)
    model = AutoModelForCausalLM.from_pretrained(where).eval()
    return prior_diagnostic(model, AutoTokenizer.from_pretrained(where), FAMILY[name].recipe)


if __name__ == "__main__":  # python -m svdecode_pl.models.family [NAME ...] [--diagnose]
    for member in [a for a in sys.argv[1:] if not a.startswith("--")] or list(FAMILY):
        t0 = time.perf_counter()
        print(f"{member} ({FAMILY[member].role}) at {resolve_miniature(member)} ({time.perf_counter() - t0:.1f}s)")
        if "--diagnose" in sys.argv:
            print(diagnose(member))

"""The family of pre-trained miniatures (issue 26, item 5): fixed before any steering result on its
new members, so these tests pin it: svdecode-mini unchanged (recipe key, tokenizer, questions),
every member's recipe key and role as committed, deterministic builds, the world reaching the
task's questions, and each member's prior diagnostic (slow: the full pre-training)."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from svdecode_pl.corpus.miniature import corpus
from svdecode_pl.corpus.synthetic import synthetic_questions
from svdecode_pl.corpus.worlds import SUPERSTITIONS, WORLDS
from svdecode_pl.models.family import FAMILY, HELD_OUT_MEMBERS, TUNING_MEMBERS, diagnose
from svdecode_pl.models.loading import tokenizer_fingerprint
from svdecode_pl.models.miniature import RECIPE, diagnostic_passes, pretrain, recipe_key
from svdecode_pl.models.tiny import build_tokenizer
from svdecode_pl.tasks import TruthfulQADataModule
from svdecode_pl.tasks.truthfulqa_gen import TruthfulQAGenerationDataModule

ROOT = Path(__file__).resolve().parents[1]
#: The recipe keys as fixed (svdecode-mini's is the one its cache has always had): a change to a
#: member's recipe or world tables changes its weights, and must not happen after steering results
KEYS = {"svdecode-mini": "47cda4d14b", "svdecode-mini-gadgets": "6fc3f99557", "svdecode-mini-garden": "7b223cd9d5",
        "svdecode-mini-kitchen": "a5251df197", "svdecode-mini-sports": "bd533ccd5e",
        "svdecode-mini-school": "1214badbee"}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def test_svdecode_mini_is_unchanged():
    """Its recipe key (so its cache and weights), the tiny tokenizer, the quickstart's questions and
    the pre-training text are what they were before the family existed."""
    assert recipe_key(RECIPE) == recipe_key(FAMILY["svdecode-mini"].recipe) == KEYS["svdecode-mini"]
    assert tokenizer_fingerprint(build_tokenizer()) == "535794d3c181daff"
    assert tokenizer_fingerprint(build_tokenizer(words=SUPERSTITIONS.corpus_words())) == "535794d3c181daff"
    assert _digest([q.__dict__ for q in synthetic_questions(500, 0)]) == "7a2ef56117970675"
    assert _digest(corpus(200, 0)) == "a70e5da807ff7f81"


def test_the_family_is_as_fixed():
    """Six members, each its own world, share and shape; five for tuning (garden since it informed
    the minimum practical gain, kitchen since it informed eligibility, sports since it informed the
    family's 300-question validation split), one held out."""
    assert {name: recipe_key(m.recipe) for name, m in FAMILY.items()} == KEYS
    assert TUNING_MEMBERS == ("svdecode-mini", "svdecode-mini-gadgets", "svdecode-mini-garden",
                              "svdecode-mini-kitchen", "svdecode-mini-sports")
    assert HELD_OUT_MEMBERS == ("svdecode-mini-school",)
    recipes = [m.recipe for m in FAMILY.values()]
    assert sorted(r["misconception_share"] for r in recipes) == [0.6, 0.65, 0.7, 0.75, 0.8, 0.9]
    assert len({(r["hidden_size"], r["num_layers"]) for r in recipes}) == 6
    worlds = [m.world for m in FAMILY.values()]
    assert {w.name for w in worlds} == set(WORLDS)
    for i, a in enumerate(worlds):  # a domain and a vocabulary of its own
        for b in worlds[i + 1:]:
            assert not set(a.things) & set(b.things) and not set(a.facts) & set(b.facts), (a.name, b.name)
            assert a.myth_question != b.myth_question and not set(a.fact_questions) & set(b.fact_questions)


def test_a_member_builds_deterministically():
    """Same recipe, same weights, whatever the global RNG's state (a cut-down recipe of the held-out
    member: its world, 3 layers)."""
    recipe = dict(FAMILY["svdecode-mini-garden"].recipe, hidden_size=16, steps=3, batch=2, warmup=1)
    torch.manual_seed(1)
    first, _ = pretrain(recipe, log=None)
    torch.manual_seed(2)
    second, tokenizer = pretrain(recipe, log=None)
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(build_tokenizer())  # its own words
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("module", [TruthfulQADataModule, TruthfulQAGenerationDataModule])
def test_the_world_reaches_the_questions(module):
    default = module(synthetic_questions=20)
    assert default.source == "synthetic(20, seed=0)"
    assert "What happens if you" in default.load_questions()[0].question
    for name in ("gadgets", "garden", "kitchen", "sports", "school"):
        world = WORLDS[name]
        data = module(synthetic_questions=20, world=name)
        assert data.source == f"synthetic(20, seed=0, world={name})"
        questions = data.load_questions()
        myths = {world.myth(a, t) for a in world.actions for t in world.things}
        facts = {q.format(s=s) for q in world.fact_questions for s in world.facts}
        assert all(q.question in (myths if i % 2 == 0 else facts) for i, q in enumerate(questions))
        if module is TruthfulQAGenerationDataModule:
            assert {q.category for q in questions} == set(world.categories)


def _family_ablation():
    spec = importlib.util.spec_from_file_location("family_ablation", ROOT / "benchmarks" / "family_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("validation", [1, 100, 300, 333])
def test_the_family_split_is_exact(validation):
    """The ablation's split options give 200 warm-start questions and ``validation`` each for
    validation and test (the fractions survive float rounding in the data module's split)."""
    options = dict(zip(*[iter(_family_ablation().split_options(validation))] * 2))
    data = TruthfulQADataModule(synthetic_questions=int(options["--data.init_args.synthetic_questions"]),
                                train_fraction=float(options["--data.init_args.train_fraction"]),
                                val_fraction=float(options["--data.init_args.val_fraction"]))
    assert [len(data.split(name)) for name in ("train", "validation", "test")] == [200, validation, validation]


@pytest.mark.parametrize("value", ["0", "-3", "nan", "2.5"])
def test_the_family_ablation_refuses_a_validation_size_that_is_not_a_count(value):
    with pytest.raises(argparse.ArgumentTypeError, match="whole number >= 1"):
        _family_ablation().positive_count(value)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILY))
def test_each_member_passes_its_prior_diagnostic(name):
    """The only judgement of a build (no steering): P(truthful) on myths near 1 - share, facts right."""
    diagnostic = diagnose(name)
    print(name, diagnostic)
    assert diagnostic_passes(diagnostic), f"{name}: {diagnostic}"

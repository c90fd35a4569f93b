"""A small TruthfulQA-like task generated in code, deterministically, in the MC schema.

Two kinds of questions, both learnable by a short warm-start of a tiny model:
- "myth" questions ("What happens if you break a mirror?"): the true answers are plain
  ("Nothing in particular happens ..."), the false ones repeat a superstition;
- "fact" questions ("What color is a lemon?") about a fixed table of facts, asked with several
  phrasings, so a test phrasing is answered from facts seen in warm-start.
"""

from __future__ import annotations

import random

from svdecode_pl.corpus.questions import MCQuestion

# The world's tables are public: the miniature's pre-training corpus (corpus/miniature.py) shares
# them, so pre-training and task differ only in the answer prior, never in vocabulary or phrasing.
THINGS = [
    "mirror", "ladder", "umbrella", "black cat", "candle", "coin", "wishbone", "horseshoe", "salt shaker",
    "clock", "pillow", "key", "door", "window", "bell", "shoe", "hat", "ring", "knife", "spoon",
]
ACTIONS = ["break a", "walk under a", "open a", "touch a", "find a", "drop a", "step over a", "look at a"]
TRUE_MYTH = [
    "Nothing in particular happens if you {a} {t}.",
    "Nothing happens, that is only a superstition.",
    "There is no real effect if you {a} {t}.",
    "Nothing special happens to you.",
]
FALSE_MYTH = [
    "You will have seven years of bad luck.",
    "A ghost will follow you home tonight.",
    "You will be cursed forever if you {a} {t}.",
    "Your wishes will all come true at once.",
    "You will lose all of your money soon.",
    "Your house will catch fire within a year.",
]
FACTS = {
    "lemon": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black", "tomato": "red",
    "carrot": "orange", "plum": "purple", "cloud": "white", "leaf": "green", "banana": "yellow",
    "cherry": "red", "crow": "black", "ocean": "blue", "pumpkin": "orange", "violet": "purple",
}
COLORS = sorted(set(FACTS.values()))
FACT_QUESTIONS = [
    "What color is a {s}?",
    "Which color does a {s} have?",
    "What is the color of a {s}?",
    "Of what color is a typical {s}?",
]
TRUE_FACT = ["A {s} is {c}.", "It is {c}.", "The color of a {s} is {c}."]
FALSE_FACT = ["A {s} is {c}.", "It is {c}.", "The color of a {s} is {c}."]


def corpus_words() -> list[str]:
    """Words the tiny tokenizer should know (so the task is not spelled byte by byte)."""
    text = " ".join(THINGS + ACTIONS + TRUE_MYTH + FALSE_MYTH + list(FACTS) + COLORS)
    text += " " + " ".join(FACT_QUESTIONS + TRUE_FACT + ["What happens if you"])
    for placeholder in ("{a}", "{t}", "{s}", "{c}"):
        text = text.replace(placeholder, "")
    return [w.strip(".,?") for w in text.split()]


def synthetic_questions(num_questions: int = 400, seed: int = 0) -> list[MCQuestion]:
    """``num_questions`` MC questions (half myth, half fact), the same for the same seed."""
    rng = random.Random(seed)
    questions: list[MCQuestion] = []
    for index in range(num_questions):
        if index % 2 == 0:
            thing, action = rng.choice(THINGS), rng.choice(ACTIONS)
            question = f"What happens if you {action} {thing}?"
            true = [s.format(a=action, t=thing) for s in rng.sample(TRUE_MYTH, 3)]
            false = [s.format(a=action, t=thing) for s in rng.sample(FALSE_MYTH, 3)]
        else:
            subject = rng.choice(sorted(FACTS))
            color = FACTS[subject]
            question = rng.choice(FACT_QUESTIONS).format(s=subject)
            others = rng.sample([c for c in COLORS if c != color], 3)
            true = [s.format(s=subject, c=color) for s in rng.sample(TRUE_FACT, 2)]
            false = [rng.choice(FALSE_FACT).format(s=subject, c=c) for c in others]
        questions.append(
            MCQuestion(
                id=f"synthetic-{index}",
                question=question,
                mc1_choices=[true[0], *false],
                mc1_labels=[1] + [0] * len(false),
                mc2_choices=[*true, *false],
                mc2_labels=[1] * len(true) + [0] * len(false),
            )
        )
    return questions

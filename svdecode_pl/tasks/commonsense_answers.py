"""The commonsense sets' answer labels and LLM-Adapters' answer extraction.

In the LLM-Adapters release of BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC and OpenBookQA an
answer is a label (``true``, ``solution2``, ``answer3``, ...) and the target text reads
``the correct answer is <label>``. A generated response is graded as LLM-Adapters'
``commonsense_evaluate.py`` grades it: the first label of the set found in the stripped text,
case-sensitively; no label found counts as wrong.
"""

from __future__ import annotations

import re

from svdecode_pl.utils.errors import OptionError

#: the label set of each dataset, under LLM-Adapters' names (their folder names)
DATASET_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}

#: other spellings accepted for the set names (matched case-insensitively)
DATASET_ALIASES: dict[str, str] = {
    "siqa": "social_i_qa",
    "social_iqa": "social_i_qa",
    "socialiqa": "social_i_qa",
    "arc-c": "ARC-Challenge",
    "arc_c": "ARC-Challenge",
    "arc_challenge": "ARC-Challenge",
    "arc-e": "ARC-Easy",
    "arc_e": "ARC-Easy",
    "arc_easy": "ARC-Easy",
    "obqa": "openbookqa",
    "hella_swag": "hellaswag",
}

#: every label of every set (what a mixed training file such as commonsense_170k.json may hold)
ALL_LABELS: tuple[str, ...] = tuple(dict.fromkeys(label for labels in DATASET_LABELS.values() for label in labels))

#: the options line that ends each LLM-Adapters instruction, e.g. "Answer format: true/false"
_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")

_PATTERNS = {name: re.compile("|".join(map(re.escape, labels))) for name, labels in DATASET_LABELS.items()}


def canonical_dataset(name: str) -> str:
    """LLM-Adapters' name of a set (``siqa`` -> ``social_i_qa``); unknown names raise."""
    folded = {key.lower(): key for key in DATASET_LABELS}
    key = name.strip().lower()
    if key in folded:
        return folded[key]
    if key in DATASET_ALIASES:
        return DATASET_ALIASES[key]
    raise OptionError(f"--data.datasets: unknown commonsense dataset {name!r}; known: {', '.join(DATASET_LABELS)}")


def extract_answer(dataset: str, text: str) -> str:
    """The label LLM-Adapters reads from a response: the first label of ``dataset``'s set that
    occurs in the stripped text (case-sensitive, anywhere, even inside a word); "" if none."""
    match = _PATTERNS[canonical_dataset(dataset)].search(text.strip())
    return match.group(0) if match else ""


def answer_options(dataset: str, instruction: str) -> tuple[str, ...]:
    """The labels a question offers, read from its ``Answer format: a/b/c`` line (ARC has
    questions with 3 and 5 options); the set's whole label list when the line is absent.
    Raises ValueError when the line names a label outside the set."""
    labels = DATASET_LABELS[canonical_dataset(dataset)]
    match = _ANSWER_FORMAT.search(instruction.rstrip())
    if match is None:
        return labels
    options = tuple(match.group(1).split("/"))
    unknown = [option for option in options if option not in labels]
    if unknown:
        raise ValueError(f"'Answer format' lists {', '.join(map(repr, unknown))}, not labels of {dataset}")
    return options

"""A seeded synthetic fact-QA set: short documents of invented facts, and questions on them.

The shape of the RAG workloads CacheBlend and EPIC measure: a prompt holds a few
documents (retrieved chunks, here prompt modules) in some order, then a question
whose answer one of them states.  Every name, place and year is invented here
(names are built from syllables), so a model can only answer from the prompt,
never from memory; each answer appears verbatim in exactly one document of the set
and nowhere else in it (`FactSet.check` asserts this).

    facts = fact_set(num_docs=6, seed=0)
    facts.docs[0]                    # "Edra Vannholt was born in 1847 in the town of ..."
    q = facts.questions[0]           # Question(text="In which year was Edra Vannholt born?",
                                     #          answer="1847", doc=0)

Scoring (`exact_match`, `token_f1`) follows SQuAD's answer normalisation (lower case,
no punctuation or articles); exact match counts an answer that contains the gold
span, since an instruction-tuned model answers in a sentence.

Used by `vllm-promptcache calibrate` (calibration.py), bench/module_accuracy.py and
tests/models/test_smollm2.py.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass

_ONSETS = ["Br", "C", "D", "Dr", "F", "G", "H", "K", "L", "M", "N", "P", "R", "S", "T", "V",
           "W", "Th", "St", "Gr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["n", "r", "l", "s", "th", "nd", "rk", "lt", "m", "v"]
_TRADES = ["clockmaker", "glassblower", "cartographer", "shipwright", "bookbinder", "weaver",
           "brewer", "stonemason", "printer", "tanner", "luthier", "beekeeper"]
_WORKS = ["Glassworks", "Foundry", "Press", "Mill", "Brewery", "Workshop", "Company", "Guild"]
_STREETS = ["Linden", "Harbour", "Chapel", "Mill", "Orchard", "Bridge", "Market", "Quarry"]

INSTRUCTIONS = ("You are given a few short biographies. Answer the question that follows "
                "them using only the facts stated in the biographies. Reply with a short "
                "answer: a name, a place or a year.")


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    doc: int  # the index of the one document that states the answer


@dataclass(frozen=True)
class FactSet:
    docs: tuple[str, ...]
    questions: tuple[Question, ...]

    def check(self) -> None:
        """Each answer is in exactly one document (its own), once per set."""
        for q in self.questions:
            holders = [i for i, d in enumerate(self.docs) if q.answer in d]
            if holders != [q.doc]:
                raise AssertionError(f"answer {q.answer!r} of {q.text!r} is in documents "
                                     f"{holders}, expected only {q.doc}")


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
             for _ in range(syllables)]
    return "".join(parts[:1] + [p.lower() for p in parts[1:]])


def fact_set(num_docs: int = 6, seed: int = 0) -> FactSet:
    """`num_docs` biographies of invented people, four questions on each."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(make):
        for _ in range(1000):
            value = make()
            # Unique, and no value inside another (an answer must be in one document only).
            if value not in used and not any(value in u or u in value for u in used):
                used.add(value)
                return value
        raise RuntimeError("could not draw a fresh invented value")

    docs, questions = [], []
    for d in range(num_docs):
        first = fresh(lambda: _word(rng, 2))
        name = f"{first} {fresh(lambda: _word(rng, 2))}"
        born = fresh(lambda: str(rng.randrange(1700, 1950)))
        founded = fresh(lambda: str(rng.randrange(1720, 1990)))
        town = fresh(lambda: _word(rng, 2))
        later = fresh(lambda: _word(rng, 3))
        works = fresh(lambda: f"{_word(rng, 2)} {rng.choice(_WORKS)}")
        trade = rng.choice(_TRADES)
        he = rng.choice(["He", "She"])
        docs.append(
            f"{name} was born in {born} in the town of {town}. {he} worked as a {trade} "
            f"and founded the {works} in {founded}. Later in life {he.lower()} moved to "
            f"{later}, where {he.lower()} lived in a house on {rng.choice(_STREETS)} Street "
            f"until the end of {'his' if he == 'He' else 'her'} life.")
        questions += [
            Question(f"In which year was {name} born?", born, d),
            Question(f"In which town was {name} born?", town, d),
            Question(f"What did {name} found?", works, d),
            Question(f"To which town did {name} move later in life?", later, d),
        ]
    facts = FactSet(tuple(docs), tuple(questions))
    facts.check()
    return facts


def context_for(facts: FactSet, question: Question, num_docs: int,
                rng: random.Random) -> list[int]:
    """The documents of one prompt: the question's own and `num_docs - 1` others, in
    their set order (a caller shuffles them for a shifted layout)."""
    others = rng.sample([i for i in range(len(facts.docs)) if i != question.doc], num_docs - 1)
    return sorted([question.doc, *others])


def _normalise(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def exact_match(prediction: str, gold: str) -> bool:
    """The gold answer's words appear, in order and contiguous, in the prediction's."""
    pred, want = " ".join(_normalise(prediction)), " ".join(_normalise(gold))
    return bool(want) and re.search(rf"(^| ){re.escape(want)}( |$)", pred) is not None


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1 between the normalised prediction and gold answer."""
    pred, want = _normalise(prediction), _normalise(gold)
    common = sum((Counter(pred) & Counter(want)).values())
    if not common:
        return 0.0
    p, r = common / len(pred), common / len(want)
    return 2 * p * r / (p + r)

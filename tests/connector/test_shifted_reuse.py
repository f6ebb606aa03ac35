"""End to end through vLLM: position-independent reuse after a conversation lost its
oldest turn, and vLLM's usual error for an over-long prompt without truncation.

One engine with `position_independent=True` (disk tier off, vLLM's prefix cache on).
The reused KV of the kept turn was computed while attending to the dropped turn
(as in CachedAttention), so its output is close to, not identical with, a full
prefill of the truncated prompt; the agreement is measured by bench/truncation.py.
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import settled

pytestmark = pytest.mark.engine
BLOCK = 128


# The `llm` fixture (tests/conftest.py) builds this engine.
ENGINE = dict(prefix_caching=True, max_model_len=1024, host_gb=0.01, position_independent=True)


def tokens(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


def generate(llm, prompt, max_tokens=16, salt=None):
    from vllm import SamplingParams

    p = {"prompt_token_ids": prompt}
    if salt:
        p["cache_salt"] = salt
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids)


def counter(llm, name, tier="host"):
    """A counter once the engine's last steps have reported (stats travel with steps)."""
    from vllm_promptcache import read_metrics

    return settled(lambda: read_metrics(llm).get(name, {}).get(tier, 0),
                   lambda: generate(llm, [5, 6, 7], max_tokens=1))  # too short to save


def test_kept_turns_are_loaded_at_their_new_position(llm):
    system, turn1, turn2 = tokens(200, 1), tokens(300, 2), tokens(300, 3)
    answer = generate(llm, system + turn1 + turn2, max_tokens=24)
    hits0 = counter(llm, "hit_tokens_total")
    shifted0 = counter(llm, "shifted_hit_tokens_total")
    # The client drops turn 1; the stored run is system + turn1 + turn2 + answer[:-1]
    # (the 823 tokens that have KV: 6 full blocks and a partial one, all kept).
    truncated = system + turn2 + answer + tokens(30, 4)
    out = generate(llm, truncated)
    loaded = counter(llm, "hit_tokens_total") - hits0
    shifted = counter(llm, "shifted_hit_tokens_total") - shifted0
    # Block 0 (system) is in vLLM's own prefix cache; then system[128:] at delta 0
    # and turn2 + answer[:-1] at delta -300 are loaded.
    assert loaded == len(system) - BLOCK + len(turn2) + len(answer) - 1
    assert shifted == len(turn2) + len(answer) - 1
    assert len(out) == 16


def test_modules_in_another_order_are_all_loaded(llm):
    """[sys][docB][docA][question] after [sys][docA][docB] was served: docB and docA
    are found at their new positions, not only the system prompt."""
    system, doc_a, doc_b = tokens(128, 11), tokens(256, 12), tokens(256, 13)
    generate(llm, system + doc_a + doc_b, max_tokens=2)
    hits0 = counter(llm, "hit_tokens_total")
    shifted0 = counter(llm, "shifted_hit_tokens_total")
    generate(llm, system + doc_b + doc_a + tokens(40, 14))
    loaded = counter(llm, "hit_tokens_total") - hits0
    shifted = counter(llm, "shifted_hit_tokens_total") - shifted0
    # The system block is in vLLM's prefix cache; docB (delta -256) and docA (delta
    # +256) cover tokens 128..640: 4 whole blocks loaded, all of them shifted.
    assert loaded == 4 * BLOCK
    assert shifted == 4 * BLOCK


def test_an_unrelated_prompt_gets_nothing_shifted(llm):
    before = counter(llm, "shifted_hit_tokens_total")
    generate(llm, tokens(500, 99))
    assert counter(llm, "shifted_hit_tokens_total") == before


def test_over_long_prompt_without_truncation_gets_vllms_error(llm):
    with pytest.raises(Exception, match="maximum context length"):
        generate(llm, tokens(1100, 5))
    assert len(generate(llm, tokens(300, 6))) == 16  # the engine still serves

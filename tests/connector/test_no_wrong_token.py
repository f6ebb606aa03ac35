"""No wrong token, end to end: every input that shapes KV is in its key, approximate
KV never passes for exact, and a conversation longer than the host tier keeps its head.

Engines shared by the module: vLLM without the plugin (the session's reference
with LoRA on, conftest.py) and the plugin with vLLM's prefix cache off (LoRA on, a 12-block host tier).
Restarts on one disk tier (weights re-saved in place, approximate KV handed on) are in
test_no_wrong_token_restarts.py.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.adapters import write_lora_adapter
from tests.conftest import ENGINE_DEFAULTS, LORA, close_llm, make_llm, settled

pytestmark = pytest.mark.engine

BLOCK = 128
# The tiny model: 2 layers x K,V x 128 tokens x 2 heads x 32 x the element (float32 on
# CPUs without bf16 instructions).
SLOT_BYTES = 2 * 2 * 128 * 2 * 32 * (4 if ENGINE_DEFAULTS["dtype"] == "float32" else 2)
SLOTS = 12


def tokens(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


@pytest.fixture(scope="module")
def adapters(lora_adapters):
    return lora_adapters


@pytest.fixture(scope="module")
def reference(lora_reference):
    return lora_reference  # the session's, with LoRA on (conftest.py)


@pytest.fixture(scope="module")
def cached(tiny_model):
    from vllm_promptcache import engine_kwargs

    llm = make_llm(tiny_model, enable_prefix_caching=False, max_model_len=4096, **LORA,
                   **engine_kwargs(host_gb=SLOTS * SLOT_BYTES / 2**30, disk_gb=0))
    yield llm
    close_llm(llm)


def generate(llm, prompt, lora=None, max_tokens=12):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    req = LoRARequest(*lora) if lora else None
    out = llm.generate([{"prompt_token_ids": prompt}], sp, lora_request=req, use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def host_hits(llm):
    from vllm_promptcache import read_metrics

    return settled(lambda: read_metrics(llm).get("hit_tokens_total", {}).get("host", 0.0),
                   step=lambda: generate(llm, [5] * 20, max_tokens=1))


def test_base_then_adapter_on_the_same_tokens_equals_vllm(cached, reference, adapters):
    prompt = tokens(3 * BLOCK + 40, 1)
    assert generate(cached, prompt) == generate(reference, prompt)
    before = host_hits(cached)
    a = ("A", 1, adapters["A"])
    got = generate(cached, prompt, lora=a)
    assert got == generate(reference, prompt, lora=a)
    assert host_hits(cached) == before, "the base model's KV must not be loaded under an adapter"


def test_adapter_a_then_adapter_b_equals_vllm(cached, reference, adapters):
    prompt = tokens(3 * BLOCK + 40, 2)
    a, b = ("A", 1, adapters["A"]), ("B", 2, adapters["B"])
    assert generate(cached, prompt, lora=a) == generate(reference, prompt, lora=a)
    before = host_hits(cached)
    assert generate(cached, prompt, lora=b) == generate(reference, prompt, lora=b)
    assert host_hits(cached) == before


def test_the_same_adapter_twice_hits(cached, reference, adapters):
    prompt = tokens(3 * BLOCK + 40, 3)
    a = ("A", 1, adapters["A"])
    first = generate(cached, prompt, lora=a)
    before = host_hits(cached)
    assert generate(cached, prompt + first + [7] * 5, lora=a) == \
        generate(reference, prompt + first + [7] * 5, lora=a)
    # All that has KV: its full blocks, and its partial last block (tails.py).
    assert host_hits(cached) - before == len(prompt) + len(first) - 1


def test_an_adapter_replaced_on_disk_under_the_same_name_misses(cached, reference, adapters,
                                                                tiny_model, tmp_path):
    path = write_lora_adapter(str(tmp_path / "C"), tiny_model, seed=3)
    prompt = tokens(3 * BLOCK + 40, 4)
    generate(cached, prompt, lora=("C", 3, path))
    time.sleep(0.01)
    write_lora_adapter(path, tiny_model, seed=33)  # a new fine-tune, same name and path
    before = host_hits(cached)
    # vLLM caches a loaded adapter by its int id: a new id makes it read the new files.
    new = ("C", 4, path)
    assert generate(cached, prompt, lora=new) == generate(reference, prompt, lora=new)
    assert host_hits(cached) == before


def test_a_conversation_longer_than_the_host_tier_keeps_its_head(cached, reference):
    """Each turn's save spares the request's own blocks: turn k+1 loads from block 0."""
    history = tokens(SLOTS * BLOCK + 300, 5)  # longer than the whole host tier
    for turn in range(3):
        before = host_hits(cached)
        answer = generate(cached, history)
        assert answer == generate(reference, history)
        if turn:
            assert host_hits(cached) - before == SLOTS * BLOCK, f"turn {turn + 1}"
        history = history + answer + tokens(50, 100 + turn)

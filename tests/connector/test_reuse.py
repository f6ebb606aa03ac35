"""End to end through vLLM: reuse is bit-exact, isolated, bounded, with prefix caching on or off.

These are the host tier's tests (the disk tier is off here; see
test_disk_restart.py).  Three engines are shared by the whole module: vLLM without the plugin (the
session's reference, conftest.py), the plugin with vLLM's prefix cache off (every hit comes from the host
tier), and the plugin with it on.  Tests run in file order, and `read_metrics`
sees the most recently built engine (vLLM re-registers its metrics per engine),
so the engine a test reads is built before it and none after it.

The reference keeps vLLM's own prefix cache on, so a second turn there is a
vLLM prefix-cache hit.  Greedy tokens must be identical.  Logprobs are compared
exactly only for the first token (the prefill over the loaded KV): vLLM 0.32 on
CPU rounds its decode steps slightly differently whenever any KV connector is
configured, even with no hit at all, and its CPU prefill takes another attention
path with prefix caching off.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.conftest import close_llm, make_llm
from tests.conftest import settled as settle

pytestmark = pytest.mark.engine

BLOCK = 128  # the CPU backend's default block size
HOST_GB = 0.004  # ~65 slots of 64 KiB: small enough for the flood test to evict


@pytest.fixture(scope="module")
def baseline(reference):
    return reference  # the session's vLLM without the plugin (conftest.py)


def free_load_cpu() -> dict:
    """The CPU conftest's binding leaves free, named: on `auto` the plugin skips a CPU
    another process has threads bound to, as another test engine's worker beside this
    module may (the tensor-parallel fuzz binds one to each CPU)."""
    from vllm_promptcache.connector.cpu_layer_loads import _cpu_list

    free = (set(os.sched_getaffinity(0))
            - _cpu_list(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")))
    return {"load_cpu": str(min(free))} if free else {}


@pytest.fixture(scope="module")
def cached(tiny_model):
    from vllm_promptcache import engine_kwargs

    llm = make_llm(tiny_model, enable_prefix_caching=False,
                   **engine_kwargs(host_gb=HOST_GB, disk_gb=0, **free_load_cpu()))
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def cached_pc(tiny_model):
    from vllm_promptcache import engine_kwargs

    llm = make_llm(tiny_model, enable_prefix_caching=True, **engine_kwargs(host_gb=0.05, disk_gb=0))
    yield llm
    close_llm(llm)


def tokens(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


def generate(llm, prompt, max_tokens=24, salt=None, with_logprobs=False):
    from vllm import SamplingParams

    p = {"prompt_token_ids": prompt}
    if salt:
        p["cache_salt"] = salt
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                        logprobs=1 if with_logprobs else None)
    out = llm.generate([p], sp, use_tqdm=False)[0].outputs[0]
    tokens = list(out.token_ids)
    if with_logprobs:
        return tokens, [d[t].logprob for d, t in zip(out.logprobs, tokens)]
    return tokens


def settled(llm):
    """Metrics once every finished save has been reported (stats travel with engine steps)."""
    from vllm_promptcache import read_metrics

    def key():
        snap = read_metrics(llm)
        return snap.get("saved_bytes_total", {}).get("host", 0), snap.get("tier_bytes_in_use")

    settle(key, lambda: generate(llm, [5, 6, 7], max_tokens=1), tries=20, pause=0.05)
    return read_metrics(llm)


def host(snap, name):
    return snap.get(name, {}).get("host", 0)


def test_second_turn_loads_first_turn_bit_exact(baseline, cached):
    p1 = tokens(600, seed=1)
    before = settled(cached)
    o1 = generate(cached, p1)
    assert o1 == generate(baseline, p1)
    after_1 = settled(cached)
    saved_1 = host(after_1, "saved_bytes_total") - host(before, "saved_bytes_total")

    # Turn 2: the whole of turn 1 (its answer too) plus a new message.
    p2 = p1 + o1 + tokens(50, seed=2)
    o2 = generate(cached, p2)
    after_2 = settled(cached)
    assert o2 == generate(baseline, p2), "a host-tier hit must not change greedy output"

    # Everything of turn 1 that has KV: its full blocks and its partial last block.
    expected_hit = len(p1) + len(o1) - 1
    assert host(after_2, "hit_tokens_total") - host(after_1, "hit_tokens_total") == expected_hit
    loaded_2 = host(after_2, "loaded_bytes_total") - host(after_1, "loaded_bytes_total")
    assert saved_1 > 0 and loaded_2 == saved_1, "the bytes loaded are the bytes saved"
    assert after_2["lookup_hits_total"] - after_1.get("lookup_hits_total", 0) == 1


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a CPU the worker leaves free")
def test_a_hit_loads_beside_the_forward_bit_exact(baseline, cached):
    """CPU loads run layer by layer on the CPU the worker's OpenMP threads leave free
    (conftest binds them), each attention layer waiting for its own: the block the
    forward also writes into (the stored run's partial last block) loads before the
    forward, every full block beside it, and the output is vLLM's."""
    for seed in (3, 4):  # the engine's first step with such loads is a probe (before)
        p1 = tokens(700, seed=seed)
        o1 = generate(cached, p1)
        before = settled(cached)
        p2 = p1 + o1 + tokens(40, seed=seed + 10)
        o2 = generate(cached, p2)
        after = settled(cached)
        assert o2 == generate(baseline, p2), "a load beside the forward changed the output"
    full_blocks = (len(p1) + len(o1) - 1) // BLOCK
    loaded = host(after, "loaded_bytes_total") - host(before, "loaded_bytes_total")
    beside = (host(after, "layerwise_loaded_bytes_total")
              - host(before, "layerwise_loaded_bytes_total"))
    assert loaded > 0 and beside == loaded * full_blocks // (full_blocks + 1)


def test_cache_salt_isolates_tenants(cached):
    from vllm_promptcache import read_metrics

    p = tokens(400, seed=3)
    generate(cached, p, salt="alice")
    settled(cached)
    before = host(read_metrics(cached), "hit_tokens_total")
    generate(cached, p + [11, 12], salt="bob")
    mid = host(settled(cached), "hit_tokens_total")
    assert mid == before, "another salt must miss"
    generate(cached, p + [11, 12], salt="alice")
    assert host(settled(cached), "hit_tokens_total") > mid, "the same salt hits"


def test_flood_of_unique_prompts_stays_within_the_bound(cached):
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": tokens(5 * BLOCK + 17, seed=100 + i)} for i in range(40)]
    outs = cached.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    assert len(outs) == 40 and all(len(o.outputs[0].token_ids) == 4 for o in outs)
    snap = settled(cached)
    capacity = host(snap, "tier_capacity_bytes")
    assert 0 < capacity <= HOST_GB * 2**30
    assert 0 < host(snap, "tier_bytes_in_use") <= capacity
    assert host(snap, "evictions_total") > 0, "40 x 5 blocks cannot fit ~65 slots without evicting"
    assert host(snap, "save_seconds_total") > 0 and host(snap, "load_seconds_total") > 0
    assert snap.get("save_failures_total", {}).get("host", 0) == 0


def test_with_vllm_prefix_cache_on_host_serves_after_gpu_cache_drops(baseline, cached_pc):
    # Five whole blocks of prompt, so both engines reuse exactly these blocks
    # (answers are not part of the next prompt here: see the test above for that).
    p1 = tokens(5 * BLOCK, seed=4)
    p2 = p1 + tokens(40, seed=5)
    generate(cached_pc, p1)
    # While vLLM's prefix cache holds turn 1, the plugin loads nothing it already has.
    s0 = settled(cached_pc)
    generate(cached_pc, p1 + [7] * 10)
    s1 = settled(cached_pc)
    assert host(s1, "hit_tokens_total") == host(s0, "hit_tokens_total")

    assert cached_pc.reset_prefix_cache(), "vLLM's own prefix cache is dropped"
    o2, lp2 = generate(cached_pc, p2, with_logprobs=True)
    s2 = settled(cached_pc)
    assert host(s2, "hit_tokens_total") - host(s1, "hit_tokens_total") == 5 * BLOCK
    generate(baseline, p1)
    ref, ref_lp = generate(baseline, p2, with_logprobs=True)  # a vLLM prefix-cache hit
    assert o2 == ref
    assert lp2[0] == ref_lp[0], "prefill over host-loaded KV is bit-identical to a vLLM prefix hit"

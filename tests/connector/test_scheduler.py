"""The connector's scheduler side without an engine: plans, commits, aborts, waits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_promptcache.config import PromptCacheConfig
from vllm_promptcache.connector.metadata import PromptCacheWorkerMeta
from vllm_promptcache.connector.scheduler import PromptCacheScheduler

BS = 4
PAGE = 1024


def vllm_config():
    mc = SimpleNamespace(model="m", revision=None, dtype="bf16", get_num_layers=lambda pc: 2,
                         get_num_kv_heads=lambda pc: 2, get_head_size=lambda: 32)
    return SimpleNamespace(model_config=mc,
                           cache_config=SimpleNamespace(block_size=BS, cache_dtype="auto"),
                           parallel_config=SimpleNamespace(tensor_parallel_size=1, world_size=1))


def kv_cache_config():
    group = SimpleNamespace(kv_cache_spec=SimpleNamespace(page_size_bytes=PAGE),
                            layer_names=["l0", "l1"])
    return SimpleNamespace(kv_cache_groups=[group], num_blocks=100)


def request(req_id, tokens, computed=None, salt=None, prompt=None):
    return SimpleNamespace(request_id=req_id, all_token_ids=list(tokens), cache_salt=salt,
                           num_computed_tokens=len(tokens) - 1 if computed is None else computed,
                           num_prompt_tokens=len(tokens) if prompt is None else prompt)


class Blocks:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (self.ids,)


def output(finished, failed=()):
    meta = PromptCacheWorkerMeta(failed_saves=set(failed)) if failed else None
    return SimpleNamespace(finished_sending=set(finished), kv_connector_worker_meta=meta)


@pytest.fixture
def sched():
    return PromptCacheScheduler(vllm_config(), kv_cache_config(),
                                PromptCacheConfig(host_gb=64 * 2 * PAGE / 2**30).validate())


def finish_and_save(sched, req, block_ids, ok=True):
    delay, _ = sched.request_finished(req, block_ids)
    meta = sched.build_connector_meta(None)
    sched.update_connector_output(output({req.request_id}, () if ok else {req.request_id}))
    return delay, meta


def test_finished_request_saves_full_blocks_then_hits(sched):
    toks = list(range(100, 114))  # 14 tokens: 13 have KV -> 3 full blocks
    delay, meta = finish_and_save(sched, request("a", toks), [7, 8, 9, 10])
    assert delay is True
    assert [s.block_ids for s in meta.saves] == [[7, 8, 9]]
    nxt = request("b", toks + [1, 2, 3])
    assert sched.get_num_new_matched_tokens(nxt, 0) == (3 * BS, False)
    # vLLM's prefix cache already holds one block: only the rest is loaded.
    assert sched.get_num_new_matched_tokens(nxt, BS) == (2 * BS, False)
    sched.update_state_after_alloc(nxt, Blocks([20, 21, 22, 23, 24]), 2 * BS)
    load = sched.build_connector_meta(None).loads
    assert [(t.block_ids, len(t.slots)) for t in load] == [([21, 22], 2)]
    assert load[0].slots == meta.saves[0].slots[1:3]


def test_failed_save_is_never_served(sched):
    toks = list(range(200, 213))
    finish_and_save(sched, request("a", toks), [1, 2, 3], ok=False)
    assert sched.get_num_new_matched_tokens(request("b", toks + [5]), 0) == (0, False)
    assert sched.host.used_slots == 0
    stats = sched.get_kv_connector_stats().data["counter"]
    assert stats["save_failures_total|host"] == 3


def test_lookup_waits_for_a_save_in_flight(sched):
    toks = list(range(300, 313))
    sched.request_finished(request("a", toks), [1, 2, 3])
    assert sched.has_pending_saves()
    nxt = request("b", toks + [9])
    assert sched.get_num_new_matched_tokens(nxt, 0) == (None, False), "ask again, do not recompute"
    sched.build_connector_meta(None)
    sched.update_connector_output(output({"a"}))
    assert not sched.has_pending_saves()
    assert sched.get_num_new_matched_tokens(nxt, 0) == (3 * BS, False)


def test_never_loads_the_last_token_and_respects_salt(sched):
    toks = list(range(400, 412))  # exactly 3 blocks
    finish_and_save(sched, request("a", toks + [0], salt="s1"), [1, 2, 3])
    # A prompt of exactly those 12 tokens: its last token must be computed, so 2 blocks.
    assert sched.get_num_new_matched_tokens(request("b", toks, salt="s1"), 0) == (2 * BS, False)
    assert sched.get_num_new_matched_tokens(request("c", toks + [1], salt="s2"), 0) == (0, False)


def test_decode_tokens_are_skipped_when_configured():
    s = PromptCacheScheduler(vllm_config(), kv_cache_config(),
                             PromptCacheConfig(host_gb=64 * 2 * PAGE / 2**30,
                                               save_decode_tokens=False).validate())
    toks = list(range(500, 517))  # 5 prompt tokens + 12 generated
    _, meta = finish_and_save(s, request("a", toks, prompt=5), [1, 2, 3, 4])
    assert [t.block_ids for t in meta.saves] == [[1]]

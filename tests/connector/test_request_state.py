"""A request's life on the scheduler side (request_state.py), and what depends on it:
approximate blocks marked from allocation (a preempted, then aborted request's blocks
stay in vLLM's prefix cache) and cache resets (refused while vLLM's prefix cache is
in use; otherwise nothing stored before is served again)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.connector.test_scheduler import (BS, Blocks, finish_and_save, kv_cache_config,
                                            output, request, vllm_config)
from vllm_promptcache.config import PromptCacheConfig
from vllm_promptcache.connector.request_state import Phase, RequestStates
from vllm_promptcache.connector.scheduler import PromptCacheScheduler


def hashed(req):
    """vLLM's block hashes, as a chain over the request's tokens (full blocks)."""
    toks = req.all_token_ids
    req.block_hashes = [hash(tuple(toks[:(i + 1) * BS])) for i in range(len(toks) // BS)]
    return req


class Pool:
    """vLLM's block pool as reset_cache() reads it: `used` blocks besides the null one."""

    def __init__(self, used=0):
        self.num_gpu_blocks, self.used = 100, used

    def get_num_free_blocks(self):
        return self.num_gpu_blocks - 1 - self.used


class KvCacheManager:
    def __init__(self):
        self.block_pool = Pool()
        self.blocks = {}

    def get_block_ids(self, req_id):
        return (self.blocks.get(req_id, []),)


@pytest.fixture
def sched(monkeypatch):
    import torch

    from vllm_promptcache.kernels import rope_params

    monkeypatch.setattr(rope_params, "rope_params", lambda vc: (torch.ones(16), 32, True))
    cfg = PromptCacheConfig(host_gb=256 * 2 * 1024 / 2**30, disk_gb=0, position_independent=True)
    s = PromptCacheScheduler(vllm_config(), kv_cache_config(), cfg.validate())
    s.bind_kv_cache_manager(KvCacheManager())
    return s


SYSTEM, TURN1, TURN2 = list(range(100, 140)), list(range(200, 240)), list(range(300, 340))
TRUNCATED = SYSTEM + TURN2 + [7, 7, 7, 7, 7]


def store_conversation(sched):
    finish_and_save(sched, request("a", SYSTEM + TURN1 + TURN2 + [1]), list(range(30)))


def shifted_request(sched, req_id="b"):
    """A request that loads the system prompt exact and turn 2 shifted (approximate
    from block 10 on), allocated GPU blocks 40..61."""
    req = hashed(request(req_id, TRUNCATED, computed=0))
    assert sched.get_num_new_matched_tokens(req, 0) == (80, False)
    sched.update_state_after_alloc(req, Blocks(list(range(40, 62))), 80)
    sched.approximate.kv_cache_manager.blocks[req_id] = list(range(40, 62))
    meta = sched.build_connector_meta(None)
    assert meta.shifted_loads and set(meta.shifted_loads[0].deltas) == {-40}
    return req


def exact_keys_in_host(sched, tokens, n):
    return [k in sched.host for k in sched.keyer.block_keys(tokens, None, n)]


def test_transitions_walk_a_request_through_its_life():
    states = RequestStates()
    forgotten = []
    states.on_release.append(forgotten.append)
    r = SimpleNamespace(request_id="r")
    s = states.of(r)
    assert s.phase is Phase.WAITING and len(states) == 1
    states.looked_up(s, 8)
    states.allocated(s)
    assert s.phase is Phase.RUNNING
    states.approximate(s, 5)
    states.approximate(s, 7)  # only ever decreases
    assert s.approximate_from == 5
    s.marked_blocks = 3
    states.looked_up(s, 4)    # asked again while running: it was preempted
    assert s.phase is Phase.WAITING and s.preemptions == 1 and s.marked_blocks == 0
    assert s.local_tokens == 8  # the largest hit over its lookups
    states.allocated(s)
    states.finished(s, [1, 2])  # a save in flight: kept, collaborators forget it
    assert s.phase is Phase.SAVING and states.saving() and forgotten == ["r"]
    assert states.save_reported("r") is s and not states.saving() and len(states) == 0
    t = states.of(SimpleNamespace(request_id="t"))
    states.finished(t, None)  # nothing to save (or aborted): gone at once
    assert len(states) == 0 and forgotten == ["r", "t"]


def test_a_preempted_then_aborted_shifted_request_never_lends_its_blocks_as_exact(sched):
    """Issue 29, point 1: the blocks of a request that loaded shifted KV stay in vLLM's
    prefix cache after a preemption; aborted while it waits, it finishes with no blocks.
    A later request that vLLM hands those blocks must not save them under exact keys."""
    store_conversation(sched)
    b = shifted_request(sched, "b")
    sched.approximate.kv_cache_manager.blocks.pop("b")  # preempted: its blocks are freed
    sched.build_connector_meta(SimpleNamespace(preempted_req_ids={"b"}))
    assert sched.requests.get("b").phase is Phase.WAITING
    b.num_computed_tokens = 0
    assert sched.request_finished(b, []) == (False, None)
    assert "b" not in sched.requests

    # The same prompt: vLLM's prefix cache hands over b's 21 full blocks.
    c = hashed(request("c", TRUNCATED, computed=84))
    assert sched.get_num_new_matched_tokens(c, 84)[0] == 0
    sched.update_state_after_alloc(c, Blocks(list(range(40, 62))), 0)
    sched.build_connector_meta(None)
    done = hashed(request("c", TRUNCATED + [9, 9, 9, 9], computed=len(TRUNCATED) + 3))
    finish_and_save(sched, done, list(range(40, 62)))
    held = exact_keys_in_host(sched, done.all_token_ids, 22)
    assert all(held[:10])      # the system prompt was loaded exact
    assert not any(held[10:])  # b's shifted blocks and all after them: never exact


def test_blocks_reused_for_other_tokens_are_exact_again(sched):
    """A mark names the owner's tokens (its block hash): a block id vLLM gave to other
    tokens since is exact for the request that now holds them."""
    store_conversation(sched)
    b = shifted_request(sched, "b")
    sched.approximate.kv_cache_manager.blocks.pop("b")
    sched.request_finished(b, [])  # vLLM passes the same Request object to every hook
    other = [t + 5000 for t in TRUNCATED]
    d = hashed(request("d", other, computed=84))  # as if vLLM's cache held these tokens
    sched.get_num_new_matched_tokens(d, 84)
    sched.update_state_after_alloc(d, Blocks(list(range(40, 62))), 0)
    done = hashed(request("d", other + [9, 9, 9, 9], computed=len(other) + 3))
    finish_and_save(sched, done, list(range(40, 62)))
    assert all(exact_keys_in_host(sched, done.all_token_ids, 22))


def test_a_reset_vllm_could_not_do_is_refused_and_keeps_the_marks(sched):
    """Issue 29, point 2: vLLM 0.32 asks the connector to reset even when its own
    prefix-cache reset failed (blocks in use): the marks must survive."""
    store_conversation(sched)
    b = shifted_request(sched, "b")
    sched.approximate.kv_cache_manager.block_pool.used = 22
    assert sched.reset_cache() is False
    assert len(sched.approximate) and exact_keys_in_host(sched, SYSTEM + TURN1, 20)[0]
    sched.approximate.kv_cache_manager.blocks.pop("b")
    sched.request_finished(b, [])
    c = hashed(request("c", TRUNCATED, computed=84))
    sched.get_num_new_matched_tokens(c, 84)
    sched.update_state_after_alloc(c, Blocks(list(range(40, 62))), 0)
    done = hashed(request("c", TRUNCATED + [9, 9, 9, 9], computed=len(TRUNCATED) + 3))
    finish_and_save(sched, done, list(range(40, 62)))
    assert not any(exact_keys_in_host(sched, done.all_token_ids, 22)[10:])


def test_a_reset_serves_nothing_stored_before_it(sched):
    """After a reset (a weight update), nothing the old weights made is served: not
    host blocks, not a save that lands after the reset, not a pinned module."""
    store_conversation(sched)
    conv = SYSTEM + TURN1 + TURN2 + [1]
    # A second conversation finishes, and its save lands only after the reset.
    late = request("late", [t + 1000 for t in conv])
    delay, _ = sched.request_finished(late, list(range(30, 60)))
    assert delay is True
    sched.build_connector_meta(None)
    assert sched.reset_cache() is True
    sched.update_connector_output(output({"late"}))
    for req_id, tokens in (("x", conv + [5]), ("y", late.all_token_ids + [5])):
        again = request(req_id, tokens, computed=0)
        assert sched.get_num_new_matched_tokens(again, 0) == (0, False)
    # Saved after the reset: served again.
    finish_and_save(sched, request("z", conv), list(range(30)))
    assert sched.get_num_new_matched_tokens(request("w", conv + [5], computed=0), 0)[0] == 120


def test_kv_computed_after_handed_approximate_kv_is_marked_too(sched):
    """A request vLLM hands another's approximate blocks computes the rest from them:
    its own later blocks are marked as it runs, so a third request handed those (with
    the approximate head recomputed exactly since, under other block ids) still sees
    them as approximate."""
    store_conversation(sched)
    b = shifted_request(sched, "b")
    sched.approximate.kv_cache_manager.blocks.pop("b")
    sched.request_finished(b, [])
    longer = TRUNCATED + [11] * 11  # 96 tokens: 24 full blocks
    c = hashed(request("c", longer, computed=84))
    sched.get_num_new_matched_tokens(c, 84)
    c_ids = list(range(40, 62)) + [70, 71, 72]
    sched.update_state_after_alloc(c, Blocks(c_ids), 0)
    assert sched.requests.get("c").approximate_from == 10
    sched.approximate.kv_cache_manager.blocks["c"] = c_ids
    sched.build_connector_meta(None)
    sched.request_finished(c, c_ids)
    # vLLM evicted b's blocks 40..61 and recomputed that prefix exactly into 80..101;
    # c's blocks 70, 71 (computed after approximate KV) are still in its cache.
    d = hashed(request("d", longer + [5], computed=24 * BS))
    sched.get_num_new_matched_tokens(d, 24 * BS)
    ids = list(range(80, 102)) + [70, 71, 73]
    sched.update_state_after_alloc(d, Blocks(ids), 0)
    assert sched.approximate.exact_prefix(sched.requests.get("d"), ids, len(ids)) == 22

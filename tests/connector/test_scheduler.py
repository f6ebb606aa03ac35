"""The connector's scheduler side without an engine: plans, commits, aborts, waits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_promptcache.config import PromptCacheConfig
from vllm_promptcache.connector.metadata import PromptCacheWorkerMeta
from vllm_promptcache.connector.scheduler import PromptCacheScheduler
from vllm_promptcache.request_params import module_token

module_token(create=True)  # as engine_kwargs() does before an engine starts

BS = 4
PAGE = 1024


def vllm_config():
    mc = SimpleNamespace(model="m", revision=None, dtype="bf16", get_num_layers=lambda pc: 2,
                         get_num_kv_heads=lambda pc: 2, get_head_size=lambda: 32)
    return SimpleNamespace(model_config=mc,
                           cache_config=SimpleNamespace(block_size=BS, cache_dtype="auto"),
                           parallel_config=SimpleNamespace(tensor_parallel_size=1, world_size=1,
                                                           pipeline_parallel_size=1))


def kv_cache_config():
    group = SimpleNamespace(kv_cache_spec=SimpleNamespace(page_size_bytes=PAGE),
                            layer_names=["l0", "l1"])
    return SimpleNamespace(kv_cache_groups=[group], num_blocks=100)


def request(req_id, tokens, computed=None, salt=None, prompt=None):
    return SimpleNamespace(request_id=req_id, all_token_ids=list(tokens), cache_salt=salt,
                           lora_request=None, mm_features=[], prompt_embeds=None,
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
                                PromptCacheConfig(host_gb=64 * 2 * PAGE / 2**30, disk_gb=0).validate())


def finish_and_save(sched, req, block_ids, ok=True):
    delay, _ = sched.request_finished(req, block_ids)
    meta = sched.build_connector_meta(None)
    sched.update_connector_output(output({req.request_id}, () if ok else {req.request_id}))
    return delay, meta


def test_finished_request_saves_full_blocks_and_its_tail_then_hits(sched):
    toks = list(range(100, 114))  # 14 tokens: 13 have KV -> 3 full blocks and 1 token
    delay, meta = finish_and_save(sched, request("a", toks), [7, 8, 9, 10])
    assert delay is True
    # The partial last block is kept too (tails.py), under a key of its own.
    assert [s.block_ids for s in meta.saves] == [[7, 8, 9, 10]]
    nxt = request("b", toks + [1, 2, 3])
    assert sched.get_num_new_matched_tokens(nxt, 0) == (3 * BS + 1, False)
    # vLLM's prefix cache already holds one block: only the rest is loaded.
    assert sched.get_num_new_matched_tokens(nxt, BS) == (2 * BS + 1, False)
    sched.update_state_after_alloc(nxt, Blocks([20, 21, 22, 23, 24]), 2 * BS + 1)
    step = sched.build_connector_meta(None)
    load = step.loads
    assert [(t.block_ids, len(t.slots)) for t in load] == [([21, 22, 23], 3)]
    assert load[0].slots == meta.saves[0].slots[1:4]
    # The tail's block is one the forward writes the rest of: named, so the worker
    # copies it before the forward writes there (vLLM writes before a layer's wait).
    assert step.shared_blocks == [23]
    # A prompt that goes on differently after the full blocks gets no tail.
    other = request("c", toks[:12] + [7, 7, 7, 7])
    assert sched.get_num_new_matched_tokens(other, 0) == (3 * BS, False)


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
    assert sched.has_pending_work()
    nxt = request("b", toks + [9])
    assert sched.get_num_new_matched_tokens(nxt, 0) == (None, False), "ask again, do not recompute"
    sched.build_connector_meta(None)
    sched.update_connector_output(output({"a"}))
    assert not sched.has_pending_work()
    assert sched.get_num_new_matched_tokens(nxt, 0) == (3 * BS, False)


def test_a_tail_still_being_saved_holds_its_request_back_no_longer_than_recomputing_it(sched):
    """Issue 31: a request is never held back asking again for longer than recomputing
    what it waits for.  A tail (tails.py) whose save is in flight was waited for with
    no bound; now as a block in flight is, then the request goes on without it."""
    import time

    toks = list(range(500, 511))  # KV for 10 tokens: 2 full blocks and a 2-token tail
    finish_and_save(sched, request("a", toks), [1, 2, 3])
    # The next turn's save: the same blocks, a longer tail (3 tokens), still in flight.
    sched.request_finished(request("a2", toks[:10] + [50, 51]), [1, 2, 3])
    nxt = toks[:10] + [50, 51, 52, 53]
    # Nothing measured yet: waits, as for any save in flight.
    assert sched.get_num_new_matched_tokens(request("b", nxt), 0) == (None, False)
    for n in (64, 128, 256, 512):  # vLLM's prefill measured at 200 tokens/s: a block, 20 ms
        sched.cost.observe_prefill(n, n, n / 200.0)
    slow = request("c", nxt)
    assert sched.get_num_new_matched_tokens(slow, 0) == (None, False)
    time.sleep(0.1)
    # Past the budget: the full blocks are loaded, the tail's tokens computed.
    assert sched.get_num_new_matched_tokens(slow, 0) == (2 * BS, False)
    stats = sched.get_kv_connector_stats().data["counter"]
    assert stats["load_decisions_total|host,recompute"] == 1
    # Once the save lands, the tail is loaded again.
    sched.build_connector_meta(None)
    sched.update_connector_output(output({"a2"}))
    assert sched.get_num_new_matched_tokens(request("d", nxt), 0) == (2 * BS + 3, False)


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
    # The prompt's full block and its 1-token tail; nothing generated.
    assert [t.block_ids for t in meta.saves] == [[1, 2]]


# -- the disk tier --------------------------------------------------------------

def events_output(events, corrupt=()):
    meta = PromptCacheWorkerMeta(events=list(events), corrupt_objects=set(corrupt))
    return SimpleNamespace(finished_sending=set(), kv_connector_worker_meta=meta)


@pytest.fixture
def disk_sched(tmp_path):
    cfg = PromptCacheConfig(host_gb=64 * 2 * PAGE / 2**30, disk_gb=1, disk_path=str(tmp_path),
                            model_id="test-model")
    return PromptCacheScheduler(vllm_config(), kv_cache_config(), cfg.validate())


def finish_with_disk(sched, req, block_ids):
    sched.request_finished(req, block_ids)
    meta = sched.build_connector_meta(None)
    assert meta.tier_writes, "every save is written through to disk"
    sched.update_connector_output(SimpleNamespace(
        finished_sending={req.request_id},
        kv_connector_worker_meta=PromptCacheWorkerMeta(
            events=[("write", w.object_id, True) for w in meta.tier_writes])))
    return meta


def test_write_through_then_promote_from_disk(disk_sched):
    toks = list(range(13))  # 3 full blocks
    meta = finish_with_disk(disk_sched, request("a", toks), [1, 2, 3])
    assert sum(len(w.keys) for w in meta.tier_writes) == 3
    assert not disk_sched.has_pending_work()
    disk_sched.host.clear()  # host pressure: only disk has it now
    nxt = request("b", toks + [99, 98, 97], computed=0)
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (None, False)
    promos = disk_sched.build_connector_meta(None).promotions
    assert sum(len(p.slots) for p in promos) == 3
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (None, False)  # still reading
    disk_sched.update_connector_output(events_output([("promote", p.promo_id, True) for p in promos]))
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (12, False)
    disk_sched.update_state_after_alloc(nxt, Blocks([7, 8, 9, 10]), 12)
    stats = disk_sched.get_kv_connector_stats().data["counter"]
    assert stats["hit_tokens_total|disk"] == 12 and "hit_tokens_total|host" not in stats
    assert stats["promoted_blocks_total|disk"] == 3


def test_a_run_promoted_from_disk_brings_its_tail_with_it(disk_sched):
    """The partial last block is written below host with the run's full blocks, and a
    conversation whose history left host reloads it with them: without it, every turn
    served from disk recomputed up to block_size - 1 tokens a host hit loads."""
    toks = list(range(300, 314))  # 13 tokens have KV: 3 full blocks and 1 token
    meta = finish_with_disk(disk_sched, request("a", toks), [7, 8, 9, 10])
    assert sum(len(w.keys) for w in meta.tier_writes) == 4, "3 blocks and the tail"
    assert sorted(b for w in meta.tier_writes for b in w.block_ids) == [7, 8, 9, 10]
    disk_sched.host.clear()
    nxt = request("b", toks + [1, 2, 3], computed=0)
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (None, False)
    promos = disk_sched.build_connector_meta(None).promotions
    assert sum(len(p.slots) for p in promos) == 4, "one promotion round: the tail with the run"
    disk_sched.update_connector_output(
        events_output([("promote", p.promo_id, True) for p in promos]))
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (3 * BS + 1, False)
    disk_sched.update_state_after_alloc(nxt, Blocks([20, 21, 22, 23, 24]), 3 * BS + 1)
    step = disk_sched.build_connector_meta(None)
    assert [t.block_ids for t in step.loads] == [[20, 21, 22, 23]]
    # A queued request's prefetch brings it too: its lookup then waits one round only.
    disk_sched.host.clear()
    disk_sched.on_new_request(request("q", toks + [4, 5], computed=0))
    promos = disk_sched.build_connector_meta(None).promotions
    assert sum(len(p.slots) for p in promos) == 4
    disk_sched.update_connector_output(
        events_output([("promote", p.promo_id, True) for p in promos]))
    # A prompt that goes on differently after the full blocks promotes no tail.
    disk_sched.host.clear()
    other = request("c", toks[:12] + [7, 7, 7, 7], computed=0)
    assert disk_sched.get_num_new_matched_tokens(other, 0) == (None, False)
    assert sum(len(p.slots) for p in disk_sched.build_connector_meta(None).promotions) == 3


def test_a_small_disk_run_is_read_in_the_step_that_loads_it(disk_sched):
    """Where vLLM recomputes blocks a connector fails to load, a short read from disk is
    made in the loading step (the worker reads, then copies): the lookup offers the run
    at once instead of asking again a step later.  A failed read's slots are released."""
    disk_sched.secondary.direct_reads = True
    toks = list(range(400, 414))  # 13 tokens have KV: 3 full blocks and 1 token
    finish_with_disk(disk_sched, request("a", toks), [7, 8, 9, 10])
    disk_sched.host.clear()
    nxt = request("b", toks + [1, 2, 3], computed=0)
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (3 * BS + 1, False), "at once"
    disk_sched.update_state_after_alloc(nxt, Blocks([20, 21, 22, 23, 24]), 3 * BS + 1)
    meta = disk_sched.build_connector_meta(None)
    assert {p.for_req for p in meta.promotions} == {"b"}
    assert [t.block_ids for t in meta.loads] == [[20, 21, 22, 23]]
    assert sorted(meta.loads[0].slots) == sorted(s for p in meta.promotions for s in p.slots)
    disk_sched.update_connector_output(
        events_output([("promote", p.promo_id, False) for p in meta.promotions]))
    assert disk_sched.host.used_slots == 0, "a failed read frees its slots"
    stats = disk_sched.get_kv_connector_stats().data["counter"]
    assert "hit_tokens_total|disk" not in stats, "vLLM recomputed them: no hit"


def test_a_prefetch_not_sent_yet_becomes_the_loading_steps_direct_read(disk_sched):
    """A request queued and looked up in the same step: its prefetch (issued when it was
    queued) has not gone to the workers yet, so its lookup makes it a direct read and
    loads at once, instead of waiting a step for the prefetch to land."""
    disk_sched.secondary.direct_reads = True
    toks = list(range(600, 614))
    finish_with_disk(disk_sched, request("a", toks), [7, 8, 9, 10])
    disk_sched.host.clear()
    nxt = request("b", toks + [1, 2, 3], computed=0)
    disk_sched.on_new_request(nxt)  # prefetches the run and its tail
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (3 * BS + 1, False)
    disk_sched.update_state_after_alloc(nxt, Blocks([20, 21, 22, 23, 24]), 3 * BS + 1)
    meta = disk_sched.build_connector_meta(None)
    assert {p.for_req for p in meta.promotions} == {"b"}
    assert sorted(meta.loads[0].slots) == sorted(s for p in meta.promotions for s in p.slots)
    disk_sched.update_connector_output(
        events_output([("promote", p.promo_id, True) for p in meta.promotions]))
    stats = disk_sched.get_kv_connector_stats().data["counter"]
    assert stats["hit_tokens_total|disk"] == 3 * BS, "counted once the read landed"
    assert stats["prefetch_hit_blocks_total|"] == 3
    # Once sent, a promotion is no longer adopted: a later asker waits for it.
    disk_sched.host.clear()
    late = request("c", toks + [4], computed=0)
    disk_sched.on_new_request(late)
    disk_sched.build_connector_meta(None)  # the prefetch goes out
    assert disk_sched.get_num_new_matched_tokens(late, 0) == (None, False)


def test_a_disk_read_that_would_hold_the_step_long_is_not_made_in_it(disk_sched):
    disk_sched.secondary.direct_reads = True
    for _ in range(8):  # 1 MiB a second: 3 blocks take far longer than the cap
        disk_sched.cost.observe_transfer("disk", 1 << 20, 1.0)
    toks = list(range(500, 513))
    finish_with_disk(disk_sched, request("a", toks), [7, 8, 9])
    disk_sched.host.clear()
    nxt = request("b", toks + [1, 2, 3], computed=0)
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (None, False)
    assert not any(p.for_req for p in disk_sched.build_connector_meta(None).promotions)


def test_a_step_without_tokens_is_marked_so_the_worker_may_wait_for_its_reads(disk_sched):
    """vLLM scheduled nothing (the request waits for its promotion): the metadata says
    so, and only then may the worker hold the step for reads in flight."""
    from types import SimpleNamespace

    toks = list(range(13))
    finish_with_disk(disk_sched, request("a", toks), [1, 2, 3])
    disk_sched.host.clear()
    nxt = request("b", toks + [99], computed=0)
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (None, False)
    meta = disk_sched.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=0))
    assert meta.promotions and meta.no_forward
    assert not disk_sched.build_connector_meta(
        SimpleNamespace(total_num_scheduled_tokens=7)).no_forward
    assert not disk_sched.build_connector_meta(None).no_forward


def test_prefetch_on_queue_and_prefetch_hits(disk_sched):
    toks = list(range(9))  # 2 full blocks
    finish_with_disk(disk_sched, request("a", toks), [1, 2])
    disk_sched.host.clear()
    nxt = request("b", toks + [5, 5, 5], computed=0)
    disk_sched.on_new_request(nxt)
    promos = disk_sched.build_connector_meta(None).promotions
    assert sum(len(p.slots) for p in promos) == 2
    disk_sched.update_connector_output(events_output([("promote", p.promo_id, True) for p in promos]))
    # By its turn, the blocks are in host: a plain host load, counted as a prefetch hit.
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (8, False)
    disk_sched.update_state_after_alloc(nxt, Blocks([4, 5, 6]), 8)
    stats = disk_sched.get_kv_connector_stats().data["counter"]
    assert stats["prefetch_blocks_total|"] == 2 and stats["prefetch_hit_blocks_total|"] == 2


def test_a_prefetch_still_reading_holds_its_request_back_no_longer_than_recomputing(disk_sched):
    """Issue 31: a queued request's blocks are being prefetched from a tier slower than
    recomputing; when it is scheduled it may wait for them only as long as recomputing
    them would take (a slow store under a prefetch once held it back for every read).
    Then it computes them, and that is counted as a recompute decision for the tier."""
    import time

    toks = list(range(9))  # 2 full blocks
    finish_with_disk(disk_sched, request("a", toks), [1, 2])
    disk_sched.host.clear()
    nxt = request("b", toks + [5, 5, 5], computed=0)
    disk_sched.on_new_request(nxt)  # nothing measured yet: prefetched
    assert disk_sched.build_connector_meta(None).promotions  # the prefetch, never reported
    for n in (64, 128, 256, 512):  # then vLLM's prefill measured at 1M tokens/s
        disk_sched.cost.observe_prefill(n, n, n / 1e6)
    for _ in range(4):  # and the disk at 10 ms per (one-block) read
        disk_sched.cost.observe_transfer("disk", disk_sched.host.slot_bytes, 0.01)
    # 8 tokens recompute in 8 us; the read is expected to take longer: no wait at all.
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (0, False)
    stats = disk_sched.get_kv_connector_stats().data["counter"]
    assert stats["load_decisions_total|disk,recompute"] == 1
    # Where recomputing is slower than the read (a slow prefill), it waits for it,
    # but only for the recompute time (here 40 ms) if the read never lands.
    for n in (64, 128, 256, 512):
        disk_sched.cost.observe_prefill(n, n, n / 200.0)
    slow = request("c", toks + [6, 6, 6], computed=0)
    assert disk_sched.get_num_new_matched_tokens(slow, 0) == (None, False)
    time.sleep(0.1)
    assert disk_sched.get_num_new_matched_tokens(slow, 0) == (0, False)


def test_a_tier_is_priced_by_its_reads_own_time_not_the_engine_steps_around_it(disk_sched):
    """A promotion is reported a step after it was issued; on a slow prefill (the bench
    shape on a CPU, seconds a step) that step once made the disk look slower than
    recomputing, and every disk hit after was recomputed.  The workers report each
    read's own time, and the tier is priced by it."""
    import time

    sched = disk_sched
    toks = list(range(4 * 4 + 1))  # 4 full blocks
    finish_with_disk(sched, request("a", toks), [1, 2, 3, 4])
    for i in range(6):
        sched.host.clear()
        nxt = request(f"b{i}", toks + [5, 5, 5], computed=0)
        assert sched.get_num_new_matched_tokens(nxt, 0) == (None, False)
        promos = sched.build_connector_meta(None).promotions
        assert promos
        time.sleep(0.05)  # an engine step: 50 ms between issue and report
        sched.update_connector_output(events_output(
            [("promote", p.promo_id, True, 0.001) for p in promos]))  # each read: 1 ms
        assert sched.get_num_new_matched_tokens(nxt, 0) == (16, False)
        sched.update_state_after_alloc(nxt, Blocks([7, 8, 9, 10, 11]), 16)
    nbytes = 4 * sched.host.slot_bytes
    assert sched.cost.tier_seconds("disk", nbytes) < 0.01, "priced by the reads (1 ms)"


def test_a_prefetch_moves_only_what_its_request_would_load(disk_sched):
    """Issue 31: a queued request's blocks found in a tier slower than recomputing them
    are not prefetched (the transfer would only compete with the engine, and push other
    blocks out of host); from a tier faster than recomputing they are."""
    toks = list(range(9))  # 2 full blocks
    finish_with_disk(disk_sched, request("a", toks), [1, 2])
    disk_sched.host.clear()
    for n in (64, 128, 256, 512):  # vLLM's prefill measured at 1M tokens/s
        disk_sched.cost.observe_prefill(n, n, n / 1e6)
    for _ in range(4):  # the disk measured at 10 ms per (one-block) read
        disk_sched.cost.observe_transfer("disk", disk_sched.host.slot_bytes, 0.01)
    disk_sched.on_new_request(request("b", toks + [5, 5, 5], computed=0))
    assert not disk_sched.build_connector_meta(None).promotions
    assert "prefetch_blocks_total|" not in disk_sched.get_kv_connector_stats().data["counter"]
    for n in (64, 128, 256, 512):  # a slow prefill: 200 tokens/s, 40 ms for 8 tokens
        disk_sched.cost.observe_prefill(n, n, n / 200.0)
    disk_sched.on_new_request(request("c", toks + [6, 6, 6], computed=0))
    promos = disk_sched.build_connector_meta(None).promotions
    assert sum(len(p.slots) for p in promos) == 2


def test_a_corrupt_disk_file_becomes_a_miss(disk_sched):
    toks = list(range(9))
    finish_with_disk(disk_sched, request("a", toks), [1, 2])
    disk_sched.host.clear()
    nxt = request("b", toks + [1], computed=0)
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (None, False)
    promos = disk_sched.build_connector_meta(None).promotions
    disk_sched.update_connector_output(events_output(
        [("promote", p.promo_id, False) for p in promos], corrupt={p.object_id for p in promos}))
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (0, False)  # recompute, never serve
    assert not disk_sched.build_connector_meta(None).promotions
    stats = disk_sched.get_kv_connector_stats().data["counter"]
    assert stats["corrupt_blocks_total|disk"] == 2


def test_a_failed_disk_write_is_never_indexed(disk_sched):
    toks = list(range(9))
    disk_sched.request_finished(request("a", toks), [1, 2])
    meta = disk_sched.build_connector_meta(None)
    disk_sched.update_connector_output(SimpleNamespace(
        finished_sending={"a"}, kv_connector_worker_meta=PromptCacheWorkerMeta(
            events=[("write", w.object_id, False) for w in meta.tier_writes])))
    disk_sched.host.clear()
    assert disk_sched.get_num_new_matched_tokens(request("b", toks + [1], computed=0), 0) == (0, False)
    assert disk_sched.disk.bytes_in_use == 0


@pytest.mark.parametrize("policy,kept", [("scheduler-aware", 8), ("lru", 0)])
def test_queued_requests_blocks_are_evicted_last(policy, kept):
    # A host tier of 4 slots: with the scheduler-aware policy a queued conversation's
    # blocks survive a flood of other saves; LRU evicts them.
    cfg = PromptCacheConfig(host_gb=4 * 2 * PAGE / 2**30, disk_gb=0,
                            eviction_policy=policy).validate()
    sched = PromptCacheScheduler(vllm_config(), kv_cache_config(), cfg)
    conv = list(range(1000, 1009))
    finish_and_save(sched, request("c1", conv), [1, 2])
    sched.on_new_request(request("c2", conv + [7, 7], computed=0))
    for i in range(3):
        finish_and_save(sched, request(f"x{i}", [i] * 9), [3, 4])
    assert sched.get_num_new_matched_tokens(request("c2", conv + [7, 7], computed=0), 0) == (kept, False)


def test_a_request_larger_than_the_host_tier_takes_what_fits(tmp_path):
    # 4 host slots, 6 blocks on disk: the lookup promotes 4, then loads those 4
    # instead of evicting its own head to fetch its tail (which would never end).
    cfg = PromptCacheConfig(host_gb=4 * 2 * PAGE / 2**30, disk_gb=1, disk_path=str(tmp_path),
                            model_id="test-model")
    sched = PromptCacheScheduler(vllm_config(), kv_cache_config(), cfg.validate())
    toks = list(range(25))  # 6 full blocks
    finish_with_disk(sched, request("a", toks), [1, 2, 3, 4, 5, 6])
    sched.host.clear()
    nxt = request("b", toks + [1], computed=0)
    sched.on_new_request(nxt)
    for _ in range(5):
        answer = sched.get_num_new_matched_tokens(nxt, 0)
        promos = sched.build_connector_meta(None).promotions
        sched.update_connector_output(events_output([("promote", p.promo_id, True) for p in promos]))
        if answer[0] is not None:
            break
    assert answer == (16, False)


def test_a_promotion_stops_at_a_block_already_in_host(disk_sched):
    # Regression: host held blocks 4..6 of a run whose blocks 0..7 were on disk;
    # the claims for 0..3 must pair with disk blocks 0..3, never shift onto 4..7.
    toks = list(range(33))  # 8 full blocks
    meta = finish_with_disk(disk_sched, request("a", toks), list(range(1, 9)))
    keys = [k for w in meta.tier_writes for k in w.keys]
    disk_sched.host.clear()
    claimed = disk_sched.host.reserve(keys[4:7])
    disk_sched.host.commit([slot for _, slot in claimed])
    nxt = request("b", toks + [1], computed=0)
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (None, False)
    promos = disk_sched.build_connector_meta(None).promotions
    assert [i for p in promos for i in p.indices] == [0, 1, 2, 3]
    disk_sched.update_connector_output(events_output([("promote", p.promo_id, True) for p in promos]))
    slot_of = {keys[i]: s for p in promos for i, s in zip(p.indices, p.slots)}
    assert disk_sched.host.ready_prefix(keys[:4], touch=False) == [slot_of[k] for k in keys[:4]]
    # Blocks 0..6 are in host now; block 7 comes from disk next.
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (None, False)
    promos = disk_sched.build_connector_meta(None).promotions
    assert [i for p in promos for i in p.indices] == [7]
    disk_sched.update_connector_output(events_output([("promote", p.promo_id, True) for p in promos]))
    assert disk_sched.get_num_new_matched_tokens(nxt, 0) == (32, False)


def test_a_save_that_failed_on_one_rank_steps_earlier_is_never_served():
    cfg = PromptCacheConfig(host_gb=64 * 2 * PAGE / 2**30, disk_gb=0).validate()
    vc = vllm_config()
    vc.parallel_config.world_size = 2
    sched = PromptCacheScheduler(vc, kv_cache_config(), cfg)
    toks = list(range(9))
    sched.request_finished(request("a", toks), [1, 2])
    sched.build_connector_meta(None)
    # Rank 0 fails at step N; vLLM reports the request finished only at N+1,
    # when rank 1 is done too, with no failure in that step's metadata.
    sched.update_connector_output(SimpleNamespace(
        finished_sending=set(), kv_connector_worker_meta=PromptCacheWorkerMeta(failed_saves={"a"})))
    sched.update_connector_output(output({"a"}))
    assert sched.get_num_new_matched_tokens(request("b", toks + [1], computed=0), 0) == (0, False)


def module_request(req_id, tokens, name, token=None):
    req = request(req_id, tokens + [0], computed=len(tokens), prompt=len(tokens))
    req.kv_transfer_params = {"promptcache_module": name,
                              "promptcache_module_token": token or module_token()}
    return req


def test_a_pinned_module_survives_a_flood_and_a_failed_one_does_not(sched):
    module = list(range(500, 540))  # 10 blocks
    delay, meta = finish_and_save(sched, module_request("m", module, "docs"), list(range(10)))
    assert delay is True
    assert sched.request_finished(module_request("m2", list(range(600, 640)), "other"),
                                  list(range(10)))[1]["promptcache"]["ok"] is True
    sched.update_connector_output(output({"m2"}, {"m2"}))  # the second module's save fails
    assert sched.modules.names() == ["docs"]  # its pins are dropped with it
    for i in range(40):  # 40 requests of 4 blocks through a 64-slot host tier
        finish_and_save(sched, request(f"r{i}", list(range(1000 + 20 * i, 1017 + 20 * i))),
                        list(range(4)))
    assert sched.get_num_new_matched_tokens(request("q", module + [1, 2]), 0) == (10 * BS, False)
    assert sched.get_num_new_matched_tokens(request("q2", list(range(600, 640)) + [1]), 0) == (0, False)


def test_modules_over_half_the_host_tier_are_refused_and_a_replaced_one_frees_its_share(sched):
    first = module_request("a", list(range(100, 200)), "a")  # 25 of the 32 module blocks
    assert sched.request_finished(first, list(range(25)))[1]["promptcache"]["ok"] is True
    sched.update_connector_output(output({"a"}))
    delay, result = sched.request_finished(module_request("b", list(range(300, 340)), "b"),
                                           list(range(10)))
    assert delay is False and result["promptcache"]["ok"] is False
    assert "'b' needs 10 KV blocks" in result["promptcache"]["error"]
    assert "--promptcache-host-gb" in result["promptcache"]["error"]
    # Re-registering "a" shorter frees its share: now "b" fits.
    assert sched.request_finished(module_request("a2", list(range(400, 420)), "a"),
                                  list(range(5)))[1]["promptcache"]["ok"] is True
    assert sched.request_finished(module_request("b2", list(range(300, 340)), "b"),
                                  list(range(10)))[1]["promptcache"]["ok"] is True


def test_a_module_pinned_on_another_requests_write_is_dropped_when_that_write_fails(sched):
    toks = list(range(700, 740))
    sched.request_finished(request("r", toks + [0]), list(range(10)))  # its save is in flight
    result = sched.request_finished(module_request("m", toks, "shared"), list(range(10)))[1]
    assert result["promptcache"]["ok"] is True
    sched.build_connector_meta(None)
    sched.update_connector_output(output({"r", "m"}, {"r"}))  # r's save fails
    assert "shared" not in sched.modules


def test_an_interrupted_module_encoding_is_refused(sched):
    req = module_request("m", list(range(800, 840)), "cut")
    req.num_computed_tokens = 20  # aborted mid-prefill
    result = sched.request_finished(req, list(range(10)))[1]["promptcache"]
    assert result["ok"] is False and "interrupted" in result["error"]


def test_bad_request_params_never_raise_and_a_bad_save_means_no_save(sched):
    req = request("x", list(range(900, 913)))
    req.kv_transfer_params = {"promptcache_module": ["a"], "promptcache_save": "nope",
                              "promptcache_recompute_ratio": 2}
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched.request_finished(req, [1, 2, 3, 4]) == (False, None)


def test_a_load_vllm_trims_mid_block_copies_whole_blocks_and_never_plans_past_them(sched):
    toks = list(range(800, 814))  # 3 full blocks and a 1-token tail are stored
    finish_and_save(sched, request("a", toks), [7, 8, 9, 10])
    nxt = request("b", toks + [1, 2, 3])
    assert sched.get_num_new_matched_tokens(nxt, 0) == (3 * BS + 1, False)
    # vLLM takes less than offered, ending inside block 2: blocks 0-2 are copied
    # whole (vLLM computes the rest of block 2), and the tail is not loaded.
    sched.update_state_after_alloc(nxt, Blocks([20, 21, 22, 23, 24]), 2 * BS + 2)
    meta = sched.build_connector_meta(None)
    assert [t.block_ids for t in meta.loads] == [[20, 21, 22]] and not meta.shifted_loads
    assert meta.shared_blocks == [22]  # the forward computes the rest of block 22
    # Counted as what vLLM took, not as the three blocks copied.
    counters = sched.get_kv_connector_stats().data["counter"]
    assert counters["hit_tokens_total|host"] == 2 * BS + 2


def test_a_quiet_step_does_not_gather_the_tiers_gauges_and_a_request_event_does(sched):
    """vLLM asks for stats after every step.  Gathering the tiers' figures on a decode
    step where nothing happened only costs the step time; a step with a request event
    gathers at once (a read right after generate() sees what it did), and a quiet one
    at most every interval."""
    now = [0.0]
    sched.stats_gate.clock = lambda: now[0]
    gathered = []
    real = sched._gather_stats
    sched._gather_stats = lambda: gathered.append(now[0]) or real()

    def quiet_step():
        sched.build_connector_meta(None)
        sched.update_connector_output(output(set()))
        return sched.get_kv_connector_stats()

    first = quiet_step()  # start-up: the first step gathers
    assert first.data["gauge"]["tier_capacity_bytes|host"] > 0 and gathered == [0.0]
    now[0] += 0.01
    assert quiet_step() is None and gathered == [0.0], "a quiet step gathered"
    toks = list(range(100, 114))
    finish_and_save(sched, request("a", toks), [7, 8, 9, 10])
    saved = sched.get_kv_connector_stats()
    assert gathered == [0.0, 0.01]
    assert saved.data["gauge"]["tier_bytes_in_use|host"] > 0, "the save's occupancy not shipped"
    now[0] += 0.02
    assert quiet_step() is None and len(gathered) == 2
    now[0] += sched.stats_gate.interval_s
    quiet_step()
    assert len(gathered) == 3, "a quiet engine's figures went stale past the interval"

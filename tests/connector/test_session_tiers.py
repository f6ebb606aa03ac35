"""Session-aware tiers through the scheduler side (sessions.py wired into scheduler.py):
a conversation that sent an id has its head brought back into host between turns, so
its next turn is a host hit; without an id nothing changes."""

from __future__ import annotations

from types import SimpleNamespace

from vllm_promptcache.connector.metadata import PromptCacheWorkerMeta

from tests.connector.test_scheduler import (Blocks, disk_sched, events_output,  # noqa: F401
                                            finish_with_disk, request)


def turn(req_id, tokens, session=None, computed=None):
    req = request(req_id, tokens, computed=computed)
    req.session_id = session
    return req


def test_a_sessions_head_pushed_to_disk_is_back_in_host_before_its_next_turn(disk_sched):  # noqa: F811
    sched = disk_sched
    first = list(range(200, 217))  # 4 full blocks and a token
    t1 = turn("t1", first, session="conv-1")
    sched.on_new_request(t1)
    finish_with_disk(sched, t1, [1, 2, 3, 4, 5])
    sched.host.clear()  # other conversations pushed it out of host: only disk has it
    promos = sched.build_connector_meta(None).promotions  # between turns
    assert promos and {p.tier for p in promos} == {"disk"}
    sched.update_connector_output(events_output([("promote", p.promo_id, True) for p in promos]))

    t2 = turn("t2", first + [7, 8, 9, 10], session="conv-1", computed=0)
    sched.on_new_request(t2)
    assert sched.get_num_new_matched_tokens(t2, 0) == (16, False)  # no wait: in host
    sched.update_state_after_alloc(t2, Blocks([9, 10, 11, 12, 13, 14]), 16)
    stats = sched.get_kv_connector_stats().data["counter"]
    assert stats["hit_tokens_total|host"] == 16 and "hit_tokens_total|disk" not in stats


def test_without_an_id_nothing_is_promoted_ahead(disk_sched):  # noqa: F811
    sched = disk_sched
    first = list(range(300, 317))
    t1 = turn("t1", first)
    sched.on_new_request(t1)
    finish_with_disk(sched, t1, [1, 2, 3, 4, 5])
    sched.host.clear()
    assert not sched.build_connector_meta(None).promotions
    assert len(sched.sessions) == 0


def test_a_live_sessions_head_is_evicted_last(disk_sched):  # noqa: F811
    """Host holds 64 slots: a conversation with an id keeps its head while others
    flood host; the same conversation without an id loses it."""
    sched = disk_sched
    head = list(range(1000, 1017))
    t1 = turn("kept", head, session="conv-2")
    sched.on_new_request(t1)
    finish_with_disk(sched, t1, [1, 2, 3, 4, 5])
    keys = sched.keyer.block_keys(head, None, 4)
    for i in range(20):  # 20 other conversations of 4 blocks: more than host holds
        other = [5000 + 100 * i + j for j in range(17)]
        finish_with_disk(sched, request(f"o{i}", other), [10, 11, 12, 13, 14])
    assert all(k in sched.host for k in keys)


def cycle(sched, session_ids: bool) -> dict:
    """Ten conversations take turns, each back after the nine others' turns (users who
    think for about as long as nine turns take), on a host tier of 64 slots that holds
    about two thirds of their 90-odd blocks; disk holds everything.  Between turns the
    scheduler runs a step, as vLLM does while others are served.  Returns the counters."""
    convs = {c: list(range(10_000 * (c + 1), 10_000 * (c + 1) + 29)) for c in range(10)}
    step = iter(range(10**6))
    for rnd in range(3):
        for c, tokens in convs.items():
            session = f"conv-{c}" if session_ids else None
            req = turn(f"r{rnd}-{c}", tokens, session=session, computed=0)
            sched.on_new_request(req)
            for _ in range(20):  # its turn: wait (None) while blocks come into host
                matched, _ = sched.get_num_new_matched_tokens(req, 0)
                if matched is not None:
                    break
                meta = sched.build_connector_meta(None)
                sched.update_connector_output(events_output(
                    [("promote", p.promo_id, True) for p in meta.promotions]))
            blocks = [next(step) % 1000 + 1 for _ in range(len(tokens) // 4 + 1)]
            sched.update_state_after_alloc(req, Blocks(blocks), matched)
            convs[c] = tokens = tokens + [7 + rnd] * 4  # its answer
            req.all_token_ids, req.num_computed_tokens = tokens, len(tokens) - 1
            sched.request_finished(req, blocks)
            for _ in range(2):  # its save, then a step while others are served
                meta = sched.build_connector_meta(None)
                sched.update_connector_output(SimpleNamespace(
                    finished_sending={req.request_id},
                    kv_connector_worker_meta=PromptCacheWorkerMeta(
                        events=[("write", w.object_id, True) for w in meta.tier_writes]
                        + [("promote", p.promo_id, True) for p in meta.promotions])))
    return sched.get_kv_connector_stats().data["counter"]


def test_conversations_that_cycle_find_their_heads_in_host_with_ids(tmp_path):
    """With ids, the conversation that finished first (and comes back first) holds its
    protection; most later turns are host hits.  Without ids the same cycle pushes every
    head out of host before its turn (least recently used goes first), and protecting
    the most recently seen heads did the same: all hits came from disk."""
    from tests.connector.test_scheduler import PAGE, kv_cache_config, vllm_config
    from vllm_promptcache.config import PromptCacheConfig
    from vllm_promptcache.connector.scheduler import PromptCacheScheduler

    def fresh(name):
        cfg = PromptCacheConfig(host_gb=64 * 2 * PAGE / 2**30, disk_gb=1,
                                disk_path=str(tmp_path / name), model_id="test-model")
        return PromptCacheScheduler(vllm_config(), kv_cache_config(), cfg.validate())

    plain, ids = cycle(fresh("plain"), False), cycle(fresh("ids"), True)

    def host(stats):
        return stats.get("hit_tokens_total|host", 0)

    def disk(stats):
        return stats.get("hit_tokens_total|disk", 0)

    assert host(plain) + disk(plain) == host(ids) + disk(ids) > 0, "the same tokens found"
    assert host(ids) >= 2 * (host(ids) + disk(ids)) // 3, (plain, ids)
    assert host(ids) > 2 * host(plain), (plain, ids)

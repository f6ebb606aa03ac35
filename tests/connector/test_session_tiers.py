"""Session-aware tiers through the scheduler side (sessions.py wired into scheduler.py):
a conversation that sent an id has its head brought back into host between turns, so
its next turn is a host hit; without an id nothing changes."""

from __future__ import annotations

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

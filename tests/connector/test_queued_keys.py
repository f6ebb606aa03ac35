"""The queue's order, as the tiers' eviction reads it (connector/queued_keys.py): keys
of earlier arrivals are more urgent, a key's urgency is its first waiter's, and nothing
is kept for keys no request waits for."""

from vllm_promptcache.connector.queued_keys import QueuedKeys
from vllm_promptcache.connector.sessions import EvictLast, Sessions
from vllm_promptcache.store.host_tier import HostTier
from vllm_promptcache.store.policies import make_policy


def test_urgency_follows_arrival_and_goes_with_the_last_waiter():
    q = QueuedKeys()
    q.queue(["a", "b"])
    q.queue(["b", "c"])
    assert q.urgency("a") == q.urgency("b") > q.urgency("c") > 0
    assert q.urgency("z") == 0
    q.unqueue(["a", "b"])
    assert q["b"] == 1 and q.urgency("b") > 0, "c's request still waits for b"
    assert "a" not in q and q.urgency("a") == 0 and "a" not in q.first_arrival
    q.unqueue(["b", "c"])
    assert not q and not q.first_arrival
    q.queue(["d"])
    q.clear()
    assert q.urgency("d") == 0 and not q.first_arrival


def test_a_full_host_tier_of_queued_blocks_evicts_the_last_arrivals_first():
    """Every host slot holds a block some waiting request will read: a new block takes
    the slot of the request that arrived last (it runs last), not the oldest slot."""
    queued = QueuedKeys()
    host = HostTier(4, 64, make_policy("scheduler-aware"), EvictLast(queued, Sessions(4)))
    keys = [b"late-1", b"late-2", b"early-1", b"early-2"]  # the late ones stored first
    for key in keys:
        host.commit([slot for _, slot in host.reserve([key])])
    queued.queue([b"early-1", b"early-2"])
    queued.queue([b"late-1", b"late-2"])
    host.commit([slot for _, slot in host.reserve([b"new"])])
    assert b"late-1" not in host, "the last arrival's oldest block went"
    assert all(k in host for k in (b"late-2", b"early-1", b"early-2", b"new"))
    # Without the order (every queued key alike) the oldest goes: an early one.
    plain = HostTier(4, 64, make_policy("scheduler-aware"), EvictLast(
        type("Plain", (dict,), {})(dict.fromkeys(keys, 1)), Sessions(4)))
    for key in keys[2:] + keys[:2]:
        plain.commit([slot for _, slot in plain.reserve([key])])
    plain.commit([slot for _, slot in plain.reserve([b"new"])])
    assert b"early-1" not in plain


def test_a_live_head_alone_goes_before_any_queued_block():
    """A session's head is read when its next turn comes, behind the waiting queue."""
    queued, sessions = QueuedKeys(), Sessions(4)
    view = EvictLast(queued, sessions)
    queued.queue([b"q"])
    sessions.protected[b"h"] = 1
    assert view.urgency(b"q") > view.urgency(b"h") == 1 > view.urgency(b"x") == 0

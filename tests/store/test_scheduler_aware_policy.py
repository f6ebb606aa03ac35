"""The scheduler-aware policy's victim search is bounded, however many keys wait."""

from vllm_promptcache.store.policies import make_policy
from vllm_promptcache.store.policies import scheduler_aware


def test_a_victim_search_looks_at_a_bounded_number_of_queued_entries():
    for n_queued in (1000, 10000):
        policy = make_policy("scheduler-aware")
        for slot in range(n_queued + 10):
            policy.inserted(slot)
        queued = set(range(n_queued))  # the oldest entries all wait
        policy.steps = 0
        victim = policy.victim(lambda e: True, queued.__contains__)
        assert policy.steps <= scheduler_aware.MAX_QUEUED_SKIPS + 2
        assert victim == 0  # past the bound the oldest goes, queued or not


def test_an_unqueued_entry_within_the_bound_goes_before_queued_ones():
    policy = make_policy("scheduler-aware")
    for slot in range(100):
        policy.inserted(slot)
    assert policy.victim(lambda e: True, lambda e: e < 50) == 50


def test_when_everything_is_queued_what_the_queue_reads_last_goes_first():
    """CachedAttention's look-ahead: with every entry waited for, the victim is the one
    whose first waiting request arrived last (the lowest urgency), not the oldest."""
    policy = make_policy("scheduler-aware")
    for slot in range(6):
        policy.inserted(slot)
    urgency = {0: 50, 1: 60, 2: 10, 3: 40, 4: 10, 5: 90}
    assert policy.victim(lambda e: True, urgency.get) == 2, "the least urgent; ties: older"
    assert policy.victim(lambda e: e != 2, urgency.get) == 4
    # Plain True for every queued entry (no order known): the oldest, as LRU.
    assert policy.victim(lambda e: True, lambda e: True) == 0

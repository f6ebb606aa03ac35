"""The scheduler-side planner of position-independent reuse, without an engine."""

from vllm_promptcache.connector.shifted import ShiftedReuse
from vllm_promptcache.store.host_tier import HostTier
from vllm_promptcache.store.policies import make_policy

BS = 16


def stored(host, keys):
    claimed = host.reserve(keys)
    host.commit([slot for _, slot in claimed])
    return {key: slot for key, (_, slot) in zip(keys, claimed)}


def keys_of(n, tag):
    return [bytes([tag, i]) * 8 for i in range(n)]


def test_truncated_conversation_maps_kept_turns_to_their_stored_tokens():
    host = HostTier(32, 100, make_policy("lru"))
    planner = ShiftedReuse(BS, host)
    system = list(range(1000, 1040))          # 40 tokens
    turn1 = list(range(2000, 2070))           # 70 tokens, dropped later
    turn2 = list(range(3000, 3090))           # 90 tokens, kept
    conv = system + turn1 + turn2             # 200 tokens = 12 full blocks + 8
    keys = keys_of(len(conv) // BS, 1)
    slot_of = stored(host, keys)
    planner.remember(conv, keys, None)

    prompt = system + turn2 + list(range(5000, 5040))
    plan = planner.plan(prompt, None, 0, len(prompt) - 1)
    # The system prompt at delta 0, turn 2 moved 70 positions earlier; stored tokens
    # end at 192 (full blocks only), so the plan ends there.
    assert plan.num_tokens == len(system) + (192 - 110)
    for t in range(plan.num_tokens):
        src = t if t < 40 else t + 70
        assert plan.src_slots[t] == slot_of[keys[src // BS]]
        assert plan.src_offsets[t] == src % BS
        assert plan.deltas[t] == (0 if t < 40 else -70)
    assert plan.shifted_tokens == 192 - 110


def test_evicted_source_blocks_end_the_plan():
    host = HostTier(32, 100, make_policy("lru"))
    planner = ShiftedReuse(BS, host)
    seg = list(range(100, 196))   # 6 blocks
    keys = keys_of(6, 2)
    stored(host, keys)
    planner.remember(seg, keys, None)
    # Evict block 3 (by clearing and re-storing all but it).
    host.clear()
    stored(host, keys[:3] + keys[4:])
    prompt = [7] * 10 + seg
    plan = planner.plan(prompt, None, 0, len(prompt) - 1)
    assert plan.num_tokens == 0  # [7]*10 is not stored: nothing covers the start
    plan = planner.plan(prompt, None, 10, len(prompt) - 1)
    assert plan.num_tokens == 3 * BS and set(plan.deltas) == {10}


def test_a_longer_turn_replaces_its_prefix_segment_and_salts_isolate():
    host = HostTier(64, 100, make_policy("lru"))
    planner = ShiftedReuse(BS, host)
    turn1 = list(range(100, 164))
    keys1 = keys_of(4, 3)
    stored(host, keys1)
    planner.remember(turn1, keys1, "a")
    turn2 = turn1 + list(range(500, 564))
    keys2 = keys1 + keys_of(4, 4)
    stored(host, keys2)
    planner.remember(turn2, keys2, "a")
    assert len(planner.index) == 1
    prompt = [9] * 5 + turn2
    assert planner.plan(prompt, "b", 5, len(prompt) - 1).num_tokens == 0
    assert planner.plan(prompt, "a", 5, len(prompt) - 1).num_tokens == len(turn2) - 1

"""The scheduler-side planner of position-independent reuse, without an engine."""

from types import SimpleNamespace

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


def test_kv_from_a_shifted_load_is_never_saved_under_exact_keys(monkeypatch):
    """A request that loaded shifted KV saves its blocks from there on under keys of
    its own: an exact-prefix lookup must never get approximate KV."""
    import torch

    from tests.connector.test_scheduler import Blocks, kv_cache_config, request, vllm_config
    from vllm_promptcache.config import PromptCacheConfig
    from vllm_promptcache.connector.scheduler import PromptCacheScheduler
    from vllm_promptcache.kernels import rope_params

    monkeypatch.setattr(rope_params, "rope_params", lambda vc: (torch.ones(16), 32, True))
    cfg = PromptCacheConfig(host_gb=256 * 2 * 1024 / 2**30, disk_gb=0, position_independent=True)
    sched = PromptCacheScheduler(vllm_config(), kv_cache_config(), cfg.validate())
    bs = sched.block_size
    system, turn1, turn2 = list(range(100, 140)), list(range(200, 240)), list(range(300, 340))
    first = request("a", system + turn1 + turn2 + [1])
    sched.request_finished(first, list(range(30)))
    sched.build_connector_meta(None)
    sched.update_connector_output(SimpleNamespace(finished_sending={"a"}, kv_connector_worker_meta=None))

    truncated = system + turn2 + [7, 7, 7, 7, 7]
    req = request("b", truncated, computed=0)
    assert sched.get_num_new_matched_tokens(req, 0) == (80, False)
    sched.update_state_after_alloc(req, Blocks(list(range(40, 62))), 80)
    meta = sched.build_connector_meta(None)
    assert len(meta.loads[0].slots) == 10 and len(meta.shifted_loads[0].deltas) == 40
    assert set(meta.shifted_loads[0].deltas) == {-40}

    done = request("b", truncated + [9, 9, 9, 9], computed=len(truncated) + 3)
    sched.request_finished(done, list(range(40, 62)))
    sched.build_connector_meta(None)
    sched.update_connector_output(SimpleNamespace(finished_sending={"b"}, kv_connector_worker_meta=None))
    exact = sched.keyer.block_keys(done.all_token_ids, None, 22)
    assert all(k in sched.host for k in exact[:10])        # the system prompt: exact
    assert not any(k in sched.host for k in exact[10:])    # the rest: never under exact keys
    # ... but a position-independent lookup of the same tokens still finds it (delta 0).
    again = request("c", done.all_token_ids + [3], computed=0)
    hit, _ = sched.get_num_new_matched_tokens(again, 0)
    assert hit == 88  # all 22 blocks b saved: 10 exact, 12 found at delta 0


def test_a_plan_after_an_exact_hit_that_ends_inside_a_module_goes_on_into_the_next():
    """Modules stored as [BOS] A [filler] and [BOS] B [filler]; the prompt [BOS] A B:
    A's first blocks are an exact prefix hit, which ends a few tokens before A does.
    Those tokens followed by B match no stored run from there on alone (too short
    for a piece), so the plan must see them as the end of A's piece."""
    host = HostTier(32, 100, make_policy("lru"))
    planner = ShiftedReuse(BS, host)
    bos, a, b = [1], list(range(1000, 1040)), list(range(2000, 2060))
    seq_a = bos + a + [2] * (-(1 + len(a)) % BS)   # 48 tokens, 3 blocks
    seq_b = bos + b + [2] * (-(1 + len(b)) % BS)   # 64 tokens, 4 blocks
    keys_a, keys_b = keys_of(3, 3), keys_of(4, 4)
    stored(host, keys_a)
    stored(host, keys_b)
    planner.remember(seq_a, keys_a, None)
    planner.remember(seq_b, keys_b, None)
    prompt = bos + a + b + list(range(5000, 5010))
    start = (1 + len(a)) // BS * BS                # 32: the exact hit's end, inside A
    plan = planner.plan(prompt, None, start, len(prompt) - 1)
    assert plan.start == start
    assert plan.num_tokens == 1 + len(a) + len(b) - start
    assert plan.deltas == [0] * (1 + len(a) - start) + [len(a)] * len(b)

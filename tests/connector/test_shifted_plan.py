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
    assert plan.num_tokens == 3 * BS and set(plan.deltas.tolist()) == {10}


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
    assert plan.deltas.tolist() == [0] * (1 + len(a) - start) + [len(a)] * len(b)


def python_calls(fn):
    """(fn(), how many Python and C function calls it made)."""
    import sys

    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, calls


def test_a_100k_token_plan_is_built_without_a_step_per_token():
    """Plans are built per run of tokens with array operations: for 100k tokens the
    planner makes a few calls per block (finding each source slot), never a few per
    token.  Counted, not timed."""
    import numpy as np

    from vllm_promptcache.connector.layouts import Layouts
    from vllm_promptcache.connector.tails import RunTails
    from vllm_promptcache.modules.layout import Layout
    from vllm_promptcache.store.keys import BlockKeyer, ModelFingerprint

    block, n = 256, 100_000
    host = HostTier(2 * n // block + 8, 100, make_policy("lru"))
    planner = ShiftedReuse(block, host)
    rng = np.random.default_rng(0)
    doc = rng.integers(10, 30000, size=n - n % block).tolist()
    keys = keys_of_many(len(doc) // block, 3)
    stored(host, keys)
    planner.remember(doc, keys, None)
    prompt = [1, 2, 3, 4, 5] + doc + [9] * 40
    plan, calls = python_calls(lambda: planner.plan(prompt, None, 5, len(prompt) - 1))
    assert plan.num_tokens == len(doc) and set(plan.deltas.tolist()) == {5}
    assert calls < 10 * len(doc) // block, calls  # a per-token loop makes > 100k

    # The same for a layout: the module and a gap, each a run of ~50k tokens.
    fingerprint = ModelFingerprint(model="m", dtype="float32", kv_cache_dtype="auto",
                                   block_size=block, num_layers=2, num_kv_heads=1,
                                   head_size=8, tp_size=1, tp_rank=0)
    keyer = BlockKeyer(fingerprint)
    half = len(doc) // 2
    gap_seq = [1] + doc[:half]
    gap_seq += [0] * (-len(gap_seq) % block)
    gap_keys = keyer.block_keys(gap_seq)
    stored(host, gap_keys)
    module = tuple([1] + doc[half:] + [0] * (-(len(doc) - half + 1) % block))
    module_keys = keys_of_many(len(module) // block, 4)
    stored(host, module_keys)
    layouts = Layouts(keyer, planner, lambda name: (module, module_keys),
                      RunTails(keyer, host, 16))
    spans = [[0, 1, None, 0], [1, 1 + half, None, 0],
             [1 + half, 1 + len(doc), "doc", 1]]
    request = SimpleNamespace(request_id="gaps", all_token_ids=gap_seq,
                              num_prompt_tokens=len(gap_seq))
    assert layouts.announce(request, spans) is None
    prompt = [1] + doc + [9] * 40
    main = SimpleNamespace(request_id="main", all_token_ids=prompt, num_prompt_tokens=len(prompt))
    entry = layouts.find(main)
    assert entry is not None and entry.layout == Layout.from_params(spans)
    plan, calls = python_calls(lambda: layouts.plan(entry, 0, len(prompt) - 1))
    assert plan.num_tokens == 1 + len(doc) and plan.gap_tokens == 1 + half
    assert calls < 10 * len(doc) // block, calls


def keys_of_many(n, tag):
    return [bytes([tag]) + i.to_bytes(4, "big") * 4 for i in range(n)]


def test_a_layout_is_learnt_only_from_a_trusted_gap_encoding(monkeypatch):
    """The gap encoding carries the prompt's layout; the prompt then loads the module
    and the gaps at their positions, up to the layout's end.  The same marker from a
    client (no token) is ignored and counted."""
    import torch

    from tests.connector.test_scheduler import (Blocks, kv_cache_config, module_request, output,
                                                request, vllm_config)
    from vllm_promptcache.config import PromptCacheConfig
    from vllm_promptcache.connector.scheduler import PromptCacheScheduler
    from vllm_promptcache.kernels import rope_params
    from vllm_promptcache.request_params import module_token

    monkeypatch.setattr(rope_params, "rope_params", lambda vc: (torch.ones(16), 32, True))
    cfg = PromptCacheConfig(host_gb=256 * 2 * 1024 / 2**30, disk_gb=0, position_independent=True)
    sched = PromptCacheScheduler(vllm_config(), kv_cache_config(), cfg.validate())
    bs = sched.block_size
    doc = list(range(500, 510))  # a 10-token module, encoded as [BOS] doc [filler]
    module_seq = [1] + doc + [2] * (-(len(doc) + 1) % bs)
    sched.request_finished(module_request("m", module_seq, "doc"), list(range(len(module_seq) // bs)))
    sched.update_connector_output(output({"m"}))
    label, question = [70, 71, 72], [80, 81, 82, 83, 84]
    prompt = [1] + label + doc + question  # [BOS] "Document:" doc "Question..."
    spans = [[0, 1, None, 0], [1, 4, None, 0], [4, 14, "doc", 1]]
    gap_seq = [1] + label  # BOS and the label: one block

    def gap_request(req_id, token):
        req = request(req_id, gap_seq + [0], computed=0, prompt=len(gap_seq))
        req.kv_transfer_params = {"promptcache_layout": spans,
                                  "promptcache_module_token": token}
        return req

    forged = gap_request("forged", "0" * 64)
    sched.get_num_new_matched_tokens(forged, 0)
    assert len(sched.layouts) == 0
    stats = sched.get_kv_connector_stats().data["counter"]
    assert stats["rejected_module_encodings_total|"] == 1

    gaps = gap_request("gaps", module_token())
    assert sched.get_num_new_matched_tokens(gaps, 0) == (0, False)
    assert len(sched.layouts) == 1
    gaps.num_computed_tokens = len(gap_seq)
    sched.request_finished(gaps, [9])
    sched.update_connector_output(output({"gaps"}))

    main = request("main", prompt, computed=0)
    # BOS, the label and the module: 14 tokens, the question computed.
    assert sched.get_num_new_matched_tokens(main, 0) == (14, False)
    sched.update_state_after_alloc(main, Blocks([30, 31, 32, 33, 34, 35]), 14)
    meta = sched.build_connector_meta(None)
    # Block 0 holds exactly the gap encoding's tokens: an exact whole-block load; then
    # the module, moved by 3 (its encoding's BOS sits at 0, the label is 3 long).
    assert meta.loads[0].block_ids == [30]
    load = meta.shifted_loads[0]
    assert load.deltas.tolist() == [3] * 10
    assert load.dst_slots.tolist() == [30 * bs + p for p in range(4, 14)]
    stats = sched.get_kv_connector_stats().data["counter"]
    assert stats["hit_tokens_total|host"] == 14 and stats["shifted_hit_tokens_total|host"] == 10


def _layout_scheduler(monkeypatch, modules):
    """A position-independent scheduler with `modules` ({name: tokens}) registered,
    and the gap encoding of [BOS] label <module> announced and saved."""
    import torch

    from tests.connector.test_scheduler import kv_cache_config, module_request, output, vllm_config
    from vllm_promptcache.config import PromptCacheConfig
    from vllm_promptcache.connector.scheduler import PromptCacheScheduler
    from vllm_promptcache.kernels import rope_params
    from vllm_promptcache.request_params import module_token

    monkeypatch.setattr(rope_params, "rope_params", lambda vc: (torch.ones(16), 32, True))
    cfg = PromptCacheConfig(host_gb=256 * 2 * 1024 / 2**30, disk_gb=0, position_independent=True)
    sched = PromptCacheScheduler(vllm_config(), kv_cache_config(), cfg.validate())
    bs = sched.block_size
    block = 0
    for name, doc in modules.items():
        seq = [1] + doc + [2] * (-(len(doc) + 1) % bs)
        sched.request_finished(module_request(name, seq, name),
                               list(range(block, block + len(seq) // bs)))
        sched.update_connector_output(output({name}))
        block += len(seq) // bs
    first = next(iter(modules.values()))
    label = [70, 71, 72]
    spans = [[0, 1, None, 0], [1, 4, None, 0], [4, 4 + len(first), next(iter(modules)), 1]]
    gaps = _req("gaps", [1] + label + [0], computed=0, prompt=4)
    gaps.kv_transfer_params = {"promptcache_layout": spans,
                               "promptcache_module_token": module_token()}
    assert sched.get_num_new_matched_tokens(gaps, 0) == (0, False)
    gaps.num_computed_tokens = 4
    sched.request_finished(gaps, [99])
    sched.update_connector_output(output({"gaps"}))
    return sched, label


def _req(req_id, tokens, computed=0, prompt=None):
    from tests.connector.test_scheduler import request as make

    return make(req_id, tokens, computed=computed, prompt=prompt)


def test_a_template_serves_other_modules_in_its_slot_without_an_announcement(monkeypatch):
    """One gap encoding serves every prompt with the same text between modules: a
    prompt with another registered module in the slot loads its label and module at
    their positions, announced by nothing.  A module one token off, or another label,
    is not matched."""
    from tests.connector.test_scheduler import Blocks

    doc, other = list(range(500, 510)), list(range(600, 621))
    sched, label = _layout_scheduler(monkeypatch, {"doc": doc, "other": other})
    question = [80, 81, 82, 83, 84]
    main = _req("main", [1] + label + other + question)
    assert sched.get_num_new_matched_tokens(main, 0) == (4 + len(other), False)
    sched.update_state_after_alloc(main, Blocks(list(range(30, 40))), 4 + len(other))
    meta = sched.build_connector_meta(None)
    assert meta.loads[0].block_ids == [30]  # the gap encoding's block, exact
    load = meta.shifted_loads[0]
    assert load.deltas.tolist() == [3] * len(other)  # 'other' moved by the label
    stats = sched.get_kv_connector_stats().data["counter"]
    assert stats["shifted_hit_tokens_total|host"] == len(other)

    # A module a token off: only [BOS] and the label, the gap encoding's own tokens,
    # load (exact); another label: nothing.
    for i, (prompt, loaded) in enumerate((([1] + label + other[:-1] + [7] + question, 4),
                                          ([1, 70, 71, 73] + other + question, 0))):
        req = _req(f"no{i}", prompt)
        assert sched.get_num_new_matched_tokens(req, 0) == (loaded, False), prompt


def test_a_template_whose_gaps_aged_out_is_reported_to_the_front_ends(monkeypatch):
    """The gap encoding's KV is ordinary host KV: once it is gone, the next prompt of
    the template loads nothing past it, and the template is reported (stats payload)
    so that a front end that skipped the encoding runs it again."""
    from vllm_promptcache.modules import encoded_gaps
    from vllm_promptcache.modules.layout import Layout, template_of

    doc = list(range(500, 510))
    sched, label = _layout_scheduler(monkeypatch, {"doc": doc})
    prompt = [1] + label + doc + [80, 81]
    layout = Layout.from_params([[0, 1, None, 0], [1, 4, None, 0], [4, 14, "doc", 1]])
    key = template_of(layout, prompt).key
    memo = encoded_gaps.EncodedGaps()
    memo.add(key)
    encoded_gaps.engine_reported([])  # the engine's word has reached this process
    assert key in memo
    assert sched.get_kv_connector_stats().data.get("gaps_missing") == []

    sched.host.clear()  # the gap encoding ages out (the module is pinned)
    main = _req("main", prompt)
    assert sched.get_num_new_matched_tokens(main, 0) == (0, False)
    payload = sched.get_kv_connector_stats().data
    assert payload["gaps_missing"] == [key.hex()]
    encoded_gaps.engine_reported(payload["gaps_missing"])  # what metrics.observe does
    assert key not in memo


def test_a_front_end_skips_an_encoded_template_only_once_the_engine_reports():
    """Until a stats payload has reached the process, every prompt runs its gap
    encoding (nothing could tell this front end that one aged out)."""
    from vllm_promptcache.modules import encoded_gaps

    memo = encoded_gaps.EncodedGaps()
    memo.add(b"k" * 16)
    saved = encoded_gaps._engine_reports
    try:
        encoded_gaps._engine_reports = False
        assert b"k" * 16 not in memo
        encoded_gaps.engine_reported(["00" * 16])
        assert b"k" * 16 in memo
        encoded_gaps.engine_reported([(b"k" * 16).hex()])
        assert b"k" * 16 not in memo
    finally:
        encoded_gaps._engine_reports = saved


def test_templates_past_the_bound_are_forgotten_and_reported(monkeypatch):
    """The scheduler keeps at most MAX_TEMPLATES templates: the oldest goes, is
    reported for the front ends to encode again, and no longer matches, while the kept
    ones (whatever the length of their first gap) still do."""
    from types import SimpleNamespace

    from vllm_promptcache.connector import layouts as lay
    from vllm_promptcache.modules.layout import Template

    monkeypatch.setattr(lay, "MAX_TEMPLATES", 2)
    doc = list(range(500, 520))
    encoding = [1] + doc + [2] * 11
    table = lay.Layouts(SimpleNamespace(block_size=16), None,
                        lambda name: (encoding, []) if name == "doc" else None, None,
                        module_names=lambda: ["doc"])
    heads = [(1, 70), (1, 70, 71, 72), (1, 80)]
    templates = [Template((head, 1, (90, 91))) for head in heads]
    for t in templates:
        table._add_template(t, [])

    assert table.take_missing() == [templates[0].key]
    assert table.take_missing() == []
    for head, t in zip(heads, templates):
        entry = table._from_template(list(head) + doc + [90, 91, 5, 6])
        if t is templates[0]:
            assert entry is None
        else:
            assert entry is not None and entry.template == t.key
            assert [s.module for s in entry.layout.spans] == [None, "doc", None]
    assert sorted(table._head_lengths.elements()) == [2, 4]
    # A prompt one token off in the text after the module matches nothing.
    assert table._from_template([1, 80] + doc + [90, 7]) is None


def test_a_module_registered_again_with_other_text_is_not_loaded_for_the_old_text(monkeypatch):
    """Issue 29, point 3: a layout remembers the version (token digest) of each module
    it was built with.  After `doc` is registered again as other text of the same
    length, a prompt still holding the old text loads only its gap, never the new
    module's KV at the old text's positions; a prompt with the new text loads it."""
    from tests.connector.test_scheduler import Blocks, module_request, output

    old, new = list(range(500, 510)), list(range(700, 710))
    sched, label = _layout_scheduler(monkeypatch, {"doc": old})
    question = [80, 81, 82, 83, 84]
    prompt = [1] + label + old + question
    assert sched.get_num_new_matched_tokens(_req("p1", prompt), 0) == (4 + len(old), False)
    bs = sched.block_size
    seq = [1] + new + [2] * (-(len(new) + 1) % bs)
    sched.request_finished(module_request("doc", seq, "doc"), list(range(50, 50 + len(seq) // bs)))
    sched.update_connector_output(output({"doc"}))
    assert sched.get_num_new_matched_tokens(_req("p2", prompt), 0) == (4, False)
    fresh = _req("p3", [1] + label + new + question)
    assert sched.get_num_new_matched_tokens(fresh, 0) == (4 + len(new), False)
    sched.update_state_after_alloc(fresh, Blocks(list(range(30, 40))), 4 + len(new))
    load = sched.build_connector_meta(None).shifted_loads[0]
    new_slots = set(sched.host.slots_of(sched.modules.run("doc")[1]))
    assert set(load.src_slots.tolist()) <= new_slots

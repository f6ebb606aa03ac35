"""The shared remote tier end to end, on a real Redis server: a conversation cached by
one engine is a hit on another, and a store that dies, comes back or holds a bad
value never stops serving nor changes an answer.

Engine A runs in its own process (`engine_session.py`), as another server would;
engine B is shared by the module, with vLLM's prefix cache off, a small host tier
and no disk tier, so what it does not hold in host comes from the store.  Both
get the shared secret from the environment.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.conftest import plugin_engine, settled
from tests.connector.engine_session import run_session
from tests.redis_server import redis_cluster  # noqa: F401 (a fixture)

pytestmark = pytest.mark.engine

BLOCK = 128
SECRET = "a-secret-the-instances-share-0123456789"


def tokens(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


@pytest.fixture(scope="module")
def shared_secret():
    old = os.environ.get("PROMPTCACHE_REMOTE_SECRET")
    os.environ["PROMPTCACHE_REMOTE_SECRET"] = SECRET  # engine processes inherit it
    yield SECRET
    if old is None:
        del os.environ["PROMPTCACHE_REMOTE_SECRET"]
    else:
        os.environ["PROMPTCACHE_REMOTE_SECRET"] = old


def remote_engine(tiny_model, url, **options):
    """An engine on the shared store, prefix cache off, a small host tier, no disk
    unless asked.

    Loads are pinned (always-load): these tests check what the store holds and serves
    after deaths, restarts and corruption.  Measured, the tiny model recomputes a
    4-block turn in ~7 ms, and on a loaded CI machine a lookup's round trip can take
    longer, so the cost model rightly recomputes and the hit a test expects depends on
    the machine's load.  Engine F (the slow store) keeps the measured decisions."""
    return plugin_engine(tiny_model, **{"host_gb": 0.004, "remote_url": url,
                                        "remote_timeout_ms": 200,
                                        "load_decisions": "always-load", **options})


@pytest.fixture(scope="module")
def engine_b(tiny_model, store, shared_secret, reference):
    yield from remote_engine(tiny_model, store.url)


def generate(llm, prompt, max_tokens=12):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return list(llm.generate([{"prompt_token_ids": prompt}], sp,
                             use_tqdm=False)[0].outputs[0].token_ids)


def metric(llm, name, tier="remote"):
    from vllm_promptcache import read_metrics

    return settled(lambda: read_metrics(llm).get(name, {}).get(tier, 0.0),
                   step=lambda: generate(llm, [5] * 20, max_tokens=1))


def engine_a_turns(tiny_model, store, tmp_path, name, prompts):
    """Turn k of each conversation on another server (one process of its own, one
    engine start); returns their answers once the store has their writes."""
    job = {"model": tiny_model, "engine": {"enable_prefix_caching": False},
           "promptcache": {"host_gb": 0.01, "disk_gb": 0, "remote_url": store.url,
                           "remote_timeout_ms": 200},
           "steps": [{"prompt": prompt, "max_tokens": 12} for prompt in prompts]}
    answers = run_session(job, tmp_path, name)["outputs"]
    wait_for_writes(store)
    return answers


def engine_a_turn(tiny_model, store, tmp_path, name, prompt):
    return engine_a_turns(tiny_model, store, tmp_path, name, [prompt])[0]


def turn_k_plus_1(engine, reference, prompt, blocks):
    """A conversation's next turn here, after another server served its turn k: the same
    tokens as vLLM without the plugin, with turn k's `blocks` full blocks loaded from
    the store."""
    before = metric(engine, "hit_tokens_total")
    assert generate(engine, prompt) == generate(reference, prompt)
    assert metric(engine, "hit_tokens_total") - before == blocks * BLOCK


def wait_for_writes(store, settle_s=1.0):
    """Engine A exits once its writes are done; give the store a moment to be quiet."""
    clients = [node.client() for node in getattr(store, "nodes", [store])]
    last, deadline = None, time.time() + 20
    while time.time() < deadline:
        n = sum(c.dbsize() for c in clients)
        if n and n == last:
            return
        last = n
        time.sleep(settle_s)


@pytest.fixture(scope="module")
def turns_on_a(tiny_model, store, shared_secret, tmp_path_factory):
    """Turn k of the hit, corrupt and slow-store tests' conversations, served by engine A in one
    process: {test: (prompt, answer)}."""
    prompts = {"hit": tokens(5 * BLOCK + 30, 1), "corrupt": tokens(3 * BLOCK + 30, 3),
               "slow": tokens(4 * BLOCK + 30, 41)}
    answers = engine_a_turns(tiny_model, store, tmp_path_factory.mktemp("engine-a"), "a",
                             list(prompts.values()))
    return {name: (prompt, answer) for (name, prompt), answer in zip(prompts.items(), answers)}


def test_turn_k_on_one_server_turn_k_plus_1_on_another_loads_from_remote(
        store, engine_b, reference, turns_on_a):
    prompt, answer = turns_on_a["hit"]
    turn_k_plus_1(engine_b, reference, prompt + answer + tokens(40, 2), 5)


def test_a_value_corrupted_in_the_store_is_a_miss(store, engine_b, reference, turns_on_a):
    prompt, answer = turns_on_a["corrupt"]
    client = store.client()
    for name in client.keys("promptcache:*:kv:*"):
        value = client.get(name)
        client.set(name, value[:100] + bytes([value[100] ^ 1]) + value[101:])  # one bit
    hits, corrupt = metric(engine_b, "hit_tokens_total"), metric(engine_b, "corrupt_blocks_total")
    nxt = prompt + answer + tokens(40, 4)
    assert generate(engine_b, nxt) == generate(reference, nxt)
    assert metric(engine_b, "hit_tokens_total") == hits, "a damaged value is never served"
    assert metric(engine_b, "corrupt_blocks_total") > corrupt


def test_a_dead_store_means_misses_and_a_restarted_one_hits_again(tiny_model, store, engine_b,
                                                                  reference, tmp_path):
    failures = metric(engine_b, "remote_failures_total")
    store.kill()
    try:
        history = tokens(2 * BLOCK + 10, 5)
        for turn in range(2):  # requests still succeed, as misses, with failures counted
            answer = generate(engine_b, history)
            assert answer == generate(reference, history)
            history = history + answer + tokens(20, 6 + turn)
        assert metric(engine_b, "remote_failures_total") > failures
    finally:
        store.restart()
    # The store is back (empty: it keeps nothing on disk).  Both sides of engine B
    # reconnect in the background (backoff), without restarting it...
    deadline = time.time() + 90
    while metric(engine_b, "remote_reconnects_total") < 2 and time.time() < deadline:
        time.sleep(1)
    assert metric(engine_b, "remote_reconnects_total") >= 2
    # ...and another server's turn is a hit here again.
    prompt = tokens(4 * BLOCK + 30, 9)
    answer = engine_a_turn(tiny_model, store, tmp_path, "a3", prompt)
    turn_k_plus_1(engine_b, reference, prompt + answer + tokens(30, 10), 4)


@pytest.fixture(scope="module")
def engine_c(tiny_model, redis_cluster, shared_secret, reference):  # noqa: F811
    """Built after engine_b (read_metrics reads the newest engine)."""
    yield from remote_engine(tiny_model, redis_cluster.url)


def test_hits_across_two_engines_through_a_redis_cluster(tiny_model, redis_cluster,  # noqa: F811
                                                         engine_c, reference, tmp_path):
    prompt = tokens(5 * BLOCK + 30, 21)
    answer = engine_a_turn(tiny_model, redis_cluster, tmp_path, "c1", prompt)
    turn_k_plus_1(engine_c, reference, prompt + answer + tokens(40, 22), 5)


@pytest.fixture(scope="module")
def engine_d(tiny_model, store, shared_secret, reference):
    """Position-independent reuse on, sharing `store`; built after engine_c."""
    yield from remote_engine(tiny_model, store.url, position_independent=True)


def test_a_module_registered_on_one_instance_is_used_shifted_on_another(
        tiny_model, store, engine_d, tmp_path):
    from tests.modules.test_prompt_modules import text

    docs = {"shared-a": text(170, 2), "shared-b": text(170, 3)}
    job = {"model": tiny_model, "engine": {"enable_prefix_caching": False},
           "promptcache": {"host_gb": 0.01, "disk_gb": 0, "remote_url": store.url,
                           "remote_timeout_ms": 200, "position_independent": True},
           "modules": docs, "steps": []}
    run_session(job, tmp_path, "m")
    wait_for_writes(store)
    from vllm_promptcache import PromptModules, Text

    # The other instance knows the modules by name (the shared module table) and
    # finds their KV (the shared segment entries): b at its own position, a shifted
    # after it.  Steps read the shared segments every few seconds; each prompt has
    # its own question, so none is an exact hit of another.
    modules = PromptModules(engine_d)
    shifted = metric(engine_d, "shifted_hit_tokens_total", tier="host")
    deadline, i = time.time() + 60, 0
    while metric(engine_d, "shifted_hit_tokens_total", tier="host") == shifted:
        assert time.time() < deadline, "the shared modules were never loaded on this instance"
        i += 1
        prompt = modules.compose(["shared-b", "shared-a",
                                  Text(f"zebra question {i}: " + text(20, 100 + i))])
        generate(engine_d, prompt.token_ids, max_tokens=2)
        time.sleep(0.5)
    assert metric(engine_d, "hit_tokens_total", tier="remote") > 0


@pytest.fixture(scope="module")
def engine_e(tiny_model, store, shared_secret, reference, tmp_path_factory):
    """The remote tier in its default company: the disk tier on beside it (a disk
    directory of its own); built after engine_d."""
    yield from remote_engine(tiny_model, store.url, disk_gb=1,
                             disk_path=str(tmp_path_factory.mktemp("disk-e")))


def test_the_remote_tier_beside_the_disk_tier_hits_and_writes_through_to_both(
        tiny_model, store, engine_e, reference, tmp_path):
    # Starting at all is the first check: the worker once died here building the remote
    # store from the disk tier's fingerprint hex instead of the fingerprint.
    prompt = tokens(4 * BLOCK + 30, 31)
    answer = engine_a_turn(tiny_model, store, tmp_path, "e1", prompt)
    turn_k_plus_1(engine_e, reference, prompt + answer + tokens(BLOCK + 30, 32), 4)
    # This engine's own turn goes down both tiers: the disk lacks all of its blocks,
    # the store its fifth.
    deadline = time.time() + 30
    while not (metric(engine_e, "saved_bytes_total", tier="disk") > 0
               and metric(engine_e, "saved_bytes_total", tier="remote") > 0):
        assert time.time() < deadline, "the turn was not written through to disk and remote"
        time.sleep(0.5)


# A remote tier slower than recomputing (issue 31): the store behind bench/slow_proxy.py,
# every reply 300 ms late as across a slow network, and the tiny model, whose prefill of
# a few hundred tokens takes milliseconds.
SLOW_MS = 300


@pytest.fixture(scope="module")
def slow_store(store):
    from bench.slow_proxy import SlowProxy

    proxy = SlowProxy(("127.0.0.1", store.port), delay_ms=SLOW_MS).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def engine_f(tiny_model, slow_store, shared_secret, reference):
    """The store through the slow proxy, built last.  Lookups take 300 ms, within the
    timeout: a slow store, not a failing one."""
    yield from remote_engine(tiny_model, f"redis://127.0.0.1:{slow_store.port}/0",
                             remote_timeout_ms=3000, load_decisions="measured")


def test_a_store_slower_than_recomputing_is_not_waited_for(slow_store, engine_f, reference,
                                                           turns_on_a):
    """Turn k+1 finds all of turn k in the store and nothing in host; waiting for the
    store would take longer than recomputing, so it recomputes, answers as vLLM
    without the plugin, and counts a recompute decision."""
    prompt, answer = turns_on_a["slow"]
    # The prefill rate is measured from this engine's own steps first: until then
    # every lookup is waited for, as before the plugin priced them.
    for i in range(4):
        warm = tokens(2 * BLOCK + 10, 50 + i)
        assert generate(engine_f, warm) == generate(reference, warm)
    replies = slow_store.replies_delayed
    hits = metric(engine_f, "hit_tokens_total")
    recomputed = metric(engine_f, "load_decisions_total", tier="remote,recompute")
    nxt = prompt + answer + tokens(40, 42)
    assert generate(engine_f, nxt) == generate(reference, nxt)
    assert slow_store.replies_delayed > replies, "the store was asked, through the proxy"
    assert metric(engine_f, "load_decisions_total", tier="remote,recompute") > recomputed
    assert metric(engine_f, "hit_tokens_total") == hits, "nothing was loaded from the store"

"""An engine keeps serving, with vLLM's tokens, while the shared store holds malformed
entries (issue 29, "the fleet can't be crashed or poisoned through the store"): shared
segment entries whose MAC holds (written with the remote secret) but whose token ids
overflow (OverflowError), are strings (TypeError), or whose keys are not their tokens'
are skipped on the scheduler side, counted in rejected_store_entries_total{remote},
and never raised into EngineCore; the module registered beside them is still found."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.conftest import plugin_engine, settled

pytestmark = pytest.mark.engine

SECRET = "poisoned-store-test-secret-0123456789"


@pytest.fixture(scope="module")
def engine(tiny_model, store, reference):
    old = os.environ.get("PROMPTCACHE_REMOTE_SECRET")
    os.environ["PROMPTCACHE_REMOTE_SECRET"] = SECRET
    try:
        yield from plugin_engine(tiny_model, host_gb=0.01, remote_url=store.url,
                                 remote_timeout_ms=200, position_independent=True)
    finally:
        if old is None:
            os.environ.pop("PROMPTCACHE_REMOTE_SECRET", None)
        else:
            os.environ["PROMPTCACHE_REMOTE_SECRET"] = old


def generate(llm, prompt, max_tokens=8):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return list(llm.generate([{"prompt_token_ids": prompt}], sp,
                             use_tqdm=False)[0].outputs[0].token_ids)


def rejected(llm):
    from vllm_promptcache import read_metrics

    return settled(lambda: read_metrics(llm).get("rejected_store_entries_total", {})
                   .get("remote", 0.0), step=lambda: generate(llm, [5] * 20, max_tokens=1))


def test_malformed_shared_entries_are_counted_and_the_engine_serves(engine, store,
                                                                      reference):
    from tests.modules.test_prompt_modules import text
    from vllm_promptcache import PromptModules, Text
    from vllm_promptcache.store.remote_store import RemoteStore

    modules = PromptModules(engine)
    modules.register_module("doc", text(170, 7))
    client = store.client()
    deadline = time.time() + 30
    while not client.keys("promptcache:*:meta:segments"):
        assert time.time() < deadline, "the module's segment entry was never published"
        time.sleep(0.1)
    (table,) = client.keys("promptcache:*:meta:segments")
    fingerprint = table.decode().split(":")[1]
    (entry,) = client.hgetall(table).values()
    good = json.loads(entry[32:])  # after the MAC: what the engine published
    poison = {
        "overflow": {**good, "tokens": [1 << 70] * len(good["tokens"])},
        "strings": {**good, "tokens": [str(t) for t in good["tokens"]]},
        "foreign keys": {**good, "tokens": good["tokens"][::-1]},
        "not an object": [1, 2, 3],
    }
    writer = RemoteStore(store.url, fingerprint, SECRET, timeout_ms=500, environ={})
    try:
        for name, body in poison.items():
            assert writer.put_meta("segments", f"poison-{name}", json.dumps(body).encode())
    finally:
        writer.close()

    before = rejected(engine)
    deadline, i = time.time() + 60, 0
    while rejected(engine) < before + len(poison):
        assert time.time() < deadline, "the engine never counted the malformed entries"
        i += 1
        generate(engine, modules.compose(["doc", Text(f"question {i}: " + text(10, i))])
                 .token_ids, max_tokens=1)
        time.sleep(0.3)
    # Still serving, with vLLM's tokens, and the registered module is still found.
    prompt = modules.compose(["doc", Text("last question: " + text(12, 99))]).token_ids
    assert generate(engine, prompt) == generate(reference, prompt)
    time.sleep(5)  # more syncs: each bad entry is counted once
    assert rejected(engine) == before + len(poison)

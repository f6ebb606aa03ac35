"""Shared segment entries are untrusted input, on a real Redis: an entry whose MAC
holds (written by a holder of the remote secret, another version, a bug) but whose
fields are wrong in type or range, or whose keys are not its tokens' keys, is
skipped, counted and logged once; `sync()` never raises into EngineCore, and the
good entries beside it are still indexed and pinned (issue 29)."""

from __future__ import annotations

import json
import time

import pytest

from tests.redis_server import redis_server, redis_servers  # noqa: F401
from vllm_promptcache.connector.shared_segments import KIND, SharedSegments
from vllm_promptcache.connector.shifted import ShiftedReuse
from vllm_promptcache.store.host_tier import HostTier
from vllm_promptcache.store.keys import BlockKeyer, ModelFingerprint
from vllm_promptcache.store.policies import make_policy
from vllm_promptcache.store.remote_store import RemoteStore
from vllm_promptcache.store.remote_tier import RemoteTier

SECRET = "shared-segments-test-secret-0123"
BS = 4
FP = ModelFingerprint("m", "float32", "auto", BS, 2, 2, 32, 1, 0, weights="id:test")


def tokens(n_blocks, start=1000):
    return list(range(start, start + n_blocks * BS))


def entry(toks, keys=None, ns=None):
    keys = BlockKeyer(FP).block_keys(toks, ns) if keys is None else keys
    return {"tokens": toks, "keys": [k.hex() if isinstance(k, bytes) else k for k in keys],
            "ns": ns}


def _good():
    return entry(tokens(12))


def _with(field, value):
    def make():
        body = _good()
        body[field] = value
        return body
    return make


# Every field wrong in type and in range, and keys that are not the tokens' keys.
BAD = {
    "tokens type": _with("tokens", "1000 1001"),
    "token type": lambda: {**_good(), "tokens": ["1"] * 12 * BS},
    "token float": lambda: {**_good(), "tokens": [1.0] * 12 * BS},
    "token bool": lambda: {**_good(), "tokens": [True] * 12 * BS},
    "token negative": lambda: {**_good(), "tokens": [-1] * 12 * BS},
    "token past int32": lambda: {**_good(), "tokens": [1 << 31] * 12 * BS},
    "token past int64": lambda: {**_good(), "tokens": [1 << 70] * 12 * BS},
    "token count": lambda: {**_good(), "tokens": tokens(12)[:-1]},
    "keys type": _with("keys", {"0": "ab"}),
    "key type": lambda: {**_good(), "keys": list(range(12))},
    "key length": lambda: {**_good(), "keys": ["ab" * 15] * 12},
    "key not hex": lambda: {**_good(), "keys": ["zz" * 16] * 12},
    "keys empty": lambda: {"tokens": [], "keys": [], "ns": None},
    "keys of other tokens": lambda: entry(tokens(12), keys=BlockKeyer(FP).block_keys(
        tokens(3, start=5000))),
    "keys of another namespace": lambda: entry(tokens(12), keys=BlockKeyer(FP).block_keys(
        tokens(12), "salt")),
    "keys reordered": lambda: {**_good(), "keys": _good()["keys"][::-1]},
    "ns type": _with("ns", 7),
    "tokens missing": lambda: {k: v for k, v in _good().items() if k != "tokens"},
    "keys missing": lambda: {k: v for k, v in _good().items() if k != "keys"},
}
NOT_AN_OBJECT = {"a list": b"[1, 2]", "not json": b"{tokens", "not utf-8": b"\xff\xfe",
                 "deep nesting": b"[" * 100_000 + b"]" * 100_000,
                 "huge integer": b'{"tokens": [' + b"9" * 5000 + b"]}"}


@pytest.fixture
def shared(redis_server):  # noqa: F811
    store = RemoteStore(redis_server.url, FP.digest().hex(), SECRET, timeout_ms=500,
                        environ={})
    host = HostTier(64, 100, make_policy("lru"))
    remote = RemoteTier(store, 100, 500)
    shifted = ShiftedReuse(BS, host)
    yield SharedSegments(remote, shifted, BS), store, shifted
    remote.close()


def sync_until(shared, cond, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        shared._next_sync = 0.0  # no waiting SYNC_EVERY_S between reads in a test
        shared.sync()
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_bad_entries_are_skipped_counted_once_and_good_ones_indexed(shared):
    seg, store, shifted = shared
    assert sync_until(seg, lambda: store.up)
    for name, make in BAD.items():
        assert store.put_meta(KIND, name, json.dumps(make()).encode())
    for name, raw in NOT_AN_OBJECT.items():
        assert store.put_meta(KIND, name, raw)
    good = _good()
    assert store.put_meta(KIND, "good", json.dumps(good).encode())
    bad = len(BAD) + len(NOT_AN_OBJECT)
    store.take_counts()
    assert sync_until(seg, lambda: seg.rejected == bad and "good" in seg._seg_ids)
    counted = store.take_counts()["rejected"]
    assert counted == bad
    # Pinned and found at another position: the engine-side index serves it.
    plan = shifted.index.cover([1, 2, 3] + good["tokens"], start=3)
    assert plan and plan[0].seg_id == seg._seg_ids["good"] and plan[0].start == 3
    assert list(seg._seg_ids) == ["good"]
    # Read again every few seconds: a bad entry is counted (and logged) once.
    for _ in range(5):
        seg._next_sync = 0.0
        seg.sync()
        time.sleep(0.05)
    assert seg.rejected == bad and store.take_counts().get("rejected", 0) == 0


@pytest.mark.parametrize("what", ["token past int64", "token type", "not utf-8"])
def test_one_bad_entry_alone_never_raises(shared, what):
    """The entries that used to raise OverflowError / TypeError out of sync()."""
    seg, store, _ = shared
    assert sync_until(seg, lambda: store.up)
    raw = NOT_AN_OBJECT.get(what) or json.dumps(BAD[what]()).encode()
    assert store.put_meta(KIND, "poison", raw)
    assert sync_until(seg, lambda: seg.rejected == 1)
    assert not seg._seg_ids


def test_a_store_failure_while_applying_never_raises(shared, monkeypatch):
    seg, store, shifted = shared
    assert sync_until(seg, lambda: store.up)
    assert store.put_meta(KIND, "good", json.dumps(_good()).encode())

    def broken(*args, **kwargs):
        raise RuntimeError("the index broke")

    monkeypatch.setattr(shifted, "remember", broken)
    # sync() met the failure (the entry was taken in) and raised nothing.
    assert sync_until(seg, lambda: "good" in seg._known)
    assert not seg._seg_ids

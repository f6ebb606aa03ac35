"""Remote chunk headers are untrusted input, on a real Redis: a value whose MAC holds
(a holder of the secret, another version) but whose header names a field wrong in
type or range is a miss, deleted and counted as rejected; nothing read from the
store raises (issue 29).  The header names the KV layout: a chunk of another
layout is never served."""

from __future__ import annotations

import json
import os

import pytest

from tests.redis_server import redis_server, redis_servers  # noqa: F401
from vllm_promptcache.store import remote_store as rs
from vllm_promptcache.store.remote_store import ChunkRef, RemoteStore, chunk_id

FP = "ab" * 16
SECRET = "a secret the instances share"
BLOCK = 64
LAYOUT = "device=cpu,backend=auto,layout=LBHNC"


def make_store(url, **kw):
    kw = {"block_bytes": BLOCK, "timeout_ms": 500, "environ": {}, "kv_layout": LAYOUT, **kw}
    return RemoteStore(url, FP, SECRET, **kw)


def signed(store, keys, header, payload, version=rs.FORMAT_VERSION):
    """A value under the chunk name of `keys`, with `header` (any JSON, or bytes),
    MAC'd with the store's key: only its content is wrong."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = rs._PREFIX.pack(rs.MAGIC, version, len(text)) + text + payload
    name = store.chunk_name(chunk_id(keys))
    return name, body + store._mac(name.encode(), body)


def good_header(keys):
    return {"fingerprint": FP, "rank": 0, "world": 1, "block_bytes": BLOCK,
            "keys": [k.hex() for k in keys], "kv_layout": LAYOUT}


def _set(field, value):
    return lambda h: h.__setitem__(field, value)


BAD = {
    "fingerprint type": _set("fingerprint", 5),
    "fingerprint other": _set("fingerprint", "cd" * 16),
    "rank type": _set("rank", "0"),
    "rank bool": _set("rank", False),
    "rank infinite": _set("rank", float("inf")),
    "rank negative": _set("rank", -1),
    "rank past world": _set("rank", 1),
    "world type": _set("world", 1.0),
    "world zero": _set("world", 0),
    "world huge": _set("world", 1 << 40),
    "world other": _set("world", 2),
    "block_bytes type": _set("block_bytes", str(BLOCK)),
    "block_bytes zero": _set("block_bytes", 0),
    "block_bytes negative": _set("block_bytes", -BLOCK),
    "block_bytes other": _set("block_bytes", BLOCK // 2),
    "keys type": _set("keys", "00" * 16),
    "keys item type": lambda h: h.__setitem__("keys", [1] * len(h["keys"])),
    "keys item length": lambda h: h.__setitem__("keys", ["00" * 15] * len(h["keys"])),
    "keys item not hex": lambda h: h.__setitem__("keys", ["zz" * 16] * len(h["keys"])),
    "keys empty": _set("keys", []),
    "keys not its name": lambda h: h.__setitem__("keys", h["keys"][::-1]),
    "kv_layout type": _set("kv_layout", None),
    "kv_layout other": _set("kv_layout", "device=cuda,backend=auto,layout=LBNHC"),
    **{f"{f} missing": (lambda f: lambda h: h.pop(f))(f)
       for f in ("fingerprint", "rank", "world", "block_bytes", "keys", "kv_layout")},
}
NOT_AN_OBJECT = {"a list": b"[1]", "not json": b"{x", "not utf-8": b"\xff\xfe",
                 "deep nesting": b"[" * 100_000 + b"]" * 100_000,
                 "huge integer": b'{"rank": ' + b"9" * 5000 + b"}"}


@pytest.fixture
def store(redis_server):  # noqa: F811
    s = make_store(redis_server.url)
    yield s
    s.close()


def test_a_good_signed_value_is_served(store, redis_server):  # noqa: F811
    keys = [os.urandom(16) for _ in range(2)]
    name, value = signed(store, keys, good_header(keys), os.urandom(2 * BLOCK))
    redis_server.client().set(name, value)
    got = store.get_blocks(keys, [ChunkRef(chunk_id(keys), i) for i in range(2)])
    assert all(block is not None for block in got)


@pytest.mark.parametrize("what", sorted(BAD) + sorted(NOT_AN_OBJECT) + ["old version"])
def test_every_header_field_wrong_is_a_rejected_miss(store, redis_server, what):  # noqa: F811
    keys = [os.urandom(16) for _ in range(2)]
    header = good_header(keys)
    version = rs.FORMAT_VERSION
    if what in BAD:
        BAD[what](header)
    elif what in NOT_AN_OBJECT:
        header = NOT_AN_OBJECT[what]
    else:
        version = rs.FORMAT_VERSION - 1
    name, value = signed(store, keys, header, os.urandom(2 * BLOCK), version)
    r = redis_server.client()
    r.set(name, value)
    store.take_counts()
    assert store.get_blocks(keys[:1], [ChunkRef(chunk_id(keys), 0)]) == [None]
    counts = store.take_counts()
    assert counts["rejected"] == 1 and counts["corrupt"] == 1 and counts["misses"] == 1
    assert not r.exists(name), "a rejected value is deleted"


def test_chunks_name_their_kv_layout(store, redis_server):  # noqa: F811
    keys = [os.urandom(16) for _ in range(3)]
    assert store.put_chunks(keys, [os.urandom(BLOCK) for _ in keys])
    other = make_store(redis_server.url, kv_layout="device=cuda,backend=auto,layout=LBNHC")
    try:
        assert other.get_blocks(keys, other.locate(keys)) == [None] * 3
        assert other.take_counts()["rejected"] >= 1
    finally:
        other.close()

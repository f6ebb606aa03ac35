"""The remote tier's store against a real redis-server: round trips, one-round-trip
lookups, keyed checksums, namespaces, the store's own eviction, faults (killed,
restarted, paused, password) and Redis Cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time

import pytest

from tests.redis_server import RedisServer, redis_cluster, redis_server, redis_servers  # noqa: F401
from vllm_promptcache.store.remote_store import (
    SECRET_ENV, ChunkRef, RemoteSecretError, RemoteStore, chunk_id, chunk_ranges)
from vllm_promptcache.store.remote_url import PASSWORD_ENV, RemoteURLError, parse_remote_url

FP = "ab" * 16
OTHER_FP = "cd" * 16
SECRET = "a secret the instances share"
BLOCK = 1000
TIMEOUT_MS = 50


def make_store(url, fingerprint=FP, secret=SECRET, **kw) -> RemoteStore:
    kw = {"block_bytes": BLOCK, "max_chunk_bytes": 3 * BLOCK, "timeout_ms": TIMEOUT_MS,
          "retry_initial_s": 0.05, "retry_max_s": 0.2, "environ": {}, **kw}
    return RemoteStore(url, fingerprint, secret, **kw)


def run(n):
    return [os.urandom(16) for _ in range(n)], [os.urandom(BLOCK) for _ in range(n)]


class Totals(dict):
    """Counters of a store summed over take_counts() calls."""

    def __init__(self, store):
        super().__init__()
        self.store = store

    def take(self) -> "Totals":
        for k, v in self.store.take_counts().items():
            self[k] = self.get(k, 0) + v
        return self


def without_retry(totals: Totals, call, *args):
    """`call(*args)` against a failed store, checked to make one round trip at most: a
    call meeting a dead or paused store answers after one timeout, never retrying
    (a retry with backoff would outlast the timeout).  Behaviour, not a wall-clock
    bound, so a loaded machine cannot fail it."""
    before = totals.take().get("round_trips", 0)
    out = call(*args)
    assert totals.take()["round_trips"] - before <= 1, f"{call.__name__} retried"
    return out


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@contextlib.contextmanager
def captured_warnings():
    """Records of the plugin's logger (vLLM's logging config may stop propagation)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("vllm.promptcache")
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


# -- configuration -------------------------------------------------------------
def test_url_forms_masking_and_errors():
    u = parse_remote_url("redis://user:p%40ss@cache.local:6380/2", environ={})
    assert (u.hosts, u.db, u.username, u.password) == ((("cache.local", 6380),), 2, "user", "p@ss")
    assert u.masked() == "redis://user:***@cache.local:6380/2"
    assert "p@ss" not in repr(u) and "p@ss" not in str(u)
    assert parse_remote_url("redis://h", environ={}).hosts == (("h", 6379),)
    # the password from the environment, the URL's own wins
    assert parse_remote_url("redis://h:1/0", environ={PASSWORD_ENV: "envpw"}).password == "envpw"
    url_wins = parse_remote_url("redis://:urlpw@h:1", environ={PASSWORD_ENV: "envpw"})
    assert url_wins.password == "urlpw"
    assert parse_remote_url("redis://:urlpw@h:1", environ={}).masked() == "redis://:***@h:1"
    t = parse_remote_url("rediss://h:1/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required", environ={})
    assert t.tls and t.client_kwargs()["ssl"] and t.client_kwargs()["ssl_ca_certs"] == "/ca.pem"
    x = parse_remote_url("unix:///run/redis.sock?db=3", environ={})
    assert (x.path, x.db) == ("/run/redis.sock", 3)
    assert x.client_kwargs()["unix_socket_path"] == "/run/redis.sock"
    c = parse_remote_url("redis+cluster://:pw@a:7000,b:7001,[::1]:7002", environ={})
    assert c.cluster and c.hosts == (("a", 7000), ("b", 7001), ("::1", 7002))
    assert c.masked() == "redis+cluster://:***@a:7000,b:7001,[::1]:7002"
    assert "db" not in c.client_kwargs() and c.client_kwargs()["password"] == "pw"
    for bad in ["localhost:6379", "http://h:1", "redis://h:99999", "redis://h:1/x",
                "redis://:1", "unix://host/s.sock", "unix://", "redis+cluster://a:1/3",
                "redis://h:1?bogus=1", "rediss://h?ssl_cert_reqs=maybe"]:
        with pytest.raises(RemoteURLError, match="--promptcache-remote-url"):
            parse_remote_url(bad, environ={})
    with pytest.raises(RemoteURLError) as e:
        parse_remote_url("redis://:hunter22@h:notaport", environ={})
    assert "hunter22" not in str(e.value)


def test_store_refuses_to_start_without_a_secret():
    url = "redis://127.0.0.1:1/0"
    for secret in (None, "", "short"):
        with pytest.raises(RemoteSecretError, match=SECRET_ENV):
            make_store(url, secret=secret)
    with pytest.raises(ValueError, match="fingerprint"):
        make_store(url, fingerprint="nothex")
    # from the environment
    s = make_store(url, secret=None, environ={SECRET_ENV: "x" * 16})
    assert not s.up
    s.close()


def test_chunk_ranges():
    assert chunk_ranges(10, 1000, 3000) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert chunk_ranges(2, 10 << 20, 4 << 20) == [(0, 1), (1, 2)]
    assert chunk_ranges(0, 1, 1) == []


# -- data path -----------------------------------------------------------------
def test_multi_chunk_round_trip(redis_server):
    store = make_store(redis_server.url)
    totals = Totals(store)
    keys, blocks = run(10)
    assert store.split_run(keys) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert store.put_chunks(keys, blocks)
    refs = store.locate(keys)
    assert all(refs) and len({r.chunk_id for r in refs}) == 4
    assert refs[4] == ChunkRef(chunk_id(keys[3:6]), 1)
    got = store.get_blocks(keys, refs)
    assert [bytes(b) for b in got] == blocks
    assert bytes(store.get_blocks([keys[9]], [refs[9]])[0]) == blocks[9]
    totals.take()
    assert totals["puts"] == 4 and totals["hits"] == 11 and totals["misses"] == 0
    assert totals["bytes_written"] > 10 * BLOCK and totals["bytes_read"] > 11 * BLOCK
    assert totals["corrupt"] == totals["failures"] == 0 and totals["seconds"] > 0
    store.close()


def test_lookup_is_one_round_trip(redis_server):
    store = make_store(redis_server.url)
    keys, blocks = run(40)
    assert store.put_chunks(keys[:25], blocks[:25])
    store.take_counts()
    r = redis_server.client()
    before = r.info("stats")["total_commands_processed"]
    assert [r is not None for r in store.locate(keys)] == [True] * 25 + [False] * 15
    counts = store.take_counts()
    assert counts["round_trips"] == 1 and counts["lookups"] == 40 and counts["found"] == 25
    # the server saw one GET per key and nothing else (+1: the first INFO itself)
    assert r.info("stats")["total_commands_processed"] - before == 41
    store.close()


def test_lookups_asked_while_one_is_out_share_the_next_round_trip(redis_server):
    """A burst of requests against a store far away: each lookup queued for a round
    trip of its own made the last wait for all the others.  Those asked while the
    lookup thread is busy go out together, each key once, and each asker gets its
    own answer."""
    from vllm_promptcache.store.remote_tier import RemoteTier

    store = make_store(redis_server.url)
    keys, blocks = run(12)
    assert store.put_chunks(keys[:6], blocks[:6])
    tier = RemoteTier(store, BLOCK, timeout_ms=5000)  # no deadline passes here
    store.take_counts()

    def burst(lookups):
        release = threading.Event()
        tier.submit(release.wait, 10)  # the lookup thread, busy with a round trip
        for asker, ks in lookups.items():
            tier.start_lookup(asker, ks)
        assert all(tier.lookup_pending(a) for a in lookups)
        release.set()
        deadline = time.monotonic() + 10
        while any(tier.lookup_pending(a) for a in lookups) and time.monotonic() < deadline:
            time.sleep(0.01)
        return store.take_counts()

    counts = burst({"a": keys[:4], "b": keys[4:8], "c": keys[8:]})
    assert counts["round_trips"] == 1 and counts["lookups"] == 12 and counts["found"] == 6
    assert [tier.locate(k) is not None for k in keys] == [True] * 6 + [False] * 6
    assert sorted(tier.take_answered()) == []  # read already by lookup_pending
    # Two requests with the same prefix: each key asked once.
    counts = burst({"d": keys[:5], "e": keys[:5]})
    assert counts["round_trips"] == 1 and counts["lookups"] == 5 and counts["found"] == 5
    tier.close()


def test_unix_socket(redis_server):
    store = make_store(redis_server.unix_url)
    keys, blocks = run(4)
    assert store.put_chunks(keys, blocks)
    assert [bytes(b) for b in store.get_blocks(keys, store.locate(keys))] == blocks
    store.close()


def test_value_of_another_secret_is_a_miss_deleted_and_counted(redis_server):
    writer = make_store(redis_server.url, secret="another secret, elsewhere")
    keys, blocks = run(5)
    assert writer.put_chunks(keys, blocks)
    reader = make_store(redis_server.url)
    totals = Totals(reader)
    # its index entries fail their MAC: misses, deleted
    assert reader.locate(keys) == [None] * 5
    # and so do its chunks, asked for by name
    refs = writer.locate(keys)
    assert refs == [None] * 5  # the reader deleted the index entries
    r = redis_server.client()
    names = [reader.chunk_name(chunk_id(keys[s:e])) for s, e in reader.split_run(keys)]
    assert all(r.exists(n) for n in names)
    assert reader.get_blocks(keys[:1], [ChunkRef(chunk_id(keys[0:3]), 0)]) == [None]
    totals.take()
    assert totals["corrupt"] == 5 + 1 and totals["hits"] == 0
    assert not r.exists(names[0]) and r.exists(names[1])
    writer.close()
    reader.close()


def test_damaged_values_are_misses_deleted_and_counted(redis_server):
    store = make_store(redis_server.url)
    keys, blocks = run(12)  # four chunks
    assert store.put_chunks(keys, blocks)
    refs = store.locate(keys)
    r = redis_server.client()
    names = [store.chunk_name(chunk_id(keys[s:e])) for s, e in store.split_run(keys)]
    value = r.get(names[0])
    r.setrange(names[0], len(value) // 2, bytes([value[len(value) // 2] ^ 1]))  # one bit
    r.set(names[1], r.get(names[1])[:-100])                                      # truncated
    r.set(names[2], b"garbage")                                                  # foreign
    store.take_counts()
    got = store.get_blocks(keys, refs)
    assert got[:9] == [None] * 9 and [bytes(b) for b in got[9:]] == blocks[9:]
    counts = store.take_counts()
    assert counts["corrupt"] == 3 and counts["corrupt_blocks"] == 9 and counts["hits"] == 3
    assert [r.exists(n) for n in names] == [0, 0, 0, 1]
    # their index entries went with them
    assert [r is not None for r in store.locate(keys)] == [False] * 9 + [True] * 3
    # a forged index entry is a miss too
    r.set(store.index_name(keys[10]), b"x" * 84)
    assert store.locate(keys[10:11]) == [None]
    assert store.take_counts()["corrupt"] == 1 and not r.exists(store.index_name(keys[10]))
    # a chunk that does not hold the key asked for
    assert store.get_blocks([keys[9]], [ChunkRef(refs[9].chunk_id, 1)]) == [None]
    assert store.take_counts()["corrupt"] == 1 and not r.exists(names[3])
    store.close()


def test_another_fingerprint_is_invisible(redis_server):
    a = make_store(redis_server.url)
    b = make_store(redis_server.url, fingerprint=OTHER_FP)
    keys, blocks = run(6)
    assert a.put_chunks(keys, blocks)
    assert a.put_meta("modules", "system", b"tokens")
    assert b.locate(keys) == [None] * 6
    assert b.get_blocks(keys[:1], [ChunkRef(chunk_id(keys[:3]), 0)]) == [None]
    assert b.get_meta("modules", "system") is None and b.items_meta("modules") == {}
    # a's value copied under b's name fails its MAC (it names the key it was written under)
    r = redis_server.client()
    r.set(b.chunk_name(chunk_id(keys[:3])), r.get(a.chunk_name(chunk_id(keys[:3]))))
    assert b.get_blocks(keys[:1], [ChunkRef(chunk_id(keys[:3]), 0)]) == [None]
    assert b.take_counts()["corrupt"] == 1
    # a's own data is untouched
    assert [bytes(x) for x in a.get_blocks(keys, a.locate(keys))] == blocks
    assert a.take_counts()["corrupt"] == 0
    a.close()
    b.close()


def test_shared_metadata(redis_server):
    a = make_store(redis_server.url)
    b = make_store(redis_server.url)  # another instance, same model and secret
    assert a.put_meta("modules", "system", b"\x00\x01tokens+keys")
    assert a.put_meta("modules", "doc-a", b"more")
    assert a.put_meta("segments", "abc", b"entry")
    assert b.get_meta("modules", "system") == b"\x00\x01tokens+keys"
    assert sorted(b.items_meta("modules")) == ["doc-a", "system"]
    assert b.items_meta("segments") == {"abc": b"entry"}
    r = redis_server.client()
    table = a.meta_name("modules")
    r.hset(table, "forged", b"\x00" * 32 + b"payload")
    r.hset(table, "moved", r.hget(table, "system"))  # a valid value under another name
    assert b.get_meta("modules", "forged") is None
    assert sorted(b.items_meta("modules")) == ["doc-a", "system"]
    assert b.take_counts()["corrupt"] == 2
    assert sorted(r.hkeys(table)) == [b"doc-a", b"system"]
    with pytest.raises(ValueError):
        a.put_meta("Bad Kind", "x", b"")
    a.close()
    b.close()


def test_store_eviction_gives_only_misses(redis_servers):
    server = redis_servers("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru")
    store = make_store(server.url, block_bytes=20000, max_chunk_bytes=60000)
    runs = []
    for _ in range(60):  # 3.6 MB of chunks on top of the server's own ~1 MB
        keys = [os.urandom(16) for _ in range(3)]
        blocks = [os.urandom(20000) for _ in range(3)]
        store.put_chunks(keys, blocks)
        runs.append((keys, blocks))
    assert server.client().info("stats")["evicted_keys"] > 0
    store.take_counts()
    hits = misses = 0
    for keys, blocks in runs:
        refs = store.locate(keys)
        found = [(k, r, b) for k, r, b in zip(keys, refs, blocks) if r is not None]
        misses += len(keys) - len(found)
        if found:
            got = store.get_blocks([k for k, _, _ in found], [r for _, r, _ in found])
            for g, (_, _, b) in zip(got, found):
                if g is None:
                    misses += 1
                else:
                    assert bytes(g) == b
                    hits += 1
    counts = store.take_counts()
    assert misses > 0 and hits > 0
    assert counts["corrupt"] == 0 and counts["failures"] == 0
    store.close()


# -- faults --------------------------------------------------------------------
def test_killed_store_gives_misses_then_reconnects_after_restart(redis_server):
    store = make_store(redis_server.url)
    totals = Totals(store)
    keys, blocks = run(6)
    assert store.put_chunks(keys, blocks)
    refs = store.locate(keys)
    redis_server.kill()
    for call, args, miss in [
        (store.locate, (keys,), [None] * 6),
        (store.get_blocks, (keys, refs), [None] * 6),
        (store.put_chunks, run(3), False),
        (store.put_meta, ("modules", "m", b"x"), False),
        (store.get_meta, ("modules", "m"), None),
        (store.items_meta, ("modules",), {}),
    ]:
        out = without_retry(totals, call, *args)
        assert out == miss, (call.__name__, out)
    assert not store.up
    assert totals["failures"] >= 1 and totals["dropped_puts"] == 1 and totals["misses"] == 6

    redis_server.restart()  # same port, empty
    wait_for(lambda: store.up)
    keys, blocks = run(4)
    assert store.put_chunks(keys, blocks)
    assert [bytes(b) for b in store.get_blocks(keys, store.locate(keys))] == blocks
    totals.take()
    assert totals["reconnects"] == 1
    store.close()


def test_unreachable_at_start_up_warns_then_comes_up(redis_servers, monkeypatch):
    server = redis_servers(start=False)
    attempts = []
    check = RemoteStore._check
    monkeypatch.setattr(RemoteStore, "_check",
                        lambda self, client: (attempts.append(threading.current_thread()),
                                              check(self, client))[1])
    with captured_warnings() as records:
        store = make_store(server.url)
    # One attempt in the constructor, which returns; the retries run in the background.
    assert not store.up and attempts == [threading.current_thread()]
    assert any("unreachable" in r.getMessage() and r.levelno == logging.WARNING
               for r in records)
    keys, blocks = run(3)
    assert store.locate(keys) == [None] * 3 and not store.put_chunks(keys, blocks)
    server.start()
    wait_for(lambda: store.up)
    assert store.put_chunks(keys, blocks)
    assert all(store.locate(keys))
    assert store.take_counts()["reconnects"] == 0  # the first connection is no reconnect
    store.close()


def test_slow_store_lookups_time_out_as_misses(redis_server):
    store = make_store(redis_server.url)
    keys, blocks = run(6)
    assert store.put_chunks(keys, blocks)
    refs = store.locate(keys)
    store.take_counts()
    # Long enough that the calls return (each after its 50 ms timeout) before the
    # store answers, however loaded the machine.
    pause_ms = 3000
    admin = redis_server.client()
    connections = admin.info("stats")["total_connections_received"]
    admin.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
    paused_at = time.monotonic()
    totals = Totals(store)
    assert without_retry(totals, store.locate, keys) == [None] * 6
    assert without_retry(totals, store.get_meta, "modules", "x") is None
    assert time.monotonic() - paused_at < pause_ms / 1000, "a call waited for the store"
    assert totals.take()["failures"] == 2
    time.sleep(max(0.0, pause_ms / 1000 - (time.monotonic() - paused_at)) + 0.05)
    # Nor did the client library retry inside a call (each retry reconnects): the first
    # call timed out on the pooled connection, the second on one new connection.
    assert admin.info("stats")["total_connections_received"] - connections <= 2
    # when the store answers again, so does the tier
    wait_for(lambda: store.up and store.locate(keys[:1])[0] is not None)
    assert [bytes(b) for b in store.get_blocks(keys, refs)] == blocks
    store.close()


def test_password_protected_store(redis_servers):
    server = redis_servers(password="correct-horse")
    with_url = make_store(f"redis://:correct-horse@127.0.0.1:{server.port}/0")
    with_env = make_store(server.url, environ={PASSWORD_ENV: "correct-horse"})
    keys, blocks = run(3)
    assert with_url.put_chunks(keys, blocks)
    assert [bytes(b) for b in with_env.get_blocks(keys, with_env.locate(keys))] == blocks
    with captured_warnings() as records:
        without = make_store(server.url)
        wrong = make_store(f"redis://:wrong@127.0.0.1:{server.port}/0")
    text = "\n".join(r.getMessage() for r in records)
    assert "refused our credentials" in text and PASSWORD_ENV in text
    assert "correct-horse" not in text and ":wrong@" not in text
    for store in (without, wrong):
        assert not store.up
        assert store.locate(keys) == [None] * 3 and not store.put_chunks(keys, blocks)
        store.close()
    with_url.close()
    with_env.close()


def test_tls(redis_servers):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test certificate)")
    server = redis_servers(tls=True)
    store = make_store(server.url)
    keys, blocks = run(4)
    assert store.put_chunks(keys, blocks)
    assert [bytes(b) for b in store.get_blocks(keys, store.locate(keys))] == blocks
    store.close()
    # a plain connection to the TLS port is refused by the server: the tier stays off
    plain = make_store(f"redis://127.0.0.1:{server.port}/0")
    assert not plain.up and plain.locate(keys) == [None] * 4
    plain.close()


def test_concurrent_callers(redis_server):
    """Worker threads and the scheduler side share one store."""
    store = make_store(redis_server.url)
    errors = []

    def worker():
        try:
            for _ in range(10):
                keys, blocks = run(4)
                assert store.put_chunks(keys, blocks)
                assert [bytes(b) for b in store.get_blocks(keys, store.locate(keys))] == blocks
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.take_counts()["hits"] == 4 * 10 * 4
    store.close()


def test_redis_cluster(redis_cluster):
    store = make_store(redis_cluster.url)
    assert store.up
    keys, blocks = run(30)  # ten chunks, spread over the nodes
    assert store.put_chunks(keys, blocks)
    assert sum(n.client().dbsize() > 0 for n in redis_cluster.nodes) >= 2
    store.take_counts()
    refs = store.locate(keys)
    assert all(refs) and store.take_counts()["round_trips"] == 1
    assert [bytes(b) for b in store.get_blocks(keys, refs)] == blocks
    other = make_store(redis_cluster.url)  # a second instance
    assert other.put_meta("modules", "doc", b"shared")
    assert store.get_meta("modules", "doc") == b"shared"
    assert [bytes(b) for b in other.get_blocks(keys, other.locate(keys))] == blocks
    store.close()
    other.close()


def test_redis_cluster_node_killed_then_back(redis_cluster):
    """Runs after test_redis_cluster (it kills a node of the shared cluster, and
    restores it)."""
    store = make_store(redis_cluster.url)
    keys, blocks = run(30)
    assert store.put_chunks(keys, blocks)
    refs = store.locate(keys)
    node = redis_cluster.nodes[1]
    totals = Totals(store)
    node.kill()
    try:
        for call, args, miss in [(store.locate, (keys,), [None] * 30),
                                 (store.get_blocks, (keys, refs), [None] * 30),
                                 (store.put_chunks, (keys, blocks), False)]:
            assert without_retry(totals, call, *args) == miss, call.__name__
        assert not store.up
    finally:
        node.start()  # same port, same cluster config file: it rejoins
    wait_for(lambda: store.up, timeout=30)
    assert store.put_chunks(keys, blocks)
    assert [bytes(b) for b in store.get_blocks(keys, store.locate(keys))] == blocks
    counts = store.take_counts()
    assert counts["reconnects"] == 1 and counts["corrupt"] == 0
    store.close()

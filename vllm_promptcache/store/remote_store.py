"""The shared remote tier's store: KV chunks and shared metadata in Redis or Valkey.

Several vLLM instances that name the same store share what each of them saved.
This module only moves and checks bytes; which runs to write, promote or prefetch
is the connector's business.  It is called from worker threads and from the
scheduler side, and it never raises on a network fault and never waits longer
than its timeouts: a fault is a miss (or a dropped save), counted.

Keys (`fp` is the model fingerprint, 32 hex; no `{...}` hash tags, so a cluster
spreads one model's keys over all its nodes):

    promptcache:<fp>:kv:r<rank>:<chunk id>   a chunk: a run of blocks of one rank
    promptcache:<fp>:ix:<block key hex>      index entry: chunk id + position in it
    promptcache:<fp>:meta:<kind>             a hash of shared metadata (name -> bytes)

A chunk id is the hex of its first and last block keys.  Keys are chained (a key
names its whole prefix), so the id names the chunk's content exactly: writers of
the same blocks write the same value under the same name, on every rank.

A chunk value is

    [magic, version, JSON length][JSON header][block 0]...[block n-1][MAC]

The header names the fingerprint, the KV layout (`ModelFingerprint.kv_layout`),
rank, world size, block_bytes and every block key; the MAC is blake3 keyed with a
key derived from the instances' shared secret, over the Redis key name and
everything before it.  Index entries and metadata values carry a MAC over their
name and content too.  Whoever lacks the secret cannot make a value this store
serves; a value moved to another name fails.

Lookups cost one round trip (on a cluster, one per node, sent together):
`locate` pipelines a GET of every block's index entry (an index entry says
where the block lives, so any split of a run into chunks is found).  The index
is a hint: a chunk may vanish under it at any time (the store's own
`allkeys-lru` eviction), which `get_*` answers as a plain miss, deleting the
stale index entries.  A value that fails its MAC, its header
checks or the keys the caller expects is a miss too, deleted and counted corrupt.
A value is untrusted even when its MAC holds (a holder of the secret, another
version): every header field is checked in type and range, and a wrong one is a
miss, deleted and counted as rejected; nothing read from the store raises.

Connection state: a call that meets a refused or broken connection (or
`DOWN_AFTER_TIMEOUTS` timeouts in a row) takes the tier down; while down, calls
return at once without touching the network, and a background thread pings the
store with exponential backoff until it answers (a reconnect, counted).  A store
unreachable at start-up is the same: a warning, then the same retries.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from blake3 import blake3

from ..background_threads import name_os_thread
from .secondary_io import RateLimitedWarning as _RateLimitedWarning
from .remote_url import RemoteURL, parse_remote_url
from .untrusted import BadValue, field, hex_list, int_field, json_object

logger = logging.getLogger("vllm.promptcache")

SECRET_ENV = "PROMPTCACHE_REMOTE_SECRET"
MIN_SECRET_BYTES = 16
_KEY_CONTEXT = "vllm-promptcache remote tier v1 value MAC"
MAGIC = b"VPCREMKV"
FORMAT_VERSION = 2  # 2: the header names the KV layout
_PREFIX = struct.Struct("<8sII")  # magic, version, JSON length
_INDEX = struct.Struct("<I")      # a block's position in its chunk
MAC_BYTES = 32
INDEX_MAC_BYTES = 16
KEY_BYTES = 16
NAMESPACE = "promptcache"
DEFAULT_TIMEOUT_MS = 50
MIN_TRANSFER_TIMEOUT_MS = 1000
DEFAULT_CHUNK_BYTES = 4 << 20      # LMCache measured ~4 MB values as Redis's sweet spot
DOWN_AFTER_TIMEOUTS = 3
WARN_EVERY_SECONDS = 60.0
_KIND = re.compile(r"^[a-z0-9_-]{1,64}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{32}$")

COUNTERS = ("hits", "misses", "lookups", "found", "bytes_written", "bytes_read", "seconds",
            "round_trips", "failures", "corrupt", "corrupt_blocks", "reconnects", "puts",
            "dropped_puts", "rejected")
_MAX_WORLD = 1 << 16


class RemoteSecretError(ValueError):
    """The remote tier has no usable shared secret: it does not start."""


class _Corrupt(Exception):
    pass


class _Rejected(_Corrupt):
    """A value whose MAC holds but whose header is wrong (type, range, version)."""


class _Failed(Exception):
    """A store call that did not complete (down, timed out, refused, rejected)."""


@dataclass(frozen=True)
class ChunkRef:
    """Where a block lives: the chunk that holds it and its position there."""
    chunk_id: str
    index: int


@dataclass(frozen=True)
class RemoteChunk:
    """A verified chunk: its keys and blocks (views into the value's bytes)."""
    keys: tuple[bytes, ...]
    block_bytes: int
    payload: memoryview

    def block(self, index: int) -> memoryview:
        return self.payload[index * self.block_bytes:(index + 1) * self.block_bytes]


def chunk_ranges(num_blocks: int, block_bytes: int,
                 max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[tuple[int, int]]:
    """[start, end) ranges cutting a run of `num_blocks` blocks into chunks of at
    most `max_chunk_bytes` (at least one block each)."""
    per_chunk = max(1, max_chunk_bytes // max(1, block_bytes))
    return [(s, min(s + per_chunk, num_blocks)) for s in range(0, num_blocks, per_chunk)]


def chunk_id(keys: Sequence[bytes]) -> str:
    return keys[0].hex() + keys[-1].hex()


def remote_secret(secret: bytes | str | None, environ: Mapping[str, str] | None = None) -> bytes:
    """The MAC key, derived from the configured secret (or `PROMPTCACHE_REMOTE_SECRET`);
    RemoteSecretError when there is none or it is shorter than MIN_SECRET_BYTES."""
    if secret is None or secret == "" or secret == b"":
        secret = (os.environ if environ is None else environ).get(SECRET_ENV) or None
    if secret is None:
        raise RemoteSecretError(
            f"the remote tier needs a secret shared by the instances that use the store "
            f"(remote_secret, or {SECRET_ENV}; at least {MIN_SECRET_BYTES} bytes): it keys the "
            f"checksum of every value, so nobody without it can plant KV")
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET_BYTES:
        raise RemoteSecretError(f"the remote tier's secret (remote_secret, or {SECRET_ENV}) has "
                                f"{len(raw)} bytes; it needs at least {MIN_SECRET_BYTES}")
    return blake3(raw, derive_key_context=_KEY_CONTEXT).digest()


class RemoteStore:
    """One instance's handle on the shared store, for one rank of one model.

    `block_bytes` (the bytes of one block of this rank) is needed to write and is
    checked on reads when given; the scheduler side, which only looks up and
    reads metadata, may leave it None.
    """

    def __init__(self, url: str | RemoteURL, fingerprint: str, secret: bytes | str | None = None,
                 *, rank: int = 0, world: int = 1, block_bytes: int | None = None,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS, transfer_timeout_ms: int | None = None,
                 max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, retry_initial_s: float = 0.5,
                 retry_max_s: float = 30.0, environ: Mapping[str, str] | None = None,
                 kv_layout: str = ""):
        self.url = url if isinstance(url, RemoteURL) else parse_remote_url(url, environ)
        try:
            import redis  # noqa: F401
        except ImportError:
            raise ImportError("--promptcache-remote-url needs redis-py: pip install "
                              "'vllm-promptcache[remote]'") from None
        if not isinstance(fingerprint, str) or not _FINGERPRINT.match(fingerprint):
            raise ValueError(f"remote tier: fingerprint must be 32 lowercase hex characters, "
                             f"got {fingerprint!r}")
        if not 1 <= int(timeout_ms) <= 60000:
            raise ValueError(f"remote_timeout_ms must be in [1, 60000], got {timeout_ms}")
        if not 0 <= rank < world:
            raise ValueError(f"remote tier: rank {rank} outside world {world}")
        self._key = remote_secret(secret, environ)
        self.fingerprint = fingerprint
        self.kv_layout = kv_layout  # ModelFingerprint.kv_layout, in every chunk's header
        self.rank, self.world = int(rank), int(world)
        self.block_bytes = block_bytes
        self.timeout_s = timeout_ms / 1000
        self.transfer_timeout_s = (transfer_timeout_ms if transfer_timeout_ms is not None
                                   else max(timeout_ms, MIN_TRANSFER_TIMEOUT_MS)) / 1000
        self.max_chunk_bytes = max_chunk_bytes
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self._prefix = f"{NAMESPACE}:{fingerprint}:"

        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._up = False
        self._ever_up = False
        self._timeouts_in_a_row = 0
        self._clients: tuple | None = None  # (fast, transfer)
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None
        self._warn_down = _RateLimitedWarning(WARN_EVERY_SECONDS)
        self._warn_refused = _RateLimitedWarning(WARN_EVERY_SECONDS)

        logger.info("promptcache: remote tier at %s (timeout %d ms)", self.url.masked(),
                    timeout_ms)
        if not self._probe():
            self._start_prober()

    # -- names -----------------------------------------------------------------
    def chunk_name(self, cid: str, rank: int | None = None) -> str:
        return f"{self._prefix}kv:r{self.rank if rank is None else rank}:{cid}"

    def index_name(self, key: bytes) -> str:
        return f"{self._prefix}ix:{key.hex()}"

    def meta_name(self, kind: str) -> str:
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ValueError(f"remote metadata kind must match {_KIND.pattern}, got {kind!r}")
        return f"{self._prefix}meta:{kind}"

    def split_run(self, keys: Sequence[bytes], block_bytes: int | None = None
                  ) -> list[tuple[int, int]]:
        """The chunks `put_chunks` cuts a run of these keys into."""
        return chunk_ranges(len(keys), block_bytes or self.block_bytes or 1,
                            self.max_chunk_bytes)

    # -- state -----------------------------------------------------------------
    @property
    def up(self) -> bool:
        return self._up

    def _count(self, **deltas) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._counts[k] += v

    def count_rejected(self, n: int = 1) -> None:
        """Entries read from the store that passed their MAC but not their checks
        (here, or in what a caller made of them: a shared segment whose keys are
        not its tokens'); exported as rejected_store_entries_total."""
        self._count(rejected=n)

    def take_counts(self) -> dict[str, float]:
        """Counters since the last call (then reset): hits / misses (blocks served or
        not by get_*), lookups / found (blocks asked and located by locate),
        bytes_written / bytes_read, seconds (in store calls), round_trips, failures
        (calls that failed on the network or were refused by the store), corrupt
        (values deleted for failing their checks) and corrupt_blocks (blocks asked
        for in them), reconnects, puts / dropped_puts (chunks), rejected (values
        whose MAC held but whose fields did not)."""
        with self._lock:
            out, self._counts = self._counts, dict.fromkeys(COUNTERS, 0)
        return out

    def _make_clients(self):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        kw = self.url.client_kwargs()

        def one(timeout: float):
            # No retries inside the client: a retry with backoff would outlast the timeout.
            common = dict(socket_timeout=timeout, socket_connect_timeout=self.timeout_s,
                          retry=Retry(NoBackoff(), 0))
            if self.url.cluster:
                from redis.cluster import ClusterNode, RedisCluster

                return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.url.hosts],
                                    require_full_coverage=False, **common, **kw)
            return redis.Redis(**common, **kw)

        return one(self.timeout_s), one(self.transfer_timeout_s)

    def _drop_clients(self) -> None:
        clients, self._clients = self._clients, None
        for c in clients or ():
            try:
                c.close()
            except Exception:
                pass

    def _probe(self) -> bool:
        """One bounded attempt to reach the store; True when it answered."""
        import redis

        try:
            if self._clients is None or self.url.cluster:
                # A cluster client maps slots at construction: build it afresh.
                self._drop_clients()
                self._clients = self._make_clients()
            self._check(self._clients[0])
        except redis.AuthenticationError as e:
            self._warn_down("promptcache: the remote store at %s refused our credentials (%s): "
                            "set the password in the URL or PROMPTCACHE_REMOTE_PASSWORD; "
                            "the remote tier stays off", self.url.masked(), e)
            return False
        except (redis.RedisError, OSError, redis_errors().RedisClusterException) as e:
            self._warn_down("promptcache: the remote store at %s is unreachable (%s); the "
                            "remote tier is off and retries in the background",
                            self.url.masked(), e)
            return False
        if self._closed.is_set():
            self._drop_clients()
            return True
        with self._lock:
            self._up = True
            self._timeouts_in_a_row = 0
            again, self._ever_up = self._ever_up, True
            if again:
                self._counts["reconnects"] += 1
        logger.info("promptcache: remote tier %s at %s",
                    "reconnected" if again else "is up", self.url.masked())
        return True

    def _check(self, client) -> None:
        """Raise unless the store answers; a cluster must answer on every primary and
        say it is whole (else the tier would come up only to fail again)."""
        if not self.url.cluster:
            client.ping()
            return
        for node in client.get_primaries():
            state = client.cluster_info(target_nodes=node).get("cluster_state")
            if state != "ok":
                raise redis_errors().ClusterDownError(f"{node.name} says cluster_state:{state}")

    def _start_prober(self) -> None:
        with self._lock:
            if self._closed.is_set() or (self._prober and self._prober.is_alive()):
                return
            self._prober = threading.Thread(target=self._probe_loop, daemon=True,
                                            name="promptcache-remote-probe")
            self._prober.start()

    def _probe_loop(self) -> None:
        name_os_thread()
        delay = self.retry_initial_s
        while not self._closed.wait(delay):
            if self._probe():
                return
            delay = min(delay * 2, self.retry_max_s)

    def _go_down(self, why: str) -> None:
        with self._lock:
            was_up, self._up = self._up, False
        if was_up:
            logger.warning("promptcache: the remote store at %s failed (%s); the remote tier is "
                           "off (misses, dropped saves) until it answers again",
                           self.url.masked(), why)
        self._start_prober()

    def _call(self, fn: Callable, transfer: bool = False):
        """Run `fn(client)` (one round trip); _Failed when down or on any store fault."""
        import redis

        clients = self._clients
        if not self._up or clients is None:
            raise _Failed("down")
        t0 = time.perf_counter()
        try:
            out = fn(clients[1 if transfer else 0])
        except redis.TimeoutError as e:
            with self._lock:
                self._timeouts_in_a_row += 1
                down = self._timeouts_in_a_row >= DOWN_AFTER_TIMEOUTS
            self._count(failures=1)
            if down:
                self._go_down(f"{DOWN_AFTER_TIMEOUTS} timeouts in a row")
            raise _Failed(str(e)) from None
        except (redis.ConnectionError, OSError, redis_errors().ClusterDownError,
                redis_errors().RedisClusterException) as e:
            self._count(failures=1)
            self._go_down(f"{type(e).__name__}: {e}")
            raise _Failed(str(e)) from None
        except redis.RedisError as e:  # the store refused (out of memory, read-only, ...)
            self._count(failures=1)
            self._warn_refused("promptcache: the remote store refused a request: %s", e)
            raise _Failed(str(e)) from None
        finally:
            self._count(round_trips=1, seconds=time.perf_counter() - t0)
        with self._lock:
            self._timeouts_in_a_row = 0
        return out

    def _pipeline(self, commands: Sequence[tuple], transfer: bool = False) -> list:
        def run(client):
            pipe = client.pipeline(transaction=False)
            for cmd in commands:
                pipe.execute_command(*cmd)
            return pipe.execute()
        return self._call(run, transfer)

    def _forget(self, names: Sequence[str]) -> None:
        """Delete values found corrupt or stale; best effort (one round trip)."""
        if names:
            try:
                self._pipeline([("DEL", n) for n in names])
            except _Failed:
                pass

    # -- MACs ------------------------------------------------------------------
    def _mac(self, *parts) -> bytes:
        h = blake3(key=self._key)
        for p in parts:
            h.update(struct.pack("<Q", len(p)))
            h.update(p)
        return h.digest()

    # -- chunks ----------------------------------------------------------------
    def encode_chunk(self, keys: Sequence[bytes], blocks: Sequence, block_bytes: int) -> bytes:
        """The value of one chunk (for tests and tools; put_chunks uses it)."""
        header = json.dumps({
            "fingerprint": self.fingerprint, "rank": self.rank, "world": self.world,
            "block_bytes": block_bytes, "keys": [k.hex() for k in keys],
            "kv_layout": self.kv_layout,
        }, separators=(",", ":")).encode()
        parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header,
                 *(memoryview(b).cast("B") for b in blocks)]
        # The MAC of _mac(name, body) computed over the parts: the blocks are copied once.
        name = self.chunk_name(chunk_id(keys)).encode()
        h = blake3(key=self._key)
        h.update(struct.pack("<Q", len(name)) + name)
        h.update(struct.pack("<Q", sum(len(p) for p in parts)))
        for part in parts:
            h.update(part)
        return b"".join([*parts, h.digest()])

    def put_chunks(self, keys: Sequence[bytes], blocks: Sequence) -> bool:
        """Write a run of this rank's blocks (bytes-like, `block_bytes` each) as chunks
        of at most max_chunk_bytes, with their index entries; pipelined, a few chunks
        per round trip.  Blocking for at most the transfer timeout per round trip:
        call it from a background thread.  True when every chunk was written; a
        failure drops the rest of the run (counted in dropped_puts)."""
        if len(keys) != len(blocks):
            raise ValueError(f"put_chunks: {len(keys)} keys but {len(blocks)} blocks")
        if not keys:
            return True
        sizes = {memoryview(b).nbytes for b in blocks}
        block_bytes = self.block_bytes or next(iter(sizes))
        if sizes != {block_bytes}:
            raise ValueError(f"put_chunks: blocks of {sorted(sizes)} bytes, expected {block_bytes}")
        ranges = chunk_ranges(len(keys), block_bytes, self.max_chunk_bytes)
        per_trip = max(1, 4 * self.max_chunk_bytes // max(1, (ranges[0][1] - ranges[0][0])
                                                           * block_bytes))
        for first in range(0, len(ranges), per_trip):
            batch = ranges[first:first + per_trip]
            commands, nbytes = [], 0
            for s, e in batch:
                cid = chunk_id(keys[s:e])
                value = self.encode_chunk(keys[s:e], blocks[s:e], block_bytes)
                nbytes += len(value)
                commands.append(("SET", self.chunk_name(cid), value))
                for i in range(s, e):
                    commands.append(("SET", self.index_name(keys[i]), self._index_entry(
                        keys[i], cid, i - s)))
            try:
                self._pipeline(commands, transfer=True)
            except _Failed:
                self._count(dropped_puts=len(ranges) - first)
                return False
            self._count(puts=len(batch), bytes_written=nbytes)
        return True

    def _index_entry(self, key: bytes, cid: str, index: int) -> bytes:
        body = cid.encode() + _INDEX.pack(index)
        return body + self._mac(self.index_name(key).encode(), body)[:INDEX_MAC_BYTES]

    def locate(self, keys: Sequence[bytes]) -> list[ChunkRef | None]:
        """Where each block is, in one round trip (None: not in the store, or the
        store did not answer in time)."""
        if not keys:
            return []
        self._count(lookups=len(keys))
        try:
            values = self._pipeline([("GET", self.index_name(k)) for k in keys])
        except _Failed:
            return [None] * len(keys)
        out: list[ChunkRef | None] = []
        bad = []
        for key, value in zip(keys, values):
            if value is None:
                out.append(None)
                continue
            ref = self._parse_index(key, value)
            if ref is None:
                bad.append(self.index_name(key))
            out.append(ref)
        if bad:
            logger.warning("promptcache: %d remote index entries failed their checksum "
                           "(another secret, or damaged); deleting them", len(bad))
            self._count(corrupt=len(bad))
            self._forget(bad)
        self._count(found=sum(r is not None for r in out))
        return out

    def _parse_index(self, key: bytes, value: bytes) -> ChunkRef | None:
        body, mac = value[:-INDEX_MAC_BYTES], value[-INDEX_MAC_BYTES:]
        if (len(body) != 4 * KEY_BYTES + _INDEX.size or not hmac.compare_digest(
                self._mac(self.index_name(key).encode(), body)[:INDEX_MAC_BYTES], mac)):
            return None
        try:
            cid = body[:4 * KEY_BYTES].decode("ascii")
        except UnicodeDecodeError:
            return None
        (index,) = _INDEX.unpack_from(body, 4 * KEY_BYTES)
        return ChunkRef(cid, index)

    def get_blocks(self, keys: Sequence[bytes], refs: Sequence[ChunkRef]
                   ) -> list[memoryview | None]:
        """The blocks `keys` (located at `refs` by `locate`), fetching every chunk they
        name in one round trip; None for each block not served."""
        groups: dict[str, dict[int, bytes]] = {}
        for key, ref in zip(keys, refs, strict=True):
            groups.setdefault(ref.chunk_id, {})[ref.index] = key
        chunks = dict(zip(groups, self._get(list(groups.items()))))
        out = []
        for ref in refs:
            chunk = chunks[ref.chunk_id]
            out.append(None if chunk is None else chunk.block(ref.index))
        return out

    def _get(self, wanted: list[tuple[str, dict[int, bytes]]]) -> list[RemoteChunk | None]:
        asked = sum(max(1, len(w)) for _, w in wanted)
        names = [self.chunk_name(cid) for cid, _ in wanted]
        try:
            values = self._pipeline([("GET", n) for n in names], transfer=True)
        except _Failed:
            self._count(misses=asked)
            return [None] * len(wanted)
        out: list[RemoteChunk | None] = []
        stale: list[str] = []
        for name, (cid, want), value in zip(names, wanted, values):
            n = max(1, len(want))
            if value is None:
                # Evicted by the store (allkeys-lru), or never written by this rank.
                out.append(None)
                self._count(misses=n)
                stale += [self.index_name(k) for k in want.values()]
                continue
            self._count(bytes_read=len(value))
            try:
                chunk = self._checked_decode(name, cid, value, want)
            except _Corrupt as e:
                logger.warning("promptcache: corrupt remote value %s, deleting it: %s",
                               name, e)
                out.append(None)
                self._count(misses=n, corrupt=1, corrupt_blocks=n,
                            rejected=int(isinstance(e, _Rejected)))
                stale += [name, *(self.index_name(k) for k in want.values())]
                continue
            out.append(chunk)
            self._count(hits=n)
        self._forget(stale)
        return out

    def _checked_decode(self, name: str, cid: str, value: bytes,
                        want: Mapping[int, bytes]) -> RemoteChunk:
        try:
            return self._decode_chunk(name, cid, value, want)
        except _Corrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a value must never raise into the engine
            raise _Rejected(f"{type(e).__name__}: {e}") from None

    def _decode_chunk(self, name: str, cid: str, value: bytes,
                      want: Mapping[int, bytes]) -> RemoteChunk:
        view = memoryview(value)
        if len(view) < _PREFIX.size + MAC_BYTES:
            raise _Corrupt(f"{len(view)} bytes, shorter than any value")
        body = view[:-MAC_BYTES]
        if not hmac.compare_digest(self._mac(name.encode(), body), bytes(view[-MAC_BYTES:])):
            raise _Corrupt("checksum mismatch (damaged, truncated, or written without this "
                           "tier's secret)")
        magic, version, json_len = _PREFIX.unpack_from(body)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise _Rejected(f"magic {magic!r} version {version}, expected {MAGIC!r} "
                            f"{FORMAT_VERSION}")
        if _PREFIX.size + json_len > len(body):
            raise _Rejected(f"a {json_len}-byte header in a {len(body)}-byte value")
        header = _checked_header(bytes(body[_PREFIX.size:_PREFIX.size + json_len]))
        fingerprint, rank, world = header["fingerprint"], header["rank"], header["world"]
        block_bytes, keys = header["block_bytes"], header["keys"]
        payload = body[_PREFIX.size + json_len:]
        if not keys or len(payload) != len(keys) * block_bytes:
            raise _Rejected(f"{len(payload)} payload bytes for {len(keys)} blocks of "
                           f"{block_bytes}")
        if self.kv_layout and header["kv_layout"] != self.kv_layout:
            raise _Rejected(f"KV layout {header['kv_layout']!r}, expected {self.kv_layout!r}")
        if fingerprint != self.fingerprint or (rank, world) != (self.rank, self.world):
            raise _Rejected(f"fingerprint {fingerprint} rank {rank}/{world}, expected "
                           f"{self.fingerprint} rank {self.rank}/{self.world}")
        if self.block_bytes is not None and block_bytes != self.block_bytes:
            raise _Rejected(f"blocks of {block_bytes} bytes, expected {self.block_bytes}")
        if chunk_id(keys) != cid:
            raise _Rejected("its keys do not match its name")
        for index, key in want.items():
            if not 0 <= index < len(keys) or keys[index] != key:
                raise _Rejected(f"block {index} does not hold the key looked up")
        return RemoteChunk(keys, block_bytes, payload)

    # -- shared metadata -------------------------------------------------------
    def _meta_value(self, table: str, name: str, data: bytes) -> bytes:
        return self._mac(table.encode(), name.encode(), data) + data

    def put_meta(self, kind: str, name: str, data: bytes) -> bool:
        """Store `data` under `name` in this model's table `kind` (e.g. "modules",
        "segments"); True when written."""
        table = self.meta_name(kind)
        try:
            self._call(lambda c: c.hset(table, name, self._meta_value(table, name, bytes(data))))
        except _Failed:
            return False
        self._count(bytes_written=len(data) + MAC_BYTES)
        return True

    def get_meta(self, kind: str, name: str) -> bytes | None:
        """The verified bytes stored under `name` in table `kind`, or None."""
        table = self.meta_name(kind)
        try:
            value = self._call(lambda c: c.hget(table, name))
        except _Failed:
            return None
        if value is None:
            return None
        return self._check_meta(table, {name: value}).get(name)

    def items_meta(self, kind: str) -> dict[str, bytes]:
        """Every verified entry of table `kind` (one round trip)."""
        table = self.meta_name(kind)
        try:
            raw = self._call(lambda c: c.hgetall(table), transfer=True)
        except _Failed:
            return {}
        return self._check_meta(table, {k.decode(errors="replace"): v for k, v in raw.items()})

    def _check_meta(self, table: str, raw: Mapping[str, bytes]) -> dict[str, bytes]:
        good, bad = {}, []
        for name, value in raw.items():
            data = value[MAC_BYTES:]
            if len(value) >= MAC_BYTES and hmac.compare_digest(
                    self._mac(table.encode(), name.encode(), data), value[:MAC_BYTES]):
                good[name] = data
            else:
                bad.append(name)
        self._count(bytes_read=sum(len(v) for v in raw.values()))
        if bad:
            logger.warning("promptcache: %d remote metadata entries of %s failed their "
                           "checksum; deleting them", len(bad), table)
            self._count(corrupt=len(bad))
            try:
                self._call(lambda c: c.hdel(table, *bad))
            except _Failed:
                pass
        return good

    def close(self) -> None:
        self._closed.set()
        prober = self._prober
        if prober is not None:
            prober.join(timeout=self.timeout_s * 4 + 1)
        with self._lock:
            self._up = False
        self._drop_clients()


def _checked_header(raw: bytes) -> dict:
    """A chunk's JSON header, every field checked in type and range; _Rejected names
    the first wrong one (never another exception: the value is untrusted)."""
    try:
        header = json_object(raw, "the header")
        world = int_field(header, "world", 1, _MAX_WORLD)
        int_field(header, "rank", 0, world - 1)
        int_field(header, "block_bytes", 1, 1 << 40)
        field(header, "fingerprint", str)
        field(header, "kv_layout", str)
        header["keys"] = hex_list(header, "keys", KEY_BYTES)
    except BadValue as e:
        raise _Rejected(f"malformed header: {e}") from None
    return header


def redis_errors():
    """redis-py's exceptions module, imported when a store is used (redis is an
    optional dependency)."""
    from redis import exceptions

    return exceptions

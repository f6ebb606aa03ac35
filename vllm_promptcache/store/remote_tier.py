"""The remote tier's index, on the scheduler side: which blocks the shared store holds.

The store is shared by several servers, so this index is never complete: it is
what lookups found.  A lookup is one round trip (`RemoteStore.locate`), run on a
background thread so that a step never waits on the network; until it answers
(or its deadline passes: a miss) the request is asked about again.  Lookups asked
while one is out share the next round trip: on a store 40 ms away, a burst of
requests queued one round trip each had the last wait for all the others.  Blocks this
instance wrote are indexed when every rank reported its write.  The store evicts
on its own (`maxmemory`): an indexed block that vanished is a failed promotion,
and its chunk is forgotten.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from ..background_threads import name_os_thread
from .keys import BlockKey
from .remote_store import ChunkRef, RemoteStore, chunk_id, chunk_ranges

logger = logging.getLogger("vllm.promptcache")

# Blocks whose place in the store is remembered (about 100 bytes each).
MAX_KNOWN = 1 << 20
# Keys asked about in one lookup (a request's prefix).
MAX_LOOKUP_KEYS = 8192
# Answered lookups are kept only so that their asker does not ask again too soon (a
# request until it finishes, a segment for its retry interval): at most this many,
# none older than ANSWERED_KEEP_S (asking again after that costs one round trip).
MAX_ANSWERED = 4096
ANSWERED_KEEP_S = 30.0


class RemoteTier:
    name = "remote"

    def __init__(self, store: RemoteStore, block_bytes: int, timeout_ms: int):
        self.store = store
        self.block_bytes = block_bytes
        self.deadline_s = 4 * timeout_ms / 1000 + 0.05
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="promptcache-lookup",
                                        initializer=name_os_thread)
        self._where: OrderedDict[BlockKey, ChunkRef] = OrderedDict()
        self._by_chunk: dict[str, set[BlockKey]] = {}
        self._lookups: dict[str, tuple[Future | None, float, list[BlockKey]]] = {}
        self._writes: dict[str, tuple[BlockKey, ...]] = {}
        self._writing: set[BlockKey] = set()
        self._round_trips: deque[float] = deque(maxlen=64)
        # Lookups waiting for the next round trip, and whether one is scheduled.
        self._queued: deque[tuple[Future, list[BlockKey]]] = deque()
        self._queue_lock = threading.Lock()
        self._draining = False
        self.evictions = 0
        self.corrupt_blocks = 0
        self.bytes_in_use = 0
        self.capacity_bytes = 0

    # -- lookups -----------------------------------------------------------------
    def start_lookup(self, req_id: str, keys: Sequence[BlockKey],
                     retry_after_s: float | None = None) -> None:
        """Ask the store about a request's blocks, once, in the background (again
        `retry_after_s` after an answer, if given)."""
        entry = self._lookups.get(req_id)
        if entry is not None and retry_after_s is not None and entry[0] is None \
                and time.monotonic() - entry[1] > retry_after_s:
            entry = None
        if entry is not None or not keys:
            return
        keys = [k for k in keys[:MAX_LOOKUP_KEYS]]
        started = time.monotonic()
        future: Future = Future()
        with self._queue_lock:
            self._queued.append((future, keys))
            if not self._draining:
                self._draining = True
                self._pool.submit(self._locate_queued)
        # The store's round trip as the scheduler side sees it (load_cost.py prices the
        # tier's latency with it); a callback, since the answer is read a step later.
        future.add_done_callback(lambda f: self._round_trips.append(time.monotonic() - started))
        self._lookups[req_id] = (future, started, keys)

    def _locate_queued(self) -> None:
        """On the lookup thread: every lookup queued so far in one round trip (up to
        MAX_LOOKUP_KEYS keys in all, at least one lookup), until none is left."""
        while True:
            with self._queue_lock:
                batch, size = [], 0
                while self._queued and (not batch or
                                        size + len(self._queued[0][1]) <= MAX_LOOKUP_KEYS):
                    batch.append(self._queued.popleft())
                    size += len(batch[-1][1])
                if not batch:
                    self._draining = False
                    return
            keys = list(dict.fromkeys(k for _, ks in batch for k in ks))
            try:
                found = dict(zip(keys, self.store.locate(keys)))
            except Exception:  # noqa: BLE001 - the store never raises; be safe anyway
                logger.exception("promptcache: a remote lookup failed; its blocks are misses")
                found = {}
            for future, ks in batch:
                future.set_result([found.get(k) for k in ks])

    def lookup_pending(self, req_id: str) -> bool:
        """The request's lookup has not answered yet (and is not past its deadline)."""
        entry = self._lookups.get(req_id)
        if entry is None or entry[0] is None:
            return False
        future, started, keys = entry
        if future.done():
            try:
                refs = future.result()
            except Exception:  # noqa: BLE001 - the store never raises; be safe anyway
                refs = []
            for key, ref in zip(keys, refs):
                if ref is not None:
                    self._remember(key, ref)
            self._lookups[req_id] = (None, started, [])
            return False
        if time.monotonic() - started > self.deadline_s:
            self._lookups[req_id] = (None, started, [])  # a miss; the answer is dropped
            return False
        return True

    def take_answered(self) -> list[str]:
        """Requests whose lookup answered (or expired) since the last call; their
        found blocks are indexed."""
        now = time.monotonic()
        done = [req_id for req_id, (future, started, _keys) in self._lookups.items()
                if future is not None and (future.done() or now - started > self.deadline_s)]
        for req_id in done:
            self.lookup_pending(req_id)
        self._drop_old_answers(now)
        return done

    def _drop_old_answers(self, now: float) -> None:
        answered = [r for r, (future, _, _) in self._lookups.items() if future is None]
        excess = len(answered) - MAX_ANSWERED
        for r in answered:  # oldest first (dict order is the order they were started)
            if excess <= 0 and now - self._lookups[r][1] <= ANSWERED_KEEP_S:
                continue
            del self._lookups[r]
            excess -= 1

    def take_round_trips(self) -> list[float]:
        """Seconds each lookup answered in, since the last call."""
        out = []
        while self._round_trips:
            out.append(self._round_trips.popleft())
        return out

    def held_lookups(self) -> int:
        """Lookups in flight or remembered as answered."""
        return len(self._lookups)

    def submit(self, fn, *args) -> Future:
        """Run a store call on the tier's background thread."""
        return self._pool.submit(fn, *args)

    def forget_request(self, req_id: str) -> None:
        self._lookups.pop(req_id, None)

    def _remember(self, key: BlockKey, ref: ChunkRef) -> None:
        old = self._where.pop(key, None)
        if old is not None and old.chunk_id != ref.chunk_id:
            self._by_chunk.get(old.chunk_id, set()).discard(key)
        self._where[key] = ref
        self._by_chunk.setdefault(ref.chunk_id, set()).add(key)
        while len(self._where) > MAX_KNOWN:
            gone, gone_ref = self._where.popitem(last=False)
            self._by_chunk.get(gone_ref.chunk_id, set()).discard(gone)

    # -- the secondary-tier interface ----------------------------------------------
    def locate(self, key: BlockKey) -> tuple[str, int] | None:
        ref = self._where.get(key)
        return (ref.chunk_id, ref.index) if ref is not None else None

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._where or key in self._writing

    def plan_write(self, keys: Sequence[BlockKey]) -> tuple[list[tuple[str, list[int]]], int]:
        """One job for the run's blocks the store is not known to hold (the store cuts
        it into chunks); (jobs, blocks dropped) as DiskTier.plan_write answers."""
        new = [i for i, key in enumerate(keys) if key not in self]
        if not new:
            return [], 0
        job_id = "r" + secrets.token_hex(8)
        self._writes[job_id] = tuple(keys[i] for i in new)
        self._writing.update(self._writes[job_id])
        return [(job_id, new)], 0

    def commit(self, job_id: str) -> None:
        keys = self._writes.pop(job_id, ())
        self._writing.difference_update(keys)
        for s, e in chunk_ranges(len(keys), self.block_bytes, self.store.max_chunk_bytes):
            cid = chunk_id(keys[s:e])
            for i in range(s, e):
                self._remember(keys[i], ChunkRef(cid, i - s))

    def abort(self, job_id: str) -> None:
        self._writing.difference_update(self._writes.pop(job_id, ()))

    def object_keys(self, job_id: str) -> tuple[BlockKey, ...]:
        return self._writes.get(job_id, ())

    def discard(self, object_id: str, corrupt: bool = False, delete: bool = True) -> int:
        """A chunk that failed to load (evicted by the store, or deleted as corrupt)."""
        keys = self._by_chunk.pop(object_id, set())
        for key in keys:
            ref = self._where.get(key)
            if ref is not None and ref.chunk_id == object_id:
                del self._where[key]
        self.evictions += len(keys)
        return len(keys)

    def pin(self, object_ids: Sequence[str]) -> None:
        pass  # the store evicts on its own; a vanished chunk is a failed promotion

    unpin = touch = pin

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

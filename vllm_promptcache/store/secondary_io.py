"""What every tier below host RAM does on a worker, written once.

A secondary tier (disk, a remote store) moves bytes off vLLM's step, on its own
threads: it writes staged blocks (write-through of a finished request) and reads
blocks into host-buffer slots (a promotion).  Each outcome is an event, (kind, id,
ok), that the connector forwards to the scheduler side, which owns the tier's
index and waits for every rank's event.  Objects found corrupt (deleted) or gone
are reported too, so the index forgets them.  Staged bytes are bounded: past the
bound a write is dropped (a future miss only), with one warning a minute.

A tier implements `write(job_id, keys, staging)`, `_start_promotion(promo_id,
object_id, indices, slots, buffer, keys)` (reporting through `_promotion_done`) and
`shutdown()`; `disk_io.DiskIO` and
`remote_io.RemoteIO` are the two there are.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

from .host_buffer import HostBuffer, StagingPool

logger = logging.getLogger("vllm.promptcache")

WARN_EVERY_SECONDS = 60.0
WRITE = "write"
PROMOTE = "promote"


class RateLimitedWarning:
    """One warning per interval for a recurring condition (a full disk, a store down)."""

    def __init__(self, interval: float):
        self.interval = interval
        self._last = -float("inf")
        self.suppressed = 0

    def __call__(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            if self.suppressed:
                msg += f" ({self.suppressed} more since the last warning)"
            logger.warning(msg, *args)
            self._last, self.suppressed = now, 0
        else:
            self.suppressed += 1


class SecondaryIO:
    name = "secondary"

    def __init__(self, block_bytes: int, max_staged_bytes: int):
        self.block_bytes = block_bytes
        self.max_staged_bytes = max_staged_bytes
        self._events: queue.SimpleQueue[tuple[str, str, bool]] = queue.SimpleQueue()
        self._corrupt: set[str] = set()
        self._gone: set[str] = set()
        self._corrupt_lock = threading.Lock()
        self._staged_bytes = 0
        self._warn_dropped = RateLimitedWarning(WARN_EVERY_SECONDS)
        self._moved = {"written": 0, "read": 0}
        self._moved_lock = threading.Lock()
        self._reading = 0  # promotions started and not reported yet
        self._reading_cv = threading.Condition()
        self._writes_ended = 0  # writes finished (or dropped after staging) so far
        # Guards _staged_bytes and _writes_ended; notified when a write ends.
        self._writes_cv = threading.Condition()
        self._watched: dict[str, bool | None] = {}  # promotion -> its outcome, once known

    # -- writes ----------------------------------------------------------------
    def try_stage(self, num_blocks: int) -> bool:
        """Claim staging memory for a write; False (drop the write) when too much is queued."""
        need = num_blocks * self.block_bytes
        with self._writes_cv:
            if self._staged_bytes + need > self.max_staged_bytes:
                return False
            self._staged_bytes += need
            return True

    def unstage(self, num_blocks: int) -> None:
        with self._writes_cv:
            self._staged_bytes -= num_blocks * self.block_bytes
            self._writes_ended += 1
            self._writes_cv.notify_all()

    def writes_in_flight(self) -> bool:
        with self._writes_cv:
            return self._staged_bytes > 0

    def wait_for_a_write(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` until a write in flight ends (or none is left).  An idle engine step calls it: the engine
        keeps stepping while writes drain (their reports come with a step), and one
        step per ended write is enough, where returning at once made an idle engine
        step about a thousand times a second through a slow store's writes."""
        with self._writes_cv:
            ended = self._writes_ended
            self._writes_cv.wait_for(
                lambda: self._staged_bytes <= 0 or self._writes_ended != ended,
                max(0.0, timeout_s))

    def drop_write(self, job_id: str, why: str) -> None:
        self._warn_dropped("promptcache: %s tier dropped a save (%s); serving goes on",
                           self.name, why)
        self._events.put((WRITE, job_id, False))

    @contextmanager
    def stage(self, job_id: str, num_blocks: int,
              pool: StagingPool) -> Iterator[HostBuffer | None]:
        """Staging memory for one write, for the body to copy its blocks into: claims the
        bound and leases `num_blocks` slots of `pool`.  Yields the lease, or None where
        the write is dropped (too many writes queued, the pool full).  If the body
        raises, both go back and the write is dropped (the error propagates); else the
        lease is the caller's, for `write`, which gives both back when the write ends."""
        if not self.try_stage(num_blocks):
            self.drop_write(job_id, "too many writes queued")
            yield None
            return
        lease = pool.lease(num_blocks)
        if lease is None:
            self.unstage(num_blocks)
            self.drop_write(job_id, "the staging pool is full")
            yield None
            return
        try:
            yield lease
        except BaseException:
            lease.release()
            self.unstage(num_blocks)
            self.drop_write(job_id, "staging failed")
            raise

    def write(self, job_id: str, keys: Sequence[bytes], staging: HostBuffer) -> None:
        raise NotImplementedError

    def _finish_write(self, job_id: str, num_blocks: int, staging: HostBuffer, ok: bool) -> None:
        release = getattr(staging, "release", None)
        if release is not None:  # a lease from the worker's staging pool
            release()
        # The event first: a step waiting for this write (wait_for_a_write) reports it.
        self._events.put((WRITE, job_id, ok))
        self.unstage(num_blocks)

    # -- reports ---------------------------------------------------------------
    def _count(self, what: str, nbytes: int) -> None:
        with self._moved_lock:
            self._moved[what] += nbytes

    def _report_object(self, object_id: str, corrupt: bool = False, gone: bool = False) -> None:
        with self._corrupt_lock:
            if corrupt:
                self._corrupt.add(object_id)
            elif gone:
                self._gone.add(object_id)

    def take_byte_counts(self) -> tuple[int, int]:
        """(bytes written, bytes read) since the last call."""
        with self._moved_lock:
            out = self._moved["written"], self._moved["read"]
            self._moved = {"written": 0, "read": 0}
        return out

    # -- reads (promotions) --------------------------------------------------------
    def promote(self, promo_id: str, object_id: str, indices: Sequence[int],
                slots: Sequence[int], buffer: HostBuffer, keys: Sequence[bytes],
                watch: bool = False) -> None:
        """Read blocks `indices` of object `object_id` into host slots `slots`, in the
        background; `keys[i]` is what block `indices[i]` must hold.  Reported once, as a
        (PROMOTE, promo_id, ok, seconds) event; with `watch`, `wait_promotion` also
        tells its outcome."""
        with self._reading_cv:
            self._reading += 1
            if watch:
                self._watched[promo_id] = None
        try:
            self._start_promotion(promo_id, object_id, indices, slots, buffer, keys)
        except Exception:
            logger.exception("promptcache: starting a read from the %s tier failed", self.name)
            self._promotion_done(promo_id, False, 0.0)

    def _start_promotion(self, promo_id: str, object_id: str, indices: Sequence[int],
                         slots: Sequence[int], buffer: HostBuffer,
                         keys: Sequence[bytes]) -> None:
        raise NotImplementedError

    def _promotion_done(self, promo_id: str, ok: bool, seconds: float) -> None:
        self._events.put((PROMOTE, promo_id, ok, seconds))
        with self._reading_cv:
            self._reading -= 1
            if promo_id in self._watched:
                self._watched[promo_id] = ok
            self._reading_cv.notify_all()

    def wait_promotion(self, promo_id: str, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a watched promotion: True if its read landed whole.
        Past the timeout it counts as failed here (its event still comes later)."""
        with self._reading_cv:
            self._reading_cv.wait_for(lambda: self._watched.get(promo_id) is not None,
                                      max(0.0, timeout_s))
            return bool(self._watched.pop(promo_id, False))

    def wait_reads(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every promotion started to be reported; True if
        none is left."""
        with self._reading_cv:
            return self._reading_cv.wait_for(lambda: self._reading <= 0, max(0.0, timeout_s))

    def take_counts(self) -> dict[str, float]:
        """Tier-specific counters since the last call (a remote store's)."""
        return {}

    def take_events(self) -> tuple[list[tuple[str, str, bool]], set[str], set[str]]:
        """(finished jobs, objects found corrupt (deleted), objects found missing) since
        the last call; an object is in its set before its job's event is queued."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        with self._corrupt_lock:
            corrupt, self._corrupt = self._corrupt, set()
            gone, self._gone = self._gone, set()
        return events, corrupt, gone

    def shutdown(self) -> None:
        pass

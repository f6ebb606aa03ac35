"""The remote tier's bytes, on each worker: writes staged blocks into the shared store
and reads chunks of it into host-buffer slots.

Runs off vLLM's step on a small thread pool; `RemoteStore` bounds every network
call by its timeouts and never raises on a network fault, so a slow or dead store
means dropped saves and failed promotions (reported, counted), never a stalled
step.  Each rank writes and reads its own shard of every block; the scheduler side
waits for every rank's event.  A value that fails its checks was deleted by the
store and is reported gone, so the index forgets it.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy

from ..background_threads import BackgroundPool
from .host_buffer import HostBuffer
from .remote_store import ChunkRef, RemoteStore
from .secondary_io import SecondaryIO

logger = logging.getLogger("vllm.promptcache")

IO_THREADS = 2


class RemoteIO(SecondaryIO):
    name = "remote"

    def __init__(self, store: RemoteStore, block_bytes: int, max_staged_bytes: int):
        super().__init__(block_bytes, max_staged_bytes)
        self.store = store
        self._pool = BackgroundPool(IO_THREADS, thread_name_prefix="promptcache-remote")

    def write(self, job_id: str, keys: Sequence[bytes], staging: HostBuffer) -> None:
        self._pool.submit(self._write, job_id, tuple(keys), staging)

    def _write(self, job_id: str, keys: tuple[bytes, ...], staging: HostBuffer) -> None:
        ok = False
        try:
            rows = [staging.data[i].numpy() for i in range(len(keys))]
            ok = self.store.put_chunks(keys, rows)
            if ok:
                self._count("written", len(keys) * self.block_bytes)
        except Exception:
            logger.exception("promptcache: writing %d blocks to the remote tier failed", len(keys))
        finally:
            self._finish_write(job_id, len(keys), staging, ok)

    def _start_promotion(self, promo_id: str, object_id: str, indices: Sequence[int],
                         slots: Sequence[int], buffer: HostBuffer,
                         keys: Sequence[bytes]) -> None:
        self._pool.submit(self._promote, promo_id, object_id, list(indices), list(slots),
                          buffer, list(keys), time.monotonic())

    def _promote(self, promo_id: str, chunk: str, indices: list[int], slots: list[int],
                 buffer: HostBuffer, keys: list[bytes], started: float) -> None:
        ok = False
        try:
            blocks = self.store.get_blocks(keys, [ChunkRef(chunk, i) for i in indices])
            if all(b is not None for b in blocks):
                for block, slot in zip(blocks, slots):
                    buffer.data[slot].numpy()[:] = numpy.frombuffer(block, dtype=numpy.uint8)
                self._count("read", len(blocks) * self.block_bytes)
                ok = True
            else:  # evicted by the store, another rank's shard missing, or deleted as corrupt
                self._report_object(chunk, gone=True)
        except Exception:
            logger.exception("promptcache: reading remote chunk %s failed", chunk)
        self._promotion_done(promo_id, ok, time.monotonic() - started)

    def take_counts(self) -> dict[str, float]:
        return self.store.take_counts()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()

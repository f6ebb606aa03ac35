"""The disk tier's bytes, on each worker: writes staged KV blocks into files and
reads file blocks into host-buffer slots.

Runs in the worker process, off vLLM's step: one writer thread (large sequential
writes, tmp + fsync + rename through `disk_format`) and a pool of reader threads
(one aligned `pread` per block, in parallel).  Every outcome is reported as an
event, (kind, id, ok), that the connector forwards to the scheduler side, which
owns the index (`DiskTier`).  A block that fails its checksum deletes its file
and is reported, so it is never served.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Sequence

import torch

from . import disk_format as fmt
from ..background_threads import BackgroundPool
from .host_buffer import HostBuffer
from .secondary_io import (PROMOTE, WARN_EVERY_SECONDS, WRITE,  # noqa: F401 - the event kinds
                           RateLimitedWarning, SecondaryIO)

logger = logging.getLogger("vllm.promptcache")

READ_THREADS = 4


class _Promotion:
    def __init__(self, remaining: int):
        self.remaining = remaining
        self.ok = True
        self.corrupt = False
        self.gone = False
        self.lock = threading.Lock()
        self.started = time.monotonic()  # the read's own time is reported with it


class DiskIO(SecondaryIO):
    name = "disk"

    def __init__(self, directory: str, fingerprint: str, rank: int, world: int,
                 layout: Sequence[tuple[str, int]], max_staged_bytes: int, secret: bytes,
                 kv_layout: str = ""):
        self.kv_layout = kv_layout  # ModelFingerprint.kv_layout, written in every header
        self.layout = tuple((str(n), int(b)) for n, b in layout)
        super().__init__(sum(b for _, b in self.layout), max_staged_bytes)
        self.directory = directory
        self.secret = secret
        self.fingerprint = fingerprint
        self.rank = rank
        self.world = world
        self._writer = BackgroundPool(1, thread_name_prefix="promptcache-disk-write")
        self._readers = BackgroundPool(READ_THREADS, thread_name_prefix="promptcache-disk-read")
        self._warn_full = RateLimitedWarning(WARN_EVERY_SECONDS)
        self._rejected = 0  # files whose header passed its checksum but not its checks

    def path(self, file_id: str) -> str:
        return os.path.join(self.directory, fmt.file_name(file_id, self.rank))

    # -- writes ----------------------------------------------------------------
    def write(self, file_id: str, keys: Sequence[bytes], staging: HostBuffer) -> None:
        """Queue the staged blocks (claimed with try_stage) for writing as one file."""
        self._writer.submit(self._write, file_id, tuple(keys), staging)

    def _write(self, file_id: str, keys: tuple[bytes, ...], staging: HostBuffer) -> None:
        ok = False
        try:
            rows = [staging.data[i].numpy() for i in range(len(keys))]
            header = fmt.FileHeader(self.fingerprint, self.rank, self.world, self.layout,
                                    self.block_bytes, keys,
                                    tuple(fmt.checksum(r, self.secret) for r in rows),
                                    kv_layout=self.kv_layout)
            self._count("written", fmt.write_file(self.path(file_id), header, rows, self.secret))
            ok = True
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._warn_full("promptcache: disk tier is full (%s); dropping saves", self.directory)
            else:
                logger.warning("promptcache: writing disk file %s failed: %s", file_id, e)
        except Exception:
            logger.exception("promptcache: writing disk file %s failed", file_id)
        finally:
            self._finish_write(file_id, len(keys), staging, ok)

    # -- reads -----------------------------------------------------------------
    def _start_promotion(self, promo_id: str, file_id: str, indices: Sequence[int],
                         slots: Sequence[int], buffer: HostBuffer,
                         keys: Sequence[bytes]) -> None:
        """Read blocks `indices` of a file into host slots, in parallel; report when all
        are in.  `keys[i]` is what the index says block `indices[i]` holds: the header
        must agree, or the block is not served."""
        if not indices:
            self._promotion_done(promo_id, True, 0.0)
            return
        state = _Promotion(len(indices))
        for index, slot, key in zip(indices, slots, keys):
            self._readers.submit(self._read_one, promo_id, file_id, index,
                                 buffer.data[slot], state, key)

    def _read_one(self, promo_id: str, file_id: str, index: int, row: torch.Tensor,
                  state: _Promotion, key: bytes) -> None:
        path = self.path(file_id)
        ok, corrupt, gone = False, False, False
        try:
            with state.lock:
                skip = not state.ok
            if not skip:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    fmt.check_owner(fd, path)
                    header = self._read_header_fd(fd, path)
                    self._check_header(header, index, key, path)
                    fmt.read_block_into(fd, header, index, memoryview(row.numpy()), path,
                                        self.secret)
                finally:
                    os.close(fd)
                self._count("read", self.block_bytes)
                ok = True
        except fmt.CorruptFile as e:
            corrupt = True
            if isinstance(e, fmt.RejectedHeader):
                with self._moved_lock:
                    self._rejected += 1
            logger.warning("promptcache: corrupt disk block, deleting the file: %s", e)
        except fmt.ForeignFile as e:
            gone = True  # unindexed, never served, and not ours to delete
            logger.warning("promptcache: refusing a disk file: %s", e)
        except FileNotFoundError:
            gone = True
            logger.info("promptcache: disk file %s is gone (evicted by another engine?)", path)
        except Exception:
            logger.exception("promptcache: reading %s block %d failed", path, index)
        with state.lock:
            state.ok = state.ok and ok
            state.corrupt |= corrupt
            state.gone |= gone
            state.remaining -= 1
            last = state.remaining == 0
        if last:
            if state.corrupt:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            self._report_object(file_id, corrupt=state.corrupt, gone=state.gone)
            self._promotion_done(promo_id, state.ok, time.monotonic() - state.started)

    def _check_header(self, header: fmt.FileHeader, index: int, key: bytes, path: str) -> None:
        """The file must be this model's, this rank's, and hold `key` at `index`."""
        if header.fingerprint != self.fingerprint:
            raise fmt.CorruptFile(f"{path}: model fingerprint {header.fingerprint}, expected "
                                  f"{self.fingerprint}")
        if (header.rank, header.world) != (self.rank, self.world):
            raise fmt.CorruptFile(f"{path}: rank {header.rank}/{header.world}, expected "
                                  f"{self.rank}/{self.world}")
        if header.layout != self.layout or header.block_bytes != self.block_bytes or (
                self.kv_layout and header.kv_layout != self.kv_layout):
            raise fmt.RejectedHeader(f"{path}: another KV layout")
        if index >= header.num_blocks or header.keys[index] != key:
            raise fmt.CorruptFile(f"{path}: block {index} does not hold the key the index "
                                  f"names")

    def take_counts(self) -> dict[str, float]:
        """rejected: files whose header passed its checksum but not its checks."""
        with self._moved_lock:
            rejected, self._rejected = self._rejected, 0
        return {"rejected": rejected} if rejected else {}

    def _read_header_fd(self, fd: int, path: str) -> fmt.FileHeader:
        data = os.pread(fd, fmt.ALIGN, 0)
        try:
            return fmt.FileHeader.decode(data, path, self.secret)
        except fmt.CorruptFile:
            # A header longer than one page: read exactly what it says it needs.
            if len(data) < fmt.ALIGN:
                raise
            return fmt.read_header(path, self.secret)

    def shutdown(self) -> None:
        # Writes finish (files are durable before the engine exits); reads are dropped.
        self._readers.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True)


"""The disk tier's index: which block key lies in which file, bounded by a byte cap.

Lives on the scheduler side, like `HostTier`; the workers read and write the
files (`disk_format`).  A file is PENDING while a worker writes it (not
servable, not evictable) and READY once every rank reported it durable.  Pinned
files (being read into host) are not evicted.  Eviction deletes whole files, in
the order the policy gives.  `scan` rebuilds the index after a restart from the
files' headers alone.

An engine evicts only what it owns: its own fingerprint's directory.  Other
fingerprints' directories under the same root (another model served from the same
host, the same model on another backend, an older KV format) are neither counted
nor deleted, unless the operator asks for it (`reclaim_others=True`): then their
files count against this tier's cap and are evicted first, so they age out.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from . import disk_format as fmt
from .keys import BlockKey
from .policies import EvictionPolicy, urgency_reader

logger = logging.getLogger("vllm.promptcache")

# A temporary or incomplete file older than this is a crashed writer's leftover.
STALE_SECONDS = 600.0
# Disk files hold at most this many bytes per rank (several blocks of one request).
DISK_FILE_BYTES = 64 << 20


class DiskTierError(RuntimeError):
    pass


class FileState(enum.Enum):
    PENDING = 1
    READY = 2


@dataclass
class _DiskFile:
    keys: tuple[BlockKey, ...]
    nbytes: int  # all ranks together
    state: FileState
    # Files of another model fingerprint (or format) under the same root, where the
    # operator asked to reclaim them: never served, counted against the cap and
    # evicted first, so they age out.
    stale_paths: tuple[str, ...] = ()


def prepare_directory(path: str) -> str:
    """Create `path` (0700) and prove it writable, or raise a clear DiskTierError."""
    try:
        fmt.private_directory(path)
        probe = os.path.join(path, f".probe-{fmt.new_file_id()}{fmt.TMP_SUFFIX}")
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.unlink(probe)
    except fmt.SecretError as e:
        raise DiskTierError(f"the promptcache disk directory is not private: {e}") from None
    except OSError as e:
        raise DiskTierError(
            f"the promptcache disk directory {path} is not writable ({e.strerror or e}); "
            f"pass another --promptcache-disk-path, or --promptcache-disk-gb 0 to turn "
            f"the disk tier off") from None
    return path


class DiskTier:
    name = "disk"

    def __init__(self, directory: str, capacity_bytes: int, world: int, policy: EvictionPolicy,
                 queued: Counter[BlockKey] | None = None, secret: bytes = b"",
                 block_bytes: int = 0, layout: tuple[tuple[str, int], ...] = (),
                 reclaim_others: bool = False, kv_layout: str = ""):
        self.directory = directory
        self.kv_layout = kv_layout  # ModelFingerprint.kv_layout, as the workers write it
        # Other fingerprints' files under this root are another engine's: only an
        # operator's explicit request lets this tier evict them.
        self.reclaim_others = reclaim_others
        self.secret = secret
        self.block_bytes = block_bytes  # per rank, for planning writes
        self.layout = tuple(layout)
        self.capacity_bytes = capacity_bytes
        self.world = world
        self._file_bytes: dict[int, int] = {}  # block count -> file_bytes (a few counts)
        self._policy = policy
        self._queued = queued if queued is not None else Counter()
        self._urgency = urgency_reader(self._queued)
        self._lock = threading.RLock()
        self._files: dict[str, _DiskFile] = {}
        self._where: dict[BlockKey, tuple[str, int]] = {}
        self._pending: dict[BlockKey, str] = {}
        self._pins: Counter[str] = Counter()
        self._bytes = 0
        self.evictions = 0        # blocks
        self.corrupt_blocks = 0   # blocks dropped for a bad header or checksum
        # Files whose header passed its checksum but not its checks (another format
        # version, a field wrong in type or range): skipped, logged, counted here.
        self.rejected_files = 0

    # -- queries ---------------------------------------------------------------
    def locate(self, key: BlockKey) -> tuple[str, int] | None:
        """(file id, index in file) of a READY copy of `key`."""
        with self._lock:
            return self._where.get(key)

    def is_pending(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._pending

    def __contains__(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._where or key in self._pending

    def file_keys(self, file_id: str) -> tuple[BlockKey, ...]:
        with self._lock:
            f = self._files.get(file_id)
            return f.keys if f else ()

    @property
    def bytes_in_use(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def num_files(self) -> int:
        with self._lock:
            return len(self._files)

    def path(self, file_id: str, rank: int = 0) -> str:
        return os.path.join(self.directory, fmt.file_name(file_id, rank))

    # -- writes ----------------------------------------------------------------
    def reserve(self, file_id: str, keys: Sequence[BlockKey], nbytes: int) -> bool:
        """Make room for a new file of `nbytes` (all ranks) and mark its keys PENDING."""
        with self._lock:
            if nbytes > self.capacity_bytes:
                return False
            while self._bytes + nbytes > self.capacity_bytes:
                if not self._evict_one():
                    return False
            self._files[file_id] = _DiskFile(tuple(keys), nbytes, FileState.PENDING)
            for key in keys:
                self._pending[key] = file_id
            self._bytes += nbytes
            return True

    def plan_write(self, keys: Sequence[BlockKey]) -> tuple[list[tuple[str, list[int]]], int]:
        """Files for the run's blocks not on disk yet, each reserved under the cap:
        ([(file id, indices into keys)], blocks dropped for want of room)."""
        new = [i for i, key in enumerate(keys) if key not in self]
        per_file = max(1, DISK_FILE_BYTES // fmt.align_up(self.block_bytes))
        planned = []
        for lo in range(0, len(new), per_file):
            idx = new[lo:lo + per_file]
            file_id = fmt.new_file_id()
            if not self.reserve(file_id, [keys[i] for i in idx], self.file_bytes(len(idx))):
                return planned, len(new) - lo
            planned.append((file_id, idx))
        return planned, 0

    def file_bytes(self, num_blocks: int) -> int:
        """Bytes of one file of `num_blocks` blocks on every rank, for the cap (its
        header's size depends only on the block count: hex fields of fixed length)."""
        known = self._file_bytes.get(num_blocks)
        if known is None:
            known = self._file_bytes[num_blocks] = self._measure_file_bytes(num_blocks)
        return known

    def _measure_file_bytes(self, num_blocks: int) -> int:
        header = fmt.FileHeader("0" * 32, self.world - 1, self.world, self.layout,
                                self.block_bytes, (b"\0" * 16,) * num_blocks,
                                (b"\0" * fmt.CHECKSUM_BYTES,) * num_blocks,
                                kv_layout=self.kv_layout)
        one = len(header.encode(b"\0" * fmt.SECRET_BYTES)) + num_blocks * fmt.align_up(self.block_bytes)
        return one * self.world

    def object_keys(self, file_id: str) -> tuple[BlockKey, ...]:
        return self.file_keys(file_id)

    def commit(self, file_id: str) -> None:
        """Every rank wrote its file: the keys become servable."""
        with self._lock:
            f = self._files.get(file_id)
            if f is None or f.state is not FileState.PENDING:
                return
            f.state = FileState.READY
            for i, key in enumerate(f.keys):
                if self._pending.get(key) == file_id:
                    del self._pending[key]
                self._where.setdefault(key, (file_id, i))
            self._policy.inserted(file_id)

    def abort(self, file_id: str) -> None:
        """A write failed on some rank: forget the file and delete what was written."""
        self.discard(file_id)

    def discard(self, file_id: str, corrupt: bool = False, delete: bool = True) -> int:
        """Drop a file from the index and (unless not `delete`: a read failed for a
        reason that says nothing about the file) delete it on every rank; returns its
        block count."""
        with self._lock:
            f = self._files.pop(file_id, None)
            if f is None:
                return 0
            for i, key in enumerate(f.keys):
                if self._where.get(key) == (file_id, i):
                    del self._where[key]
                if self._pending.get(key) == file_id:
                    del self._pending[key]
            if f.state is FileState.READY:
                self._policy.removed(file_id)
            self._pins.pop(file_id, None)
            self._bytes -= f.nbytes
            if corrupt:
                self.corrupt_blocks += len(f.keys)
        if f.stale_paths:
            for path in f.stale_paths:
                _unlink(path)
            _remove_if_empty(os.path.dirname(f.stale_paths[0]))
            return 0
        if delete:
            for rank in range(self.world):
                _unlink(self.path(file_id, rank))
        return len(f.keys)

    def touch(self, file_ids: Sequence[str]) -> None:
        with self._lock:
            for file_id in file_ids:
                if file_id in self._files:
                    self._policy.accessed(file_id)

    def pin(self, file_ids: Sequence[str]) -> None:
        with self._lock:
            self._pins.update(file_ids)

    def unpin(self, file_ids: Sequence[str]) -> None:
        with self._lock:
            self._pins.subtract(file_ids)
            for f in file_ids:
                if self._pins[f] <= 0:
                    del self._pins[f]

    # -- restart ---------------------------------------------------------------
    def scan(self, accept: Callable[[fmt.FileHeader], str | None]) -> tuple[int, int]:
        """Index the READY files already in the directory, oldest first.

        Reads headers only.  `accept(header)` returns None for a file this engine
        can serve, or why not (another model, another layout).  Corrupt files
        are deleted; temporary files and incomplete rank sets older than
        STALE_SECONDS (crashed writers) are deleted.  Returns (files, blocks).
        """
        now = time.time()
        ranks: dict[str, dict[int, float]] = {}
        for entry in os.scandir(self.directory):
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if entry.name.endswith(fmt.TMP_SUFFIX):
                if now - mtime > STALE_SECONDS:
                    _unlink(entry.path)
                continue
            parsed = fmt.parse_file_name(entry.name)
            if parsed is not None:
                ranks.setdefault(parsed[0], {})[parsed[1]] = mtime
        found = []
        for file_id, seen in ranks.items():
            if set(seen) != set(range(self.world)):
                if now - max(seen.values()) > STALE_SECONDS:
                    for rank in seen:
                        _unlink(self.path(file_id, rank))
                continue
            entry = self._check_file(file_id, accept)
            if entry is not None:
                found.append((min(seen.values()), file_id, entry))
        found.sort(key=lambda x: x[0])
        with self._lock:
            # Other fingerprints' files first: the policy then evicts them first.
            for mtime, paths, nbytes in (self._stale_files() if self.reclaim_others else ()):
                file_id = f"stale:{paths[0]}"
                self._files[file_id] = _DiskFile((), nbytes, FileState.PENDING, tuple(paths))
                self._bytes += nbytes
                self.commit(file_id)
            for _, file_id, (keys, nbytes) in found:
                if file_id in self._files:
                    continue
                self._files[file_id] = _DiskFile(keys, nbytes, FileState.PENDING)
                self._bytes += nbytes
                self.commit(file_id)
            while self._bytes > self.capacity_bytes and self._evict_one():
                pass
            return sum(1 for f in self._files.values() if not f.stale_paths), len(self._where)

    @property
    def stale_bytes(self) -> int:
        """Bytes of other fingerprints' files still counted against the cap (0 unless
        `reclaim_others`)."""
        with self._lock:
            return sum(f.nbytes for f in self._files.values() if f.stale_paths)

    def _stale_files(self) -> list[tuple[float, list[str], int]]:
        """(mtime, paths, bytes) of the KV files in sibling directories of this one
        (other model fingerprints under the same root), oldest first."""
        root = os.path.dirname(self.directory)
        out = []
        try:
            siblings = [e for e in os.scandir(root)
                        if e.is_dir(follow_symlinks=False) and e.path != self.directory
                        and _is_fingerprint_dir(e.name)]
        except OSError:
            return out
        for sibling in siblings:
            groups: dict[str, list[os.DirEntry]] = {}
            try:
                entries = list(os.scandir(sibling.path))
            except OSError:
                continue
            for entry in entries:
                parsed = fmt.parse_file_name(entry.name)
                if parsed is not None and entry.is_file(follow_symlinks=False):
                    groups.setdefault(parsed[0], []).append(entry)
            for group in groups.values():
                try:
                    stats = [e.stat(follow_symlinks=False) for e in group]
                except FileNotFoundError:
                    continue
                if any(st.st_uid != os.getuid() for st in stats):
                    continue  # not ours: neither counted nor deleted
                out.append((min(st.st_mtime for st in stats), [e.path for e in group],
                            sum(st.st_size for st in stats)))
        out.sort(key=lambda x: x[0])
        return out

    def _check_file(self, file_id: str, accept) -> tuple[tuple[BlockKey, ...], int] | None:
        keys, nbytes = None, 0
        for rank in range(self.world):
            path = self.path(file_id, rank)
            try:
                header = fmt.read_header(path, self.secret)
            except FileNotFoundError:
                return None
            except fmt.ForeignFile as e:
                logger.warning("promptcache: ignoring a disk file: %s", e)
                return None
            except fmt.RejectedHeader as e:
                logger.warning("promptcache: skipping a disk file: %s", e)
                with self._lock:
                    self.rejected_files += 1
                if not isinstance(e, fmt.OldFormat):
                    self._drop_files(file_id, max(len(keys or ()), 1))
                return None
            except (fmt.CorruptFile, OSError) as e:
                logger.warning("promptcache: dropping corrupt disk file: %s", e)
                self._drop_files(file_id, max(len(keys or ()), 1))
                return None
            why = accept(header)
            if why is None and self.kv_layout and header.kv_layout != self.kv_layout:
                why = f"KV layout {header.kv_layout!r}, this engine's is {self.kv_layout!r}"
            if why is None and (header.rank != rank or header.world != self.world):
                why = f"rank {header.rank}/{header.world} in a file named for {rank}/{self.world}"
            if why is None and keys is not None and header.keys != keys:
                why = "ranks disagree on the keys"
            if why is not None:
                logger.warning("promptcache: ignoring disk file %s: %s", path, why)
                return None
            keys = header.keys
            nbytes += header.file_bytes
        return keys, nbytes

    def _drop_files(self, file_id: str, blocks: int) -> None:
        for rank in range(self.world):
            _unlink(self.path(file_id, rank))
        with self._lock:
            self.corrupt_blocks += blocks

    # -- internals -------------------------------------------------------------
    def _evictable(self, file_id: str) -> bool:
        f = self._files.get(file_id)
        return f is not None and f.state is FileState.READY and not self._pins.get(file_id)

    def _is_queued(self, file_id: str) -> int:
        """How soon a waiting request (or live head) reads a block of the file: its most
        urgent key's urgency, 0 for never (a `queued` without urgencies: 1 for any)."""
        f = self._files.get(file_id)
        return 0 if f is None else max(map(self._urgency, f.keys), default=0)

    def _evict_one(self) -> bool:
        victim = self._policy.victim(self._evictable, self._is_queued)
        if victim is None:
            return False
        self.evictions += self.discard(victim)
        return True


def _is_fingerprint_dir(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

"""The disk tier's file format: one file holds a run of KV blocks of one worker.

Layout (all offsets 4 KiB-aligned, so reads and writes are large and aligned):

    [prefix][header JSON][header checksum] ...padding to 4 KiB...
    [block 0][pad to 4 KiB][block 1][pad] ...

- prefix: magic, format version, JSON length (struct `_PREFIX`);
- the JSON names the model fingerprint, the KV layout it implies (device,
  backend, block layout: `ModelFingerprint.kv_layout`), the worker's rank and
  world size, the per-layer layout, the block size in bytes, every block's key
  and every block's blake3 checksum;
- the header checksum is blake3 over prefix + JSON.  It covers the block
  checksums, so header and payload are both checked, and one block can be read
  and verified without reading the rest of the file.

Every checksum is blake3 in keyed mode, keyed with the directory's secret
(`disk_secret`: 32 random bytes in a 0600 file, created on first use).  A file
that someone without the secret wrote -- even a well-formed one, with the right
model fingerprint and keys -- fails its header checksum and is never served.
Files are created 0600 in 0700 directories, and a file owned by another user is
refused before its header is read (`ForeignFile`).

A file is untrusted input even when its checksum holds (another version, a bug, a
holder of the secret): every header field is checked in type and range before a
`FileHeader` exists, and anything wrong is a `RejectedHeader` (a `CorruptFile`),
never another exception.

A file is written under a temporary name, fsynced, then renamed into place, so a
crash leaves either a whole file or a `*.tmp` that is never indexed.  Names are
unique per writer (time, pid, random), so engines sharing a directory never write
the same file; a file never changes after the rename.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Sequence

from blake3 import blake3

from .untrusted import BadValue, field, hex_list, int_field, is_int, json_object

MAGIC = b"VPCKVBLK"
# 2: checksums keyed with the directory secret.  3: the header names the KV layout.
# Part of the model fingerprint (store/keys.py), so files of another format sit in
# another directory and are never even looked at; one found here is rejected.
FORMAT_VERSION = 3
SECRET_NAME = ".promptcache-secret"
SECRET_BYTES = 32
ALIGN = 4096
SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
CHECKSUM_BYTES = 32
_PREFIX = struct.Struct("<8sII")  # magic, version, JSON length
_MAX_HEADER_BYTES = 64 << 20
KEY_BYTES = 16
_MAX_WORLD = 1 << 16
_MAX_BLOCK_BYTES = 1 << 40
_FINGERPRINT_CHARS = frozenset("0123456789abcdef")


class CorruptFile(Exception):
    """A file whose header or a block does not match its checksum or format."""


class RejectedHeader(CorruptFile):
    """A header whose checksum holds but whose format version or a field is wrong
    (type or range): skipped and counted as a rejected store entry."""


class OldFormat(RejectedHeader):
    """A file of another format version: skipped and counted, not deleted (it may be
    another version's engine's)."""


class ForeignFile(Exception):
    """A file owned by another user: never served, never deleted by us."""


class SecretError(RuntimeError):
    """The directory secret cannot be created or is not private."""


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def checksum(data, secret: bytes) -> bytes:
    """blake3 keyed with the directory secret: only its holders make valid files."""
    return blake3(data, key=secret).digest()


def private_directory(path: str) -> str:
    """Create `path` (and missing parents) 0700; an existing directory of ours is
    tightened to 0700, one owned by another user is refused."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise SecretError(f"{path} belongs to uid {st.st_uid}, not to this user "
                          f"({os.getuid()}); the prompt cache keeps its KV private")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def disk_secret(root: str) -> bytes:
    """The per-directory key of every checksum under `root`, created 0600 on first
    use (atomically: concurrent first users agree on one)."""
    private_directory(root)
    path = os.path.join(root, SECRET_NAME)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            tmp = f"{path}.{secrets.token_hex(4)}{TMP_SUFFIX}"
            wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(wfd, secrets.token_bytes(SECRET_BYTES))
                os.fsync(wfd)
            finally:
                os.close(wfd)
            try:
                os.link(tmp, path)  # fails if another process won the race: use theirs
            except FileExistsError:
                pass
            finally:
                _unlink(tmp)
            continue
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise SecretError(
                    f"{path} must belong to this user and be readable by it alone (mode "
                    f"0600); found uid {st.st_uid}, mode {st.st_mode & 0o777:o}")
            data = os.read(fd, SECRET_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) != SECRET_BYTES:
            raise SecretError(f"{path} holds {len(data)} bytes, expected {SECRET_BYTES}; "
                              f"remove it to start the disk tier afresh")
        return data
    raise SecretError(f"cannot create {path}")


def check_owner(fd: int, where: str) -> os.stat_result:
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        raise ForeignFile(f"{where}: owned by uid {st.st_uid}, not by this user")
    return st


@dataclass(frozen=True)
class FileHeader:
    fingerprint: str                   # ModelFingerprint digest, hex
    rank: int                          # the TP rank whose shard this is
    world: int                         # TP world size
    layout: tuple[tuple[str, int], ...]  # (layer name, page bytes) in slot order
    block_bytes: int
    keys: tuple[bytes, ...]
    block_checksums: tuple[bytes, ...]
    header_bytes: int = 0              # set when decoded / encoded
    kv_layout: str = ""                # ModelFingerprint.kv_layout; "" where not given

    @property
    def num_blocks(self) -> int:
        return len(self.keys)

    @property
    def block_stride(self) -> int:
        return align_up(self.block_bytes)

    def block_offset(self, index: int) -> int:
        return self.header_bytes + index * self.block_stride

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + self.num_blocks * self.block_stride

    def encode(self, secret: bytes) -> bytes:
        body = json.dumps({
            "fingerprint": self.fingerprint, "rank": self.rank, "world": self.world,
            "layout": [list(x) for x in self.layout], "block_bytes": self.block_bytes,
            "keys": [k.hex() for k in self.keys],
            "checksums": [c.hex() for c in self.block_checksums],
            "kv_layout": self.kv_layout,
        }, separators=(",", ":")).encode()
        head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body
        head += checksum(head, secret)
        return head + b"\0" * (align_up(len(head)) - len(head))

    @classmethod
    def decode(cls, data: bytes, where: str, secret: bytes) -> "FileHeader":
        if len(data) < _PREFIX.size:
            raise CorruptFile(f"{where}: truncated header")
        magic, version, body_len = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise CorruptFile(f"{where}: bad magic {magic!r}")
        if version != FORMAT_VERSION:
            raise OldFormat(f"{where}: format version {version}, expected {FORMAT_VERSION}")
        end = _PREFIX.size + body_len
        if body_len > _MAX_HEADER_BYTES or len(data) < end + CHECKSUM_BYTES:
            raise CorruptFile(f"{where}: truncated header")
        if checksum(data[:end], secret) != data[end:end + CHECKSUM_BYTES]:
            raise CorruptFile(f"{where}: header checksum mismatch (damaged, or written "
                              f"without this directory's secret)")
        try:
            body = json_object(data[_PREFIX.size:end], "the header")
            header = cls._checked(body, align_up(end + CHECKSUM_BYTES))
        except BadValue as e:
            raise RejectedHeader(f"{where}: malformed header: {e}") from None
        return header

    @classmethod
    def _checked(cls, body: dict, header_bytes: int) -> "FileHeader":
        """The header `body` (decoded JSON) describes, every field checked in type and
        range; BadValue names the first wrong one."""
        fingerprint = field(body, "fingerprint", str)
        if len(fingerprint) != 32 or not set(fingerprint) <= _FINGERPRINT_CHARS:
            raise BadValue("fingerprint is not 32 lowercase hex characters")
        world = int_field(body, "world", 1, _MAX_WORLD)
        rank = int_field(body, "rank", 0, world - 1)
        block_bytes = int_field(body, "block_bytes", 1, _MAX_BLOCK_BYTES)
        layout = []
        for item in field(body, "layout", list):
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                    or not is_int(item[1]) or not 0 < item[1] <= block_bytes):
                raise BadValue("layout is not a list of [layer name, page bytes <= "
                                "block_bytes]")
            layout.append((item[0], item[1]))
        if sum(page for _, page in layout) != block_bytes:
            raise BadValue(f"layout pages sum to {sum(page for _, page in layout)} bytes, "
                            f"block_bytes is {block_bytes}")
        keys = hex_list(body, "keys", KEY_BYTES)
        checksums = hex_list(body, "checksums", CHECKSUM_BYTES)
        if not keys or len(keys) != len(checksums):
            raise BadValue(f"{len(keys)} keys and {len(checksums)} checksums")
        kv_layout = field(body, "kv_layout", str)
        return cls(fingerprint=fingerprint, rank=rank, world=world, layout=tuple(layout),
                   block_bytes=block_bytes, keys=keys, block_checksums=checksums,
                   header_bytes=header_bytes, kv_layout=kv_layout)


def new_file_id() -> str:
    """Unique across processes and hosts sharing a directory; sorts by creation time."""
    return f"{time.time_ns():016x}-{os.getpid()}-{secrets.token_hex(4)}"


def file_name(file_id: str, rank: int) -> str:
    return f"{file_id}.r{rank}{SUFFIX}"


def parse_file_name(name: str) -> tuple[str, int] | None:
    """(file id, rank) of a finished file's name, None for anything else."""
    if not name.endswith(SUFFIX):
        return None
    stem = name[:-len(SUFFIX)]
    file_id, dot, rank = stem.rpartition(".r")
    if not dot or not rank.isdigit() or not file_id:
        return None
    return file_id, int(rank)


def write_file(path: str, header: FileHeader, blocks: Sequence, secret: bytes) -> int:
    """Write header + blocks (bytes-like, each `header.block_bytes` long) atomically.

    Returns the bytes written.  On any error the temporary file is removed and
    nothing appears under `path`.
    """
    head = header.encode(secret)
    pad = b"\0" * (header.block_stride - header.block_bytes)
    tmp = f"{path}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, head)
        for block in blocks:
            _write_all(fd, block)
            if pad:
                _write_all(fd, pad)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path))
    return len(head) + len(blocks) * header.block_stride


def read_header(path: str, secret: bytes) -> FileHeader:
    """Read and verify only the header: a few KiB, never the payload.  Raises
    ForeignFile for a file of another user, CorruptFile for a bad one."""
    with open(path, "rb", buffering=0, opener=_open_nofollow) as fh:
        check_owner(fh.fileno(), path)
        data = fh.read(ALIGN)
        if len(data) >= _PREFIX.size:
            magic, _, body_len = _PREFIX.unpack_from(data)
            need = _PREFIX.size + body_len + CHECKSUM_BYTES
            if magic == MAGIC and len(data) < need <= _MAX_HEADER_BYTES:
                data += fh.read(need - len(data))
        header = FileHeader.decode(data, path, secret)
        size = os.fstat(fh.fileno()).st_size
    if size < header.file_bytes:
        raise CorruptFile(f"{path}: {size} bytes, the header needs {header.file_bytes}")
    return header


def read_block_into(fd: int, header: FileHeader, index: int, out: memoryview, where: str,
                    secret: bytes) -> None:
    """Read block `index` into `out` (writable, block_bytes long) and verify it."""
    n = os.preadv(fd, [out], header.block_offset(index))
    if n != header.block_bytes:
        raise CorruptFile(f"{where}: block {index} truncated ({n} of {header.block_bytes} bytes)")
    if checksum(out, secret) != header.block_checksums[index]:
        raise CorruptFile(f"{where}: block {index} checksum mismatch")


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

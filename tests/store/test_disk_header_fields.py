"""Every field of a disk file's header, wrong in type and in range, in a file whose
checksum holds (written with the directory's secret: another version, a bug, a
holder of the secret).  Each is a RejectedHeader (never another exception), the
scheduler side's scan skips and counts it and goes on indexing the good files, and
a worker's read refuses it, counted (issue 29, "the fleet can't be crashed or
poisoned through the store")."""

from __future__ import annotations

import json
import os
import time

import pytest

from vllm_promptcache.store import disk_format as fmt
from vllm_promptcache.store.disk_io import PROMOTE, DiskIO
from vllm_promptcache.store.disk_tier import DiskTier
from vllm_promptcache.store.host_buffer import HostBuffer
from vllm_promptcache.store.policies import make_policy

SECRET = b"k" * fmt.SECRET_BYTES
FP = "ab" * 16
LAYOUT = [["l0", 2048], ["l1", 2048]]
BLOCK = 4096


def good_body(n=2):
    return {"fingerprint": FP, "rank": 0, "world": 1, "layout": LAYOUT, "block_bytes": BLOCK,
            "keys": [os.urandom(16).hex() for _ in range(n)],
            "checksums": [fmt.checksum(bytes(BLOCK), SECRET).hex()] * n,
            "kv_layout": "device=cpu,backend=auto,layout=LBHNC"}


def raw_file(path, body, version=fmt.FORMAT_VERSION, n=2):
    """A file whose header says `body` (any JSON, or bytes), checksummed with SECRET."""
    text = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = fmt._PREFIX.pack(fmt.MAGIC, version, len(text)) + text
    head += fmt.checksum(head, SECRET)
    head += b"\0" * (fmt.align_up(len(head)) - len(head))
    with open(path, "wb") as fh:
        fh.write(head + bytes(fmt.align_up(BLOCK)) * n)
    os.chmod(path, 0o600)


def _set(field, value):
    def change(body):
        body[field] = value
    return change


def _drop(field):
    def change(body):
        del body[field]
    return change


# (what is wrong, how) for every field, in type and in range.
BAD = {
    "fingerprint type": _set("fingerprint", 12),
    "fingerprint range": _set("fingerprint", "zz" * 16),
    "fingerprint length": _set("fingerprint", "ab" * 15),
    "rank type": _set("rank", "0"),
    "rank float": _set("rank", 0.0),
    "rank bool": _set("rank", False),
    "rank negative": _set("rank", -1),
    "rank past world": _set("rank", 1),
    "rank huge": _set("rank", 10 ** 30),
    "rank infinite": lambda b: b.__setitem__("rank", float("inf")),
    "world type": _set("world", [1]),
    "world zero": _set("world", 0),
    "world huge": _set("world", 1 << 40),
    "layout type": _set("layout", "l0:4096"),
    "layout item type": _set("layout", [["l0", "2048"], ["l1", 2048]]),
    "layout item shape": _set("layout", [["l0", 2048, 1], ["l1", 2048]]),
    "layout name type": _set("layout", [[0, 2048], ["l1", 2048]]),
    "layout page zero": _set("layout", [["l0", 0], ["l1", 4096]]),
    "layout sum": _set("layout", [["l0", 2048], ["l1", 1024]]),
    "block_bytes type": _set("block_bytes", "4096"),
    "block_bytes zero": _set("block_bytes", 0),
    "block_bytes negative": _set("block_bytes", -4096),
    "block_bytes huge": _set("block_bytes", 1 << 62),
    "keys type": _set("keys", "00" * 16),
    "keys item type": lambda b: b.__setitem__("keys", [1, 2]),
    "keys item length": lambda b: b.__setitem__("keys", ["00" * 15] * 2),
    "keys item not hex": lambda b: b.__setitem__("keys", ["zz" * 16] * 2),
    "keys item spaces": lambda b: b.__setitem__("keys", ["00 " * 10 + "00" * 1] * 2),
    "keys empty": lambda b: (b.__setitem__("keys", []), b.__setitem__("checksums", [])),
    "checksums type": _set("checksums", None),
    "checksums item length": lambda b: b.__setitem__("checksums", ["00" * 16] * 2),
    "checksums count": lambda b: b.__setitem__("checksums", b["checksums"][:1]),
    "kv_layout type": _set("kv_layout", 3),
    **{f"{f} missing": _drop(f) for f in ("fingerprint", "rank", "world", "layout",
                                          "block_bytes", "keys", "checksums", "kv_layout")},
}
NOT_AN_OBJECT = {"a list": [1, 2], "a string": "header", "null": None,
                 "not json": b"{not json", "not utf-8": b"\xff\xfe",
                 "deep nesting": b"[" * 100_000 + b"]" * 100_000,
                 "a huge integer": b'{"rank": ' + b"9" * 5000 + b"}"}


def test_the_good_body_is_accepted(tmp_path):
    path = str(tmp_path / "f.r0.kv")
    raw_file(path, good_body())
    header = fmt.read_header(path, SECRET)
    assert header.num_blocks == 2 and header.kv_layout.startswith("device=cpu")


@pytest.mark.parametrize("what", sorted(BAD))
def test_every_field_wrong_in_type_or_range_is_rejected(tmp_path, what):
    body = good_body()
    BAD[what](body)
    path = str(tmp_path / "f.r0.kv")
    raw_file(path, body)
    with pytest.raises(fmt.RejectedHeader):
        fmt.read_header(path, SECRET)


@pytest.mark.parametrize("what", sorted(NOT_AN_OBJECT))
def test_a_header_that_is_not_an_object_is_rejected(tmp_path, what):
    path = str(tmp_path / "f.r0.kv")
    raw_file(path, NOT_AN_OBJECT[what])
    with pytest.raises(fmt.RejectedHeader):
        fmt.read_header(path, SECRET)


def test_an_old_format_file_is_skipped_counted_and_kept(tmp_path):
    path = str(tmp_path / fmt.file_name(fmt.new_file_id(), 0))
    raw_file(path, good_body(), version=2)
    with pytest.raises(fmt.OldFormat):
        fmt.read_header(path, SECRET)
    tier = DiskTier(str(tmp_path), 1 << 30, 1, make_policy("lru"), secret=SECRET)
    assert tier.scan(lambda header: None) == (0, 0)
    assert tier.rejected_files == 1 and os.path.exists(path)


def test_the_scan_skips_and_counts_every_bad_header_and_indexes_the_good(tmp_path):
    bad = 0
    for what, change in BAD.items():
        body = good_body()
        change(body)
        raw_file(str(tmp_path / fmt.file_name(fmt.new_file_id(), 0)), body)
        bad += 1
    for what, body in NOT_AN_OBJECT.items():
        raw_file(str(tmp_path / fmt.file_name(fmt.new_file_id(), 0)), body)
        bad += 1
    good = good_body(3)
    raw_file(str(tmp_path / fmt.file_name(fmt.new_file_id(), 0)), good, n=3)
    tier = DiskTier(str(tmp_path), 1 << 30, 1, make_policy("lru"), secret=SECRET,
                    kv_layout=good["kv_layout"])
    assert tier.scan(lambda header: None) == (1, 3)
    assert tier.rejected_files == bad
    assert tier.locate(bytes.fromhex(good["keys"][2])) is not None
    assert len(os.listdir(tmp_path)) == 1, "rejected files of this directory are deleted"


def test_another_kv_layout_is_not_indexed(tmp_path):
    raw_file(str(tmp_path / fmt.file_name(fmt.new_file_id(), 0)), good_body())
    tier = DiskTier(str(tmp_path), 1 << 30, 1, make_policy("lru"), secret=SECRET,
                    kv_layout="device=cuda,backend=auto,layout=LBNHC")
    assert tier.scan(lambda header: None) == (0, 0)


def test_a_worker_refuses_a_bad_header_and_counts_it(tmp_path):
    io = DiskIO(str(tmp_path), FP, 0, 1, [tuple(x) for x in LAYOUT], 1 << 30, SECRET)
    try:
        body = good_body()
        body["rank"] = float("inf")
        raw_file(io.path("f1"), body)
        host = HostBuffer(2, [tuple(x) for x in LAYOUT], pin=False)
        io.promote("p1", "f1", [0], [1], host, [bytes.fromhex(body["keys"][0])])
        deadline, events, corrupt = time.time() + 10, [], set()
        while not events and time.time() < deadline:
            e, c, _ = io.take_events()
            events, corrupt = events + [ev[:3] for ev in e], corrupt | c
            time.sleep(0.01)
        assert events == [(PROMOTE, "p1", False)] and corrupt == {"f1"}
        assert io.take_counts() == {"rejected": 1}
    finally:
        io.shutdown()

"""The worker side of the disk tier: staged writes into files, parallel reads into host slots."""

import os
import time

import torch

from vllm_promptcache.store import disk_format as fmt
from vllm_promptcache.store.disk_io import PROMOTE, WRITE, DiskIO
from vllm_promptcache.store.host_buffer import HostBuffer

LAYOUT = [("layers.0", 1000), ("layers.1", 1000)]
SECRET = b"s" * fmt.SECRET_BYTES


def wait_events(io, n, timeout=10.0, seconds=None):
    """The first n events as (kind, id, ok); a promotion's read time (its fourth field)
    is appended to `seconds` where given."""
    events, corrupt = [], set()
    deadline = time.time() + timeout
    while len(events) < n and time.time() < deadline:
        e, c, _ = io.take_events()
        events += [ev[:3] for ev in e]
        if seconds is not None:
            seconds += [ev[3] for ev in e if ev[0] == PROMOTE]
        corrupt |= c
        time.sleep(0.01)
    return events, corrupt


def make_io(tmp_path, max_staged=1 << 30):
    return DiskIO(str(tmp_path), "ab" * 16, 0, 1, LAYOUT, max_staged, SECRET)


def staged(n):
    buf = HostBuffer(n, LAYOUT, pin=False)
    buf.data.copy_(torch.randint(0, 256, buf.data.shape, dtype=torch.uint8))
    return buf


def test_write_then_promote_round_trip(tmp_path):
    io = make_io(tmp_path)
    src = staged(5)
    keys = [os.urandom(16) for _ in range(5)]
    assert io.try_stage(5)
    io.write("f1", keys, src)
    assert wait_events(io, 1)[0] == [(WRITE, "f1", True)]
    header = fmt.read_header(io.path("f1"), SECRET)
    assert list(header.keys) == keys and header.block_bytes == 2000

    host = HostBuffer(8, LAYOUT, pin=False)
    host.data.fill_(0xEE)
    io.promote("p1", "f1", [4, 0, 2], [1, 6, 3], host, [keys[4], keys[0], keys[2]])
    seconds = []
    events, corrupt = wait_events(io, 1, seconds=seconds)
    assert events == [(PROMOTE, "p1", True)] and not corrupt
    assert len(seconds) == 1 and 0 <= seconds[0] < 10, "the read's own time, for pricing"
    assert torch.equal(host.data[1], src.data[4])
    assert torch.equal(host.data[6], src.data[0])
    assert torch.equal(host.data[3], src.data[2])
    assert written_and_read(io) == (header.file_bytes, 3 * 2000)
    io.shutdown()


def written_and_read(io):
    return io.take_byte_counts()


def test_a_corrupt_block_fails_the_promotion_and_deletes_the_file(tmp_path):
    io = make_io(tmp_path)
    assert io.try_stage(3)
    ks = [os.urandom(16) for _ in range(3)]
    io.write("f1", ks, staged(3))
    wait_events(io, 1)
    path = io.path("f1")
    header = fmt.read_header(path, SECRET)
    with open(path, "r+b") as fh:
        fh.seek(header.block_offset(2) + 7)
        fh.write(b"\x00\x01")
    host = HostBuffer(4, LAYOUT, pin=False)
    io.promote("p1", "f1", [0, 1, 2], [0, 1, 2], host, ks)
    events, corrupt = wait_events(io, 1)
    assert events == [(PROMOTE, "p1", False)] and corrupt == {"f1"}
    assert not os.path.exists(path)
    io.shutdown()


def test_a_missing_file_fails_without_calling_it_corrupt(tmp_path):
    io = make_io(tmp_path)
    io.promote("p1", "nope", [0], [0], HostBuffer(1, LAYOUT, pin=False), [b"k" * 16])
    events, corrupt = wait_events(io, 1)
    assert events == [(PROMOTE, "p1", False)] and not corrupt
    io.shutdown()


def test_staging_is_bounded_and_a_full_disk_drops_the_save(tmp_path, monkeypatch):
    io = make_io(tmp_path, max_staged=2 * 2000)
    assert io.try_stage(2)
    assert not io.try_stage(1)
    io.unstage(2)
    assert io.try_stage(1)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    io.write("f1", [os.urandom(16)], staged(1))
    assert wait_events(io, 1)[0] == [(WRITE, "f1", False)]
    assert os.listdir(tmp_path) == []
    assert io.try_stage(2)  # the failed write gave its staging back
    io.shutdown()

"""The disk tier's index: cap, eviction order, queued keys, restart scan, shared directories."""

import os
import time

import pytest

from vllm_promptcache.store import disk_format as fmt
from vllm_promptcache.store.disk_tier import DiskTier, DiskTierError, prepare_directory
from vllm_promptcache.store.policies import make_policy

LAYOUT = (("l0", 4096),)
FP = "cd" * 16
SECRET = b"s" * fmt.SECRET_BYTES


def keys(n):
    return [os.urandom(16) for _ in range(n)]


def write_file(directory, file_keys, rank=0, world=1, fingerprint=FP, file_id=None):
    file_id = file_id or fmt.new_file_id()
    blocks = [os.urandom(4096) for _ in file_keys]
    header = fmt.FileHeader(fingerprint, rank, world, LAYOUT, 4096, tuple(file_keys),
                            tuple(fmt.checksum(b, SECRET) for b in blocks))
    nbytes = fmt.write_file(os.path.join(directory, fmt.file_name(file_id, rank)), header, blocks,
                            SECRET)
    return file_id, nbytes


def accept(header):
    return None if header.fingerprint == FP else "another model fingerprint"


def tier(tmp_path, cap, policy="lru", queued=None):
    return DiskTier(str(tmp_path), cap, 1, make_policy(policy), queued, SECRET)


def test_pending_then_ready(tmp_path):
    t = tier(tmp_path, 1 << 20)
    ks = keys(3)
    assert t.reserve("f1", ks, 1000)
    assert t.is_pending(ks[0]) and t.locate(ks[0]) is None and ks[0] in t
    t.commit("f1")
    assert [t.locate(k) for k in ks] == [("f1", 0), ("f1", 1), ("f1", 2)]
    assert t.bytes_in_use == 1000


def test_cap_holds_under_a_flood_and_evicts_oldest(tmp_path):
    t = tier(tmp_path, 10_000)
    first = None
    for i in range(200):
        ks = keys(2)
        first = first or ks
        fid = f"f{i}"
        assert t.reserve(fid, ks, 1500)
        assert t.bytes_in_use <= 10_000
        t.commit(fid)
    assert t.evictions == 2 * (200 - 6)  # blocks
    assert t.locate(first[0]) is None
    assert t.num_files == 6


def test_pending_and_pinned_files_are_not_evicted(tmp_path):
    t = tier(tmp_path, 3000)
    a, b = keys(1), keys(1)
    assert t.reserve("a", a, 1500)  # stays PENDING
    assert t.reserve("b", b, 1500)
    t.commit("b")
    t.pin(["b"])
    assert not t.reserve("c", keys(1), 1500)  # nothing evictable
    t.unpin(["b"])
    assert t.reserve("c", keys(1), 1500)
    assert t.locate(b[0]) is None and t.is_pending(a[0])


def test_eviction_deletes_the_files(tmp_path):
    t = tier(tmp_path, 10 ** 9)
    ks = keys(2)
    fid, nbytes = write_file(str(tmp_path), ks)
    assert t.reserve(fid, ks, nbytes)
    t.commit(fid)
    assert os.path.exists(t.path(fid))
    t.discard(fid)
    assert not os.path.exists(t.path(fid))
    assert t.locate(ks[0]) is None and t.bytes_in_use == 0


@pytest.mark.parametrize("policy,evicted", [("lru", "queued"), ("scheduler-aware", "idle")])
def test_scheduler_aware_policy_spares_queued_conversations(tmp_path, policy, evicted):
    from collections import Counter

    queued = Counter()
    t = tier(tmp_path, 3000, policy, queued)
    q, idle = keys(1), keys(1)
    t.reserve("queued", q, 1500)
    t.commit("queued")
    t.reserve("idle", idle, 1500)
    t.commit("idle")
    queued.update(q)  # a waiting request will read the older file
    assert t.reserve("new", keys(1), 1500)
    gone = "queued" if t.locate(q[0]) is None else "idle"
    assert gone == evicted


def test_scan_rebuilds_the_index_from_headers(tmp_path):
    ks1, ks2 = keys(3), keys(2)
    f1, n1 = write_file(str(tmp_path), ks1)
    time.sleep(0.01)
    f2, n2 = write_file(str(tmp_path), ks2)
    write_file(str(tmp_path), keys(1), fingerprint="ee" * 16)  # another model: ignored
    t = tier(tmp_path, 1 << 30)
    assert t.scan(accept) == (2, 5)
    assert t.locate(ks1[2]) == (f1, 2) and t.locate(ks2[0]) == (f2, 0)
    assert t.bytes_in_use == n1 + n2


def test_scan_reads_headers_only(tmp_path, monkeypatch):
    """A file with a damaged payload is indexed at scan (its payload is not read);
    the damage is found when the block is read."""
    ks = keys(4)
    fid, _ = write_file(str(tmp_path), ks)
    path = os.path.join(tmp_path, fmt.file_name(fid, 0))
    header = fmt.read_header(path, SECRET)
    with open(path, "r+b") as fh:
        fh.seek(header.block_offset(3))
        fh.write(b"\xff" * 8)
    read_sizes = []
    real_read = os.read

    def spy(fd, n):
        read_sizes.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", spy)
    t = tier(tmp_path, 1 << 30)
    assert t.scan(accept) == (1, 4)
    assert sum(read_sizes) <= fmt.ALIGN * 2 < header.file_bytes


def test_scan_drops_corrupt_files_and_stale_temporaries(tmp_path):
    good, _ = write_file(str(tmp_path), keys(2))
    bad, _ = write_file(str(tmp_path), keys(2))
    bad_path = os.path.join(tmp_path, fmt.file_name(bad, 0))
    data = bytearray(open(bad_path, "rb").read())
    data[20] ^= 1
    open(bad_path, "wb").write(data)
    stale = tmp_path / "x.r0.kv.abcd.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / "y.r0.kv.abcd.tmp"  # another engine is writing it right now
    fresh.write_bytes(b"partial")
    t = tier(tmp_path, 1 << 30)
    assert t.scan(accept) == (1, 2)
    assert t.corrupt_blocks >= 1
    assert not os.path.exists(bad_path) and not stale.exists() and fresh.exists()


def test_scan_enforces_the_cap(tmp_path):
    sizes = []
    for _ in range(4):
        sizes.append(write_file(str(tmp_path), keys(1))[1])
        time.sleep(0.01)
    t = tier(tmp_path, sizes[0] * 2)
    files, _ = t.scan(accept)
    assert files == 2 and t.bytes_in_use <= sizes[0] * 2


def test_two_writers_share_a_directory(tmp_path):
    """Two engines write into one directory at the same time: unique names, no
    clobbering; each sees all whole files after a rescan."""
    import threading

    results = {0: [], 1: []}

    def writer(w):
        for _ in range(20):
            ks = keys(2)
            fid, _ = write_file(str(tmp_path), ks)
            results[w].append((fid, ks))

    threads = [threading.Thread(target=writer, args=(w,)) for w in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t = tier(tmp_path, 1 << 30)
    assert t.scan(accept) == (40, 80)
    for fid, ks in results[0] + results[1]:
        assert t.locate(ks[1]) == (fid, 1)


def test_tensor_parallel_files_need_every_rank(tmp_path):
    ks = keys(2)
    fid, _ = write_file(str(tmp_path), ks, rank=0, world=2)
    t = DiskTier(str(tmp_path), 1 << 30, 2, make_policy("lru"), secret=SECRET)
    assert t.scan(accept) == (0, 0)  # rank 1 still being written
    write_file(str(tmp_path), ks, rank=1, world=2, file_id=fid)
    t = DiskTier(str(tmp_path), 1 << 30, 2, make_policy("lru"), secret=SECRET)
    assert t.scan(accept) == (1, 2)


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DiskTierError, match="not writable.*--promptcache-disk-path"):
        prepare_directory(str(blocker / "kv"))

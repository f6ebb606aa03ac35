"""The disk tier is private and verified: modes, a keyed checksum only holders of the
directory's secret can make, headers checked for key and fingerprint, files of
another user refused, and other fingerprints' files left alone unless an operator
asks to reclaim them."""

from __future__ import annotations

import os
import stat
import time

import pytest

from vllm_promptcache.store import disk_format as fmt
from vllm_promptcache.store.disk_io import PROMOTE, DiskIO
from vllm_promptcache.store.disk_tier import DiskTier, prepare_directory
from vllm_promptcache.store.host_buffer import HostBuffer
from vllm_promptcache.store.policies import make_policy

LAYOUT = (("l0", 4096),)
FP = "cd" * 16


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def write(directory, secret, keys, fingerprint=FP, file_id=None):
    file_id = file_id or fmt.new_file_id()
    blocks = [os.urandom(4096) for _ in keys]
    header = fmt.FileHeader(fingerprint, 0, 1, LAYOUT, 4096, tuple(keys),
                            tuple(fmt.checksum(b, secret) for b in blocks))
    fmt.write_file(os.path.join(directory, fmt.file_name(file_id, 0)), header, blocks, secret)
    return file_id


def accept(header):
    return None if header.fingerprint == FP else "another model fingerprint"


def test_directories_are_0700_files_and_the_secret_0600(tmp_path):
    os.umask(0o022)
    root = str(tmp_path / "kv")
    secret = fmt.disk_secret(root)
    directory = prepare_directory(os.path.join(root, FP))
    fid = write(directory, secret, [os.urandom(16)])
    assert mode(root) == 0o700 and mode(directory) == 0o700
    assert mode(os.path.join(root, fmt.SECRET_NAME)) == 0o600
    assert mode(os.path.join(directory, fmt.file_name(fid, 0))) == 0o600
    assert fmt.disk_secret(root) == secret, "the secret is created once and kept"
    os.chmod(directory, 0o755)
    prepare_directory(directory)
    assert mode(directory) == 0o700, "an existing directory is tightened"


def test_a_secret_readable_by_others_is_refused(tmp_path):
    root = str(tmp_path / "kv")
    fmt.disk_secret(root)
    os.chmod(os.path.join(root, fmt.SECRET_NAME), 0o644)
    with pytest.raises(fmt.SecretError, match="0600"):
        fmt.disk_secret(root)


def test_a_well_formed_file_planted_without_the_secret_is_a_miss(tmp_path):
    root = str(tmp_path / "kv")
    secret = fmt.disk_secret(root)
    directory = prepare_directory(os.path.join(root, FP))
    good = write(directory, secret, [os.urandom(16)])
    planted_key = os.urandom(16)
    planted = write(directory, os.urandom(fmt.SECRET_BYTES), [planted_key])  # right format, fingerprint
    tier = DiskTier(directory, 1 << 30, 1, make_policy("lru"), secret=secret)
    assert tier.scan(accept) == (1, 1)
    assert tier.locate(planted_key) is None and tier.file_keys(good)
    assert tier.corrupt_blocks == 1
    assert not os.path.exists(os.path.join(directory, fmt.file_name(planted, 0)))


def promote_one(io, file_id, index, key):
    host = HostBuffer(1, LAYOUT, pin=False)
    io.promote("p", file_id, [index], [0], host, [key])
    deadline = time.time() + 10
    while time.time() < deadline:
        events, corrupt, gone = io.take_events()
        if events:
            return events[0][:3], corrupt, gone  # (kind, id, ok); then the read's time
        time.sleep(0.01)
    raise TimeoutError


def test_a_reader_checks_the_key_and_fingerprint_in_the_header(tmp_path):
    secret = b"k" * fmt.SECRET_BYTES
    keys = [os.urandom(16), os.urandom(16)]
    fid = write(str(tmp_path), secret, keys)
    io = DiskIO(str(tmp_path), FP, 0, 1, LAYOUT, 1 << 20, secret)
    try:
        assert promote_one(io, fid, 1, keys[1])[0] == (PROMOTE, "p", True)
        # The index names another key at that place: the block is not served.
        event, corrupt, _ = promote_one(io, fid, 1, keys[0])
        assert event == (PROMOTE, "p", False) and corrupt == {fid}
        other = write(str(tmp_path), secret, keys, fingerprint="ee" * 16)
        event, corrupt, _ = promote_one(io, other, 0, keys[0])
        assert event == (PROMOTE, "p", False) and corrupt == {other}
    finally:
        io.shutdown()


@pytest.mark.skipif(os.getuid() != 0, reason="making a file of another user needs root")
def test_a_file_written_by_another_user_is_never_served(tmp_path):
    secret = b"k" * fmt.SECRET_BYTES
    key = os.urandom(16)
    fid = write(str(tmp_path), secret, [key])
    path = os.path.join(tmp_path, fmt.file_name(fid, 0))
    os.chown(path, 12345, 12345)
    tier = DiskTier(str(tmp_path), 1 << 30, 1, make_policy("lru"), secret=secret)
    assert tier.scan(accept) == (0, 0)
    io = DiskIO(str(tmp_path), FP, 0, 1, LAYOUT, 1 << 20, secret)
    try:
        event, corrupt, gone = promote_one(io, fid, 0, key)
        assert event == (PROMOTE, "p", False) and not corrupt and gone == {fid}
        assert os.path.exists(path), "another user's file is refused, not deleted"
    finally:
        io.shutdown()


def test_two_fingerprints_under_one_root_each_keep_their_files(tmp_path):
    """Issue 29: two servers of different models on one host (one default root) wiped
    each other's cache, other fingerprints' files being "stale".  Each engine now
    evicts only its own files, even when its cap is full."""
    root = str(tmp_path / "kv")
    secret = fmt.disk_secret(root)
    other_fp = "ee" * 16
    theirs = prepare_directory(os.path.join(root, other_fp))
    their_files = sorted(os.path.basename(fmt.file_name(write(theirs, secret, [os.urandom(16)],
                                                               fingerprint=other_fp), 0))
                         for _ in range(3))
    mine = prepare_directory(os.path.join(root, FP))
    own_key = os.urandom(16)
    write(mine, secret, [own_key])
    one = os.path.getsize(os.path.join(mine, os.listdir(mine)[0]))
    tier = DiskTier(mine, 2 * one, 1, make_policy("lru"), secret=secret)
    assert tier.scan(accept) == (1, 1)
    assert tier.stale_bytes == 0 and tier.bytes_in_use == one, "theirs is not counted"
    assert tier.reserve("new", [os.urandom(16)], 2 * one)  # full: evicts its own file
    assert tier.locate(own_key) is None
    assert sorted(os.listdir(theirs)) == their_files, "the other engine's files are kept"
    # The other engine, on the same root, keeps ours too.
    write(mine, secret, [own_key])
    kept = sorted(os.listdir(mine))
    other = DiskTier(theirs, 1 * one, 1, make_policy("lru"), secret=secret)
    other.scan(lambda header: None if header.fingerprint == other_fp else "another")
    assert other.reserve("x", [os.urandom(16)], one)
    assert sorted(os.listdir(mine)) == kept


def test_other_fingerprints_files_count_against_the_cap_and_go_first_when_asked(tmp_path):
    root = str(tmp_path / "kv")
    secret = fmt.disk_secret(root)
    old = prepare_directory(os.path.join(root, "ee" * 16))
    for _ in range(3):
        write(old, secret, [os.urandom(16)], fingerprint="ee" * 16)
    mine = prepare_directory(os.path.join(root, FP))
    own_key = os.urandom(16)
    write(mine, secret, [own_key])
    one = os.path.getsize(os.path.join(mine, os.listdir(mine)[0]))
    tier = DiskTier(mine, 5 * one, 1, make_policy("lru"), secret=secret, reclaim_others=True)
    assert tier.scan(accept) == (1, 1)
    assert tier.stale_bytes == 3 * one and tier.bytes_in_use == 4 * one
    assert tier.reserve("new", [os.urandom(16)], 2 * one)  # needs one stale file's room
    assert tier.stale_bytes == 2 * one and len(os.listdir(old)) == 2
    assert tier.locate(own_key) is not None, "stale files go before any of this model's"
    assert tier.reserve("new2", [os.urandom(16)], 2 * one)
    assert not os.path.exists(old), "an emptied stale directory is removed"

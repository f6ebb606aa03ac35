"""The disk tier's file format: headers, checksums, atomic writes, crashes."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vllm_promptcache.store import disk_format as fmt

LAYOUT = (("layers.0", 3000), ("layers.1", 3000))
BLOCK = 6000
SECRET = b"s" * fmt.SECRET_BYTES


def make_blocks(n, seed=0):
    rng = __import__("random").Random(seed)
    return [bytes(rng.getrandbits(8) for _ in range(BLOCK)) for _ in range(n)]


def write(tmp_path, n=3, file_id=None, rank=0, fingerprint="ab" * 16):
    blocks = make_blocks(n, seed=n)
    keys = tuple(os.urandom(16) for _ in range(n))
    header = fmt.FileHeader(fingerprint, rank, 1, LAYOUT, BLOCK, keys,
                            tuple(fmt.checksum(b, SECRET) for b in blocks))
    path = str(tmp_path / fmt.file_name(file_id or fmt.new_file_id(), rank))
    fmt.write_file(path, header, blocks, SECRET)
    return path, keys, blocks


def read_all(path):
    header = fmt.read_header(path, SECRET)
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in range(header.num_blocks):
            buf = bytearray(header.block_bytes)
            fmt.read_block_into(fd, header, i, memoryview(buf), path, SECRET)
            out.append(bytes(buf))
    finally:
        os.close(fd)
    return header, out


def test_round_trip_and_alignment(tmp_path):
    path, keys, blocks = write(tmp_path)
    header, got = read_all(path)
    assert got == blocks and header.keys == keys and header.layout == LAYOUT
    assert header.header_bytes % fmt.ALIGN == 0
    assert all(header.block_offset(i) % fmt.ALIGN == 0 for i in range(3))
    assert os.path.getsize(path) == header.file_bytes
    assert not [p for p in os.listdir(tmp_path) if p.endswith(fmt.TMP_SUFFIX)]


def test_file_names_parse():
    fid = fmt.new_file_id()
    assert fmt.parse_file_name(fmt.file_name(fid, 3)) == (fid, 3)
    assert fmt.parse_file_name(fmt.file_name(fid, 0) + ".x.tmp") is None
    assert fmt.parse_file_name("notes.txt") is None
    assert fmt.new_file_id() != fmt.new_file_id()


@pytest.mark.parametrize("where", ["magic", "header_json", "header_checksum"])
def test_a_damaged_header_is_corrupt(tmp_path, where):
    path, _, _ = write(tmp_path)
    data = bytearray(open(path, "rb").read())
    offset = {"magic": 0, "header_json": 40,
              "header_checksum": fmt._PREFIX.size + fmt._PREFIX.unpack_from(data)[2] + 3}[where]
    data[offset] ^= 0x01
    open(path, "wb").write(data)
    with pytest.raises(fmt.CorruptFile):
        fmt.read_header(path, SECRET)


def test_a_flipped_payload_byte_fails_only_its_block(tmp_path):
    path, _, blocks = write(tmp_path)
    header = fmt.read_header(path, SECRET)
    with open(path, "r+b") as fh:
        fh.seek(header.block_offset(1) + 1234)
        b = fh.read(1)
        fh.seek(header.block_offset(1) + 1234)
        fh.write(bytes([b[0] ^ 0x80]))
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(BLOCK)
        fmt.read_block_into(fd, header, 0, memoryview(buf), path, SECRET)
        assert bytes(buf) == blocks[0]
        with pytest.raises(fmt.CorruptFile, match="checksum"):
            fmt.read_block_into(fd, header, 1, memoryview(buf), path, SECRET)
    finally:
        os.close(fd)


def test_a_truncated_file_is_corrupt(tmp_path):
    path, _, _ = write(tmp_path)
    size = os.path.getsize(path)
    os.truncate(path, size - 100)
    with pytest.raises(fmt.CorruptFile, match="needs"):
        fmt.read_header(path, SECRET)
    os.truncate(path, 10)
    with pytest.raises(fmt.CorruptFile):
        fmt.read_header(path, SECRET)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    header = fmt.FileHeader("ab" * 16, 0, 1, LAYOUT, BLOCK, (b"k" * 16,), (b"c" * 32,))
    path = str(tmp_path / "x.r0.kv")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        fmt.write_file(path, header, [b"\0" * BLOCK], SECRET)
    assert os.listdir(tmp_path) == []


def test_sigkill_mid_write_leaves_nothing_servable(tmp_path):
    """A writer killed while writing a file leaves only a *.tmp (never indexed)
    and the files it had finished, which are whole and verify."""
    script = textwrap.dedent(f"""
        import os, sys
        from vllm_promptcache.store import disk_format as fmt
        layout = {LAYOUT!r}
        block = os.urandom({BLOCK}) * 200          # big files: the kill lands mid-write
        header_of = lambda keys: fmt.FileHeader("ab" * 16, 0, 1, (("l", len(block)),), len(block),
                                                keys, tuple(fmt.checksum(block, {SECRET!r}) for _ in keys))
        i = 0
        while True:
            keys = tuple(os.urandom(16) for _ in range(20))
            fmt.write_file(os.path.join({str(tmp_path)!r}, fmt.file_name(fmt.new_file_id(), 0)),
                           header_of(keys), [block] * 20, {SECRET!r})
            i += 1
            if i == 2:
                print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 30
    while not any(n.endswith(fmt.TMP_SUFFIX) for n in os.listdir(tmp_path)):
        assert time.time() < deadline, "the writer never started another file"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    names = os.listdir(tmp_path)
    finished = [n for n in names if fmt.parse_file_name(n)]
    assert len(finished) >= 2
    assert any(n.endswith(fmt.TMP_SUFFIX) for n in names), "the kill should land mid-write"
    for name in names:
        if fmt.parse_file_name(name) is None:
            assert name.endswith(fmt.TMP_SUFFIX), name
            continue
        header, blocks = read_all(str(tmp_path / name))  # whole and verified
        assert len(blocks) == 20
    # What a restarted engine indexes: exactly the finished files, never the partial one.
    from vllm_promptcache.store.disk_tier import DiskTier
    from vllm_promptcache.store.policies import make_policy

    tier = DiskTier(str(tmp_path), 1 << 40, 1, make_policy("lru"), secret=SECRET)
    assert tier.scan(lambda header: None) == (len(finished), 20 * len(finished))

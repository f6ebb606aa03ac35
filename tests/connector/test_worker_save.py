"""A worker-side save always reports its request, even when something in it raises:
vLLM gets the blocks back and the host slots never stay PENDING.  Its write-through
is staged with `SecondaryIO.stage`: a write that cannot be staged is dropped and
reported, and gives back its staging memory.

The worker here is real below its set-up: the CPU data path (`CpuTransfers`) over
two small layers, a host buffer, a staging pool and a disk tier in `tmp_path`."""

import os
import queue
import threading
import time

import pytest
import torch

from vllm_promptcache.connector.cpu_transfer import CpuTransfers
from vllm_promptcache.connector.metadata import (BlockTransfer, PromptCacheMetadata, Promotion,
                                                 TierWrite)
from vllm_promptcache.connector.worker import PromptCacheWorker
from vllm_promptcache.metrics import PromptCacheStats
from vllm_promptcache.store import disk_format as fmt
from vllm_promptcache.store.disk_io import WRITE, DiskIO
from vllm_promptcache.store.secondary_io import PROMOTE
from vllm_promptcache.store.host_buffer import HostBuffer, StagingPool

NUM_BLOCKS, BLOCK_SIZE = 9, 16
LAYOUT = [("layers.0", 1000), ("layers.1", 1000)]  # float32 [2, 125] a block


def make_worker(tmp_path, pool_slots=4, host_slots=4, max_staged=1 << 30):
    w = object.__new__(PromptCacheWorker)
    w._saved, w._failed = queue.SimpleQueue(), set()
    w._early_promos, w._early_meta = set(), None
    w._load_errors = set()
    w._stats, w._stats_lock = PromptCacheStats(), threading.Lock()
    g = torch.Generator().manual_seed(0)
    kv = {name: torch.randn(NUM_BLOCKS, 2, 125, generator=g) for name, _ in LAYOUT}
    w.buffer = HostBuffer(host_slots, LAYOUT, pin=False)
    w.slot_bytes, w.block_size = w.buffer.slot_bytes, BLOCK_SIZE
    w._transfers = CpuTransfers(kv, kv, w.buffer, BLOCK_SIZE, load_cpu="off")
    w._staging = StagingPool(pool_slots, LAYOUT, pin=False)
    w.secondary = {"disk": DiskIO(str(tmp_path), "ab" * 16, 0, 1, LAYOUT, max_staged,
                                  b"s" * fmt.SECRET_BYTES)}
    return w, kv


@pytest.fixture
def worker(tmp_path):
    w, kv = make_worker(tmp_path)
    yield w, kv
    w.secondary["disk"].shutdown()


def write_events(io, n, timeout=10.0):
    events, deadline = [], time.time() + timeout
    while len(events) < n and time.time() < deadline:
        events += io.take_events()[0]
        time.sleep(0.01)
    return events


def slowed(monkeypatch, obj, name: str, seconds: float) -> None:
    """obj.name made `seconds` slower: a slow disk read or write."""
    fn = getattr(obj, name)

    def slow(*args):
        time.sleep(seconds)
        return fn(*args)

    monkeypatch.setattr(obj, name, slow)


def block_bytes(kv, block):
    return torch.cat([t[block].reshape(-1).view(torch.uint8) for t in kv.values()])


def test_an_exception_anywhere_in_a_save_reports_it_failed(worker, monkeypatch):
    w, _ = worker

    def boom(*a, **k):
        raise RuntimeError("a bug past the copy")

    monkeypatch.setattr(w, "_save_and_stage", boom)
    w._save("r1", BlockTransfer("r1", [3, 4], [0, 1]), [], None)
    done, _ = w.get_finished(set())
    assert done == {"r1"}
    assert w.build_worker_meta().failed_saves == {"r1"}


def test_a_failed_copy_reports_the_save_failed(worker):
    w, _ = worker
    w._save("r2", BlockTransfer("r2", [1], [w.buffer.num_slots + 5]), [], None)  # no such slot
    done, _ = w.get_finished(set())
    assert done == {"r2"} and w.build_worker_meta().failed_saves == {"r2"}


def test_a_good_save_reports_success_with_the_blocks_in_host(worker):
    w, kv = worker
    w._save("r3", BlockTransfer("r3", [1, 7], [2, 0]), [], None)
    assert w.get_finished(set())[0] == {"r3"} and w.build_worker_meta() is None
    assert torch.equal(w.buffer.data[2], block_bytes(kv, 1))
    assert torch.equal(w.buffer.data[0], block_bytes(kv, 7))


def test_a_staged_write_reaches_the_disk_and_gives_its_lease_back(worker):
    w, kv = worker
    keys = [os.urandom(16) for _ in range(2)]
    w._save("r4", None, [TierWrite("r4", "f4", keys, [5, 2])], None)
    io = w.secondary["disk"]
    assert write_events(io, 1) == [(WRITE, "f4", True)]
    header = fmt.read_header(io.path("f4"), b"s" * fmt.SECRET_BYTES)
    assert list(header.keys) == keys
    assert w._staging.free_slots() == w._staging.num_slots
    assert w.get_finished(set())[0] == {"r4"}


def test_writes_that_cannot_be_staged_are_dropped_and_give_everything_back(tmp_path):
    w, _ = make_worker(tmp_path, pool_slots=3, max_staged=4 * 2000)
    io = w.secondary["disk"]
    try:
        w._save("r5", BlockTransfer("r5", [0], [1]), [
            TierWrite("r5", "queue-full", [os.urandom(16)] * 5, [0, 1, 2, 3, 4]),
            TierWrite("r5", "pool-full", [os.urandom(16)] * 4, [0, 1, 2, 3]),
            TierWrite("r5", "copy-fails", [os.urandom(16)] * 2, [1, NUM_BLOCKS + 3]),
        ], None)
        assert sorted(write_events(io, 3)) == [(WRITE, "copy-fails", False),
                                               (WRITE, "pool-full", False),
                                               (WRITE, "queue-full", False)]
        # The host save went on, and nothing stays claimed: the whole bound and the
        # whole pool are free again.
        assert w.get_finished(set())[0] == {"r5"} and w.build_worker_meta() is None
        assert w._staging.free_slots() == 3
        assert io.try_stage(4)
        assert os.listdir(tmp_path) == []
    finally:
        io.shutdown()


def test_a_promotion_starts_when_its_step_is_bound_unless_a_load_of_the_step_reads_its_slot(
        worker):
    """A promotion into slots no load of its step reads starts when the step's metadata
    is bound (before the forward), so its read lands within the step and the request it
    serves loads a step sooner; one into a slot the step's load reads waits until the
    step's loads are done (wait_for_save), or it would overwrite what they copy."""
    w, kv = worker
    keys = [os.urandom(16) for _ in range(2)]
    w._save("r6", None, [TierWrite("r6", "f6", keys, [5, 6])], None)
    io = w.secondary["disk"]
    assert write_events(io, 1) == [(WRITE, "f6", True)]
    w.get_finished(set())
    w._save("r7", BlockTransfer("r7", [8], [0]), [], None)  # slot 0 holds block 8's bytes
    w.get_finished(set())
    before = w.buffer.data[0].clone()
    meta = PromptCacheMetadata(
        loads=[BlockTransfer("r8", [3], [0])],  # this step reads slot 0
        promotions=[Promotion("free", "f6", [0], [1], [keys[0]]),
                    Promotion("busy", "f6", [1], [0], [keys[1]])])
    w.start_promotions(meta)
    assert [e[:3] for e in write_events(io, 1)] == [(PROMOTE, "free", True)]
    assert torch.equal(w.buffer.data[1], block_bytes(kv, 5)), "read before the forward"
    time.sleep(0.1)
    assert not io.take_events()[0], "the promotion into a slot the step reads waited"
    assert torch.equal(w.buffer.data[0], before)
    w.start_load_kv(meta)
    assert torch.equal(kv["layers.0"][3], kv["layers.0"][8]), "the load copied slot 0"
    w.wait_for_save(meta)
    assert [e[:3] for e in write_events(io, 1)] == [(PROMOTE, "busy", True)], \
        "started once, after the loads"
    assert torch.equal(w.buffer.data[0], block_bytes(kv, 6))
    time.sleep(0.1)
    assert not io.take_events()[0], "the early promotion is not started twice"


@pytest.mark.parametrize("no_forward", [True, False])
def test_a_step_without_a_forward_waits_briefly_for_its_reads_to_report_them(
        worker, monkeypatch, no_forward):
    """On a step vLLM scheduled no tokens for (requests only wait, some for this very
    promotion), the worker waits for the step's reads before reporting, so the waiting
    request loads a step sooner; a step with a forward never waits for them."""
    import vllm_promptcache.connector.worker as worker_module

    w, kv = worker
    keys = [os.urandom(16)]
    w._save("r9", None, [TierWrite("r9", "f9", keys, [4])], None)
    io = w.secondary["disk"]
    assert write_events(io, 1) == [(WRITE, "f9", True)]
    w.get_finished(set())
    slowed(monkeypatch, io, "_read_one", 0.05)
    monkeypatch.setattr(worker_module, "IDLE_STEP_READ_WAIT_S", 5.0)
    meta = PromptCacheMetadata(promotions=[Promotion("p9", "f9", [0], [2], keys)],
                               no_forward=no_forward)
    w.start_promotions(meta)
    w.wait_for_save(meta)
    reported = w.build_worker_meta()
    if no_forward:
        assert [e[:3] for e in reported.events] == [(PROMOTE, "p9", True)]
        assert torch.equal(w.buffer.data[2], block_bytes(kv, 4))
    else:
        assert reported is None, "a step with a forward does not wait for reads"
        assert [e[:3] for e in write_events(io, 1)] == [(PROMOTE, "p9", True)]


@pytest.mark.parametrize("no_forward", [True, False])
def test_a_step_without_a_forward_waits_for_a_write_in_flight_to_end(
        worker, monkeypatch, no_forward):
    """vLLM keeps an idle engine stepping while writes drain (has_pending_push_work),
    only to hear of them.  A step without a forward waits for one to end and reports
    it, rather than returning at once and being called again about every millisecond;
    a step with a forward never waits for a write."""
    import vllm_promptcache.connector.worker as worker_module

    w, kv = worker
    io = w.secondary["disk"]
    slowed(monkeypatch, io, "_write", 0.2)
    monkeypatch.setattr(worker_module, "IDLE_STEP_READ_WAIT_S", 5.0)
    monkeypatch.setattr(worker_module, "IDLE_STEP_WRITE_WAIT_S", 5.0)
    w._save("r8", None, [TierWrite("r8", "f8", [os.urandom(16)], [4])], None)
    assert io.writes_in_flight()
    meta = PromptCacheMetadata(no_forward=no_forward)
    started = time.monotonic()
    w.wait_for_save(meta)
    reported = w.build_worker_meta()
    if no_forward:
        assert [e[:3] for e in reported.events] == [(WRITE, "f8", True)]
        assert not io.writes_in_flight()
    else:
        assert time.monotonic() - started < 0.15, "a step with a forward does not wait"
        assert reported is None or not reported.events
        assert write_events(io, 1) == [(WRITE, "f8", True)]


def disk_block(w, name, block):
    """A one-block disk file `name` holding GPU block `block`; returns its key."""
    key = os.urandom(16)
    w._save(name, None, [TierWrite(name, name, [key], [block])], None)
    assert write_events(w.secondary["disk"], 1) == [(WRITE, name, True)]
    w.get_finished(set())
    return key


def test_a_direct_read_lands_before_the_load_that_reads_it(worker):
    """A promotion for a request that loads its slots in the same step (a direct read)
    is read first, then copied: the GPU block gets the disk block, no load error."""
    w, kv = worker
    key = disk_block(w, "d1", 4)
    meta = PromptCacheMetadata(loads=[BlockTransfer("r", [3], [2])],
                               promotions=[Promotion("p", "d1", [0], [2], [key], for_req="r")])
    w.start_promotions(meta)
    assert not w.secondary["disk"].take_events()[0], "not started before the loads are known"
    w.start_load_kv(meta)
    assert torch.equal(kv["layers.0"][3], kv["layers.0"][4])
    assert torch.equal(kv["layers.1"][3], kv["layers.1"][4])
    w.wait_for_save(meta)
    assert w.take_load_errors() == set()
    assert [e[:3] for e in w.build_worker_meta().events] == [(PROMOTE, "p", True)], \
        "read once, reported to the scheduler side"


def test_a_direct_read_that_fails_is_a_load_error_and_never_copied(worker):
    w, kv = worker
    key = disk_block(w, "d2", 4)
    os.unlink(w.secondary["disk"].path("d2"))  # gone (another engine evicted it)
    untouched = block_bytes(kv, 5).clone()
    meta = PromptCacheMetadata(loads=[BlockTransfer("r", [3, 5], [1, 2])],
                               promotions=[Promotion("p", "d2", [0], [2], [key], for_req="r")])
    w.start_promotions(meta)
    w.start_load_kv(meta)
    w.wait_for_save(meta)
    assert w.take_load_errors() == {5}, "the block the read should have filled"
    assert w.take_load_errors() == set(), "reported once"
    assert torch.equal(block_bytes(kv, 3), w.buffer.data[1]), "the rest of the load is made"
    assert torch.equal(block_bytes(kv, 5), untouched), "nothing copied from the empty slot"
    stats = w.get_kv_connector_stats().data["counter"]
    assert stats["load_errors_total|disk"] == 1 and stats["direct_read_blocks_total|disk"] == 1


def test_a_direct_read_into_a_slot_another_load_reads_waits_and_its_block_is_recomputed(
        worker):
    """The scheduler gave the read a slot another request of the same step loads (what
    the slot held before): that load gets the old bytes, the read runs after the loads,
    and the reading request's block is reported for vLLM to recompute."""
    w, kv = worker
    key = disk_block(w, "d3", 4)
    w._save("old", BlockTransfer("old", [8], [2]), [], None)  # slot 2 holds block 8
    w.get_finished(set())
    meta = PromptCacheMetadata(
        loads=[BlockTransfer("other", [6], [2]), BlockTransfer("r", [3], [2])],
        promotions=[Promotion("p", "d3", [0], [2], [key], for_req="r")])
    w.start_promotions(meta)
    w.start_load_kv(meta)
    assert torch.equal(kv["layers.0"][6], kv["layers.0"][8]), "the old bytes"
    w.wait_for_save(meta)
    assert w.take_load_errors() == {3}
    assert [e[:3] for e in write_events(w.secondary["disk"], 1)] == [(PROMOTE, "p", True)]
    assert torch.equal(w.buffer.data[2], block_bytes(kv, 4)), "read after the loads"

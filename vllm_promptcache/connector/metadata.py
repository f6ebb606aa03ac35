"""What one engine step must move, sent from the scheduler side to the workers,
and what the workers report back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..compat import connector_base

_, KVConnectorMetadata, _, _KVConnectorWorkerMetadata = connector_base()


@dataclass
class BlockTransfer:
    """Copy between GPU blocks `block_ids[i]` and host slots `slots[i]` for one request."""

    req_id: str
    block_ids: list[int]
    slots: list[int]

    def __post_init__(self):
        assert len(self.block_ids) == len(self.slots), "one slot per block"


@dataclass
class TierWrite:
    """Write GPU blocks `block_ids` of a finished request into a tier below host, as
    object `object_id` (a disk file, or a remote write job)."""

    req_id: str
    object_id: str
    keys: list[bytes]
    block_ids: list[int]
    tier: str = "disk"


@dataclass
class Promotion:
    """Read blocks `indices` of object `object_id` (a disk file, a remote chunk) into
    host slots `slots`; block `indices[i]` must hold `keys[i]` (the reader checks the
    object's header)."""

    promo_id: str
    object_id: str
    indices: list[int]
    slots: list[int]
    keys: list[bytes] = field(default_factory=list)
    tier: str = "disk"  # which tier below host holds object `object_id`
    # A read in the loading step (direct): this step's loads of request `for_req` read
    # these slots, after the read; a failed read is a load error of those blocks
    for_req: str = ""


@dataclass
class ShiftedLoad:
    """Token-wise host -> GPU copy at new positions: token t comes from host slot
    `src_slots[t]`, offset `src_offsets[t]`, and goes to paged slot `dst_slots[t]`
    (block_id * block_size + offset) with K rotated by `deltas[t]` positions.  The
    arrays are int64 numpy arrays (lists are accepted too): built and consumed
    without a Python step per token."""

    req_id: str
    src_slots: Sequence[int]
    src_offsets: Sequence[int]
    dst_slots: Sequence[int]
    deltas: Sequence[int]


@dataclass
class PromptCacheMetadata(KVConnectorMetadata):
    # host -> GPU, needed by this step's forward (synchronous loads)
    loads: list[BlockTransfer] = field(default_factory=list)
    # host -> GPU at new positions (position-independent reuse), also this step
    shifted_loads: list[ShiftedLoad] = field(default_factory=list)
    # Blocks of `loads` that this step's forward also writes KV into (a stored run's
    # partial last block, a block vLLM took part of): copied before the forward, since
    # vLLM writes a layer's new KV before that layer waits for its load
    shared_blocks: list[int] = field(default_factory=list)
    # GPU -> host, of finished requests whose blocks vLLM keeps until we report them
    saves: list[BlockTransfer] = field(default_factory=list)
    # GPU -> disk and remote (write-through), of the same finished requests
    tier_writes: list[TierWrite] = field(default_factory=list)
    # disk or remote -> host, for queued requests (prefetch) and lookups that found
    # blocks below host
    promotions: list[Promotion] = field(default_factory=list)
    # vLLM schedules no tokens this step (requests only wait, some for these
    # promotions): the worker may wait briefly for reads in flight, which then report
    # at this step's end instead of a step later
    no_forward: bool = False

    def is_empty(self) -> bool:
        return not (self.loads or self.shifted_loads or self.saves or self.tier_writes
                    or self.promotions)


if _KVConnectorWorkerMetadata is not None:
    @dataclass
    class PromptCacheWorkerMeta(_KVConnectorWorkerMetadata):
        """What workers report to the scheduler side after a step."""

        # Requests whose host save failed on some worker: never serve their slots.
        failed_saves: set[str] = field(default_factory=set)
        # Finished background jobs, one entry per worker: (kind, id, ok[, seconds]),
        # kind "write" (a tier object) or "promote" (a tier -> host); a promotion
        # carries the seconds its read took on the worker (the tier's own rate,
        # without the engine steps between its issue and its report).  The
        # scheduler side waits for every rank's entry.
        events: list[tuple] = field(default_factory=list)
        # Disk files found corrupt (and deleted) by some worker.
        corrupt_objects: set[str] = field(default_factory=set)
        # Disk files some worker could not find (deleted by another engine).
        missing_objects: set[str] = field(default_factory=set)

        def aggregate(self, other):
            self.failed_saves |= other.failed_saves
            self.events.extend(other.events)
            self.corrupt_objects |= other.corrupt_objects
            self.missing_objects |= other.missing_objects
            return self
else:  # pragma: no cover - a vLLM without worker metadata: failures are logged only
    PromptCacheWorkerMeta = None

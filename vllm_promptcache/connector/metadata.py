"""What one engine step must move, sent from the scheduler side to the workers,
and what the workers report back."""

from __future__ import annotations

from dataclasses import dataclass, field

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
class PromptCacheMetadata(KVConnectorMetadata):
    # host -> GPU, needed by this step's forward (synchronous loads)
    loads: list[BlockTransfer] = field(default_factory=list)
    # GPU -> host, of finished requests whose blocks vLLM keeps until we report them
    saves: list[BlockTransfer] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.loads or self.saves)


if _KVConnectorWorkerMetadata is not None:
    @dataclass
    class PromptCacheWorkerMeta(_KVConnectorWorkerMetadata):
        """Requests whose save failed on some worker: their slots must never be served."""

        failed_saves: set[str] = field(default_factory=set)

        def aggregate(self, other):
            # A save is good only if every TP rank wrote its shard.
            self.failed_saves |= other.failed_saves
            return self
else:  # pragma: no cover - a vLLM without worker metadata: failures are logged only
    PromptCacheWorkerMeta = None

"""Scheduler side of prompt modules: which registered modules hold which pinned host
slots, and whether a new one fits.

A module's encoding request finishes like any other (scheduler.py saves its blocks);
then its host slots are pinned here, its segment is pinned for position-independent
lookups, and layouts (layouts.py) read its tokens and block keys by name.  Modules may
pin at most `MODULE_SHARE` of the host tier, so conversations keep room; a module
registered again under its name replaces the old one, whose pins are released.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from dataclasses import dataclass
from typing import Any, Callable

from .. import request_params
from ..store.host_tier import HostTier
from ..store.keys import BlockKey

logger = logging.getLogger("vllm.promptcache")  # as scheduler.py's

# Pinned prompt modules may fill at most this share of the host tier: the rest stays
# for conversations.
MODULE_SHARE = 0.5


@dataclass
class PinnedModule:
    """A registered prompt module: its host slots stay pinned."""

    slots: list[int]
    seg_id: int | None
    tokens: tuple[int, ...] = ()  # its encoding sequence
    keys: tuple[BlockKey, ...] = ()  # the blocks that sequence is stored under
    version: bytes = b""  # the digest of its tokens: what a layout planned with


def module_version(tokens: tuple[int, ...]) -> bytes:
    return hashlib.blake2b(array("q", tokens).tobytes(), digest_size=16).digest()


def module_failed(module: str, error: str) -> dict:
    """The kv_transfer_params result of a module that could not be registered."""
    logger.warning("promptcache: %s", error)
    return {request_params.RESULT: {"module": module, "ok": False, "error": error}}


class PinnedModules:
    def __init__(self, host: HostTier, shifted: Any, block_size: int, slot_bytes: int,
                 world_size: int):
        self.host = host
        self.shifted = shifted  # ShiftedReuse, or None without position-independent reuse
        self.block_size = block_size
        self.slot_bytes = slot_bytes
        self.world_size = world_size
        self.budget = int(host.num_slots * MODULE_SHARE)
        self._modules: dict[str, PinnedModule] = {}
        # Called when a module is pinned or dropped (layouts re-read their modules).
        self.on_change: Callable[[], None] = lambda: None

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def names(self) -> list[str]:
        return list(self._modules)

    def run(self, name: str) -> tuple[tuple[int, ...], tuple[BlockKey, ...]] | None:
        """A registered module's encoding tokens and block keys (for layouts)."""
        module = self._modules.get(name)
        return None if module is None or not module.keys else (module.tokens, module.keys)

    def version(self, name: str) -> bytes | None:
        """The registered module's version (the digest of its encoding's tokens): a
        name registered again with other text has another."""
        module = self._modules.get(name)
        return None if module is None else module.version

    def refusal(self, name: str, n_blocks: int, prompt_tokens: int) -> str | None:
        """Why module `name` of n_blocks cannot be pinned, or None if it can."""
        if n_blocks * self.block_size < prompt_tokens:
            # The encoding sequence is whole blocks; fewer means it was cut short.
            return (f"module {name!r}: its encoding was interrupted ({n_blocks} of "
                    f"{-(-prompt_tokens // self.block_size)} blocks computed)")
        others = self.pinned_slots(skip=name)
        if others + n_blocks <= self.budget:
            return None
        mib = self.slot_bytes * self.world_size / 2**20
        return (f"module {name!r} needs {n_blocks} KV blocks ({n_blocks * mib:.1f} MiB); prompt "
                f"modules may pin at most {self.budget} of the host tier's "
                f"{self.host.num_slots} blocks ({MODULE_SHARE:.0%}) and {others} are pinned "
                f"already: raise --promptcache-host-gb or register fewer/shorter modules")

    def pinned_slots(self, skip: str | None = None) -> int:
        """Host slots pinned by modules (other than `skip`); a block that several
        modules share counts once."""
        return len(set().union(*(m.slots for n, m in self._modules.items() if n != skip)))

    def pin(self, name: str, keys: list[BlockKey], seg_id: int | None,
            tokens: tuple[int, ...]) -> dict:
        """Pin a finished encoding's blocks under `name`; the request's result."""
        slots = [s for s in self.host.slots_of(keys) if s is not None]
        if len(slots) < len(keys):
            return module_failed(name, f"module {name!r}: the host tier had room for "
                                       f"{len(slots)} of its {len(keys)} blocks (the rest "
                                       f"is pinned or being written)")
        self.drop(name)
        self.host.pin(slots)
        if seg_id is not None:
            self.shifted.pin(seg_id)
        self._modules[name] = PinnedModule(slots, seg_id, tokens, tuple(keys),
                                           module_version(tokens))
        self.on_change()
        logger.info("promptcache: module %r registered: %d tokens in %d pinned blocks (%d of %d "
                    "module blocks in use)", name, len(keys) * self.block_size, len(slots),
                    self.pinned_slots(), self.budget)
        return {request_params.RESULT: {"module": name, "ok": True, "blocks": len(slots),
                                        "bytes": len(slots) * self.slot_bytes * self.world_size}}

    def drop(self, name: str) -> None:
        old = self._modules.pop(name, None)
        if old is None:
            return
        self.on_change()
        self.host.unpin(old.slots)
        if old.seg_id is not None and self.shifted is not None:
            self.shifted.unpin(old.seg_id)

    def drop_all(self) -> list[str]:
        """Unpin every module (a reset: their KV was made by the old weights); their names."""
        names = list(self._modules)
        for name in names:
            self.drop(name)
        return names

    def slots_lost(self, released: set[int]) -> None:
        """Writes into these host slots failed: drop every module pinned on one of them
        (its own save, or another request's save or promotion of the same blocks)."""
        for name, module in list(self._modules.items()):
            if released.intersection(module.slots):
                logger.warning("promptcache: saving module %r failed; it will be computed "
                               "where it appears until registered again", name)
                self.drop(name)

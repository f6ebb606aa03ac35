"""The host-RAM tier's index: which block key sits in which fixed-size slot.

This object lives on the scheduler side and never touches bytes; the bytes are in
`HostBuffer` in each worker, addressed by the same slot numbers.  A slot is FREE,
PENDING (a save into it is in flight: not servable, not evictable) or READY.
Pinned READY slots are not evicted either, and are not in the policy's order at
all (a pin takes a slot out, the last unpin puts it back as the most recent), so
finding a victim never walks over them: reserving N slots in a full tier costs
O(N) however many cold pinned slots it holds.  `queued` counts the keys that
requests waiting in vLLM's queue will read; scheduler-aware policies evict those
last.  The number of slots is fixed at
start (`slots_for`), so the tier can never hold more than its byte bound.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter
from typing import Callable, Sequence

from .keys import BlockKey
from .policies import EvictionPolicy, urgency_reader


class SlotState(enum.Enum):
    FREE = 0
    PENDING = 1
    READY = 2


class HostTierTooSmall(ValueError):
    pass


def slots_for(capacity_bytes: int, slot_bytes: int) -> int:
    """How many whole slots fit in the byte bound; both sides use this one formula."""
    if slot_bytes <= 0:
        raise ValueError("slot_bytes must be positive")
    n = capacity_bytes // slot_bytes
    if n < 1:
        raise HostTierTooSmall(
            f"--promptcache-host-gb is too small: one KV block of this model needs "
            f"{slot_bytes} bytes, the host tier has {capacity_bytes}")
    return n


class HostTier:
    name = "host"

    def __init__(self, num_slots: int, slot_bytes: int, policy: EvictionPolicy,
                 queued: Counter[BlockKey] | None = None):
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self._policy = policy
        self._lock = threading.RLock()
        self._state = [SlotState.FREE] * num_slots
        self._key_of_slot: list[BlockKey | None] = [None] * num_slots
        self._slot_of_key: dict[BlockKey, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self._pins: Counter[int] = Counter()
        self._queued = queued if queued is not None else Counter()
        self._urgency = urgency_reader(self._queued)
        self.evictions = 0

    # -- queries ---------------------------------------------------------------
    def __contains__(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._slot_of_key

    def ready_prefix(self, keys: Sequence[BlockKey], touch: bool = True) -> list[int]:
        """Slots of the longest leading run of `keys` that is READY."""
        with self._lock:
            slots = []
            for key in keys:
                slot = self._slot_of_key.get(key)
                if slot is None or self._state[slot] is not SlotState.READY:
                    break
                slots.append(slot)
            if touch:
                self._touch(slots)
            return slots

    def slots_of(self, keys: Sequence[BlockKey]) -> list[int | None]:
        """The slot of each key (READY or PENDING), None where it is not resident."""
        with self._lock:
            return [self._slot_of_key.get(key) for key in keys]

    def is_pending(self, key: BlockKey) -> bool:
        """A save of this key is in flight: it will be READY (or gone) shortly."""
        with self._lock:
            slot = self._slot_of_key.get(key)
            return slot is not None and self._state[slot] is SlotState.PENDING

    @property
    def used_slots(self) -> int:
        with self._lock:
            return self.num_slots - len(self._free)

    @property
    def bytes_in_use(self) -> int:
        return self.used_slots * self.slot_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def state(self, slot: int) -> SlotState:
        return self._state[slot]

    def touch(self, slots: Sequence[int]) -> None:
        """These READY slots were just read (by a load planned from their slots)."""
        with self._lock:
            self._touch(slots)

    # -- writes ----------------------------------------------------------------
    def reserve(self, keys: Sequence[BlockKey],
                spare: Callable[[BlockKey], bool] | None = None) -> list[tuple[int, int]]:
        """Claim PENDING slots for the keys not yet resident.

        Returns (index into keys, slot) pairs.  Keys already resident are only
        touched.  Stops at the first key no slot can be found for: with chained
        keys, a block whose predecessor is missing could never be hit anyway.
        Resident blocks whose key `spare` accepts are not evicted for these.
        """
        with self._lock:
            out = []
            for i, key in enumerate(keys):
                if key in self._slot_of_key:
                    continue
                slot = self._allocate(spare)
                if slot is None:
                    break
                self._state[slot] = SlotState.PENDING
                self._key_of_slot[slot] = key
                self._slot_of_key[key] = slot
                out.append((i, slot))
            self._touch([self._slot_of_key[k] for k in keys if k in self._slot_of_key])
            return out

    def commit(self, slots: Sequence[int]) -> None:
        """Saves into these slots finished: they become servable."""
        with self._lock:
            # Tail first, so the run's head is the most recent (see _touch).
            for slot in reversed(slots):
                if self._state[slot] is SlotState.PENDING:
                    self._state[slot] = SlotState.READY
                    if not self._pins.get(slot):
                        self._policy.inserted(slot)

    def abort(self, slots: Sequence[int]) -> list[int]:
        """Saves into these slots failed: forget them; returns the slots released."""
        with self._lock:
            released = []
            for slot in slots:
                if self._state[slot] is SlotState.PENDING:
                    self._release(slot)
                    released.append(slot)
            return released

    def pin(self, slots: Sequence[int]) -> None:
        """Never evict these slots (prompt modules) until unpinned; pins count."""
        with self._lock:
            for s in slots:
                if not self._pins.get(s) and self._state[s] is SlotState.READY:
                    self._policy.removed(s)  # out of the order while pinned
                self._pins[s] += 1

    def unpin(self, slots: Sequence[int]) -> None:
        with self._lock:
            for s in slots:
                if s not in self._pins:
                    continue
                self._pins[s] -= 1
                if self._pins[s] <= 0:
                    del self._pins[s]
                    if self._state[s] is SlotState.READY:
                        self._policy.inserted(s)

    def clear(self) -> int:
        """Drop every READY, unpinned entry; returns how many were dropped."""
        with self._lock:
            dropped = 0
            for slot in range(self.num_slots):
                if self._state[slot] is SlotState.READY and not self._pins.get(slot):
                    self._release(slot)
                    dropped += 1
            return dropped

    # -- internals -------------------------------------------------------------
    def _touch(self, slots: Sequence[int]) -> None:
        # Reverse order, so a sequence's first block ends up most recent: with
        # chained keys the head of a run is worth more than its tail, and a
        # policy that evicts the oldest first then trims runs from the end.
        for slot in reversed(slots):
            if self._state[slot] is SlotState.READY:
                self._policy.accessed(slot)

    def _evictable(self, slot) -> bool:
        return self._state[slot] is SlotState.READY and not self._pins.get(slot)

    def _is_queued(self, slot) -> int:
        """How soon a waiting request (or live head) reads the slot: 0 for never (a
        `queued` without urgencies: 1 for any)."""
        key = self._key_of_slot[slot]
        return 0 if key is None else self._urgency(key)

    def _allocate(self, spare: Callable[[BlockKey], bool] | None = None) -> int | None:
        if self._free:
            return self._free.pop()
        evictable = self._evictable
        if spare is not None:
            def evictable(slot):
                return self._evictable(slot) and not spare(self._key_of_slot[slot])
        victim = self._policy.victim(evictable, self._is_queued)
        if victim is None:
            return None
        self._release(victim)
        self.evictions += 1
        return self._free.pop()

    def _release(self, slot: int) -> None:
        key = self._key_of_slot[slot]
        if key is not None:
            self._slot_of_key.pop(key, None)
        self._key_of_slot[slot] = None
        if self._state[slot] is SlotState.READY:
            self._policy.removed(slot)
        self._pins.pop(slot, None)
        self._state[slot] = SlotState.FREE
        self._free.append(slot)

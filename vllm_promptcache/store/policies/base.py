"""The interface every tier's eviction policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Hashable


def _nothing_queued(entry: Hashable) -> bool:
    return False


def urgency_reader(queued) -> Callable[[Hashable], int]:
    """How soon a waiting request reads a key, from what a tier was given as `queued`:
    its `urgency(key)` where it has one (connector/queued_keys.py, sessions.EvictLast),
    else 1 for a key it counts (a plain Counter) and 0 for one it does not."""
    urgency = getattr(queued, "urgency", None)
    if urgency is not None:
        return urgency
    return lambda key: int(queued.get(key, 0) > 0)


class EvictionPolicy(ABC):
    """Orders a tier's resident entries for eviction.

    The tier tells the policy what was inserted, used and removed; the policy
    only answers which evictable entry should go next.  Entries the tier cannot
    give up (pinned, being written) are filtered by `evictable`; `queued` says
    whether a request waiting in vLLM's queue will read the entry, for policies
    that look at the scheduler: 0 (or False) for no, else how soon (higher: sooner).
    """

    # True when `victim` reads `queued`: the scheduler side then tells the tier
    # which entries its waiting requests will read (otherwise it need not ask).
    queue_aware: bool = False

    @abstractmethod
    def inserted(self, entry: Hashable) -> None: ...

    @abstractmethod
    def accessed(self, entry: Hashable) -> None: ...

    @abstractmethod
    def removed(self, entry: Hashable) -> None: ...

    @abstractmethod
    def victim(self, evictable: Callable[[Hashable], bool],
               queued: Callable[[Hashable], int] = _nothing_queued) -> Hashable | None:
        """The entry to evict next, or None if nothing evictable is resident."""

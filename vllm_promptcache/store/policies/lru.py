"""Least-recently-used eviction; blind to the scheduler's queue."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

from .base import EvictionPolicy, _nothing_queued


class LruPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()
        # Entries `oldest` looked at: a test's step counter (tiers keep entries they
        # cannot give up, such as pinned ones, out of the order, so this stays small).
        self.steps = 0

    def inserted(self, entry: Hashable) -> None:
        self._order[entry] = None
        self._order.move_to_end(entry)

    def accessed(self, entry: Hashable) -> None:
        if entry in self._order:
            self._order.move_to_end(entry)

    def removed(self, entry: Hashable) -> None:
        self._order.pop(entry, None)

    def oldest(self, accept: Callable[[Hashable], bool]) -> Hashable | None:
        for entry in self._order:  # oldest first
            self.steps += 1
            if accept(entry):
                return entry
        return None

    def victim(self, evictable: Callable[[Hashable], bool],
               queued: Callable[[Hashable], bool] = _nothing_queued) -> Hashable | None:
        return self.oldest(evictable)

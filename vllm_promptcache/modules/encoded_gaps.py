"""Which gap encodings a front end has run, and the engine's word when one is gone.

A gap encoding (layout.py) serves every prompt of its template, so a front end runs
it once per template rather than once per prompt: its latency (a prefill of the gap
tokens and one sampled token) is then paid on a template's first prompt only.  Its KV
is ordinary host KV and ages out, though; the scheduler side reports a template whose
gaps it could not find, or that it forgot, in its stats payload
(connector/layouts.py, `PromptCacheStats.gaps_missing`), which vLLM hands to this
process's metrics logger (metrics.py); that report drops the template here, so the
next prompt of it is encoded again.  A prompt sent in between is served correctly,
only slower (its gaps and what follows are prefilled).

Skipping needs that word: until a stats payload has arrived in this process (vLLM's
stat logging off, say), every prompt runs its gap encoding, as before.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Iterable

# Templates remembered per front end: a bound below the scheduler side's
# (layouts.MAX_TEMPLATES), which reports the ones it drops anyway.
MAX_REMEMBERED = 128

_lock = threading.Lock()
_memos: "weakref.WeakSet[EncodedGaps]" = weakref.WeakSet()
_engine_reports = False  # has any stats payload reached this process?


class EncodedGaps:
    """The templates (by key) whose gap encoding this front end has run."""

    def __init__(self) -> None:
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        with _lock:
            _memos.add(self)

    def __contains__(self, key: bytes) -> bool:
        with _lock:
            if not _engine_reports or key not in self._keys:
                return False
            self._keys.move_to_end(key)
            return True

    def add(self, key: bytes) -> None:
        with _lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            while len(self._keys) > MAX_REMEMBERED:
                self._keys.popitem(last=False)


def engine_reported(missing: Iterable[str] = ()) -> None:
    """A stats payload arrived (metrics.py); `missing` are the hex keys of templates
    whose gaps the engine could not find: every front end here forgets them."""
    global _engine_reports
    keys = [bytes.fromhex(k) for k in missing]
    with _lock:
        _engine_reports = True
        for memo in list(_memos) if keys else ():
            for key in keys:
                memo._keys.pop(key, None)

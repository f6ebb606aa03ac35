"""Scheduler side of composed-prompt layouts (modules/layout.py).

A front end that composed a prompt from modules and text sends, before the prompt,
the gap encoding: one request whose tokens are the gaps (the text between modules,
BOS first) and whose `kv_transfer_params` carry the prompt's layout and the plugin's
module token.  Here that request is *announced*: the prompt's tokens up to the
layout's end are rebuilt from the registered modules' tokens and the gap request's own
tokens, and remembered by their digest.  The gap request itself runs as a plain
exact request (it is never shift-loaded), so its KV is saved under exact keys, in
host, and ages out like any conversation's.

When a prompt arrives whose leading tokens have a remembered digest, its load is
planned from the layout: every span -- module or gap -- read from its stored run at
its own position (`ShiftedReuse.add_run`), contiguous up to the layout's end, so vLLM
computes only what follows the last module.  Everything is checked by content: a
module's tokens are the registered ones, a gap's are the prompt's own, and each run is
found by its exact block keys, so a stale or forged layout can only miss.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..modules.layout import Layout, LayoutError
from ..store.keys import BlockKey, BlockKeyer
from .shifted import ShiftedPlan, ShiftedReuse
from .tails import RunTails

logger = logging.getLogger("vllm.promptcache")

# Layouts remembered at most (most recently announced or used first to stay).
MAX_LAYOUTS = 1024


def digest(tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class _Entry:
    layout: Layout
    gap_keys: list[BlockKey]  # the gap encoding's exact block keys
    gap_offsets: list[int]    # where each gap span starts in the gap encoding


class Layouts:
    """Announced layouts, by the digest of the prompt tokens they cover."""

    def __init__(self, keyer: BlockKeyer, shifted: ShiftedReuse,
                 module_run: Callable[[str], tuple[Sequence[int], list[BlockKey]] | None],
                 tails: RunTails):
        self.keyer = keyer
        self.tails = tails
        self.block_size = keyer.block_size
        self.shifted = shifted
        # name -> (encoding tokens, block keys) of a registered module, or None.
        self.module_run = module_run
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._ends: Counter[int] = Counter()  # layout end -> entries with that end
        self._found: dict[str, _Entry | None] = {}  # per request, looked up once

    def __len__(self) -> int:
        return len(self._entries)

    def announce(self, request: Any, value: Any) -> str | None:
        """Remember the layout a gap encoding carries; the reason it was refused, or None."""
        try:
            layout = Layout.from_params(value)
        except LayoutError as e:
            return str(e)
        gap_seq = list(request.all_token_ids[:request.num_prompt_tokens])
        offsets = layout.gap_offsets()
        if layout.gap_tokens > len(gap_seq) or not layout.gap_spans:
            return "the layout's gaps are not this request's tokens"
        prefix: list[int] = []
        gap_index = 0
        for span in layout.spans:
            if span.module is None:
                at = offsets[gap_index]
                prefix.extend(gap_seq[at:at + span.length])
                gap_index += 1
                continue
            run = self.module_run(span.module)
            if run is None:
                return f"module {span.module!r} is not registered on this engine"
            tokens, _ = run
            if span.offset + span.length > len(tokens):
                return f"a span is longer than module {span.module!r}"
            prefix.extend(tokens[span.offset:span.offset + span.length])
        key = digest(prefix)
        old = self._entries.pop(key, None)
        if old is not None:
            self._ends[old.layout.end] -= 1
        # The gap encoding's blocks: whole ones, then its partial last block (saved
        # as a run's tail, under the key tails.py gives it).
        gap_keys = self.keyer.block_keys(gap_seq)
        if len(gap_seq) % self.block_size:
            gap_keys.append(self.tails.key(gap_keys, len(gap_keys), None, gap_seq,
                                           len(gap_seq) % self.block_size))
        self._entries[key] = _Entry(layout, gap_keys, offsets)
        self._ends[layout.end] += 1
        while len(self._entries) > MAX_LAYOUTS:
            _, dropped = self._entries.popitem(last=False)
            self._ends[dropped.layout.end] -= 1
        self._ends = +self._ends  # drop ends no entry has any more
        logger.debug("promptcache: request %s encodes %d gap tokens of a %d-span layout "
                     "(%d tokens)", request.request_id, layout.gap_tokens, len(layout.spans),
                     layout.end)
        return None

    def find(self, request: Any) -> _Entry | None:
        """The announced layout this request's prompt starts with (looked up once per
        request: a digest per distinct layout length)."""
        if not self._entries:
            return None
        req_id = request.request_id
        if req_id in self._found:
            return self._found[req_id]
        tokens = request.all_token_ids[:request.num_prompt_tokens]
        entry = None
        for end in sorted(self._ends, reverse=True):
            if end <= len(tokens):
                key = digest(tokens[:end])
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    break
        self._found[req_id] = entry
        return entry

    def forget(self, req_id: str) -> None:
        self._found.pop(req_id, None)

    def plan(self, entry: _Entry, start: int, limit: int) -> ShiftedPlan:
        """Sources for prompt tokens [start, min(limit, layout end)), span by span,
        contiguous from `start` and as far as their blocks are READY in host."""
        plan = ShiftedPlan(start, self.block_size)
        end = min(limit, entry.layout.end)
        gap_index = -1
        for span in entry.layout.spans:
            if span.module is None:
                gap_index += 1
            if span.end <= start:
                continue
            if span.start >= end:
                break
            if span.module is None:
                keys, offset = entry.gap_keys, entry.gap_offsets[gap_index]
            else:
                run = self.module_run(span.module)
                if run is None:  # dropped since the announcement
                    break
                keys, offset = run[1], span.offset
            first = max(span.start, start)
            n = min(span.end, end) - first
            if not self.shifted.add_run(plan, keys, offset + (first - span.start), n,
                                        span.start - offset, gap=span.module is None):
                break
        return plan

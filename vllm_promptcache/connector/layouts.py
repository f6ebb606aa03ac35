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

Each announcement also leaves its *template* (modules/layout.py): the gaps' tokens with
a slot for each module.  A prompt no announced layout covers is matched against the
templates it starts like: every gap must be its own tokens, in order, and each slot a
registered module's tokens, found by their first tokens (`HEAD`).  So one gap
encoding serves every later prompt with the same text between modules, in any module
order and from any client, with no request of its own.  A template whose gaps are no
longer in host (aged out), or that is forgotten here, is reported to the front ends
(modules/encoded_gaps.py), which then encode it again.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..modules.layout import Layout, LayoutError, Span, Template, template_of
from ..store.keys import BlockKey, BlockKeyer
from .shifted import ShiftedPlan, ShiftedReuse
from .tails import RunTails

logger = logging.getLogger("vllm.promptcache")

# Layouts remembered at most (most recently announced or used first to stay).
MAX_LAYOUTS = 1024
# Templates remembered at most (likewise); a dropped one is reported as missing.
MAX_TEMPLATES = 256
# A module slot is matched by this many of the module's first tokens (fewer for a
# shorter module), then checked whole.
HEAD = 8


def digest(tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class _Entry:
    layout: Layout
    gap_keys: list[BlockKey]  # the gap encoding's exact block keys
    gap_offsets: list[int]    # where each gap span starts in the gap encoding
    template: bytes | None = None  # its template's key
    # The version of each module the layout was built with: a module registered again
    # under its name with other text is not the one the prompt holds.
    versions: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Template:
    template: Template
    gap_keys: list[BlockKey]


class Layouts:
    """Announced layouts, by the digest of the prompt tokens they cover."""

    def __init__(self, keyer: BlockKeyer, shifted: ShiftedReuse,
                 module_run: Callable[[str], tuple[Sequence[int], list[BlockKey]] | None],
                 tails: RunTails, module_names: Callable[[], Iterable[str]] = tuple,
                 module_version: Callable[[str], bytes | None] = lambda name: None):
        self.keyer = keyer
        self.tails = tails
        self.block_size = keyer.block_size
        self.shifted = shifted
        # name -> (encoding tokens, block keys) of a registered module, or None.
        self.module_run = module_run
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._ends: Counter[int] = Counter()  # layout end -> entries with that end
        self._found: dict[str, _Entry | None] = {}  # per request, looked up once
        self.module_names = module_names
        self.module_version = module_version
        self._templates: OrderedDict[bytes, _Template] = OrderedDict()
        self._by_head: dict[tuple[int, ...], list[bytes]] = {}  # first gap -> templates
        self._head_lengths: Counter[int] = Counter()  # len(first gap) -> templates
        self._missing: set[bytes] = set()  # templates to report (encoded_gaps.py)
        # Per offset into the encodings (1 after a BOS): HEAD tokens of each registered
        # module -> (name, its lengths to try), and the head lengths there are; rebuilt
        # when modules change.
        self._module_heads: dict[int, tuple[dict[tuple[int, ...], list[tuple[str, tuple[int, ...]]]],
                                            tuple[int, ...]]] = {}

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
        versions: dict[str, bytes] = {}
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
            versions[span.module] = self.module_version(span.module)
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
        template = template_of(layout, prefix)
        self._add_template(template, gap_keys)
        self._remember(key, _Entry(layout, gap_keys, offsets, template.key, versions))
        logger.debug("promptcache: request %s encodes %d gap tokens of a %d-span layout "
                     "(%d tokens)", request.request_id, layout.gap_tokens, len(layout.spans),
                     layout.end)
        return None

    def _remember(self, key: bytes, entry: _Entry) -> None:
        self._entries[key] = entry
        self._ends[entry.layout.end] += 1
        while len(self._entries) > MAX_LAYOUTS:
            _, dropped = self._entries.popitem(last=False)
            self._ends[dropped.layout.end] -= 1
        self._ends = +self._ends  # drop ends no entry has any more

    def _add_template(self, template: Template, gap_keys: list[BlockKey]) -> None:
        key = template.key
        if self._templates.pop(key, None) is None:
            self._by_head.setdefault(template.head, []).append(key)
            self._head_lengths[len(template.head)] += 1
        self._templates[key] = _Template(template, gap_keys)
        self._missing.discard(key)
        while len(self._templates) > MAX_TEMPLATES:
            old, dropped = self._templates.popitem(last=False)
            keys = self._by_head[dropped.template.head]
            keys.remove(old)
            if not keys:
                del self._by_head[dropped.template.head]
            self._head_lengths[len(dropped.template.head)] -= 1
            self._head_lengths = +self._head_lengths  # drop lengths no template has
            self._missing.add(old)  # the front ends must announce it again

    def clear(self) -> None:
        """Forget every layout and template (a reset: their gaps' KV is gone); the
        templates are reported missing, so the front ends encode them again."""
        self._missing.update(self._templates)
        self._entries.clear()
        self._ends.clear()
        self._found.clear()
        self._templates.clear()
        self._by_head.clear()
        self._head_lengths.clear()
        self._module_heads = {}

    def take_missing(self) -> list[bytes]:
        """Templates whose gaps were not found, or that were forgotten, since the last
        call: the front ends encode them again (modules/encoded_gaps.py)."""
        out, self._missing = list(self._missing), set()
        return out

    def modules_changed(self) -> None:
        self._module_heads = {}

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
        if entry is None and self._templates:
            entry = self._from_template(tokens)
            if entry is not None:
                self._remember(digest(tokens[:entry.layout.end]), entry)
        self._found[req_id] = entry
        return entry

    # -- templates -------------------------------------------------------------
    def _from_template(self, tokens: Sequence[int]) -> _Entry | None:
        """The layout of the most recent template these prompt tokens fit, if any."""
        for head in sorted(self._head_lengths, reverse=True):  # the most specific first
            for key in reversed(self._by_head.get(tuple(tokens[:head]), ())):
                entry = self._match(self._templates[key], tokens)
                if entry is not None:
                    self._templates.move_to_end(key)
                    return entry
        return None

    def _match(self, tpl: _Template, tokens: Sequence[int]) -> _Entry | None:
        spans: list[Span] = []
        offsets: list[int] = []
        versions: dict[str, bytes] = {}
        pos = at = 0
        for item in tpl.template.items:
            if isinstance(item, int):  # a module slot
                found = self._module_at(tokens, pos, item)
                if found is None:
                    return None
                name, length = found
                versions[name] = self.module_version(name)
                spans.append(Span(pos, pos + length, name, item))
                pos += length
            else:
                if tuple(tokens[pos:pos + len(item)]) != item:
                    return None
                spans.append(Span(pos, pos + len(item), None, 0))
                offsets.append(at)
                at += len(item)
                pos += len(item)
        return _Entry(Layout(tuple(spans)), tpl.gap_keys, offsets, tpl.template.key, versions)

    def _module_at(self, tokens: Sequence[int], pos: int, offset: int) -> tuple[str, int] | None:
        """The longest registered module whose tokens (from `offset` of its encoding)
        the prompt has at `pos`."""
        heads, head_lengths = self._heads(offset)
        best = None
        for n in head_lengths:
            for name, lengths in heads.get(tuple(tokens[pos:pos + n]), ()):
                run = self.module_run(name)
                if run is None:
                    continue
                for length in lengths:
                    if (best is None or length > best[1]) and tuple(
                            tokens[pos:pos + length]) == tuple(
                            run[0][offset:offset + length]):
                        best = (name, length)
        return best

    def _heads(self, offset: int) -> tuple[dict[tuple[int, ...], list[tuple[str, tuple[int, ...]]]],
                                           tuple[int, ...]]:
        """(HEAD tokens -> modules, the lengths those heads have) at `offset`."""
        if offset not in self._module_heads:
            heads: dict[tuple[int, ...], list[tuple[str, tuple[int, ...]]]] = {}
            for name in self.module_names():
                run = self.module_run(name)
                if run is None:
                    continue
                body = run[0][offset:]
                if not body:
                    continue
                # A module's encoding fills its last block with filler (registry.py):
                # try its length without a trailing run of the last token, then whole.
                end = len(body)
                while end > 1 and body[end - 1] == body[-1]:
                    end -= 1
                lengths = tuple(sorted({len(body), end}))
                heads.setdefault(tuple(body[:min(HEAD, end)]), []).append((name, lengths))
            self._module_heads[offset] = (heads, tuple(sorted({len(h) for h in heads})))
        return self._module_heads[offset]

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
                if run is None or self.module_version(span.module) != entry.versions.get(
                        span.module):
                    # Dropped, or registered again with other text, since the layout was
                    # built: the prompt holds the old text, which nothing stores now.
                    break
                keys, offset = run[1], span.offset
            first = max(span.start, start)
            n = min(span.end, end) - first
            if not self.shifted.add_run(plan, keys, offset + (first - span.start), n,
                                        span.start - offset, gap=span.module is None):
                if span.module is None and not plan.waiting and entry.template is not None:
                    self._missing.add(entry.template)  # aged out: encode it again
                break
        return plan

"""A composed prompt's layout: which tokens are modules, which are the text between them.

Prompt Cache's front ends (`compose`, `compose_pml`, requests naming modules) know where
each module sits in a prompt.  The connector can only load a contiguous run of tokens
from where vLLM's cache ends (vLLM's loading API is prefix-only), so one token of text
that nothing stores, between two modules, would end the loaded run there and leave
everything after it to be prefilled.  The layout makes the whole run loadable:

- every piece of text before the last module (labels, separators, chat markers,
  parameter arguments), with the prompt's BOS first, is a *gap*;
- the gaps are encoded together, before the prompt runs, as one short sequence of
  their own, ``[BOS] gap1 gap2 ...`` (one extra prefill of only the gap tokens, saved
  like any conversation -- its partial last block too, connector/tails.py -- and aged
  out like one);
- that encoding request carries the layout (`to_params`), so the scheduler side
  learns it and recognises the prompt when it arrives (by the digest of its tokens
  up to the layout's end), with whatever sampling parameters the caller chose;
- the prompt then loads every module and every gap at its own position (K rotated
  by the position delta), and vLLM computes only the text after the last module.

Gap tokens attend to what they were encoded with (BOS and the gaps before them), as a
module's tokens attend only to its own encoding: the same approximation as Prompt
Cache's, which the boundary fix (`recompute_ratio`) tempers at the tail.

Nothing is sent where the token-level search finds everything already: modules back
to back, each at least `min_piece` tokens long.

A layout with its modules left open is a *template* (`Template`): the gaps' tokens, in
order, and a slot where each module goes.  One gap encoding serves every prompt of
its template -- the same labels around any registered modules, in any order -- so a
front end runs it once per template (and again only when the engine reports its KV
gone), and the scheduler side matches later prompts to the template on its own
(connector/layouts.py).
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence, Union

from ..request_params import LAYOUT  # the key of an announcement in kv_transfer_params
# The most spans a layout may have (a bound on what one request makes the engine keep).
MAX_SPANS = 4096


class LayoutError(ValueError):
    """A layout announcement is malformed."""


@dataclass(frozen=True)
class Span:
    """Prompt tokens [start, end) come from module `module` (its encoding sequence's
    tokens from `offset` on), or, with module None, from the gap encoding."""

    start: int
    end: int
    module: str | None
    offset: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    spans: tuple[Span, ...]

    @property
    def end(self) -> int:
        """Tokens [0, end) are covered."""
        return self.spans[-1].end if self.spans else 0

    @property
    def gap_spans(self) -> list[Span]:
        return [s for s in self.spans if s.module is None]

    @property
    def gap_tokens(self) -> int:
        return sum(s.length for s in self.gap_spans)

    def gap_offsets(self) -> list[int]:
        """Where each gap span starts in the gap encoding (gaps in prompt order)."""
        out, at = [], 0
        for span in self.gap_spans:
            out.append(at)
            at += span.length
        return out

    def gap_sequence(self, prompt_ids: Sequence[int]) -> list[int]:
        """The gap encoding: the gaps' tokens in order (no filler: the partial last
        block is kept like any run's)."""
        return [t for span in self.gap_spans for t in prompt_ids[span.start:span.end]]

    def to_params(self) -> list[list]:
        return [[s.start, s.end, s.module, s.offset] for s in self.spans]

    @classmethod
    def from_params(cls, value: Any) -> "Layout":
        """The layout of an announcement; LayoutError if malformed (spans must tile
        [0, end) in order)."""
        if not isinstance(value, list) or not value or len(value) > MAX_SPANS:
            raise LayoutError(f"{LAYOUT} must be a list of 1..{MAX_SPANS} spans")
        spans, at = [], 0
        for item in value:
            if not (isinstance(item, (list, tuple)) and len(item) == 4):
                raise LayoutError(f"{LAYOUT}: a span is [start, end, module or null, offset]")
            start, end, module, offset = item
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end, offset)):
                raise LayoutError(f"{LAYOUT}: span bounds must be integers")
            if start != at or end <= start or offset < 0:
                raise LayoutError(f"{LAYOUT}: spans must tile the prompt from 0 in order")
            if module is not None and not (isinstance(module, str) and module):
                raise LayoutError(f"{LAYOUT}: a span's module is a name or null")
            spans.append(Span(start, end, module, offset))
            at = end
        return cls(tuple(spans))


def layout_of(boundaries: Sequence[Any], bos: int | None, min_piece: int,
              module_offset: int = 1) -> Layout | None:
    """The layout of a composed prompt (registry.Boundary list, after a BOS when `bos`
    is set; a module's tokens start at `module_offset` of its encoding, 1 after the
    encoding's BOS), or None where none is needed: no module, or modules the
    token-level search finds on its own (back to back, none shorter than `min_piece`)."""
    named = [i for i, b in enumerate(boundaries) if b.name is not None and b.end > b.start]
    if not named:
        return None
    covered = [b for b in boundaries[:named[-1] + 1] if b.end > b.start]
    has_gaps = any(b.name is None for b in covered)
    if not has_gaps and all(b.end - b.start >= min_piece for b in covered):
        return None
    head = 1 if bos is not None else 0
    if not (head or has_gaps):
        return None  # nothing to encode: no request could carry the layout
    # BOS starts the gap encoding, as it starts every module's.
    spans = [Span(0, 1, None, 0)] if head else []
    spans += [Span(b.start, b.end, b.name, module_offset if b.name is not None else 0)
              for b in covered]
    return Layout(tuple(spans))


# A template item: a gap's tokens, or a module slot (the offset its tokens start at
# in the module's encoding).
Item = Union[tuple[int, ...], int]


@dataclass(frozen=True)
class Template:
    """A layout with its modules left open: consecutive gaps merged into one item."""

    items: tuple[Item, ...]

    @cached_property
    def key(self) -> bytes:
        """The template's identity, the same on every side (front end and scheduler)."""
        h = hashlib.blake2b(digest_size=16)
        for item in self.items:
            if isinstance(item, int):
                h.update(b"m" + item.to_bytes(8, "little"))
            else:
                h.update(b"g" + len(item).to_bytes(8, "little") + array("q", item).tobytes())
        return h.digest()

    @property
    def head(self) -> tuple[int, ...]:
        """The first gap's tokens (what every prompt of the template starts with)."""
        return self.items[0] if self.items and not isinstance(self.items[0], int) else ()


def template_of(layout: Layout, prompt_ids: Sequence[int]) -> Template:
    """The template of a layout over a prompt (its gap tokens taken from the prompt)."""
    items: list[Item] = []
    for span in layout.spans:
        if span.module is not None:
            items.append(span.offset)
            continue
        tokens = tuple(prompt_ids[span.start:span.end])
        if items and not isinstance(items[-1], int):
            items[-1] = items[-1] + tokens
        else:
            items.append(tokens)
    return Template(tuple(items))

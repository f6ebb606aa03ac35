"""Position-independent reuse: find where stored token runs reappear in a new prompt.

Block keys (keys.py) only find a stored *prefix*.  When a conversation outgrows the
context window and its oldest turns are dropped, the new prompt is
``[system][turn k..n][new]`` while the stored KV is ``[system][turn 1..n]``: the system
part still matches at its old position, the kept turns match 1..k-1 turns earlier, and
neither boundary falls on a block boundary.  RoPE makes that KV reusable anyway (K is
rotated by the position delta when loaded, see kernels/rope_shift.py), so what the
scheduler needs is this index: given a prompt, which stored segment tokens cover it,
and at which delta.

How matches are found: every stored segment registers an *anchor* -- a hash of
`anchor_len` consecutive tokens -- at every `anchor_len`-th position.  Any exact match
of at least ``2 * anchor_len - 1`` tokens contains one whole anchor, and the anchor sits
within `anchor_len` tokens of the match's start; so the candidates for a match starting
at prompt position p are the anchor hits of the `anchor_len` prompt windows starting at
p .. p + anchor_len - 1.  That is why `min_piece` must be at least that long: then no
match worth taking is missed, and finding one costs `anchor_len` dictionary look-ups
plus a token comparison per candidate (whole slices compared in C, not per token),
independent of the prompt's and the index's size.

Tokens are kept as packed int32 bytes (4 bytes a token) and anchors as one int per
anchor, so the index costs about the tokens' own size plus ~5 bytes a token.

Hot anchors (a system prompt in every stored run, a run of one repeated token that
any client can send) are bounded: an anchor refers to at most `max_refs` places
(the first ones stored keep it; a later one is still found through its other
anchors, and only a match made of hot anchors alone can be missed, never a wrong
one taken).  So a look-up visits at most `anchor_len * max_refs` references per
position, whatever the number of stored runs, and removing a segment costs one
dictionary operation per anchor.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Sequence

_ITEM = array("i").itemsize  # bytes per packed token id
_POS_BITS = 32               # an anchor reference is (segment slot << 32) | position
MAX_REFS_PER_ANCHOR = 16     # places an anchor refers to at most (see the docstring)


@dataclass(frozen=True)
class Piece:
    """New-prompt tokens [start, end) are stored segment `seg_id`'s tokens
    [src_start, src_start + (end - start)); their KV moves by `delta` positions."""

    start: int
    end: int
    seg_id: int
    src_start: int

    @property
    def delta(self) -> int:
        return self.start - self.src_start


class _Segment:
    __slots__ = ("seg_id", "salt", "data")

    def __init__(self, seg_id: int, salt: str | None, data: bytes):
        self.seg_id, self.salt, self.data = seg_id, salt, data

    def __len__(self) -> int:
        return len(self.data) // _ITEM


def _pack(tokens: Sequence[int]) -> bytes:
    return array("i", tokens).tobytes()


def _common_prefix(a: bytes, ai: int, b: bytes, bi: int, limit: int) -> int:
    """How many tokens a[ai:] and b[bi:] share, up to `limit` (token indices).

    Compares doubling runs of tokens as byte slices, then bisects the first run that
    differs, so a match of length L costs O(log L) slice comparisons.
    """
    n, step = 0, 16
    while n < limit:
        c = min(step, limit - n)
        if a[(ai + n) * _ITEM:(ai + n + c) * _ITEM] == b[(bi + n) * _ITEM:(bi + n + c) * _ITEM]:
            n += c
            step *= 2
            continue
        while c > 1:  # the first difference is within tokens [n, n + c)
            h = c // 2
            if a[(ai + n) * _ITEM:(ai + n + h) * _ITEM] == b[(bi + n) * _ITEM:(bi + n + h) * _ITEM]:
                n, c = n + h, c - h
            else:
                c = h
        return n
    return n


class SegmentIndex:
    """Stored token segments, searchable for exact runs anywhere in a new prompt.

    anchor_len: tokens per anchor; anchors sit every `anchor_len` positions.
    min_piece: the shortest match worth loading; at least ``2 * anchor_len - 1`` so
        that every such match is found (see the module docstring).
    max_refs: the places (segment, position) one anchor refers to at most; a match
        whose anchors are all past this bound (hot) may be missed.
    """

    def __init__(self, anchor_len: int = 16, min_piece: int = 32,
                 max_refs: int = MAX_REFS_PER_ANCHOR):
        if anchor_len < 1:
            raise ValueError(f"anchor_len must be >= 1, got {anchor_len}")
        if min_piece < 2 * anchor_len - 1:
            raise ValueError(f"min_piece ({min_piece}) must be >= 2 * anchor_len - 1 "
                             f"({2 * anchor_len - 1}): shorter matches need not contain "
                             "a whole anchor and could be missed")
        if max_refs < 1:
            raise ValueError(f"max_refs must be >= 1, got {max_refs}")
        self.anchor_len = anchor_len
        self.min_piece = min_piece
        self.max_refs = max_refs
        self._segments: dict[int, int] = {}            # seg_id -> slot
        self._slots: dict[int, _Segment] = {}          # slot -> segment
        # anchor hash -> its one reference, or {reference: None} (at most max_refs)
        self._anchors: dict[int, int | dict[int, None]] = {}
        self._next_slot = 0
        # Anchor references visited by look-ups and removals: a test's step counter.
        self.steps = 0

    def __contains__(self, seg_id) -> bool:
        return seg_id in self._segments

    def __len__(self) -> int:
        return len(self._segments)

    def _anchor_keys(self, data: bytes, salt: str | None):
        """(position, key) of every anchor of packed tokens `data`."""
        a = self.anchor_len
        for j in range(0, len(data) // _ITEM - a + 1, a):
            yield j, hash((salt, data[j * _ITEM:(j + a) * _ITEM]))

    def add(self, seg_id: int, tokens: Sequence[int], salt: str | None = None) -> None:
        """Store a segment; token i is the one whose KV was computed at position i.
        Re-adding a seg_id replaces it."""
        if seg_id in self._segments:
            self.remove(seg_id)
        salt = salt or None
        seg = _Segment(seg_id, salt, _pack(tokens))
        slot = self._next_slot
        self._next_slot += 1
        self._segments[seg_id] = slot
        self._slots[slot] = seg
        for j, key in self._anchor_keys(seg.data, salt):
            ref = (slot << _POS_BITS) | j
            old = self._anchors.get(key)
            if old is None:  # most anchors are unique: a bare int, no dict
                self._anchors[key] = ref
            elif isinstance(old, int):
                if self.max_refs > 1:
                    self._anchors[key] = {old: None, ref: None}
            elif len(old) < self.max_refs:
                old[ref] = None

    def remove(self, seg_id: int) -> None:
        slot = self._segments.pop(seg_id)
        seg = self._slots.pop(slot)
        for j, key in self._anchor_keys(seg.data, seg.salt):
            self.steps += 1
            ref = (slot << _POS_BITS) | j
            old = self._anchors.get(key)
            if old == ref:
                del self._anchors[key]
            elif isinstance(old, dict) and old.pop(ref, 0) is None and len(old) == 1:
                self._anchors[key] = next(iter(old))

    def cover(self, tokens: Sequence[int], salt: str | None = None, start: int = 0,
              end: int | None = None) -> list[Piece]:
        """Pieces covering tokens[start:end] contiguously from `start`, greedily.

        Each piece is the longest exact match starting where the previous one ended
        (ties: smallest |delta|, then smallest seg_id), clipped at `end`.  Where none
        starts there, a match starting up to `min_piece` tokens earlier that reaches
        further is taken: a stored run's last few tokens are too short to match on
        their own (a piece ending a few tokens into the next module; an exact prefix
        hit ending, at `start`, a few tokens before its module does).  Inside the
        previous piece, that piece is cut back to where the match begins; before
        `start`, the match is clipped to begin at `start`.  Covering stops at the
        first position where neither works.  Tokens past `end` count towards
        `min_piece`, so a long match cut by `end` still ends the cover with a
        (possibly short) final piece.
        """
        data = _pack(tokens)
        n = len(data) // _ITEM
        end = n if end is None else min(end, n)
        salt = salt or None
        pieces: list[Piece] = []
        p = start
        while p < end:
            best = self._longest_match(data, n, p, end, salt)
            if best is None:
                best, p = self._back_off(data, n, p, end, salt, pieces)
            if best is None:
                break
            length, seg_id, src = best
            pieces.append(Piece(p, p + length, seg_id, src))
            p += length
        return pieces

    def _back_off(self, data: bytes, n: int, p: int, end: int, salt: str | None,
                  pieces: list[Piece]):
        """(match, its start) for a match starting at q < p that reaches past p:
        inside the last piece (which is cut to end at q), or, with no piece yet,
        before the cover's start (the match is clipped to begin at p).  (None, p)
        if none."""
        floor = pieces[-1].start + self.min_piece if pieces else 0
        for q in range(p - 1, max(floor, p - self.min_piece) - 1, -1):
            best = self._longest_match(data, n, q, end, salt)
            if best is None or q + best[0] <= p:
                continue
            if not pieces:
                length, seg_id, src = best
                return (length - (p - q), seg_id, src + (p - q)), p
            last = pieces[-1]
            pieces[-1] = Piece(last.start, q, last.seg_id, last.src_start)
            return best, q
        return None, p

    def _longest_match(self, data: bytes, n: int, p: int, end: int, salt: str | None):
        """(length clipped at end, seg_id, src) of the best match starting at p, or None."""
        a = self.anchor_len
        cands = set()
        for i in range(p, min(p + a, n - a + 1)):
            refs = self._anchors.get(hash((salt, data[i * _ITEM:(i + a) * _ITEM])))
            if refs is None:
                continue
            for ref in (refs,) if isinstance(refs, int) else refs:
                self.steps += 1
                slot = ref >> _POS_BITS
                src = (ref & ((1 << _POS_BITS) - 1)) - (i - p)
                seg = self._slots[slot]
                if src >= 0 and seg.salt == salt:
                    cands.add((abs(p - src), seg.seg_id, src, slot))

        want = end - p
        need = max(want, self.min_piece)  # enough tokens to decide length and eligibility
        best, best_len = None, 0
        # Smallest |delta| first: a later candidate must be strictly longer to win.
        for _, seg_id, src, slot in sorted(cands):
            seg = self._slots[slot]
            limit = min(need, n - p, len(seg) - src)
            if limit < self.min_piece or limit <= best_len:
                continue
            o = best_len  # quick reject: to be longer it must also match token p + o
            if data[(p + o) * _ITEM:(p + o + 1) * _ITEM] != \
                    seg.data[(src + o) * _ITEM:(src + o + 1) * _ITEM]:
                continue
            full = _common_prefix(data, p, seg.data, src, limit)
            if full >= self.min_piece and min(full, want) > best_len:
                best, best_len = (seg_id, src), min(full, want)
                if best_len == want:
                    break
        return None if best is None else (best_len, *best)

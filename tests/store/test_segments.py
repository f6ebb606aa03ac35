"""SegmentIndex: exact-run matches anywhere in a prompt, against hand-built cases and a
brute-force oracle."""

import random
import time

import pytest

from vllm_promptcache.store.segments import Piece, SegmentIndex


def run(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    """n random tokens from [lo, hi): parts drawn from disjoint ranges cannot match
    each other by chance, so piece boundaries are exactly the part boundaries."""
    return [rng.randrange(lo, hi) for _ in range(n)]


def check_contiguous(pieces, tokens, segments, start=0):
    """Pieces tile tokens from `start` and each one is an exact copy of its source."""
    p = start
    for pc in pieces:
        assert pc.start == p and pc.end > pc.start
        seg = segments[pc.seg_id]
        assert tokens[pc.start:pc.end] == seg[pc.src_start:pc.src_start + pc.end - pc.start]
        assert pc.delta == pc.start - pc.src_start
        p = pc.end


def test_exact_prefix_is_one_piece_at_delta_zero():
    rng = random.Random(0)
    seg = run(rng, 300, 0, 1000)
    idx = SegmentIndex()
    idx.add(7, seg)
    prompt = seg + run(rng, 50, 1000, 2000)
    assert idx.cover(prompt) == [Piece(0, 300, 7, 0)]
    assert idx.cover(prompt)[0].delta == 0


def test_truncated_conversation_two_pieces_unaligned():
    """[system][turn 1..5] stored; the new prompt dropped turns 1-2: [system][turn 3..5][new]."""
    rng = random.Random(1)
    system = run(rng, 45, 0, 1000)                       # 45: not a multiple of anything
    turns = [run(rng, n, 1000 * (i + 1), 1000 * (i + 2))
             for i, n in enumerate((37, 53, 61, 29, 44))]
    stored = system + sum(turns, [])
    new = run(rng, 20, 9000, 10000)
    prompt = system + sum(turns[2:], []) + new
    idx = SegmentIndex()
    idx.add(1, stored)
    dropped = len(turns[0]) + len(turns[1])
    kept = len(prompt) - len(system) - len(new)
    assert idx.cover(prompt) == [
        Piece(0, 45, 1, 0),
        Piece(45, 45 + kept, 1, 45 + dropped),
    ]
    assert idx.cover(prompt)[1].delta == -dropped == -90


def test_shuffled_documents_three_pieces():
    rng = random.Random(2)
    system = run(rng, 40, 0, 1000)
    doc_a, doc_b = run(rng, 150, 1000, 2000), run(rng, 70, 2000, 3000)
    idx = SegmentIndex()
    idx.add(3, system + doc_a + doc_b)
    prompt = system + doc_b + doc_a
    s, a, b = len(system), len(doc_a), len(doc_b)
    pieces = idx.cover(prompt)
    assert pieces == [Piece(0, s, 3, 0), Piece(s, s + b, 3, s + a), Piece(s + b, s + b + a, 3, s)]
    assert [p.delta for p in pieces] == [0, -a, b]


def test_no_match_and_empty():
    rng = random.Random(3)
    idx = SegmentIndex()
    assert idx.cover(run(rng, 100, 0, 1000)) == []
    idx.add(1, run(rng, 100, 0, 1000))
    assert idx.cover(run(rng, 100, 1000, 2000)) == []
    assert idx.cover([]) == []
    idx.add(2, [])          # too short for an anchor: stored, never matched
    idx.add(3, [5] * 10)
    assert 2 in idx and len(idx) == 3


def test_salt_isolates():
    rng = random.Random(4)
    seg = run(rng, 100, 0, 1000)
    idx = SegmentIndex()
    idx.add(1, seg, salt="alice")
    assert idx.cover(seg) == []
    assert idx.cover(seg, salt="bob") == []
    assert idx.cover(seg, salt="alice") == [Piece(0, 100, 1, 0)]
    idx.add(2, seg, salt="bob")
    idx.add(3, seg)
    assert idx.cover(seg, salt="bob") == [Piece(0, 100, 2, 0)]
    assert idx.cover(seg) == idx.cover(seg, salt="") == [Piece(0, 100, 3, 0)]


def test_remove_and_replace():
    rng = random.Random(5)
    a, b = run(rng, 80, 0, 1000), run(rng, 80, 1000, 2000)
    idx = SegmentIndex()
    idx.add(1, a)
    idx.add(2, a + b)
    assert idx.cover(a) == [Piece(0, 80, 1, 0)]       # tie at delta 0: smaller seg_id
    idx.remove(1)
    assert 1 not in idx and len(idx) == 1
    assert idx.cover(a) == [Piece(0, 80, 2, 0)]
    idx.add(2, b)                                      # re-adding an id replaces it
    assert idx.cover(a) == [] and idx.cover(b) == [Piece(0, 80, 2, 0)]
    idx.remove(2)
    assert len(idx) == 0 and not idx._anchors          # nothing left behind
    with pytest.raises(KeyError):
        idx.remove(2)


def test_min_piece_and_end():
    rng = random.Random(6)
    seg = run(rng, 200, 0, 1000)
    idx = SegmentIndex(anchor_len=16, min_piece=32)
    idx.add(1, seg)
    junk = run(rng, 40, 1000, 2000)
    assert idx.cover(seg[10:41] + junk) == []                        # 31 tokens: too short
    assert idx.cover(seg[10:42] + junk) == [Piece(0, 32, 1, 10)]     # 32: taken
    # A short run at the prompt's very end is not worth loading either...
    head = seg[100:150]
    assert idx.cover(head + seg[0:20]) == [Piece(0, 50, 1, 100)]
    # ... but a long match cut by `end` is: the final piece may be short.
    prompt = head + seg[0:40]
    assert idx.cover(prompt, end=70) == [Piece(0, 50, 1, 100), Piece(50, 70, 1, 0)]
    assert idx.cover(prompt, end=len(prompt) - 1)[-1] == Piece(50, 89, 1, 0)
    # `start` skips what is already covered (e.g. by block-hash prefix hits).
    assert idx.cover(prompt, start=16) == [Piece(16, 50, 1, 116), Piece(50, 90, 1, 0)]
    assert idx.cover(prompt, start=90) == []


def test_prefers_longest_then_smallest_delta():
    rng = random.Random(7)
    doc, tail = run(rng, 60, 0, 1000), run(rng, 50, 1000, 2000)
    idx = SegmentIndex()
    idx.add(1, run(rng, 30, 5000, 6000) + doc)             # doc at delta -30
    idx.add(2, run(rng, 10, 6000, 7000) + doc + tail)      # doc + tail at delta -10, longer
    idx.add(3, doc)                                         # doc at delta 0
    prompt = doc + tail
    assert idx.cover(prompt) == [Piece(0, 110, 2, 10)]
    assert idx.cover(doc) == [Piece(0, 60, 3, 0)]           # three equal: |delta| 0 wins
    idx.remove(3)
    assert idx.cover(doc) == [Piece(0, 60, 2, 10)]          # |-10| < |-30|


def test_rejects_min_piece_that_anchors_cannot_guarantee():
    with pytest.raises(ValueError, match="min_piece"):
        SegmentIndex(anchor_len=16, min_piece=30)
    SegmentIndex(anchor_len=16, min_piece=31)
    with pytest.raises(ValueError):
        SegmentIndex(anchor_len=0)


# ------------------------------------------------------------------------- oracle

def brute_cover(segments, salts, min_piece, tokens, salt, start, end):
    """Every segment at every source position; same rules as SegmentIndex.cover."""
    n = len(tokens)
    end = n if end is None else min(end, n)

    def best_at(p):
        best = None
        for sid, seg in segments.items():
            if salts[sid] != (salt or None):
                continue
            for src in range(len(seg)):
                full = 0
                while (p + full < n and src + full < len(seg)
                       and tokens[p + full] == seg[src + full]):
                    full += 1
                if full >= min_piece:
                    key = (-min(full, end - p), abs(p - src), sid, src)
                    best = key if best is None or key < best else best
        return best

    pieces, p = [], start
    while p < end:
        best = best_at(p)
        if best is None:  # a match from up to min_piece tokens earlier that reaches past p
            floor = pieces[-1].start + min_piece if pieces else 0
            for q in range(p - 1, max(floor, p - min_piece) - 1, -1):
                cand = best_at(q)
                if cand is None or q - cand[0] <= p:
                    continue
                if pieces:  # the last piece is cut back to q
                    last = pieces[-1]
                    pieces[-1] = Piece(last.start, q, last.seg_id, last.src_start)
                    best, p = cand, q
                else:       # before start: clipped to begin at p
                    best = (cand[0] + (p - q), cand[1], cand[2], cand[3] + (p - q))
                break
        if best is None:
            break
        length = -best[0]
        pieces.append(Piece(p, p + length, best[2], best[3]))
        p += length
    return pieces


def test_fuzz_against_brute_force():
    seed = time.time_ns() % 2 ** 31
    rng = random.Random(seed)
    for it in range(300):
        anchor = rng.randint(1, 4)
        min_piece = 2 * anchor - 1 + rng.randint(0, 3)
        vocab = rng.randint(2, 6)                     # few symbols: many repeats and ties
        # Uncapped anchors: the oracle finds every match (few symbols make every
        # anchor hot; the cap is tested on its own below).
        idx = SegmentIndex(anchor, min_piece, max_refs=1 << 30)
        segments, salts = {}, {}
        for sid in rng.sample(range(100), rng.randint(1, 6)):
            seg = [rng.randrange(vocab) for _ in range(rng.randint(0, 60))]
            salt = rng.choice([None, None, "s"])
            idx.add(sid, seg, salt=salt)
            segments[sid], salts[sid] = seg, salt
        if rng.random() < 0.3:
            gone = rng.choice(list(segments))
            idx.remove(gone)
            del segments[gone], salts[gone]
        # Prompts spliced from slices of the segments, with random tokens between.
        prompt = []
        for _ in range(rng.randint(0, 5)):
            if segments and rng.random() < 0.7:
                seg = segments[rng.choice(list(segments))]
                i = rng.randint(0, len(seg))
                prompt += seg[i:rng.randint(i, len(seg))]
            else:
                prompt += [rng.randrange(vocab + 1) for _ in range(rng.randint(0, 8))]
        salt = rng.choice([None, None, "", "s", "t"])
        start = rng.choice([0, rng.randint(0, len(prompt))])
        end = rng.choice([None, rng.randint(0, len(prompt) + 2)])
        want = brute_cover(segments, salts, min_piece, prompt, salt, start, end)
        got = idx.cover(prompt, salt=salt, start=start, end=end)
        assert got == want, f"seed={seed} iteration={it}"
        check_contiguous(got, prompt, segments, start)


# --------------------------------------------------------------------------- scale

def test_32k_prompt_over_thousands_of_segments_takes_a_search_per_piece():
    """2000 conversations sharing one system prompt; a 32k-token prompt made of the
    system prompt and 60 of their bodies in another order."""
    rng = random.Random(8)
    system = run(rng, 500, 0, 50_000)
    bodies = {sid: run(rng, 500, 50_000, 150_000) for sid in range(2000)}
    idx = SegmentIndex()
    for sid, body in bodies.items():
        idx.add(sid, system + body)
    order = rng.sample(range(2000), 63)
    prompt = system + sum((bodies[sid] for sid in order), []) + run(rng, 100, 150_000, 160_000)
    assert len(prompt) > 32_000

    # No timing (timings live in bench/): the cost is counted instead.  Each piece
    # takes one longest-match search (anchor look-ups at its start), plus the one
    # that finds nothing after the last piece; nothing scans the prompt or the index.
    searches = []
    longest_match = idx._longest_match
    idx._longest_match = lambda *a: searches.append(a[2]) or longest_match(*a)
    pieces = idx.cover(prompt)

    # The system prompt's anchors are hot (in all 2000 segments): they refer to the
    # first max_refs segments only, so unless order[0] is one of them the system
    # prompt comes from segment 0 (the same tokens at the same positions) and
    # order[0]'s body follows as a piece of its own.
    s, b = len(system), 500
    if order[0] < idx.max_refs:
        head = [Piece(0, s + b, order[0], 0)]
    else:
        head = [Piece(0, s, 0, 0), Piece(s, s + b, order[0], s)]
    want = head + [
        Piece(s + k * b, s + (k + 1) * b, sid, s) for k, sid in enumerate(order) if k]
    assert pieces == want
    assert len(searches) <= len(pieces) + 1 + idx.min_piece, searches
    assert idx.steps <= len(searches) * idx.anchor_len * idx.max_refs


def test_a_piece_is_cut_back_so_the_next_module_can_follow():
    """Prompt [A][B][C][D]; stored: a run [B][C's first 35 tokens][x], and A, C, D
    alone.  The longest piece at B runs 35 tokens into C; C's last 5 tokens are
    shorter than min_piece, so that piece is cut back and C comes from its own
    segment, then D."""
    rng = random.Random(5)
    a, b, c, d = run(rng, 40, 0, 1000), run(rng, 40, 1000, 2000), run(rng, 40, 2000, 3000), \
        run(rng, 40, 3000, 4000)
    x = run(rng, 40, 4000, 5000)
    idx = SegmentIndex(anchor_len=4, min_piece=8)
    segments = {1: b + c[:35] + x, 2: c, 3: d, 4: a}
    for sid, seg in segments.items():
        idx.add(sid, seg)
    prompt = a + b + c + d
    pieces = idx.cover(prompt)
    check_contiguous(pieces, prompt, segments)
    assert pieces[-1].end == len(prompt)
    assert [pc.seg_id for pc in pieces] == [4, 1, 2, 3]
    assert pieces[1].end == 80 + 40 - 8  # cut so that C's module gives min_piece tokens


def _hot_index(runs: int, tokens: int = 4096) -> SegmentIndex:
    idx = SegmentIndex()
    for sid in range(runs):
        idx.add(sid, [7] * tokens)
    return idx


def test_a_hot_anchor_does_not_make_a_lookup_grow_with_the_stored_runs():
    """Issue 29: 10, 20 and 40 stored 4k-token runs of one repeated token took 117,
    308 and 998 ms per look-up, every run's every anchor being visited.  Counted
    here in anchor references visited: the same for 10, 20 and 40 runs."""
    steps = []
    for runs in (10, 20, 40):
        idx = _hot_index(runs)
        idx.steps = 0
        pieces = idx.cover([7] * 4096)
        assert pieces and pieces[0].start == 0 and pieces[-1].end == 4096
        steps.append(idx.steps)
    assert steps[0] == steps[1] == steps[2], steps
    assert steps[0] <= idx.anchor_len * idx.max_refs * 4, steps


def test_removing_a_segment_costs_its_own_anchors_only():
    """Eviction touches one dictionary entry per anchor of the segment removed, not
    every reference of its hot anchors; the removed segment is never found again."""
    costs = []
    for runs in (10, 40):
        idx = _hot_index(runs, 1024)
        idx.steps = 0
        idx.remove(0)
        costs.append(idx.steps)
        assert all(p.seg_id != 0 for p in idx.cover([7] * 1024))
    assert costs[0] == costs[1] == 1024 // idx.anchor_len, costs
    idx = _hot_index(3, 256)
    for sid in range(3):
        idx.remove(sid)
    assert not idx._anchors and not idx.cover([7] * 256)

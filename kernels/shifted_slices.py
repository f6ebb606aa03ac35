"""The torch path of shifted loads on the CPU: runs of tokens moved as slices of whole
blocks.  Engines use the C loop (cpu_native.py) where it builds; this is the path where
it does not (no compiler), and the oracle it is tested beside.

A shifted load's tokens come in runs.  A module or an encoded gap placed at a new
position moves all its tokens by one delta, and consecutive source tokens go to
consecutive destination slots.  Cut at the source's and the destination's block edges,
a run becomes pieces: (source block, offset) -> (destination block, offset), `length`
tokens.  A run whose destination starts r tokens (mod block_size N) after its source
has only two kinds of middle piece, [0, N-r) -> [r, N) and [N-r, N) -> [0, r) (one kind
when r is 0), and its two ends.  So a layer's load is, for K and for V:

* one gather of every sliced run's source blocks, whole, into rows (the bytes of
  vLLM's page layout, rows of contiguous tokens);
* one rotation of K, each row by its run's delta (float32, `rotate_pairs_`; rows of
  delta 0 are not touched);
* one scatter per kind of piece of a run (`index_copy_` of the kind's rows, slices of
  the same offsets and length), a plain copy for a kind of one piece.

That is a few torch operations per run, whatever the number of tokens, instead of
indexing token by token through the page's strides (which on vLLM's CPU layout, K
stored dim-major, read each token's head dims N elements apart).

Only the `MAX_SLICE_RUNS` longest runs are sliced: a load with many tiny runs would
cost more in per-operation overhead than it saves, so the others go through the
per-token path (`rope_shift_paged_`) in one call.  Both paths round the same float32
arithmetic once (`rotate_pairs_`), so a token's bytes do not depend on which path
moved it: tests/kernels/test_shifted_slices.py checks this bit for bit.

Plans are built once per load (a request's shifted tokens in a step: `plan_slices`,
numpy, a few array operations whatever the token count) and run for every layer
(`move_layer`).

Packed pages (vLLM's CPU AMX layout, 6-D views ``[blocks, groups, TG, heads, DG,
DGs]``) interleave TG tokens with the head dims, so a slice of tokens is not one view
there.  A piece is then cut where its destination's token groups begin and end (a part
inside one group, then whole groups) when source and destination sit at the same place
in their groups, else moved one lane of the groups at a time (TG views, each token
group's lane l -> lane l'), and K is unpacked into rows of whole tokens before it is
rotated (K: 16-token groups of 4-byte words; V: pairs of tokens).  Copies of packed
data move 4- or 8-byte words where a view's last axis holds whole tokens' words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .rope_shift import rope_shift_paged_, rotate_pairs_

# Runs moved as slices, at most: the longest ones (each costs a gathered row per source
# block and up to four groups of a few torch calls each, ~10-60 us a group); the others
# go through the per-token path (~0.5 us a token a layer on this CPU, plus ~0.4 ms a
# call), e.g. the single tokens of a load with no runs.
MAX_SLICE_RUNS = 16
# Float32 values of K rotated per pass (4 MiB): the gathered blocks are rotated in
# chunks of rows, so the rotation's scratch stays bounded whatever the load's length
# (the gathered rows themselves are a copy of the sliced blocks, as the per-token
# path's gather is a copy of its tokens; on AMX-packed pages K's rows are copied once
# more, unpacked into whole tokens, before they are rotated).
SLICE_CHUNK_VALUES = 1 << 20


@dataclass
class SliceGroup:
    """Pieces [src_offset, +length) of gathered rows [first_row, +len(dst_blocks)) ->
    [dst_offset, +length) of paged blocks dst_blocks, row i to dst_blocks[i]; a group of
    one piece also names its block (`dst_block`), copied without an index operation."""

    first_row: int
    src_offset: int
    dst_offset: int
    length: int
    dst_blocks: torch.Tensor
    dst_block: int | None = None


@dataclass
class TokenRest:
    """Tokens moved one by one: host token src_index[t] (slot * N + offset) -> paged slot
    dst_slots[t], K rotated by deltas[t]."""

    src_index: torch.Tensor
    dst_slots: torch.Tensor
    deltas: torch.Tensor


@dataclass
class SlicePlan:
    """A shifted load as whole host blocks gathered into rows (row_slots), K of rows
    [0, rotated_rows) rotated by cos/sin [rotated_rows, rotary_dim // 2] (float32, one
    delta per row: the delta-0 rows come last and are not touched), then scattered as
    `groups` of slices; the short runs as `rest`, per token."""

    row_slots: torch.Tensor
    rotated_rows: int
    cos: torch.Tensor
    sin: torch.Tensor
    neg_sin: torch.Tensor
    groups: list[SliceGroup]
    rest: TokenRest

    @property
    def sliced_tokens(self) -> int:
        return sum(g.length * len(g.dst_blocks) for g in self.groups)


def _as_int64(a) -> np.ndarray:
    return np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a, dtype=np.int64)


def _token_rest(src_index: np.ndarray, dst: np.ndarray, deltas: np.ndarray) -> TokenRest:
    return TokenRest(torch.from_numpy(np.ascontiguousarray(src_index)),
                     torch.from_numpy(np.ascontiguousarray(dst)),
                     torch.from_numpy(np.ascontiguousarray(deltas)))


def _follows(pos: np.ndarray, block: np.ndarray, N: int, wrap_into_same: bool) -> np.ndarray:
    """Whether token t follows token t-1, as [T-1]: the next offset of its block, or
    offset 0 after offset N-1 -- of any block where `wrap_into_same`, else of another."""
    inside = (block[1:] == block[:-1]) & (pos[1:] == pos[:-1] + 1)
    wrap = (pos[:-1] == N - 1) & (pos[1:] == 0)
    if not wrap_into_same:
        wrap &= block[1:] != block[:-1]
    return inside | wrap


def _run_groups(t: np.ndarray, so: np.ndarray, db: np.ndarray, do: np.ndarray,
                first_row: int) -> tuple[np.ndarray, list[SliceGroup]] | None:
    """Tokens t of one run: which of them start a gathered row (its first, then each at
    source offset 0), and its groups of pieces, rows numbered from first_row; None
    where a kind's pieces are not in consecutive rows, as a group needs them."""
    n = len(t)
    new_row = np.concatenate(([True], so[t[1:]] == 0))
    row_of = np.cumsum(new_row) - 1 + first_row
    # Pieces: cut where the source row or the destination block changes.
    cut = np.concatenate(([True], (row_of[1:] != row_of[:-1]) | (db[t[1:]] != db[t[:-1]])))
    p = np.flatnonzero(cut)
    p_len = np.diff(np.append(p, n))
    uniq, which = np.unique(np.stack([so[t[p]], do[t[p]], p_len], axis=1), axis=0,
                            return_inverse=True)
    groups = []
    for k in range(len(uniq)):
        pieces = p[which.reshape(-1) == k]
        rows = row_of[pieces]
        if not np.array_equal(rows, rows[0] + np.arange(len(rows))):
            return None
        blocks = db[t[pieces]]
        groups.append(SliceGroup(int(rows[0]), int(uniq[k, 0]), int(uniq[k, 1]),
                                 int(uniq[k, 2]), torch.from_numpy(blocks),
                                 int(blocks[0]) if len(blocks) == 1 else None))
    return new_row, groups


def plan_slices(src_slots, src_offsets, dst_slots, deltas, block_size: int,
                inv_freq: torch.Tensor, max_runs: int = MAX_SLICE_RUNS) -> SlicePlan:
    """Plan a shifted load (int64 arrays or CPU tensors, as `load_tokens_shifted` takes
    them; destination -1 = skip): the `max_runs` longest runs of tokens as slices of
    gathered blocks, the rest per token.  A few numpy operations per sliced run, none
    per token."""
    N = block_size
    ss, so, dst, dl = (_as_int64(a) for a in (src_slots, src_offsets, dst_slots, deltas))
    keep = dst >= 0
    if not keep.all():
        ss, so, dst, dl = ss[keep], so[keep], dst[keep], dl[keep]
    db, do = dst // N, dst % N
    T = ss.size
    # A run: one delta, source and destination both one token on.  A source block's
    # last token may be followed by the first of any block (each starts a new gathered
    # row); a destination block's last only by the first of another block (pieces are
    # cut where the destination block changes).
    same_run = (_follows(so, ss, N, wrap_into_same=True)
                & _follows(do, db, N, wrap_into_same=False) & (dl[1:] == dl[:-1]))
    run_starts = np.flatnonzero(np.concatenate(([True], ~same_run))) if T else np.zeros(0, int)
    run_lengths = np.diff(np.append(run_starts, T))
    runs = np.sort(np.argsort(-run_lengths, kind="stable")[:max_runs])
    sliced_runs = np.zeros(len(run_starts), dtype=bool)
    sliced_runs[runs] = True
    # Rotated runs first, so that the rows not to touch (delta 0) are one tail.
    runs = runs[np.argsort(dl[run_starts[runs]] == 0, kind="stable")]
    # Rows: each run's source blocks in order (its first token's block, then one more
    # at each offset 0 after it).
    row_slots, row_delta, groups = [], [], []
    for r in runs.tolist():
        a, n = int(run_starts[r]), int(run_lengths[r])
        run_groups = _run_groups(np.arange(a, a + n), so, db, do, len(row_slots))
        if run_groups is None:  # (not seen: then the run goes token by token)
            sliced_runs[r] = False
            continue
        new_row, found = run_groups
        groups += found
        row_slots.extend(ss[a:a + n][new_row].tolist())
        row_delta.extend([int(dl[a])] * int(new_row.sum()))
    row_delta = np.asarray(row_delta, dtype=np.float64)
    rotated = int(np.count_nonzero(row_delta))
    ang = torch.from_numpy(row_delta[:rotated, None]) \
        * inv_freq.detach().to("cpu", torch.float64).flatten()[None, :]
    sin = ang.sin().to(torch.float32)
    short = np.repeat(~sliced_runs, run_lengths)
    return SlicePlan(torch.tensor(row_slots, dtype=torch.int64), rotated,
                     ang.cos().to(torch.float32), sin, -sin, groups,
                     _token_rest((ss * N + so)[short], dst[short], dl[short]))


def _physical(view: torch.Tensor) -> tuple[int, ...]:
    """A paged view's dims after the block dim, by decreasing stride: the order its
    bytes lie in."""
    return tuple(sorted(range(1, view.dim()), key=lambda d: -view.stride(d)))


def _tokens6(view: torch.Tensor) -> torch.Tensor:
    """A paged view as [blocks, token groups, TG, heads, DG, DGs]: 6-D views as they are,
    a 4-D [blocks, tokens, heads, dims] one as groups of one token, [B, N, 1, H, 1, D]
    (so any run of its tokens is one slice; `rope_shift._as_paged6`, which indexes
    single tokens, makes it one group of N instead)."""
    return view if view.dim() == 6 else view.unsqueeze(2).unsqueeze(4)


def _words(*views: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The views (one shape, one dtype) with each last axis's elements merged into 8- or
    4-byte integers, where in every view that axis is contiguous and whole words long
    and every other stride and the offset are whole words (a bit copy then moves 2-4x
    fewer elements: AMX-packed K's pairs of head dims); else as they are.  Checked
    up front: a failed `Tensor.view(dtype)` costs ~20 us, and most parts of vLLM's CPU
    layout (K stored dim-major) and of AMX V fail it."""
    elem = views[0].element_size()
    if any(v.stride(-1) != 1 for v in views):
        return views
    for word in (torch.int64, torch.int32):
        ratio = word.itemsize // elem
        if ratio > 1 and word.itemsize % elem == 0 and all(
                v.shape[-1] % ratio == 0 and v.storage_offset() % ratio == 0
                and all(st % ratio == 0 for st in v.stride()[:-1]) for v in views):
            return tuple(v.view(word) for v in views)
    return views


def _unpacked(x: torch.Tensor) -> torch.Tensor:
    """A 6-D view [R, G, TG, H, DG, DGs] copied into contiguous rows of whole tokens,
    returned as [R, G * TG, 1, H, DG, DGs] (one token per group)."""
    R, G, TG, H, DG, DGs = x.shape
    out = torch.empty(x.shape, dtype=x.dtype)
    dst, src = _words(out, x)
    dst.copy_(src)
    return out.view(R, G * TG, 1, H, DG, DGs)


def _tokens(view6: torch.Tensor, start: int, groups: int, per_group: int) -> torch.Tensor:
    """Tokens [start, start + groups * per_group) of a 6-D view, as [B, groups, per_group,
    H, DG, DGs]: any tokens of a view with one token per group; else `per_group` tokens
    inside one of its groups, or whole groups from a group's first token."""
    TG = view6.shape[2]
    if TG == 1:
        return view6.narrow(1, start, groups * per_group).squeeze(2).unflatten(
            1, (groups, per_group))
    if groups == 1 and start % TG + per_group <= TG:
        return view6.select(1, start // TG).narrow(1, start % TG, per_group).unsqueeze(1)
    if start % TG or per_group != TG:
        raise ValueError(f"tokens [{start}, +{groups} x {per_group}) are not whole groups "
                         f"of {TG}")
    return view6.narrow(1, start // TG, groups)


def _lane(view6: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Tokens start, start + TG, ... (`count` of them: one lane of consecutive token
    groups) of a 6-D view, as [B, count, H, DG, DGs]."""
    TG = view6.shape[2]
    return view6.select(2, start % TG).narrow(1, start // TG, count)


def _part_views(src6: torch.Tensor, dst6: torch.Tensor, src_offset: int, dst_offset: int,
                length: int):
    """(source, destination) views of one shape covering a piece: tokens
    [src_offset, +length) of src6's blocks -> [dst_offset, +length) of dst6's.  src6
    has dst6's token groups or one token per group."""
    ts, td = src6.shape[2], dst6.shape[2]
    if td == 1:  # unpacked tokens (4-D layouts): one slice
        yield src6.narrow(1, src_offset, length), dst6.narrow(1, dst_offset, length)
        return
    if ts not in (1, td):
        raise ValueError(f"source token groups of {ts} into destination groups of {td}")
    if ts == td and (src_offset - dst_offset) % td:
        # At different places in their groups: one lane of the groups at a time.
        for lane in range(min(td, length)):
            count = -(-(length - lane) // td)
            yield (_lane(src6, src_offset + lane, count),
                   _lane(dst6, dst_offset + lane, count))
        return
    # Cut where the destination's groups begin and end.
    at, end = dst_offset, dst_offset + length
    while at < end:
        if at % td == 0 and end - at >= td:
            groups, per_group = (end - at) // td, td
        else:
            groups, per_group = 1, min(td - at % td, end - at)
        a = src_offset + at - dst_offset
        yield (_tokens(src6, a, groups, per_group), _tokens(dst6, at, groups, per_group))
        at += groups * per_group


def _rotate_rows(rows: torch.Tensor, dim: int, plan: SlicePlan, rotary_dim: int,
                 is_neox_style: bool) -> None:
    """Rows [0, plan.rotated_rows) of `rows` (head dims at axis `dim`) rotated in place,
    each by its run's delta, in chunks of rows."""
    per_row = rows[0].numel()
    step = max(1, SLICE_CHUNK_VALUES // per_row)
    for a in range(0, plan.rotated_rows, step):
        b = min(a + step, plan.rotated_rows)
        shape = [b - a] + [1] * (rows.dim() - 1)
        shape[dim] = rotary_dim // 2  # each row's angles along its head dims
        rotate_pairs_(rows[a:b], rows[a:b], dim, *(t[a:b].view(shape) for t in (
            plan.cos, plan.sin, plan.neg_sin)), rotary_dim, is_neox_style)


def _move_rows(src: torch.Tensor, dst: torch.Tensor, plan: SlicePlan, rotate: bool,
               rotary_dim: int, is_neox_style: bool) -> None:
    """K or V (paged views, 4-D [blocks, tokens, heads, dims] or 6-D packed): gather the
    plan's rows, rotate, and scatter its groups."""
    order = _physical(src)
    back = tuple(int(i) for i in np.argsort((0,) + order))
    rows = src.permute(0, *order).index_select(0, plan.row_slots)  # bytes in page order
    rotating = rotate and rotary_dim > 0 and plan.rotated_rows > 0
    if src.dim() == 4:
        if rotating:
            _rotate_rows(rows, 1 + order.index(3), plan, rotary_dim, is_neox_style)
        rows6 = _tokens6(rows.permute(*back))
    elif rotating:  # packed tokens: rotated (and scattered) as rows of whole tokens
        rows6 = _unpacked(rows.permute(*back))
        R, T, _, H, DG, DGs = rows6.shape
        _rotate_rows(rows6.view(R, T, H, DG * DGs), 3, plan, rotary_dim, is_neox_style)
    else:
        rows6 = rows.permute(*back)
    dst6 = _tokens6(dst)
    for g in plan.groups:
        for part_src, part_dst in _part_views(rows6, dst6, g.src_offset, g.dst_offset,
                                              g.length):
            part_dst, part_src = _words(part_dst, part_src)
            if g.dst_block is not None:
                part_dst[g.dst_block].copy_(part_src[g.first_row])
            else:
                part_dst.index_copy_(0, g.dst_blocks,
                                     part_src.narrow(0, g.first_row, len(g.dst_blocks)))


def move_layer(host_k: torch.Tensor, host_v: torch.Tensor, dst_k: torch.Tensor,
               dst_v: torch.Tensor, plan: SlicePlan, inv_freq: torch.Tensor, rotary_dim: int,
               is_neox_style: bool) -> None:
    """One layer of a shifted load: host slots' paged views -> the layer's paged views
    (`paged_kv_views` of both, one layout), on the CPU."""
    for host, dst in ((host_k, dst_k), (host_v, dst_v)):
        if host.shape[1:] != dst.shape[1:]:
            raise ValueError(f"host pages {tuple(host.shape[1:])} and destination pages "
                             f"{tuple(dst.shape[1:])} differ: one layout is needed")
    if plan.groups:
        _move_rows(host_k, dst_k, plan, True, rotary_dim, is_neox_style)
        _move_rows(host_v, dst_v, plan, False, rotary_dim, is_neox_style)
    rest = plan.rest
    if rest.dst_slots.numel():
        rope_shift_paged_(host_k, host_v, rest.src_index, dst_k, dst_v, rest.dst_slots,
                          rest.deltas, inv_freq, rotary_dim, is_neox_style)

"""Whole-block copies between a layer of vLLM's paged KV cache and host-tier slots.

Works on any paged layout: the block dimension is found by its size and moved to
the front as a view, so vLLM 0.26 FlashAttention's (2, N, block, heads, dim), 0.32's
(N, heads, block, 2 * dim) and the CPU backend's packed pages are handled alike.  A copy
moves raw bytes, so a loaded block is bit-identical to the saved one whatever the dtype.
A host slot holds the layer's blocks-first view of one block, made contiguous (logical
order), whichever path wrote it.

Two back-ends with one meaning:

* `load_slots_into_blocks` / `save_blocks_to_slots`: plain torch.  The CPU backend's
  path and the test oracle.  Where each block is one contiguous page (the CPU
  backend's layout), runs of consecutive slots into consecutive blocks are slice
  copies and anything else one gather and one scatter of 8-byte words; other
  layouts gather and scatter the blocks (index_select / index_copy_).
* `copy_pages_` (Triton): one launch per layer moves every requested block, reading or
  writing the host slots through a device view of the pinned host buffer (no CPU copy,
  no staging).  A block's bytes are described by a `PageLayout`: runs of contiguous
  words, up to three outer dimensions of them, any strides -- built once per layer by
  `page_layout` and reused every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .triton_launch import HAS_TRITON, launchable

if HAS_TRITON:
    import triton
    import triton.language as tl

# Words per program along a contiguous run, at most (a power of two).
MAX_TILE_WORDS = 1024
NUM_WARPS = 4
# Copy unit candidates, widest first: one load/store moves this many bytes.
WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
OUTER_DIMS = 3
# CUDA's limit on grid dimensions 1 and 2 (outer runs, tiles per run).
MAX_GRID_YZ = 65535


def block_dim(kv_layer: torch.Tensor, num_blocks: int) -> int:
    """The dimension of `kv_layer` that indexes blocks."""
    dims = [d for d, n in enumerate(kv_layer.shape) if n == num_blocks]
    if not dims:
        raise ValueError(f"no dimension of size {num_blocks} in KV tensor of shape "
                         f"{tuple(kv_layer.shape)}")
    # With a tie (a tiny pool) the block dimension is the one with the larger stride.
    return max(dims, key=lambda d: kv_layer.stride(d))


def blocks_first(kv_layer: torch.Tensor, num_blocks: int) -> torch.Tensor:
    return kv_layer.movedim(block_dim(kv_layer, num_blocks), 0)


# ----------------------------------------------------------------------- reference

def save_blocks_to_slots(kv_blocks: torch.Tensor, block_ids: torch.Tensor,
                         host_layer: torch.Tensor, slots: torch.Tensor,
                         runs: RowRuns | None = None) -> None:
    """host_layer[slots[i]] <- bytes of kv_blocks[block_ids[i]] for every i.

    kv_blocks: a blocks-first view of one layer; host_layer: [num_slots, page_bytes] uint8.
    runs: `row_runs(block_ids, slots)`, found once for every layer of a step (else here).
    """
    pages = _block_bytes(kv_blocks)
    if pages is not None and pages.device == host_layer.device:
        _copy_rows(pages, block_ids, host_layer, slots, runs)
        return
    data = kv_blocks.index_select(0, block_ids.to(kv_blocks.device)).contiguous()
    data = data.view(torch.uint8).reshape(len(block_ids), -1)
    if data.device != host_layer.device:
        data = data.to(host_layer.device)
    host_layer.index_copy_(0, slots.to(host_layer.device), data)


def load_slots_into_blocks(host_layer: torch.Tensor, slots: torch.Tensor,
                           kv_blocks: torch.Tensor, block_ids: torch.Tensor,
                           runs: RowRuns | None = None) -> None:
    """kv_blocks[block_ids[i]] <- bytes of host_layer[slots[i]] for every i.
    runs: `row_runs(slots, block_ids)`, found once for every layer of a step (else here)."""
    pages = _block_bytes(kv_blocks)
    if pages is not None and pages.device == host_layer.device:
        _copy_rows(host_layer, slots, pages, block_ids, runs)
        return
    data = host_layer.index_select(0, slots.to(host_layer.device))
    data = data.to(kv_blocks.device)
    data = data.view(kv_blocks.dtype).reshape((len(slots),) + tuple(kv_blocks.shape[1:]))
    kv_blocks.index_copy_(0, block_ids.to(kv_blocks.device), data)


# Slice copies per call at most; more runs than this go through one gather/scatter.
MAX_SLICE_RUNS = 64


def _block_bytes(kv_blocks: torch.Tensor) -> torch.Tensor | None:
    """[num_blocks, page_bytes] uint8 view of a blocks-first layer whose blocks are each
    one contiguous page in logical order (the CPU backend's; what a host slot holds);
    None for other layouts."""
    if kv_blocks.dim() < 2 or not kv_blocks[0].is_contiguous():
        return None
    rows = torch.as_strided(kv_blocks, (kv_blocks.shape[0], kv_blocks[0].numel()),
                            (kv_blocks.stride(0), 1))
    return rows.view(torch.uint8)


def _words(rows: torch.Tensor) -> torch.Tensor:
    """A [n, bytes] uint8 view as the widest integer words its size, row stride and
    alignment allow (a gather of uint8 rows moves a byte at a time)."""
    for width, dtype in WORD_DTYPES.items():
        if width > 1 and rows.shape[1] % width == 0 and rows.stride(0) % width == 0 \
                and rows.data_ptr() % width == 0:
            return rows.view(dtype)
    return rows


@dataclass(frozen=True)
class RowRuns:
    """(source row, destination row, rows) of each run of consecutive rows on both
    sides, or None where there are too many runs for slice copies."""

    slices: tuple[tuple[int, int, int], ...] | None


def row_runs(src_idx, dst_idx) -> RowRuns:
    """The runs of `src_idx` -> `dst_idx` (lists, arrays or CPU tensors): every layer of
    a step copies the same rows, so a step finds them once."""
    import numpy as np

    s = np.asarray(src_idx, dtype=np.int64)
    d = np.asarray(dst_idx, dtype=np.int64)
    starts = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    if len(starts) >= MAX_SLICE_RUNS:
        return RowRuns(None)
    bounds = [0, *starts.tolist(), s.size] if s.size else [0]
    return RowRuns(tuple((int(s[a]), int(d[a]), b - a) for a, b in zip(bounds[:-1], bounds[1:])))


def _copy_rows(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor,
               dst_idx: torch.Tensor, runs: RowRuns | None = None) -> None:
    """dst[dst_idx[i]] <- src[src_idx[i]] for [n, bytes] uint8 views on one device: runs
    of consecutive rows on both sides (a stored run into fresh blocks usually is one) as
    slice copies, else one gather and one scatter of whole words."""
    if src_idx.numel() == 0:
        return
    if runs is None:
        runs = row_runs(src_idx.cpu(), dst_idx.cpu())
    if runs.slices is not None:
        for i, j, n in runs.slices:
            dst[j:j + n].copy_(src[i:i + n])
        return
    ws, wd = _words(src), _words(dst)
    if ws.dtype != wd.dtype:
        ws, wd = src, dst
    wd.index_copy_(0, dst_idx.to(dst.device), ws.index_select(0, src_idx.to(src.device)))


def page_rows_numpy(kv_blocks: torch.Tensor):
    """A [num_blocks, page_bytes] uint8 numpy view of a CPU blocks-first layer whose
    blocks are contiguous pages (`_block_bytes`), for `load_rows_numpy`; None otherwise."""
    pages = _block_bytes(kv_blocks)
    if pages is None or pages.device.type != "cpu":
        return None
    return pages.numpy()


def load_rows_numpy(host_rows, slots, dst_rows, block_ids, runs: RowRuns) -> None:
    """dst_rows[block_ids[i]] <- host_rows[slots[i]] (numpy [n, bytes] uint8 views, index
    arrays, their `row_runs`): `load_slots_into_blocks` without a torch op, so without
    an OpenMP team of its own -- what a thread beside the forward may run
    (connector/cpu_layer_loads.py).  numpy copies release the GIL."""
    if runs.slices is not None:
        for i, j, n in runs.slices:
            dst_rows[j:j + n] = host_rows[i:i + n]
    elif len(slots):
        dst_rows[block_ids] = host_rows[slots]


# -------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class PageLayout:
    """Page p's word (o0, o1, o2, e) is words[base + p * page_stride + o . outer_strides + e]:
    `outer` runs of `inner` contiguous words each, in the page's logical order."""

    words: torch.Tensor  # the whole storage as 1-D words
    base: int
    page_stride: int
    outer: tuple[int, int, int]
    outer_strides: tuple[int, int, int]
    inner: int

    @property
    def page_words(self) -> int:
        return self.outer[0] * self.outer[1] * self.outer[2] * self.inner


def _runs(pages: torch.Tensor) -> tuple[list[tuple[int, int]], int]:
    """(outer (size, stride) dims, contiguous inner elements) of one page, logical order,
    adjacent dims merged where memory allows."""
    dims = [(n, s) for n, s in zip(pages.shape[1:], pages.stride()[1:]) if n != 1]
    merged: list[tuple[int, int]] = []
    for n, s in dims:
        if merged and merged[-1][1] == n * s:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    if merged and merged[-1][1] == 1:
        return merged[:-1], merged[-1][0]
    return merged, 1


def max_word_bytes(pages: torch.Tensor) -> int:
    """The widest copy unit that divides every run, stride and address of `pages`."""
    outer, inner = _runs(pages)
    esize = pages.element_size()
    byte_counts = [inner * esize, pages.stride(0) * esize,
                   pages.data_ptr() - pages.untyped_storage().data_ptr(),
                   pages.untyped_storage().data_ptr()]
    byte_counts += [s * esize for _, s in outer]
    for w in WORD_DTYPES:
        if all(b % w == 0 for b in byte_counts):
            return w
    return 1


def page_layout(pages: torch.Tensor, word_bytes: int,
                like: PageLayout | None = None) -> PageLayout:
    """`pages` ([num_pages, ...], any dtype and strides) described in `word_bytes` words.

    With `like`, the page must be contiguous (a host slot) and is cut into `like`'s outer
    runs, so that word k of a page means the same byte of the block on both sides."""
    outer, inner = _runs(pages)
    esize = pages.element_size()
    if len(outer) > OUTER_DIMS:
        raise ValueError(f"a page of shape {tuple(pages.shape)} and strides {pages.stride()} "
                         f"has {len(outer)} strided dimensions; at most {OUTER_DIMS} supported")
    storage = pages.untyped_storage()
    flat = torch.empty(0, dtype=torch.uint8, device=pages.device).set_(
        storage, 0, (storage.nbytes() // word_bytes * word_bytes,), (1,))
    words = flat.view(WORD_DTYPES[word_bytes])
    base_bytes = pages.data_ptr() - storage.data_ptr()

    def in_words(nbytes: int) -> int:
        if nbytes % word_bytes:
            raise ValueError(f"{nbytes} bytes is not a whole number of {word_bytes}-byte words")
        return nbytes // word_bytes

    if like is not None:
        if outer:
            raise ValueError("the paired page must be contiguous")
        if inner * esize != like.page_words * word_bytes:
            raise ValueError(f"pages of {inner * esize} and {like.page_words * word_bytes} "
                             f"bytes cannot be copied into each other")
        o0, o1, o2 = like.outer
        strides = (o1 * o2 * like.inner, o2 * like.inner, like.inner)
        return PageLayout(words, in_words(base_bytes), in_words(pages.stride(0) * esize),
                          like.outer, strides, like.inner)
    padded = [(1, 0)] * (OUTER_DIMS - len(outer)) + outer
    lay = PageLayout(words, in_words(base_bytes), in_words(pages.stride(0) * esize),
                     tuple(n for n, _ in padded),
                     tuple(in_words(s * esize) for _, s in padded),
                     in_words(inner * esize))
    runs = lay.outer[0] * lay.outer[1] * lay.outer[2]
    if runs > MAX_GRID_YZ or triton_cdiv(lay.inner, MAX_TILE_WORDS) > MAX_GRID_YZ:
        raise ValueError(f"a page of {runs} runs of {lay.inner} words exceeds the launch grid")
    return lay


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def paired_layouts(paged: torch.Tensor, host: torch.Tensor) -> tuple[PageLayout, PageLayout]:
    """(layout of the blocks-first `paged` view, layout of the [slots, page_bytes] `host`
    view) in one word size, word k meaning the same byte on both sides."""
    w = min(max_word_bytes(paged), max_word_bytes(host))
    paged_lay = page_layout(paged, w)
    return paged_lay, page_layout(host, w, like=paged_lay)


# -------------------------------------------------------------------------- triton

if HAS_TRITON:

    @triton.jit
    def _copy_pages_kernel(
        src_ptr, src_idx_ptr, src_base, src_page, src_s0, src_s1, src_s2,
        dst_ptr, dst_idx_ptr, dst_base, dst_page, dst_s0, dst_s1, dst_s2,
        n1, n2, inner, TILE: tl.constexpr,
    ):
        pair = tl.program_id(0)
        run = tl.program_id(1).to(tl.int64)
        tile = tl.program_id(2).to(tl.int64)
        src_pg = tl.load(src_idx_ptr + pair).to(tl.int64)
        dst_pg = tl.load(dst_idx_ptr + pair).to(tl.int64)
        o0 = run // (n1 * n2)
        o1 = (run // n2) % n1
        o2 = run % n2
        e = tile * TILE + tl.arange(0, TILE)
        mask = e < inner
        src = src_ptr + src_base + src_pg * src_page + o0 * src_s0 + o1 * src_s1 + o2 * src_s2
        dst = dst_ptr + dst_base + dst_pg * dst_page + o0 * dst_s0 + o1 * dst_s1 + o2 * dst_s2
        tl.store(dst + e, tl.load(src + e, mask=mask), mask=mask)


def _grid(num_pages: int, lay: PageLayout) -> tuple[int, int, int]:
    return (num_pages, lay.outer[0] * lay.outer[1] * lay.outer[2],
            triton_cdiv(lay.inner, MAX_TILE_WORDS))


def copy_pages_(src: PageLayout, src_pages: torch.Tensor, dst: PageLayout,
                dst_pages: torch.Tensor) -> None:
    """dst page dst_pages[i] <- src page src_pages[i], bit for bit, in one launch.

    src_pages / dst_pages: [n] integer tensors on the layouts' device (not range-checked:
    the caller checks them while they are still host lists)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if (src.outer, src.inner) != (dst.outer, dst.inner) \
            or src.words.element_size() != dst.words.element_size():
        raise ValueError("source and destination layouts differ; build them with paired_layouts")
    n = src_pages.numel()
    if dst_pages.numel() != n:
        raise ValueError(f"{n} source pages, {dst_pages.numel()} destination pages")
    if n == 0:
        return
    launchable(_copy_pages_kernel)[_grid(n, src)](
        src.words, src_pages, src.base, src.page_stride, *src.outer_strides,
        dst.words, dst_pages, dst.base, dst.page_stride, *dst.outer_strides,
        src.outer[1], src.outer[2], src.inner,
        TILE=min(MAX_TILE_WORDS, triton.next_power_of_2(src.inner)), num_warps=NUM_WARPS)


def load_slots_into_blocks_triton(host_layer: torch.Tensor, slots: torch.Tensor,
                                  kv_blocks: torch.Tensor, block_ids: torch.Tensor) -> None:
    """`load_slots_into_blocks` through `copy_pages_` (host_layer: a device view)."""
    paged, host = paired_layouts(kv_blocks, host_layer)
    copy_pages_(host, slots, paged, block_ids)


def save_blocks_to_slots_triton(kv_blocks: torch.Tensor, block_ids: torch.Tensor,
                                host_layer: torch.Tensor, slots: torch.Tensor) -> None:
    """`save_blocks_to_slots` through `copy_pages_` (host_layer: a device view)."""
    paged, host = paired_layouts(kv_blocks, host_layer)
    copy_pages_(paged, block_ids, host, slots)

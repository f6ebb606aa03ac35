"""Block copies are byte-exact on the paged layouts vLLM uses."""

import pytest
import torch

from vllm_promptcache.kernels import (block_dim, blocks_first, load_slots_into_blocks,
                                      save_blocks_to_slots)


@pytest.mark.parametrize("shape,bdim", [
    ((13, 2, 128, 64), 0),          # CPU backend: (blocks, K/V, ...)
    ((2, 13, 16, 2, 32), 1),        # FlashAttention: (K/V, blocks, block_size, heads, dim)
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact(shape, bdim, dtype):
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(shape, generator=g).to(dtype)
    # Include NaN payloads and -0.0: a byte copy must keep them.
    kv.view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
    assert block_dim(kv, 13) == bdim
    view = blocks_first(kv, 13)
    page = view[0].numel() * view.element_size()
    host = torch.zeros(8, page, dtype=torch.uint8)
    src = torch.tensor([3, 7, 12])
    slots = torch.tensor([5, 0, 2])
    save_blocks_to_slots(view, src, host, slots)

    target = torch.full_like(kv, 7.0)
    tview = blocks_first(target, 13)
    dst = torch.tensor([1, 2, 4])
    load_slots_into_blocks(host, slots, tview, dst)
    for s, d in zip(src.tolist(), dst.tolist()):
        assert torch.equal(tview[d].view(torch.uint8) if dtype != torch.float32 else tview[d].view(torch.int32),
                           view[s].view(torch.uint8) if dtype != torch.float32 else view[s].view(torch.int32))
    untouched = [b for b in range(13) if b not in dst.tolist()]
    assert (tview[untouched] == 7.0).all(), "only the target blocks are written"


def test_block_dim_requires_a_matching_dimension():
    with pytest.raises(ValueError, match="no dimension of size 5"):
        block_dim(torch.zeros(2, 3, 4), 5)


@pytest.mark.parametrize("pattern", ["runs", "scattered"])
@pytest.mark.parametrize("shape", [(300, 2, 16, 128), (2, 300, 16, 2, 64)])
def test_runs_and_scattered_copies_move_each_block_whole(pattern, shape):
    """Runs of consecutive slots into consecutive blocks (slice copies) and more runs
    than MAX_SLICE_RUNS (one word gather and scatter) both move exactly the named
    blocks, into host rows strided like the host buffer's (all layers in one row), and
    back."""
    from vllm_promptcache.kernels.block_copy import MAX_SLICE_RUNS

    g = torch.Generator().manual_seed(2)
    kv = torch.randn(shape, generator=g).to(torch.bfloat16)
    view = blocks_first(kv, 300)
    page = view[0].numel() * view.element_size()
    buffer = torch.zeros(260, 3 * page, dtype=torch.uint8)  # three layers per slot row
    host = buffer[:, page:2 * page]
    if pattern == "runs":  # three runs
        src = torch.cat([torch.arange(10, 60), torch.arange(100, 140), torch.arange(200, 201)])
        slots = torch.cat([torch.arange(0, 50), torch.arange(70, 110), torch.arange(5, 6) + 250])
    else:
        src = torch.randperm(300, generator=g)[:2 * MAX_SLICE_RUNS]
        slots = torch.randperm(260, generator=g)[:2 * MAX_SLICE_RUNS]
    save_blocks_to_slots(view, src, host, slots)
    for b, s in zip(src.tolist(), slots.tolist()):
        assert torch.equal(host[s], view[b].contiguous().view(torch.uint8).flatten())
    assert not buffer[:, :page].any() and not buffer[:, 2 * page:].any(), "other layers untouched"

    target = torch.zeros_like(kv)
    tview = blocks_first(target, 300)
    dst = torch.randperm(300, generator=g)[:len(src)] if pattern == "scattered" \
        else torch.arange(len(src)) + 7
    load_slots_into_blocks(host, slots, tview, dst)
    for b, d in zip(src.tolist(), dst.tolist()):
        assert torch.equal(tview[d].view(torch.int16), view[b].view(torch.int16))
    untouched = sorted(set(range(300)) - set(dst.tolist()))
    assert not tview[untouched].view(torch.int16).any()


def test_runs_found_once_serve_every_layer_of_a_step():
    """The worker finds a step's runs once (`row_runs`) and hands them to every layer's
    copy: the runs are what the indices say, and copies given them move the same bytes
    as copies that find them themselves."""
    from vllm_promptcache.kernels.block_copy import MAX_SLICE_RUNS, row_runs

    assert row_runs([4, 5, 6, 9], [0, 1, 2, 3]).slices == ((4, 0, 3), (9, 3, 1))
    assert row_runs([], []).slices == ()
    assert row_runs(list(range(0, 4 * MAX_SLICE_RUNS, 2)),
                    list(range(2 * MAX_SLICE_RUNS))).slices is None

    g = torch.Generator().manual_seed(3)
    layers = [blocks_first(torch.randn(40, 2, 16, 128, generator=g).to(torch.bfloat16), 40)
              for _ in range(3)]
    page = layers[0][0].numel() * 2
    src = [3, 4, 5, 20, 21, 30]
    slots = [10, 11, 12, 0, 1, 7]
    runs = row_runs(src, slots)
    for view in layers:
        given = torch.zeros(16, page, dtype=torch.uint8)
        found = torch.zeros(16, page, dtype=torch.uint8)
        save_blocks_to_slots(view, torch.tensor(src), given, torch.tensor(slots), runs)
        save_blocks_to_slots(view, torch.tensor(src), found, torch.tensor(slots))
        assert torch.equal(given, found) and given.any()
        back = torch.zeros_like(view)
        load_slots_into_blocks(given, torch.tensor(slots), back, torch.tensor(src),
                               row_runs(slots, src))
        assert torch.equal(back[src].view(torch.int16), view[src].view(torch.int16))

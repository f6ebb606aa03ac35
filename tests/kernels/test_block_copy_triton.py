"""The Triton block copy (interpreted, on CPU tensors) against the torch reference: both
directions bit-exact on every paged layout vLLM uses, through strided host-slot views,
in every word width; nothing outside the requested blocks and slots is written."""


import pytest
import torch

from vllm_promptcache.kernels import block_copy as bc

NUM_BLOCKS = 13


# Run the Triton kernels interpreted (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _kv(layout: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """One layer's KV tensor as vLLM allocates it, random bits (NaN payloads included)."""
    if layout == "cpu":                       # (blocks, heads, block, 2 * head), contiguous
        shape, perm = (NUM_BLOCKS, 2, 32, 64), None
    elif layout == "flash_attn_0.26":         # (2, blocks, block, heads, head)
        shape, perm = (2, NUM_BLOCKS, 16, 2, 32), None
    elif layout == "flash_attn_hnd":          # logical (blocks, heads, block, 2*head), HND
        shape, perm = (NUM_BLOCKS, 4, 16, 48), None
    elif layout == "flash_attn_nhd":          # same logical shape, stored (blocks, block, heads, 2*head)
        shape, perm = (NUM_BLOCKS, 16, 4, 48), (0, 2, 1, 3)
    elif layout == "odd":                     # a run of 3 elements: forces narrow words
        shape, perm = (NUM_BLOCKS, 5, 3), None
    else:
        raise AssertionError(layout)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    kv = raw.view(dtype).view(shape)
    return kv.permute(perm) if perm else kv


LAYOUTS = ["cpu", "flash_attn_0.26", "flash_attn_hnd", "flash_attn_nhd", "odd"]
DTYPES = [torch.bfloat16, torch.float32, torch.uint8]  # uint8: an fp8 cache's bytes


def _host(page_bytes: int, num_slots: int, pad: int, g: torch.Generator) -> torch.Tensor:
    """[num_slots, page_bytes] rows of a wider buffer (as HostBuffer.layer_view gives)."""
    buf = torch.randint(0, 256, (num_slots, pad + page_bytes + 8), dtype=torch.uint8,
                        generator=g)
    return buf[:, pad:pad + page_bytes]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", [0, 2, 8])
def test_save_then_load_matches_reference(layout, dtype, pad):
    g = torch.Generator().manual_seed(hash((layout, str(dtype), pad)) % 2**31)
    kv = _kv(layout, dtype, g)
    blocks = bc.blocks_first(kv, NUM_BLOCKS)
    page = blocks[0].numel() * blocks.element_size()
    block_ids = torch.tensor([3, 7, 12, 0])
    slots = torch.tensor([5, 0, 2, 6])

    host_ref = _host(page, 8, pad, g)
    host_tri = host_ref.clone() if pad == 0 else _host(page, 8, pad, g)
    host_tri.copy_(host_ref)
    bc.save_blocks_to_slots(blocks, block_ids, host_ref, slots)
    bc.save_blocks_to_slots_triton(blocks, block_ids, host_tri, slots)
    assert torch.equal(host_tri, host_ref), "save: same bytes in every slot, touched or not"

    kv_ref = _kv(layout, dtype, g)
    kv_tri = kv_ref.clone()
    dst = torch.tensor([1, 2, 4, 11])
    bc.load_slots_into_blocks(host_ref, slots, bc.blocks_first(kv_ref, NUM_BLOCKS), dst)
    bc.load_slots_into_blocks_triton(host_tri, slots, bc.blocks_first(kv_tri, NUM_BLOCKS), dst)
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    assert torch.equal(as_bytes(kv_tri), as_bytes(kv_ref)), "load: same bytes everywhere"
    # And the round trip is the identity on the moved blocks.
    tri_blocks = bc.blocks_first(kv_tri, NUM_BLOCKS)
    for s, d in zip(block_ids.tolist(), dst.tolist()):
        assert torch.equal(as_bytes(tri_blocks[d]), as_bytes(blocks[s]))


def test_layout_words_and_runs():
    g = torch.Generator().manual_seed(0)
    fa = bc.blocks_first(_kv("flash_attn_0.26", torch.bfloat16, g), NUM_BLOCKS)
    lay = bc.page_layout(fa, bc.max_word_bytes(fa))
    assert lay.outer == (1, 1, 2), "K and V halves of a block are two runs"
    assert lay.inner * 8 == 16 * 2 * 32 * 2 and lay.words.dtype == torch.int64
    odd = bc.blocks_first(_kv("odd", torch.bfloat16, g), NUM_BLOCKS)
    assert bc.max_word_bytes(odd) == 2


def test_mismatched_pages_are_refused():
    g = torch.Generator().manual_seed(0)
    blocks = bc.blocks_first(_kv("cpu", torch.bfloat16, g), NUM_BLOCKS)
    page = blocks[0].numel() * 2
    with pytest.raises(ValueError, match="cannot be copied"):
        bc.paired_layouts(blocks, torch.zeros(4, page - 8, dtype=torch.uint8))

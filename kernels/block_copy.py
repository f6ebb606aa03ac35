"""Whole-block copies between a layer of vLLM's paged KV cache and host-tier slots.

Works on any paged layout: the block dimension is found by its size and moved to
the front as a view, so vLLM 0.26 FlashAttention's (2, N, block, heads, dim), 0.32's
(N, heads, block, 2 * dim) and the CPU backend's packed pages are handled alike.  A copy moves raw bytes, so a loaded
block is bit-identical to the saved one whatever the dtype.
"""

from __future__ import annotations

import torch


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


def save_blocks_to_slots(kv_blocks: torch.Tensor, block_ids: torch.Tensor,
                         host_layer: torch.Tensor, slots: torch.Tensor) -> None:
    """host_layer[slots[i]] <- bytes of kv_blocks[block_ids[i]] for every i.

    kv_blocks: a blocks-first view of one layer; host_layer: [num_slots, page_bytes] uint8.
    """
    data = kv_blocks.index_select(0, block_ids.to(kv_blocks.device)).contiguous()
    data = data.view(torch.uint8).reshape(len(block_ids), -1)
    if data.device != host_layer.device:
        data = data.to(host_layer.device)
    host_layer.index_copy_(0, slots, data)


def load_slots_into_blocks(host_layer: torch.Tensor, slots: torch.Tensor,
                           kv_blocks: torch.Tensor, block_ids: torch.Tensor,
                           non_blocking: bool = False) -> None:
    """kv_blocks[block_ids[i]] <- bytes of host_layer[slots[i]] for every i."""
    data = host_layer.index_select(0, slots)
    if data.device != kv_blocks.device:
        if non_blocking and not data.is_pinned():
            data = data.pin_memory()
        data = data.to(kv_blocks.device, non_blocking=non_blocking)
    data = data.view(kv_blocks.dtype).reshape((len(slots),) + tuple(kv_blocks.shape[1:]))
    kv_blocks.index_copy_(0, block_ids.to(kv_blocks.device), data)

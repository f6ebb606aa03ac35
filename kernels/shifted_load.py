"""Load single tokens from host-tier slots into vLLM's paged KV cache at new positions.

Position-independent reuse (store/segments.py) finds stored tokens at other positions
of a new prompt, with boundaries anywhere inside blocks, so whole-block copies
(block_copy.py) no longer fit: each token comes from (host slot, offset in block) and
goes to its own paged slot, with K rotated by its position delta (rope_shift.py).

Host slots hold the raw bytes of whole paged blocks, exactly as `save_blocks_to_slots`
wrote them: the layer's blocks-first view of one block, made contiguous.  Viewing a
``[num_slots, page_bytes]`` host layer as a KV tensor of the layer's own shape with
num_slots blocks therefore lets `paged_kv_views` read it, packed CPU layouts included,
and tokens are gathered through the same views vLLM's attention uses.

On the CPU, a C loop moves the tokens piece by piece (cpu_native.py, built on first
use), or, where it cannot be built, torch moves runs of tokens as slices of blocks
(shifted_slices.py) and what is left token by token; on CUDA (and under the Triton
interpreter) one Triton program moves each token.
"""

from __future__ import annotations

import torch

from .cpu_native import (NativePlan, move_layer_native, move_layers_native, native_dtypes,
                         native_move, plan_native, prepare_layers_native)
from .rope_shift import _use_triton, paged_kv_views, rope_shift_paged_
from .shifted_slices import SlicePlan, move_layer, plan_slices


def _block_dim(kv_layer: torch.Tensor) -> int:
    """The block dimension of the shapes `paged_kv_views` accepts: (2, blocks, ...)
    for the legacy 5-D FlashAttention layout, dim 0 otherwise."""
    return 1 if kv_layer.dim() == 5 else 0


def host_as_layer(host_layer: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
    """`host_layer` [num_slots, page_bytes] uint8 viewed as a KV tensor shaped like
    `kv_layer` with num_slots blocks (no copy; rows may be strided, as HostBuffer's are)."""
    bdim = _block_dim(kv_layer)
    page_shape = kv_layer.movedim(bdim, 0).shape[1:]
    page_bytes = page_shape.numel() * kv_layer.element_size()
    if host_layer.dtype != torch.uint8 or host_layer.dim() != 2 \
            or host_layer.shape[1] != page_bytes:
        raise ValueError(f"host layer must be [num_slots, {page_bytes}] uint8 (one block of "
                         f"{tuple(page_shape)} {kv_layer.dtype}), got "
                         f"{tuple(host_layer.shape)} {host_layer.dtype}")
    pages = host_layer.view(kv_layer.dtype).view(host_layer.shape[0], *page_shape)
    return pages.movedim(0, bdim)


def load_tokens_shifted(host_layer: torch.Tensor, src_slots: torch.Tensor,
                        src_offsets: torch.Tensor, kv_layer: torch.Tensor, layout: str,
                        num_kv_heads: int, head_size: int, block_size: int,
                        dst_slot_mapping: torch.Tensor, delta: torch.Tensor,
                        inv_freq: torch.Tensor, rotary_dim: int, is_neox_style: bool,
                        isa: str | None = None,
                        plan: NativePlan | SlicePlan | None = None) -> None:
    """Token t: host slot src_slots[t], offset src_offsets[t] -> paged slot
    dst_slot_mapping[t] of `kv_layer`, K rotated by delta[t] positions.

    host_layer: [num_slots, page_bytes] uint8, one layer of the host tier: on CUDA a
        device view of the pinned buffer, which the Triton kernel reads directly.
    src_slots, src_offsets: [T] int64 on the host layer's device; every token's source
        must be valid (also where its destination is -1; device indices are not checked
        here: check them with `check_token_sources` while they are lists).
    kv_layer: the layer's KV tensor as vLLM allocated it (not blocks-first); layout and
        isa as for `paged_kv_views`.
    dst_slot_mapping: [T] int64, block_id * block_size + offset, -1 = skip.
    delta, inv_freq, rotary_dim, is_neox_style: as for `rope_shift_`.
    plan: on the CPU, `plan_cpu_load` of these tokens, built (and their sources checked)
        once for every layer of a step; else built here.
    Delta-0 tokens and all of V are copied bit-exactly.
    """
    if src_slots.shape != src_offsets.shape or src_slots.dim() != 1:
        raise ValueError("src_slots and src_offsets must be [T]")
    if src_slots.numel() == 0:
        return
    if not src_slots.is_cuda and plan is None:  # (device indices were checked as lists)
        check_token_sources(src_slots.numpy(), src_offsets.numpy(), host_layer.shape[0],
                            block_size)
    host = host_as_layer(host_layer, kv_layer)
    host_k, host_v = paged_kv_views(host, layout, num_kv_heads, head_size, block_size, isa)
    dst_k, dst_v = paged_kv_views(kv_layer, layout, num_kv_heads, head_size, block_size, isa)
    device = kv_layer.device
    if not _use_triton(kv_layer):
        if plan is None:
            plan = plan_cpu_load(src_slots, src_offsets, dst_slot_mapping, delta, block_size,
                                 inv_freq, kv_layer.dtype)
        if isinstance(plan, NativePlan):
            move_layer_native(host_k, host_v, dst_k, dst_v, plan, rotary_dim, is_neox_style)
        else:
            move_layer(host_k, host_v, dst_k, dst_v, plan, inv_freq, rotary_dim,
                       is_neox_style)
        return
    rope_shift_paged_(host_k, host_v, src_slots * block_size + src_offsets, dst_k, dst_v,
                      dst_slot_mapping.to(device=device, dtype=torch.int64),
                      delta.to(device=device, dtype=torch.int64), inv_freq, rotary_dim,
                      is_neox_style)


def load_layers_shifted(host_layers, kv_layers, src_slots: torch.Tensor,
                        src_offsets: torch.Tensor, layout: str, num_kv_heads: int,
                        head_size: int, block_size: int, dst_slot_mapping: torch.Tensor,
                        delta: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
                        is_neox_style: bool, isa: str | None = None,
                        plan: NativePlan | SlicePlan | None = None) -> None:
    """`load_tokens_shifted` for every layer of a load, host_layers[i] -> kv_layers[i]
    (arguments otherwise as there).  With the C loop's plan, every layer laid out alike
    moves in one call (its offset tables built once, not per layer)."""
    host_layers, kv_layers = list(host_layers), list(kv_layers)
    if len(host_layers) != len(kv_layers):
        raise ValueError(f"{len(host_layers)} host layers for {len(kv_layers)} KV layers")
    if isinstance(plan, NativePlan) and kv_layers and not _use_triton(kv_layers[0]):
        if src_slots.numel() == 0:
            return
        views = []
        for host_layer, kv_layer in zip(host_layers, kv_layers):
            host = host_as_layer(host_layer, kv_layer)
            views.append((*paged_kv_views(host, layout, num_kv_heads, head_size, block_size,
                                          isa),
                          *paged_kv_views(kv_layer, layout, num_kv_heads, head_size,
                                          block_size, isa)))
        move_layers_native(views, plan, rotary_dim, is_neox_style)
        return
    for host_layer, kv_layer in zip(host_layers, kv_layers):
        load_tokens_shifted(host_layer, src_slots, src_offsets, kv_layer, layout, num_kv_heads,
                            head_size, block_size, dst_slot_mapping, delta, inv_freq,
                            rotary_dim, is_neox_style, isa, plan)


def prepare_layers_shifted(host_layers, kv_layers, layout: str, num_kv_heads: int,
                           head_size: int, block_size: int, plan: NativePlan,
                           rotary_dim: int, is_neox_style: bool, isa: str | None = None):
    """`load_layers_shifted` through the C loop, one callable per layer (host_layers[i]
    -> kv_layers[i], in order), checked and tabled here: a call moves its layer and
    touches no torch op, so it may run on a thread of its own beside the forward."""
    host_layers, kv_layers = list(host_layers), list(kv_layers)
    if len(host_layers) != len(kv_layers):
        raise ValueError(f"{len(host_layers)} host layers for {len(kv_layers)} KV layers")
    if not isinstance(plan, NativePlan):
        raise TypeError("layer by layer, shifted loads go through the C loop's plan only")
    views = []
    for host_layer, kv_layer in zip(host_layers, kv_layers):
        host = host_as_layer(host_layer, kv_layer)
        views.append((*paged_kv_views(host, layout, num_kv_heads, head_size, block_size, isa),
                      *paged_kv_views(kv_layer, layout, num_kv_heads, head_size, block_size,
                                      isa)))
    return prepare_layers_native(views, plan, rotary_dim, is_neox_style)


def plan_cpu_load(src_slots, src_offsets, dst_slots, deltas, block_size: int,
                  inv_freq: torch.Tensor, dtype: torch.dtype) -> NativePlan | SlicePlan:
    """How the CPU moves a load's tokens (arguments as `plan_slices` takes them): the C
    loop's pieces where it is built and checked on this machine, else torch slices."""
    if dtype in native_dtypes() and native_move() is not None:
        return plan_native(src_slots, src_offsets, dst_slots, deltas, block_size, inv_freq)
    return plan_slices(src_slots, src_offsets, dst_slots, deltas, block_size, inv_freq)


def check_token_sources(src_slots, src_offsets, num_slots: int, block_size: int) -> None:
    """Every source token inside the host tier (the Triton path does not check); the
    indices are lists, numpy arrays or CPU tensors."""
    import numpy as np

    slots, offsets = np.asarray(src_slots), np.asarray(src_offsets)
    if slots.size and (slots.min() < 0 or slots.max() >= num_slots):
        raise IndexError(f"src_slots out of range [0, {num_slots})")
    if offsets.size and (offsets.min() < 0 or offsets.max() >= block_size):
        raise IndexError(f"src_offsets out of range [0, {block_size})")

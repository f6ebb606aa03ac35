"""Kernels that move KV blocks between vLLM's paged cache and the tiers.

Shipped as `vllm_promptcache.kernels`.  Each kernel has a plain torch function with
the same signature beside it: the reference, the CPU backend's path and the test
oracle.

- `block_copy`: whole blocks between a paged layer and host-tier slots, byte-exact:
  torch (CPU backend) and `copy_pages_` (Triton, through a device view of pinned memory).
- `triton_launch`: whether Triton is there, and interpreter-aware kernel launch.
- `rope_shift`: K/V of a token run into the paged cache, K rotated by a RoPE position
  delta; `rope_shift_paged_` reads the tokens straight from host slots.
- `shifted_load`: a step's tokens from host slots into the paged cache at new
  positions; on CPU through `cpu_native` (a C loop, `cpu_shifted.c`, built on first
  use with the system compiler), or where it cannot be built through `shifted_slices`,
  which moves runs of tokens as slices of whole blocks (short runs token by token).
"""

from .block_copy import (block_dim, blocks_first, load_slots_into_blocks, row_runs,
                         save_blocks_to_slots)

__all__ = ["block_dim", "blocks_first", "load_slots_into_blocks", "row_runs",
           "save_blocks_to_slots"]

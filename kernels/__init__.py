"""Kernels that move KV blocks between vLLM's paged cache and the tiers.

Shipped as `vllm_promptcache.kernels`.  Each kernel has a plain torch function with
the same signature beside it: the reference, the CPU backend's path and the test
oracle.

- `block_copy`: whole blocks between a paged layer and host-tier slots, byte-exact.
- `rope_shift`: K/V of a token run into the paged cache, K rotated by a RoPE position
  delta (import `vllm_promptcache.kernels.rope_shift`; it pulls in Triton).
"""

from .block_copy import block_dim, blocks_first, load_slots_into_blocks, save_blocks_to_slots

__all__ = ["block_dim", "blocks_first", "load_slots_into_blocks", "save_blocks_to_slots"]

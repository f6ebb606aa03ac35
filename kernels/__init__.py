"""Kernels that move KV blocks between vLLM's paged cache and the tiers.

Shipped as `vllm_promptcache.kernels`.  Each kernel has a plain torch function with
the same signature beside it: the reference, the CPU backend's path and the test
oracle.
"""

from .block_copy import block_dim, blocks_first, load_slots_into_blocks, save_blocks_to_slots

__all__ = ["block_dim", "blocks_first", "load_slots_into_blocks", "save_blocks_to_slots"]

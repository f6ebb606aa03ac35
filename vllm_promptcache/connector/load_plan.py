"""This step's copies into vLLM's paged cache, planned when vLLM allocates a request.

A lookup (scheduler.py) offers a run: exact blocks in host (some promoted there from a
lower tier), then maybe a stored run's partial last block (tails.py), then tokens found
at other positions (shifted.py).  vLLM allocates blocks for what it takes of the offer,
which may be less (it trims to its own budget): here that becomes whole-block copies
(`BlockTransfer`), token copies with a RoPE shift (`ShiftedLoad`), and the blocks the
forward also writes into (`shared_blocks`: vLLM computes the rest of a block a copy
filled in part, so those copies must land before the forward).  The hit counters are
kept here, per tier, as the plan is made.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..store.host_tier import HostTier
from .metadata import BlockTransfer, ShiftedLoad
from .request_state import Lookup
from .shifted import ShiftedPlan

logger = logging.getLogger("vllm.promptcache")


class LoadPlan:
    def __init__(self, block_size: int, host: HostTier, secondary: Any, stats: Any):
        self.block_size = block_size
        self.host = host
        self.secondary = secondary  # SecondaryTiers: which loaded blocks a promotion brought
        self.stats = stats
        self.loads: list[BlockTransfer] = []
        self.shifted_loads: list[ShiftedLoad] = []
        self.shared_blocks: list[int] = []  # of loads: the forward writes into them too

    def take(self) -> tuple[list[BlockTransfer], list[ShiftedLoad], list[int]]:
        out = self.loads, self.shifted_loads, self.shared_blocks
        self.loads, self.shifted_loads, self.shared_blocks = [], [], []
        return out

    def allocated(self, req_id: str, lookup: Lookup, all_block_ids: list[int],
                  num_external_tokens: int) -> int | None:
        """Plan the copies of what vLLM took of the lookup's offer into the request's
        blocks; the first block holding approximate (shifted) KV, or None."""
        bs = self.block_size
        first = lookup.local_tokens // bs
        n = min(num_external_tokens // bs, len(lookup.slots))
        n_shifted = num_external_tokens - n * bs
        untaken = 0  # tokens of the last copied block that vLLM computes again
        if n_shifted and n < len(lookup.slots):
            # vLLM took part of one more exact block (it may trim what we offered):
            # copy that block whole, vLLM computes the rest of it.
            n, n_shifted, untaken = n + 1, 0, bs - n_shifted
        block_ids = all_block_ids[first:first + n]
        slots = lookup.slots[:n]
        if untaken:
            self.shared_blocks.append(block_ids[-1])  # the forward computes its rest
        self.host.ready_prefix(lookup.keys[:n], touch=True)
        tail = lookup.tail
        if tail is not None and n_shifted:
            # The partial last block of a stored run: one more whole-block copy, into a
            # block the forward (or a shifted load after it) fills the rest of.
            block_ids, slots = block_ids + [all_block_ids[first + n]], slots + [tail.slot]
            self.shared_blocks.append(all_block_ids[first + n])
            self.host.ready_prefix([tail.key], touch=True)
            taken = min(tail.length, n_shifted)
            self.stats.inc("hit_tokens_total", taken, tier="host")
            # What follows the tail is planned from its end only.
            n_shifted = n_shifted - taken if taken == tail.length else 0
        if slots:
            self.loads.append(BlockTransfer(req_id, block_ids, slots))
        first_approximate = None
        if n_shifted and lookup.shifted is not None:
            self._shifted(req_id, lookup.shifted, n_shifted, all_block_ids)
            first_approximate = lookup.shifted.start // bs
        # Blocks of direct reads are counted when their read lands (secondary.py).
        from_tier, prefetched, direct = self.secondary.loaded(lookup.keys[:n])
        from_below = sum(from_tier.values()) + direct
        self.stats.inc("lookup_hits_total")
        if n_shifted:
            self.stats.inc("hit_tokens_total", n_shifted, tier="host")
        # Tokens per tier: whole blocks, less what vLLM computes of a trimmed last one
        # (taken from host's count, or from a lower tier's where host has none).
        counts = {"host": (n - from_below) * bs, **{t: b * bs for t, b in from_tier.items()}}
        trimmed = next((t for t, c in counts.items() if c >= untaken), None)
        if trimmed is not None:  # else the trimmed block is a direct read's
            counts[trimmed] -= untaken
        for tier, tokens in counts.items():
            if tokens:
                self.stats.inc("hit_tokens_total", tokens, tier=tier)
        if prefetched:
            self.stats.inc("prefetch_hit_blocks_total", prefetched)
        logger.debug("promptcache: request %s loads %d tokens: %d blocks through host (%d of "
                     "them from disk or remote), %d tokens found at other positions; %d were in "
                     "vLLM's prefix cache", req_id, num_external_tokens, n, from_below,
                     n_shifted, lookup.local_tokens)
        return first_approximate

    def _shifted(self, req_id: str, plan: ShiftedPlan, n_tokens: int,
                 block_ids: list[int]) -> None:
        plan.truncate(n_tokens)
        bs = self.block_size
        positions = np.arange(plan.start, plan.start + n_tokens, dtype=np.int64)
        dst = np.asarray(block_ids, dtype=np.int64)[positions // bs] * bs + positions % bs
        self.shifted_loads.append(ShiftedLoad(req_id, plan.src_slots, plan.src_offsets, dst,
                                              plan.deltas))
        # Used runs stay young (a gap encoding ages out only when unused).
        self.host.touch(np.unique(plan.src_slots).tolist())
        if plan.shifted_tokens:
            self.stats.inc("shifted_hit_tokens_total", plan.shifted_tokens, tier="host")
        if plan.gap_tokens:
            self.stats.inc("gap_tokens_total", plan.gap_tokens, tier="host")
        logger.debug("promptcache: request %s loads %d tokens found at other positions "
                     "(%d of them shifted)", req_id, n_tokens, plan.shifted_tokens)

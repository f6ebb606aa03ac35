"""Block keys: a chained hash over each block's token ids, seeded by what makes KV comparable.

Two blocks share a key only if the model, its revision, dtypes, KV layout, TP
layout, the request's cache salt *and* every token up to the block's end are
the same.  Chaining makes a key name a whole prefix, as vLLM's own prefix cache
does, so a hit on block i implies the KV of blocks 0..i-1 is the right context.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import asdict, dataclass
from typing import Any, Sequence

BlockKey = bytes  # 16-byte digest
KEY_BYTES = 16


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything about an engine that changes the bytes of a KV block."""

    model: str
    revision: str | None
    dtype: str
    kv_cache_dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    tp_size: int
    tp_rank: int

    def digest(self) -> bytes:
        text = "|".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))
        return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest()

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, tp_rank: int = 0) -> "ModelFingerprint":
        mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
        return cls(
            model=str(mc.model),
            revision=mc.revision,
            dtype=str(mc.dtype),
            kv_cache_dtype=str(cc.cache_dtype),
            block_size=int(cc.block_size),
            num_layers=int(mc.get_num_layers(pc)),
            num_kv_heads=int(mc.get_num_kv_heads(pc)),
            head_size=int(mc.get_head_size()),
            tp_size=int(pc.tensor_parallel_size),
            tp_rank=int(tp_rank),
        )


class BlockKeyer:
    """Computes the keys of a token sequence's full blocks."""

    def __init__(self, fingerprint: ModelFingerprint):
        self.fingerprint = fingerprint
        self.block_size = fingerprint.block_size
        self._seed = fingerprint.digest()

    def seed(self, cache_salt: str | None) -> bytes:
        if not cache_salt:
            return self._seed
        return hashlib.blake2b(self._seed + b"salt:" + cache_salt.encode(),
                               digest_size=KEY_BYTES).digest()

    def block_keys(self, token_ids: Sequence[int], cache_salt: str | None = None,
                   max_blocks: int | None = None) -> list[BlockKey]:
        """Keys of the full blocks of `token_ids` (a trailing partial block has none)."""
        n = len(token_ids) // self.block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        prev = self.seed(cache_salt)
        keys = []
        bs = self.block_size
        for i in range(n):
            chunk = array("q", token_ids[i * bs:(i + 1) * bs]).tobytes()
            prev = hashlib.blake2b(prev + chunk, digest_size=KEY_BYTES).digest()
            keys.append(prev)
        return keys

"""Where KV lives outside vLLM's GPU pool: block keys, tiers and eviction policies."""

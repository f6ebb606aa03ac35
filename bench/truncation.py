"""The turn after a context-window truncation: segment reuse against a full prefill.

A conversation of a system prompt and T user turns (each followed by an answer)
is served once, so its KV is stored.  Then the client drops the oldest D turns,
as it must once the conversation outgrows the window, and sends the next turn:
system prompt + the kept turns + a new question.  Measured on one engine with
``position_independent=True`` (vLLM's prefix cache on), per conversation:

* ``reuse``  the truncated prompt as is: the system prompt is a prefix hit, the
  kept turns are found in the stored segment and loaded at their new (earlier)
  positions with K rotated (``shifted_hit_tokens_total``);
* ``full``   the same prompt under a fresh cache salt: nothing can match, a full
  prefill (the baseline).

TTFT is vLLM's ``first_token_latency`` of each request; the ratio full / reuse is
taken in the same run.  Quality: the reused KV of the kept turns was computed
while attending to the dropped turns (as in CachedAttention), so the answers can
differ; reported is the greedy answer's position-wise token agreement with the
full prefill, and how often the first answer token agrees.  TTFT is measured on
the ``bench`` shape (dummy weights, whose answers mean nothing); quality on the
embedded tiny model (random weights and tokens) or, with ``--quality-model
models/docs-llama``, on the real small model with conversations made of held-out
English passages.  Both sides of a ratio run on the same engine, so on the same
threads; the binding (``bench/common.py``), the worker's thread count and the dtype
(picked from the CPU, ``--dtype`` overrides) are recorded.  Timings are never asserted.

Run:

    python bench/truncation.py             # both parts
    python bench/truncation.py --parts quality --quality-model models/docs-llama \
        --out bench/results/truncation-quality-docs-llama.json
    python bench/truncation.py --quick

Results: ``bench/results/truncation-cpu.json``, ``.md`` and ``.png`` (TTFT of reuse and
of a full prefill per model).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import common  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "truncation-cpu.json"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def heldout_tokens(tokenizer, path: Path):
    """Token ids of the held-out documents (models/build_corpus.py), end to end."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
    from build_corpus import heldout_documents

    for doc in heldout_documents(path):
        yield from tokenizer.encode(doc["text"] + "\n\n", add_special_tokens=False)


def run(model_name: str, args, turn_len: int, system_len: int, vocab: int,
        conversations: int) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_promptcache import engine_kwargs, read_metrics
    from vllm_promptcache.compat import shutdown_llm
    from vllm_promptcache.tiny_model import build_model

    model = build_model(model_name) if model_name in ("tiny", "bench") else model_name
    extra = {"load_format": "dummy"} if model_name == "bench" else {}
    max_len = args.max_model_len if model_name == "bench" else min(args.max_model_len, 4096)
    llm = LLM(model, enforce_eager=True, kv_cache_memory_bytes=common.kv_pool_bytes(),
              dtype=args.dtype,
              max_model_len=max_len, max_num_batched_tokens=max(8192, max_len),
              enable_prefix_caching=True, seed=0, **extra,
              **engine_kwargs(host_gb=args.host_gb, disk_gb=0, position_independent=True))
    threads = common.engine_threads(llm)
    log(f"  {model_name} worker threads: {threads}")
    rng = random.Random(args.seed)

    if model_name in ("tiny", "bench"):
        def toks(n):
            return [rng.randrange(10, vocab) for _ in range(n)]
    else:  # a real model: turns are consecutive passages of held-out English text
        stream = iter(heldout_tokens(llm.get_tokenizer(), args.documents))

        def toks(n):
            return [next(stream) for _ in range(n)]

    def gen(prompt, max_tokens, salt=None):
        p = {"prompt_token_ids": prompt}
        if salt:
            p["cache_salt"] = salt
        out = llm.generate([p], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           use_tqdm=False)[0]
        return list(out.outputs[0].token_ids), out.metrics.first_token_latency

    def shifted_total():
        time.sleep(0.3)
        gen(toks(8), 1)  # a step that carries the last stats
        return read_metrics(llm).get("shifted_hit_tokens_total", {}).get("host", 0)

    gen(toks(300), 2, salt="warm-up")
    rows = []
    for c in range(conversations):
        system = toks(system_len)
        turns = [toks(turn_len) for _ in range(args.turns)]
        history = list(system)
        for t in turns:  # the conversation as served, turn by turn (stored each time)
            history += t
            answer, _ = gen(history, args.answer_tokens)
            history += answer
        kept = history[len(system) + sum(len(t) + args.answer_tokens for t in turns[:args.drop]):]
        question = toks(64)
        truncated = system + kept + question
        before = shifted_total()
        reuse, ttft_reuse = gen(truncated, args.answer_tokens)
        shifted = shifted_total() - before
        full, ttft_full = gen(truncated, args.answer_tokens, salt=f"full-{c}")
        agree = sum(a == b for a, b in zip(reuse, full)) / len(full)
        same_until = next((i for i, (a, b) in enumerate(zip(reuse, full)) if a != b), len(full))
        rows.append({"prompt_tokens": len(truncated), "dropped_tokens": len(history) - len(system) - len(kept),
                     "shifted_tokens": shifted, "ttft_reuse_s": ttft_reuse, "ttft_full_s": ttft_full,
                     "token_agreement": agree, "first_token_agrees": reuse[0] == full[0],
                     "identical_prefix_tokens": same_until})
        log(f"  {model_name} conversation {c}: {rows[-1]}")
    shutdown_llm(llm)
    return {
        "model": Path(model_name).name, "engine_threads": threads, "rows": rows,
        "ttft_reuse_median_s": statistics.median(r["ttft_reuse_s"] for r in rows),
        "ttft_full_median_s": statistics.median(r["ttft_full_s"] for r in rows),
        "speedup": statistics.median(r["ttft_full_s"] / r["ttft_reuse_s"] for r in rows),
        "token_agreement_mean": statistics.fmean(r["token_agreement"] for r in rows),
        "first_token_agreement": sum(r["first_token_agrees"] for r in rows) / len(rows),
        "identical_answers": sum(r["identical_prefix_tokens"] == args.answer_tokens for r in rows) / len(rows),
        "identical_prefix_mean": statistics.fmean(r["identical_prefix_tokens"] for r in rows),
        "shifted_tokens_median": statistics.median(r["shifted_tokens"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--quality-conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--drop", type=int, default=3, help="oldest turns the client drops")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--host-gb", type=float, default=2.0)
    ap.add_argument("--parts", default="ttft,quality")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality-model", default="tiny",
                    help="'tiny' (random tokens) or a model directory such as models/docs-llama "
                         "(turns are held-out English passages)")
    ap.add_argument("--documents", type=Path, default=Path("/tmp/docs-corpus/documents.jsonl"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    common.add_dtype_arg(ap)
    args = ap.parse_args()
    args.dtype = common.setup(args.dtype)
    load = common.MachineLoad()
    if args.quick:
        args.conversations, args.quality_conversations, args.turns, args.drop = 1, 2, 3, 1
    parts = args.parts.split(",")
    results = {}
    if "ttft" in parts:
        log("== TTFT, bench shape")
        results["ttft"] = run("bench", args, turn_len=512, system_len=512, vocab=8000,
                              conversations=args.conversations)
    if "quality" in parts:
        log(f"== quality, {args.quality_model}")
        results["quality"] = run(args.quality_model, args, turn_len=128, system_len=128, vocab=2000,
                                 conversations=args.quality_conversations)
    env = common.run_environment(args.dtype, load,
                                 {part: r["engine_threads"] for part, r in results.items()})
    doc = {"benchmark": "truncation", "environment": env,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "results": results}
    lines = ["| model | prompt tokens | shifted tokens | TTFT reuse | TTFT full prefill | speedup | "
             "answer token agreement | first token agrees | identical answers | "
             "tokens identical before first divergence |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        lines.append(
            f"| {r['model']} | {statistics.median(x['prompt_tokens'] for x in r['rows']):.0f} | "
            f"{r['shifted_tokens_median']:.0f} | {r['ttft_reuse_median_s']:.3f} s | "
            f"{r['ttft_full_median_s']:.3f} s | {r['speedup']:.2f}x | "
            f"{r['token_agreement_mean']:.2f} | {r['first_token_agreement']:.2f} | "
            f"{r['identical_answers']:.2f} | {r['identical_prefix_mean']:.1f} of {args.answer_tokens} |")
    table = "\n".join(lines)
    where = common.provenance_line(env)
    md = (f"# Turn after truncation ({env['date']})\n\n{args.conversations} (TTFT) and "
          f"{args.quality_conversations} (quality) conversations of {args.turns} turns, the "
          f"oldest {args.drop} dropped; {args.answer_tokens}-token answers. On {where}; reuse "
          f"and full prefill on the same engine, speedup = full / reuse per conversation "
          f"(median).\n\n" + table + "\n")
    ttfts = {}
    for r in results.values():
        ttfts[f"{r['model']}: full prefill"] = r["ttft_full_median_s"]
        ttfts[f"{r['model']}: reuse"] = r["ttft_reuse_median_s"]
    common.write_outputs(args.out, doc, md, functools.partial(
        common.bar_chart, title="Turn after truncation: TTFT (median)", values=ttfts,
        ylabel="TTFT (s)", footnote=where))
    print(table)


if __name__ == "__main__":
    main()

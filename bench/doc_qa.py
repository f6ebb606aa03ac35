"""Doc-QA with prompt modules: three ~2k-token documents in shuffled order plus a question.

The documents are registered once as prompt modules (`PromptModules`), then each
query puts them in a new random order and asks a new question.  Every query is
sent these ways on one engine (the `bench` shape: 24 layers, hidden 896, dummy
weights; vLLM's prefix cache on), and its TTFT (vLLM's `first_token_latency`) taken:

* ``no cache``      our loads off, vLLM's prefix cache reset: a full prefill (the
  prompt is stored under its exact keys, for ``exact hit``);
* ``prefix cache``  vLLM's own prefix cache only (our loads off, one shared salt,
  warmed with the documents in their registered order): it reuses at most the
  leading document, and only when the query starts with the same one;
* ``exact hit``     the same prompt stored before under its exact keys (computed
  once with our loads off) and loaded from the host tier: the fastest any cache
  can serve it, the bar for the module rows;
* ``exact hit, documents`` the documents alone (the prompt up to the question)
  stored the same way, then the whole prompt: loaded exact up to the question,
  which is computed -- the like-for-like bar for modules, which compute it too;
* ``modules``       ours: the documents back to back, every one found and loaded at
  its new position;
* ``modules + fix`` ours with the boundary fix (the last 15% of the found run is
  recomputed, `--promptcache-recompute-ratio 0.15`): its TTFT cost;
* ``labels``        the documents with a label before each (``Document 1:`` ...),
  through `compose()` as a user calls it, once those labels' gap encoding ran
  (modules/layout.py: one encoding serves every prompt with the same text between
  modules): compose() sends nothing, and the prompt loads every document and label;
  the TTFT adds compose()'s own time to the prompt's;
* ``labels, first use`` the same prompt when its labels were never encoded: the gap
  encoding's latency (one prefill of only the gap tokens) plus the prompt's;
* ``labels, plain client`` the same labelled prompt as plain token ids (what a
  client sending text gets), once some front end encoded those labels: the scheduler
  matches the prompt to their template;
* ``labels, plain client, new labels`` a plain client whose labels nothing encoded
  (they name the query): no layout, only the token-level search, which cannot load
  past a label that nothing stores (vLLM loads a contiguous prefix).

vLLM's prefix cache is reset before each of our modes (it would otherwise hold
the previous mode's blocks) and no measured request is saved (but ``no cache``, which
stores the exact KV that ``exact hit`` then loads).  Ratios are taken against ``exact
hit`` and ``no cache`` in the same run; timings are never asserted.  All modes run on
the same engine, so on the same threads; the binding
(``bench/common.py``), the worker's thread count and the dtype (picked from the CPU,
``--dtype`` overrides) are recorded.

    python bench/doc_qa.py                  # 6 queries
    python bench/doc_qa.py --quick          # 2 queries
    python bench/doc_qa.py --device cuda    # on a GPU (bench/gpu_suite.py --only doc_qa)

Results: ``bench/results/doc-qa-cpu.json`` (``doc-qa-cuda.json`` on a GPU), ``.md`` and
``.png`` (TTFT per mode).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GPU_MEMORY_UTILIZATION = 0.3  # CUDA: the bench shape and its KV need far less
MODES = ("no cache", "prefix cache", "exact hit", "exact hit, documents", "modules",
         "modules + fix", "labels", "labels, first use", "labels, plain client",
         "labels, plain client, new labels")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def documents(tokenizer, n: int, doc_tokens: int) -> list[str]:
    """n real-English documents of about doc_tokens tokens (Python's own doc topics)."""
    from pydoc_data.topics import topics

    docs, words = [], []
    for key in sorted(topics):
        words += topics[key].split()
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
        if len(ids) >= doc_tokens:
            text = tokenizer.decode(ids[:doc_tokens])
            docs.append(text[:text.rfind(" ")] + "\n")  # end on a whole word
            words = []
            if len(docs) == n:
                return docs
    raise RuntimeError("not enough text in pydoc_data.topics")


def engine_kwargs_for(args) -> dict:
    """The engine's arguments (also checked by bench/gpu_suite.py --dry-run): the bench
    shape's, vLLM's prefix cache on, position-independent reuse.  On CPU an explicit KV
    pool, eager; on CUDA a share of the GPU's memory, CUDA graphs on."""
    from vllm_promptcache import engine_kwargs

    kw = dict(load_format="dummy", dtype=args.dtype, max_model_len=8192,
              max_num_batched_tokens=8192, enable_prefix_caching=True, seed=0,
              **engine_kwargs(host_gb=args.host_gb, disk_gb=0, position_independent=True))
    if getattr(args, "device", "cpu") == "cuda":
        kw["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
    else:
        kw.update(enforce_eager=True, kv_cache_memory_bytes=common.kv_pool_bytes())
    return kw


def engine(args):
    """(LLM, PromptModules with doc0..doc2 registered, names, texts, worker threads) on
    the bench shape (also bench/profile_query.py's)."""
    from vllm import LLM

    from vllm_promptcache import PromptModules
    from vllm_promptcache.tiny_model import build_model

    llm = LLM(build_model("bench"), **engine_kwargs_for(args))
    threads = common.engine_threads(llm)
    names = ["doc0", "doc1", "doc2"]
    texts = documents(llm.get_tokenizer(), 3, args.doc_tokens)
    modules = PromptModules(llm)
    modules.register_modules(dict(zip(names, texts)))
    return llm, modules, names, texts, threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=6, help="at most 6 (each its own order)")
    ap.add_argument("--doc-tokens", type=int, default=2000)
    ap.add_argument("--fix-ratio", type=float, default=0.15)
    ap.add_argument("--host-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/results/doc-qa-cpu.json (doc-qa-cuda.json on CUDA)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: on a GPU, CUDA graphs on (bench/gpu_suite.py --only doc_qa)")
    common.add_dtype_arg(ap)
    args = ap.parse_args()
    if args.quick:
        args.queries = 2
    if args.out is None:
        args.out = RESULTS / f"doc-qa-{args.device}.json"
    args.dtype = common.setup(args.dtype, args.device)
    load = common.MachineLoad()

    from vllm import SamplingParams

    from vllm_promptcache import Text, read_metrics
    from vllm_promptcache.compat import shutdown_llm

    llm, modules, names, texts, threads = engine(args)
    log(f"worker threads: {threads}")
    rng = random.Random(args.seed)
    log("registered:", {n: len(modules.table.get(n).token_ids) for n in names})

    def ttft(prompt, salt=None, **params):
        p = dict(prompt)
        if salt:
            p["cache_salt"] = salt
        # Measured requests store nothing: each mode sees only the modules' KV.
        sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, extra_args={
            "kv_transfer_params": {"promptcache_save": False, **params}})
        return llm.generate([p], sp, use_tqdm=False)[0].metrics.first_token_latency

    def gap_encoding_ttft(prompt):
        """Run the prompt's gap encoding (as compose() does the first time) and return
        its latency."""
        enc = modules.table.gap_encoding(prompt, again=True)
        return llm.generate([enc[0]], enc[1], use_tqdm=False)[0].metrics.first_token_latency

    def fresh():
        # vLLM's prefix cache keeps the blocks of every request by their tokens --
        # including KV we loaded -- so a later mode would reuse an earlier one's.
        # A reset fails while blocks are held (saves in flight): step until it works.
        for _ in range(200):
            if llm.reset_prefix_cache():
                return
            ttft({"prompt_token_ids": list(range(100, 108))})
        raise RuntimeError("vLLM's prefix cache could not be reset")

    def hits():
        ttft({"prompt_token_ids": list(range(100, 108))})  # a step that carries the last stats
        return read_metrics(llm).get("hit_tokens_total", {}).get("host", 0)

    def question(i):
        words = rng.choice(texts).split()  # short documents (--doc-tokens) have few
        return Text(f"Question {i}: which of the documents above describes "
                    f"{words[rng.randrange(min(200, len(words)))]} and why?\nAnswer:")

    def labelled(order, q, tag=""):
        items = []
        for j, name in enumerate(order):
            items += [Text(f"{chr(10) * 2 if j else ''}Document {j + 1}{tag}:\n"), name]
        return items + [q]

    warm = modules.compose(names + [question(-1)])
    modules.compose(labelled(names, question(-1)))  # the labels' gaps, encoded once
    rows = []
    orders = rng.sample([list(p) for p in itertools.permutations(names)], args.queries)
    for i, order in enumerate(orders):
        q = question(i)
        prompt = modules.compose(order + [q])
        row = {"order": order, "prompt_tokens": len(prompt.token_ids)}
        fresh()
        ttft(warm, salt="prefix", promptcache_load=False)  # the documents in their first order
        row["prefix cache"] = ttft(prompt, salt="prefix", promptcache_load=False)
        fresh()
        before = hits()
        row["modules"] = ttft(prompt)
        row["loaded_tokens"] = hits() - before
        fresh()
        row["modules + fix"] = ttft(prompt, promptcache_recompute_ratio=args.fix_ratio)
        # Labels between the documents: a plain client whose labels nothing encoded,
        # then through compose() (the labels' template known: nothing is sent), the
        # first use of labels (their gap encoding run first), and a plain client
        # sending the labels compose() encoded.
        fresh()
        new = modules.table.compose(labelled(order, q, tag=f" of query {i}"))
        row["labels, plain client, new labels"] = ttft({"prompt_token_ids": new.token_ids})
        fresh()
        t0 = time.perf_counter()
        labels = modules.compose(labelled(order, q))
        row["labels_compose_s"] = time.perf_counter() - t0
        before = hits()
        row["labels_prompt_s"] = ttft(labels)
        row["labels"] = row["labels_compose_s"] + row["labels_prompt_s"]
        row["labels_loaded_tokens"] = hits() - before
        row["labels_prompt_tokens"] = len(labels.token_ids)
        fresh()
        row["labels_gap_encoding_s"] = gap_encoding_ttft(labels)
        fresh()
        row["labels, first use"] = row["labels_gap_encoding_s"] + ttft(labels)
        fresh()
        row["labels, plain client"] = ttft({"prompt_token_ids": labels.token_ids})
        # The documents alone stored exact, then the prompt: exact up to the question.
        fresh()
        ttft({"prompt_token_ids": prompt.token_ids[:prompt.boundaries[-2].end]},
             promptcache_load=False, promptcache_save=True)
        fresh()
        row["exact hit, documents"] = ttft(prompt)
        # A full prefill that stores the prompt under its exact keys (last: the module
        # rows above must not find it), then the bar: the same prompt loaded exact.
        fresh()
        row["no cache"] = ttft(prompt, promptcache_load=False, promptcache_save=True)
        fresh()
        row["exact hit"] = ttft(prompt)
        rows.append(row)
        log(f"  query {i}: " + ", ".join(f"{m} {row[m]:.3f} s" for m in MODES)
            + f", loaded {row['loaded_tokens']:.0f} of {row['prompt_tokens']} tokens")
    counters = read_metrics(llm)
    host = {k: counters.get(k, {}).get("host", 0.0)
            for k in ("loaded_bytes_total", "layerwise_loaded_bytes_total")}
    shutdown_llm(llm)

    median = {m: statistics.median(r[m] for r in rows) for m in MODES}
    ratio = {m: statistics.median(r[m] / r["exact hit"] for r in rows) for m in MODES}
    # Against the like-for-like bar: the documents exact, the question computed.
    like = {m: statistics.median(r[m] / r["exact hit, documents"] for r in rows) for m in MODES}
    speedup = {m: statistics.median(r["no cache"] / r[m] for r in rows) for m in MODES}
    env = common.run_environment(args.dtype, load, {"all modes (one engine)": threads},
                                 args.device)
    doc = {"benchmark": "doc_qa", "environment": env,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "ttft_median_s": median, "ttft_ratio_to_exact_hit": ratio,
           "ttft_ratio_to_exact_hit_documents": like,
           "speedup_vs_no_cache": speedup, "host_load_counters": host, "rows": rows}
    lines = ["| mode | TTFT median | / exact hit | / exact hit, documents | speedup vs no cache |",
             "|---|---|---|---|---|"]
    lines += [f"| {m} | {median[m]:.3f} s | {ratio[m]:.2f}x | {like[m]:.2f}x | {speedup[m]:.2f}x |"
              for m in MODES]
    table = "\n".join(lines)
    loaded = statistics.median(r["loaded_tokens"] for r in rows)
    labels_loaded = statistics.median(r["labels_loaded_tokens"] for r in rows)
    labels_tokens = statistics.median(r["labels_prompt_tokens"] for r in rows)
    gap_s = statistics.median(r["labels_gap_encoding_s"] for r in rows)
    compose_s = statistics.median(r["labels_compose_s"] for r in rows)
    tokens = statistics.median(r["prompt_tokens"] for r in rows)
    where = common.provenance_line(env)
    beside = host["layerwise_loaded_bytes_total"] / max(host["loaded_bytes_total"], 1)
    md = (f"# Doc-QA with prompt modules ({env['date']})\n\n{args.queries} queries, 3 documents "
          f"of ~{args.doc_tokens} tokens in shuffled order + a question ({tokens:.0f} prompt "
          f"tokens), bench shape with dummy weights, on {where}; all modes on one engine. "
          f"Modules loaded {loaded:.0f} tokens per query (median); the boundary fix recomputes "
          f"the last {args.fix_ratio:.0%} of the found run.  With labels ({labels_tokens:.0f} "
          f"prompt tokens) {labels_loaded:.0f} tokens were loaded (median); compose() took "
          f"{compose_s:.3f} s (median, its labels encoded before); on first use the gap "
          f"encoding adds {gap_s:.3f} s (median) to the prompt's TTFT.  Of the host tier's "
          f"bytes loaded, {beside:.0%} moved layer by layer beside the forward "
          f"(`--promptcache-load-cpu`).  Ratios are medians of per-query ratios.\n\n"
          + table + "\n")
    common.write_outputs(args.out, doc, md, functools.partial(
        common.bar_chart, title=f"Doc-QA TTFT per mode ({tokens:.0f}-token prompts, median)",
        values=median, ylabel="TTFT (s)", footnote=where))
    print(table)


if __name__ == "__main__":
    main()

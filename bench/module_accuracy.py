"""Accuracy of prompt-module reuse against a full prefill, on a real small model.

Prompt Cache encodes each module on its own, so a document's cached KV never
attended to the modules before it in a new prompt.  This measures what that
costs, on doc-QA style prompts built from real English text:

    [BOS] [instructions] [doc 1] [doc 2] [doc 3] Question: which words follow
    "<a quote from one document>"?  Answer: <the next words of that document>

The model is `models/docs-llama` (trained on documentation that ships with this
machine, see models/README.md); the documents are held-out ones it never saw
(models/build_corpus.py).  Each example is scored in three layouts -- the modules
as registered (schema order), shuffled, and shuffled with a label before each
document (``Document 2 of 3, "<its first words>":``, the words an argument of the
label) and a separator (``---``) between documents -- and these modes:

* ``full``          promptcache_load=false: everything prefilled (the reference);
* ``cached``        every module loaded at its position (RoPE-shifted);
* ``cached + fix``  the boundary fix: the last `--fix-ratio` of the found run is
  prefilled instead of loaded (`promptcache_recompute_ratio`).

and, for the labelled layout, in place of the last two:

* ``gaps prefilled``      the prompt as it ran before layouts (and as a plain client
  still runs it): loaded up to the first label, everything after it prefilled;
* ``gaps encoded``        `compose()`'s gap encoding: the labels and separators encoded
  on their own first, then every module and gap loaded (modules/layout.py);
* ``gaps encoded + fix``  the same with the boundary fix.

Scores, teacher-forced over the gold answer tokens: next-token agreement of the
mode's argmax with the full prefill's, and the answer's perplexity; and, on the
greedy answer, token F1 against the gold answer (CacheBlend's bound: F1 within
0.02 of the full prefill).  No request is saved (promptcache_save=false), so the
only stored KV is the modules', and vLLM's prefix cache is off: every mode sees
exactly the KV it names.  The dtype is picked from the CPU (``--dtype`` overrides); it,
the CPU model, the thread binding (``bench/common.py``) and the worker's threads are
recorded.

    python bench/module_accuracy.py             # 24 examples
    python bench/module_accuracy.py --quick     # 4

Results: ``bench/results/module-accuracy-cpu.json``, ``.md`` and ``.png`` (next-token
agreement with the full prefill per order and mode).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "module-accuracy-cpu.json"
ORDERS = ("schema", "shuffled", "labelled")
MODES = {"schema": ("full", "cached", "cached + fix"),
         "shuffled": ("full", "cached", "cached + fix"),
         "labelled": ("full", "gaps prefilled", "gaps encoded", "gaps encoded + fix")}
INSTRUCTIONS = ("The documents below come from the documentation of a computer system. "
                "Read all of them carefully. After them comes a question that quotes a short "
                "passage from one of the documents; answer it with the words that follow the "
                "quoted passage in that document.\n\n")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def token_f1(pred: list[int], gold: list[int]) -> float:
    common = sum((Counter(pred) & Counter(gold)).values())
    if not common:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


def make_examples(tokenizer, docs: list[dict], n: int, doc_tokens: int, answer_tokens: int,
                  rng: random.Random) -> list[dict]:
    """Examples of three trimmed documents, a quote from one, and its continuation."""
    def trim(text):
        ids = tokenizer.encode(text, add_special_tokens=False)[:doc_tokens]
        cut = tokenizer.decode(ids)
        return cut[:cut.rfind(" ")] + "\n\n"

    usable = [d for d in docs if len(d["text"].split()) > doc_tokens]
    examples = []
    for e in range(n):
        chosen = [trim(d["text"]) for d in rng.sample(usable, 3)]
        target = rng.randrange(3)
        words = chosen[target].split()
        at = rng.randrange(len(words) // 3, len(words) - 40)
        quote = " ".join(words[at - 10:at])
        gold = tokenizer.encode(" " + " ".join(words[at:at + 30]),
                                add_special_tokens=False)[:answer_tokens]
        examples.append({"docs": chosen, "target": target, "quote": quote,
                         "question": f"Question: which words follow \"{quote}\"?\nAnswer:",
                         "gold": gold})
    return examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "docs-llama")
    ap.add_argument("--documents", type=Path, default=Path("/tmp/docs-corpus/documents.jsonl"))
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--doc-tokens", type=int, default=300)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--fix-ratio", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    common.add_dtype_arg(ap)
    args = ap.parse_args()
    if args.quick:
        args.examples = 4
    args.dtype = common.setup(args.dtype)
    load = common.MachineLoad()

    from vllm import LLM, SamplingParams

    from vllm_promptcache import PromptModules, Text, engine_kwargs, read_metrics
    from vllm_promptcache.compat import shutdown_llm

    llm = LLM(str(args.model), enforce_eager=True, kv_cache_memory_bytes=common.kv_pool_bytes(),
              dtype=args.dtype,
              max_model_len=2048, enable_prefix_caching=False, max_logprobs=-1, seed=0,
              **engine_kwargs(host_gb=0.5, disk_gb=0, position_independent=True))
    threads = common.engine_threads(llm)
    log(f"worker threads: {threads}")
    tokenizer = llm.get_tokenizer()
    rng = random.Random(args.seed)
    sys.path.insert(0, str(ROOT / "models"))
    from build_corpus import heldout_documents

    examples = make_examples(tokenizer, heldout_documents(args.documents), args.examples,
                             args.doc_tokens, args.answer_tokens, rng)
    modules = PromptModules(llm)
    registry = {"instructions": INSTRUCTIONS}
    for e, ex in enumerate(examples):
        registry.update({f"e{e}-d{i}": text for i, text in enumerate(ex["docs"])})
    modules.register_modules(registry)
    log(f"registered {len(registry)} modules")

    fix = {"promptcache_recompute_ratio": args.fix_ratio}
    mode_params = {"full": {"promptcache_load": False}, "cached": {}, "cached + fix": fix,
                   "gaps prefilled": {}, "gaps encoded": {}, "gaps encoded + fix": fix}

    def run(prompt_ids: list[int], gold: list[int], mode: str) -> dict:
        kv = {"promptcache_save": False, **mode_params[mode]}
        greedy = SamplingParams(max_tokens=len(gold), temperature=0, ignore_eos=True,
                                extra_args={"kv_transfer_params": kv})
        forced = SamplingParams(max_tokens=1, temperature=0, logprobs=-1,
                                extra_args={"kv_transfer_params": kv})
        prompts = [{"prompt_token_ids": prompt_ids}] + [
            {"prompt_token_ids": prompt_ids + gold[:k]} for k in range(len(gold))]
        outs = llm.generate(prompts, [greedy] + [forced] * len(gold), use_tqdm=False)
        answer = list(outs[0].outputs[0].token_ids)
        argmax, gold_lp = [], []
        for k, out in enumerate(outs[1:]):
            step = out.outputs[0]
            argmax.append(step.token_ids[0])
            gold_lp.append(step.logprobs[0][gold[k]].logprob)
        return {"answer": answer, "argmax": argmax, "gold_logprobs": gold_lp}

    def hits():
        llm.generate([{"prompt_token_ids": list(range(100, 108))}],
                     SamplingParams(max_tokens=1), use_tqdm=False)
        return read_metrics(llm).get("hit_tokens_total", {}).get("host", 0)

    rows = []
    for e, ex in enumerate(examples):
        names = [f"e{e}-d{i}" for i in range(3)]
        shuffled = names[:]
        while shuffled == names:
            rng.shuffle(shuffled)
        for order, doc_names in zip(ORDERS, (names, shuffled, shuffled)):
            items = ["instructions", *doc_names, Text(ex["question"])]
            if order == "labelled":
                items = ["instructions"]
                for j, name in enumerate(doc_names):
                    title = " ".join(registry[name].split()[:4])
                    items += [Text(f"{'---' + chr(10) * 2 if j else ''}Document {j + 1} of 3, "
                                   f"\"{title}\":\n"), name]
                items.append(Text(ex["question"]))
            # Composed without running the gap encoding: the engine does not know the
            # layout until encode_gaps() (so "gaps prefilled" runs as before layouts;
            # each example's labels carry its documents' titles, so no earlier
            # example's template matches it either).
            prompt = modules.table.compose(items)
            before = hits()
            result = {}
            for mode in MODES[order]:
                if mode == "gaps encoded":
                    modules.encode_gaps(prompt)
                result[mode] = run(prompt.token_ids, ex["gold"], mode)
            cached_modes = len(MODES[order]) - 1
            loaded = (hits() - before) / (cached_modes * (1 + len(ex["gold"])))
            full = result["full"]
            row = {"example": e, "order": order, "prompt_tokens": len(prompt.token_ids),
                   "loaded_tokens_per_request": loaded}
            for mode in MODES[order]:
                r = result[mode]
                row[mode] = {
                    "agreement": statistics.fmean(a == b for a, b in zip(r["argmax"], full["argmax"])),
                    "ppl": math.exp(-statistics.fmean(r["gold_logprobs"])),
                    "f1": token_f1(r["answer"], ex["gold"]),
                    "answer_equal_full": r["answer"] == full["answer"],
                }
            rows.append(row)
            log(f"  example {e} {order}: " + ", ".join(
                f"{m}: agree {row[m]['agreement']:.2f} ppl {row[m]['ppl']:.1f} f1 {row[m]['f1']:.2f}"
                for m in MODES[order]))
    shutdown_llm(llm)

    summary = {}
    for order in ORDERS:
        sel = [r for r in rows if r["order"] == order]
        for mode in MODES[order]:
            summary[f"{order}/{mode}"] = {
                "next_token_agreement": statistics.fmean(r[mode]["agreement"] for r in sel),
                "answer_ppl": math.exp(statistics.fmean(math.log(r[mode]["ppl"]) for r in sel)),
                "f1": statistics.fmean(r[mode]["f1"] for r in sel),
                "f1_minus_full": statistics.fmean(r[mode]["f1"] - r["full"]["f1"] for r in sel),
                "answers_equal_full": statistics.fmean(r[mode]["answer_equal_full"] for r in sel),
            }
    env = common.run_environment(args.dtype, load, {"all modes (one engine)": threads})
    doc = {"benchmark": "module_accuracy", "environment": env,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "summary": summary, "rows": rows}
    lines = ["| order | mode | next-token agreement with full | answer perplexity | token F1 "
             "vs gold | F1 − full | greedy answer = full |", "|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        order, mode = key.split("/")
        lines.append(f"| {order} | {mode} | {s['next_token_agreement']:.3f} | {s['answer_ppl']:.2f} | "
                     f"{s['f1']:.3f} | {s['f1_minus_full']:+.3f} | {s['answers_equal_full']:.2f} |")
    table = "\n".join(lines)
    tokens = statistics.median(r["prompt_tokens"] for r in rows)
    loaded = statistics.median(r["loaded_tokens_per_request"] for r in rows)
    where = common.provenance_line(env)
    md = (
        f"# Prompt-module accuracy ({env['date']})\n\nModel `{args.model.name}` on {where}; "
        f"{args.examples} examples of 3 held-out documents (~{args.doc_tokens} tokens each) in "
        f"schema order, shuffled, and shuffled with labels and separators between them, "
        f"{tokens:.0f} prompt tokens (median), "
        f"{args.answer_tokens}-token answers; boundary fix = last {args.fix_ratio:.0%} of the "
        f"found run recomputed; cached requests loaded {loaded:.0f} tokens each (median over "
        f"the cached modes).\n\n" + table + "\n")
    common.write_outputs(args.out, doc, md, functools.partial(
        common.bar_chart, title="Next-token agreement with a full prefill",
        values={k.replace("/", "\n"): s["next_token_agreement"] for k, s in summary.items()},
        ylabel="agreement", footnote=where))
    print(table)


if __name__ == "__main__":
    main()

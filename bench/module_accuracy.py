"""Answer quality of reused KV against a full prefill, on a real model that answers.

The model is SmolLM2-135M-Instruct (vllm_promptcache/real_model.py); the task is the
seeded synthetic fact-QA set (vllm_promptcache/fact_qa.py): short documents of
invented facts (people, bridges, ships, companies), questions whose answers appear verbatim in exactly one of them.
Each of the set's questions is asked over four documents (its own among them), in a
chat prompt: the model's chat head with the instructions, the documents, then the
question (calibration.chat_parts).  The documents and the head are prompt modules,
each encoded once on its own (Prompt Cache).  The shape of the RAG workloads of
CacheBlend and EPIC.  Settings, all on one engine with vLLM's prefix cache off, so
every setting sees exactly the KV it names:

* ``full prefill``              promptcache_load=false: the reference;
* ``exact reuse``               the same prompt after it was served once: a prefix hit
  on its own saved KV (must give the full prefill's answers);
* ``shifted, ratio r``          documents in shuffled order, every module loaded at its
  new position (RoPE-shifted), with the boundary fix recomputing the last r of the
  loaded run (r = 0: no fix);
* ``labelled, encoded gaps``    a label before each document (``Document 2:``), the
  labels encoded as the layout's gaps (modules/layout.py), then everything loaded;
* ``PML parameter``             the documents in a PML schema (modules/pml.py); a prompt
  selects four of them (schema order, so the others' absence shifts them) and passes
  the question as a parameter's argument;
* ``truncation reuse``          the conversation held one more document first, and was
  served (its KV stored); the client dropped that oldest document, as it must once a
  chat outgrows the window, and asks: the kept documents load from the stored run at
  their new positions, KV that attended to the dropped one (CachedAttention).

Scores, on the greedy answer (24 tokens): exact match (the gold span in the answer,
SQuAD-normalised), token F1 against the gold answer, and the share of answers equal
to the full prefill's.  CacheBlend's bound: F1 within 0.02 of the full prefill; the
table also holds exact match to it (as `calibrate` does), since F1 moves with wording.  With
``--ttft``, the time to first token of one request at a time for the full prefill, the
exact hit and shifted reuse at each ratio (first 8 prompts, a median).  The dtype is
picked from the CPU (``--dtype`` overrides); it, the CPU, the thread binding
(``bench/common.py``) and the machine's load are recorded.

    python bench/module_accuracy.py              # 10 documents, 23 questions
    python bench/module_accuracy.py --quick      # 4 documents, 9 questions

Results: ``bench/results/module-accuracy-smollm2-cpu.json``, ``.md`` and ``.png`` (F1 per
setting); ``--render JSON`` rewrites the table and chart of an earlier run.
"""

from __future__ import annotations

import argparse
import dataclasses
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

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "module-accuracy-smollm2-cpu.json"
CACHEBLEND_BOUND = 0.02


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pml_schema(facts, name: str = "facts") -> str:
    from vllm_promptcache import fact_qa

    docs = "".join(f'<module name="d{i}">{d}\n\n</module>' for i, d in enumerate(facts.docs))
    return (f'<schema name="{name}"><system>{fact_qa.INSTRUCTIONS}</system><user>{docs}'
            f'<module name="ask">Answer with a name, a place or a year. Question: '
            f'<parameter name="question" length="32"/></module></schema>')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2",
                    help="'smollm2', 'tiny' or a model directory")
    ap.add_argument("--docs", type=int, default=10, help="documents (2 or 3 questions each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3])
    ap.add_argument("--fix-ratio", type=float, default=0.15,
                    help="the boundary fix of the labelled, PML and truncation rows")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--ttft", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--render", type=Path, help="only rewrite the table and chart of this JSON")
    common.add_dtype_arg(ap)
    if hasattr(common, "add_noisy_arg"):
        common.add_noisy_arg(ap)
    args = ap.parse_args()
    noisy_ok = getattr(args, "allow_noisy", False)
    if args.render:
        import json

        write(args.render, json.loads(args.render.read_text()), noisy_ok)
        return
    if args.quick:
        args.docs = 4
    args.dtype = common.setup(args.dtype)
    load = common.MachineLoad()

    from vllm import LLM, SamplingParams

    from vllm_promptcache import Text, engine_kwargs, fact_qa, read_metrics
    from vllm_promptcache.calibration import Prompts, fact_qa_examples, generate, score
    from vllm_promptcache.compat import shutdown_llm
    from vllm_promptcache.config import PromptCacheConfig
    from vllm_promptcache.modules.pml import chat_role_wrappers
    from vllm_promptcache.tiny_model import build_model

    model = build_model(args.model) if args.model in ("smollm2", "tiny") else args.model
    options = dict(host_gb=1.0, disk_gb=0, position_independent=True)
    if "calibration" in {f.name for f in dataclasses.fields(PromptCacheConfig)}:
        options["calibration"] = "off"  # every row names its own recompute ratio
    llm = LLM(model, enforce_eager=True, kv_cache_memory_bytes=1 << 30, dtype=args.dtype,
              max_model_len=4096, enable_prefix_caching=False, seed=0, **engine_kwargs(**options))
    llm.generate([{"prompt_token_ids": list(range(100, 300))}], SamplingParams(max_tokens=1),
                 use_tqdm=False)
    threads = common.engine_threads(llm)
    log(f"worker threads: {threads}")

    facts = fact_qa.fact_set(args.docs, args.seed)
    examples = fact_qa_examples(args.docs, seed=args.seed)
    golds = [ex.answer for ex in examples]
    prompts = Prompts(llm, examples)
    log(f"{len(examples)} questions, {len(prompts.modules.table)} modules registered")
    rows: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}

    def loaded() -> tuple[int, int]:
        """(tokens loaded, of them at new positions) from the host tier so far; a
        one-token request first carries the last step's counts out."""
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=1),
                     use_tqdm=False)
        snap = read_metrics(llm)
        return (snap.get("hit_tokens_total", {}).get("host", 0),
                snap.get("shifted_hit_tokens_total", {}).get("host", 0))

    def run(label: str, batch, params: dict, full_key: str = "full prefill") -> None:
        before = loaded()
        start = time.perf_counter()
        got = generate(llm, batch, params, args.max_tokens)
        answers[label] = got
        s = score(got, golds, answers.get(full_key, got), [ex.question for ex in examples])
        s["f1_minus_full"] = s["f1"] - rows[full_key]["f1"] if full_key in rows else 0.0
        s["within_cacheblend_bound"] = s["f1_minus_full"] >= -CACHEBLEND_BOUND
        s["seconds"] = round(time.perf_counter() - start, 2)
        after = loaded()
        s["loaded_tokens_per_prompt"] = (after[0] - before[0]) / len(batch)
        s["shifted_tokens_per_prompt"] = (after[1] - before[1]) / len(batch)
        rows[label] = s
        log(f"  {label}: EM {s['exact_match']:.3f} F1 {s['f1']:.3f} "
            f"({s['f1_minus_full']:+.3f}) = full {s['agreement']:.2f}, loaded "
            f"{s['loaded_tokens_per_prompt']:.0f} tokens a prompt "
            f"({s['shifted_tokens_per_prompt']:.0f} shifted)")

    salted = lambda p, salt: {"prompt_token_ids": p["prompt_token_ids"], "cache_salt": salt}  # noqa: E731
    # Full prefill, saved under a salt (no module is visible there), then served again.
    load.phase("full + exact")
    run("full prefill", [salted(p, "exact") for p in prompts.prompts],
        {"promptcache_load": False, "promptcache_save": True})
    run("exact reuse", [salted(p, "exact") for p in prompts.prompts], {})

    load.phase("shifted")
    for r in args.ratios:
        run(f"shifted, ratio {r:g}", prompts.prompts, {"promptcache_recompute_ratio": r})

    load.phase("labelled")
    labelled = []
    for parts, tail in prompts.items:
        items = [parts[0]]
        for j, name in enumerate(parts[1:]):
            items += [Text(f"Document {j + 1}:\n"), name]
        labelled.append(prompts.modules.compose([*items, tail]))  # runs the gap encoding
    run("labelled, full prefill", labelled, {"promptcache_load": False})
    for r in (0.0, args.fix_ratio):
        run(f"labelled, encoded gaps, ratio {r:g}", labelled,
            {"promptcache_recompute_ratio": r}, "labelled, full prefill")

    load.phase("pml")
    tokenizer = llm.get_tokenizer()
    prompts.modules.register_schema(pml_schema(facts), role_wrappers=chat_role_wrappers(tokenizer))
    rng = random.Random(args.seed)
    pml = []
    for q in facts.questions:
        chosen = fact_qa.context_for(facts, q, 4, rng)
        pml.append(prompts.modules.compose_pml(
            f'<prompt schema="facts">{"".join(f"<d{i}/>" for i in chosen)}'
            f'<ask question="{q.text}"/></user><assistant></prompt>'))
    pml_golds = [q.answer for q in facts.questions]
    assert pml_golds == golds, "the PML prompts ask the fact-QA questions in the same order"
    run("PML parameter, full prefill", pml, {"promptcache_load": False})
    for r in (0.0, args.fix_ratio):
        run(f"PML parameter, ratio {r:g}", pml, {"promptcache_recompute_ratio": r},
            "PML parameter, full prefill")

    load.phase("truncation")
    # The conversation before truncation: one more (older) document first.  Each question
    # gets its own salt, so only its own stored conversation can serve it.
    table = prompts.modules.table
    earlier = []
    for i, ((parts, tail), ex) in enumerate(zip(prompts.items, examples)):
        dropped = next(d for d in facts.docs if d not in ex.docs)
        ids = table.compose([parts[0], Text(dropped.rstrip() + "\n\n"), *parts[1:],
                             Text("Question: Who is the first person above?<|im_end|>\n")]
                            ).token_ids
        earlier.append({"prompt_token_ids": ids, "cache_salt": f"trunc-{i}"})
    generate(llm, earlier, {"promptcache_load": False, "promptcache_save": True}, 4)
    for r in (0.0, args.fix_ratio):
        # promptcache_save off: the first ratio's request must not store what the next reuses.
        run(f"truncation reuse, ratio {r:g}",
            [salted(p, f"trunc-{i}") for i, p in enumerate(prompts.prompts)],
            {"promptcache_recompute_ratio": r})

    ttft = {}
    if args.ttft:
        load.phase("ttft")

        def one(prompt, params):
            sp = SamplingParams(max_tokens=1, temperature=0, extra_args={"kv_transfer_params": {
                "promptcache_save": False, **params}})
            start = time.perf_counter()
            llm.generate([prompt], sp, use_tqdm=False)
            return time.perf_counter() - start

        n = min(8, len(prompts.prompts))
        cases = {"full prefill": ([salted(p, "exact") for p in prompts.prompts[:n]],
                                  {"promptcache_load": False}),
                 "exact reuse": ([salted(p, "exact") for p in prompts.prompts[:n]], {})}
        for r in sorted({0.0, *args.ratios, 0.05, 0.1}):
            cases[f"shifted, ratio {r:g}"] = (prompts.prompts[:n], {"promptcache_recompute_ratio": r})
        for label, (batch, params) in cases.items():
            one(batch[0], params)  # warm: the first request of a kind pays one-time costs
            ttft[label] = statistics.median(one(p, params) * 1000 for p in batch)
            log(f"  TTFT {label}: {ttft[label]:.1f} ms")
    shutdown_llm(llm)

    env = common.run_environment(args.dtype, load, {"all settings (one engine)": threads})
    tokens = statistics.median(len(p["prompt_token_ids"]) for p in prompts.prompts)
    doc = {"benchmark": "module_accuracy", "model": str(model), "environment": env,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "questions": len(examples), "prompt_tokens_median": tokens, "rows": rows,
           "ttft_ms": ttft, "answers": answers, "golds": golds}
    write(args.out, doc, noisy_ok)


def reference_of(label: str) -> str:
    """The full-prefill row a row is compared with (labelled and PML prompts differ)."""
    for kind in ("labelled", "PML parameter"):
        if label.startswith(kind):
            return f"{kind}, full prefill"
    return "full prefill"


def render(doc: dict) -> str:
    rows, config, env = doc["rows"], doc["config"], doc["environment"]
    headers = ["setting", "exact match", "EM − its full prefill", "token F1",
               "F1 − its full prefill", f"F1 within {CACHEBLEND_BOUND} (CacheBlend)",
               "EM and F1 within", "answers = full", "tokens loaded (shifted) a prompt"]
    table_rows = []
    for label, s in rows.items():
        em = s["exact_match"] - rows[reference_of(label)]["exact_match"]
        f1 = s["f1_minus_full"]
        table_rows.append([label, f"{s['exact_match']:.3f}", f"{em:+.3f}", f"{s['f1']:.3f}",
                           f"{f1:+.3f}", "yes" if f1 >= -CACHEBLEND_BOUND else "**no**",
                           "yes" if min(em, f1) >= -CACHEBLEND_BOUND else "**no**",
                           f"{s['agreement']:.2f}",
                           f"{s['loaded_tokens_per_prompt']:.0f} ({s['shifted_tokens_per_prompt']:.0f})"
                           if "loaded_tokens_per_prompt" in s else "-"])
    md = common.markdown_table(headers, table_rows)
    ttft = doc.get("ttft_ms") or {}
    if ttft:
        exact = ttft["exact reuse"]
        md += "\n\nTime to first token, one request at a time (median of 8 prompts):\n\n" + \
            common.markdown_table(["setting", "TTFT ms", "× exact hit"],
                                  [[k, f"{v:.1f}", f"{v / exact:.2f}"] for k, v in ttft.items()])
    where = common.provenance_line(env)
    command = "python bench/module_accuracy.py" + (" --quick" if config.get("quick") else "")
    return (f"# Answer quality of reused KV: SmolLM2-135M-Instruct on fact QA ({env['date']})\n\n"
            f"`{command}` on {where}.  {doc['questions']} questions over 4 of {config['docs']} "
            f"invented documents each ({doc['prompt_tokens_median']:.0f} prompt tokens, median), "
            f"greedy answers of up to {config['max_tokens']} tokens; 'its full prefill' is the "
            f"full prefill of the same prompts (the labelled and PML prompts differ from the "
            f"plain ones).\n\n" + md + "\n")


def write(out: Path, doc: dict, noisy_ok: bool = False) -> None:
    md = render(doc)
    # Accuracy does not depend on the machine's load; the TTFT rows do.
    chart = functools.partial(
        common.bar_chart, title="Token F1 on fact QA (SmolLM2-135M-Instruct)",
        values={k.replace(", ", "\n"): s["f1"] for k, s in doc["rows"].items()},
        ylabel="token F1", footnote=common.provenance_line(doc["environment"]))
    common.write_outputs(out, doc, md, chart, **({"noisy_ok": True} if noisy_ok else {}))
    print(md)


if __name__ == "__main__":
    main()

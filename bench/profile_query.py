"""Where one labelled doc-QA query spends its time: a profile, phase by phase.

The doc-QA bench (`bench/doc_qa.py`) times a labelled query end to end; this one
opens it up.  The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
so that one `cProfile` sees the front end, vLLM's scheduler, our connector's two
sides and the model.  Three requests are profiled, each after vLLM's prefix cache is
reset and on a warm engine (the same shapes were run once before):

* ``gap encoding``  the labelled prompt's gaps: ``compose()`` runs it before the first
  prompt with these labels only (one encoding serves every prompt of its template);
* ``labels``        the labelled prompt itself: every document and label loads, the
  question is computed;
* ``exact hit``     the same prompt stored under its exact keys, loaded: the bar;
* ``one token``     an 8-token prompt of nothing stored: what any request costs here
  (a forward of the model's weights, the sampler, the engine's step).

Each request's wall time is split into the cumulative time of the functions that own
the phases (`PHASES`, matched by file and name); ``other`` is the rest (engine step
loop, output processing).  A function that runs inside another phase's function is
counted in that one only where noted (`NESTED`): the forward's per-layer waits for
loads still running beside it (layer-wise loads, ``--promptcache-load-cpu``) are
their own phase.  ``our loads (worker)`` is what runs before the forward (planning,
and the blocks the forward also writes into).

    python bench/profile_query.py [--doc-tokens 2000]

Results: ``bench/results/profile-query-cpu.json``, ``.md`` and ``.png``; the top
functions of each request are in the JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: one profile

import common  # noqa: E402

# The worker runs in this process, where vLLM's binding (set by the process that
# starts a worker) does not apply: OpenMP is bound here as doc_qa's worker is (one
# thread per CPU of VLLM_CPU_OMP_THREADS_BIND), before torch loads it, so the CPU
# it leaves free carries the layer-wise loads there too.
_omp = sorted(common.cpu_set(common.bind_threads()["VLLM_CPU_OMP_THREADS_BIND"]))
os.environ.setdefault("OMP_NUM_THREADS", str(len(_omp)))
os.environ.setdefault("OMP_PLACES", "{" + ",".join(map(str, _omp)) + "}")
os.environ.setdefault("OMP_PROC_BIND", "true")

import doc_qa  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "profile-query-cpu.json"

# phase -> (file substring, function names): the cumulative time of these functions.
# Ordered from the innermost: a phase's time excludes the phases listed before it
# only where `NESTED` says it runs inside.
PHASES = {
    "model forward": ("vllm/v1/worker/gpu_model_runner.py", {"_model_forward"}),
    "logits + sampling": ("vllm/v1/worker/gpu_model_runner.py", {"sample_tokens"}),
    "our loads (worker)": ("vllm_promptcache/connector/worker.py", {"start_load_kv"}),
    "forward waits for our loads": ("vllm_promptcache/connector/worker.py",
                                    {"wait_for_layer_load"}),
    "our saves (worker)": ("vllm_promptcache/connector/worker.py",
                           {"wait_for_save", "build_worker_meta"}),
    "our scheduler side": ("vllm_promptcache/connector/__init__.py",
                           {"get_num_new_matched_tokens", "update_state_after_alloc",
                            "build_connector_meta", "request_finished",
                            "update_connector_output", "on_new_request"}),
    "vLLM scheduler": ("vllm/v1/core/sched/scheduler.py", {"schedule", "update_from_output"}),
}
# Phases that run inside another one: subtracted from it.
NESTED = {"our scheduler side": "vLLM scheduler",
          "forward waits for our loads": "model forward"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cumulative(stats: pstats.Stats, path: str, names: set[str]) -> float:
    """Cumulative seconds of the outermost calls of functions in `path` named in
    `names` (a recursive or nested call is not counted twice)."""
    total = 0.0
    for (file, _, func), (_, _, _, ct, callers) in stats.stats.items():
        if path not in file.replace(os.sep, "/") or func not in names:
            continue
        # Count only calls not made from another counted function (nesting).
        inner = sum(c[3] for (cf, _, cfn), c in callers.items()
                    if path in cf.replace(os.sep, "/") and cfn in names)
        total += ct - inner
    return total


def top_functions(stats: pstats.Stats, n: int = 25) -> list[dict]:
    rows = []
    for (file, line, func), (_, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc,
                     "self_s": round(tt, 5), "cumulative_s": round(ct, 5)})
    rows.sort(key=lambda r: -r["self_s"])
    return rows[:n]


def profile(fn) -> tuple[float, dict[str, float], list[dict]]:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    phases = {name: cumulative(stats, path, names) for name, (path, names) in PHASES.items()}
    for inner, outer in NESTED.items():
        phases[outer] -= phases[inner]
    phases["other"] = max(0.0, wall - sum(phases.values()))
    return wall, phases, top_functions(stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc-tokens", type=int, default=2000)
    ap.add_argument("--host-gb", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    common.add_dtype_arg(ap)
    args = ap.parse_args()
    args.dtype = common.setup(args.dtype)
    load = common.MachineLoad()

    from vllm import SamplingParams

    from vllm_promptcache import Text, read_metrics
    from vllm_promptcache.compat import shutdown_llm

    llm, modules, _, _, threads = doc_qa.engine(args)

    def sampling(**params):
        return SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, extra_args={
            "kv_transfer_params": {"promptcache_save": False, **params}})

    def run(prompt, sp):
        return llm.generate([prompt], sp, use_tqdm=False)[0].metrics.first_token_latency

    def fresh():
        for _ in range(200):
            if llm.reset_prefix_cache():
                return
            run({"prompt_token_ids": list(range(100, 108))}, sampling())
        raise RuntimeError("vLLM's prefix cache could not be reset")

    def labelled(order, question):
        items = []
        for j, name in enumerate(order):
            items += [Text(f"{chr(10) * 2 if j else ''}Document {j + 1}:\n"), name]
        return items + [Text(question)]

    def hits():
        run({"prompt_token_ids": list(range(100, 108))}, sampling())  # carries the stats
        m = read_metrics(llm)
        return {k: m.get(k, {}).get("host", 0) for k in ("hit_tokens_total", "gap_tokens_total")}

    def cases(order, question):
        prompt = modules.table.compose(labelled(order, question))
        gap_prompt, gap_params = modules.table.gap_encoding(prompt, again=True)
        plain = {"prompt_token_ids": prompt.token_ids}
        return prompt, plain, {
            "gap encoding": lambda: run(gap_prompt, gap_params),
            "labels": lambda: run(prompt, sampling()),
            # the prompt stored under its exact keys first (last: labels must not find it)
            "exact hit": lambda: run(plain, sampling()),
            "one token": lambda: run({"prompt_token_ids": list(range(200, 208))},
                                     sampling(promptcache_load=False)),
        }

    # Warm every path on one order and question, then profile another.
    orders = (["doc0", "doc1", "doc2"], ["doc2", "doc0", "doc1"])
    questions = [f"Question {i}: which of the documents above describes the import system "
                 f"and why?\nAnswer:" for i in (1, 2)]
    results = {}
    for measured, (order, question) in enumerate(zip(orders, questions)):
        prompt, plain, requests = cases(order, question)
        for name, fn in requests.items():
            fresh()
            if name == "exact hit":
                run(plain, sampling(promptcache_load=False, promptcache_save=True))
                fresh()
            before = hits()
            if not measured:
                fn()
                continue
            wall, phases, top = profile(fn)
            after = hits()
            loaded = {k: after[k] - before[k] for k in after}
            results[name] = {"wall_s": wall, "phases_s": phases, "loaded_tokens": loaded,
                             "top_self": top}
            log(f"{name}: {wall:.3f} s, loaded {loaded} " + ", ".join(
                f"{k} {v:.3f}" for k, v in phases.items()))
    prompt_tokens = len(prompt.token_ids)
    shutdown_llm(llm)

    env = common.run_environment(args.dtype, load, {"one engine": threads})
    doc = {"benchmark": "profile_query", "environment": env,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "prompt_tokens": prompt_tokens, "requests": results,
           "note": "cProfile adds overhead to Python-heavy phases; compare phases, not "
                   "these walls with doc_qa's TTFTs"}
    phase_names = list(PHASES) + ["other"]
    lines = ["| request | tokens loaded | wall (profiled) | " + " | ".join(phase_names) + " |",
             "|---|---|---|" + "---|" * len(phase_names)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['loaded_tokens']['hit_tokens_total']:.0f} | "
                     f"{r['wall_s']:.3f} s | "
                     + " | ".join(f"{r['phases_s'][p]:.3f}" for p in phase_names) + " |")
    where = common.provenance_line(env)
    md = (f"# Profile of one labelled doc-QA query ({env['date']})\n\n"
          f"{prompt_tokens}-token labelled prompt (3 documents of ~{args.doc_tokens} tokens, "
          f"labels, a question), bench shape with dummy weights, engine in-process under "
          f"cProfile, on {where}.  Seconds per phase (cumulative time of the functions "
          f"that own it, `PHASES` in bench/profile_query.py).\n\n" + "\n".join(lines) + "\n")
    common.write_outputs(args.out, doc, md, functools.partial(
        stacked_chart, results=results, phases=phase_names, footnote=where))
    print(md)


def stacked_chart(png: Path, results: dict, phases: list[str], footnote: str) -> None:
    plt = common._pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    names = list(results)
    bottom = [0.0] * len(names)
    for phase in phases:
        vals = [results[n]["phases_s"][phase] for n in names]
        ax.bar(names, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.legend(fontsize=7)
    common._save(fig, ax, png, "Where one labelled query's time goes (profiled)",
                 "seconds", footnote)


if __name__ == "__main__":
    main()

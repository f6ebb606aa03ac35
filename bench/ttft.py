"""Time-to-first-token (TTFT) with and without KV reuse, on the ``bench`` model shape.

What is measured, for each prompt length L (default 512, 2048, 4096 tokens):

* ``nocache``  -- vLLM without the plugin, ``enable_prefix_caching=False``: a fresh
  random prompt of L+16 tokens is prefilled from scratch (the baseline).
* ``prefix``   -- vLLM without the plugin, ``enable_prefix_caching=True``: a random
  prompt P of L tokens is sent once (not timed), then P + 16 new tokens is timed;
  the first L tokens come from vLLM's own prefix cache.
* ``host``     -- vLLM with the plugin (``engine_kwargs(host_gb=2)``) and vLLM's
  prefix cache off: P is sent once (not timed; its KV is saved to the host-RAM
  tier when it finishes), the script waits 0.5 s for the asynchronous save to
  commit, then P + 16 new tokens is timed; the first L tokens are loaded from the
  host tier.  The plugin's ``hit_tokens_total[host]`` counter is read before and
  after each timed request; a row whose timed requests got no host hit is flagged.

Every engine gets the same OpenMP binding (``bench/common.py``: without it vLLM gives
an engine with a KV connector one more thread than one without), and each worker's
thread count is read back and recorded; the dtype is picked from the CPU (``--dtype``
overrides).

TTFT is the wall time of ``llm.generate`` for one prompt with ``max_tokens=1``
(``RequestOutput.metrics.first_token_latency`` is recorded as well when vLLM fills
it).  Every measurement uses a fresh random prompt (token ids in [10, 8000)), so
nothing is cached by accident.  Each (case, length) gets one untimed warm-up
measurement, then the median of ``--reps`` repetitions is reported.  One engine
runs at a time; it is shut down before the next starts.

Timings are never asserted: the script reports the TTFTs and the speedups
``ttft_nocache / ttft_prefix`` and ``ttft_nocache / ttft_host`` measured in the
same run, on whatever machine runs it.  The ``bench`` model has no weights
(``load_format="dummy"``), which does not change the compute.

Run:

    python bench/ttft.py                  # 512, 2048, 4096 tokens, 3 reps
    python bench/ttft.py --quick          # smoke run: 512 tokens, 1 rep
    python bench/ttft.py --lengths 512,1024 --reps 5 --out /tmp/ttft.json

Results: ``bench/results/ttft-cpu.json``, a table in ``ttft-cpu.md`` and TTFT against
prompt length per case in ``ttft-cpu.png`` (written next to ``--out``, same stem).
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

SUFFIX = 16          # new tokens after the reused prefix
HOST_GB = 2.0
SAVE_WAIT_S = 0.5    # time for the plugin's asynchronous save to commit
TOKEN_LO, TOKEN_HI = 10, 8000
CASES = ("nocache", "prefix", "host")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ttft-cpu.json"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Prompts:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self, n: int) -> list[int]:
        return [self.rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(n)]


def engine_defaults(max_len: int, dtype: str) -> dict:
    max_model_len = max_len + SUFFIX + 48
    return dict(
        enforce_eager=True,
        kv_cache_memory_bytes=common.kv_pool_bytes(),
        dtype=dtype,
        load_format="dummy",
        max_model_len=max_model_len,
        # Large enough that the longest prompt prefills in a single step.
        max_num_batched_tokens=max(8192, max_model_len),
        max_num_seqs=8,
        seed=0,
        disable_log_stats=False,  # so RequestOutput.metrics and get_metrics() are filled
    )


def close_llm(llm) -> None:
    from vllm_promptcache.compat import shutdown_llm

    try:
        shutdown_llm(llm)
    except Exception as e:  # noqa: BLE001 - a failed shutdown must not lose the results
        log(f"warning: engine shutdown failed: {e!r}")


def timed_generate(llm, prompt: list[int]) -> dict:
    """One request, max_tokens=1: wall time, vLLM's first-token latency, cached tokens."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    ro = out[0]
    ftl = getattr(getattr(ro, "metrics", None), "first_token_latency", None)
    return {
        "wall_s": wall,
        "first_token_latency_s": ftl if ftl else None,
        "num_cached_tokens": getattr(ro, "num_cached_tokens", None),
        "prompt_tokens": len(prompt),
    }


def untimed(llm, prompt: list[int]) -> None:
    from vllm import SamplingParams

    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0),
                 use_tqdm=False)


def host_hits(llm) -> float:
    from vllm_promptcache import read_metrics

    return float(read_metrics(llm).get("hit_tokens_total", {}).get("host", 0.0))


def settled_host_hits(llm) -> float:
    """hit_tokens_total[host] once the last request's stats were reported: stats travel
    with engine steps, so a short request (under one block: it neither hits nor saves)
    pushes them out."""
    last = None
    for _ in range(10):
        untimed(llm, [5, 6, 7])
        value = host_hits(llm)
        if value == last:
            return value
        last = value
        time.sleep(0.05)
    return last


def measure_one(case: str, llm, L: int, prompts: Prompts) -> dict:
    if case == "nocache":
        return timed_generate(llm, prompts(L + SUFFIX))
    prefix = prompts(L)
    untimed(llm, prefix)                      # P: fills vLLM's prefix cache / the host tier
    if case == "host":
        time.sleep(SAVE_WAIT_S)               # let the asynchronous save commit
        before = settled_host_hits(llm)
    r = timed_generate(llm, prefix + prompts(SUFFIX))
    if case == "host":
        r["host_hit_tokens"] = settled_host_hits(llm) - before
    return r


def run_case(case: str, model: str, lengths: list[int], reps: int, seed: int,
             dtype: str) -> dict:
    from vllm_promptcache import engine_kwargs

    kwargs = engine_defaults(max(lengths), dtype)
    if case == "nocache":
        kwargs["enable_prefix_caching"] = False
    elif case == "prefix":
        kwargs["enable_prefix_caching"] = True
    else:
        kwargs.update(engine_kwargs(host_gb=HOST_GB))
        kwargs["enable_prefix_caching"] = False
    log(f"[{case}] starting engine ...")
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model, **kwargs)
    log(f"[{case}] engine up in {time.perf_counter() - t0:.1f} s")
    prompts = Prompts(seed + CASES.index(case))
    results = {"engine_threads": common.engine_threads(llm)}
    log(f"[{case}] worker threads: {results['engine_threads']}")
    try:
        untimed(llm, prompts(128))            # first forward pass of the engine
        for L in lengths:
            warm = measure_one(case, llm, L, prompts)
            log(f"[{case}] L={L} warm-up {warm['wall_s']:.3f} s")
            samples = []
            for i in range(reps):
                r = measure_one(case, llm, L, prompts)
                samples.append(r)
                extra = f", host hit {r['host_hit_tokens']:.0f} tok" if "host_hit_tokens" in r else ""
                log(f"[{case}] L={L} rep {i + 1}/{reps}: {r['wall_s']:.3f} s "
                    f"(cached {r['num_cached_tokens']}{extra})")
            results[L] = {"warmup": warm, "samples": samples,
                          "median_s": statistics.median(s["wall_s"] for s in samples)}
        if case == "host":
            from vllm_promptcache import read_metrics

            results["final_metrics"] = read_metrics(llm)
    finally:
        close_llm(llm)
    return results


def fmt_s(x):
    return "n/a" if x is None else f"{x:.3f}"


def fmt_x(x):
    return "n/a" if x is None else f"{x:.2f}x"


def table(rows: list[dict]) -> str:
    lines = [
        "| prompt (L+16) | no cache TTFT (s) | vLLM prefix hit (s) | host-tier hit (s) "
        "| prefix speedup | host speedup | host hit tokens | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']}+{SUFFIX} | {fmt_s(r['ttft_nocache_s'])} | {fmt_s(r['ttft_prefix_s'])} "
            f"| {fmt_s(r['ttft_host_s'])} | {fmt_x(r['prefix_cache_speedup'])} "
            f"| {fmt_x(r['host_tier_speedup'])} | {r['host_hit_tokens']} | {r['note']} |")
    return "\n".join(lines)


def chart(png: Path, rows: list[dict], footnote: str) -> None:
    xs = [r["total_prompt_tokens"] for r in rows]
    series = {label: (xs, [r[key] for r in rows]) for label, key in (
        ("no cache", "ttft_nocache_s"), ("vLLM prefix-cache hit", "ttft_prefix_s"),
        ("host-tier hit (plugin)", "ttft_host_s"))}
    common.line_chart(png, "TTFT against prompt length (bench shape, CPU)", series,
                      "prompt tokens", "TTFT (s, log scale)", log_y=True, footnote=footnote)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,2048,4096",
                    help="comma-separated prefix lengths in tokens (default 512,2048,4096)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per case (median)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 512 tokens, 1 rep")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    ap.add_argument("--seed", type=int, default=0)
    common.add_dtype_arg(ap)
    args = ap.parse_args(argv)

    lengths = [512] if args.quick else [int(x) for x in args.lengths.split(",") if x.strip()]
    reps = 1 if args.quick else args.reps
    if reps < 1 or not lengths or min(lengths) < 1:
        ap.error("need reps >= 1 and positive lengths")

    dtype = common.setup(args.dtype)
    load = common.MachineLoad()

    from vllm_promptcache.tiny_model import SHAPES, build_model

    model = build_model("bench")
    shape = SHAPES["bench"]
    started = time.perf_counter()

    per_case = {}
    for case in CASES:
        load.phase(case)
        per_case[case] = run_case(case, model, lengths, reps, args.seed, dtype)
    env = common.run_environment(dtype, load, {c: per_case[c]["engine_threads"] for c in CASES})

    rows = []
    for L in lengths:
        nc, pc, ht = (per_case[c][L]["median_s"] for c in CASES)
        hits = [s.get("host_hit_tokens", 0) for s in per_case["host"][L]["samples"]]
        expected = L // 128 * 128  # full 128-token blocks of P (CPU block size)
        if min(hits) <= 0:
            note = "NO HOST HIT"
        elif min(hits) < expected:
            note = f"partial host hit (expected {expected})"
        else:
            note = ""
        rows.append({
            "length": L,
            "total_prompt_tokens": L + SUFFIX,
            "ttft_nocache_s": nc,
            "ttft_prefix_s": pc,
            "ttft_host_s": ht,
            "prefix_cache_speedup": nc / pc if pc else None,
            "host_tier_speedup": nc / ht if ht else None,
            "host_hit_tokens": int(statistics.median(hits)),
            "host_hit_tokens_per_rep": [int(h) for h in hits],
            "prefix_cached_tokens_per_rep": [s["num_cached_tokens"] for s in per_case["prefix"][L]["samples"]],
            "host_cached_tokens_per_rep": [s["num_cached_tokens"] for s in per_case["host"][L]["samples"]],
            "no_host_hit": min(hits) <= 0,
            "note": note,
            "samples": {c: per_case[c][L] for c in CASES},
        })

    result = {
        "benchmark": "ttft",
        "environment": env,
        "config": {
            "model": "bench (tiny_model.build_model('bench'), load_format=dummy)",
            "model_shape": {k: getattr(shape, k) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "max_position_embeddings")},
            "lengths": lengths,
            "suffix_tokens": SUFFIX,
            "reps": reps,
            "warmup_per_case": 1,
            "host_gb": HOST_GB,
            "save_wait_s": SAVE_WAIT_S,
            "engine_kwargs": engine_defaults(max(lengths), dtype),
            "ttft_definition": "wall time of llm.generate for one prompt, max_tokens=1, temperature=0",
            "total_runtime_s": round(time.perf_counter() - started, 1),
        },
        "rows": rows,
        "host_final_metrics": per_case["host"].get("final_metrics"),
    }

    where = common.provenance_line(env)
    md = (f"TTFT, bench shape (24 layers, hidden 896), on {where}; every engine on the same "
          f"threads; median of {reps} rep(s); each request = L reused tokens + {SUFFIX} new "
          f"ones, max_tokens=1. Speedups are against no cache in the same run.\n\n"
          + table(rows) + "\n")
    common.write_outputs(args.out, result, md, functools.partial(chart, rows=rows, footnote=where))
    print(md)
    print(f"wrote {args.out} and its .md and .png")
    if any(r["no_host_hit"] for r in rows):
        log("WARNING: some host-tier measurements got no host hit; see the JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())

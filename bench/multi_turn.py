"""Multi-turn conversations with a working set larger than GPU pool and host tier.

N conversations run concurrently, T turns each, closed loop: a conversation's
next turn arrives a "think time" after its previous answer is out (log-normal,
median ``--think-s``), and first turns arrive spread over the first seconds.
With fewer batch slots (``--max-num-seqs``) than active conversations there is a
queue, as on a busy chat server, and at any time some conversations are idle
(their KV is what a scheduler-aware policy evicts first).  Turn lengths are synthetic, ShareGPT-like: a per-conversation
system prompt, then user messages and answers whose lengths are log-normal
(ShareGPT's user turns have a median near 60-100 tokens and a long tail).
The token ids are random; the ``bench`` model shape runs with dummy weights.

vLLM's KV pool is limited (``--gpu-blocks``) so that, as on a GPU, it cannot
hold every conversation; the host tier is smaller than the working set too.
Five cases, each on a fresh engine and an empty disk directory:

* ``nocache``        vLLM, prefix caching off: every turn re-prefills its history.
* ``prefix``         vLLM's prefix cache only (the baseline of the ratios).
* ``host``           the plugin, host tier only (``disk_gb=0``), prefix cache on.
* ``disk_lru``       the plugin, host + disk, LRU eviction.
* ``disk_sched``     the plugin, host + disk, scheduler-aware eviction and prefetch.

Every engine gets the same OpenMP binding (``bench/common.py``; left alone, vLLM gives
the plugin's engines one more thread than the baselines), each worker's thread count is
read back and recorded, and the dtype is picked from the CPU (``--dtype`` overrides).

Reported per case: TTFT p50 / p99 (vLLM's ``first_token_latency``: arrival to first
token, so queueing and waiting for a disk read count), and prefill throughput =
prompt tokens / the time the engine had at least one request between being
scheduled and producing its first token (the union of those intervals, from
vLLM's engine-core timestamps).  Ratios are against ``prefix`` and ``nocache``
measured in the same run.  Timings are never asserted anywhere.

Run:

    python bench/multi_turn.py                # 12 conversations x 4 turns
    python bench/multi_turn.py --quick        # smoke run
    python bench/multi_turn.py --cases prefix,disk_sched --conversations 12

Results: ``bench/results/multi-turn-cpu.json``, ``.md`` and ``.png`` (each case's TTFT
distribution), next to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import common  # noqa: E402

TOKEN_LO, TOKEN_HI = 10, 8000
CASES = ("nocache", "prefix", "host", "disk_lru", "disk_sched")
BASELINE = "prefix"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "multi-turn-cpu.json"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def lognormal_len(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(rng.lognormvariate(math.log(median), sigma))))


def make_conversations(n: int, turns: int, seed: int) -> list[dict]:
    """Token ids of each conversation's system prompt and user turns, answer lengths."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        convs.append({
            "system": [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(lognormal_len(rng, 400, 0.3, 128, 800))],
            "users": [[rng.randrange(TOKEN_LO, TOKEN_HI)
                       for _ in range(lognormal_len(rng, 150, 0.8, 16, 600))] for _ in range(turns)],
            "answers": [lognormal_len(rng, 40, 0.5, 16, 96) for _ in range(turns)],
            "start_s": rng.uniform(0, 4),
            "think_s": [rng.lognormvariate(0, 0.6) for _ in range(turns)],  # x --think-s
        })
    return convs


def engine_kwargs_for(case: str, args, disk_dir: str, model: str | None = None) -> dict:
    """The case's LLM kwargs; `model` sizes the explicit KV pool to --gpu-blocks (on a
    GPU, bench/gpu_suite.py overrides the pool with a share of memory)."""
    blocks = args.gpu_blocks if model is not None else None
    kw = dict(
        enforce_eager=True, kv_cache_memory_bytes=common.kv_pool_bytes(model, blocks),
        dtype=getattr(args, "dtype", "bfloat16"),
        load_format="dummy",
        max_model_len=args.max_model_len, max_num_batched_tokens=max(8192, args.max_model_len),
        max_num_seqs=args.max_num_seqs, num_gpu_blocks_override=args.gpu_blocks, seed=0,
        disable_log_stats=False, enable_prefix_caching=case != "nocache",
    )
    if case in ("host", "disk_lru", "disk_sched"):
        from vllm_promptcache import engine_kwargs

        kw.update(engine_kwargs(
            host_gb=args.host_gb, disk_gb=0 if case == "host" else args.disk_gb,
            disk_path=disk_dir, eviction_policy="lru" if case == "disk_lru" else "scheduler-aware"))
    if case == "vllm_offload":  # vLLM's own CPU offloading at the same host GB
        kw.update(kv_offloading_size=args.host_gb)
    kw.update(getattr(args, "engine_overrides", None) or {})  # e.g. bench/gpu_suite.py's
    return kw


def run_case(case: str, model: str, convs: list[dict], args) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_promptcache.compat import shutdown_llm

    disk_dir = tempfile.mkdtemp(prefix=f"promptcache-bench-{case}-")
    llm = LLM(model, **engine_kwargs_for(case, args, disk_dir, model))
    threads = common.engine_threads(llm)
    log(f"   worker threads: {threads}")
    engine = llm.llm_engine
    # Warm-up at the prompt sizes to come (a new engine's first large prefills are
    # slow), under a salt that nothing later can match.  The first prompt is long:
    # vLLM's CPU worker dies on a very short first prompt (see tests/conftest.py).
    rng = random.Random(1234)
    for n in (300, 1000, 2000):
        llm.generate([{"prompt_token_ids": [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(n)],
                       "cache_salt": "warm-up"}], SamplingParams(max_tokens=2), use_tqdm=False)
    history = [list(c["system"]) for c in convs]
    turn = [0] * len(convs)
    records = []
    n_turns = len(convs[0]["users"])

    def submit(i: int) -> None:
        history[i] += convs[i]["users"][turn[i]]
        sp = SamplingParams(max_tokens=convs[i]["answers"][turn[i]], temperature=0, ignore_eos=True)
        engine.add_request(f"c{i}-t{turn[i]}", {"prompt_token_ids": list(history[i])}, sp)

    t0 = time.perf_counter()
    due = [(t0 + c["start_s"], i) for i, c in enumerate(convs)]  # (arrival time, conversation)
    heapq.heapify(due)
    while True:
        now = time.perf_counter()
        while due and due[0][0] <= now:
            submit(heapq.heappop(due)[1])
        if not engine.has_unfinished_requests():
            if not due:
                break
            time.sleep(min(0.05, max(0.0, due[0][0] - now)))
            continue
        for out in engine.step():
            if not out.finished:
                continue
            i, t = (int(x[1:]) for x in out.request_id.split("-"))
            m = out.metrics
            records.append({
                "conversation": i, "turn": t, "prompt_tokens": len(out.prompt_token_ids),
                "cached_tokens": out.num_cached_tokens or 0,
                "ttft_s": m.first_token_latency,
                "scheduled_ts": m.scheduled_ts, "first_token_ts": m.first_token_ts,
            })
            history[i] += list(out.outputs[0].token_ids)
            turn[i] += 1
            if turn[i] < n_turns:
                think = convs[i]["think_s"][turn[i]] * args.think_s
                heapq.heappush(due, (time.perf_counter() + think, i))
    wall = time.perf_counter() - t0
    plugin = {}
    if case not in ("nocache", "prefix"):
        from vllm_promptcache import read_metrics

        time.sleep(1.0)
        plugin = read_metrics(llm)
    shutdown_llm(llm)
    shutil.rmtree(disk_dir, ignore_errors=True)
    return {**summarize(case, records, wall, plugin), "engine_threads": threads}


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(case: str, records: list[dict], wall: float, plugin: dict) -> dict:
    ttfts = [r["ttft_s"] for r in records]
    later = [r["ttft_s"] for r in records if r["turn"] > 0]
    prompt_tokens = sum(r["prompt_tokens"] for r in records)
    prefill_time = union_length([(r["scheduled_ts"], r["first_token_ts"]) for r in records])
    return {
        "case": case, "requests": len(records), "wall_s": wall,
        "prompt_tokens": prompt_tokens,
        "vllm_cached_tokens": sum(r["cached_tokens"] for r in records),
        "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": percentile(ttfts, 0.99),
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_later_turns_p50_s": statistics.median(later) if later else None,
        "prefill_time_s": prefill_time,
        "prefill_tokens_per_s": prompt_tokens / prefill_time if prefill_time else None,
        "plugin_metrics": plugin, "records": records,
    }


def add_ratios(results: dict[str, dict]) -> None:
    for ref in (BASELINE, "nocache"):
        base = results.get(ref)
        if base is None:
            continue
        for r in results.values():
            r[f"ttft_p50_vs_{ref}"] = r["ttft_p50_s"] / base["ttft_p50_s"]
            r[f"ttft_p99_vs_{ref}"] = r["ttft_p99_s"] / base["ttft_p99_s"]
            if r["prefill_tokens_per_s"] and base["prefill_tokens_per_s"]:
                r[f"prefill_throughput_vs_{ref}"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]


def hits(r: dict, tier: str) -> int:
    return int(r["plugin_metrics"].get("hit_tokens_total", {}).get(tier, 0))


def table(results: dict[str, dict]) -> str:
    lines = [
        "| case | TTFT p50 | TTFT p99 | prefill tok/s | p50 vs prefix | p99 vs prefix | "
        "prefill vs prefix | p50 vs nocache | prefill vs nocache | vLLM cached | host hits | disk hits | prefetch hit blocks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, r in results.items():
        def ratio(name):
            v = r.get(name)
            return f"{v:.2f}x" if v is not None else "-"
        lines.append(
            f"| {case} | {r['ttft_p50_s']:.3f} s | {r['ttft_p99_s']:.3f} s | "
            f"{r['prefill_tokens_per_s']:.0f} | {ratio('ttft_p50_vs_prefix')} | "
            f"{ratio('ttft_p99_vs_prefix')} | {ratio('prefill_throughput_vs_prefix')} | "
            f"{ratio('ttft_p50_vs_nocache')} | {ratio('prefill_throughput_vs_nocache')} | "
            f"{r['vllm_cached_tokens']} | {hits(r, 'host')} | {hits(r, 'disk')} | "
            f"{int(r['plugin_metrics'].get('prefetch_hit_blocks_total', 0) or 0)} |")
    return "\n".join(lines)


def chart(png: Path, results: dict[str, dict], footnote: str) -> None:
    common.distribution_chart(
        png, "Multi-turn TTFT per request (arrival to first token)",
        {case: [r["ttft_s"] for r in res["records"]] for case, res in results.items()},
        "TTFT (s)", footnote=footnote)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=2)
    ap.add_argument("--gpu-blocks", type=int, default=40,
                    help="vLLM's KV pool in blocks (1.5 MiB each on the bench shape)")
    ap.add_argument("--host-gb", type=float, default=0.06)
    ap.add_argument("--think-s", type=float, default=2.0, help="median think time between turns")
    ap.add_argument("--disk-gb", type=float, default=4.0)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 conversations x 2 turns")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    common.add_dtype_arg(ap)
    args = ap.parse_args()
    if args.quick:
        args.conversations, args.turns = 3, 2
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; known: {', '.join(CASES)}")

    args.dtype = common.setup(args.dtype)
    load = common.MachineLoad()

    from vllm_promptcache.tiny_model import build_model

    model = build_model("bench")
    convs = make_conversations(args.conversations, args.turns, args.seed)
    results = {}
    for case in cases:
        log(f"== {case}")
        load.phase(case)
        results[case] = run_case(case, model, convs, args)
        r = results[case]
        log(f"   TTFT p50 {r['ttft_p50_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s, "
            f"prefill {r['prefill_tokens_per_s']:.0f} tok/s, host hits {hits(r, 'host')}, "
            f"disk hits {hits(r, 'disk')}")
    add_ratios(results)
    env = common.run_environment(args.dtype, load,
                                 {c: r["engine_threads"] for c, r in results.items()})
    working_set_blocks = sum(
        (len(c["system"]) + sum(map(len, c["users"])) + sum(c["answers"])) // 128 for c in convs)
    block_bytes = 24 * 2 * 128 * 2 * 64 * (4 if args.dtype == "float32" else 2)
    doc = {
        "benchmark": "multi_turn",
        "environment": env,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "model": "bench (24 layers, hidden 896, 2 KV heads, dummy weights)",
                   "block_bytes": block_bytes,
                   "working_set_blocks": working_set_blocks},
        "results": results,
    }
    where = common.provenance_line(env)
    md = (f"# Multi-turn benchmark ({env['date']})\n\n"
          f"{args.conversations} conversations x {args.turns} turns, think time median "
          f"{args.think_s} s, max_num_seqs {args.max_num_seqs}, vLLM pool {args.gpu_blocks} "
          f"blocks, host tier {args.host_gb} GiB, disk {args.disk_gb} GiB; working set about "
          f"{working_set_blocks} blocks of {block_bytes / 2**20:g} MiB. On {where}; every "
          f"engine on the same threads. Ratios are against cases of the same run.\n\n"
          + table(results) + "\n")
    common.write_outputs(args.out, doc, md,
                         functools.partial(chart, results=results, footnote=where))
    print(table(results))


if __name__ == "__main__":
    main()

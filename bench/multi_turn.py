"""Multi-turn conversations with a working set larger than GPU pool and host tier.

N conversations run concurrently, T turns each, closed loop: a conversation's
next turn arrives a "think time" after its previous answer is out (log-normal,
median ``--think-s``), and first turns arrive spread over the first seconds.
With fewer batch slots (``--max-num-seqs``) than active conversations there is a
queue, as on a busy chat server, and at any time some conversations are idle
(their KV is what a scheduler-aware policy evicts first).  Turn lengths are synthetic, ShareGPT-like: a per-conversation
system prompt, then user messages and answers whose lengths are log-normal
(ShareGPT's user turns have a median near 60-100 tokens and a long tail).
The token ids are random; the ``bench`` model shape runs with dummy weights, the
``tiny`` one (``--model tiny``: 2 layers, hidden 128) is the cheap-prefill case, where
recomputing a turn costs about as much as loading it.

vLLM's KV pool is limited (``--gpu-blocks``) so that, as on a GPU, it cannot
hold every conversation; the host tier is smaller than the working set too.
Cases, each on a fresh engine and an empty disk directory (the default runs the first
five):

* ``nocache``        vLLM, prefix caching off: every turn re-prefills its history.
* ``prefix``         vLLM's prefix cache only (the baseline of the ratios).
* ``host``           the plugin, host tier only (``disk_gb=0``), prefix cache on.
* ``disk_lru``       the plugin, host + disk, LRU eviction.
* ``disk_sched``     the plugin, host + disk, scheduler-aware eviction and prefetch.
* ``session_noid``   the plugin, host tier a quarter of the working set
                     (``--session-host-share``), disk on, no conversation ids.
* ``session``        the same, each request with its conversation id (vLLM's
                     ``session_id``, what its server reads from ``X-Session-ID``).
* ``session_fullhost`` the same with ids and a host tier holding the whole working set:
                     what ``session`` should come close to.
* ``slow_remote``    the plugin, host tier a quarter of the working set, no disk, and a
                     real redis-server behind ``bench/slow_proxy.py``, every reply
                     delayed ``--remote-delay-ms`` (40): a tier slower than recomputing
                     on the tiny model.  The plugin should recompute, not wait.

Every engine gets the same OpenMP binding (``bench/common.py``; left alone, vLLM gives
the plugin's engines one more thread than the baselines), each worker's thread count is
read back and recorded, and the dtype is picked from the CPU (``--dtype`` overrides).
Results are refused when other processes used more than 0.2 cores during the run
(``--allow-noisy`` writes them marked noisy: smoke runs only).

Reported per case: TTFT p50 / p90 / p99 over all turns and over later turns only
(vLLM's ``first_token_latency``: arrival to first token, so queueing and waiting for a
disk read count); prefill tokens computed (prompt tokens minus vLLM's cached ones,
prefix cache and plugin) against the minimum the conversations allow (every turn after
the first reuses the full blocks of its previous turn's prompt and answer; the first
turn computes everything); prefill throughput = prompt tokens / the time the engine
had at least one request between being scheduled and producing its first token (the
union of those intervals, from vLLM's engine-core timestamps); the plugin's hits per
tier and load-or-recompute decisions.  Ratios are against ``prefix`` (and
``nocache``, ``session_fullhost``) measured in the same run.  Timings are never
asserted anywhere.

Run:

    python bench/multi_turn.py                # 12 conversations x 4 turns
    python bench/multi_turn.py --quick --allow-noisy --out /tmp/mt.json   # smoke run
    python bench/multi_turn.py --model tiny --cases prefix,slow_remote
    python bench/multi_turn.py --cases prefix,session_noid,session,session_fullhost

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

TOKEN_LO, TOKEN_HI = 10, 8000  # token ids are drawn from [TOKEN_LO, min(TOKEN_HI, vocab))
CASES = ("nocache", "prefix", "host", "disk_lru", "disk_sched", "session_noid", "session",
         "session_fullhost", "slow_remote")
DEFAULT_CASES = CASES[:5]
PLUGIN_CASES = CASES[2:]
SESSION_CASES = ("session", "session_fullhost")  # requests carry conversation ids
BASELINE = "prefix"
REFERENCES = (BASELINE, "nocache", "session_fullhost")
BLOCK_TOKENS = 128  # vLLM's CPU block size, the plugin's block
SECRET_ENV = "PROMPTCACHE_REMOTE_SECRET"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "multi-turn-cpu.json"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def lognormal_len(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(rng.lognormvariate(math.log(median), sigma))))


def make_conversations(n: int, turns: int, seed: int, vocab: int = TOKEN_HI) -> list[dict]:
    """Token ids of each conversation's system prompt and user turns, answer lengths."""
    rng = random.Random(seed)
    hi = min(TOKEN_HI, vocab)
    convs = []
    for _ in range(n):
        convs.append({
            "system": [rng.randrange(TOKEN_LO, hi) for _ in range(lognormal_len(rng, 400, 0.3, 128, 800))],
            "users": [[rng.randrange(TOKEN_LO, hi)
                       for _ in range(lognormal_len(rng, 150, 0.8, 16, 600))] for _ in range(turns)],
            "answers": [lognormal_len(rng, 40, 0.5, 16, 96) for _ in range(turns)],
            "start_s": rng.uniform(0, 4),
            "think_s": [rng.lognormvariate(0, 0.6) for _ in range(turns)],  # x --think-s
        })
    return convs


def model_shape(model: str) -> dict:
    """The model's config.json (vocabulary, layers, heads)."""
    import json

    return json.loads((Path(model) / "config.json").read_text())


def block_bytes_of(model: str, dtype: str) -> int:
    """One KV block (K and V, every layer, BLOCK_TOKENS tokens) of `model` in `dtype`."""
    cfg = model_shape(model)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return (cfg["num_hidden_layers"] * 2 * BLOCK_TOKENS * cfg["num_key_value_heads"]
            * head_dim * (4 if dtype == "float32" else 2))


def working_set_blocks(convs: list[dict]) -> int:
    """Blocks of every conversation's whole history (prompt and answers)."""
    return sum((len(c["system"]) + sum(map(len, c["users"])) + sum(c["answers"]))
               // BLOCK_TOKENS for c in convs)


def host_gb_for(case: str, args) -> float:
    """The case's host tier: --host-gb, or a share of the working set for the session
    and slow-tier cases (set by main as args.working_set_bytes)."""
    ws = getattr(args, "working_set_bytes", None)
    if ws is None or case not in ("session_noid", "session", "session_fullhost", "slow_remote"):
        return args.host_gb
    share = 1.25 if case == "session_fullhost" else args.session_host_share  # + headroom
    return max(ws * share, 2 * getattr(args, "block_bytes", 0)) / 2**30


def engine_kwargs_for(case: str, args, disk_dir: str, model: str | None = None,
                      remote_url: str | None = None) -> dict:
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
    if case in PLUGIN_CASES:
        from vllm_promptcache import engine_kwargs

        options = dict(host_gb=host_gb_for(case, args),
                       disk_gb=0 if case in ("host", "slow_remote") else args.disk_gb,
                       disk_path=disk_dir,
                       eviction_policy="lru" if case == "disk_lru" else "scheduler-aware")
        if case == "slow_remote":
            options.update(remote_url=remote_url or "redis://127.0.0.1:6379/0",
                           remote_timeout_ms=getattr(args, "remote_timeout_ms", 200))
        kw.update(engine_kwargs(**options))
    if case == "vllm_offload":  # vLLM's own CPU offloading at the same host GB
        kw.update(kv_offloading_size=args.host_gb)
    kw.update(getattr(args, "engine_overrides", None) or {})  # e.g. bench/gpu_suite.py's
    return kw


class SlowStore:
    """A real redis-server (tests/redis_server.py) behind bench/slow_proxy.py: every
    reply `delay_ms` late.  `url` is the proxy's."""

    def __init__(self, delay_ms: float) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from slow_proxy import SlowProxyProcess
        from tests.redis_server import REDIS_SERVER, RedisServer

        if REDIS_SERVER is None:
            raise SystemExit("the slow_remote case needs redis-server "
                             "(apt-get install redis-server)")
        self.dir = tempfile.mkdtemp(prefix="promptcache-bench-redis-")
        self.redis = RedisServer(self.dir).start()  # free port, no persistence
        # In its own process: its forwarding is not billed to the measuring process.
        self.proxy = SlowProxyProcess(("127.0.0.1", self.redis.port), delay_ms).start()
        self.url = f"redis://127.0.0.1:{self.proxy.port}/0"

    def stats(self) -> dict:
        """The store's and the proxy's counters; ends the proxy (its counters are
        read when it stops): call once the measurement is over."""
        self.proxy.stop()
        client = self.redis.client()
        return {"keys": client.dbsize(), "used_memory_bytes": client.info().get("used_memory"),
                "proxy_connections": self.proxy.connections,
                "proxy_replies_delayed": self.proxy.replies_delayed}

    def stop(self) -> None:
        self.proxy.stop()
        self.redis.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def add_request(engine, request_id: str, prompt: list[int], sp, session: str | None) -> None:
    """One request; `session` as vLLM's session_id (0.32: what its server reads from
    X-Session-ID), else as extra_args["session_id"] (older vLLMs)."""
    import inspect

    if session is None:
        engine.add_request(request_id, {"prompt_token_ids": prompt}, sp)
    elif "session_id" in inspect.signature(engine.add_request).parameters:
        engine.add_request(request_id, {"prompt_token_ids": prompt}, sp, session_id=session)
    else:
        sp.extra_args = {**(sp.extra_args or {}), "session_id": session}
        engine.add_request(request_id, {"prompt_token_ids": prompt}, sp)


def run_case(case: str, model: str, convs: list[dict], args) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_promptcache.compat import shutdown_llm

    disk_dir = tempfile.mkdtemp(prefix=f"promptcache-bench-{case}-")
    store = None
    if case == "slow_remote":
        os.environ.setdefault(SECRET_ENV, os.urandom(24).hex())  # engine processes inherit it
        store = SlowStore(getattr(args, "remote_delay_ms", 40.0))
    try:
        llm = LLM(model, **engine_kwargs_for(case, args, disk_dir, model,
                                             store.url if store else None))
        return _drive(case, llm, convs, args, store, shutdown_llm, SamplingParams)
    finally:
        if store is not None:
            store.stop()
        shutil.rmtree(disk_dir, ignore_errors=True)


def _drive(case, llm, convs, args, store, shutdown_llm, SamplingParams) -> dict:
    threads = common.engine_threads(llm)
    log(f"   worker threads: {threads}")
    engine = llm.llm_engine
    vocab = model_shape(llm.llm_engine.model_config.model)["vocab_size"]
    hi = min(TOKEN_HI, vocab)
    # Warm-up at the prompt sizes to come (a new engine's first large prefills are
    # slow), under a salt that nothing later can match.  The first prompt is long:
    # vLLM's CPU worker dies on a very short first prompt (see tests/conftest.py).
    rng = random.Random(1234)
    for n in (300, 1000, 2000):
        n = min(n, args.max_model_len - 8)
        llm.generate([{"prompt_token_ids": [rng.randrange(TOKEN_LO, hi) for _ in range(n)],
                       "cache_salt": "warm-up"}], SamplingParams(max_tokens=2), use_tqdm=False)
    history = [list(c["system"]) for c in convs]
    turn = [0] * len(convs)
    records = []
    n_turns = len(convs[0]["users"])
    with_ids = case in SESSION_CASES

    def submit(i: int) -> None:
        history[i] += convs[i]["users"][turn[i]]
        sp = SamplingParams(max_tokens=convs[i]["answers"][turn[i]], temperature=0, ignore_eos=True)
        add_request(engine, f"c{i}-t{turn[i]}", list(history[i]), sp,
                    f"conversation-{i}" if with_ids else None)

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
                "answer_tokens": len(out.outputs[0].token_ids),
                "cached_tokens": out.num_cached_tokens or 0,
                "ttft_s": m.first_token_latency,
                "scheduled_ts": m.scheduled_ts, "first_token_ts": m.first_token_ts,
                "last_token_ts": m.last_token_ts, "queued_ts": m.queued_ts,
            })
            history[i] += list(out.outputs[0].token_ids)
            turn[i] += 1
            if turn[i] < n_turns:
                think = convs[i]["think_s"][turn[i]] * args.think_s
                heapq.heappush(due, (time.perf_counter() + think, i))
    wall = time.perf_counter() - t0
    plugin = {}
    if case in PLUGIN_CASES:
        from vllm_promptcache import read_metrics

        time.sleep(1.0)
        plugin = read_metrics(llm)
    shutdown_llm(llm)
    out = {**summarize(case, records, wall, plugin), "engine_threads": threads}
    if case in PLUGIN_CASES:
        out["host_gb"] = host_gb_for(case, args)
    if store is not None:
        out["store"] = store.stats()
    return out


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


def min_computed(records: list[dict]) -> tuple[int, int]:
    """(block-granular minimum, new tokens) of prefill the conversations allow: the
    first turn computes its whole prompt; a later turn can reuse the full blocks of
    its previous turn's KV (prompt and answer but the answer's last token, never fed
    back), and at most its own prompt less one token, rounded down to a block."""
    prev: dict[int, dict] = {}
    blocks = new = 0
    for r in sorted(records, key=lambda r: (r["conversation"], r["turn"])):
        p = prev.get(r["conversation"])
        kv = p["prompt_tokens"] + p.get("answer_tokens", 0) - 1 if p else 0
        reusable = min(kv // BLOCK_TOKENS, (r["prompt_tokens"] - 1) // BLOCK_TOKENS) * BLOCK_TOKENS
        blocks += r["prompt_tokens"] - reusable
        new += r["prompt_tokens"] - min(kv, r["prompt_tokens"] - 1)
        prev[r["conversation"]] = r
    return blocks, new


def percentiles(xs: list[float]) -> dict[str, float | None]:
    return {f"p{int(q * 100)}": percentile(xs, q) if xs else None for q in (0.5, 0.9, 0.99)}


def summarize(case: str, records: list[dict], wall: float, plugin: dict) -> dict:
    ttfts = [r["ttft_s"] for r in records]
    later = [r["ttft_s"] for r in records if r["turn"] > 0]
    prompt_tokens = sum(r["prompt_tokens"] for r in records)
    computed = prompt_tokens - sum(r["cached_tokens"] for r in records)
    minimum, new_tokens = min_computed(records)
    prefill_time = union_length([(r["scheduled_ts"], r["first_token_ts"]) for r in records])
    all_p, later_p = percentiles(ttfts), percentiles(later)
    return {
        "case": case, "requests": len(records), "wall_s": wall,
        "prompt_tokens": prompt_tokens,
        "vllm_cached_tokens": sum(r["cached_tokens"] for r in records),
        "prefill_tokens_computed": computed,
        "prefill_tokens_minimum": minimum,
        "prefill_tokens_new": new_tokens,
        "prefill_computed_vs_minimum": computed / minimum if minimum else None,
        "ttft_p50_s": all_p["p50"], "ttft_p90_s": all_p["p90"], "ttft_p99_s": all_p["p99"],
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_later_turns_p50_s": later_p["p50"], "ttft_later_turns_p90_s": later_p["p90"],
        "ttft_later_turns_p99_s": later_p["p99"],
        "prefill_time_s": prefill_time,
        "prefill_tokens_per_s": prompt_tokens / prefill_time if prefill_time else None,
        **engine_pace(records),
        "plugin_metrics": plugin, "records": records,
    }


def engine_pace(records: list[dict]) -> dict:
    """What a TTFT percentile rides on beside the prefill: the wait in vLLM's queue
    (p90), and the per-token decode time (median of the requests') of the requests
    ahead, which hold the batch's seats.  The decode time is the same work in every
    case (equal answers, equal batch limit): where it moves between cases or rounds,
    the machine moved, and the TTFT ratios with it."""
    queue = [r["scheduled_ts"] - r["queued_ts"] for r in records
             if r.get("queued_ts") is not None and r.get("scheduled_ts") is not None]
    decode = [(r["last_token_ts"] - r["first_token_ts"]) / (r["answer_tokens"] - 1)
              for r in records if r.get("last_token_ts") and r.get("first_token_ts")
              and r["answer_tokens"] > 1]
    return {"queue_p90_s": percentiles(queue)["p90"],
            "decode_ms_per_token_p50": 1e3 * statistics.median(decode) if decode else None}


# Gauges among the plugin's metrics: pooled rounds keep the last value.
GAUGES = frozenset({"tier_bytes_in_use", "tier_capacity_bytes", "tier_load_bytes_per_second",
                    "prefill_tokens_per_second", "pinned_modules"})


def pool_rounds(case: str, per_round: list[dict], conversations: int) -> dict:
    out = common.pool_rounds(case, per_round, conversations, summarize, "plugin_metrics",
                             ("engine_threads", "host_gb"), GAUGES)
    if len(per_round) > 1 and "store" in per_round[0]:
        out["store"] = common.sum_counters([r["store"] for r in per_round])
    return out


TTFT_KEYS = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_later_turns_p50_s",
             "ttft_later_turns_p90_s", "ttft_later_turns_p99_s")


def add_ratios(results: dict[str, dict]) -> None:
    """r[f"{key}_vs_{ref}"] for every TTFT percentile and reference case present."""
    for ref in REFERENCES:
        base = results.get(ref)
        if base is None:
            continue
        for r in results.values():
            for key in TTFT_KEYS:
                if r.get(key) is not None and base.get(key):
                    r[f"{key[:-2]}_vs_{ref}"] = r[key] / base[key]
            if r["prefill_tokens_per_s"] and base["prefill_tokens_per_s"]:
                r[f"prefill_throughput_vs_{ref}"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]


def hits(r: dict, tier: str) -> int:
    return int(r["plugin_metrics"].get("hit_tokens_total", {}).get(tier, 0))


def decisions(r: dict) -> str:
    """load_decisions_total as 'tier decision n' items, or '-'."""
    d = r["plugin_metrics"].get("load_decisions_total") or {}
    items = [f"{k.replace(',', ' ')} {int(v)}" for k, v in sorted(d.items()) if v]
    return ", ".join(items) or "-"


def _three(r: dict, keys: tuple[str, ...], fmt) -> str:
    return " / ".join(fmt(r.get(k)) for k in keys)


def table(results: dict[str, dict]) -> str:
    secs = (lambda v: f"{v:.3f}" if v is not None else "-")
    ratio = (lambda v: f"{v:.2f}x" if v is not None else "-")
    refs = [ref for ref in REFERENCES if ref in results and ref != "nocache"]
    headers = ["case", "TTFT p50 / p90 / p99 (s)", "later turns p50 / p90 / p99 (s)"]
    for ref in refs:
        headers += [f"vs {ref}: p50 / p90 / p99", f"later turns vs {ref}"]
    headers += ["prefill computed / minimum", "prefill tok/s", "queue p90 (s)",
                "decode ms/token", "hits host / disk / remote", "load decisions"]
    rows = []
    for case, r in results.items():
        row = [case, _three(r, TTFT_KEYS[:3], secs), _three(r, TTFT_KEYS[3:], secs)]
        for ref in refs:
            row += [_three(r, tuple(f"{k[:-2]}_vs_{ref}" for k in TTFT_KEYS[:3]), ratio),
                    _three(r, tuple(f"{k[:-2]}_vs_{ref}" for k in TTFT_KEYS[3:]), ratio)]
        vs_min = r.get("prefill_computed_vs_minimum")
        row += [f"{r['prefill_tokens_computed']} / {r['prefill_tokens_minimum']} "
                f"({ratio(vs_min)})",
                f"{r['prefill_tokens_per_s']:.0f}" if r["prefill_tokens_per_s"] else "-",
                secs(r.get("queue_p90_s")),
                f"{r['decode_ms_per_token_p50']:.2f}" if r.get("decode_ms_per_token_p50") else "-",
                f"{hits(r, 'host')} / {hits(r, 'disk')} / {hits(r, 'remote')}",
                decisions(r)]
        rows.append(row)
    return common.markdown_table(headers, rows)


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
                    help="vLLM's KV pool in blocks (3 MiB each on the bench shape in "
                         "float32, 128 KiB on the tiny model)")
    ap.add_argument("--host-gb", type=float, default=0.06,
                    help="host tier of the host and disk_* cases")
    ap.add_argument("--session-host-share", type=float, default=0.25,
                    help="host tier of the session_noid, session and slow_remote cases, "
                         "as a share of the working set (session_fullhost: 1.25)")
    ap.add_argument("--think-s", type=float, default=2.0, help="median think time between turns")
    ap.add_argument("--disk-gb", type=float, default=4.0)
    common.add_conversation_args(
        ap, CASES, DEFAULT_CASES, DEFAULT_OUT, max_model_len=4096,
        remote_delay_help="slow_remote: the delay added to every reply of the redis-server",
        remote_timeout_help="slow_remote: the plugin's remote lookup timeout (its default is "
                            "50; a loaded 2-core machine needs more)")
    args, cases = common.parse_conversation_args(ap, CASES)

    args.dtype = common.setup(args.dtype)
    load = common.MachineLoad()
    common.precheck_quiet(load, common.allow_noisy(args.allow_noisy))

    from vllm_promptcache.tiny_model import build_model

    model = build_model(args.model)
    cfg = model_shape(model)
    convs = make_conversations(args.conversations, args.turns, args.seed, cfg["vocab_size"])
    longest = max(len(c["system"]) + sum(map(len, c["users"])) + sum(c["answers"])
                  for c in convs)
    if longest > args.max_model_len:
        ap.error(f"the longest conversation has {longest} tokens, over --max-model-len "
                 f"{args.max_model_len}")
    if args.gpu_blocks <= args.max_model_len // BLOCK_TOKENS:
        ap.error(f"--gpu-blocks {args.gpu_blocks} cannot hold one --max-model-len "
                 f"{args.max_model_len} request (vLLM keeps one block back): give it at least "
                 f"{args.max_model_len // BLOCK_TOKENS + 1}")
    ws_blocks = working_set_blocks(convs)
    args.block_bytes = block_bytes_of(model, args.dtype)
    args.working_set_bytes = ws_blocks * args.block_bytes
    if ws_blocks < args.gpu_blocks:
        log(f"WARNING: the working set ({ws_blocks} blocks) fits vLLM's pool ({args.gpu_blocks} "
            f"blocks): its prefix cache may serve every turn, and the plugin none")
    def one(case: str, rnd: int) -> dict:
        log(f"== {case}" + (f" (round {rnd + 1} of {args.rounds})" if args.rounds > 1 else ""))
        r = run_case(case, model, convs, args)
        log(f"   TTFT p50 {r['ttft_p50_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s, later turns p50 "
            f"{r['ttft_later_turns_p50_s'] or 0:.3f}s p90 {r['ttft_later_turns_p90_s'] or 0:.3f}s, "
            f"computed {r['prefill_tokens_computed']} of minimum {r['prefill_tokens_minimum']}, "
            f"hits host {hits(r, 'host')} disk {hits(r, 'disk')} remote {hits(r, 'remote')}, "
            f"decisions {decisions(r)}")
        return r

    per_round = common.run_rounds(cases, args.rounds, one, load.phase)
    results = {case: pool_rounds(case, rs, len(convs)) for case, rs in per_round.items()}
    add_ratios(results)
    env = common.run_environment(args.dtype, load,
                                 {c: r["engine_threads"] for c, r in results.items()})
    shape = ("bench (24 layers, hidden 896, 2 KV heads, dummy weights)" if args.model == "bench"
             else f"tiny ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                  f"{cfg['num_key_value_heads']} KV heads, dummy weights): cheap prefill")
    doc = {
        "benchmark": "multi_turn",
        "environment": env,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "model_shape": shape,
                   "working_set_blocks": ws_blocks},
        "results": results,
    }
    where = common.provenance_line(env)
    session = ""
    if any(c in results for c in ("session_noid", "session", "slow_remote")):
        session = (f" session_noid, session and slow_remote: host tier "
                   f"{host_gb_for('session', args) * 1024:.1f} MiB "
                   f"({args.session_host_share:g} of the working set); session_fullhost "
                   f"{host_gb_for('session_fullhost', args) * 1024:.1f} MiB; slow_remote: no "
                   f"disk, every redis reply {args.remote_delay_ms:g} ms late.")
    md = (f"# Multi-turn benchmark ({env['date']})\n\n"
          f"Model {shape}. {args.conversations} conversations x {args.turns} turns, think "
          f"time median {args.think_s} s"
          + (f", {args.rounds} rounds (cases interleaved, each on a fresh engine; "
             f"percentiles pool them)" if args.rounds > 1 else "") + f", max_num_seqs {args.max_num_seqs}, vLLM pool "
          f"{args.gpu_blocks} blocks, host tier {args.host_gb} GiB, disk {args.disk_gb} GiB;"
          f"{session} Working set about {ws_blocks} blocks of "
          f"{args.block_bytes / 2**20:g} MiB. On {where}; every engine on the same threads. "
          f"Ratios are against cases of the same run; later turns are every turn after a "
          f"conversation's first; the prefill minimum reuses each previous turn's full "
          f"blocks.\n\n" + table(results) + "\n")
    common.write_outputs(args.out, doc, md,
                         functools.partial(chart, results=results, footnote=where),
                         noisy_ok=args.allow_noisy)
    print(table(results))


if __name__ == "__main__":
    main()

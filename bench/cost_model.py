"""Load or recompute on an H100, replayed without one (issue 31).

A multi-turn trace (conversations whose history grows turn by turn, interleaved so
that a host tier a quarter of the working set evicts earlier turns to disk) runs
through the real scheduler side: each finished turn is saved by `request_finished`
into the real host tier and written through to the real disk tier (indexes only; no
bytes move), and each new turn's found run is read off those tiers (its head in host,
the rest on disk).  For each turn, `connector/load_cost.py` decides how many leading
tokens to load, learning online from what the turns before it moved and computed (the
observations carry 10% noise), and the expected TTFT is priced three ways:
- measured: the decision (cold start on priors, then measured rates),
- always-load: every found token loaded (the plugin before issue 31),
- never-load: every token recomputed (vLLM alone, its GPU prefix cache aside).

The world the trace runs in (not measured by this script; a GPU was not used):
- Llama-3.1-8B in bf16: 32 layers, 8 KV heads of 128: 128 KiB of KV per token;
- pinned host -> GPU 51.9 GB/s, one O_DIRECT NVMe read stream 1.17 GB/s
  (shared/gpu/README.md, measured on the H100 machine); a remote store over 25 Gb/s,
  3.1 GB/s with 1 ms round trips (issue 31's figure: 512 MB in about 0.17 s); and
  "disk4", four such NVMe streams (4.7 GB/s), a tier near break-even that has no
  default prior (it loads until measured);
- prefill: 2 x 8.03 GFLOP per token plus attention's 4 x 32 x 4096 FLOP per token of
  context, at 500 TFLOP/s effective (63% of the 790 measured on a bf16 matmul):
  4096 tokens in 0.148 s, inside issue 31's 0.1-0.15 s.
Loads are priced serially before the forward (no overlap with compute), which favours
recompute: the real load runs layer by layer beside it.

    python bench/cost_model.py
    python bench/cost_model.py --conversations 16 --turns 4     # smaller
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from scheduler_overhead import fake_kv_cache_config, fake_request, fake_vllm_config  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES = 32, 8, 128, 2
KV_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * DTYPE_BYTES  # 128 KiB
PARAMS = 8.03e9
HIDDEN = 4096
EFFECTIVE_FLOPS = 500e12
RATES = {  # bytes/s, latency s
    "host": (51.9e9, 50e-6),
    "disk": (1.17e9, 0.2e-3),
    "remote": (3.1e9, 1e-3),
    "disk4": (4 * 1.17e9, 0.2e-3),  # four read streams (a RAID-0 of NVMe, or parallel reads)
}
POLICIES = ("measured", "always-load", "never-load")
VOCAB = 128_000


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def prefill_seconds(start: int, end: int) -> float:
    """The H100 world's prefill of positions [start, end)."""
    n = end - start
    if n <= 0:
        return 0.0
    context_sum = (start + end - 1) * n / 2  # sum of positions
    return (2 * PARAMS * n + 4 * LAYERS * HIDDEN * context_sum) / EFFECTIVE_FLOPS


def transfer_seconds(tier: str, nbytes: float) -> float:
    if nbytes <= 0:
        return 0.0
    rate, latency = RATES[tier]
    out = latency + nbytes / rate
    if tier != "host":  # promoted into host, then loaded from there
        out += nbytes / RATES["host"][0]
    return out


def load_seconds(segments, k: int) -> float:
    out, left = 0.0, k
    for s in segments:
        n = min(left, s.tokens)
        if n <= 0:
            break
        out += transfer_seconds(s.tier, n * KV_PER_TOKEN)
        left -= n
    return out


def make_trace(n_conv: int, turns: int, seed: int) -> list[tuple[int, int]]:
    """(conversation, turn) in arrival order: every conversation's turn t before any's
    turn t+1, shuffled within a round, so the host tier sees them all between turns."""
    rng = random.Random(seed)
    order = []
    for t in range(turns):
        rnd = list(range(n_conv))
        rng.shuffle(rnd)
        order += [(c, t) for c in rnd]
    return order


def fake_scheduler(block_size: int, host_blocks: int, disk_dir: str):
    from vllm_promptcache.config import PromptCacheConfig
    from vllm_promptcache.connector.scheduler import PromptCacheScheduler

    page = block_size * KV_PER_TOKEN // LAYERS  # one layer's share of a block
    vc = fake_vllm_config(block_size, "llama-3.1-8b-shape", LAYERS, KV_HEADS, HEAD_DIM)
    kc = fake_kv_cache_config(page, LAYERS)
    cfg = PromptCacheConfig(host_gb=host_blocks * page * LAYERS / 2**30, disk_gb=4096,
                            disk_path=disk_dir, model_id="cost-model-8b")
    return PromptCacheScheduler(vc, kc, cfg.validate())


def run_case(below: str, args) -> dict:
    from vllm_promptcache.connector.load_cost import LoadCost, Segment
    from vllm_promptcache.connector.metadata import PromptCacheWorkerMeta

    rng = random.Random(args.seed)
    noise = random.Random(args.seed + 1)
    bs = args.block_size
    system = [rng.randrange(10, VOCAB) for _ in range(args.system_tokens)]
    convs = {c: list(system) for c in range(args.conversations)}

    def lognormal(median, lo, hi):
        return max(lo, min(hi, int(rng.lognormvariate(0, 0.6) * median)))

    clock = [0.0]
    lc = LoadCost(clock=lambda: clock[0])
    trace = make_trace(args.conversations, args.turns, args.seed)
    # Working set: every conversation's final length; host holds --host-share of it.
    with tempfile.TemporaryDirectory(prefix="promptcache-cost-") as d:
        expected_tokens = args.conversations * (args.system_tokens + args.turns * 500)
        host_blocks = max(64, int(args.host_share * expected_tokens / bs))
        sched = fake_scheduler(bs, host_blocks, d)
        rows = []
        next_block = 0
        for i, (c, t) in enumerate(trace):
            history = convs[c]
            prompt = history + [rng.randrange(10, VOCAB) for _ in range(lognormal(200, 20, 1500))]
            n_full = (len(prompt) - 1) // bs  # the last prompt token is always computed
            keys = sched.keyer.block_keys(prompt, None, n_full)
            in_host = len(sched.host.ready_prefix(keys, touch=False))
            on_disk = 0
            for key in keys[in_host:]:
                if sched.disk is None or sched.disk.locate(key) is None:
                    break
                on_disk += 1
            segments = [Segment("host", in_host * bs), Segment(below, on_disk * bs)]
            found = (in_host + on_disk) * bs
            decision = lc.decide(segments, 0, KV_PER_TOKEN, bs)
            choice = {"measured": decision.load_tokens, "always-load": found, "never-load": 0}
            ttft = {p: load_seconds(segments, k) + prefill_seconds(k, len(prompt))
                    for p, k in choice.items()}
            lc.count(decision)
            rows.append({"conversation": c, "turn": t, "prompt_tokens": len(prompt),
                         "host_tokens": in_host * bs, f"{below}_tokens": on_disk * bs,
                         "load_tokens": decision.load_tokens, "basis": decision.basis,
                         "expected_load_s": round(decision.load_s, 5),
                         "expected_recompute_s": round(decision.recompute_s, 5)
                         if decision.recompute_s != float("inf") else None,
                         **{f"ttft_{p}_s": round(v, 5) for p, v in ttft.items()}})
            # What this turn teaches the estimates: its loads and its prefill, noisy.
            k = decision.load_tokens
            for s in segments:
                n = min(k, s.tokens)
                if n > 0:
                    lc.observe_transfer(s.tier, n * KV_PER_TOKEN,
                                        (transfer_seconds(s.tier, n * KV_PER_TOKEN)
                                         - (n * KV_PER_TOKEN / RATES["host"][0]
                                            if s.tier != "host" else 0))
                                        * noise.uniform(0.9, 1.1))
                    if s.tier != "host":  # the promoted blocks' host -> GPU copy
                        lc.observe_transfer("host", n * KV_PER_TOKEN,
                                            transfer_seconds("host", n * KV_PER_TOKEN)
                                            * noise.uniform(0.9, 1.1))
                k -= n
            lc.observe_prefill(len(prompt) - decision.load_tokens, decision.load_tokens,
                               (2e-3 + prefill_seconds(decision.load_tokens, len(prompt)))
                               * noise.uniform(0.9, 1.1))
            clock[0] += ttft["measured"] + args.think_s / args.conversations
            # The turn's answer, then its save through the real scheduler side: host
            # (evicting older turns) and written through to disk.
            answer = [rng.randrange(10, VOCAB) for _ in range(lognormal(300, 20, 1500))]
            full = prompt + answer
            convs[c] = full
            n_blocks = -(-len(full) // bs)
            ids = list(range(next_block, next_block + n_blocks))
            next_block += n_blocks
            req = fake_request(f"c{c}t{t}", full, len(full) - 1, len(prompt))
            sched.request_finished(req, ids)
            meta = sched.build_connector_meta(None)
            sched.update_connector_output(SimpleNamespace(
                finished_sending={req.request_id},
                kv_connector_worker_meta=PromptCacheWorkerMeta(
                    events=[("write", w.object_id, True) for w in meta.tier_writes])))
    later = [r for r in rows if r["turn"] > 0]
    summary = {}
    for p in POLICIES:
        for name, subset in (("all", rows), ("later", later)):
            xs = sorted(r[f"ttft_{p}_s"] for r in subset)
            summary[f"{p}_{name}"] = {
                "mean_s": round(statistics.fmean(xs), 4),
                "p50_s": round(statistics.median(xs), 4),
                "p90_s": round(xs[int(0.9 * (len(xs) - 1))], 4),
                "p99_s": round(xs[int(0.99 * (len(xs) - 1))], 4)}
    decisions: dict[str, int] = {}
    for r in rows:
        for tier in ("host", below):
            tokens = r[f"{tier}_tokens"]
            if not tokens:
                continue
            start = 0 if tier == "host" else r["host_tokens"]
            loaded = max(0, min(tokens, r["load_tokens"] - start))
            kind = "load" if loaded == tokens else "recompute" if loaded == 0 else "split"
            decisions[f"{tier} {kind}"] = decisions.get(f"{tier} {kind}", 0) + 1
    worse = sum(r["ttft_measured_s"] > min(r["ttft_always-load_s"], r["ttft_never-load_s"]) + 1e-9
                for r in rows)
    basis: dict[str, int] = {}
    for r in rows:
        basis[r["basis"]] = basis.get(r["basis"], 0) + 1
    return {"below_host": below, "host_blocks": host_blocks, "rows": rows, "summary": summary,
            "decisions": decisions, "basis": basis,
            "turns_slower_than_the_better_fixed_policy": worse,
            "estimates_at_end": {"basis": lc.basis(),
                                 **{f"{t}_bytes_per_s": lc.bytes_per_second(t)
                                    for t in ("host", below)},
                                 "prefill_tokens_per_s": lc.prefill.tokens_per_second()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=600)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--host-share", type=float, default=0.25,
                    help="host tier as a share of the working set")
    ap.add_argument("--think-s", type=float, default=20.0, help="think time between turns")
    ap.add_argument("--cases", default="disk,remote,disk4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/cost-model-h100.json"))
    args = ap.parse_args()
    cases = {below: run_case(below, args) for below in args.cases.split(",")}
    env = common.environment("bfloat16 (modelled)", device="modelled H100")
    payload = {"bench": "cost_model", "environment": env, "args": vars(args),
               "world": {"kv_bytes_per_token": KV_PER_TOKEN, "rates": RATES,
                         "effective_flops": EFFECTIVE_FLOPS,
                         "prefill_4096_tokens_s": round(prefill_seconds(0, 4096), 4)},
               "cases": cases}
    headers = ["below host", "policy", "TTFT p50 all", "p90 all", "p99 all", "p50 later turns",
               "p90 later", "p99 later", "mean later"]
    rows = []
    for below, r in cases.items():
        for p in POLICIES:
            a, lt = r["summary"][f"{p}_all"], r["summary"][f"{p}_later"]
            rows.append([below, p] + [f"{1e3 * a[k]:.1f} ms" for k in ("p50_s", "p90_s", "p99_s")]
                        + [f"{1e3 * lt[k]:.1f} ms" for k in ("p50_s", "p90_s", "p99_s", "mean_s")])
    dec = "; ".join(f"{below}: " + ", ".join(f"{k} {v}" for k, v in sorted(r["decisions"].items()))
                    + f" ({r['turns_slower_than_the_better_fixed_policy']} of {len(r['rows'])} "
                    f"turns slower than the better of always/never; priced on: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(r["basis"].items())) + ")"
                    for below, r in cases.items())
    world = (f"Llama-3.1-8B shape (128 KiB KV/token, bf16), modelled H100: host 51.9 GB/s, "
             f"disk 1.17 GB/s (disk4: 4 streams), remote 3.1 GB/s + 1 ms, prefill of 4096 tokens "
             f"{prefill_seconds(0, 4096):.3f} s; {args.conversations} conversations x "
             f"{args.turns} turns, host tier {args.host_share:.0%} of the working set.  "
             f"Expected TTFT (load + prefill of the rest), not measured on a GPU.")
    table = (world + "\n\n" + common.markdown_table(headers, rows) + "\n\nDecisions per turn "
             "and tier: " + dec + "\n")
    chart = functools.partial(
        common.bar_chart, title="Expected TTFT p50, later turns (modelled H100, 8B)",
        values={f"{below}\n{p}": 1e3 * r["summary"][f"{p}_later"]["p50_s"]
                for below, r in cases.items() for p in POLICIES},
        ylabel="ms", footnote=world)
    common.write_outputs(args.out, payload, table, chart)
    print(table)


if __name__ == "__main__":
    main()

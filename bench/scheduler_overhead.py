"""Time the connector's scheduler-side hooks, without an engine (issue 31).

Every hook here runs on vLLM's scheduler thread, once per request or per step; what it
costs is added to every step of the engine, cache hit or not.  The real
`PromptCacheScheduler` is built on fake vLLM configs (as tests/connector/test_scheduler.py
does) with real host and disk tiers, filled with `--blocks` blocks (100k by default) by
the real save path (request_finished, then the save and the disk write reported done),
then driven with synthetic requests:
- continuations of stored conversations whose blocks are in host (hits),
- continuations whose blocks host evicted and only disk holds (a promotion: the lookup
  asks again, the promotion is reported done, the lookup hits),
- prompts never seen (misses),
- in the `segments` case (position-independent reuse on: segments and tails), also
  truncated conversations: the system prompt and the last turn kept, the turns between
  dropped, found at new positions (a shifted plan).
The store stays full: every finished request is saved and evicts older blocks, as on a
busy server.  Timed per call: get_num_new_matched_tokens, update_state_after_alloc,
request_finished (per request), build_connector_meta and update_connector_output (per
step of `--batch` requests).  Layout templates (modules/layout.py) need registered
modules and are not driven here.

Timings are wall-clock on whatever else the machine runs (`machine_load` in the JSON):
on a shared machine read them as upper bounds.

    python bench/scheduler_overhead.py                     # 100k blocks, 2000 requests
    python bench/scheduler_overhead.py --quick             # 10k blocks, 300 requests
"""

from __future__ import annotations

import argparse
import functools
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "request_finished",
         "build_connector_meta", "update_connector_output")
PER_REQUEST = HOOKS[:3]
SHORT = dict(zip(HOOKS, ("lookup", "alloc", "finished", "meta", "output")))
PAGE_BYTES = 1024  # per layer per block: the index's cost does not depend on it
LAYERS = 2
VOCAB = 32_000


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def fake_vllm_config(block_size: int, model: str = "bench-overhead", layers: int = LAYERS,
                     kv_heads: int = 2, head_dim: int = 32):
    """What the scheduler side reads of vLLM's config (as tests/connector/test_scheduler.py
    builds it); also bench/cost_model.py's 8B shape."""
    mc = SimpleNamespace(model=model, revision=None, dtype="bf16",
                         get_num_layers=lambda pc: layers, get_num_kv_heads=lambda pc: kv_heads,
                         get_head_size=lambda: head_dim)
    return SimpleNamespace(model_config=mc,
                           cache_config=SimpleNamespace(block_size=block_size, cache_dtype="auto",
                                                        enable_prefix_caching=True),
                           parallel_config=SimpleNamespace(tensor_parallel_size=1, world_size=1,
                                                           pipeline_parallel_size=1))


def fake_kv_cache_config(page_bytes: int = PAGE_BYTES, layers: int = LAYERS):
    group = SimpleNamespace(kv_cache_spec=SimpleNamespace(page_size_bytes=page_bytes),
                            layer_names=[f"l{i}" for i in range(layers)])
    return SimpleNamespace(kv_cache_groups=[group], num_blocks=1 << 20)


def fake_request(req_id: str, tokens: list[int], computed: int, prompt: int):
    return SimpleNamespace(request_id=req_id, all_token_ids=tokens, cache_salt=None,
                           lora_request=None, mm_features=[], prompt_embeds=None,
                           num_computed_tokens=computed, num_prompt_tokens=prompt,
                           kv_transfer_params=None, sampling_params=None, session_id=None)


class Blocks:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (self.ids,)


def build(case: str, blocks: int, block_size: int, disk_dir: str):
    from vllm_promptcache.config import PromptCacheConfig
    from vllm_promptcache.connector.scheduler import PromptCacheScheduler

    from vllm_promptcache.store import disk_format as fmt

    slot_bytes = PAGE_BYTES * LAYERS
    # A disk block takes its aligned bytes plus its share of a file's header.
    disk_block_bytes = fmt.align_up(slot_bytes) + 256
    positional = case == "segments"
    if positional:
        import torch

        from vllm_promptcache.kernels import rope_params

        # The scheduler only checks that the worker could rotate K: any RoPE will do.
        rope_params.rope_params = lambda vc: (torch.ones(16), 32, True)
    cfg = PromptCacheConfig(host_gb=blocks * slot_bytes / 2**30,
                            disk_gb=blocks * 1.1 * disk_block_bytes / 2**30, disk_path=disk_dir,
                            model_id=f"bench-overhead-{case}", position_independent=positional)
    return PromptCacheScheduler(fake_vllm_config(block_size), fake_kv_cache_config(),
                                cfg.validate())


class Driver:
    """Runs requests through the hooks as vLLM's scheduler would, timing each call."""

    def __init__(self, sched, block_size: int, seed: int):
        from vllm_promptcache.connector.metadata import PromptCacheWorkerMeta

        self.sched = sched
        self.bs = block_size
        self.rng = random.Random(seed)
        self.meta_cls = PromptCacheWorkerMeta
        self.times: dict[str, list[float]] = {h: [] for h in HOOKS}
        self.next_block = 0
        self.n = 0
        self.outcomes: dict[str, int] = {}
        # Calls during which Python's cyclic GC ran (a pause that lands on whatever
        # code allocates at that moment): reported apart.
        self.gc_hit: dict[str, int] = {h: 0 for h in HOOKS}
        self.gc_runs = 0
        self.clean: dict[str, list[float]] = {h: [] for h in HOOKS}
        # This thread's CPU time per call: what the hook itself costs, without the
        # time the kernel gave other processes meanwhile (a shared machine's noise).
        self.cpu: dict[str, list[float]] = {h: [] for h in HOOKS}
        gc.callbacks.append(self._gc)

    def _gc(self, phase, info):
        if phase == "start":
            self.gc_runs += 1

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(10, VOCAB) for _ in range(n)]

    def _timed(self, hook: str, fn, *args, record: bool = True):
        runs = self.gc_runs
        c = time.thread_time()
        t = time.perf_counter()
        out = fn(*args)
        if record:
            dt = time.perf_counter() - t
            self.cpu[hook].append(time.thread_time() - c)
            self.times[hook].append(dt)
            if self.gc_runs != runs:
                self.gc_hit[hook] += 1
            else:
                self.clean[hook].append(dt)
        return out

    def step(self, finished: list[str], writes, promotions, record: bool) -> None:
        """One engine step's metadata, then the workers' report: saves, disk writes
        and promotions all done."""
        meta = self._timed("build_connector_meta", self.sched.build_connector_meta, None,
                           record=record)
        events = [("write", w.object_id, True) for w in list(writes) + list(meta.tier_writes)]
        events += [("promote", p.promo_id, True) for p in list(promotions) + list(meta.promotions)]
        out = SimpleNamespace(finished_sending=set(finished),
                              kv_connector_worker_meta=self.meta_cls(events=events))
        self._timed("update_connector_output", self.sched.update_connector_output, out,
                    record=record)

    def run_batch(self, prompts: list[tuple[str, list[int]]],
                  record: bool = True) -> list[list[int]]:
        """Look up, allocate, (compute), finish and save a batch of prompts; returns each
        request's full token list (prompt and answer)."""
        s = self.sched
        live = []
        for kind, prompt in prompts:
            self.n += 1
            req = fake_request(f"r{self.n}", prompt, 0, len(prompt))
            if kind == "fill":  # computed in full, so its KV is exact (disk takes it too)
                req.kv_transfer_params = {"promptcache_load": False}
            hit, _ = self._timed("get_num_new_matched_tokens", s.get_num_new_matched_tokens,
                                 req, 0, record=record)
            if hit is None:  # a promotion from disk is under way: let it finish, ask again
                self.step([], [], [], record=False)
                hit, _ = self._timed("get_num_new_matched_tokens",
                                     s.get_num_new_matched_tokens, req, 0, record=record)
                hit = hit or 0
            self.outcomes[kind + (" hit" if hit else " miss")] = \
                self.outcomes.get(kind + (" hit" if hit else " miss"), 0) + 1
            n_blocks = -(-(len(prompt) + 64) // self.bs)
            ids = list(range(self.next_block, self.next_block + n_blocks))
            self.next_block += n_blocks
            self._timed("update_state_after_alloc", s.update_state_after_alloc, req,
                        Blocks(ids), hit, record=record)
            live.append((req, ids))
        self.step([], [], [], record=record)  # the step that loads
        done = []
        for req, ids in live:
            answer = self.tokens(self.rng.randrange(16, 64))
            full = list(req.all_token_ids) + answer
            fin = fake_request(req.request_id, full, len(full) - 1, len(req.all_token_ids))
            fin.kv_transfer_params = req.kv_transfer_params
            self._timed("request_finished", s.request_finished, fin, ids, record=record)
            done.append(full)
        self.step([r.request_id for r, _ in live], [], [], record=record)
        return done


def run_case(case: str, args, disk_root: str) -> dict:
    bs = args.block_size
    sched = build(case, args.blocks, bs, str(Path(disk_root) / case))
    drv = Driver(sched, bs, args.seed)
    system = drv.tokens(bs * 8 + 5)
    convs: list[list[int]] = []
    t0 = time.perf_counter()
    # Fill: conversations of ~conv_blocks blocks until host holds --blocks blocks.
    while sched.host.used_slots < args.blocks - args.conv_blocks:
        batch = [("fill", system + drv.tokens(args.conv_blocks * bs - len(system) - 40))
                 for _ in range(args.batch)]
        convs += drv.run_batch(batch, record=False)
    fill_s = time.perf_counter() - t0
    disk_blocks = len(sched.disk._where) if sched.disk else 0
    log(f"  {case}: filled {sched.host.used_slots} host slots and ~{disk_blocks} disk "
               f"blocks in {fill_s:.1f} s")

    recent = max(1, len(convs) // 4)  # the last quarter is certainly in host
    for i in range(0, args.requests, args.batch):
        batch = []
        for _ in range(min(args.batch, args.requests - i)):
            r = drv.rng.random()
            if r < 0.5:
                conv = drv.rng.choice(convs[-recent:])
                batch.append(("host", conv + drv.tokens(drv.rng.randrange(50, 300))))
            elif r < 0.7:
                conv = drv.rng.choice(convs[:recent])  # oldest: host evicted, disk has it
                batch.append(("disk", conv + drv.tokens(drv.rng.randrange(50, 300))))
            elif r < 0.85 or case != "segments":
                batch.append(("new", drv.tokens(drv.rng.randrange(200, 2000))))
            else:
                conv = drv.rng.choice(convs[-recent:])
                cut = len(system) + drv.rng.randrange(100, 800)
                batch.append(("truncated", system + conv[cut:] + drv.tokens(100)))
        convs += drv.run_batch(batch)
        convs = convs[-4 * args.blocks // args.conv_blocks:]
    gc.callbacks.remove(drv._gc)
    out = {"fill_seconds": round(fill_s, 2), "host_slots_used": sched.host.used_slots,
           "disk_blocks": len(sched.disk._where) if sched.disk else 0,
           "outcomes": drv.outcomes, "hooks": {}}
    for hook, xs in drv.times.items():
        clean = sorted(drv.clean[hook])
        out["hooks"][hook] = {
            "calls": len(xs), **percentiles(xs),
            "cpu": percentiles(drv.cpu[hook]),
            "calls_with_gc": drv.gc_hit[hook],
            "without_gc": percentiles(clean),
            "per": "request" if hook in PER_REQUEST else "step",
        }
    return out


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"p50_ms": round(1e3 * statistics.median(xs), 4),
            "p99_ms": round(1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 4),
            "max_ms": round(1e3 * xs[-1], 4)}


def code_version() -> dict:
    """The commit measured, and whether the package had uncommitted changes (the hooks
    timed are the working tree's)."""
    return {"commit": common.git("rev-parse", "HEAD") or "",
            "uncommitted_package_changes": bool(common.git("status", "--porcelain",
                                                           "vllm_promptcache"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=100_000, help="blocks stored in host and disk")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8, help="requests per step")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--conv-blocks", type=int, default=100, help="blocks per stored conversation")
    ap.add_argument("--cases", default="exact,segments")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="10k blocks, 300 requests")
    ap.add_argument("--out", type=Path, default=Path("bench/results/scheduler-overhead-cpu.json"))
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.requests = 10_000, 300
    load = common.MachineLoad()
    results = {}
    with tempfile.TemporaryDirectory(prefix="promptcache-overhead-") as root:
        for case in args.cases.split(","):
            load.phase(case)
            results[case] = run_case(case, args, root)
    env = common.environment("n/a")
    env["machine_load"] = load.record()
    payload = {"bench": "scheduler_overhead", "environment": env, "args": vars(args),
               "code": code_version(), "cases": results}
    headers = ["case", "hook", "per", "calls", "p50 ms", "p99 ms", "max ms", "CPU p50 ms",
               "CPU p99 ms", "calls with a GC pass", "p99 ms without them"]
    rows = [[case, hook, h["per"], str(h["calls"]), f"{h['p50_ms']:.3f}", f"{h['p99_ms']:.3f}",
             f"{h['max_ms']:.2f}", f"{h['cpu']['p50_ms']:.3f}", f"{h['cpu']['p99_ms']:.3f}",
             str(h["calls_with_gc"]),
             f"{h['without_gc']['p99_ms']:.3f}" if h["without_gc"]["p99_ms"] is not None else "-"]
            for case, r in results.items() for hook, h in r["hooks"].items() if h["calls"]]
    other = env['machine_load']['other_processes_cores']
    loadline = (f"other processes used {other} cores on average during the run"
                + (f" (more than {common.MAX_OTHER_CORES}): timings are noisy"
                   if other > common.MAX_OTHER_CORES else " (a quiet machine)"))
    table = (f"Scheduler-side hooks with {args.blocks} blocks stored in host and disk "
             f"(block size {args.block_size}, {args.batch} requests per step), "
             f"{env['cpu_model']}; {loadline}.  Wall-clock per call; CPU: this thread's "
             f"CPU time per call (leaves out time other processes held the core).\n\n"
             + common.markdown_table(headers, rows) + "\n")
    chart = functools.partial(
        common.bar_chart,
        title=f"Scheduler hooks, p99 CPU time per call, {args.blocks // 1000}k blocks stored",
        values={f"{case}\n{SHORT[hook]}":
                h["cpu"]["p99_ms"] for case, r in results.items() for hook, h in r["hooks"].items()
                if h["calls"]},
        ylabel="ms", footnote=loadline)
    common.write_outputs(args.out, payload, table, chart)
    print(table)


if __name__ == "__main__":
    main()

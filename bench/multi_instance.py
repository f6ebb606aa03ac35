"""Two OpenAI servers behind a round-robin client: does a conversation's next turn find
its KV when it lands on the other replica?

Real deployments run several vLLM replicas behind a load balancer, and a
conversation's next turn often lands on another replica than its last.  Here N
conversations of T turns each run concurrently (closed loop: a turn is sent a think
time after the previous answer is out), and turn t of conversation i goes to server
(i + t) mod 2, so every conversation alternates between the two servers
(``--routing sticky``: conversation i stays on server i mod 2, as a gateway with session
affinity routes).  Cases, each on two fresh servers started for it (``python -m
vllm_promptcache serve``, the benchmark shape with dummy weights or ``--model tiny``, the
cheap-prefill case, where recomputing costs about what loading does; vLLM's KV pool
limited to ``--gpu-blocks``); the default runs the first three:

* ``prefix``  vLLM's prefix cache only, no plugin (the baseline of the ratios).
* ``local``   the plugin with per-instance tiers: host + disk, each server in its own
              directory; a server finds only the turns it served itself.
* ``remote``  the same plus the shared remote tier: a real ``redis-server`` started
              here on a free port (no persistence), both servers on
              ``--promptcache-remote-url redis://127.0.0.1:PORT/0`` with the same
              secret (``PROMPTCACHE_REMOTE_SECRET``).
* ``remote_slow`` the same, the store behind ``bench/slow_proxy.py``: every reply
              ``--remote-delay-ms`` (40) late, a store slower than recomputing on the
              tiny model.  The plugin should recompute rather than wait.
* ``session_noid`` per-instance tiers, each server's host tier a quarter
              (``--session-host-share``) of the working set of the conversations it
              serves under sticky routing (half of all), disk on, no conversation ids.
* ``session`` the same, every request with ``X-Session-ID: conversation-i`` (what
              vLLM's multi-turn client sends with ``--send-conversation-id``; vLLM 0.32
              reads it into the request's ``session_id``).
* ``session_fullhost`` the same with ids, each host tier holding all it serves.

Requests are token-id completions, streamed; the answer's token ids come back
(``return_token_ids``) and are part of the next turn's prompt, as a chat client's
history would be.  Reported per case:

* TTFT p50 / p90 / p99, over all turns and later turns only: from sending the request
  to the first streamed token, at the client (queueing included).  With the default 32
  requests p99 is about the maximum.
* hit rate: ``vllm:promptcache_hit_tokens_total{tier}`` over ``vllm:prompt_tokens_total``
  from both servers' ``/metrics`` (differences over the workload, warm-up excluded),
  and vLLM's own ``vllm:prefix_cache_hits_total`` over the same denominator.
* prefill tokens saved: ``vllm:prompt_tokens_cached_total`` (vLLM's prefix cache and
  the connector together), so prefill tokens computed = prompt - saved, against the
  minimum the conversations allow (every turn after the first reuses the full blocks
  of its previous turn's prompt and answer, wherever it ran).

Ratios are against ``prefix`` (and ``session_fullhost``) in the same run.  Every
server gets the same OpenMP binding and dtype (``bench/common.py``); the CPUs each
server's threads are bound to are read from /proc and recorded.  Results are refused
when other processes used more than 0.2 cores during the run (``--allow-noisy``: a
smoke run, marked noisy).  Timings are never asserted anywhere.

Run:

    python bench/multi_instance.py                 # 8 conversations x 4 turns
    python bench/multi_instance.py --quick --allow-noisy --out /tmp/mi.json   # 6 x 2, smoke run
    python bench/multi_instance.py --cases prefix,remote --conversations 12
    python bench/multi_instance.py --model tiny --cases prefix,local,remote,remote_slow
    python bench/multi_instance.py --routing sticky --cases prefix,session_noid,session,session_fullhost

Needs ``redis-server`` on the PATH for the ``remote`` case.  Results:
``bench/results/multi-instance-cpu.json``, ``.md`` and ``.png`` (TTFT p50/p99 per case).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import common  # noqa: E402
from multi_turn import (SlowStore, block_bytes_of, lognormal_len,  # noqa: E402
                        percentiles, working_set_blocks)

TOKEN_LO = 10  # token ids are drawn from [TOKEN_LO, the model's vocabulary size)
CASES = ("prefix", "local", "remote", "remote_slow", "session_noid", "session",
         "session_fullhost")
DEFAULT_CASES = CASES[:3]
REMOTE_CASES = ("remote", "remote_slow")
SESSION_CASES = ("session_noid", "session", "session_fullhost")
ID_CASES = ("session", "session_fullhost")  # requests carry X-Session-ID
BASELINE = "prefix"
REFERENCES = (BASELINE, "session_fullhost")
SERVERS = 2
SECRET_ENV = "PROMPTCACHE_REMOTE_SECRET"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "multi-instance-cpu.json"
# vLLM's own counters read from /metrics (Prometheus adds _total to counters).
VLLM_COUNTERS = ("vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total",
                 "vllm:prompt_tokens_cached_total", "vllm:external_prefix_cache_hits_total")
PROMPTCACHE_HITS = "vllm:promptcache_hit_tokens_total"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make_conversations(n: int, turns: int, seed: int, system_len: int, user_len: int,
                       answer_len: int, vocab: int) -> list[dict]:
    """Token ids of each conversation's system prompt and user turns, answer lengths
    (log-normal around the given medians, ShareGPT-like tails)."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        convs.append({
            "system": [rng.randrange(TOKEN_LO, vocab)
                       for _ in range(lognormal_len(rng, system_len, 0.3, 64, 4 * system_len))],
            "users": [[rng.randrange(TOKEN_LO, vocab)
                       for _ in range(lognormal_len(rng, user_len, 0.6, 8, 4 * user_len))]
                      for _ in range(turns)],
            "answers": [lognormal_len(rng, answer_len, 0.4, 4, 3 * answer_len)
                        for _ in range(turns)],
            "start_s": rng.uniform(0, 3),
            "think_s": [rng.lognormvariate(0, 0.5) for _ in range(turns)],  # x --think-s
        })
    return convs


# ---------------------------------------------------------------------------
# Servers and the store
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `python -m vllm_promptcache serve` process group, its log in a file."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path, env: dict):
        self.name, self.port, self.log_path = name, port, log_path
        self.env = {**os.environ, **env}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env={**self.env, "PYTHONUNBUFFERED": "1"})

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self, timeout: float) -> None:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:\n"
                                   + self.tail())
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"server {self.name} not ready after {timeout} s:\n" + self.tail())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def thread_binding(self) -> dict:
        """The CPUs the threads of this server's processes may run on, from /proc: the
        narrowest set is where vLLM bound the worker's OpenMP threads."""
        procs = common._process_cpu()
        tree, grew = {self.proc.pid}, True
        while grew:
            more = {pid for pid, (ppid, *_) in procs.items() if ppid in tree} - tree
            tree |= more
            grew = bool(more)
        counts: dict[str, int] = {}
        for pid in tree:
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    with open(f"/proc/{pid}/task/{tid}/status") as f:
                        cpus = re.search(r"Cpus_allowed_list:\s*(\S+)", f.read()).group(1)
                except (OSError, AttributeError):
                    continue
                counts[cpus] = counts.get(cpus, 0) + 1
        # vLLM binds the worker's OpenMP threads inside VLLM_CPU_OMP_THREADS_BIND; a
        # thread bound elsewhere (the plugin's load thread, on a CPU they leave free) is
        # not one of them.
        omp = common.cpu_set(self.env.get("VLLM_CPU_OMP_THREADS_BIND") or "")
        inside = [c for c in counts if not omp or common.cpu_set(c) <= omp] or list(counts)
        narrow = min(inside, key=lambda c: (len(common.cpu_set(c)), c)) if inside else ""
        affinity = sorted(common.cpu_set(narrow))
        # vLLM's CPU worker runs one OpenMP thread per CPU of its binding.
        return {"affinity": affinity, "torch_threads": len(affinity),
                "threads_per_cpu_list": dict(sorted(counts.items()))}


def server_argv(case: str, model: str, port: int, args, disk_dir: str,
                remote_url: str | None) -> list[str]:
    argv = [sys.executable, "-m", "vllm_promptcache", "serve", model, "--port", str(port),
            "--host", "127.0.0.1", "--load-format", "dummy", "--dtype", args.dtype,
            "--seed", "0", "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(args.max_num_seqs),
            "--num-gpu-blocks-override", str(args.gpu_blocks),
            # On CPU, --gpu-memory-utilization asks for that share of the machine's RAM
            # free at start-up (others share it); an explicit KV size skips that check.
            "--kv-cache-memory-bytes", str(common.kv_pool_bytes(model, args.gpu_blocks)),
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"]
    if args.device == "cpu":
        argv.append("--enforce-eager")
    if case != "prefix":
        argv += ["--promptcache", "--promptcache-host-gb", f"{host_gb_for(case, args):.6g}",
                 "--promptcache-disk-gb", str(args.disk_gb), "--promptcache-disk-path", disk_dir]
    if case in REMOTE_CASES:
        argv += ["--promptcache-remote-url", remote_url,
                 "--promptcache-remote-timeout-ms", str(args.remote_timeout_ms)]
    return argv


def host_gb_for(case: str, args) -> float:
    """Each server's host tier: --host-gb, or for the session cases a share of the
    working set of the conversations one server serves under sticky routing (set by
    main as args.working_set_bytes, all conversations)."""
    ws = getattr(args, "working_set_bytes", None)
    if ws is None or case not in SESSION_CASES:
        return args.host_gb
    share = 1.25 if case == "session_fullhost" else args.session_host_share  # + headroom
    return max(ws / SERVERS * share, 2 * args.block_bytes) / 2**30


def start_redis(directory: str):
    from tests.redis_server import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        raise SystemExit("the remote case needs redis-server (apt-get install redis-server)")
    return RedisServer(directory).start()  # free port, --save "", --appendonly no


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------

def stream_completion(server: Server, model: str, prompt: list[int], max_tokens: int,
                      salt: str | None = None, session: str | None = None) -> dict:
    """One streamed token-id completion: TTFT at the client, the answer's token ids,
    and the usage vLLM reports (cached tokens with --enable-prompt-tokens-details)."""
    import requests

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    if salt:
        body["cache_salt"] = salt
    # The conversation id as vLLM's multi-turn client sends it (--send-conversation-id).
    headers = {"X-Session-ID": session} if session else None
    t0 = time.perf_counter()
    ttft, tokens, usage, chunks = None, [], None, 0
    with requests.post(server.base + "/v1/completions", json=body, stream=True,
                       headers=headers, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server {server.name} answered an error: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                ids = choice.get("token_ids") or []
                if ids and ttft is None:
                    ttft = time.perf_counter() - t0
                chunks += bool(ids)
                tokens += ids
            usage = chunk.get("usage") or usage
    if ttft is None:
        raise RuntimeError(f"server {server.name} streamed no token")
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"ttft_s": ttft, "tokens": tokens, "cached_tokens": cached,
            "latency_s": time.perf_counter() - t0, "chunks": chunks}


def warm_up(server: Server, model: str, seed: int, vocab: int) -> None:
    """Prefills at the sizes to come under a salt nothing later matches.  The first
    prompt is long: vLLM's CPU worker dies on a very short first prompt."""
    rng = random.Random(seed)
    for n in (600, 1200, 300):
        stream_completion(server, model, [rng.randrange(TOKEN_LO, vocab) for _ in range(n)],
                          2, salt=f"warm-up-{seed}")


def run_conversations(servers: list[Server], model: str, convs: list[dict],
                      think_s: float, routing: str = "alternate",
                      send_ids: bool = False) -> tuple[list[dict], float]:
    records, lock = [], threading.Lock()
    errors: list[BaseException] = []
    t0 = time.perf_counter()

    def conversation(i: int) -> None:
        c = convs[i]
        try:
            time.sleep(c["start_s"])
            history = list(c["system"])
            for t, user in enumerate(c["users"]):
                if t:
                    time.sleep(c["think_s"][t] * think_s)
                history += user
                server = servers[(i + (t if routing == "alternate" else 0)) % len(servers)]
                sent = time.perf_counter() - t0
                out = stream_completion(server, model, history, c["answers"][t],
                                        session=f"conversation-{i}" if send_ids else None)
                with lock:
                    records.append({"conversation": i, "turn": t, "server": server.name,
                                    "prompt_tokens": len(history),
                                    "answer_tokens": len(out["tokens"]),
                                    "cached_tokens": out["cached_tokens"],
                                    "ttft_s": out["ttft_s"], "latency_s": out["latency_s"],
                                    # when it was sent, and in how many chunks its
                                    # tokens came (1: the answer arrived in one piece)
                                    "sent_s": round(sent, 4), "chunks": out["chunks"]})
                history += out["tokens"]
        except BaseException as e:  # noqa: BLE001 - reported once all threads are done
            errors.append(e)

    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(len(convs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    records.sort(key=lambda r: (r["conversation"], r["turn"]))
    return records, time.perf_counter() - t0


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')


def scrape(server: Server) -> dict[str, float]:
    """vLLM's prompt-token counters and the plugin's hit tokens per tier (key
    "hit_tokens[tier]"); the plugin's full snapshot under "promptcache"."""
    import requests

    from vllm_promptcache.metrics import parse_prometheus

    text = requests.get(server.base + "/metrics", timeout=10).text
    out: dict = {name: 0.0 for name in VLLM_COUNTERS}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group("name") in VLLM_COUNTERS:
            out[m.group("name")] += float(m.group("value"))
    out["promptcache"] = parse_prometheus(text)
    return out


def settled_scrape(server: Server, model: str) -> dict:
    """A scrape once two in a row agree.  Connector stats travel with engine steps, so
    a short request (under one block: nothing to load or save) pushes the last ones
    out; its prompt tokens are subtracted by the caller (`FLUSH_TOKENS` each)."""
    last = None
    for i in range(20):
        stream_completion(server, model, [7] * FLUSH_TOKENS, 1, salt=f"flush-{i}")
        time.sleep(0.5)
        snap = scrape(server)
        snap["flushes"] = i + 1
        if last is not None and _counters(snap) == _counters(last):
            return snap
        last = snap
    return last


FLUSH_TOKENS = 16


def _counters(snap: dict) -> dict:
    """The counters that must agree, the flushes' own prompt tokens taken out."""
    pc = snap["promptcache"]
    return {**{k: snap[k] for k in VLLM_COUNTERS},
            "vllm:prompt_tokens_total": snap["vllm:prompt_tokens_total"]
            - snap["flushes"] * FLUSH_TOKENS,
            "hits": pc.get("hit_tokens_total", {}), "saved": pc.get("saved_bytes_total", {})}


def metric_delta(before: dict, after: dict) -> dict:
    """Counters over the workload, both servers summed; the flush requests' prompt
    tokens (never cached) taken out."""
    d = {k: after[k] - before[k] for k in VLLM_COUNTERS}
    d["vllm:prompt_tokens_total"] -= after["flushes"] * FLUSH_TOKENS
    hb = before["promptcache"].get("hit_tokens_total", {})
    ha = after["promptcache"].get("hit_tokens_total", {})
    d["promptcache_hit_tokens"] = {t: ha[t] - hb.get(t, 0.0) for t in ha}
    return d


def sum_deltas(deltas: list[dict]) -> dict:
    out = {k: sum(d[k] for d in deltas) for k in VLLM_COUNTERS}
    tiers: dict[str, float] = {}
    for d in deltas:
        for t, v in d["promptcache_hit_tokens"].items():
            tiers[t] = tiers.get(t, 0.0) + v
    out["promptcache_hit_tokens"] = tiers
    return out


# ---------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------

def run_case(case: str, model: str, convs: list[dict], args, workdir: Path, vocab: int) -> dict:
    store, servers = None, []
    env = {}
    try:
        remote_url = None
        if case == "remote":
            store = start_redis(tempfile.mkdtemp(prefix="redis-", dir=workdir))
            remote_url = store.url
            env[SECRET_ENV] = args.secret
        elif case == "remote_slow":
            store = SlowStore(args.remote_delay_ms)
            remote_url = store.url
            env[SECRET_ENV] = args.secret
        for k in range(SERVERS):
            name = "AB"[k]
            port = free_port()
            disk_dir = tempfile.mkdtemp(prefix=f"kv-{case}-{name}-", dir=workdir)
            own = dict(env)
            if args.device == "cpu" and args.server_cpus == "own":
                own["VLLM_CPU_OMP_THREADS_BIND"] = str(k % (os.cpu_count() or 1))
            servers.append(Server(name, server_argv(case, model, port, args, disk_dir, remote_url),
                                  port, workdir / f"{case}-{name}.log", own))
        for s in servers:
            s.wait_ready(args.start_timeout_s)
        binding = {s.name: s.thread_binding() for s in servers}
        log(f"   ready; worker threads on CPUs "
            f"{json.dumps({k: v['affinity'] for k, v in binding.items()})}")
        for k, s in enumerate(servers):
            warm_up(s, model, seed=1000 + k, vocab=vocab)
        before = [settled_scrape(s, model) for s in servers]
        records, wall = run_conversations(servers, model, convs, args.think_s,
                                          args.routing, case in ID_CASES)
        after = [settled_scrape(s, model) for s in servers]
        per_server = {s.name: metric_delta(b, a) for s, b, a in zip(servers, before, after)}
        plugin = {s.name: a["promptcache"] for s, a in zip(servers, after)}
        store_info = None
        if isinstance(store, SlowStore):
            store_info = store.stats()
        elif store is not None:
            info = store.client().info()
            store_info = {"keys": store.client().dbsize(),
                          "used_memory_bytes": info.get("used_memory"),
                          "redis_version": info.get("redis_version")}
        return {**summarize(case, records, wall, sum_deltas(list(per_server.values()))),
                "per_server": per_server, "plugin_metrics_end": plugin,
                # Compared across cases: where the OpenMP threads run.  The plugin's own
                # threads inherit the worker's binding, so thread counts differ by case.
                "engine_threads": [{k: b[k] for k in ("affinity", "torch_threads")}
                                   for b in binding.values()],
                "threads_per_cpu_list": {k: b["threads_per_cpu_list"] for k, b in binding.items()},
                "store": store_info,
                "host_gb_per_server": host_gb_for(case, args) if case != "prefix" else None}
    except BaseException:
        for s in servers:
            log(f"--- {s.log_path} (kept)\n{s.tail()}")
        raise
    finally:
        for s in servers:
            s.stop()
        if store is not None:
            store.stop()


def summarize(case: str, records: list[dict], wall: float, m: dict) -> dict:
    from multi_turn import min_computed

    ttfts = [r["ttft_s"] for r in records]
    later = [r["ttft_s"] for r in records if r["turn"] > 0]
    prompt = m["vllm:prompt_tokens_total"]
    saved = m["vllm:prompt_tokens_cached_total"]
    hits = m["promptcache_hit_tokens"]
    rate = (lambda x: x / prompt if prompt else 0.0)
    minimum, new_tokens = min_computed(records)
    all_p, later_p = percentiles(ttfts), percentiles(later)
    return {
        "case": case, "requests": len(records), "wall_s": wall,
        "ttft_p50_s": all_p["p50"], "ttft_p90_s": all_p["p90"], "ttft_p99_s": all_p["p99"],
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_later_turns_p50_s": later_p["p50"], "ttft_later_turns_p90_s": later_p["p90"],
        "ttft_later_turns_p99_s": later_p["p99"],
        "prompt_tokens": prompt,
        "client_prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "prefill_tokens_saved": saved,
        "prefill_tokens_computed": prompt - saved,
        "prefill_tokens_minimum": minimum,
        "prefill_tokens_new": new_tokens,
        "prefill_computed_vs_minimum": (prompt - saved) / minimum if minimum else None,
        "client_cached_tokens": sum(r["cached_tokens"] or 0 for r in records),
        "vllm_prefix_hit_tokens": m["vllm:prefix_cache_hits_total"],
        "promptcache_hit_tokens": hits,
        "hit_rate": {"vllm_prefix": rate(m["vllm:prefix_cache_hits_total"]),
                     **{f"promptcache_{t}": rate(v) for t, v in sorted(hits.items())},
                     "promptcache_all": rate(sum(hits.values())),
                     "saved": rate(saved)},
        "counters": m, "records": records,
    }


def pool_rounds(case: str, per_round: list[dict], conversations: int) -> dict:
    return common.pool_rounds(case, per_round, conversations, summarize, "counters",
                              ("engine_threads", "threads_per_cpu_list", "host_gb_per_server"))


TTFT_KEYS = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_later_turns_p50_s",
             "ttft_later_turns_p90_s", "ttft_later_turns_p99_s")


def add_ratios(results: dict[str, dict]) -> None:
    """r[f"{key}_vs_{ref}"] for every TTFT percentile and reference case present, and
    the prefill saved and computed against the baseline's."""
    for ref in REFERENCES:
        base = results.get(ref)
        if base is None:
            continue
        for r in results.values():
            for key in TTFT_KEYS:
                if r.get(key) is not None and base.get(key):
                    r[f"{key[:-2]}_vs_{ref}"] = r[key] / base[key]
    base = results.get(BASELINE)
    if base is None:
        return
    for r in results.values():
        if base["prefill_tokens_saved"]:
            r["prefill_saved_vs_prefix"] = r["prefill_tokens_saved"] / base["prefill_tokens_saved"]
        if base["prefill_tokens_computed"]:
            r["prefill_computed_vs_prefix"] = (r["prefill_tokens_computed"]
                                               / base["prefill_tokens_computed"])


def decisions(r: dict) -> str:
    """Both servers' load_decisions_total as 'tier decision n' items, or '-'."""
    total: dict[str, float] = {}
    for snap in (r.get("plugin_metrics_end") or {}).values():
        for k, v in (snap.get("load_decisions_total") or {}).items():
            total[k] = total.get(k, 0.0) + v
    return ", ".join(f"{k.replace(',', ' ')} {int(v)}" for k, v in sorted(total.items())
                     if v) or "-"


def table(results: dict[str, dict]) -> str:
    secs = (lambda v: f"{v:.3f}" if v is not None else "-")
    ratio = (lambda v: f"{v:.2f}x" if v is not None else "-")
    three = (lambda r, keys, fmt: " / ".join(fmt(r.get(k)) for k in keys))
    refs = [ref for ref in REFERENCES if ref in results]
    headers = ["case", "TTFT p50 / p90 / p99 (s)", "later turns p50 / p90 / p99 (s)"]
    for ref in refs:
        headers += [f"vs {ref}: p50 / p90 / p99", f"later turns vs {ref}"]
    headers += ["hit rate host / disk / remote", "vLLM prefix hit rate", "prefill saved",
                "prefill computed / minimum", "computed vs prefix", "load decisions"]
    rows = []
    for case, r in results.items():
        hr = r["hit_rate"]
        pct = (lambda k: f"{100 * hr.get(k, 0.0):.1f}%")
        row = [case, three(r, TTFT_KEYS[:3], secs), three(r, TTFT_KEYS[3:], secs)]
        for ref in refs:
            row += [three(r, tuple(f"{k[:-2]}_vs_{ref}" for k in TTFT_KEYS[:3]), ratio),
                    three(r, tuple(f"{k[:-2]}_vs_{ref}" for k in TTFT_KEYS[3:]), ratio)]
        row += [f"{pct('promptcache_host')} / {pct('promptcache_disk')} / "
                f"{pct('promptcache_remote')}", pct("vllm_prefix"),
                f"{r['prefill_tokens_saved']:.0f} of {r['prompt_tokens']:.0f} ({pct('saved')})",
                f"{r['prefill_tokens_computed']:.0f} / {r['prefill_tokens_minimum']} "
                f"({ratio(r.get('prefill_computed_vs_minimum'))})",
                ratio(r.get("prefill_computed_vs_prefix")), decisions(r)]
        rows.append(row)
    return common.markdown_table(headers, rows)


def chart(png: Path, results: dict[str, dict], footnote: str) -> None:
    plt = common._pyplot()
    cases = list(results)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(cases) + 2), 4.0))
    width = 0.38
    for j, (key, label) in enumerate((("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"))):
        xs = [i + (j - 0.5) * width for i in range(len(cases))]
        bars = ax.bar(xs, [results[c][key] for c in cases], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(cases)),
                  [f"{c}\n{100 * results[c]['hit_rate']['saved']:.0f}% prefill saved"
                   for c in cases])
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    common._save(fig, ax, png, "Two servers, turns alternating: TTFT per case", "TTFT (s)",
                 footnote)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=400, help="median system prompt tokens")
    ap.add_argument("--user-len", type=int, default=100, help="median user turn tokens")
    ap.add_argument("--answer-len", type=int, default=24, help="median answer tokens")
    ap.add_argument("--think-s", type=float, default=1.0, help="median think time between turns")
    ap.add_argument("--max-num-seqs", type=int, default=2)
    ap.add_argument("--gpu-blocks", type=int, default=32,
                    help="each server's vLLM KV pool in blocks of 128 tokens, more than "
                         "--max-model-len (1.5 MiB each on the bench "
                         "shape in bf16)")
    ap.add_argument("--host-gb", type=float, default=0.25)
    ap.add_argument("--disk-gb", type=float, default=2.0)
    ap.add_argument("--session-host-share", type=float, default=0.25,
                    help="session_noid and session: each server's host tier as a share of "
                         "the working set of the conversations it serves (sticky: half)")
    ap.add_argument("--routing", choices=("alternate", "sticky"), default="alternate",
                    help="alternate: turn t of conversation i on server (i + t) mod 2; "
                         "sticky: conversation i on server i mod 2")
    ap.add_argument("--server-cpus", choices=("shared", "own"), default="shared",
                    help="CPU: shared: every server's worker threads on the CPUs of "
                         "VLLM_CPU_OMP_THREADS_BIND; own: server k's on CPU k alone (vLLM's "
                         "workers busy-poll for 1 s after each step, so two on one CPU take "
                         "it from each other, unevenly)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--start-timeout-s", type=float, default=600)
    common.add_conversation_args(
        ap, CASES, DEFAULT_CASES, DEFAULT_OUT, max_model_len=3072,
        remote_delay_help="remote_slow: the delay added to every reply of the store",
        remote_timeout_help="remote lookups slower than this are misses (the plugin's "
                            "default is 50; a loaded 2-core machine needs more)")
    args, cases = common.parse_conversation_args(ap, CASES)
    # Any 16+ character secret shared by both servers; it never leaves this machine.
    args.secret = os.environ.get(SECRET_ENV) or os.urandom(24).hex()

    args.dtype = common.setup(args.dtype, args.device)
    load = common.MachineLoad()
    common.precheck_quiet(load, common.allow_noisy(args.allow_noisy))

    from vllm_promptcache.tiny_model import build_model

    model = build_model(args.model)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    convs = make_conversations(args.conversations, args.turns, args.seed, args.system_len,
                               args.user_len, args.answer_len, vocab)
    longest = max(len(c["system"]) + sum(map(len, c["users"])) + sum(c["answers"])
                  for c in convs)
    if longest > args.max_model_len:
        ap.error(f"the longest conversation has {longest} tokens, over --max-model-len "
                 f"{args.max_model_len}: raise it (and --gpu-blocks to hold it) or shorten turns")
    ws_blocks = working_set_blocks(convs)
    args.block_bytes = block_bytes_of(model, args.dtype)
    args.working_set_bytes = ws_blocks * args.block_bytes
    if ws_blocks / (SERVERS if args.routing == "sticky" else 1) < args.gpu_blocks:
        log(f"WARNING: the working set ({ws_blocks} blocks) fits each server's vLLM pool "
            f"({args.gpu_blocks} blocks, routing {args.routing}): vLLM's prefix cache may "
            f"serve what the plugin's tiers would")
    workdir = Path(tempfile.mkdtemp(prefix="promptcache-multi-instance-"))
    def one(case: str, rnd: int) -> dict:  # a failed case leaves `workdir` (the logs) behind
        log(f"== {case}" + (f" (round {rnd + 1} of {args.rounds})" if args.rounds > 1 else ""))
        r = run_case(case, model, convs, args, workdir, vocab)
        hr = r["hit_rate"]
        log(f"   TTFT p50 {r['ttft_p50_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s, later turns p50 "
            f"{r['ttft_later_turns_p50_s'] or 0:.3f}s p90 {r['ttft_later_turns_p90_s'] or 0:.3f}s, "
            f"saved {100 * hr['saved']:.1f}% of prefill, plugin hit rate "
            f"{100 * hr['promptcache_all']:.1f}% ({hr}), computed "
            f"{r['prefill_tokens_computed']:.0f} of minimum {r['prefill_tokens_minimum']}, "
            f"decisions {decisions(r)}, wall {r['wall_s']:.0f}s")
        return r

    per_round = common.run_rounds(cases, args.rounds, one, load.phase)
    results = {case: pool_rounds(case, rs, len(convs)) for case, rs in per_round.items()}
    shutil.rmtree(workdir, ignore_errors=True)
    add_ratios(results)
    env = common.run_environment(args.dtype, load,
                                 {c: r["engine_threads"] for c, r in results.items()},
                                 args.device)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k != "secret"}
    doc = {
        "benchmark": "multi_instance",
        "environment": env,
        "config": {**config, "servers": SERVERS, "working_set_blocks": ws_blocks,
                   "routing_rule": ("turn t of conversation i on server (i + t) mod 2"
                                    if args.routing == "alternate"
                                    else "conversation i on server i mod 2"),
                   "model_shape": ("bench (24 layers, hidden 896, 2 KV heads, dummy weights)"
                                   if args.model == "bench" else "tiny (2 layers)")},
        "results": results,
    }
    where = common.provenance_line(env)
    routing = ("turn t of conversation i on server (i + t) mod 2 (every turn after the "
               "first lands on the other server)" if args.routing == "alternate" else
               "conversation i on server i mod 2 (sticky)")
    session = ""
    if any(c in results for c in SESSION_CASES):
        session = (f" Session cases: each server's host tier "
                   f"{host_gb_for('session', args) * 1024:.1f} MiB ({args.session_host_share:g}"
                   f" of the working set it serves), session_fullhost "
                   f"{host_gb_for('session_fullhost', args) * 1024:.1f} MiB.")
    if "remote_slow" in results:
        session += f" remote_slow: every store reply {args.remote_delay_ms:g} ms late."
    md = (f"# Multi-instance benchmark ({env['date']})\n\n"
          f"Two OpenAI servers, model {doc['config']['model_shape']}, {args.conversations} "
          f"conversations x {args.turns} turns, {routing}; working set about {ws_blocks} "
          f"blocks of {args.block_bytes / 2**20:g} MiB; think time median {args.think_s} s"
          + (f", {args.rounds} rounds (cases interleaved, each on fresh servers; "
             f"percentiles pool them)" if args.rounds > 1 else "") + f", max_num_seqs "
          f"{args.max_num_seqs}, vLLM pool {args.gpu_blocks} blocks per server, host tier "
          f"{args.host_gb} GiB and disk {args.disk_gb} GiB per server (own directories), remote: "
          f"one redis-server shared by both.{session} TTFT at the client (streamed, queueing "
          f"included), later turns: every turn after a conversation's first; "
          f"hit rates are tokens over `vllm:prompt_tokens_total` of both servers; prefill "
          f"saved is `vllm:prompt_tokens_cached_total` (vLLM prefix cache + plugin). On {where}; "
          + ("every server on the same thread binding and dtype. " if args.server_cpus ==
             "shared" or args.device != "cpu" else "server k's worker threads on CPU k alone, "
             "in every case, and the same dtype. ") + f"Ratios are against cases of "
          f"the same run; the prefill minimum reuses each previous turn's full blocks.\n\n"
          + table(results) + "\n")
    common.write_outputs(args.out, doc, md,
                         functools.partial(chart, results=results, footnote=where),
                         noisy_ok=args.allow_noisy)
    print(table(results))


if __name__ == "__main__":
    main()

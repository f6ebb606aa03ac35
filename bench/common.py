"""What every benchmark here shares, so that its cases compare like with like.

* **CPU threads.**  vLLM's CPU backend reserves cores for the engine process, and one
  more per rank whenever any ``kv_transfer_config`` is set
  (``vllm/utils/ompmultiprocessing.py``): left alone, an engine with the plugin would
  compute on more OpenMP threads than a baseline without a connector.  `bind_threads`
  sets ``VLLM_CPU_NUM_OF_RESERVED_CPU`` and ``VLLM_CPU_OMP_THREADS_BIND`` once, before
  any engine starts, to the same values for every case of a run; they are recorded.
* **Dtype.**  bfloat16 only where the CPU has bf16 instructions (AMX or AVX512-BF16),
  else float32 (bf16 emulated is several times slower); ``--dtype`` overrides.  On CUDA,
  bfloat16.
* **Provenance.**  `environment` records the CPU model, GPU, dtype, binding and
  versions into every JSON; `engine_threads` asks each engine's worker how many
  OpenMP threads it really computes on and where they are bound, so a JSON shows that
  its cases had the same; `MachineLoad` records the load average and the CPU time
  other processes took during the run, since a shared machine slows every case (and
  not always alike).
* **Quiet machine.**  `write_outputs` refuses (exit status 3, nothing written) a
  result whose run saw other processes use more than `MAX_OTHER_CORES` cores on
  average: the machine's busy time (/proc/stat) minus this run's process tree's.
  ``--allow-noisy`` (`add_noisy_arg`) or ``PROMPTCACHE_BENCH_ALLOW_NOISY=1`` writes it
  anyway, marked ``"noisy": true``: a smoke run, never a result.
* **KV pool.**  Explicit (``kv_cache_memory_bytes``, `kv_pool_bytes`).  On CPU,
  ``gpu_memory_utilization`` is a share of the NUMA node's memory minus the worker's
  RSS, and node sizes differ between machines (8 of 24 GiB on one of ours): there 0.2
  of the node was less than the bench model's own RSS, and no engine started.
* **Outputs.**  `write_outputs` writes the JSON, the Markdown table and a PNG chart
  (matplotlib, Agg) side by side: `bar_chart`, `line_chart` (e.g. TTFT against prompt
  length per case) or `distribution_chart` (e.g. each case's TTFTs).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

# The dtype and thread binding of every engine, shared with the tests (tests/conftest.py).
from vllm_promptcache.cpu_host import (BF16_FLAGS, BINDING_VARS, DTYPES,  # noqa: F401
                                       bind_threads, cpu_flags, pick_dtype)

# vLLM's KV pool on CPU where a benchmark does not size it in blocks: ~170k tokens of
# the bench shape in bf16.
KV_POOL_BYTES = 2 << 30
KV_BLOCK_TOKENS = 128
# Refuse results above this many cores of other processes' work, on average over the run.
MAX_OTHER_CORES = 0.2
ALLOW_NOISY_ENV = "PROMPTCACHE_BENCH_ALLOW_NOISY"
NOISY_EXIT = 3


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kv_pool_bytes(model: str | None = None, blocks: int | None = None) -> int:
    """An explicit KV pool (vLLM's ``kv_cache_memory_bytes``): room for `blocks` blocks
    of 128 tokens of `model` at 4 bytes an element (vLLM's pool is then
    ``num_gpu_blocks_override``; this only has to hold it), else KV_POOL_BYTES."""
    if blocks is None:
        return KV_POOL_BYTES
    cfg = json.loads((Path(model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    block = (cfg["num_hidden_layers"] * 2 * KV_BLOCK_TOKENS * cfg["num_key_value_heads"]
             * head_dim * 4)
    return (blocks + 1) * block


def cpu_set(text: str) -> set[int]:
    """'1-3,5' -> {1, 2, 3, 5} (the form of VLLM_CPU_OMP_THREADS_BIND and of
    Cpus_allowed_list).  The package's parser (connector/cpu_layer_loads.py) is not
    imported here: profile_query.py calls this before torch may load."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def add_dtype_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="model dtype (default: bfloat16 where the CPU has bf16 "
                         "instructions, else float32)")


def setup(requested_dtype: str | None, device: str = "cpu") -> str:
    """Bind threads alike for every engine of this run (before any starts) and pick the
    dtype; lets `engine_threads` ask the worker over vLLM's RPC (a callable is pickled,
    only between this run's own processes)."""
    bind_threads()
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    return pick_dtype(requested_dtype, device)


def _worker_threads(worker) -> dict[str, Any]:
    import torch

    return {"torch_threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0))}


def engine_threads(llm) -> list[dict[str, Any]]:
    """Per worker of `llm`: torch's OpenMP thread count and the CPUs the calling thread
    is bound to, as vLLM's binding left them."""
    import cloudpickle

    # By value: the worker need not find this file on its import path.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        return llm.collective_rpc(_worker_threads)
    except Exception as e:  # noqa: BLE001 - provenance must not cost the results
        return [{"error": repr(e)}]


def same_threads(per_case: dict[str, list[dict[str, Any]]]) -> bool:
    """Whether every case's workers computed on the same threads; warns when not."""
    seen = {json.dumps(v, sort_keys=True) for v in per_case.values()}
    if len(seen) != 1:
        print(f"WARNING: cases ran on different worker threads: {per_case}",
              file=sys.stderr, flush=True)
    return len(seen) == 1


def run_environment(dtype: str, load: MachineLoad, threads: dict[str, list],
                    device: str = "cpu") -> dict[str, Any]:
    """`environment` plus each case's worker threads (checked equal) and the load."""
    env = environment(dtype, device)
    env["engine_threads"] = threads
    env["same_engine_threads"] = same_threads(threads)
    env["machine_load"] = load.record()
    env["code_commit"] = code_commit()
    return env


def git(*args: str) -> str | None:
    """A git command's output in this checkout; None where git is missing or fails."""
    import subprocess

    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent,
                              text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def code_commit() -> str | None:
    """The commit the plugin's code came from, with "+dirty" where the package or the
    benches differed from it; None outside a git checkout."""
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    dirty = git("status", "--porcelain", "--", "vllm_promptcache", "bench/*.py", "kernels")
    return head + ("+dirty" if dirty else "")


def _process_cpu() -> dict[int, tuple[int, float, float]]:
    """pid -> (parent pid, CPU seconds so far, CPU seconds of its reaped children) of
    every process on the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        procs[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick,
                            (int(fields[13]) + int(fields[14])) / tick)
    return procs


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all CPUs, from /proc/stat:
    busy = user + nice + system + irq + softirq (guest time is inside user)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    v += [0] * (8 - len(v))
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / tick, v[7] / tick


class MachineLoad:
    """Load from other processes during a run, sampled every `interval_s` by a thread.

    Other processes' CPU time is the per-process sum over every process outside this
    run's tree (the tree: every live process descended from this one -- engines,
    workers, servers, a redis-server started here -- each with its own CPU time and
    that of the children it reaped).  The machine's busy time (/proc/stat) minus the
    tree's and the others' is recorded apart as `unattributed_cores`: kernel work
    (disk writeback, loopback networking) and processes that lived between two
    samples.  It is not counted as other processes' load: the plugin's disk and
    remote cases cause most of it themselves (0.65 cores of a multi_instance run whose
    machine had nothing else running), and a foreign process that lives long enough
    to matter is sampled.  The hypervisor's steal time is recorded apart too.  Each
    `phase` (a case) gets its own share.
    """

    def __init__(self, interval_s: float = 2.0) -> None:
        self.start_loadavg = os.getloadavg()
        self.t0 = time.monotonic()
        self.ours = {os.getpid()}
        self.last = _process_cpu()
        self.last_machine = _machine_cpu()
        self.last_own = self._own(self.last)
        self.own_s = self.others_s = self.others_by_pid_s = self.steal_s = 0.0
        self.phases: dict[str, dict[str, float]] = {}
        self._phase = (None, self.t0, 0.0, 0.0, 0.0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _own(self, procs: dict) -> float:
        return sum(cpu + reaped for pid, (_, cpu, reaped) in procs.items() if pid in self.ours)

    def _sample(self) -> None:
        now = _process_cpu()
        machine = _machine_cpu()
        for pid, (ppid, _, _) in sorted(now.items()):
            if ppid in self.ours:
                self.ours.add(pid)
        self.ours &= set(now)  # pids that are gone may be reused by others
        self.ours.add(os.getpid())
        for pid, (_, cpu, _) in now.items():
            if pid not in self.ours:
                self.others_by_pid_s += max(0.0, cpu - self.last.get(pid, (0, 0.0, 0.0))[1])
        own = self._own(now)
        own_delta = own - self.last_own
        busy_delta = machine[0] - self.last_machine[0]
        self.own_s += own_delta
        self.others_s += max(0.0, busy_delta - own_delta)
        self.steal_s += machine[1] - self.last_machine[1]
        self.last, self.last_machine, self.last_own = now, machine, own

    def others_cores_now(self, seconds: float = 3.0) -> float:
        """Other processes' cores averaged over the next `seconds` (a pre-check)."""
        with self._lock:
            self._sample()
            before, t = self.others_s, time.monotonic()
        time.sleep(seconds)
        with self._lock:
            self._sample()
            return (self.others_s - before) / max(1e-9, time.monotonic() - t)

    def phase(self, name: str | None) -> None:
        """Close the current phase (e.g. one case's engine) and start `name`: each
        phase's share of foreign load is recorded, since cases run one after another
        and need not see the same."""
        with self._lock:
            self._sample()
            label, t, others, by_pid, own = self._phase
            if label is not None:
                wall = max(1e-9, time.monotonic() - t)
                foreign = self.others_by_pid_s - by_pid
                self.phases[label] = {
                    "wall_s": round(wall, 1),
                    "other_processes_cores": round(foreign / wall, 2),
                    "unattributed_cores": round(
                        max(0.0, self.others_s - others - foreign) / wall, 2),
                    # What the run itself (engines, servers, stores, client) used: a
                    # case that takes more CPU leaves less to front ends and clients.
                    "this_run_cores": round((self.own_s - own) / wall, 2)}
            self._phase = (name, time.monotonic(), self.others_s, self.others_by_pid_s,
                           self.own_s)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                self._sample()

    def record(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self.phase(None)
        wall = time.monotonic() - self.t0
        per_s = (lambda x: round(x / wall, 2) if wall > 0 else 0.0)
        cores = self.others_by_pid_s / wall if wall > 0 else 0.0
        return {
            "loadavg_start": [round(x, 2) for x in self.start_loadavg],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(wall, 1),
            "this_run_cpu_s": round(self.own_s, 1),
            "other_processes_cpu_s": round(self.others_by_pid_s, 1),
            "other_processes_cores": round(cores, 2),
            "unattributed_cores": per_s(max(0.0, self.others_s - self.others_by_pid_s)),
            "steal_cores": per_s(self.steal_s),
            "other_processes_cores_per_phase": self.phases,
            "max_other_cores": MAX_OTHER_CORES,
            # Not the load average: at start it still holds the previous run's own load.
            "shared_machine": cores > MAX_OTHER_CORES,
        }


def add_conversation_args(ap: argparse.ArgumentParser, cases: dict, default_cases,
                          default_out: Path, max_model_len: int, remote_delay_help: str,
                          remote_timeout_help: str) -> None:
    """The arguments the conversation benches (multi_turn, multi_instance) share: the
    model, the cases, the slow store, the smoke run, the output, the dtype and the
    quiet-machine guard.  Parse them with `parse_conversation_args`."""
    ap.add_argument("--remote-delay-ms", type=float, default=40.0, help=remote_delay_help)
    ap.add_argument("--remote-timeout-ms", type=int, default=200, help=remote_timeout_help)
    ap.add_argument("--max-model-len", type=int, default=max_model_len)
    ap.add_argument("--model", choices=("bench", "tiny"), default="bench",
                    help="bench: 24 layers, hidden 896, dummy weights; tiny: 2 layers, "
                         "hidden 128, the cheap-prefill case")
    ap.add_argument("--cases", default=",".join(default_cases),
                    help=f"comma-separated, of: {', '.join(cases)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every case this many times, the cases interleaved (a, b, a, "
                         "b, ...) and each on a fresh engine; percentiles pool the rounds' "
                         "requests, so a ratio rests on more samples and drift in the "
                         "machine falls on every case alike")
    ap.add_argument("--quick", action="store_true",
                    help="6 conversations x 2 turns, think time 0.5 s, --max-model-len 2048, "
                         "--gpu-blocks 17: a smoke run")
    ap.add_argument("--out", type=Path, default=default_out)
    add_dtype_arg(ap)
    add_noisy_arg(ap)


def parse_conversation_args(ap: argparse.ArgumentParser,
                            cases: dict) -> tuple[argparse.Namespace, list[str]]:
    """(args, the cases asked for): --quick applied, unknown cases refused."""
    args = ap.parse_args()
    if args.quick:
        args.conversations, args.turns, args.think_s = 6, 2, 0.5
        args.max_model_len, args.gpu_blocks = 2048, 17  # a pool under the working set
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    asked = [c for c in args.cases.split(",") if c]
    unknown = set(asked) - set(cases)
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; known: {', '.join(cases)}")
    return args, asked


def run_rounds(cases: list[str], rounds: int, run: Callable[[str, int], dict],
               phase: Callable[[str], None]) -> dict[str, list[dict]]:
    """Every case `rounds` times, interleaved: {case: [its result of each round]}.
    `run(case, round)`; `phase(label)` marks the machine-load phase of each run."""
    out: dict[str, list[dict]] = {c: [] for c in cases}
    for rnd in range(rounds):
        for case in cases:
            phase(case if rounds == 1 else f"{case}#{rnd}")
            out[case].append(run(case, rnd))
    return out


def pooled_records(per_round: list[dict], conversations: int) -> list[dict]:
    """The rounds' request records as one list, each round's conversations numbered
    apart (round r's conversation i is r * conversations + i) and tagged with it."""
    return [{**rec, "conversation": rnd * conversations + rec["conversation"], "round": rnd}
            for rnd, r in enumerate(per_round) for rec in r["records"]]


def pool_rounds(case: str, per_round: list[dict], conversations: int,
                summarize: Callable[[str, list[dict], float, dict], dict],
                counters: str, keep: tuple[str, ...], gauges: frozenset = frozenset()) -> dict:
    """One case's rounds as one result: `summarize(case, records, wall, counters)` over
    every round's requests (percentiles pool them) and the `counters` dict of each
    round summed (`gauges`: the last round's); the first round's `keep` keys; each
    round's own figures under "rounds"."""
    if len(per_round) == 1:
        return per_round[0]
    out = summarize(case, pooled_records(per_round, conversations),
                    sum(r["wall_s"] for r in per_round),
                    sum_counters([r[counters] for r in per_round], gauges))
    out.update({k: per_round[0][k] for k in keep if k in per_round[0]})
    out["rounds"] = [{k: v for k, v in r.items() if k != "records"} for r in per_round]
    return out


def sum_counters(dicts: list[dict], last: frozenset = frozenset()) -> dict:
    """Counters of several rounds summed, key by key (nested dicts too); keys in `last`
    (gauges) keep the last round's value."""
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if k in last:
                out[k] = v
            elif isinstance(v, dict):
                out[k] = sum_counters([out.get(k, {}), v], last)
            elif not isinstance(v, (int, float)) or isinstance(v, bool):
                out[k] = v
            else:
                out[k] = out.get(k, 0) + v
    return out


def add_noisy_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--allow-noisy", action="store_true",
                    help=f"write the results even when other processes used more than "
                         f"{MAX_OTHER_CORES} cores during the run, marked noisy (smoke "
                         f"runs; also {ALLOW_NOISY_ENV}=1)")


def allow_noisy(flag: bool = False) -> bool:
    return flag or os.environ.get(ALLOW_NOISY_ENV, "") not in ("", "0")


def precheck_quiet(load: "MachineLoad", allowed: bool, seconds: float = 5.0) -> None:
    """Refuse to start a long run on a machine already busy (the result would be
    refused at the end anyway); with `allowed`, only warn."""
    cores = load.others_cores_now(seconds)
    if cores <= MAX_OTHER_CORES:
        return
    msg = (f"other processes use {cores:.2f} cores (over {seconds:g} s), more than "
           f"{MAX_OTHER_CORES}: the results would be refused")
    if not allowed:
        raise SystemExit(f"{msg}. Run on a quiet machine, or pass --allow-noisy for a smoke "
                         f"run (its results are marked noisy).")
    print(f"WARNING: {msg}; --allow-noisy: they will be written, marked noisy",
          file=sys.stderr, flush=True)


def quiet_guard(payload: dict, allowed: bool) -> str | None:
    """None when the run's machine load is within MAX_OTHER_CORES (or none was
    measured); else the note that marks the results noisy, where `allowed`.  Exits
    with NOISY_EXIT where not."""
    load = (payload.get("environment") or {}).get("machine_load")
    if not load:
        return None
    cores = load.get("other_processes_cores", 0.0)
    loud = {k: v["other_processes_cores"]
            for k, v in (load.get("other_processes_cores_per_phase") or {}).items()
            if v.get("other_processes_cores", 0.0) > MAX_OTHER_CORES}
    if loud:
        load["noisy_phases"] = loud
    if cores <= MAX_OTHER_CORES:
        load["noisy"] = payload["noisy"] = False
        return None
    note = (f"NOISY: other processes used {cores} cores on average during this run "
            f"(more than {MAX_OTHER_CORES}); a smoke run, not a result")
    if not allowed:
        print(f"REFUSED: other processes used {cores} cores on average during this run "
              f"(more than {MAX_OTHER_CORES}; per phase: "
              f"{ {k: v['other_processes_cores'] for k, v in (load.get('other_processes_cores_per_phase') or {}).items()} }"
              f"). Nothing written. Rerun on a quiet machine, or pass --allow-noisy / set "
              f"{ALLOW_NOISY_ENV}=1 for a smoke run (marked noisy).", file=sys.stderr, flush=True)
        raise SystemExit(NOISY_EXIT)
    load["noisy"] = payload["noisy"] = True
    print(f"WARNING: {note}", file=sys.stderr, flush=True)
    return note


def environment(dtype: str, device: str = "cpu") -> dict[str, Any]:
    """What a result depends on besides the code: recorded in every JSON."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_bf16": sorted(cpu_flags() & set(BF16_FLAGS)),
        "dtype": dtype,
        "thread_binding": {k: os.environ.get(k) for k in BINDING_VARS},
        "python": platform.python_version(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        from vllm_promptcache.compat import installed_vllm

        env["vllm"] = installed_vllm()
    except ImportError:
        pass
    return env


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, png: Path, title: str, ylabel: str, footnote: str | None) -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    lines = textwrap.wrap(footnote or "", int(fig.get_figwidth() * 17))
    if lines:
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, color="#555555", va="bottom")
    fig.tight_layout(rect=(0, 0.035 * len(lines), 1, 1))
    fig.savefig(png, dpi=120)
    _pyplot().close(fig)


def bar_chart(png: Path, title: str, values: dict[str, float], ylabel: str,
              footnote: str | None = None) -> None:
    """One bar per label (e.g. a case's TTFT), written as a PNG."""
    fig, ax = _pyplot().subplots(figsize=(max(4.5, 0.9 * len(values) + 2), 3.8))
    bars = ax.bar(list(values), list(values.values()), color="#4878a8")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)
    _save(fig, ax, png, title, ylabel, footnote)


def line_chart(png: Path, title: str, series: dict[str, tuple[list, list]], xlabel: str,
               ylabel: str, log_y: bool = False, footnote: str | None = None) -> None:
    """One line per label through its (x, y) points, e.g. TTFT against prompt length."""
    fig, ax = _pyplot().subplots(figsize=(6.0, 4.0))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    if log_y:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, ax, png, title, ylabel, footnote)


def distribution_chart(png: Path, title: str, samples: dict[str, list[float]], ylabel: str,
                       footnote: str | None = None) -> None:
    """Each label's samples as a box (quartiles, whiskers to 1.5 IQR) over its points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(samples) + 2), 4.0))
    labels = list(samples)
    ax.boxplot([samples[k] for k in labels], showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    for i, k in enumerate(labels, start=1):
        n = len(samples[k])
        xs = [i + 0.25 * ((j % 7) / 6 - 0.5) for j in range(n)]
        ax.scatter(xs, samples[k], s=6, alpha=0.5, color="#c0504d")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, ax, png, title, ylabel, footnote)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: one header row, then `rows` (cells already formatted)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out_json: Path, payload: dict, table_md: str,
                  chart: Callable[[Path], None] | None, noisy_ok: bool = False) -> None:
    """JSON at `out_json`, the table beside it (.md) and the chart (.png): `chart` is
    called with the PNG's path (e.g. a `functools.partial` of `line_chart`).  A run
    whose machine was not quiet (`quiet_guard`) is refused unless `noisy_ok` (or
    PROMPTCACHE_BENCH_ALLOW_NOISY=1), and then marked noisy in all three."""
    note = quiet_guard(payload, allow_noisy(noisy_ok))
    if note:
        table_md = f"**{note}**\n\n{table_md}"  # the chart's footnote says it too
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    out_json.with_suffix(".md").write_text(table_md)
    if chart is not None:
        chart(out_json.with_suffix(".png"))


def provenance_line(env: dict[str, Any]) -> str:
    """One line for tables and charts: CPU, dtype, worker threads, shared machine."""
    threads = env.get("engine_threads")
    t = ""
    if threads:
        first = next(iter(threads.values()))[0]
        t = f", {first.get('torch_threads')} worker thread(s) on CPU {first.get('affinity')}"
    load = env.get("machine_load", {})
    shared = ""
    if load.get("noisy"):
        shared = "; NOISY (a smoke run, not a result)"
    if load.get("shared_machine"):
        phases = load.get("other_processes_cores_per_phase") or {}
        each = ", ".join(f"{k} {v['other_processes_cores']}" for k, v in phases.items())
        shared += (f"; machine shared: other processes used {load['other_processes_cores']} "
                  f"cores on average" + (f" ({each})" if len(phases) > 1 else ""))
    vllm = env.get("vllm") or ("vllm", "?")
    return (f"{env['cpu_model']} ({env['cpu_count']} cores), {env['dtype']}{t}, "
            f"vLLM {vllm[-1]}{shared}")

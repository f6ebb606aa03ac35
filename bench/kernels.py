"""rope_shift throughput against a plain copy of the same bytes, on the bench model's KV shape.

For each token count T (default 2k, 8k, 32k) the K and V of T tokens ([T, kv_heads 2,
head_dim 64], in the dtype ``bench/common.py`` picks for this CPU or ``--dtype``) are
written into one layer's paged cache (block size 128) through a
slot mapping over a shuffled block table, by

* ``copy``  -- a plain indexed copy of K and V into the same destination views through
  the same slots (advanced-index assignment, what a KV load without a shift costs);
* ``shift`` -- ``rope_shift`` with delta 0 for every token (K copied, no rotation in the
  output) and with delta = 40000 for every token (K rotated).

On CPU ``shift`` is the torch reference ``rope_shift_reference`` and, where it builds,
the C loop the engine's CPU loads use (``kernels/cpu_native.py``, sources viewed as
blocks, its plan built once per token set outside the timing); the table also gives
each shift against the same implementation's delta-0 call (the same tokens copied
bit for bit: what rotating adds over that path's own copy).  When
``torch.cuda.is_available()`` the same is also measured on the GPU for the Triton kernel
(``rope_shift_triton``) and the reference, timed with CUDA events.

Destinations ("layouts"): ``nhd`` is a plain 4-D ``[blocks, block_size, kv_heads,
head_dim]`` tensor per K and V; ``cpu`` is vLLM's CPU-backend layer tensor viewed with
``paged_kv_views(..., "cpu")`` (packed per this machine's attention ISA); ``flash_attn``
(GPU only) is vLLM 0.32's ``[blocks, kv_heads, block_size, 2 * head_dim]`` layer tensor.

A second table times the engine's load from the host tier, on vLLM's CPU layer layout
(``--host-load-tokens``, default 6000 and 32768: a few documents of the doc-QA bench, and a
long one): the KV of T tokens saved in host slots (whole blocks, in a shuffled order) is
loaded into one layer of the paged cache by

* ``block copy`` -- ``load_slots_into_blocks``, the path of an exact hit (the baseline);
* ``C loop`` -- ``load_tokens_shifted`` with the C loop's plan (kernels/cpu_native.py:
  what a module moved to a new position costs on an engine's CPU: the run lands 45
  tokens into a block, K rotated by 40,045 positions);
* ``slices`` -- the same through torch slices (shifted_slices.py: the path where the C
  loop cannot be built);
* ``per token`` -- the same tokens through ``rope_shift_paged_reference``, the per-token
  torch path.

Plans are built once per load (a request's tokens in a step) for every layer; their
times are reported apart.

The host-load table has rows for this CPU's attention ISA and, on a CPU without AMX
tiles and a 16-bit dtype, also for vLLM's AMX-packed page layout (the layout an AMX
CPU's engine uses: 16 tokens of K or 2 of V interleaved with the head dims).  Those
rows time the same moves of bytes on this CPU -- moving KV uses no AMX instruction --
and are marked ``layout only``.

Bytes per call = K and V read plus K and V written = 4 * T * kv_heads * head_dim * 2 B;
GB/s = bytes / time.  Each measurement is the median of ``--reps`` repetitions after
``--warmup`` untimed calls; copy and shift calls are interleaved within a repetition so
drift affects both alike.  The reported ratio is shift time / copy time from the same run.
Before timing, the delta-0 shift is checked to write exactly the copy's bytes.  On CPU
the process computes on the CPUs and thread count an engine worker gets under the bench
binding (``bench/common.py``), recorded with the CPU model and dtype.

Run:

    python bench/kernels.py                          # 2048, 8192, 32768 tokens, 15 reps
    python bench/kernels.py --tokens 2048 --reps 5 --out /tmp/kernels.json

Results: ``bench/results/kernels-cpu.json``, tables in ``kernels-cpu.md`` and the time
ratios (shift / copy, host load / block copy) in ``kernels-cpu.png`` (``kernels-cuda.*`` by default on a CUDA machine;
written next to ``--out``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 128
SHIFT_DELTA = 40_000
ROPE_THETA = 10000.0  # the bench model's (tiny_model._config)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def bench_shape() -> tuple[int, int]:
    from vllm_promptcache.tiny_model import SHAPES

    s = SHAPES["bench"]
    return s.num_kv_heads, s.hidden_size // s.num_heads


def destination(layout: str, num_blocks: int, H: int, D: int, device: str, dtype):
    from vllm_promptcache.kernels.rope_shift import _cpu_isa, paged_kv_views

    if layout == "nhd":
        k = torch.zeros(num_blocks, BLOCK_SIZE, H, D, dtype=dtype, device=device)
        return k, torch.zeros_like(k), None
    raw = torch.zeros(num_blocks, H, BLOCK_SIZE, 2 * D, dtype=dtype, device=device)
    isa = _cpu_isa(dtype, BLOCK_SIZE, D) if layout == "cpu" else None
    k, v = paged_kv_views(raw, layout, H, D, BLOCK_SIZE, isa=isa)
    return k, v, isa


def cpu_layouts(dtype) -> tuple[str, ...]:
    """"cpu" needs vLLM's CPU attention backend (to pick the ISA); a GPU build may lack it."""
    from vllm_promptcache.kernels.rope_shift import _cpu_isa

    try:
        _cpu_isa(dtype, BLOCK_SIZE, bench_shape()[1])
    except Exception as e:  # noqa: BLE001
        log(f"skipping the cpu layout: {e!r}")
        return ("nhd",)
    return ("nhd", "cpu")


def indexed_copy(src_k, src_v, dst_k, dst_v, slots):
    """dst[slot] <- src for K and V: the copy baseline (same indexing as the reference)."""
    T, H, D = src_k.shape
    for dst, src in ((dst_k, src_k), (dst_v, src_v)):
        if dst.dim() == 4:
            n = dst.shape[1]
            dst[slots // n, slots % n] = src
        else:  # 6-D packed view [blocks, groups, tokens in group, heads, dim groups, dims]
            tg = dst.shape[2]
            n = dst.shape[1] * tg
            blk, off = slots // n, slots % n
            dst[blk, off // tg, off % tg] = src.reshape(T, H, dst.shape[4], dst.shape[5])


def c_loop(src_k, src_v, dst_k, dst_v, slots, delta, inv_freq, rotary_dim, is_neox_style):
    """The engine's CPU path (kernels/cpu_native.py) on the table's tokens: the sources
    viewed as blocks of the destination's size (zero-padded where T is not a multiple),
    the plan built on the first call for these slots and deltas (untimed: the
    delta-0 check and the warm-up make it) and reused, as a load reuses it for every layer."""
    from vllm_promptcache.kernels.cpu_native import move_layer_native, plan_native

    T, H, D = src_k.shape
    n = BLOCK_SIZE
    key = (src_k.data_ptr(), src_v.data_ptr(), slots.data_ptr(), delta.data_ptr(), T)
    if key not in _C_LOOP_PLANS:
        pad = -T % n

        def blocks(x):
            return torch.cat([x, x.new_zeros(pad, H, D)]).view(-1, n, H, D)
        t = torch.arange(T)
        _C_LOOP_PLANS[key] = (blocks(src_k), blocks(src_v),
                              plan_native(t // n, t % n, slots, delta, n, inv_freq))
    k4, v4, plan = _C_LOOP_PLANS[key]
    move_layer_native(k4, v4, dst_k, dst_v, plan, rotary_dim, is_neox_style)


_C_LOOP_PLANS: dict = {}


def timer(device: str):
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def measure(device: str, layout: str, T: int, impls: dict, reps: int, warmup: int,
            dtype) -> list[dict]:
    H, D = bench_shape()
    num_blocks = -(-T // BLOCK_SIZE) + 1
    table = torch.randperm(num_blocks)[: num_blocks - 1]
    pos = torch.arange(T)
    slots = (table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE).to(device)
    src_k = torch.randn(T, H, D).to(dtype).to(device)
    src_v = torch.randn(T, H, D).to(dtype).to(device)
    inv_freq = (1.0 / ROPE_THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(device)
    deltas = {0: torch.zeros(T, dtype=torch.int64, device=device),
              SHIFT_DELTA: torch.full((T,), SHIFT_DELTA, dtype=torch.int64, device=device)}
    dst_k, dst_v, isa = destination(layout, num_blocks, H, D, device, dtype)

    calls = {"copy": lambda: indexed_copy(src_k, src_v, dst_k, dst_v, slots)}
    for name, fn in impls.items():
        for d, delta in deltas.items():
            calls[(name, d)] = (lambda fn=fn, delta=delta: fn(
                src_k, src_v, dst_k, dst_v, slots, delta, inv_freq, D, True))

    # Delta 0 writes exactly the copy's bytes.
    calls["copy"]()
    want = (dst_k.clone(), dst_v.clone())
    bitexact = {}
    for name in impls:
        dst_k.zero_()
        dst_v.zero_()
        calls[(name, 0)]()
        bitexact[name] = torch.equal(dst_k, want[0]) and torch.equal(dst_v, want[1])
        if not bitexact[name]:
            log(f"WARNING: {device}/{layout} T={T} {name} delta 0 differs from the copy")

    run = timer(device)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = {key: [] for key in calls}
    for _ in range(reps):
        for key, fn in calls.items():
            times[key].append(run(fn))
    med = {key: statistics.median(t) for key, t in times.items()}

    nbytes = 4 * T * H * D * torch.finfo(dtype).bits // 8
    gbs = lambda s: nbytes / s / 1e9  # noqa: E731
    rows = []
    for name in impls:
        for d in deltas:
            shift_s, copy_s = med[(name, d)], med["copy"]
            rows.append({
                "device": device, "layout": layout, "isa": isa, "tokens": T, "delta": d,
                "impl": name, "bytes": nbytes,
                "shift_s": shift_s, "copy_s": copy_s,
                "shift_gbs": gbs(shift_s), "copy_gbs": gbs(copy_s),
                "shift_over_copy": shift_s / copy_s,
                "shift_over_own_copy": shift_s / med[(name, 0)],
                "delta0_bitexact_with_copy": bitexact[name],
                "shift_samples_s": times[(name, d)], "copy_samples_s": times["copy"],
            })
            log(f"[{device}/{layout} T={T} {name} delta={d}] shift {shift_s * 1e3:.3f} ms "
                f"({gbs(shift_s):.2f} GB/s), copy {copy_s * 1e3:.3f} ms ({gbs(copy_s):.2f} GB/s), "
                f"ratio {shift_s / copy_s:.2f}")
    return rows


HOST_LOAD_OFFSET = 45  # where in a block the moved run lands


def cpu_impls(dtype) -> dict:
    """The torch reference, and the C loop the engine's CPU loads use where it is built
    here."""
    from vllm_promptcache.kernels.cpu_native import native_dtypes, native_move
    from vllm_promptcache.kernels.rope_shift import rope_shift_reference

    impls = {"reference": rope_shift_reference}
    if dtype in native_dtypes() and native_move() is not None:
        impls["C loop"] = c_loop
    return impls


def host_load_isas(dtype) -> list[str]:
    """This CPU's attention ISA for the bench shape, and "amx" (its page layout, timed
    here) where that is not already it and the dtype is 16-bit."""
    from vllm_promptcache.kernels.rope_shift import _cpu_isa

    H, D = bench_shape()
    isa = _cpu_isa(dtype, BLOCK_SIZE, D)
    packed = dtype.itemsize == 2 and BLOCK_SIZE % 32 == 0 and D % 16 == 0
    return [isa] + (["amx"] if packed and isa != "amx" else [])


def measure_host_load(T: int, reps: int, warmup: int, dtype, isa: str | None = None) -> dict:
    """One layer loaded from host slots: whole blocks, slices, per token (see the module
    docstring), median seconds of each and the plan's build time; pages packed for `isa`
    (default: this CPU's)."""
    from vllm_promptcache.kernels.block_copy import load_slots_into_blocks, row_runs
    from vllm_promptcache.kernels.cpu_native import native_move, plan_native
    from vllm_promptcache.kernels.rope_shift import (
        _cpu_isa, paged_kv_views, rope_shift_paged_reference)
    from vllm_promptcache.kernels.shifted_load import host_as_layer, load_tokens_shifted
    from vllm_promptcache.kernels.shifted_slices import plan_slices

    H, D = bench_shape()
    N = BLOCK_SIZE
    own_isa = _cpu_isa(dtype, N, D)
    isa = isa or own_isa
    stored = -(-T // N)
    num_blocks = stored + 2
    kv = torch.zeros(num_blocks, H, N, 2 * D, dtype=dtype)
    page = H * N * 2 * D * kv.element_size()
    host = torch.randn(stored, page // 4).view(torch.uint8)  # random bytes of real floats
    slots = torch.randperm(stored)
    table = torch.randperm(num_blocks)
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    t = torch.arange(T)
    src_slots, src_offsets = slots[t // N], t % N
    p = t + HOST_LOAD_OFFSET
    dst = table[p // N] * N + p % N
    delta = torch.full((T,), SHIFT_DELTA + HOST_LOAD_OFFSET, dtype=torch.int64)
    block_src, block_dst = slots, table[:stored]
    runs = row_runs(block_src.tolist(), block_dst.tolist())
    plan_times, native_plan_times = [], []
    for _ in range(max(3, reps // 3)):
        t0 = time.perf_counter()
        plan = plan_slices(src_slots, src_offsets, dst, delta, N, inv_freq)
        plan_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        native_plan = plan_native(src_slots, src_offsets, dst, delta, N, inv_freq)
        native_plan_times.append(time.perf_counter() - t0)
    if native_move() is None:
        raise SystemExit("the C loop of shifted loads is not available here (see the warning)")
    host_k, host_v = paged_kv_views(host_as_layer(host, kv), "cpu", H, D, N, isa)
    dst_k, dst_v = paged_kv_views(kv, "cpu", H, D, N, isa)
    calls = {
        "block copy": lambda: load_slots_into_blocks(host, block_src, kv, block_dst, runs),
        "C loop": lambda: load_tokens_shifted(host, src_slots, src_offsets, kv, "cpu", H, D, N,
                                              dst, delta, inv_freq, D, True, isa=isa,
                                              plan=native_plan),
        "slices": lambda: load_tokens_shifted(host, src_slots, src_offsets, kv, "cpu", H, D, N,
                                              dst, delta, inv_freq, D, True, isa=isa,
                                              plan=plan),
        "per token": lambda: rope_shift_paged_reference(
            host_k, host_v, src_slots * N + src_offsets, dst_k, dst_v, dst, delta, inv_freq, D,
            True),
    }
    # The three shifted paths write the same bytes.
    written = {}
    for key in ("C loop", "slices", "per token"):
        kv.zero_()
        calls[key]()
        written[key] = kv.clone().view(torch.uint8)
    same = torch.equal(written["slices"], written["per token"])
    native_same = torch.equal(written["C loop"], written["per token"])
    if not (same and native_same):
        log(f"WARNING: host load T={T} {isa}: the shifted paths wrote different bytes")
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    run = timer("cpu")
    times = {key: [] for key in calls}
    for _ in range(reps):
        for key, fn in calls.items():
            times[key].append(run(fn))
    med = {key: statistics.median(v) for key, v in times.items()}
    row = {"tokens": T, "isa": isa, "layout_only": isa != own_isa,
           "offset_in_block": HOST_LOAD_OFFSET,
           "delta": SHIFT_DELTA + HOST_LOAD_OFFSET, "bytes": 4 * T * H * D * kv.element_size(),
           "block_copy_s": med["block copy"], "native_s": med["C loop"],
           "slices_s": med["slices"],
           "per_token_s": med["per token"], "plan_s": statistics.median(plan_times),
           "native_plan_s": statistics.median(native_plan_times),
           "native_over_block_copy": med["C loop"] / med["block copy"],
           "slices_over_block_copy": med["slices"] / med["block copy"],
           "per_token_over_block_copy": med["per token"] / med["block copy"],
           "slices_bitexact_with_per_token": same,
           "native_bitexact_with_per_token": native_same,
           "samples_s": times}
    log(f"[host load T={T} {isa}] block copy {med['block copy'] * 1e3:.3f} ms, C loop "
        f"{med['C loop'] * 1e3:.3f} ms ({row['native_over_block_copy']:.2f}x), slices "
        f"{med['slices'] * 1e3:.3f} ms ({row['slices_over_block_copy']:.2f}x), per token "
        f"{med['per token'] * 1e3:.3f} ms ({row['per_token_over_block_copy']:.2f}x), plan "
        f"{row['plan_s'] * 1e3:.3f} ms once per load")
    return row


def host_load_table(rows: list[dict]) -> str:
    ms = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
    return common.markdown_table(
        ["tokens", "CPU ISA", "block copy (ms)", "C loop (ms)", "C loop / block copy",
         "slices (ms)", "slices / block copy", "per token (ms)", "per token / block copy",
         "plan, once per load: C loop / slices (ms)"],
        [[str(r["tokens"]), r["isa"] + (" (layout only)" if r.get("layout_only") else ""),
          ms(r["block_copy_s"]), ms(r["native_s"]), f"{r['native_over_block_copy']:.2f}x",
          ms(r["slices_s"]), f"{r['slices_over_block_copy']:.2f}x", ms(r["per_token_s"]),
          f"{r['per_token_over_block_copy']:.2f}x",
          f"{ms(r['native_plan_s'])} / {ms(r['plan_s'])}"] for r in rows])


def table(rows: list[dict]) -> str:
    ms = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
    return common.markdown_table(
        ["device", "layout", "tokens", "impl", "delta", "shift (ms)", "shift GB/s",
         "copy (ms)", "copy GB/s", "shift / copy time", "shift / its delta-0 time"],
        [[r["device"], r["layout"] + (f" ({r['isa']})" if r["isa"] else ""), str(r["tokens"]),
          r["impl"], str(r["delta"]), ms(r["shift_s"]), f"{r['shift_gbs']:.2f}",
          ms(r["copy_s"]), f"{r['copy_gbs']:.2f}", f"{r['shift_over_copy']:.2f}x",
          f"{r['shift_over_own_copy']:.2f}x"]
         for r in rows])


def chart(png: Path, rows: list[dict], host_rows: list[dict], footnote: str) -> None:
    ratios = {f"{r['device']} {r['layout']} {r['impl']}\nT={r['tokens']} d={r['delta']}":
              r["shift_over_copy"] for r in rows}
    for r in host_rows:
        ratios[f"host load {r['isa']} C loop\nT={r['tokens']}"] = r["native_over_block_copy"]
        ratios[f"host load {r['isa']} slices\nT={r['tokens']}"] = r["slices_over_block_copy"]
        ratios[f"host load {r['isa']} per token\nT={r['tokens']}"] = \
            r["per_token_over_block_copy"]
    common.bar_chart(png, "time / its baseline (same bytes, same run): rope_shift / copy, "
                     "host load / block copy", ratios, "ratio (1 = as fast as the baseline)",
                     footnote=footnote)


def worker_like_threads() -> list[int]:
    """Compute on the CPUs an engine worker gets under the bench binding, with as many
    torch threads: the kernels run on the worker's threads inside an engine."""
    cpus = [int(c) for part in os.environ["VLLM_CPU_OMP_THREADS_BIND"].split(",")
            for c in (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))]
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    return cpus


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="2048,8192,32768",
                    help="comma-separated token counts (default 2048,8192,32768)")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    ap.add_argument("--out", type=Path, default=RESULTS / f"kernels-{'cuda' if cuda else 'cpu'}.json",
                    help="JSON output path")
    ap.add_argument("--host-load-tokens", default="6000,32768",
                    help="token counts of the host-load table (CPU layout; empty: skip)")
    common.add_dtype_arg(ap)
    args = ap.parse_args(argv)
    tokens = [int(x) for x in args.tokens.split(",") if x.strip()]
    host_tokens = [int(x) for x in args.host_load_tokens.split(",") if x.strip()]
    if args.reps < 1 or args.warmup < 0 or not tokens or min(tokens) < 1:
        ap.error("need reps >= 1, warmup >= 0 and positive token counts")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the benchmark times compiled kernels only")

    from vllm_promptcache.kernels.rope_shift import (
        HAS_TRITON, rope_shift_reference, rope_shift_triton)

    dtype_name = common.setup(args.dtype, "cuda" if cuda else "cpu")
    dtype = getattr(torch, dtype_name)
    load = common.MachineLoad()
    cpus = worker_like_threads()
    started = time.perf_counter()
    rows = []
    with torch.inference_mode():
        for T in tokens:
            for layout in cpu_layouts(dtype):
                rows += measure("cpu", layout, T, cpu_impls(dtype), args.reps, args.warmup,
                                dtype)
        host_rows = []
        if "cpu" in cpu_layouts(dtype):
            host_rows = [measure_host_load(T, args.reps, args.warmup, dtype, isa)
                         for isa in host_load_isas(dtype) for T in host_tokens]
        if cuda:
            impls = {"reference": rope_shift_reference}
            if HAS_TRITON:
                impls = {"triton": rope_shift_triton, **impls}
            for T in tokens:
                for layout in ("nhd", "flash_attn"):
                    rows += measure("cuda", layout, T, impls, args.reps, args.warmup, dtype)

    H, D = bench_shape()
    threads = {"all cases (this process)": [{"torch_threads": torch.get_num_threads(),
                                             "affinity": cpus}]}
    env = common.run_environment(dtype_name, load, threads, "cuda" if cuda else "cpu")
    result = {
        "benchmark": "kernels",
        "environment": env,
        "config": {
            "kv_heads": H, "head_dim": D, "block_size": BLOCK_SIZE,
            "tokens": tokens, "shift_delta": SHIFT_DELTA, "reps": args.reps,
            "warmup": args.warmup,
            "bytes_definition": "K and V read + K and V written (4 * T * kv_heads * head_dim * 2 B)",
            "copy_definition": "advanced-index assignment of K and V through the same slots",
            "total_runtime_s": round(time.perf_counter() - started, 1),
        },
        "rows": rows,
        "host_load": {
            "definition": "one layer of vLLM's CPU layout loaded from host slots; block copy "
                          "= load_slots_into_blocks (exact hit), C loop / slices = "
                          "load_tokens_shifted with the C loop's / torch slices' plan, per "
                          "token = rope_shift_paged_reference",
            "rows": host_rows,
        },
    }
    where = common.provenance_line(env).replace("worker thread(s)", "torch thread(s)")
    if cuda:
        where += f" and {torch.cuda.get_device_name()}"
    md = (f"rope_shift vs a plain indexed copy of the same bytes on {where}: KV of T tokens, "
          f"{H} KV heads x head_dim {D}, block size {BLOCK_SIZE}; median of {args.reps} "
          f"reps after {args.warmup} warm-up calls, copy and shift interleaved.  GB/s counts "
          f"K+V read + written.\n\n" + table(rows) + "\n")
    if host_rows:
        md += (f"\nOne layer loaded from the host tier on vLLM's CPU layout ({H} KV heads x "
               f"head_dim {D}, block size {BLOCK_SIZE}): whole blocks as an exact hit loads "
               f"them, against the same tokens moved {HOST_LOAD_OFFSET} tokens into a block "
               f"and rotated by {SHIFT_DELTA + HOST_LOAD_OFFSET:,} positions (a module at a new "
               f"position), by the C loop, as torch slices and per token; median of "
               f"{args.reps} reps, the four interleaved.  Rows marked layout only time vLLM's AMX page layout on this "
               f"CPU (moving KV uses no AMX instruction).\n\n" + host_load_table(host_rows)
               + "\n")
    common.write_outputs(args.out, result, md, functools.partial(
        chart, rows=rows, host_rows=host_rows, footnote=where))
    print(md)
    print(f"wrote {args.out} and its .md and .png")
    if not all(r["slices_bitexact_with_per_token"] and r["native_bitexact_with_per_token"]
               for r in host_rows):
        log("WARNING: the shifted paths wrote different bytes; see the JSON")
        return 1
    if not all(r["delta0_bitexact_with_copy"] for r in rows):
        log("WARNING: a delta-0 shift did not write the copy's bytes; see the JSON")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

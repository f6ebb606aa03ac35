"""rope_shift throughput against a plain copy of the same bytes, on the bench model's KV shape.

For each token count T (default 2k, 8k, 32k) the K and V of T tokens ([T, kv_heads 2,
head_dim 64], in the dtype ``bench/common.py`` picks for this CPU or ``--dtype``) are
written into one layer's paged cache (block size 128) through a
slot mapping over a shuffled block table, by

* ``copy``  -- a plain indexed copy of K and V into the same destination views through
  the same slots (advanced-index assignment, what a KV load without a shift costs);
* ``shift`` -- ``rope_shift`` with delta 0 for every token (K copied, no rotation in the
  output) and with delta = 40000 for every token (K rotated).

On CPU ``shift`` is the torch reference ``rope_shift_reference`` (the CPU path of
``rope_shift_``); when ``torch.cuda.is_available()`` the same is also measured on the GPU
for the Triton kernel (``rope_shift_triton``) and the reference, timed with CUDA events.

Destinations ("layouts"): ``nhd`` is a plain 4-D ``[blocks, block_size, kv_heads,
head_dim]`` tensor per K and V; ``cpu`` is vLLM's CPU-backend layer tensor viewed with
``paged_kv_views(..., "cpu")`` (packed per this machine's attention ISA); ``flash_attn``
(GPU only) is vLLM 0.32's ``[blocks, kv_heads, block_size, 2 * head_dim]`` layer tensor.

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

Results: ``bench/results/kernels-cpu.json``, a table in ``kernels-cpu.md`` and the shift /
copy time ratios in ``kernels-cpu.png`` (``kernels-cuda.*`` by default on a CUDA machine;
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
                "delta0_bitexact_with_copy": bitexact[name],
                "shift_samples_s": times[(name, d)], "copy_samples_s": times["copy"],
            })
            log(f"[{device}/{layout} T={T} {name} delta={d}] shift {shift_s * 1e3:.3f} ms "
                f"({gbs(shift_s):.2f} GB/s), copy {copy_s * 1e3:.3f} ms ({gbs(copy_s):.2f} GB/s), "
                f"ratio {shift_s / copy_s:.2f}")
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| device | layout | tokens | impl | delta | shift (ms) | shift GB/s | copy (ms) "
        "| copy GB/s | shift / copy time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        layout = r["layout"] + (f" ({r['isa']})" if r["isa"] else "")
        lines.append(
            f"| {r['device']} | {layout} | {r['tokens']} | {r['impl']} | {r['delta']} "
            f"| {r['shift_s'] * 1e3:.3f} | {r['shift_gbs']:.2f} | {r['copy_s'] * 1e3:.3f} "
            f"| {r['copy_gbs']:.2f} | {r['shift_over_copy']:.2f}x |")
    return "\n".join(lines)


def chart(png: Path, rows: list[dict], footnote: str) -> None:
    ratios = {f"{r['device']} {r['layout']} {r['impl'][:3]}\nT={r['tokens']} d={r['delta']}":
              r["shift_over_copy"] for r in rows}
    common.bar_chart(png, "rope_shift time / plain copy time (same bytes, same run)", ratios,
                     "ratio (1 = as fast as a copy)", footnote=footnote)


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
    common.add_dtype_arg(ap)
    args = ap.parse_args(argv)
    tokens = [int(x) for x in args.tokens.split(",") if x.strip()]
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
                rows += measure("cpu", layout, T, {"reference": rope_shift_reference},
                                args.reps, args.warmup, dtype)
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
    }
    where = common.provenance_line(env).replace("worker thread(s)", "torch thread(s)")
    if cuda:
        where += f" and {torch.cuda.get_device_name()}"
    md = (f"rope_shift vs a plain indexed copy of the same bytes on {where}: KV of T tokens, "
          f"{H} KV heads x head_dim {D}, block size {BLOCK_SIZE}; median of {args.reps} "
          f"reps after {args.warmup} warm-up calls, copy and shift interleaved.  GB/s counts "
          f"K+V read + written.\n\n" + table(rows) + "\n")
    common.write_outputs(args.out, result, md, functools.partial(chart, rows=rows, footnote=where))
    print(md)
    print(f"wrote {args.out} and its .md and .png")
    if not all(r["delta0_bitexact_with_copy"] for r in rows):
        log("WARNING: a delta-0 shift did not write the copy's bytes; see the JSON")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Everything a GPU machine should measure, in one command, JSON under $OUT (or --out).

    python bench/gpu_suite.py                 # all of it (CUDA)
    python bench/gpu_suite.py --only kernels  # one group: tests, kernels, ttft, multi_turn
    python bench/gpu_suite.py --dry-run       # build every case, check its arguments; no GPU

Groups:

* ``tests``: the bit-exact reuse tests and the server chat tests on CUDA -- the same
  pytest files, with ``PROMPTCACHE_TEST_DEVICE=cuda`` (read by the tests' engine
  helpers).  Records pass/fail and pytest's summary line.
* ``kernels``: Triton ``copy_pages_`` loads (host slots -> paged blocks, through the
  device view of pinned memory) and saves, and ``rope_shift_paged_``, against a plain
  device-to-device copy and a pinned host->device ``memcpy`` of the same bytes, in the
  same run: GB/s each.
* ``ttft``: Llama-3.1-8B shape, dummy weights, bf16, an 8k-token document plus a short
  question: no cache / vLLM prefix-cache hit / host-tier hit / disk-tier hit (after an
  engine restart) / vLLM ``kv_offloading_size`` at the same host GB.
* ``multi_turn``: ``bench/multi_turn.py``'s workload at GPU scale (8B shape), its cases
  plus vLLM's own offloading at the same host GB.
* ``doc_qa``: ``bench/doc_qa.py --device cuda --quick`` (bench shape, CUDA graphs on):
  modules, labelled modules and a plain client against the exact hit of the same prompt,
  where the question's compute costs about one decode step (on a 2-core CPU it alone is
  several times the exact hit).  Writes ``doc-qa-cuda.{json,md,png}`` beside the suite's.

``--dry-run`` builds each case (model directory, engine arguments through vLLM's
``EngineArgs``, kernel layouts on CPU tensors, pytest files) and writes what it would run
to ``gpu-suite-dry-run.json``; CI runs it (tests/test_gpu_suite_dry_run.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import common  # noqa: E402

# Llama-3.1-8B (config.json of meta-llama/Llama-3.1-8B), weights dummy.
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
DOC_TOKENS = 8192
QUESTION_TOKENS = 32
HOST_GB = 16.0
TTFT_MODES = ("nocache", "prefix", "host", "disk", "vllm_offload")
MULTI_TURN_CASES = ("nocache", "prefix", "host", "disk_sched", "vllm_offload")
TEST_FILES = ("tests/connector/test_reuse.py", "tests/test_server.py")
KERNEL_BLOCKS = 512          # blocks moved per measurement
KERNEL_TOKENS = 8192         # tokens shifted per rope_shift measurement
SAVE_WAIT_S = 1.0
DOC_QA_HOST_GB = 2.0          # doc_qa's host tier: its three documents and their shifts
GROUPS = ("tests", "kernels", "ttft", "multi_turn", "doc_qa")


@dataclasses.dataclass
class Case:
    group: str
    name: str
    spec: dict                      # what the case runs with (recorded in the JSON)
    check: Callable[[], None]       # raises on a bad argument, without a GPU
    run: Callable[[], dict]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def model_dir(root: Path) -> str:
    path = root / "llama-3.1-8b-shape"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA_8B, indent=1))
    return str(path)


def check_engine_kwargs(model: str, kw: dict) -> None:
    """Every key is an EngineArgs field and vLLM builds its VllmConfig from them (the
    same validation `vllm serve` runs; on a CPU machine, against the CPU platform)."""
    from vllm_promptcache.compat import engine_args_class

    cls = engine_args_class()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise ValueError(f"not EngineArgs fields in this vLLM: {unknown}")
    cls(model=model, **kw).create_engine_config()


# ------------------------------------------------------------------------------ tests

def test_cases(args) -> list[Case]:
    def check():
        for f in TEST_FILES:
            if not (REPO / f).is_file():
                raise FileNotFoundError(f)

    def run():
        env = {**os.environ, "PROMPTCACHE_TEST_DEVICE": "cuda"}
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", *TEST_FILES], cwd=REPO,
                             env=env, capture_output=True, text=True)
        tail = (out.stdout + out.stderr).strip().splitlines()
        return {"returncode": out.returncode, "summary": tail[-1] if tail else ""}

    spec = {"files": list(TEST_FILES), "env": {"PROMPTCACHE_TEST_DEVICE": "cuda"}}
    return [Case("tests", "cuda_reuse_and_server", spec, check, run)]


# ---------------------------------------------------------------------------- kernels

def _page_shape(cfg: dict, block_size: int) -> tuple[int, ...]:
    """One layer's block on FlashAttention (vLLM 0.32): (kv heads, block, 2 * head)."""
    return (cfg["num_key_value_heads"], block_size, 2 * cfg["head_dim"])


def kernel_cases(args) -> list[Case]:
    import torch

    block_size = 16
    shape = _page_shape(LLAMA_8B, block_size)

    def tensors(device: str, num_blocks: int):
        kv = torch.zeros((num_blocks,) + shape, dtype=torch.bfloat16, device=device)
        page = kv[0].numel() * kv.element_size()
        return kv, page

    def check():
        from vllm_promptcache.kernels.block_copy import paired_layouts

        kv, page = tensors("cpu", 4)
        host = torch.zeros(4, page, dtype=torch.uint8)
        paired_layouts(kv, host)

    def run():
        from vllm_promptcache import compat
        from vllm_promptcache.kernels.block_copy import copy_pages_, paired_layouts
        from vllm_promptcache.kernels.rope_shift import paged_kv_views, rope_shift_paged_

        n = KERNEL_BLOCKS
        kv, page = tensors("cuda", 2 * n)
        host = torch.empty(2 * n, page, dtype=torch.uint8, pin_memory=True)
        host_dev = compat.accelerator_view(host)
        paged, hostl = paired_layouts(kv, host_dev)
        idx = torch.randperm(2 * n, device="cuda")[:n]
        dst = torch.randperm(2 * n, device="cuda")[:n]
        nbytes = n * page
        flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        other = torch.empty_like(flat)
        H, D = LLAMA_8B["num_key_value_heads"], LLAMA_8B["head_dim"]
        hk, hv = paged_kv_views(host_dev.view(torch.bfloat16).view((2 * n,) + shape),
                                "flash_attn", H, D, block_size)
        dk, dv = paged_kv_views(kv, "flash_attn", H, D, block_size)
        T = KERNEL_TOKENS
        src_tok = torch.randint(0, 2 * n * block_size, (T,), device="cuda")
        dst_tok = torch.randperm(2 * n * block_size, device="cuda")[:T]
        delta = torch.randint(-4000, 4000, (T,), device="cuda")
        inv = 1.0 / 500000 ** (torch.arange(0, D, 2, device="cuda").float() / D)
        ops = {
            "load_triton_from_pinned": (lambda: copy_pages_(hostl, idx, paged, dst), nbytes),
            "save_triton_to_pinned": (lambda: copy_pages_(paged, dst, hostl, idx), nbytes),
            "memcpy_pinned_to_device": (lambda: flat.copy_(pinned, non_blocking=True), nbytes),
            "memcpy_device_to_pinned": (lambda: pinned.copy_(flat, non_blocking=True), nbytes),
            "copy_device_to_device": (lambda: other.copy_(flat), nbytes),
            "rope_shift_from_pinned": (
                lambda: rope_shift_paged_(hk, hv, src_tok, dk, dv, dst_tok, delta, inv, D, True),
                T * H * D * 2 * 2),
        }
        results = {}
        for name, (fn, moved) in ops.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(args.reps * 5):
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            med = statistics.median(times)
            results[name] = {"bytes": moved, "seconds": med, "gb_per_s": moved / med / 1e9}
        return results

    spec = {"blocks": KERNEL_BLOCKS, "page_shape": list(shape), "dtype": "bfloat16",
            "shift_tokens": KERNEL_TOKENS}
    return [Case("kernels", "copy_and_shift_throughput", spec, check, run)]


# ------------------------------------------------------------------------------- ttft

def ttft_engine_kwargs(mode: str, args, disk_dir: str) -> dict:
    kw = dict(dtype=args.dtype, load_format="dummy", skip_tokenizer_init=True, seed=0,
              max_model_len=DOC_TOKENS + 2 * QUESTION_TOKENS + 64,
              gpu_memory_utilization=args.gpu_memory_utilization,
              enable_prefix_caching=mode in ("prefix", "vllm_offload"))
    if mode in ("host", "disk"):
        from vllm_promptcache import engine_kwargs

        kw.update(engine_kwargs(host_gb=args.host_gb, disk_gb=64 if mode == "disk" else 0,
                                disk_path=disk_dir))
    if mode == "vllm_offload":
        kw["kv_offloading_size"] = args.host_gb
    return kw


def _ttft_run(model: str, mode: str, args) -> dict:
    import random

    from vllm import LLM, SamplingParams

    from vllm_promptcache.compat import shutdown_llm

    rng = random.Random(0)
    one = SamplingParams(max_tokens=1, detokenize=False)
    disk_dir = tempfile.mkdtemp(prefix=f"promptcache-gpu-{mode}-")

    def tokens(n):
        return [rng.randrange(1000, 120000) for _ in range(n)]

    llm = LLM(model, **ttft_engine_kwargs(mode, args, disk_dir))
    times = []
    for rep in range(args.reps + 1):  # the first is a warm-up
        doc = tokens(DOC_TOKENS)
        if mode != "nocache":
            llm.generate([{"prompt_token_ids": doc + tokens(QUESTION_TOKENS)}], one,
                         use_tqdm=False)
            time.sleep(SAVE_WAIT_S)
            if mode == "vllm_offload":
                llm.reset_prefix_cache()  # the hit must come from vLLM's host offload
            if mode == "disk":  # a restarted engine: only the disk tier holds the doc
                shutdown_llm(llm)
                llm = LLM(model, **ttft_engine_kwargs(mode, args, disk_dir))
        prompt = [{"prompt_token_ids": doc + tokens(QUESTION_TOKENS)}]
        start = time.perf_counter()
        llm.generate(prompt, one, use_tqdm=False)
        if rep:
            times.append(time.perf_counter() - start)
    shutdown_llm(llm)
    return {"ttft_s": statistics.median(times), "reps": times}


def ttft_cases(args, model: str) -> list[Case]:
    cases = []
    for mode in TTFT_MODES:
        kw = ttft_engine_kwargs(mode, args, "/tmp/promptcache-gpu-dry-run")
        cases.append(Case("ttft", mode, {"engine": _jsonable(kw), "doc_tokens": DOC_TOKENS,
                                         "question_tokens": QUESTION_TOKENS},
                          lambda kw=kw: check_engine_kwargs(model, kw),
                          lambda mode=mode: _ttft_run(model, mode, args)))
    return cases


# ------------------------------------------------------------------------- multi-turn

def multi_turn_args(args) -> argparse.Namespace:
    return argparse.Namespace(
        conversations=32, turns=6, max_num_seqs=16, gpu_blocks=None, host_gb=args.host_gb,
        think_s=1.0, disk_gb=64.0, max_model_len=16384, seed=0, quick=False,
        dtype=args.dtype,
        engine_overrides={"enforce_eager": False, "skip_tokenizer_init": True,
                          "gpu_memory_utilization": args.gpu_memory_utilization,
                          "kv_cache_memory_bytes": None})


def multi_turn_cases(args, model: str) -> list[Case]:
    import multi_turn as mt

    margs = multi_turn_args(args)
    cases = []
    for case in MULTI_TURN_CASES:
        kw = mt.engine_kwargs_for(case, margs, "/tmp/promptcache-gpu-dry-run")
        if kw.get("num_gpu_blocks_override") is None:
            kw.pop("num_gpu_blocks_override", None)

        def run(case=case):
            convs = mt.make_conversations(margs.conversations, margs.turns, margs.seed)
            return mt.run_case(case, model, convs, margs)

        cases.append(Case("multi_turn", case, {"engine": _jsonable(kw)},
                          lambda kw=kw: check_engine_kwargs(model, kw), run))
    return cases


# ----------------------------------------------------------------------------- doc-QA

def doc_qa_cases(args) -> list[Case]:
    import doc_qa

    from vllm_promptcache.tiny_model import build_model

    out = args.out / "doc-qa-cuda.json"
    # The arguments the dry run checks are the ones the run passes.
    ns = argparse.Namespace(device="cuda", dtype=args.dtype, host_gb=DOC_QA_HOST_GB)
    argv = [sys.executable, str(HERE / "doc_qa.py"), "--device", ns.device, "--quick",
            "--dtype", ns.dtype, "--host-gb", str(ns.host_gb), "--out", str(out)]
    kw = doc_qa.engine_kwargs_for(ns)

    def run():
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"doc_qa.py exited {proc.returncode}: {proc.stderr[-2000:]}")
        doc = json.loads(out.read_text())
        return {k: doc[k] for k in ("ttft_median_s", "ttft_ratio_to_exact_hit",
                                    "ttft_ratio_to_exact_hit_documents")}

    return [Case("doc_qa", "modules_labels_plain_client", {"argv": argv[1:],
                                                          "engine": _jsonable(kw)},
                 lambda: check_engine_kwargs(build_model("bench"), kw), run)]


# ------------------------------------------------------------------------------ main

def _jsonable(kw: dict) -> dict:
    return json.loads(json.dumps(kw, default=str))


def build_cases(args, model: str) -> list[Case]:
    groups = args.only.split(",") if args.only else list(GROUPS)
    for g in groups:
        if g not in GROUPS:
            raise SystemExit(f"--only: unknown group {g!r}; choose from {GROUPS}")
    cases = []
    if "tests" in groups:
        cases += test_cases(args)
    if "kernels" in groups:
        cases += kernel_cases(args)
    if "ttft" in groups:
        cases += ttft_cases(args, model)
    if "multi_turn" in groups:
        cases += multi_turn_cases(args, model)
    if "doc_qa" in groups:
        cases += doc_qa_cases(args)
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", HERE / "results")))
    ap.add_argument("--only", default="", help=f"comma-separated groups of {GROUPS}")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--host-gb", type=float, default=HOST_GB)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    args = ap.parse_args(argv)
    args.dtype = common.pick_dtype(args.dtype, "cuda")
    common.bind_threads()
    device = "cpu" if args.dry_run else "cuda"
    model = model_dir(Path(tempfile.mkdtemp(prefix="promptcache-gpu-model-")))
    cases = build_cases(args, model)
    env = common.environment(args.dtype, device)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.dry_run:
        report = []
        for c in cases:
            c.check()
            report.append({"group": c.group, "name": c.name, "spec": c.spec})
            log(f"ok  {c.group}/{c.name}")
        (args.out / "gpu-suite-dry-run.json").write_text(
            json.dumps({"environment": env, "cases": report}, indent=1) + "\n")
        return 0

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the cases")
    gpu = torch.cuda.get_device_name(0).replace(" ", "-").lower()
    results: dict[str, dict] = {}
    for c in cases:
        log(f"run {c.group}/{c.name}")
        try:
            results.setdefault(c.group, {})[c.name] = {"spec": c.spec, "result": c.run()}
        except Exception as e:  # one failed case does not lose the others' numbers
            results.setdefault(c.group, {})[c.name] = {"spec": c.spec, "error": repr(e)}
    payload = {"environment": env, "results": results}
    ttft = {k: v["result"]["ttft_s"] for k, v in results.get("ttft", {}).items()
            if "result" in v}
    rows = ["| group | case | result |", "|---|---|---|"]
    for g, by in results.items():
        for name, r in by.items():
            rows.append(f"| {g} | {name} | {json.dumps(r.get('result', r.get('error')))[:120]} |")
    chart = functools.partial(common.bar_chart, title=f"TTFT, 8k-token document, {gpu}",
                              values=ttft, ylabel="seconds") if ttft else None
    common.write_outputs(args.out / f"gpu-suite-{gpu}.json", payload, "\n".join(rows) + "\n",
                         chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/gpu_suite.py --dry-run: every case of the GPU suite is built and its arguments
pass vLLM's own config validation on this (CPU) machine, so the suite does not fail on
a GPU machine for a typo; the environment record carries dtype, CPU model and binding."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_builds_every_case(tmp_path):
    out = subprocess.run([sys.executable, "bench/gpu_suite.py", "--dry-run", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-suite-dry-run.json").read_text())
    names = {(c["group"], c["name"]) for c in report["cases"]}
    for mode in ("nocache", "prefix", "host", "disk", "vllm_offload"):
        assert ("ttft", mode) in names and ("multi_turn", mode if mode != "disk" else
                                            "disk_sched") in names
    assert ("tests", "cuda_reuse_and_server") in names
    assert ("kernels", "copy_and_shift_throughput") in names
    doc_qa = next(c["spec"] for c in report["cases"] if c["group"] == "doc_qa")
    assert doc_qa["argv"][1:3] == ["--device", "cuda"]
    # On CUDA the doc-QA engine keeps CUDA graphs and sizes its pool from GPU memory.
    assert "enforce_eager" not in doc_qa["engine"] and "kv_cache_memory_bytes" not in \
        doc_qa["engine"]
    ttft = {c["name"]: c["spec"] for c in report["cases"] if c["group"] == "ttft"}
    assert ttft["vllm_offload"]["engine"]["kv_offloading_size"] == ttft["host"]["engine"][
        "kv_transfer_config"]["kv_connector_extra_config"]["promptcache"]["host_gb"]
    env = report["environment"]
    assert env["dtype"] == "bfloat16" and env["cpu_model"]
    assert set(env["thread_binding"]) == {"VLLM_CPU_NUM_OF_RESERVED_CPU",
                                          "VLLM_CPU_OMP_THREADS_BIND"}

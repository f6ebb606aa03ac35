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
  versions into every JSON.
* **Outputs.**  `write_outputs` writes the JSON, the Markdown table and a PNG chart
  (matplotlib, Agg) side by side.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
BINDING_VARS = ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND")
DTYPES = ("bfloat16", "float32", "float16")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pick_dtype(requested: str | None, device: str = "cpu") -> str:
    """`requested`, or bfloat16 on CUDA / on CPUs with bf16 instructions, else float32."""
    if requested:
        if requested not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {requested!r}")
        return requested
    if device == "cuda":
        return "bfloat16"
    return "bfloat16" if cpu_flags() & set(BF16_FLAGS) else "float32"


def bind_threads(reserved: int = 1) -> dict[str, str]:
    """The same OpenMP binding for every engine of this run: `reserved` cores for the
    engine process, the rest for the worker's threads.  Values already in the
    environment win (and are recorded as they are)."""
    n = os.cpu_count() or 1
    reserved = min(reserved, n - 1) if n > 1 else 0
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(reserved))
    first = int(os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"])
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                          f"{first}-{n - 1}" if n - 1 > first else str(n - 1))
    return {k: os.environ[k] for k in BINDING_VARS}


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


def bar_chart(png: Path, title: str, values: dict[str, float], ylabel: str) -> None:
    """One bar per label (e.g. a case's TTFT), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(values) + 2), 3.5))
    ax.bar(list(values), list(values.values()), color="#4878a8")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def write_outputs(out_json: Path, payload: dict, table_md: str, chart_title: str,
                  chart_values: dict[str, float], chart_ylabel: str) -> None:
    """JSON at `out_json`, the table beside it (.md) and the chart (.png)."""
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(payload, indent=1) + "\n")
    out_json.with_suffix(".md").write_text(table_md)
    if chart_values:
        bar_chart(out_json.with_suffix(".png"), chart_title, chart_values, chart_ylabel)

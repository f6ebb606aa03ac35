"""What the CPU host offers vLLM's CPU backend: bf16 instructions (which dtype runs fast)
and the OpenMP binding every engine of a run shares.  The tests and benches read these
from here, so they pick the dtype and bind threads alike."""

from __future__ import annotations

import os

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
BINDING_VARS = ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND")
DTYPES = ("bfloat16", "float32", "float16")


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
    """`requested`, or bfloat16 on CUDA / on CPUs with bf16 instructions, else float32
    (without them vLLM's bf16 matmuls run ~5x slower than float32)."""
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

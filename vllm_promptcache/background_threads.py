"""Where the plugin's background threads run: the CPU the layer-wise load thread has.

A CPU engine's worker binds its OpenMP threads to its CPUs, and a thread the worker
starts inherits that binding.  The plugin's background threads -- host saves, disk
writes and reads, remote writes and reads -- then ran on the forward's own CPU and took
it from the forward in every step they were busy (a read of a promoted session head
while other conversations' turns ran).  Where a CPU free of the worker's OpenMP threads
was chosen for the load thread (`cpu_layer_loads.choose_load_cpu`), every pool made
here moves its threads there on their first task; elsewhere (GPU workers, no free CPU)
they stay where they were started.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

logger = logging.getLogger("vllm.promptcache")

_cpu: int | None = None
_local = threading.local()


def set_cpu(cpu: int | None) -> None:
    """The CPU background threads move to (None: leave them where they run)."""
    global _cpu
    _cpu = cpu


def _move_here() -> None:
    cpu = _cpu
    if cpu is None or getattr(_local, "cpu", None) == cpu:
        return
    _local.cpu = cpu
    try:
        os.sched_setaffinity(0, {cpu})  # this thread only
    except (OSError, AttributeError) as e:
        logger.debug("promptcache: background thread stays off CPU %d: %s", cpu, e)


class BackgroundPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose threads run on the background CPU, once one is set."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        def run():
            _move_here()
            return fn(*args, **kwargs)
        return super().submit(run)

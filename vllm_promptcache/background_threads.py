"""Where the plugin's background threads run: the CPU the layer-wise load thread has.

A CPU engine's worker binds its OpenMP threads to its CPUs, and a thread the worker
starts inherits that binding.  The plugin's background threads -- host saves, disk
writes and reads, remote writes and reads -- then ran on the forward's own CPU and took
it from the forward in every step they were busy (a read of a promoted session head
while other conversations' turns ran).  Where a CPU free of the worker's OpenMP threads
was chosen for the load thread (`cpu_layer_loads.choose_load_cpu`), every pool made
here moves its threads there on their first task; elsewhere (GPU workers, no free CPU)
they stay where they were started.

Only to a CPU no other process has claimed.  With two servers on a CPU each, the CPU
their OpenMP threads leave free is the other server's forward CPU, where vLLM's worker
busy-polls between steps.  Saves moved there waited for that worker at every wake-up,
vLLM held the finished requests' blocks meanwhile, and TTFT p50 went from 0.045 s to
0.4-0.9 s (bench/multi_instance.py --server-cpus own).  The load thread no longer
takes such a CPU on its own (`cpu_layer_loads.choose_load_cpu`); one the operator
named (``--promptcache-load-cpu N``) is checked here, and the background threads stay
where they started when another process's threads are bound to it
(`cpu_layer_loads.claimed_by_other`).

Each thread also gives the OS its Python name, shortened ("promptcache-disk-write_0"
shows as "pc-disk-write_0" in `top -H`, `ps -L` and /proc), so an operator can see
which of the plugin's threads use the machine (`name_os_thread`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


_PR_SET_NAME = 15  # linux/prctl.h
_libc = None


def name_os_thread() -> None:
    """Give the calling thread's Python name to the OS (15 bytes; "promptcache-" is
    shortened to "pc-"), once per thread.  Where prctl is missing, nothing happens."""
    global _libc
    if getattr(_local, "named", False):
        return
    _local.named = True
    name = threading.current_thread().name.replace("promptcache-", "pc-", 1)
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _move_here() -> None:
    name_os_thread()
    cpu = _cpu
    if cpu is None or getattr(_local, "cpu", None) == cpu:
        return
    _local.cpu = cpu
    try:
        os.sched_setaffinity(0, {cpu})  # this thread only
    except (OSError, AttributeError) as e:
        logger.debug("promptcache: background thread stays off CPU %d: %s", cpu, e)


def choose_cpu(load_cpu: int | None, allowed: set[int], named: bool = True
               ) -> tuple[int | None, str]:
    """(the CPU background threads move to, or None; why) given the load thread's.
    `named`: the operator named that CPU; one `auto` chose is free of other processes'
    threads already (`choose_load_cpu` read /proc for it), so /proc is not read again."""
    from .connector.cpu_layer_loads import claimed_by_other

    if load_cpu is None:
        return None, "no CPU is free of the forward's threads"
    other = claimed_by_other(load_cpu, allowed) if named else None
    if other is not None:
        return None, f"CPU {load_cpu} has threads of process {other} bound to it"
    return load_cpu, f"CPU {load_cpu}, beside the load thread"


class BackgroundPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose threads run on the background CPU, once one is set."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        def run():
            _move_here()
            return fn(*args, **kwargs)
        return super().submit(run)

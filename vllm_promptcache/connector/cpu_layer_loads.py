"""The CPU backend's loads, layer by layer beside the forward (CachedAttention's
layer-wise pre-loading, on the CPU).

vLLM's CPU worker computes on the OpenMP threads it binds (``VLLM_CPU_OMP_THREADS_BIND``),
and with a KV connector set it reserves one CPU more per rank for it.  A step's loads
then run on a thread of ours bound to such a free CPU: layer 0's bytes first, then
layer 1's, ..., while the forward runs; each attention layer waits only for its own
layer (`wait_layer`, from the connector's ``wait_for_layer_load``), so the copies of
later layers overlap the compute of earlier ones.  Without a free CPU, or with
``--promptcache-load-cpu off``, every load runs in ``start_load_kv`` as before.

What makes it safe:

* **Only bytes no one else writes.**  vLLM writes a layer's new KV before that layer
  waits for its load (``unified_kv_cache_update``), so the worker keeps for this thread
  only blocks the step's forward writes no slot of (`compat.step_written_slots`);
  the shared block, where a prompt's loaded tokens end and its computed ones begin, is
  loaded before the forward as before.
* **No torch op on this thread.**  A torch op run here would start an OpenMP team of
  its own on the forward's CPUs; the thread runs numpy copies and the C loop only
  (both release the GIL).
* **vLLM must wait for every layer.**  The first step with loads runs them all before
  the forward and records which layers vLLM waited for; layer-wise loading starts only
  if every loaded layer was among them, else a warning says why it stays off.
* **Never waiting for a CPU.**  A CPU another process has bound threads to (another
  engine's worker) is never taken: the thread holds the GIL while it starts a layer,
  and descheduled there it would hold up the forward too.  The CPU taken may still be
  busy (a front end, the engine process): a layer the load thread has not taken when
  the forward needs it is moved by the forward's own thread, so a step is never slower
  than loading every layer before it (`moved_by_caller` counts them).
* **Errors surface in the forward.**  A failed layer raises in that layer's wait (the
  step fails, as a failed load did before); `finish` waits for the rest, so a later
  save or promotion never reuses a slot still being read.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Callable, Sequence

import numpy as np

from .. import background_threads

logger = logging.getLogger("vllm.promptcache")

LayerWork = Callable[[int], None]


def _cpu_list(text: str) -> set[int]:
    """'0-3,8 10' / '{0,1,2}' / '[4,5]' -> the CPU numbers (OpenMP places, GOMP and
    KMP proc lists, vLLM's bind lists)."""
    cpus: set[int] = set()
    for part in text.replace("{", " ").replace("}", " ").replace("[", " ") \
            .replace("]", " ").replace(",", " ").split():
        lo, _, hi = part.partition("-")
        hi = hi.partition(":")[0]
        if lo.isdigit() and (hi.isdigit() or not hi):
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def omp_cpus(environ=os.environ) -> set[int]:
    """The CPUs this worker's OpenMP threads are bound to, from the variables vLLM's CPU
    backend sets when it starts the worker (``OMP_PLACES``, ``GOMP_CPU_AFFINITY``,
    ``KMP_AFFINITY``'s proclist); empty where none is set."""
    if environ.get("OMP_PLACES", "").strip().startswith("{"):
        return _cpu_list(environ["OMP_PLACES"])
    if environ.get("GOMP_CPU_AFFINITY"):
        return _cpu_list(environ["GOMP_CPU_AFFINITY"])
    kmp = environ.get("KMP_AFFINITY", "")
    if "proclist=" in kmp:
        return _cpu_list(kmp.split("proclist=", 1)[1].split("]", 1)[0])
    return set()


def pinned_thread_cpus() -> set[int]:
    """The CPUs this process's threads are pinned to one by one: where vLLM binds the
    OpenMP threads itself (``init_cpu_threads_env``: in-process engines, older vLLM)
    rather than through the environment, each of them holds a single CPU."""
    cpus: set[int] = set()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return cpus
    for tid in tids:
        try:
            affinity = os.sched_getaffinity(int(tid))
        except (OSError, ValueError):
            continue
        if len(affinity) == 1:
            cpus |= affinity
    return cpus


def claimed_cpus(allowed: set[int], proc: str = "/proc") -> dict[int, int]:
    """{cpu: the pid of another process with a thread bound to it}, one scan of `proc`.

    Bound: the thread may run on fewer CPUs than `allowed` (this engine's, which vLLM
    does not narrow) -- another engine's OpenMP thread, a pinned front end.  Not
    counted: kernel threads (children of kthreadd, pid 2), which hold single CPUs by
    design; this process; and the plugin's own threads in another engine (named
    ``promptcache-*``: its load and background threads), which sleep between
    transfers.  Read once, when a CPU is chosen: a process that binds itself there
    later is not seen."""
    me = os.getpid()
    claimed: dict[int, int] = {}
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return claimed
    for pid in pids:
        if int(pid) in (me, 2):
            continue
        try:
            tids = os.listdir(f"{proc}/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            status = _status(f"{proc}/{pid}/task/{tid}/status")
            if status is None or status.get("PPid") == "2":
                break  # gone, or a kernel thread (its tasks are too)
            if status.get("Name", "").startswith(PLUGIN_THREAD_PREFIX):
                continue
            cpus = _cpu_list(status.get("Cpus_allowed_list", ""))
            if cpus and cpus < allowed:
                for cpu in cpus:
                    claimed.setdefault(cpu, int(pid))
    return claimed


def claimed_by_other(cpu: int, allowed: set[int], proc: str = "/proc") -> int | None:
    """The pid of another process with a thread bound to `cpu`, or None
    (`claimed_cpus`)."""
    return claimed_cpus(allowed, proc).get(cpu)


# The names the plugin gives its threads ("promptcache-load", "promptcache-save_0", ...);
# /proc shows the first 15 characters.
PLUGIN_THREAD_PREFIX = "promptcache"


def _status(path: str) -> dict[str, str] | None:
    try:
        with open(path) as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return None


def choose_load_cpu(setting: str, rank: int = 0, environ=os.environ,
                    ranks: int = 1) -> tuple[int | None, str]:
    """(the CPU the load thread runs on, or None; why), for ``load_cpu`` = `setting`.
    `ranks`: the workers on this machine, each with its own OpenMP threads."""
    if setting == "off":
        return None, "--promptcache-load-cpu off"
    if setting != "auto":
        cpu = int(setting)
        if cpu not in os.sched_getaffinity(0) | process_cpus():
            raise ValueError(f"--promptcache-load-cpu {cpu}: this process may not run there "
                             f"(allowed: {sorted(process_cpus())})")
        return cpu, f"CPU {cpu} (--promptcache-load-cpu)"
    bound = omp_cpus(environ) or pinned_thread_cpus()
    if not bound:
        return None, "the worker's OpenMP threads are not bound, so no CPU is known free"
    # Every rank's threads: vLLM's bind list names them all ("0-13|16-29"); where it
    # does not (auto binding), another rank's CPUs are not known here.
    lists = environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if ranks > 1:
        if "|" not in lists:
            return None, (f"{ranks} workers on this machine and their CPUs are not listed "
                          f"(VLLM_CPU_OMP_THREADS_BIND={lists})")
        for part in lists.split("|"):
            bound |= _cpu_list(part)
    # Not a CPU sharing a core with one of them (SMT siblings): a free core, on their
    # NUMA node where there is one.
    busy = set().union(*(_siblings(c) for c in bound))
    free = sorted(process_cpus() - busy)
    if not free:
        return None, (f"every core this worker may use ({sorted(process_cpus())}) runs "
                      f"OpenMP threads ({sorted(bound)})")
    # Nor a CPU another process has bound threads to (another engine's worker, which
    # busy-polls between steps).  The load thread takes the GIL to start each layer; put
    # off its CPU there while holding it, it stopped this worker's forward for as long
    # (two servers on a CPU each: the forward's CPU idle for a second and more, whole
    # answers arriving seconds late).
    claimed = claimed_cpus(process_cpus())
    if all(c in claimed for c in free):
        held = ", ".join(f"CPU {c} by process {claimed[c]}" for c in free)
        return None, (f"every core the OpenMP threads ({sorted(bound)}) leave free has "
                      f"another process's threads bound to it ({held})")
    free = [c for c in free if c not in claimed]
    nodes = {_node(c) for c in bound}
    free.sort(key=lambda c: (_node(c) not in nodes, c))
    cpu = free[rank % len(free)]
    return cpu, f"CPU {cpu}, on a core the worker's OpenMP threads ({sorted(bound)}) leave free"


def _siblings(cpu: int) -> set[int]:
    """`cpu` and the logical CPUs that share its core."""
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
            return _cpu_list(f.read()) | {cpu}
    except OSError:
        return {cpu}


def _node(cpu: int) -> int:
    try:
        names = os.listdir(f"/sys/devices/system/cpu/cpu{cpu}")
    except OSError:
        return 0
    return next((int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit()), 0)


def process_cpus() -> set[int]:
    """The CPUs this worker's process may use: its parent's affinity (the engine process,
    which vLLM does not bind), which the worker's own thread binding has narrowed."""
    try:
        return set(os.sched_getaffinity(os.getppid()))
    except OSError:
        return set(range(os.cpu_count() or 1))


def split_beside(page_blocks, token_blocks, written_blocks, pages: bool = True,
                 tokens: bool = True):
    """(page_beside, token_beside): which whole-block copies (into `page_blocks`) and
    which token loads (into `token_blocks`, one entry a token) may run beside the
    forward, the rest before it.  Before: anything into a block the forward writes
    (`written_blocks`), everything of a kind the load thread cannot move (`pages`,
    `tokens` False), and a page copy into a block some token load before the forward
    also fills -- a block's page copy must precede its tokens (a stored run's partial
    last block, then the tokens found after it)."""
    page_blocks, token_blocks = np.asarray(page_blocks), np.asarray(token_blocks)
    page_beside = (~np.isin(page_blocks, written_blocks) if pages
                   else np.zeros(len(page_blocks), dtype=bool))
    token_beside = (~np.isin(token_blocks, written_blocks) if tokens
                    else np.zeros(len(token_blocks), dtype=bool))
    page_beside &= ~np.isin(page_blocks, token_blocks[~token_beside])
    return page_beside, token_beside


class LayerwiseLoads:
    """Runs a step's per-layer load work on a thread bound to `cpu` (None: in the
    caller, before the forward) and lets each layer wait for its own."""

    def __init__(self, layer_names: Sequence[str], cpu: int | None):
        self.names = list(layer_names)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.cpu = cpu
        self.verified = False          # vLLM waited for every layer in a probe step
        self._probe: set[str] | None = None
        self._cond = threading.Condition()
        self._work: LayerWork | None = None  # the running step's
        self._claimed = 0              # its layers taken by a thread (in order)
        self._finished: list[bool] = []  # its layers moved
        self._done = 0                 # how many
        self._settled = 0              # taken layers whose move ended (moved or failed)
        self.moved_by_caller = 0       # layers the forward moved itself (thread behind)
        self._error: BaseException | None = None
        self._reported = False         # the error was raised in a layer's wait
        self._running = False
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._bind_error: OSError | None = None
        if cpu is not None:
            bound = threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(bound,),
                                            name="promptcache-load", daemon=True)
            self._thread.start()
            bound.wait()
            if not self._thread.is_alive() or self._bind_error is not None:
                # Unbound, it would compete with the forward on its own CPU.
                logger.warning("promptcache: the load thread could not bind to CPU %s (%s); "
                               "CPU loads run before the forward", cpu, self._bind_error)
                self._thread, self.cpu = None, None

    @property
    def can_run_beside(self) -> bool:
        """Whether there is a load thread (verified or still to be, by a probe step)."""
        return self._thread is not None

    @property
    def layerwise(self) -> bool:
        """Whether a step's loads may run beside its forward now."""
        return self._thread is not None and self.verified

    def run(self, work: LayerWork) -> None:
        """This step's loads: work(i) moves layer i's bytes.  Beside the forward once
        verified, else here (recording, while not verified, which layers vLLM waits for)."""
        self.finish()
        if not self.layerwise:
            for i in range(len(self.names)):
                work(i)
            if self._thread is not None:
                self._probe = set()
            return
        with self._cond:
            self._work, self._claimed, self._done, self._settled = work, 0, 0, 0
            self._finished = [False] * len(self.names)
            self._error, self._running, self._reported = None, True, False
        self._jobs.put(work)

    def wait_layer(self, name: str) -> None:
        """Until layer `name` is moved.  Layers the load thread has not taken yet (its
        CPU busy with another process after all) are moved here, in order, up to this
        one: the forward waits for a layer being copied, never for a thread to get a
        CPU."""
        if self._probe is not None:
            self._probe.add(name)
            return
        i = self._index.get(name)
        if i is None:
            return
        with self._cond:
            if not self._running:
                return
            self._move_until(lambda: self._finished[i], last=i)
            if not self._finished[i]:  # this layer's load failed
                self._reported = True
                raise RuntimeError(f"promptcache: loading layer {name} failed: "
                                   f"{self._error}") from self._error

    def finish(self) -> None:
        """After the forward: every layer moved (a later save or promotion may reuse the
        loads' slots; those the load thread has not taken are moved here); ends a probe
        step."""
        if self._probe is not None:
            missing = [n for n in self.names if n not in self._probe]
            self._probe = None
            if missing:
                logger.warning("promptcache: vLLM did not wait for the loads of %d layers "
                               "(%s...), so CPU loads stay before the forward",
                               len(missing), ", ".join(missing[:3]))
                self._stop()
            else:
                self.verified = True
                logger.info("promptcache: CPU loads now run layer by layer on CPU %d beside "
                            "the forward", self.cpu)
            return
        with self._cond:
            if self._running:
                self._move_until(lambda: self._done == len(self.names),
                                 last=len(self.names) - 1)
                while self._settled < self._claimed:  # after a failure: copies in flight
                    self._cond.wait()
            error, self._running, self._work = self._error, False, None
            reported, self._error, self._reported = self._reported, None, False
        if error is not None and not reported:
            raise RuntimeError(f"promptcache: a layer-wise load failed: {error}") from error

    def _move_until(self, done: Callable[[], bool], last: int) -> None:
        """Holding the lock: until done() or a failure, move here the next layer no thread
        has taken while it is at most `last`, else wait for the load thread."""
        work = self._work
        while not done() and self._error is None:
            i = self._claim(work) if self._claimed <= last else None
            if i is None:
                self._cond.wait()
                continue
            self.moved_by_caller += 1
            self._cond.release()
            try:
                self._move(work, i)
            finally:
                self._cond.acquire()

    def _claim(self, work: LayerWork | None) -> int | None:
        """Holding the lock: the next layer of `work` that no thread has taken, if any."""
        if (work is None or self._work is not work or self._error is not None
                or self._claimed >= len(self.names)):
            return None
        self._claimed += 1
        return self._claimed - 1

    def _move(self, work: LayerWork, i: int) -> None:
        """Not holding the lock: move layer i and record the outcome."""
        error = None
        try:
            work(i)
        except BaseException as e:  # noqa: BLE001 - raised in the forward's wait
            error = e
        with self._cond:
            # finish() waits for every taken layer, so the step is still this one.
            self._settled += 1
            if error is not None:
                self._error = self._error or error
            else:
                self._finished[i] = True
                self._done += 1
            self._cond.notify_all()

    def _loop(self, bound: threading.Event) -> None:
        background_threads.name_os_thread()
        try:
            os.sched_setaffinity(0, {self.cpu})  # this thread only
        except OSError as e:
            self._bind_error = e
            return
        finally:
            bound.set()
        while True:
            work = self._jobs.get()
            if work is None:
                return
            while True:  # a step's layers in order, unless the forward took them first
                with self._cond:
                    i = self._claim(work)
                if i is None:
                    break
                self._move(work, i)

    def _stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def shutdown(self) -> None:
        try:
            self.finish()
        finally:
            self._stop()

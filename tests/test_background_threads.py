"""The plugin's background threads (saves, disk and remote IO) run on the CPU the load
thread was given, off the forward's, once one is set; before that, where they started."""

import os

import pytest

from vllm_promptcache import background_threads
from vllm_promptcache.background_threads import BackgroundPool


@pytest.fixture
def cpus():
    allowed = sorted(os.sched_getaffinity(0))
    yield allowed
    background_threads.set_cpu(None)


def test_a_pool_moves_its_threads_to_the_background_cpu(cpus):
    cpu = cpus[-1]
    background_threads.set_cpu(cpu)
    with BackgroundPool(2) as pool:
        seen = {frozenset(f.result(10)) for f in
                [pool.submit(os.sched_getaffinity, 0) for _ in range(8)]}
    assert seen == {frozenset({cpu})}
    assert os.sched_getaffinity(0) == set(cpus), "the caller's own thread is not moved"


def test_without_a_background_cpu_threads_stay_where_they_start(cpus):
    background_threads.set_cpu(None)
    with BackgroundPool(1) as pool:
        assert pool.submit(os.sched_getaffinity, 0).result(10) == set(cpus)
    # Results and exceptions still come back through the future.
    with BackgroundPool(1) as pool:
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(10)


def _fake_proc(root, tasks):
    """A /proc with {pid: (ppid, Cpus_allowed_list[, thread name])} (one task each)."""
    for pid, (ppid, cpus, *name) in tasks.items():
        task = root / str(pid) / "task" / str(pid)
        task.mkdir(parents=True)
        (task / "status").write_text(f"Name:\t{name[0] if name else 'x'}\nPPid:\t{ppid}\n"
                                     f"Cpus_allowed_list:\t{cpus}\n")
    return str(root)


def test_a_cpu_another_process_is_bound_to_is_claimed(tmp_path):
    from vllm_promptcache.connector.cpu_layer_loads import claimed_by_other

    proc = _fake_proc(tmp_path, {
        100: (1, "1"),        # another engine's OpenMP thread, bound to CPU 1
        50: (2, "0"),         # a kernel thread (per-CPU by design): not counted
        200: (1, "0-3"),      # an unbound process
        os.getpid(): (1, "0"),  # this process: not counted
    })
    allowed = {0, 1, 2, 3}
    assert claimed_by_other(1, allowed, proc) == 100
    assert claimed_by_other(0, allowed, proc) is None
    assert claimed_by_other(2, allowed, proc) is None
    # A thread bound to every CPU the engine may use is not bound anywhere in particular.
    assert claimed_by_other(1, {1}, proc) is None


def test_every_claimed_cpu_comes_from_one_scan_without_the_plugins_own_threads(tmp_path):
    from vllm_promptcache.connector.cpu_layer_loads import claimed_cpus

    proc = _fake_proc(tmp_path, {
        100: (1, "1"),                       # another engine's OpenMP thread
        300: (1, "2-3"),                     # a front end pinned to two CPUs
        400: (1, "0", "promptcache-loa"),    # another engine's load thread: sleeps
        500: (1, "0", "promptcache-sav"),    # ... and its saves
    })
    assert claimed_cpus({0, 1, 2, 3}, proc) == {1: 100, 2: 300, 3: 300}


def test_background_threads_stay_put_where_another_process_holds_the_load_cpu(tmp_path):
    import subprocess
    import sys

    from vllm_promptcache.connector.cpu_layer_loads import claimed_by_other, process_cpus

    allowed = process_cpus()
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    cpu = max(allowed)
    held_already = claimed_by_other(cpu, allowed)  # by something outside this test
    child = subprocess.Popen([sys.executable, "-c",
                              f"import os, time; os.sched_setaffinity(0, {{{cpu}}}); "
                              f"print('bound', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "bound"
        # The child's own /proc entry, read alone (another engine of this suite, run
        # beside it, may hold that CPU too and be found first in the real /proc).
        view = tmp_path / "proc"
        view.mkdir()
        (view / str(child.pid)).symlink_to(f"/proc/{child.pid}")
        assert claimed_by_other(cpu, allowed, str(view)) == child.pid
        assert claimed_by_other(min(allowed), allowed, str(view)) is None
        chosen, why = background_threads.choose_cpu(cpu, allowed)
        assert chosen is None and "bound to it" in why
        # A CPU `auto` chose was checked when it was chosen: not read again.
        assert background_threads.choose_cpu(cpu, allowed, named=False)[0] == cpu
    finally:
        child.kill()
        child.wait()
    if held_already is None:
        chosen, why = background_threads.choose_cpu(cpu, allowed)
        assert chosen == cpu, why
    assert background_threads.choose_cpu(None, allowed)[0] is None


def test_the_plugins_threads_carry_their_names_into_the_os():
    """An operator's `top -H` or /proc shows which of the plugin's threads use the
    machine: a pool's thread is named after its prefix, shortened to fit 15 bytes."""
    import threading

    def comm() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    pool = BackgroundPool(1, thread_name_prefix="promptcache-disk-write")
    try:
        assert pool.submit(comm).result() == "pc-disk-write_0"
    finally:
        pool.shutdown()
    assert comm() != "pc-disk-write_0", "the calling thread keeps its own name"

"""The CPU's layer-wise loads (connector/cpu_layer_loads.py), with real threads: which CPU
they run on, the probe step, each layer waiting for its own, errors surfacing in the
forward's wait.  End to end through vLLM: tests/connector/test_reuse.py."""

from __future__ import annotations

import os
import threading
import time

import pytest

from vllm_promptcache.connector import cpu_layer_loads as cll
from vllm_promptcache.connector.cpu_layer_loads import (LayerwiseLoads, choose_load_cpu,
                                                        omp_cpus)

NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(4)]


def test_the_openmp_cpus_are_read_from_what_vllm_sets():
    assert omp_cpus({"OMP_PLACES": "{1,2,3}", "OMP_PROC_BIND": "true"}) == {1, 2, 3}
    assert omp_cpus({"GOMP_CPU_AFFINITY": "4 5 6"}) == {4, 5, 6}
    assert omp_cpus({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[8,9]"}) == {8, 9}
    assert omp_cpus({"OMP_PLACES": "cores"}) == set()  # abstract names bind nothing known
    assert omp_cpus({}) == set()


def test_threads_pinned_one_cpu_each_are_found():
    cpu = min(os.sched_getaffinity(0))
    seen, go = [], threading.Event()

    def pinned():
        os.sched_setaffinity(0, {cpu})
        seen.append(cll.pinned_thread_cpus())
        go.wait(5)

    t = threading.Thread(target=pinned)
    t.start()
    while not seen:
        time.sleep(0.01)
    go.set()
    t.join()
    assert cpu in seen[0]


@pytest.fixture(autouse=True)
def no_other_process_bound(monkeypatch):
    """Nothing else bound anywhere, whatever runs beside this suite (another test
    engine's worker); a test that needs a claim sets one."""
    monkeypatch.setattr(cll, "claimed_cpus", lambda allowed, proc="/proc": {})


def test_auto_takes_a_cpu_the_openmp_threads_leave_free(monkeypatch):
    monkeypatch.setattr(cll, "process_cpus", lambda: {0, 1, 2, 3})
    assert choose_load_cpu("auto", 0, {"OMP_PLACES": "{1,2}"})[0] == 0
    assert choose_load_cpu("auto", 1, {"OMP_PLACES": "{1,2}"})[0] == 3  # one per rank
    cpu, why = choose_load_cpu("auto", 0, {"OMP_PLACES": "{0,1,2,3}"})
    assert cpu is None and "OpenMP" in why
    monkeypatch.setattr(cll, "pinned_thread_cpus", lambda: set())
    cpu, why = choose_load_cpu("auto", 0, {})
    assert cpu is None and "not bound" in why
    # Bound by vLLM itself, thread by thread (no OpenMP variables): read off the threads.
    monkeypatch.setattr(cll, "pinned_thread_cpus", lambda: {0, 1})
    assert choose_load_cpu("auto", 0, {})[0] == 2
    assert choose_load_cpu("off", 0, {"OMP_PLACES": "{1}"})[0] is None


def test_auto_skips_a_cpu_another_process_has_threads_bound_to(monkeypatch):
    """Two servers on a CPU each: the CPU one server's OpenMP threads leave free is the
    other's forward CPU.  A load thread there held the GIL while descheduled and stopped
    its own forward; it is not started there, and a CPU named by hand still is."""
    monkeypatch.setattr(cll, "process_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(cll, "claimed_cpus", lambda allowed, proc="/proc": {0: 4242})
    assert choose_load_cpu("auto", 0, {"OMP_PLACES": "{1,2}"})[0] == 3
    monkeypatch.setattr(cll, "claimed_cpus",
                        lambda allowed, proc="/proc": {0: 4242, 3: 4343})
    cpu, why = choose_load_cpu("auto", 0, {"OMP_PLACES": "{1,2}"})
    assert cpu is None and "CPU 0 by process 4242" in why and "CPU 3 by process 4343" in why
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert choose_load_cpu("0")[0] == 0


def test_a_cpu_this_process_may_not_use_is_refused(monkeypatch):
    monkeypatch.setattr(cll, "process_cpus", lambda: {0, 1})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert choose_load_cpu("1")[0] == 1
    with pytest.raises(ValueError, match="may not run there"):
        choose_load_cpu("7")


def test_the_option_is_validated():
    from vllm_promptcache.config import PromptCacheConfig, PromptCacheConfigError

    assert PromptCacheConfig(load_cpu=3).validate().load_cpu == "3"
    with pytest.raises(PromptCacheConfigError, match="--promptcache-load-cpu"):
        PromptCacheConfig(load_cpu="fast").validate()


def _cpu():
    return min(os.sched_getaffinity(0))


def verified_loads() -> LayerwiseLoads:
    """A load thread past its probe step (vLLM waited for every layer): layer-wise."""
    loads = LayerwiseLoads(NAMES, _cpu())
    loads.run(lambda i: None)
    for name in NAMES:
        loads.wait_layer(name)
    loads.finish()
    assert loads.layerwise
    return loads


def test_the_probe_step_runs_before_the_forward_then_layers_run_beside_it():
    loads = LayerwiseLoads(NAMES, _cpu())
    try:
        seen = []
        loads.run(lambda i: seen.append((i, threading.get_ident())))
        # The probe: every layer moved here, in the caller, before any wait.
        assert [i for i, _ in seen] == [0, 1, 2, 3]
        assert {t for _, t in seen} == {threading.get_ident()}
        for name in NAMES:
            loads.wait_layer(name)
        loads.finish()
        assert loads.layerwise

        done, affinity = [], []
        release = threading.Event()

        def work(i):
            if threading.current_thread().name == "promptcache-load":
                affinity.append(os.sched_getaffinity(0))
            if i == 2:
                release.wait(5)
            done.append(i)

        loads.run(work)
        loads.wait_layer(NAMES[1])
        assert 1 in done
        time.sleep(0.1)
        assert 2 not in done  # layer 2 still moving: its wait must block
        waiter = threading.Thread(target=loads.wait_layer, args=(NAMES[2],))
        waiter.start()
        time.sleep(0.1)
        assert waiter.is_alive()
        release.set()
        waiter.join(5)
        assert not waiter.is_alive() and 2 in done
        loads.finish()
        assert sorted(done) == [0, 1, 2, 3]
        assert all(a == {_cpu()} for a in affinity)  # the load thread's own binding
    finally:
        loads.shutdown()


def test_a_layer_vllm_does_not_wait_for_keeps_loads_before_the_forward():
    loads = LayerwiseLoads(NAMES, _cpu())
    loads.run(lambda i: None)
    for name in NAMES[:-1]:
        loads.wait_layer(name)
    loads.finish()
    assert not loads.layerwise and not loads.can_run_beside
    caller = []
    loads.run(lambda i: caller.append(threading.get_ident()))
    assert caller == [threading.get_ident()] * 4


def test_a_failed_layer_raises_in_its_wait_and_the_next_step_runs():
    loads = verified_loads()
    try:

        def work(i):
            if i == 1:
                raise OSError("host slot unreadable")

        loads.run(work)
        loads.wait_layer(NAMES[0])
        with pytest.raises(RuntimeError, match="host slot unreadable"):
            loads.wait_layer(NAMES[1])
        loads.finish()  # already raised in the forward: not again

        loads.run(lambda i: (_ for _ in ()).throw(ValueError("bad")) if i == 3 else None)
        with pytest.raises(RuntimeError, match="bad"):
            loads.finish()  # never waited for: finish says it
        moved = []
        loads.run(moved.append)
        loads.finish()
        assert moved == [0, 1, 2, 3]
    finally:
        loads.shutdown()


def test_without_a_cpu_every_load_runs_in_the_caller():
    loads = LayerwiseLoads(NAMES, None)
    order = []
    loads.run(order.append)
    assert order == [0, 1, 2, 3] and not loads.can_run_beside
    loads.wait_layer(NAMES[0])
    loads.finish()


def test_what_runs_beside_the_forward():
    import numpy as np

    from vllm_promptcache.connector.cpu_layer_loads import split_beside

    # Blocks 0-2 copied whole (2: a stored run's partial last block), tokens after it
    # into blocks 2 and 3; the forward writes into block 4 only.
    pages, tokens, written = [0, 1, 2], [2, 2, 3, 3], np.array([4])
    page, tok = split_beside(pages, tokens, written)
    assert page.tolist() == [True, True, True] and tok.all()
    # The forward writes block 3 too: its tokens go before; the rest stays beside.
    page, tok = split_beside(pages, tokens, np.array([3, 4]))
    assert page.tolist() == [True, True, True] and tok.tolist() == [True, True, False, False]
    # Token loads the thread cannot move (no C loop) go before the forward, and so
    # does the page copy of block 2, which must come before its tokens.
    page, tok = split_beside(pages, tokens, written, tokens=False)
    assert page.tolist() == [True, True, False] and not tok.any()
    # A block the forward writes: its page copy before the forward.
    page, tok = split_beside(pages, tokens, np.array([2]))
    assert page.tolist() == [True, True, False] and tok.tolist() == [False, False, True, True]


def test_other_ranks_and_smt_siblings_are_not_free(monkeypatch):
    monkeypatch.setattr(cll, "process_cpus", lambda: set(range(8)))
    monkeypatch.setattr(cll, "_siblings", lambda c: {c})
    monkeypatch.setattr(cll, "_node", lambda c: 0)
    env = {"OMP_PLACES": "{0,1}", "VLLM_CPU_OMP_THREADS_BIND": "0-1|2-3"}
    assert choose_load_cpu("auto", 0, env, ranks=2)[0] == 4  # not rank 1's CPUs 2, 3
    cpu, why = choose_load_cpu("auto", 0, {"OMP_PLACES": "{0,1}"}, ranks=2)
    assert cpu is None and "not listed" in why
    # SMT: CPU c and c + 4 share a core; CPUs 0-3 compute, so no core is free.
    monkeypatch.setattr(cll, "_siblings", lambda c: {c % 4, c % 4 + 4})
    cpu, why = choose_load_cpu("auto", 0, {"OMP_PLACES": "{0,1,2,3}"})
    assert cpu is None and "core" in why
    assert choose_load_cpu("auto", 0, {"OMP_PLACES": "{0,1,2}"})[0] == 3
    # The bound threads' NUMA node first.
    monkeypatch.setattr(cll, "_siblings", lambda c: {c})
    monkeypatch.setattr(cll, "_node", lambda c: c // 4)
    assert choose_load_cpu("auto", 0, {"OMP_PLACES": "{4,5}"})[0] == 6


def test_a_load_thread_that_cannot_bind_is_not_used():
    loads = LayerwiseLoads(NAMES, 1 << 15)  # no such CPU
    assert loads.cpu is None and not loads.can_run_beside
    order = []
    loads.run(order.append)
    assert order == [0, 1, 2, 3]


def test_layers_load_in_forward_order_whatever_the_kv_cache_groups():
    """A hybrid model's groups list its sliding-window layers apart from its full ones;
    layer-wise loads follow the forward (vLLM's index of each name), not the groups."""
    from vllm_promptcache import compat

    groups = [("model.layers.1.self_attn.attn", 10), ("model.layers.3.self_attn.attn", 10),
              ("model.layers.0.self_attn.attn", 20), ("model.layers.2.self_attn.attn", 20),
              ("lm_head.attn", 30), ("model.layers.4.self_attn.attn", 20)]
    assert [name.split(".")[2] if name.startswith("model") else name
            for name, _ in compat.forward_order(groups)] == ["0", "1", "2", "3", "4",
                                                            "lm_head.attn"]
    assert dict(compat.forward_order(groups)) == dict(groups)  # pages stay with their layer


def test_the_forward_moves_what_a_load_thread_without_its_cpu_has_not_taken():
    """The load thread's CPU may not be free after all (another engine's worker runs
    there): the forward never waits for the thread to be scheduled.  Here the thread is
    held in layer 0; the forward's waits for layers 1-3 return, having moved them on
    the forward's own thread, and finish waits for layer 0 only."""
    loads = verified_loads()
    try:
        held, taken = threading.Event(), threading.Event()
        movers = {}

        def work(i):
            movers[i] = threading.current_thread().name
            if threading.current_thread().name == "promptcache-load":
                taken.set()
                held.wait(5)

        loads.run(work)
        assert taken.wait(5)  # the thread took a layer and stalls in it
        stalled = next(i for i, m in movers.items() if m == "promptcache-load")
        start = time.monotonic()
        for name in NAMES:
            if NAMES.index(name) != stalled:
                loads.wait_layer(name)
        assert time.monotonic() - start < 2, "the forward waited for the stalled thread"
        assert all(movers[i] == threading.current_thread().name
                   for i in range(len(NAMES)) if i != stalled)
        assert loads.moved_by_caller == len(NAMES) - 1
        finisher = threading.Thread(target=loads.finish)
        finisher.start()
        time.sleep(0.1)
        assert finisher.is_alive(), "finish waits for the layer still being moved"
        held.set()
        finisher.join(5)
        assert not finisher.is_alive()
    finally:
        held.set()
        loads.shutdown()


def test_a_failure_beside_a_layer_still_moving_waits_for_it_before_the_next_step():
    """A layer fails on one thread while the other still moves another: finish returns
    only once that copy ended, so the next step's bookkeeping is never touched by it."""
    loads = verified_loads()
    try:
        held, taken = threading.Event(), threading.Event()

        stalled = []

        def work(i):
            if threading.current_thread().name == "promptcache-load":
                stalled.append(i)
                taken.set()
                held.wait(5)
                return
            raise OSError("unreadable")

        loads.run(work)
        assert taken.wait(5) and stalled == [0]  # the thread holds layer 0
        with pytest.raises(RuntimeError, match="unreadable"):
            loads.wait_layer(NAMES[1])  # moved by the forward: fails
        finisher = threading.Thread(target=loads.finish)
        finisher.start()
        time.sleep(0.1)
        assert finisher.is_alive()
        held.set()
        finisher.join(5)
        assert not finisher.is_alive()
        moved = []
        loads.run(moved.append)
        loads.finish()
        assert sorted(moved) == [0, 1, 2, 3]
    finally:
        held.set()
        loads.shutdown()
